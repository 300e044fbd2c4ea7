"""The block-tridiagonal factorizations against dense linear algebra."""

from __future__ import annotations

import pytest
import torch
from cases import DT

from hessinv.blocktri import BlockTriLU, _bunch_kaufman, block_tri_inertia, front_congruence
from hessinv.lifted import lifted_dense


def random_blocktri(sizes, seed, *, zero_diag=False, scale_spread=0.0):
    g = torch.Generator().manual_seed(seed)
    diag, upper = [], []
    for k, n in enumerate(sizes):
        a = torch.randn(n, n, generator=g, dtype=DT)
        a = a + a.T
        if zero_diag:
            a = torch.zeros_like(a)  # forces pivoting across the block boundary
        diag.append(a * 10 ** (scale_spread * (k % 3 - 1)))
        if k + 1 < len(sizes):
            upper.append(torch.randn(n, sizes[k + 1], generator=g, dtype=DT))
    return diag, upper


CASES = [
    ([3, 4, 2, 5], False, 0.0),
    ([6] * 10, True, 0.0),
    ([1, 7, 1, 7, 1], False, 2.0),
    ([4] * 30, False, 1.0),
    ([5], False, 0.0),
]


@pytest.mark.parametrize("sizes,zero_diag,spread", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lu_solve_slogdet_inertia(sizes, zero_diag, spread, seed):
    diag, upper = random_blocktri(sizes, seed, zero_diag=zero_diag, scale_spread=spread)
    K = lifted_dense(diag, upper)
    n = K.shape[0]
    ev = torch.linalg.eigvalsh(K)
    if float(ev.abs().min()) < 1e-10 * float(ev.abs().max()):
        pytest.skip("random matrix numerically singular")
    lu = BlockTriLU(diag, upper)
    g = torch.Generator().manual_seed(seed + 100)
    R = torch.randn(n, 3, generator=g, dtype=DT)
    pieces = list(torch.split(R, sizes))
    X = torch.cat(lu.solve(pieces))
    res = torch.linalg.norm(K @ X - R) / torch.linalg.norm(R)
    Xd = torch.linalg.solve(K, R)
    res_d = torch.linalg.norm(K @ Xd - R) / torch.linalg.norm(R)
    assert res <= 100 * max(float(res_d), 1e-16)
    s, la = lu.slogdet()
    s_ref, la_ref = torch.linalg.slogdet(K)
    assert s == float(s_ref)
    assert abs(la - float(la_ref)) < 1e-9 * max(1.0, abs(float(la_ref)))
    r = block_tri_inertia(diag, upper)
    assert (r.positive, r.negative, r.zero) == (int((ev > 0).sum()), int((ev < 0).sum()), 0)
    assert r.sign == float(s_ref)
    assert abs(r.logabsdet - float(la_ref)) < 1e-8 * max(1.0, abs(float(la_ref)))


def test_inertia_counts_exact_zeros():
    # a block-diagonal matrix with an exactly singular block
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=DT))
    d0 = q @ torch.diag(torch.tensor([2.0, -1.0, 0.0, 0.0], dtype=DT)) @ q.T
    d1 = torch.diag(torch.tensor([3.0, -5.0, 1.0], dtype=DT))
    upper = [torch.zeros(4, 3, dtype=DT)]
    r = block_tri_inertia([d0, d1], upper)
    assert (r.positive, r.negative, r.zero) == (3, 2, 2)
    lu = BlockTriLU([d0, d1], upper)
    assert lu.singular


def test_lu_rejects_bad_block_counts():
    with pytest.raises(ValueError):
        BlockTriLU([torch.eye(2, dtype=DT)], [torch.eye(2, dtype=DT)])


def _lifted(depth, width, batch, damping, seed=0, stage_solver=True):
    from test_solve import tanh_mlp

    import hessinv
    from hessinv.solvers.lifted import LiftedFactorization

    H = hessinv.Hessian(*tanh_mlp(depth, width, batch, gain=1.2, seed=seed))
    if not stage_solver:  # the block LU and its congruences (no stage elimination to verify)
        return H, LiftedFactorization(H, damping, stage_solver=False)
    return H, H.factor(damping, method="lifted")


@pytest.mark.parametrize("pivoting", ["eigh", "ldl"])
@pytest.mark.parametrize("damping", [1e-3, -0.3])
@pytest.mark.parametrize("max_carry", [0, 8, None])
def test_inertia_with_capped_fronts(damping, max_carry, pivoting):
    """Forced eliminations (down to ``alpha_floor``) keep the inertia exact here."""
    from hessinv.lifted import LiftedSystem

    H, _ = _lifted(12, 6, 6, damping)
    system = LiftedSystem(H.blocks, damping)  # not equilibrated: the cap binds here
    diag, upper = system.assemble()
    ev = torch.linalg.eigvalsh(lifted_dense(diag, upper))
    ref = (int((ev > 0).sum()), int((ev < 0).sum()), 0)
    kw = {"alpha": 0.01, "pivoting": pivoting, "rtol": 0.0 if pivoting == "ldl" else None}
    free = block_tri_inertia(diag, upper, **kw)
    capped = block_tri_inertia(diag, upper, max_carry=max_carry, **kw)
    assert (capped.positive, capped.negative, capped.zero) == ref
    if max_carry is not None:
        assert capped.forced > 0  # the cap did bind
        assert capped.max_front <= free.max_front
    s, la = BlockTriLU(diag, upper).slogdet()
    assert capped.sign == s and abs(capped.logabsdet - la) < 1e-8 * abs(la)


def test_front_congruence_both_pivotings():
    """``X^T s X = diag(w)``: signs of ``s`` and ``c^T s^{-1} c`` from ``(w, X^T c)``, with
    Bunch-Kaufman 2x2 pivots forced by a zero diagonal."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(30, 30, generator=g, dtype=DT)
    s = s + s.T
    s[:10, :10] = 0.0
    c = torch.randn(30, 4, generator=g, dtype=DT)
    ev = torch.linalg.eigvalsh(s)
    ref = c.T @ torch.linalg.solve(s, c)
    assert (_bunch_kaufman(s)[3] != 0).any()  # 2 x 2 pivots do occur
    for pivoting in ("eigh", "ldl"):
        w, y = front_congruence(s, c, pivoting)
        assert int((w < 0).sum()) == int((ev < 0).sum())
        assert torch.allclose(y.T @ (y / w.unsqueeze(1)), ref, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="pivoting"):
        block_tri_inertia([s], [], pivoting="qr")


def test_factorization_falls_back_when_the_capped_inertia_disagrees(monkeypatch):
    """A capped congruence whose determinant disagrees with the LU is recomputed safely."""
    import hessinv.solvers.lifted_inertia as hh

    H, fac = _lifted(6, 5, 4, 1e-2, stage_solver=False)
    calls = []
    real = hh.block_tri_inertia

    def spoiled(diag, upper, **kw):
        calls.append(kw)
        r = real(diag, upper, **kw)
        if kw.get("alpha") == 0.01:  # pretend growth flipped one sign
            r.positive, r.negative, r.sign, r.forced = r.positive - 1, r.negative + 1, -r.sign, 1
        return r

    monkeypatch.setattr(hh, "block_tri_inertia", spoiled)
    ev = torch.linalg.eigvalsh(H.to_dense() + 1e-2 * torch.eye(H.num_params, dtype=DT))
    assert fac.inertia() == (int((ev > 0).sum()), int((ev < 0).sum()), 0)
    # Bunch-Kaufman and eigh at threshold 0.01 (both spoiled here), eigh at 0.1 with a
    # wider cap (bounded cost)
    # (then possibly the reverse-order congruence, which verifies the count)
    assert [(c.get("pivoting", "eigh"), c["alpha"]) for c in calls[:3]] == [
        ("ldl", 0.01),
        ("eigh", 0.01),
        ("eigh", 0.1),
    ]
    assert calls[2]["max_carry"] == 4 * calls[0]["max_carry"]


def test_inertia_that_no_attempt_can_verify_raises(monkeypatch):
    import hessinv
    import hessinv.solvers.lifted_inertia as hh

    _, fac = _lifted(6, 5, 4, 1e-2, stage_solver=False)
    real = hh.block_tri_inertia

    def spoiled(diag, upper, **kw):
        r = real(diag, upper, **kw)
        r.sign = -r.sign  # no attempt agrees with the LU
        return r

    monkeypatch.setattr(hh, "block_tri_inertia", spoiled)
    with pytest.raises(hessinv.LiftedPrecisionError, match="method='dense'"):
        fac.inertia()


@pytest.mark.parametrize("f", [1, 2, 3, 8, 41, 130])
def test_bunch_kaufman_reassembles_its_matrix(f):
    """``s[perm][:, perm] = Lt D Lt^T`` with ``Lt`` unit lower triangular, on indefinite,
    graded and exactly singular fronts (interchanges and 2 x 2 pivots of every kind)."""
    g = torch.Generator().manual_seed(f)
    for trial in range(12):
        a = torch.randn(f, f, generator=g, dtype=DT)
        s = a + a.T
        if trial % 3 == 1:  # graded: forces interchanges towards the large rows
            sc = torch.logspace(-6, 0, f, dtype=DT)
            s = sc[:, None] * s * sc[None, :]
        if trial % 4 == 2 and f > 2:  # zero diagonal (2 x 2 pivots) and a null direction
            s.fill_diagonal_(0.0)
            s[-1], s[:, -1] = 0.0, 0.0
        perm, lt, d, sub = _bunch_kaufman(s)
        assert sorted(perm.tolist()) == list(range(f))
        assert torch.equal(lt, torch.tril(lt)) and torch.equal(
            torch.diagonal(lt), torch.ones(f, dtype=DT)
        )
        dm = torch.diag(d) + torch.diag(sub, -1) + torch.diag(sub, 1)
        err = (lt @ dm @ lt.T - s[perm][:, perm]).abs().max()
        growth = max(float(lt.abs().max()) ** 2, 1.0) * float(dm.abs().max())
        assert float(err) <= 50 * f * 2.2e-16 * max(growth, float(s.abs().max())), (trial, err)
