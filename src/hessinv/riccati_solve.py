"""The stage Riccati recursion as a solver for indefinite ``H + dI`` (the structured elimination).

:mod:`hessinv.riccati` reads the lifted system as the KKT matrix of a linear
quadratic control problem (states ``u_l``, controls ``v_l`` in the kept basis
``Q_l``) and eliminates ``v_{L-1}, ..., v_0`` in turn; with ``P`` the Hessian
of the cost-to-go in the state entering stage ``l + 1``::

    Q_vv = Q^T (Txx_l + dI) Q + (Jx_l Q)^T P (Jx_l Q)     (k_l x k_l, the pivot)
    Q_vu = (Tzx_l Q)^T + (Jx_l Q)^T P Jz_l                (k_l x M_{l-1})
    Q_uu = Tzz_l + Jz_l^T P Jz_l                          (M_{l-1} x M_{l-1})
    K_l  = Q_vv^{-1} Q_vu,   P <- Q_uu - Q_vu^T K_l

That module factors the pivots by Cholesky or ``eigh`` to *certify* a sign
count; this one factors them by LU with partial pivoting, so any nonsingular
pivot, definite or not, is eliminated, and keeps the gains ``K_l`` for solves.
It is block Gaussian elimination of ``H + dI`` in stage order, written on the
blocks: per stage ``O(k_l^3 + k_l^2 M + k_l M^2)`` multiply-adds (``M = N
a_l``), where the pivoted block LU of the lifted system (:mod:`hessinv.blocktri`)
factors dense panels of ``k_l + 2 M`` rows, about ``(k_l + 2 M)^3``: at width
16, batch 8 a fifth of the flops. It never forms ``H``.

**Solve.** The linear part of the cost-to-go, ``s`` (``s = 0`` after the last
stage), is swept backwards with ``k_l = Q_vv^{-1} (Jx^T s - Q^T g_l)`` and ``s
<- Jz^T s - Q_vu^T k_l``; then forwards ``w_l = -K_l u_{l-1} - k_l``, ``u_l =
Jz u_{l-1} + Jx Q w_l`` (``u_{-1} = 0``), the stationary point of ``1/2 v^T
(H + dI) v - g^T v`` restricted to the kept directions (``v_l = Q_l w_l`` plus
the dropped part ``(g_l - Q_l Q_l^T g_l) / d``, :class:`hessinv.lifted_maps.BasisMaps`).

**Stability.** Only the pivots are pivoted; nothing pivots across stages.
On an indefinite ``H`` a pivot may be near singular while ``H + dI`` is not,
and the growth of ``P`` then spoils the solve (the reason the lifted system
exists). So the result is never trusted by construction:
:class:`hessinv.solvers.LiftedFactorization` uses it only after its first
solve has met the contract's backward error *without* refinement, and falls
back to the pivoted block LU otherwise. Every product is at the blocks'
scale: for the loss ``c l`` and damping ``c d``, ``P`` and the pivots scale by
``c``, the gains do not, and the solution scales by ``1 / c``.

**Split stages.** An ``nn.Linear`` stage whose parameters all stay (``Q_l = I``)
is eliminated in its Kronecker basis (:mod:`hessinv.stage_split`), where the
pivot is ``blockdiag(Q_11, d I)``: only ``Q_11`` (``a N x a N``) is factored,
the free block's gain is ``Tzx_2^T / d`` and it adds ``-Tzx_2 Tzx_2^T / d`` to
``P``. The sweeps are :mod:`hessinv.riccati_sweeps`.

All pivots' LU ``info`` and the finiteness of every ``P`` (of its sum) are read on the host
once, after the loop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .derivatives import StageBlocks
from .lifted import _block_diag
from .lifted_bases import Projected
from .progress import ProgressArg, progress_bar
from .riccati import _sym, stage_coupling, stage_pivot
from .riccati_fused import FusedOut, StageParts, free_update, fused_inputs, fused_outputs
from .riccati_sweeps import (
    StageFactor,
    basis_groups,
    repartition,
    run_sizes,
    solve_sweeps,
    sweep_runs,
)
from .stage_split import split_stage


class StageRiccati:
    """The stage elimination of ``H + dI`` on its kept directions, with LU-pivoted pivots.

    Args:
        blocks: The stage blocks.
        damping: The shift ``d``.
        projections: Per stage the blocks on the kept basis (``LiftedSystem``'s).
        progress: The operator's progress setting (a bar over the stages).

    Attributes:
        ok: Every pivot was nonsingular (no exactly zero LU pivot) and every
            ``P`` finite. When False, :meth:`solve_runs` must not be used.
    """

    def __init__(
        self,
        blocks: Sequence[StageBlocks],
        damping: float,
        projections: Sequence[Projected],
        progress: ProgressArg = False,
    ) -> None:
        n_st = len(blocks)
        ref = blocks[0].grad_x
        self.n_stages = n_st
        self.damping = float(damping)
        self.stages: list[StageFactor] = [None] * n_st  # type: ignore[list-item]
        infos: list[Tensor] = []
        sums: list[Tensor] = []  # each P's sum: not finite when P is not (or overflows)
        last = n_st - 1
        parts = [_stage_parts(b, pr, damping, i == last)
                 for i, (b, pr) in enumerate(zip(blocks, projections, strict=True))]  # fmt: skip
        fused = _fused_runs(parts, damping, infos, sums)
        p_mat: Tensor | None = None
        with progress_bar(n_st, "hessinv: stage Riccati", progress) as bar:
            for l in reversed(range(n_st)):  # noqa: E741
                pt = parts[l]
                if l in fused:
                    p_mat = self._fused_step(l, pt, fused[l], p_mat)
                else:
                    p_mat = self._step(l, blocks[l], pt, p_mat, ref, infos, sums)
                bar.update()
        # the only reads on the host: once, after the loop
        bad = bool((torch.cat(infos) != 0).any())
        if sums:  # a NaN or inf in P makes its sum NaN or inf; an overflowing sum only
            bad = bad or not bool(torch.isfinite(torch.cat(sums)).all())  # refuses too often
        self.ok = not bad
        self.runs = sweep_runs(self.stages)
        self.groups = basis_groups(self.runs)
        self._signature: tuple[int, int, int, float] | None = None

    def _step(
        self,
        l: int,  # noqa: E741
        b: StageBlocks,
        pt: StageParts,
        p_mat: Tensor | None,
        ref: Tensor,
        infos: list[Tensor],
        sums: list[Tensor],
    ) -> Tensor | None:
        """Stage ``l`` eliminated block by block (large stages); the next ``P``."""
        damping, k, free, split = self.damping, pt.r, pt.free, pt.split
        txx, jx, tzx = pt.txx, pt.jx, pt.tzx
        kron = split if split is not None and split.factored else None  # J_1's structure
        qvv, pjx = stage_pivot(txx, jx, p_mat, damping, k, ref, kron)
        lu, piv, info = torch.linalg.lu_factor_ex(qvv)
        infos.append(info.reshape(1))
        if l == 0:
            self.stages[l] = StageFactor(qvv, lu, piv, None, jx, None, split, free)
            return None
        # (l > 0: tzx is set) a split stage couples its first k columns through P
        qvu, quu = stage_coupling(b, tzx[:, :k] if free else tzx, pjx, p_mat, k)  # type: ignore[index]
        gain = torch.linalg.lu_solve(lu, piv, qvu) if k else qvu  # (0, M) when k = 0
        p_mat = quu - qvu.T @ gain
        if free:  # the d I block: gain Tzx_2^T / d
            tail = tzx[:, k:]  # type: ignore[index]
            gain = torch.cat([gain, tail.T / damping])
            if kron is None:
                p_mat = p_mat - free_update(tail, damping)
            else:  # the same, from the Kronecker factors (scaled before the product)
                outer = kron.free_outer(1.0 / math.sqrt(abs(damping)))
                p_mat = p_mat - math.copysign(1.0, damping) * outer
        p_mat = _sym(p_mat)
        sums.append(p_mat.sum().reshape(1))  # a tenth of isfinite(P).all()'s cost
        closed = None
        if jx is not None:
            jk = jx @ gain[:k] if kron is None else kron.jx_mul(gain[:k])
            closed = _block_diag(b.Jz) - jk
        self.stages[l] = StageFactor(qvv, lu, piv, gain, jx, closed, split, free)
        return p_mat

    def _fused_step(
        self,
        l: int,  # noqa: E741
        pt: StageParts,
        cbo: tuple[Tensor, Tensor | None, FusedOut],
        p_mat: Tensor | None,
    ) -> Tensor | None:
        """Stage ``l`` by one update ``S = C + B^T P B`` (:mod:`hessinv.riccati_fused`).

        The factors are written into the run's buffers (:func:`fused_outputs`).
        """
        c, b, out = cbo
        r = pt.r
        if p_mat is None or b is None:
            s = c  # symmetric as formed
        else:
            s = torch.addmm(c, b.mT, p_mat @ b)
            s = (s + s.mT).mul_(0.5)
        qvv = s[:r, :r]
        torch.linalg.lu_factor_ex(qvv, out=(out.lu, out.piv, out.info))
        jx = None if b is None or pt.jx is None else b[:, :r]
        if l == 0:
            self.stages[l] = StageFactor(qvv, out.lu, out.piv, None, jx, None, pt.split, pt.free)
            return None
        s12 = s[:r, r:]
        gain = out.gain
        if r:
            torch.linalg.lu_solve(out.lu, out.piv, s12, out=gain[:r])  # type: ignore[index]
        else:
            gain[:r] = s12  # type: ignore[index]
        p_mat = torch.addmm(s[r:, r:], s12.mT, gain[:r], alpha=-1.0)  # type: ignore[index]
        p_mat = (p_mat + p_mat.mT).mul_(0.5)
        torch.sum(p_mat, dim=(0, 1), out=out.total)
        closed = out.closed
        if jx is not None:
            torch.addmm(b[:, r:], jx, gain[:r], alpha=-1.0, out=closed)  # type: ignore[index]
        self.stages[l] = StageFactor(qvv, out.lu, out.piv, gain, jx, closed, pt.split, pt.free)
        return p_mat

    def signature(self) -> tuple[int, int, int, float]:
        """``(n_pos, n_neg, n_zero, log|det|)`` of the kept ``Q^T (H + dI) Q`` (cached).

        Haynsworth: the pivots ``Q_vv`` are the diagonal blocks of successive
        Schur complements, so their inertias add up to the matrix's, and
        their determinants multiply. Each pivot's signs are read off its
        Bunch-Kaufman ``D`` (Sylvester), one batched ``sytrf`` per run of
        equally sized pivots. A second congruence of ``H + dI``, independent of
        the lifted system's: computed on demand (the solves do not need it).
        """
        if self._signature is None:
            groups = self._by_size().values()
            parts = [_bk_signature(torch.stack([st.qvv for st in sts])) for sts in groups]
            tot = torch.stack(parts).sum(0) if parts else torch.zeros(4)
            pos, neg, zero, logabs = tot.tolist()
            free = self._free()
            if free:  # the d I blocks of split stages (d != 0 there)
                pos, neg = (pos + free, neg) if self.damping > 0 else (pos, neg + free)
                logabs += free * math.log(abs(self.damping))
            self._signature = (int(pos), int(neg), int(zero), float(logabs))
        return self._signature

    def _free(self) -> int:
        """The split stages' free directions: the ``d I`` blocks, eigenvalues ``d`` each."""
        return sum(st.free for st in self.stages)

    def _by_size(self) -> dict[int, list[StageFactor]]:
        """The stages with a nonempty pivot, grouped by its size (batched factorizations)."""
        by_size: dict[int, list[StageFactor]] = {}
        for st in self.stages:
            if st.r:
                by_size.setdefault(st.r, []).append(st)
        return by_size

    def lu_slogdet(self) -> tuple[float, float]:
        """``(sign, log|det|)`` of the kept ``Q^T (H + dI) Q`` from the pivots' LUs.

        The pivots of :meth:`signature` as the solves factor them (partial
        pivoting): ``det Q_vv = (-1)^swaps prod_i u_ii``, batched per run of
        equal sizes, times ``d`` per free direction of a split stage. Its sign
        is the parity of the Bunch-Kaufman count's negatives when both
        factorizations see the same signs.
        """
        parts = []
        for k, sts in self._by_size().items():
            u = torch.stack([st.lu for st in sts]).diagonal(dim1=-2, dim2=-1)
            piv = torch.stack([st.piv for st in sts])
            rows = torch.arange(1, k + 1, device=piv.device, dtype=piv.dtype)
            negs = (u < 0).sum() + (piv != rows).sum()
            parts.append(torch.stack([negs.to(u.dtype), u.abs().log().sum()]))
        negs, logabs = torch.stack(parts).sum(0).tolist() if parts else (0.0, 0.0)
        free = self._free()
        if free:  # the d I blocks of split stages (d != 0 there)
            negs += free if self.damping < 0 else 0
            logabs += free * math.log(abs(self.damping))
        return (-1.0 if int(negs) % 2 else 1.0), float(logabs)

    def solve(self, b: Sequence[Tensor]) -> list[Tensor]:
        """:meth:`solve_runs` of per-stage ``b_l`` (``(k_l, r)`` each): per-stage ``w_l``."""
        return [w[0] for w in self.solve_runs([t[None] for t in b], [1] * len(b))]

    @property
    def run_sizes(self) -> list[int]:
        """Stages per :class:`~hessinv.riccati_sweeps.SweepRun`."""
        return run_sizes(self.runs)

    def solve_runs(self, parts: list[Tensor], sizes: list[int]) -> list[Tensor]:
        """``w = (Q^T (H + dI) Q)^{-1} b``, ``b`` stacked per run of ``sizes`` stages; ``w`` alike.

        ``parts[i]``: ``(sizes[i], k_l, r)``, the right-hand sides of a run of
        equal stages (as :meth:`hessinv.lifted.LiftedSystem.kept_rhs` gives
        them; ``sizes`` all ones for per-stage tensors). The sweeps of the
        module doc, batched over this solver's runs of equal stages
        (:func:`hessinv.riccati_sweeps.solve_sweeps`); no per-stage tensors
        on the way in or out when the partitions agree.
        """
        own = self.run_sizes
        bs = repartition(parts, sizes, own)
        ws = solve_sweeps(self.stages, self.runs, bs, self.damping, self.groups)
        return repartition(ws, own, sizes)


def _stage_parts(b: StageBlocks, pr: Projected, damping: float, last: bool) -> StageParts:
    """What the elimination reads of a stage: its split (a basis, or a split kept basis)."""
    split = split_stage(b) if pr.identity and damping != 0.0 else None
    if split is not None:
        k, txx, jx, tzx, free = split.r, split.txx, split.jx, split.tzx, split.free
    else:
        txx, jx, tzx = pr.txx, pr.jx, pr.tzx
        k = pr.k(b.num_params)
        free = k - kept_split_rows(pr, k) if damping != 0.0 else 0
        if free:  # the kept basis is split already: impose its zeros
            k -= free
            txx = None if txx is None else txx[:k, :k]
            jx = None if jx is None else jx[:, :k]
    if last:
        jx = None
    return StageParts(k, free, txx, jx, tzx, b.Jz, b.Tzz, split)


def _fused_runs(
    parts: list[StageParts], damping: float, infos: list[Tensor], sums: list[Tensor]
) -> dict[int, tuple[Tensor, Tensor | None, FusedOut]]:
    """Per fusable stage its ``(C, B, output views)``, formed per run of equal keys.

    The runs' ``info`` and ``P``-sum buffers are appended to ``infos`` and ``sums``.
    """
    out: dict[int, tuple[Tensor, Tensor | None, FusedOut]] = {}
    lo, n = 0, len(parts)
    while lo < n:
        hi = lo + 1
        if not parts[lo].fusable():
            lo = hi
            continue
        key = parts[lo].key()
        while hi < n and parts[hi].fusable() and parts[hi].key() == key:
            hi += 1
        c, b, tails = fused_inputs(parts[lo:hi], damping)
        views, info, totals = fused_outputs(parts[lo:hi], c, tails)
        infos.append(info)
        if totals is not None:
            sums.append(totals)
        for i in range(hi - lo):
            out[lo + i] = (c[i], None if b is None else b[i], views[i])
        lo = hi
    return out


def kept_split_rows(pr: Projected, k: int) -> int:
    """The leading columns of a kept basis that ``Jx`` and ``Txx`` see (``k`` if not split).

    A Linear stage's Kronecker kept basis ``Q = [I_a (x) Q_T, Q_B (x) Q_C]``
    (:mod:`hessinv.derivatives.kron_basis`, ``Q_C^T t_n = 0``) has ``Jx Q =
    [J_1, 0]`` and ``Q^T Txx Q = [[T_11, 0], [0, 0]]`` with ``J_1`` of ``a r_z``
    columns (:mod:`hessinv.kron_projection`): its pivot is ``blockdiag(T_11 +
    dI + J_1^T P J_1, d I)``, split like :mod:`hessinv.stage_split`'s without a
    change of basis (at width 16, batch 2: an LU of 32 rows instead of 62).
    """
    kb = pr.kron
    if kb is None:
        return k
    return kb.qb.shape[0] * kb.qt.shape[1]


def _bk_signature(a: Tensor) -> Tensor:
    """Summed ``(n_pos, n_neg, n_zero, log|det|)`` of a batch ``(n, k, k)`` of symmetric matrices.

    From LAPACK's ``sytrf`` (lower): ``a[p][:, p] = L D L^T`` with ``D`` of
    ``1 x 1`` and ``2 x 2`` blocks, a ``2 x 2`` block where ``ipiv`` is negative
    (two entries per block, paired from the start of each run). A ``2 x 2``
    block ``[[x, y], [y, z]]`` has one eigenvalue of each sign when ``x z - y^2
    < 0`` and two of the sign of ``x`` when it is positive.
    """
    ld, piv, _ = torch.linalg.ldl_factor_ex(a)
    d = torch.diagonal(ld, dim1=-2, dim2=-1)
    sub = torch.nn.functional.pad(torch.diagonal(ld, -1, dim1=-2, dim2=-1), (0, 1))
    neg = piv < 0
    k = d.shape[-1]
    idx = torch.arange(k, device=a.device).expand_as(piv)
    start = neg & torch.cat([torch.ones_like(neg[..., :1]), ~neg[..., :-1]], dim=-1)
    run_start = torch.cummax(torch.where(start, idx, torch.zeros_like(idx)), dim=-1).values
    first = neg & ((idx - run_start) % 2 == 0)
    single = ~neg
    d_next = torch.nn.functional.pad(d[..., 1:], (0, 1))
    det2 = d * d_next - sub * sub
    one = torch.ones_like(d)
    pos = (single & (d > 0)).sum() + (first & (det2 < 0)).sum()
    pos = (
        pos
        + 2 * (first & (det2 > 0) & (d > 0)).sum()
        + (first & (det2 == 0) & (d + d_next > 0)).sum()
    )
    negs = (single & (d < 0)).sum() + (first & (det2 < 0)).sum()
    negs = (
        negs
        + 2 * (first & (det2 > 0) & (d < 0)).sum()
        + (first & (det2 == 0) & (d + d_next < 0)).sum()
    )
    zero = (single & (d == 0)).sum() + (first & (det2 == 0)).sum()
    zero = zero + (first & (det2 == 0) & (d + d_next == 0)).sum()
    logabs = (
        torch.where(single, d.abs(), one).log().sum()
        + torch.where(first, det2.abs(), one).log().sum()
    )
    return torch.stack([pos.to(d.dtype), negs.to(d.dtype), zero.to(d.dtype), logabs])
