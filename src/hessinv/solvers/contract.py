"""The contract's numbers: tolerances, the backward error, refinement, the :class:`Inertia`.

Shared by every :class:`~hessinv.solvers.base.Factorization` (the protocol and
its rules are documented in :mod:`hessinv.solvers.base`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..errors import HINT, SingularHessianError
from .estimates import column_norms, spectral_bounds

if TYPE_CHECKING:  # pragma: no cover
    from ..hessian import Hessian

#: A solve's normwise backward error may be at most this many ``eps``.
SOLVE_TOL_FACTOR = 64.0


def solve_tolerance(dtype: torch.dtype) -> float:
    """The contract's bound on a solve's normwise backward error: ``64 eps``.

    ``2.8e-14`` in float64, ``7.6e-6`` in float32. A dense LU with partial
    pivoting, and the lifted factorization after one step of refinement,
    reach a few ``eps``.
    """
    return SOLVE_TOL_FACTOR * torch.finfo(dtype).eps


def zero_threshold(dtype: torch.dtype, size: int) -> float:
    """Relative size below which an eigenvalue of ``A`` counts as zero: ``W eps``.

    ``|lambda| <= W eps ||A||`` is at the level of the round-off a backward
    stable eigensolver makes on a ``W x W`` matrix, so its sign is not
    determined by the data (the rank tolerance of ``numpy.linalg.matrix_rank``).
    """
    return max(size, 1) * torch.finfo(dtype).eps


class Inertia(tuple):
    """``(positive, negative, zero)`` eigenvalue counts of ``H + damping I``.

    A plain tuple to compare and unpack, with two more attributes:

    Attributes:
        verified: ``True`` when the counts were confirmed independently (an
            orthogonal eigendecomposition, or two different congruences that
            agree); ``False`` when they rest on one factorization only.
        how: A sentence saying how the counts were obtained and checked.
    """

    verified: bool
    how: str

    def __new__(cls, positive: int, negative: int, zero: int, *, verified: bool, how: str):  # noqa: D102
        self = super().__new__(cls, (int(positive), int(negative), int(zero)))
        self.verified = bool(verified)
        self.how = how
        return self

    @property
    def positive(self) -> int:
        """Number of positive eigenvalues."""
        return self[0]

    @property
    def negative(self) -> int:
        """Number of negative eigenvalues."""
        return self[1]

    @property
    def zero(self) -> int:
        """Number of eigenvalues counted as zero (:func:`zero_threshold`)."""
        return self[2]

    def __getnewargs_ex__(self):  # noqa: ANN204
        return (self[0], self[1], self[2]), {"verified": self.verified, "how": self.how}


#: :func:`shifted_norm` measures ``||H + dI||`` on its own products below ``max(W, 64) eps ||H||``
#: (at most ``sqrt(eps) ||H||``).
CANCELLED_STEPS = 64


def shifted_norm(op: Hessian, damping: float) -> float:
    """``||H + dI||_2`` from below: ``max(|theta_max + d|, |theta_min + d|)`` (Lanczos on ``H``).

    The Ritz values ``theta`` carry round-off of a few (up to about the
    number of Lanczos steps) ``eps ||H||``. When the shift cancels them to that
    level (``d`` close to ``-theta`` and a narrow Ritz range, e.g. ``H = lambda I``
    and ``d = -theta``), the difference has no correct digit: it may even read
    ``0`` while ``H + dI`` is one ulp times ``I``, and ``t = W eps ||A||``
    would call every eigenvalue zero. So below ``min(max(W, 64) eps, sqrt(eps)) max|theta|``
    ``||A||`` is estimated by Lanczos on the products ``(H + dI) v`` themselves
    (:func:`cancelled_norm`; four more products, kept on the operator per
    ``d``), whose round-off is that of the solves' residuals.
    """
    lo, hi = op.spectral_bounds()
    n = max(abs(hi + damping), abs(lo + damping))
    eps = torch.finfo(op.dtype).eps
    level = min(max(op.num_params, CANCELLED_STEPS) * eps, math.sqrt(eps))  # < 1 for any W
    if n > level * max(abs(lo), abs(hi)):
        return n
    return cancelled_norm(op, damping)


def cancelled_norm(op: Hessian, damping: float) -> float:
    """``||H + dI||_2`` from below by Lanczos on ``V -> H V + d V`` (cached on ``op`` per ``d``).

    Zero only when every product read is exactly zero: ``H + dI`` is then zero
    as the operator computes it.
    """
    cache = op.__dict__.setdefault("_cancelled_norms", {})
    if damping not in cache:
        lo, hi = spectral_bounds(
            lambda v: op.matmat(v) + damping * v, op.num_params, op.dtype, op.device
        )
        cache[damping] = max(abs(lo), abs(hi))
    return cache[damping]


def normwise_backward_error(r: Tensor, x: Tensor, g: Tensor, norm_a: float) -> Tensor:
    """Per column ``||r|| / (||A|| ||x|| + ||g||)`` for the residual ``r = A x - g``."""
    num = column_norms(r)
    den = norm_a * column_norms(x) + column_norms(g)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(r.dtype).tiny), num * 0.0)


def measured_backward_error(
    apply_a: Callable[[Tensor], Tensor],
    x: Tensor,
    g: Tensor,
    norm_a: float,
    residual: Tensor | None = None,
) -> Tensor:
    """:func:`normwise_backward_error` of ``x`` (``(W, k)``), measurable at every scale.

    ``apply_a``: ``V -> A V``; ``residual``: ``A x - g`` when already computed.
    The :func:`low_columns` are measured again on :func:`rescaled` copies (one
    more product, for those columns only).
    """
    if residual is None:
        residual = apply_a(x) - g
    eta = normwise_backward_error(residual, x, g, norm_a)
    low = low_columns(x, g, norm_a)
    if bool(low.any()):
        xs, gs = rescaled(x[:, low], g[:, low])
        eta = eta.clone()
        eta[low] = normwise_backward_error(apply_a(xs) - gs, xs, gs, norm_a)
    return eta


def low_columns(x: Tensor, g: Tensor, norm_a: float) -> Tensor:
    """Columns whose backward error a working-precision residual cannot measure (bool, ``(k,)``).

    Those with ``||A|| ||x_j|| + ||g_j|| < W tiny / eps``: the products in
    ``A x_j`` and ``x_j`` itself then lie near or in the subnormal range, where
    rounding is absolute (``2^-1074`` in float64, not ``eps`` relative), so an
    ``x_j`` wrong by far more than ``eps`` has a residual that reads small (a
    solve of a float64 ``g`` of ``1e-318`` returned a backward error of ``1e9 eps``
    unrefused). :func:`rescaled` gives exact power-of-two copies to measure on.
    """
    info = torch.finfo(x.dtype)
    low = x.shape[0] * info.tiny / info.eps
    den = norm_a * column_norms(x) + column_norms(g)
    small = den < low
    if not bool(small.any()):  # the usual case: no pass over the entries
        return small
    return small & ((x != 0).any(dim=0) | (g != 0).any(dim=0))


def rescaled(x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """``(2^e x, 2^e g)`` per column with ``2^e max(|x_j|, |g_j|)`` in ``[1/2, 1)``.

    Exact (powers of two; subnormal entries gain bits, none is lost). The power
    is applied in two halves, each representable even when ``2^e`` is not
    (``e`` up to 1074 in float64).
    """
    s1, s2 = unit_scales(torch.maximum(x.abs().amax(dim=0), g.abs().amax(dim=0)))
    return x * s1 * s2, g * s1 * s2


def unit_scales(top: Tensor) -> tuple[Tensor, Tensor]:
    """Powers of two ``(s_1, s_2)`` with ``s_1 s_2 top`` in ``[1/2, 1)``, elementwise.

    Two factors, each representable where their product may not be (``top``
    of ``1e-320``: ``2^1063``); ones where ``top`` is zero or not finite.
    Multiplying by them (or dividing, to undo) is exact.
    """
    ok = (top > 0) & torch.isfinite(top)
    _, e = torch.frexp(torch.where(ok, top, torch.ones_like(top)))
    e = -e.to(top.dtype)
    half = torch.trunc(e / 2)
    return torch.pow(2.0, half), torch.pow(2.0, e - half)


#: :func:`refined_solve` takes no further step below this normwise backward error (``eps``).
REFINED_ETA = 4.0


def _at_roundoff(
    r: Tensor, x: Tensor, g: Tensor, norm_floor: Callable[[], float] | None, eps: float
) -> bool:
    """Every column's backward error, with ``||A||`` from below, is at most ``REFINED_ETA eps``."""
    if norm_floor is None:
        return False
    floor = norm_floor()
    if not (floor > 0.0 and math.isfinite(floor)):
        return False
    eta = normwise_backward_error(r, x, g, floor)
    return bool((eta <= REFINED_ETA * eps).all())


def refined_solve(
    matmat: Callable[[Tensor], Tensor],
    apply: Callable[[Tensor], Tensor],
    g: Tensor,
    damping: float,
    refine: int,
    *,
    with_residual: bool = False,
    on_first: Callable[[Tensor, Tensor], None] | None = None,
    norm_floor: Callable[[], float] | None = None,
) -> Tensor | tuple[Tensor, Tensor | None]:
    """``apply(g)`` and up to ``refine`` steps of iterative refinement.

    With ``with_residual``, returns ``(x, g - A x)`` (the residual from exact
    products, ``None`` when ``refine <= 0`` computed none). ``on_first(x, r)``
    sees the unrefined ``x = apply(g)`` and its residual, when one is computed.

    A step ``x <- x + apply(g - A x)`` is kept only if it lowers the largest
    relative residual (on a system too ill-conditioned for the working
    precision refinement diverges, and the better vector is kept); none is
    taken once the residual is at round-off level: a relative residual of
    ``4 eps``, or, after the first step, a normwise backward error of ``4 eps``
    (:data:`REFINED_ETA`) measured with ``norm_floor()``, a lower bound of
    ``||A||`` (so the measured backward error bounds the true one from above).
    On an ill-conditioned ``A`` the relative residual stays above ``4 eps``
    where the backward error is far below it (width 16, batch 8: 11 eps
    against 0.003 eps after one step), and the second step, rejected there
    as not lowering it, cost a solve and a product.

    Raises:
        SingularHessianError: The solve overflowed.
    """
    x = apply(g)
    if not torch.isfinite(x).all():
        raise SingularHessianError(f"the solve overflowed. {HINT}")
    if refine <= 0:
        return (x, None) if with_residual else x
    gn = column_norms(g).clamp_min(torch.finfo(g.dtype).tiny)
    r = g - matmat(x) - damping * x
    if on_first is not None:
        on_first(x, r)
    worst = float((column_norms(r) / gn).max())
    eps = torch.finfo(g.dtype).eps
    for step in range(refine):  # the first step is always taken (the residual it leaves
        # is what users and benchmarks read), a further one only above round-off
        if worst <= 4 * eps or (step and _at_roundoff(r, x, g, norm_floor, eps)):
            break
        x_new = x + apply(r)
        r_new = g - matmat(x_new) - damping * x_new
        worst_new = float((column_norms(r_new) / gn).max())
        if not math.isfinite(worst_new) or worst_new >= worst:
            break
        x, r, worst = x_new, r_new, worst_new
    return (x, r) if with_residual else x
