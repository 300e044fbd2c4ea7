"""The paper's Woodbury inverse of the Hessian (Section 6, eqs. 25-43, six-step summary).

Eq. 27 splits ``H = A + U^T Q U`` with ``A = D_x^T M^{-T} M^{-1} D_x``,
``U = [M^{-1} D_x; I]`` and ``Q = [[P^T D_M D_zz P - I, P^T D_M D_xz],
[D_D D_zx P, D_D D_xx]]``; then (eq. 28)

    ``H^{-1} = A^{-1} - A^{-1} U^T S_H^{-1} U A^{-1}``,  ``S_H = Q^{-1} + U A^{-1} U^T``,

with ``A^{-1} = D_x^{-1} M M^T D_x^{-T}`` block tridiagonal (step 1), ``Q^{-1}``
from the 2x2 partitioned inverse (eqs. 29-34, steps 3-4), and ``S_H`` made of
block-diagonal, bidiagonal and tridiagonal pieces (eqs. 37-39). Everything is
per-stage blocks, so the cost is linear in depth.

**Assumptions** (checked, each failure names itself): every ``D_x`` block
``grad_x f_l`` is square (``N a_l = p_l``; for the loss stage ``p_L = 1``) and
invertible; ``Q_22 = D_D D_xx`` (each ``Txx_l``) is invertible; ``S_q``,
``S_H11`` and ``T`` are invertible. Dense layers never satisfy the first: this
is for pipelines with one parameter per activation and one sample, e.g.
``z = tanh(x * z_prev + c)``. For everything else use ``method="lifted"``.

**Corrections to the text** (derived and tested; see ``docs/paper-notes.md``):
eq. 36 flips the sign of ``S_H`` (it is ``Q^{-1} + U A^{-1} U^T``, not its
negative); the partitioned inverse of eqs. 40-43 pivots on ``S_H11``, whose
last block is always zero (``Q_11``'s last block is ``-I`` because ``P^T``
drops ``z_L``, so ``S_q^{-1} + I = 0`` there): steps 5-6 can never run as
written. Ordered stage by stage (``[z_l, x_l]``), ``S_H`` is block tridiagonal,
and we factor it with the pivoted block LU of
:class:`hessinv.blocktri.BlockTriLU` instead (also no ``G G^T``: ``S_H`` is
indefinite). Step 6(a) names ``g'_1`` where it means ``g'_2``, and the summary
omits the last step ``x = A^{-1} g - A^{-1} U^T [g''_1; g''_2]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .blocktri import BlockTriLU
from .errors import SingularHessianError
from .paper import PaperMatrices


class WoodburyAssumptionError(ValueError):
    """A pipeline violates an assumption of the paper's Section 6 algorithm."""


def _inv(a: Tensor, what: str) -> Tensor:
    """Inverse of a small block, or a named error if it is singular."""
    if a.numel() == 0:
        return a
    lu, piv, info = torch.linalg.lu_factor_ex(a)
    d = torch.diagonal(lu).abs()
    scale = float(a.abs().max()) if a.numel() else 0.0
    if int(info) != 0 or float(d.min()) <= torch.finfo(a.dtype).eps * a.shape[0] * max(
        scale, 1e-300
    ):
        raise WoodburyAssumptionError(f"{what} is singular")
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    return torch.linalg.lu_solve(lu, piv, eye)


class WoodburySolver:
    """Section 6's ``H^{-1} g`` from the stage blocks (no damping: the text has none).

    Args:
        pm: The paper's matrices (:class:`hessinv.paper.PaperMatrices`).

    Raises:
        WoodburyAssumptionError: An assumption fails (the message names it).
    """

    def __init__(self, pm: PaperMatrices) -> None:
        self.pm = pm
        dx = pm.D_x.blocks
        n = len(dx)
        for l, d in enumerate(dx):  # noqa: E741
            if d.shape[0] != d.shape[1]:
                raise WoodburyAssumptionError(
                    f"D_x block of stage {l} (grad_x f_{l + 1}) is {d.shape[0]} x {d.shape[1]}, "
                    "not square: Section 6 needs as many parameters as outputs in every stage "
                    "(and one parameter in the loss stage); use method='lifted'"
                )
        self.dinv = [
            _inv(d, f"D_x block of stage {i} (grad_x f_{i + 1})") for i, d in enumerate(dx)
        ]
        jz = pm.M.jz  # jz[l] = grad_z f_l (l >= 1)
        tzz = pm.DM_Dzz.blocks  # tzz[l]: (m_{l-1} x m_{l-1}); tzz[0] empty
        tzx = [t.T for t in pm.DD_Dzx.blocks]  # (m_{l-1} x p_l)
        txx = pm.DD_Dxx.blocks
        self.txx_inv = [_inv(t, f"Q_22 = D_D D_xx block of stage {i}") for i, t in enumerate(txx)]
        sizes = [d.shape[0] for d in dx]
        eye = [torch.eye(s, dtype=dx[0].dtype, device=dx[0].device) for s in sizes]
        # eq. 30-34: S_q = Q_11 - Q_12 Q_22^{-1} Q_21, block diagonal
        sq = []
        for i in range(n):
            q11 = (tzz[i + 1] if i + 1 < n else 0.0) - eye[i]
            if i + 1 < n:
                q11 = q11 - tzx[i + 1] @ self.txx_inv[i + 1] @ tzx[i + 1].T
            sq.append(q11)
        self.sq_inv = [_inv(s, f"S_q block {i} (eq. 34)") for i, s in enumerate(sq)]
        # eq. 29: Q^{-1} blocks
        q12t = [None] * n  # Q~_12 (i, i+1)
        for i in range(n - 1):
            q12t[i] = -self.sq_inv[i] @ tzx[i + 1] @ self.txx_inv[i + 1]
        q22t = []
        for j in range(n):
            t = self.txx_inv[j]
            if j >= 1:
                t = t + self.txx_inv[j] @ tzx[j].T @ self.sq_inv[j - 1] @ tzx[j] @ self.txx_inv[j]
            q22t.append(t)
        # eqs. 35-39 (sign corrected): S_H = Q^{-1} + U A^{-1} U^T, as 2x2 blocks of
        # block diagonal (11), upper bidiagonal (12) and tridiagonal (22) matrices
        dinv_t = [d.T for d in self.dinv]
        sh11 = [self.sq_inv[i] + eye[i] for i in range(n)]
        sh12_up = [q12t[i] - jz[i + 1].T @ dinv_t[i + 1] for i in range(n - 1)]  # (i, i+1)
        sh22_diag = []
        for i in range(n):
            mm = eye[i] + (jz[i] @ jz[i].T if i >= 1 else 0.0)
            sh22_diag.append(q22t[i] + self.dinv[i] @ mm @ dinv_t[i])
        sh22_up = [self.dinv[i] @ (-jz[i + 1].T) @ dinv_t[i + 1] for i in range(n - 1)]
        # Steps 5-6, corrected: the text's partitioned inverse (eqs. 40-43) pivots on S_H11,
        # whose last block is always 0 (Q_11's last block is -I, so S_q^{-1} + I = 0). Ordered
        # stage by stage, [z_i, x_i], S_H is block tridiagonal: factor it with pivoting.
        diag, up = [], []
        for i in range(n):
            top = torch.cat([sh11[i], dinv_t[i]], dim=1)
            bot = torch.cat([self.dinv[i], sh22_diag[i]], dim=1)
            diag.append(torch.cat([top, bot], dim=0))
            if i + 1 < n:
                zeros = sh12_up[i].new_zeros(sizes[i], sizes[i + 1])
                top = torch.cat([zeros, sh12_up[i]], dim=1)
                bot = torch.cat([zeros, sh22_up[i]], dim=1)
                up.append(torch.cat([top, bot], dim=0))
        self.sh_lu = BlockTriLU(diag, up)
        if self.sh_lu.singular:
            raise WoodburyAssumptionError("S_H = Q^{-1} + U A^{-1} U^T (eq. 35) is singular")
        self.sizes = sizes

    # -- block operators ------------------------------------------------------
    def _split(self, v: Tensor) -> list[Tensor]:
        return list(torch.split(v, self.sizes, dim=0))

    def _a_inv(self, g: Tensor) -> Tensor:
        """Step 1: ``A^{-1} g = D_x^{-1} M M^T D_x^{-T} g``."""
        jz = self.pm.M.jz
        y = [d.T @ p for d, p in zip(self.dinv, self._split(g), strict=True)]
        n = len(y)
        mt = [y[i] - (jz[i + 1].T @ y[i + 1] if i + 1 < n else 0.0) for i in range(n)]
        m = [mt[i] - (jz[i] @ mt[i - 1] if i >= 1 else 0.0) for i in range(n)]
        return torch.cat([d @ p for d, p in zip(self.dinv, m, strict=True)], dim=0)

    def solve(self, g: Tensor) -> Tensor:
        """``H^{-1} g`` for ``g`` of shape ``(W, k)``: steps 1-6 and the final combination."""
        pm = self.pm
        ag = self._a_inv(g)  # step 1: A^{-1} g
        g1 = self._split(pm.M.solve(pm.D_x @ ag))  # step 2: [g'_1; g'_2] = U A^{-1} g
        g2 = self._split(ag)
        rhs = [torch.cat([a, b], dim=0) for a, b in zip(g1, g2, strict=True)]
        sol = self.sh_lu.solve(rhs)  # step 6: [g''_1; g''_2] = S_H^{-1} [g'_1; g'_2]
        y1 = torch.cat([s[:m] for s, m in zip(sol, self.sizes, strict=True)], dim=0)
        y2 = torch.cat([s[m:] for s, m in zip(sol, self.sizes, strict=True)], dim=0)
        ut = pm.D_x.T @ pm.M.solve_transposed(y1) + y2  # U^T [g''_1; g''_2]
        return ag - self._a_inv(ut)  # eq. 28


def woodbury_solve(blocks, g: Tensor, damping: float = 0.0) -> Tensor:  # noqa: ANN001
    """``H^{-1} g`` by the paper's Section 6 algorithm (``damping`` must be 0).

    Raises:
        WoodburyAssumptionError: ``damping != 0`` (the text has no damping
            term; ``A + U^T Q U + dI`` has no such split) or a violated
            assumption of Section 6.
        SingularHessianError: The result is not finite.
    """
    if damping != 0.0:
        raise WoodburyAssumptionError(
            "the Woodbury algorithm of Section 6 has no damping term; use damping=0 or "
            "method='lifted'"
        )
    x = WoodburySolver(PaperMatrices(blocks)).solve(g)
    if not torch.isfinite(x).all():
        raise SingularHessianError("the Woodbury solve overflowed")
    return x
