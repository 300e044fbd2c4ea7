"""Adversarial checks of the inertia verified by a near inverse (``solvers/near_inverse.py``).

The stage elimination's Bunch-Kaufman pivot signs are returned as verified when
``||I - (H + dI) G||_2 <= 1/8`` (four probes) after their parity and ``log|det|``
agree with the pivots' LUs. These tests try to make a *verified* count wrong:
pivots at round-off level (damping ``-mu (1 + k eps)`` with ``mu`` a multiple
eigenvalue of the last stage's ``Txx``, so that the LU and Bunch-Kaufman
factorizations of that pivot may see different signs), dampings next to
eigenvalues of ``H``, dropped and split directions, cross-entropy and conv
tails, loss scales ``1e-12`` and ``1e12``, float32, and the public routes
(``Hessian.inertia``, ``is_positive_definite``, ``eigenvalue_count``,
``spectral_histogram``).

The reference is independent: ``torch.func.hessian`` of the loss in the flat
parameters (``tests/cases.py``) and ``torch.linalg.eigvalsh``. The library's
zero band is ``t = W eps ||H + dI||``; a case with an eigenvalue of ``H + dI``
within a factor :data:`EDGE` of the band's edge (or one that the reference
rounds to exactly zero) is ambiguous and checked only for a sum of ``W``.
A count that is not verified, or a refusal, is allowed; a verified count that
differs from the reference on an unambiguous case is the defect searched for.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from cases import CASES, DT, build, dense_hessian, last_stage_pivot_mu, tanh_net
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import hessinv
from hessinv.errors import LiftedPrecisionError, SingularHessianError
from hessinv.solvers.lifted import LiftedFactorization
from hessinv.spectrum import eigenvalue_count, spectral_histogram

#: Eigenvalues within this factor of the zero band's edge make a case ambiguous.
EDGE = 100.0
EPS = torch.finfo(DT).eps


def _ref(h: torch.Tensor, d: float, eps: float = EPS) -> tuple[torch.Tensor, float]:
    """Eigenvalues of ``h + dI`` (``eigvalsh``) and the band ``W eps ||h + dI||_2``."""
    ev = torch.linalg.eigvalsh(h) + d
    return ev, h.shape[0] * eps * float(ev.abs().max())


def _ambiguous(ev: torch.Tensor, t: float, edge: float = EDGE) -> bool:
    a = ev.abs()
    return bool(((a > t / edge) & (a < t * edge)).any() or (a == 0).any())


def _counts(ev: torch.Tensor, t: float) -> tuple[int, int, int]:
    pos, neg = int((ev > t).sum()), int((ev < -t).sum())
    return pos, neg, ev.numel() - pos - neg


def _check(inert, ev: torch.Tensor, t: float, edge: float = EDGE) -> bool:  # noqa: ANN001
    """A verified count is the reference's unless ambiguous; ``True`` when it was compared."""
    assert sum(inert) == ev.numel()
    if not inert.verified or _ambiguous(ev, t, edge):
        return False
    assert tuple(inert) == _counts(ev, t), inert.how
    return True


def _inertia(model, loss, X, y, d: float, solve: bool = True):  # noqa: ANN001, ANN202
    """``H.factor(d, 'lifted').inertia()`` after a solve (the trusted stage path); None: refused."""
    H = hessinv.Hessian(model, loss, X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if solve:
                g = torch.randn(
                    H.num_params, dtype=H.dtype, generator=torch.Generator().manual_seed(1)
                )
                try:
                    H.solve(g, d, method="lifted")
                except SingularHessianError:
                    pass
            fac = H.factor(d, method="lifted")
            return fac, fac.inertia()
        except LiftedPrecisionError:
            return None, None


def _no_riccati(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the branch after the stage Riccati pass (which certifies many small nets first)."""
    monkeypatch.setattr(LiftedFactorization, "_certified_riccati", lambda self: None)


def _mlp(
    widths: list[int], act: type[nn.Module] | None, gain: float, seed: int, bias: bool = True
) -> nn.Sequential:
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        lin = nn.Linear(a, b, bias=bias)
        nn.init.normal_(lin.weight, std=gain / a**0.5)
        mods.append(lin)
        if act is not None and i < len(widths) - 2:
            mods.append(act())
    return nn.Sequential(*mods).to(DT)


def _mse_sum(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out, target, reduction="sum")


# -- a last pivot with a multiple round-off eigenvalue --------------------------------------------


def _roundoff_case(outs: int, seed: int):  # noqa: ANN202
    """A tanh net with a Linear last layer of ``outs`` outputs: its dense ``H`` and the ``mu``
    whose damping ``-mu`` makes the last stage pivot singular (``outs`` zero eigenvalues)."""
    torch.manual_seed(seed)
    model = _mlp([4, 4, 4, outs], nn.Tanh, 1.5, seed)
    X = torch.randn(3, 4, dtype=DT)
    y = torch.randn(3, outs, dtype=DT)
    h = dense_hessian(model, _mse_sum, X, y)
    return model, X, y, h, last_stage_pivot_mu(model, _mse_sum, X, y)


@pytest.mark.parametrize("outs", [2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_last_pivot_with_a_multiple_roundoff_eigenvalue(outs: int, seed: int) -> None:
    """``Txx`` of a Linear last layer is ``(sum t t^T) (x) I_outs``: at ``d = -mu (1 + k eps)``
    its pivot has ``outs`` eigenvalues at round-off level, each a sign the LU and the
    Bunch-Kaufman factorizations may read differently (an even number of flips passes the
    parity test). A verified count must still be the dense one."""
    model, X, y, h, mu = _roundoff_case(outs, seed)
    for k in (-3, 0, 2, 13):
        d = -mu * (1 + k * EPS)
        ev, t = _ref(h, d)
        _, inert = _inertia(model, _mse_sum, X, y, d)
        if inert is not None:
            _check(inert, ev, t)


def test_forced_trust_at_a_roundoff_pivot_is_caught_by_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stage solver trusted by force (``_grade`` patched to ``"exact"``: a rare branch, a
    trusted elimination whose last pivot is singular to round-off) at ``d = -mu (1 + k eps)``.

    Its growth makes the elimination factor another matrix: Bunch-Kaufman counts off the
    dense one by one or two, some of them consistent with the pivots' own LU determinant
    (parity and ``log|det|``: the first filter passes them). The near-inverse bound must
    refuse every such count (it is far above one there), and the inertia stays right.
    """
    monkeypatch.setattr(LiftedFactorization, "_grade", lambda self, eta0, refined: "exact")
    wrong_signatures = 0
    for outs, seed in ((2, 0), (3, 1)):
        model, X, y, h, mu = _roundoff_case(outs, seed)
        for k in (-3, -1, 0, 2):
            d = -mu * (1 + k * EPS)
            ev, t = _ref(h, d)
            fac = hessinv.Hessian(model, _mse_sum, X, y).factor(d, method="lifted")
            inert = fac.inertia()
            assert inert.verified and tuple(inert) == _counts(ev, t), inert.how
            if fac.stage_solver is None:
                continue
            pos, neg, _, _ = fac.stage_solver.signature()
            dp, dn, _ = fac.system.dropped_inertia()
            if (pos + dp, neg + dn) != _counts(ev, t)[:2]:
                wrong_signatures += 1
                assert fac.near_inverse_bound() > 1.0
                assert "near inverse" not in inert.how
    assert wrong_signatures >= 1  # the attack reached the check


# -- random small nets ----------------------------------------------------------------------------


_ACTS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "linear": None}


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    width=st.integers(1, 8),
    batch=st.integers(1, 4),
    depth=st.integers(1, 8),
    outs=st.integers(1, 3),
    act=st.sampled_from(sorted(_ACTS)),
    ce=st.booleans(),
    c=st.sampled_from([1.0, 1e-12, 1e12]),
    gain=st.floats(0.5, 2.5),
    seed=st.integers(0, 10**6),
    which=st.integers(0, 3),
)
def test_random_nets_verified_counts_are_dense(
    width: int,
    batch: int,
    depth: int,
    outs: int,
    act: str,
    ce: bool,
    c: float,
    gain: float,
    seed: int,
    which: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tanh/ReLU/GELU/Linear-only MLPs, MSE or cross-entropy, every scale; dampings indefinite,
    near an eigenvalue of ``H`` (100 bands away) or next to the last pivot's singularity.
    The stage Riccati pass is switched off so that the near inverse decides more often."""
    _no_riccati(monkeypatch)
    model = _mlp([3] + [width] * (depth - 1) + [outs], _ACTS[act], gain, seed)
    if sum(p.numel() for p in model.parameters()) > 200:
        return
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(batch, 3, dtype=DT, generator=gen)
    if ce and outs > 1:
        y = torch.randint(0, outs, (batch,), generator=gen)

        def loss(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return c * nn.functional.cross_entropy(o, t)
    else:
        y = torch.randn(batch, outs, dtype=DT, generator=gen)

        def loss(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return c * nn.functional.mse_loss(o, t)

    h = dense_hessian(model, loss, X, y)
    nrm = float(torch.linalg.matrix_norm(h, 2))
    if nrm == 0.0 or float((h - h.T).abs().max()) > 64 * EPS * nrm:
        return  # no curvature, or a reference less accurate than the band (saturated softmax)
    evh = torch.linalg.eigvalsh(h)
    if which == 0:
        d = -1e-3 * c
    elif which == 1:
        d = -0.3 * nrm
    elif which == 2:
        i = seed % evh.numel()
        d = -float(evh[i]) + EDGE * h.shape[0] * EPS * nrm
    else:
        d = -last_stage_pivot_mu(model, loss, X, y) * (1 + (seed % 7 - 3) * EPS)
    ev, t = _ref(h, d)
    _, inert = _inertia(model, loss, X, y, d)
    if inert is not None:
        _check(inert, ev, t)


# -- the catalogue, split stages, scales ----------------------------------------------------------


@pytest.mark.parametrize("case", CASES[:8], ids=lambda c: c.name)
def test_catalogue_verified_counts_are_dense(case) -> None:  # noqa: ANN001
    model, loss, X, y = build(case)
    h = dense_hessian(model, loss, X, y)
    nrm = float(torch.linalg.matrix_norm(h, 2))
    for d in (-1e-3 * nrm, -0.1 * nrm):
        ev, t = _ref(h, d)
        _, inert = _inertia(model, loss, X, y, d)
        if inert is not None:
            _check(inert, ev, t)


@pytest.mark.parametrize("c", [1e-12, 1e12])
def test_catalogue_at_extreme_scales_through_the_near_inverse(
    c: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Conv, cross-entropy, softmax and LayerNorm tails at loss scale ``c`` (damping ``c d``),
    the stage Riccati pass switched off: the near inverse verifies, the counts are those of
    ``c = 1``'s dense Hessian (scale invariance)."""
    _no_riccati(monkeypatch)
    names = {"conv1d", "conv2d_ce", "softmax_tail", "layernorm", "relu_ce_sum"}
    seen = 0
    for case in [k for k in CASES if k.name in names]:
        model, loss0, X, y = build(case)
        h = dense_hessian(model, loss0, X, y)
        nrm = float(torch.linalg.matrix_norm(h, 2))

        def loss(o: torch.Tensor, t: torch.Tensor, loss0=loss0) -> torch.Tensor:  # noqa: ANN001
            return c * loss0(o, t)

        for f in (-1e-3, -0.1):
            ev, t = _ref(h, f * nrm)
            fac, inert = _inertia(model, loss, X, y, f * nrm * c)
            if inert is not None:
                seen += _check(inert, ev, t) and "near inverse" in inert.how
    assert seen >= 6


@pytest.mark.parametrize("c", [1e-12, 1.0, 1e12])
def test_split_linear_stages_near_inverse_at_every_scale(
    c: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Split Linear stages (``blockdiag(Q_11, d I)``, :mod:`hessinv.stage_split`; forced on
    small stages by lowering ``SPLIT_MIN_P``, a rare branch at this size): the free blocks'
    signs are ``d``'s. The stage Riccati pass, which certifies these definite-enough pivots
    first, is switched off (to reach the near inverse). Verified by the near inverse, counts
    equal to the dense ones."""
    import hessinv.stage_split as split_mod

    monkeypatch.setattr(split_mod, "SPLIT_MIN_P", 0)
    _no_riccati(monkeypatch)
    model = _mlp([3, 6, 6, 2], None, 1.3, 4)
    gen = torch.Generator().manual_seed(4)
    X = torch.randn(3, 3, dtype=DT, generator=gen)
    y = torch.randn(3, 2, dtype=DT, generator=gen)

    def loss(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return c * nn.functional.mse_loss(o, t)

    h = dense_hessian(model, loss, X, y)
    nrm = float(torch.linalg.matrix_norm(h, 2))
    seen = 0
    for d in (-0.05 * nrm, 0.05 * nrm, -0.5 * nrm):
        ev, t = _ref(h, d)
        fac, inert = _inertia(model, loss, X, y, d)
        assert fac.solver == "stages"
        assert any(s.basis is not None and s.basis.free for s in fac.stage_solver.stages)
        seen += _check(inert, ev, t) and "near inverse" in inert.how
    assert seen >= 2


def test_dropped_directions_tiny_batch_near_inverse() -> None:
    """Width far above batch times outputs: most directions dropped (eigenvalue ``d``)."""
    model, loss, X, y = tanh_net(12, 1, 3, 1.5, seed=5)
    h = dense_hessian(model, loss, X, y)
    for d in (-1e-3, 1e-3, -0.02):
        ev, t = _ref(h, d)
        fac, inert = _inertia(model, loss, X, y, d)
        assert fac.system.n_dropped > 0
        assert _check(inert, ev, t)


# -- near an eigenvalue of H ----------------------------------------------------------------------


@pytest.mark.parametrize("bands", [-1000.0, -100.0, 100.0, 1000.0])
def test_damping_next_to_an_eigenvalue(bands: float) -> None:
    """``d = -lambda_i + bands * t``: one eigenvalue of ``H + dI`` 100 or 1000 bands from zero."""
    model, loss, X, y = tanh_net(5, 3, 5, 1.5, seed=2)
    h = dense_hessian(model, loss, X, y)
    evh = torch.linalg.eigvalsh(h)
    nrm = float(evh.abs().max())
    for i in (3, evh.numel() // 2, evh.numel() - 4):
        d = -float(evh[i]) + bands * h.shape[0] * EPS * nrm
        ev, t = _ref(h, d)
        _, inert = _inertia(model, loss, X, y, d)
        if inert is not None:
            _check(inert, ev, t)


# -- float32 --------------------------------------------------------------------------------------


def test_float32_verified_counts() -> None:
    """The stage solver in float32: a verified count is the dense float64 one of the same
    (rounded) parameters, with float32's band (``W eps_32 ||H + dI||``, about ``2e-5`` relative
    here: eigenvalues within a factor 4 of its edge are ambiguous; the float64 reference is
    far more accurate than that)."""
    eps32 = torch.finfo(torch.float32).eps
    compared = 0
    for seed in range(3):
        model, loss, X, y = tanh_net(6, 3, 5, 1.5, seed=seed)
        model = model.float()
        X32, y32 = X.float(), y.float()
        h = dense_hessian(model.double(), loss, X32.double(), y32.double())
        model = model.float()
        for d in (0.05, -0.2, -1e-3):
            ev, t = _ref(h, d, eps32)
            _, inert = _inertia(model, loss, X32, y32, d)
            if inert is not None:
                compared += _check(inert, ev, t, edge=4.0)
    assert compared >= 3


# -- public routes --------------------------------------------------------------------------------


def test_public_routes_agree_with_dense() -> None:
    """``Hessian.inertia``, ``is_positive_definite``, ``eigenvalue_count`` and
    ``spectral_histogram`` (method ``auto``: the lifted stage path here) against ``eigvalsh``."""
    model, loss, X, y = tanh_net(6, 3, 6, 1.5, seed=7)
    h = dense_hessian(model, loss, X, y)
    evh = torch.linalg.eigvalsh(h)
    H = hessinv.Hessian(model, loss, X, y)
    inert = H.inertia(-1e-3)
    ev, t = _ref(h, -1e-3)
    assert "near inverse" in inert.how and _check(inert, ev, t)
    lo = float(evh[0])
    assert H.is_positive_definite(-lo * 1.01 + 1e-3) is True
    assert H.is_positive_definite(-lo * 0.99) is False
    edges = [float(evh[0]) * 1.5, -0.05, -1e-3, 1e-3, 0.05, float(evh[-1]) * 1.5]
    for s in edges[1:-1]:
        assert eigenvalue_count(H, s) == int((evh < s).sum())
    hist = spectral_histogram(H, edges)
    want = [int(((evh >= a) & (evh < b)).sum()) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    assert [int(n) for n in hist.counts] == want


def test_near_inverse_and_congruence_agree_on_a_deep_net() -> None:
    """The benchmarks' net, shortened: the near-inverse count is the congruence's (the path
    without a stage solver), and the dense one."""
    from hessinv.cli import make_mlp

    model, loss, X, y = make_mlp(12, 6, 3, dtype=DT, device="cpu", gain=1.2)
    H = hessinv.Hessian(model, loss, X, y)
    H.solve(torch.randn(H.num_params, dtype=DT), damping=1e-3)
    inert = H.factor(1e-3).inertia()
    assert "near inverse" in inert.how and inert.verified
    ref = LiftedFactorization(H, 1e-3, stage_solver=False).inertia()
    assert tuple(inert) == tuple(ref)
    ev, t = _ref(dense_hessian(model, loss, X, y), 1e-3)
    assert _check(inert, ev, t)


def test_probe_radius_numbers() -> None:
    """``delta = 1e-2 sqrt(pi / 2)``: a bound ``1/8`` needs ``max ||E y_i|| <= 1.57e-3``."""
    from hessinv.solvers.near_inverse import NEAR_INVERSE_LIMIT, probe_radius

    assert probe_radius(4) == pytest.approx(1e-2 * math.sqrt(math.pi / 2), rel=1e-12)
    assert NEAR_INVERSE_LIMIT * probe_radius(4) == pytest.approx(1.5667e-3, rel=1e-3)


@pytest.mark.parametrize("frac", [1e-7, -1e-7, 0.3, -0.3, 3.0, -3.0])
def test_dropped_directions_with_a_damping_in_the_band(frac: float) -> None:
    """``d = frac * t``: the dropped directions' eigenvalue ``d`` is a zero when ``|d| <= t``
    (it is outside what the stage solve and its estimates see), a sign of ``d`` otherwise."""
    model, loss, X, y = tanh_net(8, 2, 4, 1.5, seed=1)
    h = dense_hessian(model, loss, X, y)
    t0 = h.shape[0] * EPS * float(torch.linalg.matrix_norm(h, 2))
    ev, t = _ref(h, frac * t0)
    _, inert = _inertia(model, loss, X, y, frac * t0)
    assert inert is not None and inert.verified
    assert tuple(inert) == _counts(ev, t)


@pytest.mark.parametrize("seed", [0, 3])
def test_positive_definite_next_to_the_smallest_eigenvalue(seed: int) -> None:
    """``d = -lambda_min + k t``: ``is_positive_definite`` is True only above the band (and
    not None far from it), False below it."""
    model, loss, X, y = tanh_net(5, 3, 5 + seed % 3, 1.5 + 0.3 * seed, seed=seed)
    h = dense_hessian(model, loss, X, y)
    evh = torch.linalg.eigvalsh(h)
    t0 = h.shape[0] * EPS * float(evh.abs().max())
    H = hessinv.Hessian(model, loss, X, y)
    for k in (-1000.0, -100.0, -0.5, 0.0, 0.5, 100.0, 1000.0):
        d = -float(evh[0]) + k * t0
        ev, t = _ref(h, d)
        pd = H.is_positive_definite(d)
        truth = bool((ev > t).all())
        if abs(k) >= 100:
            assert pd is truth
        else:  # in the band: a zero, so not positive definite (or undecided)
            assert pd is not True
