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

Held (a guard kept here): the kept-coordinate inverse iteration's band decisions (zero
count, inertia, singular verdict, the estimate bounding the kept ``sigma_min`` from above)
match dense eigenvalues at dampings built to sit just inside and outside the band, on
networks with dropped directions; it fails when the kept solve is scaled by 1e-3.
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


WIDE = [(8, 1, 4, 1.2, 0), (6, 2, 5, 1.5, 3)]  # width > batch: dropped directions (n_kept < W)


@pytest.mark.parametrize("w,b,depth,gain,seed", WIDE)
@pytest.mark.parametrize("order", ["solve_first", "queries_first"])
def test_kept_route_band_decisions_match_dense(w, b, depth, gain, seed, order):
    """The kept-coordinate iteration's band decisions, at dampings built to test them.

    ``d = -lambda + delta`` for a kept eigenvalue ``lambda`` of ``H`` puts one eigenvalue of
    ``A`` at ``delta`` (inside the zero band at ``delta = t / 20``, outside at ``20 t``);
    ``d = +-t / 20`` puts the dropped directions (eigenvalue ``d``) inside the band while the
    kept iteration sees none of them. The zero count, the inertia and the singular verdict
    must match the dense eigenvalues; the estimate must bound the kept ``sigma_min`` from above.
    """
    m, loss, X, y = tanh_net(w, b, depth, gain, seed)
    H = hessinv.Hessian(m, loss, X, y)
    h = dense_hessian(m, loss, X, y)
    n = h.shape[0]
    hev = torch.linalg.eigvalsh(h)
    nrm = float(hev.abs().max())
    t0 = n * EPS * nrm  # about the zero threshold (the exact one is read from each factor)
    kept_ev = hev[hev.abs() > 1e6 * t0]
    lams = [float(kept_ev[kept_ev.abs().argmin()]), float(kept_ev[kept_ev.abs().argmax()])]
    dampings = [-lam + delta for lam in lams for delta in (t0 / 20, 20 * t0)]
    dampings += [t0 / 20, -t0 / 20]
    kept_route = 0
    for d in dampings:
        f = H.factor(d, "lifted")
        assert f.system.n_dropped > 0
        if order == "solve_first":
            g = torch.randn(n, 2, dtype=DT, generator=torch.Generator().manual_seed(1))
            try:
                f.solve(g)
            except hessinv.SingularHessianError:
                pass
        t = f.zero_threshold()
        ev = torch.linalg.eigvalsh(h + d * torch.eye(n, dtype=DT))
        # the setup leaves no eigenvalue where round-off decides (within 4x of t)
        assert not bool(((ev.abs() > t / 4) & (ev.abs() < 4 * t)).any())
        zeros = int((ev.abs() <= t).sum())
        assert f.zero_count() == zeros
        assert tuple(f.inertia()) == (int((ev > t).sum()), int((ev < -t).sum()), zeros)
        assert f.singular == (zeros > 0)
        nd = f.system.n_dropped
        kept = hev[hev.abs().argsort()[nd:]] + d  # the dropped directions: H's nd zeros
        est = f.sigma_min_estimate()
        assert est >= float(kept.abs().min()) - 1e3 * EPS * (nrm + abs(d))
        kept_route += f._sigma_size == f.system.n_kept
    assert kept_route >= 1  # the kept coordinates were exercised
