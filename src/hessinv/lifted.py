"""The augmented (lifted) block-tridiagonal system whose Schur complement is ``H``.

Treat the recursions of :mod:`hessinv.products` as equations in the unknowns
``(v_l, u_l, lam_l)`` with right-hand side ``g`` (the
lifting of the paper's eq. 26). The symmetric indefinite (KKT) matrix ``K``
reads::

    row v_l  :  (Txx_l + d I) v_l + Tzx_l^T u_{l-1} + Jx_l^T lam_l          = g_l
    row lam_l:  Jz_l u_{l-1} + Jx_l v_l - u_l                                  = 0
    row u_l  :  Tzz_{l+1} u_l + Tzx_{l+1} v_{l+1} + Jz_{l+1}^T lam_{l+1} - lam_l = 0

Eliminating ``u`` (forward, eq. 53) and ``lam`` (backward, eq. 52) leaves
``(H + d I) v = g``.

**Ordering.** ``(v_l, lam_l)`` is coupled to the rest only through ``u_{l-1}``
and ``u_l``, so the ``u_l`` (``N a_l`` unknowns each) separate the stages. We
order the unknowns ``(v_0, lam_0), u_0, (v_1, lam_1), u_1, ..., v_{L-1}``:
``K`` is block tridiagonal with ``2L - 1`` blocks of sizes ``p_l + N a_l`` and
``N a_l`` alternating::

    D(v_l, lam_l)                = [[Txx_l + dI, Jx_l^T], [Jx_l, 0]]
    D(u_l)                       = Tzz_{l+1}
    K[(v_l, lam_l), u_l]         = [0; -I]
    K[u_l, (v_{l+1}, lam_{l+1})] = [Tzx_{l+1}, Jz_{l+1}^T]

A pivoted block LU then costs about ``1.5 n c^2 + 2 n c m_l + 1.5 n m_l^2``
multiply-adds per stage (``n = p_l + 2 m_l``, ``c = p_l + m_l``, ``m_l = N a_l``)
instead of ``4.7 n^3`` with one block of size ``n`` per stage (the same
unknowns, less fill-in): a quarter when ``p_l = 2 m_l``. It stores ``2 n^2``
numbers per stage instead of ``4 n^2``. Its row interchanges are those of
LAPACK's banded LU with partial pivoting on this ordering. Since ``K`` is only
symmetrically permuted:

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
``w_l`` enters ``K`` (block size ``k_l + N a_l`` instead of
``p_l + N a_l``), and the dropped directions add ``p_l - k_l`` eigenvalues
``d`` to the inertia and ``(p_l - k_l) log|d|`` to the log-determinant. With
``d = 0`` they make ``H`` exactly singular (the small-batch null space).

**Equilibration.** ``K`` mixes blocks that do not depend on the loss's scale
(``Jz``, ``Jx``, ``-I``) with curvature blocks that scale with it (``Txx + dI``,
``Tzz``, ``Tzx``): for the loss ``c l`` at damping ``c d`` a pivot threshold
global to ``K`` would see a different matrix. With ``s`` the power of two
nearest to the largest curvature entry (:func:`curvature_scale`) the system is
built as ``K' = S K S``, ``S = diag(s^{-1/2}`` on ``v, u``; ``s^{1/2}`` on
``lam)``: the curvature blocks are divided by ``s``, the Jacobian blocks are
unchanged, the right-hand side of the ``v`` rows is ``g / s``, and the solution
is ``(v, u, lam / s)``. A congruence keeps the inertia, and ``log|det K| =
log|det K'| + (sum_l k_l) log s``. Since ``s`` is a power of two, ``K'`` for
``c = 2^j`` is bit for bit the ``K'`` for ``c = 1``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import overload

import torch
from torch import Tensor

from .derivatives import StageBlocks
from .lifted_bases import (  # noqa: F401 - re-exported: the bases' names as before
    KEEP_ALL,
    KEEP_ALL_DAMPING,
    Projected,
    _basis,
    _basis_factors,
    _project,
    _txx_on,
    project_on,
    projected,
    projected_all,
)
from .lifted_maps import BasisMaps


def _block_diag(blocks: Tensor, transpose: bool = False) -> Tensor:
    """``(N, r, c)`` per-sample blocks -> the ``(N r, N c)`` block-diagonal matrix."""
    if transpose:
        blocks = blocks.transpose(-1, -2)
    n, r, c = blocks.shape
    out = blocks.new_zeros(n, r, n, c)
    idx = torch.arange(n, device=blocks.device)
    out[idx, :, idx, :] = blocks
    return out.reshape(n * r, n * c)


class _LazyBlocks(Sequence[Tensor]):
    """A read-only sequence whose items are built on access (never all in memory)."""

    def __init__(self, n: int, build: Callable[[int], Tensor]) -> None:
        self._n, self._build = n, build

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> Tensor: ...
    @overload
    def __getitem__(self, i: slice) -> list[Tensor]: ...
    def __getitem__(self, i: int | slice) -> Tensor | list[Tensor]:
        if isinstance(i, slice):
            return [self._build(j) for j in range(*i.indices(self._n))]
        if not -self._n <= i < self._n:
            raise IndexError(i)
        return self._build(i % self._n)


class LiftedSystem:
    """The lifted matrix ``K`` of ``H + damping I`` in block-tridiagonal form.

    The blocks are built on demand (``diag[i]``, ``upper[i]``), so a
    factorization that consumes them in order holds ``O(1)`` of them at a time.

    Attributes:
        diag: Diagonal blocks ``D_i`` (a lazy sequence), ``2 L - 1`` of them.
        upper: Super-diagonal blocks ``K[i, i+1]`` (a lazy sequence).
        sizes: The block sizes ``k_l + N a_l`` and ``N a_l`` alternating, then ``k_{L-1}``.
        bases: Per stage ``Q_l`` or ``None`` (see the module doc).
        m: ``sum_l N a_l``, the number of ``u`` (and of ``lam``) unknowns.
        n_dropped: ``sum_l (p_l - k_l)``, eigenvalues equal to ``damping``.
        scale: The equilibration ``s`` (module doc): curvature blocks are divided by it.
        dtype: Working dtype of ``K`` (e.g. float64 for counting the signs of a
            float32 operator's ``K``); ``None`` keeps the blocks' dtype.
    """

    def __init__(
        self,
        blocks: list[StageBlocks],
        damping: float,
        scale: float = 1.0,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.blocks = blocks
        self.damping = damping
        self.scale = scale
        self.dtype = dtype  # blocks are cast to it as they are built (None: as the blocks)
        keep_all = abs(damping) >= KEEP_ALL_DAMPING * scale
        self._proj = projected_all(blocks, keep_all)
        self._k = [pr.k(b.num_params) for b, pr in zip(blocks, self._proj, strict=True)]
        self._m = [b.rows("Jx") for b in blocks[:-1]]
        self.m = sum(self._m)
        self.n_dropped = sum(b.num_params for b in blocks) - sum(self._k)
        n_st = len(blocks)
        self.sizes: list[int] = []
        for l in range(n_st - 1):  # noqa: E741
            self.sizes += [self._k[l] + self._m[l], self._m[l]]
        self.sizes.append(self._k[-1])
        params = [b.num_params for b in blocks]
        krons = [pr.kron for pr in self._proj]
        dense = [None if pr.kron is not None else pr.q for pr in self._proj]
        self._maps = BasisMaps(dense, params, self._k, self._m, krons)

    @property
    def bases(self) -> list[Tensor | None]:
        """Per stage ``Q_l`` (``p_l x k_l``; ``None`` for ``Q_l = I``), formed on access."""
        return [pr.q for pr in self._proj]

    # diag and upper are made on access: a lazy sequence stored on self would hold a bound
    # method of self, a reference cycle that only Python's cyclic collector frees
    @property
    def diag(self) -> Sequence[Tensor]:
        """The diagonal blocks ``D_i`` (lazy, built on access)."""
        return _LazyBlocks(len(self.sizes), self._cast(self._diag_block))

    @property
    def upper(self) -> Sequence[Tensor]:
        """The super-diagonal blocks ``K[i, i+1]`` (lazy, built on access)."""
        return _LazyBlocks(len(self.sizes) - 1, self._cast(self._upper_block))

    def _cast(self, build: Callable[[int], Tensor]) -> Callable[[int], Tensor]:
        if self.dtype is None:
            return build
        return lambda i: build(i).to(self.dtype)

    def _vv(self, l: int) -> Tensor:  # noqa: E741
        """``Q_l^T (Txx_l + d I) Q_l`` (divided by the scale ``s``)."""
        txx, k = self._proj[l].txx, self._k[l]
        if txx is None:
            ref = self.blocks[l].grad_x
            return torch.eye(k, dtype=ref.dtype, device=ref.device) * (self.damping / self.scale)
        dvv = txx / self.scale
        dvv.diagonal().add_(self.damping / self.scale)  # dvv is a new tensor
        return dvv

    def _diag_block(self, i: int) -> Tensor:
        """``[[Txx + dI, Jx^T], [Jx, 0]]`` for ``(v_l, lam_l)``, ``Tzz_{l+1}`` for ``u_l``."""
        l, odd = divmod(i, 2)  # noqa: E741
        if odd:
            return _block_diag(self.blocks[l + 1].Tzz / self.scale)
        dvv = self._vv(l)
        if l == len(self.blocks) - 1:
            return dvv
        m, k = self._m[l], self._k[l]
        jx = self._proj[l].jx
        out = dvv.new_empty(k + m, k + m)  # one buffer, no nested concatenations
        out[:k, :k] = dvv
        out[:k, k:] = jx.T
        out[k:, :k] = jx
        out[k:, k:] = 0.0
        return out

    def _upper_block(self, i: int) -> Tensor:
        """``K[i, i+1]``: ``[0; -I]`` (``lam_l`` row, ``u_l`` column), or ``[Tzx, Jz^T]``."""
        l, odd = divmod(i, 2)  # noqa: E741
        ref = self.blocks[l].grad_x
        if not odd:
            k, m = self._k[l], self._m[l]
            out = ref.new_zeros(k + m, m)
            out[k:].diagonal().fill_(-1.0)
            return out
        nxt = self.blocks[l + 1]
        tzx = self._proj[l + 1].tzx / self.scale
        if l + 1 == len(self.blocks) - 1:
            return tzx
        return torch.cat([tzx, _block_diag(nxt.Jz, transpose=True)], dim=1)

    def assemble(self) -> tuple[list[Tensor], list[Tensor]]:
        """All diagonal blocks ``D_i`` and super-diagonal blocks ``K[i, i+1]``, as lists."""
        return list(self.diag[:]), list(self.upper[:])

    def rhs(self, g: Tensor) -> list[Tensor]:
        """Right-hand side per block, for ``g`` of shape ``(W, r)``.

        ``[Q_l^T g_l / s; 0]`` for ``(v_l, lam_l)``, ``0`` for ``u_l``, ``Q^T g / s`` for
        the last ``v`` (batched over runs of equal stages, :mod:`hessinv.lifted_maps`).
        """
        return self._maps.rhs(g, self.scale)[0]

    def rhs_and_projections(self, g: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """:meth:`rhs`, and the ``Q_l^T g_l`` that :meth:`extract` can reuse."""
        return self._maps.rhs(g, self.scale)

    def extract(
        self,
        x: list[Tensor],
        g: Tensor,
        kept_only: bool = False,
        *,
        n_full: int | None = None,
        projections: list[Tensor] | None = None,
    ) -> Tensor:
        """``v_l = Q_l w_l + (g_l - Q_l Q_l^T g_l) / d`` from a lifted solution.

        ``kept_only``: leave out the dropped directions' part (the solve
        restricted to the kept directions, defined also for ``d = 0``);
        ``n_full``: only the first ``n_full`` columns get it.
        ``projections``: ``Q_l^T g_l`` from :meth:`rhs_and_projections`.
        """
        if n_full is None:
            n_full = 0 if kept_only else g.shape[1]
        return self._maps.extract(x[::2], g, self.damping, n_full, projections)

    @property
    def projections(self) -> list[Projected]:
        """Per stage the blocks on the kept basis (shared with the stage Riccati solver)."""
        return self._proj

    def kept_rhs(self, g: Tensor) -> list[Tensor]:
        """``Q_l^T g_l`` stacked per run of equal stages (``(n, k_l, r)`` each).

        As :meth:`extract_kept` reads them back; the runs' sizes are :attr:`run_sizes`.
        """
        return self._maps.project(g)

    @property
    def run_sizes(self) -> list[int]:
        """Stages per run of :meth:`kept_rhs`."""
        return self._maps.sizes

    @property
    def run_kept(self) -> list[int]:
        """Kept directions per stage of each run of :meth:`kept_rhs` (``k_l``)."""
        return self._maps.kept

    def extract_kept(
        self, w: list[Tensor], g: Tensor, n_full: int, projections: list[Tensor]
    ) -> Tensor:
        """:meth:`extract` from kept solutions ``w_l`` stacked per run (as :meth:`kept_rhs`)."""
        return self._maps.extract_runs(w, g, self.damping, n_full, projections)

    def project_kept(self, g: Tensor) -> Tensor:
        """``Q_l Q_l^T g_l`` per stage: the part of ``g`` in the kept directions."""
        return self._maps.project_kept(g)

    @property
    def n_kept(self) -> int:
        """``sum_l k_l``: the ``v`` unknowns of ``K``."""
        return sum(self._k)

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


def curvature_scale(blocks: list[StageBlocks], damping: float) -> float:
    """The equilibration ``s``: the power of two nearest the largest curvature entry.

    ``max(|d|, max |Txx|, max |Tzz|, max |Tzx|)`` over the stages, rounded to a
    power of two (so that scaling is exact); ``1`` when all of them vanish.
    """
    maxima = [
        m for b in blocks for name in ("Tzz", "Tzx", "Txx") if (m := b.absmax(name)) is not None
    ]  # read on the host once (one device synchronization, not one per block); lazy
    # blocks from their factors (hessinv.derivatives.blocks.LazyBlock)
    big = max(abs(damping), float(torch.stack(maxima).amax()) if maxima else 0.0)
    if big == 0.0 or not math.isfinite(big):
        return 1.0
    return 2.0 ** round(math.log2(big))


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
