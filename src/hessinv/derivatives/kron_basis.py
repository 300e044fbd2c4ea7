"""A Linear stage's kept basis in Kronecker form, and its maps batched over stages.

For ``y_n = W z_n + c`` with ``t_n = [z_n; 1]`` (``c`` entries), every parameter
direction the stage's blocks see lies in the span of the orthonormal

    ``Q = [I_a (x) Q_T, Q_B (x) Q_C]``     (rows in Kronecker order ``(q, i)``)

(:meth:`hessinv.derivatives.blocks.KronX.kept_basis`): ``Q_T`` and ``Q_C``
split ``R^c`` into ``span{t_n}`` and its complement, ``Q_B`` spans the
cotangents ``b_y,n``. ``Q^T x`` and ``Q w`` then cost ``O(a c (r_z + r_B)
r)`` per stage for ``r`` columns, where the dense ``p x k`` basis reads
``p k`` entries (at width 16, batch 2 about 17 MB over 127 stages, per map).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def to_kron(x: Tensor, a: int, bias: bool) -> Tensor:
    """Rows ``(n, p, r)`` in parameter order as ``(n, a, c, r)`` in Kronecker order ``(q, i)``.

    The weight's entries (row-major ``(q, i)``) then, with ``bias``, the bias
    (``i = a_in``): a reshape and one concatenation, where gathering by
    :attr:`KronBasis.order` is an indexed copy about six times slower.
    """
    n, p, r = x.shape
    if not bias:
        return x.reshape(n, a, p // a, r)
    m = p - a
    return torch.cat([x[:, :m].reshape(n, a, m // a, r), x[:, m:].unsqueeze(2)], dim=2)


def from_kron(v: Tensor, bias: bool) -> Tensor:
    """The inverse of :func:`to_kron`: ``(n, a, c, r)`` back to ``(n, p, r)`` in parameter order."""
    n, a, c, r = v.shape
    if not bias:
        return v.reshape(n, a * c, r)
    return torch.cat([v[:, :, :-1].reshape(n, a * (c - 1), r), v[:, :, -1]], dim=1)


def kron2(a: Tensor, b: Tensor) -> Tensor:
    """``a (x) b`` of two matrices (``torch.kron`` fails on some strided operands)."""
    (ra, ca), (rb, cb) = a.shape, b.shape
    return (a[:, None, :, None] * b[None, :, None, :]).reshape(ra * rb, ca * cb)


@dataclass
class KronBasis:
    """The factors of ``Q = [I_a (x) Q_T, Q_B (x) Q_C][inverse_order]`` (parameter order).

    Attributes:
        qt: ``Q_T`` (``c x r_z``).
        qc: ``Q_C`` (``c x (c - r_z)``).
        qb: ``Q_B`` (``a x r_B``; ``r_B = 0`` without the second part).
        order: ``order[q c + i]``: the parameter index of Kronecker entry ``(q, i)``.
        inverse_order: Its inverse permutation.
        bias: The layer has a bias (``c = a_in + 1``; else ``order`` is the identity).
    """

    qt: Tensor
    qc: Tensor
    qb: Tensor
    order: Tensor
    inverse_order: Tensor
    bias: bool

    def dense(self) -> Tensor:
        """``Q`` as a ``p x k`` matrix in parameter order."""
        eye = torch.eye(self.qb.shape[0], dtype=self.qt.dtype, device=self.qt.device)
        parts = [kron2(eye, self.qt)]
        if self.qb.shape[1]:
            parts.append(kron2(self.qb, self.qc))
        return torch.cat(parts, dim=1)[self.inverse_order]

    @property
    def k(self) -> int:
        """The number of columns ``a r_z + r_B (c - r_z)``."""
        return self.qb.shape[0] * self.qt.shape[1] + self.qb.shape[1] * self.qc.shape[1]

    def key(self) -> tuple:
        """Equal keys: the factors stack (same shapes, and the same parameter order).

        A stage with a bias and one without can have equal shapes (``Linear(5, 6)``
        then ``Linear(6, 6, bias=False)``: ``c = 6`` both) but not the same order.
        """
        return (tuple(self.qt.shape), tuple(self.qc.shape), tuple(self.qb.shape), self.bias)


class KronStack:
    """``Q^T x`` and ``Q w`` for a run of ``n`` stages with :class:`KronBasis` of one shape.

    Each map is two batched products over the run (one GEMM per stage), not
    one per stage and row ``q``: the ``a`` rows ``x_q`` (``c x r`` each) of a
    stage sit side by side as one ``c x (a r)`` operand of ``[Q_T, Q_C]^T``.
    """

    def __init__(self, bases: list[KronBasis]) -> None:
        first = bases[0]
        self.two = first.qb.shape[1] > 0
        parts = [(b.qt, b.qc) if self.two else (b.qt,) for b in bases]
        self.qf = torch.stack([torch.cat(pt, dim=1) for pt in parts])  # (n, c, r_z [+ c - r_z])
        self.qb = torch.stack([b.qb for b in bases])  # (n, a, r_B)
        self.rz = first.qt.shape[1]
        self.bias = first.bias
        self.a, self.c = first.qb.shape[0], first.qt.shape[0]

    def t(self, x: Tensor) -> Tensor:
        """``Q^T x`` for ``x`` of shape ``(n, p, r)``: ``(n, k, r)``.

        ``x_q`` (row ``q`` of ``x`` in Kronecker order, ``c x r``): the first part
        is ``Q_T^T x_q`` per ``q``, the second ``sum_q Q_B[q] Q_C^T x_q``.
        """
        n, _, r = x.shape
        a, c, rz = self.a, self.c, self.rz
        xc = to_kron(x, a, self.bias).transpose(1, 2).reshape(n, c, a * r)
        z = (self.qf.mT @ xc).reshape(n, -1, a, r)  # (n, j, q, r): [Q_T, Q_C]^T x_q
        first = z[:, :rz].transpose(1, 2).reshape(n, a * rz, r)
        if not self.two:
            return first
        y = z[:, rz:].transpose(1, 2).reshape(n, a, (c - rz) * r)
        second = (self.qb.mT @ y).reshape(n, -1, r)  # (n, r_B (c - r_z), r)
        return torch.cat([first, second], dim=1)

    def q(self, w: Tensor) -> Tensor:
        """``Q w`` for ``w`` of shape ``(n, k, r)``: ``(n, p, r)`` in parameter order.

        Row ``q``'s coefficients in ``[Q_T, Q_C]`` are ``[w1_q; sum_b Q_B[q, b] w2_b]``.
        """
        n, _, r = w.shape
        a, c, rz = self.a, self.c, self.rz
        coef = w[:, : a * rz].reshape(n, a, rz, r)
        if self.two:
            rb = self.qb.shape[2]
            w2 = w[:, a * rz :].reshape(n, rb, -1)
            u2 = (self.qb @ w2).reshape(n, a, c - rz, r)
            coef = torch.cat([coef, u2], dim=2)  # (n, a, c, r)
        cols = coef.transpose(1, 2).reshape(n, -1, a * r)  # (n, j, (q, r))
        v = (self.qf @ cols).reshape(n, c, a, r).transpose(1, 2)  # (n, a, c, r)
        return from_kron(v, self.bias)
