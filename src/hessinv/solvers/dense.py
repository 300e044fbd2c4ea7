"""The dense factorization: the eigendecomposition of ``H`` (small ``W``).

``H = Q diag(w) Q^T`` is computed once per operator (``W`` products to form
``H``, then ``torch.linalg.eigh``, ``O(W^3)``) and serves every damping:
``(H + dI)^{-1} g = Q diag(1/(w + d)) Q^T g``; the inertia and the
log-determinant are read off ``w + d``. Its zero test is exact in the sense of
the contract: ``|w_i + d| <= W eps max_j |w_j + d|``
(:func:`hessinv.solvers.base.zero_threshold`), and since ``eigh`` is backward
stable (each computed eigenvalue within a small multiple of ``eps ||H||`` of a
true one), every eigenvalue outside that band has the sign it is counted with:
the counts, and the positive-definiteness verdict, are verified.
"""

from __future__ import annotations

import math

from torch import Tensor

from .base import Factorization, Inertia


class DenseFactorization(Factorization):
    """``H + damping I`` from the cached eigendecomposition of the dense ``H``."""

    method = "dense"

    def __init__(self, op, damping: float) -> None:  # noqa: ANN001
        super().__init__(op, damping)
        w, q = op._eigh()
        self.w, self.q = w + self.damping, q
        self._norm = float(self.w.abs().max()) if self.w.numel() else 0.0
        self._h_norm = float(w.abs().max()) if w.numel() else 0.0

    def norm(self) -> float:
        """``||H + dI||_2``, exactly ``max_i |w_i + d|``."""
        return self._norm

    def data_norm(self) -> float:
        """``||H|| + |d|``, exactly ``max_i |w_i| + |d|``."""
        return self._h_norm + abs(self.damping)

    def zero_count(self) -> int:
        """Eigenvalues with ``|w_i + d| <= t`` (:meth:`zero_threshold`)."""
        if self._zero is None:
            t = self.zero_threshold()
            self._zero = int((self.w.abs() <= t).sum()) if self.w.numel() else 0
        return self._zero

    def _apply(self, g: Tensor) -> Tensor:
        return self.q @ ((self.q.T @ g) / self.w.unsqueeze(1))

    def _logdet(self) -> tuple[float, float]:
        sign = -1.0 if int((self.w < 0).sum()) % 2 else 1.0
        return sign, float(self.w.abs().log().sum())

    def _signs(self) -> Inertia:
        n_neg = int((self.w < 0).sum())
        return Inertia(
            self.size - n_neg, n_neg, 0, verified=True, how="eigendecomposition of the dense H"
        )

    def inertia(self) -> Inertia:
        """Counts of ``w + d`` above, below and within the zero band."""
        self.op._check_fresh()
        t = self.zero_threshold()
        zero = self.w.abs() <= t
        return Inertia(
            int(((self.w > 0) & ~zero).sum()),
            int(((self.w < 0) & ~zero).sum()),
            int(zero.sum()),
            verified=True,
            how=f"eigendecomposition of the dense H; zero band |lambda| <= {t:.1e}",
        )

    def _positive_definite(self) -> bool:
        return self.zero_count() == 0 and bool((self.w > 0).all())

    def logdet(self) -> tuple[float, float]:
        """``(sign, log|det(H + damping I)|)``; ``(0.0, -inf)`` when numerically singular."""
        self.op._check_fresh()
        if self.zero_count():
            return 0.0, -math.inf
        return self._logdet()
