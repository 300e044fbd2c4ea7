"""Stale operators: the parameters (and the module tree) an operator was built from.

:class:`ParameterSnapshot` keeps one flat bit copy of the tensors an operator
depends on (trainable parameters, frozen ones and buffers, the data ``X``,
``y`` or ``z0``, a loss module's tensors) and, for a model, its module tree and
the options of torch's modules in the model and in the loss;
:meth:`ParameterSnapshot.check` raises :class:`StaleOperatorError` once any of
them changes: an optimizer step, ``p.data.copy_(...)``, ``p.add_`` under
``no_grad``, a replaced parameter, a replaced, added or removed submodule, an
option such as ``LeakyReLU.negative_slope`` or ``ELU.alpha`` set anew (or a
list option changed in place), a BatchNorm or Dropout switched between
``train()`` and ``eval()``, a hook or a ``forward`` set on a module, torch's
global module hooks (what is compared: :mod:`hessinv.module_state`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .module_state import (
    BITS,
    MISSING,
    call_state,
    freeze,
    global_state,
    model_options,
    options_of,
    same_options,
    same_value,
)
from .pipeline import Pipeline


def _cat_flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


#: ``torch._utils._flatten_dense_tensors`` (DDP's; one C++ call), else a plain concatenation.
_flatten = getattr(torch._utils, "_flatten_dense_tensors", _cat_flat)


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
        #: (name, module, call_state) of every watched module (model and loss)
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
        torch's modules (:func:`model_options`): ``H`` holds the derivatives
        of ``LeakyReLU(0.1)``, of a BatchNorm in eval mode, as they were.
        """
        self._tree = [
            (name, m, tuple(m._modules.items()), type(m)) for name, m in model.named_modules()
        ]
        self._options = [
            (name, m, k, (v, freeze(v)))
            for name, m, k, v in model_options((name, m) for name, m, _, _ in self._tree)
        ]
        self._calls += [(name, m, call_state(m)) for name, m, _, _ in self._tree]
        self._global = global_state()
        self._watch_new(_module_tensors([(name, m) for name, m, _, _ in self._tree]))

    def watch_loss(self, loss_func: object) -> None:
        """Also watch a loss module: its tensors (class weights) and its options.

        ``H`` is built for the loss as it was (``reduction``, ``label_smoothing``,
        ``ignore_index``, ``weight``, ...): a change to any of them is a change.
        """
        if not isinstance(loss_func, nn.Module):
            return
        self._loss = (loss_func, options_of(loss_func))
        self._calls += [
            (f"the loss's {name}" if name else "the loss", m, call_state(m))
            for name, m in loss_func.named_modules()
        ]
        self._global = global_state()
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
        return flat.view(BITS.get(flat.element_size(), torch.uint8))

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
            now = vars(m).get(k, MISSING)
            if not same_value(now, was):
                what = "switched between train() and eval()" if k == "training" else "set anew"
                label = f"module '{name}'" if name else "the model"
                shown = "deleted" if now is MISSING else repr(now)
                if now is was[0]:  # a list changed in place: the old value is gone
                    what, shown = "changed in place", f"now {now!r}"
                    return f"{label}'s option {k} ({what}: {shown})"
                return f"{label}'s option {k} ({what}: {was[0]!r} -> {shown})"
        for name, m, state in self._calls:
            if call_state(m) != state:
                label = name if name.startswith("the loss") else f"module '{name}'"
                label = label if name else "the model"
                return f"{label} (a hook or a forward set on it was added or removed)"
        if self._global is not None and global_state() != self._global:
            return "torch's global module hooks (register_module_forward_hook, ...)"
        if self._loss is not None and not same_options(options_of(self._loss[0]), self._loss[1]):
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
