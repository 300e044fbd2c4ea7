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

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..module_params import all_parameters
from .blocks import KronX, StageBlocks
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
    if all_parameters(m) or list(m.buffers()) or m._forward_hooks or m._forward_pre_hooks:
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
    # the dense Jf_x, Jx and Tzx: zeros, then their structured entries written in place
    # (a broadcast product with an identity writes every entry twice, and pages in more)
    blk = z.new_zeros(3 if a_in == a else 2, r, n, a, p)  # Jf_x, Jx and (a_in == a) Tzx
    jfx = write_jac_x(blk[0], z, bias)
    jx = write_jac_x(blk[1], z, bias, rows=s)  # diag(s) Jf_x
    tzx = blk[2] if a_in == a else z.new_zeros(r, n, a_in, p)
    tw = tzx[..., : a * a_in].unflatten(-1, (a, a_in))  # (R, N, j, q, i)
    if tg is not None:  # W^T diag(Tg_n) (I (x) t_n^T): (W[q, j] Tg[n, q]) t_n[i]
        wtg = w.mT.unsqueeze(1) * tg.unsqueeze(2)  # (R, N, j, q)
        torch.mul(wtg.unsqueeze(-1), z[:, :, None, None, :], out=tw)
        if bias:
            tzx[..., a * a_in :] = wtg
    add_hess_zx(tzx, b_y)  # + b_y,n[q] delta_ij
    if tg is None:
        tzz = z.new_zeros(r, n, a_in, a_in)
    else:
        tzz = (w.mT.unsqueeze(1) * tg.unsqueeze(2)) @ w.unsqueeze(1)  # W^T diag(Tg_n) W
    grad = (b_y.mT @ z).reshape(r, a * a_in)
    if bias:
        grad = torch.cat([grad, b_y.sum(1)], dim=1)

    out = []
    for i in range(r):
        kron = KronX(z[i], a, bias, w[i], b_y[i], None if tg is None else tg[i], s[i])
        txx = None if tg is None else kron.txx_lazy(tg[i])
        blocks = StageBlocks(
            jz[i], jx[i], tzz[i], tzx[i], txx if txx is not None else z.new_zeros(p, p),
            grad[i], cot_in[i].reshape(zs[i].shape), jfx[i], kron,
            tzz_zero=tg is None, tzx_zero=False, txx_zero=tg is None,
        )  # fmt: skip
        out.append(blocks)
    return out
