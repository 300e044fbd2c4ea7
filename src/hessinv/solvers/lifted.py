"""The lifted factorization of ``H + dI``: the stage elimination, the pivoted block LU of ``K``.

``K`` (:class:`hessinv.lifted.LiftedSystem`, equilibrated by
:func:`hessinv.lifted.curvature_scale`) is block tridiagonal with Schur
complement ``H + dI`` onto the parameter unknowns (the lifting of the paper's
eq. 26); :class:`hessinv.blocktri.BlockTriLU` factors it with partial pivoting
across block boundaries in ``O(sum_k n_k^3)``, linear in depth.

* Solves: through the stage elimination (:mod:`hessinv.riccati_solve`) once
  its first solve proves accurate (:meth:`LiftedFactorization._trial_verdict`),
  else through the block LU (built on first use); then refinement with exact
  ``H @ v`` (:func:`hessinv.solvers.contract.refined_solve`).
* ``log|det(H + dI)| = log|det K'| + (sum_l k_l) log s + (p - k) log|d|`` and
  ``sign = (-1)^m sign(det K) sign(d)^(p - k)``, from the block LU.
* Inertia and positive definiteness: :mod:`hessinv.solvers.lifted_inertia`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..blocktri import BlockTriLU, InertiaResult
from ..errors import InaccurateSolveError, SingularHessianError
from ..gc_pause import paused_gc
from ..lifted import LiftedSystem, curvature_scale
from ..lifted_merge import MergedBlocks
from ..progress import CountedSequence, progress_bar
from ..riccati import RiccatiResult
from ..riccati_solve import StageRiccati
from .base import Factorization, VectorLike
from .contract import normwise_backward_error, solve_tolerance
from .estimates import _start
from .lifted_inertia import LiftedInertia


def trust_tolerance(dtype: torch.dtype, size: int) -> float:
    """The unrefined backward error below which the stage solver's estimates stand.

    ``max(W / 10, 4) eps``: a tenth of the zero threshold ``W eps``. The
    inverse-iteration estimate of ``sigma_min`` runs on these solves; a
    perturbation ``E`` of ``A`` moves ``sigma_min`` by at most ``||E||``
    (Weyl), here far less than the band ``10 W eps ||A||`` the estimate is
    compared with.
    """
    return torch.finfo(dtype).eps * max(size / 10.0, 4.0)


class LiftedFactorization(LiftedInertia, Factorization):
    """``H + damping I`` through the pivoted LU of the lifted system (linear in depth)."""

    method = "lifted"

    def __init__(
        self,
        op,  # noqa: ANN001
        damping: float,
        count_dtype: torch.dtype | None = None,
        *,
        stage_solver: bool = True,
    ) -> None:
        super().__init__(op, damping)
        s = curvature_scale(op.blocks, self.damping)
        self.system = LiftedSystem(op.blocks, self.damping, scale=s, dtype=count_dtype)
        ls = self.system
        self.merged = MergedBlocks(ls.diag, ls.upper, ls.sizes)  # small neighbours merged
        self.m = self.system.m
        self._lu: BlockTriLU | None = None
        self._congruence: InertiaResult | None = None
        self._congruence_reversed = False  # the congruence eliminated K's blocks last to first
        self._unmatched: list[InertiaResult] = []  # first-to-last attempts off the LU's det
        self._riccati: dict[str, RiccatiResult] = {}
        #: The stage elimination (module doc): None when not tried or not usable.
        self.stage_solver: StageRiccati | None = None
        self._trust: bool | None = False  # None: on trial until the first solve's check
        self._in_trial = False
        self._first: tuple[Tensor, Tensor] | None = None
        self._refine_estimates = False
        if stage_solver and count_dtype is None and not ls.singular_by_structure:
            st = StageRiccati(op.blocks, self.damping, ls.projections, self._progress)
            if st.ok:
                self.stage_solver, self._trust = st, None
        if self.stage_solver is None:
            self.lu  # noqa: B018 - factored now, as the factorization

    @property
    def _progress(self) -> object:
        return getattr(self.op, "progress", False)

    @property
    def lu(self) -> BlockTriLU:
        """The pivoted block LU of ``K`` (built on first use when the stage solver serves)."""
        if self._lu is None:
            n_bl = len(self.merged.sizes)
            with progress_bar(n_bl, "hessinv: lifted LU", self._progress, "block") as b:
                # blocks built as consumed; the bar advances as each diagonal block is read
                self._lu = BlockTriLU(CountedSequence(self.merged.diag, b), self.merged.upper)
        return self._lu

    @property
    def solver(self) -> str:
        """What the solves use: ``"stages"`` or ``"lu"``.

        ``"stages"``: the stage elimination (trusted, or on trial until the
        first solve's check); ``"lu"``: the pivoted block LU of ``K``.
        """
        return "stages" if self._stages_serve() else "lu"

    def _stages_serve(self) -> bool:
        return self.stage_solver is not None and self._trust is not False

    def _estimates_on_stages(self) -> bool:
        """The estimates run on the stage solver: trusted, or within its trial solve."""
        return self._stages_serve() and (self._trust is True or self._in_trial)

    def _first_residual(self, x: Tensor, r: Tensor) -> None:
        if self._in_trial and self._first is None:
            self._first = (x, r)

    @paused_gc
    def solve(self, g: VectorLike, *, check: bool = True, refine: int = 2) -> VectorLike:
        """:meth:`Factorization.solve`; a refusal through the stage solver is retried by the LU.

        The trial (and the probe) judge the stage elimination on one vector,
        and its error is not the same on every right-hand side: where the
        elimination grows (a pivot of size ``d`` at a tiny damping, gains of
        ``1e8``), a random vector, whose solution is large, reads a small
        backward error while a right-hand side with a moderate solution (an
        eigenvector of ``H``, ``H w``) does not. So a solve that the contract
        would refuse (:class:`InaccurateSolveError`, or an overflow; not a
        zero count, exact by Sylvester) while the stage elimination serves
        drops it for good: the estimates made with it are discarded and the
        solve is redone with the pivoted block LU, whose verdict stands.
        """
        with self.op._fresh_call():
            try:
                return super().solve(g, check=check, refine=refine)
            except InaccurateSolveError:
                if not self._stages_serve():
                    raise
            except SingularHessianError:  # a count's verdict stands; an overflow is retried
                if not self._stages_serve() or self._zero:
                    raise
            self._demote()
            return super().solve(g, check=check, refine=refine)

    def _demote(self) -> None:
        """Drop the stage solver; estimates made through it are made again."""
        self._trust, self.stage_solver = False, None
        self._refine_estimates = False
        self._sigma_min = self._zero = self._sigma_early = None

    def _solve_with_estimates(self, g: Tensor, refine: int) -> tuple[Tensor, Tensor | None]:
        """The first solve tries the stage elimination and keeps it only if it is accurate.

        Its unrefined solution must have a normwise backward error within
        :func:`trust_tolerance` (with ``||A||`` from the Lanczos estimate that
        rode along); the refinement cannot be what makes it pass, since the
        inverse-iteration estimate of ``sigma_min`` also runs on it. Otherwise
        the stage solver is dropped and the solve is redone, estimates
        included, with the pivoted block LU.
        """
        if self._trust is not None:
            return super()._solve_with_estimates(g, refine)
        self._in_trial, self._first = True, None
        try:
            x, r = super()._solve_with_estimates(g, refine)
            verdict = self._trial_verdict(g, x, r)
        except SingularHessianError:  # overflow, or a singular verdict reached on its estimates
            verdict = "reject"
        finally:
            self._in_trial = False
        self._first = None
        if verdict == "reject":
            self._demote()  # the estimates made through it are made again
            return super()._solve_with_estimates(g, refine)
        self._trust = True
        if verdict == "refined":  # the trial's estimate of sigma_min is not good enough
            self._refine_estimates = True
            self._sigma_min = self._zero = self._sigma_early = None
        return x, r

    def _trial_verdict(self, g: Tensor, x: Tensor, r: Tensor | None) -> str:
        """``"exact"``, ``"refined"`` or ``"reject"`` for the stage solver (its trial solve).

        ``"exact"``: the unrefined solve's normwise backward error ``eta_0`` is
        within :func:`trust_tolerance`, so the estimates that ran on it stand.
        ``"refined"``: ``eta_0 <= sqrt(eps)`` and the refined solve meets the
        contract: solves are kept (refinement and the check follow every one),
        and the inverse iteration is redone with one refinement step per
        application. Otherwise ``"reject"``: the pivoted block LU serves.
        """
        if self._first is None:  # no refinement step computed a residual: one product
            x0, r0 = x, g - self.op.matmat(x) - self.damping * x
            r = r0
        else:
            x0, r0 = self._first
        norm = self.norm()
        # judged on the kept directions, where the stage elimination works (the dropped
        # part g_l / d is exact whatever it does), on columns with a kept part
        g0 = self.system.project_kept(g)
        has_kept = g0.abs().amax(dim=0) > 0
        if not bool(has_kept.any()):  # nothing to judge by: a random probe, one product
            return self._probe_verdict(norm)
        keep = torch.nonzero(has_kept).flatten()
        eta0 = normwise_backward_error(
            r0[:, keep], self.system.project_kept(x0)[:, keep], g0[:, keep], norm
        )
        return self._grade(eta0, lambda: normwise_backward_error(r, x, g, norm))

    def _grade(self, eta0: Tensor, refined: Callable[[], Tensor]) -> str:
        """``"exact"``, ``"refined"`` or ``"reject"`` from the unrefined backward errors.

        ``refined``: the backward errors after refinement (called only when needed).
        """
        eta = float(eta0.max())
        if not math.isfinite(eta) or eta > math.sqrt(torch.finfo(self.dtype).eps):
            return "reject"
        if eta <= trust_tolerance(self.dtype, self.size):
            return "exact"
        return "refined" if float(refined().max()) <= solve_tolerance(self.dtype) else "reject"

    def _settle_trust(self) -> None:
        """Outside a solve, decide an undecided stage solver by the random probe.

        So that the estimates of a log-determinant, an inertia or a singularity
        test asked for before any solve need not build the block LU.
        """
        if self._trust is None and not self._in_trial:
            verdict = self._probe_verdict(self.norm())
            if verdict == "reject":
                self._trust, self.stage_solver = False, None
            else:
                self._trust, self._refine_estimates = True, verdict == "refined"

    def _probe_verdict(self, norm: float) -> str:
        """:meth:`_trial_verdict`'s verdict for the stage solve of a random kept vector.

        ``"refined"`` needs one refinement step of the probe to meet the
        contract (a second product).
        """
        y = self.system.project_kept(_start(self.size, self.dtype, self.op.device, seed=2))
        z, r = self._stage_residual(y)

        def refined() -> Tensor:
            z1 = z + self._stage_apply(r, 0)
            return normwise_backward_error(y - self.op.matmat(z1) - self.damping * z1, z1, y, norm)

        return self._grade(normwise_backward_error(r, z, y, norm), refined)

    @property
    def structurally_singular(self) -> bool:
        """Dropped null directions and ``damping == 0`` (:mod:`hessinv.lifted`)."""
        return self.system.singular_by_structure

    def _structural_zeros(self) -> int:
        return self.system.n_dropped

    def _known_zeros(self, t: float) -> int:
        """The dropped directions: eigenvectors with eigenvalue exactly ``d``.

        The inverse iteration sees the kept directions only; ``d`` is known, so
        they are zeros exactly when ``0 < |d| <= t`` (at ``d = 0`` they are the
        structural zeros, counted apart).
        """
        d = self.damping
        return self.system.n_dropped if d != 0.0 and abs(d) <= t else 0

    @property
    def lifted_singular(self) -> bool:
        """``K`` has a pivot at round-off level (``<= eps max_k n_k ||K'||_max``)."""
        return self.lu.singular

    def _shifted(self, shift: float) -> LiftedFactorization:
        """``A + shift I`` for the exact band counts (signs only: no stage solver).

        A float32 operator's ``K`` is factored in float64 there.
        """
        count = torch.float64 if self.dtype == torch.float32 else None
        return LiftedFactorization(
            self.op, self.damping + shift, count_dtype=count, stage_solver=False
        )

    def _lu_solve(self, rhs: list[Tensor]) -> list[Tensor]:
        """``K x = r`` per block of the lifted system (through the merged partition)."""
        return self.merged.split(self.lu.solve(self.merged.join(rhs)))

    def _stage_residual(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """``z`` = the stage solve of the kept ``y`` (no dropped part) and ``y - (H + dI) z``."""
        z = self._stage_apply(y, 0)
        return z, y - self.op.matmat(z) - self.damping * z

    def _stage_apply(self, g: Tensor, n_full: int) -> Tensor:
        """The stage elimination's solve; the first ``n_full`` columns get the dropped part."""
        rhs = self.system.kept_rhs(g)
        w = self.stage_solver.solve_runs(rhs, self.system.run_sizes)
        return self.system.extract_kept(w, g, n_full, rhs)

    def _apply(self, g: Tensor) -> Tensor:
        if self._stages_serve():
            return self._stage_apply(g, g.shape[1])
        rhs, proj = self.system.rhs_and_projections(g)
        return self.system.extract(self._lu_solve(rhs), g, projections=proj)

    def _kept_estimates(self) -> bool:
        """The estimates run in the kept coordinates: on the stage solver, unrefined.

        There ``A^{-1}`` restricted to the kept directions is ``Q (Q^T A Q)^{-1}
        Q^T`` (``H = Q Q^T H Q Q^T``), whose nonzero singular values are those of
        ``(Q^T A Q)^{-1}``, the stage solve itself: the inverse iteration then
        runs on its ``n_kept`` coordinates (a random start there is the kept
        part of a random start in ``R^W``), with no basis maps, no dropped
        part and no ``W``-row vectors for its columns.
        """
        return self._estimates_on_stages() and not self._refine_estimates

    def _estimate_size(self) -> int:
        self._settle_trust()
        return self.system.n_kept if self._kept_estimates() else self.size

    def _kept_parts(self, y: Tensor) -> list[Tensor]:
        """Kept coordinates ``(n_kept, m)`` per run, as ``LiftedSystem.kept_rhs`` stacks them."""
        m = y.shape[1]
        sizes = self.system.run_sizes
        ks = self.system.run_kept
        parts = y.split([n * k for n, k in zip(sizes, ks, strict=True)])
        return [p.view(n, k, m) for p, n, k in zip(parts, sizes, ks, strict=True)]

    @staticmethod
    def _kept_flat(w: list[Tensor]) -> Tensor:
        """The inverse of :meth:`_kept_parts`."""
        return torch.cat([wi.reshape(-1, wi.shape[-1]) for wi in w])

    def _apply_for_estimates(self, g: Tensor) -> Tensor:
        """The solve restricted to the kept directions: ``Q w`` for ``rhs = Q^T g``.

        Through the stage elimination only once trusted (or within its trial
        solve), and there in the kept coordinates (:meth:`_kept_estimates`):
        ``w`` for ``rhs = g``.
        """
        self._settle_trust()
        if self._kept_estimates():
            return self._kept_flat(
                self.stage_solver.solve_runs(self._kept_parts(g), self.system.run_sizes)
            )
        if self._estimates_on_stages():  # refined: one step, in the kept directions
            z = self._stage_apply(g, 0)
            res = self.system.project_kept(g) - self.op.matmat(z) - self.damping * z
            return z + self._stage_apply(res, 0)
        return self.system.extract(self._lu_solve(self.system.rhs(g)), g, kept_only=True)

    def _apply_pair(self, g: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`_apply` of ``g`` and :meth:`_apply_for_estimates` of ``y`` in one pass.

        In the kept coordinates, ``y``'s columns join ``g``'s in the stage
        solve only: the basis maps and the dropped part are ``g``'s alone.
        """
        k = g.shape[1]
        if self._kept_estimates():
            rhs = self.system.kept_rhs(g)
            both = [
                torch.cat([a, b], dim=-1) for a, b in zip(rhs, self._kept_parts(y), strict=True)
            ]
            w = self.stage_solver.solve_runs(both, self.system.run_sizes)
            x = self.system.extract_kept([wi[..., :k] for wi in w], g, k, rhs)
            return x, self._kept_flat([wi[..., k:] for wi in w])
        gy = torch.cat([g, y], dim=1)
        rhs, proj = self.system.rhs_and_projections(gy)
        out = self.system.extract(self._lu_solve(rhs), gy, n_full=k, projections=proj)
        return out[:, :k], out[:, k:]

    def _logdet(self) -> tuple[float, float]:
        self._require_regular_lu("log-determinant")
        if self.lu.singular:  # a pivot at round-off level: the congruence must confirm |det|
            self.congruence()
        s, la = self.lu.slogdet()
        la += self.system.n_kept * math.log(self.system.scale)
        s2, la2 = self.system.dropped_logdet()
        return s * s2 * (-1.0 if self.m % 2 else 1.0), la + la2
