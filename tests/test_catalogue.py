"""Every exact quantity against an independent dense reference, over the catalogue."""

from __future__ import annotations

import pytest
import torch
from cases import CASES, DT, build, reference_loss_fn, rel

import hessinv

RTOL = 1e-10


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.name)
def setup(request):
    model, loss, X, y = build(request.param)
    H = hessinv.Hessian(model, loss, X, y)
    f, x0 = reference_loss_fn(model, loss, X, y)
    Href = torch.func.hessian(f)(x0)
    gref = torch.func.grad(f)(x0)
    return H, f, x0, Href, gref, (model, loss, X, y)


def test_shape_and_order(setup):
    H, f, x0, *_, (model, *_rest) = setup
    W = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert H.shape == (W, W) and H.num_params == W
    assert H.dtype == DT and H.device == x0.device
    flat = torch.cat([p.reshape(-1) for p in H.pipeline.params])
    assert torch.equal(flat, x0)
    vec = torch.nn.utils.parameters_to_vector([p for p in model.parameters() if p.requires_grad])
    assert torch.equal(flat, vec)


def test_loss_and_gradient(setup):
    H, f, x0, Href, gref, _ = setup
    assert abs(float(H.loss()) - float(f(x0))) <= RTOL * max(1.0, abs(float(f(x0))))
    assert rel(H.gradient(), gref) <= RTOL


def test_to_dense(setup):
    H, f, x0, Href, gref, _ = setup
    Hd = H.to_dense()
    assert rel(Hd, Href) <= RTOL
    assert torch.allclose(Hd, Hd.T)


def test_hvp_forms(setup):
    H, f, x0, Href, gref, _ = setup
    g = torch.Generator().manual_seed(1)
    V = torch.randn(H.num_params, 3, generator=g, dtype=DT)
    assert rel(H @ V, Href @ V) <= RTOL
    v = V[:, 0]
    out = H @ v
    assert out.shape == v.shape and rel(out, Href @ v) <= RTOL
    vl = [t.clone() for t in hessinv.pipeline.unflatten_params(v, H.pipeline.params)]
    outl = H @ vl
    assert isinstance(outl, list)
    assert [tuple(t.shape) for t in outl] == [tuple(p.shape) for p in H.pipeline.params]
    assert rel(torch.cat([t.reshape(-1) for t in outl]), Href @ v) <= RTOL


def test_hvp_pearlmutter(setup):
    """Eq. 24 equals Pearlmutter's trick (gradient of grad(f).v) on the reference loss."""
    H, f, x0, Href, gref, _ = setup
    g = torch.Generator().manual_seed(2)
    v = torch.randn(H.num_params, generator=g, dtype=DT)
    ref = torch.func.grad(lambda x: torch.func.grad(f)(x) @ v)(x0)
    assert rel(H @ v, ref) <= RTOL
    ref2 = hessinv.products.pearlmutter_hvp(H.pipeline, v[:, None])[:, 0]
    assert rel(H @ v, ref2) <= RTOL


def test_generic_path_equals_fast_path(setup):
    H, f, x0, Href, gref, (model, loss, X, y) = setup
    Hg = hessinv.Hessian(model, loss, X, y, generic=True)
    for a, b in zip(H.blocks, Hg.blocks, strict=True):
        for name in ("Jz", "Jx", "Tzz", "Tzx"):
            ba, bb = getattr(a, name), getattr(b, name)
            assert (ba is None) == (bb is None), name
            if ba is not None:
                assert (ba - bb).abs().max() <= RTOL * max(1.0, float(bb.abs().max())), name
        ta = a.Txx if a.Txx is not None else torch.zeros_like(b.Txx)
        assert (ta - b.Txx).abs().max() <= RTOL * max(1.0, float(b.Txx.abs().max()))
        assert rel(a.grad_x, b.grad_x) <= RTOL or float(b.grad_x.abs().max()) == 0


def _dense_lu_residual(A, g):
    x = torch.linalg.solve(A, g)
    return float(torch.linalg.norm(A @ x - g) / torch.linalg.norm(g))


@pytest.mark.parametrize("damping", [1.0, 1e-2, 0.0])
def test_solve_logdet_inertia(setup, damping):
    H, f, x0, Href, gref, _ = setup
    W = H.num_params
    A = Href + damping * torch.eye(W, dtype=DT)
    ev = torch.linalg.eigvalsh(A)
    scale = float(ev.abs().max())
    singular = float(ev.abs().min()) <= 1e-10 * scale
    g = torch.Generator().manual_seed(3)
    rhs = torch.randn(W, generator=g, dtype=DT)
    if singular:
        with pytest.raises(hessinv.SingularHessianError, match="damping"):
            H.solve(rhs, damping=damping, method="lifted")
        return
    x = H.solve(rhs, damping=damping, method="lifted")
    res = float(torch.linalg.norm(A @ x - rhs) / torch.linalg.norm(rhs))
    assert res <= 100 * max(_dense_lu_residual(A, rhs), torch.finfo(DT).eps)
    sign, la = H.logdet(damping)
    s_ref, la_ref = torch.linalg.slogdet(A)
    assert sign == float(s_ref)
    assert abs(la - float(la_ref)) <= 1e-8 * max(1.0, abs(float(la_ref)))
    assert H.inertia(damping) == (int((ev > 0).sum()), int((ev < 0).sum()), 0)
