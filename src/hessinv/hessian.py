"""The user-facing linear operator: the exact Hessian of a layered network.

>>> import torch, hessinv
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> nn = torch.nn
>>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
>>> X, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
>>> H = hessinv.Hessian(model, torch.nn.MSELoss(), X, y)
>>> H.shape
(21, 21)
>>> g = H.gradient()
>>> x = H.solve(g, damping=1e-3)
>>> bool(torch.allclose(H @ x + 1e-3 * x, g))
True
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from . import baselines
from .blocktri import BlockTriLU, InertiaResult, block_tri_inertia
from .derivatives import StageBlocks
from .errors import HINT, LiftedPrecisionWarning, SingularHessianError
from .layers import stages_from_sequential
from .lifted import LiftedSystem
from .pipeline import Pipeline, Stage
from .products import compute_blocks, gradient, hvp
from .vectors import Layout

VectorLike = Tensor | Sequence[Tensor]


def _check_damping(damping: float) -> float:
    if isinstance(damping, Tensor):
        damping = float(damping)
    if not isinstance(damping, (int, float)) or not math.isfinite(damping):
        raise ValueError(f"damping must be a finite number, got {damping!r}")
    return float(damping)


def default_check_rtol(dtype: torch.dtype) -> float:
    """Largest relative residual ``||(H+dI)x - g|| / ||g||`` a solve may return: ``eps^(1/4)``.

    A backward-stable solve of a system with condition number ``kappa`` leaves
    about ``kappa eps``; a singular system leaves ``O(1)``. ``eps^(1/4)`` (1.2e-4 in
    float64, 1.8e-2 in float32) separates the two for ``kappa`` up to about
    ``eps^(-3/4)`` (1e12 in float64).
    """
    return torch.finfo(dtype).eps ** 0.25


class HessianFactorization:
    """The pivoted factorization of the lifted system ``K`` for one damping.

    One factorization serves many right-hand sides; ``logdet`` and
    ``inertia`` are read off factorizations of the same ``K``.
    """

    def __init__(self, op: Hessian, damping: float) -> None:
        self.op = op
        self.damping = _check_damping(damping)
        self.system = LiftedSystem(op.blocks, self.damping)
        self.lu = BlockTriLU(self.system.diag, self.system.upper)  # blocks built as consumed
        self.m = self.system.m
        self._inertia: InertiaResult | None = None

    @property
    def singular(self) -> bool:
        """True if ``H + damping I`` is singular to working precision (zero pivot)."""
        return self.lu.singular or self.system.singular_by_structure

    def solve(
        self,
        g: VectorLike,
        *,
        check: bool = True,
        check_rtol: float | None = None,
        refine: int = 2,
    ) -> VectorLike:
        """``x = (H + damping I)^{-1} g`` for ``g`` flat, ``(W, k)`` or per-parameter.

        ``refine`` steps of iterative refinement (one ``H @ v`` and one pass
        over the factors each) follow the solve. One step removes the error
        of the dropped null directions (their ``1/damping`` amplifies the
        round-off of the projection, :mod:`hessinv.lifted`) and brings the
        residual to the level of a dense LU or below.

        Raises:
            SingularHessianError: A zero pivot, an exact null space with
                ``damping == 0``, or (``check=True``) a relative residual above
                ``check_rtol`` (default :func:`default_check_rtol`).
        """
        gm, form = self.op.layout.to_matrix(g, "g")
        if self.system.singular_by_structure:
            raise SingularHessianError(
                f"H has at least {self.system.n_dropped} exact null directions (parameter "
                f"directions no output depends on at this batch). {HINT}"
            )
        if self.lu.singular:
            raise SingularHessianError(f"zero pivot in the lifted factorization. {HINT}")
        x = self.op._refined_solve(self._apply, gm, self.damping, refine, check, check_rtol)
        return self.op.layout.from_matrix(x, form)

    def _apply(self, g: Tensor) -> Tensor:
        """One pass over the factors: ``(H + dI)^{-1} g`` for ``g`` of shape ``(W, k)``."""
        return self.system.extract(self.lu.solve(self.system.rhs(g)), g)

    def logdet(self) -> tuple[float, float]:
        """``(sign, log|det(H + damping I)|)`` as ``torch.linalg.slogdet``.

        ``log|det H| = log|det K| + (dropped) log|d|`` and ``sign = (-1)^m
        sign(det K) sign(d)^(dropped)`` (:mod:`hessinv.lifted`); ``(0, -inf)``
        when singular (with a :class:`~hessinv.errors.LiftedPrecisionWarning`
        unless the singularity is structural).
        """
        if self.singular:
            self._warn_if_lift_lost_precision()
            return 0.0, -math.inf
        s, la = self.lu.slogdet()
        s2, la2 = self.system.dropped_logdet()
        return s * s2 * (-1.0 if self.m % 2 else 1.0), la + la2

    def inertia(self) -> tuple[int, int, int]:
        """``(n_pos, n_neg, n_zero)`` of ``H + damping I``, with no eigensolver on ``H``.

        Sylvester's law on ``K``: ``inertia(H + dI) = inertia(K) - (m, m, 0)``,
        plus the dropped directions (eigenvalue ``d`` each).
        """
        self._warn_if_lift_lost_precision()
        r = self.inertia_details()
        pos, neg = r.positive - self.m, r.negative - self.m
        if pos < 0 or neg < 0:
            # Eigenvalues of K near its round-off level were counted as zeros, but K has at
            # least m of each sign: count by sign alone (``eigh`` resolves them).
            r = self._inertia = block_tri_inertia(self.system.diag, self.system.upper, rtol=0.0)
            pos, neg = r.positive - self.m, r.negative - self.m
        if pos < 0 or neg < 0:  # pragma: no cover - guards numerical breakdown
            raise torch.linalg.LinAlgError("inertia of the lifted system is inconsistent")
        dp, dn, dz = self.system.dropped_inertia()
        return pos + dp, neg + dn, r.zero + dz

    def _warn_if_lift_lost_precision(self) -> None:
        """Warn when ``K`` has a round-off-level pivot that the structure does not explain."""
        if self.lu.singular and not self.system.singular_by_structure:
            warnings.warn(
                f"the lifted system is singular to working precision (smallest pivot "
                f"{self.lu.min_pivot:.1e} <= {self.lu.tol:.1e}, largest entry "
                f"{self.lu.scale:.1e}): H + damping*I is singular, or too ill-conditioned "
                "for the lifted factorization (exploding activations or Jacobians make it "
                "far worse conditioned than H); results treat it as singular. Cross-check "
                "with H.factor(damping, method='dense') or increase damping.",
                LiftedPrecisionWarning,
                stacklevel=3,
            )

    def inertia_details(self) -> InertiaResult:
        """The congruence factorization of ``K`` (cached), checked against the LU.

        :func:`hessinv.blocktri.block_tri_inertia` with delayed pivots at
        threshold ``0.01`` and at most ``max_k n_k`` directions carried
        between fronts (linear cost even on ill-conditioned ``K``):

        * ``K`` nonsingular by the pivoted LU: Bunch-Kaufman fronts, signs only
          (``rtol=0``; no eigensolver). The determinant must agree with the LU's
          (the same sign, which one spoiled sign would flip; ``log|det|`` to
          ``0.1 + sqrt(eps) |log|det||``, against gross pivot growth). If it
          does not, orthogonal (``eigh``) fronts with the same cap, then with
          threshold ``0.1`` and no cap; the first that agrees is kept (the
          last one otherwise, with a :class:`~hessinv.errors.LiftedPrecisionWarning`).
        * ``K`` singular to working precision: orthogonal fronts, whose small
          eigenvalues with negligible coupling count as zeros; recomputed
          without the cap if it forced eliminations (nothing to compare with).
        """
        if self._inertia is None:
            ls = self.system
            cap = max(ls.sizes)
            if not self.lu.singular:
                attempts: list[dict] = [
                    {"alpha": 0.01, "max_carry": cap, "pivoting": "ldl"},
                    {"alpha": 0.01, "max_carry": cap},
                    {"alpha": 0.1},
                ]
                for kw in attempts:  # the LU says no zero eigenvalues: count signs only
                    r = block_tri_inertia(ls.diag, ls.upper, rtol=0.0, **kw)
                    if self._agrees_with_lu(r):
                        break
                else:
                    warnings.warn(
                        "the inertia of the lifted system does not agree with the determinant "
                        "of its LU (K is badly conditioned): the counts may be wrong. "
                        "Cross-check with H.factor(damping, method='dense') or increase damping.",
                        LiftedPrecisionWarning,
                        stacklevel=3,
                    )
            else:
                r = block_tri_inertia(ls.diag, ls.upper, alpha=0.01, max_carry=cap)
                if r.forced:
                    r = block_tri_inertia(ls.diag, ls.upper, alpha=0.01)
            self._inertia = r
        return self._inertia

    def _agrees_with_lu(self, r: InertiaResult) -> bool | None:
        """Whether ``r``'s determinant matches the LU's; ``None`` if either is singular."""
        if r.zero or self.lu.singular:
            return None
        s, la = self.lu.slogdet()
        # log|det| to 10%: both carry the round-off of K's smallest pivots (1e-3 seen on
        # trust-region shifts near an eigenvalue); a gross growth error shows up far above
        tol = 0.1 + math.sqrt(torch.finfo(self.op.dtype).eps) * abs(la)
        return r.sign == s and abs(r.logabsdet - la) <= tol


class DenseFactorization:
    """``H + damping I`` through the eigendecomposition of the dense ``H`` (small ``W``).

    ``H = Q diag(w) Q^T`` is computed once per operator (``O(W^3)``) and serves
    every damping: solves are ``Q diag(1/(w + d)) Q^T g``, the inertia and
    log-determinant are read off ``w + d``. Chosen by ``factor(method="auto")``
    when :meth:`Hessian.cost_model` says the dense route is cheaper (tiny ``W``,
    large batch).
    """

    def __init__(self, op: Hessian, damping: float) -> None:
        self.op = op
        self.damping = _check_damping(damping)
        w, q = op._eigh()
        self.w, self.q = w + self.damping, q
        scale = float(w.abs().max()) if w.numel() else 0.0
        self.tol = w.shape[0] * torch.finfo(w.dtype).eps * max(scale, abs(self.damping), 1e-300)

    @property
    def singular(self) -> bool:
        """True if an eigenvalue of ``H + damping I`` is at round-off level."""
        return bool((self.w.abs() <= self.tol).any())

    def solve(
        self, g: VectorLike, *, check: bool = True, check_rtol: float | None = None, refine: int = 2
    ) -> VectorLike:
        """``(H + damping I)^{-1} g``; same contract as :meth:`HessianFactorization.solve`."""
        gm, form = self.op.layout.to_matrix(g, "g")
        if self.singular:
            raise SingularHessianError(f"an eigenvalue of H + damping*I is zero. {HINT}")
        x = self.op._refined_solve(self._apply, gm, self.damping, refine, check, check_rtol)
        return self.op.layout.from_matrix(x, form)

    def _apply(self, g: Tensor) -> Tensor:
        return self.q @ ((self.q.T @ g) / self.w.unsqueeze(1))

    def logdet(self) -> tuple[float, float]:
        """``(sign, log|det(H + damping I)|)``."""
        if self.singular:
            return 0.0, -math.inf
        sign = -1.0 if int((self.w < 0).sum()) % 2 else 1.0
        return sign, float(torch.log(self.w.abs()).sum())

    def inertia(self) -> tuple[int, int, int]:
        """``(n_pos, n_neg, n_zero)`` of ``H + damping I`` from the eigenvalues."""
        zero = self.w.abs() <= self.tol
        return (
            int(((self.w > 0) & ~zero).sum()),
            int(((self.w < 0) & ~zero).sum()),
            int(zero.sum()),
        )


class InverseOperator:
    """``(H + damping I)^{-1}`` as a linear operator (``@``, ``to_scipy``)."""

    def __init__(self, fac: HessianFactorization) -> None:
        self.fac = fac
        self.shape = fac.op.shape
        self.dtype = fac.op.dtype
        self.device = fac.op.device

    def __matmul__(self, g: VectorLike) -> VectorLike:
        return self.fac.solve(g)

    def to_scipy(self):  # noqa: ANN201
        """A ``scipy.sparse.linalg.LinearOperator`` applying the solve."""
        return self.fac.op._scipy(lambda m: self.fac.solve(m))


class Hessian:
    """The exact Hessian of a layered network, as a linear operator.

    ``Hessian(model, loss_func, X, y)`` for an ``nn.Sequential`` (nested ones
    flattened) and a loss with reduction ``"sum"`` or ``"mean"``; or
    :meth:`from_stages` for a functional pipeline. Parameters with
    ``requires_grad=False`` are constants, left out of ``H``.

    The per-stage derivative blocks are computed once, at construction; ``H @ v``
    then costs one forward and one backward sweep (eq. 24), and
    :meth:`solve` factors the lifted block-tridiagonal system exactly.

    Args:
        model: The network.
        loss_func: ``loss_func(model(X), y)`` is the scalar loss.
        X: Inputs, batch first.
        y: Targets, batch first.
        generic: Use generic autodiff for every block (no fast paths).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_func: Callable[..., Tensor],
        X: Tensor,  # noqa: N803
        y: Tensor,
        *,
        generic: bool = False,
    ) -> None:
        if not isinstance(X, Tensor) or not isinstance(y, Tensor):
            raise TypeError("X and y must be tensors")
        if X.shape[0] != y.shape[0]:
            raise ValueError(f"X has {X.shape[0]} samples but y has {y.shape[0]}")
        if y.dtype.is_floating_point and not torch.isfinite(y).all():
            raise ValueError("y contains NaN or Inf")
        stages, z0 = stages_from_sequential(model, loss_func, X, y)
        self._init(Pipeline(stages, z0), generic=generic, check_mixing=False)

    @classmethod
    def from_stages(
        cls,
        stages: Sequence[Stage],
        z0: Tensor,
        *,
        generic: bool = False,
        check_mixing: bool = True,
    ) -> Hessian:
        """Build the operator of a functional pipeline.

        Args:
            stages: ``hessinv.Stage(fn, params)`` objects; the last returns the
                scalar loss (a sum or mean over samples).
            z0: The input, batch first.
            generic: Unused for functional stages (always generic autodiff).
            check_mixing: Verify with one Jacobian-vector product per stage
                that no stage mixes samples (raises ``ValueError``).
        """
        self = cls.__new__(cls)
        self._init(Pipeline(stages, z0), generic=generic, check_mixing=check_mixing)
        return self

    def _compute_blocks(
        self, pipeline: Pipeline, generic: bool
    ) -> tuple[Tensor, list[StageBlocks]]:
        """The loss and the stage blocks this operator is made of (``H``'s own)."""
        return compute_blocks(pipeline, generic=generic)

    def _init(self, pipeline: Pipeline, *, generic: bool, check_mixing: bool) -> None:
        self.pipeline = pipeline
        if check_mixing:
            _check_no_mixing(pipeline)
        self._loss, self.blocks = self._compute_blocks(pipeline, generic)
        self.layout = Layout(tuple(pipeline.param_shapes), pipeline.dtype, pipeline.device)
        self._factors: dict[tuple[float, str], HessianFactorization | DenseFactorization] = {}
        self._dense_eigh: tuple[Tensor, Tensor] | None = None

    # -- operator basics ---------------------------------------------------
    @property
    def num_params(self) -> int:
        """``W``, the number of parameters."""
        return self.pipeline.num_params

    @property
    def shape(self) -> tuple[int, int]:
        """``(W, W)``."""
        return (self.num_params, self.num_params)

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype."""
        return self.pipeline.dtype

    @property
    def device(self) -> torch.device:
        """The parameters' device."""
        return self.pipeline.device

    @property
    def stage_blocks(self) -> list[StageBlocks]:
        """The per-stage derivative blocks (DESIGN.md section 1)."""
        return self.blocks

    def loss(self) -> Tensor:
        """The loss ``z_L`` at the current parameters."""
        return self._loss

    def gradient(self) -> Tensor:
        """The flat gradient, ``e_L M^{-1} D_x`` (paper eq. 8)."""
        return gradient(self.blocks)

    def matmat(self, v: Tensor) -> Tensor:
        """``H V`` for ``V`` of shape ``(W, k)`` (no checks)."""
        return hvp(self.blocks, v)

    def __matmul__(self, v: VectorLike) -> VectorLike:
        vm, form = self.layout.to_matrix(v, "v")
        return self.layout.from_matrix(self.matmat(vm), form)

    def diagonal(self) -> Tensor:
        """The exact diagonal of ``H`` (length ``W``), linear in depth (:mod:`hessinv.diagonal`)."""
        from .diagonal import diagonal

        return diagonal(self.blocks)

    def block_diagonal(self) -> list[Tensor]:
        """The exact ``p_l x p_l`` diagonal blocks of ``H``, one per stage, linear in depth."""
        from .diagonal import block_diagonal

        return block_diagonal(self.blocks)

    def to_dense(self) -> Tensor:
        """The ``W x W`` matrix, ``H @ I``."""
        eye = torch.eye(self.num_params, dtype=self.dtype, device=self.device)
        h = self.matmat(eye)
        return 0.5 * (h + h.T)

    def _scipy(self, apply: Callable[[Tensor], Tensor]):  # noqa: ANN202
        import numpy as np
        from scipy.sparse.linalg import LinearOperator

        def mm(x: np.ndarray) -> np.ndarray:
            t = torch.as_tensor(np.asarray(x), dtype=self.dtype, device=self.device)
            t2 = t.reshape(self.num_params, -1)
            out = apply(t2)
            return out.detach().cpu().numpy().reshape(x.shape)

        return LinearOperator(
            self.shape,
            matvec=mm,
            matmat=mm,
            rmatvec=mm,
            rmatmat=mm,
            dtype=np.dtype(str(self.dtype).replace("torch.", "")),
        )

    def to_scipy(self):  # noqa: ANN201
        """A ``scipy.sparse.linalg.LinearOperator`` for ``H`` (symmetric)."""
        return self._scipy(self.matmat)

    # -- solves ---------------------------------------------------------------
    def factor(
        self, damping: float = 0.0, method: str = "lifted"
    ) -> HessianFactorization | DenseFactorization:
        """Factor ``H + damping I`` (cached per damping and method).

        Args:
            damping: The shift ``d``.
            method: ``"lifted"`` (the pivoted factorization of the lifted
                block-tridiagonal system, linear in depth), ``"dense"`` (the
                eigendecomposition of the dense ``H``, computed once for all
                dampings, ``O(W^3)``), or ``"auto"`` (by :meth:`cost_model`).
        """
        d = _check_damping(damping)
        if method == "auto":
            c = self.cost_model()
            method = "dense" if c["dense"] < c["lifted"] else "lifted"
        if method not in ("lifted", "dense"):
            raise ValueError(f"unknown factorization {method!r}; use lifted, dense or auto")
        key = (d, method)
        if key not in self._factors:
            cls = HessianFactorization if method == "lifted" else DenseFactorization
            self._factors[key] = cls(self, d)
        return self._factors[key]

    def _eigh(self) -> tuple[Tensor, Tensor]:
        """Eigendecomposition of the dense ``H`` (cached)."""
        if self._dense_eigh is None:
            self._dense_eigh = torch.linalg.eigh(self.to_dense())
        return self._dense_eigh

    def inverse(self, damping: float = 0.0) -> InverseOperator:
        """``(H + damping I)^{-1}`` as a linear operator."""
        return InverseOperator(self.factor(damping))

    def logdet(self, damping: float = 0.0) -> tuple[float, float]:
        """``(sign, log|det(H + damping I)|)``, read off the factorization."""
        return self.factor(damping).logdet()

    def inertia(self, damping: float = 0.0) -> tuple[int, int, int]:
        """``(n_pos, n_neg, n_zero)`` of ``H + damping I``, with no eigensolver on ``H``."""
        return self.factor(damping).inertia()

    def cost_model(self) -> dict[str, float]:
        """Flop estimates used by ``method="auto"``.

        ``lifted``: the pivoted panel factorizations of the ``2L - 1`` blocks of
        the lifted system (sizes ``n_i``: ``k_l + N a_l`` and ``N a_l``
        alternating, ``k_l`` the directions kept after dropping null ones,
        :mod:`hessinv.lifted`), ``sum_i 2 (n_i + n_{i+1}) n_i^2``, plus a fixed
        ``1e5`` per block for the Python and kernel-launch overhead;
        ``dense``: forming ``H`` by ``W`` products (``W * sum_l 4 N (a_l a_{l-1} +
        2 a_l p_l)``) plus an LU, ``2 W^3 / 3``.
        """
        sizes = []
        for b in self.blocks:
            k = b.num_params
            if b.x_span is not None:  # the lifted system keeps at most this many directions
                rows = b.x_span.shape[0] * b.x_span.shape[1]
                rows += 0 if b.Tzx is None else b.Tzx.shape[0] * b.Tzx.shape[1]
                k = min(k, rows)
            m = 0 if b.Jx is None else b.Jx.shape[0] * b.Jx.shape[1]
            sizes += [k + m, m] if m else [k]
        lifted = 0.0
        for i, n in enumerate(sizes):
            n1 = sizes[i + 1] if i + 1 < len(sizes) else 0
            lifted += 2.0 * (n + n1) * n * n + 1e5
        w = float(self.num_params)
        per_hv = 0.0
        for b in self.blocks[:-1]:
            n, a, p = b.Jx.shape
            per_hv += 4.0 * n * (a * a + 2 * a * p)
        dense = w * per_hv + 2.0 * w**3 / 3.0
        return {"lifted": lifted, "dense": dense}

    def solve(
        self,
        g: VectorLike,
        damping: float = 0.0,
        method: str = "auto",
        *,
        check: bool = True,
        check_rtol: float | None = None,
        rtol: float = 1e-10,
        maxiter: int | None = None,
        refine: int = 2,
    ) -> VectorLike:
        """Return ``x`` with ``(H + damping I) x = g``.

        Args:
            g: Flat ``(W,)``, a ``(W, k)`` block, or a per-parameter list.
            damping: ``d >= 0`` or any real; ``H + dI`` must be nonsingular.
            method: ``"lifted"`` (exact, pivoted, linear in depth), ``"dense"``
                (forms ``H``, ``torch.linalg.solve``), ``"minres"``, ``"cg"``
                (Krylov on exact products), or ``"auto"`` (``"lifted"`` unless
                :meth:`cost_model` predicts ``"dense"`` cheaper), or ``"woodbury"``
                (the paper's Section 6 algorithm; only under its assumptions,
                :mod:`hessinv.woodbury`).
            check: Verify the relative residual with one product.
            check_rtol: Residual threshold (default :func:`default_check_rtol`).
            rtol: Krylov stopping tolerance.
            maxiter: Krylov iteration cap.
            refine: Iterative-refinement steps of the lifted solve.

        Raises:
            SingularHessianError: ``H + dI`` singular (hint: pass ``damping``),
                or a Krylov method that did not reach ``rtol``.
            ValueError: Unknown method, bad ``g`` or ``damping``, or (woodbury) a
                violated assumption of Section 6, named in the message.
        """
        d = _check_damping(damping)
        if method == "auto":
            c = self.cost_model()
            method = "dense" if c["dense"] < c["lifted"] else "lifted"
        if method == "lifted":
            return self.factor(d).solve(g, check=check, check_rtol=check_rtol, refine=refine)
        gm, form = self.layout.to_matrix(g, "g")
        if method == "dense":
            a = self.to_dense() + d * torch.eye(
                self.num_params, dtype=self.dtype, device=self.device
            )
            lu, piv, info = torch.linalg.lu_factor_ex(a)
            if int(info) != 0:
                raise SingularHessianError(f"dense LU found a zero pivot. {HINT}")
            x = torch.linalg.lu_solve(lu, piv, gm)
        elif method == "woodbury":
            from .woodbury import woodbury_solve

            x = woodbury_solve(self.blocks, gm, d)
        elif method in ("minres", "cg"):
            fn = baselines.minres if method == "minres" else baselines.cg
            cols = []
            for j in range(gm.shape[1]):
                xj, info = fn(
                    lambda v: self.matmat(v[:, None])[:, 0] + d * v,
                    gm[:, j],
                    rtol=rtol,
                    maxiter=maxiter,
                )
                if not info.converged:
                    raise SingularHessianError(
                        f"{method} did not reach rtol={rtol:g} in {info.iterations} iterations "
                        f"(residual {info.residual:.2e}); try method='lifted'"
                    )
                cols.append(xj)
            x = torch.stack(cols, dim=1)
            check = False
        else:
            raise ValueError(
                f"unknown method {method!r}; use lifted, dense, minres, cg, woodbury or auto"
            )
        if not torch.isfinite(x).all():
            raise SingularHessianError(f"the solve overflowed. {HINT}")
        if check:
            self._check_residual(x, gm, d, check_rtol)
        return self.layout.from_matrix(x, form)

    def residual(self, x: Tensor, g: Tensor, damping: float = 0.0) -> Tensor:
        """Per-column relative residuals ``||(H + dI) x - g|| / ||g||``."""
        r = self.matmat(x) + damping * x - g
        gn = torch.linalg.vector_norm(g, dim=0).clamp_min(torch.finfo(g.dtype).tiny)
        return torch.linalg.vector_norm(r, dim=0) / gn

    def _check_residual(
        self, x: Tensor, g: Tensor, damping: float, check_rtol: float | None
    ) -> None:
        self._raise_if_large(self.residual(x, g, damping), check_rtol)

    def _raise_if_large(self, res: Tensor, check_rtol: float | None) -> None:
        tol = default_check_rtol(self.dtype) if check_rtol is None else check_rtol
        worst = float(res.max())
        if not worst <= tol:
            raise SingularHessianError(f"relative residual {worst:.2e} exceeds {tol:.1e}. {HINT}")

    def _refined_solve(
        self,
        apply: Callable[[Tensor], Tensor],
        g: Tensor,
        damping: float,
        refine: int,
        check: bool,
        check_rtol: float | None,
    ) -> Tensor:
        """``apply(g)`` followed by up to ``refine`` steps of iterative refinement.

        A refinement step is kept only if it lowers the residual (on a system
        too ill-conditioned for the working precision refinement diverges,
        and the better vector is kept), and none is taken once the residual is
        at round-off level; the last residual serves the check, so a solve
        costs one to ``refine + 1`` products ``H @ v``.
        """
        x = apply(g)
        if not torch.isfinite(x).all():
            raise SingularHessianError(f"the solve overflowed. {HINT}")
        if refine == 0:
            if check:
                self._check_residual(x, g, damping, check_rtol)
            return x
        gn = torch.linalg.vector_norm(g, dim=0).clamp_min(torch.finfo(g.dtype).tiny)
        r = g - self.matmat(x) - damping * x
        rn = torch.linalg.vector_norm(r, dim=0)
        eps = torch.finfo(g.dtype).eps
        for _ in range(refine):
            if float((rn / gn).max()) <= 10 * eps:
                break  # nothing left to refine
            x_new = x + apply(r)
            r_new = g - self.matmat(x_new) - damping * x_new
            rn_new = torch.linalg.vector_norm(r_new, dim=0)
            if not bool(torch.isfinite(rn_new).all()) or float((rn_new / gn).max()) >= float(
                (rn / gn).max()
            ):
                break
            x, r, rn = x_new, r_new, rn_new
        if check:
            self._raise_if_large(rn / gn, check_rtol)
        return x


def _check_no_mixing(pipeline: Pipeline) -> None:
    """Raise if a stage mixes samples: one JVP with a tangent on sample 0 only."""
    n = pipeline.batch_size
    if n < 2:
        return
    zs = pipeline.forward()
    gen = torch.Generator(device="cpu").manual_seed(0)
    for i, st in enumerate(pipeline.stages):
        z = zs[i]
        if not z.dtype.is_floating_point:
            continue
        t = torch.zeros_like(z)
        t[0] = torch.randn(z[0].shape, generator=gen, dtype=z.dtype).to(z.device)
        last = i == len(pipeline.stages) - 1
        if last:

            def gz(zz: Tensor, st: Stage = st) -> Tensor:
                return torch.func.grad(lambda q: st.fn(q, st.params).reshape(()))(zz)

            out = torch.func.jvp(gz, (z,), (t,))[1]
        else:
            out = torch.func.jvp(lambda zz, st=st: st.fn(zz, st.params), (z,), (t,))[1]
        leak = float(out[1:].abs().max())
        ref = float(out[:1].abs().max()) + 1e-30
        if leak > 1e3 * torch.finfo(z.dtype).eps * max(ref, 1.0):
            raise ValueError(
                f"stage {i} mixes samples (a change to sample 0 changes sample 1..N-1 by "
                f"{leak:.2e}); every stage must treat samples independently"
            )
