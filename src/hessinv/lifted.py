"""The augmented (lifted) block-tridiagonal system whose Schur complement is ``H``.

Treat the recursions of :mod:`hessinv.products` as equations in the unknowns
``(v_l, u_l, lam_l)`` with right-hand side ``g`` (DESIGN.md section 3; the
lifting of the paper's eq. 26). Ordered stage by stage, block ``l`` holds
``[v_l (p_l), u_l (N a_l), lam_l (N a_l)]`` (the last stage only ``v_{L-1}``),
and the symmetric indefinite (KKT) matrix ``K`` reads::

    row v_l  :  (Txx_l + d I) v_l + Tzx_l^T u_{l-1} + Jx_l^T lam_l          = g_l
    row lam_l:  Jz_l u_{l-1} + Jx_l v_l - u_l                                  = 0
    row u_l  :  Tzz_{l+1} u_l + Tzx_{l+1} v_{l+1} + Jz_{l+1}^T lam_{l+1} - lam_l = 0

Eliminating ``u`` (forward, eq. 53) and ``lam`` (backward, eq. 52) leaves
``(H + d I) v = g``. So ``K`` is block tridiagonal with block sizes
``n_l = p_l + 2 N a_l``, and:

* ``inertia(H + dI) = inertia(K) - (m, m, 0)``, ``m = sum_l N a_l`` (the
  ``(u, lam)`` part ``[[T, B^T], [B, 0]]`` with ``B`` square and unit lower
  bidiagonal has inertia ``(m, m, 0)``, Haynsworth);
* ``det(K) = (-1)^m det(H + dI)`` (``det B = (-1)^m``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .derivatives import StageBlocks


def _block_diag(blocks: Tensor, transpose: bool = False) -> Tensor:
    """``(N, r, c)`` per-sample blocks -> the ``(N r, N c)`` block-diagonal matrix."""
    if transpose:
        blocks = blocks.transpose(-1, -2)
    n, r, c = blocks.shape
    out = blocks.new_zeros(n, r, n, c)
    idx = torch.arange(n, device=blocks.device)
    out[idx, :, idx, :] = blocks
    return out.reshape(n * r, n * c)


def lifted_blocks(blocks: list[StageBlocks], damping: float) -> tuple[list[Tensor], list[Tensor]]:
    """Diagonal blocks ``D_l`` and super-diagonal blocks ``K[l, l+1]`` of ``K``.

    Args:
        blocks: The stage blocks (from :func:`hessinv.products.compute_blocks`).
        damping: ``d`` added to the ``(v_l, v_l)`` blocks.

    Returns:
        ``(D, U)``: ``len(D) == L`` square blocks, ``len(U) == L - 1``.
    """
    n_st = len(blocks)
    diag: list[Tensor] = []
    upper: list[Tensor] = []
    for l in range(n_st):  # noqa: E741
        b = blocks[l]
        p = b.num_params
        ref = b.grad_x
        dvv = torch.eye(p, dtype=ref.dtype, device=ref.device) * damping
        if b.Txx is not None:
            dvv = dvv + b.Txx
        if l == n_st - 1:
            diag.append(dvv)
            continue
        nxt = blocks[l + 1]
        n, a, _ = b.Jx.shape
        m = n * a
        jx = b.Jx.reshape(m, p)
        eye = torch.eye(m, dtype=ref.dtype, device=ref.device)
        dl = ref.new_zeros(p + 2 * m, p + 2 * m)
        dl[:p, :p] = dvv
        dl[:p, p + m :] = jx.T
        dl[p + m :, :p] = jx
        dl[p : p + m, p : p + m] = _block_diag(nxt.Tzz)
        dl[p : p + m, p + m :] = -eye
        dl[p + m :, p : p + m] = -eye
        diag.append(dl)
        q = nxt.num_params
        last_next = l + 1 == n_st - 1
        width = q if last_next else q + 2 * nxt.Jx.shape[0] * nxt.Jx.shape[1]
        ul = ref.new_zeros(p + 2 * m, width)
        ul[p : p + m, :q] = nxt.Tzx.reshape(m, q)
        if not last_next:
            ul[p : p + m, width - nxt.Jx.shape[0] * nxt.Jx.shape[1] :] = _block_diag(
                nxt.Jz, transpose=True
            )
        upper.append(ul)
    return diag, upper


def num_constraints(blocks: list[StageBlocks]) -> int:
    """``m = sum_l N a_l``, the number of ``u`` (and of ``lam``) unknowns."""
    return sum(b.Jx.shape[0] * b.Jx.shape[1] for b in blocks[:-1])


def lifted_rhs(g: Tensor, blocks: list[StageBlocks]) -> list[Tensor]:
    """Right-hand side ``[g_l, 0, 0]`` per block, for ``g`` of shape ``(W, k)``."""
    out = []
    i = 0
    for l, b in enumerate(blocks):  # noqa: E741
        p = b.num_params
        piece = g[i : i + p]
        i += p
        if l < len(blocks) - 1:
            m = b.Jx.shape[0] * b.Jx.shape[1]
            piece = torch.cat([piece, g.new_zeros(2 * m, g.shape[1])], dim=0)
        out.append(piece)
    return out


def lifted_extract(x: list[Tensor], blocks: list[StageBlocks]) -> Tensor:
    """The ``v`` part of a lifted solution, stacked to ``(W, k)``."""
    return torch.cat([xi[: b.num_params] for xi, b in zip(x, blocks, strict=True)], dim=0)


def lifted_dense(diag: list[Tensor], upper: list[Tensor]) -> Tensor:
    """Assemble ``K`` densely (tests and small problems only)."""
    sizes = [d.shape[0] for d in diag]
    off = [0]
    for s in sizes:
        off.append(off[-1] + s)
    k = diag[0].new_zeros(off[-1], off[-1])
    for l, d in enumerate(diag):  # noqa: E741
        k[off[l] : off[l + 1], off[l] : off[l + 1]] = d
    for l, u in enumerate(upper):  # noqa: E741
        k[off[l] : off[l + 1], off[l + 1] : off[l + 2]] = u
        k[off[l + 1] : off[l + 2], off[l] : off[l + 1]] = u.T
    return k
