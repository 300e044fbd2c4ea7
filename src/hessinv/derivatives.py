"""Per-stage derivative blocks (DESIGN.md section 1; the paper's section 5).

For stage ``f_l`` with input ``z = z_{l-1}`` (``N`` samples of ``a_in``
coordinates), parameters ``x = x_l`` (``p`` scalars) and backpropagated
cotangent ``b = b_l = dz_L/dz_l`` (``N`` samples of ``a_out``), the blocks are

============  =====================  ==========================================
block         shape                  meaning (paper's name)
============  =====================  ==========================================
``Jz``        ``(N, a_out, a_in)``   ``d f / d z`` per sample (``grad_z f``, in ``M``)
``Jx``        ``(N, a_out, p)``      ``d f / d x`` per sample (``D_x``)
``Tzz``       ``(N, a_in, a_in)``    ``d2 (b.f) / dz dz`` per sample (``D_M D_zz``)
``Tzx``       ``(N, a_in, p)``       ``d2 (b.f) / dz dx`` per sample (``D_D D_zx``)
``Txx``       ``(p, p)``             ``d2 (b.f) / dx dx`` summed (``D_D D_xx``)
============  =====================  ==========================================

Samples never mix, so every per-sample block is stored as ``N`` small
matrices, never as an ``(N a) x (N a)`` block diagonal.

Two ways to compute them, tested equal:

* :class:`AutodiffDerivatives`, for any stage: ``torch.func`` on the whole
  batch with *comb* tangents (the same direction ``e_j`` in every sample), so
  that one Jacobian- or Hessian-vector product returns column ``j`` of all
  ``N`` per-sample blocks at once (exact when samples do not mix).
* Structured classes for the layers of a model: :class:`LinearDerivatives`
  and :class:`ConvDerivatives` (output linear in the parameters, so
  ``Txx = 0`` and ``Tzz = 0``; ``Jx`` is a Kronecker product),
  :class:`ElementwiseDerivatives` (diagonal ``Jz`` and ``Tzz``), composed by
  the chain rule in :func:`structured_blocks`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torch.func import grad, jacrev, vjp, vmap

from .layers import StageStructure
from .pipeline import Stage, flatten_params, unflatten_params


@dataclass
class StageBlocks:
    """Derivative blocks of one stage at the current point (see module doc).

    ``Jz``, ``Tzz`` and ``Tzx`` are ``None`` for the first stage (its input is
    data, ``u_0 = 0``); ``Jz`` and ``Jx`` are ``None`` for the last stage
    (``lambda_L = 0``); ``Txx`` is ``None`` when the stage's output is linear
    in its parameters. ``x_span`` (``(N, r, p)`` or ``None``), when given,
    promises that the rows of ``x_span`` and ``Tzx`` span every row of ``Jx``,
    ``Tzx`` and ``Txx``: then the parameter directions orthogonal to them are
    null directions of ``H`` that the lifted system can drop (a layer whose
    output is linear in its parameters, ``x_span = d layer / dx``).
    """

    Jz: Tensor | None
    Jx: Tensor | None
    Tzz: Tensor | None
    Tzx: Tensor | None
    Txx: Tensor | None
    grad_x: Tensor
    cot_in: Tensor | None
    x_span: Tensor | None = None

    @property
    def num_params(self) -> int:
        """Number of parameters ``p`` of the stage."""
        return self.grad_x.numel()


def _comb(eye: Tensor, n: int) -> Tensor:
    """Directions ``e_j`` repeated over ``n`` samples: shape ``(a, n, a)``."""
    return eye.unsqueeze(1).expand(eye.shape[0], n, eye.shape[1])


def comb_jacobian(fn, z: Tensor, a_out: int) -> Tensor:  # noqa: ANN001
    """Per-sample Jacobians of a sample-wise map ``fn: (N, a_in) -> (N, a_out)``.

    ``a_out`` vector-Jacobian products with *comb* cotangents (``e_o`` in every
    sample): product ``o`` returns row ``o`` of all ``N`` per-sample Jacobians
    at once. Reverse mode is used throughout: torch's forward-over-reverse is
    missing for some ops (``mse_loss`` raises "ZeroTensors are immutable").

    Returns:
        ``(N, a_out, a_in)``.
    """
    n = z.shape[0]
    _, pull = vjp(fn, z)
    eye = torch.eye(a_out, dtype=z.dtype, device=z.device)
    rows = vmap(lambda c: pull(c)[0])(_comb(eye, n))  # (a_out, N, a_in)
    return rows.transpose(0, 1)


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


class ElementwiseDerivatives:
    """A coordinate-wise map ``y -> phi(y)``: ``Jz = diag(phi')``, ``Tzz = diag(b phi'')``.

    ``phi' = grad(sum phi)`` and ``phi'' = grad(sum phi')``, exact because the
    Jacobian is diagonal; closed forms for a lone Tanh, Sigmoid, ReLU or
    LeakyReLU (tested equal). Cost ``O(N a)``.
    """

    def __init__(self, fn, modules: list[nn.Module] | None = None) -> None:  # noqa: ANN001
        self.fn = fn
        self.modules = modules

    def _closed_form(self, y: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(phi', phi'')`` in closed form for a lone Tanh, Sigmoid, ReLU or LeakyReLU.

        (Identity, Dropout in eval mode and per-sample Flatten are skipped.)
        """
        if self.modules is None:
            return None
        acts = [
            m
            for m in self.modules
            if not isinstance(m, (nn.Identity, nn.Flatten, nn.modules.dropout._DropoutNd))
        ]
        if not acts:
            return torch.ones_like(y), torch.zeros_like(y)
        if len(acts) != 1:
            return None
        m = acts[0]
        if isinstance(m, nn.Tanh):
            t = torch.tanh(y)
            d1 = 1.0 - t * t
            return d1, -2.0 * t * d1
        if isinstance(m, nn.Sigmoid):
            sg = torch.sigmoid(y)
            d1 = sg * (1.0 - sg)
            return d1, d1 * (1.0 - 2.0 * sg)
        if type(m) is nn.ReLU:
            return (y > 0).to(y.dtype), torch.zeros_like(y)
        if isinstance(m, nn.LeakyReLU):
            slope = torch.full_like(y, m.negative_slope)
            return torch.where(y > 0, torch.ones_like(y), slope), torch.zeros_like(y)
        return None

    def diag(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(phi'(y), phi''(y))`` flattened per sample, shape ``(N, a)``."""
        n = y.shape[0]
        closed = self._closed_form(y)
        if closed is not None:
            return closed[0].reshape(n, -1), closed[1].reshape(n, -1)

        def d1(yy: Tensor) -> Tensor:
            return grad(lambda q: self.fn(q).sum())(yy)

        first = d1(y)
        second = grad(lambda q: d1(q).sum())(y)
        return first.reshape(n, -1), second.reshape(n, -1)


class LinearDerivatives:
    """``y = W z + c`` (``nn.Linear``), per sample.

    ``Jz = W``; ``Jx = [z^T (x) I, I]`` (Kronecker, weight flattened row-major);
    ``Tzz = 0``, ``Txx = 0`` (linear in ``x`` and in ``z``); the only second
    derivative is bilinear: ``d2 (b.y) / dz_i dW_oj = b_o delta_ij``.
    """

    def __init__(self, module: nn.Linear) -> None:
        self.module = module

    def forward(self, z: Tensor, params: tuple[Tensor, ...]) -> Tensor:
        """The layer's output."""
        return F.linear(z, params[0], params[1] if len(params) > 1 else None)

    def jac_z(self, z: Tensor, params: tuple[Tensor, ...]) -> Tensor:
        """``(N, a_out, a_in)``."""
        w = params[0]
        return w.unsqueeze(0).expand(z.shape[0], *w.shape)

    def jac_x(self, z: Tensor, params: tuple[Tensor, ...]) -> Tensor:
        """``(N, a_out, p)``: ``[z^T (x) I | I]``."""
        n, a_in = z.shape
        a_out = params[0].shape[0]
        eye = torch.eye(a_out, dtype=z.dtype, device=z.device)
        jw = torch.einsum("oq,ni->noqi", eye, z).reshape(n, a_out, a_out * a_in)
        if len(params) == 1:
            return jw
        return torch.cat([jw, eye.expand(n, a_out, a_out)], dim=2)

    def hess_zx(self, z: Tensor, params: tuple[Tensor, ...], b: Tensor) -> Tensor:
        """``(N, a_in, p)``: ``d2 (b.y) / dz dx``."""
        n, a_in = z.shape
        a_out = params[0].shape[0]
        eye = torch.eye(a_in, dtype=z.dtype, device=z.device)
        tw = torch.einsum("no,ij->nioj", b, eye).reshape(n, a_in, a_out * a_in)
        if len(params) == 1:
            return tw
        return torch.cat([tw, z.new_zeros(n, a_in, a_out)], dim=2)


class ConvDerivatives:
    """``nn.Conv1d`` / ``nn.Conv2d`` (zero padding, one group), per sample.

    With the unfold (im2col) matrix ``U`` (``K P x a_in``, ``K = C_in k_h k_w``
    taps, ``P`` output positions), ``y[o, q] = sum_k W[o, k] (U z)[k, q] + c[o]``.
    So ``Jz[(o,q), i] = sum_k W[o,k] U[k,q,i]``, ``Jx`` is ``I (x) (U z)^T`` for the
    weight and ``I (x) 1`` for the bias, ``Tzz = Txx = 0``, and
    ``Tzx[i, (o,k)] = sum_q b[o,q] U[k,q,i]``.
    """

    def __init__(self, module: nn.Conv1d | nn.Conv2d, in_shape: tuple[int, ...]) -> None:
        self.module = module
        self.in_shape = in_shape
        m = module
        if isinstance(m, nn.Conv1d):
            self.kernel = (1, m.kernel_size[0])
            self.stride = (1, m.stride[0])
            self.padding = (0, m.padding[0])
            self.dilation = (1, m.dilation[0])
        else:
            self.kernel, self.stride = tuple(m.kernel_size), tuple(m.stride)
            self.padding, self.dilation = tuple(m.padding), tuple(m.dilation)

    @staticmethod
    def applies(m: nn.Module) -> bool:
        """True if the fast path covers this module's options."""
        return (
            isinstance(m, (nn.Conv1d, nn.Conv2d))
            and m.groups == 1
            and m.padding_mode == "zeros"
            and not isinstance(m.padding, str)
            and all(p.requires_grad for p in m.parameters())
        )

    def _as_2d(self, z: Tensor) -> Tensor:
        return z.unsqueeze(2) if isinstance(self.module, nn.Conv1d) else z

    def unfold(self, z: Tensor) -> Tensor:
        """im2col of a batch: ``(N, K, P)``."""
        return F.unfold(self._as_2d(z), self.kernel, self.dilation, self.padding, self.stride)

    def unfold_matrix(self, like: Tensor) -> Tensor:
        """``U`` as ``(K, P, a_in)``."""
        a_in = 1
        for s in self.in_shape:
            a_in *= s
        eye = torch.eye(a_in, dtype=like.dtype, device=like.device).reshape(a_in, *self.in_shape)
        return self.unfold(eye).permute(1, 2, 0)

    def forward(self, z: Tensor, params: tuple[Tensor, ...]) -> Tensor:
        """The layer's output."""
        return self.module._conv_forward(z, params[0], params[1] if len(params) > 1 else None)

    def jac_z(self, z: Tensor, params: tuple[Tensor, ...], u: Tensor) -> Tensor:
        """``(N, a_out, a_in)``."""
        w = params[0].reshape(params[0].shape[0], -1)
        jz = torch.einsum("ok,kqi->oqi", w, u)
        jz = jz.reshape(-1, jz.shape[-1])
        return jz.unsqueeze(0).expand(z.shape[0], *jz.shape)

    def jac_x(self, z: Tensor, params: tuple[Tensor, ...]) -> Tensor:
        """``(N, a_out, p)``."""
        cols = self.unfold(z)  # (N, K, P)
        n, k, q = cols.shape
        c_out = params[0].shape[0]
        eye = torch.eye(c_out, dtype=z.dtype, device=z.device)
        jw = torch.einsum("or,nkq->noqrk", eye, cols).reshape(n, c_out * q, c_out * k)
        if len(params) == 1:
            return jw
        jb = eye.unsqueeze(1).expand(c_out, q, c_out).reshape(1, c_out * q, c_out)
        return torch.cat([jw, jb.expand(n, -1, -1)], dim=2)

    def hess_zx(self, z: Tensor, params: tuple[Tensor, ...], b: Tensor, u: Tensor) -> Tensor:
        """``(N, a_in, p)``."""
        n = z.shape[0]
        c_out = params[0].shape[0]
        bq = b.reshape(n, c_out, -1)
        tw = torch.einsum("noq,kqi->niok", bq, u).reshape(n, u.shape[-1], -1)
        if len(params) == 1:
            return tw
        return torch.cat([tw, z.new_zeros(n, u.shape[-1], c_out)], dim=2)


def _bt(a: Tensor) -> Tensor:
    return a.transpose(-1, -2)


def structured_blocks(
    stage: Stage, z: Tensor, cot: Tensor | None, *, first: bool, last: bool
) -> StageBlocks:
    """Blocks of a model stage ``tail(layer(z; x))`` by the chain rule.

    With ``y = layer(z; x)``, ``out = tail(y)``, tail Jacobian ``Jg`` and tail
    curvature ``Tg = d2 (b.tail)/dy dy``, and ``b_y = Jg^T b``::

        Jz  = Jg Jf_z                 Jx  = Jg Jf_x
        Tzz = Jf_z^T Tg Jf_z + Tf_zz[b_y]
        Tzx = Jf_z^T Tg Jf_x + Tf_zx[b_y]
        Txx = sum_n Jf_x^T Tg Jf_x + Tf_xx[b_y]

    The layer's own ``Tf`` blocks come from :class:`LinearDerivatives` or
    :class:`ConvDerivatives` (``Tf_zz = Tf_xx = 0``), else from autodiff.
    """
    st: StageStructure = stage.structure  # type: ignore[assignment]
    params = stage.params
    n = z.shape[0]
    m = st.layer
    if isinstance(m, nn.Linear) and z.dim() == 2 and all(p.requires_grad for p in m.parameters()):
        lin = LinearDerivatives(m)
        y = lin.forward(z, params)
        jfz = (lambda: lin.jac_z(z, params)) if not first else None
        jfx = lin.jac_x(z, params)
        tf_zx = lambda by: lin.hess_zx(z, params, by)  # noqa: E731
        layer_auto = None
    elif ConvDerivatives.applies(m) and z.dim() == (3 if isinstance(m, nn.Conv1d) else 4):
        conv = ConvDerivatives(m, tuple(z.shape[1:]))
        y = conv.forward(z, params)
        u = conv.unfold_matrix(z) if not first else None
        jfz = (lambda: conv.jac_z(z, params, u)) if not first else None
        jfx = conv.jac_x(z, params)
        tf_zx = lambda by: conv.hess_zx(z, params, by, u)  # noqa: E731
        layer_auto = None
    else:
        layer_auto = AutodiffDerivatives(st.layer_fn, params)
        y = st.layer_fn(z, params).detach()
        jfz = jfx = tf_zx = None

    # Tail: Jacobian Jg (or diagonal), curvature Tg, and b_y.
    yf_shape = (n, y[0].numel())
    if last:
        tail = AutodiffDerivatives(lambda yy, _p: st.tail_fn(yy), ())
        tb = tail.blocks(y, None, first=False, last=True, txx=False)
        b_y = tb.cot_in.reshape(yf_shape)
        tg = tb.Tzz
        jg_apply = None
    elif st.elementwise_tail:
        d1, d2 = ElementwiseDerivatives(st.tail_fn, st.tail).diag(y)
        cotf = cot.reshape(n, -1)
        b_y = d1 * cotf
        tg = torch.diag_embed(cotf * d2)

        def jg_apply(a: Tensor) -> Tensor:
            return d1.unsqueeze(-1) * a
    else:
        tail = AutodiffDerivatives(lambda yy, _p: st.tail_fn(yy), ())
        tb = tail.blocks(y, cot, first=False, last=False, txx=False)
        b_y = tb.cot_in.reshape(yf_shape)
        tg = tb.Tzz
        jg = tb.Jz

        def jg_apply(a: Tensor) -> Tensor:
            return jg @ a

    if layer_auto is not None:
        lb = layer_auto.blocks(z, b_y.reshape(y.shape), first=first, last=False)
        jfz_t, jfx_t = lb.Jz, lb.Jx
        tf_zz, tf_zx_t, tf_xx = lb.Tzz, lb.Tzx, lb.Txx
    else:
        jfz_t = jfz() if jfz is not None else None
        jfx_t = jfx
        tf_zz, tf_xx = None, None
        tf_zx_t = tf_zx(b_y) if not first else None

    tg_jfx = tg @ jfx_t  # (N, a_y, p)
    txx = torch.einsum("nap,naq->pq", jfx_t, tg_jfx)
    if tf_xx is not None:
        txx = txx + tf_xx
    tzz = tzx = None
    if not first:
        tzz = _bt(jfz_t) @ tg @ jfz_t
        if tf_zz is not None:
            tzz = tzz + tf_zz
        tzx = _bt(jfz_t) @ tg_jfx + tf_zx_t
    grad_x = torch.einsum("nap,na->p", jfx_t, b_y)
    cot_in = None  # b_0 (the gradient with respect to the data) is never needed
    if jfz_t is not None:
        cot_in = (_bt(jfz_t) @ b_y.unsqueeze(-1)).squeeze(-1).reshape(z.shape)
    jz = jx = None
    if not last:
        jx = jg_apply(jfx_t)
        if not first:
            jz = jg_apply(jfz_t)
    # Linear/Conv: Jx = Jg Jf_x, Txx = Jf_x^T Tg Jf_x, so the rows of Jf_x (with Tzx)
    # span every parameter direction the stage's blocks see.
    x_span = jfx_t if layer_auto is None else None
    return StageBlocks(jz, jx, tzz, tzx, txx, grad_x, cot_in, x_span)


def stage_blocks(
    stage: Stage, z: Tensor, cot: Tensor | None, *, first: bool, last: bool, generic: bool = False
) -> StageBlocks:
    """The blocks of ``stage`` at input ``z`` and cotangent ``cot`` (``None`` if last).

    Uses the structured path when the stage came from a model and ``generic``
    is false, else :class:`AutodiffDerivatives`.
    """
    if stage.structure is not None and not generic:
        return structured_blocks(stage, z, cot, first=first, last=last)
    return AutodiffDerivatives(stage.fn, stage.params).blocks(z, cot, first=first, last=last)
