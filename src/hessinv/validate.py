"""Checks run before any long computation: damping, and (re-exported) sample mixing.

**Damping.** :func:`check_damping` accepts any real scalar and returns a float.

The sample-mixing check is :mod:`hessinv.mixing`'s and stale operators are
:mod:`hessinv.staleness`'s (both re-exported here, their names' earlier home).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .mixing import (  # noqa: F401 - re-exported: the names' earlier home
    MIXING_RTOL_EPS,
    batch_splits,
    check_no_mixing,
    on_side,
)
from .staleness import (  # noqa: F401 - re-exported: the names' earlier home
    ParameterSnapshot,
    ParameterSource,
    StaleOperatorError,
    pipeline_sources,
)


# -- damping ---------------------------------------------------------------------------------
def check_damping(damping: object) -> float:
    """Return ``damping`` as a Python float, or raise naming it.

    Accepts Python ``int``/``float``, numpy real scalars (``np.float32``,
    ``np.int64``, 0-d arrays) and one-element real tensors; ``H + damping I``
    is formed for any finite real (negative shifts too).

    Raises:
        TypeError: ``bool`` (Python, numpy or tensor), complex, a string, ``None``,
            a multi-element tensor or array, or any other non-real object.
        ValueError: NaN or infinity.
    """
    what = (
        "damping must be a real number (int, float, numpy scalar or 0-d tensor), "
        f"got {type(damping).__name__} {damping!r}"
    )
    if isinstance(damping, Tensor):
        if damping.numel() != 1:
            raise TypeError(
                f"damping must be a scalar; got a tensor of shape {tuple(damping.shape)}"
            )
        if damping.dtype == torch.bool or damping.dtype.is_complex:
            raise TypeError(f"damping must be real, got a {damping.dtype} tensor")
        value = float(damping.detach().reshape(()).item())
    else:
        try:
            import numpy as np
        except ImportError:  # pragma: no cover - numpy ships with torch's usual installs
            np = None  # type: ignore[assignment]
        if np is not None and isinstance(damping, np.ndarray):
            if damping.size != 1 or damping.ndim != 0:
                raise TypeError(f"damping must be a scalar; got an array of shape {damping.shape}")
            damping = damping[()]
        if isinstance(damping, bool) or (np is not None and isinstance(damping, np.bool_)):
            raise TypeError(f"damping must be a real number, not a bool ({damping!r})")
        if not isinstance(damping, numbers.Real):
            raise TypeError(what)
        value = float(damping)
    if not math.isfinite(value):
        raise ValueError(f"damping must be finite, got {value!r}")
    return value
