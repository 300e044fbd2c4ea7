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
from typing import Any

import torch
from torch import Tensor


def as_stack(ts: Sequence[Tensor]) -> Tensor | None:
    """The ``(len(ts), *shape)`` view whose slices are ``ts``, if they are such; else ``None``.

    ``ts[i]`` must share one shape and stride, lie a constant number of
    elements apart (``data_ptr(ts[i]) = data_ptr(ts[0]) + i step``, ``step >
    0``), and the first and the last must be in one storage (so every one in
    between lies in it too: one address belongs to one live allocation). The
    views may be strided (a block's leading columns); the result is read-only
    in spirit (the views may overlap, as ``torch.stack``'s copies would not).
    """
    if not ts:
        return None
    t0 = ts[0]
    if t0.numel() == 0:
        return None
    if len(ts) == 1:
        return t0.unsqueeze(0)
    size = t0.element_size()
    ptr, shape, stride = t0.data_ptr(), t0.shape, t0.stride()
    step_bytes = ts[1].data_ptr() - ptr
    if step_bytes <= 0 or step_bytes % size:
        return None
    for i, t in enumerate(ts):
        if t.data_ptr() != ptr + i * step_bytes or t.shape != shape or t.stride() != stride:
            return None
    last = ts[-1]
    if last.untyped_storage().data_ptr() != t0.untyped_storage().data_ptr():
        return None
    if last.dtype != t0.dtype or last.device != t0.device:
        return None
    return t0.as_strided((len(ts), *shape), (step_bytes // size, *stride), t0.storage_offset())


def stacked(ts: Sequence[Tensor]) -> Tensor:
    """``torch.stack(ts)``, without a copy when :func:`as_stack` finds the stacked view.

    The result may share memory with ``ts``: read it, do not write into it.
    """
    view = as_stack(ts)
    return view if view is not None else torch.stack(list(ts))


def stack_attribute(objs: Sequence[Any], name: str) -> Tensor | None:
    """Stack attribute ``name`` of ``objs`` into one tensor, rebinding each to its view.

    ``None`` when the first object's attribute is ``None``. Views of one stacked
    tensor already (:func:`as_stack`) come back without a copy; otherwise they
    are copied one at a time, each original freed as it is replaced, so the
    tensors are held once, with one object's worth of extra memory at most.
    """
    first = getattr(objs[0], name)
    if first is None:
        return None
    if len(objs) == 1:
        return first.unsqueeze(0)
    view = as_stack([getattr(o, name) for o in objs])
    if view is not None:
        return view
    out = first.new_empty((len(objs), *first.shape))
    for i, o in enumerate(objs):
        out[i].copy_(getattr(o, name))
        setattr(o, name, out[i])
    return out
