"""The Gauss-Newton matrix as the Hessian of a pipeline without inner curvature (lifted route).

``G = sum_n J_n^T Lambda_n J_n`` is the Hessian of the same pipeline with
every stage's second-derivative blocks set to zero except the loss's own
curvature in the network output ``y``: with the last stage split as
``y = f_L(z_{L-1}; x_L)`` and ``l(y)`` (:mod:`hessinv.ggn_split`), that
curvature enters the last stage as

    Tzz = Jz^T Lambda Jz,   Tzx = Jz^T Lambda Jx,   Txx = sum_n Jx^T Lambda Jx

(``Jz``, ``Jx`` the per-sample Jacobians of ``f_L``), and the other stages keep
their first-order blocks ``Jz``, ``Jx`` (and gradients) with ``Tzz = 0``,
``Tzx = 0``, ``Txx = 0``. The lifted system of these blocks (DESIGN.md
section 1, paper eq. 18) then has ``G + dI`` as its Schur complement.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import grad

from .derivatives import AutodiffDerivatives, StageBlocks, comb_jacobian, stage_blocks
from .ggn_split import output_split
from .pipeline import Pipeline, Stage


def _first_order_blocks(stage: Stage, z: Tensor, cot: Tensor, *, first: bool, generic: bool):  # noqa: ANN202
    """``Jz``, ``Jx``, the gradient and the input cotangent of a stage before the last."""
    if stage.structure is None or generic:
        # generic autodiff: skip the second-order blocks, which G does not use
        return AutodiffDerivatives(stage.fn, stage.params).blocks(
            z, cot, first=first, last=False, second=False
        )
    return stage_blocks(stage, z, cot, first=first, last=False, generic=False)


def ggn_blocks(pipeline: Pipeline, generic: bool = False) -> tuple[Tensor, list[StageBlocks]]:
    """The loss and the Gauss-Newton stage blocks of a pipeline (module doc).

    Args:
        pipeline: A pipeline whose last stage :func:`hessinv.ggn_split.output_split` can split.
        generic: Generic autodiff for every stage (no structured fast path).

    Returns:
        ``(loss, blocks)``, one :class:`hessinv.derivatives.StageBlocks` per stage.
    """
    zs = pipeline.forward()
    stages = pipeline.stages
    n_st = len(stages)
    last = stages[-1]
    split = output_split(pipeline)
    z = zs[-2]
    n = z.shape[0]
    y = split.net_last(z, last.params).detach()
    a_out = y[0].numel()

    def loss_flat(yf: Tensor) -> Tensor:
        return split.loss(yf.reshape(y.shape))

    yf = y.reshape(n, a_out)
    b_y = grad(loss_flat)(yf)
    lam = comb_jacobian(grad(loss_flat), yf, a_out)  # (N, a_out, a_out)
    lam = 0.5 * (lam + lam.transpose(1, 2))
    fo = AutodiffDerivatives(split.net_last, last.params).blocks(
        z, b_y.reshape(y.shape), first=n_st == 1, last=False, second=False
    )
    lam_jx = lam @ fo.Jx
    blocks: list[StageBlocks] = [None] * n_st  # type: ignore[list-item]
    tzz = tzx = None
    if fo.Jz is not None:
        tzz = fo.Jz.transpose(1, 2) @ lam @ fo.Jz
        tzx = fo.Jz.transpose(1, 2) @ lam_jx
    txx = torch.einsum("nap,naq->pq", fo.Jx, lam_jx)
    blocks[-1] = StageBlocks(None, None, tzz, tzx, 0.5 * (txx + txx.T), fo.grad_x, fo.cot_in, fo.Jx)
    cot = fo.cot_in
    for l in range(n_st - 2, -1, -1):  # noqa: E741
        first = l == 0
        b = _first_order_blocks(stages[l], zs[l], cot, first=first, generic=generic)
        zero_zz = zero_zx = None
        if not first:
            zl = zs[l].reshape(n, -1)
            a_in = zl.shape[1]
            zero_zz = zl.new_zeros(n, a_in, a_in)
            zero_zx = zl.new_zeros(n, a_in, b.grad_x.numel())
        blocks[l] = StageBlocks(b.Jz, b.Jx, zero_zz, zero_zx, None, b.grad_x, b.cot_in, b.Jx)
        cot = b.cot_in
    return zs[-1], blocks
