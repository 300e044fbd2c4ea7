"""Closed forms of coordinate-wise activations: ``phi'`` (``df``) and ``phi''`` (``d2f``).

Each matches torch's own derivative conventions at kinks (``ReLU'(0) = 0``,
``ELU`` takes its exponential branch at 0, ``Hardtanh'`` is 0 at the clip
points, ``Softplus`` is linear above its threshold), so that the blocks equal
those of autodiff bit for bit in the formulas' rounding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .registry import (
    ElementwiseDerivatives,
    PiecewiseLinearElementwise,
    register,
)

P = tuple[Tensor, ...]


def sech2(z: Tensor) -> Tensor:
    """``tanh'(z) = sech^2 z = cosh^-2 z``, relatively accurate also where ``tanh`` saturates."""
    return torch.cosh(z).pow(-2)


def sigmoid_prime(z: Tensor) -> Tensor:
    """``s'(z) = s(z) s(-z)``, relatively accurate also where ``s`` saturates."""
    return torch.sigmoid(z) * torch.sigmoid(-z)


@register(nn.Tanh)
class TanhDerivatives(ElementwiseDerivatives):
    """``tanh' = sech^2 = cosh^-2``, ``tanh'' = -2 t sech^2``.

    ``1 - t^2`` would cancel where ``|t|`` is near 1: ``tanh'(20)`` came out 0
    instead of 1.7e-17. ``cosh^-2`` keeps the relative accuracy everywhere
    (``cosh`` overflows only where the true value underflows).
    """

    def df(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        return sech2(z)

    def d2f(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        return -2.0 * torch.tanh(z) * sech2(z)


@register(nn.Sigmoid)
class SigmoidDerivatives(ElementwiseDerivatives):
    """``s' = s(z) s(-z)``, ``s'' = s' (1 - 2 s) = -s' tanh(z / 2)``.

    Written without ``1 - s`` (it cancels in saturation: ``s'(20)`` was off by
    4e-8 relative): ``1 - s(z) = s(-z)`` and ``1 - 2 s(z) = -tanh(z / 2)``.
    """

    def df(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        return sigmoid_prime(z)

    def d2f(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        return -sigmoid_prime(z) * torch.tanh(0.5 * z)


@register(nn.LogSigmoid)
class LogSigmoidDerivatives(ElementwiseDerivatives):
    """``(log s)' = 1 - s = s(-z)``, ``(log s)'' = -s(z) s(-z)``."""

    def df(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        return torch.sigmoid(-z)

    def d2f(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        return -sigmoid_prime(z)


@register(nn.ReLU)
class ReLUDerivatives(PiecewiseLinearElementwise):
    """``1[z > 0]``."""

    def df(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        return (z > 0).to(z.dtype)


@register(nn.LeakyReLU)
class LeakyReLUDerivatives(PiecewiseLinearElementwise):
    """``1`` for ``z > 0``, else the negative slope."""

    def df(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        slope = torch.full_like(z, self.module.negative_slope)
        return torch.where(z > 0, torch.ones_like(z), slope)


class _HardtanhLike(PiecewiseLinearElementwise):
    lo: float
    hi: float

    def df(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        return ((z > self.lo) & (z < self.hi)).to(z.dtype)


@register(nn.Hardtanh)
class HardtanhDerivatives(_HardtanhLike):
    """``1`` strictly between ``min_val`` and ``max_val``, else 0."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self.lo, self.hi = module.min_val, module.max_val


@register(nn.ReLU6)
class ReLU6Derivatives(_HardtanhLike):
    """``1`` on ``(0, 6)``, else 0."""

    lo, hi = 0.0, 6.0


@register(nn.Identity)
class IdentityDerivatives(PiecewiseLinearElementwise):
    """The identity (also Dropout in eval mode and per-sample reshapes)."""

    def forward(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        return z

    def df(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        return torch.ones_like(z)


class DropoutDerivatives(IdentityDerivatives):
    """Dropout in eval mode (or ``p = 0``): the identity."""

    @classmethod
    def applies(cls, module: nn.Module, z: Tensor) -> bool:  # noqa: D102
        return not module.training or module.p == 0


for _t in (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
):
    register(_t, DropoutDerivatives)


@register(nn.ELU)
class ELUDerivatives(ElementwiseDerivatives):
    """``1`` for ``z > 0``, else ``alpha e^z``; ``phi''`` is ``alpha e^z`` for ``z < 0``, else 0.

    At ``z = 0`` as torch's first and double backward: ``phi'(0) = alpha``, ``phi''(0) = 0``.
    """

    def df(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        a = self.module.alpha
        return torch.where(z > 0, torch.ones_like(z), a * torch.exp(z))

    def d2f(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        a = self.module.alpha
        return torch.where(z >= 0, torch.zeros_like(z), a * torch.exp(z))


@register(nn.CELU)
class CELUDerivatives(ElementwiseDerivatives):
    """``1`` for ``z > 0``, else ``e^{z/alpha}``; ``phi'' = e^{z/alpha} / alpha`` for ``z < 0``."""

    def df(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        a = self.module.alpha
        return torch.where(z > 0, torch.ones_like(z), torch.exp(z / a))

    def d2f(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        a = self.module.alpha
        return torch.where(z >= 0, torch.zeros_like(z), torch.exp(z / a) / a)


#: torch's SELU constants (``torch.nn.functional.selu``).
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946


@register(nn.SELU)
class SELUDerivatives(ElementwiseDerivatives):
    """``scale * ELU_alpha``: ``scale`` for ``z > 0``, else ``scale alpha e^z``."""

    def df(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        return torch.where(
            z > 0, torch.full_like(z, SELU_SCALE), SELU_SCALE * SELU_ALPHA * torch.exp(z)
        )

    def d2f(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        return torch.where(z >= 0, torch.zeros_like(z), SELU_SCALE * SELU_ALPHA * torch.exp(z))


@register(nn.Softplus)
class SoftplusDerivatives(ElementwiseDerivatives):
    """``s(beta z)``, ``beta s(beta z) s(-beta z)``; linear (1, 0) where ``beta z > threshold``."""

    def _s(self, z: Tensor) -> tuple[Tensor, Tensor]:
        m = self.module
        bz = z * m.beta
        return torch.sigmoid(bz), bz > m.threshold

    def df(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        s, lin = self._s(z)
        return torch.where(lin, torch.ones_like(z), s)

    def d2f(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        bz = z * self.module.beta  # torch's double backward is 0 from the threshold on
        curv = self.module.beta * sigmoid_prime(bz)
        return torch.where(bz >= self.module.threshold, torch.zeros_like(z), curv)


@register(nn.GELU)
class GELUDerivatives(ElementwiseDerivatives):
    """Exact GELU ``z Phi(z)``: ``Phi + z phi``, ``phi (2 - z^2)``; ``tanh`` form by autodiff."""

    def df(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        if self.module.approximate != "none":
            return super().df(z, params)
        cdf = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
        pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
        return cdf + z * pdf

    def d2f(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        if self.module.approximate != "none":
            return super().d2f(z, params)
        pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
        return pdf * (2.0 - z * z)


@register(nn.SiLU)
class SiLUDerivatives(ElementwiseDerivatives):
    """``z s(z)``: ``s + z s'``, ``s' (2 - z tanh(z / 2))`` with ``s' = s(z) s(-z)``."""

    def df(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        return torch.sigmoid(z) + z * sigmoid_prime(z)

    def d2f(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        return sigmoid_prime(z) * (2.0 - z * torch.tanh(0.5 * z))


@register(nn.Tanhshrink)
class TanhshrinkDerivatives(ElementwiseDerivatives):
    """``z - tanh z``: ``t^2``, ``2 t sech^2`` (``cosh^-2``: see :class:`TanhDerivatives`)."""

    def df(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        t = torch.tanh(z)
        return t * t

    def d2f(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        return 2.0 * torch.tanh(z) * sech2(z)


@register(nn.Softsign)
class SoftsignDerivatives(ElementwiseDerivatives):
    """``z / (1 + |z|)``: ``(1 + |z|)^-2``, ``-2 sign(z) (1 + |z|)^-3``."""

    def df(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        d = 1.0 + z.abs()
        return 1.0 / (d * d)

    def d2f(self, z: Tensor, params: P) -> Tensor:  # noqa: D102
        d = 1.0 + z.abs()
        return -2.0 * torch.sign(z) / (d * d * d)


@register(nn.Mish)
class MishDerivatives(ElementwiseDerivatives):
    """``z tanh(softplus z)``: ``phi'``, ``phi''`` by autodiff of the coordinate-wise map."""


def celu(z: Tensor, alpha: float = 1.0, inplace: bool = False) -> Tensor:
    """CELU from elementary operations: ``max(z, 0) + min(alpha (e^{z/alpha} - 1), 0)``.

    torch's own CELU backward rounds ``1/alpha`` to float32 (its first and
    second derivatives are off by ~1e-8 relative in float64 for
    ``alpha != 1``, while its forward is exact); this form's derivatives of
    every order are those of the function. ``inplace`` is ignored (out of place).
    """
    return torch.clamp(z, min=0) + torch.clamp(alpha * (torch.exp(z / alpha) - 1), max=0)
