"""One linear-operator base class, and the algebra of operators.

:class:`LinearOperator` is what :class:`hessinv.Hessian`,
:class:`hessinv.GaussNewton`, :class:`hessinv.InverseOperator` and every
:class:`hessinv.solvers.Factorization` (as ``(H + dI)^{-1}``) share, modelled
on curvlinops' ``PyTorchLinearOperator``. A subclass implements
:meth:`LinearOperator.matmat` (``A V`` for ``V`` of shape ``(n, k)``) and, if
it is not symmetric, :meth:`LinearOperator.rmatmat` (``A^T V``); the class
gives it

* ``A @ V`` and ``V @ A`` for ``V`` flat ``(n,)``, a block ``(n, k)`` (``(k, n)``
  on the left), a list of parameter-shaped tensors, or a list of
  ``(*p.shape, k)`` tensors; NumPy arrays come back as NumPy arrays;
* the algebra ``A + B``, ``A - B``, ``c * A``, ``A * c``, ``A / c``, ``-A``,
  ``A.T`` and ``A @ B`` (composition), all matrix-free: ``(H + d * I) @ v`` is
  ``H @ v + d v``, exact to rounding, nothing densified;
* ``to_dense()``, ``to_scipy(dtype=)``, ``shape``, ``dtype``, ``device``, ``repr``.

**curvlinops interop** is by duck typing (no dependency): every operator has
the attributes curvlinops' inverses and estimators use (``_in_shape``,
``_out_shape``, ``_matmat`` on its list-of-``(*p.shape, k)`` form, ``adjoint``,
``SELF_ADJOINT``), so ``CGInverseLinearOperator(H + d * H.identity())``,
``hutchinson_trace(H, m)`` and the like accept a hessinv operator, and a
curvlinops operator can enter hessinv's algebra (``H - curvlinops_op``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from .validate import check_damping
from .vectors import Layout

VectorLike = Tensor | np.ndarray | Sequence[Tensor] | Sequence[np.ndarray]


class LinearOperator:
    """A linear map ``R^n -> R^m`` in PyTorch (module doc).

    Subclasses set :attr:`layout` (the input space: parameter shapes, dtype,
    device), optionally :attr:`out_layout` (default: the same), implement
    :meth:`matmat`, and :meth:`rmatmat` or ``symmetric = True``.

    Attributes:
        symmetric: ``A^T = A`` (then ``A.T`` is ``A`` itself).
    """

    symmetric: bool = False
    layout: Layout
    __array_ufunc__ = None  # NumPy defers to __rmatmul__/__rmul__: ``ndarray @ A``

    # -- what a subclass provides -------------------------------------------------
    def matmat(self, v: Tensor) -> Tensor:
        """``A V`` for ``V`` of shape ``(n, k)`` (no checks of ``V``)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement matmat")

    def rmatmat(self, v: Tensor) -> Tensor:
        """``A^T V`` for ``V`` of shape ``(m, k)``; ``matmat`` when :attr:`symmetric`."""
        if self.symmetric:
            return self.matmat(v)
        raise NotImplementedError(f"{type(self).__name__} does not implement rmatmat")

    def _check_fresh(self) -> None:
        """Raise if the operator no longer describes its model (a hook; no-op here)."""

    @contextlib.contextmanager
    def _fresh_call(self) -> Iterator[None]:
        """One :meth:`_check_fresh` for a whole public call (a hook; here the check alone)."""
        self._check_fresh()
        yield

    def _matmat_checked(self, v: Tensor) -> Tensor:
        """``matmat`` as ``@`` calls it (a hook for output checks)."""
        return self.matmat(v)

    # -- shape, dtype, device ---------------------------------------------------------
    @property
    def out_layout(self) -> Layout:
        """The output space (default: the input space)."""
        return self.layout

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)``."""
        return (self.out_layout.size, self.layout.size)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of vectors the operator acts on."""
        return self.layout.dtype

    @property
    def device(self) -> torch.device:
        """The device of vectors the operator acts on."""
        return self.layout.device

    def __repr__(self) -> str:
        m, n = self.shape
        return f"{type(self).__name__}(shape=({m}, {n}), dtype={self.dtype}, device={self.device})"

    # -- products ---------------------------------------------------------------------
    def __matmul__(self, x: VectorLike | LinearOperator) -> VectorLike | LinearOperator:
        """``A @ x``: the product with a vector/block/list (same form back) or an operator."""
        if _is_operator(x):
            return _Product(self, as_operator(x))
        with self._fresh_call():
            vm, form = self.layout.to_matrix(x, "v")
            return self.out_layout.from_matrix(self._matmat_checked(vm), form)

    def __rmatmul__(self, x: VectorLike) -> VectorLike:
        """``x @ A = (A^T x^T)^T``: ``x`` of shape ``(m,)`` or ``(k, m)``.

        A per-parameter list has no row orientation; ``x @ A`` is then
        ``A^T x`` in the same list form.
        """
        if _is_operator(x):
            return _Product(as_operator(x), self)
        if isinstance(x, (Tensor, np.ndarray)) and x.ndim == 2:
            return (self.T @ x.T).T
        return self.T @ x

    # -- algebra ----------------------------------------------------------------------
    def __add__(self, other: object) -> LinearOperator:
        if not _is_operator(other):
            return _refuse_add(self, other)
        return _Sum([(1.0, self), (1.0, as_operator(other))])

    def __radd__(self, other: object) -> LinearOperator:
        if not _is_operator(other):
            return _refuse_add(self, other)
        return _Sum([(1.0, as_operator(other)), (1.0, self)])

    def __sub__(self, other: object) -> LinearOperator:
        if not _is_operator(other):
            return _refuse_add(self, other)
        return _Sum([(1.0, self), (-1.0, as_operator(other))])

    def __rsub__(self, other: object) -> LinearOperator:
        if not _is_operator(other):
            return _refuse_add(self, other)
        return _Sum([(1.0, as_operator(other)), (-1.0, self)])

    def __mul__(self, c: object) -> LinearOperator:
        return _Scaled(self, _scalar(c, "the factor in c * A"))

    __rmul__ = __mul__

    def __truediv__(self, c: object) -> LinearOperator:
        c = _scalar(c, "the divisor in A / c")
        if c == 0.0:
            raise ZeroDivisionError("A / c with c = 0: an operator cannot be divided by zero")
        return _Scaled(self, 1.0 / c)

    def __neg__(self) -> LinearOperator:
        return _Scaled(self, -1.0)

    def __pos__(self) -> LinearOperator:
        return self

    @property
    def T(self) -> LinearOperator:  # noqa: N802
        """The adjoint (transpose) ``A^T``: ``A`` itself when :attr:`symmetric`."""
        return self if self.symmetric else _Adjoint(self)

    def adjoint(self) -> LinearOperator:
        """``A^T`` (curvlinops' name)."""
        return self.T

    def identity(self) -> IdentityOperator:
        """The identity on this operator's input space (``A + d * A.identity()``)."""
        return IdentityOperator(self.layout.size, layout=self.layout)

    # -- dense and SciPy --------------------------------------------------------------
    def to_dense(self) -> Tensor:
        """The ``m x n`` matrix, ``A @ I`` (``n`` products)."""
        with self._fresh_call():
            return self.matmat(torch.eye(self.shape[1], dtype=self.dtype, device=self.device))

    def to_scipy(self, dtype=None):  # noqa: ANN001, ANN201
        """A ``scipy.sparse.linalg.LinearOperator`` for ``A`` (``rmatvec`` by ``A^T``).

        Args:
            dtype: The NumPy dtype it reports and returns (default: the
                operator's); inputs are converted to the operator's dtype for
                the products.
        """
        self._check_fresh()
        return self._scipy(self.matmat, dtype, self.rmatmat)

    def _scipy(self, apply, dtype=None, rapply=None):  # noqa: ANN001, ANN202
        """A SciPy operator applying ``apply`` (``rapply`` for the adjoint; default ``apply``)."""
        from scipy.sparse.linalg import LinearOperator as ScipyOperator

        out_dtype = np.dtype(str(self.dtype).replace("torch.", "") if dtype is None else dtype)

        def wrap(f):  # noqa: ANN001, ANN202
            def mm(x: np.ndarray) -> np.ndarray:
                x = np.asarray(x)
                t = torch.as_tensor(x, device=self.device).to(self.dtype)
                out = f(t.reshape(t.shape[0], -1))
                shape = (out.shape[0], *x.shape[1:])
                return out.detach().cpu().numpy().astype(out_dtype, copy=False).reshape(shape)

            return mm

        mm, rmm = wrap(apply), wrap(apply if rapply is None else rapply)
        return ScipyOperator(
            self.shape, matvec=mm, matmat=mm, rmatvec=rmm, rmatmat=rmm, dtype=out_dtype
        )

    # -- curvlinops' duck-typed interface ---------------------------------------------
    @property
    def SELF_ADJOINT(self) -> bool:  # noqa: N802
        """The name curvlinops uses for :attr:`symmetric`."""
        return self.symmetric

    @property
    def _in_shape(self) -> list[torch.Size]:
        return [torch.Size(s) for s in self.layout.shapes]

    @property
    def _out_shape(self) -> list[torch.Size]:
        return [torch.Size(s) for s in self.out_layout.shapes]

    @property
    def _in_shape_flat(self) -> list[int]:
        return [s.numel() for s in self._in_shape]

    @property
    def _out_shape_flat(self) -> list[int]:
        return [s.numel() for s in self._out_shape]

    def _matmat(self, x: list[Tensor]) -> list[Tensor]:
        """As curvlinops: ``[(*p.shape, k)]`` in, ``[(*q.shape, k)]`` out."""
        with self._fresh_call():
            vm, _ = self.layout.to_matrix(list(x), "v")
            return self.out_layout.from_matrix(self._matmat_checked(vm), "list-matrix")

    def _adjoint(self) -> LinearOperator:
        return self.T


class IdentityOperator(LinearOperator):
    """The identity ``I`` on ``R^W`` (``H + d * IdentityOperator(W)``).

    Args:
        size: ``W``.
        dtype: Default float64; ignored when ``layout`` is given.
        device: Default CPU; ignored when ``layout`` is given.
        layout: Parameter shapes, dtype and device to share with an operator
            (:meth:`LinearOperator.identity`).
    """

    symmetric = True

    def __init__(
        self,
        size: int,
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
        layout: Layout | None = None,
    ) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"IdentityOperator: size must be a nonnegative int, got {size!r}")
        if layout is not None and layout.size != size:
            raise ValueError(f"IdentityOperator: layout has size {layout.size}, not {size}")
        self.layout = layout or Layout(((size,),), dtype, torch.device(device))

    def matmat(self, v: Tensor) -> Tensor:
        """``V`` (a copy)."""
        return v.clone()

    def to_dense(self) -> Tensor:
        """``torch.eye(W)``."""
        return torch.eye(self.shape[0], dtype=self.dtype, device=self.device)

    def __repr__(self) -> str:
        return f"IdentityOperator(W={self.shape[0]}, dtype={self.dtype}, device={self.device})"


def _is_operator(x: object) -> bool:
    if isinstance(x, LinearOperator):
        return True
    if isinstance(x, (Tensor, np.ndarray, np.generic, list, tuple, int, float, complex)):
        return False
    return all(hasattr(x, a) for a in ("shape", "dtype", "device", "__matmul__"))


def as_operator(x: object) -> LinearOperator:
    """``x`` as a :class:`LinearOperator` (a duck-typed operator is wrapped)."""
    return x if isinstance(x, LinearOperator) else _Foreign(x)


def _scalar(c: object, what: str) -> float:
    """A finite real scalar (Python, NumPy, 0-d tensor); an operator is refused with a hint."""
    if _is_operator(c):
        raise TypeError(f"{what} is an operator: compose operators with A @ B, not A * B")
    try:
        return check_damping(c)
    except (TypeError, ValueError) as e:
        raise type(e)(str(e).replace("damping", what)) from None


def _refuse_add(a: LinearOperator, other: object) -> LinearOperator:
    raise TypeError(
        f"cannot add {type(other).__name__} to an operator: only operators add; for "
        "A + c I write A + c * A.identity()"
    )


# The algebra's classes subclass LinearOperator, so they are imported once it exists.
from .operator_algebra import _Adjoint, _Foreign, _Product, _Scaled, _Sum  # noqa: E402

__all__ = ["IdentityOperator", "LinearOperator", "as_operator"]
