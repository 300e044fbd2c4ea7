r"""Closed forms of ``nn.LayerNorm`` (whole sample) and ``nn.BatchNorm`` in eval mode.

LayerNorm, per sample of ``D`` coordinates: ``c = z - mean(z)``,
``sigma = sqrt(|c|^2 / D + eps)``, ``h = c / sigma``, ``y = w * h + beta``.
With ``Pi = I - 1 1^T / D``, ``dh/dz = J = (Pi - h h^T / D) / sigma``
(symmetric), so ``Jz = diag(w) J``, ``Jx = [diag(h) | I]`` (linear in the
parameters: ``Txx = 0``), ``Tzx = [J diag(b) | 0]``, and with ``g = b * w``,
``a = h.g / D`` and ``r = Pi g - a h``::

    Tzz = -(r h^T + h r^T) / (D sigma^2) - a (Pi - h h^T / D) / sigma^2.

Torch's fused ``layer_norm`` has wrong mixed second derivatives
(pytorch#196700): :func:`layer_norm` is written with elementary operations, so
the generic path and the references are right too.

BatchNorm in eval mode (running statistics) is a per-channel affine map:
``y = w (z - mu) s + beta`` with ``s = 1 / sqrt(var + eps)``: diagonal ``Jz``,
``Tzz = 0``, ``Jx = [h | 1]`` per channel, ``Tzx = [s b | 0]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from .registry import ModuleDerivatives, flat, register

P = tuple[Tensor, ...]


def layer_norm(
    z: Tensor, shape: tuple[int, ...], weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """Layer normalisation from elementary operations (second derivatives right).

    ``y = (z - mean) / sqrt(var + eps) * weight + bias`` over the trailing
    ``shape`` dimensions, with the biased variance, as ``nn.LayerNorm``.
    """
    dims = tuple(range(-len(shape), 0))
    mean = z.mean(dim=dims, keepdim=True)
    centred = z - mean
    var = (centred * centred).mean(dim=dims, keepdim=True)
    y = centred / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def _named(module: nn.Module, params: P) -> dict[str, Tensor]:
    return dict(zip([n for n, _ in module.named_parameters()], params, strict=True))


@register(nn.LayerNorm)
class LayerNormDerivatives(ModuleDerivatives):
    """``nn.LayerNorm`` over the whole sample (``normalized_shape == z.shape[1:]``)."""

    params_linear = True

    @classmethod
    def applies(cls, module: nn.Module, z: Tensor) -> bool:  # noqa: D102
        return tuple(module.normalized_shape) == tuple(z.shape[1:])

    def forward(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        m = self.module
        p = _named(m, params)
        return layer_norm(z, tuple(m.normalized_shape), p.get("weight"), p.get("bias"), m.eps)

    def _parts(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``h (N, D)``, ``sigma (N, 1)``, ``J (N, D, D)``."""
        zf = flat(z)
        d = zf.shape[1]
        c = zf - zf.mean(dim=1, keepdim=True)
        sigma = torch.sqrt((c * c).mean(dim=1, keepdim=True) + self.module.eps)
        h = c / sigma
        eye = torch.eye(d, dtype=z.dtype, device=z.device)
        proj = eye - 1.0 / d
        j = (proj - h.unsqueeze(2) * h.unsqueeze(1) / d) / sigma.unsqueeze(2)
        return h, sigma, j

    def _w(self, z: Tensor, params: P) -> Tensor | None:
        w = _named(self.module, params).get("weight")
        return None if w is None else w.reshape(1, -1)

    def jac_z(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        _, _, j = self._parts(z)
        w = self._w(z, params)
        return j if w is None else w.unsqueeze(2) * j

    def hess_zz(self, z: Tensor, params: P, b: Tensor) -> Tensor:  # noqa: D102
        h, sigma, j = self._parts(z)
        d = h.shape[1]
        w = self._w(z, params)
        g = flat(b) if w is None else flat(b) * w
        a = (h * g).sum(dim=1, keepdim=True) / d  # (N, 1)
        r = g - g.mean(dim=1, keepdim=True) - a * h
        s2 = (sigma * sigma).unsqueeze(2)
        outer = r.unsqueeze(2) * h.unsqueeze(1)
        # a (Pi - h h^T / D) / sigma^2 = a J / sigma
        return -(outer + outer.transpose(1, 2)) / (d * s2) - a.unsqueeze(2) * j / sigma.unsqueeze(2)

    def jac_x(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        h, _, _ = self._parts(z)
        names = [n for n, _ in self.module.named_parameters()]
        cols = []
        for name in names:
            cols.append(torch.diag_embed(h) if name == "weight" else torch.diag_embed(h * 0 + 1))
        return torch.cat(cols, dim=2)

    def hess_zx(self, z: Tensor, params: P, b: Tensor) -> Tensor:  # noqa: D102
        _, _, j = self._parts(z)
        names = [n for n, _ in self.module.named_parameters()]
        cols = []
        for name in names:
            cols.append(j * flat(b).unsqueeze(1) if name == "weight" else torch.zeros_like(j))
        return torch.cat(cols, dim=2)


@register(nn.modules.batchnorm._BatchNorm)
class BatchNormDerivatives(ModuleDerivatives):
    """``nn.BatchNorm1d/2d/3d`` in eval mode with running statistics (see module doc)."""

    jacobian_is_diagonal = True
    hessian_is_zero = True
    params_linear = True

    @classmethod
    def applies(cls, module: nn.Module, z: Tensor) -> bool:  # noqa: D102
        return not module.training and module.running_mean is not None and z.dim() >= 2

    def _stats(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``mu``, ``s`` broadcastable to ``z``."""
        m = self.module
        shape = (1, -1) + (1,) * (z.dim() - 2)
        s = 1.0 / torch.sqrt(m.running_var.to(z.dtype) + m.eps)
        return m.running_mean.to(z.dtype).reshape(shape), s.reshape(shape)

    def forward(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        m = self.module
        p = _named(m, params)
        return F.batch_norm(
            z, m.running_mean, m.running_var, p.get("weight"), p.get("bias"), False, 0.0, m.eps
        )

    def df(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        _, s = self._stats(z)
        w = _named(self.module, params).get("weight")
        scale = s if w is None else s * w.reshape(s.shape)
        return scale.expand(z.shape)

    def _per_channel(self, z: Tensor, v: Tensor) -> Tensor:
        """``(N, a, C)``: ``v[n, (c, q)]`` placed in column ``c``."""
        n, c = z.shape[:2]
        onehot = torch.eye(c, dtype=z.dtype, device=z.device)
        onehot = onehot.reshape(1, c, *([1] * (z.dim() - 2)), c).expand(*z.shape, c)
        return (v.unsqueeze(-1) * onehot).reshape(n, -1, c)

    def jac_x(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        mu, s = self._stats(z)
        h = (z - mu) * s
        cols = []
        for name, _ in self.module.named_parameters():
            cols.append(self._per_channel(z, h if name == "weight" else torch.ones_like(z)))
        return torch.cat(cols, dim=2)

    def hess_zx(self, z: Tensor, params: P, b: Tensor) -> Tensor:  # noqa: D102
        _, s = self._stats(z)
        bz = b.reshape(z.shape)
        cols = []
        for name, _ in self.module.named_parameters():
            v = bz * s if name == "weight" else torch.zeros_like(z)
            cols.append(self._per_channel(z, v))
        return torch.cat(cols, dim=2)
