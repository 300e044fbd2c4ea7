"""Adversarial tests of commit 57726c6: the kept split, the block Lanczos rewrite, float32 starts.

1. **Kept split** (:func:`hessinv.riccati_solve.kept_split_rows`): a Linear
   stage whose kept basis is a :class:`~hessinv.derivatives.kron_basis.KronBasis`
   ``Q = [I_a (x) Q_T, Q_B (x) Q_C]`` has its pivot factored on ``a r_z`` rows
   only; the other kept rows get the pivot ``d I`` (zeros of ``Jx Q`` and
   ``Q^T Txx Q`` imposed). Attacked with non-elementwise tails (Softmax,
   LayerNorm with and without affine, a frozen Linear in the tail: the dense
   projection route), Linear without bias, width changes, cross-entropy,
   batch 1 and 2, positive, negative and small dampings, loss scales
   ``1e-9 .. 1e9``, ``data=`` batches and the Newton optimizer's lifted route.
   Every case asserts that the changed code runs (a stage with ``free > 0``
   and ``basis is None``) and that the zeros it imposes hold on the *dense*
   blocks (``b.Jx``, ``b.Txx`` times ``Q``), then compares with independent
   dense references (``torch.func.hessian`` of the flat-parameter loss,
   ``torch.linalg.eigvalsh/slogdet/solve``).
2. **Block Lanczos** (:func:`hessinv.solvers.estimates.block_lanczos_steps`):
   Ritz values inside the spectrum (``H = cI``, ``H = 0``, two eigenvalues,
   rank one, ``W`` below the block size, ``k > W``, float32, scales ``1e+-300``),
   exact extremes once ``k >= W``, and ``(-inf, inf)`` for a NaN or inf in any
   product block (also one that only overflows on the cast to float32).
3. **Random starts in float32** (:func:`hessinv.solvers.estimates.gaussian`):
   the same numbers in every dtype.

The defects found (the comments marked "Fixed" above their tests): the kept
split's ``P`` update at extreme loss scales (``Tzx_2 Tzx_2^T`` at the square of
the scale; now ``sign(d) t t^T`` with ``t = Tzx_2 / sqrt|d|``), the block
Lanczos stopping at a rank-deficient block (now fresh directions), the
inverse iteration's unscaled norm (now :func:`~hessinv.solvers.estimates.
column_norms`) and a non-contiguous float32 start.
"""

from __future__ import annotations

import math

import pytest
import torch
from cases import assert_kept_elimination, dense_hessian, kept_matrix
from torch import nn

import hessinv
import hessinv.riccati_fused as fused_mod
from hessinv.riccati_solve import StageRiccati, kept_split_rows
from hessinv.solvers.estimates import (
    block_lanczos_steps,
    drive,
    gaussian,
    smallest_singular_value,
    spectral_bounds,
)

DT = torch.float64
EPS = torch.finfo(DT).eps
CPU = torch.device("cpu")


# -- 1. the kept split ------------------------------------------------------------------------


@pytest.fixture(params=["fused", "blocks"])
def update_form(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both forms of a stage's update (:mod:`hessinv.riccati_fused`, and block by block)."""
    if request.param == "blocks":
        monkeypatch.setattr(fused_mod, "FUSE_MAX", -1)
    return request.param


def _frozen(lin: nn.Linear) -> nn.Linear:
    for p in lin.parameters():
        p.requires_grad_(False)
    return lin


def _model(kind: str) -> tuple[nn.Module, int, int]:
    """``(model, d_in, d_out)``: a pipeline with a Linear stage of a Kronecker kept basis."""
    w = 6
    if kind == "softmax":
        mods = [nn.Linear(w, w), nn.Softmax(dim=1), nn.Linear(w, w), nn.Softmax(dim=1)]
        return nn.Sequential(*mods, nn.Linear(w, 3)), w, 3
    if kind == "layernorm":  # non-diagonal tail Jacobian: the dense projection route
        mods = [nn.Linear(w, w), nn.LayerNorm(w, elementwise_affine=False), nn.Tanh()]
        return nn.Sequential(*mods, nn.Linear(w, w), nn.Tanh(), nn.Linear(w, 3)), w, 3
    if kind == "layernorm_affine":  # LayerNorm's own stage between two Linear stages
        mods = [nn.Linear(w, w), nn.LayerNorm(w), nn.Linear(w, w), nn.Tanh()]
        return nn.Sequential(*mods, nn.Linear(w, 3)), w, 3
    if kind == "frozen_tail":  # a frozen Linear inside the tail: dense Jacobian, dense Txx
        mods = [nn.Linear(w, w), nn.Tanh(), _frozen(nn.Linear(w, 5)), nn.Tanh()]
        return nn.Sequential(*mods, nn.Linear(5, w), nn.Sigmoid(), nn.Linear(w, 3)), w, 3
    if kind == "nobias_widths":
        mods = [nn.Linear(4, 9, bias=False), nn.Tanh(), nn.Linear(9, 3, bias=False), nn.GELU()]
        return nn.Sequential(*mods, nn.Linear(3, 8), nn.Sigmoid(), nn.Linear(8, 2)), 4, 2
    if kind == "relu_ce":
        mods = [nn.Linear(w, w), nn.ReLU(), nn.Linear(w, w), nn.Tanh(), nn.Linear(w, 4)]
        return nn.Sequential(*mods), w, 4
    raise AssertionError(kind)


def _data(kind: str, batch: int, seed: int):  # noqa: ANN202
    torch.manual_seed(seed)
    model, d_in, d_out = _model(kind)
    model = model.to(DT)
    X = torch.randn(batch, d_in, dtype=DT)
    if kind == "relu_ce":
        return model, X, torch.randint(0, d_out, (batch,)), nn.CrossEntropyLoss()
    return model, X, torch.randn(batch, d_out, dtype=DT), nn.MSELoss()


def _kept_split_stages(H, f) -> list[int]:  # noqa: ANN001
    """Stages the commit's new code eliminates: ``free > 0`` on a Kronecker kept basis."""
    st = f.stage_solver
    assert st is not None, "the stage solver does not serve: the kept split is not exercised"
    out = []
    for l, (s, pr, b) in enumerate(zip(st.stages, f.system.projections, H.blocks, strict=True)):  # noqa: E741
        if s.free and s.basis is None:
            assert pr.kron is not None
            k = pr.k(b.num_params)
            assert kept_split_rows(pr, k) == s.r and s.r + s.free == k
            out.append(l)
    assert out, "no stage with a split Kronecker kept basis"
    return out


def _assert_imposed_zeros(H, f, stages: list[int]) -> None:  # noqa: ANN001
    """The zeros the split imposes hold on the *dense* blocks: ``Jx Q``, ``Q^T Txx Q``."""
    for l in stages:  # noqa: E741
        b, pr, s = H.blocks[l], f.system.projections[l], f.stage_solver.stages[l]
        q = pr.kron.dense()
        p = b.num_params
        if b.Jx is not None:
            jq = b.Jx.reshape(-1, p) @ q
            assert float(jq[:, s.r :].abs().max()) <= 64 * EPS * float(jq.abs().max())
        t = b.Txx.reshape(p, p) if b.Txx is not None else None
        if t is not None and float(t.abs().max()) > 0:
            tq = q.T @ t @ q
            assert float(tq[s.r :].abs().max()) <= 64 * EPS * float(tq.abs().max())


def _compare_dense(f, h: torch.Tensor, d: float, seed: int) -> None:  # noqa: ANN001
    """``f`` (a factorization of ``H + dI``) against the dense ``h + dI``."""
    a = h + d * torch.eye(h.shape[0], dtype=DT)
    ev = torch.linalg.eigvalsh(a)
    ref_err = h.shape[0] * EPS * float(ev.abs().max())  # the reference's own error
    assert float(ev.abs().min()) > 1e3 * ref_err, "case too close to singular to judge"
    g = torch.randn(h.shape[0], 2, dtype=DT, generator=torch.Generator().manual_seed(seed))
    x = f.solve(g)
    xr = torch.linalg.solve(a, g)
    cond = float(ev.abs().max() / ev.abs().min())
    assert float((x - xr).norm() / xr.norm()) <= 1e3 * cond * EPS
    inert = f.inertia()
    assert tuple(inert)[:3] == (int((ev > 0).sum()), int((ev < 0).sum()), 0)
    sign, logabs = f.logdet()
    rs, rla = torch.linalg.slogdet(a)
    assert sign == float(rs)
    assert abs(logabs - float(rla)) <= 1e-10 * max(1.0, abs(float(rla)))
    assert f.is_positive_definite() == bool(ev[0] > 0)


def _check_stage_elimination(f, H, h: torch.Tensor, d: float) -> None:  # noqa: ANN001
    """The unrefined stage elimination, signature and LU determinant on the kept matrix."""
    kept, sizes = kept_matrix(f.system.projections, H.blocks, h, d)
    b = torch.randn(kept.shape[0], 3, dtype=DT, generator=torch.Generator().manual_seed(7))
    assert_kept_elimination(f.stage_solver, kept, sizes, b)


KINDS = ["softmax", "layernorm", "layernorm_affine", "frozen_tail", "nobias_widths", "relu_ce"]
#: (relative damping: negative is indefinite, loss scale)
SHIFTS = [(1e-3, 1.0), (-0.05, 1.0), (0.3, 1e9), (-0.01, 1e-9)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shift", SHIFTS, ids=[str(s) for s in SHIFTS])
def test_kept_split_tails_against_dense(
    kind: str, shift: tuple[float, float], update_form: str
) -> None:
    """Non-elementwise tails, no bias, width changes, CE, frozen tail: the split is exact."""
    rel_d, scale = shift
    model, X, y, loss0 = _data(kind, batch=1 if kind in ("layernorm", "frozen_tail") else 2, seed=3)

    def loss(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return scale * loss0(o, t)

    loss.reduction = loss0.reduction  # type: ignore[attr-defined]
    h = dense_hessian(model, loss, X, y)
    d = rel_d * float(torch.linalg.matrix_norm(h, 2))
    H = hessinv.Hessian(model, loss, X, y)
    f = H.factor(d, method="lifted")
    stages = _kept_split_stages(H, f)
    _assert_imposed_zeros(H, f, stages)
    _check_stage_elimination(f, H, h, d)
    _compare_dense(f, h, d, seed=1)
    assert f.solver == "stages"  # the solves went through the split elimination


def test_kept_split_data_batches(update_form: str) -> None:
    """``data=`` (two batches of one sample): the stacked operator's split is exact."""
    model, X, y, loss = _data("softmax", batch=2, seed=5)
    h = dense_hessian(model, loss, X, y)
    d = -0.02 * float(torch.linalg.matrix_norm(h, 2))
    H = hessinv.Hessian(model, loss, data=[(X[:1], y[:1]), (X[1:], y[1:])])
    f = H.factor(d, method="lifted")
    _compare_dense(f, h, d, seed=2)
    # the stacked operator behind the factorization
    op = f.op
    _kept_split_stages(op, f)


def test_kept_split_free_count_sign_follows_damping(update_form: str) -> None:
    """The free rows' eigenvalue is ``d``: the count moves wholesale with the damping's sign."""
    model, X, y, loss = _data("softmax", batch=1, seed=11)
    h = dense_hessian(model, loss, X, y)
    nrm = float(torch.linalg.matrix_norm(h, 2))
    H = hessinv.Hessian(model, loss, X, y)
    for d in (1e-4 * nrm, -1e-4 * nrm):
        f = H.factor(d, method="lifted")
        free = sum(s.free for s in f.stage_solver.stages if s.basis is None)
        assert free > 0
        ev = torch.linalg.eigvalsh(h + d * torch.eye(h.shape[0], dtype=DT))
        assert tuple(f.inertia())[:3] == (int((ev > 0).sum()), int((ev < 0).sum()), 0)
        sign, la = f.logdet()
        rs, rla = torch.linalg.slogdet(h + d * torch.eye(h.shape[0], dtype=DT))
        assert sign == float(rs) and abs(la - float(rla)) <= 1e-9 * abs(float(rla))


def test_kept_split_float32(update_form: str) -> None:
    """A float32 operator: the split runs in float32 and meets float32's accuracy."""
    model, X, y, loss = _data("softmax", batch=2, seed=17)
    h = dense_hessian(model, loss, X, y)
    d = -0.05 * float(torch.linalg.matrix_norm(h, 2))
    m32 = model.to(torch.float32)
    H = hessinv.Hessian(m32, loss, X.float(), y.float())
    f = H.factor(d, method="lifted")
    _kept_split_stages(H, f)
    assert f.solver == "stages" and f.stage_solver.stages[-1].qvv.dtype == torch.float32
    a = h + d * torch.eye(h.shape[0], dtype=DT)
    ev = torch.linalg.eigvalsh(a)
    cond = float(ev.abs().max() / ev.abs().min())
    g = torch.randn(h.shape[0], dtype=DT, generator=torch.Generator().manual_seed(4))
    x = f.solve(g.float()).to(DT)
    xr = torch.linalg.solve(a, g)
    # float32 weights and data: the operator itself is h to about 1e-7 relative
    assert float((x - xr).norm() / xr.norm()) <= 1e2 * cond * torch.finfo(torch.float32).eps
    assert tuple(f.inertia())[:3] == (int((ev > 0).sum()), int((ev < 0).sum()), 0)
    sign, la = f.logdet()
    rs, rla = torch.linalg.slogdet(a)
    assert sign == float(rs) and abs(la - float(rla)) <= 1e-4 * abs(float(rla))


def test_newton_lifted_step_is_an_exact_shifted_newton_step(update_form: str) -> None:
    """The optimizer's lifted route on a kept-split model: ``(H + lam I) s = -g`` exactly."""
    model, X, y, loss = _data("softmax", batch=2, seed=13)
    h = dense_hessian(model, loss, X, y)
    H = hessinv.Hessian(model, loss, X, y)
    nrm = float(torch.linalg.matrix_norm(h, 2))
    f = H.factor(1e-3 * nrm, method="lifted")
    _kept_split_stages(H, f)  # the optimizer's shifts are of this structure
    x0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    g = H.gradient()
    opt = hessinv.optim.Newton(
        model, loss, strategy="levenberg-marquardt", curvature="hessian", factorization="lifted"
    )
    opt.step(X, y)
    info = opt.history[-1]
    assert info.accepted and info.certified
    s = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - x0
    hs_g = h @ s + g
    lam = -float(s @ hs_g) / float(s @ s)  # the shift s is exact for, if any
    res = hs_g + lam * s
    assert float(res.norm()) <= 1e-10 * float(g.norm())
    assert lam + float(torch.linalg.eigvalsh(h)[0]) > 0  # certified: H + lam I is definite


# -- 2. block Lanczos -------------------------------------------------------------------------


def _sym(w: int, ev: torch.Tensor, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(w, w, dtype=DT, generator=g))
    return ((q * ev) @ q.T).to(dtype)


def _spectrum(kind: str, w: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(w)
    if kind == "random":
        return torch.randn(w, dtype=DT, generator=g)
    if kind == "cI":
        return torch.full((w,), 3.0, dtype=DT)
    if kind == "zero":
        return torch.zeros(w, dtype=DT)
    if kind == "two":
        return torch.tensor([1.0, -2.0], dtype=DT).repeat(w)[:w]
    ev = torch.zeros(w, dtype=DT)  # rank one
    ev[-1] = -5.0
    return ev


@pytest.mark.parametrize("kind", ["random", "cI", "zero", "two", "rank1"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("scale", [1.0, 1e-300, 1e300, 1e-30, 1e30])
def test_block_lanczos_ritz_values_inside_the_spectrum(kind, dtype, scale) -> None:  # noqa: ANN001
    """Ritz values never leave ``[lambda_min, lambda_max]`` (they bound ``||H||`` from below)."""
    if dtype == torch.float32 and abs(math.log10(scale)) > 30:
        pytest.skip("outside float32's range")
    eps = torch.finfo(dtype).eps
    for w in (1, 2, 3, 5, 9):
        a = _sym(w, _spectrum(kind, w) * scale, dtype)
        lam = torch.linalg.eigvalsh(a.to(DT))  # of the stored matrix
        tol = 8 * w * eps * float(lam.abs().max())
        for k in (1, 3, 16, 100):
            for block in (2, 4, 8):
                lo, hi = spectral_bounds(lambda v, a=a: a @ v, w, dtype, CPU, steps=k, block=block)
                assert math.isfinite(lo) and math.isfinite(hi)
                assert float(lam[0]) - tol <= lo <= hi <= float(lam[-1]) + tol
                if k >= w and kind != "rank1":  # the whole space: the extremes themselves
                    assert abs(lo - float(lam[0])) <= tol and abs(hi - float(lam[-1])) <= tol
                if kind == "cI":
                    assert lo == hi or abs(hi - lo) <= tol


@pytest.mark.parametrize("call", [0, 1, 2, 3])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_block_lanczos_non_finite_product(call: int, bad: float) -> None:
    """A NaN or inf in any product block (any position) gives ``(-inf, inf)``, never a number."""
    w = 20
    a = _sym(w, torch.randn(w, dtype=DT, generator=torch.Generator().manual_seed(1)), DT)
    calls = [0]

    def mm(v: torch.Tensor) -> torch.Tensor:
        out = a @ v
        if calls[0] == call:
            out = out.clone()
            out[(7 * call + 3) % w, -1] = bad
        calls[0] += 1
        return out

    assert drive(block_lanczos_steps(w, DT, CPU), mm) == (-math.inf, math.inf)


def test_block_lanczos_product_overflowing_the_working_dtype() -> None:
    """A float64 product beyond float32's range, stored in the float32 basis: refused as inf."""
    w = 12
    a = _sym(w, torch.randn(w, dtype=DT) * 1e39, DT)
    got = spectral_bounds(lambda v: a @ v.to(DT), w, torch.float32, CPU)
    assert got == (-math.inf, math.inf)


def test_block_lanczos_invariant_start() -> None:
    """``H`` with two eigenvalues: the block Krylov space is invariant after one step."""
    w = 40
    a = _sym(w, torch.tensor([2.0, -7.0], dtype=DT).repeat(w // 2), DT)
    lo, hi = spectral_bounds(lambda v: a @ v, w, DT, CPU, steps=16, block=4)
    assert abs(lo + 7.0) <= 1e-12 and abs(hi - 2.0) <= 1e-12


# -- 3. float32 random starts -----------------------------------------------------------------


def test_gaussian_is_the_same_in_every_dtype() -> None:
    """The starts and probes do not depend on the working dtype (float32 draws, widened)."""
    for size, cols, seed in ((1, 1, 0), (7, 4, 3), (1000, 2, 2)):
        a = gaussian(size, cols, torch.float64, CPU, seed)
        b = gaussian(size, cols, torch.float32, CPU, seed)
        assert a.shape == (size, cols) and a.is_contiguous()
        assert torch.equal(a, b.to(DT))
        assert bool(torch.isfinite(a).all()) and float(a.abs().max()) > 0
    # the contract's four seeds (Lanczos 0, inverse iteration 1, trial 2, probes 3) differ
    starts = [gaussian(50, 1, DT, CPU, s)[:, 0] for s in range(4)]
    for i in range(4):
        for j in range(i):
            c = float(starts[i] @ starts[j]) / float(starts[i].norm() * starts[j].norm())
            assert abs(c) < 0.9


# -- the inverse iteration's norm: a finite vector whose norm overflows ------------------------


# Fixed (was a strict xfail):
#   inverse_iteration_steps takes torch.linalg.vector_norm(z) = inf for a finite z with entries
#   ~1e160 (the 2-norm is not scaled: squares overflow) as 'non-finite' and returns 0.0:
#   sigma_min of a well-conditioned A = 1e-160 * (I + ...) (true ~1e-160) is estimated as 0.0,
#   below the truth, though the function promises an estimate from above
def test_smallest_singular_value_tiny_scale() -> None:
    w = 20
    a = _sym(w, (1.0 + torch.rand(w, dtype=DT, generator=torch.Generator().manual_seed(0)))
             * 1e-160, DT)  # fmt: skip
    ai = torch.linalg.inv(a)
    true = float(torch.linalg.svdvals(a)[-1])
    est = smallest_singular_value(lambda v: ai @ v, w, DT, CPU)
    assert est >= true * (1 - 1e-8)


# Fixed (was a strict xfail):
#   Factorization.sigma_min_estimate() is 0.0 at loss scale 1e-160 (float64; 1e-22 in float32)
#   for a well-conditioned H + dI (true sigma_min ~ 2.6e-162): the norm of A^{-1} y overflows in
#   inverse_iteration_steps; at scale 1e-140 it is right (2.63e-142). Scale invariance is
#   broken; zero_count() stays right (Sylvester fallback), and the lifted factorization drops
#   its stage solver (solver 'lu' instead of 'stages')
@pytest.mark.parametrize("method", ["dense", "lifted"])
def test_sigma_min_estimate_scale_invariant(method: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    X, y = torch.randn(2, 6, dtype=DT), torch.randn(2, 3, dtype=DT)
    mse = nn.MSELoss()
    ests = []
    for scale in (1.0, 1e-160):

        def loss(o: torch.Tensor, t: torch.Tensor, scale: float = scale) -> torch.Tensor:
            return scale * mse(o, t)

        loss.reduction = "mean"  # type: ignore[attr-defined]
        H = hessinv.Hessian(model, loss, X, y)
        h = dense_hessian(model, loss, X, y) / scale
        d = 0.5 * float(torch.linalg.matrix_norm(h, 2))
        true = float(torch.linalg.eigvalsh(h + d * torch.eye(h.shape[0], dtype=DT)).abs().min())
        f = H.factor(d * scale, method=method)
        ests.append(f.sigma_min_estimate() / scale)
        assert ests[-1] >= true * (1 - 1e-6)
    assert abs(ests[1] - ests[0]) <= 1e-6 * ests[0]


# -- block Lanczos stops at the first rank-deficient block as if it were invariant ------------


# Fixed (was a strict xfail):
#   block_lanczos_steps breaks as soon as ONE diagonal entry of the new block's R is tiny
#   ('(nearly) invariant'), but a rank-deficient block is not an invariant subspace: for H = T
#   T^T (W = 201, T of rank 1, 2, 3 < block 4) it stops after the random first block: theta_max
#   = 0.41, 4.88, 5.55 for lambda_max = 224.2, 195.8, 224.8 (plain Lanczos, block=1, is exact).
#   Not new in 57726c6 (the old concatenating code has the same break: 4.44 for 404.06 on 2 t
#   t^T)
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_block_lanczos_low_rank_operator(rank: int) -> None:
    w = 201
    g = torch.Generator().manual_seed(rank)
    t = torch.randn(w, rank, dtype=DT, generator=g)
    a = t @ t.T  # rank < block: every block product has rank <= rank
    lam_max = float(torch.linalg.eigvalsh(a)[-1])
    lo, hi = spectral_bounds(lambda v: a @ v, w, DT, CPU)  # 16 columns in blocks of 4
    # the block Krylov space is span{Q_1} + range(A): exact after two blocks
    assert hi >= 0.999 * lam_max


def _interpolating_mlp(seed: int, n: int):  # noqa: ANN202
    """An MLP at a zero-residual point (the end of Newton training): ``H = J^T J``, rank ``n``."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    model = model.to(DT)
    X = torch.randn(n, 8, dtype=DT)
    with torch.no_grad():
        y = model(X).clone()
    return model, X, y, nn.MSELoss()


# Fixed (was a strict xfail):
#   H.spectral_bounds() ('16 Lanczos steps', the ||H|| behind every norm(), data_norm(),
#   zero_threshold() and backward error) is 0.28 for ||H|| = 6.32 on an 8-8-1 tanh MLP at a
#   zero-residual point with N = 1 (rank-1 H): the block Lanczos stops after its first block
#   (rank-deficient product taken as invariant)
def test_spectral_bounds_of_a_low_rank_hessian() -> None:
    model, X, y, loss = _interpolating_mlp(0, 1)
    h = dense_hessian(model, loss, X, y)
    lam_max = float(torch.linalg.eigvalsh(h)[-1])
    H = hessinv.Hessian(model, loss, X, y)
    assert H.spectral_bounds()[1] >= 0.5 * lam_max


# Fixed (was a strict xfail):
#   the same H + dI gets two verified inertias: dense (1, 0, 152) (152 eigenvalues within its
#   zero band 2.0e-13 = W eps ||H||) and lifted (153, 0, 0), is_positive_definite() True,
#   because the lifted factorization's band is 1.5e-15 (its ||H|| from the block Lanczos is 100x
#   too small: 8-8-1 tanh MLP, zero residual, N = 1, d = 0.03 W eps ||H||). With
#   H._store_bounds(true bounds) lifted also gives (1, 0, 152)
def test_lifted_and_dense_agree_on_a_low_rank_hessian() -> None:
    model, X, y, loss = _interpolating_mlp(1, 1)
    h = dense_hessian(model, loss, X, y)
    w = h.shape[0]
    nrm = float(torch.linalg.matrix_norm(h, 2))
    d = 0.03 * w * EPS * nrm  # inside the contract's zero band W eps ||H|| (about 30x)
    verdicts = []
    for method in ("dense", "lifted"):
        f = hessinv.Hessian(model, loss, X, y).factor(d, method=method)
        inert = f.inertia()
        verdicts.append((tuple(inert)[:3], f.is_positive_definite()))
    assert verdicts[0] == ((1, 0, w - 1), False)  # dense: the contract's band
    assert verdicts[1] == verdicts[0]


# -- the kept split squares Tzx before dividing by d: under/overflow at loss scales 1e+-155 --


# Fixed (was a strict xfail):
#   new in 57726c6 for Kronecker kept bases: StageRiccati forms P -= (Tzx_2 Tzx_2^T) / d, whose
#   product is c^2 for a loss scale c: at c = 2^-525 (~1e-158) it underflows into denormals and
#   the unrefined stage solve is wrong with ok=True (first entry 0.176 for 0.285 at 1e-160), at
#   c = 2^518 (~1e156) it overflows (ok=False). Before 57726c6 these stages were LU-factored
#   whole and the stage solve was bit-for-bit scale-invariant at every scale; now the user-level
#   solves fall back to the block LU (solver 'lu') there. The identity-basis split (stage_split,
#   tail @ tail.T / d) had the same limit already. Fix: P -= (Tzx_2 / sqrt|d|)(Tzx_2 /
#   sqrt|d|)^T sign(d), or Tzx_2 @ (Tzx_2^T / d)
@pytest.mark.parametrize("log2_scale", [-525, 518])
def test_kept_split_scale_invariant_at_extreme_scales(log2_scale: int, update_form: str) -> None:
    scale = 2.0**log2_scale
    model, X, y, mse = _data("softmax", batch=2, seed=19)
    ws, solvers = [], []
    for c in (1.0, scale):

        def loss(o: torch.Tensor, t: torch.Tensor, c: float = c) -> torch.Tensor:
            return c * mse(o, t)

        loss.reduction = "mean"  # type: ignore[attr-defined]
        H = hessinv.Hessian(model, loss, X, y)
        d = 0.05 * c
        f = H.factor(d, method="lifted")
        ls = f.system
        sr = StageRiccati(H.blocks, d, ls.projections)
        assert any(s.free and s.basis is None for s in sr.stages)  # the kept split runs
        assert sr.ok
        sizes = [s.r + s.free for s in sr.stages]
        b = torch.randn(sum(sizes), 2, dtype=DT, generator=torch.Generator().manual_seed(0))
        ws.append(torch.cat(sr.solve(list(torch.split(b, sizes)))) * c)
        f.solve(torch.randn(H.num_params, dtype=DT) * c)
        solvers.append(f.solver)
    # a power-of-two scale: the elimination is the same arithmetic, scaled
    assert float((ws[1] - ws[0]).abs().max()) <= 1e-13 * float(ws[0].abs().max())
    assert solvers == ["stages", "stages"]


# Fixed (was a strict xfail):
#   the singularity verdict depends on the loss scale: A = H + dI with an eigenvalue 1e-17 ||H||
#   (inside the band W eps ||A|| = 5.3e-14 ||H||) raises SingularHessianError at loss scales 1
#   .. 1e170 but at 1e180 the lifted (and auto) solve returns x (|x| = 1.2e15 / c):
#   inverse_iteration_steps reads vector_norm(A^{-1} y) = 0 (entries ~1e-164, their squares
#   underflow) as 'A^{-1} y = 0' and returns sigma_min = inf, which excludes the band. The dense
#   method still refuses (it counts by eigh). Not new in 57726c6 (contract.column_norms scales;
#   the inverse iteration does not)
def test_singular_verdict_scale_invariant_at_1e180() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    X, y = torch.randn(8, 6, dtype=DT), torch.randn(8, 3, dtype=DT)
    mse = nn.MSELoss()
    h = dense_hessian(model, mse, X, y)
    ev = torch.linalg.eigvalsh(h)
    d = -float(ev[-3]) + 1e-17 * float(ev.abs().max())  # one eigenvalue 1e-17 ||H|| from 0
    g = torch.randn(h.shape[0], dtype=DT, generator=torch.Generator().manual_seed(5))
    for scale in (1.0, 1e180):

        def loss(o: torch.Tensor, t: torch.Tensor, scale: float = scale) -> torch.Tensor:
            return scale * mse(o, t)

        loss.reduction = "mean"  # type: ignore[attr-defined]
        f = hessinv.Hessian(model, loss, X, y).factor(d * scale, method="lifted")
        with pytest.raises(hessinv.SingularHessianError):
            f.solve(g)


# Fixed (was a strict xfail):
#   minor: gaussian(..., torch.float32, cpu, ...) returns the transposed (column-major, stride
#   (1, size)) float32 draw: .to(dtype=float32, device=cpu, memory_format=contiguous_format) is
#   a no-op when dtype and device are unchanged, so the intended contiguous copy is made for
#   every dtype but float32 (numbers are the same)
def test_gaussian_float32_is_contiguous() -> None:
    assert gaussian(7, 3, torch.float32, CPU, 0).is_contiguous()
