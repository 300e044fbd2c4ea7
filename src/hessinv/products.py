"""The gradient (paper eq. 8) and the exact Hessian-vector product (eq. 24).

Both are computed from the per-stage blocks of :mod:`hessinv.derivatives`.
With 0-based stages ``l = 0..L-1``, ``u_l`` the tangent of stage ``l``'s output
and ``lam_l`` its adjoint (the paper's appendix A)::

    u_l   = Jz_l u_{l-1} + Jx_l v_l                       (u_{-1} = 0, eq. 53)
    lam_l = Jz_{l+1}^T lam_{l+1} + Tzz_{l+1} u_l + Tzx_{l+1} v_{l+1}
                                                        (lam_{L-1} = 0, eq. 52)
    (H v)_l = Jx_l^T lam_l + Tzx_l^T u_{l-1} + Txx_l v_l  (eq. 52/54)

which is eq. 24, ``H = D_D D_xx + D_D D_zx P M^{-1} D_x + D_x^T M^{-T} P^T
D_M D_xz + D_x^T M^{-T} P^T D_M D_zz P M^{-1} D_x``, applied right to left:
the forward recursion applies ``M^{-1} D_x``, the backward one ``M^{-T}``.
Cost: one forward and one backward sweep of small batched matrix products,
``O(sum_l N (a_l a_{l-1} + a_l p_l + a_{l-1} p_l) + p_l^2)`` per vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .derivatives import StageBlocks, stage_blocks
from .derivatives.linear_runs import linear_runs, run_blocks
from .kron_products import KronRun, add_into
from .pipeline import Pipeline
from .progress import ProgressArg, progress_bar
from .stacking import stack_attribute


def compute_blocks(
    pipeline: Pipeline, *, generic: bool = False, progress: ProgressArg = False
) -> tuple[Tensor, list[StageBlocks]]:
    """Forward pass, then every stage's blocks in one backward sweep.

    Args:
        pipeline: The pipeline.
        generic: Generic autodiff for every block (no fast paths).
        progress: A bar over the stages (:mod:`hessinv.progress`).

    Returns:
        The loss ``z_L`` and the list of :class:`StageBlocks`, one per stage.
    """
    zs = pipeline.forward()
    stages = pipeline.stages
    n_st = len(stages)
    blocks: list[StageBlocks | None] = [None] * n_st
    # runs of Linear -> activation stages: built batched (hessinv.derivatives.linear_runs)
    runs = {} if generic else {hi - 1: lo for lo, hi in linear_runs(stages, zs)}
    cot = None
    with progress_bar(n_st, "hessinv: derivative blocks", progress) as bar:
        l = n_st - 1  # noqa: E741
        while l >= 0:
            if l in runs:
                lo = runs[l]
                blocks[lo : l + 1] = run_blocks(stages[lo : l + 1], zs[lo : l + 1], cot)
                bar.update(l + 1 - lo)
                l = lo  # noqa: E741
            else:
                blocks[l] = stage_blocks(
                    stages[l], zs[l], cot, first=(l == 0), last=(l == n_st - 1), generic=generic
                )
                bar.update(1)
            cot = blocks[l].cot_in  # type: ignore[union-attr]
            l -= 1  # noqa: E741
    return zs[-1], blocks  # type: ignore[return-value]


def gradient(blocks: list[StageBlocks]) -> Tensor:
    """The flat gradient ``e_L M^{-1} D_x`` (eq. 8), read off the backward sweep."""
    return torch.cat([b.grad_x for b in blocks])


#: ``Txx`` (``p x p`` per stage) is stacked for one batched product only up to this ``p``;
#: larger ones are flop-bound, and a stacked copy would cost a pass over the largest blocks.
TXX_STACK_MAX_P = 64


@dataclass
class StageRun:
    """Consecutive stages ``lo .. hi-1`` whose blocks have equal shapes, stacked.

    ``jx``, ``tzx``, ``tzz``, ``txx``: the stages' blocks stacked along a new
    first dimension (``None`` where the stages have none, and ``txx`` also
    where ``p > TXX_STACK_MAX_P``: then each stage's own ``Txx`` is applied;
    ``jx``, ``tzx`` and ``txx`` are ``None`` where ``kron`` is set: the
    products of such a run come from its factors).
    The stages' :class:`StageBlocks` tensors are views of these stacks.
    """

    lo: int
    hi: int
    offset: int  # first row of stage ``lo`` in a flat parameter vector
    p: int
    jx: Tensor | None
    tzx: Tensor | None
    tzz: Tensor | None
    txx: Tensor | None
    kron: KronRun | None = None  # the Linear stages' factors (hessinv.kron_products)
    first: bool = False  # stage lo is the network's first (no Tzx, Tzz: its input is data)
    last: bool = False  # stage hi - 1 is the last (no Jx: its output is the loss)


def _shape_key(b: StageBlocks) -> tuple:
    """Shapes and dtypes of the blocks (a lazy block's without forming it: the blocks' dtype)."""

    def one(name: str) -> tuple | None:
        shape = b.shape_of(name)
        if shape is None:
            return None
        return tuple(shape), getattr(b, name).dtype if b.formed(name) else b.grad_x.dtype

    return tuple(one(name) for name in ("Jx", "Jz", "Tzz", "Tzx", "Txx"))


def stage_runs(blocks: list[StageBlocks]) -> list[StageRun]:
    """The maximal runs of equally shaped stages (a deep MLP is one or three runs).

    The block tensors of each run are stacked (:func:`hessinv.stacking.stack_attribute`) and
    the stages' attributes rebound to views of the stacks. Call it on fresh
    blocks (as :class:`hessinv.Hessian` does right after building them): a
    tensor still referenced elsewhere would then be held twice.
    """
    runs: list[StageRun] = []
    lo, offset = 0, 0
    n_st = len(blocks)
    for l in range(1, n_st + 1):  # noqa: E741
        if l < n_st and _shape_key(blocks[l]) == _shape_key(blocks[lo]):
            continue
        run = blocks[lo:l]
        p = run[0].num_params
        kron = KronRun.of(run)
        # a run with its Kronecker factors reads no dense Jx, Tzx, Txx: those stay unstacked
        names = ["Tzz"] if kron is not None else ["Jx", "Tzx", "Tzz"]
        names += ["Txx"] if p <= TXX_STACK_MAX_P and kron is None else []
        st = {n: stack_attribute(run, n) if run[0].has(n) else None for n in names}
        runs.append(
            StageRun(
                lo,
                l,
                offset,
                p,
                st.get("Jx"),
                st.get("Tzx"),
                st["Tzz"],
                st.get("Txx"),
                kron,
                first=not run[0].has("Tzx"),
                last=not run[-1].has("Jx"),
            )
        )
        offset += p * len(run)
        lo = l
    return runs


def _bmm_rows(blocks: Tensor, w: Tensor) -> Tensor:
    """``blocks[r, n] @ w[r]`` for ``(R, N, a, p)`` and ``(R, p, k)``: ``(R, N, a, k)``."""
    r, n, a, p = blocks.shape
    return torch.bmm(blocks.reshape(r, n * a, p), w).reshape(r, n, a, -1)


def _bmm_contract(blocks: Tensor, w: Tensor) -> Tensor:
    """``sum_n blocks[r, n]^T w[r, n]`` for ``(R, N, a, p)`` and ``(R, N, a, k)``: ``(R, p, k)``."""
    r, n, a, p = blocks.shape
    return torch.bmm(blocks.reshape(r, n * a, p).transpose(1, 2), w.reshape(r, n * a, -1))


def hvp(blocks: list[StageBlocks], v: Tensor, runs: list[StageRun] | None = None) -> Tensor:
    """``H v`` for a block of vectors ``v`` of shape ``(W, k)`` (eq. 24).

    Only the recursions are sequential: ``u_l = Jz_l u_{l-1} + (Jx_l v_l)``
    forward and ``lam_{l-1} = Jz_l^T lam_l + (Tzz_l u_{l-1} + Tzx_l v_l)``
    backward, one small batched product per stage each. The bracketed terms
    and the output ``(H v)_l = Jx_l^T lam_l + Tzx_l^T u_{l-1} + Txx_l v_l``
    are independent across stages and are formed for a whole
    :class:`StageRun` at once (``runs``: :func:`stage_runs` of ``blocks``,
    computed here when not given); for a run of ``nn.Linear`` stages from
    their Kronecker factors (:mod:`hessinv.kron_products`), never reading the
    dense ``Jx``, ``Tzx`` and ``Txx``.
    """
    if runs is None:
        runs = stage_runs(blocks)
    k = v.shape[1]
    n_st = len(blocks)
    vr = [v[r.offset : r.offset + (r.hi - r.lo) * r.p].reshape(r.hi - r.lo, r.p, k) for r in runs]
    ys = [None if r.kron is None else r.kron.layer_rows(vv) for r, vv in zip(runs, vr, strict=True)]
    us: list[Tensor | None] = [None] * n_st
    # every run writes its rows of H v straight into the result (no final concatenation
    # of per-run blocks: at width 16, batch 2 each is a megabyte per product)
    hv = v.new_empty(v.shape)
    for run, vv, y in zip(runs, vr, ys, strict=True):
        if run.last:  # the last stage: its output is the loss
            continue
        jxv = _bmm_rows(run.jx, vv) if run.kron is None else run.kron.jx_rows(y)
        for u, l in zip(jxv.unbind(0), range(run.lo, run.hi), strict=True):  # noqa: E741
            us[l] = u if l == 0 else torch.baddbmm(u, blocks[l].Jz, us[l - 1])
    lams: list[Tensor | None] = [None] * n_st  # lams[l]: stage l's output's adjoint, as rows
    for j in reversed(range(len(runs))):
        run, vv, y = runs[j], vr[j], ys[j]
        r_len = run.hi - run.lo
        out = hv[run.offset : run.offset + r_len * run.p].view(r_len, run.p, k)
        terms: list[Tensor] = []
        u_prev = None
        if not run.first:
            u_prev = torch.stack([us[i - 1] for i in range(run.lo, run.hi)])  # (R, N, a_in, k)
            rr, n, a_in, _ = u_prev.shape
            if run.kron is None:
                terms.append(_bmm_contract(run.tzx, u_prev))
                push = _bmm_rows(run.tzx, vv)  # Tzz_l u_{l-1} + Tzx_l v_l
            else:
                push = run.kron.tzx_rows(vv, y)
            if run.tzz is not None:
                push = torch.baddbmm(
                    push.reshape(rr * n, a_in, k),
                    run.tzz.reshape(rr * n, a_in, a_in),
                    u_prev.reshape(rr * n, a_in, k),
                ).reshape(rr, n, a_in, k)
            # the adjoints as rows, lam^T (N, k, a): lam^T Jz reads Jz as stored, about
            # half the time of Jz^T lam through a transposed view (one per stage)
            pushes = push.mT.unbind(0)
            for i in reversed(range(r_len)):
                l = run.lo + i  # noqa: E741
                lam = lams[l]
                lams[l - 1] = (
                    pushes[i] if lam is None else torch.baddbmm(pushes[i], lam, blocks[l].Jz)
                )
        lam_run = None
        if not run.last:
            lam_run = torch.stack([lams[i] for i in range(run.lo, run.hi)]).mT
        if run.kron is not None:
            run.kron.contract(y, u_prev, lam_run, out)
            continue
        if lam_run is not None:
            terms.append(_bmm_contract(run.jx, lam_run))  # type: ignore[arg-type]
        if run.txx is not None:
            terms.append(torch.bmm(run.txx, vv))
        elif blocks[run.lo].Txx is not None:  # large p: each stage's own (flop-bound)
            txx = [blocks[i].Txx for i in range(run.lo, run.hi)]
            terms.append(torch.stack([t @ vi for t, vi in zip(txx, vv, strict=True)]))
        if not terms:
            out.zero_()
            continue
        o = terms[0]
        for t in terms[1:-1]:
            o = o + t
        if len(terms) == 1:
            out.copy_(o)
        else:
            add_into(out, o, terms[-1])
    return hv


def pearlmutter_hvp(pipeline: Pipeline, v: Tensor) -> Tensor:
    """Reference ``H v`` by autodiff of the whole loss, independent of the blocks.

    Pearlmutter's trick as the paper's appendix A states it: ``H v`` is the
    gradient of the directional derivative ``grad(loss) . v`` (double
    backward; torch's forward-over-reverse fails on some losses, e.g.
    ``mse_loss``).
    """
    x = torch.cat([p.reshape(-1) for p in pipeline.params]).detach()

    def directional(xx: Tensor, vv: Tensor) -> Tensor:
        return torch.func.grad(pipeline.loss_of_flat)(xx) @ vv

    cols = [torch.func.grad(directional)(x, v[:, j]) for j in range(v.shape[1])]
    return torch.stack(cols, dim=1)
