"""The Cholesky stage pass (backward Riccati recursion) against dense references.

Reference: ``torch.func.hessian`` of the loss as a function of the flat
parameters (tests/cases.py, tests/test_pipeline.py), then
``torch.linalg.eigvalsh / slogdet / solve``. Nothing is shared with the code
under test but the stage blocks it is given.
"""

from __future__ import annotations

import math

import pytest
import torch
from cases import CASES, DT, build, reference_loss_fn
from hypothesis import HealthCheck, given, settings
from test_pipeline import pipelines, reference

import hessinv
from hessinv.derivatives import StageBlocks
from hessinv.riccati import riccati_pass

CASE = {c.name: c for c in CASES}
NAMES = [  # tanh, relu, softplus MLPs, LayerNorm, conv nets, depth, one stage
    "tanh_mse_mean",
    "relu_ce_sum",
    "silu_softplus_bce",
    "layernorm",
    "conv1d",
    "conv2d_ce",
    "deep_narrow",
    "single_stage",
    "sigmoid_mse_sum_n1",
]


def _dense_case(name):
    model, lf, X, y = build(CASE[name])
    H = hessinv.Hessian(model, lf, X, y)
    f, x0 = reference_loss_fn(model, lf, X, y)
    return H.blocks, torch.func.hessian(f)(x0)


def _dampings(ev):
    """PD, barely PD, barely indefinite, and shifts into two spectral gaps."""
    lmin, scale = float(ev[0]), float(ev.abs().max())
    out = {"pd": abs(lmin) + 0.1 * scale}
    if lmin < -1e-8 * scale:
        out["barely_pd"] = -lmin * (1 + 1e-6)  # lambda_min(H + dI) = 1e-6 |lambda_min(H)|
        out["barely_indefinite"] = -lmin * (1 - 1e-6)
    gaps = ev[1:] - ev[:-1]
    for i, j in enumerate(torch.topk(gaps, min(2, len(gaps))).indices.tolist()):
        out[f"gap{i}"] = -0.5 * float(ev[j] + ev[j + 1])
    return out


def _check_against_dense(blocks, Hd, d, *, expect_decided):
    """Every claim of both modes agrees with the dense reference; returns reliability."""
    W = Hd.shape[0]
    A = Hd + d * torch.eye(W, dtype=DT)
    ev = torch.linalg.eigvalsh(A)
    ref_err = 64 * W * torch.finfo(DT).eps * float(ev.abs().max())  # the reference's own
    pos, neg = int((ev > ref_err).sum()), int((ev < -ref_err).sum())
    reliable = []
    for mode in ("cholesky", "inertia"):
        r = riccati_pass(blocks, d, mode=mode)
        if r.positive_definite:
            assert float(ev[0]) > 0, (mode, d, float(ev[0]))
        if r.pd_status is False:
            assert float(ev[0]) < 0, (mode, d, float(ev[0]))
        if expect_decided:  # separated by 1e-6 relative: the bound must decide
            assert r.pd_status is (float(ev[0]) > 0), (mode, d, r.margins)
        if r.reliable:
            assert r.inertia == (pos, neg, W - pos - neg) == (pos, neg, 0), (mode, d)
            s_ref, la_ref = torch.linalg.slogdet(A)
            cond = float(ev.abs().max() / ev.abs().min())
            assert r.logdet[0] == float(s_ref)
            assert abs(r.logdet[1] - float(la_ref)) <= 1e-13 * W * cond * max(1, abs(la_ref))
        reliable.append(r.reliable)
        if r.positive_definite:
            g = torch.randn(W, 3, dtype=DT, generator=torch.Generator().manual_seed(1))
            x = r.solve(g)
            xd = torch.linalg.solve(A, g)
            res = float(torch.linalg.norm(A @ x - g) / torch.linalg.norm(g))
            res_d = float(torch.linalg.norm(A @ xd - g) / torch.linalg.norm(g))
            assert res <= 100 * max(res_d, 1e-16), (mode, d, res, res_d)
            x0 = r.solve(g[:, 0])  # a single vector
            assert x0.shape == (W,)
            res0 = float(torch.linalg.norm(A @ x0 - g[:, 0]) / torch.linalg.norm(g[:, 0]))
            assert res0 <= 100 * max(res_d, 1e-16)
    return reliable


@pytest.mark.parametrize("name", NAMES)
def test_catalogue_against_dense(name):
    blocks, Hd = _dense_case(name)
    ev = torch.linalg.eigvalsh(Hd)
    n_reliable = 0
    for key, d in _dampings(ev).items():
        rel = _check_against_dense(blocks, Hd, d, expect_decided=not key.startswith("gap"))
        n_reliable += sum(rel)
        if key in ("pd", "barely_pd"):
            assert all(rel), (key, d)
    assert n_reliable >= 2


def test_singular_damping_is_never_certified():
    """``d = -lambda_i(H)``: ``H + dI`` singular up to the reference's rounding."""
    for name in ("tanh_mse_mean", "conv1d", "layernorm"):
        blocks, Hd = _dense_case(name)
        ev = torch.linalg.eigvalsh(Hd)
        for i in (0, len(ev) // 2):
            d = -float(ev[i])
            for mode in ("cholesky", "inertia"):
                r = riccati_pass(blocks, d, mode=mode)
                assert not r.positive_definite
                assert not r.reliable, (name, i, mode, r.margins)


def test_dropped_directions_need_positive_damping():
    blocks, Hd = _dense_case("single_stage")  # W = 8, rank 4: exact null directions
    assert riccati_pass(blocks, 0.0).pd_status is False
    assert riccati_pass(blocks, -1e-3).pd_status is False
    r = riccati_pass(blocks, 0.0, mode="inertia")
    assert r.inertia == (4, 0, 4) and r.logdet == (0.0, -math.inf)
    assert riccati_pass(blocks, 1e-3).pd_status is True


def _scaled(blocks, c, dtype=DT):
    def f(t, s=1.0):
        return None if t is None else (t * s).to(dtype)

    return [
        StageBlocks(
            Jz=f(b.Jz),
            Jx=f(b.Jx),
            Tzz=f(b.Tzz, c),
            Tzx=f(b.Tzx, c),
            Txx=f(b.Txx, c),
            grad_x=f(b.grad_x, c),
            cot_in=None,
            x_span=f(b.x_span),
        )
        for b in blocks
    ]


@pytest.mark.parametrize("name", ["tanh_mse_mean", "layernorm", "conv2d_ce", "deep_narrow"])
def test_scale_invariance(name):
    """Loss times c at damping c d: the same decisions, logdet + W log c, x / c."""
    blocks, Hd = _dense_case(name)
    W = Hd.shape[0]
    g = torch.randn(W, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    ev = torch.linalg.eigvalsh(Hd)
    for d in _dampings(ev).values():
        cond = float((ev + d).abs().max() / (ev + d).abs().min())
        for mode in ("cholesky", "inertia"):
            r = riccati_pass(blocks, d, mode=mode)
            for c in (1e-12, 1e12, 3.7):
                rc = riccati_pass(_scaled(blocks, c), c * d, mode=mode)
                assert (rc.pd_status, rc.failed_stage, rc.reliable, rc.inertia) == (
                    r.pd_status,
                    r.failed_stage,
                    r.reliable,
                    r.inertia,
                )
                if r.logdet is not None and r.reliable:
                    assert rc.logdet[0] == r.logdet[0]
                    assert abs(rc.logdet[1] - W * math.log(c) - r.logdet[1]) <= 1e-10 * W
                if r.positive_definite:
                    x, xc = r.solve(g), rc.solve(g)
                    diff = float(torch.linalg.norm(c * xc - x) / torch.linalg.norm(x))
                    assert diff <= 100 * W * torch.finfo(DT).eps * cond


@pytest.mark.parametrize("name", ["tanh_mse_mean", "gelu_ce_uneven_n16", "conv1d", "deep_narrow"])
def test_error_bound_holds_in_float32(name):
    """Each pivot computed in float32 is within its bound e_l of the float64 one (Weyl)."""
    blocks, Hd = _dense_case(name)
    bases = [hessinv.lifted._basis(b) for b in blocks]
    b32 = [None if q is None else q.float() for q in bases]
    ev = torch.linalg.eigvalsh(Hd)
    checked = 0
    for d in _dampings(ev).values():
        r64 = riccati_pass(blocks, d, bases=bases, mode="inertia")
        r32 = riccati_pass(_scaled(blocks, 1.0, torch.float32), d, bases=b32, mode="inertia")
        for l in reversed(range(len(blocks))):  # noqa: E741 - elimination order
            e64, e32 = r64.pivot_eigvals[l], r32.pivot_eigvals[l]
            if e32 is None or not math.isfinite(r32.errors[l]):
                break
            err = float((e64 - e32.double()).abs().max())
            assert err <= r32.errors[l], (l, d, err, r32.errors[l])
            checked += 1
            if not r32.margins[l] > 2:  # bound not claimed beyond an unseparated pivot
                break
    assert checked >= 4


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pipelines())
def test_random_pipelines(case):
    """Functional pipelines (``Txx != 0``): claims agree with the dense reference."""
    stages, z0, _ = case
    H = hessinv.Hessian.from_stages(stages, z0)
    f, x0 = reference(stages, z0)
    Hd = torch.func.hessian(f)(x0)
    ev = torch.linalg.eigvalsh(Hd)
    if float(ev.abs().max()) == 0:
        return
    for key, d in _dampings(ev).items():
        if key == "pd":
            _check_against_dense(H.blocks, Hd, d, expect_decided=True)
        else:
            _check_against_dense(H.blocks, Hd, d, expect_decided=False)


def test_bad_input():
    blocks, Hd = _dense_case("tanh_mse_mean")
    with pytest.raises(ValueError, match="mode"):
        riccati_pass(blocks, 1.0, mode="lu")
    with pytest.raises(ValueError, match="finite"):
        riccati_pass(blocks, float("nan"))
    with pytest.raises(TypeError, match="damping"):
        riccati_pass(blocks, "1")
    with pytest.raises(ValueError, match="bases"):
        riccati_pass(blocks, 1.0, bases=[None])
    with pytest.raises(ValueError, match="non-empty"):
        riccati_pass([], 1.0)
    r = riccati_pass(blocks, 0.0)
    assert not r.positive_definite
    with pytest.raises(hessinv.SingularHessianError, match="not proven positive definite"):
        r.solve(torch.zeros(Hd.shape[0], dtype=DT))
    r = riccati_pass(blocks, 10.0)
    with pytest.raises(ValueError, match="rows"):
        r.solve(torch.zeros(Hd.shape[0] + 1, dtype=DT))


@pytest.mark.parametrize("name", ["tanh_mse_mean", "layernorm", "conv1d"])
def test_stop_unreliable_keeps_only_certified_counts(name):
    """``stop_unreliable``: the same verdict as the full pass, a count only when certified."""
    blocks, Hd = _dense_case(name)
    ev = torch.linalg.eigvalsh(Hd)
    dampings = [*_dampings(ev).values(), -float(ev[len(ev) // 2])]  # the last: singular
    seen = set()
    for d in dampings:
        full = riccati_pass(blocks, d, mode="inertia")
        short = riccati_pass(blocks, d, mode="inertia", stop_unreliable=True)
        assert short.reliable == full.reliable, (name, d)
        assert short.inertia == (full.inertia if full.reliable else None), (name, d)
        seen.add(full.reliable)
    assert seen == {True, False}  # both branches exercised


def test_factorization_inertia_route():
    """Certified Riccati pass: its count alone; otherwise two congruences of ``K``; both exact."""
    model, lf, X, y = build(CASE["tanh_mse_mean"])
    H = hessinv.Hessian(model, lf, X, y)
    f, x0 = reference_loss_fn(model, lf, X, y)
    ev = torch.linalg.eigvalsh(torch.func.hessian(f)(x0))
    W = len(ev)
    assert float(ev[0]) < 0  # indefinite: a gap shift has a mixed count
    j = int(torch.argmax(ev[1:] - ev[:-1]))
    for d, route in (
        (abs(float(ev[0])) + 0.1 * float(ev.abs().max()), "stage Riccati pass: a block LDL^T"),
        (-float(ev[len(ev) // 2]) + 1e-9 * float(ev.abs().max()), "two congruences"),
        (-0.5 * float(ev[j] + ev[j + 1]), None),
    ):
        neg = int((ev + d < 0).sum())
        inert = H.inertia(d)
        assert tuple(inert) == (W - neg, neg, 0), (d, tuple(inert))
        assert inert.verified
        if route is not None:
            assert route in inert.how, (d, inert.how)
