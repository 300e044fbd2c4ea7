"""Closed forms of pooling and per-sample reshapes (parameter-free, ``Tzz = 0``).

* Average pooling (``AvgPool``, ``AdaptiveAvgPool``, 1d/2d/3d) is linear in
  ``z``: its Jacobian is the module applied to the identity basis, the same
  for every sample.
* Max pooling is linear between ties: ``y[c, q] = z[c, idx[c, q]]`` with the
  indices torch's own backward uses (``return_indices``), so ``Jz`` is a
  selection matrix and ``Tzz = 0``.
* ``Flatten`` and ``Unflatten`` that keep the batch dimension leave the
  flattened per-sample coordinates as they are: ``Jz = I``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from .elementwise import IdentityDerivatives
from .registry import ModuleDerivatives, register

P = tuple[Tensor, ...]


def _dims(module: nn.Module) -> int:
    """The spatial dimensions of a torch pooling class (``MaxPool2d`` -> 2), subclasses too."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith("torch.nn") and cls.__name__[-2:-1].isdigit():
            return int(cls.__name__[-2])
    return -1


class LinearMapDerivatives(ModuleDerivatives):
    """A parameter-free module linear in ``z`` within each sample: ``Jz = m(I)``."""

    hessian_is_zero = True

    def forward(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        return self.module(z)

    def jac_z(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        in_shape = tuple(z.shape[1:])
        a_in = math.prod(in_shape)
        e = torch.eye(a_in, dtype=z.dtype, device=z.device).reshape(a_in, *in_shape)
        j = self.module(e).reshape(a_in, -1).T
        return j.unsqueeze(0).expand(z.shape[0], *j.shape)


class AvgPoolDerivatives(LinearMapDerivatives):
    """``AvgPool`` / ``AdaptiveAvgPool`` on a batched input ``(N, C, *spatial)``."""

    @classmethod
    def applies(cls, module: nn.Module, z: Tensor) -> bool:  # noqa: D102
        return z.dim() == _dims(module) + 2


_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


class MaxPoolDerivatives(ModuleDerivatives):
    """``MaxPool1d/2d/3d``: ``Jz`` selects the maximal entry of each window."""

    hessian_is_zero = True

    @classmethod
    def applies(cls, module: nn.Module, z: Tensor) -> bool:  # noqa: D102
        return z.dim() == _dims(module) + 2 and not module.return_indices

    def forward(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        return self.module(z)

    def jac_z(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        m = self.module
        d = z.dim() - 2
        _, idx = _MAXPOOL[d](
            z, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, return_indices=True
        )
        n, c = z.shape[:2]
        spatial = math.prod(z.shape[2:])
        offset = torch.arange(c, device=z.device).reshape(1, c, *([1] * d)) * spatial
        cols = (idx + offset).reshape(n, -1)  # (N, a_out): the input coordinate of each output
        jac = z.new_zeros(n, cols.shape[1], c * spatial)
        jac.scatter_(2, cols.unsqueeze(-1), 1.0)
        return jac


class ReshapeDerivatives(IdentityDerivatives):
    """``Flatten`` / ``Unflatten`` that keep the batch dimension: ``Jz = I``."""

    def forward(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        return self.module(z)

    @classmethod
    def applies(cls, module: nn.Module, z: Tensor) -> bool:  # noqa: D102
        dim = module.start_dim if isinstance(module, nn.Flatten) else module.dim
        return z.dim() >= 1 and dim % z.dim() >= 1


for _t in (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
):
    register(_t, AvgPoolDerivatives)
for _t in (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d):
    register(_t, MaxPoolDerivatives)
register(nn.Flatten, ReshapeDerivatives)
register(nn.Unflatten, ReshapeDerivatives)
