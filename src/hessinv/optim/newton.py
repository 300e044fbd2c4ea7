"""The :class:`Newton` optimizer: exact trust-region and Levenberg-Marquardt steps."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from ..grad_mode import recording
from .cholesky import ShiftedCholesky
from .curvature import ROUTES, choose_route, dense_spectrum, kernel_spectrum, operator
from .factored import FactoredSolver
from .spectral import ShiftedSolver, Spectrum

STRATEGIES = ("trust-region", "levenberg-marquardt")
CURVATURES = ("hessian", "gauss-newton")
MAX_DAMPING = 1e12  # relative to |C|: beyond it a step is a gradient step of length ~0


@dataclass
class StepInfo:
    """What one call of :meth:`Newton.step` did.

    ``certified`` is True only when ``C + damping I`` was *proven* positive
    definite for the step taken (all eigenvalues above a round-off margin, or a
    factorization's ``is_positive_definite()``); ``certificate`` says how, or
    why not. ``times`` splits ``seconds`` into ``gradient``, ``curvature``
    (the curvature operator's stage blocks), ``decompose`` (the dense matrix, its
    ``eigh``, or the Jacobian and its SVD), ``subproblem`` (trial shifts: their
    Cholesky or lifted factorizations and solves), ``evaluate`` (trial losses)
    and ``other``.
    """

    step: int
    loss: float
    new_loss: float
    accepted: bool
    damping: float
    radius: float
    step_norm: float
    predicted: float
    actual: float
    rho: float
    attempts: int
    factorizations: int
    seconds: float
    certified: bool = False
    certificate: str = ""
    route: str = ""
    min_eigenvalue: float = math.nan
    hard_case: bool = False
    times: dict[str, float] = field(default_factory=dict)


class Newton(torch.optim.Optimizer):
    """Second-order training on the exact Hessian or Gauss-Newton matrix ``C``.

    A ``torch.optim.Optimizer`` over the model's trainable parameters (one
    parameter group: the curvature couples them all); its hyperparameters live
    in ``param_groups[0]``. :meth:`step` takes the batch.

    Args:
        model: A model that :class:`hessinv.Hessian` accepts.
        loss_func: The loss, reduction ``"sum"`` or ``"mean"``.
        strategy: ``"trust-region"`` (exact subproblem ``min g.s + s.C.s/2``,
            ``|s| <= radius``) or ``"levenberg-marquardt"`` (``s = -(C + lam I)^{-1} g``).
        curvature: ``"hessian"`` or ``"gauss-newton"``.
        radius: Initial trust-region radius (parameter units).
        max_radius: Largest radius.
        damping: Initial Levenberg-Marquardt shift, relative to ``|C|_2`` (so
            the optimizer is unchanged when the loss is scaled).
        min_damping: Smallest Levenberg-Marquardt shift, relative to ``|C|_2``.
        eta: Accept a step when the loss decreased and ``rho > eta``.
        max_attempts: Trials per :meth:`step` (smaller radius or larger
            damping, reusing the curvature decomposition).
        curvature_batch: Sub-batch size for the curvature (``None``: full batch).
        max_subproblem_iters: Shifts per trust-region solve on the lifted route.
        factorization: ``"auto"``, ``"dense"`` (Cholesky per shift), ``"eigh"``,
            ``"kernel"`` (Gauss-Newton) or ``"lifted"`` (see
            :mod:`hessinv.optim.curvature`).
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
        min_damping: float = 1e-12,
        eta: float = 0.05,
        max_attempts: int = 8,
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
        if factorization not in ROUTES:
            raise ValueError(f"factorization must be one of {ROUTES}, got {factorization!r}")
        if factorization == "kernel" and curvature != "gauss-newton":
            raise ValueError("factorization='kernel' needs curvature='gauss-newton'")
        params = [p for p in model.parameters() if p.requires_grad]
        defaults = {
            "strategy": strategy,
            "curvature": curvature,
            "max_radius": float(max_radius),
            "min_damping": float(min_damping),
            "eta": float(eta),
            "max_attempts": int(max_attempts),
            "curvature_batch": curvature_batch,
            "max_subproblem_iters": int(max_subproblem_iters),
            "factorization": factorization,
        }
        super().__init__(params, defaults)
        self.model = model
        self.loss_func = loss_func
        self.radius = float(radius)
        self.damping = float(damping)
        self.nu = 2.0  # Nielsen's growth factor of the damping after a rejected step
        self.shift = 0.0  # the last trust-region shift (warm start on the lifted route)
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0
        self.history: list[StepInfo] = []
        _warm_up(params[0].dtype if params else torch.float64)

    def add_param_group(self, param_group: dict) -> None:
        """Only one group: the curvature couples every parameter of the model."""
        if getattr(self, "param_groups", None):
            raise ValueError(
                "Newton takes one parameter group (the model's trainable parameters): "
                "the curvature couples them all. Freeze parameters with requires_grad=False."
            )
        super().add_param_group(param_group)

    # hyperparameters are read from the group, so schedulers and load_state_dict see them
    def __getattr__(self, name: str):  # noqa: ANN204, D105
        groups = self.__dict__.get("param_groups")
        if groups and name in groups[0] and name != "params":
            return groups[0][name]
        raise AttributeError(name)

    # -- model -------------------------------------------------------------------------
    def _params(self) -> list[Tensor]:
        return list(self.param_groups[0]["params"])

    def _loss(self, X: Tensor, y: Tensor) -> float:  # noqa: N803
        with torch.no_grad():
            return float(self.loss_func(self.model(X), y))

    def _gradient(self, X: Tensor, y: Tensor) -> tuple[float, Tensor]:  # noqa: N803
        with torch.enable_grad():
            loss = self.loss_func(self.model(X), y)
            grads = torch.autograd.grad(loss, self._params())
        return float(loss.detach()), torch.cat([g.reshape(-1) for g in grads]).detach()

    def _add(self, s: Tensor) -> None:
        i = 0
        with torch.no_grad():
            for p in self._params():
                n = p.numel()
                p.add_(s[i : i + n].reshape(p.shape).to(p.dtype))
                i += n

    def _sub_batch(self, X: Tensor, y: Tensor) -> tuple[Tensor, Tensor, float]:  # noqa: N803
        """The curvature's batch and ``c`` with ``C_full ~ c C_sub``."""
        nb = self.curvature_batch
        if nb is None or nb >= X.shape[0]:
            return X, y, 1.0
        idx = torch.randperm(X.shape[0], generator=self.generator)[:nb].to(X.device)
        scale = X.shape[0] / nb if getattr(self.loss_func, "reduction", "mean") == "sum" else 1.0
        return X[idx], y[idx], scale

    # -- one step ------------------------------------------------------------------------
    @recording  # gradients and curvature need autograd, whatever the caller's mode
    def step(self, X: Tensor, y: Tensor) -> float:  # noqa: N803
        """One second-order step on the batch ``(X, y)``; return the loss before it.

        The parameters change only when the step is accepted (the loss decreased and
        ``rho > eta``), so the loss never increases; :attr:`history` records the step.
        """
        times: dict[str, float] = {}
        t0 = time.perf_counter()
        loss0, g = self._gradient(X, y)
        t1 = time.perf_counter()
        times["gradient"] = t1 - t0
        Xc, yc, scale = self._sub_batch(X, y)  # noqa: N806
        n_rows = 0
        if self.curvature == "gauss-newton" and Xc.shape[0]:
            with torch.no_grad():
                n_rows = Xc.shape[0] * int(self.model(Xc[:1]).numel())
        route = choose_route(self.factorization, self.curvature, g.numel(), n_rows)
        spec = None
        if route == "kernel":
            spec = kernel_spectrum(self.model, self._params(), self.loss_func, Xc, yc, scale)
            t2 = t1
        else:
            op = operator(self.curvature, self.model, self.loss_func, Xc, yc)
            t2 = time.perf_counter()
        if route == "lifted":
            solver = FactoredSolver(op, scale, g)
            cnorm = _norm_estimate(op, self.generator) * scale
        elif route == "dense":
            solver = ShiftedCholesky(op.to_dense() * scale, g)
            cnorm = solver.norm1
        else:
            if route == "eigh":
                spec = dense_spectrum(op, scale)
            solver = ShiftedSolver(spec, g)
            cnorm = spec.norm
        t3 = time.perf_counter()
        times["curvature"], times["decompose"] = t2 - t1, t3 - t2
        times["subproblem"] = times["evaluate"] = 0.0
        info = None
        for attempt in range(1, self.max_attempts + 1):
            ta = time.perf_counter()
            s, lam, cert, how, hard, predicted, solver = self._subproblem(solver, g, cnorm, scale)
            tb = time.perf_counter()
            saved = [p.detach().clone() for p in self._params()]
            self._add(s)
            new_loss = self._loss(X, y)
            tc = time.perf_counter()
            times["subproblem"] += tb - ta
            times["evaluate"] += tc - tb
            actual = loss0 - new_loss
            rho = actual / predicted if predicted > 0 else -math.inf
            accepted = bool(math.isfinite(new_loss) and actual > 0 and rho > self.eta)
            snorm = float(torch.linalg.vector_norm(s))
            info = StepInfo(
                step=self.steps,
                loss=loss0,
                new_loss=new_loss if accepted else loss0,
                accepted=accepted,
                damping=lam,
                radius=self.radius,
                step_norm=snorm,
                predicted=predicted,
                actual=actual,
                rho=rho,
                attempts=attempt,
                factorizations=getattr(solver, "factorizations", 1),
                seconds=0.0,
                certified=cert,
                certificate=how,
                route=route,
                min_eigenvalue=solver.spec.min_eigenvalue if hasattr(solver, "spec") else math.nan,
                hard_case=hard,
            )
            self._adapt(rho, accepted, snorm, lam, cnorm)
            if accepted:
                break
            with torch.no_grad():  # undo exactly ((p + s) - s differs from p by round-off)
                for p, p0 in zip(self._params(), saved, strict=True):
                    p.copy_(p0)
        info.seconds = time.perf_counter() - t0
        times["other"] = info.seconds - sum(times.values())
        info.times = times
        self.history.append(info)
        self.steps += 1
        return loss0

    def _subproblem(self, solver, g: Tensor, cnorm: float, scale: float):  # noqa: ANN001, ANN202
        """``(s, lam, certified, certificate, hard_case, predicted decrease, solver)``.

        The dense Cholesky route hands over to the eigendecomposition (returned as the
        new solver, reused by later attempts) when its iteration stalls.
        """
        floor = self.min_damping * cnorm
        tr = self.strategy == "trust-region"
        if isinstance(solver, ShiftedCholesky):
            if tr:
                res = solver.trust_region(self.radius, self.shift)
            else:
                res = solver.levenberg_marquardt(max(self.damping * cnorm, floor))
            proven = solver.proven_shift(*res) if res is not None else None
            if proven is not None:
                lam, s, how = proven
                self.shift = lam
                predicted = -float(g @ s + 0.5 * (s @ (solver.c @ s)))
                return s, lam, True, how, False, predicted, solver
            w, q = torch.linalg.eigh(solver.c)
            spec = Spectrum(w, q, w.shape[0], how="eigh of the dense matrix (fallback)")
            solver = ShiftedSolver(spec, g)
        if isinstance(solver, ShiftedSolver):
            spec = solver.spec
            if tr:
                lam, extra, _ = solver.trust_region(self.radius)
            else:
                extra = None
                lam = max(self.damping * cnorm, floor, -spec.min_eigenvalue + 2.0 * spec.margin)
            self.shift = lam
            cert = spec.certified(lam)
            how = (
                f"{spec.how}: lambda_min(C) + lam = {spec.min_eigenvalue + lam:.3e} > margin "
                f"{spec.margin:.1e}"
                if cert
                else f"not proven: lambda_min(C) + lam = {spec.min_eigenvalue + lam:.3e} "
                f"<= margin {spec.margin:.1e}"
            )
            s = solver.step(lam, extra)
            predicted = solver.predicted(lam, extra)
            return s, lam, cert, how, extra is not None, predicted, solver
        if tr:
            t, hard = solver.trust_region(
                self.radius, self.shift, self.max_subproblem_iters, cnorm * 1.5, floor
            )
            self.shift = t.lam
        else:
            t, hard = solver.levenberg_marquardt(max(self.damping * cnorm, floor)), False
        cs = scale * (solver.op @ t.s)
        predicted = -float(g @ t.s + 0.5 * (t.s @ cs))
        return t.s, t.lam, t.certified, t.how, hard, predicted, solver

    def _adapt(self, rho: float, accepted: bool, snorm: float, lam: float, cnorm: float) -> None:
        """Radius or damping from the ratio ``rho`` of actual to predicted decrease."""
        if self.strategy == "trust-region":
            if rho < 0.25 or not accepted:
                self.radius = max(0.25 * min(snorm, self.radius), 1e-12)
            elif rho > 0.75 and snorm >= 0.9 * self.radius:
                self.radius = min(2.0 * self.radius, self.max_radius)
            return
        # Nielsen (1999): lam *= max(1/3, 1 - (2 rho - 1)^3) after an accepted step,
        # lam *= nu, nu *= 2 after a rejected one. A smooth rule: the classical
        # 4x-up / 5x-down rule rejected the first trial of nearly every step on an
        # ill-conditioned interpolation (hp-1d, cond(J) ~ 1e9) and stalled at 3e-10.
        rel = lam / cnorm if cnorm > 0 else self.damping
        if accepted:
            rel *= max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3)
            self.nu = 2.0
        else:
            rel *= self.nu
            self.nu *= 2.0
        self.damping = min(max(rel, self.min_damping), MAX_DAMPING)

    # -- state -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """``torch.optim``'s state dict plus this optimizer's own state.

        The param group carries the hyperparameters; ``"newton"`` holds the radius,
        damping, step count, sampler state and history.
        """
        sd = super().state_dict()
        sd["newton"] = {
            "radius": self.radius,
            "damping": self.damping,
            "nu": self.nu,
            "shift": self.shift,
            "steps": self.steps,
            "generator": self.generator.get_state(),
            "history": [asdict(h) for h in self.history],
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a state from :meth:`state_dict`."""
        sd = dict(state_dict)
        extra = sd.pop("newton")
        for key in ("strategy", "curvature"):
            saved = sd["param_groups"][0][key]
            if saved != self.param_groups[0][key]:
                raise ValueError(
                    f"state was saved with {key}={saved!r}, not {self.param_groups[0][key]!r}"
                )
        super().load_state_dict(sd)
        self.radius = float(extra["radius"])
        self.damping = float(extra["damping"])
        self.nu = float(extra.get("nu", 2.0))
        self.shift = float(extra["shift"])
        self.steps = int(extra["steps"])
        self.generator.set_state(extra["generator"])
        self.history = [StepInfo(**h) for h in extra["history"]]


def _norm_estimate(op, generator: torch.Generator) -> float:  # noqa: ANN001
    """``|C|_2`` from below by 8 power iterations (a shift scale, not a bound)."""
    v = torch.randn(op.num_params, generator=generator, dtype=op.dtype).to(op.device)
    v = v / torch.linalg.vector_norm(v)
    est = 0.0
    for _ in range(8):
        w = op @ v
        est = float(torch.linalg.vector_norm(w))
        if est == 0.0:
            break
        v = w / est
    return est + 1e-300


def _warm_up(dtype: torch.dtype) -> None:
    """Load the LAPACK paths once at construction, not inside the first step."""
    a = torch.eye(3, dtype=dtype) + 0.1
    torch.linalg.eigh(a)
    torch.linalg.svd(a, full_matrices=False)
