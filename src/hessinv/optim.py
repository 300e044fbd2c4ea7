"""Newton-type training on the exact Hessian (or Gauss-Newton matrix), with certified steps.

``(H + lam I)^{-1} g`` on an indefinite ``H`` is often not a descent step. Every
step here is certified: the factorization of ``H + lam I`` that gives the step
also gives its inertia (:meth:`hessinv.Hessian.inertia`), so positive
definiteness is checked exactly, with no eigensolver and no failed Cholesky.

* ``strategy="trust-region"`` (default): the exact trust-region subproblem
  ``min_s g.s + 1/2 s.H s`` subject to ``|s| <= radius``, solved by Moré &
  Sorensen's iteration on ``phi(lam) = 1/radius - 1/|s(lam)|`` with
  ``(H + lam I) s = -g``. Each trial ``lam`` is factored once; the same
  factorization gives ``s``, ``|s|``'s derivative (one more solve) and the
  inertia that certifies ``H + lam I > 0``. The radius follows the ratio ``rho``
  of actual to predicted decrease. *Hard case* (``g`` orthogonal to the
  eigenvectors of the smallest eigenvalue, so ``|s(lam)| < radius`` as
  ``lam -> -lambda_min``): the step is completed to the boundary along an
  approximate eigenvector of ``lambda_min`` from inverse iteration with the
  factorization at hand (Moré & Sorensen, section 3).
* ``strategy="levenberg-marquardt"``: ``s = -(H + lam I)^{-1} g`` with ``lam``
  adapted from ``rho`` (halved after a very good step, quadrupled after a poor
  one) and never below the smallest value tried whose inertia shows no
  negative (or zero) eigenvalue.

``curvature="hessian"`` or ``"gauss-newton"`` (:class:`hessinv.GaussNewton`);
``curvature_batch=n`` takes the curvature from a random sub-batch of ``n``
samples (rescaled for a ``"sum"`` loss) while the loss, the gradient and the
acceptance test use the full batch.

>>> import torch
>>> from torch import nn
>>> import hessinv.optim
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).double()
>>> X = torch.randn(32, 2, dtype=torch.float64)
>>> y = torch.sin(X[:, :1])
>>> opt = hessinv.optim.Newton(model, nn.MSELoss())
>>> losses = [float(opt.step(X, y)) for _ in range(10)]
>>> losses[-1] < losses[0]
True
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from .errors import SingularHessianError
from .ggn import GaussNewton
from .hessian import Hessian
from .solvers import Factorization

STRATEGIES = ("trust-region", "levenberg-marquardt")
CURVATURES = ("hessian", "gauss-newton")


@dataclass
class StepInfo:
    """What one call of :meth:`Newton.step` did."""

    step: int
    loss: float
    new_loss: float
    accepted: bool
    damping: float
    radius: float
    step_norm: float
    inertia: tuple[int, int, int]
    predicted: float
    actual: float
    rho: float
    attempts: int
    factorizations: int
    seconds: float
    hard_case: bool = False


class Newton:
    """A second-order optimizer that owns a model and a loss.

    Args:
        model: An ``nn.Sequential`` supported by :class:`hessinv.Hessian`.
        loss_func: The loss, reduction ``"sum"`` or ``"mean"``.
        strategy: ``"trust-region"`` or ``"levenberg-marquardt"``.
        curvature: ``"hessian"`` or ``"gauss-newton"``.
        radius: Initial trust-region radius.
        max_radius: Largest radius.
        damping: Initial Levenberg-Marquardt damping (and the trust region's
            floor on ``lam``).
        min_damping: Smallest damping.
        eta: Accept a step when ``rho > eta`` and the loss decreased.
        max_attempts: Tries per :meth:`step` (each with a smaller radius or
            larger damping, reusing the same curvature operator).
        curvature_batch: Sub-batch size for the curvature (``None``: full).
        max_subproblem_iters: Moré-Sorensen iterations per attempt.
        factorization: ``"lifted"``, ``"dense"`` or ``"auto"`` (see
            :meth:`hessinv.Hessian.factor`; the dense route factors once per
            step and serves every trial ``lam``).
        seed: Seed of the sub-batch sampler.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_func: Callable[..., Tensor],
        *,
        strategy: str = "trust-region",
        curvature: str = "hessian",
        radius: float = 1.0,
        max_radius: float = 1e3,
        damping: float = 1e-3,
        min_damping: float = 1e-10,
        eta: float = 0.05,
        max_attempts: int = 6,
        curvature_batch: int | None = None,
        max_subproblem_iters: int = 25,
        factorization: str = "auto",
        seed: int = 0,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
        if not radius > 0 or not max_radius >= radius:
            raise ValueError("need 0 < radius <= max_radius")
        if not damping >= 0 or not min_damping > 0:
            raise ValueError("need damping >= 0 and min_damping > 0")
        if curvature_batch is not None and curvature_batch < 1:
            raise ValueError("curvature_batch must be a positive integer or None")
        self.model = model
        self.loss_func = loss_func
        self.strategy = strategy
        self.curvature = curvature
        self.radius = float(radius)
        self.max_radius = float(max_radius)
        self.damping = float(damping)
        self.min_damping = float(min_damping)
        self.eta = float(eta)
        self.max_attempts = int(max_attempts)
        self.curvature_batch = curvature_batch
        self.max_subproblem_iters = int(max_subproblem_iters)
        if factorization not in ("lifted", "dense", "auto"):
            raise ValueError("factorization must be 'lifted', 'dense' or 'auto'")
        self.factorization = factorization
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0
        self.history: list[StepInfo] = []

    # -- parameters ----------------------------------------------------------------
    def _params(self) -> list[Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _loss(self, X: Tensor, y: Tensor) -> Tensor:  # noqa: N803
        with torch.no_grad():
            return self.loss_func(self.model(X), y).detach()

    def _gradient(self, X: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:  # noqa: N803
        params = self._params()
        with torch.enable_grad():
            loss = self.loss_func(self.model(X), y)
            grads = torch.autograd.grad(loss, params)
        return loss.detach(), torch.cat([g.reshape(-1) for g in grads]).detach()

    def _add(self, s: Tensor) -> None:
        i = 0
        with torch.no_grad():
            for p in self._params():
                n = p.numel()
                p.add_(s[i : i + n].reshape(p.shape).to(p.dtype))
                i += n

    # -- curvature -----------------------------------------------------------------
    def _operator(self, X: Tensor, y: Tensor) -> tuple[Hessian, float]:  # noqa: N803
        """The curvature operator and the factor ``c`` with ``C_full ~ c C_sub``."""
        scale = 1.0
        if self.curvature_batch is not None and self.curvature_batch < X.shape[0]:
            idx = torch.randperm(X.shape[0], generator=self.generator)[: self.curvature_batch]
            idx = idx.to(X.device)
            if getattr(self.loss_func, "reduction", "mean") == "sum":
                scale = X.shape[0] / self.curvature_batch
            X, y = X[idx], y[idx]  # noqa: N806
        cls = Hessian if self.curvature == "hessian" else GaussNewton
        return cls(self.model, self.loss_func, X, y), scale

    @staticmethod
    def _pd(fac: Factorization) -> tuple[bool, tuple[int, int, int]]:
        inertia = fac.inertia()
        return inertia[1] == 0 and inertia[2] == 0, tuple(inertia)

    def _solve(self, C: Hessian, c: float, lam: float, g: Tensor):  # noqa: ANN202, N803
        """Factor ``c C + lam I`` (as ``c (C + lam/c I)``); return ``(fac, pd, inertia, s)``."""
        fac = C.factor(lam / c, method=self.factorization)
        pd, inertia = self._pd(fac)
        s = None
        if pd:
            s = -fac.solve(g / c, check=False)
        return fac, pd, inertia, s

    # -- trust region ------------------------------------------------------------------
    def _norm_estimate(self, C: Hessian, c: float) -> float:  # noqa: N803
        v = torch.randn(C.num_params, generator=self.generator, dtype=C.dtype).to(C.device)
        v = v / torch.linalg.vector_norm(v)
        est = 0.0
        for _ in range(8):
            w = C @ v
            est = float(torch.linalg.vector_norm(w))
            if est == 0.0:
                break
            v = w / est
        return c * est * 1.5 + 1e-12

    def _trust_region_step(self, C: Hessian, c: float, g: Tensor):  # noqa: ANN202, N803
        """Moré-Sorensen: ``(s, lam, inertia, factorizations, hard_case)``."""
        radius = self.radius
        gnorm = float(torch.linalg.vector_norm(g))
        nfac = 0
        floor = self.min_damping
        # try the Newton step first
        fac, pd, inertia, s = self._solve(C, c, floor, g)
        nfac += 1
        if pd and float(torch.linalg.vector_norm(s)) <= radius:
            return s, floor, inertia, nfac, False
        lam_lo = floor  # H + lam_lo I is not PD, or its step is too long
        lam_hi = gnorm / radius + self._norm_estimate(C, c)
        lam = max(lam_lo * 10, gnorm / radius) if not pd else lam_lo
        best = None
        for _ in range(self.max_subproblem_iters):
            if lam <= lam_lo or lam >= lam_hi:
                lam = max(math.sqrt(lam_lo * lam_hi), lam_lo + 0.01 * (lam_hi - lam_lo))
            fac, pd, inertia, s = self._solve(C, c, lam, g)
            nfac += 1
            if not pd:
                lam_lo = lam
                continue
            snorm = float(torch.linalg.vector_norm(s))
            if snorm <= radius:
                best = (s, lam, inertia, fac)
            if 0.9 * radius <= snorm <= radius:
                return s, lam, inertia, nfac, False
            if snorm < radius:
                lam_hi = lam
            else:
                lam_lo = lam
            # Newton step on phi(lam) = 1/radius - 1/|s|: |s|^2 / (s.(C+lam)^{-1}s) (|s|-r)/r
            w = fac.solve(s / c, check=False)
            qq = float(s @ w)
            if qq > 0:
                lam = lam + (snorm**2 / qq) * (snorm - radius) / radius
            if lam_hi - lam_lo <= 1e-10 * max(1.0, lam_hi):
                break
        if best is None:  # pragma: no cover - lam_hi is PD by construction
            raise SingularHessianError(
                "the trust-region subproblem found no positive definite shift"
            )
        s, lam, inertia, fac = best
        snorm = float(torch.linalg.vector_norm(s))
        hard = False
        if snorm < 0.9 * radius:
            # hard case: complete the step to the boundary along an approximate eigenvector
            # of the smallest eigenvalue of C + lam I (inverse iteration with this factorization)
            z = torch.randn(g.shape, generator=self.generator, dtype=g.dtype).to(g.device)
            for _ in range(4):
                z = fac.solve(z, check=False)
                z = z / torch.linalg.vector_norm(z)
            sz = float(s @ z)
            tau = -sz + math.copysign(math.sqrt(sz**2 + radius**2 - snorm**2), -sz if sz else 1.0)
            s = s + tau * z
            hard = True
        return s, lam, inertia, nfac, hard

    # -- one step --------------------------------------------------------------------------
    def step(self, X: Tensor, y: Tensor) -> Tensor:  # noqa: N803
        """One certified second-order step on ``(X, y)``; return the loss before it.

        The parameters change only if the step is accepted (loss decreased and
        ``rho > eta``); :attr:`history` records what happened.
        """
        t0 = time.perf_counter()
        loss0, g = self._gradient(X, y)
        C, c = self._operator(X, y)
        nfac = 0
        info = None
        for attempt in range(1, self.max_attempts + 1):
            hard = False
            if self.strategy == "trust-region":
                s, lam, inertia, nf, hard = self._trust_region_step(C, c, g)
                nfac += nf
            else:
                lam = max(self.damping, self.min_damping)
                while True:
                    fac, pd, inertia, s = self._solve(C, c, lam, g)
                    nfac += 1
                    if pd:
                        break
                    lam = max(4.0 * lam, 1e-6)
                self.damping = lam  # never below a value certified positive definite
            cs = c * (C @ s)
            predicted = -float(g @ s + 0.5 * (s @ cs))
            self._add(s)
            new_loss = self._loss(X, y)
            actual = float(loss0 - new_loss)
            rho = actual / predicted if predicted > 0 else -math.inf
            accepted = bool(math.isfinite(float(new_loss)) and actual > 0 and rho > self.eta)
            snorm = float(torch.linalg.vector_norm(s))
            info = StepInfo(
                step=self.steps,
                loss=float(loss0),
                new_loss=float(new_loss) if accepted else float(loss0),
                accepted=accepted,
                damping=lam,
                radius=self.radius,
                step_norm=snorm,
                inertia=inertia,
                predicted=predicted,
                actual=actual,
                rho=rho,
                attempts=attempt,
                factorizations=nfac,
                seconds=0.0,
                hard_case=hard,
            )
            if self.strategy == "trust-region":
                if rho < 0.25 or not accepted:
                    self.radius = max(0.25 * min(snorm, self.radius), 1e-12)
                elif rho > 0.75 and snorm >= 0.9 * self.radius:
                    self.radius = min(2.0 * self.radius, self.max_radius)
            else:
                if not accepted or rho < 0.25:
                    self.damping = max(4.0 * lam, self.min_damping)
                elif rho > 0.75:
                    self.damping = max(lam / 2.0, self.min_damping)
            if accepted:
                break
            self._add(-s)  # undo
        info.seconds = time.perf_counter() - t0
        self.history.append(info)
        self.steps += 1
        return loss0

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The optimizer's state (not the model's), as ``torch.optim`` optimizers do."""
        return {
            "strategy": self.strategy,
            "curvature": self.curvature,
            "radius": self.radius,
            "max_radius": self.max_radius,
            "damping": self.damping,
            "min_damping": self.min_damping,
            "eta": self.eta,
            "max_attempts": self.max_attempts,
            "curvature_batch": self.curvature_batch,
            "steps": self.steps,
            "generator": self.generator.get_state(),
            "history": [asdict(h) for h in self.history],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a state from :meth:`state_dict`."""
        for key in ("strategy", "curvature"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"state was saved with {key}={state[key]!r}, not {getattr(self, key)!r}"
                )
        self.radius = float(state["radius"])
        self.max_radius = float(state["max_radius"])
        self.damping = float(state["damping"])
        self.min_damping = float(state["min_damping"])
        self.eta = float(state["eta"])
        self.max_attempts = int(state["max_attempts"])
        self.curvature_batch = state["curvature_batch"]
        self.steps = int(state["steps"])
        self.generator.set_state(state["generator"])
        self.history = [StepInfo(**{**h, "inertia": tuple(h["inertia"])}) for h in state["history"]]
