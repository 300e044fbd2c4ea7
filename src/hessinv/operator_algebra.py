"""The algebra of :class:`hessinv.LinearOperator`: sums, scalings, products, adjoints.

Each class applies its operands' ``matmat``/``rmatmat`` and never forms a
matrix: ``(sum_i c_i A_i) V = sum_i c_i (A_i V)``, ``(A B) V = A (B V)``,
``(A B)^T = B^T A^T``, ``(c A)^T = c A^T``. Operands must agree in size,
dtype and device (:func:`_merge`); a flat space (the identity's) takes the
parameter shapes of its partner.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .operator import LinearOperator
from .vectors import Layout


class _Foreign(LinearOperator):
    """A duck-typed operator (curvlinops'; any with ``shape``, ``dtype``, ``device``, ``@``)."""

    def __init__(self, op: object) -> None:
        self.op = op
        m, n = (int(s) for s in op.shape)
        ins = getattr(op, "_in_shape", None) or [(n,)]
        outs = getattr(op, "_out_shape", None) or [(m,)]
        self.layout = Layout(tuple(tuple(s) for s in ins), op.dtype, torch.device(op.device))
        self._out = Layout(tuple(tuple(s) for s in outs), op.dtype, torch.device(op.device))
        self.symmetric = bool(getattr(op, "SELF_ADJOINT", False))

    @property
    def out_layout(self) -> Layout:  # noqa: D102
        return self._out

    def matmat(self, v: Tensor) -> Tensor:  # noqa: D102
        return self.op @ v

    def rmatmat(self, v: Tensor) -> Tensor:  # noqa: D102
        if self.symmetric:
            return self.op @ v
        return self.op.adjoint() @ v

    def __repr__(self) -> str:
        return repr(self.op)


def _merge(a: Layout, b: Layout, what: str) -> Layout:
    """The common space of two operators: same size, dtype, device; shapes agree or one is flat."""
    if a.size != b.size:
        raise ValueError(f"{what}: sizes differ ({a.size} vs {b.size})")
    if a.dtype != b.dtype:
        raise TypeError(f"{what}: dtypes differ ({a.dtype} vs {b.dtype}); convert one model")
    if a.device != b.device:
        raise ValueError(f"{what}: devices differ ({a.device} vs {b.device})")
    if a.shapes == b.shapes or len(b.shapes) == 1:
        return a
    if len(a.shapes) == 1:
        return b
    raise ValueError(f"{what}: parameter shapes differ ({a.shapes} vs {b.shapes})")


class _Sum(LinearOperator):
    """``sum_i c_i A_i``."""

    def __init__(self, terms: list[tuple[float, LinearOperator]]) -> None:
        flat: list[tuple[float, LinearOperator]] = []
        for c, op in terms:
            if isinstance(op, _Sum):
                flat += [(c * c2, op2) for c2, op2 in op.terms]
            else:
                flat.append((c, op))
        lay, out = flat[0][1].layout, flat[0][1].out_layout
        for _, op in flat[1:]:
            lay = _merge(lay, op.layout, "A + B (input spaces)")
            out = _merge(out, op.out_layout, "A + B (output spaces)")
        self.terms, self.layout, self._out = flat, lay, out
        self.symmetric = all(op.symmetric for _, op in flat)

    @property
    def out_layout(self) -> Layout:  # noqa: D102
        return self._out

    def _check_fresh(self) -> None:
        for _, op in self.terms:
            op._check_fresh()

    def matmat(self, v: Tensor) -> Tensor:  # noqa: D102
        return _combine([(c, op.matmat(v)) for c, op in self.terms])

    def rmatmat(self, v: Tensor) -> Tensor:  # noqa: D102
        return _combine([(c, op.rmatmat(v)) for c, op in self.terms])

    def to_dense(self) -> Tensor:  # noqa: D102
        return _combine([(c, op.to_dense()) for c, op in self.terms])

    def __repr__(self) -> str:
        parts = [("- " if c < 0 else "+ ") + _coef(abs(c)) + repr(op) for c, op in self.terms]
        return "(" + " ".join(parts).removeprefix("+ ") + ")"


def _combine(parts: list[tuple[float, Tensor]]) -> Tensor:
    out = parts[0][1] * parts[0][0] if parts[0][0] != 1.0 else parts[0][1].clone()
    for c, t in parts[1:]:
        out = out.add_(t, alpha=c)
    return out


def _coef(c: float) -> str:
    return "" if c == 1.0 else f"{c:g} * "


class _Scaled(LinearOperator):
    """``c A``."""

    def __init__(self, op: LinearOperator, c: float) -> None:
        if isinstance(op, _Scaled):
            op, c = op.op, op.c * c
        self.op, self.c = op, float(c)
        self.layout, self.symmetric = op.layout, op.symmetric

    @property
    def out_layout(self) -> Layout:  # noqa: D102
        return self.op.out_layout

    def _check_fresh(self) -> None:
        self.op._check_fresh()

    def matmat(self, v: Tensor) -> Tensor:  # noqa: D102
        return self.c * self.op.matmat(v)

    def rmatmat(self, v: Tensor) -> Tensor:  # noqa: D102
        return self.c * self.op.rmatmat(v)

    def to_dense(self) -> Tensor:  # noqa: D102
        return self.c * self.op.to_dense()

    def __repr__(self) -> str:
        return f"{self.c:g} * {self.op!r}"


class _Product(LinearOperator):
    """``A B``: ``(A B) V = A (B V)``."""

    def __init__(self, a: LinearOperator, b: LinearOperator) -> None:
        mid = _merge(a.layout, b.out_layout, "A @ B (A's input vs B's output space)")
        self.a, self.b = a, b
        self.layout = b.layout
        # a square ``a`` on a flat space (the identity) adopts the parameter shapes of ``b``
        self._out = mid if a.out_layout == a.layout else a.out_layout

    @property
    def out_layout(self) -> Layout:  # noqa: D102
        return self._out

    def _check_fresh(self) -> None:
        self.a._check_fresh()
        self.b._check_fresh()

    def matmat(self, v: Tensor) -> Tensor:  # noqa: D102
        return self.a.matmat(self.b.matmat(v))

    def rmatmat(self, v: Tensor) -> Tensor:  # noqa: D102
        return self.b.rmatmat(self.a.rmatmat(v))

    def to_dense(self) -> Tensor:  # noqa: D102
        return self.a.to_dense() @ self.b.to_dense()

    def __repr__(self) -> str:
        return f"({self.a!r} @ {self.b!r})"


class _Adjoint(LinearOperator):
    """``A^T``."""

    def __init__(self, op: LinearOperator) -> None:
        self.op = op
        self.layout = op.out_layout

    @property
    def out_layout(self) -> Layout:  # noqa: D102
        return self.op.layout

    @property
    def T(self) -> LinearOperator:  # noqa: N802, D102
        return self.op

    def _check_fresh(self) -> None:
        self.op._check_fresh()

    def matmat(self, v: Tensor) -> Tensor:  # noqa: D102
        return self.op.rmatmat(v)

    def rmatmat(self, v: Tensor) -> Tensor:  # noqa: D102
        return self.op.matmat(v)

    def to_dense(self) -> Tensor:  # noqa: D102
        return self.op.to_dense().T

    def __repr__(self) -> str:
        return f"{self.op!r}.T"
