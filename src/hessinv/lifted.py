"""The augmented (lifted) block-tridiagonal system whose Schur complement is ``H``.

Treat the recursions of :mod:`hessinv.products` as equations in the unknowns
``(v_l, u_l, lam_l)`` with right-hand side ``g`` (DESIGN.md section 3; the
lifting of the paper's eq. 26). Ordered stage by stage, block ``l`` holds
``[v_l (p_l), u_l (N a_l), lam_l (N a_l)]`` (the last stage only ``v_{L-1}``),
and the symmetric indefinite (KKT) matrix ``K`` reads::

    row v_l  :  (Txx_l + d I) v_l + Tzx_l^T u_{l-1} + Jx_l^T lam_l          = g_l
    row lam_l:  Jz_l u_{l-1} + Jx_l v_l - u_l                                  = 0
    row u_l  :  Tzz_{l+1} u_l + Tzx_{l+1} v_{l+1} + Jz_{l+1}^T lam_{l+1} - lam_l = 0

Eliminating ``u`` (forward, eq. 53) and ``lam`` (backward, eq. 52) leaves
``(H + d I) v = g``. So ``K`` is block tridiagonal with block sizes
``n_l = p_l + 2 N a_l``, and:

* ``inertia(H + dI) = inertia(K) - (m, m, 0)``, ``m = sum_l N a_l`` (the
  ``(u, lam)`` part ``[[T, B^T], [B, 0]]`` with ``B`` square and unit lower
  bidiagonal has inertia ``(m, m, 0)``, Haynsworth);
* ``det(K) = (-1)^m det(H + dI)`` (``det B = (-1)^m``).

**Dropping the null directions.** For a stage whose blocks only see the
parameters through a few directions (a dense layer: ``Jx``, ``Tzx`` and ``Txx``
all live in the row space of ``d layer/dx``, of dimension at most
``N (a_l + a_{l-1})``), let ``Q_l`` (``p_l x k_l``) be an orthonormal basis of
that row space (thin Householder QR, no rank decision). Every direction
``q`` orthogonal to it has ``H q = 0``: it is an eigenvector of ``H + dI``
with eigenvalue ``d``. So ``v_l = Q_l w_l + (I - Q_l Q_l^T) g_l / d``, only
``w_l`` enters ``K`` (block size ``k_l + 2 N a_l`` instead of
``p_l + 2 N a_l``), and the dropped directions add ``p_l - k_l`` eigenvalues
``d`` to the inertia and ``(p_l - k_l) log|d|`` to the log-determinant. With
``d = 0`` they make ``H`` exactly singular (the small-batch null space of
DESIGN.md section 3).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .derivatives import StageBlocks


def _block_diag(blocks: Tensor, transpose: bool = False) -> Tensor:
    """``(N, r, c)`` per-sample blocks -> the ``(N r, N c)`` block-diagonal matrix."""
    if transpose:
        blocks = blocks.transpose(-1, -2)
    n, r, c = blocks.shape
    out = blocks.new_zeros(n, r, n, c)
    idx = torch.arange(n, device=blocks.device)
    out[idx, :, idx, :] = blocks
    return out.reshape(n * r, n * c)


def _basis(b: StageBlocks) -> Tensor | None:
    """Orthonormal ``Q_l`` spanning the parameter directions stage ``l``'s blocks see.

    ``None`` when no reduction is possible or promised (``Q_l = I``).
    """
    if b.x_span is None:
        return None
    p = b.num_params
    rows = [b.x_span.reshape(-1, p)]
    if b.Tzx is not None:
        rows.append(b.Tzx.reshape(-1, p))
    a = torch.cat(rows, dim=0)
    if a.shape[0] >= p:
        return None
    q, _ = torch.linalg.qr(a.T, mode="reduced")  # (p, k)
    return q


class LiftedSystem:
    """The lifted matrix ``K`` of ``H + damping I`` in block-tridiagonal form.

    Attributes:
        diag: Diagonal blocks ``D_l``.
        upper: Super-diagonal blocks ``K[l, l+1]``.
        bases: Per stage ``Q_l`` or ``None`` (see the module doc).
        m: ``sum_l N a_l``, the number of ``u`` (and of ``lam``) unknowns.
        n_dropped: ``sum_l (p_l - k_l)``, eigenvalues equal to ``damping``.
    """

    def __init__(self, blocks: list[StageBlocks], damping: float) -> None:
        self.blocks = blocks
        self.damping = damping
        self.bases = [_basis(b) for b in blocks]
        self.m = sum(b.Jx.shape[0] * b.Jx.shape[1] for b in blocks[:-1])
        self.n_dropped = sum(
            b.num_params - q.shape[1]
            for b, q in zip(blocks, self.bases, strict=True)
            if q is not None
        )
        self.diag, self.upper = self.assemble()

    def release(self) -> None:
        """Drop the assembled blocks (``O(sum n_l^2)`` memory); :meth:`assemble` rebuilds them."""
        self.diag, self.upper = [], []

    @staticmethod
    def _cols(t: Tensor, q: Tensor | None) -> Tensor:
        """Restrict the parameter (last) axis of ``t`` to the basis ``q``."""
        return t if q is None else t @ q

    def assemble(self) -> tuple[list[Tensor], list[Tensor]]:
        """The diagonal blocks ``D_l`` and super-diagonal blocks ``K[l, l+1]``."""
        blocks, d = self.blocks, self.damping
        n_st = len(blocks)
        diag: list[Tensor] = []
        upper: list[Tensor] = []
        for l in range(n_st):  # noqa: E741
            b, q = blocks[l], self.bases[l]
            ref = b.grad_x
            k = b.num_params if q is None else q.shape[1]
            dvv = torch.eye(k, dtype=ref.dtype, device=ref.device) * d
            if b.Txx is not None:
                dvv = dvv + (b.Txx if q is None else q.T @ b.Txx @ q)
            if l == n_st - 1:
                diag.append(dvv)
                continue
            nxt, qn = blocks[l + 1], self.bases[l + 1]
            n, a, _ = b.Jx.shape
            m = n * a
            jx = self._cols(b.Jx.reshape(m, -1), q)
            eye = torch.eye(m, dtype=ref.dtype, device=ref.device)
            dl = ref.new_zeros(k + 2 * m, k + 2 * m)
            dl[:k, :k] = dvv
            dl[:k, k + m :] = jx.T
            dl[k + m :, :k] = jx
            dl[k : k + m, k : k + m] = _block_diag(nxt.Tzz)
            dl[k : k + m, k + m :] = -eye
            dl[k + m :, k : k + m] = -eye
            diag.append(dl)
            tzx = self._cols(nxt.Tzx.reshape(m, -1), qn)
            kn = tzx.shape[1]
            last_next = l + 1 == n_st - 1
            mn = 0 if last_next else nxt.Jx.shape[0] * nxt.Jx.shape[1]
            ul = ref.new_zeros(k + 2 * m, kn + 2 * mn)
            ul[k : k + m, :kn] = tzx
            if not last_next:
                ul[k : k + m, kn + mn :] = _block_diag(nxt.Jz, transpose=True)
            upper.append(ul)
        return diag, upper

    def rhs(self, g: Tensor) -> list[Tensor]:
        """Right-hand side ``[Q_l^T g_l, 0, 0]`` per block, for ``g`` of shape ``(W, r)``."""
        out = []
        for l, gl in enumerate(self._split(g)):  # noqa: E741
            q = self.bases[l]
            piece = gl if q is None else q.T @ gl
            b = self.blocks[l]
            extra = 0 if l == len(self.blocks) - 1 else 2 * b.Jx.shape[0] * b.Jx.shape[1]
            if extra:
                piece = torch.cat([piece, g.new_zeros(extra, g.shape[1])], dim=0)
            out.append(piece)
        return out

    def extract(self, x: list[Tensor], g: Tensor) -> Tensor:
        """``v_l = Q_l w_l + (g_l - Q_l Q_l^T g_l) / d`` from a lifted solution."""
        out = []
        for l, gl in enumerate(self._split(g)):  # noqa: E741
            q = self.bases[l]
            if q is None:
                out.append(x[l][: gl.shape[0]])
                continue
            w = x[l][: q.shape[1]]
            perp = gl - q @ (q.T @ gl)
            out.append(q @ w + perp / self.damping)
        return torch.cat(out, dim=0)

    def _split(self, g: Tensor) -> list[Tensor]:
        return list(torch.split(g, [b.num_params for b in self.blocks], dim=0))

    @property
    def singular_by_structure(self) -> bool:
        """True if directions were dropped and ``damping == 0`` (exact null space)."""
        return self.n_dropped > 0 and self.damping == 0.0

    def dropped_inertia(self) -> tuple[int, int, int]:
        """The dropped directions' contribution: ``n_dropped`` eigenvalues ``d``."""
        nd = self.n_dropped
        if self.damping > 0:
            return nd, 0, 0
        if self.damping < 0:
            return 0, nd, 0
        return 0, 0, nd

    def dropped_logdet(self) -> tuple[float, float]:
        """``(sign, log|det|)`` contribution of the dropped directions."""
        nd = self.n_dropped
        if nd == 0:
            return 1.0, 0.0
        if self.damping == 0.0:
            return 0.0, -math.inf
        sign = -1.0 if (self.damping < 0 and nd % 2) else 1.0
        return sign, nd * math.log(abs(self.damping))

    def dense(self) -> Tensor:
        """Assemble ``K`` densely (tests and small problems only)."""
        return lifted_dense(*self.assemble())


def lifted_dense(diag: list[Tensor], upper: list[Tensor]) -> Tensor:
    """Assemble a symmetric block-tridiagonal matrix densely."""
    sizes = [d.shape[0] for d in diag]
    off = [0]
    for s in sizes:
        off.append(off[-1] + s)
    k = diag[0].new_zeros(off[-1], off[-1])
    for l, d in enumerate(diag):  # noqa: E741
        k[off[l] : off[l + 1], off[l] : off[l + 1]] = d
    for l, u in enumerate(upper):  # noqa: E741
        k[off[l] : off[l + 1], off[l + 1] : off[l + 2]] = u
        k[off[l + 1] : off[l + 2], off[l] : off[l + 1]] = u.T
    return k
