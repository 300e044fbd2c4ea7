"""Solvers of ``(H + damping I) x = g`` behind one protocol (:class:`Factorization`).

======================  ===========================================================
``method``              factorization
======================  ===========================================================
``"lifted"``            :class:`LiftedFactorization`: pivoted LU of the lifted
                        system, linear in depth; solve, logdet, inertia
``"dense"``             :class:`DenseFactorization`: eigendecomposition of ``H``,
                        ``O(W^3)``, serves every damping; verified inertia
``"minres"``, ``"cg"``  :class:`KrylovSolver`: products only; solves only
``"woodbury"``          :class:`WoodburyFactorization`: the paper's Section 6,
                        under its assumptions; solves only
``"auto"``              the cheapest exact method that fits in memory
                        (:func:`~hessinv.solvers.select.choose`)
======================  ===========================================================
"""

from __future__ import annotations

from collections.abc import Callable

from .base import Factorization, Inertia, solve_tolerance, zero_threshold
from .dense import DenseFactorization
from .krylov import KrylovSolver
from .lifted import LiftedFactorization
from .woodbury import WoodburyFactorization

#: ``method -> constructor(op, damping)``.
FACTORIZATIONS: dict[str, Callable[..., Factorization]] = {
    "lifted": LiftedFactorization,
    "dense": DenseFactorization,
    "woodbury": WoodburyFactorization,
    "minres": lambda op, d: KrylovSolver(op, d, "minres"),
    "cg": lambda op, d: KrylovSolver(op, d, "cg"),
}

__all__ = [
    "FACTORIZATIONS",
    "DenseFactorization",
    "Factorization",
    "Inertia",
    "KrylovSolver",
    "LiftedFactorization",
    "WoodburyFactorization",
    "solve_tolerance",
    "zero_threshold",
]
