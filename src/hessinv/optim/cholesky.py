"""Shifted solves on the dense matrix by one Cholesky factorization per shift.

For ``W`` up to a few thousand the exact ``C`` is formed once per step
(``W`` exact products); a trial shift ``lam`` then costs one Cholesky of
``C + lam I`` (``W^3/3`` flops, several times cheaper than ``eigh``), which
also finds out a shift that is not positive definite (the factorization
breaks down). The trust-region shift is Moré & Sorensen's safeguarded Newton
iteration on ``phi(lam) = 1/radius - 1/|s(lam)|``, started from the previous
step's shift, in the bracket ``[lo, hi]`` with
``lo = max(0, -min_i C_ii, |g|/radius - |C|_1)`` (``lambda_min <= min_i C_ii``) and
``hi = |g|/radius + |C|_1`` (Moré & Sorensen 1983, section 3); ``lo`` rises to
each shift found indefinite. When the iteration stalls or meets the hard
case, :meth:`ShiftedCholesky.fallback` hands over to the eigendecomposition
(:mod:`.spectral`), which solves every case exactly.

**Certificate.** A completed Cholesky of ``A = C + (lam - delta) I`` is exact
for ``A + E`` with ``|E|_2 <= delta = 2 W (W + 1) eps max_i A_ii``
(Demmel 1989: ``|E_ij| <= (W + 1) eps sqrt(A_ii A_jj) / (1 - (W + 1) eps)``), so
``C + lam I = A + E + (delta I - E)`` is positive definite. The final shift of
every step is proven this way (one more factorization), never by a
determinant's sign; a shift that fails the proof is raised by a few ``delta``
until one passes (:meth:`ShiftedCholesky.proven_shift`), else the step is taken
from the eigendecomposition, so every step of this route is certified.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class ShiftedCholesky:
    """``C + lam I`` factored per shift for a dense symmetric ``C``."""

    def __init__(self, c: Tensor, g: Tensor) -> None:
        self.c, self.g = c, g
        self.n = c.shape[0]
        self.eye = torch.eye(self.n, dtype=c.dtype, device=c.device)
        self.factorizations = 0
        self.min_diag = float(c.diagonal().min()) if self.n else 0.0
        self.norm1 = float(c.abs().sum(0).max()) if self.n else 0.0
        self.gnorm = float(torch.linalg.vector_norm(g))

    def factor(self, lam: float) -> Tensor | None:
        """The Cholesky factor of ``C + lam I``, or ``None`` when it breaks down."""
        self.factorizations += 1
        chol, info = torch.linalg.cholesky_ex(self.c + lam * self.eye)
        return chol if int(info) == 0 else None

    def delta(self, lam: float) -> float:
        """Bound on the Cholesky backward error of ``C + lam I`` (module docstring)."""
        eps = torch.finfo(self.c.dtype).eps
        top = float((self.c.diagonal() + lam).max()) if self.n else 0.0
        return 2.0 * self.n * (self.n + 1) * eps * max(top, 0.0)

    def prove(self, lam: float) -> tuple[bool, str]:
        """``C + lam I`` proven positive definite by a Cholesky of ``C + (lam - delta) I``."""
        d = self.delta(lam)
        ok = self.factor(lam - d) is not None
        how = (
            f"Cholesky of C + (lam - delta) I completed, delta = {d:.1e} bounds its "
            "backward error (Demmel 1989)"
            if ok
            else f"not proven: Cholesky of C + (lam - delta) I, delta = {d:.1e}, broke down"
        )
        return ok, how

    def proven_shift(
        self, lam: float, s: Tensor, tries: int = 4
    ) -> tuple[float, Tensor, str] | None:
        """``(lam', s(lam'), certificate)`` with ``C + lam' I`` proven definite, ``lam' >= lam``.

        A shift whose Cholesky completed may still fail the proof when it lies within
        the round-off bound ``delta`` of ``-lambda_min(C)`` (the trust region's
        near-hard case). The shift is then raised by ``2 delta``, ``8 delta``, ...
        (``tries`` times, one Cholesky for the step and one for the proof each) and
        the step recomputed: a larger shift only shortens a trust-region step, so it
        stays in the region. ``None`` when no raised shift is proven (the caller then
        takes the eigendecomposition, which certifies by its margin).
        """
        ok, how = self.prove(lam)
        if ok:
            return lam, s, how
        bump = 2.0 * self.delta(lam)
        for _ in range(tries):
            lam2 = lam + bump
            chol = self.factor(lam2)
            if chol is not None:
                ok, how = self.prove(lam2)
                if ok:
                    return lam2, self.solve(chol), f"{how}; shift raised by {bump:.1e} to prove it"
            bump *= 4.0
        return None

    def solve(self, chol: Tensor) -> Tensor:
        """``s = -(C + lam I)^{-1} g`` from the factor."""
        return -torch.cholesky_solve(self.g.unsqueeze(1), chol).squeeze(1)

    def levenberg_marquardt(self, lam: float) -> tuple[float, Tensor]:
        """The first of ``lam, 4 lam, 16 lam, ...`` whose Cholesky completes."""
        lam = max(lam, 1e-300)
        while True:
            chol = self.factor(lam)
            if chol is not None:
                return lam, self.solve(chol)
            lam *= 4.0

    def trust_region(
        self, radius: float, lam_start: float, iters: int = 12, tol: float = 0.1
    ) -> tuple[float, Tensor] | None:
        """``(lam, s)``: ``(1 - tol) radius <= |s| <= radius``, or ``lam = 0`` inside.

        ``None`` when the iteration stalls (hard case, or no progress in ``iters``).
        """
        lo = max(0.0, -self.min_diag, self.gnorm / radius - self.norm1)
        hi = self.gnorm / radius + self.norm1
        if hi <= 0.0:
            return None
        chol0 = self.factor(0.0) if lo == 0.0 else None
        if chol0 is not None:
            s = self.solve(chol0)
            if float(torch.linalg.vector_norm(s)) <= radius:
                return 0.0, s
        lam = lam_start if lo < lam_start < hi else max(math.sqrt(max(lo, 1e-300) * hi), lo)
        for _ in range(iters):
            if not lo < lam < hi:
                lam = max(math.sqrt(max(lo, 1e-300) * hi), lo + 0.01 * (hi - lo))
            chol = self.factor(lam)
            if chol is None:
                lo = lam
                continue
            s = self.solve(chol)
            n = float(torch.linalg.vector_norm(s))
            if (1.0 - tol) * radius <= n <= radius:
                return lam, s
            if n < radius:
                hi = lam
            else:
                lo = lam
            w = torch.linalg.solve_triangular(chol, s.unsqueeze(1), upper=False).squeeze(1)
            wn2 = float(w @ w)
            # Newton on phi(lam) = 1/radius - 1/|s(lam)| (Moré & Sorensen, eq. 3.3)
            target = radius * (1.0 - 0.5 * tol)
            lam = lam + (n * n / wn2) * (n - target) / target if wn2 > 0 else 0.5 * (lo + hi)
            if hi - lo <= 1e-12 * hi:
                break
        return None
