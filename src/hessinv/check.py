"""Central finite differences, to verify ``H @ v``, the gradient and a custom stage's blocks.

Bishop (section 8.1) recommends checking analytic derivatives against
central differences, whose error is ``O(eps^2)``. Each function returns a
:class:`CheckReport` of relative errors ``||analytic - fd|| / max(||fd||, tiny)``;
``report.ok`` compares them with ``rtol`` (default ``1e-6``, comfortably above
the ``~1e-9`` that float64 central differences reach with ``eps = 1e-5``).

>>> import torch, hessinv
>>> W = torch.randn(3, 3, dtype=torch.float64)
>>> st = hessinv.Stage(lambda z, p: torch.tanh(z @ p[0].T), (W,))
>>> hessinv.check.check_stage(st, torch.randn(4, 3, dtype=torch.float64)).ok
True
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .derivatives import StageBlocks, stage_blocks
from .grad_mode import recording
from .hessian import Hessian
from .pipeline import Stage, flatten_params, unflatten_params


@dataclass
class CheckReport:
    """Relative errors of analytic derivatives against central differences."""

    errors: dict[str, float] = field(default_factory=dict)
    rtol: float = 1e-6

    @property
    def ok(self) -> bool:
        """True if every error is at most ``rtol``."""
        return all(e <= self.rtol for e in self.errors.values())

    def raise_if_failed(self) -> None:
        """Raise ``AssertionError`` naming the quantities that failed."""
        bad = {k: v for k, v in self.errors.items() if v > self.rtol}
        if bad:
            raise AssertionError(f"finite-difference check failed (rtol={self.rtol:g}): {bad}")


def _rel(a: Tensor, b: Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b).clamp_min(1e-30))


def _flat(H: Hessian) -> Tensor:  # noqa: N802
    return torch.cat([p.reshape(-1) for p in H.pipeline.params]).detach()


def check_gradient(
    H: Hessian,
    *,
    num: int = 3,
    eps: float = 1e-5,
    rtol: float = 1e-6,
    seed: int = 0,  # noqa: N803
) -> CheckReport:
    """``g . v`` against ``(L(x + eps v) - L(x - eps v)) / (2 eps)`` for random ``v``."""
    x = _flat(H)
    gen = torch.Generator().manual_seed(seed)
    g = H.gradient()
    rep = CheckReport(rtol=rtol)
    for i in range(num):
        v = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
        with torch.no_grad():
            fd = (H.pipeline.loss_of_flat(x + eps * v) - H.pipeline.loss_of_flat(x - eps * v)) / (
                2 * eps
            )
        rep.errors[f"gradient.v[{i}]"] = _rel(g @ v, fd)
    return rep


def _grad_at(H: Hessian, x: Tensor) -> Tensor:  # noqa: N803
    return torch.func.grad(H.pipeline.loss_of_flat)(x)


def check_hvp(
    H: Hessian,  # noqa: N803
    v: Tensor | None = None,
    *,
    eps: float = 1e-5,
    rtol: float = 1e-6,
    seed: int = 0,
) -> CheckReport:
    """``H @ v`` against ``(grad(x + eps v) - grad(x - eps v)) / (2 eps)``."""
    x = _flat(H)
    if v is None:
        gen = torch.Generator().manual_seed(seed)
        v = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
    fd = (_grad_at(H, x + eps * v) - _grad_at(H, x - eps * v)) / (2 * eps)
    return CheckReport({"H@v": _rel(H @ v, fd)}, rtol=rtol)


def _first(stage: Stage, z: Tensor, x: Tensor, cot: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(Jz^T b, Jx^T b)`` by one plain backward pass (first derivatives only)."""
    z = z.detach().requires_grad_(True)
    ps = tuple(p.detach().requires_grad_(True) for p in unflatten_params(x, stage.params))
    with torch.enable_grad():
        out = stage.fn(z, ps)
        gs = torch.autograd.grad(out, (z, *ps), cot if cot is not None else torch.ones_like(out))
    return gs[0].reshape(z.shape[0], -1), torch.cat([t.reshape(-1) for t in gs[1:]])


@recording
def check_stage(
    stage: Stage,
    z: Tensor,
    cot: Tensor | None = None,
    *,
    last: bool = False,
    eps: float = 1e-5,
    rtol: float = 1e-6,
    seed: int = 0,
    blocks: StageBlocks | None = None,
) -> CheckReport:
    """Every derivative block of ``stage`` at input ``z`` against central differences.

    First-order blocks (``Jz``, ``Jx``) are checked against differences of the
    stage's output; second-order blocks (``Tzz``, ``Tzx``, ``Txx``) against
    differences of its first derivatives, computed with plain backprop. For
    a non-final stage ``cot`` defaults to a random cotangent.

    Args:
        stage: The stage to check.
        z: Its input, batch first.
        cot: The cotangent ``b`` contracting the second derivatives.
        last: The stage returns the scalar loss (then ``cot`` is ignored).
        eps: Step of the central differences.
        rtol: Tolerance of the report.
        seed: Seed of the random cotangent.
        blocks: The blocks to check (default: computed by hessinv for ``stage``).
    """
    z = z.detach()
    n = z.shape[0]
    x = flatten_params(stage.params).to(dtype=z.dtype, device=z.device)
    with torch.no_grad():
        out = stage.fn(z, stage.params)
    if last:
        cot = None
    elif cot is None:
        gen = torch.Generator().manual_seed(seed)
        cot = torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)
    if blocks is None:
        blocks = stage_blocks(stage, z, cot, first=False, last=last)
    rep = CheckReport(rtol=rtol)
    zf = z.reshape(n, -1)
    a_in, p = zf.shape[1], x.numel()

    def f(zz: Tensor, xx: Tensor) -> Tensor:
        return stage.fn(zz.reshape(z.shape), unflatten_params(xx, stage.params)).reshape(n, -1)

    fd_zz, fd_zx, fd_xx = [], [], []
    fd_jz, fd_jx = [], []
    for j in range(a_in):
        e = torch.zeros_like(zf)
        e[:, j] = eps  # a comb: samples never mix, so all N blocks at once
        gp, _ = _first(stage, (zf + e).reshape(z.shape), x, cot)
        gm, _ = _first(stage, (zf - e).reshape(z.shape), x, cot)
        fd_zz.append((gp - gm) / (2 * eps))
        if not last:
            with torch.no_grad():
                fd_jz.append((f(zf + e, x) - f(zf - e, x)) / (2 * eps))
    for k in range(p):
        e = torch.zeros_like(x)
        e[k] = eps
        gp, xp = _first(stage, z, x + e, cot)
        gm, xm = _first(stage, z, x - e, cot)
        fd_zx.append((gp - gm) / (2 * eps))
        fd_xx.append((xp - xm) / (2 * eps))
        if not last:
            with torch.no_grad():
                fd_jx.append((f(zf, x + e) - f(zf, x - e)) / (2 * eps))
    rep.errors["Tzz"] = _rel(blocks.Tzz, torch.stack(fd_zz, dim=2))
    if p:
        rep.errors["Tzx"] = _rel(blocks.Tzx, torch.stack(fd_zx, dim=2))
        txx = blocks.Txx if blocks.Txx is not None else torch.zeros(p, p, dtype=z.dtype)
        fd = torch.stack(fd_xx, dim=1)
        rep.errors["Txx"] = _rel(txx, fd) if float(fd.abs().max()) > 0 else float(txx.abs().max())
    if not last:
        rep.errors["Jz"] = _rel(blocks.Jz, torch.stack(fd_jz, dim=2))
        if p:
            rep.errors["Jx"] = _rel(blocks.Jx, torch.stack(fd_jx, dim=2))
    return rep


__all__ = ["CheckReport", "check_gradient", "check_hvp", "check_stage"]
