"""The stage elimination (``hessinv.riccati_solve``) that serves the lifted method's solves.

Each solve is judged by its normwise backward error against an independent
dense ``H`` (``torch.func.hessian`` of the loss in the flat parameters), with
the contract's tolerance plus the reference's own error (its asymmetry). The
trial logic of ``LiftedFactorization`` is exercised on all three verdicts:
trusted, trusted with refined estimates, and rejected (the pivoted block LU
takes over).
"""

from __future__ import annotations

import math

import pytest
import torch
from cases import backward_error, dense_hessian, reference_error, tanh_net

import hessinv
import hessinv.solvers.lifted as lifted_mod
from hessinv.solvers.contract import solve_tolerance
from hessinv.solvers.lifted import LiftedFactorization

DT = torch.float64
EPS = torch.finfo(DT).eps


CASES = [
    # width, batch, depth, gain, damping ("mid": between two middle eigenvalues), loss scale
    (4, 2, 8, 1.5, 1e-3, 1.0),
    (6, 3, 6, 2.0, 0.1, 1.0),
    (8, 4, 5, 1.5, 1e-3, 1e9),
    (8, 4, 5, 1.5, 1e-3, 1e-9),
    (5, 2, 7, 1.5, "mid", 1.0),
    (6, 6, 4, 1.0, "mid", 1e6),
    (3, 8, 6, 2.5, 1e-6, 1.0),
]


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_lifted_solve_exact_against_dense(case) -> None:  # noqa: ANN001
    width, batch, depth, gain, damping, scale = case
    model, loss, X, y = tanh_net(width, batch, depth, gain, scale=scale)
    h = dense_hessian(model, loss, X, y)
    if damping == "mid":  # strongly indefinite H + dI, well away from singular
        ev = torch.linalg.eigvalsh(h)
        ev = ev[ev.abs() > 1e-6 * ev.abs().max()]  # not the small batch's null space
        k = ev.numel() // 2
        damping = -0.5 * float(ev[k] + ev[k + 1])
    else:
        damping = damping * scale
    H = hessinv.Hessian(model, loss, X, y)
    g = torch.randn(H.num_params, 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    x = H.solve(g, damping, method="lifted")
    a = h + damping * torch.eye(h.shape[0], dtype=DT)
    tol = solve_tolerance(DT) + 10 * reference_error(h) + 4 * EPS
    for j in range(g.shape[1]):
        assert backward_error(a, x[:, j], g[:, j]) <= tol
    assert H.factor(damping, method="lifted").solver in ("stages", "lu")


def test_stage_solver_serves_a_deep_net() -> None:
    """On a well-scaled deep net the stage elimination is trusted and used."""
    model, loss, X, y = tanh_net(6, 3, 12, 1.2)
    H = hessinv.Hessian(model, loss, X, y)
    g = torch.randn(H.num_params, dtype=DT)
    H.solve(g, 0.1, method="lifted")
    fac = H.factor(0.1, method="lifted")
    assert fac.solver == "stages"
    assert fac._lu is None  # the block LU was never needed


def test_stacked_solve_matches_the_per_stage_solve() -> None:
    """``solve_runs`` gives the same numbers in any partition of the stages (one per part).

    A split net (width 16: Kronecker bases, split stages, basis groups) and one
    whose runs are mixed (a narrower middle layer); the right-hand sides come
    in the basis maps' runs, in the factors' runs, and one stage per part."""
    for widths in ((16, 16, 16, 16, 16), (6, 6, 3, 6, 6)):
        torch.manual_seed(0)
        layers: list[torch.nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
        model = torch.nn.Sequential(*layers, torch.nn.Linear(widths[-1], 2)).double()
        X, y = torch.randn(2, widths[0], dtype=DT), torch.randn(2, 2, dtype=DT)
        H = hessinv.Hessian(model, torch.nn.MSELoss(), X, y)
        fac = H.factor(1e-3, method="lifted")
        fac.solve(torch.randn(H.num_params, dtype=DT))
        rs, ls = fac.stage_solver, fac.system
        assert rs is not None
        g = torch.randn(H.num_params, 2, dtype=DT, generator=torch.Generator().manual_seed(2))
        kept = ls.kept_rhs(g)
        per_stage = [t for part in kept for t in part.unbind(0)]
        ref = rs.solve(per_stage)  # one stage per part
        own, i = [], 0  # the solver's own runs (those of its factors)
        for n in rs.run_sizes:
            own.append(torch.stack(per_stage[i : i + n]))
            i += n
        for parts, sizes in ((kept, ls.run_sizes), (own, rs.run_sizes)):
            out = rs.solve_runs(parts, sizes)
            assert [o.shape[0] for o in out] == sizes
            got = [t for part in out for t in part.unbind(0)]
            assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
        x = ls.extract_kept(rs.solve_runs(kept, ls.run_sizes), g, 2, kept)
        a = dense_hessian(model, torch.nn.MSELoss(), X, y)
        a = a + 1e-3 * torch.eye(a.shape[0], dtype=DT)
        for j in range(2):
            assert backward_error(a, x[:, j], g[:, j]) <= 1e3 * solve_tolerance(DT)


def test_singular_stage_pivot_falls_back_to_the_block_lu() -> None:
    """A damping that makes the last stage's pivot singular, not H + dI: the LU serves."""
    model, loss, X, y = tanh_net(4, 3, 4, 1.5)
    H = hessinv.Hessian(model, loss, X, y)
    probe = LiftedFactorization(H, 0.0, stage_solver=False)
    txx = probe.system.projections[-1].txx
    mu = float(torch.linalg.eigvalsh(txx)[-1])  # the last pivot is Q^T Txx Q + d I
    d = -mu
    h = dense_hessian(model, loss, X, y)
    a = h + d * torch.eye(h.shape[0], dtype=DT)
    assert float(torch.linalg.svdvals(a)[-1]) > 1e-6 * float(torch.linalg.matrix_norm(a, 2))
    g = torch.randn(H.num_params, dtype=DT)
    x = H.solve(g, d, method="lifted")
    fac = H.factor(d, method="lifted")
    assert fac.solver == "lu" and fac.stage_solver is None
    tol = solve_tolerance(DT) + 10 * reference_error(h) + 4 * EPS
    assert backward_error(a, x, g) <= tol


def test_refined_verdict_recomputes_sigma_min(monkeypatch) -> None:  # noqa: ANN001
    """With a trust tolerance nobody meets, the solver is kept with refined estimates."""
    monkeypatch.setattr(lifted_mod, "trust_tolerance", lambda dtype, size: 0.0)
    model, loss, X, y = tanh_net(5, 3, 6, 1.5)
    H = hessinv.Hessian(model, loss, X, y)
    d = 1e-3
    g = torch.randn(H.num_params, dtype=DT)
    x = H.solve(g, d, method="lifted")
    fac = H.factor(d, method="lifted")
    assert fac.solver == "stages" and fac._refine_estimates
    ref = LiftedFactorization(H, d, stage_solver=False)
    s1, s2 = fac.sigma_min_estimate(), ref.sigma_min_estimate()
    assert abs(s1 - s2) <= 1e-8 * s2
    h = dense_hessian(model, loss, X, y)
    a = h + d * torch.eye(h.shape[0], dtype=DT)
    assert backward_error(a, x, g) <= solve_tolerance(DT) + 10 * reference_error(h) + 4 * EPS


def test_rejected_trial_estimates_again_with_the_lu(monkeypatch) -> None:  # noqa: ANN001
    """A rejected trial leaves no estimate behind: sigma_min is the LU's own."""
    monkeypatch.setattr(LiftedFactorization, "_trial_verdict", lambda self, g, x, r: "reject")
    model, loss, X, y = tanh_net(5, 3, 6, 1.5)
    H = hessinv.Hessian(model, loss, X, y)
    g = torch.randn(H.num_params, dtype=DT)
    x = H.solve(g, 1e-3, method="lifted")
    fac = H.factor(1e-3, method="lifted")
    assert fac.solver == "lu"
    H2 = hessinv.Hessian(model, loss, X, y)
    ref = LiftedFactorization(H2, 1e-3, stage_solver=False)
    x_ref = ref.solve(g)
    assert fac.sigma_min_estimate() == pytest.approx(ref.sigma_min_estimate(), rel=1e-10)
    assert torch.allclose(x, x_ref, rtol=1e-10, atol=0)


@pytest.mark.parametrize("c", [2.0**-30, 2.0**30])
def test_scaled_loss_scales_the_stage_solution(c: float) -> None:
    """Loss times a power of two: the same verdict, the solution divided by it."""
    model, loss, X, y = tanh_net(5, 3, 8, 1.5)
    _, loss_c, _, _ = tanh_net(5, 3, 8, 1.5, scale=c)
    g = torch.randn(sum(p.numel() for p in model.parameters()), dtype=DT)
    H, Hc = hessinv.Hessian(model, loss, X, y), hessinv.Hessian(model, loss_c, X, y)
    x = H.solve(g, 1e-3, method="lifted")
    xc = Hc.solve(g, 1e-3 * c, method="lifted")
    assert H.factor(1e-3, method="lifted").solver == Hc.factor(1e-3 * c, method="lifted").solver
    assert float(torch.linalg.vector_norm(xc * c - x) / torch.linalg.vector_norm(x)) <= 1e-13


@pytest.mark.parametrize("near", [True, False])
@pytest.mark.parametrize("damping", [1e-3, "mid"])
def test_inertia_from_the_stage_elimination(damping, near: bool, monkeypatch) -> None:  # noqa: ANN001
    """After a trusted solve the inertia needs no block LU, and matches eigvalsh.

    Verified by the near-inverse bound, or (``near=False``: the bound forced to
    fail) by one congruence of ``K``.
    """
    if not near:
        monkeypatch.setattr(LiftedFactorization, "near_inverse_bound", lambda self: math.inf)
    model, loss, X, y = tanh_net(6, 3, 7, 1.5)
    h = dense_hessian(model, loss, X, y)
    ev = torch.linalg.eigvalsh(h)
    if damping == "mid":
        nz = ev[ev.abs() > 1e-6 * ev.abs().max()]
        damping = -0.5 * float(nz[nz.numel() // 2] + nz[nz.numel() // 2 + 1])
    H = hessinv.Hessian(model, loss, X, y)
    H.solve(torch.randn(H.num_params, dtype=DT), damping, method="lifted")
    fac = H.factor(damping, method="lifted")
    if fac.solver != "stages":
        pytest.skip("the stage elimination was not trusted on this net")
    inert = fac.inertia()
    shifted = ev + damping
    assert tuple(inert) == (int((shifted > 0).sum()), int((shifted < 0).sum()), 0)
    assert inert.verified and "stage elimination" in inert.how
    assert ("near inverse" in inert.how) == near and ("two congruences" in inert.how) != near
    assert fac._lu is None


def test_inertia_before_any_solve_settles_trust_by_a_probe() -> None:
    """H.inertia(d) without a solve: a random probe trusts the stage elimination, no LU."""
    model, loss, X, y = tanh_net(6, 3, 7, 1.5)
    h = dense_hessian(model, loss, X, y)
    H = hessinv.Hessian(model, loss, X, y)
    inert = H.inertia(1e-3, method="lifted")
    shifted = torch.linalg.eigvalsh(h) + 1e-3
    assert tuple(inert) == (int((shifted > 0).sum()), int((shifted < 0).sum()), 0)
    fac = H.factor(1e-3, method="lifted")
    assert inert.verified and fac.solver == "stages"
    assert "stage elimination" in inert.how and fac._lu is None
    sign, la = H.logdet(1e-3, method="lifted")  # builds the LU: the reference determinant
    s_ref, la_ref = torch.linalg.slogdet(h + 1e-3 * torch.eye(h.shape[0], dtype=DT))
    assert sign == float(s_ref) and abs(la - float(la_ref)) <= 1e-9 * max(1.0, abs(float(la_ref)))
