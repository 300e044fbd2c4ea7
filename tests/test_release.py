"""An operator and its cached factorizations are freed by reference counting alone.

A reference cycle between a ``Hessian`` and the factorizations it caches would
hold the blocks and the factors (on a GPU, their memory) until Python's cyclic
collector happened to run: across the steps of a loop that builds a Hessian per
step, memory would grow by one Hessian per step. These tests run with the
collector disabled and check that every object is gone once the last reference
to it is dropped.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
import torch
from cases import DT
from torch import nn

import hessinv


def tanh_mlp(depth: int, width: int, batch: int) -> tuple:
    """A small tanh MLP with a mean-squared-error loss."""
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for _ in range(depth - 1):
        mods += [nn.Linear(width, width), nn.Tanh()]
    model = nn.Sequential(*mods, nn.Linear(width, 1)).to(DT)
    X, y = torch.randn(batch, width, dtype=DT), torch.randn(batch, 1, dtype=DT)
    return model, nn.MSELoss(), X, y


@pytest.fixture
def no_gc() -> Iterator[None]:
    # earlier garbage may take several passes (finalizers free more: matplotlib's figures
    # left by the benchmark tests), none of it this test's
    for _ in range(10):
        if gc.collect() == 0:
            break
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _use(H: hessinv.Hessian, what: str) -> None:
    g = torch.randn(H.num_params, dtype=DT, generator=torch.Generator().manual_seed(0))
    if what == "solve":
        H.solve(g, damping=1e-3)
    elif what == "solve_dense":
        H.solve(g, damping=1e-3, method="dense")
    elif what == "logdet":
        H.factor(1e-3).logdet()
    elif what == "inertia":
        H.factor(1e-3).inertia()
    elif what == "inverse":
        _ = H.inverse(1e-3) @ g
    elif what == "two_dampings":
        H.solve(g, damping=1e-3)
        H.solve(g, damping=1e-1)
        H.solve(g, damping=1e-3)


@pytest.mark.parametrize(
    "what", ["solve", "solve_dense", "logdet", "inertia", "inverse", "two_dampings"]
)
def test_hessian_freed_after_use(no_gc: None, what: str) -> None:
    H = hessinv.Hessian(*tanh_mlp(4, 5, 3))
    _use(H, what)
    assert len(H._factors) >= 1
    caches = [weakref.ref(f) for f in H._factors.values()]
    ref = weakref.ref(H)
    del H
    assert ref() is None, "the Hessian outlived its last reference (a reference cycle)"
    assert all(c() is None for c in caches)
    assert gc.collect() == 0, "using the Hessian left cyclic garbage (e.g. a stored bound method)"


def test_factorization_keeps_its_operator_alive(no_gc: None) -> None:
    """``Hessian(...).factor(d)`` in one line: the factorization holds the operator."""
    model, loss, X, y = tanh_mlp(4, 5, 3)
    fac = hessinv.Hessian(model, loss, X, y).factor(1e-2)
    H = hessinv.Hessian(model, loss, X, y)
    g = torch.randn(H.num_params, dtype=DT, generator=torch.Generator().manual_seed(1))
    A = H.to_dense() + 1e-2 * torch.eye(H.num_params, dtype=DT)
    x = fac.solve(g)
    assert torch.linalg.vector_norm(A @ x - g) <= 1e-12 * torch.linalg.vector_norm(g)
    ref = weakref.ref(fac.op)
    del fac
    assert ref() is None


def test_cached_and_returned_handles_share_state(no_gc: None) -> None:
    """A second ``factor`` returns the cached factorization's state, not a refactorization."""
    H = hessinv.Hessian(*tanh_mlp(4, 5, 3))
    fac = H.factor(1e-2)
    g = torch.randn(H.num_params, dtype=DT, generator=torch.Generator().manual_seed(2))
    fac.solve(g)
    again = H.factor(1e-2)
    assert again is not fac and vars(again) is vars(fac)
    assert again.op is H and fac.op is H
    cached = H._factors[(1e-2, fac.method)]
    assert cached._owner is None and cached.op is H
    del H
    assert fac.op is again.op  # the handles keep the operator alive
