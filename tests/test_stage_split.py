"""The Kronecker split of Linear stages in the stage elimination (``hessinv.stage_split``).

The basis ``B = I_a (x) Q_c`` is checked for what the split relies on
(orthogonality, ``Jx B`` and ``B^T Txx B`` vanishing past ``r`` columns, the
projected blocks), with ``B`` formed densely here from unit vectors; the
solves and the stage signature through split stages are checked against an
independent dense ``H`` (``torch.func.hessian``) and ``torch.linalg``. The
size threshold is lowered so that small nets, whose dense reference is cheap,
split; one case runs at the default threshold.
"""

from __future__ import annotations

import pytest
import torch
from cases import backward_error, dense_hessian, reference_error, tanh_net
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import hessinv
import hessinv.stage_split as split_mod
from hessinv.riccati_solve import StageRiccati
from hessinv.solvers.contract import solve_tolerance
from hessinv.stage_split import SPLIT_MIN_P, split_stage

DT = torch.float64
EPS = torch.finfo(DT).eps


@pytest.fixture
def split_small(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(split_mod, "SPLIT_MIN_P", 0)


def net(width: int, batch: int, depth: int, tail: str, bias: bool, seed: int = 0):  # noqa: ANN201
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for _ in range(depth - 1):
        lin = nn.Linear(width, width, bias=bias)
        nn.init.normal_(lin.weight, std=1.5 / width**0.5)
        act = {
            "tanh": nn.Tanh(),
            "sigmoid": nn.Sigmoid(),
            "layernorm": nn.LayerNorm(width, elementwise_affine=False),
            "softmax": nn.Softmax(dim=1),
        }[tail]
        mods += [lin, act]
    mods.append(nn.Linear(width, 2, bias=bias))
    model = nn.Sequential(*mods).to(DT)
    X = torch.randn(batch, width, dtype=DT)
    y = torch.randn(batch, 2, dtype=DT)
    return model, nn.MSELoss(), X, y


def dense_basis(sp) -> torch.Tensor:  # noqa: ANN001
    return sp.from_basis(torch.eye(sp.p, dtype=DT))


@pytest.mark.usefixtures("split_small")
@pytest.mark.parametrize("tail", ["tanh", "layernorm", "softmax"])
@pytest.mark.parametrize("bias", [True, False])
def test_basis_and_projected_blocks(tail: str, bias: bool) -> None:
    model, loss, X, y = net(6, 3, 4, tail, bias)
    H = hessinv.Hessian(model, loss, X, y)
    n_split = 0
    for b in H.blocks:
        sp = split_stage(b)
        if sp is None:
            assert b.kron_x is None or b.kron_x.z.shape[0] >= b.kron_x.width
            continue
        n_split += 1
        B = dense_basis(sp)
        p = b.num_params
        assert torch.allclose(B.T @ B, torch.eye(p, dtype=DT), atol=10 * EPS * p)
        assert torch.allclose(sp.to_basis(torch.eye(p, dtype=DT)), B.T, atol=0, rtol=0)
        if b.Jx is not None:
            jb = b.Jx.reshape(-1, p) @ B
            scale = float(b.Jx.abs().max())
            assert float(jb[:, sp.r :].abs().max()) <= 100 * EPS * scale * p
            assert torch.allclose(sp.jx, jb[:, : sp.r], atol=100 * EPS * scale * p, rtol=0)
        if b.Txx is not None and not b.txx_zero:
            tb = B.T @ b.Txx @ B
            scale = float(b.Txx.abs().max())
            assert float(tb[sp.r :].abs().max()) <= 100 * EPS * scale * p
            assert torch.allclose(sp.txx, tb[: sp.r, : sp.r], atol=100 * EPS * scale * p, rtol=0)
        if b.Tzx is not None:
            zb = b.Tzx.reshape(-1, p) @ B
            scale = float(b.Tzx.abs().max()) + 1e-300
            assert torch.allclose(sp.tzx, zb, atol=100 * EPS * scale * p, rtol=0)
    assert n_split == len(H.blocks)


def test_no_split_where_it_cannot_pay() -> None:
    model, loss, X, y = net(6, 3, 3, "tanh", True)  # p = 42 < SPLIT_MIN_P
    H = hessinv.Hessian(model, loss, X, y)
    assert all(split_stage(b) is None for b in H.blocks)
    wide = max(SPLIT_MIN_P, 1)
    model, loss, X, y = net(12, 13, 3, "tanh", True)  # N = 13 = c: t_n span R^c
    H = hessinv.Hessian(model, loss, X, y)
    assert all(split_stage(b) is None for b in H.blocks) and wide > 0


def split_count(fac) -> int:  # noqa: ANN001
    st_ = fac.stage_solver
    return 0 if st_ is None else sum(s.basis is not None for s in st_.stages)


SOLVE_CASES = [
    # width, batch, depth, tail, bias, damping ("mid": inside the spectrum), loss scale
    (6, 3, 5, "tanh", True, 1e-3, 1.0),
    (6, 2, 4, "tanh", False, 0.1, 1e9),
    (6, 2, 4, "tanh", True, 1e-3, 1e-9),
    (5, 2, 6, "sigmoid", True, "mid", 1.0),
    (6, 3, 4, "layernorm", True, 1e-2, 1.0),
    (6, 3, 4, "softmax", True, -1e-2, 1.0),
]


@pytest.mark.usefixtures("split_small")
@pytest.mark.parametrize("case", SOLVE_CASES, ids=[str(c) for c in SOLVE_CASES])
def test_split_solve_and_signature_against_dense(case) -> None:  # noqa: ANN001
    width, batch, depth, tail, bias, damping, scale = case
    model, loss0, X, y = net(width, batch, depth, tail, bias)

    def loss(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return scale * loss0(o, t)

    h = dense_hessian(model, loss, X, y)
    if damping == "mid":
        ev = torch.linalg.eigvalsh(h)
        ev = ev[ev.abs() > 1e-6 * ev.abs().max()]
        k = ev.numel() // 2
        damping = -0.5 * float(ev[k] + ev[k + 1])
    else:
        damping = damping * scale
    a = h + damping * torch.eye(h.shape[0], dtype=DT)
    H = hessinv.Hessian(model, loss, X, y)
    fac = H.factor(damping, method="lifted")
    assert fac.stage_solver is not None and split_count(fac) > 0
    g = torch.randn(H.num_params, 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    # the raw stage solve (no refinement, no trial): its own backward error
    ls = fac.system
    kept = ls.kept_rhs(g)
    x_raw = ls.extract_kept(fac.stage_solver.solve_runs(kept, ls.run_sizes), g, H.num_params, kept)
    tol = solve_tolerance(DT) + 10 * reference_error(h) + 4 * EPS
    raw = max(backward_error(a, x_raw[:, j], g[:, j]) for j in range(3))
    assert raw <= 1e3 * tol  # an unrefined elimination without cross-stage pivoting
    x = H.solve(g, damping, method="lifted")
    for j in range(3):
        assert backward_error(a, x[:, j], g[:, j]) <= tol
    # the signature of the kept pivots plus the dropped directions: H + dI's inertia
    ev = torch.linalg.eigvalsh(a)
    pos, neg, zero, logabs = fac.stage_solver.signature()
    d_pos, d_neg, d_zero = ls.dropped_inertia()
    assert (pos + d_pos, neg + d_neg, zero + d_zero) == (
        int((ev > 0).sum()),
        int((ev < 0).sum()),
        0,
    )
    ref_logabs = float(torch.log(ev.abs()).sum())
    _, dropped_log = ls.dropped_logdet()
    assert abs(logabs + dropped_log - ref_logabs) <= 1e-8 * max(1.0, abs(ref_logabs))


@pytest.mark.usefixtures("split_small")
@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    width=st.integers(3, 7),
    batch=st.integers(1, 3),
    depth=st.integers(2, 5),
    tail=st.sampled_from(["tanh", "sigmoid", "layernorm", "softmax"]),
    bias=st.booleans(),
    log_d=st.floats(-4, 0),
    sign=st.sampled_from([1.0, -1.0]),
    seed=st.integers(0, 2**16),
)
def test_random_split_pipelines(width, batch, depth, tail, bias, log_d, sign, seed) -> None:  # noqa: ANN001
    model, loss, X, y = net(width, batch, depth, tail, bias, seed)
    h = dense_hessian(model, loss, X, y)
    damping = sign * 10**log_d * float(torch.linalg.matrix_norm(h, 2))
    a = h + damping * torch.eye(h.shape[0], dtype=DT)
    ev = torch.linalg.eigvalsh(a)
    if float(ev.abs().min()) <= 1e-8 * float(ev.abs().max()):
        return  # near singular: the contract may refuse, not this test's subject
    H = hessinv.Hessian(model, loss, X, y)
    g = torch.randn(H.num_params, 2, dtype=DT, generator=torch.Generator().manual_seed(seed))
    x = H.solve(g, damping, method="lifted")
    tol = solve_tolerance(DT) + 10 * reference_error(h) + 4 * EPS
    for j in range(2):
        assert backward_error(a, x[:, j], g[:, j]) <= tol
    inertia = H.inertia(damping)
    assert (inertia.positive, inertia.negative) == (int((ev > 0).sum()), int((ev < 0).sum()))


def test_default_threshold_splits_a_wide_stage() -> None:
    """Width 16, batch 8: 272 parameters per stage, split at the default threshold."""
    model, loss, X, y = tanh_net(16, 8, 3, 1.2)
    h = dense_hessian(model, loss, X, y)
    H = hessinv.Hessian(model, loss, X, y)
    fac = H.factor(1e-3, method="lifted")
    # the middle stage; the first has a lifted basis (128 of 272 directions: no Tzx rows), the
    # last 34 parameters
    assert split_count(fac) == 1
    g = torch.randn(H.num_params, 2, dtype=DT, generator=torch.Generator().manual_seed(3))
    x = fac.solve(g)
    a = h + 1e-3 * torch.eye(h.shape[0], dtype=DT)
    tol = solve_tolerance(DT) + 10 * reference_error(h) + 4 * EPS
    for j in range(2):
        assert backward_error(a, x[:, j], g[:, j]) <= tol
    assert fac.solver == "stages"


def _assert_kept_solve(sr, ls, H, h, d: float, cols: int) -> None:  # noqa: ANN001, N803
    """``sr.solve(b)`` equals ``(Q^T (H + dI) Q)^{-1} b`` (dense, ``torch.linalg.solve``)."""
    q_blocks = [pr.q if pr.q is not None else torch.eye(b.num_params, dtype=DT)
                for pr, b in zip(ls.projections, H.blocks, strict=True)]  # fmt: skip
    q = torch.block_diag(*q_blocks)
    kept = q.T @ (h + d * torch.eye(h.shape[0], dtype=DT)) @ q
    b = torch.randn(kept.shape[0], cols, dtype=DT, generator=torch.Generator().manual_seed(2))
    sizes = [qb.shape[1] for qb in q_blocks]
    w = torch.cat(sr.solve(list(torch.split(b, sizes))))
    ref = torch.linalg.solve(kept, b)
    cond = float(torch.linalg.cond(kept))
    assert float((w - ref).abs().max()) <= 1e3 * cond * EPS * float(ref.abs().max())


def test_stage_riccati_direct_against_dense_inverse(split_small) -> None:  # noqa: ANN001
    """``StageRiccati.solve`` on the kept directions equals ``(Q^T (H + dI) Q)^{-1} b``."""
    model, loss, X, y = net(6, 2, 4, "tanh", True, seed=5)
    h = dense_hessian(model, loss, X, y)
    H = hessinv.Hessian(model, loss, X, y)
    fac = H.factor(0.05, method="lifted")
    ls = fac.system
    sr = StageRiccati(H.blocks, 0.05, ls.projections)
    assert sr.ok and sum(s.basis is not None for s in sr.stages) > 0
    _assert_kept_solve(sr, ls, H, h, 0.05, cols=2)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "blockwise"])
def test_split_stages_of_several_shapes_against_dense_inverse(
    split_small, fuse, monkeypatch
) -> None:  # noqa: ANN001
    """Both forms of the stage update (``hessinv.riccati_fused.FUSE_MAX``).

    Widths 8, 7, 7, 7, 6, 6, 6, batch 4: split stages of four basis shapes; the last two
    share one but not their keys (the last has no ``Jx``), so a group holds two runs. Each
    group changes basis in one call (``basis_groups``), and the solve of an indefinite
    system equals ``(Q^T (H + dI) Q)^{-1} b``."""
    import hessinv.riccati_fused as fused_mod
    from hessinv.riccati_sweeps import basis_groups

    if not fuse:
        monkeypatch.setattr(fused_mod, "FUSE_MAX", -1)
    torch.manual_seed(4)
    widths = [8, 7, 7, 7, 6, 6, 6]
    mods: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        mods += [nn.Linear(a, b), nn.Tanh()]
    model = nn.Sequential(*mods[:-1]).to(DT)
    X, y = torch.randn(4, 8, dtype=DT), torch.randn(4, 6, dtype=DT)
    loss = nn.MSELoss()
    h = dense_hessian(model, loss, X, y)
    H = hessinv.Hessian(model, loss, X, y)
    d = -0.03  # indefinite
    ls = H.factor(d, method="lifted").system
    sr = StageRiccati(H.blocks, d, ls.projections)
    groups = basis_groups(sr.runs)
    assert sr.ok and len(groups) >= 3 and max(g.hi - g.lo for g in groups) >= 2
    assert sum(g.qc.shape[0] for g in groups) == sum(s.basis is not None for s in sr.stages)
    _assert_kept_solve(sr, ls, H, h, d, cols=3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_cost_to_go_is_refused(bad) -> None:  # noqa: ANN001
    """One non-finite entry of a middle stage's ``Tzz`` makes ``P`` non-finite from there on:
    the elimination reports ``ok = False`` (its check reads each ``P``'s sum)."""
    import dataclasses

    model, loss, X, y = tanh_net(16, 8, 4, 1.2)
    H = hessinv.Hessian(model, loss, X, y)
    prj = H.factor(1e-3, method="lifted").system.projections
    assert StageRiccati(H.blocks, 1e-3, prj).ok
    blocks = list(H.blocks)
    tzz = blocks[2].Tzz.clone()
    tzz[3, 1, 2] = bad
    blocks[2] = dataclasses.replace(blocks[2], Tzz=tzz)
    assert not StageRiccati(blocks, 1e-3, prj).ok
