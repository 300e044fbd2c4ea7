"""A Kronecker basis that splits a Linear stage's pivot into a small block and ``d I``.

For a stage whose layer is ``y_n = W z_n + c`` (:class:`~hessinv.derivatives.blocks.KronX`)
``Jf_x`` of sample ``n`` is ``I_a (x) t_n^T`` with ``t_n = [z_n; 1]`` (``c``
entries), so every row of ``Jx = Jg Jf_x`` and of ``Txx = sum_n Jf_x^T Tg Jf_x``
lies in ``R^a (x) span{t_1, ..., t_N}``, whatever the tail (paper, eq. 24: the
parameters enter the stage only through ``Jx`` and ``Txx``, and ``Tzx``).
With the complete QR ``[t_1 ... t_N] = Q_c R`` (``Q_c`` orthogonal, ``c x c``)
and ``r_z = min(N, c)``, the orthogonal basis ``B = I_a (x) Q_c`` of the
parameters, its columns ordered ``(q, j < r_z)`` then ``(q, j >= r_z)``, gives

    ``Jx B = [J_1, 0]``,   ``B^T Txx B = [[T_11, 0], [0, 0]]``

with ``J_1 = Jx (I_a (x) Q_c[:, :r_z])`` of ``r = a r_z`` columns: ``t_n^T
Q_c[:, j] = R[j, n] = 0`` for ``j >= r_z`` (``R`` is upper triangular). The
stage's Riccati pivot ``Q_vv = B^T (Txx + dI + Jx^T P Jx) B`` is therefore
``blockdiag(T_11 + dI + J_1^T P J_1, d I_{p - r})``: an LU of ``r x r`` instead
of ``p x p`` (at width 16, batch 8: 128 against 272, a tenth of the flops), and
the free directions are coupled to the rest of the network only through
``Tzx B[:, r:]`` (the bilinear term ``d2 (b.y) / dz dW``). Every projection
costs ``O(a c^2)`` per row, never a dense ``p x p`` product.

The zeros are imposed, not computed: in floating point ``t_n^T Q_c[:, j]`` is
``O(eps |t_n|)``, a relative perturbation of the blocks at round-off level. A
solve through this basis is judged, like every stage solve, by its backward
error on the true ``H`` (:class:`hessinv.solvers.LiftedFactorization`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .derivatives import StageBlocks
from .derivatives.blocks import kron_gram


class SplitStage:
    """Stage ``l``'s blocks in the Kronecker basis ``B = I_a (x) Q_c`` (module doc).

    ``B`` is never formed: :meth:`to_basis` and :meth:`from_basis` apply it in
    ``O(p c)`` per column.

    Attributes:
        r: Columns of ``B`` that ``Jx`` and ``Txx`` see (``a min(N, c)``).
        txx: ``T_11`` (``r x r``; ``None`` when ``Txx`` is zero).
        jx: ``J_1 = Jx B[:, :r]`` as ``(N a, r)`` (``None`` for the last stage).
        tzx: ``Tzx B`` as ``(N a_in, p)`` (``None`` for the first stage).
    """

    def __init__(self, b: StageBlocks, qc: Tensor, rz: int) -> None:
        kx = b.kron_x
        assert kx is not None
        self.a, self.c, self.rz, self.bias = kx.a, kx.width, rz, kx.bias
        self.p = b.num_params
        self.r = self.a * rz
        self.qc = qc
        self.idx = kx.order()  # parameter index of (q, i)
        self.inv_idx = kx.inverse_order()
        qz = qc[:, :rz]
        self.txx: Tensor | None = None
        self.jx: Tensor | None = None
        self.tzx: Tensor | None = None
        # when factored: R = Q_c[:, :r_z]^T [t_1 ... t_N], s, b_y and Q_c[:a_in, r_z:]
        self._r: Tensor | None = None
        self._s = self._by = self._q2 = None
        if kx.factors_of(b):
            self._from_factors(b, qz)
            return
        if b.Txx is not None and not b.txx_zero:
            rows = (qz.T @ b.Txx[self.idx].reshape(self.a, self.c, self.p)).reshape(self.r, -1)
            self.txx = self._cols(rows, qz)  # symmetrized with the whole pivot (stage_pivot)
        self.jx = None if b.Jx is None else self._cols(b.Jx.reshape(-1, self.p), qz)
        if b.Tzx is not None:  # Tzx B = (B^T Tzx^T)^T
            self.tzx = kron_to_basis(qc, self.idx, rz, b.Tzx.reshape(-1, self.p).T).T

    def _from_factors(self, b: StageBlocks, qz: Tensor) -> None:
        """``J_1``, ``T_11`` and ``Tzx B`` from the factors of :class:`KronX`, never the blocks.

        With ``R = Q_c[:, :r_z]^T [t_1 ... t_N]`` (``t_n^T Q_c[:, k] = R[k, n]``),
        ``s`` the tail's diagonal Jacobian and ``Tg`` its curvature::

            J_1[(n, q), (q', k)]     = s[n, q] delta_qq' R[k, n]
            T_11[(q, k), (q', k')]   = sum_n Tg_n[q, q'] R[k, n] R[k', n]
            (Tzx B)[(n, j), (q, k)]  = (W^T Tg_n)[j, q] R[k, n] + b_y[n, q] Q_c[j, k]

        (the first term of ``Tzx B`` only for ``k < r_z``), in ``O(N a r_z (N + c))``
        against ``O(N a p c)`` for projecting the dense blocks.
        """
        kx = b.kron_x
        assert kx is not None and kx.s is not None and kx.weight is not None
        n, a, rz, c = kx.z.shape[0], self.a, self.rz, self.c
        a_in = kx.z.shape[1]
        r = qz.T @ kx.inputs().T  # (r_z, N)
        self._r, self._s = r, kx.s
        self._by, self._q2 = kx.b_y, self.qc[:a_in, rz:]
        tg = kx.tg
        if b.Jx is not None:
            j1 = r.new_zeros(n, a, a, rz)
            torch.diagonal(j1, dim1=1, dim2=2).copy_(kx.s.unsqueeze(1) * r.T.unsqueeze(2))
            self.jx = j1.reshape(n * a, a * rz)
        if tg is not None and b.Txx is not None and not b.txx_zero:
            self.txx = kron_gram(r.T, tg).reshape(a * rz, a * rz)  # (q, k, q', k')
        if b.Tzx is not None:
            w = kx.weight
            if tg is None:
                head = r.new_zeros(n, a_in, a, rz)
            else:
                wt = w.T.unsqueeze(0) * tg.unsqueeze(1) if tg.dim() == 2 else w.T @ tg
                head = wt.unsqueeze(-1) * r.T.reshape(n, 1, 1, rz)  # (n, j, q, k)
            bq = kx.b_y.reshape(n, 1, a, 1) * self.qc[:a_in].reshape(1, a_in, 1, c)
            head = head + bq[..., :rz]
            tail = bq[..., rz:]
            self.tzx = torch.cat(
                [head.reshape(n * a_in, a * rz), tail.reshape(n * a_in, a * (c - rz))], dim=1
            )

    @property
    def factored(self) -> bool:
        """The blocks came from :class:`KronX`'s factors: the structured products apply."""
        return self._r is not None

    def p_jx(self, p_mat: Tensor) -> Tensor:
        """``P J_1`` in ``O(M N a r_z)`` (``J_1[(n, q), (q', k)] = s[n, q] delta_qq' R[k, n]``)."""
        m, (rz, n), a = p_mat.shape[0], self._r.shape, self.a
        ps = p_mat.reshape(m, n, a) * self._s  # (m, n, q)
        return (ps.transpose(1, 2) @ self._r.T).reshape(m, a * rz)  # (m, q, k)

    def jx_t(self, x: Tensor) -> Tensor:
        """``J_1^T X`` for ``X`` of shape ``(N a, C)``: ``(a r_z, C)``."""
        (rz, n), a, cols = self._r.shape, self.a, x.shape[1]
        xs = (x.reshape(n, a, cols) * self._s.unsqueeze(-1)).reshape(n, a * cols)
        return (self._r @ xs).reshape(rz, a, cols).transpose(0, 1).reshape(a * rz, cols)

    def jx_mul(self, g: Tensor) -> Tensor:
        """``J_1 G`` for ``G`` of shape ``(a r_z, C)``: ``(N a, C)``."""
        (rz, n), a, cols = self._r.shape, self.a, g.shape[1]
        y = self._r.T @ g.reshape(a, rz, cols)  # (q, n, C)
        return (y.transpose(0, 1) * self._s.unsqueeze(-1)).reshape(n * a, cols)

    def free_outer(self, scale: float = 1.0) -> Tensor:
        """``(s Tzx_2)(s Tzx_2)^T = (s B_y)(s B_y)^T (x) (Q_2 Q_2^T)``, ``Q_2 = Q_c[:a_in, r_z:]``.

        ``s`` (``scale``) applied to ``B_y`` before the product, so that ``s = 1 /
        sqrt|d|`` keeps the entries at the loss's scale (``B_y B_y^T`` alone is at its square).
        """
        by = self._by * scale
        return torch.kron(by @ by.T, self._q2 @ self._q2.T)

    @property
    def free(self) -> int:
        """``p - r``: the directions whose pivot is ``d`` exactly."""
        return self.p - self.r

    def _cols(self, x: Tensor, q: Tensor) -> Tensor:
        """``X (I_a (x) q)`` for ``X`` of shape ``(m, p)``: ``(m, a * q.shape[1])``."""
        m = x.shape[0]
        return (x[:, self.idx].reshape(m, self.a, self.c) @ q).reshape(m, -1)

    def to_basis(self, x: Tensor) -> Tensor:
        """``B^T x`` for ``x`` of shape ``(p, k)`` (parameter order)."""
        return kron_to_basis(self.qc, self.idx, self.rz, x)

    def from_basis(self, w: Tensor) -> Tensor:
        """``B w`` for ``w`` of shape ``(p, k)`` (basis order)."""
        return kron_from_basis(self.qc, self.inv_idx, self.rz, w)


def kron_to_basis(qc: Tensor, idx: Tensor, rz: int, x: Tensor) -> Tensor:
    """``B^T x`` for ``B = I_a (x) Q_c`` (columns in basis order), batched over leading dims.

    Args:
        qc: ``Q_c`` (``(..., c, c)``).
        idx: :meth:`~hessinv.derivatives.blocks.KronX.order` (``a c`` entries).
        rz: The leading columns of ``Q_c`` that span ``[z_n; 1]``.
        x: ``(..., p, k)`` in parameter order.
    """
    c = qc.shape[-1]
    lead, k = x.shape[:-2], x.shape[-1]
    y = qc.mT.unsqueeze(-3) @ x[..., idx, :].reshape(*lead, -1, c, k)  # (..., a, c, k)
    head = y[..., :rz, :].reshape(*lead, -1, k)
    return torch.cat([head, y[..., rz:, :].reshape(*lead, -1, k)], dim=-2)


def kron_from_basis(qc: Tensor, inv_idx: Tensor, rz: int, w: Tensor) -> Tensor:
    """``B w`` (:func:`kron_to_basis`'s inverse), ``inv_idx`` the inverse permutation of ``idx``."""
    c = qc.shape[-1]
    lead, k, p = w.shape[:-2], w.shape[-1], w.shape[-2]
    a = p // c
    head = w[..., : a * rz, :].reshape(*lead, a, rz, k)
    tail = w[..., a * rz :, :].reshape(*lead, a, c - rz, k)
    y = qc.unsqueeze(-3) @ torch.cat([head, tail], dim=-2)  # (..., a, c, k) in (q, i) order
    return y.reshape(*lead, p, k)[..., inv_idx, :]


#: Smallest stage (parameters) worth splitting: below it the pivot's LU costs less than
#: the projections' kernel calls (width 4, batch 2: 20 parameters, twice slower split).
SPLIT_MIN_P = 128


def split_stage(b: StageBlocks) -> SplitStage | None:
    """:class:`SplitStage` of a Linear stage, or ``None`` when it would not split.

    ``None`` without :attr:`~hessinv.derivatives.StageBlocks.kron_x`, when
    ``N >= c`` (``t_1..t_N`` span ``R^c``: no free direction) or below
    :data:`SPLIT_MIN_P` parameters.
    """
    kx = b.kron_x
    if kx is None or b.num_params < SPLIT_MIN_P:
        return None
    n, c = kx.z.shape[0], kx.width
    if n >= c or kx.a * c != b.num_params:
        return None
    t = kx.z if not kx.bias else torch.cat([kx.z, kx.z.new_ones(n, 1)], dim=1)
    qc = torch.linalg.qr(t.T, mode="complete")[0].contiguous()  # (c, c)
    return SplitStage(b, qc, n)
