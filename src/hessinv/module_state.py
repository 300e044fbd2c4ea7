"""What a module's call depends on besides its tensors: its options and its hooks.

:mod:`hessinv.staleness` records these at the build and compares them at each
check: the public attributes of torch's modules (``negative_slope``, ``eps``,
``padding``; ``training`` where ``forward`` reads it), by value where they are
plain values, tuples or lists of them, or tensors (bitwise), else by identity;
the hooks and an instance's ``forward`` of each module; torch's global module hooks.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

#: Integer dtypes by element size: a bitwise comparison of float elements.
BITS = {8: torch.int64, 4: torch.int32, 2: torch.int16}


#: Option values compared by value (anything else by identity).
PLAIN_OPTION = (bool, int, float, str, type(None))


def options_of(m: nn.Module) -> list[tuple[str, tuple[object, object]]]:
    """The options of torch's modules in ``m`` (:func:`model_options`), named ``module.option``.

    Each value with its :func:`freeze` copy. Computed anew at each check for
    a loss module, so that an option added after the build is a change too.
    """
    return [(f"{name}.{k}", (v, freeze(v))) for name, _, k, v in model_options(m.named_modules())]


class TensorValue:
    """A copy of a tensor option, equal to another of the same bits, shape, dtype, device."""

    __slots__ = ("t",)
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, t: Tensor) -> None:
        self.t = t.detach().clone()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TensorValue):
            return False
        a, b = self.t, other.t
        if (a.shape, a.dtype, a.device) != (b.shape, b.dtype, b.device):
            return False
        bits = BITS.get(a.element_size(), torch.uint8)
        return torch.equal(a.reshape(-1).view(bits), b.reshape(-1).view(bits))


def freeze(v: object) -> object:
    """A copy of an option compared by value: a plain value, or tuples/lists of them.

    ``(type, value)``, nested for a tuple, list or ``torch.Size`` (a list such
    as ``Unflatten.unflattened_size`` may be changed in place, which an identity
    check never sees; an equal tuple set anew is no change), a tensor's bits
    (:class:`TensorValue`); ``None`` for anything else, compared by identity.
    """
    if type(v) in PLAIN_OPTION:
        return (type(v), v)
    if isinstance(v, Tensor):  # (Softplus(beta=torch.tensor(2.0)), refilled in place)
        return TensorValue(v)
    if type(v) in (tuple, list, torch.Size):
        items = tuple(freeze(x) for x in v)  # type: ignore[attr-defined]
        if all(i is not None for i in items):
            return (type(v), items)
    return None


def same_value(v: object, was: tuple[object, object]) -> bool:
    """``v`` is the option ``was = (value, freeze(value))`` recorded at the build."""
    v0, frozen = was
    return v is v0 if frozen is None else freeze(v) == frozen


def same_options(
    now: list[tuple[str, tuple[object, object]]], was: list[tuple[str, tuple[object, object]]]
) -> bool:
    """The same options (names and values) as recorded (:func:`options_of`)."""
    return len(now) == len(was) and all(
        k == k0 and same_value(v[0], v0) for (k, v), (k0, v0) in zip(now, was, strict=True)
    )


#: The hooks of a module that change what its call returns (refused at the build).
HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
#: torch's global module hooks (``register_module_forward_hook`` and kin).
GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def call_state(m: nn.Module) -> tuple[object, ...] | None:
    """What a call of ``m`` runs besides its class's ``forward``: hooks, a ``forward`` set on it.

    ``None`` when there is none (the fast path); else the hooks (keys and
    functions) and the instance's ``forward``, compared by ``==`` (functions
    by identity). A hook added and removed again leaves ``None``.
    """
    d = m.__dict__
    hooks = [d.get(k) for k in HOOKS]
    if "forward" not in d and not any(hooks):
        return None
    return (d.get("forward"), *(tuple(h.items()) if h else () for h in hooks))


def global_state() -> tuple[tuple[object, ...], ...]:
    """The global module hooks of torch registered now (keys and functions)."""
    mod = nn.modules.module
    return tuple(tuple(getattr(mod, k, {}).items()) for k in GLOBAL_HOOKS)


#: torch.nn classes whose ``forward`` reads ``training`` (batch statistics, dropout, RReLU).
TRAINING_DEPENDENT = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd, nn.RReLU)
#: A missing attribute (an option deleted after the build).
MISSING = object()


def runs_torch_forward(cls: type) -> bool:
    """A call of ``cls`` runs only torch's code: a ``torch.nn`` class, or a subclass of one.

    The subclass must inherit ``forward`` and ``__call__`` from its first
    ``torch.nn`` base other than ``nn.Module`` (a user's ``nn.Module`` is not one).
    """
    if cls.__module__.startswith("torch.nn."):
        return True
    base = next(
        (b for b in cls.__mro__ if b.__module__.startswith("torch.nn.") and b is not nn.Module),
        None,
    )
    return (
        base is not None
        and getattr(cls, "forward", None) is getattr(base, "forward", None)
        and cls.__call__ is base.__call__
    )


def model_options(
    modules: Iterable[tuple[str, nn.Module]],
) -> list[tuple[str, nn.Module, str, object]]:
    """``(name, module, option, value)`` of the options of torch's own modules (model or loss).

    The public attributes of ``torch.nn`` classes (``negative_slope``,
    ``alpha``, ``eps``, ``padding``, ...), which their ``forward`` reads, and
    ``training`` where it changes ``forward`` (:data:`TRAINING_DEPENDENT`);
    also of a user's subclass that keeps its torch base's call
    (:func:`runs_torch_forward`: ``class MyLeaky(nn.LeakyReLU): pass``, which
    hessinv evaluates as that base). A user's module class with a ``forward``
    of its own is left out: its attributes may be state of its own (a call
    counter) that a call of the model changes.
    """
    return [
        (name, m, k, v)
        for name, m in modules
        if runs_torch_forward(type(m))
        for k, v in vars(m).items()
        if not k.startswith("_") and (k != "training" or isinstance(m, TRAINING_DEPENDENT))
    ]
