"""Closed forms of ``nn.Conv{1,2,3}d`` and ``nn.ConvTranspose{1,2,3}d`` (one group).

Both are bilinear in ``(z, W)``. With the *patch* map ``T`` (linear in ``z``,
``(N, R, P)``: ``R`` taps, ``P`` output positions), ``y[o, q] = sum_r
W'[o, r] T(z)[r, q] + c[o]``, where ``T`` is a convolution of ``z`` with the
identity kernel (``R = C_in K``, im2col for any dimension and padding) and
``W'`` is the weight as ``(C_out, R)``. So

* ``Jz`` is the (constant) matrix of the layer without bias, the layer
  applied to the identity basis;
* ``Jx[(o, q), (o', r)] = delta_oo' T(z)[r, q]`` for the weight, ``delta_oo'``
  for the bias; ``Tzz = Txx = 0``;
* ``Tzx[i, (o, r)] = sum_q b[o, q] U[r, q, i]`` with ``U = T(identity)``.

For the transposed convolution the weight is ``(C_in, C_out, k...)``, so its
flat index is ``(c, o, k)`` with ``r = (c, k)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from .registry import ModuleDerivatives, register

P = tuple[Tensor, ...]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _basis(in_shape: tuple[int, ...], like: Tensor) -> Tensor:
    a_in = math.prod(in_shape)
    return torch.eye(a_in, dtype=like.dtype, device=like.device).reshape(a_in, *in_shape)


class ConvDerivatives(ModuleDerivatives):
    """``nn.Conv1d/2d/3d`` with zero padding and one group (see module doc)."""

    param_names = ("weight", "bias")

    hessian_is_zero = True
    params_linear = True
    transposed = False

    @classmethod
    def applies(cls, module: nn.Module, z: Tensor) -> bool:  # noqa: D102
        return (
            module.groups == 1
            and module.padding_mode == "zeros"
            and z.dim() == len(module.kernel_size) + 2
        )

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self.d = len(module.kernel_size)
        self.taps = math.prod(module.kernel_size)

    def forward(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        return self._apply(z, params[0], params[1] if len(params) > 1 else None)

    def _apply(self, z: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        m = self.module
        return _CONV[self.d](z, w, bias, m.stride, m.padding, m.dilation, 1)

    def _identity_kernel(self, like: Tensor) -> Tensor:
        c_in = self.module.in_channels
        r = c_in * self.taps
        return torch.eye(r, dtype=like.dtype, device=like.device).reshape(
            r, c_in, *self.module.kernel_size
        )

    def patches(self, z: Tensor) -> Tensor:
        """``T(z)``: ``(N, R, P)``, rows ``r = (c, k)``."""
        return self._apply(z, self._identity_kernel(z), None).flatten(2)

    def jac_z(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        e = _basis(tuple(z.shape[1:]), z)
        j = self._apply(e, params[0], None).reshape(e.shape[0], -1).T
        return j.unsqueeze(0).expand(z.shape[0], *j.shape)

    def _weight_cols(self, t: Tensor, eye_o: Tensor) -> Tensor:
        """``Jx`` of the weight from ``T`` ``(N, R, P)``: ``(N, C_out P, p_w)``."""
        n, r, q = t.shape
        c_out = eye_o.shape[0]
        return torch.einsum("oO,nrq->noqOr", eye_o, t).reshape(n, c_out * q, c_out * r)

    def _weight_tzx(self, bq: Tensor, u: Tensor) -> Tensor:
        """``Tzx`` of the weight: ``b (N, C_out, P)``, ``U (R, P, a_in)``: ``(N, a_in, p_w)``."""
        n = bq.shape[0]
        return torch.einsum("noq,rqi->nior", bq, u).reshape(n, u.shape[-1], -1)

    def jac_x(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        t = self.patches(z)
        n, _, q = t.shape
        c_out = self.module.out_channels
        eye = torch.eye(c_out, dtype=z.dtype, device=z.device)
        jw = self._weight_cols(t, eye)
        if len(params) == 1:
            return jw
        jb = eye.unsqueeze(1).expand(c_out, q, c_out).reshape(1, c_out * q, c_out)
        return torch.cat([jw, jb.expand(n, -1, -1)], dim=2)

    def hess_zx(self, z: Tensor, params: P, b: Tensor) -> Tensor:  # noqa: D102
        n = z.shape[0]
        e = _basis(tuple(z.shape[1:]), z)
        u = self.patches(e).permute(1, 2, 0)  # (R, P, a_in)
        c_out = self.module.out_channels
        tw = self._weight_tzx(b.reshape(n, c_out, -1), u)
        if len(params) == 1:
            return tw
        return torch.cat([tw, z.new_zeros(n, u.shape[-1], c_out)], dim=2)


class ConvTransposeDerivatives(ConvDerivatives):
    """``nn.ConvTranspose1d/2d/3d`` with one group (see module doc)."""

    transposed = True

    def _apply(self, z: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        m = self.module
        return _CONV_T[self.d](z, w, bias, m.stride, m.padding, m.output_padding, 1, m.dilation)

    def forward(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        return self._apply(z, params[0], params[1] if len(params) > 1 else None)

    def _identity_kernel(self, like: Tensor) -> Tensor:
        c_in = self.module.in_channels
        r = c_in * self.taps
        eye = torch.eye(r, dtype=like.dtype, device=like.device)
        # E[c, (c', k'), k] = delta_cc' delta_kk'
        return (
            eye.reshape(c_in, self.taps, r)
            .permute(0, 2, 1)
            .reshape(c_in, r, *self.module.kernel_size)
        )

    def _weight_cols(self, t: Tensor, eye_o: Tensor) -> Tensor:
        n, r, q = t.shape
        c_out = eye_o.shape[0]
        c_in = r // self.taps
        t4 = t.reshape(n, c_in, self.taps, q)
        return torch.einsum("oO,nckq->noqcOk", eye_o, t4).reshape(n, c_out * q, c_out * r)

    def _weight_tzx(self, bq: Tensor, u: Tensor) -> Tensor:
        n = bq.shape[0]
        r, q, a_in = u.shape
        u4 = u.reshape(r // self.taps, self.taps, q, a_in)
        return torch.einsum("noq,ckqi->nicok", bq, u4).reshape(n, a_in, -1)


for _t in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register(_t, ConvDerivatives)
for _t in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register(_t, ConvTransposeDerivatives)
