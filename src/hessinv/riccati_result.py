"""The outcome of the Riccati stage pass, and its positive definite solve.

:func:`hessinv.riccati.riccati_pass` fills a :class:`RiccatiResult`; with every
pivot ``Q_vv = F F^T`` positive definite, ``(H + dI) x = g`` is the stationarity
condition of the linear-quadratic problem of :mod:`hessinv.riccati` with the
linear cost ``-g^T v``, solved by one backward and one forward sweep.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .derivatives import StageBlocks
from .errors import HINT, SingularHessianError


@dataclass
class _Pivot:
    """``Q_vv = F F^T`` (``F = L``, Cholesky) or ``Q_vv = V diag(lam) V^T``."""

    chol: Tensor | None = None
    vecs: Tensor | None = None
    vals: Tensor | None = None

    def inv(self, x: Tensor) -> Tensor:
        """``F^{-1} x`` (positive definite pivots only)."""
        if self.chol is not None:
            return torch.linalg.solve_triangular(self.chol, x, upper=False)
        return (self.vecs.T @ x) / self.vals.sqrt().unsqueeze(1)

    def inv_t(self, x: Tensor) -> Tensor:
        """``F^{-T} x`` (positive definite pivots only)."""
        if self.chol is not None:
            return torch.linalg.solve_triangular(self.chol.T, x, upper=True)
        return self.vecs @ (x / self.vals.sqrt().unsqueeze(1))


@dataclass
class _Stage:
    """What the solve needs of one stage: its pivot, ``Y = F^{-1} Q_vu`` and ``Jx Q``.

    ``basis``: ``Q`` (``None`` for ``Q = I``), or the projection holding it
    (anything with a ``q`` attribute: formed on the solve's first read).
    """

    pivot: _Pivot
    y: Tensor | None
    jx: Tensor | None
    basis: object

    @property
    def q(self) -> Tensor | None:
        """The stage's kept basis ``Q`` (``None`` for ``Q = I``)."""
        b = self.basis
        return b if b is None or isinstance(b, Tensor) else b.q  # type: ignore[attr-defined]


@dataclass
class RiccatiResult:
    """Outcome of :func:`riccati_pass` for ``H + damping I``.

    Attributes:
        positive_definite: True only when proven (see the module doc).
        pd_status: True (proven PD), False (proven not PD) or None (undecided).
        failed_stage: The first stage (0-based) whose pivot was not certified
            positive definite, or None.
        inertia: ``(pos, neg, zero)`` from the pivots' inertias, dropped
            directions included; None when the pass stopped early (a failed
            Cholesky in ``"cholesky"`` mode, or overflow).
        reliable: True when every pivot was separated from singular by more
            than twice its error bound: ``inertia`` is then exact.
        logdet: ``(sign, log|det(H + dI)|)``, or None with ``inertia``.
        margins: Per stage, the pivot's smallest ``|eigenvalue|`` (or a lower
            bound) divided by its error bound ``e_l`` (inf when ``e_l = 0``).
        errors: Per stage, ``e_l``: the bound on ``|fl(Q_vv) - Q_vv|_F``.
        pivot_eigvals: Per stage the computed pivot's eigenvalues (``"inertia"``
            mode; None in ``"cholesky"`` mode).
        mode: ``"cholesky"`` or ``"inertia"``.
    """

    positive_definite: bool
    pd_status: bool | None
    failed_stage: int | None
    inertia: tuple[int, int, int] | None
    reliable: bool
    logdet: tuple[float, float] | None
    margins: list[float]
    errors: list[float]
    pivot_eigvals: list[Tensor | None]
    mode: str
    damping: float
    blocks: list[StageBlocks] = field(repr=False)
    _stages: list[_Stage] = field(repr=False)

    def solve(self, g: Tensor) -> Tensor:
        """``(H + dI)^{-1} g`` by the Riccati sweeps, for ``g`` of shape ``(W, r)`` or ``(W,)``.

        Backward sweep: ``q = Jx^T s - Q^T g_l``, ``z_l = F^{-1} q``,
        ``s <- Jz^T s - Y^T z_l``; forward sweep: ``w_l = -F^{-T} (Y u_{l-1} +
        z_l)``, ``u_l = Jz u_{l-1} + Jx Q w_l``; then ``v_l = Q w_l + (g_l -
        Q Q^T g_l) / d``. It minimises ``1/2 v^T (H + dI) v - g^T v`` stage by
        stage; with every pivot positive definite it is the backward-stable
        Cholesky solve of the optimal-control literature (iLQR, HPIPM).

        Raises:
            SingularHessianError: ``H + dI`` was not proven positive definite.
            ValueError: ``g`` has the wrong number of rows.
        """
        if not self.positive_definite:
            raise SingularHessianError(
                "riccati solve: H + damping*I was not proven positive definite "
                f"(stage {self.failed_stage}); use the lifted LU (H.solve). {HINT}"
            )
        sizes = [b.num_params for b in self.blocks]
        vec = g.dim() == 1
        gm = g.unsqueeze(1) if vec else g
        if gm.dim() != 2 or gm.shape[0] != sum(sizes):
            raise ValueError(f"riccati solve: g must have {sum(sizes)} rows, got {tuple(g.shape)}")
        gs = list(torch.split(gm, sizes, dim=0))
        n_st = len(self.blocks)
        zs: list[Tensor] = [None] * n_st  # type: ignore[list-item]
        s: Tensor | None = None
        for l in reversed(range(n_st)):  # noqa: E741
            st, b = self._stages[l], self.blocks[l]
            basis = st.q
            q = -(gs[l] if basis is None else basis.T @ gs[l])
            if s is not None:
                q = q + st.jx.T @ s
            zs[l] = st.pivot.inv(q)
            if l > 0:
                s_new = -(st.y.T @ zs[l])
                if s is not None:
                    n, a, a_in = b.Jz.shape
                    jzs = b.Jz.transpose(-1, -2) @ s.reshape(n, a, -1)
                    s_new = s_new + jzs.reshape(n * a_in, -1)
                s = s_new
        out = []
        u: Tensor | None = None
        for l in range(n_st):  # noqa: E741
            st, b = self._stages[l], self.blocks[l]
            t = zs[l] if u is None else zs[l] + st.y @ u
            w = -st.pivot.inv_t(t)
            if l < n_st - 1:
                u_new = st.jx @ w
                if u is not None:
                    n, a, a_in = b.Jz.shape
                    u_new = u_new + (b.Jz @ u.reshape(n, a_in, -1)).reshape(n * a, -1)
                u = u_new
            q = st.q
            if q is None:
                out.append(w)
            else:
                out.append(q @ w + (gs[l] - q @ (q.T @ gs[l])) / self.damping)
        x = torch.cat(out, dim=0)
        return x.squeeze(1) if vec else x
