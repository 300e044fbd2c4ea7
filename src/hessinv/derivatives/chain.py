"""A model stage's blocks by the chain rule over its modules' derivative classes.

A stage of the ``nn.Sequential`` adapter is ``out = tail(layer(z; x))``: one
parametrised layer, then parameter-free modules (and the loss, for the last
stage). Each module's derivatives come from its registered class
(:mod:`hessinv.derivatives.registry`) when that class covers the module's
options, else from autodiff. With ``y = layer(z; x)``, the tail's Jacobian
``Jg``, its curvature ``Tg = d2 (b.tail) / dy dy`` and ``b_y = Jg^T b``::

    Jz  = Jg Jf_z                 Jx  = Jg Jf_x
    Tzz = Jf_z^T Tg Jf_z + Tf_zz[b_y]
    Tzx = Jf_z^T Tg Jf_x + Tf_zx[b_y]
    Txx = sum_n Jf_x^T Tg Jf_x + Tf_xx[b_y]

The tail is composed backwards module by module (``Tg`` accumulates
``J_k^T T J_k + T_k[b_k]``), keeping diagonal Jacobians and curvatures
diagonal and zero curvatures absent, so an elementwise tail costs ``O(N a)``
and its curvature enters as a row scaling.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..module_params import all_parameters
from .autodiff import AutodiffDerivatives, GenericDerivatives
from .blocks import KronX, StageBlocks
from .linear import LinearDerivatives
from .registry import ModuleDerivatives, derivatives_class

if TYPE_CHECKING:
    from ..pipeline import Stage

#: A Jacobian or curvature: ``(N, a)`` for a diagonal one, ``(N, r, c)`` dense.
Op = Tensor


def _bt(a: Tensor) -> Tensor:
    return a.transpose(-1, -2)


def _dense(t: Op) -> Tensor:
    return torch.diag_embed(t) if t.dim() == 2 else t


def _apply(j: Op, a: Tensor) -> Tensor:
    """``J @ a`` for ``a`` of shape ``(N, c, p)``."""
    return j.unsqueeze(-1) * a if j.dim() == 2 else j @ a


def _sandwich(j: Op, t: Op | None) -> Op | None:
    """``J^T T J`` (``None`` for a zero ``T``)."""
    if t is None:
        return None
    if j.dim() == 2:
        if t.dim() == 2:
            return j * t * j
        return j.unsqueeze(2) * t * j.unsqueeze(1)
    return _bt(j) @ _apply(t, j)


def _add(a: Op | None, b: Op | None) -> Op | None:
    if a is None:
        return b
    if b is None:
        return a
    if a.dim() == 2 and b.dim() == 2:
        return a + b
    return _dense(a) + _dense(b)


def module_derivatives(m: nn.Module, z: Tensor) -> tuple[ModuleDerivatives, tuple[Tensor, ...]]:
    """The derivatives object of a parameter-free (or frozen) tail module at input ``z``.

    Returns:
        The registered class's instance when it covers ``m`` and ``z``, else
        :class:`GenericDerivatives`; and the module's parameters (constants).
    """
    from ..layers import FrozenModule  # noqa: PLC0415 - layers imports this package

    inner = m.inner if isinstance(m, FrozenModule) else m
    cls = derivatives_class(inner)
    if cls is not None and cls.covers(inner, z):
        return cls(inner), tuple(p.detach() for _, p in all_parameters(inner))
    return GenericDerivatives(m), ()


def layer_derivatives(
    m: nn.Module, params: tuple[Tensor, ...], z: Tensor
) -> ModuleDerivatives | None:
    """The closed form of a stage's layer, or ``None`` (autodiff) when none covers it.

    A closed form needs every parameter of the module among ``params``.
    """
    cls = derivatives_class(m)
    if cls is None or len(params) != len(all_parameters(m)) or not cls.covers(m, z):
        return None
    return cls(m)


def _tail(st, y: Tensor, cot: Tensor | None):  # noqa: ANN001, ANN202
    """``(b_y, Tg, [J_1..J_K])`` of the stage's tail (and loss) at ``y``."""
    n = y.shape[0]
    steps = []
    cur = y
    with torch.no_grad():
        for m in st.tail:
            d, ps = module_derivatives(m, cur)
            steps.append((d, ps, cur))
            cur = m(cur)
    if st.loss is not None:
        loss_func, target = st.loss
        lb = AutodiffDerivatives(lambda o, _p: loss_func(o, target), ()).blocks(
            cur, None, first=False, last=True, txx=False
        )
        b, curv = lb.cot_in.reshape(n, -1), lb.Tzz
    else:
        b, curv = cot.reshape(n, -1), None
    jacs = []
    for d, ps, zin in reversed(steps):
        jac, t_k, b = d.tail_step(zin, ps, b)
        curv = _add(_sandwich(jac, curv), t_k)
        jacs.append(jac)
    jacs.reverse()
    return b, curv, jacs


def structured_blocks(
    stage: Stage, z: Tensor, cot: Tensor | None, *, first: bool, last: bool
) -> StageBlocks:
    """Blocks of a model stage ``tail(layer(z; x))`` by the chain rule (module doc)."""
    st = stage.structure
    params = stage.params
    n = z.shape[0]
    layer = layer_derivatives(st.layer, params, z)
    if layer is not None:
        y = layer.forward(z, params).detach()
    else:
        y = st.layer_fn(z, params).detach()
    b_y, tg, jacs = _tail(st, y, cot)

    if layer is not None:
        jfx = layer.jac_x(z, params)
        jfz = tf_zz = tf_zx = None
        if not first:
            jfz = layer.jac_z(z, params)
            tf_zz = layer.hess_zz(z, params, b_y)
            tf_zx = layer.hess_zx(z, params, b_y)
        tf_xx = layer.hess_xx(z, params, b_y)
    else:
        lb = AutodiffDerivatives(st.layer_fn, params).blocks(
            z, b_y.reshape(y.shape), first=first, last=False
        )
        jfz, jfx, tf_zz, tf_zx, tf_xx = lb.Jz, lb.Jx, lb.Tzz, lb.Tzx, lb.Txx

    p = jfx.shape[2]
    kron_x = None
    if isinstance(layer, LinearDerivatives):  # Jf_x = I (x) [z; 1]^T: the factors of KronX
        s = None  # the tail's Jacobian, when every module's is diagonal
        if all(j.dim() == 2 for j in jacs):
            s = y.new_ones(y.shape)
            for j in jacs:
                s = s * j
        kron_x = KronX(z.detach(), y.shape[1], len(params) == 2, params[0].detach(), b_y, tg, s)
    tg_jfx = None if tg is None else _apply(tg, jfx)  # (N, a_y, p)
    txx = None
    if tg_jfx is not None and kron_x is not None and tg.dim() == 2 and tf_xx is None:
        txx = kron_x.txx_lazy(tg)  # formed on first dense read (the solves read its factors)
    elif tg_jfx is not None and kron_x is not None:
        txx = kron_x.txx(tg)
    elif tg_jfx is not None:
        txx = jfx.reshape(-1, p).T @ tg_jfx.reshape(-1, p)  # sum_n Jf_x^T Tg Jf_x, one GEMM
    if tf_xx is not None:
        txx = tf_xx if txx is None else txx + tf_xx
    txx_zero = txx is None
    if txx is None:
        txx = jfx.new_zeros(p, p)
    tzz = tzx = None
    tzz_zero = tzx_zero = False
    if not first:
        tzz = _add(_sandwich(jfz, tg), tf_zz)
        tzz_zero = tzz is None
        tzz = jfz.new_zeros(n, jfz.shape[2], jfz.shape[2]) if tzz is None else _dense(tzz)
        tzx = tf_zx
        if tg_jfx is not None:
            via_tail = _bt(jfz) @ tg_jfx
            tzx = via_tail if tzx is None else via_tail + tzx
        tzx_zero = tzx is None
        if tzx is None:
            tzx = jfz.new_zeros(n, jfz.shape[2], p)
    grad_x = b_y.reshape(1, -1) @ jfx.reshape(-1, p)
    grad_x = grad_x.reshape(p)
    cot_in = None  # b_0 (the gradient with respect to the data) is never needed
    if jfz is not None:
        cot_in = (_bt(jfz) @ b_y.unsqueeze(-1)).squeeze(-1).reshape(z.shape)
    jz = jx = None
    if not last:
        jx, jz = jfx, jfz
        for jac in jacs:
            jx = _apply(jac, jx)
            jz = None if jz is None else _apply(jac, jz)
    # A layer linear in x: Jx = Jg Jf_x, Txx = Jf_x^T Tg Jf_x, so the rows of Jf_x (with
    # Tzx) span every parameter direction the stage's blocks see.
    x_span = jfx if layer is not None and layer.params_linear else None
    return StageBlocks(
        jz, jx, tzz, tzx, txx, grad_x, cot_in, x_span, kron_x,
        tzz_zero=tzz_zero, tzx_zero=tzx_zero, txx_zero=txx_zero,
    )  # fmt: skip


def stage_blocks(
    stage: Stage, z: Tensor, cot: Tensor | None, *, first: bool, last: bool, generic: bool = False
) -> StageBlocks:
    """The blocks of ``stage`` at input ``z`` and cotangent ``cot`` (``None`` if last).

    Uses the per-module chain rule (:func:`structured_blocks`) when the stage
    came from a model and ``generic`` is false, else :class:`AutodiffDerivatives`.
    """
    if stage.structure is not None and not generic:
        return structured_blocks(stage, z, cot, first=first, last=last)
    return AutodiffDerivatives(stage.fn, stage.params).blocks(z, cot, first=first, last=last)
