"""The two sweeps of a stage-elimination solve, batched over runs of equal stages.

:class:`hessinv.riccati_solve.StageRiccati` keeps per stage ``l`` the LU of
the pivot ``Q_vv``, the gain ``K_l = Q_vv^{-1} Q_vu`` (``p_l x M_{l-1}``), the
closed loop ``A_l = Jz_l - Jx_l Q K_l`` and ``Jx_l Q``. A solve of ``(Q^T (H +
dI) Q) w = b`` is, with ``s_l`` the linear part of the cost-to-go at stage
``l``'s output (``s_{L-1} = 0``)::

    backwards:  s_{l-1} = A_l^T s_l + K_l^T b_l
    then:       k_l = Q_vv^{-1} (Jx_l^T s_l - b_l)
    forwards:   u_l = A_l u_{l-1} - Jx_l k_l           (u_{-1} = 0)
    then:       w_l = -k_l - K_l u_{l-1}

Only ``s`` and ``u`` recur, one matrix product per stage each; ``K_l^T b_l``,
``k_l`` (a batched LU solve), ``Jx_l k_l`` and ``w_l`` are formed for a whole
:class:`SweepRun` of equally shaped stages at once (one batched call each),
as are the basis changes of split stages (:mod:`hessinv.stage_split`, where
``Q_vv`` is ``blockdiag(Q_11, d I)``, ``Jx`` sees the first ``r`` rows and
``k``'s others are ``-b / d``). At width 4, batch 2 the sweeps were bound by
the per-call overhead of five to seven small calls per stage.

The factors of a run of small stages (:data:`STACK_MAX` numbers) are stacked
once, right after the factorization, and each stage's tensors become views of
the stacks (held once); larger stages, whose sweeps are bound by reading their
factors rather than by calls, are runs of one (views, no copy). The basis
changes of split stages are batched over :class:`BasisGroup` s, consecutive
runs with one basis shape (at width 16, batch 8 all 62 middle stages: one call
each way instead of one per stage).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .stacking import stack_attribute
from .stage_split import SplitStage, kron_from_basis, kron_to_basis


class StageFactor:
    """What a solve needs of stage ``l`` (module doc); ``basis`` for a split stage.

    ``qvv`` is the LU-factored pivot (``r x r``: in a split stage only its
    first block, the rest is ``d I``), ``gain`` has all ``r + free`` rows (in
    the split basis), ``jx`` the ``r`` columns ``Jx`` sees. ``free``: the
    trailing directions whose pivot is ``d`` exactly (those of a split
    basis, or of a kept basis already split, :class:`hessinv.riccati_solve.
    StageRiccati`).
    """

    __slots__ = ("basis", "closed", "closed_t", "free", "gain", "jx", "lu", "piv", "qvv")

    def __init__(
        self,
        qvv: Tensor,
        lu: Tensor,
        piv: Tensor,
        gain: Tensor | None,
        jx: Tensor | None,
        closed: Tensor | None,
        basis: SplitStage | None = None,
        free: int = 0,
    ) -> None:
        self.qvv, self.lu, self.piv = qvv, lu, piv
        self.gain, self.jx, self.closed = gain, jx, closed
        self.closed_t: Tensor | None = None  # A_l^T, row-major (set by sweep_runs)
        self.basis, self.free = basis, free

    @property
    def r(self) -> int:
        """Rows of the LU-factored pivot."""
        return self.qvv.shape[0]

    def key(self) -> tuple:
        """Equal keys: the stage's tensors stack (same shapes, same kind of stage)."""
        shapes = tuple(
            None if t is None else tuple(t.shape)
            for t in (self.lu, self.gain, self.jx, self.closed)
        )
        # the bias too: equal shapes with and without one permute the parameters apart
        b = self.basis
        kind = None if b is None else (b.a, b.c, b.rz, b.bias)
        return shapes, kind, self.free

    def numel(self) -> int:
        """Numbers held for the sweeps."""
        return sum(
            0 if t is None else t.numel() for t in (self.lu, self.gain, self.jx, self.closed)
        )


#: Stages holding at most this many numbers of factors are stacked into runs (their
#: sweeps are bound by kernel calls); larger ones are runs of one.
STACK_MAX = 16384


@dataclass
class SweepRun:
    """Stages ``lo .. hi - 1`` of equal :meth:`StageFactor.key`, their factors stacked."""

    lo: int
    hi: int
    r: int
    lu: Tensor
    piv: Tensor
    gain: Tensor | None
    jx: Tensor | None
    qc: Tensor | None  # (R, c, c) for split stages
    idx: Tensor | None
    inv_idx: Tensor | None
    rz: int
    free: int = 0  # per stage, the trailing rows whose pivot is d
    bias: bool = False  # split stages: the layer's bias (idx is not the identity)
    jx_t: Tensor | None = None  # jx^T and gain^T, row-major for a run of small stages
    gain_t: Tensor | None = None


def sweep_runs(stages: list[StageFactor]) -> list[SweepRun]:
    """The maximal runs of consecutive stages with equal :meth:`StageFactor.key`."""
    runs: list[SweepRun] = []
    lo = 0
    n = len(stages)
    for hi in range(1, n + 1):
        if hi < n and stages[hi].key() == stages[lo].key() and stages[lo].numel() <= STACK_MAX:
            continue
        run = stages[lo:hi]
        lu, piv = stack_attribute(run, "lu"), stack_attribute(run, "piv")
        gain, jx = stack_attribute(run, "gain"), stack_attribute(run, "jx")
        closed = stack_attribute(run, "closed")
        small = run[0].numel() <= STACK_MAX
        if closed is not None:
            for st, ct in zip(run, _transposed(closed, small).unbind(0), strict=True):
                st.closed_t = ct
        sp = run[0].basis
        qc = idx = inv_idx = None
        rz, bias = 0, False
        if sp is not None:
            qc = torch.stack([st.basis.qc for st in run])  # type: ignore[union-attr]
            idx, inv_idx, rz, bias = sp.idx, sp.inv_idx, sp.rz, sp.bias
        jx_t, gain_t = _transposed(jx, small), _transposed(gain, small)
        runs.append(
            SweepRun(lo, hi, run[0].r, lu, piv, gain, jx, qc, idx, inv_idx, rz, run[0].free,
                     bias, jx_t, gain_t)  # type: ignore[arg-type]
        )  # fmt: skip
        lo = hi
    return runs


def _transposed(t: Tensor | None, copy: bool) -> Tensor | None:
    """``t^T`` per stage: a row-major copy for small stages (module doc), else a view."""
    if t is None:
        return None
    return t.mT.contiguous() if copy else t.mT


@dataclass
class BasisGroup:
    """Consecutive split runs ``runs[lo:hi]`` with one Kronecker basis shape, ``Q_c`` stacked.

    A right-hand side is taken into (and a solution out of) the split basis
    for the whole group in one batched call: the runs of larger stages are
    runs of one, and a call per stage cost about 50 us per sweep.
    """

    lo: int
    hi: int
    qc: Tensor  # (stages of the group, c, c)
    idx: Tensor
    inv_idx: Tensor
    rz: int


def basis_groups(runs: list[SweepRun]) -> list[BasisGroup]:
    """The maximal groups of consecutive split runs with equal basis shapes."""
    groups: list[BasisGroup] = []
    i = 0
    while i < len(runs):
        run = runs[i]
        if run.qc is None:
            i += 1
            continue
        j, shape = i + 1, _basis_shape(run)
        while j < len(runs) and runs[j].qc is not None and _basis_shape(runs[j]) == shape:
            j += 1
        qc = torch.cat([r.qc for r in runs[i:j]])  # type: ignore[misc]
        groups.append(BasisGroup(i, j, qc, run.idx, run.inv_idx, run.rz))  # type: ignore[arg-type]
        i = j
    return groups


def _basis_shape(run: SweepRun) -> tuple:
    """What runs of one :class:`BasisGroup` share: ``Q_c``'s shape, the index and ``r_z``.

    The index by its shape and the bias (it is the identity without one): a
    stage with a bias and one without may have equal shapes (``Linear(11, 12)``
    then ``Linear(12, 12, bias=False)``) but not the same parameter order.
    """
    return run.qc.shape[1:], run.idx.shape, run.rz, run.bias  # type: ignore[union-attr]


def run_sizes(runs: list[SweepRun]) -> list[int]:
    """Stages per run."""
    return [r.hi - r.lo for r in runs]


def repartition(parts: list[Tensor], sizes: list[int], to: list[int]) -> list[Tensor]:
    """Tensors stacked per run of ``sizes`` stages, restacked per run of ``to`` stages.

    The same tensors when the partitions agree (the usual case: a network's
    runs of equal stages are the same for the bases and for the factors).
    """
    if sizes == to:
        return parts
    flat = [t for part in parts for t in part.unbind(0)]
    out, i = [], 0
    for n in to:
        out.append(torch.stack(flat[i : i + n]))
        i += n
    return out


def solve_sweeps(
    stages: list[StageFactor],
    runs: list[SweepRun],
    bs: list[Tensor],
    damping: float,
    groups: list[BasisGroup] | None = None,
) -> list[Tensor]:
    """``w = (Q^T (H + dI) Q)^{-1} b`` (module doc), stacked per run.

    ``bs[i]``: the ``b_l`` of run ``i``'s stages, ``(hi - lo, p_l, k)``; the
    solution comes in the same form. ``groups``: :func:`basis_groups` of
    ``runs`` (computed when not given).
    """
    n_st = len(stages)
    if groups is None:
        groups = basis_groups(runs)
    bbs: list[Tensor] = list(bs)
    for grp in groups:  # into the split basis, a group at a time
        one = grp.hi - grp.lo == 1  # (no copy by a concatenation of one)
        x = bs[grp.lo] if one else torch.cat(bs[grp.lo : grp.hi])
        y = kron_to_basis(grp.qc, grp.idx, grp.rz, x)
        bbs[grp.lo : grp.hi] = y.split(run_sizes(runs[grp.lo : grp.hi]))
    # the sweeps in row form (each right-hand side a row, ``b^T``): a product with
    # few columns is fastest as rows times a row-major matrix (module doc)
    rows = [bb.mT for bb in bbs]  # (R, k, p) views
    kb: list[Tensor] = [None] * n_st  # type: ignore[list-item]  # (K_l^T b_l)^T
    for run, bt in zip(runs, rows, strict=True):
        if run.gain is not None:
            kb[run.lo : run.hi] = torch.bmm(bt, run.gain).unbind(0)
    sv: list[Tensor | None] = [None] * n_st  # sv[l]: s^T at stage l's output
    s: Tensor | None = None
    for l in range(n_st - 1, 0, -1):  # noqa: E741
        sv[l] = s
        s = kb[l] if s is None else torch.addmm(kb[l], s, stages[l].closed)
    sv[0] = s
    ks: list[Tensor] = []  # per run: k^T (R, k, r), from the LU-factored rows
    jk: list[Tensor] = [None] * n_st  # type: ignore[list-item]
    for run, bt in zip(runs, rows, strict=True):
        q = -bt[..., : run.r]
        if run.jx is not None:
            q = torch.baddbmm(q, torch.stack(sv[run.lo : run.hi]), run.jx)  # type: ignore[arg-type]
        kr = torch.linalg.lu_solve(run.lu, run.piv, q.mT).mT if run.r else q
        if run.jx is not None:
            jk[run.lo : run.hi] = torch.bmm(kr, run.jx_t).unbind(0)
        ks.append(kr)
    us: list[Tensor | None] = [None] * n_st  # us[l]: u^T entering stage l
    u: Tensor | None = None
    for l in range(n_st - 1):  # noqa: E741
        u = -jk[l] if u is None else torch.addmm(jk[l], u, stages[l].closed_t, beta=-1.0)
        us[l + 1] = u
    ws: list[Tensor] = []
    for run, bt, kr in zip(runs, rows, ks, strict=True):
        if run.free:
            kr = torch.cat([kr, -bt[..., run.r :] / damping], dim=-1)
        w = -kr
        if run.gain is not None:
            w = torch.baddbmm(w, torch.stack(us[run.lo : run.hi]), run.gain_t, alpha=-1.0)  # type: ignore[arg-type]
        ws.append(w.mT)
    for grp in groups:  # out of the split basis, a group at a time
        one = grp.hi - grp.lo == 1
        w = kron_from_basis(
            grp.qc, grp.inv_idx, grp.rz, ws[grp.lo] if one else torch.cat(ws[grp.lo : grp.hi])
        )
        ws[grp.lo : grp.hi] = w.split(run_sizes(runs[grp.lo : grp.hi]))
    return ws
