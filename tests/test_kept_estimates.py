"""The stage solver's inverse iteration runs in the kept coordinates.

``H = Q Q^T H Q Q^T`` (the kept bases ``Q``, orthonormal), so ``A^{-1}``
restricted to the kept directions is ``Q (Q^T A Q)^{-1} Q^T``: the estimates
iterate on ``(Q^T A Q)^{-1}``, the stage solve itself, in ``n_kept``
coordinates. Checked here against the ``W``-row route (the same operator
through the basis maps) and against dense references: the map is exact, the
pair apply's solution is unchanged, the estimate bounds the dense ``sigma_min``
of the kept part from above, and the band rule reads the kept dimension.
"""

from __future__ import annotations

import pytest
import torch
from cases import CASES, DT, build, dense_hessian, tanh_net

import hessinv
from hessinv.solvers.lifted import LiftedFactorization

EPS = torch.finfo(DT).eps
REACHED: list[tuple[str, bool]] = []

TANH = [
    (8, 2, 6, 1.2, 0),
    (16, 1, 4, 1.0, 0),
    (12, 2, 8, 1.2, 1),
    (6, 3, 5, 0.9, 2),
    (5, 1, 12, 1.3, 5),
]
NETS = [(c.name, lambda c=c: build(c, 0)) for c in CASES] + [
    (
        f"tanh_w{w}_b{b}_d{d}",
        lambda w=w, b=b, d=d, gain=gain, seed=seed: tanh_net(w, b, d, gain, seed),
    )
    for w, b, d, gain, seed in TANH
]


def _stage_factor(make, damping: float = 1e-2) -> LiftedFactorization:  # noqa: ANN001
    H = hessinv.Hessian(*make())
    f = H.factor(damping, "lifted")
    assert isinstance(f, LiftedFactorization)
    if f.stage_solver is None:
        pytest.skip("no stage solver for this network")
    f._trust = True  # as after an exact trial
    return f


def _to_params(f: LiftedFactorization, yk: torch.Tensor) -> torch.Tensor:
    """``Q y`` for kept coordinates ``y`` (through the basis maps, no dropped part)."""
    zero = yk.new_zeros(f.size, yk.shape[1])
    return f.system.extract_kept(f._kept_parts(yk), zero, 0, [])


@pytest.mark.parametrize("name,make", NETS, ids=[n for n, _ in NETS])
def test_kept_coordinates_are_the_w_row_route(name, make):  # noqa: ARG001
    f = _stage_factor(make)
    assert f._kept_estimates() and f._estimate_size() == f.system.n_kept
    gen = torch.Generator().manual_seed(0)
    yk = torch.randn(f.system.n_kept, 3, generator=gen, dtype=DT)
    y = _to_params(f, yk)
    # Q is orthonormal: the coordinates keep their norms
    torch.testing.assert_close(
        torch.linalg.vector_norm(y, dim=0), torch.linalg.vector_norm(yk, dim=0), rtol=1e-13, atol=0
    )
    zk = f._apply_for_estimates(yk)
    assert zk.shape == yk.shape
    z = f._stage_apply(y, 0)  # the W-row route: Q (Q^T A Q)^{-1} Q^T y
    scale = float(z.abs().max())
    torch.testing.assert_close(_to_params(f, zk), z, rtol=0, atol=1e-12 * scale)


@pytest.mark.parametrize("name,make", NETS, ids=[n for n, _ in NETS])
def test_pair_apply_solution_is_the_plain_apply(name, make):  # noqa: ARG001
    f = _stage_factor(make)
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(f.size, 2, generator=gen, dtype=DT)
    yk = torch.randn(f.system.n_kept, 2, generator=gen, dtype=DT)
    x, zk = f._apply_pair(g, yk)
    x_alone = f._apply(g)
    zk_alone = f._apply_for_estimates(yk)
    # the same solves, on more columns at once: equal up to rounding, which the
    # condition number of A (dense, from torch.func) may amplify
    h = dense_hessian(*make())
    kappa = float(torch.linalg.cond(h + f.damping * torch.eye(f.size, dtype=DT)))
    tol = 64 * EPS * kappa
    torch.testing.assert_close(x, x_alone, rtol=0, atol=tol * float(x_alone.abs().max()))
    torch.testing.assert_close(zk, zk_alone, rtol=0, atol=tol * float(zk_alone.abs().max()))


def _kept_sigma_min(h: torch.Tensor, d: float, n_dropped: int) -> float:
    """``sigma_min`` of ``A = H + dI`` on the kept directions, from the dense ``H`` alone.

    The dropped directions are ``n_dropped`` eigenvectors of ``H`` with eigenvalue
    ``0``; the kept part's eigenvalues are the rest (the ``n_dropped`` nearest to
    zero left out), shifted by ``d``.
    """
    ev = torch.linalg.eigvalsh(h)
    keep = ev.abs().argsort()[n_dropped:]
    return float((ev[keep] + d).abs().min())


SOME = NETS[:4] + NETS[-len(TANH) :]


@pytest.mark.parametrize("name,make", SOME, ids=[n for n, _ in SOME])
@pytest.mark.parametrize("c", [1e-12, 1.0, 1e12])
def test_estimate_bounds_the_kept_sigma_min_and_reads_the_kept_dimension(name, make, c):  # noqa: ARG001
    m, loss, X, y = make()
    H = hessinv.Hessian(m, lambda o, t: c * loss(o, t), X, y)
    f = H.factor(c * 1e-2, "lifted")
    if f.stage_solver is None:
        pytest.skip("no stage solver for this network")
    x = f.solve(H.gradient())
    assert torch.isfinite(x).all()
    if f.solver != "stages" or f._refine_estimates:
        assert f._sigma_size == f.size  # estimates through the W-row routes
        return
    assert f._sigma_size == f.system.n_kept
    REACHED.append((name, f.system.n_kept < f.size))
    h = c * dense_hessian(m, loss, X, y)
    truth = _kept_sigma_min(h, f.damping, f.system.n_dropped)
    est = f.sigma_min_estimate()
    slack = 1e3 * EPS * float(torch.linalg.matrix_norm(h, 2))  # the dense reference's own error
    assert truth - slack <= est  # an estimate from above
    assert f._sigma_size == f.system.n_kept


def test_lu_route_keeps_w_rows():
    f = _stage_factor(lambda: tanh_net(8, 2, 6, 1.2))
    f._demote()
    assert not f._kept_estimates() and f._estimate_size() == f.size
    y = torch.randn(f.size, 2, dtype=DT)
    z = f._apply_for_estimates(y)
    assert z.shape == (f.size, 2)
    f.sigma_min_estimate()
    assert f._sigma_size == f.size


def test_the_kept_route_was_reached():
    """The bound above ran on the kept route with dropped directions (``n_kept < W``)."""
    if not REACHED:
        pytest.skip("run with the parametrized test above")
    assert len({name for name, dropped in REACHED if dropped}) >= 4
