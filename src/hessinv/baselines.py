"""Baselines: Krylov solvers (CG, MINRES) on the exact ``H @ v``.

They need only products, so they cost ``iterations x (one H v)``; the number
of iterations grows with the condition number and CG is only valid for
positive definite ``H + dI``. Kept for comparison with the exact solve.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class KrylovInfo:
    """What a Krylov run did."""

    converged: bool
    iterations: int
    matvecs: int
    residual: float


def cg(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    *,
    rtol: float = 1e-10,
    maxiter: int | None = None,
) -> tuple[Tensor, KrylovInfo]:
    """Conjugate gradients for ``A x = b`` (``b`` of shape ``(W,)``), ``A`` SPD.

    Stops when ``||b - A x|| <= rtol ||b||`` (the recursively updated residual,
    re-checked with one extra product at the end).
    """
    maxiter = maxiter if maxiter is not None else 10 * b.numel()
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = r @ r
    bnorm = float(torch.linalg.vector_norm(b))
    if bnorm == 0.0:
        return x, KrylovInfo(True, 0, 0, 0.0)
    it = 0
    for it in range(1, maxiter + 1):  # noqa: B007
        ap = matvec(p)
        pap = p @ ap
        if pap <= 0:
            break
        a = rs / pap
        x = x + a * p
        r = r - a * ap
        rs_new = r @ r
        if float(torch.sqrt(rs_new)) <= rtol * bnorm:
            break
        p = r + (rs_new / rs) * p
        rs = rs_new
    res = float(torch.linalg.vector_norm(b - matvec(x))) / bnorm
    return x, KrylovInfo(res <= rtol * 10, it, it + 1, res)


def minres(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    *,
    rtol: float = 1e-10,
    maxiter: int | None = None,
    max_seconds: float | None = None,
) -> tuple[Tensor, KrylovInfo]:
    """MINRES (Paige & Saunders) for symmetric, possibly indefinite ``A x = b``.

    Minimises ``||b - A x||`` over the Krylov space; stops when the estimated
    relative residual drops below ``rtol`` (re-checked with one product), after
    ``maxiter`` iterations, or after ``max_seconds`` of wall-clock time.
    """
    t_end = None if max_seconds is None else time.perf_counter() + max_seconds
    maxiter = maxiter if maxiter is not None else 10 * b.numel()
    bnorm = float(torch.linalg.vector_norm(b))
    x = torch.zeros_like(b)
    if bnorm == 0.0:
        return x, KrylovInfo(True, 0, 0, 0.0)
    # The recurrences of scipy.sparse.linalg.minres, without preconditioner.
    r1 = b.clone()
    r2 = b.clone()
    y = b.clone()
    beta, oldb = bnorm, 0.0
    dbar, epsln, phibar = 0.0, 0.0, bnorm
    cs, sn = -1.0, 0.0
    w = torch.zeros_like(b)
    w2 = torch.zeros_like(b)
    it = 0
    for it in range(1, maxiter + 1):  # noqa: B007
        v = y / beta
        y = matvec(v)
        if it >= 2:
            y = y - (beta / oldb) * r1
        alfa = float(v @ y)
        y = y - (alfa / beta) * r2
        r1, r2 = r2, y
        oldb, beta = beta, float(torch.linalg.vector_norm(r2))
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        gamma = max((gbar**2 + beta**2) ** 0.5, torch.finfo(b.dtype).tiny)
        cs, sn = gbar / gamma, beta / gamma
        phi = cs * phibar
        phibar = sn * phibar
        w1, w2 = w2, w
        w = (v - oldeps * w1 - delta * w2) / gamma
        x = x + phi * w
        if phibar <= rtol * bnorm or beta == 0.0:
            break
        if t_end is not None and time.perf_counter() > t_end:
            break
    res = float(torch.linalg.vector_norm(b - matvec(x))) / bnorm
    return x, KrylovInfo(res <= rtol * 10, it, it + 1, res)
