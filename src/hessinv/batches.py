"""The batches of a ``data=`` operator, validated (:mod:`hessinv.data` has the maths).

:class:`Batches` wraps a re-iterable of ``(X, y)`` pairs (a list, a tuple, a
``DataLoader``): it refuses a one-shot iterator or a ``Dataset`` of single
samples, checks every batch on every pass (pairs of tensors; one dtype, device
and shape past the batch dimension; finite; as many targets as inputs; no
``ignore_index`` target under a mean), naming the batch index, and compares
each pass with the first (sample count and an order-independent float64
checksum of ``X`` and ``y``, :meth:`Batches._checksum`), so that data that
change between passes are refused instead of mixed into one ``H``.
:func:`data_reduction` reads how batch losses combine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.utils.data import IterableDataset

from .progress import ProgressArg, progress_bar
from .solvers import select as _select

#: Relative tolerance of the per-pass checksum (float64 sums of the same numbers in
#: another order differ by far less; a changed sample by far more).
CHECKSUM_RTOL = 1e-10


def data_reduction(loss_func: Callable[..., Tensor]) -> str:
    """The loss's reduction, ``"mean"`` or ``"sum"``, or a clear refusal.

    Raises:
        TypeError: The loss does not say its reduction.
        ValueError: Another reduction, or a mean that is not over samples
            (class weights).
    """
    red = getattr(loss_func, "reduction", None)
    if red is None:
        raise TypeError(
            "data= combines the batch losses by the loss's reduction, but loss_func "
            f"({type(loss_func).__name__}) has no .reduction attribute: use a torch.nn loss "
            "module, or set loss_func.reduction = 'mean' or 'sum' on your callable"
        )
    if red not in ("mean", "sum"):
        raise ValueError(f"loss reduction must be 'mean' or 'sum' with data=, got {red!r}")
    if (
        red == "mean"
        and isinstance(loss_func, (nn.CrossEntropyLoss, nn.NLLLoss))
        and loss_func.weight is not None
    ):
        raise ValueError(
            f"{type(loss_func).__name__} with class weights and reduction='mean' divides by "
            "the sum of the weights of each batch, not by its number of samples, so the mean "
            "over the data set is not a weighted sum of batch means: use reduction='sum' "
            "(and scale by 1/N yourself)"
        )
    return red


def _unpack(item: object, index: int) -> tuple[Tensor, Tensor]:
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise TypeError(
            f"data batch {index} must be an (X, y) pair, got {type(item).__name__}"
            + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else "")
        )
    x, y = item
    for name, t in (("X", x), ("y", y)):
        if not isinstance(t, Tensor):
            raise TypeError(f"data batch {index}: {name} must be a tensor, got {type(t).__name__}")
    return x, y


class Batches:
    """A validated, re-iterable data set of ``(X, y)`` batches.

    Args:
        data: A list, tuple or ``DataLoader`` of ``(X, y)`` pairs.
        loss_func: The loss (for ``ignore_index`` targets under a mean).
        progress: A bar over the batches of each pass.

    Attributes:
        sizes: The batch sizes ``n_b`` of the first pass.
        num_samples: ``N``.

    Raises:
        TypeError: Not re-iterable (a generator or iterator), not ``(X, y)``
            pairs of tensors, or dtypes that differ between batches.
        ValueError: An empty data set or batch, NaN or Inf, shapes or devices
            that differ between batches, or a target at ``ignore_index``
            under a mean; the batch index is named.
    """

    def __init__(
        self, data: Iterable, loss_func: Callable[..., Tensor], progress: ProgressArg = False
    ) -> None:
        if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, IterableDataset):
            raise TypeError(
                f"data is a Dataset ({type(data).__name__}), whose items are single samples, "
                "not batches: pass DataLoader(dataset, batch_size=...)"
            )
        if isinstance(data, (Tensor, str, bytes, Mapping)):
            raise TypeError(
                f"data must be an iterable of (X, y) batches, got {type(data).__name__}; "
                "for one batch pass X, y instead"
            )
        try:
            it = iter(data)
        except TypeError as e:
            raise TypeError(
                f"data must be an iterable of (X, y) batches, got {type(data).__name__}"
            ) from e
        if it is data:
            raise TypeError(
                "data is a one-shot iterator (a generator or iter(...)): products and "
                "gradients pass over the data once per call, so data must be re-iterable. "
                "Pass a list or tuple of (X, y) batches or a DataLoader; list(generator) "
                "materialises it (memory of the whole data set)"
            )
        self.data = data
        self.loss_func = loss_func
        self.progress = progress
        self._ref: tuple | None = None
        self.sizes: list[int] = []
        self._sums: tuple[float, ...] | None = None
        self._probes: tuple[Tensor, Tensor] | None = None  # u and w of _checksum
        self.first: tuple[Tensor, Tensor] | None = None
        self.probe: tuple[Tensor, Tensor] | None = None  # the first batch of >= 2 samples
        for i, x, y in self._pass(it, record=True):
            if self.probe is None and x.shape[0] >= 2:
                self.probe = (x, y)
            elif self.probe is None and i > 0 and self.first is not None:
                self.probe = (torch.cat([self.first[0], x]), torch.cat([self.first[1], y]))
            if i == 0:
                self.first = (x, y)
                per = x[0].numel() * x.element_size() + y[0].numel() * y.element_size()
                self.sample_bytes = per
                self.device = x.device
        self.num_samples = sum(self.sizes)

    def __len__(self) -> int:
        return len(self.sizes)

    def _check(self, x: Tensor, y: Tensor, i: int) -> None:
        if x.dim() < 1 or x.shape[0] < 1:
            raise ValueError(f"data batch {i}: X must have a non-empty batch dimension")
        if y.dim() < 1 or y.shape[0] != x.shape[0]:
            raise ValueError(
                f"data batch {i}: X has {x.shape[0]} samples but y has shape {tuple(y.shape)}"
            )
        sig = (tuple(x.shape[1:]), x.dtype, x.device, tuple(y.shape[1:]), y.dtype, y.device)
        if self._ref is None:
            self._ref = sig
        elif sig != self._ref:
            ref = self._ref
            names = ["X shape past the batch", "X dtype", "X device"]
            names += ["y shape past the batch", "y dtype", "y device"]
            for name, a, b in zip(names, ref, sig, strict=True):
                if a != b:
                    err = TypeError if "dtype" in name else ValueError
                    raise err(f"data batch {i}: {name} is {b}, but batch 0 has {a}")
        for name, t in (("X", x), ("y", y)):
            if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
                raise ValueError(f"data batch {i}: {name} contains NaN or Inf")
        lf = self.loss_func
        if (
            isinstance(lf, (nn.CrossEntropyLoss, nn.NLLLoss))
            and getattr(lf, "reduction", None) == "mean"
            and not y.dtype.is_floating_point
            and bool((y == lf.ignore_index).any())
        ):
            raise ValueError(
                f"data batch {i}: a target equals ignore_index={lf.ignore_index}; under "
                "reduction='mean' such a batch's loss is divided by its count of other targets, "
                "not by its number of samples, so batch means do not combine into the data "
                "set's mean: drop those samples or use reduction='sum'"
            )

    def _checksum(self, x: Tensor, y: Tensor) -> list[float]:
        """``(value, scale)`` pairs, flat, of sums that do not depend on the sample order.

        Per tensor its sum and sum of squares; per sample the projections
        ``s_n = u . x_n`` and ``t_n = w . y_n`` on fixed random vectors (seeded):
        their sums and sums of squares change when values move inside a sample
        (a random flip or crop), and ``sum_n s_n t_n`` when the targets are
        paired with other inputs (a shuffle of ``y`` alone). Shuffling whole
        samples changes none of them.
        """
        n = x.shape[0]
        xs = x.detach().reshape(n, -1).to(torch.float64)
        ys = y.detach().reshape(n, -1).to(torch.float64)
        if self._probes is None:
            gen = torch.Generator().manual_seed(0)
            self._probes = tuple(
                torch.randn(t.shape[1], dtype=torch.float64, generator=gen).to(t.device)
                for t in (xs, ys)
            )
        s, t = xs @ self._probes[0], ys @ self._probes[1]
        st = s * t
        out = []
        for d in (xs, ys, s, t):
            out += [
                float(d.sum()),
                float(d.abs().sum()),
                float((d * d).sum()),
                float((d * d).sum()),
            ]
        return out + [float(st.sum()), float(st.abs().sum())]

    def _pass(self, it: Iterator, record: bool = False) -> Iterator[tuple[int, Tensor, Tensor]]:
        """Yield ``(i, X, y)`` for every batch; check the batches and, at the end, the pass."""
        sums: list[float] = []
        sizes: list[int] = []
        total = len(self.sizes) if self.sizes else 0
        with progress_bar(total, "hessinv: batches", self.progress, "batch") as bar:
            for i, item in enumerate(it):
                x, y = _unpack(item, i)
                self._check(x, y, i)
                sizes.append(int(x.shape[0]))
                part = self._checksum(x, y)
                sums = [a + b for a, b in zip(sums, part, strict=True)] if sums else part
                yield i, x, y
                bar.update(1)
        if not sizes:
            raise ValueError("data is empty: no (X, y) batch")
        if record:
            self.sizes, self._sums = sizes, tuple(sums)
            return
        self._compare(sizes, sums)

    def _compare(self, sizes: list[int], sums: list[float]) -> None:
        ref = self._sums
        assert ref is not None
        same = sum(sizes) == sum(self.sizes)
        for k in range(0, len(ref), 2):  # (value, scale) pairs (_checksum)
            if abs(sums[k] - ref[k]) > CHECKSUM_RTOL * ref[k + 1] + 1e-300:
                same = False
        if not same:
            raise ValueError(
                f"the data changed between passes ({sum(self.sizes)} samples in the first "
                f"pass, {sum(sizes)} now, or other values): hessinv needs the same samples "
                "every pass (no random augmentation, no shuffling DataLoader with "
                "drop_last=True)"
            )

    def __iter__(self) -> Iterator[tuple[int, Tensor, Tensor]]:
        """``(i, X, y)`` for every batch, checked; the pass is compared with the first."""
        return self._pass(iter(self.data))

    def weight(self, n_b: int, reduction: str) -> float:
        """``n_b / N`` for a mean, ``1`` for a sum."""
        return n_b / self.num_samples if reduction == "mean" else 1.0

    def stacked(self, what: str, max_memory: float | None) -> tuple[Tensor, Tensor]:
        """All batches concatenated (memory checked first: ``MemoryError``)."""
        need = 2.0 * self.sample_bytes * self.num_samples  # the batches and their concatenation
        _select.check_memory(need, what, max_memory, self.device)
        xs, ys = [], []
        for _, x, y in self:
            xs.append(x.detach())
            ys.append(y.detach())
        return torch.cat(xs), torch.cat(ys)
