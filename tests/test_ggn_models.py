"""GaussNewton on every model Hessian accepts, and on functional Stage pipelines.

Reference (no code shared with hessinv): ``J`` by ``torch.func.jacrev`` of the
network output of the whole batch as a function of the flat selected
parameters (``functional_call`` on a copy of the model, LayerNorm swapped for
the test-local elementary ``RefLayerNorm``), ``Lambda`` by
``torch.func.hessian`` of the loss as a function of that output, and
``G = J^T Lambda J``; then ``torch.linalg`` on ``G + d I``. A model ending in
``log_softmax`` with ``NLLLoss`` is compared with the reference of its logits
and ``NLL(log_softmax(.))`` as the loss (cross-entropy on the logits).
Zero eigenvalues are counted with the documented band ``W eps ||G + d I||``
on the reference's own eigenvalues, with a clear gap asserted around it.
"""

from __future__ import annotations

import ast
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from cases import DT, _swap_layernorm, rel, swap_celu
from test_kernel import assert_gap, ref_inertia, zero_tol
from test_trace import MODELS, Centre, GatedLN, _build, _reg
from torch import nn

import hessinv
from hessinv import SingularHessianError
from hessinv import jacobian as jac_mod
from hessinv.ggn_split import output_split

EPS = torch.finfo(DT).eps
METHODS = ("kernel", "lifted", "dense", "auto")


class LogitsLogSoftmax(nn.Module):
    """A residual MLP class ending in ``F.log_softmax`` (``logits=True``: without it)."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.logits = False
        self.a = nn.Linear(3, 4)
        self.r = nn.Linear(4, 4)
        self.out = nn.Linear(4, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        h = h + torch.tanh(self.r(h))
        z = self.out(h)
        return z if self.logits else F.log_softmax(z, dim=1)


def m_logsoftmax_nll(g):
    X = torch.randn(5, 3, generator=g, dtype=DT)
    return LogitsLogSoftmax().to(DT), nn.NLLLoss(), X, torch.randint(0, 3, (5,), generator=g)


def m_resmlp_ce(g):
    """The residual MLP class of test_trace with cross-entropy."""
    from test_trace import ResMLP

    X = torch.randn(4, 3, generator=g, dtype=DT)
    return (
        ResMLP(out=3).to(DT),
        nn.CrossEntropyLoss(reduction="sum"),
        X,
        torch.randint(0, 3, (4,), generator=g),
    )


ALL_MODELS = [*MODELS, m_logsoftmax_nll, m_resmlp_ce]


def _operator(model, loss_func, X, y, params=None):  # noqa: N803
    """GaussNewton; where forward's order of use differs from named_parameters() order,
    the refusal names the order to pass as params=, which then works."""
    try:
        return hessinv.GaussNewton(model, loss_func, X, y, params=params)
    except ValueError as e:
        msg = str(e)
        assert params is None and "pass params= in the order" in msg
        order = ast.literal_eval(msg[msg.index("[") :])
        ps = dict(model.named_parameters())
        return hessinv.GaussNewton(model, loss_func, X, y, params={n: ps[n] for n in order})


def ref_ggn(model, loss_func, X, y, names):  # noqa: N803
    """Dense ``(G, gradient)`` in the flat parameters ``names`` (in that order), independent."""
    # LayerNorm and CELU from elementary operations (torch's fused forms have wrong derivatives)
    ref = swap_celu(_swap_layernorm(copy.deepcopy(model)))
    if isinstance(ref, GatedLN):
        ref.ref = True
    loss = loss_func
    if isinstance(ref, LogitsLogSoftmax):  # CE on the logits
        ref.logits = True

        def loss(out, t):
            return loss_func(torch.log_softmax(out, dim=1), t)

    ps = dict(ref.named_parameters())
    shapes = [ps[n].shape for n in names]
    x0 = torch.cat([ps[n].detach().reshape(-1) for n in names])

    def out_of(flat):
        vals, i = {}, 0
        for n, sh in zip(names, shapes, strict=True):
            k = sh.numel()
            vals[n] = flat[i : i + k].reshape(sh)
            i += k
        others = {k: v.detach() for k, v in ps.items() if k not in vals}
        return torch.func.functional_call(ref, {**others, **vals}, (X,))

    out = out_of(x0).detach()
    J = torch.func.jacrev(out_of)(x0).reshape(out.numel(), -1)
    L = torch.func.hessian(lambda o: loss(o.reshape(out.shape), y))(out.reshape(-1))
    G = J.T @ L.reshape(out.numel(), out.numel()) @ J
    g = torch.func.grad(lambda f: loss(out_of(f), y))(x0)
    return G, g


def _flat_names(G, model):  # noqa: N803
    """Names of the operator's flat order, found by identity of the stage tensors."""
    by_ptr = {p.data_ptr(): n for n, p in model.named_parameters()}
    return [by_ptr[p.data_ptr()] for p in G.pipeline.params]


def check_against(G, ref, g_ref, methods=METHODS):  # noqa: N803
    """G @ V, gradient, solve, logdet and inertia of every method against the dense reference."""
    W = ref.shape[0]
    assert G.shape == (W, W)
    gn = float(torch.linalg.matrix_norm(ref, 2))
    gen = torch.Generator().manual_seed(1)
    V = torch.randn(W, 3, dtype=DT, generator=gen)
    # products: the reference's own round-off is ~ W eps ||G|| ||V||; allow 1e2 times that
    assert float((G @ V - ref @ V).norm()) <= 1e2 * W * EPS * gn * float(V.norm())
    assert rel(G.to_dense(), ref) <= 1e2 * W * EPS
    assert rel(G.gradient(), g_ref) <= 1e2 * W * EPS
    ev = torch.linalg.eigvalsh(ref)
    tol = zero_tol(ev)
    assert_gap(ev, tol)
    pos = ev[ev > tol]
    # d > 0, and d < 0 between two separated nonzero eigenvalues (G + dI indefinite)
    gaps = [i for i in range(len(pos) - 1) if pos[i + 1] > 1.5 * pos[i]]
    mid = -0.5 * float(pos[gaps[-1]] + pos[gaps[-1] + 1]) if gaps else -0.5 * float(pos[0])
    rhs = torch.randn(W, 2, dtype=DT, generator=gen)
    for d in (1e-2 * gn, mid):
        A = ref + d * torch.eye(W, dtype=DT)
        eva = ev + d
        x_ref = torch.linalg.solve(A, rhs)
        cond = float(eva.abs().max() / eva.abs().min())
        s_ref, la_ref = torch.linalg.slogdet(A)
        inert_ref = ref_inertia(eva, zero_tol(eva))
        assert_gap(eva, zero_tol(eva))
        for m in methods:
            x = G.solve(rhs, damping=d, method=m)
            assert rel(x, x_ref) <= 1e2 * cond * W * EPS, (m, d)
            s, la = G.logdet(d, method=m)
            assert s == float(s_ref), (m, d)
            assert abs(la - float(la_ref)) <= 1e2 * W * EPS * cond * (1 + abs(float(la_ref)))
            assert tuple(G.inertia(d, method=m)) == inert_ref, (m, d)
    # d = 0: G is singular when W > N o; the kernel counts the null space exactly
    inert0 = G.inertia(0.0)
    assert inert0 == ref_inertia(ev, tol) and inert0[1] == 0
    if inert0[2]:
        with pytest.raises(SingularHessianError):
            G.solve(rhs, damping=0.0)
        assert G.logdet(0.0) == (0.0, -math.inf)


@pytest.mark.parametrize(
    "make",
    ALL_MODELS,
    ids=lambda f: getattr(f, "__name__", "")[2:],
)
def test_model_against_dense_ggn(make):
    model, loss_func, X, y = _build(make)
    G = _operator(model, loss_func, X, y)
    ref, g_ref = ref_ggn(model, loss_func, X, y, _flat_names(G, model))
    assert float(torch.linalg.norm(ref)) > 1e-3  # not a trivial (zero) matrix
    check_against(G, ref, g_ref)


def test_logsoftmax_nll_in_a_traced_class_is_cross_entropy_on_logits():
    model, loss_func, X, y = _build(m_logsoftmax_nll)
    G = hessinv.GaussNewton(model, loss_func, X, y)
    assert G._split.folded
    logits = copy.deepcopy(model)
    logits.logits = True
    G_ce = hessinv.GaussNewton(logits, nn.CrossEntropyLoss(), X, y)
    assert not G_ce._split.folded
    assert rel(G.to_dense(), G_ce.to_dense()) <= 1e2 * G.num_params * EPS

    # method variant: h.log_softmax(1) folds too; log_softmax followed by more ops does not
    class Method(LogitsLogSoftmax):
        def forward(self, x):
            h = torch.tanh(self.a(x))
            return self.out(h + torch.tanh(self.r(h))).log_softmax(1)

    class Shifted(LogitsLogSoftmax):
        def forward(self, x):
            h = torch.tanh(self.a(x))
            return F.log_softmax(self.out(h + torch.tanh(self.r(h))), dim=1) * 1.0

    torch.manual_seed(0)
    assert hessinv.GaussNewton(Method().to(DT), loss_func, X, y)._split.folded
    Gs = hessinv.GaussNewton(Shifted().to(DT), loss_func, X, y)
    assert not Gs._split.folded
    assert float(Gs.to_dense().abs().max()) == 0.0  # literal: NLL is linear in its input


def test_params_subsets():
    """params= as a list and as a dict, on a traced class and a Sequential, every method."""
    from test_trace import ResMLP

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = ResMLP(depth=2, out=3).to(DT)
    X = torch.randn(5, 3, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (5,), generator=gen)
    loss = nn.CrossEntropyLoss()
    sel = [model.blocks[0][0].weight, model.blocks[1][2].bias, model.out.weight]
    G = hessinv.GaussNewton(model, loss, X, y, params=sel)
    names = ["blocks.0.0.weight", "blocks.1.2.bias", "out.weight"]
    assert _flat_names(G, model) == names
    check_against(G, *ref_ggn(model, loss, X, y, names))
    ps = dict(model.named_parameters())
    Gd = hessinv.GaussNewton(model, loss, X, y, params={n: ps[n] for n in names})
    assert rel(Gd.to_dense(), G.to_dense()) <= 1e-14
    # a Sequential: the fast path with frozen modules
    seq = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    seq = seq.to(DT)
    Xs, ys = _reg(6, 3, 2, gen)
    Gq = hessinv.GaussNewton(seq, nn.MSELoss(), Xs, ys, params=[seq[2].weight, seq[2].bias])
    assert Gq.pipeline.stages[0].structure is not None
    check_against(Gq, *ref_ggn(seq, nn.MSELoss(), Xs, ys, ["2.weight", "2.bias"]))


def test_first_stage_mixing_samples_is_exact():
    """``h - h.mean(0)`` in the first stage: J_n depends on every sample; per-sample vmap
    would be wrong (checked), the whole-batch Jacobian is exact."""
    model = Centre(late=False).to(DT)
    model.c.requires_grad_(False)
    X, y = _reg(4, 3, 2, torch.Generator().manual_seed(0))
    G = hessinv.GaussNewton(model, nn.MSELoss(), X, y)
    yp, jp = jac_mod.per_sample_jacobian(G._net, G._flat(), G.pipeline.z0)
    assert jac_mod.jacobian_mismatch(G._net, G._flat(), G.pipeline.z0, yp, jp) > 1.0
    check_against(G, *ref_ggn(model, nn.MSELoss(), X, y, _flat_names(G, model)))


# -- functional Stage pipelines --------------------------------------------------------------


def _stage_params(gen):
    def p(*shape):
        return (0.7 * torch.randn(*shape, generator=gen, dtype=DT)).requires_grad_(False)

    return [(p(4, 3), p(4)), (p(4, 4), p(4)), (p(3, 4), p(3))]


def _stage_fns():
    def s0(z, ps):
        return torch.tanh(z @ ps[0].T + ps[1])

    def s1(z, ps):  # a residual block
        return z + torch.sigmoid(z @ ps[0].T + ps[1]) * z

    def s2(z, ps):  # the network output
        return z @ ps[0].T + ps[1]

    return [s0, s1, s2]


@pytest.mark.parametrize("kind", ["mse", "ce", "no_target"])
def test_stage_pipeline_against_dense_ggn(kind):
    gen = torch.Generator().manual_seed(3)
    params = _stage_params(gen)
    X = torch.randn(5, 3, generator=gen, dtype=DT)
    if kind == "ce":
        loss, y = nn.CrossEntropyLoss(reduction="sum"), torch.randint(0, 3, (5,), generator=gen)
    else:
        loss, y = nn.MSELoss(), torch.randn(5, 3, generator=gen, dtype=DT)
    stages = [hessinv.Stage(f, p) for f, p in zip(_stage_fns(), params, strict=True)]
    if kind == "no_target":
        t = y
        G = hessinv.GaussNewton.from_stages(stages, X, loss_func=lambda out: loss(out, t))
    else:
        G = hessinv.GaussNewton.from_stages(stages, X, loss_func=loss, y=y)
    # independent reference: the same maths written out, J by jacrev of the whole batch
    flat0 = torch.cat([t.reshape(-1) for ps in params for t in ps])
    shapes = [t.shape for ps in params for t in ps]

    def out_of(flat):
        ts, i = [], 0
        for sh in shapes:
            ts.append(flat[i : i + sh.numel()].reshape(sh))
            i += sh.numel()
        h = torch.tanh(X @ ts[0].T + ts[1])
        h = h + torch.sigmoid(h @ ts[2].T + ts[3]) * h
        return h @ ts[4].T + ts[5]

    out = out_of(flat0)
    J = torch.func.jacrev(out_of)(flat0).reshape(out.numel(), -1)
    L = torch.func.hessian(lambda o: loss(o.reshape(out.shape), y))(out.reshape(-1))
    ref = J.T @ L.reshape(out.numel(), -1) @ J
    g_ref = torch.func.grad(lambda f: loss(out_of(f), y))(flat0)
    check_against(G, ref, g_ref)


def test_stage_pipeline_refusals():
    gen = torch.Generator().manual_seed(0)
    params = _stage_params(gen)
    stages = [hessinv.Stage(f, p) for f, p in zip(_stage_fns(), params, strict=True)]
    X = torch.randn(4, 3, generator=gen, dtype=DT)
    with pytest.raises(TypeError, match="loss_func"):
        hessinv.GaussNewton.from_stages(stages, X)
    with pytest.raises(ValueError, match="at least one stage"):
        hessinv.GaussNewton.from_stages([], X, loss_func=nn.MSELoss(), y=X)
    with pytest.raises(ValueError, match="mixes samples|couples samples"):
        hessinv.GaussNewton.from_stages(
            stages, X, loss_func=lambda o, t: ((o - t).sum(0) ** 2).sum(), y=X[:, :3]
        )
    with pytest.warns(UserWarning, match="NLLLoss"):
        hessinv.GaussNewton.from_stages(
            stages, X, loss_func=nn.NLLLoss(), y=torch.zeros(4, dtype=torch.long)
        )
    # Hessian's pipelines (the last stage returns the loss) have no network output
    H_stages = [*stages[:-1], hessinv.Stage(lambda z, ps: (z @ ps[0].T).sum(), (params[2][0],))]
    with pytest.raises(ValueError, match="where the network ends"):
        output_split(hessinv.pipeline.Pipeline(H_stages, X))


def test_vmap_batching_bug_is_caught():
    """torch 2.13's batched prelu backward gives wrong weight gradients under vmap over
    samples when N equals the width (no error): the per-sample Jacobian fails the check
    and the whole-batch one is used; G is exact either way."""
    gen = torch.Generator().manual_seed(0)
    w = torch.tensor([0.25], dtype=DT)
    v = torch.randn(4, generator=gen, dtype=DT)
    stages = [
        hessinv.Stage(lambda z, ps: F.prelu(z, ps[0]), (w,)),
        hessinv.Stage(lambda z, ps: z * ps[0], (v,)),
    ]
    X = torch.randn(4, 4, generator=gen, dtype=DT)
    y = torch.randn(4, 4, generator=gen, dtype=DT)
    G = hessinv.GaussNewton.from_stages(stages, X, loss_func=nn.MSELoss(reduction="sum"), y=y)
    flat = G._flat()
    jb = jac_mod.batch_jacobian(G._net, flat, X)
    try:
        yp, jp = jac_mod.per_sample_jacobian(G._net, flat, X)
    except RuntimeError:
        pass  # torch raises instead (other shapes): the fallback is taken as well
    else:
        wrong = rel(jp, jb) > 1e-3  # True on torch 2.13
        assert (jac_mod.jacobian_mismatch(G._net, flat, X, yp, jp) > 1.0) == wrong

    def out_of(f):
        h = torch.where(X >= 0, X, f[0] * X)
        return h * f[1:5]

    out = out_of(flat)
    J = torch.func.jacrev(out_of)(flat).reshape(out.numel(), -1)
    ref = 2.0 * J.T @ J  # MSE sum: Lambda = 2 I
    g_ref = torch.func.grad(lambda f: ((out_of(f) - y) ** 2).sum())(flat)
    check_against(G, ref, g_ref)


def test_a_jacobian_that_fails_both_checks_is_refused(monkeypatch):
    model, loss_func, X, y = _build(MODELS[0])
    G = hessinv.GaussNewton(model, loss_func, X, y)

    good = jac_mod.batch_jacobian

    def bad(net, flat, z0, chunk_size=None):
        return good(net, flat, z0, chunk_size) * (1 + 1e-6)

    monkeypatch.setattr(jac_mod, "batch_jacobian", bad)
    monkeypatch.setattr(
        jac_mod, "per_sample_jacobian", lambda *a: (_ for _ in ()).throw(RuntimeError("no vmap"))
    )
    with pytest.raises(torch.linalg.LinAlgError, match="reverse mode"):
        G.to_dense()


@pytest.mark.parametrize("c", [1e-12, 1e12])
def test_traced_loss_scale_invariance(c):
    model, loss_func, X, y = _build(MODELS[2])  # the residual CNN, cross-entropy
    G = hessinv.GaussNewton(model, loss_func, X, y)
    Gc = hessinv.GaussNewton(model, lambda o, t: c * loss_func(o, t), X, y)
    g = torch.randn(G.num_params, dtype=DT)
    for m in METHODS:
        for d in (1e-2, -0.05):
            x, xc = G.solve(g, damping=d, method=m), Gc.solve(g, damping=c * d, method=m)
            assert rel(c * xc, x) <= 1e-9, m
            assert Gc.inertia(c * d, method=m) == G.inertia(d, method=m)
            (s, la), (sc, lac) = G.logdet(d, method=m), Gc.logdet(c * d, method=m)
            assert s == sc and abs(lac - la - G.num_params * math.log(c)) <= 1e-9 * abs(lac)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hessinv.LiftedPrecisionWarning)
        assert Gc.inertia(0.0) == G.inertia(0.0)
