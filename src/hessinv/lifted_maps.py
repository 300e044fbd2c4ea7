"""Maps between parameter vectors and the lifted unknowns, batched over runs of stages.

The lifted system (:mod:`hessinv.lifted`) keeps ``w_l = Q_l^T v_l`` for each
stage; a solve maps the right-hand side ``g`` to ``[Q_l^T g_l / s; 0]`` per
``(v_l, lam_l)`` block and back by ``v_l = Q_l w_l + (g_l - Q_l Q_l^T g_l) / d``.
Stage by stage that is a few small products per stage, which on a deep
network cost as much as the solve itself. A network's stages mostly repeat:
consecutive stages with the same sizes ``(p_l, k_l, N a_l)`` form a *run*,
whose bases are stacked once into a ``(n, p, k)`` tensor, and each map is one
batched product per run (the rows of a run are contiguous in ``g``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .derivatives.kron_basis import KronBasis, KronStack


class _DenseStack:
    """``Q^T x`` and ``Q w`` for a run's stacked dense bases ``(n, p, k)``."""

    def __init__(self, qs: Tensor) -> None:
        self.qs = qs

    def t(self, x: Tensor) -> Tensor:
        return self.qs.mT @ x

    def q(self, w: Tensor) -> Tensor:
        return self.qs @ w


@dataclass
class _Run:
    """A run of ``n`` equal stages from ``first``, their rows from ``offset`` in ``g``.

    Each has ``p`` parameters, ``k`` kept directions and ``m`` ``u`` unknowns;
    ``qs`` applies their stacked bases (``None``: ``Q_l = I``), dense or from
    their Kronecker factors (:class:`~hessinv.derivatives.kron_basis.KronStack`).
    """

    first: int
    n: int
    offset: int
    p: int
    k: int
    m: int
    qs: _DenseStack | KronStack | None


class BasisMaps:
    """``rhs``, ``extract`` and ``project_kept`` of :class:`hessinv.lifted.LiftedSystem`.

    Args:
        bases: Per stage ``Q_l`` or ``None``.
        params: Per stage ``p_l``.
        kept: Per stage ``k_l``.
        ms: Per stage ``m_l = N a_l`` (all but the last stage).
        krons: Per stage ``Q_l``'s Kronecker factors or ``None`` (then ``Q_l`` dense).
    """

    def __init__(
        self,
        bases: list[Tensor | None],
        params: list[int],
        kept: list[int],
        ms: list[int],
        krons: list[KronBasis | None] | None = None,
    ) -> None:
        self.n_stages = len(bases)
        last = self.n_stages - 1
        kr = krons if krons is not None else [None] * self.n_stages
        self.runs: list[_Run] = []
        off, l = 0, 0  # noqa: E741
        while l < self.n_stages:
            key = self._key(bases, params, kept, ms, kr, l)
            j = l + 1
            while j < last and l < last and self._key(bases, params, kept, ms, kr, j) == key:
                j += 1
            qs: _DenseStack | KronStack | None = None
            if kr[l] is not None:
                qs = KronStack(kr[l:j])  # type: ignore[arg-type]
            elif bases[l] is not None:
                qs = _DenseStack(torch.stack(bases[l:j]))
            m = ms[l] if l < last else 0
            self.runs.append(_Run(l, j - l, off, params[l], kept[l], m, qs))
            off += (j - l) * params[l]
            l = j  # noqa: E741

    @staticmethod
    def _key(bases, params, kept, ms, krons, l):  # noqa: ANN001, ANN205, E741
        q, kron = bases[l], krons[l]
        shape = None if q is None else tuple(q.shape)
        form = None if kron is None else kron.key()
        return (shape, form, params[l], kept[l], ms[l] if l < len(ms) else 0)

    def _rows(self, g: Tensor, run: _Run) -> Tensor:
        """Rows of ``g`` for the run's stages as ``(n, p, r)`` (a view)."""
        return g[run.offset : run.offset + run.n * run.p].reshape(run.n, run.p, g.shape[1])

    def rhs(self, g: Tensor, scale: float) -> tuple[list[Tensor], list[Tensor]]:
        """``[Q_l^T g_l / s; 0]`` per ``(v_l, lam_l)``, ``0`` per ``u_l``, ``Q^T g / s`` last.

        Returns:
            The blocks, and per run ``Q_l^T g_l`` (``(n, k, r)``) for :meth:`extract`.
        """
        out: list[Tensor] = []
        projections = self.project(g)
        r = g.shape[1]
        last = self.n_stages - 1
        for run, piece in zip(self.runs, projections, strict=True):
            if run.first == last:
                out.append(piece[0] / scale)
                continue
            buf = g.new_zeros(run.n, run.k + run.m, r)
            torch.div(piece, scale, out=buf[:, : run.k])
            zero_u = g.new_zeros(run.m, r)  # read only by the solve: shared
            for i in range(run.n):
                out += [buf[i], zero_u]
        return out, projections

    def project(self, g: Tensor) -> list[Tensor]:
        """Per run ``Q_l^T g_l`` as ``(n, k, r)`` (``g_l`` itself where ``Q_l = I``)."""
        out = []
        for run in self.runs:
            rows = self._rows(g, run)
            out.append(rows if run.qs is None else run.qs.t(rows))
        return out

    def extract(
        self,
        x: list[Tensor],
        g: Tensor,
        damping: float,
        n_full: int,
        projections: list[Tensor] | None = None,
    ) -> Tensor:
        """``v_l = Q_l w_l + (g_l - Q_l Q_l^T g_l) / d`` for the first ``n_full`` columns.

        ``x[l]``: stage ``l``'s solution, ``w_l`` in its first ``k_l`` rows (the
        ``(v_l, lam_l)`` block of a lifted solution, or ``w_l`` itself).
        The kept part from it, the dropped directions' part
        ``(I - Q_l Q_l^T) g_l / d`` from ``g``, projected twice (as Gram-Schmidt
        with reorthogonalization): one projection leaves ``eps |g_l|`` of ``g_l``
        in the kept directions, which ``1 / d`` would amplify past the solve's
        own accuracy at small ``d``; the second leaves ``eps^2 |g_l|``. ``Q_l^T
        g_l`` comes from :meth:`rhs` when given. The other columns get the kept
        part ``Q_l w_l`` only (the solve restricted to the kept directions,
        defined also for ``d = 0``).
        """
        ws = [torch.stack([x[i][: run.k] for i in range(run.first, run.first + run.n)])
              for run in self.runs]  # fmt: skip
        return self.extract_runs(ws, g, damping, n_full, projections)

    @property
    def sizes(self) -> list[int]:
        """Stages per run."""
        return [run.n for run in self.runs]

    @property
    def kept(self) -> list[int]:
        """Kept directions per stage of each run (the rows of :meth:`project`'s pieces)."""
        return [run.k for run in self.runs]

    def extract_runs(
        self,
        ws: list[Tensor],
        g: Tensor,
        damping: float,
        n_full: int,
        projections: list[Tensor] | None = None,
    ) -> Tensor:
        """:meth:`extract` from ``w_l`` stacked per run (``ws[i]``: ``(n, k, r)``)."""
        out = []
        for i_run, (run, w) in enumerate(zip(self.runs, ws, strict=True)):
            if run.qs is None:
                out.append(w.reshape(run.n * run.p, w.shape[-1]))
                continue
            if not n_full:
                out.append(run.qs.q(w).reshape(run.n * run.p, w.shape[-1]))
                continue
            rows = self._rows(g, run)[..., :n_full]
            if projections is None:
                proj = run.qs.t(rows)
            else:
                proj = projections[i_run][..., :n_full]
            both = run.qs.q(torch.cat([w, proj], dim=-1))  # Q w and Q Q^T g in one product
            v, qqg = both[..., : w.shape[-1]], both[..., w.shape[-1] :]
            perp = rows - qqg
            perp = perp - run.qs.q(run.qs.t(perp))  # reorthogonalized
            v[..., :n_full] += perp / damping
            out.append(v.reshape(run.n * run.p, v.shape[-1]))
        return torch.cat(out, dim=0)

    def project_kept(self, g: Tensor) -> Tensor:
        """``Q_l Q_l^T g_l`` per stage: the part of ``g`` in the kept directions."""
        out = []
        for run in self.runs:
            rows = self._rows(g, run)
            kept = rows if run.qs is None else run.qs.q(run.qs.t(rows))
            out.append(kept.reshape(run.n * run.p, kept.shape[-1]))
        return torch.cat(out, dim=0)
