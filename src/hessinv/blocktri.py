"""Factorizations of a symmetric block-tridiagonal matrix, linear in the number of blocks.

``K`` has diagonal blocks ``D_k`` (``n_k x n_k``) and super-diagonal blocks
``U_k = K[k, k+1]``; the sub-diagonal is ``U_k^T``.

* :class:`BlockTriLU` -- block LU with partial pivoting across the block
  boundary, as LAPACK's banded ``gbtrf`` pivots: at step ``k`` the tall panel
  ``[D~_k; U_k^T]`` (``(n_k + n_{k+1}) x n_k``) is factored with partial
  pivoting and the fill-in (one extra block super-diagonal) is carried.
  ``O(sum_k n_k^3)`` time, ``O(sum_k n_k^2)`` memory. Gives solves and
  ``slogdet``. The unpivoted stage-wise recursion is unstable on indefinite
  matrices (measured; a random deep tanh net suffices); this one is not.
* :func:`block_tri_inertia` -- inertia by a congruence ``K = X diag(...) X^T``
  built front by front (each front diagonalized by Bunch-Kaufman ``LDL^T`` or
  by an orthogonal eigendecomposition, :func:`front_congruence`) with
  *delayed pivots*: at front ``k`` the directions whose pivot is large
  compared with their coupling to the next block are eliminated (their signs
  counted, Sylvester's law of inertia), the others are delayed into the next
  front, as multifrontal LDL^T solvers delay unstable pivots.
  ``O(sum_k f_k^3)``, the fronts ``f_k`` bounded by ``n_k`` plus the carried
  directions (capped by ``max_carry``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .panel_lu import panel_lu


def _solve_lower_unit(lu: Tensor, b: Tensor) -> Tensor:
    return torch.linalg.solve_triangular(lu, b, upper=False, unitriangular=True)


def _solve_upper(lu: Tensor, b: Tensor) -> Tensor:
    return torch.linalg.solve_triangular(lu, b, upper=True)


@dataclass
class _Step:
    """One step's factors: ``P [D~_k; U_k^T] = [L11; L21] U11`` and ``U12 = L11^{-1} (P R)_top``.

    ``l11u`` holds ``L11`` (strictly lower, unit diagonal implied) and ``U11``
    packed, ``l21`` the multipliers of the rows below; both are stored in the
    column-major layout LAPACK's triangular solves take without a copy.
    """

    l11u: Tensor  # (n_k, n_k) packed L11 \ U11
    l21: Tensor  # (n_{k+1}, n_k)
    perm: Tensor  # row permutation of the stacked rows (a device tensor)
    u12: Tensor  # (n_k, n_{k+1} + n_{k+2})
    n: int


def _fortran(t: Tensor) -> Tensor:
    """``t`` laid out column-major (a copy only if it is not already)."""
    return t.mT.contiguous().mT


#: Smallest block for which :func:`_eliminate` splits off the fill columns.
_SHORTCUT_MIN = 160


def _first_swapped_in(perm: Tensor, nk: int) -> int:
    """First of the top ``nk`` pivot rows that came from the block below (``nk`` if none).

    Read on the host, so only on the CPU; elsewhere ``0`` (no shortcut, no
    synchronization). Called for blocks of at least ``_SHORTCUT_MIN`` rows only
    (below it, the extra calls cost more than the flops they save).
    """
    if perm.device.type != "cpu":
        return 0
    below = torch.nonzero(perm[:nk] >= nk)
    return int(below[0, 0]) if below.numel() else nk


def _eliminate(
    l11u: Tensor, l21: Tensor, right: Tensor, nk: int, nk1: int, r0: int
) -> tuple[Tensor, Tensor]:
    """``U12 = L11^{-1} R_top`` and the Schur complement ``R_bot - L21 U12``.

    The fill columns (``nk1:``) of ``R_top`` vanish in every row that was not
    swapped in from the block below: rows ``< r0`` (:func:`_first_swapped_in`).
    Forward substitution keeps those rows of ``U12`` exactly zero, so only
    ``L11[r0:, r0:]`` and ``L21[:, r0:]`` enter the fill columns: the same
    numbers for a fraction of the flops (for a ``(v, lam)`` block, whose
    ``v`` columns never pivot on the ``u`` rows below, ``r0 >= k_l``).
    """
    top, bot = right[:nk], right[nk:]
    if r0 == 0 or right.shape[1] == nk1:
        u12 = _solve_lower_unit(l11u, top)
        return u12, torch.addmm(bot, l21, u12, alpha=-1.0)
    u12 = top.new_zeros(top.shape)
    u12[:, :nk1] = _solve_lower_unit(l11u, top[:, :nk1])
    if r0 < nk:
        u12[r0:, nk1:] = _solve_lower_unit(_fortran(l11u[r0:, r0:]), top[r0:, nk1:])
    rest = torch.empty_like(bot)
    torch.addmm(bot[:, :nk1], l21, u12[:, :nk1], alpha=-1.0, out=rest[:, :nk1])
    torch.addmm(bot[:, nk1:], l21[:, r0:], u12[r0:, nk1:], alpha=-1.0, out=rest[:, nk1:])
    return u12, rest


class BlockTriLU:
    """Pivoted block LU of a block-tridiagonal matrix.

    The stage loop stays on the tensors' device: the row permutations, swap
    counts, pivots and block maxima are kept as tensors and read on the host
    once, after the loop (no synchronization per block on a GPU).

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
        swaps: list[Tensor] = []
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
            n2 = 0 if up_next is None else up_next.shape[1]
            self.sizes.append(nk1)
            panel = torch.cat([a_cur, up.T], dim=0)
            lu, perm_t, sw = panel_lu(panel)
            swaps.append(sw)
            # rows of block k (cols k+1 and the fill col k+2) over rows of block k+1,
            # gathered in pivot order straight into one buffer
            right = a_cur.new_empty(nk + nk1, nk1 + n2)
            right[:nk, :nk1] = b_cur
            right[:nk, nk1:] = 0.0
            right[nk:, :nk1] = d_next
            if up_next is not None:
                right[nk:, nk1:] = up_next
            right = right[perm_t]
            l11u, l21 = _fortran(lu[:nk]), lu[nk:].contiguous()  # lu itself is freed
            r0 = _first_swapped_in(perm_t, nk) if nk >= _SHORTCUT_MIN else 0
            u12, rest = _eliminate(l11u, l21, right, nk, nk1, r0)
            a_cur, b_cur = rest[:, :nk1], rest[:, nk1:]
            self.steps.append(_Step(l11u, l21, perm_t, u12, nk))
            pivots.append(torch.diagonal(l11u))
            up = up_next
        lu, perm_t, sw = panel_lu(a_cur)
        swaps.append(sw)
        self.last = _Step(
            lu, lu.new_zeros(0, lu.shape[1]), perm_t, a_cur.new_zeros(0, 0), a_cur.shape[0]
        )
        pivots.append(torch.diagonal(lu))
        # the only reads on the host: once, after the loop
        self.scale = float(torch.stack(maxes).max()) if maxes else 0.0
        d = torch.cat(pivots)
        ad = d.abs()
        self.min_pivot = float(ad.min()) if d.numel() else math.inf
        if self.min_pivot == 0.0:
            self._sign, self._logabs = 0.0, -math.inf
        else:
            odd = int(((d < 0).sum() + torch.stack(swaps).sum()) % 2)
            self._sign = -1.0 if odd else 1.0
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
            y = _solve_lower_unit(st.l11u, stack[: st.n])
            cur = torch.addmm(stack[st.n :], st.l21, y, alpha=-1.0)
            ys.append(y)
        y_last = _solve_lower_unit(self.last.l11u, cur[self.last.perm])
        xs: list[Tensor] = [None] * len(self.sizes)  # type: ignore[list-item]
        xs[-1] = _solve_upper(self.last.l11u, y_last)
        for k in reversed(range(len(self.steps))):
            st = self.steps[k]
            nxt = xs[k + 1] if k + 2 >= len(self.sizes) else torch.cat([xs[k + 1], xs[k + 2]])
            r = torch.addmm(ys[k], st.u12, nxt, alpha=-1.0)
            xs[k] = _solve_upper(st.l11u, r)
        return xs


def _bunch_kaufman(s: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``s[perm][:, perm] = Lt D Lt^T`` from LAPACK's ``sytrf`` (Bunch-Kaufman).

    LAPACK returns ``L = P_1 L_1 P_2 L_2 ...`` in product form: the
    multipliers of step ``k`` are stored in the row order of that step, and
    every later interchange ``P_j`` (``j > k``) moves them. Writing each
    column under the *labels* of its rows (``perm`` at that step) instead of
    their positions makes the later interchanges free: the entry of label
    ``perm_k[i]`` ends at the position where ``perm`` finally holds that
    label, so ``Lt = M[perm]`` for ``M[perm_k[i], k] = L_k[i, k]``. Between two
    interchanges ``perm`` is constant, so each run of steps is written at once.

    Returns:
        ``perm``, ``Lt``, the diagonal of ``D`` and its sub-diagonal (nonzero
        only inside the ``2 x 2`` pivot blocks).
    """
    f = s.shape[0]
    ld, piv, _ = torch.linalg.ldl_factor_ex(s)  # info > 0: an exactly zero pivot, kept
    low = np.tril(ld.cpu().numpy(), -1)
    low[np.diag_indices(f)] = 1.0
    pv = piv.tolist()
    perm = np.arange(f)
    m = np.zeros((f, f))
    sub = np.zeros(max(f - 1, 0))
    start = k = 0
    while k < f:
        size = 2 if pv[k] < 0 else 1
        row = k + size - 1  # LAPACK interchanges this row (k+1 for a 2x2 pivot)
        p = abs(pv[k]) - 1
        if p != row:  # the columns before this step carry the labels before it
            m[perm[start:], start:k] = low[start:, start:k]
            start = k
            perm[[row, p]] = perm[[p, row]]
        if size == 2:  # the 2x2 block's off-diagonal entry belongs to D
            sub[k] = low[k + 1, k]
            low[k + 1, k] = 0.0
        k += size
    m[perm[start:], start:] = low[start:, start:]
    dev, dt = s.device, s.dtype
    return (
        torch.from_numpy(perm).to(dev),
        torch.from_numpy(m[perm]).to(dev, dt),
        torch.diagonal(ld).clone(),
        torch.from_numpy(sub).to(dev, dt),
    )


def front_congruence(s: Tensor, c: Tensor, pivoting: str = "eigh") -> tuple[Tensor, Tensor]:
    """Diagonalize a symmetric front by congruence: ``X^T s X = diag(w)``; return ``(w, X^T c)``.

    ``"eigh"``: ``X`` orthogonal (the eigenvectors, about ``9 f^3`` flops); a
    small ``w_i`` then means a near-null vector. ``"ldl"``: Bunch-Kaufman
    ``s[p][:, p] = Lt D Lt^T`` (``sytrf``, about ``f^3 / 3`` flops), each
    ``2 x 2`` block of ``D`` turned diagonal by a Jacobi rotation ``R``:
    ``X = P Lt^{-T} R``. ``X`` is not orthogonal, and for an indefinite ``s``
    a small ``w_i`` need not mean a near-null vector (``x^T s x`` vanishes on
    isotropic vectors), so only the signs of ``w`` and the Schur complements
    are to be trusted. Either way Sylvester's law of inertia reads the signs
    of ``s`` off ``w``, and ``X^T c`` is the coupling of each direction to
    whatever ``c`` describes.
    """
    if pivoting == "eigh":
        from .solvers.estimates import robust_eigh

        w, q = robust_eigh(s)
        return w, q.T @ c
    perm, lt, d, sub = _bunch_kaufman(s)
    y = torch.linalg.solve_triangular(lt, c[perm], upper=False, unitriangular=True)
    i = torch.nonzero(sub).flatten()  # first rows of the 2 x 2 blocks
    if i.numel():
        a, b, o = d[i], d[i + 1], sub[i]
        theta = 0.5 * torch.atan2(2.0 * o, a - b)
        cs, sn = torch.cos(theta), torch.sin(theta)
        d = d.clone()
        d[i] = a * cs * cs + 2.0 * o * sn * cs + b * sn * sn
        d[i + 1] = a * sn * sn - 2.0 * o * sn * cs + b * cs * cs
        y1, y2 = y[i], y[i + 1]
        y = y.clone()
        y[i] = cs.unsqueeze(1) * y1 + sn.unsqueeze(1) * y2
        y[i + 1] = -sn.unsqueeze(1) * y1 + cs.unsqueeze(1) * y2
    return d, y


@dataclass
class InertiaResult:
    """Inertia and determinant of ``K`` from the congruence factorization."""

    positive: int
    negative: int
    zero: int
    sign: float
    logabsdet: float
    max_front: int
    forced: int = 0  # directions eliminated below ``alpha`` to respect ``max_carry``


def block_tri_inertia(
    diag: Sequence[Tensor],
    upper: Sequence[Tensor],
    *,
    alpha: float = 0.01,
    rtol: float | None = None,
    max_carry: int | None = None,
    alpha_floor: float = 1e-4,
    pivoting: str = "eigh",
) -> InertiaResult:
    """Inertia of a symmetric block-tridiagonal ``K`` (Sylvester, delayed pivots).

    At front ``k`` with fully summed variables ``F`` (delayed directions plus
    block ``k``), ``S_F = Q diag(w) Q^T`` and ``c_i = ||(Q^T C)_i||`` the
    coupling of direction ``i`` to block ``k+1``. Direction ``i`` is eliminated
    when ``|w_i| >= alpha c_i`` (bounded growth ``c_i^2/|w_i| <= c_i/alpha`` of
    the Schur complement ``D_{k+1} - G^T diag(1/w) G``; ``alpha = 0.01`` is the
    threshold of the multifrontal LDL^T codes MA57 and MUMPS), or when its
    coupling is negligible; otherwise it is delayed into the next front.
    ``|w_i| <= rtol max(||S_F||, ||C||)`` with negligible coupling counts as a
    zero eigenvalue: the threshold is local to the front, at the level of
    ``eigh``'s own backward error, so that a tiny but resolvable eigenvalue
    keeps its sign.

    On an ill-conditioned ``K`` many directions fail the test, and delayed
    directions can pile up along a deep chain (fronts, and the ``O(f^3)`` cost,
    grow). With ``max_carry``, when more than ``max_carry`` directions would
    be delayed, the best of them (largest ``|w_i| / c_i``, never below
    ``alpha_floor``) are eliminated anyway until ``max_carry`` remain. That
    caps the growth at ``c_i / alpha_floor``; callers verify the result
    (:class:`hessinv.solvers.LiftedFactorization` compares the determinant
    with that of the pivoted LU and falls back to a four times wider cap).

    Args:
        diag: Diagonal blocks (read once each, in order).
        upper: Super-diagonal blocks (read once each, in order).
        alpha: Pivot threshold (larger is safer, with larger fronts).
        rtol: Relative threshold for a zero eigenvalue; default
            ``10 sqrt(f) eps`` for a front of size ``f``.
        max_carry: Most directions delayed from one front to the next
            (``None``: no cap).
        alpha_floor: The smallest threshold a capped front may use.
        pivoting: How a front is diagonalized (:func:`front_congruence`):
            ``"eigh"`` (orthogonal; its zero test is sound) or ``"ldl"``
            (Bunch-Kaufman, about 10x cheaper; use it with ``rtol=0`` on a
            ``K`` known to be nonsingular, and check the determinant).
    """
    if pivoting not in ("ldl", "eigh"):
        raise ValueError(f"pivoting must be 'ldl' or 'eigh', got {pivoting!r}")
    n_bl = len(diag)
    d_cur = diag[0]  # each block is read once, in order (lazy sequences welcome)
    eps = torch.finfo(d_cur.dtype).eps
    pos = neg = zero = forced = 0
    sign, logabs = 1.0, 0.0
    max_front = 0
    w_del = d_cur.new_zeros(0)
    g_del = d_cur.new_zeros(0, d_cur.shape[0])
    for k in range(n_bl):
        r, nk = w_del.shape[0], d_cur.shape[0]
        s = torch.cat(
            [
                torch.cat([torch.diag(w_del), g_del], dim=1),
                torch.cat([g_del.T, d_cur], dim=1),
            ],
            dim=0,
        )
        max_front = max(max_front, r + nk)
        front_rtol = 10.0 * math.sqrt(r + nk) * eps if rtol is None else rtol
        last = k == n_bl - 1
        if last:
            coupling = s.new_zeros(r + nk, 0)
        else:  # only block k couples to block k+1
            u_k = upper[k]
            coupling = torch.cat([u_k.new_zeros(r, u_k.shape[1]), u_k])
        w, c = front_congruence(0.5 * (s + s.T), coupling, pivoting)
        cn = torch.linalg.vector_norm(c, dim=1)
        scale = max(
            float(w.abs().max()) if w.numel() else 0.0,
            float(cn.max()) if cn.numel() else 0.0,
        )
        zero_tol = front_rtol * max(scale, 1e-300)
        aw = w.abs()
        negligible = cn <= zero_tol
        is_zero = negligible & (aw <= zero_tol)
        ratio = aw / cn.clamp_min(1e-300)
        piv = ~is_zero & (((ratio >= alpha) & (aw > zero_tol)) | negligible)
        if max_carry is not None and not last:
            excess = int((~piv & ~is_zero).sum()) - max_carry
            if excess > 0:
                cand = ~piv & ~is_zero & (aw > zero_tol) & (ratio >= alpha_floor)
                idx = torch.nonzero(cand).flatten()
                best = idx[torch.argsort(ratio[idx], descending=True)[:excess]]
                piv[best] = True
                forced += best.numel()
        wp = w[piv]
        n_neg = int((wp < 0).sum())
        pos += wp.numel() - n_neg
        neg += n_neg
        zero += int(is_zero.sum())
        sign *= -1.0 if n_neg % 2 else 1.0
        logabs += float(torch.log(wp.abs()).sum())
        if not last:
            gp = c[piv]
            d_cur = diag[k + 1] - gp.T @ (gp / wp.unsqueeze(1))
            keep = ~(piv | is_zero)
            w_del, g_del = w[keep], c[keep]
    if zero:
        sign, logabs = 0.0, -math.inf
    return InertiaResult(pos, neg, zero, sign, logabs, max_front, forced)
