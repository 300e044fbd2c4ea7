"""Stacking per-stage tensors that are already views of one stacked tensor, without a copy.

The batched build (:mod:`hessinv.derivatives.linear_runs`) forms a run's
factors (``z``, ``W``, ``phi'``, ``b_y``, ``Tg``, ``Tzz``) as stacked tensors
and hands each stage a view. The products and projections stack them again
per run: :func:`stacked` recognises consecutive views of one tensor and
returns that tensor's view instead of copying (at width 16, batch 2, depth
128 about a millisecond per operator).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def as_stack(ts: Sequence[Tensor]) -> Tensor | None:
    """The ``(len(ts), *shape)`` view whose slices are ``ts``, if they are such; else ``None``.

    ``ts[i]`` must be contiguous, of one shape and stride, at ``data_ptr(ts[0]) +
    i numel`` elements, and the first and the last in one storage (so every one
    in between lies in it too: one address belongs to one live allocation).
    """
    if not ts:
        return None
    t0 = ts[0]
    if not t0.is_contiguous() or t0.numel() == 0:
        return None
    step = t0.numel() * t0.element_size()
    ptr, shape, stride = t0.data_ptr(), t0.shape, t0.stride()
    for i, t in enumerate(ts):
        if t.data_ptr() != ptr + i * step or t.shape != shape or t.stride() != stride:
            return None
    last = ts[-1]
    if last.untyped_storage().data_ptr() != t0.untyped_storage().data_ptr():
        return None
    if last.dtype != t0.dtype or last.device != t0.device:
        return None
    return t0.as_strided((len(ts), *shape), (t0.numel(), *stride), t0.storage_offset())


def stacked(ts: Sequence[Tensor]) -> Tensor:
    """``torch.stack(ts)``, without a copy when :func:`as_stack` finds the stacked view.

    The result may share memory with ``ts``: read it, do not write into it.
    """
    view = as_stack(ts)
    return view if view is not None else torch.stack(list(ts))
