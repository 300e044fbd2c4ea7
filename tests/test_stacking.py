"""``hessinv.stacking``: a zero-copy stack only of consecutive views of one tensor."""

from __future__ import annotations

import torch

from hessinv.stacking import as_stack, stack_attribute, stacked


def test_views_of_one_stack_come_back_without_a_copy() -> None:
    base = torch.randn(5, 3, 4, dtype=torch.float64)
    parts = base.unbind(0)
    view = as_stack(parts[1:4])
    assert view is not None and view.data_ptr() == parts[1].data_ptr()
    assert torch.equal(view, base[1:4])
    assert torch.equal(stacked(parts), base)


def test_strided_views_of_one_stack() -> None:
    base = torch.randn(5, 3, 4, dtype=torch.float64)
    parts = [base[i, :, :2] for i in range(1, 5)]  # leading columns: strided
    view = as_stack(parts)
    assert view is not None and torch.equal(view, base[1:5, :, :2])
    assert torch.equal(stacked(parts), torch.stack(parts))
    every_other = [base[0], base[2], base[4]]  # equally spaced: one strided view too
    assert torch.equal(as_stack(every_other), torch.stack(every_other))


def test_anything_else_is_copied() -> None:
    base = torch.randn(6, 3, 4, dtype=torch.float64)
    parts = base.unbind(0)
    cases = [
        [parts[0], parts[2], parts[3]],  # not equally spaced
        [parts[1], parts[0]],  # out of order
        [base[0], base[1].clone()],  # another storage
        [torch.randn(3, 4, dtype=torch.float64) for _ in range(3)],  # separate tensors
    ]
    for ts in cases:
        assert as_stack(ts) is None
        assert torch.equal(stacked(ts), torch.stack(ts))
    assert as_stack([base[0].reshape(4, 3), base[1]]) is None  # another shape
    flat = torch.randn(24, dtype=torch.float64)  # adjacent memory, other shapes
    assert as_stack([flat[:12].reshape(3, 4), flat[12:].reshape(4, 3)]) is None
    assert as_stack([]) is None
    empty = torch.empty(2, 0, 3)
    assert as_stack(empty.unbind(0)) is None


class _Holder:
    def __init__(self, t: torch.Tensor | None) -> None:
        self.t = t


def test_stack_attribute_rebinds_copies_and_keeps_views() -> None:
    parts = [torch.randn(3, 2, dtype=torch.float64) for _ in range(4)]
    objs = [_Holder(p.clone()) for p in parts]
    out = stack_attribute(objs, "t")
    assert torch.equal(out, torch.stack(parts))
    for i, o in enumerate(objs):  # rebound to views of the stack
        assert o.t.data_ptr() == out[i].data_ptr()
    base = torch.randn(4, 3, 2, dtype=torch.float64)
    views = [_Holder(t) for t in base.unbind(0)]
    assert stack_attribute(views, "t").data_ptr() == base.data_ptr()  # no copy
    assert stack_attribute([_Holder(None), _Holder(None)], "t") is None
