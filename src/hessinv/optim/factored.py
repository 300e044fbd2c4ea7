"""Shifted solves by one factorization per shift (the ``"lifted"`` route, large ``W``).

Each trial shift ``lam`` factors ``C + lam I`` once (:meth:`hessinv.Hessian.factor`);
the same factorization gives the step, the inertia that shows a shift is not
positive definite, and the derivative of ``|s(lam)|`` (one more solve).

**Certificate.** A factorization proves ``C + lam I`` positive definite only
through ``is_positive_definite() is True`` (a Cholesky-type pass, where the
factorization offers one). The lifted inertia count (Bunch-Kaufman with
delayed pivots, checked against the LU's determinant, whose sign is blind to an
even number of wrong signs) decides which shifts to try, but a step resting
on it alone is flagged ``certified=False`` in :class:`~hessinv.optim.StepInfo`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import SingularHessianError


@dataclass
class Trial:
    """One factored shift."""

    lam: float
    pd: bool  # no negative or zero eigenvalue by the inertia count
    certified: bool  # proven positive definite
    how: str
    s: Tensor | None
    fac: object


class FactoredSolver:
    """``C + lam I`` factored per shift; ``C = scale * op``."""

    def __init__(self, op, scale: float, g: Tensor, method: str = "lifted") -> None:  # noqa: ANN001
        self.op, self.scale, self.g, self.method = op, scale, g, method
        self.factorizations = 0

    def trial(self, lam: float) -> Trial:
        """Factor ``C + lam I`` (as ``scale (op + lam/scale I)``) and solve if definite."""
        fac = self.op.factor(lam / self.scale, method=self.method)
        self.factorizations += 1
        verdict = fac._definite_proof()
        if verdict is True:  # the zero band is left to the solve's own singularity test
            try:
                s = -fac.solve(self.g / self.scale, check=False)
            except SingularHessianError:  # eigenvalues in the zero band: not definite
                return Trial(lam, False, False, "numerically singular", None, fac)
            return Trial(lam, True, True, "is_positive_definite() proof", s, fac)
        try:
            inertia = fac.inertia()
        except SingularHessianError as e:  # a count the factorization cannot make: not definite
            return Trial(lam, False, False, f"unverified: no inertia count ({e})", None, fac)
        pd = inertia[1] == 0 and inertia[2] == 0 and verdict is not False
        how = f"unverified: inertia count {tuple(inertia)}"
        s = -fac.solve(self.g / self.scale, check=False) if pd else None
        return Trial(lam, pd, False, how, s, fac)

    def levenberg_marquardt(self, lam: float) -> Trial:
        """The first shift ``lam, 4 lam, 16 lam, ...`` whose factorization is definite."""
        while True:
            t = self.trial(lam)
            if t.pd:
                return t
            lam = max(4.0 * lam, 1e-6 * self.scale)

    def trust_region(
        self, radius: float, lam_start: float, iters: int, norm_estimate: float, floor: float
    ) -> tuple[Trial, bool]:
        """Moré-Sorensen with a safeguarded bracket: ``(trial, hard_case)``.

        ``lam = floor`` first (the Newton step); then Newton steps on
        ``phi(lam) = 1/radius - 1/|s(lam)|`` from ``lam_start`` (the previous
        step's shift), inside ``[lo, hi]``: ``lo`` rises to every shift found
        indefinite or too short a step's complement, ``hi = |g|/radius + |C|``
        is definite with a short step.
        """
        gnorm = float(torch.linalg.vector_norm(self.g))
        t = self.trial(floor) if lam_start <= floor else None
        if t is not None and t.pd and float(torch.linalg.vector_norm(t.s)) <= radius:
            return t, False
        lo, hi = floor, gnorm / radius + norm_estimate
        lam = lam_start if lam_start > 0.0 else gnorm / radius
        best = None
        for _ in range(iters):
            if not lo < lam < hi:
                lam = max(math.sqrt(max(lo, 1e-300) * hi), lo + 0.01 * (hi - lo))
            t = self.trial(lam)
            if not t.pd:
                lo = lam
                lam = lo + 0.25 * (hi - lo) if hi - lo > 0 else 2 * lam
                continue
            n = float(torch.linalg.vector_norm(t.s))
            if n <= radius:
                best = t
                hi = lam
                if n >= 0.9 * radius:
                    return t, False
            else:
                lo = lam
            w = t.fac.solve(t.s / self.scale, check=False)
            qq = float(t.s @ w)
            if qq > 0:
                lam = lam + (n * n / qq) * (n - radius) / radius
            if hi - lo <= 1e-10 * max(hi, 1e-300):
                break
        if best is None:
            best = self.trial(hi)
            if not best.pd:  # pragma: no cover - hi bounds |C| + |g|/radius
                raise SingularHessianError("the trust-region bracket found no definite shift")
        n = float(torch.linalg.vector_norm(best.s))
        if n >= 0.9 * radius:
            return best, False
        # hard case: complete to the boundary along an approximate eigenvector of the
        # smallest eigenvalue of C + lam I (inverse iteration with this factorization)
        z = torch.linspace(1.0, 2.0, self.g.numel(), dtype=self.g.dtype, device=self.g.device)
        for _ in range(4):
            z = best.fac.solve(z, check=False)
            z = z / torch.linalg.vector_norm(z)
        sz = float(best.s @ z)
        tau = -sz + math.copysign(math.sqrt(sz * sz + radius * radius - n * n), -sz if sz else 1.0)
        best.s = best.s + tau * z
        return best, True
