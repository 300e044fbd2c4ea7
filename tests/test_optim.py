"""Newton-type optimizers: certified steps, trust-region geometry, state round trips."""

from __future__ import annotations

import copy

import pytest
import torch
from cases import DT
from torch import nn

import hessinv
from hessinv.cli import make_mlp
from hessinv.optim import Newton

CONFIGS = [
    (s, c) for s in ("trust-region", "levenberg-marquardt") for c in ("hessian", "gauss-newton")
]


@pytest.mark.parametrize("strategy,curvature", CONFIGS)
@pytest.mark.parametrize("factorization", ["dense", "lifted"])
def test_accepted_steps_decrease_loss_and_stay_in_region(strategy, curvature, factorization):
    model, loss, X, y = make_mlp(5, 4, 6, dtype=DT, device="cpu", seed=1)
    opt = Newton(
        model, loss, strategy=strategy, curvature=curvature, radius=0.5, factorization=factorization
    )
    for _ in range(8):
        with torch.no_grad():
            before = float(loss(model(X), y))
        ret = float(opt.step(X, y))
        with torch.no_grad():
            after = float(loss(model(X), y))
        h = opt.history[-1]
        assert ret == pytest.approx(before, rel=1e-12)
        if h.accepted:
            assert after < before and h.actual > 0 and h.rho > opt.eta
            assert after == pytest.approx(h.new_loss, rel=1e-12)
        else:
            assert after == pytest.approx(before, rel=1e-12)
        if strategy == "trust-region":
            assert h.step_norm <= h.radius * (1 + 1e-8)
        else:
            assert h.inertia[1] == 0 and h.inertia[2] == 0  # certified positive definite
    assert opt.history[-1].new_loss < opt.history[0].loss


def test_convex_quadratic_one_newton_step_reaches_minimum():
    torch.manual_seed(0)
    X, y = torch.randn(20, 3, dtype=DT), torch.randn(20, 2, dtype=DT)
    for strategy in ("trust-region", "levenberg-marquardt"):
        model = nn.Linear(3, 2).to(DT)
        opt = Newton(
            model,
            nn.MSELoss(reduction="sum"),
            strategy=strategy,
            radius=1e6,
            max_radius=1e6,
            damping=1e-12,
            min_damping=1e-12,
        )
        opt.step(X, y)
        A = torch.cat([X, torch.ones(20, 1, dtype=DT)], dim=1)
        sol = torch.linalg.lstsq(A, y).solution  # (4, 2): W^T stacked over b
        assert torch.allclose(model.weight.detach(), sol[:3].T, atol=1e-9)
        assert torch.allclose(model.bias.detach(), sol[3], atol=1e-9)
        assert opt.history[-1].rho == pytest.approx(1.0, abs=1e-6)


def test_trust_region_hard_case():
    """H = diag(-1, 1, 2), g orthogonal to the negative eigenvector: a boundary step."""
    X = torch.eye(3, dtype=DT)
    y = torch.tensor([[-1.0, 0.0], [1.0, 1.0], [2.0, 1.0]], dtype=DT)

    def loss(out, t):
        return (0.5 * t[:, :1] * out**2 + t[:, 1:] * out).sum()

    model = nn.Linear(3, 1, bias=False).to(DT)
    with torch.no_grad():
        model.weight.zero_()
    opt = Newton(model, loss, radius=2.0, factorization="dense")
    opt.step(X, y)
    h = opt.history[-1]
    assert h.hard_case and h.accepted
    assert h.step_norm == pytest.approx(2.0, rel=1e-6)
    w = model.weight.detach()[0]
    assert abs(float(w[0])) > 1.5  # moved along the negative-curvature direction
    # the same with the lifted factorization
    model2 = nn.Linear(3, 1, bias=False).to(DT)
    with torch.no_grad():
        model2.weight.zero_()
    opt2 = Newton(model2, loss, radius=2.0, factorization="lifted")
    opt2.step(X, y)
    assert opt2.history[-1].hard_case and opt2.history[-1].step_norm == pytest.approx(2.0, rel=1e-6)


def test_state_dict_round_trip_and_resume():
    model, loss, X, y = make_mlp(4, 3, 8, dtype=DT, device="cpu", seed=2)
    opt = Newton(model, loss, curvature_batch=4)
    for _ in range(3):
        opt.step(X, y)
    state = copy.deepcopy(opt.state_dict())
    model_b = copy.deepcopy(model)
    opt_b = Newton(model_b, loss, curvature_batch=4, radius=123.0, max_radius=1e4)
    opt_b.load_state_dict(state)
    assert opt_b.state_dict()["radius"] == state["radius"] and opt_b.steps == 3
    assert len(opt_b.history) == 3 and opt_b.history[-1] == opt.history[-1]
    opt.step(X, y)
    opt_b.step(X, y)
    for p, q in zip(model.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="strategy"):
        Newton(model, loss, strategy="levenberg-marquardt").load_state_dict(state)


def test_subsampled_curvature_and_float32():
    model, loss, X, y = make_mlp(4, 4, 64, dtype=torch.float32, device="cpu", seed=3)
    opt = Newton(
        model, loss, curvature="gauss-newton", strategy="levenberg-marquardt", curvature_batch=8
    )
    first = float(opt.step(X, y))
    for _ in range(5):
        opt.step(X, y)
    with torch.no_grad():
        assert float(loss(model(X), y)) < first
    assert all(h.inertia[1] == 0 for h in opt.history)


def test_bad_arguments():
    model, loss, X, y = make_mlp(3, 3, 4, dtype=DT, device="cpu")
    with pytest.raises(ValueError, match="strategy"):
        Newton(model, loss, strategy="bfgs")
    with pytest.raises(ValueError, match="curvature"):
        Newton(model, loss, curvature="fisher")
    with pytest.raises(ValueError, match="radius"):
        Newton(model, loss, radius=-1.0)
    with pytest.raises(ValueError, match="curvature_batch"):
        Newton(model, loss, curvature_batch=0)
    with pytest.raises(ValueError, match="factorization"):
        Newton(model, loss, factorization="qr")


def test_dense_factorization_matches_lifted():
    model, loss, X, y = make_mlp(6, 4, 5, dtype=DT, device="cpu", seed=4)
    H = hessinv.Hessian(model, loss, X, y)
    g = H.gradient()
    for d in (1e-2, 1.0):
        a, b = H.factor(d, method="lifted"), H.factor(d, method="dense")
        assert torch.allclose(a.solve(g), b.solve(g), rtol=1e-9, atol=1e-12)
        assert a.inertia() == b.inertia()
        assert a.logdet()[0] == b.logdet()[0] and a.logdet()[1] == pytest.approx(
            b.logdet()[1], rel=1e-10
        )
    with pytest.raises(ValueError, match="factorization"):
        H.factor(1.0, method="qr")
