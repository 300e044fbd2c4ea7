"""The paper's Section 6 Woodbury inverse under the solver contract (solves only).

Valid only under the assumptions :mod:`hessinv.woodbury` checks (square,
invertible ``D_x`` blocks; invertible ``D_D D_xx``; ``damping == 0``); its
answers pass the same backward-error check as every method, so a
Woodbury solve that lost accuracy raises instead of passing.
"""

from __future__ import annotations

from torch import Tensor

from ..paper import PaperMatrices
from ..woodbury import WoodburyAssumptionError, WoodburySolver
from .base import Factorization


class WoodburyFactorization(Factorization):
    """``H^{-1}`` by eqs. 25-43 (``damping`` must be 0)."""

    method = "woodbury"

    def __init__(self, op, damping: float) -> None:  # noqa: ANN001
        super().__init__(op, damping)
        if self.damping != 0.0:
            raise WoodburyAssumptionError(
                "the Woodbury algorithm of Section 6 has no damping term; use damping=0 or "
                "method='lifted'"
            )
        self.solver = WoodburySolver(PaperMatrices(op.blocks))

    @property
    def singular(self) -> bool:
        """Not decided here (its assumptions make ``H`` invertible); ``eta`` is checked."""
        return False

    def _apply(self, g: Tensor) -> Tensor:
        return self.solver.solve(g)
