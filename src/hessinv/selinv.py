"""Selected inversion: the diagonal blocks of ``(H + dI)^{-1}`` without forming the inverse.

``(H + dI)^{-1}`` is the ``v``-block of ``K^{-1}`` (``K`` the lifted
block-tridiagonal system of :mod:`hessinv.lifted`, whose Schur complement onto
``v`` is ``H + dI``). Only the diagonal blocks of ``X = K^{-1}`` that hold a
``v_l`` are computed, each from a small local system, in time linear in depth.

**Twisted block elimination with orthogonal interfaces.** Column block ``i``
of ``X`` solves ``K x = E_i`` (``E_i`` the identity on block ``i``). Block rows
``0..i-1`` of ``K`` have a zero right-hand side; a block QR sweep from the top
(Householder panels ``[A; K_{k,k+1}^T]``, as :class:`~hessinv.blocktri.BlockTriLU`
sweeps with LU panels) turns them into orthogonal combinations of which all but
``n_{i-1}`` are triangular in block columns ``0..i-2``; the remaining
``n_{i-1}`` rows ``[A_i, B_i]`` act on ``(x_{i-1}, x_i)`` alone (the *left
interface*). The same sweep from the bottom gives the right interface
``[B'_i, A'_i]`` on ``(x_i, x_{i+1})``. With block row ``i`` itself::

    M_i = [[A_i,         B_i,    0          ],      M_i [x_{i-1}; x_i; x_{i+1}] = [0; I; 0]
           [K_{i,i-1},   K_ii,   K_{i,i+1}  ],
           [0,           B'_i,   A'_i       ]]

and ``X_ii`` is the middle block of ``M_i^{-1}`` (one LU with partial pivoting
of size ``n_{i-1} + n_i + n_{i+1}``). ``M_i`` is the core of ``Q^T K`` for an
orthogonal ``Q``, whose other rows are block triangular, so ``||M_i|| <=
||K||`` and ``||M_i^{-1}|| <= ||K^{-1}||``: each ``X_ii`` is as accurate as a
backward-stable dense solve with ``K``, with no error carried from block to
block. Cost ``O(sum_i n_i^3)``; the right interfaces are stored
(``O(sum_i n_i^2)``, as the LU's factors).

This is the stable variant of the block Takahashi / Erisman-Tinney
recurrences (``U X = L^{-1} P``, backward from the last block, with the
symmetry ``X_{i+1,i} = X_{i,i+1}^T``) and of the recursive Green's functions
(``X_ii = (K_ii - Sigma_left - Sigma_right)^{-1}`` with unpivoted Schur
complements). The latter breaks down when a leading block of the KKT matrix
``K`` is singular; the former, run on the pivoted block LU (or on a block QR),
squares the error amplification at every step: on the tanh MLP of depth 16,
width 8, batch 16 (``cond K = 1.4e5``) it lost all digits in the first blocks.

**Back to H.** The ``v_l``-part of ``X_{2l,2l}`` is ``G_l = [(Q^T (H + dI)
Q)^{-1}]_{ll}`` in the kept basis; with the dropped directions (eigenvalue
``d`` each, :mod:`hessinv.lifted`) the stage block of ``(H + dI)^{-1}`` is
``Q_l G_l Q_l^T + P_l / d``, ``P_l = I - Q_l Q_l^T`` computed as ``C_l C_l^T``
from an orthonormal complement ``C_l`` (no cancellation in ``1 - ||q_i||^2``).

**Scaling.** ``K``'s curvature blocks (``Txx + dI``, ``Tzz``, ``Tzx``) scale with
the loss but its Jacobian blocks do not. The elimination runs on the lifted
system of ``loss / c`` at ``d / c`` (``c`` = :func:`hessinv.lifted.curvature_scale`,
a power of two, so the scaling is exact), which equals ``S K S`` for
``S = diag(c^{-1/2} I_v, c^{-1/2} I_u, c^{1/2} I_lam)``; ``K^{-1} = S (S K S)^{-1} S``
gives the ``v`` blocks as ``X_vv / c``. The elimination and its singularity
test therefore do not depend on the scale of the loss.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from .derivatives import StageBlocks
from .errors import HINT, SingularHessianError
from .lifted import LiftedSystem, _LazyBlocks, curvature_scale


def _interfaces(diag: Sequence[Tensor], upper: Sequence[Tensor]) -> Iterator[tuple[Tensor, Tensor]]:
    """Left interfaces of a block-tridiagonal ``K``, by a block QR sweep (orthogonal panels).

    Yields, for ``i = 1, ..., nb - 1``, ``(A_i, B_i)``: ``n_{i-1}`` rows, orthogonal
    combinations of block rows ``0..i-1`` of ``K`` that vanish on block columns
    ``0..i-2``, restricted to block columns ``i - 1`` (``A_i``) and ``i`` (``B_i``).
    """
    nb = len(diag)
    a_cur, b_cur = diag[0], upper[0] if nb > 1 else None
    for k in range(nb - 1):
        assert b_cur is not None
        yield a_cur, b_cur
        if k == nb - 2:
            return
        up, d_next, up_next = upper[k], diag[k + 1], upper[k + 1]
        nk, nk1 = a_cur.shape[0], d_next.shape[0]
        q, _ = torch.linalg.qr(torch.cat([a_cur, up.T], dim=0), mode="complete")
        top = torch.cat([b_cur, b_cur.new_zeros(nk, up_next.shape[1])], dim=1)
        right = torch.cat([top, torch.cat([d_next, up_next], dim=1)], dim=0)
        rest = q[:, nk:].T @ right
        a_cur, b_cur = rest[:, :nk1], rest[:, nk1:]


def band_inverse_diagonal(
    diag: Sequence[Tensor], upper: Sequence[Tensor], which: Sequence[int] | None = None
) -> dict[int, Tensor]:
    """Diagonal blocks ``X_ii`` of ``X = K^{-1}``, ``K`` symmetric block tridiagonal.

    Twisted block elimination (module doc): a block QR sweep from each end
    gives the interfaces; ``X_ii`` is the middle block of ``M_i^{-1}``, ``M_i``
    the local system of the interface rows and block row ``i``, solved by LU
    with partial pivoting.

    Args:
        diag: Diagonal blocks ``D_i``.
        upper: Super-diagonal blocks ``K[i, i+1]``.
        which: The blocks wanted (default all).

    Raises:
        SingularHessianError: A local system ``M_i`` is singular to working
            precision (then so is ``K``).
    """
    nb = len(diag)
    if len(upper) != nb - 1:
        raise ValueError("need len(upper) == len(diag) - 1")
    want = set(range(nb)) if which is None else set(which)
    rdiag = _LazyBlocks(nb, lambda j: diag[nb - 1 - j])
    rupper = _LazyBlocks(nb - 1, lambda j: upper[nb - 2 - j].T)
    right = list(
        _interfaces(rdiag, rupper)
    )  # right[j]: rows of blocks nb-1-j.., cols (nb-1-j, nb-2-j)
    right.reverse()  # right[i]: rows of blocks i+1.., over columns (i + 1, i)
    left = _interfaces(diag, upper)
    out: dict[int, Tensor] = {}
    eps = torch.finfo(diag[0].dtype).eps
    for i in range(nb):
        li = next(left) if i > 0 else None
        if i not in want:
            continue
        d_i = diag[i]
        n_i = d_i.shape[0]
        rows, mid = [], 0
        if li is not None:  # a x_{i-1} + b x_i = 0, and block row i's x_{i-1} term
            a, b = li
            n_l = a.shape[0]
            rows.append(
                torch.cat(
                    [a, b] + ([b.new_zeros(n_l, diag[i + 1].shape[0])] if i < nb - 1 else []), dim=1
                )
            )
            mid = n_l
        row_i = [upper[i - 1].T] if i > 0 else []
        row_i.append(d_i)
        if i < nb - 1:
            row_i.append(upper[i])
        rows.append(torch.cat(row_i, dim=1))
        if i < nb - 1:
            a2, b2 = right[i]
            n_r = a2.shape[0]
            parts = ([a2.new_zeros(n_r, a.shape[0])] if i > 0 else []) + [b2, a2]
            rows.append(torch.cat(parts, dim=1))
        m = torch.cat(rows, dim=0)
        lu, piv, _ = torch.linalg.lu_factor_ex(m)
        tol = eps * m.shape[0] * max(float(m.abs().max()), 1e-300)
        if float(torch.diagonal(lu).abs().min()) <= tol:
            raise SingularHessianError(
                f"the lifted system is singular to working precision (block {i}). {HINT}"
            )
        rhs = m.new_zeros(m.shape[0], n_i)
        rhs[mid : mid + n_i] = torch.eye(n_i, dtype=m.dtype, device=m.device)
        out[i] = torch.linalg.lu_solve(lu, piv, rhs)[mid : mid + n_i]
    return out


def _complement(q: Tensor) -> Tensor:
    """An orthonormal basis of the orthogonal complement of ``span(q)`` (``q`` orthonormal)."""
    full, _ = torch.linalg.qr(q, mode="complete")
    return full[:, q.shape[1] :]


def inverse_block_diagonal(blocks: list[StageBlocks], damping: float) -> list[Tensor]:
    """The ``p_l x p_l`` diagonal blocks of ``(H + dI)^{-1}``, one per stage, linear in depth.

    Args:
        blocks: The stage blocks of ``H`` (:attr:`hessinv.Hessian.stage_blocks`).
        damping: ``d``; ``H + dI`` must be nonsingular.

    Raises:
        SingularHessianError: ``d = 0`` with exact null directions (dropped
            by the lifting), or a zero pivot of the lifted LU.
    """
    c = curvature_scale(blocks, damping)
    ls = LiftedSystem(blocks, damping, scale=c)  # the system of loss / c at d / c
    if ls.singular_by_structure:
        raise SingularHessianError(
            f"H has at least {ls.n_dropped} exact null directions (parameter directions no "
            f"output depends on at this batch), so H + 0*I is singular. {HINT}"
        )
    xs = band_inverse_diagonal(ls.diag, ls.upper, range(0, len(ls.sizes), 2))
    out = []
    for l, q in enumerate(ls.bases):  # noqa: E741
        k = ls._k[l]
        g = xs[2 * l][:k, :k] / c
        g = 0.5 * (g + g.T)  # X_ii is symmetric up to round-off
        if q is None:
            out.append(g)
            continue
        cq = _complement(q)
        out.append(q @ g @ q.T + (cq @ cq.T) / damping)
    return out


def inverse_diagonal(blocks: list[StageBlocks], damping: float) -> Tensor:
    """The diagonal of ``(H + dI)^{-1}`` (length ``W``), linear in depth.

    Same as ``torch.cat([b.diagonal() for b in inverse_block_diagonal(...)])``.
    """
    return torch.cat([torch.diagonal(b) for b in inverse_block_diagonal(blocks, damping)])
