"""Closed forms of ``nn.Linear`` and ``nn.Embedding`` (outputs linear in their parameters)."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from .registry import ModuleDerivatives, register

P = tuple[Tensor, ...]


def write_jac_x(out: Tensor, z: Tensor, bias: bool, rows: Tensor | None = None) -> Tensor:
    """``diag(rows) [z^T (x) I | I]`` (``Jf_x`` of ``y = W z + c``) written into a zeroed ``out``.

    ``out`` is ``(..., N, a_out, p)``, ``z`` is ``(..., N, a_in)`` (the weight
    flattened row-major, then the bias when ``bias``); ``rows`` (``(..., N,
    a_out)``, default ones) scales the rows (``Jx = diag(s) Jf_x`` for a
    diagonal tail). Only the ``N a_out (a_in + 1)`` nonzero entries are written.
    """
    a_out, a_in = out.shape[-2], z.shape[-1]
    w = out[..., : a_out * a_in].unflatten(-1, (a_out, a_in))  # (..., N, o, q, i)
    vals = z.unsqueeze(-1).expand(*z.shape, a_out)  # [..., n, i, q] = z[n, i]
    if rows is not None:
        vals = vals * rows.unsqueeze(-2)
    torch.diagonal(w, dim1=-3, dim2=-2).copy_(vals)
    if bias:
        diag = torch.diagonal(out[..., a_out * a_in :], dim1=-2, dim2=-1)
        if rows is None:
            diag.fill_(1.0)
        else:
            diag.copy_(rows)
    return out


def add_hess_zx(out: Tensor, b: Tensor) -> Tensor:
    """``out += d2 (b.y) / dz dx`` of ``y = W z + c``: ``b[n, o]`` at ``(n, i, (o, i))``.

    ``out`` is ``(..., N, a_in, p)``, ``b`` is ``(..., N, a_out)``; the bias
    columns get nothing (``y`` is linear in ``c`` and ``z`` apart).
    """
    a_in, a_out = out.shape[-2], b.shape[-1]
    w = out[..., : a_out * a_in].unflatten(-1, (a_out, a_in))  # (..., N, j, o, i)
    torch.diagonal(w, dim1=-3, dim2=-1).add_(b.unsqueeze(-1))
    return out


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
        a_out, bias = params[0].shape[0], len(params) > 1
        out = z.new_zeros(n, a_out, a_out * (a_in + int(bias)))
        return write_jac_x(out, z, bias)

    def hess_zx(self, z: Tensor, params: P, b: Tensor) -> Tensor:
        """``(N, a_in, p)``: ``d2 (b.y) / dz dx``."""
        n, a_in = z.shape
        a_out, bias = params[0].shape[0], len(params) > 1
        out = z.new_zeros(n, a_in, a_out * (a_in + int(bias)))
        return add_hess_zx(out, b.reshape(n, a_out))


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
