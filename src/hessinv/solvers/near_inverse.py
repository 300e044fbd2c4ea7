"""Inertia from a near inverse: a sign count checked by a few solves instead of a congruence.

**The theorem.** Let ``S`` be symmetric and nonsingular, ``G = S^{-1}`` and
``A`` symmetric. If ``||I - A G||_2 < 1`` then ``inertia(A) = inertia(S)``:
along ``A_t = S + t (A - S) = (I - t (I - A G)) S``, ``t in [0, 1]``, every
``A_t`` is nonsingular (``||t (I - A G)|| < 1``), so no eigenvalue of the
symmetric ``A_t``, continuous in ``t``, crosses zero.

The stage elimination of ``H + dI`` (:class:`hessinv.riccati_solve.StageRiccati`)
is such an ``S``: a block elimination whose pivots' signs (Bunch-Kaufman,
Haynsworth) are its inertia, and whose sweeps apply ``G``. **Not a proof in
floating point:** the sweeps solve with the pivots' LUs, the count reads their
Bunch-Kaufman factors, so the probes measure ``A`` against ``S_LU`` while the
count is that of ``S_BK``; the two differ by each pivot's factorization
error. They can differ in inertia only where a pivot has an eigenvalue within
that error of zero, and then the gains through it are wrong by ``O(1)`` and so
is ``G`` (adversarial tests: forced trust at such pivots gives bounds above
100). The check that the Bunch-Kaufman parity and ``log|det|`` match the LUs'
catches an odd number of such flips; the limit :data:`NEAR_INVERSE_LIMIT`, far
below ``1``, leaves room for the rounding of ``G`` and ``A`` themselves.

**The estimate.** ``||I - A G||_2`` is bounded from random probes, at a stated
confidence: with ``E = I - A G``, ``v`` its first right singular vector and
``y_i`` independent standard normal vectors, ``||E y_i|| >= sigma_1(E) |c_i|``
with ``c_i = v^T y_i ~ N(0, 1)`` and ``P(|c_i| < delta) <= delta sqrt(2 / pi)``.
So ``sigma_1(E) <= max_i ||E y_i|| / delta`` except with a chance of at most
``(delta sqrt(2 / pi))^b`` for ``b`` probes, whatever the size ``W``. The
probes come from a fixed seed (as every estimate of the solver contract), so
the answer is deterministic per problem and the chance is over a draw
independent of ``E``. Probes
projected onto a subspace that holds ``v`` (the kept directions, which ``H``
maps into themselves) have the same ``c_i``.

Cost: one solve and one product of ``b`` columns, where a congruence of the
lifted system factors fronts of ``p + 2 N a`` rows per stage. Scale-invariant:
``A`` times ``c`` makes ``G`` times ``1 / c`` and leaves ``E`` unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .contract import column_norms
from .estimates import gaussian

#: Random probes (columns) of :func:`near_inverse_bound`.
PROBE_COLUMNS = 4
#: The chance that :func:`near_inverse_bound` understates ``||I - A G||_2``.
PROBE_FAILURE = 1e-8
#: The bound on ``||I - A G||_2`` below which :func:`near_inverse_bound` verifies a count
#: (the theorem needs ``< 1``; the margin covers the rounding of ``S``, ``G`` and ``A``).
NEAR_INVERSE_LIMIT = 0.125


def probes(
    size: int,
    dtype: torch.dtype,
    device: torch.device,
    columns: int = PROBE_COLUMNS,
    seed: int = 3,
) -> Tensor:
    """``(size, columns)`` independent standard normal entries (not normalized; CPU seed)."""
    return gaussian(size, columns, dtype, device, seed)


def probe_radius(columns: int, failure: float = PROBE_FAILURE) -> float:
    """``delta`` with ``(delta sqrt(2 / pi))^columns = failure`` (module doc)."""
    return failure ** (1.0 / columns) * math.sqrt(math.pi / 2.0)


def near_inverse_bound(residual: Tensor, failure: float = PROBE_FAILURE) -> float:
    """``||I - A G||_2`` bounded from ``residual = Y - A G Y`` for standard normal probes ``Y``.

    ``max_i ||E y_i|| / delta`` with ``delta`` from :func:`probe_radius`: an upper
    bound except with a chance of at most ``failure`` (module doc). ``inf``
    when a column is not finite; ``0`` for zero rows (no directions).

    Args:
        residual: ``(W, b)``, ``b >= 1`` probes' residuals.
        failure: The accepted chance of an understatement.
    """
    if residual.shape[0] == 0:
        return 0.0
    if not bool(torch.isfinite(residual).all()):
        return math.inf
    worst = float(column_norms(residual).max())
    return worst / probe_radius(residual.shape[1], failure)


def verifies(bound: float) -> bool:
    """The bound is below :data:`NEAR_INVERSE_LIMIT` (``False`` for NaN)."""
    return bound <= NEAR_INVERSE_LIMIT
