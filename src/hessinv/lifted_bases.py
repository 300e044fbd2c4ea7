"""Each stage's kept basis ``Q_l`` and its blocks projected on it (:class:`Projected`).

The parameter directions a stage's blocks see span ``Q_l``; the others are
null directions of ``H`` that the lifted system drops (:mod:`hessinv.lifted`,
"Dropping the null directions"). A thin QR of the promised rows, or for a
Linear stage the Kronecker basis from its factors
(:meth:`~hessinv.derivatives.blocks.KronX.kept_basis`); runs of such stages are
projected in closed form, batched (:mod:`hessinv.kron_projection`). The
projections are cached on the stage blocks and shared by every factorization.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .derivatives import StageBlocks
from .derivatives.kron_basis import KronBasis
from .kron_projection import factored_stage, project_run, run_key

#: With a damping of at least ``KEEP_ALL_DAMPING`` times the curvature scale ``s``
#: a stage keeps all its parameter directions (``Q_l = I``) when the row space may
#: have dimension ``k_l >= KEEP_ALL * p_l``: dropping the few others saves less in
#: the block LU (``(p + m)^3 - (k + m)^3``) than the thin QR and the projections
#: cost (``~2 p k^2 + 2 p^2 k``). With a smaller damping the dropped directions
#: (eigenvalue ``d``, the null space at ``d = 0``) are always split off: left in
#: ``K`` they are pivots at round-off level that the sign counts cannot resolve.
KEEP_ALL = 0.8
KEEP_ALL_DAMPING = 1e-6


def _basis(b: StageBlocks, keep_all: bool = False) -> Tensor | None:
    """Orthonormal ``Q_l`` spanning the parameter directions stage ``l``'s blocks see.

    A thin QR of the rows of ``x_span`` and ``Tzx``; for a Linear stage whose
    Kronecker factors are at hand, :meth:`~hessinv.derivatives.blocks.KronX.kept_basis`
    (QRs of ``c x N`` and ``a x N`` only; the same span or a little more).

    ``None`` when no reduction is possible or promised, or (``keep_all``: a
    damping large enough, :data:`KEEP_ALL_DAMPING`) not worth its cost
    (:data:`KEEP_ALL`): ``Q_l = I``.
    """
    return _basis_factors(b, keep_all)[0]


def _reducible(b: StageBlocks, keep_all: bool) -> bool:
    """The stage promises a span (``x_span``) of fewer rows than ``p`` (worth it: ``keep_all``)."""
    if not b.has("x_span"):
        return False
    p = b.num_params
    n_rows = b.rows("x_span") + b.rows("Tzx")
    return not (n_rows >= p or (keep_all and n_rows >= KEEP_ALL * p))


def _kron_basis(b: StageBlocks, keep_all: bool) -> bool:
    """:func:`_basis` comes from the stage's Kronecker factors (no QR of the rows)."""
    kron = b.kron_x
    return (
        _reducible(b, keep_all)
        and kron is not None
        and kron.on(b.grad_x)
        and (not b.has("Tzx") or kron.b_y is not None)
    )


def _basis_factors(b: StageBlocks, keep_all: bool) -> tuple[Tensor | None, KronBasis | None]:
    """:func:`_basis`, and its Kronecker factors when it came from them."""
    if not _reducible(b, keep_all):
        return None, None
    p = b.num_params
    if _kron_basis(b, keep_all):
        factors = b.kron_x.kept_basis(b.has("Tzx"))  # no QR of the rows
        q = factors.dense()
        return (q, factors) if q.shape[1] < p else (None, None)
    rows = [b.x_span.reshape(-1, p)]
    if b.Tzx is not None:
        rows.append(b.Tzx.reshape(-1, p))
    a = torch.cat(rows, dim=0)
    q, _ = torch.linalg.qr(a.T, mode="reduced")  # (p, k)
    return q, None


@dataclass
class Projected:
    """Stage ``l``'s blocks restricted to its kept basis ``Q_l`` (unscaled, no damping).

    Attributes:
        q_dense: ``Q_l`` (``p_l x k_l``) when formed; ``None`` for ``Q_l = I``
            or (``kron`` set) until :attr:`q` is read.
        txx: ``Q_l^T Txx_l Q_l`` (``None`` when ``Txx`` is).
        jx: ``Jx_l Q_l`` as ``(N a_l, k_l)`` (``None`` for the last stage).
        tzx: ``Tzx_l Q_l`` as ``(N a_{l-1}, k_l)`` (``None`` for the first stage).
        kron: ``Q_l``'s Kronecker factors, when it came from them (for the basis maps).
    """

    q_dense: Tensor | None
    txx: Tensor | None
    jx: Tensor | None
    tzx: Tensor | None
    kron: KronBasis | None = None

    @property
    def identity(self) -> bool:
        """``Q_l = I``: the stage keeps every parameter direction."""
        return self.q_dense is None and self.kron is None

    @property
    def q(self) -> Tensor | None:
        """``Q_l`` (``None`` for ``Q_l = I``), formed from its factors on first read."""
        if self.q_dense is None and self.kron is not None:
            self.q_dense = self.kron.dense()
        return self.q_dense

    def k(self, p: int) -> int:
        """``k_l`` for a stage of ``p`` parameters."""
        if self.kron is not None:
            return self.kron.k
        return p if self.q_dense is None else self.q_dense.shape[1]


def _project(b: StageBlocks, q: Tensor | None) -> Projected:
    p = b.num_params  # explicit row counts: -1 is ambiguous for a stage without parameters
    jx = None if b.Jx is None else b.Jx.reshape(b.Jx.shape[0] * b.Jx.shape[1], p)
    tzx = None if b.Tzx is None else b.Tzx.reshape(b.Tzx.shape[0] * b.Tzx.shape[1], p)
    if q is None:
        return Projected(q, b.Txx, jx, tzx)
    jx = None if jx is None else jx @ q
    tzx = None if tzx is None else tzx @ q
    txx = None if b.__dict__["Txx"] is None else _txx_on(b, q)
    return Projected(q, txx, jx, tzx)


def _txx_on(b: StageBlocks, q: Tensor) -> Tensor:
    """``Q^T Txx Q``: from a Linear stage's Kronecker factors when ``Txx`` is theirs alone."""
    kron = b.kron_x
    if kron is not None and kron.tg is not None and kron.on(q) and not b.txx_zero:
        return kron.txx_on(q)
    return q.T @ b.Txx @ q


def projected(b: StageBlocks, keep_all: bool = False) -> Projected:
    """:class:`Projected` blocks of a stage on its basis :func:`_basis` (``keep_all``), cached.

    Kept on the stage blocks themselves (they do not change once built), so
    the factorization, its shifted copies, both congruences of the inertia and
    the Riccati pass share one thin QR and one projection per stage. The
    cache is at most the size of the blocks it is computed from.
    """
    cache = b.__dict__.setdefault("_projected", {})
    if keep_all not in cache:
        q, kron = _basis_factors(b, keep_all)
        pr = _project(b, q)
        pr.kron = kron
        cache[keep_all] = pr
    return cache[keep_all]


def projected_all(blocks: Sequence[StageBlocks], keep_all: bool = False) -> list[Projected]:
    """:func:`projected` of every stage; runs of factored Linear stages batched.

    Consecutive stages whose kept basis comes from their Kronecker factors and
    whose projections have closed forms (:func:`hessinv.kron_projection.factored_stage`)
    get their bases and projections in one batched pass per run of equal
    shapes (:func:`~hessinv.kron_projection.project_run`); the others (and
    stages already cached) through :func:`projected`.
    """
    todo = [
        i
        for i, b in enumerate(blocks)
        if keep_all not in b.__dict__.get("_projected", {})
        and _kron_basis(b, keep_all)
        and factored_stage(b)
    ]
    runs: list[list[int]] = []
    for i in todo:
        if runs and runs[-1][-1] == i - 1 and run_key(blocks[i]) == run_key(blocks[i - 1]):
            runs[-1].append(i)
        else:
            runs.append([i])
    for run in runs:
        for i, (basis, txx, jx, tzx) in zip(
            run, project_run([blocks[i] for i in run]), strict=True
        ):
            if basis.k < blocks[i].num_params:  # as _basis_factors: a reduction or Q = I
                pr = Projected(None, txx, jx, tzx, basis)
                blocks[i].__dict__.setdefault("_projected", {})[keep_all] = pr
    return [projected(b, keep_all) for b in blocks]


def project_on(b: StageBlocks, q: Tensor | None) -> Projected:
    """Stage blocks on the basis ``q``: the cached :func:`projected` if it has this ``q``."""
    for pr in b.__dict__.get("_projected", {}).values():
        if pr.q is q:
            return pr
    return _project(b, q)
