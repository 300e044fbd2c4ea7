"""Options of torch's modules changed after the build make the operator stale.

``H`` holds the derivatives of the model as it was built: ``LeakyReLU(0.1)``,
``ELU(alpha=0.5)``, a BatchNorm normalising with its running statistics in
eval mode. Setting ``negative_slope = 0.3`` afterwards left ``H @ v`` 15 % off,
``alpha = 2.0`` 72 % off, without an error (fifteenth session). Each must
now raise :class:`hessinv.StaleOperatorError` naming the module and option,
while changes that do not alter the model's function are not refused.
"""

from __future__ import annotations

import pytest
import torch
from cases import dense_hessian
from torch import nn

import hessinv

DT = torch.float64


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 4),
        nn.LeakyReLU(0.1),
        nn.Linear(4, 4),
        nn.ELU(alpha=0.5),
        nn.Linear(4, 4),
        nn.BatchNorm1d(4),
        nn.Dropout(0.2),
        nn.Linear(4, 2),
    ).to(DT)


def _built():  # noqa: ANN202
    model = _net()
    with torch.no_grad():  # running statistics that are not the identity
        model[5].running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0], dtype=DT))
        model[5].running_var.copy_(torch.tensor([0.5, 2.0, 1.5, 0.8], dtype=DT))
    model.eval()
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(5, 3, generator=gen, dtype=DT)
    y = torch.randn(5, 2, generator=gen, dtype=DT)
    loss = nn.MSELoss()
    H = hessinv.Hessian(model, loss, X, y, progress=False)
    return model, loss, X, y, H


def _matches_dense(model, loss, X, y, H) -> None:  # noqa: ANN001
    v = torch.randn(H.num_params, dtype=DT, generator=torch.Generator().manual_seed(2))
    ref = dense_hessian(model, loss, X, y) @ v
    assert torch.linalg.norm(H @ v - ref) <= 1e-12 * torch.linalg.norm(ref)


CHANGES = {
    "LeakyReLU slope": (lambda m: setattr(m[1], "negative_slope", 0.3), "'1'", "negative_slope"),
    "ELU alpha": (lambda m: setattr(m[3], "alpha", 2.0), "'3'", "alpha"),
    "BatchNorm eps": (lambda m: setattr(m[5], "eps", 1e-1), "'5'", "eps"),
    "BatchNorm to train mode": (lambda m: m[5].train(), "'5'", "train"),
    "Dropout to train mode": (lambda m: m[6].train(), "'6'", "train"),
    "whole model to train mode": (lambda m: m.train(), "'5'", "train"),
    "an option deleted": (lambda m: delattr(m[3], "alpha"), "'3'", "deleted"),
}


@pytest.mark.parametrize("what", list(CHANGES))
def test_a_changed_option_makes_the_operator_stale(what):
    model, loss, X, y, H = _built()
    _matches_dense(model, loss, X, y, H)  # exact before the change
    change, module, word = CHANGES[what]
    change(model)
    g = torch.ones(H.num_params, dtype=DT)
    for answer in (lambda: H @ g, H.gradient, lambda: H.solve(g, damping=1.0)):
        with pytest.raises(hessinv.StaleOperatorError, match=module) as err:
            answer()
        assert word in str(err.value)


def test_an_option_set_back_to_its_value_is_not_a_change():
    model, loss, X, y, H = _built()
    model[1].negative_slope = 0.3
    model[1].negative_slope = 0.1  # the same float value, another object
    model[5].train()
    model[5].eval()
    _matches_dense(model, loss, X, y, H)


def test_train_mode_of_modules_that_do_not_read_it_is_not_a_change():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT).eval()
    X, y = torch.randn(5, 3, dtype=DT), torch.randn(5, 2, dtype=DT)
    loss = nn.MSELoss()
    H = hessinv.Hessian(model, loss, X, y, progress=False)
    model.train()  # Linear and Tanh compute the same in both modes
    _matches_dense(model, loss, X, y, H)


class _Counting(nn.Module):
    """A user module with state of its own that every call changes (not an option)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.tanh(x)


def test_a_user_modules_own_state_is_not_watched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), _Counting(), nn.Linear(4, 2)).to(DT)
    X, y = torch.randn(5, 3, dtype=DT), torch.randn(5, 2, dtype=DT)
    loss = nn.MSELoss()
    H = hessinv.Hessian(model, loss, X, y, progress=False)
    model(X)  # the user's own forward pass between two uses of H
    _matches_dense(model, loss, X, y, H)
