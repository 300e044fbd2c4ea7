"""Selected inversion: diag((H + dI)^{-1}) and its stage blocks against torch.linalg.inv."""

from __future__ import annotations

import pytest
import torch
from cases import CASES, DT, build, reference_loss_fn
from hypothesis import given, settings
from hypothesis import strategies as st
from test_solve import tanh_mlp

import hessinv
from hessinv.lifted import lifted_dense
from hessinv.selinv import band_inverse_diagonal


def dense_hessian(model, loss, X, y):
    f, x0 = reference_loss_fn(model, loss, X, y)
    return torch.func.hessian(f)(x0)


def ref_inverse(hd, d):
    a = hd + d * torch.eye(hd.shape[0], dtype=DT)
    return torch.linalg.inv(a), float(torch.linalg.cond(a))


def check(H, hd, d, tol=1e-8):
    inv, cond = ref_inverse(hd, d)
    # the dense reference carries ~cond * eps; ask 1e-8 only where it is that accurate
    tol = max(tol, 100 * cond * torch.finfo(DT).eps)
    diag = H.inverse_diagonal(d)
    ref = inv.diagonal()
    assert diag.shape == ref.shape
    err = float((diag - ref).abs().max() / ref.abs().max())
    assert err <= tol, (err, cond)
    blocks = H.inverse_block_diagonal(d)
    i = 0
    for b in blocks:
        p = b.shape[0]
        r = inv[i : i + p, i : i + p]
        assert float((b - r).abs().max() / ref.abs().max()) <= tol
        i += p
    assert i == hd.shape[0]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_catalogue(case):
    model, loss, X, y = build(case)
    H = hessinv.Hessian(model, loss, X, y)
    hd = dense_hessian(model, loss, X, y)
    nrm = float(torch.linalg.eigvalsh(hd).abs().max())
    for d in (0.3 * nrm, 1e-2 * nrm, -0.07 * nrm):
        ev = torch.linalg.eigvalsh(hd + d * torch.eye(hd.shape[0], dtype=DT))
        if float(ev.abs().min()) < 1e-6 * nrm:
            continue  # -0.07 ||H|| may land on an eigenvalue
        check(H, hd, d)


@pytest.mark.parametrize("damping", [1.0, 0.1, 1e-3, -0.05])
def test_deep_indefinite(damping):
    """Depth 16: the Takahashi recurrences on the pivoted LU lost every digit here."""
    model, loss, X, y = tanh_mlp(16, 8, 16)
    H = hessinv.Hessian(model, loss, X, y)
    hd = dense_hessian(model, loss, X, y)
    assert int((torch.linalg.eigvalsh(hd) < 0).sum()) > 0
    check(H, hd, damping)


def test_deep_narrow_long_chain():
    model, loss, X, y = tanh_mlp(48, 3, 2)
    H = hessinv.Hessian(model, loss, X, y)
    hd = dense_hessian(model, loss, X, y)
    for d in (0.5, 1e-3, -0.02):
        check(H, hd, d)


def test_positive_definite_ggn():
    model, loss, X, y = tanh_mlp(6, 4, 8)
    G = hessinv.GaussNewton(model, loss, X, y)
    gd = G.to_dense()  # the GGN's own dense form (its reference is tested elsewhere)
    for d in (1.0, 1e-4):
        inv = torch.linalg.inv(gd + d * torch.eye(gd.shape[0], dtype=DT))
        err = (G.inverse_diagonal(d) - inv.diagonal()).abs().max() / inv.diagonal().abs().max()
        assert float(err) <= 1e-9


@pytest.mark.parametrize("c", [1e-12, 1e12])
def test_scale_invariance(c):
    """loss * c at damping c * d: the inverse diagonal is divided by c, to round-off."""
    model, loss, X, y = tanh_mlp(8, 4, 4)

    def scaled(out, t):
        return c * loss(out, t)

    H1 = hessinv.Hessian(model, loss, X, y)
    Hc = hessinv.Hessian(model, scaled, X, y)
    for d in (0.1, -0.03):
        a = H1.inverse_diagonal(d)
        b = Hc.inverse_diagonal(c * d) * c
        assert float((a - b).abs().max() / a.abs().max()) <= 1e-10


def test_singular_raises():
    model, loss, X, y = tanh_mlp(4, 4, 2)  # batch 2: exact null directions
    H = hessinv.Hessian(model, loss, X, y)
    with pytest.raises(hessinv.SingularHessianError, match="null directions"):
        H.inverse_diagonal(0.0)
    hd = H.to_dense()
    ev = torch.linalg.eigvalsh(hd)
    lam = float(ev[torch.argmax((ev.abs() > 1e-6).to(torch.int))])  # a nonzero eigenvalue
    with pytest.raises(hessinv.SingularHessianError):
        H.inverse_diagonal(-lam)


@settings(max_examples=25, deadline=None)
@given(
    nb=st.integers(1, 12),
    seed=st.integers(0, 10_000),
    kkt=st.booleans(),
)
def test_band_inverse_random_block_tridiagonal(nb, seed, kkt):
    """Random symmetric block-tridiagonal K, with singular leading blocks when kkt."""
    g = torch.Generator().manual_seed(seed)
    sizes = [int(s) for s in torch.randint(1, 5, (nb,), generator=g)]
    diag, upper = [], []
    for i, n in enumerate(sizes):
        a = torch.randn(n, n, generator=g, dtype=DT)
        a = a + a.T
        if kkt and i % 2 == 0:
            a = torch.zeros(n, n, dtype=DT)  # a zero diagonal block: unpivoted recursions fail
        diag.append(a)
        if i < nb - 1:
            upper.append(torch.randn(n, sizes[i + 1], generator=g, dtype=DT))
    k = lifted_dense(diag, upper)
    s = torch.linalg.svdvals(k)
    if float(s[-1]) == 0.0:  # an exactly singular draw (zero blocks) must be refused
        with pytest.raises(hessinv.SingularHessianError):
            band_inverse_diagonal(diag, upper)
        return
    if float(s[-1]) <= 1e-8 * float(s[0]):
        return  # nearly singular: the dense reference is not accurate enough to compare
    ki = torch.linalg.inv(k)
    cond = float(s[0] / s[-1])
    xs = band_inverse_diagonal(diag, upper)
    off = 0
    for i, n in enumerate(sizes):
        r = ki[off : off + n, off : off + n]
        err = float((xs[i] - r).abs().max() / ki.abs().max())
        assert err <= 100 * cond * torch.finfo(DT).eps
        off += n
