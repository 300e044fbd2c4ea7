"""The kernel form of the Gauss-Newton matrix against independent dense references.

Reference: ``J`` by ``torch.func.jacrev`` of the model output (``functional_call``),
the loss Hessian in the outputs by ``torch.func.hessian``, ``G = J^T L J``, then
``torch.linalg`` on ``G + lam I``. Zero eigenvalues are counted with the documented
threshold ``W eps ||G + lam I||`` applied to the reference's own eigenvalues, and
every such test asserts a clear gap around the threshold (so the count is not decided
by round-off).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from cases import CASES, DT, _swap_layernorm, build, rel
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import hessinv
from hessinv import SingularHessianError, ggn

EPS = torch.finfo(DT).eps


def ref_ggn(model, loss, X, y):
    """Dense J^T L J, (N, o) from the model's own output."""
    import copy

    ref = _swap_layernorm(copy.deepcopy(model))
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in ref.named_parameters() if p.requires_grad}

    def out_of(flat):
        ps, i = {}, 0
        for n in names:
            k = params[n].numel()
            ps[n] = flat[i : i + k].reshape(params[n].shape)
            i += k
        return torch.func.functional_call(ref, ps, (X,))

    flat = torch.cat([params[n].reshape(-1) for n in names])
    out = out_of(flat)
    J = torch.func.jacrev(out_of)(flat).reshape(out.numel(), -1)
    Hl = torch.func.hessian(lambda o: loss(o.reshape(out.shape), y))(out.reshape(-1).detach())
    return J.T @ Hl.reshape(out.numel(), out.numel()) @ J, out[0].numel()


def zero_tol(ev):
    """The protocol's band: W eps ||A|| for the eigenvalues ``ev`` of ``A``."""
    return ev.numel() * torch.finfo(ev.dtype).eps * float(ev.abs().max())


def ref_inertia(ev, tol):
    return (int((ev > tol).sum()), int((ev < -tol).sum()), int((ev.abs() <= tol).sum()))


def assert_gap(ev, tol, factor=10.0):
    """No reference eigenvalue within ``factor`` of the zero threshold, either side."""
    a = ev.abs()
    assert not bool(((a > tol / factor) & (a < tol * factor)).any()), "no clear gap"


def backward_error(A, x, g):
    return float(
        torch.linalg.norm(A @ x - g)
        / (torch.linalg.norm(A, 2) * torch.linalg.norm(x) + torch.linalg.norm(g))
    )


def nll_as_ce(model, loss):
    mods = list(model)
    if isinstance(loss, nn.NLLLoss) and isinstance(mods[-1], nn.LogSoftmax):
        return nn.Sequential(*mods[:-1]), nn.CrossEntropyLoss(reduction=loss.reduction)
    return model, loss


KCASES = [c for c in CASES]


@pytest.mark.parametrize("c", KCASES, ids=lambda c: c.name)
def test_kernel_against_dense(c):
    model, loss, X, y = build(c)
    G = hessinv.GaussNewton(model, loss, X, y)
    ref, o = ref_ggn(*nll_as_ce(model, loss), X, y)
    W, no = G.num_params, X.shape[0] * o
    assert rel(G.to_dense(), ref) <= 1e-12
    ev = torch.linalg.eigvalsh(ref)
    tol = zero_tol(ev)
    assert_gap(ev, tol)
    eye = torch.eye(W, dtype=DT)
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(W, 3, dtype=DT, generator=gen)
    # lam = 0: the rank is at most N o; inertia exact, solve refuses when singular
    inert = G.inertia(0.0)
    assert inert == ref_inertia(ev, tol) and inert[1] == 0
    assert inert.verified and "SVD" in inert.how
    fac0 = G.factor(0.0, method="kernel")
    if inert[2]:
        with pytest.raises(SingularHessianError, match="damping"):
            G.solve(g, method="kernel")
        assert G.logdet(0.0) == (0.0, -math.inf)
        assert fac0.is_positive_definite() is False
    # lam > 0 and lam < 0 (between two nonzero eigenvalues of G, or below all of them)
    pos = ev[ev > tol]
    gaps = [i for i in range(len(pos) - 1) if pos[i + 1] > 1.5 * pos[i]]
    mid = -0.5 * float(pos[gaps[0]] + pos[gaps[0] + 1]) if gaps else -0.5 * float(pos[0])
    lams = [1e-2, float(pos.median()), mid]
    for lam in lams:
        A = ref + lam * eye
        eva = ev + lam
        x = G.solve(g, damping=lam, method="kernel")
        xd = torch.linalg.solve(A, g)
        assert backward_error(A, x, g) <= 10 * max(backward_error(A, xd, g), EPS)
        cond = float(eva.abs().max() / eva.abs().min())
        assert rel(x, xd) <= 10 * cond * EPS * max(W, no)
        assert G.inertia(lam) == ref_inertia(eva, zero_tol(eva))
        s, la = G.logdet(lam)
        s_ref, la_ref = torch.linalg.slogdet(A)
        assert s == float(s_ref)
        assert abs(la - float(la_ref)) <= 1e-10 * max(1.0, abs(float(la_ref)))
        assert G.factor(lam, method="kernel").is_positive_definite() is (True if lam > 0 else False)


def test_logsoftmax_nll_is_cross_entropy_on_logits():
    model, loss, X, y = build(next(c for c in CASES if c.name == "elu_leaky_nll_sum"))
    G = hessinv.GaussNewton(model, loss, X, y)
    head = nn.Sequential(*list(model)[:-1])
    G_ce = hessinv.GaussNewton(head, nn.CrossEntropyLoss(reduction="sum"), X, y)
    ref, _ = ref_ggn(head, nn.CrossEntropyLoss(reduction="sum"), X, y)
    assert float(torch.linalg.norm(ref)) > 1e-3  # not the literal (zero) Gauss-Newton matrix
    assert rel(G.to_dense(), ref) <= 1e-12
    assert rel(G_ce.to_dense(), ref) <= 1e-12
    v = torch.randn(G.num_params, 2, dtype=DT)
    assert rel(G.solve(v, damping=0.1, method="lifted"), G.solve(v, damping=0.1)) <= 1e-10
    assert G._split.folded and not G_ce._split.folded


def digits_cnn(n, seed=0, dtype=DT):
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.images[:n], dtype=dtype).unsqueeze(1) / 16.0
    y = torch.tensor(d.target[:n])
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.Tanh(),
        nn.Conv2d(4, 4, 3, stride=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).to(dtype)
    return model, nn.CrossEntropyLoss(), X, y


def test_conv_net_on_digits_inertia_is_exact():
    """Rank N (o - 1) (the softmax Hessian annihilates the all-ones direction)."""
    model, loss, X, y = digits_cnn(4)
    G = hessinv.GaussNewton(model, loss, X, y)
    W = G.num_params
    ref, o = ref_ggn(model, loss, X, y)
    ev = torch.linalg.eigvalsh(ref)
    tol = zero_tol(ev)
    assert_gap(ev, tol)
    assert ref_inertia(ev, tol) == (4 * 9, 0, W - 36)
    assert G.inertia(0) == (36, 0, W - 36)
    assert G._blocks is None  # no lifted stage block was built
    with warnings.catch_warnings():  # the lifted count on this singular G may be overruled
        warnings.simplefilter("ignore", hessinv.LiftedPrecisionWarning)
        assert G.inertia(0, method="lifted")[1] == 0
    assert G.inertia(1e-3) == (W, 0, 0)
    assert G.factor(0.0).is_positive_definite() is False
    assert G.factor(1e-3).is_positive_definite() is True


def test_full_rank_at_zero_damping():
    """W <= N o and J of full column rank: lam = 0 solves, and is certified PD."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    X, y = torch.randn(40, 3, dtype=DT), torch.randn(40, 2, dtype=DT)
    G = hessinv.GaussNewton(model, nn.MSELoss(reduction="sum"), X, y)
    ref, _ = ref_ggn(model, nn.MSELoss(reduction="sum"), X, y)
    g = torch.randn(G.num_params, dtype=DT)
    x = G.solve(g, method="kernel")
    xd = torch.linalg.solve(ref, g)
    cond = float(torch.linalg.cond(ref))
    assert rel(x, xd) <= 10 * cond * EPS * 80
    assert G.inertia(0) == (G.num_params, 0, 0)
    assert G.factor(0.0).is_positive_definite() is True
    s, la = G.logdet(0.0)
    assert s == 1.0 and abs(la - float(torch.linalg.slogdet(ref)[1])) <= 1e-10 * abs(la)
    # a shift just below the smallest eigenvalue's negative: indefinite, one negative
    lam = -1.01 * float(torch.linalg.eigvalsh(ref)[0])
    assert G.inertia(lam) == (G.num_params - 1, 1, 0)
    assert G.factor(lam).is_positive_definite() is False


@pytest.mark.parametrize("c", [1e-12, 1e12])
def test_loss_scale_invariance(c):
    model, loss, X, y = build(next(k for k in CASES if k.name == "gelu_ce_uneven_n16"))
    G = hessinv.GaussNewton(model, loss, X, y)
    Gc = hessinv.GaussNewton(model, lambda out, t: c * loss(out, t), X, y)
    g = torch.randn(G.num_params, dtype=DT)
    for lam in (1e-2, -0.3):
        x, xc = G.solve(g, damping=lam), Gc.solve(g, damping=c * lam)
        assert rel(c * xc, x) <= 1e-10
        assert Gc.inertia(c * lam) == G.inertia(lam)
        (s, la), (sc, lac) = G.logdet(lam), Gc.logdet(c * lam)
        assert s == sc and abs(lac - la - G.num_params * math.log(c)) <= 1e-10 * abs(lac)
    assert Gc.inertia(0.0) == G.inertia(0.0)
    for H in (G, Gc):
        with pytest.raises(SingularHessianError):
            H.solve(g, damping=0.0)


def test_float32_against_float64_reference():
    model, loss, X, y = build(next(k for k in CASES if k.name == "silu_softplus_bce"))
    ref, o = ref_ggn(model, loss, X, y)
    m32 = model.float()
    G = hessinv.GaussNewton(m32, loss, X.float(), y.float())
    W = G.num_params
    g = torch.randn(W, dtype=torch.float32)
    lam = 0.1
    A = ref + lam * torch.eye(W, dtype=DT)
    x = G.solve(g, damping=lam)
    xd = torch.linalg.solve(A, g.double())
    cond = float(torch.linalg.cond(A))
    eps32 = torch.finfo(torch.float32).eps
    assert rel(x.double(), xd) <= 10 * cond * eps32 * max(W, X.shape[0] * o)
    ev = torch.linalg.eigvalsh(ref)
    tol32 = W * eps32 * float(ev.max())
    assert_gap(ev, tol32)
    assert G.inertia(0.0) == ref_inertia(ev, tol32)
    assert G.inertia(lam) == (W, 0, 0)


def test_nonconvex_loss_refuses_the_kernel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    X, y = torch.randn(5, 3, dtype=DT), torch.randn(5, 2, dtype=DT)

    def loss(out, t):
        return torch.cos(out - t).sum()

    G = hessinv.GaussNewton(model, loss, X, y)
    with pytest.raises(ValueError, match="lifted"):
        G.factor(0.1, method="kernel")
    ref, _ = ref_ggn(model, loss, X, y)
    assert rel(G.to_dense(), ref) <= 1e-12  # products still exact (J^T L J)
    A = ref + 0.1 * torch.eye(G.num_params, dtype=DT)
    ev = torch.linalg.eigvalsh(A)
    assert G.inertia(0.1) == (int((ev > 0).sum()), int((ev < 0).sum()), 0)  # auto: lifted


def test_loss_coupling_samples_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2)).to(DT)
    X, y = torch.randn(4, 3, dtype=DT), torch.randn(4, 2, dtype=DT)
    # refused at construction by hessinv.validate.check_no_mixing, else lazily here
    with pytest.raises(ValueError, match="couples samples|mixes samples"):
        G = hessinv.GaussNewton(model, lambda out, t: (out - t).sum() ** 2, X, y)
        G.inertia(0.1)


def test_vector_forms_laziness_and_matrix_free_products(monkeypatch):
    model, loss, X, y = build(next(k for k in CASES if k.name == "conv2d_ce"))
    G = hessinv.GaussNewton(model, loss, X, y)
    ref, _ = ref_ggn(model, loss, X, y)
    V = torch.randn(G.num_params, 2, dtype=DT)
    monkeypatch.setattr(ggn, "J_MEMORY_BUDGET", 0)
    assert rel(G @ V, ref @ V) <= 1e-12  # jvp / vjp, no J
    assert G._kern is None
    monkeypatch.undo()
    assert rel(G @ V, ref @ V) <= 1e-12
    assert rel(G.diagonal(), torch.diagonal(ref)) <= 1e-12
    blocks = G.block_diagonal()
    assert rel(blocks[0], ref[: blocks[0].shape[0], : blocks[0].shape[0]]) <= 1e-12
    assert G._blocks is None
    g_list = [torch.randn(p.shape, dtype=DT) for p in model.parameters()]
    x_list = G.solve(g_list, damping=0.5)
    flat = torch.cat([t.reshape(-1) for t in g_list])
    A = ref + 0.5 * torch.eye(G.num_params, dtype=DT)
    assert rel(torch.cat([t.reshape(-1) for t in x_list]), torch.linalg.solve(A, flat)) <= 1e-12
    assert rel(G.inverse(0.5) @ flat, torch.linalg.solve(A, flat)) <= 1e-12
    x_lift = G.solve(flat, damping=0.5, method="lifted")
    assert G._blocks is not None
    assert rel(x_lift, torch.linalg.solve(A, flat)) <= 1e-10
    c = G.cost_model()
    assert set(c) == {"kernel", "lifted", "dense"} and c["kernel"] > 0
    assert G.costs()["kernel"][1] == G.kernel_cost()["bytes"] > 0
    with pytest.raises(MemoryError, match="GiB"):
        hessinv.GaussNewton(model, loss, X, y, max_memory=1000).factor(0.5, method="kernel")


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 6),
    widths=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    o=st.integers(1, 3),
    kind=st.sampled_from(["mse_sum", "mse_mean", "ce", "bce"]),
    lam=st.sampled_from([0.0, 1e-3, 1.0, -0.05]),
    seed=st.integers(0, 2**16),
)
def test_random_mlps(n, widths, o, kind, lam, seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dims = [2, *widths]
    mods = []
    for a, b in zip(dims[:-1], dims[1:], strict=True):
        mods += [nn.Linear(a, b), nn.Tanh()]
    mods.append(nn.Linear(dims[-1], o))
    model = nn.Sequential(*mods).to(DT)
    X = torch.randn(n, 2, dtype=DT, generator=gen)
    if kind == "ce":
        loss, y = nn.CrossEntropyLoss(), torch.randint(0, o, (n,), generator=gen)
    elif kind == "bce":
        loss = nn.BCEWithLogitsLoss(reduction="sum")
        y = torch.rand(n, o, dtype=DT, generator=gen)
    else:
        loss = nn.MSELoss(reduction=kind[4:])
        y = torch.randn(n, o, dtype=DT, generator=gen)
    G = hessinv.GaussNewton(model, loss, X, y)
    ref, _ = ref_ggn(model, loss, X, y)
    W = G.num_params
    ev = torch.linalg.eigvalsh(ref)
    tol = zero_tol(ev + lam)
    a = (ev + lam).abs()
    if bool(((a > tol / 10) & (a < tol * 10)).any()):
        return  # an eigenvalue at the threshold: the count is round-off, not a test
    assert G.inertia(lam) == ref_inertia(ev + lam, tol)
    g = torch.randn(W, dtype=DT, generator=gen)
    if G.inertia(lam)[2]:
        with pytest.raises(SingularHessianError):
            G.solve(g, damping=lam)
        return
    A = ref + lam * torch.eye(W, dtype=DT)
    x = G.solve(g, damping=lam)
    xd = torch.linalg.solve(A, g)
    assert backward_error(A, x, g) <= 10 * max(backward_error(A, xd, g), EPS)


@pytest.mark.parametrize("n,damping", [(3, 1e-2), (3, -1e-3), (40, 1e-2), (40, 0.0)])
def test_gauss_newton_inverse_diagonal_against_dense_inverse(n, damping):
    """diag((G + dI)^-1) (the kernel's SVD where it is cheaper, else selected inversion)
    against ``torch.linalg.inv`` of an independent ``J^T (2/(N o)) J`` (MSE, mean)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    X = torch.randn(n, 3, dtype=torch.float64)
    y = torch.randn(n, 2, dtype=torch.float64)
    G = hessinv.GaussNewton(model, nn.MSELoss(), X, y)
    names = [k for k, _ in model.named_parameters()]
    x0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def out(flat):
        ps, i = {}, 0
        for k, p in zip(names, model.parameters(), strict=True):
            ps[k] = flat[i : i + p.numel()].reshape(p.shape)
            i += p.numel()
        return torch.func.functional_call(model, ps, (X,)).reshape(-1)

    J = torch.func.jacrev(out)(x0)
    A = J.T @ J * (2.0 / J.shape[0]) + damping * torch.eye(x0.numel(), dtype=torch.float64)
    if damping == 0.0 and n * 2 < x0.numel():
        with pytest.raises(hessinv.SingularHessianError):
            G.inverse_diagonal(damping)
        return
    ref = torch.diagonal(torch.linalg.inv(A))
    cond = float(torch.linalg.cond(A))
    got = G.inverse_diagonal(damping)
    err = float((got - ref).abs().max() / ref.abs().max())
    assert err <= 100 * cond * torch.finfo(torch.float64).eps, (err, cond)
