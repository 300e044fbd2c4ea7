"""One staleness check per public call (``Hessian._fresh_call``), never fewer.

A default solve makes about ten products and norm estimates; each checked every
parameter's bytes. Inside one call no user code runs, so one check at its start
decides for all of them. What must still hold: every public call checks, a
change between two calls is caught, and an error inside a call leaves the
operator checking again.
"""

from __future__ import annotations

import pytest
import torch
from cases import DT
from torch import nn

import hessinv
import hessinv.staleness as staleness


def _setup(monkeypatch):  # noqa: ANN001, ANN202
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)
    X, y = torch.randn(4, 3, dtype=DT), torch.randn(4, 2, dtype=DT)
    H = hessinv.Hessian(model, nn.MSELoss(), X, y)
    calls = []
    real = staleness.ParameterSnapshot.changed
    monkeypatch.setattr(
        staleness.ParameterSnapshot, "changed", lambda self: calls.append(1) or real(self)
    )
    return model, H, calls


def test_each_public_call_checks_once(monkeypatch):
    model, H, calls = _setup(monkeypatch)
    fac = H.factor(0.1)
    g = torch.randn(H.num_params, 2, dtype=DT)
    for call in (lambda: fac.solve(g), fac.inertia, fac.logdet, lambda: H @ g[:, 0]):
        calls.clear()
        call()
        assert len(calls) == 1
    assert not H._fresh_threads


def test_a_change_between_calls_is_caught(monkeypatch):
    model, H, _ = _setup(monkeypatch)
    fac = H.factor(0.1)
    g = torch.randn(H.num_params, dtype=DT)
    fac.solve(g)
    with torch.no_grad():
        model[0].weight[0, 0] += 1e-9
    for call in (lambda: fac.solve(g), fac.inertia, fac.logdet, lambda: H @ g):
        with pytest.raises(hessinv.StaleOperatorError, match=r"^0\.weight changed"):
            call()


def test_an_error_inside_a_call_leaves_the_checks_on(monkeypatch):
    model, H, calls = _setup(monkeypatch)
    fac = H.factor(0.1)
    with pytest.raises(ValueError):
        fac.solve(torch.randn(H.num_params + 1, dtype=DT))  # a wrong shape, inside the call
    assert not H._fresh_threads
    with torch.no_grad():
        model[2].bias.add_(1.0)
    with pytest.raises(hessinv.StaleOperatorError, match=r"^2\.bias changed"):
        H @ torch.ones(H.num_params, dtype=DT)
