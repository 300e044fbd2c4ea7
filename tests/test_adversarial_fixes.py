"""Adversarial tests, third round (adv7), of the fixes of 2026-11-25: parameter-free stages in
the lifted system, the flat-byte stale check and the watched module tree, the lazy
GaussNewton blocks, and the new model refusals.

Contract under test: **exact, or a clear error**. Exact quantities are compared in float64 with
independent dense references: ``torch.func.hessian`` of the loss as a function of the flat
parameters (written out here, or ``cases.reference_loss_fn``), and
``torch.linalg.eigvalsh/slogdet/solve/inv`` of that matrix. ``H @ V`` agrees to 1e-16..1e-15
relative on these small pipelines (W <= 1100): ``RTOL = 1e-12`` leaves three orders of margin.
Solves and inverse diagonals are held to ``64 W eps cond`` (the reference's own error is
``W eps cond``); inertia counts are asserted only where every eigenvalue is farther than
``1e3 W eps ||A||`` from zero.

The defects this file found on 2026-11-25 are fixed; the strict ``xfail`` left names a
known limit (a torch module subclass overriding ``__call__`` is refused even when it only
logs). A change of a torch module's options or of a module's class, once an ``xfail`` here,
is refused since the fifteenth session (``tests/test_stale_options.py``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import pickle

import pytest
import torch
from cases import reference_loss_fn, stages_hessian
from torch import nn

import hessinv
from hessinv import Stage
from hessinv.staleness import StaleOperatorError

DT = torch.float64
EPS = torch.finfo(DT).eps
RTOL = 1e-12


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# -- 1. stages without parameters -------------------------------------------------------------
def _pipeline(kinds: list[str], *, loss_param: bool = True, n: int = 3, w: int = 4, seed: int = 0):
    """Stages of kinds ``lin`` (tanh(z W^T + b)), ``free`` (sin z + 0.3 z^2, no parameters),
    ``widen`` (appends a column, no parameters); a cubic loss. Returns stages, z0, dense H."""
    g = torch.Generator().manual_seed(seed)
    stages, a = [], 3
    t = torch.randn(n, w, generator=g, dtype=DT)
    for k in kinds:
        if k == "lin":
            wt = 0.7 * torch.randn(w, a, generator=g, dtype=DT)
            b = torch.randn(w, generator=g, dtype=DT)
            stages.append(Stage(lambda z, p: torch.tanh(z @ p[0].T + p[1]), (wt, b)))
            a = w
        elif k == "free":
            stages.append(Stage(lambda z, p: torch.sin(z) + 0.3 * z**2, ()))
        elif k == "widen":
            stages.append(Stage(lambda z, p: torch.cat([z, z[:, :1] ** 2], 1), ()))
            a += 1
    if a != w:
        stages.append(Stage(lambda z, p, w=w: z[:, :w], ()))
    if loss_param:
        c = (0.7 * torch.ones(1, dtype=DT),)
        stages.append(
            Stage(lambda z, p: ((z - t) ** 2).sum() * 0.5 + (z**3).sum() * 0.1 * p[0].sum(), c)
        )
    else:
        stages.append(Stage(lambda z, p: ((z - t) ** 2).sum() * 0.5 + (z**3).sum() * 0.1, ()))
    z0 = torch.randn(n, 3, generator=g, dtype=DT)
    return stages, z0, stages_hessian(stages, z0)


FREE_LAYOUTS = {
    "three free at start": ["free", "free", "free", "lin", "lin"],
    "three free in the middle": ["lin", "free", "free", "free", "lin"],
    "three free at the end": ["lin", "lin", "free", "free", "free"],
    "parameters in one stage only": ["free", "free", "lin", "free", "free"],
    "widening free stage": ["lin", "widen", "free", "lin"],
}


@pytest.mark.parametrize("name", sorted(FREE_LAYOUTS))
@pytest.mark.parametrize("loss_param", [True, False])
def test_parameter_free_stages_solve_logdet_selinv(name: str, loss_param: bool) -> None:
    """What holds: H @ V, solve, logdet and the inverse diagonal (lifted) at a damping outside
    the spectrum, inside it, and tiny, for 1-3 consecutive parameter-free stages anywhere."""
    stages, z0, Hd = _pipeline(FREE_LAYOUTS[name], loss_param=loss_param)
    H = hessinv.Hessian.from_stages(stages, z0, progress=False)
    W = Hd.shape[0]
    g = torch.Generator().manual_seed(1)
    V = torch.randn(W, 3, generator=g, dtype=DT)
    assert _rel(H @ V, Hd @ V) <= RTOL
    ev = torch.linalg.eigvalsh(Hd)
    nrm = float(ev.abs().max())
    decided = 0
    for d in (0.37 * nrm, -0.5 * float(ev[0] + ev[1]), 1e-9 * nrm):
        A = Hd + d * torch.eye(W, dtype=DT)
        e = torch.linalg.eigvalsh(A)
        if float(e.abs().min()) <= 1e3 * W * EPS * nrm:
            continue
        decided += 1
        cond = float(e.abs().max() / e.abs().min())
        rhs = torch.randn(W, generator=g, dtype=DT)
        x = H.solve(rhs, damping=d, method="lifted")
        assert _rel(x, torch.linalg.solve(A, rhs)) <= 64 * W * EPS * cond
        sign, logabs = H.logdet(damping=d, method="lifted")
        r_sign, r_log = torch.linalg.slogdet(A)
        assert sign == float(r_sign)
        assert abs(logabs - float(r_log)) <= 64 * W * EPS * cond * max(1.0, abs(float(r_log)))
        assert _rel(H.inverse_diagonal(d), torch.linalg.inv(A).diagonal()) <= 64 * W * EPS * cond
    assert decided >= 2


def _counts(A: torch.Tensor) -> tuple[int, int, int]:
    e = torch.linalg.eigvalsh(A)
    assert float(e.abs().min()) > 1e3 * A.shape[0] * EPS * float(e.abs().max())
    return int((e > 0).sum()), int((e < 0).sum()), 0


@pytest.mark.parametrize("kinds", [["lin", "free", "lin"], ["free", "lin"]])
def test_lifted_inertia_with_a_parameter_free_stage(kinds: list[str]) -> None:
    stages, z0, Hd = _pipeline(kinds, n=6)
    H = hessinv.Hessian.from_stages(stages, z0, progress=False)
    d = 1.0
    ref = _counts(Hd + d * torch.eye(Hd.shape[0], dtype=DT))
    assert tuple(H.inertia(damping=d, method="lifted"))[:3] == ref


def test_lifted_positive_definite_with_a_parameter_free_loss() -> None:
    stages, z0, Hd = _pipeline(["lin", "free"], loss_param=False, n=6)
    H = hessinv.Hessian.from_stages(stages, z0, progress=False)
    d = 1.0
    e = torch.linalg.eigvalsh(Hd + d * torch.eye(Hd.shape[0], dtype=DT))
    got = H.is_positive_definite(damping=d, method="lifted")
    assert got is None or got == bool(e.min() > 0)


def _deep(n: int, w: int, loss_param: bool) -> tuple[list[Stage], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    stages = []
    for _ in range(4):
        wt = 0.3 * torch.randn(w, w, generator=g, dtype=DT)
        stages.append(Stage(lambda z, p: torch.tanh(z @ p[0].T), (wt,)))
    if loss_param:
        stages.append(Stage(lambda z, p: (z**2).sum() * p[0].sum(), (torch.ones(1, dtype=DT),)))
    else:
        stages.append(Stage(lambda z, p: (z**2).sum(), ()))
    return stages, torch.randn(n, w, generator=g, dtype=DT)


@pytest.mark.parametrize("loss_param", [True, False])
def test_lifted_solve_at_width_16_batch_8(loss_param: bool) -> None:
    """A loss stage with and without parameters (without: a 0 x 0 last block of K)."""
    stages, z0 = _deep(8, 16, loss_param=loss_param)
    H = hessinv.Hessian.from_stages(stages, z0, progress=False)
    A = H.to_dense() + torch.eye(H.num_params, dtype=DT)
    rhs = torch.ones(H.num_params, dtype=DT)
    cond = float(torch.linalg.cond(A))
    x = H.solve(rhs, damping=1.0, method="lifted")
    assert _rel(x, torch.linalg.solve(A, rhs)) <= 64 * H.num_params * EPS * cond


# -- 2. staleness -------------------------------------------------------------------------------
def _mlp(seed: int = 0, act: type[nn.Module] = nn.Tanh):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(3, 4), act(), nn.Linear(4, 4), act(), nn.Linear(4, 2)).to(DT)
    g = torch.Generator().manual_seed(seed)
    return m, torch.randn(6, 3, generator=g, dtype=DT), torch.randn(6, 2, generator=g, dtype=DT)


def _update(m: nn.Module) -> None:
    with torch.no_grad():
        m[2].weight.add_(0.3)


@pytest.mark.parametrize("how", ["H", "G", "H data", "G data"])
def test_views_and_algebra_refuse_after_update(how: str) -> None:
    """What holds: products, factorizations, inverse operators, sums, products of operators,
    the scipy wrapper and the spectral tools all refuse after an update."""
    m, X, y = _mlp()
    cls = hessinv.Hessian if how.startswith("H") else hessinv.GaussNewton
    if how.endswith("data"):
        H = cls(m, nn.MSELoss(), data=[(X[:3], y[:3]), (X[3:], y[3:])], progress=False)
    else:
        H = cls(m, nn.MSELoss(), X, y, progress=False)
    v = torch.ones(H.num_params, dtype=DT)
    F, inv, s, p, sp = H.factor(1.0), H.inverse(1.0), H + 2 * H, H @ H, H.to_scipy()
    _update(m)
    for call in (
        lambda: F.solve(v),
        lambda: F @ v,
        lambda: inv @ v,
        lambda: s @ v,
        lambda: p @ v,
        lambda: s.to_dense(),
        lambda: sp.matvec(v.numpy()),
        lambda: H.eigsh(k=2),
        lambda: H.eigenvalue_count(0.0),
        lambda: H.spectral_histogram([-1.0, 0.0, 1.0]),
        lambda: H.spectral_bounds(),
        lambda: H.residual(v[:, None], v[:, None], 1.0),
        lambda: H.stage_blocks,
        lambda: H.is_positive_definite(1.0),
    ):
        with pytest.raises(StaleOperatorError):
            call()


def test_gauss_newton_kernel_factorization_refuses_after_update() -> None:
    m, X, y = _mlp()
    G = hessinv.GaussNewton(m, nn.MSELoss(), X, y, progress=False)
    F = G.factor(1.0)
    assert F.method == "kernel"
    _update(m)
    for call in (F.logdet, F.inertia, F.zero_count):
        with pytest.raises(StaleOperatorError):
            call()


def test_sigma_min_estimate_refuses_after_update() -> None:
    m, X, y = _mlp()
    H = hessinv.Hessian(m, nn.MSELoss(), X, y, progress=False)
    F = H.factor(1.0, method="lifted")
    _update(m)
    with pytest.raises(StaleOperatorError):
        F.sigma_min_estimate()


@pytest.mark.parametrize("method", ["loss_hessians", "kernel"])
def test_gauss_newton_cached_pieces_refuse_after_update(method: str) -> None:
    m, X, y = _mlp()
    G = hessinv.GaussNewton(m, nn.MSELoss(), X, y, progress=False)
    G @ torch.ones(G.num_params, dtype=DT)  # fills the caches
    _update(m)
    with pytest.raises(StaleOperatorError):
        getattr(G, method)()


@pytest.mark.parametrize("how", ["slope", "class"])
def test_function_change_without_weight_change(how: str) -> None:
    """Was a strict xfail until the fifteenth session (H answered for the old network)."""
    m, X, y = _mlp(act=lambda: nn.LeakyReLU(0.1))
    H = hessinv.Hessian(m, nn.MSELoss(), X, y, progress=False)
    v = torch.ones(H.num_params, dtype=DT)
    H @ v
    if how == "slope":
        m[1].negative_slope = 0.5
    else:
        m[1].__class__ = nn.Tanh
    with pytest.raises(StaleOperatorError):
        H @ v


class _Id(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


NOT_CHANGES = {
    "eval": lambda m: m.eval(),
    "train": lambda m: m.train(),
    "zero_grad": lambda m: m.zero_grad(),
    "forward and backward": lambda m: m(torch.randn(2, 3, dtype=DT)).sum().backward(),
    "to(cpu)": lambda m: m.to("cpu"),
    "double()": lambda m: m.double(),
    "load_state_dict of itself": lambda m: m.load_state_dict(copy.deepcopy(m.state_dict())),
    "register_buffer": lambda m: m[0].register_buffer("foo", torch.zeros(1)),
    "deepcopy of the model": lambda m: copy.deepcopy(m),
    "share_memory": lambda m: m.share_memory(),
    "SGD step with lr=0": lambda m: (
        m(torch.randn(2, 3, dtype=DT)).sum().backward(),
        torch.optim.SGD(m.parameters(), lr=0.0).step(),
    ),
    "p.data = p.data": lambda m: setattr(m[0].weight, "data", m[0].weight.data),
    "hook added and removed": lambda m: m[0].register_forward_hook(lambda *a: None).remove(),
    "parametrization added and removed": lambda m: (
        nn.utils.parametrize.register_parametrization(m[0], "weight", _Id()),
        nn.utils.parametrize.remove_parametrizations(m[0], "weight"),
    ),
}


@pytest.mark.parametrize("cls", [hessinv.Hessian, hessinv.GaussNewton])
@pytest.mark.parametrize("name", sorted(NOT_CHANGES))
def test_no_false_stale(cls: type, name: str) -> None:
    """What holds: nothing that leaves the weights' bits and the module tree alone is stale."""
    m, X, y = _mlp()
    H = cls(m, nn.MSELoss(), X, y, progress=False)
    v = torch.ones(H.num_params, dtype=DT)
    before = H @ v
    NOT_CHANGES[name](m)
    assert torch.equal(H @ v, before)
    H.solve(v, damping=1.0)


def test_optimizer_keeps_working() -> None:
    """What holds: the README's Levenberg-Marquardt loop (shortened) changes parameters on
    purpose and runs, every step certified, the loss decreasing."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)
    ).double()
    X = torch.rand(30, 2, dtype=DT) * 2 - 1
    y = torch.sin(3 * X[:, :1]) * torch.cos(2 * X[:, 1:])
    for curvature in ("gauss-newton", "hessian"):
        opt = hessinv.optim.Newton(
            model, nn.MSELoss(), strategy="levenberg-marquardt", curvature=curvature
        )
        first = opt.step(X, y)
        for _ in range(5):
            opt.step(X, y)
        assert opt.history[-1].new_loss < first
        assert all(s.certified for s in opt.history)


# -- 4. model checks ----------------------------------------------------------------------------
class _LogCall(nn.Linear):
    def __call__(self, *a, **k):  # noqa: ANN002, ANN003, ANN204 - logging wrapper
        return super().__call__(*a, **k)


class _WrapsTwice(nn.Linear):
    @functools.wraps(nn.Linear.forward)  # __module__ becomes torch's: must not fool the check
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * nn.Linear.forward(self, x)


class _CubedTanh(nn.Tanh):
    @functools.wraps(nn.Tanh.forward)
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) ** 3


class _Mixin:
    tag = "mixin"


class _MixLinear(_Mixin, nn.Linear):
    pass


@dataclasses.dataclass(eq=False)
class _DataclassBlock(nn.Module):
    a: int = 3

    def __post_init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(self.a, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x))


def _plain() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def _norm_removed(kind: str) -> nn.Module:
    m = _plain().to(DT)
    if kind == "weight":
        torch.nn.utils.weight_norm(m[0])
        torch.nn.utils.remove_weight_norm(m[0])
    else:
        torch.nn.utils.spectral_norm(m[0])
        torch.nn.utils.remove_spectral_norm(m[0])
    return m


def _global_hook_removed() -> nn.Module:
    h = nn.modules.module.register_module_forward_pre_hook(lambda m, i: None)
    h.remove()
    return _plain()


ACCEPTED = {
    "pickle round trip": lambda: pickle.loads(pickle.dumps(_plain())),
    "deepcopy": lambda: copy.deepcopy(_plain()),
    "global pre-hook registered and removed": _global_hook_removed,
    "functools.wraps forward (2x Linear)": lambda: nn.Sequential(
        _WrapsTwice(3, 4), nn.Tanh(), nn.Linear(4, 2)
    ),
    "functools.wraps forward (tanh^3)": lambda: nn.Sequential(
        nn.Linear(3, 4), _CubedTanh(), nn.Linear(4, 2)
    ),
    "mixin": lambda: nn.Sequential(_MixLinear(3, 4), nn.Tanh(), nn.Linear(4, 2)),
    "dataclass module": lambda: nn.Sequential(_DataclassBlock(), nn.Linear(4, 2)),
    "pickled dataclass module": lambda: pickle.loads(
        pickle.dumps(nn.Sequential(_DataclassBlock(), nn.Linear(4, 2)))
    ),
    "fx GraphModule": lambda: torch.fx.symbolic_trace(_plain()),
    "weight_norm removed": lambda: _norm_removed("weight"),
    "spectral_norm removed": lambda: _norm_removed("spectral"),
}


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_realistic_models_accepted_and_exact(name: str) -> None:
    torch.manual_seed(1)
    _assert_exact(ACCEPTED[name]().to(DT))


def _assert_exact(m: nn.Module) -> None:
    """``H @ I`` of ``m`` (MSE, 5 samples) against the dense reference."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(5, 3, generator=g, dtype=DT), torch.randn(5, 2, generator=g, dtype=DT)
    f, x0 = reference_loss_fn(m, nn.MSELoss(), X, y)
    Hd = torch.func.hessian(f)(x0).detach()
    H = hessinv.Hessian(m, nn.MSELoss(), X, y, progress=False)
    assert _rel(H @ torch.eye(Hd.shape[0], dtype=DT), Hd) <= RTOL


@pytest.mark.xfail(
    strict=True,
    raises=ValueError,
    reason="false positive (conservative, clearly worded): an nn.Linear subclass whose "
    "__call__ only logs and calls super().__call__ is refused",
)
def test_logging_call_override_is_accepted() -> None:
    torch.manual_seed(1)
    _assert_exact(nn.Sequential(_LogCall(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT))


@pytest.mark.parametrize("wrap", ["jit", "compile"])
def test_scripted_or_compiled_model_refusal_names_it(wrap: str) -> None:
    torch.manual_seed(1)
    base = _plain().to(DT)
    m = torch.jit.script(base) if wrap == "jit" else torch.compile(base)
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(5, 3, generator=g, dtype=DT), torch.randn(5, 2, generator=g, dtype=DT)
    with pytest.raises(ValueError, match="(?i)script|compile"):
        hessinv.Hessian(m, nn.MSELoss(), X, y, progress=False)
