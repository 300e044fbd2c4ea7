"""Exact, or a clear error: inputs that once gave a wrong number or a raw internal error.

Each test is one case of the "exact or a clear error" issue. Where an input is
made to work, the operator is compared with an independent dense
``torch.func.hessian`` of the loss as a function of the flat parameters, built
here from the model with ``functional_call`` (no hessinv code in it).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.nn.utils import parametrize

import hessinv
from hessinv import Stage

DT = torch.float64
N = 8


def _data(n: int = N, d_in: int = 4, d_out: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=DT), torch.randn(n, d_out, generator=g, dtype=DT)


def _mlp(seed: int = 0, *mid: nn.Module) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), *mid, nn.Linear(5, 1)).double()


def _dense_reference(model: nn.Module, loss_func, X, y) -> torch.Tensor:  # noqa: N803
    """``torch.func.hessian`` of the loss in the flat trainable parameters of ``model``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for _, p in named]
    x0 = torch.cat([p.detach().reshape(-1) for _, p in named])

    def f(flat):
        ps, i = {}, 0
        for (name, _), s in zip(named, shapes, strict=True):
            k = int(np.prod(s)) if len(s) else 1
            ps[name] = flat[i : i + k].reshape(s)
            i += k
        return loss_func(torch.func.functional_call(model, ps, (X,)), y)

    return torch.func.hessian(f)(x0)


# -- 1. sample mixing, on every route -----------------------------------------------------------
def test_mixing_softmax_over_batch_refused_on_module_route():
    X, y = _data()
    model = _mlp(0, nn.Tanh(), nn.Softmax(dim=0))
    with pytest.raises(ValueError, match=r"stage 0: Softmax\(dim=0\) mixes samples"):
        hessinv.Hessian(model, nn.MSELoss(), X, y)


def test_mixing_layernorm_over_batch_refused():
    X, y = _data()
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(4, 4), nn.Tanh(), nn.LayerNorm((N, 4)), nn.Tanh(), nn.Linear(4, 1)
    ).double()
    with pytest.raises(ValueError, match=r"stage 1: LayerNorm\(\(8, 4\).* mixes samples"):
        hessinv.Hessian(model, nn.MSELoss(), X, y)


def test_mixing_batchnorm_without_running_stats_in_eval_refused():
    X, y = _data()
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Linear(4, 4), nn.Tanh(), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 1)
    ).double()
    model.eval()  # still batch statistics: no running statistics to use
    with pytest.raises(ValueError, match=r"stage 1: BatchNorm1d.*mixes samples.*running"):
        hessinv.Hessian(model, nn.MSELoss(), X, y)


def test_mixing_callable_loss_refused_on_hessian_and_gauss_newton():
    X, y = _data()
    model = _mlp(3, nn.Tanh())

    def loss(o, t):
        return ((o - t).sum(0) ** 2).sum()

    for cls in (hessinv.Hessian, hessinv.GaussNewton):
        with pytest.raises(ValueError, match=r"stage 1: the loss .*loss.* mixes samples"):
            cls(model, loss, X, y)


def test_mixing_check_handles_mean_mse_in_a_functional_pipeline():
    """The old JVP-of-grad check crashed ("ZeroTensors are immutable") on a mean MSE loss."""
    X, y = _data()
    g = torch.Generator().manual_seed(4)
    w1, w2 = torch.randn(3, 4, generator=g, dtype=DT), torch.randn(1, 3, generator=g, dtype=DT)
    calls = [0, 0]

    def f1(z, p):
        calls[0] += 1
        return torch.tanh(z @ p[0].T)

    def f2(z, p):
        calls[1] += 1
        return nn.MSELoss()(z @ p[0].T, y)

    H = hessinv.Hessian.from_stages([Stage(f1, (w1,)), Stage(f2, (w2,))], X)
    assert H.shape == (15, 15)
    # The check costs one probe per stage after the first: it shares the operator's forward
    # pass (Pipeline.forward is computed once). Construct once with and once without it.
    with_check = list(calls)
    calls[:] = [0, 0]
    hessinv.Hessian.from_stages([Stage(f1, (w1,)), Stage(f2, (w2,))], X, check_mixing=False)
    assert [a - b for a, b in zip(with_check, calls, strict=True)] == [0, 1]


@pytest.mark.parametrize("c", [1e-12, 1e12])
def test_mixing_check_is_scale_invariant(c):
    X, y = _data()
    model = _mlp(5, nn.Tanh())

    def clean(o, t):
        return c * ((o - t) ** 2).mean()

    def mixing(o, t):
        return c * (((o - t) ** 2).mean() + 1e-6 * (o.sum(0) ** 2).sum())

    hessinv.Hessian(model, clean, X, y)  # no false alarm
    with pytest.raises(ValueError, match="mixes samples"):
        hessinv.Hessian(model, mixing, X, y)


# -- 2. tied weights --------------------------------------------------------------------------
def test_module_used_twice_refused():
    X, y = _data(d_in=5)
    torch.manual_seed(6)
    shared = nn.Linear(5, 5)
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(5, 1)).double()
    with pytest.raises(ValueError, match=r"0\.weight.* 2\.weight|2\.weight.* 0\.weight"):
        hessinv.Hessian(model, nn.MSELoss(), X, y)


def test_parameter_shared_between_modules_refused():
    X, y = _data(d_in=5)
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 1))
    model = model.double()
    model[2].weight = model[0].weight
    with pytest.raises(ValueError, match=r"0\.weight.* 2\.weight|2\.weight.* 0\.weight"):
        hessinv.Hessian(model, nn.MSELoss(), X, y)


# -- 3. parametrizations and hooks ---------------------------------------------------------
class _Symmetric(nn.Module):
    def forward(self, w):
        return w.triu() + w.triu(1).T


def test_parametrized_weight_refused():
    X, y = _data(d_in=5)
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    parametrize.register_parametrization(model[0], "weight", _Symmetric())
    with pytest.raises(ValueError, match=r"module '0' \(ParametrizedLinear\).*parametriz.*weight"):
        hessinv.Hessian(model, nn.MSELoss(), X, y)


def test_forward_hook_refused():
    X, y = _data()
    model = _mlp(9, nn.Tanh())
    model[0].register_forward_hook(lambda m, i, o: 2 * o)
    with pytest.raises(ValueError, match=r"module '0' \(Linear\) has _forward_hooks"):
        hessinv.Hessian(model, nn.MSELoss(), X, y)


# -- 4. overridden forward -------------------------------------------------------------------
class _Residual(nn.Sequential):
    def forward(self, x):
        return x + super().forward(x)


class _ScaledLinear(nn.Linear):
    def forward(self, x):
        return 3.0 * super().forward(x)


def _exact_or_refused(model, loss, X, y, refusal):  # noqa: N803
    """The model's forward is honoured (traced, exact against dense) or refused by name."""
    try:
        H = hessinv.Hessian(model, loss, X, y)
    except ValueError as e:
        assert refusal in str(e)
        return
    ref = _dense_reference(model, loss, X, y)
    assert torch.linalg.matrix_norm(H.to_dense() - ref) <= 1e-10 * torch.linalg.matrix_norm(ref)


def test_sequential_subclass_overriding_forward_exact_or_refused_at_any_level():
    """Once refused as "not a plain chain"; the torch.fx tracer now honours the override."""
    X, y = _data()
    torch.manual_seed(10)
    top = _Residual(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).double()
    _exact_or_refused(top, lambda o, t: ((o[:, :1] - t) ** 2).sum(), X, y, "_Residual")
    nested = nn.Sequential(
        nn.Linear(4, 4),
        nn.Sequential(nn.Tanh(), _Residual(nn.Linear(4, 4), nn.Tanh())),
        nn.Linear(4, 1),
    ).double()
    _exact_or_refused(nested, nn.MSELoss(), X, y, "_Residual")


def test_module_subclass_overriding_forward_exact_or_refused():
    X, y = _data()
    torch.manual_seed(11)
    model = nn.Sequential(_ScaledLinear(4, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    _exact_or_refused(model, nn.MSELoss(), X, y, "_ScaledLinear")


def test_plain_chain_refusal_is_one_function():
    """The fast path's own refusal (the tracer takes such models before it is reached)."""
    from hessinv.model_checks import check_plain_sequential

    with pytest.raises(ValueError, match=r"'a\.b' is a _Residual.*not a plain chain"):
        check_plain_sequential(_Residual(nn.Linear(2, 2)), "a.b")
    check_plain_sequential(nn.Sequential(nn.Linear(2, 2)), "")


# -- 5. in-place activations ---------------------------------------------------------------
def test_inplace_activations_exact_and_user_modules_untouched():
    X, y = _data(n=6)
    X0 = X.clone()
    torch.manual_seed(12)
    acts = [nn.ELU(inplace=True), nn.LeakyReLU(0.1, inplace=True), nn.SiLU(inplace=True)]
    model = nn.Sequential(
        nn.ReLU(inplace=True),  # before the first parametrised module: applied to X itself
        nn.Linear(4, 5),
        acts[0],
        nn.ReLU(inplace=True),
        nn.Linear(5, 5),
        acts[1],
        nn.Linear(5, 5),
        acts[2],
        nn.Mish(inplace=True),
        nn.Linear(5, 1),
    ).double()
    loss = nn.MSELoss()
    H = hessinv.Hessian(model, loss, X, y)
    assert torch.equal(X, X0), "the input was overwritten"
    assert all(a.inplace for a in acts)
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    ref = _dense_reference(twin, loss, X, y)
    got = H.to_dense()
    assert torch.linalg.matrix_norm(got - ref) <= 1e-10 * torch.linalg.matrix_norm(ref)
    g = torch.randn(H.num_params, generator=torch.Generator().manual_seed(0), dtype=DT)
    x = H.solve(g, damping=0.5)
    assert torch.allclose(
        x,
        torch.linalg.solve(ref + 0.5 * torch.eye(H.num_params, dtype=DT), g),
        rtol=1e-9,
        atol=1e-12,
    )


# -- 6. dtypes ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.complex128])
def test_unsupported_parameter_dtypes_refused_at_construction(dtype):
    X, y = _data()
    model = _mlp(13, nn.Tanh()).to(dtype)
    with pytest.raises(
        TypeError, match=rf"{str(dtype).replace('torch.', '')}.*float32 and float64"
    ):
        hessinv.Hessian(model, nn.MSELoss(), X.to(dtype), y.to(dtype))
    w = torch.randn(1, 4).to(dtype)
    with pytest.raises(TypeError, match="float32 and float64"):
        hessinv.Hessian.from_stages(
            [Stage(lambda z, p: (z @ p[0].T).abs().sum(), (w,))], X.to(dtype)
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.complex128])
def test_unsupported_input_dtypes_refused_at_construction(dtype):
    X, y = _data()
    model = _mlp(14, nn.Tanh())
    with pytest.raises(TypeError, match=r"X has dtype .*float32 and float64"):
        hessinv.Hessian(model, nn.MSELoss(), X.to(dtype), y)
    with pytest.raises(TypeError, match=r"y has dtype .*float32 and float64"):
        hessinv.Hessian(model, nn.MSELoss(), X, y.to(dtype))


# -- 7. stale operators ------------------------------------------------------------------------
def _methods(H):
    g = torch.ones(H.num_params, dtype=DT)
    return {
        "matmul": lambda: H @ g,
        "solve": lambda: H.solve(g, damping=1e-2),
        "loss": H.loss,
        "gradient": H.gradient,
        "logdet": lambda: H.logdet(1e-2),
        "inertia": lambda: H.inertia(1e-2),
        "factor": lambda: H.factor(1e-2),
        "to_dense": H.to_dense,
        "diagonal": H.diagonal,
    }


def _optimizer_step(model, X, y):  # noqa: N803
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    nn.MSELoss()(model(X), y).backward()
    opt.step()


def _data_copy(model, X, y):  # noqa: N803
    model[2].bias.data.copy_(model[2].bias.data + 1)


def _no_grad_add(model, X, y):  # noqa: N803
    with torch.no_grad():
        model[0].weight.add_(1e-12)


def _replace(model, X, y):  # noqa: N803
    model[2].bias = nn.Parameter(model[2].bias.detach().clone())


@pytest.mark.parametrize("change", [_optimizer_step, _data_copy, _no_grad_add, _replace])
def test_stale_operator_refuses_after_the_weights_change(change):
    X, y = _data()
    model = _mlp(15, nn.Tanh())
    H = hessinv.Hessian(model, nn.MSELoss(), X, y)
    for f in _methods(H).values():
        f()  # fresh: fine, and hessinv itself never changes the parameters
    facs = [H.factor(1e-2), H.factor(1e-2, method="dense")]
    change(model, X, y)
    g = torch.ones(H.num_params, dtype=DT)
    for fac in facs:  # factorizations held across the change refuse too
        for f in (lambda: fac.solve(g), fac.logdet, fac.inertia):  # noqa: B023
            with pytest.raises(hessinv.StaleOperatorError):
                f()
    for name, f in _methods(H).items():
        with pytest.raises(hessinv.StaleOperatorError, match=r"^[02]\.(weight|bias)"):
            f()
        assert isinstance(hessinv.StaleOperatorError("x"), RuntimeError), name


def test_stale_check_names_the_one_entry_changed_by_one_ulp_among_many_tensors():
    from hessinv.staleness import ParameterSnapshot, ParameterSource

    torch.manual_seed(0)  # two groups (float64 and float32), compared as one flat copy each
    ts = [torch.randn(3, 2, dtype=DT) for _ in range(40)] + [torch.randn(5) for _ in range(7)]
    snap = ParameterSnapshot([ParameterSource(f"t{i}", t) for i, t in enumerate(ts)])
    assert snap.changed() is None
    for i, at in [(0, (0, 0)), (23, (2, 1)), (39, (1, 1)), (40, (0,)), (46, (4,))]:
        old = ts[i][at].clone()
        ts[i][at] = torch.nextafter(old, torch.tensor(float("inf"), dtype=old.dtype))
        assert snap.changed() == f"t{i}"
        ts[i][at] = old
        assert snap.changed() is None
    ts[7].zero_()
    snap = ParameterSnapshot([ParameterSource(f"t{i}", t) for i, t in enumerate(ts)])
    ts[7][0, 0] = -0.0  # every bit counts: the snapshot does not guess which changes matter
    assert snap.changed() == "t7"


def test_stale_functional_pipeline_refuses():
    X, _ = _data()
    w = torch.randn(1, 4, dtype=DT)
    H = hessinv.Hessian.from_stages(
        [Stage(lambda z, p: (torch.tanh(z @ p[0].T) ** 2).sum(), (w,))], X
    )
    H.gradient()
    w.mul_(2)
    with pytest.raises(hessinv.StaleOperatorError, match=r"stages\[0\]\.params\[0\].*Rebuild"):
        H.solve(torch.ones(4, dtype=DT), damping=1.0)


# -- 8. damping ---------------------------------------------------------------------------------
def test_damping_accepts_every_real_scalar_and_rejects_the_rest():
    from hessinv.validate import check_damping

    X, y = _data()
    H = hessinv.Hessian(_mlp(16, nn.Tanh()), nn.MSELoss(), X, y)
    g = H.gradient()
    # the first solve of a factorization carries the estimates' columns (last bits differ)
    H.solve(g, damping=1e-3)
    ref = H.solve(g, damping=1e-3)
    for d in (np.float64(1e-3), torch.tensor(1e-3, dtype=DT), np.array(1e-3)):
        assert torch.equal(H.solve(g, damping=d), ref)
    assert torch.equal(
        H.solve(g, damping=np.float32(1e-3)), H.solve(g, damping=float(np.float32(1e-3)))
    )
    assert check_damping(np.float32(1e-3)) == float(np.float32(1e-3))
    for d in (1, np.int64(1), torch.tensor(1), torch.tensor([1.0])):
        assert check_damping(d) == 1.0
    assert check_damping(-2) == -2.0
    for bad in (
        True,
        np.bool_(False),
        torch.tensor(True),
        1e-3j,
        torch.tensor(1j),
        "1e-3",
        None,
        torch.ones(2),
        np.ones(2),
        [1e-3],
    ):
        with pytest.raises(TypeError, match="damping"):
            check_damping(bad)
    for bad in (float("nan"), float("inf"), np.float64("-inf"), torch.tensor(float("nan"))):
        with pytest.raises(ValueError, match="damping"):
            check_damping(bad)
    with pytest.raises(TypeError, match="damping"):
        H.solve(g, damping=True)
    with pytest.raises(TypeError, match="damping"):
        H.logdet(np.bool_(True))


# -- 9. right-hand sides -------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lifted", "dense", "minres", "auto"])
def test_empty_block_of_right_hand_sides(method):
    X, y = _data()
    H = hessinv.Hessian(_mlp(17, nn.Tanh()), nn.MSELoss(), X, y)
    empty = torch.zeros(H.num_params, 0, dtype=DT)
    x = H.solve(empty, damping=1e-2, method=method)
    assert x.shape == (H.num_params, 0) and x.dtype == DT
    assert H.factor(1e-2).solve(empty).shape == (H.num_params, 0)
    assert H.factor(1e-2, method="dense").solve(empty).shape == (H.num_params, 0)
    assert (H @ empty).shape == (H.num_params, 0)


def test_bad_right_hand_sides_named():
    """Regression guard (these already raised clear errors)."""
    X, y = _data()
    H = hessinv.Hessian(_mlp(18, nn.Tanh()), nn.MSELoss(), X, y)
    w = H.num_params
    v = torch.ones(w, dtype=DT)
    for bad, arg in ((float("nan"), "v"), (float("inf"), "g")):
        t = v.clone()
        t[3] = bad
        with pytest.raises(ValueError, match=rf"^{arg} contains NaN or Inf"):
            (H @ t) if arg == "v" else H.solve(t, damping=1e-2)
    with pytest.raises(ValueError, match=r"g has length"):
        H.solve(torch.ones(w + 1, dtype=DT), damping=1e-2)
    with pytest.raises(TypeError, match=r"v has dtype torch.float32"):
        H @ v.float()
    with pytest.raises(ValueError, match=r"g\[1\] has shape"):
        H.solve(
            [
                torch.ones(5, 4, dtype=DT),
                torch.ones(4, dtype=DT),
                torch.ones(1, 5, dtype=DT),
                torch.ones(1, dtype=DT),
            ],
            damping=1.0,
        )


# -- 10. errors inside a stage -------------------------------------------------------------------
def test_error_inside_a_stage_names_stage_and_module():
    X, y = _data(d_in=3)
    model = _mlp(19, nn.Tanh())
    with pytest.raises(
        ValueError,
        match=r"stage 0 \(Linear\(in_features=4, .*\)\) failed on input of shape \(8, 3\)",
    ) as info:
        hessinv.Hessian(model, nn.MSELoss(), X, y)
    assert isinstance(info.value.__cause__, RuntimeError)

    def bad(z, p):
        return F.linear(z, p[0]).sum()

    with pytest.raises(ValueError, match=r"stage 0 \(.*bad\) failed on input of shape \(8, 3\)"):
        hessinv.Hessian.from_stages([Stage(bad, (torch.ones(1, 4, dtype=DT),))], X)


def test_tensor_shared_between_stages_refused():
    X, _ = _data()
    w = torch.randn(4, 4, dtype=DT)
    v = torch.randn(1, 4, dtype=DT)
    stages = [
        Stage(lambda z, p: torch.tanh(z @ p[0].T), (w,)),
        Stage(lambda z, p: torch.tanh(z @ p[0].T), (w,)),
        Stage(lambda z, p: ((z @ p[0].T) ** 2).sum(), (v,)),
    ]
    with pytest.raises(
        ValueError, match=r"stages\[1\]\.params\[0\] shares memory with stages\[0\]"
    ):
        hessinv.Hessian.from_stages(stages, X)


def test_stale_after_frozen_weights_or_running_statistics_change():
    X, y = _data()
    torch.manual_seed(20)
    model = nn.Sequential(
        nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1)
    ).double()
    model[3].requires_grad_(False)  # a frozen layer: a constant of H
    model.eval()
    H = hessinv.Hessian(model, nn.MSELoss(), X, y)
    H.gradient()
    model.train()
    model(X)  # a training-mode forward updates the running statistics
    model.eval()
    with pytest.raises(hessinv.StaleOperatorError, match=r"^1\.running_mean changed"):
        H.gradient()
    H = hessinv.Hessian(model, nn.MSELoss(), X, y)
    with torch.no_grad():
        model[3].weight.mul_(2)
    with pytest.raises(hessinv.StaleOperatorError, match=r"^3\.weight changed"):
        H @ torch.ones(H.num_params, dtype=DT)


def test_non_finite_parameter_is_named():
    X, y = _data()
    model = _mlp(18, nn.Tanh())
    with torch.no_grad():
        model[2].weight[0, 1] = float("inf")
    with pytest.raises(ValueError, match=r"^parameter 0 of stage 1 \(Linear.*contains NaN or Inf"):
        hessinv.Hessian(model, nn.MSELoss(), X, y)
