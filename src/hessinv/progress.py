"""Progress bars for long builds and factorizations (``tqdm``, on stderr).

Every operator takes ``progress=`` (:class:`hessinv.Hessian`,
:class:`hessinv.GaussNewton`):

* ``True`` (the default): a bar appears only once a loop has run for
  :data:`DEFAULT_DELAY` seconds (tqdm's ``delay``), so short work prints nothing;
* ``False``: never a bar;
* a number ``s >= 0``: a bar once the loop has run ``s`` seconds (``0``: at once).

The loops with a bar: the per-stage derivative blocks
(:func:`hessinv.products.compute_blocks`), the blocks of the lifted
factorization (:class:`hessinv.solvers.lifted.LiftedFactorization`) and the
batches of a ``data=`` operator (:mod:`hessinv.data`). An update is one call of
``tqdm.update`` (about a microsecond), against a block LU of milliseconds or
more; with ``progress=False`` no ``tqdm`` object is made at all. Without
``tqdm`` installed there is never a bar.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Sequence
from typing import Any

#: Seconds a loop runs before its bar appears (``progress=True``).
DEFAULT_DELAY = 2.0

ProgressArg = bool | float


def check_progress(progress: object) -> ProgressArg:
    """``progress`` validated: a bool, or a finite number of seconds ``>= 0``.

    Raises:
        TypeError: Not a bool or a real number.
        ValueError: A negative or non-finite number.
    """
    if isinstance(progress, bool):
        return progress
    if not isinstance(progress, numbers.Real):
        raise TypeError(
            f"progress must be True, False or a delay in seconds, got {type(progress).__name__}"
        )
    value = float(progress)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"progress (a delay in seconds) must be finite and >= 0, got {value!r}")
    return value


class _NoBar:
    """A stand-in for a bar when progress is off: every method does nothing."""

    def update(self, n: int = 1) -> None:  # noqa: D102
        pass

    def close(self) -> None:  # noqa: D102
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def progress_bar(total: int, desc: str, progress: ProgressArg, unit: str = "stage") -> Any:  # noqa: ANN401
    """A ``tqdm`` bar of ``total`` steps on stderr, or a do-nothing bar.

    Args:
        total: The number of steps.
        desc: What is being done (the bar's label).
        progress: The operator's setting (module doc).
        unit: What one step is.

    Returns:
        A context manager with ``update()`` and ``close()``; the bar is removed
        when closed (``leave=False``).
    """
    if progress is False or total < 1:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is optional
        return _NoBar()
    delay = DEFAULT_DELAY if progress is True else float(progress)
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        delay=delay,
        leave=False,
        file=sys.stderr,
        dynamic_ncols=True,
    )


class CountedSequence(Sequence):
    """A sequence that advances a bar by one each time an item is read.

    For a loop that reads each item once, in order (the lifted LU reads its
    diagonal blocks so, :class:`hessinv.blocktri.BlockTriLU`).
    """

    def __init__(self, items: Sequence, bar: Any) -> None:  # noqa: ANN401
        self.items = items
        self.bar = bar

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):  # noqa: ANN001, ANN204, D105
        out = self.items[i]
        self.bar.update(1)
        return out
