"""The generalized Gauss-Newton (outer-product, Levenberg-Marquardt) matrix as an operator.

Bishop's eq. 8.39 splits the Hessian of a sum-of-squares error into the outer
product ``sum_n grad y_n grad y_n^T`` and a term weighted by the residuals;
the outer-product (Gauss-Newton) approximation keeps the first. For any loss
``l(y, t)`` of the network output ``y`` it is ``G = sum_n J_n^T Lambda_n J_n``
with ``J_n = d y_n / d theta`` and ``Lambda_n = d2 l / dy_n dy_n`` (positive
semi-definite for convex losses such as MSE and cross-entropy).

In the pipeline's terms, ``G`` is the Hessian of the same pipeline with every
stage's second-derivative blocks set to zero except the loss's own curvature,
which enters the last stage as ``Tzz = Jz^T Lambda Jz``, ``Tzx = Jz^T Lambda Jx``,
``Txx = sum_n Jx^T Lambda Jx`` (``Jz``, ``Jx`` of the last layer and its tail). So
:class:`GaussNewton` is a :class:`hessinv.Hessian` built from those blocks, and
every method -- ``@``, exact ``solve`` (linear in depth), ``logdet``,
``inertia``, ``to_dense``, ``diagonal`` -- works unchanged. Its gradient is the
true gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import grad

from .derivatives import AutodiffDerivatives, StageBlocks, comb_jacobian, stage_blocks
from .hessian import Hessian
from .pipeline import Pipeline


def ggn_blocks(pipeline: Pipeline, generic: bool = False) -> tuple[Tensor, list[StageBlocks]]:
    """The loss and the Gauss-Newton stage blocks of a model pipeline."""
    zs = pipeline.forward()
    stages = pipeline.stages
    n_st = len(stages)
    last = stages[-1]
    st = last.structure
    if st is None or st.loss is None:
        raise ValueError(
            "GaussNewton needs a model and a loss: use GaussNewton(model, loss_func, X, y)"
        )
    loss_func, target = st.loss
    z = zs[-2]
    n = z.shape[0]

    def net(zz: Tensor, params: tuple[Tensor, ...]) -> Tensor:
        return st.net_fn(st.layer_fn(zz, params))

    y = net(z, last.params).detach()
    a_out = y[0].numel()

    def loss_flat(yf: Tensor) -> Tensor:
        return loss_func(yf.reshape(y.shape), target).reshape(())

    yf = y.reshape(n, a_out)
    b_y = grad(loss_flat)(yf)
    lam = comb_jacobian(grad(loss_flat), yf, a_out)  # (N, a_out, a_out)
    lam = 0.5 * (lam + lam.transpose(1, 2))
    fo = AutodiffDerivatives(net, last.params).blocks(
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
        b = stage_blocks(stages[l], zs[l], cot, first=l == 0, last=False, generic=generic)
        first = l == 0
        zero_zz = None if first else torch.zeros_like(b.Tzz)
        zero_zx = None if first else torch.zeros_like(b.Tzx)
        blocks[l] = StageBlocks(b.Jz, b.Jx, zero_zz, zero_zx, None, b.grad_x, b.cot_in, b.Jx)
        cot = b.cot_in
    return zs[-1], blocks


class GaussNewton(Hessian):
    """The generalized Gauss-Newton matrix ``sum_n J_n^T Lambda_n J_n`` of a model.

    Same interface as :class:`hessinv.Hessian`: ``GaussNewton(model, loss_func, X, y)``.
    It is positive semi-definite for convex losses, so ``inertia`` has no
    negative entries and ``solve`` needs ``damping > 0`` whenever ``W`` exceeds
    ``N`` times the output width (its rank).
    """

    @classmethod
    def from_stages(cls, *args, **kwargs):  # noqa: ANN002, ANN003, ANN206, D102
        raise TypeError(
            "GaussNewton needs to know where the network ends and the loss begins: "
            "use GaussNewton(model, loss_func, X, y)"
        )

    def _compute_blocks(
        self, pipeline: Pipeline, generic: bool
    ) -> tuple[Tensor, list[StageBlocks]]:
        return ggn_blocks(pipeline, generic)
