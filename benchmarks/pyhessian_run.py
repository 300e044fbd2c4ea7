"""PyHessian (Yao et al. 2020) on the spectrum benchmark's nets: its estimates beside exact ones.

PyHessian 0.1 is run as published, on a fresh float64 copy of the same net and
the same batch (``criterion(model(X), y)`` with the same ``nn.MSELoss()``, mean
reduction, differentiated w.r.t. every parameter, in ``model.parameters()``
order, which is hessinv's flat order). Two shims, both outside its maths:

* the default dtype is float64 while it runs (it draws its random vectors and
  its tridiagonal ``T`` with ``torch.randn(p.size())`` / ``torch.zeros``, i.e.
  in the default dtype, which would otherwise be float32 against float64
  parameters);
* ``torch.eig`` (removed from PyTorch 2, where it only raises) is replaced for its ``density`` as
  ``torch.linalg.eigh`` of the symmetric ``T``, in ``torch.eig``'s old output
  layout (eigenvalues as ``(n, 2)`` real/imaginary columns).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from hessinv.cli import make_mlp

try:  # optional: the ``bench`` extra
    from pyhessian import hessian as _pyhessian
except ImportError:  # pragma: no cover - depends on the environment
    _pyhessian = None

AVAILABLE = _pyhessian is not None


def _version() -> str | None:
    if not AVAILABLE:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("PyHessian")
    except PackageNotFoundError:  # pragma: no cover
        return "unknown"


VERSION = _version()


def _eig(t: torch.Tensor, eigenvectors: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    w, v = torch.linalg.eigh(t)
    return torch.stack([w, torch.zeros_like(w)], dim=1), v


@contextmanager
def _pyhessian_env() -> Iterator[None]:
    old_dtype, had_eig = torch.get_default_dtype(), hasattr(torch, "eig")
    old_eig = getattr(torch, "eig", None)
    torch.set_default_dtype(torch.float64)
    torch.eig = _eig  # PyTorch 2 keeps a ``torch.eig`` that only raises
    try:
        with warnings.catch_warnings():  # its ``backward(create_graph=True)`` warns
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        torch.set_default_dtype(old_dtype)
        if had_eig:
            torch.eig = old_eig
        else:
            del torch.eig


def run(
    H,  # noqa: ANN001
    depth: int,
    width: int,
    batch: int,
    edges: np.ndarray,
    top_n: int,
    slq_kw: dict,
    seed: int = 0,
) -> dict:
    """PyHessian's top eigenvalues (power iteration) and density (SLQ) on ``make_mlp``'s net.

    Args:
        H: hessinv's Hessian of the same net (for one product to check the losses agree).
        depth, width, batch: ``make_mlp``'s arguments (gain 1, float64), as the benchmark's.
        edges: the histogram's bin edges.
        top_n: how many top eigenvalues (``hc.eigenvalues(maxIter=100, tol=1e-3, top_n)``,
            its defaults otherwise).
        slq_kw: ``{"n_probes", "n_steps"}`` for ``hc.density(iter=n_steps, n_v=n_probes)``.
        seed: torch's global seed before PyHessian draws its random vectors.

    Returns:
        ``eig`` (its eigenvalues, in its order), ``eig_s``, ``density_s``, ``counts``
        (its density's histogram in ``edges``: ``W * mean over probes of the weights
        of its Ritz values in each bin``, the estimate it plots), ``hvp_rel_diff``.
    """
    assert AVAILABLE
    model, loss, X, y = make_mlp(depth, width, batch, dtype=torch.float64, device="cpu", gain=1.0)
    w = sum(p.numel() for p in model.parameters())
    with _pyhessian_env():
        torch.manual_seed(seed)
        hc = _pyhessian(model, loss, data=(X, y), cuda=False)
        v = [torch.randn(p.shape) for p in hc.params]
        hv = torch.autograd.grad(hc.gradsH, hc.params, grad_outputs=v, retain_graph=True)
        flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
        ref = H.matmat(flat(v)[:, None])[:, 0]
        hvp_diff = float((flat(hv) - ref).norm() / ref.norm())
        c, t = time.process_time(), time.perf_counter()
        eig, _ = hc.eigenvalues(maxIter=100, tol=1e-3, top_n=top_n)
        eig_cpu, eig_s = time.process_time() - c, time.perf_counter() - t
        c, t = time.process_time(), time.perf_counter()
        nodes, weights = hc.density(iter=slq_kw["n_steps"], n_v=slq_kw["n_probes"])
        den_cpu, den_s = time.process_time() - c, time.perf_counter() - t
    counts = sum(
        np.histogram(np.asarray(n, dtype=np.float64), bins=edges, weights=np.asarray(q))[0]
        for n, q in zip(nodes, weights, strict=True)
    ) * (w / len(nodes))
    del hc, model
    return {
        "eig": [float(e) for e in eig],
        "eig_s": eig_s,
        "eig_cpu_s": eig_cpu,
        "density_s": den_s,
        "density_cpu_s": den_cpu,
        "counts": counts.tolist(),
        "hvp_rel_diff": hvp_diff,
    }


def eig_errors(eig: list[float], la: np.ndarray, sa: np.ndarray) -> list[float]:
    """``|est_i - exact_i| / |exact_i|``, both sorted by decreasing magnitude."""
    est = np.asarray(eig, dtype=np.float64)
    est = est[np.argsort(-np.abs(est), kind="stable")]
    ex = top_abs(la, sa, len(est))
    return (np.abs(est - ex) / np.abs(ex)).tolist()


def top_abs(la: np.ndarray, sa: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` eigenvalues of largest magnitude (what power iteration finds), by ``|.|``.

    They lie among the ``n`` largest (``la``) and ``n`` smallest (``sa``) eigenvalues.
    """
    both = np.concatenate([np.asarray(la), np.asarray(sa)])
    return both[np.argsort(-np.abs(both), kind="stable")][:n]
