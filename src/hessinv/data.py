"""Data sets: ``Hessian(model, loss_func, data=batches)``, the Hessian of the whole data set.

``data`` is a re-iterable of ``(X, y)`` batches: a list or tuple of pairs, or a
``torch.utils.data.DataLoader``. The loss is that of the concatenated data,
``L = loss_func(model(X_all), y_all)``: with ``B`` batches of ``n_b`` samples,
``N = sum_b n_b`` and ``L_b`` the loss of batch ``b``,

* ``reduction="mean"``: ``L = sum_b (n_b / N) L_b`` (the mean over all ``N``
  samples, whatever the batch sizes; an unequal last batch weighs less),
* ``reduction="sum"``: ``L = sum_b L_b``,

so ``H = sum_b w_b H_b``, ``g = sum_b w_b g_b`` with those weights ``w_b``.

**Two ways to compute, one matrix.**

* Products ``H @ V``, :meth:`gradient`, :meth:`loss`, :meth:`diagonal`,
  :meth:`block_diagonal`, ``to_dense`` go batch by batch: each builds the
  operator of one batch (its stage blocks, ``O(n_b)`` memory), applies it and
  frees it, so memory is that of one batch and time is one build per batch
  per call (pass ``V`` with many columns at once where you can).
* Everything that factors ``H + dI`` (``solve``, ``logdet``, ``inertia``,
  ``factor``, ``inverse``, ``is_positive_definite``, ``inverse_diagonal``,
  ``eigsh``, ``spectral_histogram``, ...) needs the whole lifted system: on
  first use the batches are concatenated and the operator of all ``N``
  samples is built once (the lifted system's sample axis is ``N`` long). That
  costs what ``Hessian(model, loss_func, X_all, y_all)`` costs, checked
  before anything large is allocated: the stacked inputs, then the stage
  blocks (``MemoryError`` naming GiB), then the factorization's estimate
  (``MemoryError``, or a :class:`~hessinv.errors.CostWarning` above 30 s), all
  with the total ``N``. From then on products use the stacked blocks too.

**Checks.** A one-shot iterator (a generator, ``iter(loader)``) is refused
(``TypeError``: the products need a pass over the data per call; pass
``list(...)`` to materialise it, which costs the memory of the whole data set).
Every batch must be an ``(X, y)`` pair of tensors with one dtype, one device,
and one shape past the batch dimension, finite, with as many targets as inputs;
errors name the batch index. The loss must say its reduction (a
``torch.nn`` loss, or any callable with a ``.reduction`` attribute of
``"mean"`` or ``"sum"``). A mean whose denominator is not the number of
samples (``CrossEntropyLoss``/``NLLLoss`` with class ``weight``, or a target
equal to ``ignore_index``) is refused: use ``reduction="sum"``. Every pass
over the data is checked to see the same samples (their number and an
order-independent checksum of ``X`` and ``y``): random augmentation, or a
shuffling ``DataLoader`` with ``drop_last=True``, is refused with a
``ValueError`` rather than mixing different data sets into one ``H``; the
check runs when a pass ends, so a pass over changed data returns nothing. A
``Dataset`` (single samples) is refused: wrap it in a ``DataLoader``.

**Batches must add up.** The stage checks of :func:`hessinv.mixing.check_no_mixing`
run on every batch operator and on the stacked one. With ``data=`` the first
stage must not mix samples either (for one batch that is exact, but then a
batch's loss depends on which samples share it), and the reduction must be a
plain mean or sum over samples: at construction, on one batch of ``n >= 2``
samples (or the first two batches joined, if all have one sample) split in
halves, the model's outputs of the halves must equal those of the whole batch
and the weighted losses of the halves must add up to the batch's loss
(``ValueError`` otherwise); when the stacked operator is built, its loss is
compared with the weighted batch losses. Both comparisons are to ``sqrt(eps)``
relative, far above round-off and far below what a batch statistic changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .batches import Batches, data_reduction
from .errors import check_finite
from .progress import ProgressArg, check_progress
from .trace import ParamsArg

#: Attributes of a built operator that only the stacked (all-samples) operator has:
#: reading one of them builds it (:meth:`DataOperator._stack`).
STACKED_STATE = frozenset(
    {
        "pipeline",
        "blocks",
        "_blocks",
        "_runs",
        "_loss",
        "_factors",
        "_split",
        "_kern",
        "_lam",
        "_fwd_flops",
        "_generic",
    }
)


class DataOperator:
    """The data-set operator: a mixin before ``Hessian`` or ``GaussNewton`` (module doc).

    Made by ``Hessian(..., data=...)`` (:func:`data_operator_class`); the
    class it is mixed into is ``_base``. Until the stacked operator is built
    only the batch-wise methods run; reading a piece of the stacked state
    (:data:`STACKED_STATE`) builds it.
    """

    _base: type

    def __init__(
        self,
        model: nn.Module,
        loss_func: Callable[..., Tensor],
        X: Tensor | None = None,  # noqa: N803
        y: Tensor | None = None,
        *,
        data: Iterable | None = None,
        params: ParamsArg = None,
        generic: bool = False,
        max_memory: float | None = None,
        progress: ProgressArg = True,
    ) -> None:
        name = self._base.__name__
        if X is not None or y is not None:
            raise TypeError(f"{name}: pass either X and y, or data=, not both")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not callable(loss_func):
            raise TypeError("loss_func must be callable")
        d = self.__dict__
        d["_stacked"] = False
        d["_stacking"] = False
        self._bounds: tuple[float, float] | None = None  # caches of H that need no stacking
        self._dense_eigh: tuple[Tensor, Tensor] | None = None
        self.progress = check_progress(progress)
        self.max_memory = max_memory
        self._reduction = data_reduction(loss_func)
        if isinstance(params, Mapping):
            params = dict(params)
        elif params is not None and not isinstance(params, Tensor):
            params = list(params)  # may be a generator: it is read once per batch
        self._args = (model, loss_func)
        self._kwargs: dict[str, Any] = {
            "params": params,
            "generic": generic,
            "max_memory": max_memory,
        }
        self._batches = Batches(data, loss_func, progress=self.progress)
        x0, y0 = self._batches.first  # type: ignore[misc]
        self._batches.first = None  # not kept: memory of one batch at a time
        head = self._batch_operator(x0, y0)  # checks the model on batch 0, mixing included
        del x0, y0
        self._snapshot = head._snapshot
        self.layout = head.layout
        self._n_stages = len(head.pipeline.stages)
        del head
        if self._batches.probe is not None:
            self._check_per_sample(*self._batches.probe)
            self._batches.probe = None

    # -- state -------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:  # noqa: ANN401
        d = self.__dict__
        if name in STACKED_STATE and not d.get("_stacked", True) and not d.get("_stacking"):
            self._stack()
            return getattr(self, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _batch_operator(self, x: Tensor, y: Tensor) -> Any:  # noqa: ANN401
        """The plain operator of one batch (its own stage blocks)."""
        return self._base(*self._args, x, y, progress=False, **self._kwargs)

    def _stack(self) -> None:
        """Build the operator of all samples at once and become it (module doc: its cost)."""
        self._check_fresh()
        d = self.__dict__
        d["_stacking"] = True
        try:
            n = self._batches.num_samples
            X, y = self._batches.stacked(  # noqa: N806
                f"stacking the {n} samples of data= into one lifted system", self.max_memory
            )
            full = self._base(*self._args, X, y, progress=self.progress, **self._kwargs)
            self._check_stacked_loss(full.loss())
        finally:
            d["_stacking"] = False
        names = ("_batches", "_args", "_kwargs", "_reduction", "_n_stages")
        names += ("_bounds", "_dense_eigh")
        keep = {k: d[k] for k in names}
        d.update(full.__dict__)
        d.update(keep)
        d["_stacked"] = True

    def _check_per_sample(self, x: Tensor, y: Tensor) -> None:
        """Refuse a model or loss whose batches do not add up to the data set (``ValueError``).

        On a batch of ``n >= 2`` samples split at ``k = n // 2``: the model's
        outputs of the two halves must be those of the whole batch (the first
        stage may mix samples within one batch, exactly, but then a batch's
        loss depends on which samples share it), and the two halves' losses,
        weighted ``k / n`` and ``(n - k) / n`` for a mean, must add up to the
        batch's loss. Both to ``sqrt(eps)`` relative: round-off of batched
        kernels passes, a batch statistic does not.
        """
        model, loss_func = self._args
        n = int(x.shape[0])
        k = n // 2
        tol = math.sqrt(torch.finfo(self.dtype).eps)
        with torch.no_grad():
            out = model(x)
            parts = (model(x[:k]), model(x[k:]))
            if not isinstance(out, Tensor) or out.dim() < 1 or out.shape[0] != n:
                return  # the stage checks have refused or will refuse such a model
            scale = float(out.abs().max())
            pairs = zip(parts, (out[:k], out[k:]), strict=True)
            diff = max(float((p - o).abs().max()) for p, o in pairs)
            if diff > tol * scale:
                raise ValueError(
                    f"the model's output for a sample depends on the other samples of its "
                    f"batch (by {diff:.2e} relative to {scale:.2e}): with data= the loss of "
                    "the data set would depend on how it is cut into batches; use a model "
                    "that treats samples independently (batch norm in eval mode), or X, y"
                )
            whole = float(loss_func(out, y))
            wk = k / n if self._reduction == "mean" else 1.0
            wr = (n - k) / n if self._reduction == "mean" else 1.0
            halves = (wk * float(loss_func(out[:k], y[:k])), wr * float(loss_func(out[k:], y[k:])))
            if abs(whole - sum(halves)) > tol * max(abs(whole), sum(abs(h) for h in halves)):
                raise ValueError(
                    f"loss_func (reduction={self._reduction!r}) is not a plain "
                    f"{self._reduction} over samples: on one batch, {whole:.17g}, but its two "
                    f"halves give {sum(halves):.17g}; use reduction='sum' or pass X, y"
                )

    def _batch_losses(self) -> list[float]:
        """``w_b L_b`` for every batch, by the model's forward pass (no blocks built)."""
        model, loss_func = self._args
        out = []
        with torch.no_grad():
            for _, x, y in self._batches:
                w = self._batches.weight(int(x.shape[0]), self._reduction)
                out.append(w * float(loss_func(model(x), y)))
        return out

    def _check_stacked_loss(self, stacked: Tensor) -> None:
        """The stacked loss must be the weighted batch losses (the reduction is per sample)."""
        parts = self._batch_losses()
        batched = math.fsum(parts)
        scale = math.fsum(abs(p) for p in parts)
        # sqrt(eps) relative, as the probe: round-off of long sums passes, a batch statistic not
        tol = math.sqrt(torch.finfo(self.dtype).eps) * max(scale, abs(float(stacked)))
        if abs(float(stacked) - batched) > tol:
            raise ValueError(
                f"the loss of the stacked data ({float(stacked):.17g}) is not the "
                f"{self._reduction}-weighted sum of the batch losses ({batched:.17g}): "
                "loss_func's reduction is not a plain mean or sum over samples; use "
                "reduction='sum' or pass X, y"
            )

    def _each(self) -> Iterator[tuple[Any, float]]:
        """``(operator of batch b, w_b)`` for every batch, one at a time."""
        for _, x, y in self._batches:
            op = self._batch_operator(x, y)
            yield op, self._batches.weight(int(x.shape[0]), self._reduction)

    def _sum(self, fn: Callable[[Any], Any]) -> Any:  # noqa: ANN401
        """``sum_b w_b fn(operator of batch b)`` (tensors, or lists of tensors)."""
        total = None
        for op, w in self._each():
            r = fn(op)
            if isinstance(r, list):
                r = [w * t for t in r]
                total = r if total is None else [a + b for a, b in zip(total, r, strict=True)]
            else:
                r = w * r
                total = r if total is None else total + r
        return total

    # -- what does not need the stacked system -------------------------------------
    def clear_cache(self) -> None:
        """Free the cached factorizations and dense eigendecomposition (the stacked blocks stay)."""
        if self._stacked:
            super().clear_cache()  # type: ignore[misc]
        else:
            self._dense_eigh = None

    def __repr__(self) -> str:
        return (
            f"{self._base.__name__}(W={self.num_params}, stages={self._n_stages}, "
            f"batch={self._batches.num_samples} in {len(self._batches)} batches, "
            f"dtype={self.dtype}, device={self.device})"
        )

    @property
    def num_samples(self) -> int:
        """``N``, the number of samples in the data set."""
        return self._batches.num_samples

    @property
    def reduction(self) -> str:
        """How batch losses combine: ``"mean"`` (over all samples) or ``"sum"``."""
        return self._reduction

    def loss(self) -> Tensor:
        """The loss of the whole data set (module doc), by one forward pass per batch."""
        self._check_fresh()
        if self._stacked:
            return super().loss()  # type: ignore[misc]
        return torch.tensor(math.fsum(self._batch_losses()), dtype=self.dtype, device=self.device)

    def gradient(self) -> Tensor:
        """The flat gradient of the data set's loss, ``sum_b w_b g_b``."""
        self._check_fresh()
        if self._stacked:
            return super().gradient()  # type: ignore[misc]
        return check_finite(self._sum(lambda op: op.gradient()), "the gradient", self.dtype)

    def matmat(self, v: Tensor) -> Tensor:
        """``H V = sum_b w_b H_b V`` for ``V`` of shape ``(W, k)``, one batch at a time."""
        self._check_fresh()
        if self._stacked:
            return super().matmat(v)  # type: ignore[misc]
        return self._sum(lambda op: op.matmat(v))

    def diagonal(self) -> Tensor:
        """The exact diagonal of ``H``, ``sum_b w_b diag(H_b)``."""
        self._check_fresh()
        if self._stacked:
            return super().diagonal()  # type: ignore[misc]
        return check_finite(self._sum(lambda op: op.diagonal()), "the diagonal of H", self.dtype)

    def block_diagonal(self) -> list[Tensor]:
        """The exact ``p_l x p_l`` diagonal blocks of ``H``, one per stage."""
        self._check_fresh()
        if self._stacked:
            return super().block_diagonal()  # type: ignore[misc]
        return self._sum(lambda op: op.block_diagonal())

    def to_dense(self) -> Tensor:
        """The ``W x W`` matrix, ``H @ I`` batch by batch (symmetrized)."""
        self._check_fresh()
        if self._stacked:
            return super().to_dense()  # type: ignore[misc]
        eye = torch.eye(self.num_params, dtype=self.dtype, device=self.device)
        h = self.matmat(eye)
        return 0.5 * (h + h.T)


_CLASSES: dict[type, type] = {}


def data_operator_class(cls: type) -> type:
    """``cls`` with :class:`DataOperator` mixed in front (one class per ``cls``, cached)."""
    if issubclass(cls, DataOperator):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(
            cls.__name__,
            (DataOperator, cls),
            {"_base": cls, "__module__": cls.__module__, "__doc__": cls.__doc__},
        )
    return _CLASSES[cls]


__all__ = ["Batches", "DataOperator", "data_operator_class", "data_reduction"]
