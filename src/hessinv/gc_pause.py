"""Python's cyclic garbage collector paused for the duration of hessinv's heavy calls.

Building the blocks, factoring and solving create tens of thousands of
short-lived Python objects (tensor handles, per-stage records) per call; each
700 allocations trigger a young-generation collection, and every tenth of
those that leaves enough survivors a full one, which walks every tracked
object of the process (about 200 000 after ``import torch``, more in a
notebook). Measured on one core: a full collection every second call at
width 4, batch 2, depth 512 (60 ms each, a quarter of the call).

These calls leave no cyclic garbage (``tests/test_release.py`` checks that
``gc.collect()`` finds none after them): everything they free is freed by
reference counting, with or without the collector. So pausing it inside
them loses nothing; the objects still alive at the end are examined once, by
the first collection after the call. The collector is re-enabled on the way
out (also on an exception), and left alone when the caller had disabled it;
nested calls pause it once.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


def paused_gc(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` with the cyclic garbage collector disabled (module doc)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        if not gc.isenabled():  # the caller's choice, or an outer paused call
            return fn(*args, **kwargs)
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            gc.enable()

    return wrapper
