"""The per-stage derivative blocks (:class:`StageBlocks`) and comb Jacobians.

For stage ``f_l`` with input ``z = z_{l-1}`` (``N`` samples of ``a_in``
coordinates), parameters ``x = x_l`` (``p`` scalars) and backpropagated
cotangent ``b = b_l = dz_L/dz_l`` (``N`` samples of ``a_out``), the blocks are

============  =====================  ==========================================
block         shape                  meaning (paper's name)
============  =====================  ==========================================
``Jz``        ``(N, a_out, a_in)``   ``d f / d z`` per sample (``grad_z f``, in ``M``)
``Jx``        ``(N, a_out, p)``      ``d f / d x`` per sample (``D_x``)
``Tzz``       ``(N, a_in, a_in)``    ``d2 (b.f) / dz dz`` per sample (``D_M D_zz``)
``Tzx``       ``(N, a_in, p)``       ``d2 (b.f) / dz dx`` per sample (``D_D D_zx``)
``Txx``       ``(p, p)``             ``d2 (b.f) / dx dx`` summed (``D_D D_xx``)
============  =====================  ==========================================

Samples never mix, so every per-sample block is stored as ``N`` small
matrices, never as an ``(N a) x (N a)`` block diagonal.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import vjp, vmap

from .kron_basis import KronBasis


@dataclass(frozen=True)
class KronX:
    """A stage whose layer is ``y_n = W z_n + c`` (``nn.Linear`` on ``(N, a_in)`` inputs).

    Its parameters are ``W`` (``a x a_in``, row-major) then ``c`` (``a``, when
    ``bias``), so ``Jf_x`` of sample ``n`` is ``I_a (x) [z_n; 1]^T`` up to the
    order of the parameters (:meth:`order`). Every row of ``Jx = Jg Jf_x`` and
    of ``Txx = sum_n Jf_x^T Tg Jf_x`` (the layer is linear in ``x``) lies in
    ``R^a (x) span{[z_n; 1]}``, whatever the tail ``g``: a promise
    :mod:`hessinv.stage_split` builds its Kronecker basis on.

    The factors of the blocks (set by :func:`hessinv.derivatives.chain.structured_blocks`,
    ``None`` when not known) let the blocks be formed, and projected onto a
    Kronecker basis, without reading their dense forms (``t_n = [z_n; 1]``,
    ``Tg`` the tail's curvature, ``b_y`` the cotangent at the layer's output)::

        Jx_n  = diag(s_n) (I_a (x) t_n^T)
        Txx   = sum_n (I_a (x) t_n) Tg_n (I_a (x) t_n^T)
        Tzx_n = W^T Tg_n (I_a (x) t_n^T) + [b_y,n (x) I_a_in, 0]

    Attributes:
        z: The layer's input ``(N, a_in)``.
        a: The layer's output width.
        bias: The layer has a bias (the ``1`` entries of ``[z_n; 1]``).
        weight: ``W`` (``a x a_in``).
        b_y: ``b_y`` (``(N, a)``).
        tg: ``Tg``: ``(N, a)`` when diagonal, ``(N, a, a)``, or ``None`` when zero.
        s: The tail's Jacobian ``Jg`` when it is diagonal (``(N, a)``; ones for
            an empty tail), else ``None``: then only the dense ``Jx`` has it.
    """

    z: Tensor
    a: int
    bias: bool
    weight: Tensor | None = None
    b_y: Tensor | None = None
    tg: Tensor | None = None
    s: Tensor | None = None

    @property
    def width(self) -> int:
        """``c``: the length of ``[z_n; 1]`` (``a_in + 1`` with a bias, else ``a_in``)."""
        return self.z.shape[1] + int(self.bias)

    def order(self) -> Tensor:
        """``idx[q c + i]``: the parameter index of entry ``(q, i)`` of ``I_a (x) [z; 1]``."""
        return _order(self.a, self.z.shape[1], self.width, self.z.device)[0]

    def inverse_order(self) -> Tensor:
        """The inverse permutation of :meth:`order` (``argsort``)."""
        return _order(self.a, self.z.shape[1], self.width, self.z.device)[1]

    @property
    def factored(self) -> bool:
        """The factors ``W``, ``b_y`` and a diagonal ``Jg`` are known (module doc)."""
        return self.weight is not None and self.b_y is not None and self.s is not None

    def on(self, ref: Tensor) -> bool:
        """The factors are in ``ref``'s dtype and on its device (blocks cast apart keep them)."""
        return self.z.dtype == ref.dtype and self.z.device == ref.device

    def factors_of(self, b: StageBlocks) -> bool:
        """:attr:`factored`, and in ``b``'s dtype and on its device.

        Blocks cast apart from their factors keep this object: their products
        must then come from the dense blocks.
        """
        ref = b.grad_x
        return (
            self.factored
            and self.b_y.dtype == ref.dtype  # type: ignore[union-attr]
            and self.b_y.device == ref.device  # type: ignore[union-attr]
        )

    def inputs(self) -> Tensor:
        """``t_n = [z_n; 1]`` (``[z_n]`` without a bias) as ``(N, c)``."""
        z = self.z
        return torch.cat([z, z.new_ones(z.shape[0], 1)], dim=1) if self.bias else z

    def txx(self, tg: Tensor) -> Tensor:
        """``sum_n (I_a (x) t_n) Tg_n (I_a (x) t_n^T)`` (``p x p``, parameter order).

        ``O(a c^2 N)`` for a diagonal ``Tg`` (``O(a^2 c^2 N)`` for a dense one)
        plus writing the ``p^2`` result, against ``O(p^2 N a)`` for the dense
        product ``Jf_x^T Tg Jf_x``.
        """
        a, a_in = self.a, self.z.shape[1]
        if tg.dim() == 2:  # block diagonal over q: written straight into parameter order
            return self._txx_diagonal(tg)
        g = kron_gram(self.inputs(), tg)  # (q, i, q', j)
        p = g.shape[0] * g.shape[1]
        if not self.bias:  # (q, i) is the parameter order
            return g.reshape(p, p)
        m = a * a_in  # the weight's entries come first, row-major, then the bias
        out = g.new_empty(p, p)
        out[:m, :m] = g[:, :a_in, :, :a_in].reshape(m, m)
        out[:m, m:] = g[:, :a_in, :, a_in].reshape(m, a)
        out[m:, :m] = g[:, a_in, :, :a_in].reshape(a, m)
        out[m:, m:] = g[:, a_in, :, a_in]
        return out

    def txx_lazy(self, tg: Tensor, absmax: Tensor | None = None) -> LazyBlock:
        """:meth:`txx` of a diagonal ``Tg`` (``(N, a)``), formed on first read.

        ``max |Txx|`` is that of the ``a`` Gram blocks ``sum_n Tg_n[q] t_n t_n^T``
        (``a c^2`` entries, the only nonzero ones); ``absmax``: that value, when
        already computed (for a whole run at once).
        """

        def gram_absmax() -> Tensor:
            if absmax is not None:
                return absmax
            return gram_blocks(self.inputs(), tg).abs().amax()

        p = self.a * self.width
        return LazyBlock(lambda: self.txx(tg), gram_absmax, (p, p))

    def kept_basis(self, tzx: bool) -> KronBasis:
        """An orthonormal basis of every direction ``Jx``, ``Txx`` and (``tzx``) ``Tzx`` see.

        Their rows lie in ``R^a (x) T`` (``T = span{t_n}``) plus, for ``Tzx``'s
        bilinear term ``[b_y,n (x) e_j, 0]``, in ``B (x) E`` (``B = span{b_y,n}``,
        ``E`` the weight's input coordinates). With the complete QR ``[t_1 ...
        t_N] = Q_c R``, ``Q_T = Q_c[:, :r_z]``, ``Q_C = Q_c[:, r_z:]`` (``r_z =
        min(N, c)``) and ``Q_B`` an orthonormal basis of ``B``, their sum lies in
        the span of the orthonormal ``[I_a (x) Q_T, Q_B (x) Q_C]`` (the second
        part is ``B (x) E`` projected on ``R^a (x) T^perp``): ``a r_z + r_B (c - r_z)``
        columns, from QRs of ``c x N`` and ``a x N`` instead of one of ``p x N
        (2 a + a_in)`` (:mod:`hessinv.derivatives.kron_basis`).
        """
        x = self.inputs()
        n, c = x.shape
        rz = min(n, c)
        qc = torch.linalg.qr(x.T, mode="complete")[0]  # (c, c)
        if tzx and rz < c:
            assert self.b_y is not None
            qb = torch.linalg.qr(self.b_y.T, mode="reduced")[0]  # (a, min(N, a))
        else:
            qb = x.new_zeros(self.a, 0)
        return KronBasis(
            qc[:, :rz].contiguous(),
            qc[:, rz:].contiguous(),
            qb.contiguous(),
            self.order(),
            self.inverse_order(),
            self.bias,
        )

    def txx_on(self, q: Tensor) -> Tensor:
        """``Q^T Txx Q`` for ``Txx = txx(tg)`` (:attr:`tg` set), without forming ``Txx``.

        ``sum_n B_n^T Tg_n B_n`` with ``B_n = (I_a (x) t_n^T) Q`` (``a x k``: ``Q``'s
        rows in Kronecker order, contracted with ``t_n``): ``O(N a c k + N a k^2)``
        (``N a^2 k`` more for a dense ``Tg``) against ``O(p^2 k)`` for ``Q^T Txx Q``.

        Args:
            q: ``(p, k)`` in parameter order.
        """
        x = self.inputs()
        qk = q[self.order()].reshape(self.a, x.shape[1], q.shape[1])  # (a, c, k)
        b = torch.matmul(x, qk)  # (a, N, k): B_n's row q is b[q, n]
        tg = self.tg
        if tg.dim() == 2:
            tb = b * tg.T.unsqueeze(-1)
        else:  # (N, a, a): B_n^T Tg_n B_n with B_n = b[:, n]
            b = b.transpose(0, 1)
            tb = tg @ b
        k = q.shape[1]
        return tb.reshape(-1, k).T @ b.reshape(-1, k)

    def _txx_diagonal(self, tg: Tensor) -> Tensor:
        """:meth:`txx` for a diagonal ``Tg`` (``(N, a)``): ``a`` Gram blocks on the diagonal.

        ``blk[q] = sum_n Tg_n[q] t_n t_n^T`` (``c x c``) couples parameter ``(q, i)``
        with ``(q, j)`` only; each of the four parts (weight-weight, weight-bias,
        bias-weight, bias-bias) is a strided diagonal of a view of the output,
        so the ``p x p`` matrix is written once.
        """
        x = self.inputs()
        a, a_in = self.a, self.z.shape[1]
        blk = gram_blocks(x, tg)  # (q, i, j)
        p = a * x.shape[1]
        out = x.new_zeros(p, p)
        m = a * a_in  # the weight's entries come first, row-major, then the bias
        ww = out[:m, :m].unflatten(0, (a, a_in)).unflatten(2, (a, a_in))  # (q, i, q', j)
        torch.diagonal(ww, dim1=0, dim2=2).copy_(blk[:, :a_in, :a_in].permute(1, 2, 0))
        if self.bias:
            wb = out[:m, m:].unflatten(0, (a, a_in))  # (q, i, q')
            torch.diagonal(wb, dim1=0, dim2=2).copy_(blk[:, :a_in, a_in].T)
            bw = out[m:, :m].unflatten(1, (a, a_in))  # (q, q', j)
            torch.diagonal(bw, dim1=0, dim2=1).copy_(blk[:, a_in, :a_in].T)
            torch.diagonal(out[m:, m:]).copy_(blk[:, a_in, a_in])
        return out


@functools.lru_cache(maxsize=64)
def _order(a: int, a_in: int, c: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """:meth:`KronX.order` and its inverse, one pair per shape (index tensors, never written)."""
    q = torch.arange(a, device=device).unsqueeze(1)
    i = torch.arange(c, device=device).unsqueeze(0)
    idx = torch.where(i < a_in, q * a_in + i, a * a_in + q).reshape(a * c)
    return idx, torch.argsort(idx)


def gram_blocks(x: Tensor, tg: Tensor) -> Tensor:
    """``blk[q] = sum_n tg[n, q] x_n x_n^T`` for ``x`` ``(N, c)``, ``tg`` ``(N, a)``: ``(a, c, c)``.

    The diagonal blocks of :func:`kron_gram` for a diagonal ``Tg``, one batched product.
    """
    return (tg.T.unsqueeze(2) * x).mT @ x


def kron_gram(x: Tensor, tg: Tensor) -> Tensor:
    """``G[q, i, q', j] = sum_n Tg_n[q, q'] x[n, i] x[n, j]``.

    That is ``sum_n (I (x) x_n) Tg_n (I (x) x_n^T)`` with rows and columns ``(q, i)``.

    Args:
        x: ``(N, c)``.
        tg: ``(N, a)`` (a diagonal ``Tg_n``: ``G`` is block diagonal over ``q``) or ``(N, a, a)``.

    Returns:
        ``(a, c, a, c)``; one batched product, ``O(a c^2 N)`` (``O(a^2 c^2 N)`` dense).
    """
    n, c = x.shape
    a = tg.shape[1]
    if tg.dim() == 2:
        blk = gram_blocks(x, tg)  # (q, i, j)
        g = x.new_zeros(a, c, a, c)
        torch.diagonal(g, dim1=0, dim2=2).copy_(blk.permute(1, 2, 0))
        return g
    full = x.T @ (tg.reshape(n, a * a, 1) * x.unsqueeze(1)).reshape(n, -1)  # (i, q q' j)
    return full.reshape(c, a, a, c).permute(1, 0, 2, 3)


@dataclass
class StageBlocks:
    """Derivative blocks of one stage at the current point (see module doc).

    ``Jz``, ``Tzz`` and ``Tzx`` are ``None`` for the first stage (its input is
    data, ``u_0 = 0``); ``Jz`` and ``Jx`` are ``None`` for the last stage
    (``lambda_L = 0``); ``Txx`` may be ``None`` when the stage's output is
    linear in its parameters (it is then zero). ``x_span`` (``(N, r, p)`` or
    ``None``), when given, promises that the rows of ``x_span`` and ``Tzx``
    span every row of ``Jx``, ``Tzx`` and ``Txx``: then the parameter
    directions orthogonal to them are null directions of ``H`` that the lifted
    system can drop (a layer whose output is linear in its parameters,
    ``x_span = d layer / dx``).

    The flags say what is known about the blocks' structure; a flag that is
    ``True`` is a promise (tested), ``False`` promises nothing:

    Attributes:
        kron_x: When set, the layer is affine in its input and parameters
            (:class:`KronX`): ``Jx`` and ``Txx`` have Kronecker-structured rows.
        tzz_zero: ``Tzz`` is exactly zero (stored as zeros when not first).
        tzx_zero: ``Tzx`` is exactly zero.
        txx_zero: ``Txx`` is exactly zero (or ``None``).
    """

    Jz: Tensor | None
    Jx: Tensor | None
    Tzz: Tensor | None
    Tzx: Tensor | None
    Txx: Tensor | None
    grad_x: Tensor
    cot_in: Tensor | None
    x_span: Tensor | None = None
    kron_x: KronX | None = None
    tzz_zero: bool = False
    tzx_zero: bool = False
    txx_zero: bool = False

    def __post_init__(self) -> None:
        if self.__dict__["Txx"] is None:
            self.txx_zero = True

    def shape_of(self, name: str) -> torch.Size | None:
        """The shape of block ``name`` (``None`` when absent), without forming a lazy one."""
        raw = self.__dict__[name]
        return None if raw is None else raw.shape

    def rows(self, name: str) -> int:
        """``N a`` of a per-sample block ``(N, a, p)`` (``0`` when absent), without forming it."""
        shape = self.shape_of(name)
        return 0 if shape is None else shape[0] * shape[1]

    def has(self, name: str) -> bool:
        """Block ``name`` is present (not ``None``), whether formed or still lazy."""
        return self.__dict__[name] is not None

    def formed(self, name: str) -> bool:
        """Block ``name`` is held densely (not a :class:`LazyBlock` still to be formed)."""
        return not isinstance(self.__dict__[name], LazyBlock)

    def absmax(self, name: str) -> Tensor | None:
        """``max |block|`` (0-d; from the factors when lazy and known how), ``None`` if empty."""
        raw = self.__dict__[name]
        if isinstance(raw, LazyBlock) and raw.absmax is not None:
            return raw.absmax()
        block = getattr(self, name)
        return None if block is None or block.numel() == 0 else block.abs().amax()

    @property
    def txx_formed(self) -> bool:
        """``Txx`` is held densely (not a :class:`LazyBlock` still to be formed)."""
        return self.formed("Txx")

    def txx_absmax(self) -> Tensor | None:
        """``max |Txx|`` (a 0-d tensor), from the factors when ``Txx`` is not formed yet."""
        return self.absmax("Txx")

    @property
    def num_params(self) -> int:
        """Number of parameters ``p`` of the stage."""
        return self.grad_x.numel()

    @property
    def first(self) -> bool:
        """True for the first stage (no ``Tzz``, ``Tzx``: its input is data)."""
        return self.Tzz is None and not self.has("Tzx")

    @property
    def last(self) -> bool:
        """True for the last stage (no ``Jx``: its output is the loss)."""
        return not self.has("Jx")

    @property
    def params_linear(self) -> bool:
        """True when the stage promises the ``x_span`` reduction (output linear in ``x``)."""
        return self.has("x_span")


class LazyBlock:
    """A block formed on first read of its :class:`StageBlocks` attribute (then stored densely).

    A Linear stage's ``Txx`` (``p x p``, ``p = a c``) has ``a c^2`` nonzero
    entries for an elementwise tail, and its ``Jx``, ``Jf_x`` and ``Tzx``
    (``N a p`` entries each) ``N a c`` and about ``N a c (a_in + 1)``: the
    default solve reads them only through their factors (:class:`KronX`,
    :meth:`absmax`) and their shapes (:meth:`StageBlocks.shape_of`,
    :meth:`StageBlocks.has`), so the dense entries are written only for a
    path that reads them densely.

    Args:
        form: Returns the dense block.
        absmax: Returns ``max |block|`` (0-d) without forming it (``None``: form it).
        shape: The dense block's shape.
    """

    def __init__(
        self,
        form: Callable[[], Tensor],
        absmax: Callable[[], Tensor] | None,
        shape: tuple[int, ...],
    ) -> None:
        self.form, self.absmax, self.shape = form, absmax, torch.Size(shape)


def _lazy_field(name: str) -> property:
    """A property over the dataclass field ``name`` that forms a :class:`LazyBlock` on read."""

    def get(b: StageBlocks) -> Tensor | None:
        raw = b.__dict__[name]
        if isinstance(raw, LazyBlock):
            raw = b.__dict__[name] = raw.form()
        return raw

    def put(b: StageBlocks, value: Tensor | LazyBlock | None) -> None:
        b.__dict__[name] = value

    return property(get, put, doc=f"``{name}`` (formed on first read when lazy).")


# the blocks stay dataclass fields (``__init__``, ``fields``, ``replace``); reads go through
# these properties, which form a LazyBlock on first access
for _name in ("Jx", "Tzx", "Txx", "x_span"):
    setattr(StageBlocks, _name, _lazy_field(_name))


def comb(eye: Tensor, n: int) -> Tensor:
    """Directions ``e_j`` repeated over ``n`` samples: shape ``(a, n, a)``."""
    return eye.unsqueeze(1).expand(eye.shape[0], n, eye.shape[1])


def comb_jacobian(fn, z: Tensor, a_out: int) -> Tensor:  # noqa: ANN001
    """Per-sample Jacobians of a sample-wise map ``fn: (N, a_in) -> (N, a_out)``.

    ``a_out`` vector-Jacobian products with *comb* cotangents (``e_o`` in every
    sample): product ``o`` returns row ``o`` of all ``N`` per-sample Jacobians
    at once. Reverse mode is used throughout: torch's forward-over-reverse is
    missing for some ops (``mse_loss`` raises "ZeroTensors are immutable").

    Returns:
        ``(N, a_out, a_in)``.
    """
    n = z.shape[0]
    _, pull = vjp(fn, z)
    eye = torch.eye(a_out, dtype=z.dtype, device=z.device)
    rows = vmap(lambda c: pull(c)[0])(comb(eye, n))  # (a_out, N, a_in)
    return rows.transpose(0, 1)
