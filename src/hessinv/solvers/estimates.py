"""Cheap spectral estimates used by the solver contract.

* :func:`spectral_bounds`: the extreme eigenvalues of a symmetric operator by
  Lanczos with full reorthogonalization (``k`` products). Ritz values lie
  inside the spectrum, so ``max(|theta_min|, |theta_max|)`` is an estimate of
  ``||A||_2`` from below; the extreme Ritz values converge first, typically to
  a few digits in 16 steps, and exactly once ``k = W``.
* :func:`smallest_singular_value`: an estimate from above of ``sigma_min(A)``
  by inverse iteration with a factorization (``||y|| / ||A^{-1} y|| >=
  sigma_min`` for every ``y``), the idea of LAPACK's condition estimators.

Both are written as step generators (:func:`block_lanczos_steps`,
:func:`inverse_iteration_steps`): :func:`drive` runs one with a product of
its own, a :class:`Rider` lets its columns ride along the products and solves
a computation makes anyway (:meth:`hessinv.solvers.base.Factorization.solve`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from typing import Generic, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")

#: Inverse iterations of the contract's estimate of ``sigma_min`` (:func:`smallest_singular_value`).
INVERSE_STEPS = 5
#: :func:`excludes_band`: ``e_j > t 10^(BAND_EXPONENT / j)`` (``e_5 > 10 t`` after five steps).
BAND_EXPONENT = 5.0
#: Independent starts of the inverse iteration that rides along a solve: with two, the
#: band is excluded after three steps where one start needs five (:func:`excludes_band`).
RIDER_COLUMNS = 2


def gaussian(
    size: int, columns: int, dtype: torch.dtype, device: torch.device, seed: int
) -> Tensor:
    """``(size, columns)`` standard normal entries from a seeded CPU generator, cast.

    The same numbers on every device and dtype: the random starts and probes of
    the solver contract's estimates. Drawn in float32 (torch's vectorised
    normal sampler, about six times faster than its float64 one) and widened:
    a start only needs to be a random direction, and the 24-bit rounding of
    each entry moves the component ``c_1`` along any fixed unit vector by about
    ``6e-8 |c_1|`` relative, far below the ``10^-5`` of
    :func:`excludes_band`'s confidence.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    y = torch.randn(columns, size, generator=gen, dtype=torch.float32).T
    return y.to(dtype=dtype, device=device).contiguous()


def column_norms(t: Tensor) -> Tensor:
    """Per column ``||t_j||_2``, without underflow or overflow of the squares.

    A plain sum of squares reads ``0`` for entries below about ``1e-162`` and
    ``inf`` above ``1e154`` in float64, which would make a tiny residual look
    exact and a huge right-hand side look inaccurate. So the plain norms are
    kept only where they are safe: finite (no square overflowed) and at least
    ``sqrt(n tiny / eps)`` (the squares that underflowed, fewer than ``n``
    of them, each below ``tiny``, change the sum by less than ``eps`` of
    it); otherwise each column is divided by its largest ``|entry|`` first (as
    LAPACK's ``dnrm2``). The plain norm of a tall ``(W, k)`` block is several
    times faster than its scaled form (torch reduces ``|.|`` along the first
    dimension slowly), and the solver contract takes about twenty per solve.
    A column with a NaN or an infinite entry reads NaN or inf.
    """
    if t.shape[0] == 0:
        return t.new_zeros(t.shape[1:])
    plain = torch.linalg.vector_norm(t, dim=0)
    info = torch.finfo(t.dtype)
    low = math.sqrt(max(t.shape[0], 1) * info.tiny / info.eps)
    if bool(((plain >= low) & (plain <= info.max)).all()):
        return plain
    scale = t.abs().amax(dim=0)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.where(scale > 0, safe * torch.linalg.vector_norm(t / safe, dim=0), scale)


def _start(size: int, dtype: torch.dtype, device: torch.device, seed: int) -> Tensor:
    v = gaussian(size, 1, dtype, device, seed)
    return v / torch.linalg.vector_norm(v)


def spectral_bounds(
    matmat: Callable[[Tensor], Tensor],
    size: int,
    dtype: torch.dtype,
    device: torch.device,
    steps: int = 16,
    seed: int = 0,
    block: int = 4,
) -> tuple[float, float]:
    """``(theta_min, theta_max)``: extreme Ritz values of ``k = min(steps, W)`` Lanczos products.

    With ``block > 1``, block Lanczos: ``ceil(k / block)`` calls of ``matmat``
    on ``block`` columns each (on a layered operator a product with a few
    columns costs little more than with one, so this is several times
    cheaper), and the Ritz values of the Rayleigh quotient ``Q^T A Q`` on the
    orthonormal block Krylov basis ``Q``. Ritz values of any orthonormal
    basis lie inside ``[lambda_min, lambda_max]`` (Cauchy interlacing), so
    both forms estimate ``||A||_2`` from below.

    Args:
        matmat: ``V -> A V`` for ``V`` of shape ``(W, k)``, ``A`` symmetric.
        size: ``W``.
        dtype: Working dtype.
        device: Working device.
        steps: Lanczos products (columns in all).
        seed: Seed of the (CPU) start vector.
        block: Columns per product (``1``: plain Lanczos). With the default ``4``,
            16 products take 4 calls; the norm estimates of the tests' and
            benchmarks' networks agree with plain Lanczos to within 1 %.
    """
    if size == 0:
        return 0.0, 0.0
    if block > 1:
        return _block_bounds(matmat, size, dtype, device, min(steps, size), seed, block)
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


#: A step generator: yields blocks ``Y`` (``(W, b)``), is sent ``F(Y)``, returns its estimate.
Steps = Generator[Tensor, Tensor, T]


def drive(steps: Steps[T], fn: Callable[[Tensor], Tensor]) -> T:
    """Run a step generator to the end with ``fn`` (``A`` or ``A^{-1}``) as its product."""
    try:
        y = next(steps)
        while True:
            y = steps.send(fn(y))
    except StopIteration as stop:
        return stop.value


class Rider(Generic[T]):
    """A step generator whose products ride along another computation's calls.

    On a layered operator a product (or a solve) with a few more columns costs
    little more than with one, so the estimates of the solver contract can
    append their columns to the products a solve makes anyway. :attr:`block`
    is the block waiting for its product (``None`` when the estimate needs no
    more), :meth:`feed` hands the product in, :meth:`finish` runs what is left
    with a plain product.
    """

    def __init__(self, steps: Steps[T]) -> None:
        self._steps = steps
        self.block: Tensor | None = None
        self.value: T | None = None
        self._done = False
        self._advance(lambda: next(steps))

    def _advance(self, step: Callable[[], Tensor]) -> None:
        try:
            self.block = step()
        except StopIteration as stop:
            self.block, self.value, self._done = None, stop.value, True

    @property
    def done(self) -> bool:
        """The estimate needs no more products (:attr:`value` is set)."""
        return self._done

    def feed(self, product: Tensor) -> None:
        """The product of the waiting :attr:`block`."""
        self._advance(lambda: self._steps.send(product))

    def finish(self, fn: Callable[[Tensor], Tensor]) -> T:
        """Complete the estimate with ``fn`` as the product; its value."""
        while not self._done:
            self.feed(fn(self.block))
        return self.value  # type: ignore[return-value]


def _block_bounds(
    matmat: Callable[[Tensor], Tensor],
    size: int,
    dtype: torch.dtype,
    device: torch.device,
    k: int,
    seed: int,
    block: int,
) -> tuple[float, float]:
    """Block Lanczos for :func:`spectral_bounds`: Rayleigh-Ritz on ``k`` orthonormal columns."""
    return drive(block_lanczos_steps(size, dtype, device, k, seed, block), matmat)


def block_lanczos_steps(
    size: int,
    dtype: torch.dtype,
    device: torch.device,
    k: int = 16,
    seed: int = 0,
    block: int = 4,
) -> Steps[tuple[float, float]]:
    """The steps of :func:`spectral_bounds` with ``block > 1`` (``k <= size`` columns in all)."""
    k = min(k, size)
    if k == 0:
        return (0.0, 0.0)
    b = min(block, k)
    # the basis is kept transposed, in the rows of a preallocated (k, W) buffer: the
    # projections Q^T W and Q C stream contiguous rows (memory-bound at these
    # shapes), and no step concatenates (fresh multi-MB tensors fault their pages).
    # The Rayleigh quotient T = Q^T A Q is filled block column by block column from
    # each product's projection (A Q_j)^T Q_{0..j}, which the reorthogonalization
    # needs anyway: no (A Q) buffer and no final k x W x k product.
    basis = torch.empty(k, size, dtype=dtype, device=device)  # Q^T
    t = torch.zeros(k, k, dtype=dtype, device=device)  # T = Q^T A Q, upper block triangle
    q, _ = torch.linalg.qr(gaussian(size, b, dtype, device, seed))
    done = 0
    blocks: list[tuple[int, int]] = []  # (start, end) of each block column of T
    while True:
        aq = (yield q).to(dtype)  # in the working dtype (a wider product may overflow it)
        c = q.shape[1]
        blocks.append((done, done + c))
        basis[done : done + c] = q.T
        # (A Q)^T in rows too: the products below then run on contiguous rows, about
        # twice as fast as on the transposed columns at these shapes
        aqt = aq.T.contiguous()
        lo, hi = torch.aminmax(aqt)  # NaN propagates
        top = max(-float(lo), float(hi))
        if not math.isfinite(top):
            return -math.inf, math.inf
        qt = basis[: done + c]
        h = aqt @ qt.T  # (c, done + c): h[r, s] = q_s^T A q_r
        t[: done + c, done : done + c] = h.T
        done += c
        nxt = min(b, k - done)
        if nxt <= 0:
            break
        # the first pass of the full reorthogonalization, and the second (twice is
        # enough), each one GEMM that updates its operand (no product buffer)
        w_t = torch.addmm(aqt[:nxt], h[:nxt], qt, alpha=-1.0)
        w_t.addmm_(w_t @ qt.T, qt, alpha=-1.0)
        tiny = 1e3 * torch.finfo(dtype).eps * max(top, 1e-300)
        q, good = _orthonormal_block(w_t, qt, tiny)
        if not bool(good.any()):  # invariant: the basis so far holds the extreme eigenvalues
            break
        if not bool(good.all()):  # rank deficient, not invariant: fresh directions instead
            fresh = gaussian(size, int((~good).sum()), dtype, device, seed + 1 + done).T
            fresh = fresh * (top / float(fresh.abs().amax()))  # at A Q's scale, as tiny is
            w_t = torch.cat([w_t[good], fresh])
            for _ in range(2):
                w_t = w_t - (w_t @ qt.T) @ qt
            q, good = _orthonormal_block(w_t, qt, tiny)
            if not bool(good.all()):
                break
    # T's lower block triangle by symmetry (A = A^T), its diagonal blocks symmetrized
    up = t[:done, :done].to(torch.float64)
    diag = torch.block_diag(*[up[i:j, i:j] for i, j in blocks])
    upper = up.triu(1) - diag.triu(1)  # strictly above the diagonal blocks
    theta = torch.linalg.eigvalsh(upper + upper.T + 0.5 * (diag + diag.T))
    return float(theta[0]), float(theta[-1])


def _orthonormal_block(w_t: Tensor, qt: Tensor, tiny: float) -> tuple[Tensor, Tensor]:
    """``Q`` of the QR of the rows ``w_t`` (already orthogonal to ``qt``), and its good columns.

    A column whose ``|R_jj| <= tiny`` depends on the ones before it: its
    ``Q`` column is rounding noise, not orthogonal to ``qt``, and must not
    enter the basis (Ritz values of a non-orthonormal basis can leave the
    spectrum).
    """
    q, r = torch.linalg.qr(w_t.T)
    return q, r.diagonal().abs() > tiny


def smallest_singular_value(
    apply_inverse: Callable[[Tensor], Tensor],
    size: int,
    dtype: torch.dtype,
    device: torch.device,
    steps: int = INVERSE_STEPS,
    seed: int = 1,
    columns: int = 1,
) -> float:
    """An estimate from above of ``sigma_min(A)`` from ``steps`` inverse iterations.

    ``columns`` independent starts (the least estimate). Returns ``0.0`` if an
    application of ``A^{-1}`` overflows.
    """
    return drive(
        inverse_iteration_steps(size, dtype, device, steps, seed, columns=columns), apply_inverse
    )


def inverse_iteration_steps(
    size: int,
    dtype: torch.dtype,
    device: torch.device,
    steps: int = INVERSE_STEPS,
    seed: int = 1,
    record: list[tuple[tuple[float, ...], int]] | None = None,
    columns: int = 1,
) -> Steps[float]:
    """The steps of :func:`smallest_singular_value`: ``||y|| / ||A^{-1} y||``, minimised.

    ``columns`` independent random starts iterate side by side (each its own
    power iteration on ``A^{-1}``); the estimate is the least over them and
    over the steps. ``record``: after step ``j`` the pair ``(per-column
    estimates so far, j)`` is appended (for :func:`excludes_band`, which may
    end the iteration early).
    """
    if size == 0:
        return math.inf
    y = gaussian(size, columns, dtype, device, seed)
    y = y / column_norms(y)
    best = [math.inf] * columns
    for j in range(1, steps + 1):
        z = yield y
        # scaled (a plain sum of squares under- or overflows at the extremes of the loss
        # scale); NaN or inf only for a non-finite entry
        nz = column_norms(z.reshape(size, columns))
        norms = nz.tolist()
        if not all(math.isfinite(v) for v in norms):
            return 0.0
        if any(v == 0.0 for v in norms):
            return min(best)
        best = [min(b, 1.0 / v) for b, v in zip(best, norms, strict=True)]  # ||y_i|| = 1
        if record is not None:
            record.append((tuple(best), j))
        y = z.reshape(size, columns) / nz
    return min(best)


def excludes_band(
    estimate: float | Sequence[float], steps: int, t: float, size: int | None = None
) -> bool:
    """Inverse iteration's estimate after ``steps`` steps rules out eigenvalues in ``[-t, t]``.

    With ``y_0`` the random start, ``c_1`` its component along the
    eigenvector of the smallest ``|lambda|`` and ``N_j = ||A^{-j} y_0||``,
    the estimate after ``j`` steps is ``e_j = N_{j-1} / N_j`` (:func:`
    inverse_iteration_steps`). ``log N_j`` is convex in ``j`` (a sum of
    exponentials), so ``N_j / N_{j-1} >= N_j^{1/j}``, and ``N_j >= |c_1|
    sigma_min^{-j}``: hence ``e_j <= sigma_min |c_1|^{-1/j}``. An eigenvalue in
    ``[-t, t]`` would need ``|c_1| <= (t / e_j)^j``. The contract's rule, five
    steps and ``e_5 > 10 t``, accepts ``|c_1| <= 10^-5`` (a chance of at most
    ``10^-5 sqrt(2 W / pi)`` for a random start: the density of ``c_1`` on the
    unit sphere is at most ``sqrt(W / (2 pi))``); ``e_j > t 10^{5/j}`` accepts
    no more after ``j`` steps (``46 t`` after three), so the iteration may
    stop there at the same confidence.

    With ``m`` independent starts (``estimate`` a sequence, ``size`` the
    dimension of the space they were drawn in, ``W`` below: the operator's
    size, or the kept coordinates where a method's iteration runs there)
    an eigenvalue in the band needs every ``|c_1^(i)| <= (t / e_j^(i))^j``, a
    chance of at most ``prod_i (t / e_j^(i))^j sqrt(2 W / pi)^m``: the rule
    accepts when ``prod_i (t / e_j^(i))^j <= 10^-5 (2 W / pi)^{-(m-1)/2}``,
    the one-column rule's chance (the same rule for ``m = 1``).
    """
    ests = [estimate] if isinstance(estimate, (int, float)) else list(estimate)
    if steps < 1 or not ests or t < 0:
        return False
    if t == 0.0:
        return all(e > 0.0 for e in ests)
    m = len(ests)
    if m > 1 and size is None:
        raise ValueError("excludes_band: several estimates need the size W")
    if any(not e > 0.0 for e in ests):  # (NaN, zero or negative): no evidence
        return False
    log_delta = steps * sum(math.log10(t / e) for e in ests)
    extra = 0.0 if m == 1 else 0.5 * (m - 1) * math.log10(2.0 * size / math.pi)  # type: ignore[operator]
    return log_delta <= -BAND_EXPONENT - extra


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
