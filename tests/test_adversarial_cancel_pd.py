"""Adversarial tests (adv15): dampings that cancel the spectrum, and ``is_positive_definite``.

Targets two changes: ``shifted_norm`` measuring ``||H + dI||`` on its own
products when ``d`` cancels the Ritz values (0ef06c8), and
``is_positive_definite`` returning ``False`` for a proof with eigenvalues in the
zero band (ac5c153).

The nets are one ``Linear(m, k, bias=False)`` stage with a summed squared error,
so ``H = 2 X^T X (x) I_k`` (weight ``(k, m)`` flattened row-major) and every
eigenvalue of ``H`` is within a few ulps of ``9/8`` (the inputs are ``3/4`` times
orthonormal columns, hard-coded below as float literals so that no LAPACK
difference can change the case). The references are independent of the code
under test and exact: ``X^T X + d I`` in rational arithmetic
(:class:`fractions.Fraction`), its inertia by exact symmetric elimination
(Sylvester's law), a backward error from the exact residual. In float32 the
reference is ``2 X^T X`` in float64 from the float32 data (the products are
exact, the sums err by ``1e-16``, nine orders below the eigenvalues compared).

Finding (strict xfails until fixed, now tests of the fix): when ``d`` cancels the
whole spectrum of ``H``
(``||H + dI|| ~ eps ||H||``), the zero band ``t = W eps ||H + dI||`` is
``~ W eps^2 ||H||``, far below the round-off ``~ eps ||H||`` with which any
method forms ``H + dI``. Every sign inside ``[-eps ||H||, eps ||H||]`` is then
reported as *verified* although it is round-off: wrong verified inertias
(lifted, dense, GGN kernel, float64 and float32), ``norm() == 0`` for a nonzero
``H + dI``, ``is_positive_definite()`` ``True`` for a negative definite matrix
(kernel) and ``False`` for a positive definite one (lifted), a wrong
``eigenvalue_count``, and a lifted solve accepted with a true backward error of
``0.1``. The fix: the zero band ``t = W eps max(||H + dI||, ||H|| + |d|)``.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from torch import nn

import hessinv
import hessinv.optim
from hessinv.optim.factored import FactoredSolver
from hessinv.solvers import contract

F64 = torch.float64
F32 = torch.float32
EPS64 = torch.finfo(F64).eps

# 3/4 times orthonormal columns (torch.linalg.qr of seeded Gaussians), as literals.
X_1x1 = [[-0.4304856200583991], [0.08197095616516255], [0.6086566300208225]]
X_2x2 = [
    [-0.28809640022597155, -0.3208555202638762],
    [-0.026867676311991683, -0.6064760693632028],
    [0.196858024012649, 0.20352365340764053],
    [0.663344187076563, -0.22431369755225247],
]
X_2x1 = [
    [-0.36187342702352904, -0.11170396236947094],
    [0.5049283163906872, -0.509409447978324],
    [0.2706582371806617, 0.21281398675814872],
    [-0.321464052060832, -0.49521151656790185],
]
X_1x2 = [[-0.017420237546767803], [-0.7443789477446185], [0.0899806505779361]]
# float32 numbers (6 x 3)
X32_3x2 = [
    [-0.06939121335744858, 0.15193769335746765, 0.0648687556385994],
    [0.3499143123626709, -0.17611655592918396, -0.6200172305107117],
    [-0.4044027328491211, 0.3841288089752197, -0.3932936489582062],
    [0.11411997675895691, -0.2237911969423294, 0.09359098970890045],
    [-0.4683462977409363, -0.3601139187812805, -0.08997318148612976],
    [0.1983220875263214, 0.42553308606147766, 0.04833550006151199],
]


# -- independent exact references --------------------------------------------------------
def _gram(xs: list[list[float]], scale: Fraction = Fraction(1)) -> list[list[Fraction]]:
    """``scale * 2 X^T X`` exactly."""
    xf = [[Fraction(v) for v in row] for row in xs]
    m = len(xf[0])
    return [[scale * 2 * sum(r[a] * r[b] for r in xf) for b in range(m)] for a in range(m)]


def _kron_eye(g: list[list[Fraction]], k: int) -> list[list[Fraction]]:
    """``I_k (x) G``: the Hessian of the weight ``(k, m)`` flattened row-major."""
    m = len(g)
    w = m * k
    out = [[Fraction(0)] * w for _ in range(w)]
    for o in range(k):
        for a in range(m):
            for b in range(m):
                out[o * m + a][o * m + b] = g[a][b]
    return out


def _shift(a: list[list[Fraction]], d: float) -> list[list[Fraction]]:
    return [[v + (Fraction(d) if i == j else 0) for j, v in enumerate(r)] for i, r in enumerate(a)]


def _exact_inertia(a: list[list[Fraction]]) -> tuple[int, int, int]:
    """``(pos, neg, zero)`` of a rational symmetric matrix by exact elimination (Sylvester)."""
    m = [r[:] for r in a]
    idx = list(range(len(m)))
    pos = neg = 0
    while idx:
        piv = next((i for i in idx if m[i][i] != 0), None)
        if piv is None:  # zero diagonal: a 2x2 pivot [[0, b], [b, 0]] has one of each sign
            pair = next(((i, j) for i in idx for j in idx if i < j and m[i][j] != 0), None)
            if pair is None:
                break
            i, j = pair
            rest = [r for r in idx if r not in pair]
            b = m[i][j]
            for r in rest:
                for s in rest:
                    m[r][s] -= (m[r][i] * m[j][s] + m[r][j] * m[i][s]) / b
            pos, neg, idx = pos + 1, neg + 1, rest
            continue
        p = m[piv][piv]
        pos, neg = pos + (p > 0), neg + (p < 0)
        rest = [r for r in idx if r != piv]
        for r in rest:
            f = m[r][piv] / p
            for s in rest:
                m[r][s] -= f * m[piv][s]
        idx = rest
    return pos, neg, len(a) - pos - neg


def _frobenius(a: list[list[Fraction]]) -> float:
    return math.sqrt(float(sum(v * v for r in a for v in r)))


def _exact_backward_error(a: list[list[Fraction]], x: torch.Tensor, g: torch.Tensor) -> float:
    """``||A x - g|| / (||A||_F ||x|| + ||g||)``: a lower bound of the 2-norm backward error."""
    xf = [Fraction(float(v)) for v in x]
    gf = [Fraction(float(v)) for v in g]
    r = [
        sum(aij * xj for aij, xj in zip(row, xf, strict=True)) - gi
        for row, gi in zip(a, gf, strict=True)
    ]
    rn = math.sqrt(float(sum(v * v for v in r)))
    return rn / (
        _frobenius(a) * math.sqrt(float(sum(v * v for v in xf)))
        + math.sqrt(float(sum(v * v for v in gf)))
    )


_MODELS: list[nn.Module] = []  # the last model _net built (for the staleness test)


def _net(xs: list[list[float]], k: int, dt: torch.dtype = F64, scale: float = 1.0, curv=None):  # noqa: ANN001, ANN202
    X = torch.tensor(xs, dtype=dt)  # noqa: N806
    n, m = X.shape
    model = nn.Sequential(nn.Linear(m, k, bias=False)).to(dt)
    _MODELS[:] = [model]

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return scale * ((out - target) ** 2).sum()

    return (curv or hessinv.Hessian)(model, loss, X, torch.zeros(n, k, dtype=dt))


def _consistent(inert, truth: tuple[int, int, int]) -> bool:  # noqa: ANN001
    """A verified count must equal the exact one (no exact zero, no eigenvalue near the band)."""
    return (not inert.verified) or tuple(inert) == truth


# -- the defects, fixed: the zero band follows the round-off of forming H + dI ---------------
# Found as strict xfails (the band W eps ||H + dI|| ~ W eps^2 ||H|| when d cancels all of H's
# spectrum, far below the eps ||H|| round-off of forming H + dI: round-off signs reported as
# verified). Fixed by t = W eps max(||H + dI||, ||H|| + |d|): the tests now hold every method to
# that contract, against the exact rational matrix counted in the same band.


def _band_truth(a: list[list[Fraction]], t: Fraction) -> tuple[int, int, int]:
    """``(pos, neg, zero)`` of the exact ``a`` with zeros ``|lambda| <= t`` (Sylvester, exactly)."""
    w = len(a)
    up = _exact_inertia(_shift_exact(a, -t))  # eigenvalues - t
    dn = _exact_inertia(_shift_exact(a, t))  # eigenvalues + t
    at_most_t = up[1] + up[2]
    below = dn[1]
    return w - at_most_t, below, at_most_t - below


def _shift_exact(a: list[list[Fraction]], d: Fraction) -> list[list[Fraction]]:
    return [[v + (d if i == j else 0) for j, v in enumerate(r)] for i, r in enumerate(a)]


def _band(w: int, h_norm: float, d: float, dt: torch.dtype = F64) -> Fraction:
    """The contract's ``t = W eps (||H|| + |d|)`` (``||H + dI||`` is far smaller here)."""
    return Fraction(w) * Fraction(torch.finfo(dt).eps) * (Fraction(h_norm) + abs(Fraction(d)))


@pytest.mark.parametrize("method", ["lifted", "dense"])
@pytest.mark.parametrize("e", [-40, 0, 40])
def test_one_parameter_cancellation_is_a_zero_in_the_band(method: str, e: int) -> None:
    """``H = 2 sum x^2`` (1 x 1), ``d = -1.1249999999999996``: exactly ``H + d = -1.27e-16``.

    The library reads ``H`` as ``1.1249999999999996`` (one rounding), so every
    product of ``H + dI`` is exactly ``0``. The exact ``-1.27e-16`` is within the
    round-off ``eps (||H|| + |d|) = 5e-16`` of forming it: one zero (it was a
    verified 'H + damping*I is zero' from ``t = 0``, and now is by the band).
    """
    c = 2.0**e
    H = _net(X_1x1, 1, scale=c)
    d = -1.1249999999999996 * c
    a = _shift(_gram(X_1x1, Fraction(c)), d)
    assert _exact_inertia(a) == (0, 1, 0) and a[0][0] != 0
    truth = _band_truth(a, _band(1, 1.125 * c, d))
    assert truth == (0, 0, 1)
    f = H.factor(d, method=method)
    assert f.zero_threshold() > 0.0
    assert _consistent(f.inertia(), truth), (tuple(f.inertia()), f.inertia().how)


@pytest.mark.parametrize("e", [-40, 0, 40])
def test_lifted_verified_inertia_in_cancellation(e: int) -> None:
    """``X`` 4 x 2, ``k = 2``, ``d = -9/8``: exactly negative definite (``|lambda| <= 4e-16``).

    Inside the band ``4 eps (||H|| + |d|) = 2e-15``: four zeros (it was a
    verified ``(2, 2, 0)``).
    """
    c = 2.0**e
    H = _net(X_2x2, 2, scale=c)
    d = -1.125 * c
    a = _shift(_kron_eye(_gram(X_2x2, Fraction(c)), 2), d)
    assert _exact_inertia(a) == (0, 4, 0)
    truth = _band_truth(a, _band(4, 1.125 * c, d))
    assert truth == (0, 0, 4)
    inert = H.factor(d, method="lifted").inertia()
    assert _consistent(inert, truth), (tuple(inert), inert.how)


@pytest.mark.parametrize("e", [-40, 0, 40])
def test_lifted_solve_in_cancellation_meets_the_contract(e: int) -> None:
    """``(H + dI) x = g`` with the case above: refused, or within the contract.

    It returned ``x`` with an exact normwise backward error (``||A||_F``, a lower
    bound) of about ``1e14 eps``; the contract promises ``<= 64 eps`` or an error.
    """
    c = 2.0**e
    H = _net(X_2x2, 2, scale=c)
    d = -1.125 * c
    a = _shift(_kron_eye(_gram(X_2x2, Fraction(c)), 2), d)
    g = torch.linspace(-1.0, 1.0, 4, dtype=F64) + 0.3
    try:
        x = H.solve(g, damping=d, method="lifted")
    except hessinv.SingularHessianError:  # (InaccurateSolveError is one)
        return
    assert _exact_backward_error(a, x, g) <= 64 * EPS64


@pytest.mark.parametrize("method", ["lifted", "dense"])
def test_float32_verified_inertia_in_cancellation(method: str) -> None:
    """float32, ``X`` 6 x 3 (3/4 orthonormal columns rounded), ``k = 2``, ``d`` a float32 number.

    Reference: ``2 X^T X + dI`` in float64 from the float32 data (products exact,
    ``1e-16`` relative error); its eigenvalues lie in ``[-1.6e-7, -9.4e-8]``, a
    tenth of the float32 band ``6 eps (||H|| + |d|) = 1.6e-6``: six zeros (the
    methods said ``(2, 4, 0)`` and ``(0, 2, 4)``, verified).
    """
    xs = torch.tensor(X32_3x2, dtype=F32)
    H = _net(X32_3x2, 2, dt=F32)
    x64 = xs.double()
    d = -1.1250001192092896
    h = 2 * x64.T @ x64
    ev = torch.linalg.eigvalsh(h + d * torch.eye(3, dtype=F64)).repeat_interleave(2)
    t = 6 * torch.finfo(F32).eps * (float(torch.linalg.eigvalsh(h).abs().max()) + abs(d))
    assert bool((ev.abs() < t / 4).all()), "an eigenvalue near the band: not a test case"
    inert = H.factor(d, method=method).inertia()
    assert _consistent(inert, (0, 0, 6)), (tuple(inert), ev.tolist(), inert.how)


@pytest.mark.parametrize(
    "xs,k,curv,method,d,exact",
    [
        (X_1x2, 2, hessinv.GaussNewton, "kernel", -1.125, (0, 2, 0)),
        (X_2x1, 1, hessinv.Hessian, "lifted", -1.1249999999999996, (2, 0, 0)),
    ],
    ids=["kernel", "lifted"],
)
def test_is_positive_definite_in_cancellation(xs, k, curv, method, d, exact) -> None:  # noqa: ANN001
    """Every exact eigenvalue inside the band ``W eps (||H|| + |d|)``: not positive definite.

    ``kernel``: GaussNewton (``= H`` here), ``X`` 3 x 1, ``k = 2``, ``d = -9/8``:
    exactly ``-1.8e-18 I_2``; it said positive definite. ``lifted``: ``X`` 4 x 2,
    ``k = 1``, ``d = -1.1249999999999996``: exact eigenvalues ``4.8e-18, 4.3e-16``,
    positive under the former band ``2 eps ||A|| = 1.9e-31``, where the lifted count
    said ``(1, 1, 0)``. Both are inside ``2 eps (||H|| + |d|) = 1e-15``: numerically
    singular.
    """
    op = _net(xs, k, curv=curv)
    a = _shift(_kron_eye(_gram(xs), k), d)
    assert _exact_inertia(a) == exact
    truth = _band_truth(a, _band(len(a), 1.125, d))
    assert truth == (0, 0, len(a))
    f = op.factor(d, method=method)
    assert f.is_positive_definite() is False
    assert _consistent(f.inertia(), truth), tuple(f.inertia())


@pytest.mark.parametrize("method", ["lifted", "dense", "auto"])
def test_logdet_in_cancellation(method: str) -> None:
    """Same case: every eigenvalue in the band, so ``(0.0, -inf)`` (lifted read ``-1, -74.86``)."""
    H = _net(X_2x1, 1)
    d = -1.1249999999999996
    assert H.logdet(d, method=method) == (0.0, -math.inf)


def test_eigenvalue_count_at_a_cancelling_sigma() -> None:
    """``H = 2 sum x^2 = sigma - 1.27e-16`` exactly: within the band of ``sigma``, not below it."""
    H = _net(X_1x1, 1)
    sigma = 1.1249999999999996
    a = _shift(_gram(X_1x1), -sigma)
    assert _exact_inertia(a) == (0, 1, 0)
    assert _band_truth(a, _band(1, 1.125, -sigma)) == (0, 0, 1)
    assert H.eigenvalue_count(sigma) == 0


def test_no_extra_lanczos_without_cancellation_at_large_width(monkeypatch) -> None:  # noqa: ANN001
    """A stand-in operator with ``W = 2^24`` float32 parameters, Ritz range ``[1, 2]``, ``d = 0``.

    ``||H + 0 I|| = 2`` from the Ritz values has nothing to cancel; the
    cancellation level ``max(W, 64) eps`` reached ``1`` at ``W >= 2^23`` (it is
    capped at ``sqrt(eps)`` now). The product itself is never called:
    ``spectral_bounds`` is counted instead.
    """
    calls = []
    monkeypatch.setattr(contract, "spectral_bounds", lambda *a, **k: calls.append(1) or (2.0, 2.0))

    class Op:
        num_params = 2**24
        dtype = F32
        device = torch.device("cpu")

        def spectral_bounds(self) -> tuple[float, float]:
            return 1.0, 2.0

    assert contract.shifted_norm(Op(), 0.0) == 2.0
    assert calls == []


def test_trust_region_lifted_step_at_a_cancelling_shift_does_not_crash() -> None:
    """Concave loss ``-||W x - y||^2``, ``W = 0``, ``y = 1e-17``: ``C = -H``, a cluster at ``-9/8``.

    The gradient is tiny, so the trust-region shift converges to within ulps of
    ``-lambda_min(C) = 9/8``; one ``Newton.step`` with ``factorization='lifted'``
    (Gauss-Newton) must return (a flagged or certified step), not raise (the
    trial's inertia raised ``LiftedPrecisionError`` there).
    """
    X = torch.tensor(X_1x2, dtype=F64)  # noqa: N806
    model = nn.Sequential(nn.Linear(1, 2, bias=False)).to(F64)
    with torch.no_grad():
        model[0].weight.zero_()
    y = torch.full((3, 2), 1e-17, dtype=F64)
    opt = hessinv.optim.Newton(
        model,
        lambda o, t: -((o - t) ** 2).sum(),
        factorization="lifted",
        curvature="gauss-newton",
    )
    opt.step(X, y)
    h = opt.history[-1]
    assert h.certified or "unverified" in h.certificate


# -- attacks that held ---------------------------------------------------------------
def test_solve_in_cancellation_is_refused_not_measured() -> None:
    """``H.backward_error`` could not judge a solve here (``H x`` and ``d x`` of ``1e17``
    cancel): the solve itself must refuse, even with ``check=False``."""
    H = _net(X_2x2, 2)
    with pytest.raises(hessinv.SingularHessianError, match="damping"):
        H.factor(-1.125, method="lifted").solve(torch.ones(4, dtype=F64), check=False)


CASES = [(X_1x1, 1), (X_2x2, 2), (X_2x1, 1), (X_1x2, 2)]


def _dampings(lo: float, hi: float) -> list[float]:
    return sorted({-c + j * math.ulp(c) for c in (lo, hi) for j in (-3, -1, 0, 1, 3)})


@pytest.mark.parametrize("case", range(len(CASES)))
def test_lifted_cholesky_proof_never_certifies_a_cancelled_shift_wrongly(case: int) -> None:
    """``is_positive_definite() is True`` (lifted) and the optimizers' trial certificate.

    Convex (``H``) and concave (``-H``, the trial's ``C + lam I`` near singular)
    losses, shifts within 3 ulps of the Ritz extremes: a proof of definiteness
    is never given where the exact matrix is not positive definite.
    """
    xs, k = CASES[case]
    for sign in (1.0, -1.0):
        H = _net(xs, k, scale=sign)
        exact = _kron_eye(_gram(xs, Fraction(sign)), k)
        lo, hi = H.spectral_bounds()
        for d in _dampings(lo, hi):
            truth = _exact_inertia(_shift(exact, d))
            pd_exact = truth[0] == len(exact)
            if H.factor(d, method="lifted").is_positive_definite() is True:
                assert pd_exact, (case, sign, d, truth)
            t = FactoredSolver(H, 1.0, torch.ones(len(exact), dtype=F64), "lifted").trial(d)
            if t.certified or t.pd:
                assert pd_exact, (case, sign, d, truth, t.how)


def test_no_cancelled_norm_without_cancellation(monkeypatch) -> None:  # noqa: ANN001
    """A solve, inertia and logdet at a damping that cancels nothing: no extra Lanczos."""
    called = []
    orig = contract.cancelled_norm
    monkeypatch.setattr(contract, "cancelled_norm", lambda op, d: called.append(d) or orig(op, d))
    H = _net(X_2x2, 2)
    for d in (0.0, 1.0, -0.5, -2.0, 1e-30):
        f = H.factor(d, method="lifted")
        f.solve(torch.ones(4, dtype=F64))
        f.inertia()
        f.logdet()
        H.backward_error(torch.ones(4, 1, dtype=F64), torch.ones(4, 1, dtype=F64), d)
    assert called == []
    assert "_cancelled_norms" not in H.__dict__


def test_cancelled_norm_is_per_damping_and_refuses_a_stale_operator() -> None:
    """Dyadic inputs (``H = 2 (1/4 + 1/16) I_3`` exactly): ``||H + dI||`` per ``d``; then stale."""
    xs = [[0.5], [0.25]]
    H = _net(xs, 3)
    lam = 0.625
    norms = {}
    for j in (1, -1, 2, 1):
        d = -lam + j * math.ulp(lam)
        norms.setdefault(d, []).append(H.factor(d, method="lifted").norm())
    for d, got in norms.items():
        assert all(v == got[0] for v in got)
        assert abs(lam + d) <= got[0] <= 4 * abs(lam + d), (d, got)  # lower bound, Lanczos: equal
    assert len(H.__dict__["_cancelled_norms"]) == 3
    d = -lam + math.ulp(lam)
    f = H.factor(d, method="lifted")
    g = torch.ones(3, 1, dtype=F64)
    for p in _MODELS[-1].parameters():
        with torch.no_grad():
            p.add_(0.5)
    for call in (f.norm, f.inertia, lambda: H.backward_error(g, g, d), lambda: H.solve(g, d)):
        with pytest.raises(hessinv.StaleOperatorError):
            call()


def _two_layer(seed: int):  # noqa: ANN202
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).to(F64)
    X = torch.randn(6, 2, dtype=F64)  # noqa: N806
    y = torch.randn(6, 1, dtype=F64)
    params = list(model.parameters())
    shapes = [p.shape for p in params]
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def f(w: torch.Tensor) -> torch.Tensor:
        ps, i = [], 0
        for s in shapes:
            n = math.prod(s)
            ps.append(w[i : i + n].reshape(s))
            i += n
        h = torch.tanh(X @ ps[0].T + ps[1])
        return ((h @ ps[2].T + ps[3] - y) ** 2).mean()

    ref = torch.func.hessian(f)(flat)
    return model, X, y, ref


@pytest.mark.parametrize("seed", range(3))
def test_deeper_net_cancelling_an_extreme_eigenvalue(seed: int) -> None:
    """Two layers, ``d = -lambda_max`` or ``-lambda_min`` to within 2 ulps: no wrong verified count.

    The rest of the spectrum keeps ``||H + dI||`` of order ``||H||``, so the band
    is meaningful; reference: ``torch.func.hessian`` + ``eigvalsh`` in float64,
    ambiguous within ``100 t`` of the band edge.
    """
    model, X, y, ref = _two_layer(seed)  # noqa: N806
    H = hessinv.Hessian(model, nn.MSELoss(), X, y)
    w = torch.linalg.eigvalsh(ref)
    n = ref.shape[0]
    for lam in (float(w[0]), float(w[-1])):
        for j in (-2, 0, 2):
            d = -lam + j * math.ulp(lam)
            ev = torch.linalg.eigvalsh(ref + d * torch.eye(n, dtype=F64))
            t = n * EPS64 * float(ev.abs().max())
            pos, neg = int((ev > 100 * t).sum()), int((ev < -100 * t).sum())
            amb = n - pos - neg
            for method in ("lifted", "dense"):
                try:
                    inert = H.factor(d, method=method).inertia()
                except hessinv.SingularHessianError:
                    continue
                if inert.verified:
                    assert pos <= inert[0] <= pos + amb and neg <= inert[1] <= neg + amb, (
                        seed,
                        lam,
                        j,
                        method,
                        tuple(inert),
                        (pos, neg, amb),
                    )


def test_kernel_tiny_damping_and_band_edge_consistency() -> None:
    """GGN kernel with ``W > N o`` (exact null space, eigenvalue ``d``): ``d = 1e-30 ||G||``
    and ``d`` at the band edge: ``is_positive_definite()`` agrees with ``inertia()``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1)).to(F64)
    X = torch.randn(3, 4, dtype=F64)  # noqa: N806
    y = torch.randn(3, 1, dtype=F64)
    G = hessinv.GaussNewton(model, nn.MSELoss(), X, y)
    dense = G.to_dense()
    gn = float(torch.linalg.eigvalsh(dense).abs().max())
    W = dense.shape[0]  # noqa: N806
    edge = W * EPS64 * gn / (1 - W * EPS64)  # d = W eps (||G|| + d): the band edge
    for d in (1e-30 * gn, edge, math.nextafter(edge, 0.0), math.nextafter(edge, 1.0), 1e-6 * gn):
        f = G.factor(d, method="kernel")
        inert = f.inertia()
        pd = G.factor(d, method="kernel").is_positive_definite()
        assert pd == (inert.negative == 0 and inert.zero == 0), (d, tuple(inert), pd)
        ev = torch.linalg.eigvalsh(dense + d * torch.eye(W, dtype=F64))
        t = W * EPS64 * float(ev.abs().max())
        if pd:
            assert float(ev.min()) > -100 * t
        if float(ev.min()) > 100 * t:  # clearly definite
            assert pd, (d, tuple(inert))


@pytest.mark.parametrize("dt", [F64, F32])
def test_is_positive_definite_agrees_with_the_verified_inertia(dt: torch.dtype) -> None:
    """The library agrees with itself at cancelling shifts (2600 cases in the full sweep, here
    a subset): ``True`` never beside a verified count with a zero or negative eigenvalue,
    ``False`` never beside a verified ``(W, 0, 0)``; Hessian and Gauss-Newton, convex and
    concave, lifted, dense and kernel."""
    eps = torch.finfo(dt).eps
    for xs, k in [*CASES, (X32_3x2, 2)]:
        for sign, curv in (
            (1.0, hessinv.Hessian),
            (-1.0, hessinv.Hessian),
            (1.0, hessinv.GaussNewton),
        ):
            H = _net(xs, k, dt=dt, scale=sign, curv=curv)
            methods = ["lifted", "dense"] + (["kernel"] if curv is hessinv.GaussNewton else [])
            for c in H.spectral_bounds():
                for j in (-3, 0, 1, 3):
                    d = -c + j * eps * abs(c)
                    for method in methods:
                        try:
                            pd = H.factor(d, method=method).is_positive_definite()
                            inert = H.factor(d, method=method).inertia()
                        except hessinv.SingularHessianError:
                            continue
                        if inert.verified and pd is not None:
                            assert pd == (tuple(inert) == (sum(inert), 0, 0)), (
                                d,
                                method,
                                pd,
                                inert,
                            )
