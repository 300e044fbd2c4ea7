"""Solving with ``H + damping I``: the operator side of the solver protocol.

:class:`Solves` gives an operator (:class:`hessinv.Hessian`,
:class:`hessinv.GaussNewton`) its ``factor`` (one
:class:`~hessinv.solvers.Factorization` per damping and method, a bounded
cache), ``solve``, ``logdet``, ``inertia``, ``is_positive_definite`` and
``inverse``, with ``method="auto"`` choosing by the one cost model
(:mod:`hessinv.solvers.select`) and falling back to the dense route where the
lifted one gives up and the dense one is affordable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .errors import InaccurateSolveError, LiftedPrecisionError, NonFiniteError
from .gc_pause import paused_gc
from .operator import LinearOperator
from .solvers import FACTORIZATIONS, Factorization, Inertia, KrylovSolver
from .solvers import select as _select
from .solvers.base import shifted_norm
from .solvers.contract import measured_backward_error, rescaled
from .solvers.estimates import column_norms, robust_eigh, spectral_bounds
from .validate import check_damping

VectorLike = Tensor | Sequence[Tensor]

#: Under ``method="auto"``, the dense route takes over where the lifted one gives up, up to this W.
DENSE_FALLBACK_MAX_W = 20000
#: Under ``method="auto"``, an inertia the lifted route could not verify is recounted
#: densely (verified) up to this W.
DENSE_VERIFY_MAX_W = 2500


def _check_damping(damping: object) -> float:
    """A finite real scalar (Python, NumPy or 0-d tensor); booleans are refused."""
    return check_damping(damping)


class InverseOperator(LinearOperator):
    """``(H + damping I)^{-1}`` as a linear operator (:class:`hessinv.LinearOperator`).

    ``A^{-1} @ g`` is ``fac.solve(g)`` (checked: exact or an error), in every
    vector form; ``to_scipy``, ``to_dense`` and the operator algebra as for ``H``.
    """

    symmetric = True

    def __init__(self, fac: Factorization) -> None:
        self.fac = fac
        self.layout = fac.op.layout

    def _check_fresh(self) -> None:
        self.fac.op._check_fresh()

    def matmat(self, v: Tensor) -> Tensor:
        """``(H + dI)^{-1} V`` for ``V`` of shape ``(W, k)`` (a checked solve)."""
        return self.fac.solve(v)

    def __repr__(self) -> str:
        return f"InverseOperator(({self.fac.op!r} + {self.fac.damping:g} I)^-1, {self.fac.method})"


class Solves:
    """Mixin: the solves of an operator with ``matmat``, ``to_dense``, ``blocks``, ``layout``.

    Expects ``_factors`` (an ``OrderedDict``), ``_dense_eigh``, ``_bounds`` and
    ``max_memory`` to be set by the operator's constructor, and a
    ``_check_fresh()`` method.
    """

    #: Factorizations kept per operator (least recently used ones are freed).
    max_cached_factorizations: int = 2

    # -- solves ---------------------------------------------------------------
    def spectral_bounds(self) -> tuple[float, float]:
        """Extreme Ritz values of 16 Lanczos steps on ``H`` (cached): estimates from inside."""
        self._check_fresh()
        if self._bounds is None:
            self._store_bounds(
                spectral_bounds(self.matmat, self.num_params, self.dtype, self.device)
            )
        return self._bounds

    def _store_bounds(self, bounds: tuple[float, float]) -> None:
        """Keep Lanczos' ``(theta_min, theta_max)`` (from here or a solve's rider)."""
        lo, hi = bounds
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise NonFiniteError(
                f"H @ v overflowed in {self.dtype} while estimating ||H||: the Hessian's "
                "entries exceed this dtype's range; use float64 or a smaller loss scale"
            )
        self._bounds = (lo, hi)

    def _known_methods(self) -> list[str]:
        """The ``method`` names this operator factors with (besides ``"auto"``)."""
        return sorted(FACTORIZATIONS)

    def _method(self, method: str, costs: dict[str, tuple[float, float]] | None = None) -> str:
        if method == "auto":
            return _select.choose(self, self.max_memory, costs)
        if method not in self._known_methods():
            raise ValueError(
                f"unknown method {method!r} (no such factorization); "
                f"use one of {self._known_methods()} or 'auto'"
            )
        return method

    @paused_gc
    def factor(self, damping: float = 0.0, method: str = "auto") -> Factorization:
        """Factor ``H + damping I`` once (:class:`hessinv.solvers.Factorization`).

        The last :attr:`max_cached_factorizations` factorizations are kept
        (least recently used first out); :meth:`clear_cache` frees them.

        Args:
            damping: The shift ``d`` (any real scalar).
            method: ``"lifted"`` (pivoted LU of the lifted block-tridiagonal
                system, linear in depth), ``"dense"`` (eigendecomposition of
                the dense ``H``, computed once for every damping), ``"woodbury"``,
                ``"minres"``, ``"cg"`` or ``"auto"`` (the cheapest exact method
                that fits in memory, :mod:`hessinv.solvers.select`).

        Raises:
            MemoryError: The method's estimated memory exceeds ``max_memory``.
        """
        self._check_fresh()
        d = _check_damping(damping)
        costs = self.costs()  # once: "auto" chooses by them, the chosen one is checked
        name = self._method(method, costs)
        key = (d, name)
        if key in self._factors:
            self._factors.move_to_end(key)
            return self._factors[key]._handle(self)
        build = self._factorization_class(name)
        cost = costs.get(name)
        if cost is not None:
            _select.check_memory(
                cost[1], f"the {name!r} factorization", self.max_memory, self.device
            )
            _select.warn_if_slow(cost[0], name, self.device)
        fac = build(self, d)
        self._factors[key] = fac._handle(None)  # the cache holds no reference to self
        while len(self._factors) > max(self.max_cached_factorizations, 0):
            self._factors.popitem(last=False)
        return fac

    def costs(self) -> dict[str, tuple[float, float]]:
        """``method -> (flops, bytes)`` of the exact methods (:mod:`hessinv.solvers.select`)."""
        return _select.costs(self)

    def _factorization_class(self, name: str) -> Callable[..., Factorization]:
        """The constructor ``(op, damping)`` of method ``name`` (operators may add methods)."""
        return FACTORIZATIONS[name]

    def clear_cache(self) -> None:
        """Free every cached factorization and the dense eigendecomposition."""
        self._factors.clear()
        self._dense_eigh = None

    def _eigh(self) -> tuple[Tensor, Tensor]:
        """Eigendecomposition of the dense ``H`` (cached)."""
        if self._dense_eigh is None:
            self._dense_eigh = robust_eigh(self.to_dense())
        return self._dense_eigh

    @paused_gc
    def _with_fallback(self, damping: float, method: str, what: Callable[[Factorization], object]):  # noqa: ANN202
        """``what(factor(damping, method))``; under ``"auto"``, dense if the lifted one gives up."""
        fac = self.factor(damping, method)
        try:
            return what(fac)
        except (LiftedPrecisionError, InaccurateSolveError):
            if method != "auto" or fac.method != "lifted":
                raise
            if not self._dense_affordable(DENSE_FALLBACK_MAX_W):
                raise
            return what(self.factor(damping, "dense"))

    def inverse(self, damping: float = 0.0, method: str = "auto") -> InverseOperator:
        """``(H + damping I)^{-1}`` as a linear operator."""
        self._check_fresh()
        return InverseOperator(self.factor(damping, method))

    def logdet(self, damping: float = 0.0, method: str = "auto") -> tuple[float, float]:
        """``(sign, log|det(H + damping I)|)``; ``(0.0, -inf)`` if numerically singular."""
        self._check_fresh()
        return self._with_fallback(damping, method, lambda f: f.logdet())

    def inertia(self, damping: float = 0.0, method: str = "auto") -> Inertia:
        """``(n_pos, n_neg, n_zero)`` of ``H + damping I`` (:class:`hessinv.solvers.Inertia`).

        Zero eigenvalues are those with ``|lambda| <= W eps ||H + dI||``
        (:func:`hessinv.solvers.zero_threshold`); ``.verified`` and ``.how`` say
        how the counts were checked.
        """
        self._check_fresh()
        inert = self._with_fallback(damping, method, lambda f: f.inertia())
        if not inert.verified and method == "auto" and self._dense_affordable(DENSE_VERIFY_MAX_W):
            return self.factor(damping, "dense").inertia()  # verified
        return inert

    def _dense_affordable(self, max_w: int) -> bool:
        """Whether the dense route fits in memory and ``W <= max_w``."""
        if self.num_params > max_w:
            return False
        return _select.dense_cost(self)[1] <= _select.memory_budget(self.device, self.max_memory)

    def is_positive_definite(self, damping: float = 0.0, method: str = "auto") -> bool | None:
        """``True`` only if ``H + damping I`` is proven positive definite (else False/None)."""
        self._check_fresh()
        return self._with_fallback(damping, method, lambda f: f.is_positive_definite())

    def cost_model(self) -> dict[str, float]:
        """Flop estimates of the exact methods (:meth:`costs`)."""
        return {k: v[0] for k, v in self.costs().items()}

    def solve(
        self,
        g: VectorLike,
        damping: float = 0.0,
        method: str = "auto",
        *,
        check: bool = True,
        refine: int = 2,
        maxiter: int | None = None,
    ) -> VectorLike:
        """Return ``x`` with ``(H + damping I) x = g``, exactly or not at all.

        Args:
            g: Flat ``(W,)``, a ``(W, k)`` block, or a per-parameter list.
            damping: Any real ``d``; ``H + dI`` must be nonsingular.
            method: ``"auto"`` (the cheapest exact method that fits in memory,
                falling back to ``"dense"`` where affordable if the lifted
                factorization gives up), ``"lifted"``, ``"dense"``,
                ``"woodbury"`` (the paper's Section 6, under its assumptions),
                ``"minres"`` or ``"cg"`` (Krylov on exact products).
            check: Verify the normwise backward error (one product per column).
            refine: Iterative-refinement steps.
            maxiter: Krylov iteration cap.

        Raises:
            SingularHessianError: ``H + dI`` is numerically singular (hint: pass
                ``damping``).
            InaccurateSolveError: The method could not reach the contract's
                backward error (:func:`hessinv.solvers.solve_tolerance`).
            MemoryError: The method's estimated memory exceeds ``max_memory``.
            ValueError: Unknown method, bad ``g`` or ``damping``, or (woodbury) a
                violated assumption of Section 6, named in the message.
            StaleOperatorError: The parameters changed since construction.
        """
        self._check_fresh()
        d = _check_damping(damping)
        if method in ("minres", "cg"):
            return KrylovSolver(self, d, method, maxiter).solve(g, check=check)
        return self._with_fallback(d, method, lambda f: f.solve(g, check=check, refine=refine))

    # -- residuals -------------------------------------------------------------
    def residual(self, x: Tensor, g: Tensor, damping: float = 0.0) -> Tensor:
        """Per-column relative residuals ``||(H + dI) x - g|| / ||g||``."""
        self._check_fresh()
        if x.dim() == 1:
            return self.residual(x.unsqueeze(1), g.reshape(-1, 1), damping)[0]
        # on exact power-of-two copies at unit scale (the ratio is the same): plain norms
        # of g ~ 1e-160 read 0 and of 1e+155 inf (float64), products below tiny round badly
        xs, gs = rescaled(x, g)
        r = self.matmat(xs) + damping * xs - gs
        return column_norms(r) / column_norms(gs).clamp_min(torch.finfo(g.dtype).tiny)

    def backward_error(self, x: Tensor, g: Tensor, damping: float = 0.0) -> Tensor:
        """Per-column ``||(H + dI) x - g|| / (||H + dI|| ||x|| + ||g||)`` (Lanczos ``||.||``)."""
        self._check_fresh()
        if x.dim() == 1:
            return self.backward_error(x.unsqueeze(1), g.reshape(-1, 1), damping)[0]
        return measured_backward_error(
            lambda v: self.matmat(v) + damping * v, x, g, shifted_norm(self, damping)
        )
