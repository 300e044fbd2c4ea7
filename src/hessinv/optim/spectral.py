"""Every shift from one eigendecomposition: ``(C + lam I)^{-1} g`` in the eigenbasis.

A curvature matrix ``C`` (``W x W``, symmetric) is held as ``C = Q diag(w) Q^T``
with ``Q`` orthonormal, ``W x k``; when ``k < W`` the orthogonal complement of
``Q``'s columns is an eigenspace of eigenvalue ``0`` (the Gauss-Newton matrix
``A^T A`` of a wide Jacobian ``A``). For a gradient ``g`` write
``c = Q^T g`` and ``g_perp = g - Q c``; then for every shift ``lam``

    ``s(lam) = -(C + lam I)^{-1} g = -Q (c / (w + lam)) - g_perp / lam``,

    ``|s(lam)|^2 = sum_i c_i^2 / (w_i + lam)^2 + |g_perp|^2 / lam^2``,

so after the ``O(W^3)`` (or ``O(N^3 o^3)``) decomposition each trial shift
costs ``O(W k)`` and the trust-region secular equation ``|s(lam)| = radius``
(Moré & Sorensen 1983) is solved on scalars.

**Certificate.** ``C + lam I`` is called positive definite only when its
smallest computed eigenvalue ``min(w, 0 if k < W) + lam`` exceeds the margin
``W eps max|w|``: ``eigh`` is backward stable, its eigenvalues are those of a
matrix within a small multiple of ``eps |C|`` of ``C`` (Weyl), so a gap above
the margin cannot be round-off. This is a count of all eigenvalues, so it is
not fooled by parity, as a determinant's sign is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Spectrum:
    """``C = Q diag(w) Q^T`` (plus eigenvalue 0 on the complement when ``k < W``).

    Attributes:
        w: Eigenvalues, ascending, ``(k,)``.
        q: Orthonormal eigenvectors, ``(W, k)``.
        num_params: ``W``.
        how: How the decomposition was obtained (for :class:`StepInfo`).
    """

    w: Tensor
    q: Tensor
    num_params: int
    how: str

    @property
    def full(self) -> bool:
        """Whether ``Q`` spans the whole space (no zero-eigenvalue complement)."""
        return self.w.shape[0] >= self.num_params

    @property
    def norm(self) -> float:
        """``|C|_2``."""
        return float(self.w.abs().max()) if self.w.numel() else 0.0

    @property
    def margin(self) -> float:
        """The smallest eigenvalue of ``C + lam I`` accepted as proof of definiteness."""
        eps = torch.finfo(self.w.dtype).eps
        return self.num_params * eps * max(self.norm, 1e-300)

    @property
    def min_eigenvalue(self) -> float:
        """``lambda_min(C)`` (``0`` is one when ``k < W``)."""
        lo = float(self.w[0]) if self.w.numel() else 0.0
        return lo if self.full else min(lo, 0.0)

    def certified(self, lam: float) -> bool:
        """``C + lam I`` proven positive definite (see the module docstring)."""
        return self.min_eigenvalue + lam > self.margin

    def coefficients(self, g: Tensor) -> tuple[Tensor, Tensor, float]:
        """``(c, g_perp, |g_perp|)`` of ``g`` (``g_perp`` empty when ``Q`` is full)."""
        c = self.q.T @ g
        if self.full:
            return c, g[:0], 0.0
        gp = g - self.q @ c
        return c, gp, float(torch.linalg.vector_norm(gp))


class ShiftedSolver:
    """All shifted solves of one spectrum against one gradient, each ``O(W k)``."""

    def __init__(self, spec: Spectrum, g: Tensor) -> None:
        self.spec = spec
        self.g = g
        self.c, self.gp, self.gp_norm = spec.coefficients(g)
        self.w = spec.w

    def step(self, lam: float, extra: tuple[int, float] | None = None) -> Tensor:
        """``s = -(C + lam I)^{-1} g`` (plus ``tau q_i`` when ``extra = (i, tau)``)."""
        t = -self.c / (self.w + lam)
        if extra is not None:
            t = t.clone()
            t[extra[0]] += extra[1]
        s = self.spec.q @ t
        if self.gp_norm > 0.0:
            s = s - self.gp / lam
        return s

    def norm(self, lam: float) -> float:
        """``|s(lam)|``."""
        sq = float(((self.c / (self.w + lam)) ** 2).sum())
        if self.gp_norm > 0.0:
            sq += (self.gp_norm / lam) ** 2
        return math.sqrt(sq)

    def _dnorm2(self, lam: float) -> float:
        """``d |s|^2 / d lam``."""
        d = -2.0 * float((self.c**2 / (self.w + lam) ** 3).sum())
        if self.gp_norm > 0.0:
            d -= 2.0 * self.gp_norm**2 / lam**3
        return d

    def predicted(self, lam: float, extra: tuple[int, float] | None = None) -> float:
        """Model decrease ``-(g.s + s.C.s / 2)`` of :meth:`step`, in the eigenbasis."""
        t = -self.c / (self.w + lam)
        if extra is not None:
            t = t.clone()
            t[extra[0]] += extra[1]
        m = float((self.c * t).sum() + 0.5 * (self.w * t * t).sum())
        if self.gp_norm > 0.0:
            m -= self.gp_norm**2 / lam  # g_perp . (-g_perp / lam); C is 0 there
        return -m

    def trust_region(self, radius: float, tol: float = 1e-6) -> tuple[float, tuple | None, int]:
        """Exact trust-region shift: ``(lam, extra, iterations)``.

        Solves ``min g.s + s.C.s/2`` s.t. ``|s| <= radius``: ``lam = lam_0`` (the
        smallest certified shift, ``0`` if ``C`` is proven positive definite) when
        ``|s(lam_0)| <= radius``, else the root of ``phi(lam) = 1/radius - 1/|s(lam)|``
        in ``(lam_0, lam_0 + |g|/radius]`` by safeguarded Newton (``phi`` is concave
        and increasing there, Moré & Sorensen 1983, so Newton from the left never
        overshoots; bisection guards round-off). Hard case (``g`` has no component
        on the eigenvectors of ``lambda_min`` and ``|s(lam_0)| < radius``): the step
        is completed to the boundary along such an eigenvector, ``extra = (i, tau)``.
        """
        spec = self.spec
        lam0 = 0.0 if spec.certified(0.0) else -spec.min_eigenvalue + 2.0 * spec.margin
        n0 = self.norm(lam0)
        if n0 <= radius:
            if lam0 > 0.0:
                hard = self._hard_case(lam0, radius)
                if hard is not None:
                    return lam0, hard, 0
            return lam0, None, 0
        gnorm = float(torch.linalg.vector_norm(self.g))
        lo, hi = lam0, lam0 + gnorm / radius
        lam = lo
        target = radius * (1.0 - 0.5 * tol)  # Newton from the left lands in [r (1-tol), r]
        for it in range(1, 101):
            n = self.norm(lam)
            if radius * (1.0 - tol) <= n <= radius:
                return lam, None, it
            if n > radius:
                lo = lam
            else:
                hi = lam
            # Newton on phi: lam += (|s|^2 / (-(1/2) d|s|^2/dlam)) (|s| - r) / r
            d = self._dnorm2(lam)
            new = lam + (n * n / (-0.5 * d)) * (n - target) / target if d < 0 else hi
            if not lo < new < hi:
                new = 0.5 * (lo + hi)
            lam = new
            if hi - lo <= 1e-15 * hi:
                break
        return hi, None, it

    def _hard_case(self, lam: float, radius: float) -> tuple[int, float] | None:
        """``(i, tau)`` completing ``s(lam)`` to ``|s| = radius`` along ``q_i``, if any.

        ``q_i`` is the computed eigenvector of the smallest eigenvalue (``k < W``
        and a zero complement smaller: none, the step stays interior).
        """
        if self.w.numel() == 0 or (not self.spec.full and float(self.w[0]) > 0.0):
            return None
        s = self.step(lam)
        sn = float(torch.linalg.vector_norm(s))
        if sn >= radius:
            return None
        si = float(self.spec.q[:, 0] @ s)
        # |s + tau q|^2 = radius^2, root of smaller |tau| ... choose the sign that lowers
        # the model most: both roots cost the same curvature, take the one along -sign(si)
        disc = math.sqrt(max(si * si + radius * radius - sn * sn, 0.0))
        tau = -si + (disc if si <= 0 else -disc)
        return 0, tau
