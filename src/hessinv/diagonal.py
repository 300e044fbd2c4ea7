"""Exact diagonal and block diagonal of ``H``, and Becker & LeCun's diagonal approximation.

Let ``G_l`` be the curvature of the loss with respect to stage ``l``'s output
(``d2 L / dz_l dz_l``, per sample since samples never mix). It propagates
backward like backprop, one level higher (0-based stages)::

    G_{L-2} = Tzz_{L-1},     G_{l-1} = Jz_l^T G_l Jz_l + Tzz_l

and the diagonal block of ``H`` for stage ``l`` is (chain rule through
``z_l = f_l(z_{l-1}; x_l)`` with everything else fixed)::

    H_ll = Txx_l + sum_n Jx_{l,n}^T G_{l,n} Jx_{l,n}.

Cost ``O(sum_l N (a_l^2 a_{l-1} + a_l^2 p_l) + p_l^2)`` for the blocks, or
``O(sum_l N a_l^2 p_l)`` for the diagonal alone: linear in depth.

Becker & LeCun (1989) (Bishop, *Deep Learning*, section 8.1.x) drop the
off-diagonal entries of ``G`` as they propagate it, ``g_{l-1} = (Jz_l^2)^T g_l
+ diag(Tzz_l)``, and read ``diag(H_ll) ~ diag(Txx_l) + sum_n (Jx_{l,n}^2)^T
g_{l,n}``: ``O(W)`` work (one extra backward pass), exact only when every
``G_l`` is diagonal.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .derivatives import StageBlocks


def _txx(b: StageBlocks) -> Tensor:
    if b.Txx is not None:
        return b.Txx
    return b.grad_x.new_zeros(b.num_params, b.num_params)


def output_curvatures(blocks: list[StageBlocks]) -> list[Tensor | None]:
    """``G_l`` per stage, ``(N, a_l, a_l)``; ``None`` for the last (its output is the loss)."""
    n_st = len(blocks)
    gs: list[Tensor | None] = [None] * n_st
    if n_st == 1:
        return gs
    g = blocks[-1].Tzz
    gs[n_st - 2] = g
    for l in range(n_st - 2, 0, -1):  # noqa: E741
        b = blocks[l]
        g = b.Jz.transpose(1, 2) @ g @ b.Jz + b.Tzz
        gs[l - 1] = g
    return gs


def block_diagonal(blocks: list[StageBlocks]) -> list[Tensor]:
    """The exact ``p_l x p_l`` diagonal blocks of ``H``, one per stage."""
    out = []
    for b, g in zip(blocks, output_curvatures(blocks), strict=True):
        h = _txx(b).clone()
        if g is not None:
            h = h + torch.einsum("nip,nij,njq->pq", b.Jx, g, b.Jx)
        out.append(0.5 * (h + h.T))
    return out


def diagonal(blocks: list[StageBlocks]) -> Tensor:
    """The exact diagonal of ``H`` (length ``W``), without forming the blocks."""
    out = []
    for b, g in zip(blocks, output_curvatures(blocks), strict=True):
        d = torch.diagonal(_txx(b)).clone()
        if g is not None:
            d = d + torch.einsum("nip,nij,njp->p", b.Jx, g, b.Jx)
        out.append(d)
    return torch.cat(out)


def becker_lecun_diagonal(blocks: list[StageBlocks]) -> Tensor:
    """Becker & LeCun's diagonal approximation of ``H`` (length ``W``), ``O(W)``.

    The output curvatures are propagated keeping only their diagonals
    (module doc); exact for a single stage with a diagonal loss curvature.
    """
    n_st = len(blocks)
    out: list[Tensor] = [None] * n_st  # type: ignore[list-item]
    out[-1] = torch.diagonal(_txx(blocks[-1])).clone()
    if n_st == 1:
        return out[0]
    g = torch.diagonal(blocks[-1].Tzz, dim1=1, dim2=2)  # (N, a)
    for l in range(n_st - 2, -1, -1):  # noqa: E741
        b = blocks[l]
        out[l] = torch.diagonal(_txx(b)) + torch.einsum("nip,ni->p", b.Jx**2, g)
        if l > 0:
            g = torch.einsum("nij,ni->nj", b.Jz**2, g) + torch.diagonal(b.Tzz, dim1=1, dim2=2)
    return torch.cat(out)
