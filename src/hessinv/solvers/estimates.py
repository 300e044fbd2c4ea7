"""Cheap spectral estimates used by the solver contract.

* :func:`spectral_bounds`: the extreme eigenvalues of a symmetric operator by
  Lanczos with full reorthogonalization (``k`` products). Ritz values lie
  inside the spectrum, so ``max(|theta_min|, |theta_max|)`` is an estimate of
  ``||A||_2`` from below; the extreme Ritz values converge first, typically to
  a few digits in 16 steps, and exactly once ``k = W``.
* :func:`smallest_singular_value`: an estimate from above of ``sigma_min(A)``
  by inverse iteration with a factorization (``||y|| / ||A^{-1} y|| >=
  sigma_min`` for every ``y``), the idea of LAPACK's condition estimators.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def _start(size: int, dtype: torch.dtype, device: torch.device, seed: int) -> Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(size, 1, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    return v / torch.linalg.vector_norm(v)


def spectral_bounds(
    matmat: Callable[[Tensor], Tensor],
    size: int,
    dtype: torch.dtype,
    device: torch.device,
    steps: int = 16,
    seed: int = 0,
) -> tuple[float, float]:
    """``(theta_min, theta_max)``: extreme Ritz values of ``k = min(steps, W)`` Lanczos steps.

    Args:
        matmat: ``V -> A V`` for ``V`` of shape ``(W, k)``, ``A`` symmetric.
        size: ``W``.
        dtype: Working dtype.
        device: Working device.
        steps: Lanczos steps (products).
        seed: Seed of the (CPU) start vector.
    """
    if size == 0:
        return 0.0, 0.0
    k = min(steps, size)
    q = _start(size, dtype, device, seed)
    basis = [q]
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(k):
        w = matmat(basis[-1])
        if not torch.isfinite(w).all():
            return -math.inf, math.inf
        a = float((basis[-1] * w).sum())
        alphas.append(a)
        qs = torch.cat(basis, dim=1)
        for _ in range(2):  # full reorthogonalization, twice is enough
            w = w - qs @ (qs.T @ w)
        b = float(torch.linalg.vector_norm(w))
        scale = max(abs(a), max((abs(x) for x in betas), default=0.0), 1e-300)
        if j == k - 1 or b <= 1e3 * torch.finfo(dtype).eps * scale:
            break
        betas.append(b)
        basis.append(w / b)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    theta = torch.linalg.eigvalsh(t)
    return float(theta[0]), float(theta[-1])


def smallest_singular_value(
    apply_inverse: Callable[[Tensor], Tensor],
    size: int,
    dtype: torch.dtype,
    device: torch.device,
    steps: int = 5,
    seed: int = 1,
) -> float:
    """An estimate from above of ``sigma_min(A)`` from ``steps`` inverse iterations.

    Returns ``0.0`` if an application of ``A^{-1}`` overflows.
    """
    if size == 0:
        return math.inf
    y = _start(size, dtype, device, seed)
    best = math.inf
    for _ in range(steps):
        z = apply_inverse(y)
        if not torch.isfinite(z).all():
            return 0.0
        nz = float(torch.linalg.vector_norm(z))
        if nz == 0.0:
            return math.inf if best == math.inf else best
        best = min(best, float(torch.linalg.vector_norm(y)) / nz)
        y = z / nz
    return best


def robust_eigh(a: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh``; where it fails to converge (seen in float32), in float64.

    Raises:
        LiftedPrecisionError: Not even the float64 eigensolver converged.
    """
    try:
        return torch.linalg.eigh(a)
    except torch.linalg.LinAlgError:
        pass
    try:
        w, q = torch.linalg.eigh(a.double())
    except torch.linalg.LinAlgError as e:
        from ..errors import LiftedPrecisionError

        raise LiftedPrecisionError(
            f"the symmetric eigensolver did not converge on a {tuple(a.shape)} matrix even in "
            "float64 (is it finite and reasonably scaled?); try a larger damping"
        ) from e
    return w.to(a.dtype), q.to(a.dtype)
