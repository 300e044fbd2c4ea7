"""Exceptions raised by hessinv."""

from __future__ import annotations

import torch


class SingularHessianError(torch.linalg.LinAlgError):
    """``H + damping * I`` is singular to working precision.

    Raised by the exact solvers instead of returning a meaningless vector. The
    usual cause is a Hessian with an exact null space: a dense layer whose
    weight only enters through ``W z`` has ``H`` of rank at most ``N * a`` in
    that layer's directions when the batch ``N`` is small. The remedy is to
    pass ``damping > 0`` (Levenberg-Marquardt / Tikhonov regularisation).
    """


HINT = (
    "H + damping*I is singular (or numerically so). A Hessian with a small batch "
    "has an exact null space (a dense layer's weight enters only through W z); "
    "pass damping > 0, e.g. H.solve(g, damping=1e-3)."
)


class LiftedPrecisionWarning(UserWarning):
    """The lifted system is singular to working precision where ``H`` may not be.

    Exploding activations or Jacobians (e.g. a deep ReLU network with large
    weights) make the lifted block-tridiagonal system far worse conditioned
    than ``H + damping * I`` itself; ``logdet`` and ``inertia`` then report it
    as singular. Cross-check with ``H.factor(damping, method="dense")`` on a
    small network, or increase ``damping``.
    """


class InaccurateSolveError(SingularHessianError):
    """A solve could not meet the contract's normwise backward error.

    ``||(H + dI) x - g|| / (||H + dI|| ||x|| + ||g||)`` stayed above
    :func:`hessinv.solvers.solve_tolerance` after refinement: the method
    cannot vouch for ``x``, so none is returned. A subclass of
    :class:`SingularHessianError` (the usual cure is the same: more damping,
    or another method).
    """


class LiftedPrecisionError(SingularHessianError):
    """The lifted system is singular to working precision where ``H + dI`` may not be.

    Raised by the lifted factorization when it cannot count signs or solve
    reliably (exploding activations or Jacobians make ``K`` far worse
    conditioned than ``H + dI``). The way out: ``method="dense"`` for small
    ``W``, or a larger damping.
    """


class NonFiniteError(ValueError):
    """A product with ``H`` overflowed: the Hessian's entries exceed the dtype's range.

    Seen in float32 with large loss scales or exploding activations; float64
    (or a smaller loss scale) is the way out.
    """


class CostWarning(UserWarning):
    """A factorization is estimated to take long (flop count at a nominal rate).

    Raised as a warning before the work starts, with the estimate and what
    would make it cheaper; filter it with :mod:`warnings` once expected.
    """


def check_finite(t: torch.Tensor, what: str, dtype: torch.dtype) -> torch.Tensor:
    """``t``, or :class:`NonFiniteError` if it has NaN or Inf entries (``what`` overflowed)."""
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError(
            f"{what} overflowed in {dtype} (NaN or Inf entries): the Hessian's entries exceed "
            "this dtype's range; use float64 or a smaller loss scale"
        )
    return t
