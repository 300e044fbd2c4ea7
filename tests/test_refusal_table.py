"""Every row of the README's "What is refused, and why" table raises the error it names.

The table is parsed from README.md; each row's first cell is the key of a case
below, so a row without a case (or a case without a row) fails, and each case
must raise an exception of one of the classes named in the row's error cell.
"""

from __future__ import annotations

import builtins
import importlib
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.nn.utils import parametrize

import hessinv

ROOT = Path(__file__).resolve().parents[1]
DT = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small matrices: one thread (several threads on a loaded machine cost 50x here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def table_rows() -> list[tuple[str, str]]:
    """``(what, error cell)`` of each row of the README's refusal table."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### What is refused, and why", 1)[1]
    rows = []
    for line in section.splitlines():
        if line.startswith("## ") or line.startswith("### "):
            break
        if line.startswith("| ") and not line.startswith("| what |"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            rows.append((cells[0], cells[1]))
    return rows


def _data(n: int = 6, d: int = 3, k: int = 2, dtype: torch.dtype = DT):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, k, generator=g, dtype=dtype)


def _mlp(*mid: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), *mid, nn.Linear(4, 2)).double()


class _Lambda(nn.Module):
    """``forward(x) = f(self, x)`` with layers ``a: 3 -> 4``, ``m: 4 -> 4``, ``b: 4 -> 2``."""

    def __init__(self, f) -> None:  # noqa: ANN001
        super().__init__()
        torch.manual_seed(0)
        self.a, self.m, self.b = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.f = f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(self, x)


def _hessian(model: nn.Module, loss=None, X=None, y=None, **kw):  # noqa: ANN001, ANN003
    X0, y0 = _data()
    return hessinv.Hessian(
        model.double(), loss or nn.MSELoss(), X0 if X is None else X, y0 if y is None else y, **kw
    )


def _batchnorm_train():
    _hessian(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train())


def _dropout_train():
    _hessian(_mlp(nn.Dropout(0.5)).train())


def _mixing():
    def center(s, x):  # noqa: ANN001, ANN202
        h = torch.tanh(s.m(torch.tanh(s.a(x))))
        return s.b(h - h.mean(0))

    with pytest.raises(ValueError, match="stage 1 .*mixes samples"):
        _hessian(_Lambda(center))

    def attention(s, x):  # noqa: ANN001, ANN202
        h = torch.tanh(s.m(torch.tanh(s.a(x))))
        return s.b(torch.softmax(h @ h.T, dim=-1) @ h)

    with pytest.raises(ValueError, match="mixes samples"):
        _hessian(_Lambda(attention))
    _hessian(_mlp(nn.Softmax(dim=0)))


def _instance_norm():
    with pytest.raises(ValueError, match="InstanceNorm1d"):
        _hessian(
            nn.Sequential(
                nn.Unflatten(1, (1, 3)),
                nn.Conv1d(1, 2, 2),
                nn.InstanceNorm1d(2),
                nn.Flatten(),
                nn.Linear(4, 2),
            )
        )
    _hessian(_Lambda(lambda s, x: s.b(F.instance_norm(s.a(x).unsqueeze(1)).squeeze(1))))


class _RNN(nn.Module):
    def __init__(self, cell: type) -> None:
        super().__init__()
        self.r, self.b = cell(3, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.r(x.unsqueeze(1))[0][:, -1])


def _recurrent():
    for cell in (nn.LSTM, nn.GRU):
        with pytest.raises(ValueError, match=f"{cell.__name__} is recurrent"):
            _hessian(_RNN(cell))
    _hessian(_RNN(nn.RNN))


def _embedding_max_norm():
    model = nn.Sequential(nn.Embedding(5, 3, max_norm=1.0), nn.Flatten(), nn.Linear(3, 2))
    _hessian(model, X=torch.randint(0, 5, (6, 1)))


def _tied():
    model = _mlp(nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    model[4].weight = model[2].weight
    _hessian(model)


def _parametrize_or_hook():
    class Triu(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w.triu()

    model = _mlp(nn.Tanh())
    parametrize.register_parametrization(model[0], "weight", Triu())
    with pytest.raises(ValueError, match="parametriz"):
        _hessian(model)
    model = _mlp(nn.Tanh())
    model.register_forward_pre_hook(lambda mod, i: (2 * i[0],))  # on the container
    with pytest.raises(ValueError, match="the model .*_forward_pre_hooks"):
        _hessian(model)
    model = _mlp(nn.Tanh())
    model[0].register_forward_hook(lambda mod, i, o: 2 * o)
    _hessian(model)


def _patched_class_or_global_hook():
    plain = nn.Tanh.forward
    nn.Tanh.forward = lambda self, x: 2 * torch.tanh(x)
    try:
        with pytest.raises(ValueError, match=r"Tanh\.forward is not torch's own"):
            _hessian(_mlp(nn.Tanh()))
    finally:
        nn.Tanh.forward = plain
    _hessian(_mlp(nn.Tanh()))  # fine again once restored
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: o)
    try:
        _hessian(_mlp(nn.Tanh()))  # the row's error
    finally:
        handle.remove()


def _instance_forward():
    model = _mlp(nn.Tanh())
    plain = model[0].forward
    model[0].forward = lambda x: 2 * plain(x)  # used to be ignored without a word
    with pytest.raises(ValueError, match="forward assigned on the object"):
        _hessian(model)
    _hessian(model)


def _dtypes():
    X, y = _data()
    for dt in (torch.float16, torch.bfloat16):
        with pytest.raises(TypeError, match="float32 and float64"):
            hessinv.Hessian(_mlp(nn.Tanh()).to(dt), nn.MSELoss(), X.to(dt), y.to(dt))
    hessinv.Hessian(_mlp(nn.Tanh()), nn.MSELoss(), X.to(torch.complex128), y)


def _inference_parameters():
    X, y = _data()
    with torch.inference_mode():
        model = _mlp(nn.Tanh())
    with pytest.raises(ValueError, match=r"parameter '0\.weight' is an inference tensor"):
        hessinv.Hessian(model, nn.MSELoss(), X, y)
    with torch.inference_mode():  # also when built inside the mode
        hessinv.Hessian(model, nn.MSELoss(), X, y)


def _x_not_tensor():
    X, y = _data()
    with pytest.raises(TypeError):
        hessinv.Hessian(_mlp(nn.Tanh()), nn.MSELoss(), X.numpy(), y)
    hessinv.Hessian(_mlp(nn.Tanh()), nn.MSELoss(), {"x": X}, y)


def _untraceable():
    def branch(s, x):  # noqa: ANN001, ANN202
        h = s.a(x)
        if h.sum() > 0:
            h = torch.tanh(h)
        return s.b(h)

    with pytest.raises(ValueError, match=r"torch.fx could not trace module .*Lambda") as info:
        _hessian(_Lambda(branch))
    raise info.value


def _inputs_outputs():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            return self.a(x) + z

    with pytest.raises(ValueError, match="takes 2 inputs"):
        _hessian(Two())
    _hessian(_Lambda(lambda s, x: (s.b(s.a(x)), x)))


def _order_without_params():
    class Reversed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.b, self.a = nn.Linear(4, 2), nn.Linear(3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.tanh(self.a(x)))

    with pytest.raises(ValueError, match=r"pass params= in the order \['a.weight', 'a.bias'") as e:
        _hessian(Reversed())
    raise e.value


def _interleaved_params():
    model = _mlp(nn.Tanh())
    with pytest.raises(ValueError, match=r"pass params= in the order \['0.weight', '0.bias'") as e:
        _hessian(model, params=[model[0].weight, model[2].weight, model[0].bias])
    raise e.value


def _foreign_params():
    with pytest.raises(ValueError, match="is not a parameter of the model"):
        _hessian(_mlp(nn.Tanh()), params=[nn.Parameter(torch.ones(2, dtype=DT))])
    model = _Lambda(lambda s, x: s.b(torch.tanh(s.a(x))))  # s.m unused
    _hessian(model)


def _reduction_none():
    _hessian(_mlp(nn.Tanh()), loss=nn.MSELoss(reduction="none"))


def _error_in_forward():
    X, y = _data(d=5)
    with pytest.raises(ValueError, match=r"stage 0 .*failed on input of shape \(6, 5\)"):
        hessinv.Hessian(_mlp(nn.Tanh()), nn.MSELoss(), X, y)
    traced = _Lambda(lambda s, x: s.b(torch.tanh(s.a(x)))).double()
    traced.m.requires_grad_(False)
    with pytest.raises(ValueError, match=r"_Lambda.forward failed on input of shape \(6, 5\)"):
        hessinv.Hessian(traced, nn.MSELoss(), X, y)
    X, y = _data()
    with pytest.raises(ValueError, match=r"_Lambda.forward failed .* dtype torch.float64"):
        hessinv.Hessian(traced.float(), nn.MSELoss(), X, y)
    hessinv.Hessian(_mlp(nn.Tanh()).float(), nn.MSELoss(), X, y)


def _random_forward():
    X, y = _data()
    # the same forward in eval mode (dropout off) is accepted
    ok = _Lambda(lambda s, x: s.b(F.dropout(torch.tanh(s.a(x)), 0.5, training=s.training)))
    ok.m.requires_grad_(False)
    hessinv.Hessian(ok.double().eval(), nn.MSELoss(), X, y)
    models = []
    for f in (
        lambda s, x: s.b(F.dropout(torch.tanh(s.a(x)), 0.5, training=True)),
        lambda s, x: s.b(torch.tanh(s.a(x)) + 0.1 * torch.randn_like(s.a(x))),
        # drawn once at trace time from constants: the trace differs from the model
        lambda s, x: s.b(torch.tanh(s.a(x)) * torch.ones(4, dtype=DT).bernoulli(0.5)),
    ):
        models.append(_Lambda(f).double())
        models[-1].m.requires_grad_(False)  # the layer these forwards do not use
    for model in models[:-1]:
        with pytest.raises(ValueError, match="forward is random"):
            hessinv.Hessian(model, nn.MSELoss(), X, y)
    hessinv.Hessian(models[-1], nn.MSELoss(), X, y)


def _stale():
    model = _mlp(nn.Tanh())
    H = _hessian(model)
    fac = H.factor(1e-3)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(hessinv.StaleOperatorError):
        fac.solve(torch.ones(H.num_params, dtype=DT))
    model = _mlp(nn.Tanh())
    H2 = _hessian(model)
    model.append(nn.Tanh())  # a module added: another network, same weights
    with pytest.raises(hessinv.StaleOperatorError, match="submodules were added"):
        H2 @ torch.ones(H2.num_params, dtype=DT)
    X, y = _data()
    loss = nn.MSELoss()
    H3 = hessinv.Hessian(_mlp(nn.Tanh()), loss, X, y)
    X[0, 0] += 1.0  # the data refilled in place
    with pytest.raises(hessinv.StaleOperatorError, match="^X changed"):
        H3.gradient()
    X, y = _data()
    H4 = hessinv.Hessian(_mlp(nn.Tanh()), loss, X, y)
    loss.reduction = "sum"  # the loss's options
    with pytest.raises(hessinv.StaleOperatorError, match="the loss's options"):
        H4.gradient()
    model = _mlp(nn.LeakyReLU(0.1))
    H5 = _hessian(model)
    model[1].negative_slope = 0.3  # another function, the same weights
    with pytest.raises(hessinv.StaleOperatorError, match="option negative_slope"):
        H5 @ torch.ones(H5.num_params, dtype=DT)
    model = _mlp(nn.Tanh())
    H6 = _hessian(model)
    model[1].register_forward_hook(lambda m, i, o: 2 * o)  # another function, the same weights
    with pytest.raises(hessinv.StaleOperatorError, match="a hook or a forward"):
        H6 @ torch.ones(H6.num_params, dtype=DT)
    H @ torch.ones(H.num_params, dtype=DT)


def _compiled():
    model = _mlp(nn.Tanh())
    _hessian(model)  # the module itself is fine
    with pytest.raises(ValueError, match=r"torch\.jit .*Pass the module before scripting"):
        _hessian(torch.jit.script(model))
    _hessian(torch.jit.trace(model, _data()[0]))


def _singular():
    X, y = _data(n=1)
    H = hessinv.Hessian(_mlp(nn.Tanh()), nn.MSELoss(), X, y)
    assert H.logdet(0.0)[1] == float("-inf") and H.inertia(0.0)[2] > 0
    H.solve(H.gradient())


def _lifted_precision():
    # width 16, depth 12, ReLU, weight gain 3: activations grow ~30x per layer; the dense
    # route answers (logdet and solve), the lifted system's LU and congruences disagree
    torch.manual_seed(27)
    mods: list[nn.Module] = []
    for _ in range(11):
        lin = nn.Linear(16, 16)
        nn.init.normal_(lin.weight, std=3.0 / 16**0.5)
        nn.init.normal_(lin.bias, std=0.1)
        mods += [lin, nn.ReLU()]
    model = nn.Sequential(*mods, nn.Linear(16, 1)).double()
    X, y = torch.randn(2, 16, dtype=DT), torch.randn(2, 1, dtype=DT)
    H = hessinv.Hessian(model, nn.MSELoss(), X, y)
    H.logdet(0.01, method="lifted")


def _memory():
    _hessian(_mlp(nn.Tanh()), max_memory=1000)


def _overflow():
    X, y = _data(dtype=torch.float32)
    model = _mlp(nn.Tanh()).float()
    H = hessinv.Hessian(model, lambda o, t: 1e36 * ((o - t) ** 2).sum(), X, y)
    H @ (1e3 * torch.ones(H.num_params))


def _kernel_not_psd():
    X, y = _data()
    G = hessinv.GaussNewton(_mlp(nn.Tanh()), lambda o, t: (o**3).sum(), X, y)
    G.solve(G.gradient(), damping=1e-3, method="kernel")


def _woodbury():
    H = _hessian(_mlp(nn.Tanh()))
    H.solve(H.gradient(), damping=1e-3, method="woodbury")


def _damping():
    H = _hessian(_mlp(nn.Tanh()))
    g = H.gradient()
    for bad, exc in [(float("nan"), ValueError), (float("inf"), ValueError), (True, TypeError)]:
        with pytest.raises(exc, match="damping"):
            H.solve(g, damping=bad)
    H.solve(g, damping=1j)


CASES = {
    "BatchNorm in training mode": _batchnorm_train,
    "Dropout module in training mode": _dropout_train,
    "a random operation in a traced `forward` (`F.dropout(x, p, training=True)`, "
    "`torch.randn_like`, `bernoulli`): two calls on the same input differ": _random_forward,
    "an operation that mixes samples (softmax or LayerNorm over the batch, `h - h.mean(0)`, "
    "attention across the batch, BatchNorm without running statistics, a loss of batch sums), "
    "in any stage of an `nn.Sequential` or after the first stage of a traced model": _mixing,
    "InstanceNorm, `F.instance_norm`": _instance_norm,
    "recurrent modules (RNN, LSTM, GRU and their cells)": _recurrent,
    "Embedding with `max_norm`": _embedding_max_norm,
    "tied weights (one parameter registered under two names)": _tied,
    "parametrizations or hooks in a model that is a plain `nn.Sequential` (on a module, on "
    "the model itself or on a nested container)": _parametrize_or_hook,
    "a `forward` assigned on a torch module object or on the model itself (`m.forward = ...`; "
    "on a module of your own class it is traced and fine)": _instance_forward,
    "a torch module class with a patched or overridden `forward`, `__call__` or `_call_impl` "
    "(`nn.Tanh.forward = ...`), or torch's global module hooks "
    "(`register_module_forward_hook`)": _patched_class_or_global_hook,
    "parameters created inside `torch.inference_mode()` (inference tensors)": (
        _inference_parameters
    ),
    "float16, bfloat16 or complex parameters, `X` or `y`": _dtypes,
    "`X` that is not a tensor (a dict, a list)": _x_not_tensor,
    "a `forward` torch.fx cannot trace (data-dependent control flow, ...)": _untraceable,
    "a `forward` with several inputs, or returning a tuple": _inputs_outputs,
    "`forward` uses the parameters in another order than `model.parameters()`, no `params=`": (
        _order_without_params
    ),
    "`params=` in an order that interleaves stages": _interleaved_params,
    "`params=` holding a tensor that is not a parameter of the model, or one the output does "
    "not depend on": _foreign_params,
    'a loss with `reduction="none"`': _reduction_none,
    "an error inside the `forward` of an `nn.Sequential` or a traced model (e.g. `X` of the "
    "wrong width, or of another dtype than the parameters)": _error_in_forward,
    "weights or buffers changed after the operator was built (optimizer step, `p.data.copy_`, "
    "in-place edits), a submodule replaced, added or removed, `X` / `y` (or `z0`) changed in "
    "place, or the loss module's weights or options (`reduction`, `label_smoothing`, ...) "
    "changed, an option of a torch module set anew (`negative_slope`, `alpha`, `eps`, ...) or "
    "a BatchNorm or Dropout switched between `train()` and `eval()`, a module's class swapped, "
    "or a hook or `forward` set on a module (or torch's global module hooks)": _stale,
    "a `torch.jit` (scripted or traced) or `torch.compile` wrapper": _compiled,
    "`H + damping I` singular (e.g. a small batch, `damping=0`)": _singular,
    '`method="lifted"` where the lifted system is far worse conditioned than `H + dI` '
    "(exploding activations)": _lifted_precision,
    "a computation that would not fit in memory": _memory,
    "a float32 product that overflows": _overflow,
    '`GaussNewton(...).solve(method="kernel")` with a loss whose Hessian in the outputs is not '
    "PSD": _kernel_not_psd,
    '`method="woodbury"` outside the paper\'s Section 6 assumptions (damping, square blocks, '
    "...)": _woodbury,
    "`damping` that is not a finite real scalar (NaN, inf, `bool`, complex, an array)": _damping,
}


def _classes(cell: str) -> list[type]:
    """The exception classes a row's error cell names (``X`` in hessinv or builtins, or dotted)."""
    out = []
    for name in re.findall(r"`([\w.]+)`", cell):
        if name.startswith("hessinv."):
            target = importlib.import_module(name.rsplit(".", 1)[0])
            target = getattr(target, name.rsplit(".", 1)[1])
        else:
            target = getattr(hessinv, name, None) or getattr(builtins, name)
        assert isinstance(target, type) and issubclass(target, BaseException), name
        out.append(target)
    return out


def test_every_row_has_a_case_and_every_case_a_row():
    rows = [what for what, _ in table_rows()]
    assert len(rows) == len(set(rows)) >= 20
    assert set(rows) == set(CASES), set(rows) ^ set(CASES)


@pytest.mark.parametrize("what,error", table_rows(), ids=lambda s: s[:40])
def test_row_raises_its_error(what: str, error: str):
    classes = _classes(error)
    assert classes, error
    with pytest.raises(tuple(classes)) as info:
        CASES[what]()
    assert str(info.value), "the refusal must say why"


# -- the claims of "What is supported" that are not refusals -------------------------------
def _dense(model: nn.Module, loss, X, y) -> torch.Tensor:  # noqa: ANN001
    """``torch.func.hessian`` of the loss in the trainable parameters (an independent reference)."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    sizes = [p.numel() for p in named.values()]
    x0 = torch.cat([p.detach().reshape(-1) for p in named.values()])

    def f(flat: torch.Tensor) -> torch.Tensor:
        chunks = zip(named.items(), flat.split(sizes), strict=True)
        ps = {n: c.reshape(p.shape) for (n, p), c in chunks}
        return loss(torch.func.functional_call(model, ps, (X,)), y)

    return torch.func.hessian(f)(x0).detach()


class _Triu(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w.triu()


def _twice(s, x):  # noqa: ANN001, ANN202
    return s.b(s.m(torch.tanh(s.m(torch.tanh(s.a(x))))))


def _attention_first(s, x):  # noqa: ANN001, ANN202
    h = s.a(x)
    return s.b(torch.softmax(h @ h.T, dim=-1) @ h)


def _center_first(s, x):  # noqa: ANN001, ANN202
    h = torch.tanh(s.a(x))
    return s.b(h - h.mean(0))


def _parametrized() -> nn.Module:
    m = _Lambda(lambda s, x: s.b(torch.tanh(s.a(x)))).double()
    parametrize.register_parametrization(m.a, "weight", _Triu())
    return m


def _hooked() -> nn.Module:
    m = _Lambda(lambda s, x: s.b(torch.tanh(s.a(x)))).double()
    m.a.register_forward_hook(lambda mod, i, o: 2 * o)
    return m


@pytest.mark.parametrize(
    "make",
    [
        lambda: _Lambda(_twice).double(),
        lambda: _Lambda(_attention_first).double(),
        lambda: _Lambda(_center_first).double(),
        _parametrized,
        _hooked,
        lambda: _Lambda(lambda s, x: s.b(nn.functional.relu(s.a(x), inplace=True))).double(),
    ],
    ids=[
        "module-called-twice",
        "attention-in-first-stage",
        "centering-in-first-stage",
        "parametrized-child",
        "hooked-child",
        "inplace-relu",
    ],
)
def test_supported_claims_are_exact(make):
    """README "What is supported": each of these runs through hessinv.Hessian exactly."""
    model = make()
    if model.f is not _twice:
        model.m.requires_grad_(False)  # the layer the other forwards do not use: a constant
    X, y = _data()
    H = hessinv.Hessian(model, nn.MSELoss(), X, y)
    Href = _dense(model, nn.MSELoss(), X, y)
    err = float((H.to_dense() - Href).norm())
    assert err <= 100 * torch.finfo(DT).eps * float(Href.norm()), err


def test_one_module_on_two_branches():
    """One module applied to both halves of a tensor (curvlinops' SplitConcatModel): exact."""

    class SplitConcat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x1, x2 = x.split(3, dim=-1)
            return torch.cat([self.linear(x1), self.linear(x2)], dim=-1)

    X, y = _data(d=6, k=6)
    torch.manual_seed(0)
    model = SplitConcat().double()
    with pytest.warns(UserWarning, match="one stage"):
        H = hessinv.Hessian(model, nn.MSELoss(), X, y)
    Href = _dense(model, nn.MSELoss(), X, y)
    err = float((H.to_dense() - Href).norm())
    assert err <= 100 * torch.finfo(DT).eps * float(Href.norm()), err


def test_traced_forward_producing_nan_is_named():
    """A traced forward whose output is NaN (finite X): a ValueError naming NaN, not a raw
    error from the randomness check (which leaves NaN/Inf to the non-finite checks)."""

    class LogShift(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.log(self.a(x) - 100.0)

    X, y = _data()
    with pytest.raises(ValueError, match="NaN or Inf"):
        hessinv.Hessian(LogShift().double(), nn.MSELoss(), X, y)
