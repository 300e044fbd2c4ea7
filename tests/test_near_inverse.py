"""The inertia from a near inverse (:mod:`hessinv.solvers.near_inverse`).

First the linear algebra on dense matrices, against ``torch.linalg``: the
bound holds over ``||I - A G||_2`` and is tight to the probes' norms; its
confidence statement is checked by counting understatements over many seeds;
a near inverse has the inertia of ``A`` and a wrong-inertia ``S`` is always
refused. Then the lifted factorization: its inertia after a trusted stage
solve is verified this way without any congruence or block LU, matches
``eigvalsh`` of ``torch.func.hessian`` on random nets and every loss scale,
and a stage elimination of a different matrix (one pivot's sign flipped) or
a Bunch-Kaufman count off the pivots' LU determinant is not used.
"""

from __future__ import annotations

import math

import pytest
import torch
from cases import DT, dense_hessian, tanh_net
from hypothesis import given, settings
from hypothesis import strategies as st

import hessinv
from hessinv.riccati_solve import StageRiccati
from hessinv.solvers.lifted import LiftedFactorization
from hessinv.solvers.near_inverse import (
    NEAR_INVERSE_LIMIT,
    PROBE_COLUMNS,
    PROBE_FAILURE,
    near_inverse_bound,
    probe_radius,
    probes,
)


def _sym(n: int, seed: int, cond: float = 1e6) -> torch.Tensor:
    """A random indefinite symmetric matrix with eigenvalues of sizes in ``[1 / cond, 1]``."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    mags = torch.logspace(0, -math.log10(cond), n, dtype=DT)
    signs = torch.where(torch.rand(n, generator=gen, dtype=DT) < 0.4, -1.0, 1.0)
    return (q * (signs * mags)) @ q.T


def _inertia(a: torch.Tensor) -> tuple[int, int]:
    ev = torch.linalg.eigvalsh(a)
    return int((ev > 0).sum()), int((ev < 0).sum())


def _bound(a: torch.Tensor, g: torch.Tensor, seed: int = 3) -> float:
    y = probes(a.shape[0], DT, a.device, seed=seed)
    return near_inverse_bound(y - a @ (g @ y))


def test_probe_radius_is_the_stated_chance() -> None:
    for b in (1, 2, 4, 8):
        delta = probe_radius(b)
        assert (delta * math.sqrt(2 / math.pi)) ** b == pytest.approx(PROBE_FAILURE, rel=1e-12)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 40), seed=st.integers(0, 10**6), size=st.floats(-14, -1))
def test_bound_over_the_true_norm_and_tight_to_the_probes(n: int, seed: int, size: float) -> None:
    """``sigma_1(E) <= bound <= sigma_1(E) max ||y_i|| / delta``, ``G`` inverting a nearby A."""
    a = _sym(n, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    e = torch.randn(n, n, generator=gen, dtype=DT)  # not symmetric: any G
    g = torch.linalg.inv(a + 10.0**size * e)
    sigma = float(torch.linalg.matrix_norm(torch.eye(n, dtype=DT) - a @ g, 2))
    y = probes(n, DT, a.device)
    bound = near_inverse_bound(y - a @ (g @ y))
    top = sigma * float(torch.linalg.vector_norm(y, dim=0).max()) / probe_radius(PROBE_COLUMNS)
    assert sigma <= bound <= top * (1 + 1e-6)


def test_the_stated_confidence_counts_the_understatements() -> None:
    """A rank-one ``E`` (``||E y|| = sigma |c|``): understatements come at the stated rate.

    With one probe and ``failure = 0.2`` the bound understates ``sigma_1`` when
    ``|c| < delta = 0.2 sqrt(pi / 2)``, a chance of ``erf(delta / sqrt 2) = 0.197``:
    counted over 2000 seeds (three standard deviations: 0.027).
    """
    n, sigma = 30, 0.37
    gen = torch.Generator().manual_seed(7)
    u = torch.nn.functional.normalize(torch.randn(n, 1, generator=gen, dtype=DT), dim=0)
    v = torch.nn.functional.normalize(torch.randn(n, 1, generator=gen, dtype=DT), dim=0)
    e = sigma * u @ v.T
    under = sum(
        near_inverse_bound(e @ probes(n, DT, e.device, columns=1, seed=s), failure=0.2) < sigma
        for s in range(2000)
    )
    expected = math.erf(0.2 * math.sqrt(math.pi / 2) / math.sqrt(2))
    assert abs(under / 2000 - expected) <= 0.027


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 30), seed=st.integers(0, 10**6), flips=st.integers(1, 3))
def test_a_near_inverse_has_the_inertia_and_a_wrong_one_is_refused(
    n: int, seed: int, flips: int
) -> None:
    """``S`` close to ``A``: its inertia, a small bound. Eigenvalues' signs flipped: refused."""
    a = _sym(n, seed, cond=1e8)
    ev, q = torch.linalg.eigh(a)
    # ||I - A close^{-1}|| ~ ||E|| cond: 1e-14 * 2 sqrt(n) * 1e8 (at most 1.1e-5), times 80 = 1 /
    # delta for the bound: well below 1/8 (1e-12 made it reach 0.13 at n = 15, seed 21132)
    close = a + 1e-14 * torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=DT)
    b = _bound(a, torch.linalg.inv(close))
    assert b <= NEAR_INVERSE_LIMIT and _inertia(close) == _inertia(a)
    same = ev > 0 if bool((ev > 0).any()) else ev < 0  # flips of one sign change the inertia
    cand = torch.nonzero(same).flatten()
    perm = torch.randperm(cand.numel(), generator=torch.Generator().manual_seed(seed))
    idx = cand[perm[: min(flips, cand.numel())]]
    ev2 = ev.clone()
    ev2[idx] = -ev2[idx]
    wrong = (q * ev2) @ q.T
    assert _inertia(wrong) != _inertia(a)
    assert _bound(a, torch.linalg.inv(wrong)) > NEAR_INVERSE_LIMIT  # ||I - A S^-1|| = 2 there


@pytest.mark.parametrize("c", [1e-12, 1e12])
def test_the_bound_is_scale_invariant(c: float) -> None:
    """``A`` times ``c`` and ``G`` times ``1 / c``: the same bound (to rounding)."""
    a = _sym(25, 3)
    g = torch.linalg.inv(a + 1e-9 * _sym(25, 4))
    b1, bc = _bound(a, g), _bound(c * a, g / c)
    assert bc == pytest.approx(b1, rel=1e-6)


def test_non_finite_and_empty_residuals() -> None:
    r = torch.zeros(5, 4, dtype=DT)
    assert near_inverse_bound(r) == 0.0
    assert near_inverse_bound(torch.zeros(0, 4, dtype=DT)) == 0.0
    r[2, 1] = math.nan
    assert near_inverse_bound(r) == math.inf
    r[2, 1] = math.inf
    assert near_inverse_bound(r) == math.inf


# -- the lifted factorization ---------------------------------------------------------------------


def _reference(model, loss, X, y, d: float) -> tuple[int, int, int]:  # noqa: ANN001
    ev = torch.linalg.eigvalsh(dense_hessian(model, loss, X, y)) + d
    return int((ev > 0).sum()), int((ev < 0).sum()), 0


def _trusted(model, loss, X, y, d: float):  # noqa: ANN001, ANN202
    H = hessinv.Hessian(model, loss, X, y)
    H.solve(torch.randn(H.num_params, dtype=DT), d, method="lifted")
    return H.factor(d, method="lifted")


@settings(max_examples=12, deadline=None)
@given(
    width=st.integers(2, 6),
    batch=st.integers(1, 4),
    depth=st.integers(1, 6),
    gain=st.floats(0.5, 2.5),
    seed=st.integers(0, 1000),
    d=st.sampled_from([1e-3, -1e-3, 0.05, -0.2]),
)
def test_lifted_inertia_by_near_inverse_matches_eigvalsh(
    width: int, batch: int, depth: int, gain: float, seed: int, d: float
) -> None:
    """Random tanh nets and indefinite shifts: a verified count is the dense one."""
    model, loss, X, y = tanh_net(width, batch, depth, gain, seed=seed)
    h = dense_hessian(model, loss, X, y)
    ev = torch.linalg.eigvalsh(h) + d
    tol = h.shape[0] * torch.finfo(DT).eps * float(ev.abs().max())
    if bool((ev.abs() <= 1e3 * tol).any()):  # a zero band (another test's subject)
        return
    fac = _trusted(model, loss, X, y, d)
    inert = fac.inertia()
    assert inert.verified
    assert tuple(inert) == (int((ev > 0).sum()), int((ev < 0).sum()), 0)


@pytest.mark.parametrize("c", [1.0, 1e-12, 1e12])
def test_verified_without_congruence_or_lu_at_every_scale(c: float) -> None:
    model, loss, X, y = tanh_net(6, 3, 7, 1.5, scale=c)
    fac = _trusted(model, loss, X, y, 1e-3 * c)
    assert fac.solver == "stages"
    inert = fac.inertia()
    assert inert.verified and "near inverse" in inert.how
    assert fac._lu is None and fac._congruence is None
    model1, loss1, _, _ = tanh_net(6, 3, 7, 1.5)
    assert tuple(inert) == _reference(model1, loss1, X, y, 1e-3)
    assert fac.near_inverse_bound() <= 1e-3 * NEAR_INVERSE_LIMIT


def _flip_largest(qvv: torch.Tensor) -> torch.Tensor:
    """``qvv - 2 lambda v v^T``, ``lambda`` its eigenvalue of largest modulus (a sign flipped)."""
    w, q = torch.linalg.eigh(qvv)
    i = int(w.abs().argmax())
    return qvv - 2 * w[i] * q[:, i : i + 1] @ q[:, i : i + 1].T


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "blockwise"])
def test_a_stage_elimination_of_another_matrix_is_refused(monkeypatch, fuse: bool) -> None:  # noqa: ANN001
    """The last pivot's largest eigenvalue negated: consistent signs and LU, wrong inertia.

    The stage elimination then factors ``S = A - 2 lambda v v^T`` (one sign
    flipped), trusted here by force (before any solve, which would refuse it);
    its signature and LU agree with each other, so only the near-inverse bound
    can tell, and the congruences decide. In both forms of the stage update
    (the last stage's pivot is its ``C_11`` in the fused one).
    """
    import hessinv.riccati_fused as rf
    import hessinv.riccati_solve as rs

    if fuse:
        orig_inputs = rs.fused_inputs

        def flipped_inputs(parts, damping):  # noqa: ANN001, ANN202
            c, b, tails = orig_inputs(parts, damping)
            r = parts[-1].r
            if b is None and r:  # the run of the last stage: its pivot is C_11
                c[-1, :r, :r] = _flip_largest(c[-1, :r, :r])
            return c, b, tails

        monkeypatch.setattr(rs, "fused_inputs", flipped_inputs)
    else:
        monkeypatch.setattr(rf, "FUSE_MAX", -1)
        orig = rs.stage_pivot

        def flipped(txx, jx, p_mat, damping, k, ref, kron):  # noqa: ANN001, ANN202
            qvv, pjx = orig(txx, jx, p_mat, damping, k, ref, kron)
            if jx is None and qvv.shape[0]:  # the last stage
                qvv = _flip_largest(qvv)
            return qvv, pjx

        monkeypatch.setattr(rs, "stage_pivot", flipped)
    monkeypatch.setattr(LiftedFactorization, "_grade", lambda self, eta0, refined: "exact")
    model, loss, X, y = tanh_net(6, 3, 7, 1.5)
    fac = hessinv.Hessian(model, loss, X, y).factor(1e-3, method="lifted")  # no solve to refuse
    fac._settle_trust()  # the probe, graded "exact"
    assert fac.solver == "stages"
    pos, neg, _, _ = fac.stage_solver.signature()
    d_pos, d_neg, _ = fac.system.dropped_inertia()
    ref = _reference(model, loss, X, y, 1e-3)
    assert (pos + d_pos, neg + d_neg) != ref[:2]  # the stage counts are wrong ...
    assert fac.near_inverse_bound() > 1.0  # ... and G is no near inverse (theorem: >= 1)
    inert = fac.inertia()
    assert tuple(inert) == ref and "near inverse" not in inert.how


@pytest.mark.parametrize("shift", [1, 2])
def test_a_count_off_the_lu_or_unverified_is_not_used(monkeypatch, shift: int) -> None:  # noqa: ANN001
    """Wrong Bunch-Kaufman counts: an odd error disagrees with the pivots' LU determinant; an
    even one, with the near-inverse bound failing, with the congruence. The LU decides, right."""
    orig = StageRiccati.signature

    def wrong(self):  # noqa: ANN001, ANN202
        pos, neg, zero, la = orig(self)
        return pos - shift, neg + shift, zero, la

    monkeypatch.setattr(StageRiccati, "signature", wrong)
    if shift == 2:
        monkeypatch.setattr(LiftedFactorization, "near_inverse_bound", lambda self: math.inf)
    model, loss, X, y = tanh_net(6, 3, 7, 1.5)
    fac = _trusted(model, loss, X, y, 1e-3)
    inert = fac.inertia()
    assert tuple(inert) == _reference(model, loss, X, y, 1e-3)
    assert "stage elimination" not in inert.how and inert.verified


def test_lu_slogdet_is_the_kept_determinant() -> None:
    """The pivots' LU determinant times ``d`` per dropped direction: the dense ``slogdet``."""
    model, loss, X, y = tanh_net(5, 3, 5, 1.5)
    d = -0.03
    fac = _trusted(model, loss, X, y, d)
    s, la = fac.stage_solver.lu_slogdet()
    nd = fac.system.n_dropped  # eigenvalues d exactly (H v = 0 there)
    s, la = s * (-1.0) ** nd, la + nd * math.log(abs(d))
    h = dense_hessian(model, loss, X, y)
    s_ref, la_ref = torch.linalg.slogdet(h + d * torch.eye(h.shape[0], dtype=DT))
    assert s == float(s_ref) and la == pytest.approx(float(la_ref), rel=1e-10, abs=1e-9)
