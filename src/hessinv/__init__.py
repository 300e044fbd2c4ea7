"""hessinv: the exact Hessian of deep layered networks, linear in depth.

Products ``H @ v`` (Pearlmutter, paper eq. 24), exact solves
``(H + damping I)^{-1} g`` through a pivoted factorization of the lifted
block-tridiagonal system, log-determinants and inertia, for pipelines
``z_l = f_l(z_{l-1}; x_l)`` ending in a scalar loss.
"""

from . import approx, check, optim, paper, solvers
from .errors import (
    CostWarning,
    InaccurateSolveError,
    LiftedPrecisionError,
    LiftedPrecisionWarning,
    NonFiniteError,
    SingularHessianError,
)
from .ggn import GaussNewton
from .hessian import Hessian
from .operator import IdentityOperator, LinearOperator
from .pipeline import Pipeline, Stage
from .solvers import Inertia
from .solves import InverseOperator
from .staleness import StaleOperatorError

__all__ = [
    "CostWarning",
    "GaussNewton",
    "Hessian",
    "IdentityOperator",
    "InaccurateSolveError",
    "Inertia",
    "LiftedPrecisionError",
    "LinearOperator",
    "InverseOperator",
    "LiftedPrecisionWarning",
    "NonFiniteError",
    "Pipeline",
    "SingularHessianError",
    "Stage",
    "StaleOperatorError",
    "approx",
    "check",
    "optim",
    "paper",
    "solvers",
]
__version__ = "0.1.0"
