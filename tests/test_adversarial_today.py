"""Adversarial tests of the stacked hvp runs, the cached forward pass, the flat-byte stale
check, the rewritten Bunch-Kaufman, the band count, and the new model refusals (adv6).

Contract under test: **exact, or a clear error**. Exact quantities are compared in float64
with independent references: ``torch.func.hessian`` of the loss as a function of the flat
trainable parameters (``cases.reference_loss_fn``, the model called as the user calls it) and
``torch.linalg.eigvalsh/slogdet/solve/inv`` of that dense matrix.

Tolerances: both sides are backward-stable float64 evaluations of small networks
(``W <= 320``, entries O(1)); the observed agreement of ``H @ V`` is 1e-17..1e-16 relative,
so ``RTOL = 1e-12`` leaves four orders of margin and still catches any wrong block. Signs of
eigenvalues are asserted only where ``|e| > 1e3 W eps ||A||`` (the reference's own error
is ``W eps ||A||``).

The defects these tests found on 2026-11-25 (stale GaussNewton blocks at a mixed point,
unchecked selected-inversion and GaussNewton methods, appended modules, parameter-free
stages in the lifted system, the message for a hook on a traced model) are fixed.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
from cases import reference_loss_fn, stages_hessian
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import hessinv
from hessinv import Stage
from hessinv.blocktri import _bunch_kaufman, block_tri_inertia
from hessinv.validate import StaleOperatorError

DT = torch.float64
EPS = torch.finfo(DT).eps
RTOL = 1e-12


def _dense(model: nn.Module, loss, X, y) -> torch.Tensor:  # noqa: ANN001, N803
    f, x0 = reference_loss_fn(model, loss, X, y)
    return torch.func.hessian(f)(x0).detach()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _chain(specs: list[tuple[int, int, bool]], act: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    mods: list[nn.Module] = []
    for i, (a, b, bias) in enumerate(specs):
        mods.append(nn.Linear(a, b, bias=bias))
        if i < len(specs) - 1:
            mods.append(act())
    return nn.Sequential(*mods).to(DT)


# -- 1. hvp over stacked runs of equally shaped stages ----------------------------------------
# (a, b, bias) per Linear; stage p = a*b (+ b): 64 = 8*8, 63 = 9*7 = 7*9, 65 = 5*13 = 13*5, 72.
RUN_SPECS = {
    "p64_run": [(3, 8, True), (8, 8, False), (8, 8, False), (8, 8, False), (8, 2, True)],
    "p63_alternating_shapes": [
        (3, 9, True),
        (9, 7, False),
        (7, 9, False),
        (9, 7, False),
        (7, 9, False),
        (9, 2, True),
    ],
    "p65_alternating_unstacked_txx": [
        (3, 5, True),
        (5, 13, False),
        (13, 5, False),
        (5, 13, False),
        (13, 2, True),
    ],
    "run_broken_by_p72": [
        (3, 8, True),
        (8, 8, False),
        (8, 8, True),
        (8, 8, False),
        (8, 8, False),
        (8, 2, True),
    ],
    "two_stages": [(8, 8, False), (8, 8, False)],
    "one_stage": [(3, 2, True)],
    "all_equal": [(4, 4, True)] * 5,
}


@pytest.mark.parametrize("name", sorted(RUN_SPECS))
@pytest.mark.parametrize("act_loss", ["tanh_mse", "gelu_ce"])
def test_hvp_runs_match_dense(name: str, act_loss: str) -> None:
    """``H @ V`` (k = 1..7), ``to_dense`` and ``diagonal`` against ``torch.func.hessian``."""
    specs = RUN_SPECS[name]
    g = torch.Generator().manual_seed(len(specs))
    torch.manual_seed(len(specs))
    n = 3
    X = torch.randn(n, specs[0][0], generator=g, dtype=DT)
    if act_loss == "tanh_mse":
        model, loss = _chain(specs, nn.Tanh), nn.MSELoss()
        y = torch.randn(n, specs[-1][1], generator=g, dtype=DT)
    else:
        model, loss = _chain(specs, nn.GELU), nn.CrossEntropyLoss()
        y = torch.randint(0, specs[-1][1], (n,), generator=g)
    H = hessinv.Hessian(model, loss, X, y, progress=False)
    Hd = _dense(model, loss, X, y)
    W = Hd.shape[0]
    for k in range(1, 8):
        V = torch.randn(W, k, generator=g, dtype=DT)
        assert _rel(H @ V, Hd @ V) <= RTOL, k
    v = torch.randn(W, generator=g, dtype=DT)
    assert _rel(H @ v, Hd @ v) <= RTOL
    Vt = torch.randn(5, W, generator=g, dtype=DT).T  # non-contiguous columns
    assert _rel(H.matmat(Vt), Hd @ Vt) <= RTOL
    assert _rel(H.to_dense(), Hd) <= RTOL
    assert _rel(H.diagonal(), Hd.diagonal()) <= RTOL


def _conv_net() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    m = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(2, 2, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(2, 2, 3, padding=1),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(32, 3),
    ).to(DT)
    X = torch.randn(3, 1, 4, 4, generator=g, dtype=DT)
    return m, nn.CrossEntropyLoss(), X, torch.randint(0, 3, (3,), generator=g)


def _layernorm_net() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    mods: list[nn.Module] = [nn.Linear(3, 5)]
    for _ in range(3):
        mods += [nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 5)]
    m = nn.Sequential(*mods[:-1], nn.Linear(5, 2)).to(DT)
    with torch.no_grad():
        for mod in m:
            if isinstance(mod, nn.LayerNorm):
                mod.weight.add_(0.3 * torch.randn(5, generator=g, dtype=DT))
                mod.bias.add_(0.2 * torch.randn(5, generator=g, dtype=DT))
    X = torch.randn(4, 3, generator=g, dtype=DT)
    return m, nn.MSELoss(), X, torch.randn(4, 2, generator=g, dtype=DT)


def _embedding_net() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    m = nn.Sequential(
        nn.Embedding(7, 4),
        nn.Flatten(),
        nn.Linear(8, 4),
        nn.Tanh(),
        nn.Linear(4, 4),
        nn.Tanh(),
        nn.Linear(4, 2),
    ).to(DT)
    X = torch.randint(0, 7, (3, 2), generator=g)
    return m, nn.MSELoss(), X, torch.randn(3, 2, generator=g, dtype=DT)


class _Traced(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.mid = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.inp(x))
        for i, lin in enumerate(self.mid):
            x = torch.sin(lin(x)) if i % 2 else torch.tanh(lin(x))
        return self.out(x)


def _traced_net() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    X = torch.randn(3, 3, generator=g, dtype=DT)
    return _Traced().to(DT), nn.MSELoss(), X, torch.randn(3, 2, generator=g, dtype=DT)


@pytest.mark.parametrize("make", [_conv_net, _layernorm_net, _embedding_net, _traced_net])
@pytest.mark.parametrize("generic", [False, True])
def test_hvp_runs_model_families(make, generic: bool) -> None:  # noqa: ANN001
    model, loss, X, y = make()
    H = hessinv.Hessian(model, loss, X, y, generic=generic, progress=False)
    Hd = _dense(model, loss, X, y)
    g = torch.Generator().manual_seed(0)
    V = torch.randn(Hd.shape[0], 3, generator=g, dtype=DT)
    assert _rel(H @ V, Hd @ V) <= RTOL
    assert _rel(H.diagonal(), Hd.diagonal()) <= RTOL


def test_hvp_runs_float32() -> None:
    """float32: ``H @ V`` to float32's own backward error (W eps32 ||H|| ||V||)."""
    torch.manual_seed(5)
    m32 = _chain([(3, 4, True), (4, 4, True), (4, 4, True), (4, 4, True), (4, 2, True)]).float()
    X = torch.randn(4, 3)
    y = torch.randn(4, 2)
    H = hessinv.Hessian(m32, nn.MSELoss(), X, y, progress=False)
    Hd = _dense(copy.deepcopy(m32).double(), nn.MSELoss(), X.double(), y.double())
    V = torch.randn(H.num_params, 5)
    err = float((H @ V).double().sub(Hd @ V.double()).norm())
    bound = H.num_params * torch.finfo(torch.float32).eps * float(Hd.norm() * V.double().norm())
    assert err <= bound


def _functional(kinds: list[str], n: int = 3, a0: int = 3, seed: int = 0):  # noqa: ANN202
    """Stages of kinds 'lin' (tanh(z W^T + b)), 'nb' (sin(z W^T)), 'free' (no parameters),
    'scale' (z * s + sin z), then a parameter-free scalar loss; and the flat reference."""
    g = torch.Generator().manual_seed(seed)
    stages: list[Stage] = []
    a = a0
    for kind in kinds:
        if kind == "lin":
            w, b = (
                0.7 * torch.randn(4, a, generator=g, dtype=DT),
                torch.randn(4, generator=g, dtype=DT),
            )
            stages.append(Stage(lambda z, p: torch.tanh(z @ p[0].T + p[1]), (w, b)))
            a = 4
        elif kind == "nb":
            w = 0.7 * torch.randn(4, a, generator=g, dtype=DT)
            stages.append(Stage(lambda z, p: torch.sin(z @ p[0].T), (w,)))
            a = 4
        elif kind == "free":
            stages.append(Stage(lambda z, p: torch.tanh(z) ** 2 + z, ()))
        else:
            s = torch.randn(a, generator=g, dtype=DT)
            stages.append(Stage(lambda z, p: z * p[0] + torch.sin(z), (s,)))
    t = torch.randn(n, a, generator=g, dtype=DT)
    loss_params = (torch.randn(1, generator=g, dtype=DT),)
    stages.append(
        Stage(
            lambda z, p: ((z - t) ** 2).sum() * 0.5 + p[0].square().sum() * (z**3).sum(),
            loss_params,
        )
    )
    z0 = torch.randn(n, a0, generator=g, dtype=DT)
    return stages, z0, stages_hessian(stages, z0)


@pytest.mark.parametrize(
    "kinds",
    [
        ["lin", "lin", "lin", "lin"],
        ["lin", "free", "lin", "lin", "free", "free", "lin"],
        ["free", "lin", "lin"],
        ["lin", "scale", "scale", "scale", "lin"],
        ["lin", "nb", "lin", "nb", "lin"],
        [],
    ],
)
def test_from_stages_runs_and_factorization(kinds: list[str]) -> None:
    """Functional pipelines with parameter-free stages inside runs: hvp, solve, inertia,
    logdet and the inverse diagonal after the blocks were rebound to the run stacks."""
    stages, z0, Hd = _functional(kinds)
    H = hessinv.Hessian.from_stages(stages, z0, progress=False)
    W = Hd.shape[0]
    g = torch.Generator().manual_seed(9)
    V = torch.randn(W, 4, generator=g, dtype=DT)
    assert _rel(H @ V, Hd @ V) <= RTOL
    if "free" in kinds:
        return  # a parameter-free stage: test_from_stages_parameter_free_stage
    d = 0.37 * float(torch.linalg.matrix_norm(Hd, 2))
    A = Hd + d * torch.eye(W, dtype=DT)
    e = torch.linalg.eigvalsh(A)
    assert float(e.abs().min()) > 1e3 * W * EPS * float(e.abs().max())
    rhs = torch.randn(W, generator=g, dtype=DT)
    cond = float(e.abs().max() / e.abs().min())
    assert _rel(H.solve(rhs, damping=d), torch.linalg.solve(A, rhs)) <= 64 * W * EPS * cond
    assert tuple(H.inertia(damping=d))[:3] == (int((e > 0).sum()), int((e < 0).sum()), 0)
    sign, logabs = H.logdet(damping=d)
    r_sign, r_log = torch.linalg.slogdet(A)
    assert sign == float(r_sign)
    assert abs(float(logabs) - float(r_log)) <= W * 64 * W * EPS * cond
    ref_inv = torch.linalg.inv(A).diagonal()
    assert _rel(H.inverse_diagonal(d), ref_inv) <= 64 * W * EPS * cond


@pytest.mark.parametrize("where", ["first", "middle", "loss"])
def test_from_stages_parameter_free_stage(where: str) -> None:
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 4, generator=g, dtype=DT)
    stages = [Stage(lambda z, p: torch.sin(z), ())] if where == "first" else []
    a = 3
    for i in range(3):
        w = torch.randn(4, a, generator=g, dtype=DT)
        stages.append(Stage(lambda z, p: torch.tanh(z @ p[0].T), (w,)))
        a = 4
        if where == "middle" and i == 1:
            stages.append(Stage(lambda z, p: torch.sin(z), ()))
    c = () if where == "loss" else (torch.ones(1, dtype=DT),)
    stages.append(Stage(lambda z, p: ((z - t) ** 2).sum() * (p[0].sum() if p else 1.0), c))
    H = hessinv.Hessian.from_stages(
        stages, torch.randn(3, 3, generator=g, dtype=DT), progress=False
    )
    x = H.solve(torch.ones(H.num_params, dtype=DT), damping=1.0)
    assert torch.isfinite(x).all()
    assert torch.isfinite(H.inverse_diagonal(1.0)).all()


def test_data_operator_runs() -> None:
    """``data=``: batch-wise products, then the stacked operator (its own runs)."""
    torch.manual_seed(6)
    m = _chain([(3, 4, True), (4, 4, True), (4, 4, True), (4, 2, True)])
    g = torch.Generator().manual_seed(6)
    X1, X2 = torch.randn(3, 3, generator=g, dtype=DT), torch.randn(2, 3, generator=g, dtype=DT)
    y1, y2 = torch.randn(3, 2, generator=g, dtype=DT), torch.randn(2, 2, generator=g, dtype=DT)
    H = hessinv.Hessian(m, nn.MSELoss(), data=[(X1, y1), (X2, y2)], progress=False)
    Hd = _dense(m, nn.MSELoss(), torch.cat([X1, X2]), torch.cat([y1, y2]))
    V = torch.randn(Hd.shape[0], 3, generator=g, dtype=DT)
    assert _rel(H @ V, Hd @ V) <= RTOL  # batch by batch
    d = 0.5
    A = Hd + d * torch.eye(Hd.shape[0], dtype=DT)
    rhs = torch.randn(Hd.shape[0], generator=g, dtype=DT)
    cond = float(torch.linalg.cond(A))
    assert (
        _rel(H.solve(rhs, damping=d), torch.linalg.solve(A, rhs)) <= 64 * Hd.shape[0] * EPS * cond
    )
    assert _rel(H @ V, Hd @ V) <= RTOL  # the stacked operator's runs
    assert _rel(H.diagonal(), Hd.diagonal()) <= RTOL


# -- 2. the cached forward pass and stale operators -------------------------------------------
def _mlp(seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    m = _chain([(3, 4, True), (4, 4, True), (4, 2, True)])
    g = torch.Generator().manual_seed(seed)
    return m, torch.randn(5, 3, generator=g, dtype=DT), torch.randn(5, 2, generator=g, dtype=DT)


def _ggn_dense(model: nn.Module, X, y) -> torch.Tensor:  # noqa: ANN001, N803
    """``J^T (d2 loss / d out2) J`` by torch.func, independent of hessinv."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    x0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def out(flat: torch.Tensor) -> torch.Tensor:
        ps, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            ps[n] = flat[i : i + s.numel()].reshape(s)
            i += s.numel()
        return torch.func.functional_call(model, ps, (X,)).reshape(-1)

    J = torch.func.jacrev(out)(x0)
    o = out(x0).detach()
    Hl = torch.func.hessian(lambda oo: nn.MSELoss()(oo.reshape(y.shape), y))(o)
    return J.T @ Hl @ J


def _block_diag_of(A: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    out, i = [], 0
    for s in sizes:
        out.append(A[i : i + s, i : i + s])
        i += s
    return out


def test_ggn_lazy_blocks_after_update_refuse_or_exact() -> None:
    m, X, y = _mlp(1)
    G = hessinv.GaussNewton(m, nn.MSELoss(), X, y, progress=False)
    with torch.no_grad():
        m[2].weight.add_(0.3)
    G_new = _ggn_dense(m, X, y)
    d = 1.0
    try:
        blocks = G.inverse_block_diagonal(d)
    except StaleOperatorError:
        return
    ref = torch.linalg.inv(G_new + d * torch.eye(G_new.shape[0], dtype=DT))
    refs = _block_diag_of(ref, [b.shape[0] for b in blocks])
    assert max(_rel(b, r) for b, r in zip(blocks, refs, strict=True)) <= RTOL


def test_ggn_blocks_built_while_stale_not_kept() -> None:
    m, X, y = _mlp(1)
    G0 = _ggn_dense(m, X, y)
    G = hessinv.GaussNewton(m, nn.MSELoss(), X, y, progress=False)
    saved = m[2].weight.detach().clone()
    with torch.no_grad():
        m[2].weight.add_(0.3)
    try:
        G.stage_blocks  # noqa: B018 - the lazy build
    except StaleOperatorError:
        pass
    with torch.no_grad():
        m[2].weight.copy_(saved)  # a rejected step, as in a line search
    d = 0.1
    A = G0 + d * torch.eye(G0.shape[0], dtype=DT)
    _, logabs = G.logdet(damping=d, method="lifted")
    cond = float(torch.linalg.cond(A))
    assert abs(float(logabs) - float(torch.linalg.slogdet(A)[1])) <= 64 * G0.shape[0] * EPS * cond


@pytest.mark.parametrize("method", ["inverse_diagonal", "inverse_block_diagonal"])
def test_hessian_selinv_after_update_refuses(method: str) -> None:
    m, X, y = _mlp(2)
    H = hessinv.Hessian(m, nn.MSELoss(), X, y, progress=False)
    with torch.no_grad():
        m[2].weight.add_(0.3)
    with pytest.raises(StaleOperatorError):
        getattr(H, method)(1.0)


@pytest.mark.parametrize("method", ["gradient", "diagonal", "block_diagonal", "to_dense"])
def test_ggn_methods_after_update_refuse(method: str) -> None:
    m, X, y = _mlp(3)
    G = hessinv.GaussNewton(m, nn.MSELoss(), X, y, progress=False)
    with torch.no_grad():
        m[2].weight.add_(0.3)
    with pytest.raises(StaleOperatorError):
        getattr(G, method)()


def test_refusing_methods_after_update() -> None:
    """What does refuse (the forward cache is never read for other parameters there)."""
    for cls in (hessinv.Hessian, hessinv.GaussNewton):
        m, X, y = _mlp(4)
        H = cls(m, nn.MSELoss(), X, y, progress=False)
        H.solve(torch.ones(H.num_params, dtype=DT), damping=1.0)  # warm factor cache
        with torch.no_grad():
            m[0].bias.add_(1e-3)
        for call in (
            lambda H=H: H @ torch.ones(H.num_params, dtype=DT),
            lambda H=H: H.loss(),
            lambda H=H: H.solve(torch.ones(H.num_params, dtype=DT), damping=1.0),
            lambda H=H: H.logdet(damping=1.0),
            lambda H=H: H.inertia(damping=1.0),
        ):
            with pytest.raises(StaleOperatorError):
                call()


# -- 3. ParameterSnapshot: bitwise flat copies, the watched module tree -----------------------
def _seq() -> nn.Sequential:
    torch.manual_seed(7)
    return _chain([(3, 4, True), (4, 4, True), (4, 2, True)])


def _noncontig() -> nn.Sequential:
    m = _seq()
    m[2].weight = nn.Parameter(torch.randn(4, 4, dtype=DT).T)  # a transposed (strided) leaf
    return m


def _frozen() -> nn.Sequential:
    m = _seq()
    m[2].bias.requires_grad_(False)
    return m


def _zero_size() -> nn.Sequential:
    m = _seq()
    m[2].register_parameter("empty", nn.Parameter(torch.zeros(0, dtype=DT)))
    return m


def _bn() -> nn.Sequential:
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    return m.eval()


def _neg_zero(m: nn.Module) -> None:
    m[2].bias.data[0] = -0.0


def _pos_zero() -> nn.Sequential:
    m = _seq()
    m[2].bias.data[0] = 0.0
    return m


SNAPSHOT_CASES = {
    "noncontiguous param changed": (_noncontig, lambda m: m[2].weight.data.add_(1e-3), True),
    "noncontiguous unchanged": (_noncontig, lambda m: None, False),
    "same module re-set": (_seq, lambda m: m.__setitem__(2, m[2]), False),
    "replaced by a copy": (_seq, lambda m: m.__setitem__(2, copy.deepcopy(m[2])), True),
    "insert shifts keys": (_seq, lambda m: m.insert(1, nn.Tanh()), True),
    "delete a module": (_seq, lambda m: m.__delitem__(4), True),
    "to() same dtype": (_seq, lambda m: m.to(DT), False),
    "to() float32 in place": (_seq, lambda m: m.to(torch.float32), True),
    "0.0 -> -0.0": (_pos_zero, _neg_zero, True),
    "frozen param changed": (_frozen, lambda m: m[2].bias.data.add_(0.5), True),
    "zero-size param": (_zero_size, lambda m: None, False),
    "buffer changed": (_bn, lambda m: m[1].running_mean.add_(1.0), True),
    "p.data rebound, same values": (
        _seq,
        lambda m: setattr(m[2].weight, "data", m[2].weight.data.clone()),
        False,
    ),
    "p.data rebound, new values": (
        _seq,
        lambda m: setattr(m[2].weight, "data", m[2].weight.data + 1),
        True,
    ),
    "param shares storage, base changed": (None, None, True),
}


@pytest.mark.parametrize("name", sorted(SNAPSHOT_CASES))
def test_snapshot(name: str) -> None:
    make, mutate, stale = SNAPSHOT_CASES[name]
    if make is None:  # two leaves' parameters are views of one storage
        base = torch.randn(8, dtype=DT)
        m = _seq()
        m[0].bias = nn.Parameter(base[:4])
        m[2].bias = nn.Parameter(base[4:])
        mutate = lambda mm: base[5:6].add_(1.0)  # noqa: E731 - changes m[2].bias through base
    else:
        m = make()
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(4, 3, generator=g, dtype=DT), torch.randn(4, 2, generator=g, dtype=DT)
    H = hessinv.Hessian(m, nn.MSELoss(), X, y, progress=False)
    mutate(m)
    v = torch.ones(H.num_params, dtype=DT)
    if stale:
        with pytest.raises(StaleOperatorError):
            H @ v
    else:
        H @ v


@pytest.mark.parametrize("how", ["append", "add_module"])
def test_snapshot_appended_module_is_stale(how: str) -> None:
    m = _seq()
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(4, 3, generator=g, dtype=DT), torch.randn(4, 2, generator=g, dtype=DT)
    H = hessinv.Hessian(m, nn.MSELoss(), X, y, progress=False)
    if how == "append":
        m.append(nn.Tanh())
    else:
        m.add_module("extra", nn.Tanh())
    V = torch.eye(H.num_params, dtype=DT)
    try:
        HV = H @ V
    except StaleOperatorError:
        return
    assert _rel(HV, _dense(m, nn.MSELoss(), X, y)) <= RTOL


# -- 4. Bunch-Kaufman fronts and the block-tridiagonal inertia --------------------------------
def _sym(n: int, kind: int, g: torch.Generator) -> torch.Tensor:
    A = torch.randn(n, n, generator=g, dtype=DT)
    A = A + A.T
    if kind == 1:  # anti-diagonal: 2x2 pivots and an interchange at every step
        A = torch.zeros(n, n, dtype=DT)
        A[torch.arange(n), torch.arange(n).flip(0)] = 1.0
    elif kind == 2:  # zero diagonal
        A.fill_diagonal_(0.0)
    elif kind == 3:  # singular, indefinite, low rank
        r = max(1, n // 3)
        B = torch.randn(n, r, generator=g, dtype=DT)
        A = (B * torch.sign(torch.randn(r, generator=g, dtype=DT))) @ B.T
    elif kind == 4:  # graded over 16 orders
        sc = 10.0 ** torch.linspace(-8, 8, n, dtype=DT)
        A = A * sc[:, None] * sc[None, :]
    return A


@settings(max_examples=60, deadline=None, derandomize=True)
@given(n=st.integers(1, 24), kind=st.integers(0, 4), seed=st.integers(0, 2**31 - 1))
def test_bunch_kaufman_reassembles(n: int, kind: int, seed: int) -> None:
    """``s[perm][:, perm] = Lt D Lt^T``, ``Lt`` unit lower, to ``n eps ||s||``."""
    s = _sym(n, kind, torch.Generator().manual_seed(seed))
    perm, lt, d, sub = _bunch_kaufman(s)
    assert sorted(perm.tolist()) == list(range(n))
    assert torch.equal(lt.diagonal(), torch.ones(n, dtype=DT))
    assert torch.equal(torch.triu(lt, 1), torch.zeros(n, n, dtype=DT))
    D = torch.diag(d) + (torch.diag(sub, -1) + torch.diag(sub, 1) if n > 1 else 0.0)
    assert float((lt @ D @ lt.T - s[perm][:, perm]).norm()) <= 64 * n * EPS * float(s.norm())


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.filter_too_much],
)
@given(
    sizes=st.lists(st.integers(1, 5), min_size=1, max_size=6),
    kind=st.integers(0, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_block_tri_inertia_ldl_matches_eigvalsh(sizes: list[int], kind: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    offs = [sum(sizes[:i]) for i in range(len(sizes))]
    K = torch.zeros(n, n, dtype=DT)
    for i, s in enumerate(sizes):
        blk = torch.randn(s, s, generator=g, dtype=DT)
        K[offs[i] : offs[i] + s, offs[i] : offs[i] + s] = 0.0 if kind == 1 else blk + blk.T
        if i + 1 < len(sizes):
            c = torch.randn(s, sizes[i + 1], generator=g, dtype=DT)
            K[offs[i] : offs[i] + s, offs[i + 1] : offs[i + 1] + sizes[i + 1]] = c
            K[offs[i + 1] : offs[i + 1] + sizes[i + 1], offs[i] : offs[i] + s] = c.T
    if kind == 2:
        K = K * 1e-6
    if kind == 3:
        sc = 10.0 ** torch.linspace(-4, 4, n, dtype=DT)
        K = K * sc[:, None] * sc[None, :]
    e = torch.linalg.eigvalsh(K)
    if float(e.abs().min()) <= 1e3 * n * EPS * float(e.abs().max()):
        return  # singular or signs not decidable from the reference
    diag = [K[o : o + s, o : o + s].clone() for o, s in zip(offs, sizes, strict=True)]
    upper = [
        K[offs[i] : offs[i] + sizes[i], offs[i + 1] : offs[i + 1] + sizes[i + 1]].clone()
        for i in range(len(sizes) - 1)
    ]
    r_sign, r_log = torch.linalg.slogdet(K)
    for piv, rtol in (("ldl", 0.0), ("eigh", None)):
        r = block_tri_inertia(diag, upper, pivoting=piv, rtol=rtol)
        assert (r.positive, r.negative, r.zero) == (int((e > 0).sum()), int((e < 0).sum()), 0)
        assert r.sign == float(r_sign)
        cond = float(e.abs().max() / e.abs().min())
        assert abs(r.logabsdet - float(r_log)) <= 64 * n * EPS * cond * max(1.0, abs(float(r_log)))


# -- 5. the band count (first congruence only) against eigvalsh -------------------------------
class _Scaled(nn.Module):
    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c
        self.reduction = "mean"

    def forward(self, o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.c * nn.functional.mse_loss(o, t)


@pytest.mark.parametrize("c", [1e-12, 1.0, 1e12])
def test_zero_count_at_shifted_eigenvalues(c: float) -> None:
    """``d = -lambda_i``: the zero count equals eigvalsh's count in ``[-t, t]`` where that
    count is decidable (no eigenvalue within a factor 5 of ``t``), and solve refuses."""
    torch.manual_seed(8)
    m = _chain([(3, 4, True), (4, 4, True), (4, 4, True), (4, 2, True)])
    g = torch.Generator().manual_seed(8)
    X, y = torch.randn(3, 3, generator=g, dtype=DT), torch.randn(3, 2, generator=g, dtype=DT)
    loss = _Scaled(c)
    H = hessinv.Hessian(m, loss, X, y, progress=False)
    Hd = _dense(m, loss, X, y)
    lam = torch.linalg.eigvalsh(Hd)
    W = Hd.shape[0]
    decided = 0
    for li in (lam[0], lam[1], lam[W // 2], lam[-2], lam[-1]):
        d = -float(li)
        F = H.factor(d, method="lifted")
        t = F.zero_threshold()
        e = torch.linalg.eigvalsh(Hd + d * torch.eye(W, dtype=DT)).abs()
        if ((e > t / 5) & (e < 5 * t)).any():  # the shifted eigenvalue lands at 0.01..0.2 t
            continue
        decided += 1
        ref = int((e <= t).sum())
        assert F.zero_count() == ref
        if ref:
            with pytest.raises(hessinv.SingularHessianError):
                H.solve(torch.ones(W, dtype=DT), damping=d, method="lifted")
    assert decided >= 4


# -- 6./7. model checks: legitimate models are not refused ------------------------------------
class _MyLinear(nn.Linear):
    pass


class _MyTanh(nn.Tanh):
    pass


class _Block(nn.Sequential):
    def __init__(self, a: int, b: int) -> None:
        super().__init__(nn.Linear(a, b), nn.Tanh())


class _Seq2(nn.Sequential):
    pass


class _Res(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.l2(torch.tanh(self.l1(x)))


class _ResNet(nn.Module):
    """torchvision-like: stem, a Sequential of residual blocks, head."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.blocks = nn.Sequential(_Res(), _Res())
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.blocks(torch.tanh(self.inp(x)))))


def _no_grad_built() -> nn.Module:
    with torch.no_grad():
        return _chain([(3, 4, True), (4, 2, True)])


def _lazy() -> nn.Module:
    m = nn.Sequential(nn.LazyLinear(4), nn.Tanh(), nn.LazyLinear(2)).to(DT)
    m(torch.zeros(1, 3, dtype=DT))
    return m


def _bias_none() -> nn.Module:
    lin = nn.Linear(3, 4).to(DT)
    lin.register_parameter("bias", None)
    return nn.Sequential(lin, nn.Tanh(), nn.Linear(4, 2)).to(DT)


def _reordered() -> nn.Module:  # bias registered before weight (as prune.remove leaves it)
    lin = nn.Linear(3, 4).to(DT)
    w = lin._parameters.pop("weight")
    lin.register_parameter("weight", w)
    return nn.Sequential(lin, nn.Tanh(), nn.Linear(4, 2)).to(DT)


def _hooked_inner() -> nn.Module:  # hooks inside a traced custom model are traced (fx)
    m = _ResNet().to(DT)
    m.blocks[0].register_forward_hook(lambda mod, i, o: 2 * o)
    m.inp.register_forward_hook(lambda mod, i, o: o - 1)
    return m


def _removed_hook() -> nn.Module:
    m = _chain([(3, 4, True), (4, 2, True)])
    m.register_forward_hook(lambda mod, i, o: 2 * o).remove()
    m[0].register_forward_pre_hook(lambda mod, i: (2 * i[0],)).remove()
    return m


LEGIT = {
    "torch subclasses overriding nothing": lambda: nn.Sequential(
        _MyLinear(3, 4), _MyTanh(), _MyLinear(4, 2)
    ).to(DT),
    "Sequential subclass blocks": lambda: nn.Sequential(
        _Block(3, 4), _Block(4, 4), nn.Linear(4, 2)
    ).to(DT),
    "Sequential subclass model": lambda: _Seq2(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT),
    "built under no_grad": _no_grad_built,
    "lazy, materialised": _lazy,
    "ModuleList in custom module": lambda: _Traced().to(DT),
    "torchvision-like residual": lambda: _ResNet().to(DT),
    "bias registered as None": _bias_none,
    "parameters reordered": _reordered,
    "hooks inside a traced model": _hooked_inner,
    "hooks registered then removed": _removed_hook,
    "dropout/identity in eval": lambda: (
        nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.1), nn.Tanh(), nn.Identity(), nn.Linear(4, 2))
        .to(DT)
        .eval()
    ),
}


@pytest.mark.parametrize("name", sorted(LEGIT))
def test_legitimate_models_accepted_and_exact(name: str) -> None:
    torch.manual_seed(11)
    m = LEGIT[name]()
    g = torch.Generator().manual_seed(11)
    X, y = torch.randn(4, 3, generator=g, dtype=DT), torch.randn(4, 2, generator=g, dtype=DT)
    H = hessinv.Hessian(m, nn.MSELoss(), X, y, progress=False)
    Hd = _dense(m, nn.MSELoss(), X, y)
    V = torch.randn(Hd.shape[0], 3, generator=g, dtype=DT)
    assert _rel(H @ V, Hd @ V) <= RTOL


def test_user_instance_forward_in_traced_model() -> None:
    """An instance forward on a module of the user's own class (allowed today) is honoured."""

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.l(x)

    torch.manual_seed(12)
    m = _ResNet().to(DT)
    w = Wrap().to(DT)
    w.forward = types.MethodType(lambda self, x: torch.sin(self.l(x)), w)  # deep-copies
    m.blocks[0] = w
    g = torch.Generator().manual_seed(12)
    X, y = torch.randn(4, 3, generator=g, dtype=DT), torch.randn(4, 2, generator=g, dtype=DT)
    H = hessinv.Hessian(m, nn.MSELoss(), X, y, progress=False)
    Hd = _dense(m, nn.MSELoss(), X, y)  # functional_call runs the instance forward
    V = torch.randn(Hd.shape[0], 3, generator=g, dtype=DT)
    assert _rel(H @ V, Hd @ V) <= RTOL


def test_top_level_hook_refusal_names_the_hook() -> None:
    m = _ResNet().to(DT)
    m.register_forward_hook(lambda mod, i, o: 2 * o)
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(4, 3, generator=g, dtype=DT), torch.randn(4, 2, generator=g, dtype=DT)
    with pytest.raises(ValueError, match="hook"):
        hessinv.Hessian(m, nn.MSELoss(), X, y, progress=False)
