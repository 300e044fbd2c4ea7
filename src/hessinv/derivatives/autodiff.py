"""Generic derivative blocks of any stage by ``torch.func`` (the fallback of every layer).

:class:`AutodiffDerivatives` works on the whole batch with *comb* tangents
(the same direction ``e_j`` in every sample), so that one Jacobian- or
Hessian-vector product returns column ``j`` of all ``N`` per-sample blocks at
once (exact when samples do not mix).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import grad, jacrev

from ..grad_mode import normal_tensor, recording
from ..pipeline import flatten_params, unflatten_params
from .blocks import StageBlocks, comb_jacobian
from .registry import ModuleDerivatives, register


class AutodiffDerivatives:
    """Generic blocks of any stage ``fn(z, params)`` by ``torch.func``.

    Cost (reverse mode, each product on the whole batch): ``a_out`` products
    for ``Jz`` and ``a_in`` for ``Tzz`` (comb cotangents,
    :func:`comb_jacobian`), ``N a_out`` for ``Jx``, ``N a_in`` for ``Tzx`` and
    ``p`` for ``Txx``.
    """

    def __init__(self, fn, params: tuple[Tensor, ...]) -> None:  # noqa: ANN001
        self.fn = fn
        self.params = params

    def blocks(
        self,
        z: Tensor,
        cot: Tensor | None,
        *,
        first: bool,
        last: bool,
        txx: bool = True,
        second: bool = True,
    ) -> StageBlocks:
        """All blocks at input ``z`` with cotangent ``cot`` (``None``: last stage).

        ``second=False`` skips ``Tzz``, ``Tzx`` and ``Txx`` (left ``None``).
        """
        n = z.shape[0]
        if not self.params and not first and z.is_floating_point():
            a_out = 1 if last else cot.reshape(n, -1).shape[1]
            if max(a_out, z[0].numel()) <= PLAIN_MAX_ROWS:
                return _parameter_free_blocks(self.fn, z, cot, last=last, second=second)
        zf = z.reshape(n, -1).detach()
        a_in = zf.shape[1]
        # The first stage's input may be integer data (Embedding indices): never differentiated.
        dtype = zf.dtype if zf.is_floating_point() or not self.params else self.params[0].dtype
        xf = flatten_params(self.params).to(device=z.device, dtype=dtype).detach()
        p = xf.numel()
        shape_in = z.shape

        def f(zz: Tensor, xx: Tensor) -> Tensor:
            return self.fn(zz.reshape(shape_in), unflatten_params(xx, self.params))

        if last:

            def s(zz: Tensor, xx: Tensor) -> Tensor:
                return f(zz, xx).reshape(())
        else:
            cotf = cot.reshape(n, -1).detach()

            def s(zz: Tensor, xx: Tensor) -> Tensor:
                return (f(zz, xx).reshape(n, -1) * cotf).sum()

        if first:
            gz, gx = None, grad(s, argnums=1)(zf, xf)
        else:
            gz, gx = grad(s, argnums=(0, 1))(zf, xf)
        jz = jx = tzz = tzx = txx_ = None
        if not last:
            a_out = cotf.shape[1]
            if not first:
                jz = comb_jacobian(lambda zz: f(zz, xf).reshape(n, a_out), zf, a_out)
            if p:
                jx = jacrev(lambda xx: f(zf, xx).reshape(n, a_out))(xf)
            else:
                jx = xf.new_zeros(n, a_out, 0)
        if not first and second:
            tzz = comb_jacobian(lambda zz: grad(s, argnums=0)(zz, xf), zf, a_in)
            if p:
                tzx = jacrev(lambda xx: grad(s, argnums=0)(zf, xx))(xf)
            else:
                tzx = zf.new_zeros(n, a_in, 0)
        if txx and second and p:
            txx_ = jacrev(lambda xx: grad(s, argnums=1)(zf, xx))(xf)
        cot_in = None if first else gz.reshape(shape_in).detach()
        return StageBlocks(jz, jx, tzz, tzx, txx_, gx.detach(), cot_in)


#: Up to this many comb rows, a parameter-free stage (a loss, a tail step) is
#: differentiated by plain ``torch.autograd.grad`` calls instead of ``torch.func``,
#: whose first use in a process imports ``torch._dynamo`` (about 0.8 s).
PLAIN_MAX_ROWS = 64


def _comb_rows(out: Tensor, z: Tensor, rows: int) -> Tensor:
    """``(N, rows, a_in)`` per-sample Jacobians of ``out`` (``(N, rows)``) w.r.t. ``z``.

    Row ``o`` of every sample's block from one reverse pass of ``out[:, o].sum()``
    (the comb cotangent ``e_o`` in every sample; exact when samples do not mix).
    Zeros when ``out`` does not depend on ``z``.
    """
    if not out.requires_grad:
        return z.new_zeros(z.shape[0], rows, z.shape[1])
    got = []
    for o in range(rows):
        (g,) = torch.autograd.grad(out[:, o].sum(), z, retain_graph=True, allow_unused=True)
        got.append(torch.zeros_like(z) if g is None else g.detach())
    if not got:
        return z.new_zeros(z.shape[0], 0, z.shape[1])
    return torch.stack(got, dim=1)


@recording  # (autograd records nothing inside torch.inference_mode(): hessinv.grad_mode)
def _parameter_free_blocks(  # noqa: ANN001
    fn,
    z: Tensor,
    cot: Tensor | None,
    *,
    last: bool,
    second: bool,
) -> StageBlocks:
    """:meth:`AutodiffDerivatives.blocks` of a parameter-free stage that is not the first.

    The same reverse passes as the ``torch.func`` route (:func:`comb_jacobian`),
    run as a loop of ``torch.autograd.grad`` calls (:func:`_comb_rows`).
    """
    n, shape_in = z.shape[0], z.shape
    zz = z.reshape(n, -1).detach().clone().requires_grad_(True)
    a_in = zz.shape[1]
    with torch.enable_grad():
        out = fn(zz.reshape(shape_in), ())
        if last:
            s = out.reshape(())
        else:
            out = out.reshape(n, -1)
            s = (out * normal_tensor(cot).reshape(n, -1).detach()).sum()
        gz = None
        if s.requires_grad:  # else the stage ignores its input: zero derivatives
            (gz,) = torch.autograd.grad(  # the graph is kept for Jz's rows below
                s, zz, create_graph=second, retain_graph=not last or second, allow_unused=True
            )
        gz = torch.zeros_like(zz) if gz is None else gz
        jz = jx = tzz = tzx = None
        if not last:
            jz = _comb_rows(out, zz, out.shape[1])
            jx = zz.new_zeros(n, out.shape[1], 0)
        if second:  # zeros when the stage is affine in z (gz does not depend on it)
            tzz = _comb_rows(gz, zz, a_in)
            tzx = zz.new_zeros(n, a_in, 0)
    empty = zz.new_zeros(0)
    return StageBlocks(jz, jx, tzz, tzx, None, empty, gz.detach().reshape(shape_in))


class GenericDerivatives(ModuleDerivatives):
    """A module known to work but without a closed form: its blocks come from autodiff.

    Registered for modules that are safe to run as they are (softmax,
    ``GroupNorm``, ``PReLU``, ...), and used for every module without a
    registered class. :meth:`applies` is false, so a parametrised one starts a
    stage whose layer blocks come from :class:`AutodiffDerivatives`; in a
    stage's tail, :meth:`tail_step` is one autodiff call.
    """

    closed_form = False

    @classmethod
    def applies(cls, module: nn.Module, z: Tensor) -> bool:  # noqa: D102
        return False

    def tail_step(
        self, z: Tensor, params: tuple[Tensor, ...], b: Tensor
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """``(Jz, Tzz, Jz^T b)`` by :class:`AutodiffDerivatives` (``params`` are constants)."""
        m = self.module
        with torch.no_grad():
            out_shape = m(z).shape
        blk = AutodiffDerivatives(lambda zz, _p: m(zz), ()).blocks(
            z, b.reshape(out_shape), first=False, last=False, txx=False
        )
        return blk.Jz, blk.Tzz, blk.cot_in.reshape(b.shape[0], -1)


for _t in (nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.GroupNorm, nn.PReLU, nn.Bilinear):
    register(_t, GenericDerivatives)
