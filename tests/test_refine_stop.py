"""Refinement stops at round-off by the backward error (``refined_solve``'s ``norm_floor``).

On an ill-conditioned ``A`` one refinement step brings the normwise backward
error to a fraction of ``eps`` while the relative residual stays at ``eps
||A|| ||x|| / ||g||``; the relative-residual rule alone then took a second
step that could not lower it. With a lower bound of ``||A||`` the second step
is skipped, the first never is, and the result meets ``4 eps``.
"""

from __future__ import annotations

import pytest
import torch

from hessinv.solvers.contract import column_norms, refined_solve

DT = torch.float64
EPS = torch.finfo(DT).eps


def _system(cond: float, n: int = 60, seed: int = 0):  # noqa: ANN202
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    lam = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), n, dtype=DT)
    lam = lam * torch.where(torch.arange(n) % 3 == 0, -1.0, 1.0).to(DT)  # indefinite
    a = (q * lam) @ q.T
    e = torch.randn(n, n, generator=gen, dtype=DT)
    lu = torch.linalg.lu_factor(a + 1e-13 * e / torch.linalg.matrix_norm(e, 2))  # an inexact solver
    g = torch.randn(n, 2, generator=gen, dtype=DT)
    return a, lu, g, float(lam.abs().max())


def _eta(a, x, g):  # noqa: ANN001, ANN202 - independent: the exact spectral norm
    r = a @ x - g
    nrm = torch.linalg.matrix_norm(a, 2)
    den = nrm * torch.linalg.vector_norm(x, dim=0) + torch.linalg.vector_norm(g, dim=0)
    return torch.linalg.vector_norm(r, dim=0) / den


@pytest.mark.parametrize("scale", [1e-12, 1.0, 1e12])
def test_second_step_skipped_at_roundoff(scale):
    a, lu, g, nrm = _system(1e10)
    a = scale * a
    calls = []

    def apply(v):  # noqa: ANN001, ANN202
        calls.append(1)
        return torch.linalg.lu_solve(*lu, v) / scale

    x0 = torch.linalg.lu_solve(*lu, g) / scale
    assert float(_eta(a, x0, g).max()) > 4 * EPS  # the first step is needed
    x, r = refined_solve(lambda v: a @ v, apply, g, 0.0, 2, with_residual=True,
                         norm_floor=lambda: 0.5 * scale * nrm)  # fmt: skip
    assert len(calls) == 2  # the solve and one step
    rel = column_norms(r) / column_norms(g)
    assert float(rel.max()) > 4 * EPS  # the relative-residual rule alone would go on
    assert float(_eta(a, x, g).max()) <= 4 * EPS
    calls.clear()
    x2 = refined_solve(lambda v: a @ v, apply, g, 0.0, 2)  # no floor: as before
    assert len(calls) == 3
    assert float(_eta(a, x2, g).max()) <= 4 * EPS


def test_no_step_skipped_without_a_floor_or_above_roundoff():
    """A floor of 0 (nothing known of ``||A||``) or a floor far below ``||A||`` (backward
    error overestimated above ``4 eps``) changes nothing."""
    a, lu, g, nrm = _system(1e10)
    for floor in (0.0, 1e-9 * nrm):
        calls = []

        def apply(v, calls=calls):  # noqa: ANN001, ANN202
            calls.append(1)
            return torch.linalg.lu_solve(*lu, v)

        refined_solve(lambda v: a @ v, apply, g, 0.0, 2, norm_floor=lambda f=floor: f)
        assert len(calls) == 3
