"""``hessinv.gc_pause.paused_gc``: the collector is paused inside, restored after."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

import hessinv
from hessinv.gc_pause import paused_gc


@pytest.fixture
def gc_on():  # noqa: ANN201
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


def test_paused_inside_restored_after(gc_on) -> None:  # noqa: ANN001
    seen = []

    @paused_gc
    def f(fail: bool) -> int:
        seen.append(gc.isenabled())
        if fail:
            raise RuntimeError("boom")
        return 1

    assert f(False) == 1 and gc.isenabled()
    with pytest.raises(RuntimeError, match="boom"):
        f(True)
    assert gc.isenabled() and seen == [False, False]


def test_a_disabled_collector_stays_disabled(gc_on) -> None:  # noqa: ANN001
    @paused_gc
    def inner() -> bool:
        return gc.isenabled()

    @paused_gc
    def outer() -> tuple[bool, bool]:
        return inner(), gc.isenabled()

    assert outer() == (False, False) and gc.isenabled()  # nested: paused once
    gc.disable()
    assert inner() is False
    assert not gc.isenabled()  # the caller's choice is kept


def test_operator_calls_leave_the_collector_enabled(gc_on) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    X, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    H = hessinv.Hessian(model, nn.MSELoss(), X, y)
    assert gc.isenabled()
    g = H.gradient()
    H.solve(g, damping=1e-2)
    H.factor(1e-2).solve(g)
    H.inertia(1e-2)
    assert gc.isenabled()
    with pytest.raises(ValueError):
        H.solve(g[:-1], damping=1e-2)  # a refusal inside: re-enabled on the way out
    assert gc.isenabled()
