"""Adversarial tests of the Kronecker split of Linear stages (``hessinv.stage_split``).

Every attack goes through the public API (``Hessian``, ``.solve``, ``.factor(d).solve``,
``.inertia``, ``.logdet``, ``.is_positive_definite``) and is judged against an independent
dense reference (``torch.func.hessian`` of the loss in the flat parameters,
``tests/cases.py``): normwise backward error for solves (the contract, 64 eps, plus the
reference's own asymmetry), exact counts for inertia. Small nets lower
``SPLIT_MIN_P`` to 0 so that they split; two cases run at the default threshold.

The defect found (fixed: a refusal while the stage solver serves now drops it and the
pivoted block LU redoes the solve, ``LiftedFactorization.solve``; the tests below were strict
xfails before): once the split stage elimination passes its trial
on the first right-hand side (verdict "refined"), later right-hand sides with a different
direction (top eigenvectors, unit vectors, ``H @ v``) are refused with
``InaccurateSolveError``, while the same nets without the split reject the stage solver at
the trial and the pivoted block LU solves every one of them to ~1e-16. The root cause
predates the split (a third strict xfail shows the unsplit stage solver doing the same on
another net): a random first rhs has a solution of norm ~ ||g|| / sigma_min, so its
normwise backward error understates the solver's worst case by up to ~cond(H + dI); the
split (much smaller errors on random rhs, O(1) raw errors on rhs whose solution is small,
growth ~ ||Tzx_2||^2 / d) makes the trial pass more often on such nets.
"""

from __future__ import annotations

import pytest
import torch
from cases import dense_hessian
from torch import nn

import hessinv
import hessinv.stage_split as split_mod
from hessinv.solvers.contract import solve_tolerance

DT = torch.float64
EPS = torch.finfo(DT).eps


# --------------------------------------------------------------------------- helpers
def backward_error(a: torch.Tensor, x: torch.Tensor, g: torch.Tensor) -> float:
    """``||A x - g|| / (||A||_2 ||x|| + ||g||)`` in float64 against the dense ``A``."""
    a, x, g = a.double(), x.double(), g.double()
    r = a @ x - g
    den = torch.linalg.matrix_norm(a, 2) * torch.linalg.vector_norm(x) + torch.linalg.vector_norm(g)
    return float(torch.linalg.vector_norm(r) / den)


def reference_error(h: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(h - h.T, 2) / torch.linalg.matrix_norm(h, 2))


def tolerance(h: torch.Tensor, dtype: torch.dtype = DT) -> float:
    return solve_tolerance(dtype) + 10 * reference_error(h) + 4 * EPS


class Cube(nn.Module):
    """A parameter-free custom tail (autodiff path)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z**3 - z


def act(kind: str, width: int) -> nn.Module | None:
    return {
        "tanh": lambda: nn.Tanh(),
        "ln": lambda: nn.LayerNorm(width, elementwise_affine=False),
        "softmax": lambda: nn.Softmax(dim=1),
        "cube": lambda: Cube(),
        "none": lambda: None,
    }[kind]()


def build(  # noqa: PLR0913
    width: int,
    batch: int,
    depth: int,
    kind: str,
    bias: bool,
    seed: int,
    *,
    xscale: float = 1.0,
    xkind: str = "randn",
    loss: str = "mse",
    lscale: float = 1.0,
    out: int = 3,
):  # noqa: ANN201
    """A Linear/activation chain; ``xkind`` makes ``[z_n; 1]`` rank deficient on purpose."""
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for _ in range(depth - 1):
        lin = nn.Linear(width, width, bias=bias)
        nn.init.normal_(lin.weight, std=1.2 / width**0.5)
        mods.append(lin)
        a = act(kind, width)
        if a is not None:
            mods.append(a)
    mods.append(nn.Linear(width, out, bias=bias))
    model = nn.Sequential(*mods).to(DT)
    X = torch.randn(batch, width, dtype=DT) * xscale
    if xkind == "repeat" and batch > 1:
        X[1:] = X[0]
    if xkind == "zero":
        X[0] = 0
    if xkind == "lowrank" and batch > 2:
        X[2] = X[0] + X[1]
    if loss == "mse":
        y = torch.randn(batch, out, dtype=DT)
        base: nn.Module = nn.MSELoss()
    else:
        y = torch.randint(0, out, (batch,))
        base = nn.CrossEntropyLoss()

    def loss_fn(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return lscale * base(o, t)

    return model, loss_fn, X, y


def split_count(fac) -> int:  # noqa: ANN001
    st = fac.stage_solver
    return 0 if st is None else sum(s.basis is not None for s in st.stages)


@pytest.fixture
def split_small(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(split_mod, "SPLIT_MIN_P", 0)


@pytest.fixture
def no_split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(split_mod, "SPLIT_MIN_P", 10**9)


def check_all(model, loss, X, y, damping, *, expect_split: bool = True, h=None) -> None:  # noqa: ANN001
    """Solve (factor and one-shot), inertia, logdet and definiteness against the dense ``H``."""
    h = dense_hessian(model, loss, X, y) if h is None else h
    n = h.shape[0]
    a = h + damping * torch.eye(n, dtype=DT)
    ev = torch.linalg.eigvalsh(a)
    tol = tolerance(h)
    H = hessinv.Hessian(model, loss, X, y)
    fac = H.factor(damping, method="lifted")
    if expect_split:
        assert split_count(fac) > 0
    g = torch.randn(n, 3, dtype=DT, generator=torch.Generator().manual_seed(11))
    x = fac.solve(g)
    for j in range(3):
        assert backward_error(a, x[:, j], g[:, j]) <= tol
    x1 = H.solve(g[:, 0], damping, method="lifted")
    assert backward_error(a, x1, g[:, 0]) <= tol
    # counts only where the spectrum is clear of the zero band by a wide margin
    if float(ev.abs().min()) > 1e-9 * float(ev.abs().max()):
        inertia = H.inertia(damping)
        assert (inertia.positive, inertia.negative, inertia.zero) == (
            int((ev > 0).sum()),
            int((ev < 0).sum()),
            0,
        )
        sign, logabs = H.logdet(damping)
        ref = float(torch.log(ev.abs()).sum())
        assert sign == (-1.0 if int((ev < 0).sum()) % 2 else 1.0)
        cond = float(ev.abs().max() / ev.abs().min())
        assert abs(logabs - ref) <= 1e3 * n * EPS * cond * max(1.0, abs(ref)) + 1e-10
        pd = H.is_positive_definite(damping)
        assert pd is None or pd == bool((ev > 0).all())


def mid_damping(h: torch.Tensor) -> float:
    """Minus a point between two eigenvalues in the middle of the non-null spectrum."""
    ev = torch.linalg.eigvalsh(h)
    ev = ev[ev.abs() > 1e-6 * ev.abs().max()]
    k = ev.numel() // 2
    return -0.5 * float(ev[k] + ev[k + 1])


# --------------------------------------------------------------------------- the defect
def _defect_default():  # noqa: ANN202
    """Width 16, batch 9, 3 tanh layers: 272-parameter stage split at the default threshold."""
    model, loss, X, y = build(16, 9, 3, "tanh", True, 6509)
    return model, loss, X, y, 3.27291725758588e-10


def _top_eigvec_refusals(model, loss, X, y, d) -> list[str]:  # noqa: ANN001
    h = dense_hessian(model, loss, X, y)
    n = h.shape[0]
    a = h + d * torch.eye(n, dtype=DT)
    vecs = torch.linalg.eigh(a).eigenvectors[:, -4:]
    hv = h @ torch.randn(n, dtype=DT, generator=torch.Generator().manual_seed(9))
    H = hessinv.Hessian(model, loss, X, y)
    g0 = torch.randn(n, 2, dtype=DT, generator=torch.Generator().manual_seed(5))[:, 0]
    assert backward_error(a, H.solve(g0, d, method="lifted"), g0) <= tolerance(h)
    bad = []
    for name, g in [*(("eigvec", vecs[:, j]) for j in range(4)), ("H v", hv)]:
        try:
            x = H.solve(g, d, method="lifted")
        except hessinv.InaccurateSolveError as e:
            bad.append(f"{name}: refused ({str(e)[:60]})")
            continue
        if backward_error(a, x, g) > tolerance(h):
            bad.append(f"{name}: WRONG")
    return bad


def test_split_trusted_then_refuses_later_rhs_default_threshold() -> None:
    assert _top_eigvec_refusals(*_defect_default()) == []


def _estimate_first_then_solve(first: str) -> list[str]:
    """``H.logdet(d)`` / ``H.inertia(d)`` first (the random probe decides trust), then solves."""
    model, loss, X, y, d = _defect_default()
    h = dense_hessian(model, loss, X, y)
    n = h.shape[0]
    a = h + d * torch.eye(n, dtype=DT)
    H = hessinv.Hessian(model, loss, X, y)
    getattr(H, first)(d)
    hv = h @ torch.randn(n, dtype=DT, generator=torch.Generator().manual_seed(9))
    try:
        x = H.solve(hv, d, method="lifted")
    except hessinv.InaccurateSolveError:
        return ["refused"]
    return [] if backward_error(a, x, hv) <= tolerance(h) else ["WRONG"]


@pytest.mark.parametrize("first", ["logdet", "inertia"])
def test_split_estimate_first_then_solve_refused(first: str) -> None:
    assert _estimate_first_then_solve(first) == []


@pytest.mark.usefixtures("no_split")
@pytest.mark.parametrize("first", ["logdet", "inertia"])
def test_unsplit_estimate_first_then_solve(first: str) -> None:
    assert _estimate_first_then_solve(first) == []


@pytest.mark.usefixtures("no_split")
def test_same_net_unsplit_solves_every_rhs() -> None:
    """Control for the defect above: without the split every later rhs is solved."""
    assert _top_eigvec_refusals(*_defect_default()) == []


def _unit_vector_refusals() -> int:
    """A small softmax net (split only with SPLIT_MIN_P = 0): unit-vector rhs after a trial."""
    model, loss, X, y = build(7, 7, 5, "softmax", True, 25, xkind="lowrank")
    h = dense_hessian(model, loss, X, y)
    n = h.shape[0]
    d = -1.251394564881083e-08
    return _refusals_after_trial(model, loss, X, y, h, d, list(torch.eye(n, dtype=DT)[::5]))


@pytest.mark.usefixtures("split_small")
def test_split_small_net_unit_vectors_refused() -> None:
    assert _unit_vector_refusals() == 0


@pytest.mark.usefixtures("no_split")
def test_small_net_unsplit_unit_vectors_solved() -> None:
    assert _unit_vector_refusals() == 0


def _later_refusals(model, loss, X, y, d) -> int:  # noqa: ANN001
    """Refusals among rhs = top-4 eigenvectors of ``A = H + dI`` and ``A w``, after a trial."""
    h = dense_hessian(model, loss, X, y)
    n = h.shape[0]
    a = h + d * torch.eye(n, dtype=DT)
    vecs = torch.linalg.eigh(a).eigenvectors[:, -4:]
    aw = a @ torch.randn(n, dtype=DT, generator=torch.Generator().manual_seed(9))
    return _refusals_after_trial(model, loss, X, y, h, d, [*vecs.T, aw])


def _refusals_after_trial(model, loss, X, y, h, d: float, rhss: list) -> int:  # noqa: ANN001
    """Right-hand sides refused or solved inaccurately, after a first (trial) solve."""
    n = h.shape[0]
    a = h + d * torch.eye(n, dtype=DT)
    H = hessinv.Hessian(model, loss, X, y)
    g0 = torch.randn(n, 4, dtype=DT, generator=torch.Generator().manual_seed(5))[:, 0]
    H.solve(g0, d, method="lifted")
    bad = 0
    for g in rhss:
        try:
            x = H.solve(g, d, method="lifted")
        except hessinv.InaccurateSolveError:
            bad += 1
            continue
        bad += backward_error(a, x, g) > tolerance(h)
    return bad


@pytest.mark.usefixtures("no_split")
def test_unsplit_trial_also_unrepresentative() -> None:
    model, loss, X, y = build(5, 3, 5, "softmax", True, 5627, xkind="repeat")
    assert _later_refusals(model, loss, X, y, -1.5255693420902315e-07) == 0


@pytest.mark.usefixtures("split_small")
def test_split_fixes_that_unsplit_case() -> None:
    model, loss, X, y = build(5, 3, 5, "softmax", True, 5627, xkind="repeat")
    assert _later_refusals(model, loss, X, y, -1.5255693420902315e-07) == 0


# --------------------------------------------------------------------------- attacks that held
HELD = [
    # width, batch, depth, tail, bias, extra build kwargs, damping (relative to ||H||, or "mid")
    (6, 3, 4, "ln", True, {}, 1e-3),
    (6, 3, 4, "softmax", True, {}, -1e-3),
    (6, 4, 4, "none", True, {}, 1e-3),  # Linear after Linear, no activation
    (5, 4, 3, "tanh", False, {}, 1e-3),  # no bias, N = c - 1
    (5, 5, 3, "tanh", True, {}, -1e-3),  # bias, N = c - 1
    (5, 3, 3, "tanh", True, {"xkind": "repeat"}, 1e-3),  # [z_n; 1] of rank 1
    (5, 3, 3, "ln", True, {"xkind": "zero"}, -1e-3),
    (6, 4, 3, "tanh", True, {"xkind": "lowrank"}, "mid"),
    (5, 3, 3, "tanh", True, {"xscale": 1e8}, 1e-3),
    (5, 3, 3, "none", True, {"xscale": 1e-8}, -1e-3),
    (5, 3, 3, "none", True, {"xscale": 1e8, "xkind": "repeat"}, 1e-9),  # unsplit: refuses
    (5, 3, 3, "tanh", True, {"xscale": 1e-8, "xkind": "repeat"}, 1e-9),
    (6, 3, 4, "tanh", True, {"lscale": 1e12}, 1e-3),
    (6, 3, 4, "softmax", True, {"lscale": 1e-12}, -1e-3),
    (6, 4, 3, "tanh", True, {"loss": "ce"}, 1e-4),
    (6, 5, 4, "tanh", True, {}, 1e-8),  # tiny damping: gain = Tzx_2^T / d
    (6, 4, 4, "tanh", True, {"zero_residual": True}, -1e-3),  # b_y = 0: Tzx_2 = 0
    (6, 4, 4, "none", True, {"zero_residual": True}, 1e-8),
]


@pytest.mark.usefixtures("split_small")
@pytest.mark.parametrize("case", HELD, ids=[str(c) for c in HELD])
def test_split_held(case) -> None:  # noqa: ANN001
    width, batch, depth, kind, bias, kw, dr = case
    kw = dict(kw)
    zero_residual = kw.pop("zero_residual", False)
    model, loss, X, y = build(width, batch, depth, kind, bias, 1, **kw)
    if zero_residual:
        y = model(X).detach()
    h = dense_hessian(model, loss, X, y)
    d = mid_damping(h) if dr == "mid" else dr * float(torch.linalg.matrix_norm(h, 2))
    check_all(model, loss, X, y, d, h=h)


@pytest.mark.usefixtures("split_small")
def test_split_not_worse_than_unsplit_raw(monkeypatch: pytest.MonkeyPatch) -> None:
    """The unrefined stage solve (what the trial judges) on ill-conditioned nets, both ways."""
    cases = [
        ((5, 5, 4, "tanh", True, 8117), -1.2e-6),
        ((7, 6, 3, "none", False, 7689), -1.2e-6),
        ((4, 3, 5, "tanh", True, 578), -1.9e-7),
        ((7, 5, 5, "tanh", True, 6448), -2.7e-9),
    ]
    for (w, n_b, depth, kind, bias, seed), dr in cases:
        model, loss, X, y = build(w, n_b, depth, kind, bias, seed)
        h = dense_hessian(model, loss, X, y)
        n = h.shape[0]
        d = dr * float(torch.linalg.matrix_norm(h, 2))
        a = h + d * torch.eye(n, dtype=DT)
        g = torch.randn(n, 2, dtype=DT, generator=torch.Generator().manual_seed(3))
        raw = {}
        for min_p in (0, 10**9):
            monkeypatch.setattr(split_mod, "SPLIT_MIN_P", min_p)
            fac = hessinv.Hessian(model, loss, X, y).factor(d, method="lifted")
            assert (split_count(fac) > 0) == (min_p == 0)
            ls = fac.system
            kept = ls.kept_rhs(g)
            x = ls.extract_kept(fac.stage_solver.solve_runs(kept, ls.run_sizes), g, n, kept)
            raw[min_p] = max(backward_error(a, x[:, j], g[:, j]) for j in range(2))
            xs = fac.solve(g)
            assert max(backward_error(a, xs[:, j], g[:, j]) for j in range(2)) <= tolerance(h)
        assert raw[0] <= max(10 * raw[10**9], 1e3 * EPS)


@pytest.mark.usefixtures("split_small")
def test_split_float32() -> None:
    """float32 nets: solves within 64 eps32 of a float64 reference of the rounded parameters."""
    import copy  # noqa: PLC0415

    for kind, dr in [("tanh", 1e-2), ("softmax", -1e-3), ("ln", 1e-2)]:
        m64, loss, X64, y64 = build(6, 3, 4, kind, True, 2)
        m32 = copy.deepcopy(m64).float()
        X, y = X64.float(), y64.float()
        h = dense_hessian(copy.deepcopy(m32).double(), loss, X.double(), y.double())
        n = h.shape[0]
        d = dr * float(torch.linalg.matrix_norm(h, 2))
        a = h + d * torch.eye(n, dtype=DT)
        H = hessinv.Hessian(m32, loss, X, y)
        fac = H.factor(d, method="lifted")
        assert split_count(fac) > 0
        g = torch.randn(n, 2, generator=torch.Generator().manual_seed(4))
        x = fac.solve(g)
        for j in range(2):
            assert backward_error(a, x[:, j], g[:, j]) <= solve_tolerance(torch.float32)
        ev = torch.linalg.eigvalsh(a)
        inertia = H.inertia(d)
        assert (inertia.positive, inertia.negative) == (int((ev > 0).sum()), int((ev < 0).sum()))


@pytest.mark.usefixtures("split_small")
def test_first_stage_split_keep_all() -> None:
    """Width 10, batch 9: stage 0 keeps all its directions (KEEP_ALL) and splits too."""
    model, loss, X, y = build(10, 9, 3, "tanh", True, 1, out=2)
    h = dense_hessian(model, loss, X, y)
    nh = float(torch.linalg.matrix_norm(h, 2))
    fac = hessinv.Hessian(model, loss, X, y).factor(1e-2 * nh, method="lifted")
    assert fac.stage_solver.stages[0].basis is not None
    for d in (1e-2 * nh, -1e-2 * nh):
        check_all(model, loss, X, y, d, h=h)


@pytest.mark.usefixtures("split_small")
def test_frozen_conv_embedding_nets() -> None:
    """Frozen bias/weight (autodiff layer: never split), Conv and Embedding stages."""
    torch.manual_seed(3)
    lin = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 2))
    lin = lin.to(DT)
    X = torch.randn(2, 5, dtype=DT)
    y = torch.randn(2, 2, dtype=DT)
    lin[2].bias.requires_grad_(False)
    H = hessinv.Hessian(lin, nn.MSELoss(), X, y)
    assert all(b.kron_x is None for b in H.blocks[1:2])
    check_all(lin, nn.MSELoss(), X, y, 1e-3)
    lin[2].bias.requires_grad_(True)
    lin[2].weight.requires_grad_(False)
    check_all(lin, nn.MSELoss(), X, y, -1e-3)

    conv = nn.Sequential(
        nn.Conv1d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 2)
    ).to(DT)
    Xc = torch.randn(3, 1, 6, dtype=DT)
    yc = torch.randn(3, 2, dtype=DT)
    fac = hessinv.Hessian(conv, nn.MSELoss(), Xc, yc).factor(1e-3, method="lifted")
    assert fac.stage_solver.stages[0].basis is None
    check_all(conv, nn.MSELoss(), Xc, yc, 1e-3)

    emb = nn.Sequential(
        nn.Embedding(7, 5), nn.Flatten(), nn.Linear(10, 6), nn.Tanh(), nn.Linear(6, 2)
    ).to(DT)
    Xe = torch.randint(0, 7, (3, 2))
    fac = hessinv.Hessian(emb, nn.MSELoss(), Xe, yc).factor(1e-3, method="lifted")
    assert fac.stage_solver.stages[0].basis is None
    check_all(emb, nn.MSELoss(), Xe, yc, -1e-3)


def test_default_threshold_layernorm_softmax() -> None:
    """Width 16, batch 8, 4 layers (p = 272 per middle stage) at the default threshold."""
    assert split_mod.SPLIT_MIN_P == 128
    for kind in ("ln", "softmax"):
        model, loss, X, y = build(16, 8, 4, kind, True, 11)
        h = dense_hessian(model, loss, X, y)
        nh = float(torch.linalg.matrix_norm(h, 2))
        fac = hessinv.Hessian(model, loss, X, y).factor(1e-3 * nh, method="lifted")
        assert split_count(fac) == 2
        check_all(model, loss, X, y, -1e-3 * nh, h=h)


@pytest.mark.usefixtures("split_small")
def test_progress_and_tensor_damping() -> None:
    model, loss, X, y = build(6, 4, 4, "tanh", True, 3)
    h = dense_hessian(model, loss, X, y)
    n = h.shape[0]
    g = torch.randn(n, dtype=DT, generator=torch.Generator().manual_seed(1))
    for d in (torch.tensor(1e-3, dtype=DT), -1e-3):
        a = h + float(d) * torch.eye(n, dtype=DT)
        H = hessinv.Hessian(model, loss, X, y, progress=True)
        x = H.solve(g, d, method="lifted")
        assert backward_error(a, x, g) <= tolerance(h)
        ev = torch.linalg.eigvalsh(a)
        inertia = H.inertia(d)
        assert (inertia.positive, inertia.negative) == (int((ev > 0).sum()), int((ev < 0).sum()))
