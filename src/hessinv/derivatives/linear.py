"""Closed forms of ``nn.Linear`` and ``nn.Embedding`` (outputs linear in their parameters)."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from .registry import ModuleDerivatives, register

P = tuple[Tensor, ...]


@register(nn.Linear)
class LinearDerivatives(ModuleDerivatives):
    """``y = W z + c`` per sample, ``z`` of shape ``(N, a_in)``.

    ``Jz = W``; ``Jx = [z^T (x) I, I]`` (Kronecker, weight flattened row-major);
    ``Tzz = 0``, ``Txx = 0`` (linear in ``x`` and in ``z``); the only second
    derivative is bilinear: ``d2 (b.y) / dz_i dW_oj = b_o delta_ij``.
    """

    param_names = ("weight", "bias")

    hessian_is_zero = True
    params_linear = True

    @classmethod
    def applies(cls, module: nn.Module, z: Tensor) -> bool:  # noqa: D102
        return z.dim() == 2

    def forward(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        return F.linear(z, params[0], params[1] if len(params) > 1 else None)

    def jac_z(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        w = params[0]
        return w.unsqueeze(0).expand(z.shape[0], *w.shape)

    def jac_x(self, z: Tensor, params: P) -> Tensor:
        """``(N, a_out, p)``: ``[z^T (x) I | I]``."""
        n, a_in = z.shape
        a_out = params[0].shape[0]
        eye = torch.eye(a_out, dtype=z.dtype, device=z.device)
        jw = torch.einsum("oq,ni->noqi", eye, z).reshape(n, a_out, a_out * a_in)
        if len(params) == 1:
            return jw
        return torch.cat([jw, eye.expand(n, a_out, a_out)], dim=2)

    def hess_zx(self, z: Tensor, params: P, b: Tensor) -> Tensor:
        """``(N, a_in, p)``: ``d2 (b.y) / dz dx``."""
        n, a_in = z.shape
        a_out = params[0].shape[0]
        eye = torch.eye(a_in, dtype=z.dtype, device=z.device)
        tw = torch.einsum("no,ij->nioj", b.reshape(n, a_out), eye).reshape(n, a_in, a_out * a_in)
        if len(params) == 1:
            return tw
        return torch.cat([tw, z.new_zeros(n, a_in, a_out)], dim=2)


@register(nn.Embedding)
class EmbeddingDerivatives(ModuleDerivatives):
    """``y[t] = W[idx[t]]``: linear in the table ``W`` (``V x D``), integer input.

    ``Jx[(t, d), (v, d')] = [idx_t = v] delta_dd'``, a one-hot selection
    (zero for ``padding_idx``, whose row torch never differentiates);
    ``Txx = 0``. The input is data (integers), so the layer only starts the
    first stage: ``Jz``, ``Tzz``, ``Tzx`` are never needed.
    """

    hessian_is_zero = True
    params_linear = True

    @classmethod
    def applies(cls, module: nn.Module, z: Tensor) -> bool:  # noqa: D102
        return (
            not z.is_floating_point()
            and module.max_norm is None
            and not module.scale_grad_by_freq
            and not module.sparse
        )

    def forward(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        return F.embedding(z, params[0], self.module.padding_idx)

    def jac_x(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        w = params[0]
        v, d = w.shape
        n = z.shape[0]
        idx = z.reshape(n, -1)
        onehot = F.one_hot(idx, v).to(w.dtype)  # (N, T, V)
        if self.module.padding_idx is not None:
            onehot[..., self.module.padding_idx] = 0
        eye = torch.eye(d, dtype=w.dtype, device=w.device)
        return torch.einsum("ntv,de->ntdve", onehot, eye).reshape(n, idx.shape[1] * d, v * d)

    def jac_z(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        raise ValueError("Embedding's input is integer data: it has no Jacobian")

    def hess_zx(self, z: Tensor, params: P, b: Tensor) -> Tensor:  # noqa: D102
        raise ValueError("Embedding's input is integer data: it has no Jacobian")
