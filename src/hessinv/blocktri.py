"""Factorizations of a symmetric block-tridiagonal matrix, linear in the number of blocks.

``K`` has diagonal blocks ``D_k`` (``n_k x n_k``) and super-diagonal blocks
``U_k = K[k, k+1]``; the sub-diagonal is ``U_k^T``.

* :class:`BlockTriLU` -- block LU with partial pivoting across the block
  boundary, as LAPACK's banded ``gbtrf`` pivots: at step ``k`` the tall panel
  ``[D~_k; U_k^T]`` (``(n_k + n_{k+1}) x n_k``) is factored with partial
  pivoting and the fill-in (one extra block super-diagonal) is carried.
  ``O(sum_k n_k^3)`` time, ``O(sum_k n_k^2)`` memory. Gives solves and
  ``slogdet``. The unpivoted stage-wise recursion is unstable on indefinite
  matrices (DESIGN.md section 3); this one is not.
* :func:`block_tri_inertia` -- inertia by a congruence ``K = X diag(...) X^T``
  built front by front with orthogonal eigen-decompositions and *delayed
  pivots*: at front ``k`` the directions whose eigenvalue is large compared
  with their coupling to the next block are eliminated (their signs counted,
  Sylvester's law of inertia), the others are delayed into the next front,
  as multifrontal LDL^T solvers delay unstable pivots. ``O(sum_k f_k^3)``
  with front sizes ``f_k <= n_k + n_{k-1}``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def _perm_from_pivots(piv: Tensor, m: int) -> tuple[list[int], int]:
    """LAPACK 1-based row interchanges -> permutation list and swap count."""
    perm = list(range(m))
    swaps = 0
    for i, p in enumerate(piv.tolist()):
        j = p - 1
        if j != i:
            perm[i], perm[j] = perm[j], perm[i]
            swaps += 1
    return perm, swaps


def _solve_lower_unit(lu: Tensor, b: Tensor) -> Tensor:
    return torch.linalg.solve_triangular(lu, b, upper=False, unitriangular=True)


def _solve_upper(lu: Tensor, b: Tensor) -> Tensor:
    return torch.linalg.solve_triangular(lu, b, upper=True)


@dataclass
class _Step:
    lu: Tensor  # (n_k + n_{k+1}, n_k) packed panel factors
    perm: Tensor  # row permutation of the stacked rows
    u12: Tensor  # (n_k, n_{k+1} + n_{k+2})
    n: int


class BlockTriLU:
    """Pivoted block LU of a block-tridiagonal matrix.

    Args:
        diag: Diagonal blocks ``D_k`` (any sequence; each item is read once,
            in order, so a lazy sequence keeps only ``O(1)`` input blocks alive).
        upper: Super-diagonal blocks ``U_k`` (``len(diag) - 1`` of them); the
            sub-diagonal is taken as ``U_k^T`` (symmetric ``K``).
    """

    def __init__(self, diag: Sequence[Tensor], upper: Sequence[Tensor]) -> None:
        n_bl = len(diag)
        if len(upper) != n_bl - 1:
            raise ValueError("need len(upper) == len(diag) - 1")
        self.steps: list[_Step] = []
        maxes: list[Tensor] = []
        pivots: list[Tensor] = []
        swaps = 0
        a_cur = diag[0]
        self.sizes = [a_cur.shape[0]]
        up = upper[0] if n_bl > 1 else None
        b_cur = up
        for t in (a_cur, up):
            if t is not None and t.numel():
                maxes.append(t.abs().amax())
        for k in range(n_bl - 1):
            assert up is not None and b_cur is not None
            d_next = diag[k + 1]
            up_next = upper[k + 1] if k + 1 < n_bl - 1 else None
            for t in (d_next, up_next):
                if t is not None and t.numel():
                    maxes.append(t.abs().amax())
            nk, nk1 = a_cur.shape[0], d_next.shape[0]
            self.sizes.append(nk1)
            panel = torch.cat([a_cur, up.T], dim=0)
            lu, piv, _ = torch.linalg.lu_factor_ex(panel)
            perm, sw = _perm_from_pivots(piv, nk + nk1)
            swaps += sw
            perm_t = torch.tensor(perm, device=panel.device)
            # rows of block k (cols k+1 and the fill col k+2) over rows of block k+1
            if up_next is None:
                right = torch.cat([b_cur, d_next], dim=0)
            else:
                top = torch.cat([b_cur, b_cur.new_zeros(nk, up_next.shape[1])], dim=1)
                right = torch.cat([top, torch.cat([d_next, up_next], dim=1)], dim=0)
            right = right[perm_t]
            u12 = _solve_lower_unit(lu[:nk], right[:nk])
            rest = torch.addmm(right[nk:], lu[nk:], u12, alpha=-1.0)
            a_cur, b_cur = rest[:, :nk1], rest[:, nk1:]
            self.steps.append(_Step(lu, perm_t, u12, nk))
            pivots.append(torch.diagonal(lu[:nk]))
            up = up_next
        self.scale = float(torch.stack(maxes).max()) if maxes else 0.0
        lu, piv, _ = torch.linalg.lu_factor_ex(a_cur)
        perm, sw = _perm_from_pivots(piv, a_cur.shape[0])
        swaps += sw
        self.last = _Step(
            lu, torch.tensor(perm, device=a_cur.device), a_cur.new_zeros(0, 0), a_cur.shape[0]
        )
        pivots.append(torch.diagonal(lu))
        d = torch.cat(pivots)
        ad = d.abs()
        self.min_pivot = float(ad.min()) if d.numel() else math.inf
        if self.min_pivot == 0.0:
            self._sign, self._logabs = 0.0, -math.inf
        else:
            neg = int((d < 0).sum())
            self._sign = -1.0 if (neg + swaps) % 2 else 1.0
            self._logabs = float(torch.log(ad).sum())
        eps = torch.finfo(lu.dtype).eps
        self.tol = eps * max(self.sizes) * max(self.scale, 1e-300)

    @property
    def singular(self) -> bool:
        """True if some pivot is at round-off level: ``<= eps max_k(n_k) ||K||_max``."""
        return self.min_pivot <= self.tol

    def slogdet(self) -> tuple[float, float]:
        """``(sign, log|det K|)``, as ``torch.linalg.slogdet``."""
        return self._sign, self._logabs

    def solve(self, rhs: list[Tensor]) -> list[Tensor]:
        """Solve ``K x = r`` for per-block right-hand sides ``r_k`` of shape ``(n_k, r)``."""
        ys = []
        cur = rhs[0]
        for k, st in enumerate(self.steps):
            stack = torch.cat([cur, rhs[k + 1]], dim=0)[st.perm]
            y = _solve_lower_unit(st.lu[: st.n], stack[: st.n])
            cur = stack[st.n :] - st.lu[st.n :] @ y
            ys.append(y)
        y_last = _solve_lower_unit(self.last.lu, cur[self.last.perm])
        xs: list[Tensor] = [None] * len(self.sizes)  # type: ignore[list-item]
        xs[-1] = _solve_upper(self.last.lu, y_last)
        for k in reversed(range(len(self.steps))):
            st = self.steps[k]
            nxt = [xs[k + 1]]
            if k + 2 < len(self.sizes):
                nxt.append(xs[k + 2])
            r = ys[k] - st.u12 @ torch.cat(nxt, dim=0)
            xs[k] = _solve_upper(st.lu[: st.n], r)
        return xs


@dataclass
class InertiaResult:
    """Inertia and determinant of ``K`` from the congruence factorization."""

    positive: int
    negative: int
    zero: int
    sign: float
    logabsdet: float
    max_front: int


def block_tri_inertia(
    diag: Sequence[Tensor],
    upper: Sequence[Tensor],
    *,
    alpha: float = 0.1,
    rtol: float | None = None,
) -> InertiaResult:
    """Inertia of a symmetric block-tridiagonal ``K`` (Sylvester, delayed pivots).

    At front ``k`` with fully summed variables ``F`` (delayed directions plus
    block ``k``), ``S_F = Q diag(w) Q^T`` and ``c_i = ||(Q^T C)_i||`` the
    coupling of direction ``i`` to block ``k+1``. Direction ``i`` is eliminated
    when ``|w_i| >= alpha c_i`` (bounded growth ``c_i^2/|w_i| <= c_i/alpha`` of
    the Schur complement ``D_{k+1} - G^T diag(1/w) G``), or when its coupling
    is negligible; otherwise it is delayed. ``|w_i| <= rtol max(||S_F||, ||C||)``
    with negligible coupling counts as a zero eigenvalue: the threshold is
    local to the front, at the level of ``eigh``'s own backward error, so
    that a tiny but resolvable eigenvalue keeps its sign.

    Args:
        diag: Diagonal blocks.
        upper: Super-diagonal blocks.
        alpha: Pivot threshold (larger is safer, with larger fronts).
        rtol: Relative threshold for a zero eigenvalue; default
            ``10 sqrt(f) eps`` for a front of size ``f``.
    """
    d_cur = diag[0]  # each block is read once, in order (lazy sequences welcome)
    dtype = d_cur.dtype
    eps = torch.finfo(dtype).eps
    pos = neg = zero = 0
    sign, logabs = 1.0, 0.0
    max_front = 0
    w_del = d_cur.new_zeros(0)
    g_del = d_cur.new_zeros(0, d_cur.shape[0])
    for k in range(len(diag)):
        r = w_del.shape[0]
        nk = d_cur.shape[0]
        s = d_cur.new_zeros(r + nk, r + nk)
        s[:r, :r] = torch.diag(w_del)
        s[:r, r:] = g_del
        s[r:, :r] = g_del.T
        s[r:, r:] = d_cur
        s = 0.5 * (s + s.T)
        max_front = max(max_front, r + nk)
        w, q = torch.linalg.eigh(s)
        front_rtol = 10.0 * math.sqrt(r + nk) * eps if rtol is None else rtol
        scale = float(w.abs().max()) if w.numel() else 0.0
        if k < len(diag) - 1:
            c = q[r:].T @ upper[k]  # only block k couples to block k+1
            cn = torch.linalg.vector_norm(c, dim=1)
            scale = max(scale, float(cn.max()) if cn.numel() else 0.0)
        zero_tol = front_rtol * max(scale, 1e-300)
        if k < len(diag) - 1:
            negligible = cn <= zero_tol
            elim = (w.abs() >= alpha * cn) & (w.abs() > zero_tol) | negligible
        else:
            c = None
            negligible = torch.ones_like(w, dtype=torch.bool)
            elim = negligible
        is_zero = elim & (w.abs() <= zero_tol)
        piv = elim & ~is_zero
        wp = w[piv]
        pos += int((wp > 0).sum())
        neg += int((wp < 0).sum())
        zero += int(is_zero.sum())
        if is_zero.any():
            sign, logabs = 0.0, -math.inf
        elif wp.numel():
            sign *= -1.0 if int((wp < 0).sum()) % 2 else 1.0
            logabs += float(torch.log(wp.abs()).sum())
        if c is not None:
            gp = c[piv]
            d_cur = diag[k + 1] - gp.T @ (gp / wp.unsqueeze(1))
            keep = ~elim
            w_del, g_del = w[keep], c[keep]
    return InertiaResult(pos, neg, zero, sign, logabs, max_front)
