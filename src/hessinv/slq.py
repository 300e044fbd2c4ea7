"""Stochastic Lanczos quadrature (the usual spectral density estimate) and the spectrum plot.

:func:`slq` is the estimate of Ubaru, Chen & Saad (2017) that PyHessian and
curvlinops compute: ``n_probes`` Rademacher probes, ``n_steps`` Lanczos steps
each (full reorthogonalization); the Ritz values ``theta_j`` with weights
``W tau_j^2 / n_probes`` (first components of the eigenvectors of the
tridiagonal matrix) approximate the eigenvalue distribution.
:func:`plot_spectrum` draws it beside the exact histogram of
:func:`hessinv.spectrum.spectral_histogram`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from .hessian import Hessian
    from .spectrum import SpectralHistogram


@dataclass
class SLQResult:
    """Ritz values and weights of stochastic Lanczos quadrature (weights sum to ``W``)."""

    nodes: np.ndarray
    weights: np.ndarray
    n_probes: int
    n_steps: int

    def histogram(self, edges: Any) -> np.ndarray:
        """Estimated eigenvalue counts in ``[edges[i], edges[i+1])``."""
        e = np.asarray(edges, dtype=np.float64)
        return np.histogram(self.nodes, bins=e, weights=self.weights)[0]


def slq(op: Hessian, n_probes: int = 8, n_steps: int = 80, seed: int = 0) -> SLQResult:
    """Stochastic Lanczos quadrature estimate of the spectral density of ``H``.

    For each Rademacher probe ``z`` (``||z||^2 = W``), ``n_steps`` Lanczos steps
    (full reorthogonalization) give ``T = S diag(theta) S^T``; the estimate puts
    weight ``W S_{1j}^2 / n_probes`` at each ``theta_j``.
    """
    w = op.num_params
    m = min(n_steps, w)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    nodes, weights = [], []
    for _ in range(n_probes):
        z = (torch.randint(0, 2, (w,), generator=gen) * 2 - 1).to(op.dtype).to(op.device)
        q = z / math.sqrt(w)
        basis = [q]
        alpha, beta = [], []
        for j in range(m):
            hq = op.matmat(q[:, None])[:, 0]
            a = float(q @ hq)
            alpha.append(a)
            r = hq - a * q - (beta[-1] * basis[-2] if j > 0 else 0.0)
            qs = torch.stack(basis, dim=1)
            r = r - qs @ (qs.T @ r)  # full reorthogonalization (twice is enough)
            r = r - qs @ (qs.T @ r)
            b = float(torch.linalg.vector_norm(r))
            if j == m - 1 or b <= 1e-12 * max(abs(a), 1e-300):
                break
            beta.append(b)
            q = r / b
            basis.append(q)
        t = (
            np.diag(alpha)
            + np.diag(beta[: len(alpha) - 1], 1)
            + np.diag(beta[: len(alpha) - 1], -1)
        )
        th, s = np.linalg.eigh(t)
        nodes.append(th)
        weights.append(w * s[0] ** 2 / n_probes)
    return SLQResult(np.concatenate(nodes), np.concatenate(weights), n_probes, m)


def plot_spectrum(
    hist: SpectralHistogram,
    estimate: SLQResult | None = None,
    ax: Any = None,
    title: str | None = None,
) -> Any:
    """Draw the exact histogram (bars) beside an SLQ estimate on the same bins (steps).

    Returns the matplotlib axes (a new figure if ``ax`` is None). The y axis
    is logarithmic (``symlog`` below 1 eigenvalue), so empty bins show as 0.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    e = hist.edges
    ax.bar(
        e[:-1],
        hist.counts,
        width=np.diff(e),
        align="edge",
        color="C0",
        alpha=0.6,
        label="exact (inertia counts)",
    )
    if estimate is not None:
        est = estimate.histogram(e)
        ax.step(
            e,
            np.append(est, est[-1]),
            where="post",
            color="C3",
            label=f"SLQ ({estimate.n_probes} probes x {estimate.n_steps} steps)",
        )
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("eigenvalues per bin")
    if title:
        ax.set_title(title)
    ax.legend()
    return ax
