"""Adversarial tests of commit 1bbe606 (kept-coordinate inverse iteration, ``H @ v`` written
into one preallocated result), session 17.

Contract under test: **exact, or a clear error**; references are independent dense
``torch.func.hessian`` matrices of the loss in the flat parameters (tests/cases.py).

Defects found and fixed here:

* ``H @ v`` stopped being differentiable in ``v``: the ``out=`` forms of ``add``/``sum``
  that 1bbe606 introduced raise inside autograd (``RuntimeError: add(): functions with
  out=... arguments don't support automatic differentiation``), ``torch.func.jvp``/``vjp``
  and forward AD, where the parent commit returned the exact ``H w`` / ``H^T w``.
* ``zero_count()`` of a structurally singular ``A = 0`` (``H = 0``, ``damping = 0``, dropped
  directions) returned ``W + n_dropped`` (8 for ``W = 6``): the ``t == 0`` shortcut of the
  band count returned ``W`` where the caller adds the structural zeros to it (older than
  1bbe606).
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwad
from cases import CASES, DT, build, dense_hessian, tanh_net
from torch import nn

import hessinv

EPS = torch.finfo(DT).eps
#: Both sides are backward-stable float64 evaluations of ``H w`` on small networks
#: (W <= 120, entries O(1)); observed agreement is about 1e-15 of ||H|| ||w||.
RTOL = 1e3 * EPS

NAMED = {c.name: c for c in CASES}
NETS = [
    ("tanh_mse_mean", lambda: build(NAMED["tanh_mse_mean"], 0)),  # a Kron run with biases
    ("conv1d", lambda: build(NAMED["conv1d"], 0)),  # dense blocks
    ("frozen_nobias", lambda: build(NAMED["frozen_nobias"], 0)),
    ("gelu_ce_uneven_n16", lambda: build(NAMED["gelu_ce_uneven_n16"], 0)),
    ("tanh_w6_b2_d4", lambda: tanh_net(6, 2, 4, 1.1)),
]


def _close(a: torch.Tensor, b: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> None:
    scale = float(torch.linalg.matrix_norm(h, 2)) * float(w.abs().max())
    assert float((a - b).abs().max()) <= RTOL * scale


@pytest.mark.parametrize("name,make", NETS, ids=[n for n, _ in NETS])
def test_hvp_is_differentiable_in_v(name, make):  # noqa: ARG001
    """``d<w, H v>/dv = H^T w``, ``jvp`` and forward AD: as exact as ``H @ w`` itself."""
    m, loss, X, y = make()
    H = hessinv.Hessian(m, loss, X, y)
    h = dense_hessian(m, loss, X, y)
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(h.shape[0], dtype=DT, generator=gen)
    w = torch.randn(h.shape[0], dtype=DT, generator=gen)
    # reverse mode (autograd): the gradient of <w, H v> in v
    vv = v.clone().requires_grad_(True)
    hv = H @ vv
    _close(hv.detach(), h @ v, h, v)
    (gv,) = torch.autograd.grad(hv, vv, grad_outputs=w)
    _close(gv, h.T @ w, h, w)
    # torch.func: jvp (tangent H w, linear in v) and vjp
    _, tangent = torch.func.jvp(lambda x: H @ x, (v,), (w,))
    _close(tangent, h @ w, h, w)
    _, pull = torch.func.vjp(lambda x: H @ x, v)
    _close(pull(w)[0], h.T @ w, h, w)
    # forward AD dual numbers; and several columns through autograd
    with fwad.dual_level():
        out = H @ fwad.make_dual(v, w)
        _close(fwad.unpack_dual(out).tangent, h @ w, h, w)
    vm = torch.randn(h.shape[0], 3, dtype=DT, generator=gen).requires_grad_(True)
    wm = torch.randn(h.shape[0], 3, dtype=DT, generator=gen)
    (gm,) = torch.autograd.grad(H @ vm, vm, grad_outputs=wm)
    _close(gm, h.T @ wm, h, wm)


def test_hvp_of_constants_records_nothing():
    """Without a tracked ``v`` the product is a plain tensor (the ``out=`` route)."""
    m, loss, X, y = tanh_net(6, 2, 4, 1.1)
    H = hessinv.Hessian(m, loss, X, y)
    v = torch.randn(H.num_params, 2, dtype=DT)
    out = H @ v
    assert not out.requires_grad and out.grad_fn is None


@pytest.mark.parametrize("damping", [0.0, 1e-3, -1e-3])
def test_zero_count_of_a_zero_hessian_is_at_most_w(damping):
    """``H = 0`` (a bias-free Linear on zero inputs, dropped directions): zero count exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2, bias=False)).to(DT)
    X, y = torch.zeros(2, 3, dtype=DT), torch.randn(2, 2, dtype=DT)
    H = hessinv.Hessian(model, nn.MSELoss(), X, y)
    h = dense_hessian(model, nn.MSELoss(), X, y)
    assert float(h.abs().max()) == 0.0
    w = h.shape[0]
    f = H.factor(damping, "lifted")
    assert f.system.n_dropped > 0
    zeros = w if damping == 0.0 else 0  # A = d I: every eigenvalue is d, far outside W eps |d|
    assert f.zero_count() == zeros
    assert tuple(f.inertia()) == (
        w if damping > 0 else 0,
        w if damping < 0 else 0,
        zeros,
    )
    assert f.singular == (damping == 0.0)
