"""The solver contract: exact, or a clear error (hessinv.solvers).

Every reference here is dense float64 linear algebra on ``torch.func.hessian`` of
the loss as a function of the flat parameters (``tests/cases.py``), never hessinv's
own blocks.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from cases import DT, reference_loss_fn
from test_paper import elementwise_pipeline
from torch import nn

import hessinv
from hessinv.solvers import solve_tolerance

EPS = torch.finfo(DT).eps


def _mlp(seed=0, widths=(3, 6, 6, 2)):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(DT)


def _problem(c, seed=0, batch=4):
    """An MLP whose loss is ``c`` times a sum of squares, and the dense reference of the c=1 one."""
    model = _mlp(seed)
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(batch, 3, generator=g, dtype=DT)
    y = torch.randn(batch, 2, generator=g, dtype=DT)

    def loss(o, t):
        return c * ((o - t) ** 2).sum()

    f, x0 = reference_loss_fn(model, lambda o, t: ((o - t) ** 2).sum(), X, y)
    A = torch.func.hessian(f)(x0)
    return hessinv.Hessian(model, loss, X, y), A


def _eta(A, x, g):
    """Normwise backward error with the exact spectral norm."""
    num = torch.linalg.norm(A @ x - g, dim=0)
    nrm = torch.linalg.matrix_norm(A, 2)
    return (num / (nrm * torch.linalg.norm(x, dim=0) + torch.linalg.norm(g, dim=0))).max()


SCALES = [1e-12, 3.3e-7, 1.0, 7.1e5, 1e12]


@pytest.mark.parametrize("c", SCALES)
@pytest.mark.parametrize("d", [1e-3, -0.05, 0.0])
@pytest.mark.parametrize("method", ["lifted", "dense"])
def test_answers_follow_the_loss_scale(c, d, method):
    """Loss ``c l`` at damping ``c d`` answers as ``l`` at ``d`` (c from 1e-12 to 1e12)."""
    H, A1 = _problem(c)
    W = H.num_params
    A = A1 + d * torch.eye(W, dtype=DT)
    ev = torch.linalg.eigvalsh(A)
    t = W * EPS * float(ev.abs().max())  # the documented zero threshold
    assert not ((ev.abs() > 0.1 * t) & (ev.abs() < 10 * t)).any()  # no eigenvalue at the edge
    ref = (int((ev > t).sum()), int((ev < -t).sum()), int((ev.abs() <= t).sum()))
    fac = H.factor(c * d, method)
    assert tuple(fac.inertia()) == ref
    g = torch.randn(W, 2, dtype=DT, generator=torch.Generator().manual_seed(3))
    if ref[2]:
        with pytest.raises(hessinv.SingularHessianError, match="damping"):
            fac.solve(c * g)
        assert fac.logdet() == (0.0, -math.inf)
        return
    x = fac.solve(c * g)  # (cA) x = c g
    assert float(_eta(A, x, g)) <= solve_tolerance(DT)
    s, la = fac.logdet()
    s_ref, la_ref = torch.linalg.slogdet(A)
    tol = 10 * W * EPS * float((ev.abs().max() / ev.abs()).sum())  # eigenvalue perturbation
    assert s == float(s_ref)
    assert abs(la - W * math.log(c) - float(la_ref)) <= tol + 1e-13 * abs(W * math.log(c))


def test_small_eigenvalues_are_not_zeros_at_any_scale():
    """inertia(0) of a singular H counts exact zeros only, not eigenvalues of 1e-3 ||H||."""
    for c in (1e-12, 1.0, 1e12):
        H, A = _problem(c, batch=2)
        ev = torch.linalg.eigvalsh(A)
        t = H.num_params * EPS * float(ev.abs().max())
        small = ev[(ev.abs() > t)].abs().min() / ev.abs().max()
        assert float(small) < 1e-2  # there are small but decidable eigenvalues
        ref = (int((ev > t).sum()), int((ev < -t).sum()), int((ev.abs() <= t).sum()))
        assert ref[2] > 0
        for method in ("lifted", "dense"):
            assert tuple(H.inertia(0.0, method)) == ref, (c, method)


def test_singular_dense_solve_with_g_in_the_range_raises():
    """A singular H with g in its range: every exact method refuses, none returns a vector."""
    H, A = _problem(1.0, batch=1)
    ev, q = torch.linalg.eigh(A)
    t = H.num_params * EPS * float(ev.abs().max())
    rng = q[:, ev.abs() > t]
    g = rng @ torch.randn(rng.shape[1], dtype=DT)  # in the range
    for method in ("auto", "dense", "lifted"):
        with pytest.raises(hessinv.SingularHessianError, match="damping"):
            H.solve(g, method=method)


def test_every_method_meets_the_backward_error():
    H, A1 = _problem(1.0)
    A = A1 + 0.5 * torch.eye(H.num_params, dtype=DT)
    g = torch.randn(H.num_params, 3, dtype=DT, generator=torch.Generator().manual_seed(0))
    for method in ("auto", "lifted", "dense", "minres"):
        x = H.solve(g, damping=0.5, method=method)
        assert float(_eta(A, x, g)) <= solve_tolerance(DT), method


def test_woodbury_that_loses_accuracy_refines_or_raises():
    """Section 6's algorithm reaches eta ~ 7e-13 here (50x the contract): refinement must
    repair it, and with refinement off the solve must raise rather than pass it."""
    stages, z0 = elementwise_pipeline(6, 5, 8, quartic=0.001)
    H = hessinv.Hessian.from_stages(stages, z0)
    f = torch.func.hessian(H.pipeline.loss_of_flat)
    A = f(torch.cat([p.reshape(-1) for p in H.pipeline.params]))
    g = torch.randn(H.num_params, 1, dtype=DT, generator=torch.Generator().manual_seed(8))
    fac = H.factor(0.0, "woodbury")
    with pytest.raises(hessinv.InaccurateSolveError, match="backward error"):
        fac.solve(g, refine=0)
    try:
        x = fac.solve(g)
    except hessinv.InaccurateSolveError:
        return
    assert float(_eta(A, x, g)) <= solve_tolerance(DT)


def test_factorization_cache_is_bounded_and_can_be_freed():
    H, _ = _problem(1.0)
    for d in np.linspace(0.01, 1.0, 60):
        H.inertia(float(d), "lifted")
    assert len(H._factors) <= H.max_cached_factorizations
    H.clear_cache()
    assert len(H._factors) == 0


@pytest.mark.parametrize(
    "damping", [np.float32(1e-3), np.float64(0.5), np.int64(2), 3, torch.tensor(0.25)]
)
def test_damping_accepts_any_real_scalar(damping):
    H, A1 = _problem(1.0)
    g = torch.randn(H.num_params, dtype=DT)
    d = float(damping)
    x = H.solve(g, damping=damping)
    A = A1 + d * torch.eye(H.num_params, dtype=DT)
    assert float(_eta(A, x[:, None], g[:, None])) <= solve_tolerance(DT)


@pytest.mark.parametrize(
    "damping", [True, np.bool_(False), 1j, "0.1", None, float("nan"), torch.ones(2)]
)
def test_damping_rejects_non_reals(damping):
    H, _ = _problem(1.0)
    with pytest.raises((TypeError, ValueError), match="damping"):
        H.solve(torch.ones(H.num_params, dtype=DT), damping=damping)


def test_too_large_for_memory_is_refused_at_once_with_the_estimate():
    model = nn.Sequential(nn.Linear(2000, 2000), nn.Tanh(), nn.Linear(2000, 1)).to(DT)
    X, y = torch.randn(8, 2000, dtype=DT), torch.randn(8, 1, dtype=DT)
    t0 = time.perf_counter()
    with pytest.raises(MemoryError, match="GiB"):
        hessinv.Hessian(model, nn.MSELoss(), X, y)
    assert time.perf_counter() - t0 < 20.0
    H, _ = _problem(1.0)
    with pytest.raises(MemoryError, match="max_memory"):
        hessinv.Hessian(
            _mlp(),
            nn.MSELoss(),
            torch.randn(4, 3, dtype=DT),
            torch.randn(4, 2, dtype=DT),
            max_memory=1000,
        )


def test_huge_damping_and_empty_right_hand_sides():
    H, A1 = _problem(1.0)
    W = H.num_params
    assert tuple(H.inertia(1e18)) == (W, 0, 0)
    assert H.logdet(1e18)[0] == 1.0
    assert abs(H.logdet(1e18)[1] - W * math.log(1e18)) < 1e-6
    out = H.solve(torch.zeros(W, 0, dtype=DT), damping=1.0)
    assert out.shape == (W, 0)


def test_inertia_says_how_it_was_obtained():
    H, _ = _problem(1.0)
    i_dense = H.inertia(0.1, "dense")
    assert i_dense.verified and "eigendecomposition" in i_dense.how
    i_lift = H.inertia(0.1, "lifted")
    assert tuple(i_lift) == tuple(i_dense) and isinstance(i_lift.how, str)
    pos, neg, zero = i_lift  # unpacks as a tuple
    assert pos + neg + zero == H.num_params


@pytest.mark.parametrize("d", [1e-3, 0.5, 3.0])
def test_two_misclassified_eigenvalues_are_never_verified(monkeypatch, d):
    """Two eigenvalues counted with the wrong sign keep the determinant's sign and size,
    which fooled the old parity check. A verified inertia must be right: the Riccati pass or
    the reverse-order congruence catches the spoiled count."""
    import hessinv.solvers.lifted_inertia as hl

    H, A1 = _problem(1.0, batch=6)
    ev = torch.linalg.eigvalsh(A1 + d * torch.eye(H.num_params, dtype=DT))
    ref = (int((ev > 0).sum()), int((ev < 0).sum()), 0)
    real = hl.block_tri_inertia
    calls = []

    def spoiled(diag, upper, **kw):
        r = real(diag, upper, **kw)
        calls.append(r)
        if len(calls) == 1:  # the first (forward) congruence: two signs swapped, parity kept
            r.positive, r.negative = r.positive - 2, r.negative + 2
        return r

    monkeypatch.setattr(hl, "block_tri_inertia", spoiled)
    inert = H.factor(d, "lifted").inertia()
    assert not inert.verified or tuple(inert) == ref, inert.how
    assert tuple(inert) != ref or inert.verified  # here the truth is also recovered


def test_positive_definiteness_is_proven_or_refuted():
    H, A1 = _problem(1.0, batch=6)
    lam = torch.linalg.eigvalsh(A1)
    for d, expect in [(float(-lam[0]) * 1.5 + 1e-3, True), (float(-lam[0]) * 0.5, False)]:
        fac = H.factor(d, "lifted")
        assert fac.is_positive_definite() is expect
        assert H.is_positive_definite(d) is expect


def test_long_factorizations_are_announced_with_the_estimate(monkeypatch):
    import hessinv.solvers.select as sel

    H, _ = _problem(1.0)
    monkeypatch.setattr(sel, "SLOW_SECONDS", 0.0)
    with pytest.warns(hessinv.CostWarning, match="flops, about"):
        H.factor(0.3, "lifted")


def test_numpy_in_numpy_out_and_scipy_dtype():
    """NumPy vectors come back as NumPy; a float32 SciPy view of a float64 operator."""
    H, A1 = _problem(1.0)
    W = H.num_params
    v = np.random.default_rng(0).standard_normal((W, 2))
    hv = H @ v
    assert isinstance(hv, np.ndarray) and hv.shape == (W, 2)
    assert np.allclose(hv, (A1 @ torch.from_numpy(v)).numpy(), rtol=1e-10, atol=1e-10)
    x = H.solve(v[:, 0], damping=0.5)
    assert isinstance(x, np.ndarray) and x.shape == (W,)
    A = A1 + 0.5 * torch.eye(W, dtype=DT)
    eta = _eta(A, torch.from_numpy(x)[:, None], torch.from_numpy(v[:, :1]))
    assert float(eta) <= solve_tolerance(DT)
    with pytest.raises(TypeError, match="astype"):
        H @ v.astype(np.float32)
    sp = H.to_scipy(dtype=np.float32)
    assert sp.dtype == np.float32 and (sp @ v[:, 0].astype(np.float32)).dtype == np.float32
    inv = H.inverse(0.5).to_scipy()
    assert np.allclose(inv @ v[:, 0], x, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("d", [1e-12, 1e-9, -1e-9, 0.0])
def test_inertia_next_to_a_cluster_of_two_thousand_tiny_eigenvalues(d):
    """W = 2532 with 1962 eigenvalues at zero (batch 3 through width-32 layers): the
    counts at dampings right next to the cluster are exact and verified (this case once
    took minutes when delayed pivots piled up; the congruence is capped now)."""
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Linear(8, 32),
        nn.Tanh(),
        nn.Linear(32, 32),
        nn.Tanh(),
        nn.Linear(32, 32),
        nn.Tanh(),
        nn.Linear(32, 4),
    ).to(DT)
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(3, 8, generator=g, dtype=DT), torch.randn(3, 4, generator=g, dtype=DT)
    f, x0 = reference_loss_fn(m, nn.MSELoss(), X, y)
    ev = torch.linalg.eigvalsh(torch.func.hessian(f)(x0)) + d
    H = hessinv.Hessian(m, nn.MSELoss(), X, y)
    t = H.num_params * EPS * float(ev.abs().max())
    ref = (int((ev > t).sum()), int((ev < -t).sum()), int((ev.abs() <= t).sum()))
    assert min(ref[2], 1) == (d == 0 or abs(d) < t)  # the cluster is at zero
    inert = H.inertia(d, "lifted")
    assert tuple(inert) == ref and inert.verified


@pytest.mark.parametrize("method", ["lifted", "dense"])
def test_first_solve_estimates_ride_along_and_agree(method):
    """The first solve's ``||H||`` and ``sigma_min`` (riding on its products) are the usual ones."""
    model, lf = _mlp(0), nn.MSELoss()
    gen = torch.Generator().manual_seed(0)
    X, y = torch.randn(4, 3, generator=gen, dtype=DT), torch.randn(4, 2, generator=gen, dtype=DT)
    d = 1e-3
    H = hessinv.Hessian(model, lf, X, y)
    g = H.gradient()
    fac = H.factor(d, method=method)
    x = fac.solve(g)  # estimates ride along the refinement's products and solves
    if method == "dense":  # its eigenvalues give both: no estimate is run
        assert fac._sigma_min is None and H._bounds is None
        return
    H2 = hessinv.Hessian(model, lf, X, y)
    fac2 = H2.factor(d, method=method)
    sig2, bounds2 = fac2.sigma_min_estimate(), H2.spectral_bounds()  # on their own
    assert fac._sigma_min == pytest.approx(sig2, rel=1e-8)
    assert H._bounds == pytest.approx(bounds2, rel=1e-10)
    x2 = fac2.solve(g)
    assert float(torch.linalg.vector_norm(x - x2)) <= 1e-12 * float(torch.linalg.vector_norm(x2))


@pytest.mark.parametrize("c", [1e-12, 1.0, 1e12])
def test_singularity_band_count_is_exact_without_the_verifying_congruence(monkeypatch, c):
    """``d = -lambda_i``: the solve's band count finds the one zero from the shifted copies'
    first congruences alone (the reverse-order one only verifies, and is not run); the
    inertia afterwards, verified, agrees with ``eigvalsh``."""
    import hessinv.solvers.lifted as hl

    H, A1 = _problem(c, batch=6)
    ev1 = torch.linalg.eigvalsh(A1)
    lam = float(ev1[ev1 < 0].max())  # an interior negative eigenvalue: Riccati cannot certify
    d = -lam
    A = A1 + d * torch.eye(H.num_params, dtype=DT)
    ev = torch.linalg.eigvalsh(A)
    t = H.num_params * EPS * float(ev.abs().max())
    ref = (int((ev > t).sum()), int((ev < -t).sum()), int((ev.abs() <= t).sum()))
    assert ref[2] == 1
    calls = []
    real = hl.LiftedFactorization.reversed_congruence
    monkeypatch.setattr(
        hl.LiftedFactorization,
        "reversed_congruence",
        lambda self, *a: calls.append(1) or real(self, *a),
    )
    fac = H.factor(c * d, "lifted")
    with pytest.raises(hessinv.SingularHessianError, match=r"has 1 eigenvalue\(s\) within"):
        fac.solve(torch.ones(H.num_params, dtype=DT))
    assert calls == []
    inert = fac.inertia()
    assert tuple(inert) == ref and inert.verified, inert.how
