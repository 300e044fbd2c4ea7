"""Exact diagonal / block diagonal, and Bishop's approximations beside their exact counterparts."""

from __future__ import annotations

import pytest
import torch
from cases import CASES, DT, build, rel
from torch import nn

import hessinv
from hessinv import check
from hessinv.approx import becker_lecun_diagonal, outer_product_inverse


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.name)
def case(request):
    model, loss, X, y = build(request.param)
    return hessinv.Hessian(model, loss, X, y), (model, loss, X, y)


def test_diagonal_and_block_diagonal_exact(case):
    H, _ = case
    Hd = H.to_dense()
    assert (
        rel(H.diagonal(), torch.diagonal(Hd)) <= 1e-10
        or float(torch.diagonal(Hd).abs().max()) < 1e-14
    )
    i = 0
    for blk, p in zip(H.block_diagonal(), H.pipeline.stage_sizes, strict=True):
        assert blk.shape == (p, p)
        ref = Hd[i : i + p, i : i + p]
        assert (blk - ref).abs().max() <= 1e-10 * max(1.0, float(ref.abs().max()))
        i += p


def _naive_becker_lecun(H):
    """Independent Becker-LeCun: backprop the diagonal second derivative through dense blocks."""
    blocks = H.blocks
    out = [
        torch.diagonal(
            b.Txx if b.Txx is not None else torch.zeros(b.num_params, b.num_params, dtype=DT)
        )
        for b in blocks
    ]
    if len(blocks) > 1:
        g = torch.stack([torch.diagonal(t) for t in blocks[-1].Tzz])
        for l in range(len(blocks) - 2, -1, -1):  # noqa: E741
            b = blocks[l]
            out[l] = out[l] + sum((b.Jx[n] ** 2).T @ g[n] for n in range(g.shape[0]))
            if l > 0:
                g = torch.stack(
                    [(b.Jz[n] ** 2).T @ g[n] + torch.diagonal(b.Tzz[n]) for n in range(g.shape[0])]
                )
    return torch.cat(out)


def test_becker_lecun(case):
    H, _ = case
    d = becker_lecun_diagonal(H)
    assert d.shape == (H.num_params,)
    assert rel(d, _naive_becker_lecun(H)) <= 1e-12 or float(d.abs().max()) < 1e-14


def test_becker_lecun_exact_when_curvature_is_diagonal():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).to(DT)  # one stage, MSE: diagonal loss curvature
    X, y = torch.randn(5, 4, dtype=DT), torch.randn(5, 3, dtype=DT)
    H = hessinv.Hessian(model, nn.MSELoss(reduction="sum"), X, y)
    assert rel(becker_lecun_diagonal(H), H.diagonal()) <= 1e-14
    # and it is an approximation in general: it differs on a deeper net
    H2 = hessinv.Hessian(*build(CASES[0]))
    assert rel(becker_lecun_diagonal(H2), H2.diagonal()) > 1e-3


def dense_ggn(model, loss, X, y):
    """J^T L J at the model's output; a final LogSoftmax + NLLLoss is cross-entropy on the logits
    (the documented convention: the literal split gives 0, NLL being linear)."""
    mods = list(model)
    if isinstance(loss, nn.NLLLoss) and isinstance(mods[-1], nn.LogSoftmax):
        model = nn.Sequential(*mods[:-1])
        loss = nn.CrossEntropyLoss(reduction=loss.reduction)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def out_of(flat):
        ps, i = {}, 0
        for n in names:
            k = params[n].numel()
            ps[n] = flat[i : i + k].reshape(params[n].shape)
            i += k
        return torch.func.functional_call(model, ps, (X,))

    flat = torch.cat([params[n].reshape(-1) for n in names])
    out = out_of(flat)
    J = torch.func.jacrev(out_of)(flat).reshape(out.numel(), -1)
    Hl = torch.func.hessian(lambda o: loss(o.reshape(out.shape), y))(out.reshape(-1))
    return J.T @ Hl @ J


GGN_CASES = [c for c in CASES if c.name not in ("layernorm", "softmax_tail", "mish_callable_loss")]


@pytest.mark.parametrize("c", GGN_CASES, ids=lambda c: c.name)
def test_gauss_newton_against_dense(c):
    model, loss, X, y = build(c)
    G = hessinv.GaussNewton(model, loss, X, y)
    ref = dense_ggn(model, loss, X, y)
    assert rel(G.to_dense(), ref) <= 1e-10
    V = torch.randn(G.num_params, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    assert rel(G @ V, ref @ V) <= 1e-10
    assert rel(G.diagonal(), torch.diagonal(ref)) <= 1e-10
    H = hessinv.Hessian(model, loss, X, y)
    assert rel(G.gradient(), H.gradient()) <= 1e-12  # the true gradient
    d = 1e-2
    A = ref + d * torch.eye(G.num_params, dtype=DT)
    g = torch.randn(G.num_params, dtype=DT, generator=torch.Generator().manual_seed(1))
    x = G.solve(g, damping=d, method="lifted")
    xd = torch.linalg.solve(A, g)
    r = float(torch.linalg.norm(A @ x - g) / torch.linalg.norm(g))
    assert r <= 100 * float(torch.linalg.norm(A @ xd - g) / torch.linalg.norm(g)) + 1e-15
    ev = torch.linalg.eigvalsh(A)
    assert G.inertia(d) == (int((ev > 0).sum()), 0, 0)
    s, la = G.logdet(d)
    assert s == 1.0 and abs(la - float(torch.linalg.slogdet(A)[1])) <= 1e-8 * abs(la)


def test_gauss_newton_with_softmax_and_layernorm():
    for name in ("layernorm", "softmax_tail"):
        model, loss, X, y = build(next(c for c in CASES if c.name == name))
        G = hessinv.GaussNewton(model, loss, X, y)
        assert rel(G.to_dense(), dense_ggn(model, loss, X, y)) <= 1e-10


def test_gauss_newton_needs_the_loss_separately():
    with pytest.raises(TypeError, match="loss_func"):
        hessinv.GaussNewton.from_stages([], torch.zeros(1, 1))


@pytest.mark.parametrize("name", ["tanh_mse_mean", "gelu_ce_uneven_n16", "silu_softplus_bce"])
def test_outer_product_sequential_inverse(name):
    model, loss, X, y = build(next(c for c in CASES if c.name == name))
    d = 0.1
    B = outer_product_inverse(model, loss, X, y, d)
    ref = torch.linalg.inv(dense_ggn(model, loss, X, y) + d * torch.eye(B.shape[0], dtype=DT))
    assert rel(B, ref) <= 1e-9
    G = hessinv.GaussNewton(model, loss, X, y)
    g = torch.randn(G.num_params, dtype=DT)
    assert rel(B @ g, G.solve(g, damping=d)) <= 1e-9
    with pytest.raises(ValueError, match="damping"):
        outer_product_inverse(model, loss, X, y, 0.0)


def test_finite_difference_checks(case):
    H, _ = case
    check.check_gradient(H).raise_if_failed()
    check.check_hvp(H).raise_if_failed()


def test_check_stage_catches_a_wrong_block():
    torch.manual_seed(0)
    W = torch.randn(3, 3, dtype=DT)
    st = hessinv.Stage(lambda z, p: torch.tanh(z @ p[0].T), (W,))
    z = torch.randn(4, 3, dtype=DT)
    rep = check.check_stage(st, z)
    assert rep.ok and set(rep.errors) == {"Jz", "Jx", "Tzz", "Tzx", "Txx"}
    blk = hessinv.derivatives.stage_blocks(
        st,
        z,
        torch.randn(4, 3, dtype=DT, generator=torch.Generator().manual_seed(0)),
        first=False,
        last=False,
    )
    blk.Tzx = blk.Tzx * 1.01
    bad = check.check_stage(st, z, blocks=blk)
    assert not bad.ok and bad.errors["Tzx"] > 1e-3
    with pytest.raises(AssertionError, match="Tzx"):
        bad.raise_if_failed()
    loss = hessinv.Stage(lambda z, p: ((z @ p[0].T) ** 2).sum(), (W,))
    assert check.check_stage(loss, z, last=True).ok
