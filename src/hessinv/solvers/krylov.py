"""Krylov solves (CG, MINRES) on exact products, under the solver contract.

They need only ``H @ v``, give no log-determinant or inertia, and stop when
the normwise backward error ``||r|| / (||A|| ||x|| + ||g||)`` (with the Lanczos
estimate of ``||A||``) reaches the contract's tolerance, or raise
:class:`~hessinv.errors.InaccurateSolveError` when ``maxiter`` runs out
(ill-conditioned ``A`` needs very many products: the exact factorizations are
the tool for those). CG is valid for positive definite ``A`` only; it raises
when it meets a direction of nonpositive curvature.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import baselines
from ..errors import InaccurateSolveError
from .base import Factorization, solve_tolerance
from .contract import unit_scales


class KrylovSolver(Factorization):
    """``H + damping I`` applied by CG or MINRES (``method`` ``"cg"`` or ``"minres"``)."""

    method = "minres"

    def __init__(
        self, op, damping: float, method: str = "minres", maxiter: int | None = None
    ) -> None:  # noqa: ANN001
        super().__init__(op, damping)
        if method not in ("cg", "minres"):
            raise ValueError(f"Krylov method must be 'cg' or 'minres', got {method!r}")
        self.method = method
        self.maxiter = maxiter

    def _shifted(self, shift: float) -> Factorization:
        return KrylovSolver(self.op, self.damping + shift, self.method, self.maxiter)

    @property
    def singular(self) -> bool:
        """Undecided by a Krylov method: a singular ``A`` shows as a failure to converge."""
        return False

    def _apply(self, g: Tensor) -> Tensor:
        fn = baselines.minres if self.method == "minres" else baselines.cg
        d = self.damping
        norm = self.norm()
        tol = solve_tolerance(self.dtype)
        cols = []
        for j in range(g.shape[1]):
            # b at unit scale by a power of two (exact; undone on x): the recurrences'
            # inner products r.r, p.Ap under- or overflow at |b| ~ 1e-160 / 1e+155 (float64)
            s1, s2 = unit_scales(g[:, j].abs().amax())
            b = g[:, j] * s1 * s2
            # ||r|| <= tol ||g|| implies eta <= tol; the backward-error check follows
            x, info = fn(
                lambda v: self.op.matmat(v[:, None])[:, 0] + d * v,
                b,
                rtol=tol,
                maxiter=self.maxiter,
            )
            x = x / s1 / s2
            if not info.converged:
                raise InaccurateSolveError(
                    f"{self.method} did not reach backward error {tol:.1e} in "
                    f"{info.iterations} iterations (relative residual {info.residual:.1e}, "
                    f"||A|| ~ {norm:.1e}); use method='lifted' (exact)"
                )
            cols.append(x)
        return torch.stack(cols, dim=1)

    def solve(self, g, *, check: bool = True, refine: int = 0):  # noqa: ANN001, ANN201
        """Krylov solve, then the backward-error check (no refinement by default)."""
        return super().solve(g, check=check, refine=refine)
