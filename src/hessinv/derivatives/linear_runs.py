"""The blocks of a run of ``Linear -> activation`` stages, batched over the run.

A middle stage ``y = phi(W z + c)`` of the ``nn.Sequential`` adapter, with
``phi`` coordinate-wise (one registered elementwise module, or none), has
with ``s = phi'(W z + c)``, ``Tg = cot * phi''(W z + c)`` (``cot`` the
cotangent of the stage's output) and ``b_y = s * cot`` (per sample)::

    Jz_n  = diag(s_n) W                   Jx_n  = diag(s_n) (I_a (x) t_n^T)
    Tzz_n = W^T diag(Tg_n) W              Tzx_n = W^T diag(Tg_n) (I_a (x) t_n^T) + [b_y,n (x) I, 0]
    grad  = sum_n b_y,n (x) t_n           cot_in = W^T b_y,n

(``t_n = [z_n; 1]``; :mod:`hessinv.derivatives.chain` for the general stage,
:class:`~hessinv.derivatives.blocks.KronX` for the factors). Only the
cotangents are sequential (``cot_{l-1} = W_l^T (s_l * cot_l)``, two small
calls per stage); ``phi'``, ``phi''`` and every block are formed for the
whole run at once, where :func:`~hessinv.derivatives.chain.structured_blocks`
makes some forty small calls per stage (at width 16, batch 2 the build was
bound by them).
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..module_params import all_buffers, all_parameters
from .blocks import KronX, LazyBlock, StageBlocks
from .chain import layer_derivatives, module_derivatives
from .linear import LinearDerivatives, add_hess_zx, write_jac_x
from .registry import ElementwiseDerivatives

if TYPE_CHECKING:
    from ..pipeline import Stage

#: Shortest run worth batching.
MIN_RUN = 2


def _tail_key(stage: Stage, y: Tensor) -> tuple | None:
    """What a run's stages must share of their tail; ``None`` when it does not qualify.

    At most one module: parameter- and buffer-free, without hooks, whose
    registered class is elementwise and covers it at its input (``y`` has the
    shape of the stage's output). Modules of torch's own classes match by type
    and ``extra_repr`` (their options); others only as the same instance.
    """
    tail = stage.structure.tail  # type: ignore[union-attr]
    if not tail:
        return ()
    if len(tail) > 1:
        return None
    m = tail[0]
    if all_parameters(m) or all_buffers(m) or m._forward_hooks or m._forward_pre_hooks:
        return None
    d, ps = module_derivatives(m, y)
    if not isinstance(d, ElementwiseDerivatives) or ps:
        return None
    if type(m).__module__.startswith("torch.nn."):  # torch's own: its options in extra_repr
        return (type(m), m.extra_repr(), m.training)
    # a class of the user's (registered by them, or a subclass): its options may live
    # anywhere, so only the same instance shares phi' and phi''
    return (type(m), id(m))


def _stage_key(stage: Stage, z: Tensor, out: Tensor) -> tuple | None:
    """The run key of a middle stage (input ``z``, output ``out``), ``None`` if it does not fit."""
    st = stage.structure
    if st is None or getattr(st, "loss", None) is not None or z.dim() != 2:
        return None
    layer = layer_derivatives(st.layer, stage.params, z)
    if not isinstance(layer, LinearDerivatives):
        return None
    w = stage.params[0]
    if w.dtype != z.dtype or w.device != z.device or out.shape != (z.shape[0], w.shape[0]):
        return None
    tail = _tail_key(stage, out)
    if tail is None:
        return None
    return (tuple(z.shape), tuple(w.shape), len(stage.params), w.dtype, w.device, tail)


def linear_runs(stages: list[Stage], zs: list[Tensor]) -> list[tuple[int, int]]:
    """The maximal runs ``[lo, hi)`` of middle stages that :func:`run_blocks` builds."""
    runs: list[tuple[int, int]] = []
    n = len(stages)
    keys = [None] + [_stage_key(stages[i], zs[i], zs[i + 1]) for i in range(1, n - 1)] + [None]
    lo = 1
    while lo < n - 1:
        if keys[lo] is None:
            lo += 1
            continue
        hi = lo + 1
        while hi < n - 1 and keys[hi] == keys[lo]:
            hi += 1
        if hi - lo >= MIN_RUN:
            runs.append((lo, hi))
        lo = hi
    return runs


def _tail_derivatives(stage: Stage, y: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(phi'(y), phi''(y))`` of the stage's tail on ``y`` (``(1, None)`` for no tail)."""
    tail = stage.structure.tail  # type: ignore[union-attr]
    if not tail:
        return torch.ones_like(y), None
    d, ps = module_derivatives(tail[0], y)
    assert isinstance(d, ElementwiseDerivatives) and not ps
    s = d.df(y, ps)
    d2 = None if d.hessian_is_zero else d.d2f(y, ps)
    return s.expand(y.shape), d2


def run_blocks(stages: list[Stage], zs: list[Tensor], cot: Tensor) -> list[StageBlocks]:
    """The :class:`StageBlocks` of a :func:`linear_runs` run (module doc), batched.

    Args:
        stages: The run's stages.
        zs: Their inputs ``z_{l-1}`` (``(N, a_in)`` each).
        cot: The cotangent of the last stage's output (``(N, a)``).
    """
    r = len(stages)
    z = torch.stack([t.detach() for t in zs])  # (R, N, a_in)
    w = torch.stack([st.params[0].detach() for st in stages])  # (R, a, a_in)
    bias = len(stages[0].params) == 2
    y = z @ w.mT  # (R, N, a)
    if bias:
        y = y + torch.stack([st.params[1].detach() for st in stages]).unsqueeze(1)
    n, a_in = z.shape[1], z.shape[2]
    a = w.shape[1]
    p = a * a_in + (a if bias else 0)
    rows = y.reshape(r * n, a)
    s, d2 = _tail_derivatives(stages[0], rows)
    s, d2 = s.reshape(r, n, a), None if d2 is None else d2.reshape(r, n, a)

    # the only sequential part: b_y = s * cot, cot_in = b_y W (per sample), stage by stage
    b_y = torch.empty_like(y)
    cot_in = torch.empty_like(z)
    c = cot.reshape(n, a)
    for i in reversed(range(r)):
        torch.mul(s[i], c, out=b_y[i])
        c = torch.matmul(b_y[i], w[i], out=cot_in[i])
    cots = torch.cat([cot_in[1:], cot.reshape(1, n, a)])  # cotangent of each stage's output
    tg = None if d2 is None else d2 * cots  # (R, N, a)

    jz = s.unsqueeze(-1) * w.unsqueeze(1)  # (R, N, a, a_in)
    if tg is None:
        tzz = z.new_zeros(r, n, a_in, a_in)
        wtg = None
    else:
        wtg = w.mT.unsqueeze(1) * tg.unsqueeze(2)  # (R, N, j, q): W[q, j] Tg[n, q]
        tzz = wtg @ w.unsqueeze(1)  # W^T diag(Tg_n) W
    grad = (b_y.mT @ z).reshape(r, a * a_in)
    if bias:
        grad = torch.cat([grad, b_y.sum(1)], dim=1)
    tzx_max = _tzx_absmax(z, wtg, b_y, bias)
    txx_max = None if tg is None else _gram_absmax(z, tg, bias)

    # per-stage views by one unbind each (indexing stage by stage costs ~1 us per view)
    zv, wv, byv, sv = z.unbind(0), w.unbind(0), b_y.unbind(0), s.unbind(0)
    tgv = [None] * r if tg is None else tg.unbind(0)
    wtgv = [None] * r if wtg is None else wtg.unbind(0)
    maxv = tzx_max.unbind(0)
    txxv = [None] * r if txx_max is None else txx_max.unbind(0)
    jzv, tzzv, gradv, cotv = jz.unbind(0), tzz.unbind(0), grad.unbind(0), cot_in.unbind(0)
    zero = z.new_zeros(())
    out = []
    for i in range(r):
        zi, si, tgi = zv[i], sv[i], tgv[i]
        kron = KronX(zi, a, bias, wv[i], byv[i], tgi, si)
        if tgi is None:  # Txx = 0 (a p x p block of zeros, formed only if read)
            txx = LazyBlock(partial(zi.new_zeros, p, p), partial(_same, zero), (p, p))
        else:
            txx = kron.txx_lazy(tgi, txxv[i])
        blocks = StageBlocks(
            jzv[i],
            LazyBlock(partial(_jac_x, zi, a, p, bias, si), None, (n, a, p)),
            tzzv[i],
            LazyBlock(
                partial(_tzx, zi, wtgv[i], byv[i], p, bias), partial(_same, maxv[i]), (n, a_in, p)
            ),
            txx,
            gradv[i],
            cotv[i].reshape(zs[i].shape),
            LazyBlock(partial(_jac_x, zi, a, p, bias, None), None, (n, a, p)),  # Jf_x
            kron,
            tzz_zero=tgi is None,
            tzx_zero=False,
            txx_zero=tgi is None,
        )
        out.append(blocks)
    return out


def _same(t: Tensor) -> Tensor:
    return t


def _jac_x(z: Tensor, a: int, p: int, bias: bool, rows: Tensor | None) -> Tensor:
    """The dense ``diag(rows) Jf_x`` of one stage (``Jx``; ``Jf_x`` itself for ``rows=None``)."""
    return write_jac_x(z.new_zeros(z.shape[0], a, p), z, bias, rows=rows)


def _tzx(z: Tensor, wtg: Tensor | None, b_y: Tensor, p: int, bias: bool) -> Tensor:
    """The dense ``Tzx_n = W^T diag(Tg_n) (I_a (x) t_n^T) + [b_y,n (x) I, 0]`` of one stage.

    ``wtg[n, j, q] = W[q, j] Tg_n[q]`` (``None`` for ``Tg = 0``).
    """
    n, a_in = z.shape
    a = b_y.shape[1]
    out = z.new_zeros(n, a_in, p)
    if wtg is not None:  # (W[q, j] Tg[n, q]) t_n[i]
        torch.mul(
            wtg.unsqueeze(-1),
            z[:, None, None, :],
            out=out[..., : a * a_in].unflatten(-1, (a, a_in)),
        )
        if bias:
            out[..., a * a_in :] = wtg
    return add_hess_zx(out, b_y)  # + b_y,n[q] delta_ij


def _tzx_absmax(z: Tensor, wtg: Tensor | None, b_y: Tensor, bias: bool) -> Tensor:
    """``max |Tzx_l|`` per stage of a run (``(R,)``), the value :func:`_tzx` would give, exactly.

    The entries are ``wtg[n, j, q] z[n, i] + delta_ij b_y[n, q]`` (weight
    columns) and ``wtg[n, j, q]`` (bias columns). Off the diagonal ``i != j``
    the largest is ``|wtg[n, j, q]| max_{i != j} |z[n, i]|`` (rounding is
    monotone: the same floating-point number as the largest rounded
    product); on it, the rounded sum itself. ``O(R N a a_in)``, where the
    dense block has ``R N a_in p`` entries.
    """
    r, n, a_in = z.shape
    if wtg is None:  # b_y on the diagonal, zeros elsewhere
        return b_y.abs().reshape(r, -1).amax(dim=1)
    zj = z.unsqueeze(-1)  # (R, N, j, 1)
    parts = [(wtg * zj + b_y.unsqueeze(2)).abs()]  # i = j: (R, N, j, q)
    awtg = wtg.abs()
    if a_in > 1:  # i != j: the largest |z[n, i]| other than at i = j
        top, idx = z.abs().topk(2, dim=2)  # (R, N, 2)
        at_top = torch.arange(a_in, device=z.device) == idx[..., :1]  # (R, N, j)
        other = torch.where(at_top, top[..., 1:], top[..., :1])
        parts.append(awtg * other.unsqueeze(-1))
    if bias:
        parts.append(awtg)
    return torch.stack([t.reshape(r, -1).amax(dim=1) for t in parts]).amax(dim=0)


def _gram_absmax(z: Tensor, tg: Tensor, bias: bool) -> Tensor:
    """``max |Txx_l|`` per stage of a run (``(R,)``): of its blocks ``sum_n Tg_n[q] t_n t_n^T``.

    Those are ``Txx``'s only nonzero entries (:meth:`KronX.txx`), here for the
    whole run in one product ``Tg^T [t_n t_n^T]_n`` (``(R, a, c^2)``), the
    largest magnitude as ``max(max, -min)`` (no ``|.|`` copy).
    """
    t = torch.cat([z, z.new_ones(*z.shape[:2], 1)], dim=2) if bias else z  # (R, N, c)
    r, n, c = t.shape
    outer = (t.unsqueeze(-1) * t.unsqueeze(-2)).reshape(r, n, c * c)
    blk = torch.bmm(tg.mT, outer)  # (R, a, c^2)
    return torch.maximum(blk.amax(dim=(1, 2)), -blk.amin(dim=(1, 2)))
