"""Operators built or used inside ``torch.inference_mode()`` (:mod:`hessinv.grad_mode`).

Autograd records nothing there, and ``torch.enable_grad()`` does not turn it
back on: every catalogue Hessian built inside such a block came out as zero
(``H @ v`` 100 % off), silently. The references here are computed outside
inference mode, by ``torch.func.hessian`` of the model itself.
"""

from __future__ import annotations

import pytest
import torch
from cases import CASES, backward_error, build, dense_hessian, tanh_net

import hessinv

DT = torch.float64
EPS = torch.finfo(DT).eps
PICK = [c for c in CASES if c.name in {
    "tanh_mse_mean", "gelu_ce_uneven_n16", "conv2d_ce", "layernorm", "softmax_tail",
    "mish_callable_loss", "frozen_nobias", "single_stage",
}]  # fmt: skip


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("case", PICK, ids=[c.name for c in PICK])
def test_built_inside_inference_mode(case) -> None:  # noqa: ANN001
    """``H @ v`` of an operator built inside inference mode against the dense ``H``."""
    assert len(PICK) == 8
    model, loss, X, y = build(case)
    h = dense_hessian(model, loss, X, y)
    v = torch.randn(h.shape[0], dtype=DT, generator=torch.Generator().manual_seed(0))
    ref = h @ v
    with torch.inference_mode():
        H = hessinv.Hessian(model, loss, X, y)
        inside = H @ v
    assert _rel(inside, ref) <= 1e3 * EPS
    assert _rel(H @ v, ref) <= 1e3 * EPS  # and used outside it


def test_solves_and_counts_across_modes() -> None:
    """Built outside and used inside, or the other way round: the same exact answers.

    A factorization made inside inference mode is then used outside it, and
    what comes back is a normal tensor (in-place updates and autograd work).
    """
    model, loss, X, y = tanh_net(5, 3, 6, 1.5)
    h = dense_hessian(model, loss, X, y)
    d = 1e-2
    a = h + d * torch.eye(h.shape[0], dtype=DT)
    g = torch.randn(h.shape[0], dtype=DT, generator=torch.Generator().manual_seed(1))
    ev = torch.linalg.eigvalsh(a)
    negatives = int((ev < 0).sum())
    sign, logabs = torch.linalg.slogdet(a)
    for built_inside in (False, True):
        with torch.inference_mode(built_inside):
            H = hessinv.Hessian(model, loss, X, y)
        with torch.inference_mode():
            x = H.solve(g, d)
            inert = H.factor(d).inertia()
        assert backward_error(a, x, g) <= 100 * EPS
        assert inert.negative == negatives
        x2 = H.solve(g, d)  # the factorization made inside, used outside
        assert backward_error(a, x2, g) <= 100 * EPS
        s, la = H.logdet(d)
        assert s == float(sign) and abs(la - float(logabs)) <= 1e-10 * abs(float(logabs))
        x2.mul_(2.0)  # a normal tensor: in-place outside inference mode
        w = torch.ones_like(x2, requires_grad=True)
        (w * x2).sum().backward()  # and autograd may save it
        assert torch.equal(w.grad, x2)


def test_data_made_inside_inference_mode() -> None:
    """``X`` and ``y`` made inside inference mode, the operator outside: exact."""
    model, loss, X, y = tanh_net(4, 3, 4, 1.2)
    h = dense_hessian(model, loss, X, y)
    with torch.inference_mode():
        Xi, yi = X.clone(), y.clone()
    assert Xi.is_inference() and yi.is_inference()
    v = torch.randn(h.shape[0], dtype=DT, generator=torch.Generator().manual_seed(2))
    for inside in (False, True):
        with torch.inference_mode(inside):
            H = hessinv.Hessian(model, loss, Xi, yi)
        assert _rel(H @ v, h @ v) <= 1e3 * EPS
    stages = hessinv.Hessian(model, loss, X, y).pipeline.stages
    with torch.inference_mode():
        H = hessinv.Hessian.from_stages(stages, Xi)
    assert _rel(H @ v, h @ v) <= 1e3 * EPS
    data_loss = torch.nn.MSELoss(reduction="sum")
    hs = dense_hessian(model, data_loss, X, y)
    with torch.inference_mode():  # a data set, its batches made inside the mode too
        H = hessinv.Hessian(model, data_loss, data=[(Xi[:2], yi[:2]), (Xi[2:], yi[2:])])
        out = H @ v
    assert _rel(out, hs @ v) <= 1e3 * EPS


def test_gauss_newton_inside_inference_mode() -> None:
    """The Gauss-Newton matrix (its blocks formed lazily) built and used inside the mode."""
    model, loss, X, y = tanh_net(4, 3, 4, 1.2)
    G = hessinv.GaussNewton(model, loss, X, y)
    v = torch.randn(G.num_params, dtype=DT, generator=torch.Generator().manual_seed(3))
    ref = G.to_dense() @ v
    with torch.inference_mode():
        G2 = hessinv.GaussNewton(model, loss, X, y)
        out = G2 @ v
        x = G2.solve(out, 1e-3)
    assert _rel(out, ref) <= 1e3 * EPS
    assert _rel(G @ x + 1e-3 * x, out) <= 1e6 * EPS


def test_parameters_made_inside_inference_mode_are_refused() -> None:
    """A model created inside inference mode: a clear refusal naming the parameter."""
    with torch.inference_mode():
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        model = model.double()
    X, y = torch.randn(5, 3, dtype=DT), torch.randn(5, 2, dtype=DT)
    for inside in (False, True):
        with (
            torch.inference_mode(inside),
            pytest.raises(ValueError, match=r"'0\.weight'.*inference tensor"),
        ):
            hessinv.Hessian(model, torch.nn.MSELoss(), X, y)
