"""``H @ v``'s per-stage products for runs of ``nn.Linear`` stages, from the Kronecker factors.

For a stage ``y_n = W z_n + c`` followed by an elementwise tail
(:class:`~hessinv.derivatives.blocks.KronX` with a diagonal tail Jacobian ``s``
and a diagonal or zero curvature ``Tg``), with ``t_n = [z_n; 1]`` and the
stage's parameters ``v = (V_W, v_c)`` (row-major weight, then bias), the
products :func:`hessinv.products.hvp` needs (paper, eq. 52-54) are::

    Y_n        = V_W z_n + v_c                      (= Jf_x v, per sample)
    Jx v       = s * Y
    Tzx v      = W^T (Tg * Y)_n + V_W^T b_y,n
    Jx^T lam + Tzx^T u + Txx v
               = Jf_x^T (s * lam + Tg * (Y + W u)) + [sum_n b_y,n u_n^T, 0]

where ``Jf_x^T X = (sum_n X_n t_n^T)`` reshaped to the parameters. Each is a
few batched products of ``O(N a a_in k)`` per stage, where the dense blocks
cost ``O(N a p k)`` and ``O(p^2 k)`` (``p = a (a_in + 1)``): at width 16 a
sixteenth of the flops, and none of the reads of ``Jx``, ``Tzx`` and ``Txx``
(about 1.2 MB per stage at width 16, batch 8).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwad
from torch import Tensor

from .derivatives import StageBlocks
from .stacking import stacked


def traced(*ts: Tensor) -> bool:
    """Autograd, forward AD or a ``torch.func`` transform follows one of ``ts``.

    The ``out=`` variants of ``add`` and ``sum`` support none of them (a
    ``RuntimeError`` when a term requires grad, a ``NotImplementedError``
    under ``torch.func.jvp``), so :func:`add_into` and :func:`sum_into` then
    compute out of place and copy (``copy_`` is differentiable): ``H @ v``
    stays differentiable in ``v``, as it was when the products were
    concatenated.
    """
    grad = torch.is_grad_enabled()
    return any(
        (grad and t.requires_grad)
        or torch._C._functorch.is_functorch_wrapped_tensor(t)
        or fwad.unpack_dual(t).tangent is not None
        for t in ts
    )


def add_into(out: Tensor, a: Tensor, b: Tensor) -> None:
    """``out = a + b`` written into ``out`` (out of place and copied when :func:`traced`)."""
    if traced(a, b):
        out.copy_(a + b)
    else:
        torch.add(a, b, out=out)


def sum_into(out: Tensor, x: Tensor, dim: int) -> None:
    """``out = x.sum(dim)`` written into ``out`` (out of place and copied when :func:`traced`)."""
    if traced(x):
        out.copy_(x.sum(dim))
    else:
        torch.sum(x, dim, out=out)


@dataclass
class KronRun:
    """The factors of a run of equally shaped Linear stages, stacked (``R`` stages).

    Attributes:
        z: The layers' inputs ``(R, N, a_in)``.
        w: The weights ``(R, a, a_in)``.
        s: The tails' diagonal Jacobians ``(R, N, a)``.
        tg: The tails' diagonal curvatures ``(R, N, a)`` (zeros where none).
        b_y: The cotangents at the layers' outputs ``(R, N, a)``.
        bias: The layers have biases.
    """

    z: Tensor
    w: Tensor
    s: Tensor
    tg: Tensor
    b_y: Tensor
    bias: bool

    @staticmethod
    def of(run: list[StageBlocks]) -> KronRun | None:
        """The stacked factors, or ``None`` unless every stage has them (diagonal ``Tg``)."""
        kxs = [b.kron_x for b in run]
        if any(k is None or not k.factors_of(b) for k, b in zip(kxs, run, strict=True)):
            return None
        if any(k.tg is not None and k.tg.dim() != 2 for k in kxs):  # type: ignore[union-attr]
            return None
        k0 = kxs[0]
        if any(k.bias != k0.bias for k in kxs):  # type: ignore[union-attr]
            return None
        tg = [k.tg if k.tg is not None else torch.zeros_like(k.b_y) for k in kxs]  # type: ignore[union-attr,arg-type]
        return KronRun(
            stacked([k.z for k in kxs]),  # type: ignore[union-attr]
            stacked([k.weight for k in kxs]),  # type: ignore[union-attr,misc]
            stacked([k.s for k in kxs]),  # type: ignore[union-attr,misc]
            stacked(tg),
            stacked([k.b_y for k in kxs]),  # type: ignore[union-attr,misc]
            k0.bias,  # type: ignore[union-attr]
        )

    def _split(self, v: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(V_W, v_c)`` of ``v`` (``(R, p, k)``): ``(R, a, a_in, k)`` and ``(R, a, k)``."""
        r, a, a_in = self.w.shape
        vw = v[:, : a * a_in].reshape(r, a, a_in, v.shape[-1])
        return vw, (v[:, a * a_in :] if self.bias else None)

    def layer_rows(self, v: Tensor) -> Tensor:
        """``Y = Jf_x v`` per sample: ``(R, N, a, k)``."""
        r, a, a_in = self.w.shape
        vw, vc = self._split(v)
        k = v.shape[-1]
        y = torch.bmm(self.z, vw.permute(0, 2, 1, 3).reshape(r, a_in, a * k))
        y = y.reshape(r, self.z.shape[1], a, k)
        return y if vc is None else y + vc.unsqueeze(1)

    def jx_rows(self, y: Tensor) -> Tensor:
        """``Jx v = s * Y``."""
        return self.s.unsqueeze(-1) * y

    def tzx_rows(self, v: Tensor, y: Tensor) -> Tensor:
        """``Tzx v = W^T (Tg * Y)_n + V_W^T b_y,n``: ``(R, N, a_in, k)``."""
        r, a, a_in = self.w.shape
        n, k = y.shape[1], y.shape[-1]
        x = (self.tg.unsqueeze(-1) * y).permute(0, 2, 1, 3).reshape(r, a, n * k)
        out = torch.bmm(self.w.mT, x).reshape(r, a_in, n, k).permute(0, 2, 1, 3)
        vw, _ = self._split(v)
        return out + torch.bmm(self.b_y, vw.reshape(r, a, a_in * k)).reshape(r, n, a_in, k)

    def contract(self, y: Tensor, u_prev: Tensor | None, lam: Tensor | None, out: Tensor) -> None:
        """``Jx^T lam + Tzx^T u_prev + Txx v`` written into ``out`` (``None``: that term absent).

        ``out``: the run's ``(R, p, k)`` rows of the whole product. The weight
        part is the sum of two batched products: ``z^T x``, which a GEMM yields
        as ``(a_in, a k)`` per stage (read through a transposed view), and
        ``b_y^T u``, already in parameter order; one addition writes both into
        ``out``, without the copies and the concatenation a fresh tensor per
        term would need.
        """
        r, a, a_in = self.w.shape
        n, k = y.shape[1], y.shape[-1]
        inner = y
        if u_prev is not None:  # W u, per sample
            wu = torch.bmm(self.w, u_prev.permute(0, 2, 1, 3).reshape(r, a_in, n * k))
            inner = inner + wu.reshape(r, a, n, k).permute(0, 2, 1, 3)
        x = self.tg.unsqueeze(-1) * inner
        if lam is not None:
            x = x + self.s.unsqueeze(-1) * lam
        xr = x.reshape(r, n, a * k)
        gw = torch.bmm(self.z.mT, xr).view(r, a_in, a, k).transpose(1, 2)  # (R, a, a_in, k)
        ow = out[:, : a * a_in].unflatten(1, (a, a_in))
        if u_prev is None:
            ow.copy_(gw)
        else:  # Tf_zx^T u: sum_n b_y,n u_n^T
            by_u = torch.bmm(self.b_y.mT, u_prev.reshape(r, n, a_in * k)).view(r, a, a_in, k)
            add_into(ow, by_u, gw)
        if self.bias:
            sum_into(out[:, a * a_in :], x, 1)
