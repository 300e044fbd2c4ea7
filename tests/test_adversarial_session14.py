"""Adversarial review (adv21) of the fourteenth session's speed work.

Attacked: the fast parameter walk (``module_params.model_parameters``), the
registry-first owner check and the integer-bit comparison of
``staleness.ParameterSnapshot``, and the skipped mixing probe of torch's
per-sample losses (``validate._per_sample_loss``), against independent dense
references (``torch.func.hessian`` of the loss in the flat parameters).

Defects found (each test below failed before its fix):

* a ``named_parameters`` override (another order) was no longer read: the
  refusal of a ``model.parameters()`` order that differs from the order of use
  turned into a silent answer in the other order;
* a parameter shadowed by an instance attribute (``m.__dict__``) or by a
  class attribute (a class swapped for a subclass with a property) went
  unnoticed (the registries were read instead of the attribute forward reads);
* a changed complex128 tensor (16-byte elements, compared as bytes) was not
  located in the flat copy and the check returned "unchanged";
* (older than the fourteenth session) the traced path watched only its
  stages' detached trainable tensors: a buffer or frozen parameter changed in
  place or replaced, or ``p.data = other``, left ``H`` 30-70% off, no error.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from cases import dense_hessian, reference_error, rel
from torch import nn

import hessinv
import hessinv.mixing as val
from hessinv.module_params import all_buffers, all_parameters, model_parameters
from hessinv.staleness import ParameterSnapshot, ParameterSource

DT = torch.float64


def _data(n: int = 6, d: int = 3, k: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g, dtype=DT), torch.randn(n, k, generator=g, dtype=DT)


def _chain() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)


def _hv_matches_dense(model: nn.Module, loss, X, y) -> None:  # noqa: ANN001
    H = hessinv.Hessian(model, loss, X, y, progress=False)
    ref = dense_hessian(model, loss, X, y)
    v = torch.randn(H.num_params, dtype=DT, generator=torch.Generator().manual_seed(1))
    tol = max(64 * torch.finfo(DT).eps, 64 * reference_error(ref))
    assert rel(H @ v, ref @ v) <= tol


# -- the parameter walk ----------------------------------------------------------------------
class Reversed(nn.Sequential):
    """``named_parameters`` (hence ``parameters()``) in reverse order."""

    def named_parameters(self, prefix="", recurse=True, remove_duplicate=True):  # noqa: ANN001, ANN201
        return reversed(list(super().named_parameters(prefix, recurse, remove_duplicate)))


class Skipping(nn.Sequential):
    """``named_modules`` that leaves out its first child."""

    def named_modules(self, memo=None, prefix="", remove_duplicate=True):  # noqa: ANN001, ANN201
        for name, m in super().named_modules(memo, prefix, remove_duplicate):
            if not name.endswith("0"):
                yield name, m


class ByValue(nn.Linear):
    """Modules equal (and hashed) by their shapes: torch's memo merges equal ones."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByValue) and other.weight.shape == self.weight.shape

    def __hash__(self) -> int:
        return hash(tuple(self.weight.shape))


def _models() -> list[nn.Module]:
    return [
        Reversed(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)),
        nn.Sequential(nn.Linear(2, 2), Skipping(nn.Linear(2, 3), nn.Linear(3, 3))),
        nn.Sequential(ByValue(2, 2), nn.Tanh(), ByValue(2, 2)),
    ]


@pytest.mark.parametrize("remove_duplicate", [True, False])
@pytest.mark.parametrize("i", range(3), ids=["named_parameters", "named_modules", "hash"])
def test_walk_is_torchs_with_overridden_walks(i, remove_duplicate):
    model = _models()[i]
    ours = model_parameters(model, remove_duplicate=remove_duplicate)
    torchs = list(model.named_parameters(remove_duplicate=remove_duplicate))
    assert [(n, id(p)) for n, p in ours] == [(n, id(p)) for n, p in torchs]
    for m in model.modules():
        assert [id(p) for _, p in all_parameters(m)] == [id(p) for p in m.parameters()]
        assert [id(b) for _, b in all_buffers(m)] == [id(b) for b in m.buffers()]


def test_parameters_order_override_is_refused():
    """A user's vector in ``model.parameters()`` order would be read in the order of use."""
    X, y = _data()
    model = _models()[0].to(DT)
    with pytest.raises(ValueError, match=r"another order than model.parameters\(\)"):
        hessinv.Hessian(model, nn.MSELoss(), X, y, progress=False)


# -- staleness -------------------------------------------------------------------------------
def _stale_after(model: nn.Module, change, X=None, y=None) -> None:  # noqa: ANN001
    if X is None:
        X, y = _data()
    H = hessinv.Hessian(model, nn.MSELoss(), X, y, progress=False)
    v = torch.ones(H.num_params, dtype=DT)
    H @ v
    change(model)
    with pytest.raises(hessinv.StaleOperatorError):
        H @ v


def _shadow(m: nn.Module) -> None:
    m[2].__dict__["weight"] = m[2].weight.detach() * 2  # forward reads this one now


def _class_property(m: nn.Module) -> None:
    class Doubled(nn.Linear):
        @property
        def bias(self) -> torch.Tensor:  # type: ignore[override]
            return 2 * self._parameters["bias"]

    m[2].__class__ = Doubled


@pytest.mark.parametrize("change", [_shadow, _class_property], ids=["instance", "class"])
def test_shadowed_parameter_is_stale(change):
    _stale_after(_chain(), change)


def test_changed_complex128_tensor_is_located():
    """16-byte elements are compared as bytes: the located range must be in bytes too."""
    t = torch.zeros(4, dtype=torch.complex128)
    u = torch.zeros(3, dtype=torch.complex128)
    snap = ParameterSnapshot([ParameterSource("t", t), ParameterSource("u", u)])
    assert snap.changed() is None
    u[2] = 1j  # the last bytes of the flat copy
    assert snap.changed() == "u"


def test_changed_complex128_buffer_is_stale():
    model = _chain()
    model[2].register_buffer("phase", torch.zeros(3, dtype=torch.complex128))
    _stale_after(model, lambda m: m[2].phase[-1].fill_(1j))


class Traced(nn.Module):
    """A non-Sequential model (the traced path) with a buffer and a frozen layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(3, 4)
        self.f = nn.Linear(4, 4).requires_grad_(False)
        self.b = nn.Linear(4, 2)
        self.register_buffer("s", torch.linspace(0.5, 1.5, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.f(self.a(x))) * self.s)


def _traced_changes() -> dict[str, object]:
    return {
        "buffer in place": lambda m: m.s.mul_(2),
        "buffer replaced": lambda m: setattr(m, "s", 2 * m.s),
        "frozen in place": lambda m: m.f.weight.data.mul_(2),
        "frozen .data": lambda m: setattr(m.f.weight, "data", 2 * m.f.weight.data),
        "trainable .data": lambda m: setattr(m.a.weight, "data", 2 * m.a.weight.data),
    }


@pytest.mark.parametrize("what", list(_traced_changes()))
def test_traced_constants_are_watched(what):
    X, y = _data()
    model = Traced().to(DT)
    _hv_matches_dense(model, nn.MSELoss(), X, y)  # (the traced operator is exact before)
    _stale_after(model, _traced_changes()[what], X, y)


def _flip_last_bit(t: torch.Tensor) -> None:
    with torch.no_grad():
        bits = t.view(torch.int64 if t.element_size() == 8 else torch.int32)  # (any strides)
        bits[(-1,) * t.dim()] ^= 1


def _guard_changes() -> dict[str, tuple[object, object]]:
    """Changes that must be stale (guards: all raised before and after the fixes)."""
    plain = _chain

    def nan_model() -> nn.Module:  # (a NaN parameter is refused at build; a buffer is not)
        m = _chain()
        m[2].register_buffer("nan", torch.full((2,), float("nan"), dtype=DT))
        return m

    def single() -> nn.Module:  # one tensor: the flattening returns a view of it
        torch.manual_seed(0)
        return nn.Linear(3, 2, bias=False).to(DT)

    def strided() -> nn.Module:
        m = _chain()
        m[0].weight = nn.Parameter(torch.randn(3, 4, dtype=DT).t())  # not contiguous
        return m

    def batchnorm() -> nn.Module:
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
        return m.to(DT).eval()

    def flags() -> nn.Module:
        m = _chain()
        m[0].register_buffer("on", torch.tensor([True, False]))
        m[0].register_buffer("none", torch.zeros(0, dtype=DT))
        return m

    def replace_by_plain(m: nn.Module) -> None:
        w = m[2].weight.detach().clone()
        del m[2].weight
        m[2].weight = w

    def other_nan(m: nn.Module) -> None:
        with torch.no_grad():
            m[2].nan.view(torch.int64)[1] ^= 1  # another NaN payload

    return {
        "one bit": (plain, lambda m: _flip_last_bit(m[2].bias)),
        "-0.0": (plain, lambda m: m[2].bias.data.__setitem__(0, -0.0) or None),
        "nan payload": (nan_model, other_nan),
        "single tensor": (single, lambda m: _flip_last_bit(m.weight)),
        "non-contiguous": (strided, lambda m: _flip_last_bit(m[0].weight)),
        "bool buffer": (flags, lambda m: m[0].on.logical_not_()),
        "running mean": (batchnorm, lambda m: m[1].running_mean.add_(1e-300)),
        "int buffer": (batchnorm, lambda m: m[1].num_batches_tracked.add_(1)),
        "new buffer": (batchnorm, lambda m: setattr(m[1], "running_var", 1 * m[1].running_var)),
        ".data other shape": (plain, lambda m: setattr(m[2].bias, "data", m[2].bias.data[None])),
        ".data other dtype": (plain, lambda m: setattr(m[2].bias, "data", m[2].bias.data.float())),
        "plain attribute": (plain, replace_by_plain),
        "module replaced": (plain, lambda m: m.__setitem__(1, nn.Tanh())),
    }


@pytest.mark.parametrize("what", list(_guard_changes()))
def test_changes_are_stale(what):
    make, change = _guard_changes()[what]
    model = make()
    if what == "-0.0":
        model[2].bias.data[0] = 0.0
    _stale_after(model, change)


def test_float32_one_bit_is_stale():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    X, y = _data()
    H = hessinv.Hessian(model, nn.MSELoss(), X.float(), y.float(), progress=False)
    v = torch.ones(H.num_params)
    H @ v
    _flip_last_bit(model[0].weight)
    with pytest.raises(hessinv.StaleOperatorError, match="0.weight"):
        H @ v


# -- the loss stage without a mixing probe ---------------------------------------------------
def _losses() -> dict[str, tuple[nn.Module, object, int, tuple[int, ...]]]:
    """(loss, target maker, out width, input shape after N) that skip the probe."""
    g = torch.Generator().manual_seed(2)
    w = torch.rand(4, generator=g, dtype=DT) + 0.1
    n = 6

    def classes(shape: tuple[int, ...] = (n,), k: int = 4) -> torch.Tensor:
        t = torch.randint(0, k, shape, generator=g)
        t[1] = 1
        return t

    def probs(*shape: int) -> torch.Tensor:
        return torch.softmax(torch.randn(n, *shape, generator=g, dtype=DT), 1)

    def bits(*shape: int) -> torch.Tensor:
        return torch.rand(n, *shape, generator=g, dtype=DT)

    ce = nn.CrossEntropyLoss
    return {
        "CE weight smoothing": (ce(weight=w, label_smoothing=0.3), classes, 4, (3,)),
        "CE ignore_index": (ce(ignore_index=1), classes, 4, (3,)),
        "CE probs weight": (ce(weight=w, label_smoothing=0.1), lambda: probs(4), 4, (3,)),
        "CE probs 3-D": (nn.CrossEntropyLoss(), lambda: probs(5, 4), 4, (5, 3)),
        "NLL raw sum": (nn.NLLLoss(weight=w, reduction="sum"), classes, 4, (3,)),
        "BCE pos_weight": (nn.BCEWithLogitsLoss(pos_weight=w), lambda: bits(4), 4, (3,)),
        "BCE weight N x C": (
            nn.BCEWithLogitsLoss(weight=torch.rand(n, 4, generator=g, dtype=DT)),
            lambda: bits(4),
            4,
            (3,),
        ),
        "MSE 3-D": (nn.MSELoss(reduction="sum"), lambda: bits(5, 4), 4, (5, 3)),
    }


@pytest.mark.parametrize("what", list(_losses()))
def test_unprobed_losses_are_exact(monkeypatch, what):
    loss, target, k, shape = _losses()[what]
    calls: list[bool] = []
    orig = val._leak
    monkeypatch.setattr(val, "_leak", lambda *a: calls.append(a[2]) or orig(*a))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, k)).to(DT)
    X = torch.randn(6, *shape, dtype=DT, generator=torch.Generator().manual_seed(3))
    _hv_matches_dense(model, loss, X, target())
    assert calls == []  # (the skip was taken: this guards the skip, not the probe)


def test_broadcast_and_wrong_dtype_targets_are_probed(monkeypatch):
    calls: list[bool] = []
    orig = val._leak
    monkeypatch.setattr(val, "_leak", lambda *a: calls.append(a[2]) or orig(*a))
    X, y = _data()
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).to(DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        _hv_matches_dense(model, nn.MSELoss(), X, y[:, 0])  # (N, 1) against (N,)
    assert calls == [True]
    classes = torch.tensor([0, 1, 2, 3, 0, 1])
    assert not val._per_sample_loss(nn.CrossEntropyLoss(), classes.double(), (6, 4))
    assert not val._per_sample_loss(nn.CrossEntropyLoss(), classes, (6, 3, 4))
    assert not val._per_sample_loss(nn.CrossEntropyLoss(reduction="none"), classes, (6, 4))


# -- the loss after build --------------------------------------------------------------------
def _loss_changes() -> dict[str, object]:
    return {
        "reduction": lambda f: setattr(f, "reduction", "sum"),
        "label_smoothing": lambda f: setattr(f, "label_smoothing", 0.2),
        "ignore_index": lambda f: setattr(f, "ignore_index", 0),
        "weight in place": lambda f: f.weight[0].mul_(7),
        "weight replaced": lambda f: setattr(f, "weight", 1 * f.weight),
    }


@pytest.mark.parametrize("kind", [hessinv.Hessian, hessinv.GaussNewton], ids=["H", "GGN"])
@pytest.mark.parametrize("what", list(_loss_changes()))
def test_changed_loss_is_stale(what, kind):
    """(Older than session 14) ``H`` answered for the loss as built: 36-96% off, no error."""
    X, _ = _data()
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).to(DT)
    loss = nn.CrossEntropyLoss(weight=torch.linspace(0.5, 2.0, 4, dtype=DT))
    H = kind(model, loss, X, y, progress=False)
    v = torch.ones(H.num_params, dtype=DT)
    _loss_changes()[what](loss)
    with pytest.raises(hessinv.StaleOperatorError, match="the loss"):
        H @ v


class CountingMSE(nn.Module):
    """A user's loss module with state of its own (not an option of the loss)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return ((out - target) ** 2).sum()


def test_user_loss_state_is_not_an_option():
    X, y = _data()
    loss = CountingMSE()
    model = _chain()
    H = hessinv.Hessian(model, loss, X, y, progress=False)
    v = torch.ones(H.num_params, dtype=DT)
    loss(model(X), y)
    ref = dense_hessian(model, loss, X, y)
    assert rel(H @ v, ref @ v) <= 64 * max(torch.finfo(DT).eps, reference_error(ref))


@pytest.mark.parametrize("which", ["X", "y"])
def test_data_changed_in_place_after_build_is_refused(which):
    """Left by adv21: X or y refilled in place (a reused batch buffer) made H 48 % off, silently."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    H = hessinv.Hessian(model, nn.MSELoss(), X, y)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    H @ v  # fresh: fine
    (X if which == "X" else y).mul_(1.5)
    with pytest.raises(hessinv.StaleOperatorError, match=f"^{which} changed"):
        H @ v


def test_z0_changed_in_place_after_from_stages_is_refused():
    torch.manual_seed(0)
    w = torch.randn(2, 3, dtype=torch.float64)
    z0 = torch.randn(4, 3, dtype=torch.float64)
    stages = [
        hessinv.Stage(lambda z, p: torch.tanh(z @ p[0].T), (w,)),
        hessinv.Stage(lambda z, p: ((z * p[0]) ** 2).sum(), (torch.ones(2, dtype=torch.float64),)),
    ]
    H = hessinv.Hessian.from_stages(stages, z0)
    z0[0, 0] += 1.0
    with pytest.raises(hessinv.StaleOperatorError, match="^z0 changed"):
        H.gradient()
