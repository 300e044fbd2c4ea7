"""The exact spectrum of ``H``: eigenvalue counts, histograms, extreme and interior eigenvalues.

**Counts (Sylvester).** The number of eigenvalues of ``H`` below ``sigma`` is
the number of negative eigenvalues of ``H - sigma I``, read off the inertia of
the pivoted factorization at ``damping = -sigma`` (:meth:`hessinv.Hessian.inertia`),
exactly and in time linear in depth, for any ``sigma``. A histogram with
edges ``e_0 < ... < e_B`` takes ``B + 1`` of them:
``count[e_i, e_{i+1}) = n_<(e_{i+1}) - n_<(e_i)``.

**Eigenpairs.** :func:`eigsh` has the meaning of ``scipy.sparse.linalg.eigsh``:

* extreme eigenvalues (``which`` in ``LM``, ``LA``, ``BE``) by ARPACK's
  Lanczos on exact products ``H @ v``;
* interior ones around ``sigma`` by shift-invert, ARPACK on the exact
  ``(H - sigma I)^{-1}`` of the lifted factorization;
* the smallest algebraic ones (``which="SA"``; slow for Lanczos on a Hessian,
  whose negative eigenvalues are small and clustered) by bisection on the
  counts for a shift ``sigma_0`` just below ``lambda_min`` (``n_<(sigma_0) = 0``,
  starting from ``-1.1 ||H||``, ``||H||`` from Lanczos and itself checked by a
  count), then shift-invert at ``sigma_0``: the ``k`` eigenvalues nearest
  ``sigma_0`` are the ``k`` smallest.

Every result is checked (``verify=True``): each residual ``||H v - lambda v||``
(which bounds the eigenvalue's error) must be at most ``rtol ||H||``, and
the counts must agree with the returned values: e.g. for ``SA``, exactly as
many eigenvalues lie below ``lambda_k - delta`` as were returned there, so no
eigenvalue was missed (ARPACK can miss copies of a repeated eigenvalue; then
a block inverse iteration with the counted multiplicity takes over).

**Stochastic Lanczos quadrature** (:func:`slq`) is the usual estimate of the
spectral density (Ubaru, Chen & Saad 2017; PyHessian): ``n_v`` Rademacher
probes, ``m`` Lanczos steps each; the Ritz values ``theta_j`` with weights
``W tau_j^2`` (first components of the eigenvectors of the tridiagonal matrix)
approximate the eigenvalue distribution. :func:`plot_spectrum` draws it beside
the exact histogram.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from .errors import HINT, LiftedPrecisionWarning, SingularHessianError

if TYPE_CHECKING:
    from .hessian import Hessian


# -- counts ------------------------------------------------------------------
def _inertia_at(op: Hessian, sigma: float) -> tuple[int, int, int, bool | None]:
    """``(n_above, n_below, n_at, verified)`` of ``H`` at ``sigma``: the inertia of ``H - sigma I``.

    Through the public :meth:`Hessian.factor` (``damping = -sigma``); the
    factorization is not kept in the operator's cache (one per shift would
    hold ``O(sum n_i^2)`` memory each).
    """
    d = -float(sigma)
    cache = getattr(op, "_factors", None)
    before = set(cache) if isinstance(cache, dict) else set()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = op.factor(d).inertia()
    finally:
        if isinstance(cache, dict):
            for key in [k for k in cache if k not in before]:
                del cache[key]
    verified = getattr(r, "verified", None)
    for w in caught:  # passed on; a precision warning means the count is not verified
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if issubclass(w.category, LiftedPrecisionWarning):
            verified = False
    return int(r[0]), int(r[1]), int(r[2]), verified


def eigenvalue_count(op: Hessian, sigma: float) -> int:
    """The number of eigenvalues of ``H`` below ``sigma`` (Sylvester's law), band excluded.

    The negative count of ``inertia(H - sigma I)``: an eigenvalue within the zero
    band ``t`` of ``sigma`` (:meth:`hessinv.solvers.Factorization.zero_threshold`,
    ``W eps max(||H - sigma I||, ||H|| + |sigma|)``) counts as equal to ``sigma``,
    not below it.
    """
    sigma = _finite(sigma, "sigma")
    return _inertia_at(op, sigma)[1]


def _finite(x: Any, name: str) -> float:
    if isinstance(x, Tensor):
        x = float(x)
    if not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ValueError(f"hessinv.spectrum: {name} must be a finite number, got {x!r}")
    return float(x)


@dataclass
class SpectralHistogram:
    """Exact eigenvalue counts of ``H`` in bins ``[edges[i], edges[i+1])``.

    Attributes:
        edges: The ``B + 1`` increasing edges.
        counts: ``B`` counts (numpy ``int64``).
        below: Eigenvalues below ``edges[0]``.
        above: Eigenvalues at or above ``edges[-1]``.
        at_edges: Per edge, the eigenvalues equal to it to working precision
            (the factorization's zero count; ``0`` at a shift in a gap).
        verified: ``False`` if a count came with a
            :class:`~hessinv.errors.LiftedPrecisionWarning` or its inertia says it
            is not verified (``.verified``); ``True`` if every inertia says it is
            verified; ``None`` otherwise (the inertia does not say).
        total: ``W``.
    """

    edges: np.ndarray
    counts: np.ndarray
    below: int
    above: int
    at_edges: np.ndarray
    verified: bool | None
    total: int
    below_edge: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, np.int64))


def spectral_histogram(op: Hessian, edges: Any) -> SpectralHistogram:
    """Exact counts of the eigenvalues of ``H`` in ``[edges[i], edges[i+1])``.

    One factorization (and inertia) of ``H - e I`` per edge ``e``.

    Raises:
        ValueError: ``edges`` not a strictly increasing sequence of at least two
            finite numbers.
    """
    e = np.asarray(torch.as_tensor(edges, dtype=torch.float64).cpu().numpy(), dtype=np.float64)
    if e.ndim != 1 or e.size < 2 or not np.all(np.isfinite(e)) or not np.all(np.diff(e) > 0):
        raise ValueError(
            "hessinv.spectrum.spectral_histogram: edges must be a strictly increasing 1-d "
            f"sequence of at least two finite numbers, got {edges!r}"
        )
    below, at, ver = [], [], []
    for x in e:
        _, n_below, n_at, v = _inertia_at(op, float(x))
        below.append(n_below)
        at.append(n_at)
        ver.append(v)
    nb = np.asarray(below, dtype=np.int64)
    w = op.num_params
    if any(v is False for v in ver):
        verified: bool | None = False
    else:
        verified = None if any(v is None for v in ver) else True
    return SpectralHistogram(
        edges=e,
        counts=np.diff(nb),
        below=int(nb[0]),
        above=int(w - nb[-1]),
        at_edges=np.asarray(at, dtype=np.int64),
        verified=verified,
        total=w,
        below_edge=nb,
    )


# -- eigenpairs ----------------------------------------------------------------
def norm_estimate(op: Hessian, *, tol: float = 1e-6, seed: int = 0) -> float:
    """``||H||_2 = max |lambda|`` by Lanczos (a lower bound, to about ``tol`` relative)."""
    from scipy.sparse.linalg import eigsh as sp_eigsh

    if op.num_params <= 2:
        return float(torch.linalg.eigvalsh(op.to_dense()).abs().max())
    v0 = np.random.default_rng(seed).standard_normal(op.num_params)
    vals = sp_eigsh(op.to_scipy(), k=1, which="LM", tol=tol, v0=v0, return_eigenvectors=False)
    return float(abs(vals[0]))


def _check_k(op: Hessian, k: int) -> None:
    if not isinstance(k, int) or not 0 < k < op.num_params:
        raise ValueError(
            f"hessinv.spectrum.eigsh: k must be an int with 0 < k < W = {op.num_params}, "
            f"got {k!r} (for all eigenvalues use torch.linalg.eigh(H.to_dense()))"
        )


def eigsh(
    op: Hessian,
    k: int = 6,
    sigma: float | None = None,
    which: str = "LM",
    *,
    tol: float = 0.0,
    rtol: float = 1e-8,
    verify: bool = True,
    maxiter: int | None = None,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """``k`` eigenpairs of ``H``, as ``scipy.sparse.linalg.eigsh(H, k, sigma=sigma, which=which)``.

    Args:
        op: The operator (:class:`hessinv.Hessian` or :class:`hessinv.GaussNewton`).
        k: Number of eigenpairs, ``0 < k < W``.
        sigma: Shift: the ``k`` eigenvalues nearest ``sigma`` (``which="LM"``)
            by shift-invert with the exact factorization of ``H - sigma I``.
        which: Without ``sigma``: ``"LM"`` (largest magnitude), ``"LA"``
            (largest algebraic), ``"BE"`` (both ends) by Lanczos, ``"SA"``
            (smallest algebraic, by bisection on the counts and shift-invert),
            ``"SM"`` (smallest magnitude, shift-invert at 0).
        tol: ARPACK's relative accuracy (0: machine precision).
        rtol: Largest accepted residual ``||H v - lambda v|| / ||H||`` (it bounds
            each eigenvalue's error).
        verify: Check the residuals and, with eigenvalue counts, that no
            eigenvalue was missed (not for ``"BE"``).
        maxiter: ARPACK's iteration cap.
        seed: Seed of the starting vector.

    Returns:
        ``(eigenvalues, eigenvectors)``: ``(k,)`` ascending and ``(W, k)``.

    Raises:
        ValueError: Bad ``k``, ``which`` or ``sigma``.
        SingularHessianError: ``sigma`` is an eigenvalue to working precision.
        RuntimeError: A check failed (a residual above ``rtol ||H||`` or a
            missed eigenvalue).
    """
    _check_k(op, k)
    allowed = ("LM", "LA", "SA", "BE", "SM")
    if which not in allowed or (sigma is not None and which != "LM"):
        raise ValueError(
            f"hessinv.spectrum.eigsh: which must be one of {allowed} without sigma, or 'LM' "
            f"with sigma (the eigenvalues nearest sigma); got which={which!r}, sigma={sigma!r}"
        )
    if sigma is not None:
        sigma = _finite(sigma, "sigma")
    nrm = norm_estimate(op, seed=seed)
    if which == "SM":
        which, sigma = "LM", 0.0
    if which == "SA" and sigma is None:
        sigma = _shift_below_spectrum(op, nrm)
    if sigma is None:
        vals, vecs = _lanczos(op, k, which, tol, maxiter, seed)
        kind = which
    else:
        kind = "near"
        got = _shift_invert(op, k, sigma, tol, maxiter, seed)
        if got is None:  # ARPACK failed (a highly repeated eigenvalue): block iteration
            vals, vecs = _block_inverse_iteration(op, k, sigma, None, nrm)
        else:
            vals, vecs = got
    if verify:
        res = _residuals(op, vals, vecs)
        scale = max(nrm, float(vals.abs().max()), 1e-300)
        worst = float(res.max())
        if worst > rtol * scale:
            raise RuntimeError(
                f"hessinv.spectrum.eigsh: residual {worst / scale:.1e} ||H|| exceeds "
                f"rtol={rtol:g}; try a smaller tol or a larger maxiter"
            )
        delta = max(10.0 * worst, 1e-9 * scale)
        if kind != "BE" and not _counts_agree(op, vals, kind, sigma, delta):
            if kind != "near":
                raise RuntimeError(
                    "hessinv.spectrum.eigsh: the eigenvalue counts show that Lanczos missed an "
                    f"eigenvalue (which={which!r}); use sigma= for shift-invert"
                )
            vals, vecs = _block_inverse_iteration(op, k, sigma, vecs, scale)
            res = _residuals(op, vals, vecs)
            if float(res.max()) > rtol * scale or not _counts_agree(op, vals, kind, sigma, delta):
                raise RuntimeError(
                    "hessinv.spectrum.eigsh: shift-invert missed an eigenvalue near "
                    f"sigma={sigma:g} and block inverse iteration did not recover it"
                )
    return vals, vecs


def _to_torch(op: Hessian, vals: np.ndarray, vecs: np.ndarray) -> tuple[Tensor, Tensor]:
    order = np.argsort(vals)
    t = torch.as_tensor(vals[order].copy(), dtype=op.dtype, device=op.device)
    v = torch.as_tensor(vecs[:, order].copy(), dtype=op.dtype, device=op.device)
    return t, v


def _lanczos(
    op: Hessian, k: int, which: str, tol: float, maxiter: int | None, seed: int
) -> tuple[Tensor, Tensor]:
    from scipy.sparse.linalg import eigsh as sp_eigsh

    v0 = np.random.default_rng(seed).standard_normal(op.num_params)
    vals, vecs = sp_eigsh(op.to_scipy(), k=k, which=which, tol=tol, v0=v0, maxiter=maxiter)
    return _to_torch(op, vals, vecs)


def _shift_invert(
    op: Hessian, k: int, sigma: float, tol: float, maxiter: int | None, seed: int
) -> tuple[Tensor, Tensor] | None:
    """ARPACK in shift-invert mode on the exact factorization; ``None`` if ARPACK fails."""
    from scipy.sparse.linalg import ArpackError
    from scipy.sparse.linalg import eigsh as sp_eigsh

    fac = op.factor(-sigma)
    if getattr(fac, "singular", False):
        raise SingularHessianError(
            f"hessinv.spectrum.eigsh: H - sigma*I is singular at sigma={sigma:g} (sigma is an "
            f"eigenvalue to working precision); move sigma. {HINT}"
        )
    opinv = op._scipy(lambda m: fac.solve(m, check=False))
    v0 = np.random.default_rng(seed).standard_normal(op.num_params)
    try:
        vals, vecs = sp_eigsh(
            op.to_scipy(),
            k=k,
            sigma=sigma,
            which="LM",
            OPinv=opinv,
            tol=tol,
            v0=v0,
            maxiter=maxiter,
        )
    except ArpackError:  # includes ArpackNoConvergence
        return None
    return _to_torch(op, vals, vecs)


def _residuals(op: Hessian, vals: Tensor, vecs: Tensor) -> Tensor:
    r = op.matmat(vecs) - vecs * vals
    return torch.linalg.vector_norm(r, dim=0) / torch.linalg.vector_norm(vecs, dim=0)


def _shift_below_spectrum(op: Hessian, nrm: float) -> float:
    """A shift ``s <= lambda_min`` within ``1e-3 ||H||`` of it, by bisection on the counts."""
    w = op.num_params
    bound = 1.1 * nrm + 1e-300
    for _ in range(60):  # -bound must lie below the spectrum: a count proves it
        if _inertia_at(op, -bound)[1] == 0:
            break
        bound *= 2.0
    else:  # pragma: no cover - a count that never reaches 0
        raise RuntimeError("hessinv.spectrum: could not bracket the spectrum by counts")
    lo, hi = -bound, 1.0137 * bound  # asymmetric: no midpoint at exactly 0
    while hi - lo > 1e-3 * bound:
        mid = 0.5 * (lo + hi)
        above, below, at, _ = _inertia_at(op, mid)
        if below == 0 and at == 0:
            lo = mid
        else:
            hi = mid
        if below + at >= w:  # pragma: no cover - only if ||H|| was grossly underestimated
            hi = mid
    return lo


def _counts_agree(op: Hessian, vals: Tensor, kind: str, sigma: float | None, delta: float) -> bool:
    """Whether the counts confirm that every eigenvalue ``which`` asks for was returned."""
    v = vals.detach().cpu().numpy()
    k = v.size
    w = op.num_params

    def between(a: float, b: float) -> int:  # eigenvalues in the open interval (a, b)
        return _inertia_at(op, b)[1] + _inertia_at(op, a)[0] - w

    below = kind == "near" and sigma is not None and sigma <= v.min() - delta
    if kind == "SA" or (below and _inertia_at(op, sigma)[1] == 0):  # sigma below the spectrum
        t = float(v.max())
        return _inertia_at(op, t - delta)[1] == int((v < t - delta).sum()) and (
            _inertia_at(op, t + delta)[1] >= k
        )
    if kind == "LA":
        t = float(v.min())
        return _inertia_at(op, t + delta)[0] == int((v > t + delta).sum()) and (
            _inertia_at(op, t - delta)[0] >= k
        )
    if kind == "LM":
        r = float(np.abs(v).min())
        big = _inertia_at(op, r + delta)[0] + _inertia_at(op, -r - delta)[1]
        enough = r <= delta or w - between(-r + delta, r - delta) >= k
        return big == int((np.abs(v) > r + delta).sum()) and enough
    assert sigma is not None
    r = float(np.abs(v - sigma).max())
    inner = between(sigma - r + delta, sigma + r - delta) if r > delta else 0
    outer = between(sigma - r - delta, sigma + r + delta)
    return inner == int((np.abs(v - sigma) < r - delta).sum()) and outer >= k


def _block_inverse_iteration(
    op: Hessian, k: int, sigma: float, start: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    """Subspace iteration on ``(H - sigma I)^{-1}`` with Rayleigh-Ritz.

    ``max(2k, k + 8)`` columns (one multi-column lifted solve per step), so an
    eigenvalue of any multiplicity near ``sigma`` is represented by as many
    Ritz vectors as it has copies among the ``k`` wanted (ARPACK, one vector at
    a time, can miss copies or stall on them). Stops when the ``k`` Ritz pairs
    nearest ``sigma`` have residuals at round-off level (``1e-12 ||H||``) or
    after 300 steps (the caller checks the residuals).
    """
    fac = op.factor(-sigma)
    w = op.num_params
    p = min(w, max(2 * k, k + 8))
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(w, p, generator=gen, dtype=op.dtype).to(op.device)
    if start is not None:
        x[:, : start.shape[1]] = start
    th = s = None
    for _ in range(300):
        q, _ = torch.linalg.qr(fac.solve(x, check=False))
        hq = op.matmat(q)
        a = q.T @ hq
        th, s = torch.linalg.eigh(0.5 * (a + a.T))
        order = torch.argsort((th - sigma).abs())
        th, s = th[order], s[:, order]
        x = q @ s
        res = torch.linalg.vector_norm(hq @ s - x * th, dim=0)
        if float(res[:k].max()) <= 1e-12 * scale:
            break
    assert th is not None
    sel = torch.argsort(th[:k])
    return th[:k][sel], x[:, :k][:, sel]


from .slq import SLQResult, plot_spectrum, slq  # noqa: E402  (re-exported)

__all__ = [
    "SLQResult",
    "SpectralHistogram",
    "eigenvalue_count",
    "eigsh",
    "norm_estimate",
    "plot_spectrum",
    "slq",
    "spectral_histogram",
]
