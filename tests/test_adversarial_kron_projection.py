"""Adversarial tests of the batched Kronecker projections of runs of Linear stages (adv16).

Targets: ``kron_projection.project_run`` / ``lifted.projected_all`` (kept bases and projected
blocks of runs of ``nn.Linear`` stages from their factors), the lazy ``StageBlocks.Txx``
(``LazyBlock``, ``txx_absmax``), ``KronStack.t/q`` and the zero band ``W eps max(||H + dI||,
||H|| + |d|)``. Every number is judged against independent references: ``torch.func.hessian``
of the loss in the flat parameters (``cases.dense_hessian``), ``J^T Lambda J`` by
``torch.func.jacrev`` for Gauss-Newton, and ``torch.linalg`` (``eigvalsh``, ``slogdet``,
``inv``). Eigenvalues within 100x of the band edge are treated as ambiguous.

A fuzz of ~400 random pipelines (runs of equal widths then a change, bias or not, batches 1..8,
widths 1..8, tanh/sigmoid/softplus/ELU/SiLU/ReLU/no tail, LayerNorm and Softmax interleaved,
MSE mean/sum, CrossEntropy, a custom loss, loss scales 1e-12 and 1e12, float32 and float64,
Hessian and GaussNewton, dampings 1e-12 ||H|| .. 1e3 ||H||, negative and 0) found no wrong number
from the projections; the one defect it found is in the elementwise closed forms at a kink
(tests at the end, strict xfails until fixed), where the factored and generic routes disagreed.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from cases import dense_hessian, reference_loss_fn
from torch import nn

import hessinv
from hessinv.kron_projection import factored_stage
from hessinv.lifted import projected_all

DT = torch.float64


def _bwd(a: torch.Tensor, x: torch.Tensor, g: torch.Tensor) -> float:
    """Normwise backward error of ``x`` for ``a x = g`` (float64 reference ``a``)."""
    x, g = x.to(DT), g.to(DT)
    den = torch.linalg.matrix_norm(a, 2) * x.norm() + g.norm()
    return float((a @ x - g).norm() / den)


def _mlp(spec: list, a0: int, dt: torch.dtype = DT, seed: int = 0, wscale: float = 1.0):
    """``spec``: ``(width, bias, tail)`` per Linear stage; ``tail`` a module class or None."""
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    a = a0
    for w, bias, tail in spec:
        mods.append(nn.Linear(a, w, bias=bias))
        if tail is not None:
            mods.append(tail(w) if tail in (nn.LayerNorm,) else tail())
        a = w
    m = nn.Sequential(*mods).to(dt)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(wscale)
    return m


def _softmax() -> nn.Module:
    return nn.Softmax(dim=1)


# runs of equal shapes, a change of width, zero-curvature tails (ReLU, none), non-diagonal
# tails (LayerNorm, Softmax) interleaved
DEEP = [
    (3, True, nn.Tanh), (3, True, nn.Sigmoid), (3, True, nn.Softplus), (3, True, nn.ELU),
    (5, False, nn.SiLU), (5, False, nn.ReLU), (5, False, None), (5, True, nn.LayerNorm),
    (5, True, nn.Tanh), (4, True, _softmax), (4, True, nn.Tanh), (2, True, None),
]  # fmt: skip
SHALLOW = [(1, True, nn.Tanh), (1, False, nn.Sigmoid), (3, True, None)]
WIDE_BATCH = [(2, True, nn.Tanh), (2, True, nn.Tanh), (2, False, nn.SiLU), (2, True, None)]


def _case(name: str, scale: float, kind: str):
    g = torch.Generator().manual_seed(7)
    if name == "deep":
        model, n, a0 = _mlp(DEEP, 3, wscale=1.5), 2, 3
    elif name == "shallow":
        model, n, a0 = _mlp(SHALLOW, 1), 1, 1
    else:  # batch wider than every layer: the stages keep all directions (Q = I)
        model, n, a0 = _mlp(WIDE_BATCH, 2), 9, 2
    X = torch.randn(n, a0, generator=g, dtype=DT)
    o = model[-1].out_features if isinstance(model[-1], nn.Linear) else model[-2].out_features
    if kind == "ce":
        base, y = nn.CrossEntropyLoss(), torch.randint(0, o, (n,), generator=g)
    elif kind == "msesum":
        base, y = nn.MSELoss(reduction="sum"), torch.randn(n, o, generator=g, dtype=DT)
    elif kind == "custom":

        def base(out, t):  # noqa: ANN001, ANN202
            return torch.cosh(out - t).sum() / out.shape[0]

        y = torch.randn(n, o, generator=g, dtype=DT)
    else:
        base, y = nn.MSELoss(), torch.randn(n, o, generator=g, dtype=DT)

    def loss(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return scale * base(out, t)

    return model, loss, X, y


CASES = [
    ("deep", 1.0, "mse"), ("deep", 1e12, "ce"), ("deep", 1e-12, "custom"),
    ("shallow", 1.0, "msesum"), ("shallow", 1e-12, "mse"), ("wide", 1e12, "msesum"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "scale", "kind"), CASES)
def test_every_route_exact(name: str, scale: float, kind: str) -> None:
    """Solve (auto and lifted), inertia, logdet, definiteness, inverse (block) diagonal at
    tiny, moderate, negative and large dampings, the second factorization reusing the cached
    projections, against torch.func.hessian + torch.linalg."""
    model, loss, X, y = _case(name, scale, kind)
    H = hessinv.Hessian(model, loss, X, y)
    ref = dense_hessian(model, loss, X, y)
    p = ref.shape[0]
    eps = torch.finfo(DT).eps
    hn = float(torch.linalg.eigvalsh(ref).abs().max())
    g = torch.randn(p, dtype=DT, generator=torch.Generator().manual_seed(1))
    checked = 0
    for f in (1e-12, 0.3, -0.2, 1e3, 0.05):  # 0.05 after 0.3: cached projections reused
        d = f * hn
        A = ref + d * torch.eye(p, dtype=DT)
        ev = torch.linalg.eigvalsh(A)
        t = p * eps * max(float(ev.abs().max()), hn + abs(d))
        amb = bool(((ev.abs() > t / 100) & (ev.abs() < 100 * t)).any())
        well = float(ev.abs().min()) > 1e4 * t
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for meth in ("auto", "lifted"):
                if well:
                    x = H.solve(g, damping=d, method=meth)
                    assert _bwd(A, x, g) <= 64 * eps, (meth, f)
                fac = H.factor(d, method=meth)
                inn = fac.inertia()
                if inn.verified and not amb:
                    ref_in = (int((ev > t).sum()), int((ev < -t).sum()))
                    assert (inn.positive, inn.negative) == ref_in, (meth, f, inn)
                    checked += 1
                pd = fac.is_positive_definite()
                assert pd is not True or bool((ev > 0).all())
                if well and float(ev.abs().min()) > 1e-6 * float(ev.abs().max()):
                    s, la = fac.logdet()
                    rs, rl = torch.linalg.slogdet(A)
                    assert s == float(rs)
                    assert abs(la - float(rl)) <= 1e-8 * max(1.0, abs(float(rl))), (meth, f)
        cond = float(ev.abs().max() / ev.abs().min())
        if cond < 1e5:
            Ai = torch.linalg.inv(A)
            dg = H.inverse_diagonal(d)
            assert float((dg - Ai.diagonal()).abs().max() / Ai.diagonal().abs().max()) <= 1e-8
            off = 0
            for B in H.inverse_block_diagonal(d):
                k = B.shape[0]
                err = (B - Ai[off : off + k, off : off + k]).abs().max()
                assert float(err / Ai.abs().max()) <= 1e-8
                off += k
    assert checked >= 5  # the inertias were compared, not all skipped


def test_zero_damping_with_dropped_directions() -> None:
    """Damping 0 on a net whose stages drop directions (batch 1 < width): H is singular; the
    solve refuses, the inertia counts the zeros, eigenvalue_count matches."""
    model, loss, X, y = _case("deep", 1.0, "mse")
    X = X[:1]
    y = y[:1]
    H = hessinv.Hessian(model, loss, X, y)
    ref = dense_hessian(model, loss, X, y)
    p = ref.shape[0]
    ev = torch.linalg.eigvalsh(ref)
    t = p * torch.finfo(DT).eps * float(ev.abs().max())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(hessinv.SingularHessianError):
            H.solve(torch.ones(p, dtype=DT), damping=0.0)
        inn = H.factor(0.0, method="lifted").inertia()
    if not bool(((ev.abs() > t / 100) & (ev.abs() < 100 * t)).any()):
        assert tuple(inn) == (int((ev > t).sum()), int((ev < -t).sum()), int((ev.abs() <= t).sum()))
    for s in (-0.1, 0.1):
        sig = s * float(ev.abs().max())
        assert H.eigenvalue_count(sig) == int((ev < sig).sum())


def _dense_q_checks(H: hessinv.Hessian, Hg: hessinv.Hessian) -> int:
    """Each batched projection equals the generic dense blocks times the dense Q, and Q is
    orthonormal and holds every row of Jx, Tzx and Txx."""
    n = 0
    for keep_all in (False, True):
        for b, bg, pr in zip(H.blocks, Hg.blocks, projected_all(H.blocks, keep_all), strict=True):
            if pr.kron is None:
                continue
            n += 1
            q = pr.q
            k = q.shape[1]
            assert pr.k(b.num_params) == k and not pr.identity
            assert float((q.T @ q - torch.eye(k, dtype=DT)).abs().max()) <= 1e-13
            proj = torch.eye(q.shape[0], dtype=DT) - q @ q.T
            for blk, mine in ((bg.Jx, pr.jx), (bg.Tzx, pr.tzx)):
                if blk is None:
                    assert mine is None
                    continue
                rows = blk.reshape(-1, b.num_params)
                sc = float(rows.abs().max()) + 1e-300
                assert float((rows @ proj).abs().max()) <= 1e-13 * sc  # spanned by Q
                assert float((rows @ q - mine).abs().max()) <= 1e-13 * sc
            if bg.Txx is not None and float(bg.Txx.abs().max()) > 0:
                sc = float(bg.Txx.abs().max())
                assert float((bg.Txx @ proj).abs().max()) <= 1e-13 * sc
                mine = torch.zeros(k, k, dtype=DT) if pr.txx is None else pr.txx
                assert float((q.T @ bg.Txx @ q - mine).abs().max()) <= 1e-13 * sc
    return n


@pytest.mark.parametrize("name", ["deep", "shallow"])
def test_projections_against_generic_blocks(name: str) -> None:
    model, loss, X, y = _case(name, 1.0, "mse")
    H = hessinv.Hessian(model, loss, X, y)
    Hg = hessinv.Hessian(model, loss, X, y, generic=True)
    assert sum(factored_stage(b) for b in H.blocks) >= (6 if name == "deep" else 2)
    assert _dense_q_checks(H, Hg) >= (6 if name == "deep" else 1)


@pytest.mark.parametrize("name", ["deep", "shallow", "wide"])
def test_lazy_txx_matches_generic(name: str) -> None:
    """StageBlocks.Txx formed lazily (after a factorization read it only through its factors)
    equals the generic autodiff block; txx_absmax equals max |Txx|."""
    model, loss, X, y = _case(name, 1.0, "mse")
    H = hessinv.Hessian(model, loss, X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        H.factor(0.1, method="lifted").logdet()
    absmax = [b.txx_absmax() for b in H.blocks]
    assert any(not b.txx_formed for b in H.blocks) or name == "wide"
    Hg = hessinv.Hessian(model, loss, X, y, generic=True)
    for b, bg, am in zip(H.blocks, Hg.blocks, absmax, strict=True):
        mine, theirs = b.Txx, bg.Txx
        if mine is None or theirs is None:
            other = theirs if mine is None else mine
            assert other is None or float(other.abs().max()) == 0.0
            continue
        sc = float(theirs.abs().max()) + 1e-300
        assert float((mine - theirs).abs().max()) <= 1e-13 * sc
        assert am is None or abs(float(am) - float(mine.abs().max())) <= 1e-13 * sc


def _ggn_ref(model: nn.Module, loss, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    f, x0 = reference_loss_fn(model, lambda o, t: o, X, y)
    J = torch.func.jacrev(f)(x0).reshape(-1, x0.numel())
    out = model(X).detach()
    lam = torch.func.hessian(lambda o: loss(o.reshape(out.shape), y))(out.reshape(-1))
    return J.T @ lam @ J


@pytest.mark.parametrize("d", [1e-3, 1.0])
def test_gauss_newton_solve_and_inertia(d: float) -> None:
    model, loss, X, y = _case("deep", 1.0, "ce")
    G = hessinv.GaussNewton(model, loss, X, y)
    ref = _ggn_ref(model, loss, X, y)
    p = ref.shape[0]
    A = ref + d * torch.eye(p, dtype=DT)
    g = torch.randn(p, dtype=DT, generator=torch.Generator().manual_seed(2))
    assert _bwd(A, G.solve(g, damping=d), g) <= 64 * torch.finfo(DT).eps
    fac = G.factor(d)
    assert tuple(fac.inertia())[:2] == (p, 0)
    assert abs(fac.logdet()[1] - float(torch.linalg.slogdet(A)[1])) <= 1e-8 * p
    Ai = torch.linalg.inv(A)
    assert float((G.inverse_diagonal(d) - Ai.diagonal()).abs().max() / Ai.diagonal().max()) <= 1e-8


@pytest.mark.parametrize("scale", [1e-12, 1.0, 1e12])
def test_float32_solve_and_inertia(scale: float) -> None:
    model, loss, X, y = _case("deep", scale, "mse")
    ref = dense_hessian(model, loss, X, y)
    H = hessinv.Hessian(model.to(torch.float32), loss, X.float(), y.float())
    p = ref.shape[0]
    eps = torch.finfo(torch.float32).eps
    hn = float(torch.linalg.eigvalsh(ref).abs().max())
    g = torch.randn(p, generator=torch.Generator().manual_seed(3))
    for f in (0.3, -0.4, 1e3):
        d = f * hn
        A = ref + d * torch.eye(p, dtype=DT)
        ev = torch.linalg.eigvalsh(A)
        t = p * eps * max(float(ev.abs().max()), hn + abs(d))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if float(ev.abs().min()) > 1e4 * t:
                assert _bwd(A, H.solve(g, damping=d), g) <= 64 * eps
            inn = H.factor(d).inertia()
        if inn.verified and not bool(((ev.abs() > t / 100) & (ev.abs() < 100 * t)).any()):
            assert (inn.positive, inn.negative) == (int((ev > t).sum()), int((ev < -t).sum()))


# -- confirmed defect: the closed-form second derivative at a kink differs from torch's ---------


def _kink_case(tail: nn.Module):  # noqa: ANN202
    """Sample 0 reaches ``tail`` with pre-activation exactly 0 (zero input row, zero first bias,
    no second bias), and the first layer's bias moves it: ``Tzz`` at 0 enters ``H``."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2, bias=False), tail, nn.Linear(2, 1)).to(DT)
    with torch.no_grad():
        m[0].bias.zero_()
    X = torch.tensor([[0.0, 0.0], [1.0, -1.0]], dtype=DT)
    y = torch.tensor([[1.0], [0.5]], dtype=DT)
    return m, nn.MSELoss(), X, y


# ELU/SELU closed forms took phi''(0) = alpha (the e^0 branch); torch's double backward gives 0
# at exactly 0 (H was 6% / 2.6% off, the solve's residual 2e-3, no error): a strict xfail until
# ELUDerivatives/SELUDerivatives/CELUDerivatives.d2f took z >= 0.
@pytest.mark.parametrize("tail", [nn.ELU, nn.SELU], ids=["ELU", "SELU"])
def test_elu_second_derivative_at_zero_matches_torch(tail: type) -> None:
    model, loss, X, y = _kink_case(tail())
    ref = dense_hessian(model, loss, X, y)
    H = hessinv.Hessian(model, loss, X, y)
    assert float((H.to_dense() - ref).abs().max() / ref.abs().max()) <= 1e-12


# Softplus at exactly beta x == threshold: phi'' was sigmoid'(x), torch's double backward gives
# 0 there (H was 4% off): a strict xfail until SoftplusDerivatives.d2f took beta z >= threshold.
def test_softplus_at_threshold_matches_torch() -> None:
    lin = nn.Linear(1, 1, bias=False)
    out = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
        out.weight.fill_(0.7)
    model = nn.Sequential(lin, nn.Softplus(beta=1.0, threshold=1.0), out).to(DT)
    X = torch.tensor([[1.0], [0.3]], dtype=DT)
    y = torch.tensor([[0.2], [-0.4]], dtype=DT)
    ref = dense_hessian(model, nn.MSELoss(), X, y)
    H = hessinv.Hessian(model, nn.MSELoss(), X, y)
    assert float((H.to_dense() - ref).abs().max() / ref.abs().max()) <= 1e-12


def test_kink_cases_not_vacuous() -> None:
    """The generic (autodiff) route agrees with the reference on the kink cases: the tests
    above check the closed forms' convention, not the reference's."""
    for tail in (nn.ELU(), nn.SELU()):
        model, loss, X, y = _kink_case(tail)
        ref = dense_hessian(model, loss, X, y)
        Hg = hessinv.Hessian(model, loss, X, y, generic=True)
        assert float((Hg.to_dense() - ref).abs().max() / ref.abs().max()) <= 1e-12
        assert not math.isnan(float(ref.sum()))
