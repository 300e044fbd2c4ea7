"""Stale operators: the parameters (and the module tree) an operator was built from.

:class:`ParameterSnapshot` keeps one flat bit copy of the tensors an operator
depends on (trainable parameters, frozen ones and buffers, the data ``X``,
``y`` or ``z0``, a loss module's tensors) and, for a model, its module tree and
the options of torch's modules in the model and in the loss;
:meth:`ParameterSnapshot.check` raises :class:`StaleOperatorError` once any of
them changes: an optimizer step, ``p.data.copy_(...)``, ``p.add_`` under
``no_grad``, a replaced parameter, a replaced, added or removed submodule, an
option such as ``LeakyReLU.negative_slope`` or ``ELU.alpha`` set anew, a
BatchNorm or Dropout switched between ``train()`` and ``eval()``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .pipeline import Pipeline


def _cat_flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


#: ``torch._utils._flatten_dense_tensors`` (DDP's; one C++ call), else a plain concatenation.
_flatten = getattr(torch._utils, "_flatten_dense_tensors", _cat_flat)
#: Integer dtypes by element size: a bitwise comparison of float elements.
_BITS = {8: torch.int64, 4: torch.int32, 2: torch.int16}


#: Option values compared by value (anything else by identity).
_PLAIN_OPTION = (bool, int, float, str, type(None))


def _options(m: nn.Module) -> list[tuple[str, tuple[object, object]]]:
    """The options of torch's modules in ``m`` (:func:`_model_options`), named ``module.option``.

    Each value with its :func:`_freeze` copy. Computed anew at each check for
    a loss module, so that an option added after the build is a change too.
    """
    return [(f"{name}.{k}", (v, _freeze(v))) for name, _, k, v in _model_options(m.named_modules())]


class _TensorValue:
    """A copy of a tensor option, equal to another of the same bits, shape, dtype, device."""

    __slots__ = ("t",)
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, t: Tensor) -> None:
        self.t = t.detach().clone()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _TensorValue):
            return False
        a, b = self.t, other.t
        if (a.shape, a.dtype, a.device) != (b.shape, b.dtype, b.device):
            return False
        bits = _BITS.get(a.element_size(), torch.uint8)
        return torch.equal(a.reshape(-1).view(bits), b.reshape(-1).view(bits))


def _freeze(v: object) -> object:
    """A copy of an option compared by value: a plain value, or tuples/lists of them.

    ``(type, value)``, nested for a tuple, list or ``torch.Size`` (a list such
    as ``Unflatten.unflattened_size`` may be changed in place, which an identity
    check never sees; an equal tuple set anew is no change), a tensor's bits
    (:class:`_TensorValue`); ``None`` for anything else, compared by identity.
    """
    if type(v) in _PLAIN_OPTION:
        return (type(v), v)
    if isinstance(v, Tensor):  # (Softplus(beta=torch.tensor(2.0)), refilled in place)
        return _TensorValue(v)
    if type(v) in (tuple, list, torch.Size):
        items = tuple(_freeze(x) for x in v)  # type: ignore[attr-defined]
        if all(i is not None for i in items):
            return (type(v), items)
    return None


def _same_value(v: object, was: tuple[object, object]) -> bool:
    """``v`` is the option ``was = (value, _freeze(value))`` recorded at the build."""
    v0, frozen = was
    return v is v0 if frozen is None else _freeze(v) == frozen


def _same_options(
    now: list[tuple[str, tuple[object, object]]], was: list[tuple[str, tuple[object, object]]]
) -> bool:
    return len(now) == len(was) and all(
        k == k0 and _same_value(v[0], v0) for (k, v), (k0, v0) in zip(now, was, strict=True)
    )


#: The hooks of a module that change what its call returns (refused at the build).
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
#: torch's global module hooks (``register_module_forward_hook`` and kin).
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def _call_state(m: nn.Module) -> tuple[object, ...] | None:
    """What a call of ``m`` runs besides its class's ``forward``: hooks, a ``forward`` set on it.

    ``None`` when there is none (the fast path); else the hooks (keys and
    functions) and the instance's ``forward``, compared by ``==`` (functions
    by identity). A hook added and removed again leaves ``None``.
    """
    d = m.__dict__
    hooks = [d.get(k) for k in _HOOKS]
    if "forward" not in d and not any(hooks):
        return None
    return (d.get("forward"), *(tuple(h.items()) if h else () for h in hooks))


def _global_state() -> tuple[tuple[object, ...], ...]:
    """The global module hooks of torch registered now (keys and functions)."""
    mod = nn.modules.module
    return tuple(tuple(getattr(mod, k, {}).items()) for k in _GLOBAL_HOOKS)


#: torch.nn classes whose ``forward`` reads ``training`` (batch statistics, dropout, RReLU).
_TRAINING_DEPENDENT = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd, nn.RReLU)
#: A missing attribute (an option deleted after the build).
_MISSING = object()


def _runs_torch_forward(cls: type) -> bool:
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


def _model_options(
    modules: Iterable[tuple[str, nn.Module]],
) -> list[tuple[str, nn.Module, str, object]]:
    """``(name, module, option, value)`` of the options of torch's own modules (model or loss).

    The public attributes of ``torch.nn`` classes (``negative_slope``,
    ``alpha``, ``eps``, ``padding``, ...), which their ``forward`` reads, and
    ``training`` where it changes ``forward`` (:data:`_TRAINING_DEPENDENT`);
    also of a user's subclass that keeps its torch base's call
    (:func:`_runs_torch_forward`: ``class MyLeaky(nn.LeakyReLU): pass``, which
    hessinv evaluates as that base). A user's module class with a ``forward``
    of its own is left out: its attributes may be state of its own (a call
    counter) that a call of the model changes.
    """
    return [
        (name, m, k, v)
        for name, m in modules
        if _runs_torch_forward(type(m))
        for k, v in vars(m).items()
        if not k.startswith("_") and (k != "training" or isinstance(m, _TRAINING_DEPENDENT))
    ]


def _module_tensors(
    modules: Iterable[tuple[str, nn.Module]], label: str = ""
) -> Iterator[ParameterSource]:
    """The parameters and buffers registered on each of ``modules`` (``(name, module)``)."""
    for name, m in modules:
        for attr, t in [*m._parameters.items(), *m._buffers.items()]:
            if t is not None:
                yield ParameterSource(
                    f"{label}{name}.{attr}" if name else f"{label}{attr}", t, m, attr
                )


class StaleOperatorError(RuntimeError):
    """The parameters changed after the operator was built; rebuild it.

    A :class:`hessinv.Hessian` holds the derivative blocks of the parameters it
    was built at; after an optimizer step (or any in-place change) it would
    answer for the old parameters.
    """


@dataclass(frozen=True)
class ParameterSource:
    """Where a trainable tensor of the operator lives in the user's objects.

    Attributes:
        name: Its qualified name (``"0.weight"`` or ``"stages[1].params[0]"``).
        tensor: The user's tensor (an ``nn.Parameter`` of the model, or a stage's tensor).
        owner: The module holding it as attribute ``attr`` (``None`` for a stage).
        attr: The attribute name in ``owner``.
    """

    name: str
    tensor: Tensor
    owner: nn.Module | None = None
    attr: str = ""


def pipeline_sources(pipeline: Pipeline) -> list[ParameterSource]:
    """The user-side tensors of a pipeline: a model's parameters, else the stage tensors."""
    out: list[ParameterSource] = []
    for i, s in enumerate(pipeline.stages):
        src = getattr(s.structure, "sources", None)
        if src is not None:
            out.extend(src)
        else:
            out.extend(
                ParameterSource(f"stages[{i}].params[{j}]", p) for j, p in enumerate(s.params)
            )
    return out


class ParameterSnapshot:
    """A copy of the trainable parameters, to detect that an operator went stale.

    ``O(W)`` memory and an ``O(W)`` comparison per check, negligible against
    one product ``H @ v``. Values are compared, not version counters:
    ``p.data`` does not share ``p``'s version counter. The comparison is
    bitwise (any change of any bit, ``0.0 -> -0.0`` included, is a change),
    on one flat copy per device and dtype: a per-tensor comparison costs
    about 6 us per tensor, which at depth 512 (1024 tensors) came to 40 ms
    over the five products of a default solve.
    """

    def __init__(self, sources: Sequence[ParameterSource]) -> None:
        #: (name, module, its children, its class) per module of a watched model
        self._tree: list[tuple[str, nn.Module, tuple[tuple[str, nn.Module | None], ...], type]] = []
        self._loss: tuple[nn.Module, list[tuple[str, object]]] | None = None
        self._options: list[tuple[str, nn.Module, str, tuple[object, object]]] = []  # (watch)
        #: (name, module, _call_state) of every watched module (model and loss)
        self._calls: list[tuple[str, nn.Module, tuple[object, ...] | None]] = []
        self._global: tuple[tuple[object, ...], ...] | None = None  # global hooks (watch)
        self.sources: list[ParameterSource] = []
        self._meta: list[tuple[torch.Size, torch.dtype, torch.device]] = []
        self._groups: list[list[int]] = []  # indices into sources: one device and dtype each
        self._flat: list[Tensor] = []  # per group, its bits as they were
        self._append(list(sources))

    def _append(self, sources: list[ParameterSource]) -> None:
        """Copy the bits of ``sources`` and watch them from now on (earlier copies are kept)."""
        start = len(self.sources)
        self.sources += sources
        self._meta += [(s.tensor.shape, s.tensor.dtype, s.tensor.device) for s in sources]
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, s in enumerate(sources, start):
            groups.setdefault((s.tensor.device, s.tensor.dtype), []).append(i)
        for idx in groups.values():
            self._groups.append(idx)
            self._flat.append(self._bytes(idx).clone())

    def _watch_new(self, candidates: Iterable[ParameterSource]) -> None:
        """Also watch those of ``candidates`` whose tensors are not watched yet."""
        known = {id(s.tensor) for s in self.sources}
        fresh: list[ParameterSource] = []
        for s in candidates:
            if id(s.tensor) not in known:
                known.add(id(s.tensor))
                fresh.append(s)
        if fresh:
            self._append(fresh)

    def watch(self, model: nn.Module) -> None:
        """Also watch ``model``'s module tree: a replaced submodule (``model[2] = m``) is a change.

        Each module's children (names and objects) are recorded: the parameters
        of a replacing or added module are other tensors, which the values never
        see. Every parameter (frozen ones too) and buffer of the model is
        watched as well: a traced pipeline's sources are its stages' detached
        tensors, which neither a buffer nor a frozen parameter captured as a
        constant, nor ``p.data = other``, would change. So are the options of
        torch's modules (:func:`_model_options`): ``H`` holds the derivatives
        of ``LeakyReLU(0.1)``, of a BatchNorm in eval mode, as they were.
        """
        self._tree = [
            (name, m, tuple(m._modules.items()), type(m)) for name, m in model.named_modules()
        ]
        self._options = [
            (name, m, k, (v, _freeze(v)))
            for name, m, k, v in _model_options((name, m) for name, m, _, _ in self._tree)
        ]
        self._calls += [(name, m, _call_state(m)) for name, m, _, _ in self._tree]
        self._global = _global_state()
        self._watch_new(_module_tensors([(name, m) for name, m, _, _ in self._tree]))

    def watch_loss(self, loss_func: object) -> None:
        """Also watch a loss module: its tensors (class weights) and its options.

        ``H`` is built for the loss as it was (``reduction``, ``label_smoothing``,
        ``ignore_index``, ``weight``, ...): a change to any of them is a change.
        """
        if not isinstance(loss_func, nn.Module):
            return
        self._loss = (loss_func, _options(loss_func))
        self._calls += [
            (f"the loss's {name}" if name else "the loss", m, _call_state(m))
            for name, m in loss_func.named_modules()
        ]
        self._global = _global_state()
        self._watch_new(_module_tensors(loss_func.named_modules(), "the loss's "))

    def watch_data(self, **tensors: Tensor) -> None:
        """Also watch the data an operator was built on (``X``, ``y``; a pipeline's ``z0``).

        Every block holds the data as it was: a tensor refilled in place (a
        reused batch buffer) would leave the operator answering for the old
        batch. ``O(N d)`` more bits per check, less than one forward pass.
        """
        self._watch_new(
            ParameterSource(name, t) for name, t in tensors.items() if isinstance(t, Tensor)
        )

    def _bytes(self, idx: list[int]) -> Tensor:
        """The bits of the sources ``idx`` (one device and dtype), concatenated.

        As integers of the element's size (``0.0`` and ``-0.0``, or two NaNs,
        differ), concatenated by torch's C++ flattening where it has one (one
        call, not one per tensor).
        """
        tensors = [self.sources[i].tensor for i in idx]
        with torch.no_grad():
            flat = _flatten(tensors)
        return flat.view(_BITS.get(flat.element_size(), torch.uint8))

    @classmethod
    def of_pipeline(cls, pipeline: Pipeline) -> ParameterSnapshot:
        """Snapshot the tensors a pipeline was built from."""
        return cls(pipeline_sources(pipeline))

    def changed(self) -> str | None:
        """The name of the first parameter that changed (or was replaced), else ``None``."""
        for name, m, children, cls in self._tree:
            if type(m) is not cls:  # m.__class__ = Other: another forward
                label = f"module '{name}'" if name else "the model"
                return f"{label} (its class was changed to {type(m).__name__})"
            if not children and not m._modules:  # a leaf that stayed one (most modules)
                continue
            now = tuple(m._modules.items())
            if len(now) == len(children) and all(  # the fast path: same names, same objects
                k == k0 and c is c0 for (k, c), (k0, c0) in zip(now, children, strict=True)
            ):
                continue
            if [k for k, _ in now] != [k for k, _ in children]:
                label = f"module '{name}'" if name else "the model"
                return f"{label} (its submodules were added, removed or reordered)"
            for (key, child), (_, was) in zip(now, children, strict=True):
                if child is not was:
                    path = f"{name}.{key}" if name else key
                    return f"module '{path}' (replaced by another module)"
        for name, m, k, was in self._options:
            now = vars(m).get(k, _MISSING)
            if not _same_value(now, was):
                what = "switched between train() and eval()" if k == "training" else "set anew"
                label = f"module '{name}'" if name else "the model"
                shown = "deleted" if now is _MISSING else repr(now)
                if now is was[0]:  # a list changed in place: the old value is gone
                    what, shown = "changed in place", f"now {now!r}"
                    return f"{label}'s option {k} ({what}: {shown})"
                return f"{label}'s option {k} ({what}: {was[0]!r} -> {shown})"
        for name, m, state in self._calls:
            if _call_state(m) != state:
                label = name if name.startswith("the loss") else f"module '{name}'"
                label = label if name else "the model"
                return f"{label} (a hook or a forward set on it was added or removed)"
        if self._global is not None and _global_state() != self._global:
            return "torch's global module hooks (register_module_forward_hook, ...)"
        if self._loss is not None and not _same_options(_options(self._loss[0]), self._loss[1]):
            return "the loss's options (reduction, weights, ...)"
        for s, meta in zip(self.sources, self._meta, strict=True):
            owner, t = s.owner, s.tensor
            if owner is not None and not (
                # the registries first (fast), where ``owner.attr`` reads them: no attribute
                # of that name on the instance (``owner.__dict__``) or its class
                (
                    (owner._parameters.get(s.attr) is t or owner._buffers.get(s.attr) is t)
                    and s.attr not in owner.__dict__
                    and not hasattr(type(owner), s.attr)
                )
                or getattr(owner, s.attr, None) is t
            ):
                return f"{s.name} (replaced by another tensor)"
            if (t.shape, t.dtype, t.device) != meta:
                return s.name
        for idx, flat in zip(self._groups, self._flat, strict=True):
            now = self._bytes(idx)
            if not torch.equal(now, flat):
                sizes = [self.sources[i].tensor.numel() for i in idx]
                # (in the units _bytes views them in: bytes for a 16-byte complex128)
                unit = now.numel() // max(sum(sizes), 1)
                bounds = torch.tensor([0, *sizes]).cumsum(0) * unit
                for j, i in enumerate(idx):  # the first tensor whose bits differ
                    a, b = int(bounds[j]), int(bounds[j + 1])
                    if not torch.equal(now[a:b], flat[a:b]):
                        return self.sources[i].name
                return self.sources[idx[0]].name  # (never silent, even if not located)
        return None

    def check(self) -> None:
        """Raise :class:`StaleOperatorError` if a parameter changed since the snapshot."""
        name = self.changed()
        if name is not None:
            raise StaleOperatorError(
                f"{name} changed after this operator was built (an optimizer step "
                "or an in-place update): the operator describes the old parameters "
                "(and data). "
                "Rebuild it, e.g. hessinv.Hessian(model, loss_func, X, y)."
            )
