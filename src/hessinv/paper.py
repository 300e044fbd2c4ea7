"""The paper's matrices, literally (Rahimi 2025, sections 4-5, eqs. 6-8 and 24).

The batch is folded into the state: the paper's ``z_l`` is our ``(N a_l,)``
vector (the last, ``z_L``, is the scalar loss), so its per-stage blocks are
block diagonal over samples. With ``b_l = dz_L/dz_l`` (the cotangents of
backprop), the operators are

==============  ===========================================  =====================
paper           here                                         shape of block ``l``
==============  ===========================================  =====================
``M``           :class:`BackpropMatrix`: ``I`` on the          ``N a_l x N a_l``
                diagonal, ``-grad_z f_l`` below (eq. 7)
``D_x``         ``BlockDiagonal([grad_x f_l])`` (eq. 6)        ``N a_l x p_l``
``P``           :class:`Shift`: ``(P y)_l = y_{l-1}``          --
``D_D D_xx``    ``BlockDiagonal([Txx_l])``                     ``p_l x p_l``
``D_D D_zx``    ``BlockDiagonal([Tzx_l^T])``                   ``p_l x N a_{l-1}``
``D_M D_zz``    ``BlockDiagonal([Tzz_l])``                     ``N a_{l-1} x N a_{l-1}``
``D_M D_xz``    ``(D_D D_zx)^T``                               ``N a_{l-1} x p_l``
``e_L``         the unit row selecting ``z_L``                 --
``b``           ``e_L M^{-1}``, the stacked ``b_l``            --
==============  ===========================================  =====================

and, term by term,

* eq. 8: ``dz_L/dx = e_L M^{-1} D_x``;
* eq. 24: ``H = D_D D_xx + D_D D_zx P M^{-1} D_x + D_x^T M^{-T} P^T D_M D_xz
  + D_x^T M^{-T} P^T D_M D_zz P M^{-1} D_x``.

These are for reading the paper against running code (and for tests): the
fast paths of :mod:`hessinv.products` compute the same quantities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .derivatives import StageBlocks
from .lifted import _block_diag


def _dense_blocks(t: Tensor | None, rows: int, cols: int, like: Tensor) -> Tensor:
    """A per-sample ``(N, r, c)`` tensor as its ``(N r, N c)`` block diagonal; zeros for None."""
    if t is None:
        return like.new_zeros(rows, cols)
    if t.dim() == 3:
        return _block_diag(t)
    return t


@dataclass
class BlockDiagonal:
    """``diag(B_1, ..., B_L)`` with rectangular dense blocks."""

    blocks: list[Tensor]

    @property
    def row_sizes(self) -> list[int]:
        """Rows of each block."""
        return [b.shape[0] for b in self.blocks]

    @property
    def col_sizes(self) -> list[int]:
        """Columns of each block."""
        return [b.shape[1] for b in self.blocks]

    def __matmul__(self, v: Tensor) -> Tensor:
        parts = torch.split(v, self.col_sizes, dim=0)
        return torch.cat([b @ p for b, p in zip(self.blocks, parts, strict=True)], dim=0)

    @property
    def T(self) -> BlockDiagonal:  # noqa: N802
        """The transpose."""
        return BlockDiagonal([b.T for b in self.blocks])

    def to_dense(self) -> Tensor:
        """The dense matrix."""
        return torch.block_diag(*self.blocks)


@dataclass
class BackpropMatrix:
    """``M`` of eq. 7: identity blocks on the diagonal, ``-grad_z f_{l}`` at ``(l, l-1)``.

    ``M^{-1}`` is applied by forward substitution (the forward tangent
    recursion), ``M^{-T}`` by backward substitution (backprop, eq. 5).
    """

    jz: list[Tensor]  # jz[l] = grad_z f_l, (size_l x size_{l-1}); jz[0] unused

    @property
    def sizes(self) -> list[int]:
        """Block sizes ``N a_l`` (the last is 1, the loss)."""
        return [j.shape[0] for j in self.jz]

    def solve(self, r: Tensor) -> Tensor:
        """``M^{-1} r``: ``y_l = r_l + grad_z f_l y_{l-1}``."""
        parts = torch.split(r, self.sizes, dim=0)
        ys = [parts[0]]
        for l in range(1, len(parts)):  # noqa: E741
            ys.append(parts[l] + self.jz[l] @ ys[-1])
        return torch.cat(ys, dim=0)

    def solve_transposed(self, r: Tensor) -> Tensor:
        """``M^{-T} r``: ``y_l = r_l + grad_z f_{l+1}^T y_{l+1}``."""
        parts = torch.split(r, self.sizes, dim=0)
        n = len(parts)
        ys: list[Tensor] = [None] * n  # type: ignore[list-item]
        ys[-1] = parts[-1]
        for l in reversed(range(n - 1)):  # noqa: E741
            ys[l] = parts[l] + self.jz[l + 1].T @ ys[l + 1]
        return torch.cat(ys, dim=0)

    def to_dense(self) -> Tensor:
        """The dense lower block-bidiagonal matrix."""
        sizes = self.sizes
        off = [0]
        for s in sizes:
            off.append(off[-1] + s)
        m = torch.eye(off[-1], dtype=self.jz[-1].dtype, device=self.jz[-1].device)
        for l in range(1, len(sizes)):  # noqa: E741
            m[off[l] : off[l + 1], off[l - 1] : off[l]] = -self.jz[l]
        return m


@dataclass
class Shift:
    """``P`` of eq. 21: ``(P y)_l = y_{l-1}``, ``(P y)_1 = 0`` (sub-diagonal identities).

    ``P`` maps the stage-output space (blocks ``N a_l``) to the stage-input
    space (blocks ``N a_{l-1}``, the first of size 0 since ``z_0`` is data).
    """

    sizes: list[int]  # output sizes N a_l, l = 1..L

    def __matmul__(self, y: Tensor) -> Tensor:
        # drop the last block (z_L feeds no stage); stage 1's input block is empty
        return y[: sum(self.sizes[:-1])]

    def rmatmul(self, w: Tensor) -> Tensor:
        """``P^T w``."""
        return torch.cat([w, w.new_zeros(self.sizes[-1], *w.shape[1:])], dim=0)


class PaperMatrices:
    """The matrices of eqs. 6-8 and 24 built from a Hessian's stage blocks.

    Args:
        blocks: Stage blocks (``Hessian.blocks``).
    """

    def __init__(self, blocks: list[StageBlocks]) -> None:
        self.blocks = blocks
        ref = blocks[-1].grad_x
        n_st = len(blocks)
        out_sizes = [b.Jx.shape[0] * b.Jx.shape[1] for b in blocks[:-1]] + [1]
        self.out_sizes = out_sizes
        # grad_x f_l: per-sample Jx stacked; the last stage's is grad_x of the loss (1 x p_L)
        dx = [b.Jx.reshape(-1, b.num_params) for b in blocks[:-1]]
        dx.append(blocks[-1].grad_x.reshape(1, -1))
        self.D_x = BlockDiagonal(dx)
        # grad_z f_l: block diagonal per sample; the last is b_{L-1}^T (1 x N a_{L-1})
        jz = [ref.new_zeros(out_sizes[0], 0)]
        for l in range(1, n_st - 1):  # noqa: E741
            jz.append(_block_diag(blocks[l].Jz))
        if n_st > 1:
            jz.append(blocks[-1].cot_in.reshape(1, -1))
        self.M = BackpropMatrix(jz)
        self.P = Shift(out_sizes)
        in_sizes = [0, *out_sizes[:-1]]
        self.DD_Dxx = BlockDiagonal(
            [
                b.Txx if b.Txx is not None else ref.new_zeros(b.num_params, b.num_params)
                for b in blocks
            ]
        )
        self.DD_Dzx = BlockDiagonal(
            [
                (
                    b.Tzx.reshape(-1, b.num_params)
                    if b.Tzx is not None
                    else ref.new_zeros(0, b.num_params)
                ).T
                for b in blocks
            ]
        )
        self.DM_Dzz = BlockDiagonal(
            [
                _dense_blocks(b.Tzz, in_sizes[l], in_sizes[l], ref)
                for l, b in enumerate(blocks)  # noqa: E741
            ]
        )
        self.DM_Dxz = self.DD_Dzx.T
        self.e_L = ref.new_zeros(sum(out_sizes))
        self.e_L[-1] = 1.0

    def b(self) -> Tensor:
        """``b = e_L M^{-1}`` (eq. 7), the stacked cotangents ``[b_1 ... b_L]``."""
        return self.M.solve_transposed(self.e_L[:, None])[:, 0]

    def gradient(self) -> Tensor:
        """Eq. 8: ``e_L M^{-1} D_x`` (as a column: ``D_x^T M^{-T} e_L^T``)."""
        return self.D_x.T @ self.b()[:, None][:, 0:1]

    def hvp(self, v: Tensor) -> Tensor:
        """Eq. 24, term by term, for ``v`` of shape ``(W, k)``."""
        t = self.P @ self.M.solve(self.D_x @ v)  # P M^{-1} D_x v
        term1 = self.DD_Dxx @ v
        term2 = self.DD_Dzx @ t
        term3 = self.D_x.T @ self.M.solve_transposed(self.P.rmatmul(self.DM_Dxz @ v))
        term4 = self.D_x.T @ self.M.solve_transposed(self.P.rmatmul(self.DM_Dzz @ t))
        return term1 + term2 + term3 + term4

    def hessian_dense(self) -> Tensor:
        """Eq. 24 with every matrix dense (small problems only)."""
        minv = torch.linalg.inv(self.M.to_dense())
        dx = self.D_x.to_dense()
        n_out = sum(self.out_sizes)
        p = torch.eye(n_out, dtype=dx.dtype, device=dx.device)[: n_out - self.out_sizes[-1]]
        pmd = p @ minv @ dx
        a = self.DD_Dxx.to_dense()
        b = self.DD_Dzx.to_dense() @ pmd
        return a + b + b.T + pmd.T @ self.DM_Dzz.to_dense() @ pmd
