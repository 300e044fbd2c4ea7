"""Functional pipelines (hessinv.Stage), random pipelines (hypothesis), and bad input."""

from __future__ import annotations

import pytest
import torch
from cases import DT, rel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import hessinv
from hessinv import Stage

ACTS = [
    torch.tanh,
    torch.sigmoid,
    torch.nn.functional.softplus,
    torch.sin,
    lambda t: t * torch.tanh(t),
]


def dense_stage(w, b, act):
    return Stage(lambda z, p: act(z @ p[0].T + p[1]), (w, b))


def residual_stage(w, b):
    return Stage(lambda z, p: z + torch.tanh(z @ p[0].T + p[1]), (w, b))


def scale_stage(s):
    """``z -> tanh(s * z + 1)``: one parameter per activation (elementwise)."""
    return Stage(lambda z, p: torch.tanh(p[0] * z + 1.0), (s,))


def mse_stage(w, target):
    return Stage(lambda z, p: 0.5 * ((z @ p[0].T - target) ** 2).sum(), (w,))


def reference(stages, z0):
    params = [p for s in stages for p in s.params]
    x0 = torch.cat([p.reshape(-1) for p in params])

    def f(flat):
        z, i = z0, 0
        for s in stages:
            ps = []
            for p in s.params:
                ps.append(flat[i : i + p.numel()].reshape(p.shape))
                i += p.numel()
            z = s.fn(z, tuple(ps))
        return z

    return f, x0


@st.composite
def pipelines(draw):
    n = draw(st.integers(1, 5))
    widths = draw(st.lists(st.integers(1, 4), min_size=2, max_size=5))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(n, widths[0], generator=g, dtype=DT)
    stages = []
    cur = widths[0]
    for b in widths[1:]:
        kind = draw(st.sampled_from(["dense", "residual", "scale"]))
        if kind == "scale":
            stages.append(scale_stage(torch.randn(cur, generator=g, dtype=DT)))
            continue
        if kind == "residual":
            b = cur
        w = torch.randn(b, cur, generator=g, dtype=DT)
        c = torch.randn(b, generator=g, dtype=DT)
        act = ACTS[draw(st.sampled_from(range(len(ACTS))))]
        stages.append(residual_stage(w, c) if kind == "residual" else dense_stage(w, c, act))
        cur = b
    target = torch.randn(n, 2, generator=g, dtype=DT)
    stages.append(mse_stage(torch.randn(2, cur, generator=g, dtype=DT), target))
    damping = draw(st.sampled_from([0.0, 1e-2, 1.0]))
    return stages, z0, damping


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pipelines())
def test_random_pipelines(case):
    stages, z0, damping = case
    H = hessinv.Hessian.from_stages(stages, z0)
    f, x0 = reference(stages, z0)
    Href = torch.func.hessian(f)(x0)
    assert (
        rel(H.gradient(), torch.func.grad(f)(x0)) <= 1e-10
        or float(torch.func.grad(f)(x0).abs().max()) < 1e-14
    )
    assert rel(H.to_dense(), Href) <= 1e-10
    A = Href + damping * torch.eye(H.num_params, dtype=DT)
    ev = torch.linalg.eigvalsh(A)
    smin, smax = float(ev.abs().min()), float(ev.abs().max())
    g = torch.randn(H.num_params, dtype=DT, generator=torch.Generator().manual_seed(0))
    t = H.num_params * torch.finfo(DT).eps * smax  # the documented zero threshold
    if smin <= 0.1 * t:  # singular to working precision: must refuse
        with pytest.raises(hessinv.SingularHessianError, match="damping"):
            H.solve(g, damping=damping, method="lifted")
        return
    if smin <= 10 * t:  # at the threshold: refuse, or answer to the contract
        try:
            x = H.solve(g, damping=damping, method="lifted")
        except hessinv.SingularHessianError as e:
            assert "damping" in str(e)
            return
        nrm = smax * torch.linalg.norm(x) + torch.linalg.norm(g)
        eta = float(torch.linalg.norm(A @ x - g) / nrm)
        assert eta <= hessinv.solvers.solve_tolerance(DT)
        return
    x = H.solve(g, damping=damping, method="lifted")
    xd = torch.linalg.solve(A, g)

    def eta(y):  # normwise backward error, ||A||_2 from the dense spectrum
        return float(
            torch.linalg.norm(A @ y - g) / (smax * torch.linalg.norm(y) + torch.linalg.norm(g))
        )

    # Within 100x of the dense LU's own backward error, floored at one rounding
    # (eps): below it the reference's error is luck, not a standard. The relative
    # residual is not the measure: at cond 4.8e10 a solve with eta = 0.02 eps had
    # 300x the residual of a dense LU that happened to land at eta = 1e-4 eps.
    assert eta(x) <= 100 * max(eta(xd), torch.finfo(DT).eps)
    if smin > 1e-10 * smax:  # inertia and logdet are well defined numerically
        assert H.inertia(damping) == (int((ev > 0).sum()), int((ev < 0).sum()), 0)
        s, la = H.logdet(damping)
        s_ref, la_ref = torch.linalg.slogdet(A)
        assert s == float(s_ref) and abs(la - float(la_ref)) <= 1e-8 * max(1.0, abs(float(la_ref)))


def test_stage_attributes_and_residual_stage():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(3, 3, generator=g, dtype=DT), torch.randn(3, generator=g, dtype=DT)
    s = residual_stage(w, b)
    assert callable(s.fn) and s.params[0] is w and s.num_params == 12
    z0 = torch.randn(4, 3, generator=g, dtype=DT)
    stages = [
        dense_stage(
            torch.randn(3, 3, generator=g, dtype=DT),
            torch.randn(3, generator=g, dtype=DT),
            torch.tanh,
        ),
        s,
        mse_stage(
            torch.randn(2, 3, generator=g, dtype=DT), torch.randn(4, 2, generator=g, dtype=DT)
        ),
    ]
    H = hessinv.Hessian.from_stages(stages, z0)
    f, x0 = reference(stages, z0)
    assert rel(H.to_dense(), torch.func.hessian(f)(x0)) <= 1e-10


def test_mixing_stage_is_detected():
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(4, 3, generator=g, dtype=DT)
    w = torch.randn(3, 3, generator=g, dtype=DT)
    mixing = Stage(lambda z, p: torch.tanh(z @ p[0].T - z.mean(0, keepdim=True)), (w,))
    loss = mse_stage(torch.randn(1, 3, generator=g, dtype=DT), torch.zeros(4, 1, dtype=DT))
    with pytest.raises(ValueError, match="mixes samples"):
        # after the first stage (a generic first stage's blocks are full batch Jacobians)
        hessinv.Hessian.from_stages(
            [dense_stage(w.clone(), torch.zeros(3, dtype=DT), torch.tanh), mixing, loss], z0
        )
    bad_loss = Stage(
        lambda z, p: (z @ p[0].T).sum() ** 2, (torch.randn(1, 3, generator=g, dtype=DT),)
    )
    with pytest.raises(ValueError, match="mixes samples"):
        hessinv.Hessian.from_stages(
            [dense_stage(w, torch.zeros(3, dtype=DT), torch.tanh), bad_loss], z0
        )


def _small():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    X, y = torch.randn(5, 3, dtype=DT), torch.randn(5, 2, dtype=DT)
    return model, X, y


def test_bad_vectors():
    model, X, y = _small()
    H = hessinv.Hessian(model, nn.MSELoss(), X, y)
    W = H.num_params
    with pytest.raises(ValueError, match="length"):
        H @ torch.zeros(W + 1, dtype=DT)
    with pytest.raises(ValueError, match="rows"):
        H @ torch.zeros(W - 1, 2, dtype=DT)
    with pytest.raises(ValueError, match="shape"):
        H @ torch.zeros(W, 1, 1, dtype=DT)
    with pytest.raises(TypeError, match="dtype"):
        H @ torch.zeros(W, dtype=torch.float32)
    with pytest.raises(ValueError, match="NaN"):
        H @ torch.full((W,), float("nan"), dtype=DT)
    with pytest.raises(ValueError, match="NaN"):
        H @ torch.full((W,), float("inf"), dtype=DT)
    with pytest.raises(ValueError, match="tensors"):
        H @ [torch.zeros(4, 3, dtype=DT)]
    with pytest.raises(ValueError, match="expected"):
        H @ [
            torch.zeros(3, 4, dtype=DT),
            torch.zeros(4, dtype=DT),
            torch.zeros(2, 4, dtype=DT),
            torch.zeros(2, dtype=DT),
        ]
    with pytest.raises(TypeError):
        H @ "v"
    if torch.cuda.is_available():  # pragma: no cover - exercised on the GPU machine
        with pytest.raises(ValueError, match="device"):
            H @ torch.zeros(W, dtype=DT, device="cuda")


def test_bad_models_and_data():
    model, X, y = _small()
    with pytest.raises(ValueError, match="NaN"):
        hessinv.Hessian(model, nn.MSELoss(), torch.full_like(X, float("nan")), y)
    with pytest.raises(ValueError, match="samples"):
        hessinv.Hessian(model, nn.MSELoss(), X, y[:3])
    with pytest.raises(TypeError, match="dtype"):
        hessinv.Hessian(model, nn.MSELoss(), X.float(), y)
    with pytest.raises(ValueError, match="reduction"):
        hessinv.Hessian(model, nn.MSELoss(reduction="none"), X, y)
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).to(DT)
    with pytest.raises(ValueError, match="BatchNorm1d"):
        hessinv.Hessian(bn, nn.MSELoss(), X, y)
    dr = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.1), nn.Linear(4, 2)).to(DT)
    with pytest.raises(ValueError, match="Dropout"):
        hessinv.Hessian(dr, nn.MSELoss(), X, y)
    rnn = nn.Sequential(nn.RNN(3, 2)).to(DT)
    with pytest.raises(ValueError, match="RNN"):
        hessinv.Hessian(rnn, nn.MSELoss(), X, y)

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3, dtype=DT))

        def forward(self, z):  # data-dependent control flow: torch.fx cannot trace it
            return z * self.w if z.sum() > 0 else z

    with pytest.raises(ValueError, match="could not trace module 0 \\(Custom\\)"):
        hessinv.Hessian(nn.Sequential(Custom(), nn.Linear(3, 2).to(DT)), nn.MSELoss(), X, y)
    frozen = nn.Sequential(nn.Linear(3, 2)).to(DT).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        hessinv.Hessian(frozen, nn.MSELoss(), X, y)
    nanmodel = nn.Sequential(nn.Linear(3, 2)).to(DT)
    with torch.no_grad():
        nanmodel[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        hessinv.Hessian(nanmodel, nn.MSELoss(), X, y)


def test_bad_stages():
    z0 = torch.randn(3, 2, dtype=DT)
    w = torch.randn(2, 2, dtype=DT)
    not_scalar = Stage(lambda z, p: z @ p[0], (w,))
    with pytest.raises(ValueError, match="scalar"):
        hessinv.Hessian.from_stages([not_scalar], z0)
    drops_batch = Stage(lambda z, p: (z @ p[0]).sum(0), (w,))
    end = Stage(lambda z, p: (z * p[0]).sum(), (torch.ones(2, dtype=DT),))
    with pytest.raises(ValueError, match="batch"):
        hessinv.Hessian.from_stages([drops_batch, end], z0)
    with pytest.raises(ValueError, match="at least one"):
        hessinv.Hessian.from_stages([], z0)
    with pytest.raises(TypeError, match="Stage"):
        hessinv.Hessian.from_stages([lambda z: z], z0)
    with pytest.raises(TypeError, match="callable"):
        Stage(3, (w,))
    with pytest.raises(TypeError, match="Tensor"):
        Stage(lambda z, p: z, ([1.0],))
    with pytest.raises(TypeError, match="dtype"):
        hessinv.Hessian.from_stages([Stage(lambda z, p: (z * p[0]).sum(), (torch.ones(2),))], z0)
    with pytest.raises(ValueError, match="NaN"):
        hessinv.Hessian.from_stages([Stage(lambda z, p: (z @ p[0]).sum() / 0.0 * 0.0, (w,))], z0)


def test_all_parameters_lists_what_named_parameters_lists():
    from torch import nn

    from hessinv.module_params import all_parameters, trainable

    tied = nn.Linear(3, 3)
    tied.register_parameter("again", tied.weight)  # one tensor, two names: listed once
    frozen = nn.Linear(2, 2)
    frozen.bias.requires_grad_(False)
    mods = [
        nn.Linear(3, 4),
        nn.Linear(3, 4, bias=False),  # a None entry in the registry
        nn.Tanh(),
        nn.LayerNorm(4),
        tied,
        frozen,
        nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 1))),  # children
    ]
    for m in mods:
        ref = list(m.named_parameters())
        got = all_parameters(m)
        assert [n for n, _ in got] == [n for n, _ in ref], m
        assert all(a is b for (_, a), (_, b) in zip(got, ref, strict=True))
        assert [n for n, _ in trainable(m)] == [n for n, p in ref if p.requires_grad]


@pytest.mark.parametrize("cat_max", [1 << 22, 0], ids=["one-concatenation", "per-stage-sums"])
def test_non_finite_stage_output_is_named(cat_max: int, monkeypatch) -> None:  # noqa: ANN001
    """The first stage whose output has a NaN or an Inf is named, by either route of the
    check; a stage output whose sum overflows (finite entries) is not refused."""
    import hessinv.pipeline as pipeline_mod  # noqa: PLC0415

    monkeypatch.setattr(pipeline_mod, "FINITE_CAT_MAX", cat_max)
    X = torch.randn(3, 2, dtype=DT)

    def run(fn) -> None:  # noqa: ANN001
        stages = [
            Stage(lambda z, ps: z * ps[0], (torch.ones(2, dtype=DT),)),
            Stage(lambda z, ps: fn(z), ()),
            Stage(lambda z, ps: (torch.tanh(z) * ps[0]).sum(), (torch.ones(2, dtype=DT),)),
        ]
        hessinv.Hessian.from_stages(stages, X, check_mixing=False)

    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match=r"^stage 1 produced NaN or Inf"):
            run(lambda z, bad=bad: z + torch.tensor([0.0, bad], dtype=DT))
    big = torch.finfo(DT).max
    run(lambda z: z * 0 + big)  # each entry finite, their sum inf: no refusal
