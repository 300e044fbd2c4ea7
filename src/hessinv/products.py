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

import torch
from torch import Tensor

from .derivatives import StageBlocks, stage_blocks
from .pipeline import Pipeline
from .progress import ProgressArg, progress_bar


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
    n_st = len(pipeline.stages)
    blocks: list[StageBlocks | None] = [None] * n_st
    cot = None
    with progress_bar(n_st, "hessinv: derivative blocks", progress) as bar:
        for l in reversed(range(n_st)):  # noqa: E741
            blk = stage_blocks(
                pipeline.stages[l],
                zs[l],
                cot,
                first=(l == 0),
                last=(l == n_st - 1),
                generic=generic,
            )
            blocks[l] = blk
            cot = blk.cot_in
            bar.update(1)
    return zs[-1], blocks  # type: ignore[return-value]


def gradient(blocks: list[StageBlocks]) -> Tensor:
    """The flat gradient ``e_L M^{-1} D_x`` (eq. 8), read off the backward sweep."""
    return torch.cat([b.grad_x for b in blocks])


def split_rows(v: Tensor, sizes: list[int]) -> list[Tensor]:
    """Split the rows of ``v`` (``(W, k)``) into per-stage pieces."""
    return list(torch.split(v, sizes, dim=0))


def _contract(per_sample: Tensor, w: Tensor) -> Tensor:
    """``sum_n per_sample[n]^T w[n]`` for ``(N, a, p)`` and ``(N, a, k)``: one matrix product."""
    n, a, p = per_sample.shape
    return per_sample.reshape(n * a, p).T @ w.reshape(n * a, -1)


def _apply_per_sample(per_sample: Tensor, w: Tensor) -> Tensor:
    """``per_sample[n] @ w`` for ``(N, a, p)`` and ``(p, k)``: one ``(N a, p) @ (p, k)`` product."""
    n, a, p = per_sample.shape
    return (per_sample.reshape(n * a, p) @ w).reshape(n, a, -1)


def hvp(blocks: list[StageBlocks], v: Tensor) -> Tensor:
    """``H v`` for a block of vectors ``v`` of shape ``(W, k)`` (eq. 24)."""
    sizes = [b.num_params for b in blocks]
    vs = split_rows(v, sizes)
    n_st = len(blocks)
    us: list[Tensor | None] = [None] * n_st
    for l in range(n_st - 1):  # noqa: E741
        b = blocks[l]
        u = _apply_per_sample(b.Jx, vs[l])  # (N, a_l, k)
        if l > 0:
            u = torch.baddbmm(u, b.Jz, us[l - 1])
        us[l] = u
    out: list[Tensor] = [None] * n_st  # type: ignore[list-item]
    lam = None
    for l in reversed(range(n_st)):  # noqa: E741
        b = blocks[l]
        terms = []
        if lam is not None:
            terms.append(_contract(b.Jx, lam))
        if l > 0:
            terms.append(_contract(b.Tzx, us[l - 1]))
        if b.Txx is not None:
            terms.append(b.Txx @ vs[l])
        o = terms[0] if terms else torch.zeros_like(vs[l])
        for t in terms[1:]:
            o = o + t
        out[l] = o
        if l > 0:
            # adjoint of stage l-1's output
            new = torch.baddbmm(_apply_per_sample(b.Tzx, vs[l]), b.Tzz, us[l - 1])
            if lam is not None:
                new = torch.baddbmm(new, b.Jz.transpose(-1, -2), lam)
            lam = new
    return torch.cat(out, dim=0)


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
