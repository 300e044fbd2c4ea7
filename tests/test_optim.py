"""Newton-type optimizers: exact shifted solves, proven steps, trust-region geometry, protocol."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from cases import DT
from torch import nn
from torch.func import functional_call, hessian, jacrev

import hessinv
from hessinv.cli import make_mlp
from hessinv.errors import SingularHessianError
from hessinv.optim import Newton, ShiftedSolver, Spectrum
from hessinv.optim.cholesky import ShiftedCholesky
from hessinv.optim.curvature import kernel_spectrum
from hessinv.optim.factored import FactoredSolver

CONFIGS = [
    (s, c, f)
    for s in ("trust-region", "levenberg-marquardt")
    for c, f in (
        ("hessian", "dense"),
        ("hessian", "eigh"),
        ("gauss-newton", "kernel"),
        ("gauss-newton", "dense"),
    )
]


@pytest.mark.parametrize("strategy,curvature,route", CONFIGS)
def test_accepted_steps_decrease_loss_certified_and_stay_in_region(strategy, curvature, route):
    model, loss, X, y = make_mlp(5, 4, 6, dtype=DT, device="cpu", seed=1)
    opt = Newton(
        model, loss, strategy=strategy, curvature=curvature, radius=0.5, factorization=route
    )
    for _ in range(8):
        with torch.no_grad():
            before = float(loss(model(X), y))
        ret = opt.step(X, y)
        with torch.no_grad():
            after = float(loss(model(X), y))
        h = opt.history[-1]
        assert ret == pytest.approx(before, rel=1e-12)
        assert h.route == route and h.certified, h.certificate
        assert set(h.times) >= {"gradient", "curvature", "decompose", "subproblem", "evaluate"}
        assert sum(h.times.values()) == pytest.approx(h.seconds, rel=1e-6)
        if h.accepted:
            assert after < before and h.actual > 0 and h.rho > opt.eta
            assert after == pytest.approx(h.new_loss, rel=1e-12)
        else:
            assert after == pytest.approx(before, rel=1e-12)
        if strategy == "trust-region":
            assert h.step_norm <= h.radius * (1 + 1e-12)
    assert opt.history[-1].new_loss < opt.history[0].loss


def _random_symmetric(n, neg, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    w = torch.linspace(0.5, 3.0, n, dtype=DT)
    w[:neg] = -torch.linspace(1.0, 2.0, neg, dtype=DT)
    return q @ torch.diag(w) @ q.T, torch.randn(n, generator=g, dtype=DT)


@pytest.mark.parametrize("neg", [0, 1, 2, 3])
def test_trust_region_solution_satisfies_more_sorensen_conditions(neg):
    """Global optimality: (H + lam I) s = -g, H + lam I >= 0, lam (r - |s|) = 0."""
    H, g = _random_symmetric(12, neg, seed=neg)
    w, q = torch.linalg.eigh(H)
    solver = ShiftedSolver(Spectrum(w, q, 12, how="test"), g)
    for radius in (0.05, 0.5, 5.0, 50.0):
        lam, extra, _ = solver.trust_region(radius, tol=1e-10)
        assert extra is None
        s = solver.step(lam)
        ref = torch.linalg.solve(H + lam * torch.eye(12, dtype=DT), -g)
        assert torch.allclose(s, ref, rtol=1e-9, atol=1e-12)
        assert float(torch.linalg.eigvalsh(H + lam * torch.eye(12, dtype=DT))[0]) > 0
        n = float(torch.linalg.vector_norm(s))
        assert n <= radius * (1 + 1e-12)
        assert lam == 0.0 or n >= radius * (1 - 1e-10)
        model = float(g @ s + 0.5 * s @ H @ s)
        assert solver.predicted(lam) == pytest.approx(-model, rel=1e-9)


def test_trust_region_hard_case():
    """H = diag(-1, 1, 2), g orthogonal to the negative eigenvector: a boundary step."""
    X = torch.eye(3, dtype=DT)
    y = torch.tensor([[-1.0, 0.0], [1.0, 1.0], [2.0, 1.0]], dtype=DT)

    def loss(out, t):
        return (0.5 * t[:, :1] * out**2 + t[:, 1:] * out).sum()

    for route in ("dense", "eigh", "lifted"):
        model = nn.Linear(3, 1, bias=False).to(DT)
        with torch.no_grad():
            model.weight.zero_()
        opt = Newton(model, loss, radius=2.0, factorization=route)
        opt.step(X, y)
        h = opt.history[-1]
        assert h.hard_case and h.accepted, route
        assert h.step_norm == pytest.approx(2.0, rel=1e-6)
        assert abs(float(model.weight.detach()[0, 0])) > 1.5  # along the negative direction


def test_certificate_is_not_fooled_by_parity():
    """Two negative eigenvalues (det(H + lam I) > 0 for small lam): never certified."""
    H, g = _random_symmetric(8, 2, seed=5)
    w, q = torch.linalg.eigh(H)
    spec = Spectrum(w, q, 8, how="test")
    assert torch.linalg.det(H + 0.5 * torch.eye(8, dtype=DT)) > 0  # the parity trap
    assert not spec.certified(0.5) and not spec.certified(1.9) and spec.certified(2.1)
    # the optimizer's Levenberg-Marquardt shift on such a Hessian clears lambda_min
    X = torch.eye(3, dtype=DT)
    y = torch.tensor([[-1.0, 1.0], [-2.0, 1.0], [3.0, 1.0]], dtype=DT)

    def loss(out, t):
        return (0.5 * t[:, :1] * out**2 + t[:, 1:] * out).sum()

    for route in ("dense", "eigh"):
        model = nn.Linear(3, 1, bias=False).to(DT)
        opt = Newton(
            model,
            loss,
            strategy="levenberg-marquardt",
            damping=1e-9,
            min_damping=1e-12,
            factorization=route,
        )
        opt.step(X, y)
        h = opt.history[-1]
        assert h.certified and h.damping > 2.0, route
    assert h.min_eigenvalue == pytest.approx(-2.0)
    # the Cholesky proof: refused below lambda_min, given above it
    chol = ShiftedCholesky(H, g)
    assert not chol.prove(0.5)[0] and not chol.prove(1.99)[0] and chol.prove(2.01)[0]
    assert chol.delta(2.01) < 1e-10


def test_unproven_shift_is_raised_until_proven():
    """A shift within round-off of -lambda_min (the Cholesky completes, the proof fails) is
    raised until proven; the certified shift is checked by eigvalsh, the step by solve."""
    H, g = _random_symmetric(10, 2, seed=7)  # lambda_min = -2 exactly up to round-off
    lam_min = float(torch.linalg.eigvalsh(H)[0])
    chol = ShiftedCholesky(H, g)
    lam = -lam_min + 0.5 * chol.delta(-lam_min)  # inside the proof's round-off band
    assert not chol.prove(lam)[0]
    out = chol.proven_shift(lam, torch.zeros_like(g))
    assert out is not None
    lam2, s, how = out
    eye = torch.eye(10, dtype=DT)
    assert lam < lam2 <= lam + 200 * chol.delta(lam) and "raised" in how
    assert float(torch.linalg.eigvalsh(H + lam2 * eye)[0]) > 0
    # the step solves the raised system: normwise backward error of a Cholesky solve
    a = H + lam2 * eye
    res = float(torch.linalg.vector_norm(a @ s + g))
    scale = float(torch.linalg.matrix_norm(a, 2)) * float(torch.linalg.vector_norm(s))
    assert res <= 100 * 10 * 2.2e-16 * (scale + float(torch.linalg.vector_norm(g)))
    # a shift proven at once is kept as it is
    lam3, s3, _ = chol.proven_shift(-lam_min + 0.5, torch.ones_like(g))
    assert lam3 == -lam_min + 0.5 and torch.equal(s3, torch.ones_like(g))


def test_cholesky_trust_region_matches_eigh():
    """The Cholesky iteration's step is the eigendecomposition's within its tolerance."""
    for neg in (0, 2):
        H, g = _random_symmetric(10, neg, seed=11 + neg)
        w, q = torch.linalg.eigh(H)
        exact = ShiftedSolver(Spectrum(w, q, 10, how="test"), g)
        chol = ShiftedCholesky(H, g)
        for radius in (0.1, 1.0):
            lam, s = chol.trust_region(radius, 0.0, iters=50, tol=1e-8)
            lam_e, _, _ = exact.trust_region(radius, tol=1e-10)
            assert lam == pytest.approx(lam_e, rel=1e-6)
            assert torch.allclose(s, exact.step(lam), rtol=1e-9, atol=1e-12)


class _FakeFactorization:
    def __init__(self, verdict, inertia, singular=False):
        self.verdict, self._inertia, self.singular = verdict, inertia, singular

    def _definite_proof(self):  # the proof; the zero band is the solve's to count
        return self.verdict

    def inertia(self):
        return self._inertia

    def solve(self, g, check=True):
        if self.singular:
            raise SingularHessianError("an eigenvalue in the zero band")
        return g


class _FakeOperator:
    def __init__(self, verdict, inertia):
        self.fac = _FakeFactorization(verdict, inertia)

    def factor(self, d, method="lifted"):
        return self.fac


@pytest.mark.parametrize(
    "verdict,inertia,pd,certified",
    [
        (True, (3, 0, 0), True, True),
        (None, (3, 0, 0), True, False),  # an inertia count alone is not a proof
        (False, (3, 0, 0), False, False),  # a proof of indefiniteness wins over the count
        (None, (1, 2, 0), False, False),
    ],
)
def test_factored_route_certifies_only_by_proof(verdict, inertia, pd, certified):
    g = torch.ones(3, dtype=DT)
    t = FactoredSolver(_FakeOperator(verdict, inertia), 1.0, g).trial(1.0)
    assert t.pd is pd and t.certified is certified
    assert ("unverified" in t.how) is (not certified)


def test_factored_route_proof_of_a_numerically_singular_shift_is_not_definite():
    """A Cholesky-type proof with eigenvalues in the zero band: the solve refuses, no step."""
    op = _FakeOperator(True, (3, 0, 0))
    op.fac.singular = True
    t = FactoredSolver(op, 1.0, torch.ones(3, dtype=DT)).trial(1.0)
    assert not t.pd and not t.certified and t.s is None
    assert t.how == "numerically singular"


def _outputs(model, X):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def out(v):
        d, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            d[n] = v[i : i + s.numel()].reshape(s)
            i += s.numel()
        return functional_call(model, d, (X,)).reshape(-1)

    return out


@pytest.mark.parametrize("loss", [nn.MSELoss(), nn.CrossEntropyLoss()], ids=["mse", "xent"])
def test_kernel_spectrum_matches_dense_gauss_newton(loss):
    """Kernel-form spectrum against J^T Lambda J from torch.func (Lambda singular for xent)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    X = torch.randn(5, 3, dtype=DT)
    y = torch.randn(5, 3, dtype=DT) if isinstance(loss, nn.MSELoss) else torch.arange(5) % 3
    spec = kernel_spectrum(model, list(model.parameters()), loss, X, y, 1.0)
    out = _outputs(model, X)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    J = jacrev(out)(flat)
    Lam = hessian(lambda o: loss(o.reshape(5, 3), y))(out(flat).detach())
    G = J.T @ Lam @ J
    rec = spec.q @ torch.diag(spec.w) @ spec.q.T
    assert torch.allclose(rec, G, rtol=0, atol=1e-12 * float(G.abs().max()))
    ref = torch.linalg.eigvalsh(G)
    top = ref[-spec.w.numel() :]
    assert torch.allclose(spec.w, top, rtol=0, atol=1e-12 * float(ref.abs().max()))
    g = torch.randn(flat.numel(), dtype=DT)
    s = ShiftedSolver(spec, g).step(1e-3)
    x = torch.linalg.solve(G + 1e-3 * torch.eye(flat.numel(), dtype=DT), -g)
    assert torch.allclose(s, x, rtol=1e-8, atol=1e-10 * float(x.abs().max()))


def test_kernel_spectrum_reads_log_softmax_nll_as_cross_entropy():
    """LogSoftmax + NLLLoss: the kernel route's G is that of cross-entropy on the logits
    (as hessinv.GaussNewton's), checked against J^T Lambda J from torch.func."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3), nn.LogSoftmax(dim=1))
    model = model.to(DT)
    X = torch.randn(6, 3, dtype=DT)
    y = torch.arange(6) % 3
    spec = kernel_spectrum(model, list(model.parameters()), nn.NLLLoss(), X, y, 1.0)
    logits = _outputs(model[:-1], X)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    J = jacrev(logits)(flat)
    Lam = hessian(lambda o: nn.functional.cross_entropy(o.reshape(6, 3), y))(logits(flat).detach())
    G = J.T @ Lam @ J
    rec = spec.q @ torch.diag(spec.w) @ spec.q.T
    assert float(G.abs().max()) > 1e-3  # not the literal (zero) Gauss-Newton matrix of NLL
    assert torch.allclose(rec, G, rtol=0, atol=1e-12 * float(G.abs().max()))


def test_kernel_spectrum_refuses_a_loss_coupling_samples():
    model, _, X, y = make_mlp(3, 3, 4, dtype=DT, device="cpu")

    def coupled(out, t):
        return ((out - t).sum()) ** 2

    opt = Newton(model, coupled, strategy="levenberg-marquardt", curvature="gauss-newton")
    with pytest.raises(ValueError, match="couples samples"):
        opt.step(X, y)


def test_gauss_newton_refuses_a_nonconvex_loss():
    model, _, X, y = make_mlp(3, 3, 4, dtype=DT, device="cpu")

    def concave(out, t):
        return -((out - t) ** 2).sum()

    opt = Newton(model, concave, curvature="gauss-newton", factorization="kernel")
    with pytest.raises(ValueError, match="negative curvature"):
        opt.step(X, y)


@pytest.mark.parametrize("strategy", ["trust-region", "levenberg-marquardt"])
def test_scale_invariance(strategy):
    """Loss * c gives the same steps (radius in parameter units, damping relative to |C|)."""
    runs = []
    for c in (1.0, 1e-12, 1e12):
        model, loss, X, y = make_mlp(4, 3, 6, dtype=DT, device="cpu", seed=7)
        opt = Newton(
            model,
            lambda out, t, loss=loss, c=c: c * loss(out, t),
            strategy=strategy,
            curvature="gauss-newton" if strategy == "levenberg-marquardt" else "hessian",
        )
        for _ in range(4):
            opt.step(X, y)
        runs.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    for r in runs[1:]:
        assert torch.allclose(r, runs[0], rtol=1e-8, atol=1e-10)


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
            damping=1e-14,
            min_damping=1e-14,
        )
        opt.step(X, y)
        A = torch.cat([X, torch.ones(20, 1, dtype=DT)], dim=1)
        sol = torch.linalg.lstsq(A, y).solution  # (4, 2): W^T stacked over b
        assert torch.allclose(model.weight.detach(), sol[:3].T, atol=1e-9)
        assert torch.allclose(model.bias.detach(), sol[3], atol=1e-9)
        assert opt.history[-1].rho == pytest.approx(1.0, abs=1e-6)


def test_lifted_route_steps():
    model, loss, X, y = make_mlp(4, 3, 6, dtype=DT, device="cpu", seed=3)
    for strategy in ("trust-region", "levenberg-marquardt"):
        m = copy.deepcopy(model)
        opt = Newton(m, loss, strategy=strategy, factorization="lifted", radius=0.5)
        for _ in range(3):
            opt.step(X, y)
        h = opt.history
        assert all(x.route == "lifted" and x.factorizations >= 1 for x in h)
        for x in h:  # certified only by the factorization's proof, else flagged
            assert x.certified == ("is_positive_definite() proof" in x.certificate)
            assert x.certified or "unverified" in x.certificate
        assert h[-1].new_loss < h[0].loss


def test_optimizer_protocol_state_dict_round_trip_and_resume():
    model, loss, X, y = make_mlp(4, 3, 8, dtype=DT, device="cpu", seed=2)
    opt = Newton(model, loss, curvature_batch=4)
    assert isinstance(opt, torch.optim.Optimizer) and len(opt.param_groups) == 1
    opt.zero_grad()
    for _ in range(3):
        opt.step(X, y)
    state = copy.deepcopy(opt.state_dict())
    model_b = copy.deepcopy(model)
    opt_b = Newton(model_b, loss, curvature_batch=4, radius=123.0, max_radius=1e4, eta=0.2)
    opt_b.load_state_dict(state)
    assert opt_b.radius == opt.radius and opt_b.steps == 3 and opt_b.max_radius == 1e3
    assert opt_b.eta == opt.eta and len(opt_b.history) == 3
    assert opt_b.history[-1] == opt.history[-1]
    opt.step(X, y)
    opt_b.step(X, y)
    for p, q in zip(model.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="strategy"):
        Newton(model, loss, strategy="levenberg-marquardt").load_state_dict(state)
    with pytest.raises(ValueError, match="one parameter group"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)]})
    opt.param_groups[0]["eta"] = 0.3  # hyperparameters are read from the group
    assert opt.eta == 0.3


def test_subsampled_curvature_and_float32():
    model, loss, X, y = make_mlp(4, 4, 64, dtype=torch.float32, device="cpu", seed=3)
    pairs = (("levenberg-marquardt", "gauss-newton"), ("trust-region", "hessian"))
    for strategy, curvature in pairs:
        m = copy.deepcopy(model)
        opt = Newton(m, loss, strategy=strategy, curvature=curvature, curvature_batch=8)
        first = opt.step(X, y)
        for _ in range(5):
            opt.step(X, y)
        with torch.no_grad():
            assert float(loss(m(X), y)) < first
        assert all(h.certified for h in opt.history)
        assert all(math.isfinite(h.new_loss) for h in opt.history)


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
    with pytest.raises(ValueError, match="kernel"):
        Newton(model, loss, factorization="kernel")


def test_dense_factorization_matches_lifted():
    model, loss, X, y = make_mlp(6, 4, 5, dtype=DT, device="cpu", seed=4)
    H = hessinv.Hessian(model, loss, X, y)
    g = H.gradient()
    for d in (1e-2, 1.0):
        a, b = H.factor(d, method="lifted"), H.factor(d, method="dense")
        assert torch.allclose(a.solve(g), b.solve(g), rtol=1e-9, atol=1e-12)
        assert a.inertia() == b.inertia()


def test_kernel_route_agrees_with_the_library_kernel_factorization():
    """The optimizer's own kernel spectrum against ``GaussNewton.factor(method="kernel")``."""
    model, loss, X, y = make_mlp(4, 4, 6, dtype=DT, device="cpu", seed=8)
    spec = kernel_spectrum(model, list(model.parameters()), loss, X, y, 1.0)
    op = hessinv.GaussNewton(model, loss, X, y)
    g = op.gradient()
    solver = ShiftedSolver(spec, g)
    eps = torch.finfo(DT).eps
    for lam in (1e-6, 1e-2, 1.0):
        ref = -op.factor(lam, method="kernel").solve(g)
        cond = (spec.norm + lam) / lam  # both solves carry errors of order eps * cond
        err = float(torch.linalg.vector_norm(solver.step(lam) - ref))
        assert err <= 100 * eps * cond * float(torch.linalg.vector_norm(ref)), (lam, err)
