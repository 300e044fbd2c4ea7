"""Adversarial review (adv23) of the option watch in ``staleness.py`` (fifteenth session).

Contract: **exact, or a clear error**. After ``hessinv.Hessian(model, loss, X, y)`` a change
that alters the model's (or the loss's) function must make every product raise
:class:`hessinv.StaleOperatorError`; a change that leaves the function alone must not.
Where no error is raised, ``H @ v`` is compared in float64 with the independent dense
reference ``cases.dense_hessian`` (``torch.func.hessian`` of the loss in the flat
parameters); these small nets agree to ~1e-16 relative, so ``1e-12`` has four orders of margin.

Found by this review, silent before (``H @ v`` 7 % to 67 % off, no error), fixed in
``staleness.py``: a forward hook or pre-hook registered on a module after the build, a
``forward`` assigned on a module instance, a hook on the loss module, torch's global module
hooks (``register_module_forward_hook``), and a list-valued option changed in place
(``nn.Unflatten(1, [2, 3]).unflattened_size``) or a tensor option refilled in place
(``Softplus(beta=torch.tensor(2.0))``), and the options of a user's subclass of a torch
class that keeps torch's ``forward`` (``class MyLeaky(nn.LeakyReLU)``, a subclassed loss),
which were not watched at all. Spurious refusal fixed: an equal tuple set
anew (``conv.padding = (1,)``) was refused, tuples being compared by identity.

Left (strict ``xfail``): the attributes of a user's own module class, ``training`` included,
are not watched (by design: they may be state of its own, and ``model.eval()`` must not
refuse), so a traced model whose ``forward`` reads ``self.scale`` or ``self.training``
answers for the old value.
"""

from __future__ import annotations

import copy

import pytest
import torch
from cases import dense_hessian
from torch import nn

import hessinv
from hessinv import StaleOperatorError

DT = torch.float64
RTOL = 1e-12


def _data(n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, generator=g, dtype=DT), torch.randn(n, 2, generator=g, dtype=DT)


def _mlp(*mid: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), *(mid or (nn.Tanh(),)), nn.Linear(4, 2)).to(DT)


def _v(n: int) -> torch.Tensor:
    return torch.randn(n, dtype=DT, generator=torch.Generator().manual_seed(2))


def _exact_or_stale(model: nn.Module, loss: nn.Module, change, cls=hessinv.Hessian) -> None:  # noqa: ANN001
    """After ``change``, ``H @ v`` is the new model's (dense reference) or raises."""
    X, y = _data()
    H = cls(model, loss, X, y, progress=False)
    v = _v(H.num_params)
    H @ v
    change(model, loss)
    try:
        out = H @ v
    except StaleOperatorError:
        return
    ref = dense_hessian(model, loss, X, y) @ v
    rel = float((out - ref).norm() / ref.norm())
    assert rel <= RTOL, f"silent wrong answer: H @ v off by {rel:.2e} relative, no error"


def _hook(m: nn.Module, i: object, o: torch.Tensor) -> torch.Tensor:
    return 2 * o


class _Scaled(nn.Module):
    """A user's module whose ``forward`` reads a plain attribute and ``training``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.scale = nn.Linear(3, 4), nn.Linear(4, 2), 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale * (0.5 if self.training else 1.0)
        return self.b(torch.tanh(s * self.a(x)))


CHANGES = {
    "forward hook on a layer": lambda m, _: m[0].register_forward_hook(_hook),
    "forward pre-hook on an activation": lambda m, _: m[1].register_forward_pre_hook(
        lambda mod, i: (2 * i[0],)
    ),
    "forward assigned on an instance": lambda m, _: setattr(m[1], "forward", torch.sin),
    "hook on the loss": lambda _, loss: loss.register_forward_hook(lambda mod, i, o: 3 * o),
    "forward assigned on the loss": lambda _, loss: setattr(
        loss, "forward", lambda a, b: 3 * ((a - b) ** 2).mean()
    ),
}


@pytest.mark.parametrize("cls", [hessinv.Hessian, hessinv.GaussNewton])
@pytest.mark.parametrize("name", sorted(CHANGES))
def test_call_changes_after_build_refuse(cls: type, name: str) -> None:
    """Silent before this review (``H @ v`` 7-67 % off, GaussNewton unchanged), no error,
    except ``forward`` assigned on the loss, refused before as a loss option."""
    model, loss = _mlp(), nn.MSELoss()
    X, y = _data()
    H = cls(model, loss, X, y, progress=False)
    v = _v(H.num_params)
    H @ v
    CHANGES[name](model, loss)
    with pytest.raises(StaleOperatorError, match="hook or a forward|loss.s options"):
        H @ v


def test_call_change_is_a_new_function() -> None:
    """The hook really changes the Hessian (the refusal above is not spurious)."""
    model, loss = _mlp(), nn.MSELoss()
    X, y = _data()
    before = dense_hessian(model, loss, X, y)
    model[0].register_forward_hook(_hook)
    assert (dense_hessian(model, loss, X, y) - before).norm() > 0.1 * before.norm()


def test_global_hook_after_build_refuses() -> None:
    model, loss = _mlp(), nn.MSELoss()
    X, y = _data()
    H = hessinv.Hessian(model, loss, X, y, progress=False)
    v = _v(H.num_params)
    H @ v
    handle = nn.modules.module.register_module_forward_hook(
        lambda mod, i, o: 2 * o if isinstance(mod, nn.Tanh) else o
    )
    try:
        with pytest.raises(StaleOperatorError, match="global module hooks"):
            H @ v
    finally:
        handle.remove()
    assert torch.equal(H @ v, H @ v)  # removed again: the same function, not stale


def test_list_option_changed_in_place_refuses() -> None:
    """``Unflatten(1, [2, 3])`` keeps the list: reversing it in place left H 58 % off."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 6), nn.Unflatten(1, [2, 3]), nn.Softmax(dim=-1), nn.Flatten(), nn.Linear(6, 2)
    ).to(DT)
    _exact_or_stale(model, nn.MSELoss(), lambda m, _: m[1].unflattened_size.reverse())
    X, y = _data()
    H = hessinv.Hessian(model, nn.MSELoss(), X, y, progress=False)
    model[1].unflattened_size.reverse()
    with pytest.raises(StaleOperatorError, match="unflattened_size.*in place"):
        H @ _v(H.num_params)


class _MyLeaky(nn.LeakyReLU):
    """A user's subclass that keeps torch's forward: hessinv evaluates it as LeakyReLU."""


class _MyMSE(nn.MSELoss):
    pass


OPTION_CHANGES = {
    "subclass of LeakyReLU, slope": (
        lambda: _mlp(_MyLeaky(0.1)),
        nn.MSELoss,
        lambda m, _: setattr(m[1], "negative_slope", 0.5),
    ),
    "subclass of MSELoss, reduction": (
        _mlp,
        _MyMSE,
        lambda _, loss: setattr(loss, "reduction", "sum"),
    ),
    "tensor option refilled in place": (
        lambda: _mlp(nn.Softplus(beta=torch.tensor(2.0, dtype=DT))),
        nn.MSELoss,
        lambda m, _: m[1].beta.fill_(1.0),
    ),
}


@pytest.mark.parametrize("name", sorted(OPTION_CHANGES))
def test_option_changes_refuse(name: str) -> None:
    """Silent before this review: ``H @ v`` 36 % / 90 % / 59 % off, no error."""
    make, make_loss, change = OPTION_CHANGES[name]
    model, loss = make(), make_loss()
    _exact_or_stale(model, loss, change)
    X, y = _data()
    model, loss = make(), make_loss()
    H = hessinv.Hessian(model, loss, X, y, progress=False)
    change(model, loss)
    with pytest.raises(StaleOperatorError, match="option"):
        H @ _v(H.num_params)


@pytest.mark.xfail(
    strict=True,
    reason="known limit: a user's module class's attributes are not watched (they may be "
    "state of its own; model.eval() must not refuse); H answers for the old value",
)
@pytest.mark.parametrize("how", ["attribute", "training"])
def test_user_module_attribute_after_build(how: str) -> None:
    torch.manual_seed(0)
    model = _Scaled().to(DT)
    change = (
        (lambda m, _: setattr(m, "scale", 2.0)) if how == "attribute" else (lambda m, _: m.eval())
    )
    _exact_or_stale(model, nn.MSELoss(), change)


# -- guards: what leaves the function alone is not stale ----------------------------------------
def _conv() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 8), nn.Unflatten(1, [1, 8]), nn.Conv1d(1, 2, 3, padding=1), nn.Tanh(),
        nn.Flatten(), nn.Linear(16, 2),
    ).to(DT)  # fmt: skip


NOT_CHANGES = {
    "equal tuple set anew": lambda m: setattr(m[2], "padding", (1,)),
    "equal list set anew": lambda m: setattr(m[1], "unflattened_size", [1, 8]),
    "list changed and restored in place": lambda m: (
        m[1].unflattened_size.append(3),
        m[1].unflattened_size.pop(),
    ),
    "hook added and removed": lambda m: m[2].register_forward_hook(_hook).remove(),
    "pre-hook added and removed": lambda m: (
        m[3].register_forward_pre_hook(lambda mod, i: None).remove()
    ),
    "eval and train": lambda m: (m.eval(), m.train()),
    "forward pass": lambda m: m(torch.randn(2, 3, dtype=DT)),
    "deepcopy, its hooks and options changed": lambda m: (
        (c := copy.deepcopy(m))[2].register_forward_hook(_hook),
        setattr(c[2], "padding", (2,)),
        c[1].unflattened_size.reverse(),
    ),
    "state_dict round trip": lambda m: m.load_state_dict(copy.deepcopy(m.state_dict())),
    "global hook added and removed": lambda m: nn.modules.module.register_module_forward_hook(
        _hook
    ).remove(),
}


@pytest.mark.parametrize("cls", [hessinv.Hessian, hessinv.GaussNewton])
@pytest.mark.parametrize("name", sorted(NOT_CHANGES))
def test_no_false_stale(cls: type, name: str) -> None:
    """``conv.padding = (1,)`` (equal, a new tuple) was refused before this review."""
    model = _conv()
    X, y = _data()
    H = cls(model, nn.MSELoss(), X, y, progress=False)
    v = _v(H.num_params)
    before = H @ v
    NOT_CHANGES[name](model)
    assert torch.equal(H @ v, before)


def test_user_module_state_changed_by_a_call_not_stale() -> None:
    """A traced user's module counting its calls: a forward pass is no change."""

    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.calls = nn.Linear(3, 4), nn.Linear(4, 2), 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return self.b(torch.tanh(self.a(x)))

    torch.manual_seed(0)
    model = Counting().to(DT)
    X, y = _data()
    H = hessinv.Hessian(model, nn.MSELoss(), X, y, progress=False)
    before = H @ _v(H.num_params)
    model(X)
    assert torch.equal(H @ _v(H.num_params), before)


def test_traced_model_eval_and_forward_not_stale_and_exact() -> None:
    """A user's (traced) model: eval()/train() and a forward pass leave it usable and exact."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.act, self.b = nn.Linear(3, 4), nn.ELU(0.5), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.act(self.a(x)) + x.sum(-1, keepdim=True))

    torch.manual_seed(0)
    model = Net().to(DT)
    _exact_or_stale(model, nn.MSELoss(), lambda m, _: (m.eval(), m(_data()[0]), m.train()))
    X, y = _data()
    H = hessinv.Hessian(model, nn.MSELoss(), X, y, progress=False)
    model.eval()
    model(X)
    ref = dense_hessian(model, nn.MSELoss(), X, y) @ _v(H.num_params)
    assert float((H @ _v(H.num_params) - ref).norm() / ref.norm()) <= RTOL
    model.act.alpha = 2.0
    with pytest.raises(StaleOperatorError, match="alpha"):
        H @ _v(H.num_params)
