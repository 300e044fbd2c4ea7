"""The solver protocol: ``H + damping I`` factored once; solves, log-determinant, inertia.

Every method (:mod:`~hessinv.solvers.lifted`, :mod:`~hessinv.solvers.dense`,
:mod:`~hessinv.solvers.krylov`, :mod:`~hessinv.solvers.woodbury`, the
Gauss-Newton kernel form) is a :class:`Factorization` of ``A = H + dI`` and
keeps one contract, modelled on lineax's solver classes:

* **A solve is exact or it raises.** :meth:`Factorization.solve` returns ``x``
  only if its normwise backward error (Rigal-Gaches)

  ``eta(x) = ||A x - g|| / (||A|| ||x|| + ||g||)``

  is at most :func:`solve_tolerance` (``SOLVE_TOL_FACTOR * eps``) for every
  column; otherwise it refines, and then raises
  :class:`~hessinv.errors.InaccurateSolveError`. ``eta`` is the smallest
  relative perturbation of ``A`` and ``g`` for which ``x`` is the exact
  solution, so it is the measure of a solve that does not depend on the
  condition of ``A`` (a dense LU with partial pivoting achieves a small
  multiple of ``eps``). ``||A||`` is a Lanczos estimate from below
  (:func:`~hessinv.solvers.estimates.spectral_bounds`), which can only make
  the check stricter.
* **A singular ``A`` raises.** ``A`` is *numerically singular* when it has an
  eigenvalue with ``|lambda| <= zero_threshold * max(||A||, ||H|| + |d|)``,
  ``zero_threshold = W eps`` (the default rank tolerance of
  ``numpy.linalg.matrix_rank``, relative to the round-off of ``A = H + dI``
  as computed: ``||A||``, unless ``d`` cancels ``H``'s spectrum). Every
  method decides this the same way (:meth:`Factorization.zero_count`): from
  its eigenvalues where it has them, otherwise from an estimate of the
  smallest singular value by inverse iteration with the factorization itself
  (as LAPACK's condition estimators), confirmed where it falls near the
  threshold by exact eigenvalue counts of ``A -+ t I`` (Sylvester).
  :meth:`Factorization.solve` then raises
  :class:`~hessinv.errors.SingularHessianError` with the hint to pass
  ``damping``; :meth:`Factorization.logdet` returns ``(0.0, -inf)`` as
  ``torch.linalg.slogdet`` does; :meth:`Factorization.inertia` counts the
  zero eigenvalues.
* **An inertia says how it was verified** (:class:`Inertia`), and
  :meth:`Factorization.is_positive_definite` returns ``True`` only for a proof.

Everything is relative: answers, thresholds and refusals for the loss ``c l``
at damping ``c d`` are those for ``l`` at ``d``.
"""

from __future__ import annotations

import math
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from ..errors import HINT, InaccurateSolveError, LiftedPrecisionError, SingularHessianError
from ..gc_pause import paused_gc
from ..operator import LinearOperator
from .contract import (
    SOLVE_TOL_FACTOR,
    Inertia,
    column_norms,
    low_columns,
    measured_backward_error,
    refined_solve,
    shifted_norm,
    solve_tolerance,
    zero_threshold,
)
from .estimates import (
    INVERSE_STEPS,
    RIDER_COLUMNS,
    Rider,
    block_lanczos_steps,
    excludes_band,
    inverse_iteration_steps,
    smallest_singular_value,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..hessian import Hessian

VectorLike = Tensor | Sequence[Tensor]


class Factorization(LinearOperator, ABC):
    """``A = H + damping I`` factored once (the protocol every method implements).

    As a :class:`hessinv.LinearOperator` it is ``A^{-1}``: ``fac @ g`` is
    ``fac.solve(g)``.

    Subclasses implement :meth:`_apply` (one application of ``A^{-1}`` to a
    ``(W, k)`` block, without checks) and, where the method provides them,
    :meth:`_logdet`, :meth:`_signs` and :meth:`_positive_definite`. This class
    does the rest: input forms, refinement, the backward-error contract and
    the singularity decision.

    Args:
        op: The operator (``Hessian``, ``GaussNewton``).
        damping: The shift ``d`` (already validated).
    """

    method: ClassVar[str] = "abstract"
    symmetric = True
    #: The handle's strong reference to :attr:`op` (``None`` in the operator's own cache).
    __slots__ = ("_owner",)

    def __init__(self, op: Hessian, damping: float) -> None:
        self._owner: Hessian | None = op
        try:
            self._op_ref: Callable[[], Hessian | None] = weakref.ref(op)
        except TypeError:  # an operator without weak references: held strongly
            self._op_ref = lambda: op
        self.damping = float(damping)
        self._zero: int | None = None
        self._sigma_min: float | None = None
        #: ``(per-start estimates, steps)`` of an inverse iteration the first solve ended
        #: early (:func:`excludes_band`); ``sigma_min_estimate`` then runs the full one.
        self._sigma_early: tuple[tuple[float, ...], int] | None = None
        #: The dimension of the space the inverse iteration's random starts were drawn in.
        self._sigma_size = self.size

    @property
    def op(self) -> Hessian:
        """The operator ``H`` factored (``A = H + damping I``)."""
        owner = self._owner
        if owner is None:
            owner = self._op_ref()
            if owner is None:
                raise ReferenceError(
                    f"{type(self).__name__}: the operator it factors has been freed"
                )
        return owner

    def _handle(self, owner: Hessian | None) -> Factorization:
        """Another handle on this factorization: the same state, ``owner`` held (or not).

        An operator caches its factorizations (:meth:`hessinv.solves.Solves.factor`)
        as handles without an owner, which reach it through a weak reference, and
        gives out handles that hold it: no reference cycle joins an operator and
        its cache, so both are freed as soon as the last handle goes (a cycle
        would wait for Python's cyclic collector, holding the blocks and factors,
        and on a GPU their memory, across the steps of a loop). Both handles share
        one ``__dict__``: whatever one computes lazily, the other sees.
        """
        h = object.__new__(type(self))
        h.__dict__ = self.__dict__
        h._owner = owner
        return h

    # -- what a method provides ---------------------------------------------------------
    @abstractmethod
    def _apply(self, g: Tensor) -> Tensor:
        """One application of ``A^{-1}`` to ``g`` of shape ``(W, k)`` (no checks)."""

    def _logdet(self) -> tuple[float, float]:
        """``(sign, log|det A|)`` for a nonsingular ``A``."""
        raise NotImplementedError(
            f"method={self.method!r} gives solves only, no log-determinant; "
            "use method='lifted' or 'dense'"
        )

    def _signs(self) -> Inertia:
        """Inertia of a nonsingular ``A`` (``zero == 0``)."""
        raise NotImplementedError(
            f"method={self.method!r} gives solves only, no inertia; use method='lifted' or 'dense'"
        )

    def _negatives(self) -> int:
        """The number of negative eigenvalues of a nonsingular ``A``, for the band count.

        :meth:`_band_count` uses the count, not its verification, so a method
        may skip the work that only verifies it.
        """
        return self._signs().negative

    def _positive_definite(self) -> bool | None:
        """A proof that ``A`` is (``True``) or is not (``False``) positive definite, or ``None``."""
        return None

    def _definite_proof(self) -> bool | None:
        """:meth:`is_positive_definite` without its zero-band count (exact null directions: False).

        For a caller whose next step counts the band anyway (a solve, riding
        along its products): the optimizers' trial shifts.
        """
        return False if self.structurally_singular else self._positive_definite()

    @property
    def structurally_singular(self) -> bool:
        """``A`` has exact null directions known from the structure (``damping == 0``)."""
        return False

    def _apply_for_estimates(self, g: Tensor) -> Tensor:
        """``A^{-1}`` on the part of ``A`` that is not structurally singular.

        On vectors of :meth:`_estimate_size` rows (the coordinates the
        inverse iteration runs in).
        """
        return self._apply(g)

    def _estimate_size(self) -> int:
        """Rows of the vectors :meth:`_apply_for_estimates` takes: ``W`` here.

        A method whose estimates run on a subspace with orthonormal
        coordinates (the same singular values; :class:`~hessinv.solvers.lifted.
        LiftedFactorization`'s kept directions) returns its dimension.
        """
        return self.size

    def _apply_pair(self, g: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(_apply(g), _apply_for_estimates(y))``; a method may share one pass between them."""
        return self._apply(g), self._apply_for_estimates(y)

    def _first_residual(self, x: Tensor, r: Tensor) -> None:
        """Sees the first (unrefined) solve of :meth:`_solve_with_estimates` and its residual."""

    def _shifted(self, shift: float) -> Factorization:
        """The same method's factorization of ``A + shift I`` (for exact counts)."""
        return type(self)(self.op, self.damping + shift)

    # -- shared machinery ----------------------------------------------------------------
    @property
    def layout(self):  # noqa: ANN201
        """The operator's vector layout (:class:`hessinv.vectors.Layout`)."""
        return self.op.layout

    def _check_fresh(self) -> None:
        self.op._check_fresh()

    def matmat(self, v: Tensor) -> Tensor:
        """``A^{-1} V`` for ``V`` of shape ``(W, k)`` (a checked :meth:`solve`)."""
        return self.solve(v)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(({self.op!r} + {self.damping:g} I), method={self.method!r})"

    @property
    def size(self) -> int:
        """``W``."""
        return self.op.num_params

    @property
    def dtype(self) -> torch.dtype:
        """The working precision."""
        return self.op.dtype

    def norm(self) -> float:
        """An estimate of ``||A||_2`` from below (:func:`shifted_norm`)."""
        return shifted_norm(self.op, self.damping)

    def data_norm(self) -> float:
        """``||H|| + |d|``: the scale of the round-off in ``A = H + dI`` as computed.

        Products ``H v`` and ``d v`` are each exact to about ``eps`` of their
        own size, so ``A`` is known to ``eps (||H|| + |d|)``, not to ``eps ||A||``
        when ``d`` cancels ``H`` (``H`` near ``lambda I``, ``d`` near ``-lambda``:
        then every eigenvalue of ``A`` has a sign set by round-off). ``||H||``
        from Lanczos (the Ritz values' largest modulus).
        """
        lo, hi = self.op.spectral_bounds()
        return max(abs(lo), abs(hi)) + abs(self.damping)

    def zero_threshold(self) -> float:
        """Absolute zero threshold ``t = W eps max(||A||, ||H|| + |d|)`` (:func:`zero_threshold`).

        ``||A||`` (:meth:`norm`) but no less than :meth:`data_norm`: an
        eigenvalue within ``W eps`` of the round-off of forming ``A`` is zero.
        The two differ by at most a factor 4 unless ``d`` cancels a spectrum of
        ``H`` narrow for its size.
        """
        return zero_threshold(self.dtype, self.size) * max(self.norm(), self.data_norm())

    def sigma_min_estimate(self) -> float:
        """An estimate (from above) of ``A``'s smallest singular value, by inverse iteration."""
        self.op._check_fresh()
        if self._sigma_min is None:
            self._sigma_size = self._estimate_size()
            self._sigma_min = smallest_singular_value(
                self._apply_for_estimates,
                self._sigma_size,
                self.dtype,
                self.op.device,
                columns=RIDER_COLUMNS,  # the starts of the iteration that rides along a solve
            )
        return self._sigma_min

    def _known_zeros(self, t: float) -> int:
        """Eigenvalues in ``[-t, t]`` known exactly, outside what the estimate iterates on.

        :meth:`sigma_min_estimate` runs on :meth:`_apply_for_estimates`; a method
        that leaves directions out of it with known eigenvalues counts them here.
        """
        return 0

    def zero_count(self) -> int:
        """Number of eigenvalues with ``|lambda| <= t`` (:meth:`zero_threshold`).

        When the inverse-iteration estimate of the smallest singular value is
        above ``10 t`` there is none (five steps from a random start overestimate
        an isolated small singular value by far less; after ``j < 5`` steps, the
        first solve's, above ``t 10^{5/j}``: :func:`~hessinv.solvers.estimates.
        excludes_band`). Otherwise the band is counted exactly
        by Sylvester's law: ``neg(A - tI) - neg(A + tI)`` eigenvalues lie in
        ``[-t, t)``.
        """
        if self._zero is None:
            t = self.zero_threshold()
            if self.structurally_singular:
                self._zero = self._structural_zeros() + self._band_count(t, kept_only=True)
            else:
                self._zero = self._band_count(t, kept_only=False)
        return self._zero

    def _structural_zeros(self) -> int:
        return 0

    def _band_count(self, t: float, kept_only: bool) -> int:
        if t == 0.0:  # A == 0: every eigenvalue is zero (the structural ones counted apart)
            return self.size - (self._structural_zeros() if kept_only else 0)
        sigma: float | tuple[float, ...]
        if self._sigma_min is None and self._sigma_early is not None:
            sigma, steps = self._sigma_early
        else:
            sigma, steps = self.sigma_min_estimate(), INVERSE_STEPS
        if excludes_band(sigma, steps, t, self._sigma_size):
            return self._known_zeros(t)
        try:
            below = self._shifted(-t)._negatives()  # eigenvalues < t
            above = self._shifted(t)._negatives()  # eigenvalues < -t
        except LiftedPrecisionError as e:  # A -+ tI singular to working precision
            raise LiftedPrecisionError(
                f"method={self.method!r}: cannot count the eigenvalues of H + damping*I in "
                f"the zero band [-t, t], t = {t:.3e}: A -+ tI is singular to working precision "
                "(an eigenvalue at the band's edge, or t below the rounding of the damping). "
                "Use method='dense' (small W) or move damping by more than t."
            ) from e
        band = below - above
        if kept_only:  # the structural zeros lie inside the band too
            band -= self._structural_zeros()
        return max(band, 0)

    @property
    def singular(self) -> bool:
        """``A`` is numerically singular (an eigenvalue within :meth:`zero_threshold`)."""
        return self.structurally_singular or self.zero_count() > 0

    def _singular_message(self) -> str:
        if self.structurally_singular:
            return (
                f"H + damping*I has exact null directions ({self._structural_zeros()} "
                f"parameter directions no output depends on at this batch). {HINT}"
            )
        return (
            f"H + damping*I has {self.zero_count()} eigenvalue(s) within "
            f"{self.zero_threshold():.1e} (= W eps max(||H + dI||, ||H|| + |d|)) of zero. {HINT}"
        )

    @paused_gc
    def solve(self, g: VectorLike, *, check: bool = True, refine: int = 2) -> VectorLike:
        """``x = (H + damping I)^{-1} g`` for ``g`` flat, ``(W, k)`` or per-parameter.

        Up to ``refine`` steps of iterative refinement follow (each one
        ``H @ v`` and one application of the factors, kept only if it lowers
        the residual).

        Raises:
            SingularHessianError: ``H + dI`` is numerically singular.
            InaccurateSolveError: ``check`` and a column's normwise backward
                error exceeds :func:`solve_tolerance`.
            StaleOperatorError: The parameters changed since ``H`` was built.
        """
        with self.op._fresh_call():  # one staleness check for all the products inside
            return self._solve_fresh(g, check, refine)

    def _solve_fresh(self, g: VectorLike, check: bool, refine: int) -> VectorLike:
        """:meth:`solve` once the operator is known to be fresh."""
        gm, form = self.op.layout.to_matrix(g, "g")
        if gm.shape[1] == 0:
            return self.op.layout.from_matrix(gm.clone(), form)
        if self.structurally_singular:
            raise SingularHessianError(self._singular_message())
        x, r = self._solve_with_estimates(gm, refine)
        if self.singular:
            raise SingularHessianError(self._singular_message())
        if check:  # the refinement's last residual is that of x: no further product
            self.check(x, gm, residual=r)
        return self.op.layout.from_matrix(x, form)

    def _solve_with_estimates(self, g: Tensor, refine: int) -> tuple[Tensor, Tensor | None]:
        """:func:`refined_solve`, with the contract's estimates riding along.

        The first solve of a factorization needs ``||A||`` (block Lanczos on
        ``H``, 4 products of 4 columns) and ``sigma_min(A)`` (5 inverse
        iterations) for the singularity decision and the backward error. Their
        columns are appended to the products and solves the refinement makes
        anyway (:class:`~hessinv.solvers.estimates.Rider`): on a layered
        operator a few more columns cost little, so only the steps left over
        run on their own. The estimates are the same sequences as
        :meth:`norm` and :meth:`sigma_min_estimate` would compute, except that
        the inverse iteration runs :data:`~hessinv.solvers.estimates.RIDER_COLUMNS`
        independent starts and ends as soon as its estimates exclude the zero
        band at the confidence of five steps of one start (after the solve's
        applications or any step on its own; :func:`~hessinv.solvers.estimates.
        excludes_band`; :meth:`zero_count` decides on it, :meth:`sigma_min_estimate`
        runs the full iteration).
        """
        inv = lan = None
        cls = type(self)
        # only the estimates this method's decisions use: the default singularity test
        # (inverse iteration) and the default norm (Lanczos on the operator)
        steps: list[tuple[tuple[float, ...], int]] = []  # (estimates, j) so far
        if (
            self._zero is None
            and self._sigma_min is None
            and cls.singular is Factorization.singular
            and cls.zero_count is Factorization.zero_count
        ):
            self._sigma_size = self._estimate_size()
            inv = Rider(
                inverse_iteration_steps(
                    self._sigma_size,
                    self.dtype,
                    self.op.device,
                    record=steps,
                    columns=RIDER_COLUMNS,
                )
            )
        if (
            cls.norm is Factorization.norm
            and getattr(self.op, "_bounds", 0) is None
            and hasattr(self.op, "_store_bounds")
        ):
            lan = Rider(block_lanczos_steps(self.size, self.dtype, self.op.device))

        def apply(v: Tensor) -> Tensor:
            if inv is None or inv.block is None:
                return self._apply(v)
            x, z = self._apply_pair(v, inv.block)
            inv.feed(z)
            return x

        floor = [0.0]  # ||(H + dI) q|| of the unit Lanczos columns so far: <= ||A||

        def matmat(v: Tensor) -> Tensor:
            if lan is None or lan.block is None or self.op._bounds is not None:
                return self.op.matmat(v)  # (a method may have estimated the norm itself)
            k = v.shape[1]
            blk = lan.block
            out = self.op.matmat(torch.cat([v, blk], dim=1))
            shifted = column_norms(out[:, k:] + self.damping * blk)
            floor[0] = max(floor[0], float(shifted.max()) if shifted.numel() else 0.0)
            lan.feed(out[:, k:])
            return out[:, :k]

        def norm_known() -> bool:  # the default norm, its Lanczos estimate already stored
            return cls.norm is Factorization.norm and getattr(self.op, "_bounds", None) is not None

        def norm_floor() -> float:  # a lower bound of ||A||, for the refinement's stop
            if norm_known():
                return max(self.norm(), floor[0])  # Ritz values lie inside the spectrum
            return floor[0]

        def finish() -> None:  # the steps that found no product to ride along
            if lan is not None and self.op._bounds is None:
                self.op._store_bounds(lan.finish(self.op.matmat))
            if inv is None or self._sigma_min is not None:
                return
            t = self.zero_threshold() if norm_known() else None
            while not inv.done:  # each step on its own, until the band is excluded
                if steps and t is not None:
                    est, j = steps[-1]
                    if excludes_band(est, j, t, self._sigma_size):
                        self._sigma_early = (est, j)
                        return
                inv.feed(self._apply_for_estimates(inv.block))
            self._sigma_min = inv.value

        try:
            out = refined_solve(
                matmat,
                apply,
                g,
                self.damping,
                refine,
                with_residual=True,
                on_first=self._first_residual,
                norm_floor=norm_floor,
            )
        except SingularHessianError:  # the solve overflowed: say why, if the count can
            finish()
            if self.singular:
                raise SingularHessianError(self._singular_message()) from None
            raise
        finish()
        return out

    def backward_error(self, x: Tensor, g: Tensor, residual: Tensor | None = None) -> Tensor:
        """Per-column ``||A x - g|| / (||A|| ||x|| + ||g||)`` (``||A||`` from :meth:`norm`).

        ``residual``: ``g - A x`` if already computed (only its norm enters).
        """
        return measured_backward_error(
            lambda v: self.op.matmat(v) + self.damping * v, x, g, self.norm(), residual
        )

    def check(self, x: Tensor, g: Tensor, residual: Tensor | None = None) -> None:
        """Raise :class:`InaccurateSolveError` unless ``x`` meets :func:`solve_tolerance`.

        ``residual``: ``g - A x`` computed with exact products for this very
        ``x`` (as :func:`refined_solve` returns it), saving one product.
        """
        tol = solve_tolerance(self.dtype)
        eta = self.backward_error(x, g, residual)
        worst = float(eta.max()) if eta.numel() else 0.0
        if not worst <= tol:
            bad = ~(eta <= tol)
            if bool((bad & low_columns(x, g, self.norm())).any()):
                raise InaccurateSolveError(
                    f"method={self.method!r}: the solve's normwise backward error {worst:.1e} "
                    f"exceeds {tol:.1e} (= {SOLVE_TOL_FACTOR:g} eps): g and x lie at the "
                    f"bottom of {self.dtype}'s range (subnormal), where rounding is absolute. "
                    "Scale g up by a power of two and the solution down by it."
                )
            raise InaccurateSolveError(
                f"method={self.method!r}: the solve's normwise backward error {worst:.1e} "
                f"exceeds {tol:.1e} (= {SOLVE_TOL_FACTOR:g} eps). H + damping*I is too "
                "ill-conditioned for this method at this precision: use method='dense' "
                "(small W), float64, or a larger damping."
            )

    def logdet(self) -> tuple[float, float]:
        """``(sign, log|det(H + damping I)|)``; ``(0.0, -inf)`` when numerically singular."""
        with self.op._fresh_call():
            if self.singular:
                return 0.0, -math.inf
            return self._logdet()

    def inertia(self) -> Inertia:
        """``(n_pos, n_neg, n_zero)`` of ``H + damping I`` (:class:`Inertia`).

        Zeros are eigenvalues within :meth:`zero_threshold`; they are counted
        exactly from the inertias of ``A -+ t I`` when there are any.
        """
        with self.op._fresh_call():
            out = self._inertia_unchecked()
        if sum(out) != self.size or min(out) < 0:  # pragma: no cover - a guard, never expected
            raise torch.linalg.LinAlgError(
                f"method={self.method!r} counted {tuple(out)} eigenvalues for W = {self.size}"
            )
        return out

    def _inertia_unchecked(self) -> Inertia:
        if not self.singular:
            return self._signs()
        t = self.zero_threshold()
        if t == 0.0:
            return Inertia(0, 0, self.size, verified=True, how="H + damping*I is zero")
        lo, hi = self._shifted(t)._signs(), self._shifted(-t)._signs()
        neg = lo.negative  # eigenvalues < -t
        pos = hi.positive  # eigenvalues >= t
        return Inertia(
            pos,
            neg,
            self.size - pos - neg,
            verified=lo.verified and hi.verified,
            how=f"eigenvalues in [-t, t], t = {t:.1e}, counted from the inertias of A -+ tI "
            f"({lo.how})",
        )

    def is_positive_definite(self) -> bool | None:
        """``True`` only if ``H + damping I`` is proven positive definite and not singular.

        ``False`` when proven not to be (a verified inertia with a nonpositive
        eigenvalue, a failed stage Cholesky pass), or when an eigenvalue lies in
        the zero band (:meth:`zero_count`: numerically singular, as
        :meth:`inertia` counts it and :meth:`solve` refuses it, even where a
        Cholesky-type pass proves every eigenvalue positive); ``None`` when
        undecided.
        """
        self.op._check_fresh()
        proof = self._definite_proof()
        if proof is True:
            return self.zero_count() == 0
        if proof is not None:
            return proof
        try:
            inert = self.inertia()
        except NotImplementedError:
            return None
        return (inert.negative == 0 and inert.zero == 0) if inert.verified else None
