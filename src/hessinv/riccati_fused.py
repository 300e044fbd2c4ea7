"""One stage of the Riccati elimination as a single symmetric update, its inputs batched.

With ``P`` the Hessian of the cost-to-go in stage ``l``'s output, the pivot
``Q_vv``, the coupling ``Q_vu`` and ``Q_uu`` of :mod:`hessinv.riccati_solve`
are the blocks of one ``(r + M_in)``-square matrix::

    S = C + B^T P B,   B = [Jx_1, Jz],
    C = [[T_11 + dI,  Tzx_1^T                   ],
         [Tzx_1,      Tzz - Tzx_2 Tzx_2^T / d   ]]

(``Jx_1``, ``T_11``, ``Tzx_1``: the first ``r`` columns of a split stage,
whose other ``free`` columns see neither ``Jx`` nor ``Txx`` and have pivot
``d I``; they are eliminated in ``C``, with gain ``Tzx_2^T / d``). Then
``K = S_11^{-1} S_12`` and ``P <- S_22 - S_12^T K``: per stage two products,
one LU and one solve, whatever the stage's kind. ``C`` and ``B`` do not depend
on ``P``: :func:`fused_inputs` forms them for a run of equally shaped stages
in a few batched calls. At width 16, batch 2 (``r = 32``, ``M = 32``) the
stage-by-stage form spent its time in some twenty small calls per stage;
this one makes about ten. For large stages (:data:`FUSE_MAX`) the dense
``Jz`` in ``B`` would multiply the flops of the block-diagonal products, and
the stage-by-stage form stays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .stage_split import SplitStage

#: Stages with ``r + M_in`` and ``M`` at most this are eliminated by the fused update.
FUSE_MAX = 96


@dataclass
class StageParts:
    """What the elimination reads of stage ``l`` (P-independent).

    Attributes:
        r: Rows of the LU-factored pivot.
        free: Trailing rows whose pivot is ``d`` exactly (split stages).
        txx: ``T_11`` (``r x r``) or ``None`` (zero).
        jx: ``Jx_1`` (``M x r``) or ``None`` (the last stage).
        tzx: ``Tzx`` on the stage's basis (``M_in x (r + free)``), ``None`` for the first.
        jz: The per-sample ``Jz`` (``(N, a, a_in)``) or ``None``.
        tzz: The per-sample ``Tzz`` (``(N, a_in, a_in)``) or ``None``.
        split: The stage's Kronecker split basis (a change of basis), if any.
    """

    r: int
    free: int
    txx: Tensor | None
    jx: Tensor | None
    tzx: Tensor | None
    jz: Tensor | None
    tzz: Tensor | None
    split: SplitStage | None

    @property
    def m_in(self) -> int:
        """``M_{l-1}``: the input state's size (0 for the first stage)."""
        return 0 if self.tzx is None else self.tzx.shape[0]

    @property
    def m_out(self) -> int:
        """``M_l``: the output state's size (0 for the last stage)."""
        return 0 if self.jx is None else self.jx.shape[0]

    def fusable(self) -> bool:
        """Small enough for :func:`fused_inputs` (:data:`FUSE_MAX`)."""
        return self.r + self.m_in <= FUSE_MAX and self.m_out <= FUSE_MAX

    def key(self) -> tuple:
        """Equal keys: :func:`fused_inputs` stacks the stages."""

        def shape(t: Tensor | None) -> tuple | None:
            return None if t is None else tuple(t.shape)

        return (self.r, self.free, shape(self.txx), shape(self.jx), shape(self.tzx),
                shape(self.jz), shape(self.tzz))  # fmt: skip


def free_update(tail: Tensor, damping: float) -> Tensor:
    """``Tzx_2 Tzx_2^T / d`` (batched over leading dims): the free rows' update of ``P``.

    Formed as ``sign(d) t t^T`` with ``t = Tzx_2 / sqrt|d|``: both factors
    scale as the loss, so no product at the square of its scale over- or
    underflows (loss scales near ``1e+-155`` did).
    """
    ts = tail / math.sqrt(abs(damping))
    return math.copysign(1.0, damping) * (ts @ ts.mT)


def _fill_block_diag(out: Tensor, blocks: Tensor) -> None:
    """``out += blockdiag(blocks)`` per batch entry.

    ``out`` is ``(R, N a, N c)``, ``blocks`` is ``(R, N, a, c)``.
    """
    rr, n, a, c = blocks.shape
    view = out.view(rr, n, a, n, c)
    torch.diagonal(view, dim1=1, dim2=3).add_(blocks.permute(0, 2, 3, 1))


def fused_inputs(
    parts: list[StageParts], damping: float
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``C`` (``(R, r + M_in, r + M_in)``), ``B`` (``(R, M, r + M_in)``) and the free gains.

    For a run of stages with one :meth:`StageParts.key`. ``B`` is ``None`` for
    the last stage (no ``P``); the free gains ``Tzx_2^T / d`` (``(R, free,
    M_in)``) are ``None`` without free rows.
    """
    p0 = parts[0]
    rr, r, m_in, m = len(parts), p0.r, p0.m_in, p0.m_out
    ref = p0.tzx if p0.tzx is not None else (p0.jx if p0.jx is not None else p0.txx)
    n = r + m_in
    # every entry is written below (the couplings' zeros where Tzx is absent): no zero fill
    # of the whole (R, n, n) buffer, several MB at width 16
    c = torch.empty(rr, n, n, dtype=ref.dtype, device=ref.device)  # type: ignore[union-attr]
    top = c[:, :r, :r]
    if p0.txx is not None:
        top.copy_(torch.stack([p.txx for p in parts]))  # type: ignore[misc]
    else:
        top.zero_()
    torch.diagonal(top, dim1=1, dim2=2).add_(damping)
    c[:, r:, r:].zero_()
    tails = None
    if p0.tzx is None:
        c[:, r:, :r].zero_()
        c[:, :r, r:].zero_()
    else:
        t = torch.stack([p.tzx for p in parts])  # type: ignore[misc]
        c[:, r:, :r] = t[..., :r]
        c[:, :r, r:] = t[..., :r].mT
        if p0.free:
            t2 = t[..., r:]
            c[:, r:, r:] -= free_update(t2, damping)
            tails = t2.mT / damping
    if p0.tzz is not None:
        _fill_block_diag(c[:, r:, r:], torch.stack([p.tzz for p in parts]))  # type: ignore[misc]
    b = None
    if m:
        b = c.new_zeros(rr, m, n)
        if p0.jx is not None:
            b[..., :r] = torch.stack([p.jx for p in parts])  # type: ignore[misc]
        if p0.jz is not None:
            _fill_block_diag(b[..., r:], torch.stack([p.jz for p in parts]))  # type: ignore[misc]
    return c, b, tails


@dataclass
class FusedOut:
    """One stage's factors, written by the elimination into its run's buffers (views).

    Attributes:
        lu: The pivot's LU (``r x r``).
        piv: Its pivots (``r``, int32).
        info: LAPACK's ``info`` (0-d, int32).
        gain: ``Q_vv^{-1} Q_vu`` (``(r + free) x M_in``, its ``free`` rows the free
            gains, written beforehand); ``None`` for the first stage.
        closed: The closed-loop map ``Jz - Jx gain`` (``M x M_in``) or ``None``.
        total: The sum of the next ``P`` (0-d; ``None`` for the first stage).
    """

    lu: Tensor
    piv: Tensor
    info: Tensor
    gain: Tensor | None
    closed: Tensor | None
    total: Tensor | None


def fused_outputs(
    parts: list[StageParts], ref: Tensor, tails: Tensor | None
) -> tuple[list[FusedOut], Tensor, Tensor | None]:
    """Per stage of a run, the :class:`FusedOut` views of run-wide buffers.

    Written in place by the elimination, the factors of a run are already
    stacked for the sweeps (:func:`hessinv.stacking.as_stack` finds the views):
    no per-stage copy, no concatenation of the free gains. Also returns the
    run's ``info`` and ``P``-sum buffers (``None`` for the first stage's run).
    """
    p0 = parts[0]
    rr, r, m_in, m = len(parts), p0.r, p0.m_in, p0.m_out
    lu = ref.new_empty(rr, r, r)
    piv = torch.empty(rr, r, dtype=torch.int32, device=ref.device)
    info = torch.zeros(rr, dtype=torch.int32, device=ref.device)
    gain = closed = totals = None
    if m_in:
        gain = ref.new_empty(rr, r + p0.free, m_in)
        if tails is not None:
            gain[:, r:] = tails
        totals = ref.new_zeros(rr)
        if m and p0.jx is not None:
            closed = ref.new_empty(rr, m, m_in)
    outs = [
        FusedOut(
            lu[i], piv[i], info[i],
            None if gain is None else gain[i],
            None if closed is None else closed[i],
            None if totals is None else totals[i],
        )
        for i in range(rr)
    ]  # fmt: skip
    return outs, info, totals
