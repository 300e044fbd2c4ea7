"""The named off-path cases of the reliability campaign (issue "Exact or a clear error").

Each ``case_*`` function returns outcome records like
:func:`reliability_eval.evaluate`. Cases that are whole problems (sample-mixing
models, tied weights, parametrizations, Gauss-Newton, loss scales) go through
the same evaluation as the random networks; the others (refusals that must
happen, memory, stale operators) are judged by their own stated rule.
"""

from __future__ import annotations

import gc
import math
import resource
import subprocess
import sys
import time

import numpy as np
import torch
from reliability_eval import attempt, classify_exc, evaluate, exc_info, is_clear, outcome
from reliability_nets import model_problem, random_woodbury
from reliability_ref import F32, F64, Reference, backward_error, build_reference, model_loss_fn
from torch import nn
from torch.nn.utils import parametrize

import hessinv

DT_NAME = {F64: "float64", F32: "float32"}


def _r(case: str, q: str, dt: str, d, res: tuple[str, dict]) -> dict:
    return {"case": case, "quantity": q, "dtype": dt, "damping": d, "outcome": res[0],
            "detail": res[1]}  # fmt: skip


def _data(n: int, d_in: int, d_out: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)


def _mlp(*mods: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(*mods).to(F64)


def _fixed_dampings(ref: Reference) -> list[float]:
    hn = ref.hnorm if ref.hnorm else 1.0
    return [0.0, 1e-3 * hn, -0.5 * hn]


def _problem(name, model, loss, X, y, refusal_ok=True, dampings=None):  # noqa: N803
    p = model_problem(name, model, loss, X, y, None, dampings=[0.0], refusal_ok=refusal_ok)
    p.dampings = dampings if dampings is not None else _fixed_dampings(p.ref)
    return p


# -- 1-4: models hessinv must compute exactly or refuse -----------------------------------


class _ResidualSeq(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self[0](x)
        return self[2](self[1](h) + h)


class _Symmetric(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w.triu() + w.triu(1).T


def structural_problems():
    """Sample-mixing layers and losses, tied weights, a forward override, parametrizations."""
    n = 4
    X, y = _data(n, 3, 2)
    out = [
        _problem("mixing: Softmax(dim=0)",
                 _mlp(nn.Linear(3, 4), nn.Softmax(dim=0), nn.Linear(4, 2)), nn.MSELoss(), X, y),
        _problem("mixing: LayerNorm((N, 4))",
                 _mlp(nn.Linear(3, 4), nn.LayerNorm((n, 4)), nn.Tanh(), nn.Linear(4, 2)),
                 nn.MSELoss(), X, y),
        _problem("mixing: callable loss ((o - t).sum(0) ** 2).sum()",
                 _mlp(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)),
                 lambda o, t: ((o - t).sum(0) ** 2).sum(), X, y),
        _problem("MSELoss() mean (must not be refused by a mixing check)",
                 _mlp(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), nn.MSELoss(), X, y,
                 refusal_ok=False),
    ]  # fmt: skip
    bn = _mlp(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Tanh(),
              nn.Linear(4, 2))  # fmt: skip
    bn.eval()
    out.append(_problem("mixing: BatchNorm1d(track_running_stats=False) in eval", bn,
                        nn.MSELoss(), X, y))  # fmt: skip
    torch.manual_seed(1)
    lin = nn.Linear(4, 4)
    tied = _mlp(nn.Linear(3, 4), nn.Tanh(), lin, nn.Tanh(), lin, nn.Tanh(), nn.Linear(4, 2))
    out.append(_problem("tied weights (one Linear used twice)", tied, nn.MSELoss(), X, y))
    torch.manual_seed(2)
    sub = _ResidualSeq(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    out.append(_problem("nn.Sequential subclass overriding forward", sub, nn.MSELoss(), X, y))
    orth = _mlp(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    parametrize.register_parametrization(orth[2], "weight", _Symmetric())
    out.append(_problem("parametrize: symmetric weight", orth, nn.MSELoss(), X, y))
    orth2 = _mlp(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    nn.utils.parametrizations.orthogonal(orth2[2])
    out.append(_problem("parametrize: orthogonal weight", orth2, nn.MSELoss(), X, y))
    # in-place activations (reference: the same weights with inplace=False)
    acts = [nn.ReLU(inplace=True), nn.ELU(inplace=True), nn.LeakyReLU(0.1, inplace=True)]
    inpl = _mlp(nn.Linear(3, 4), acts[0], nn.Linear(4, 4), acts[1], nn.Linear(4, 4), acts[2],
                nn.Linear(4, 2))  # fmt: skip
    p = _problem("in-place activations", inpl, nn.MSELoss(reduction="sum"), X, y)
    out.append(p)
    return out


# -- 5: singular H with g in its range ----------------------------------------------------


def case_singular_in_range() -> list[dict]:
    """``H`` singular (batch 1), ``g = H r``: the default solve must raise SingularHessianError."""
    name = "singular H, g in range, damping 0"
    recs = []
    X, y = _data(1, 3, 2)
    p = _problem(name, _mlp(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), nn.MSELoss(), X, y)
    r = torch.randn(p.ref.W, generator=torch.Generator().manual_seed(3), dtype=F64)
    g64 = p.ref.H @ r
    for dt in (F64, F32):
        H = p.make_op(dt)
        for q, kw in (("solve", {}), ("solve_lifted", {"method": "lifted"})):
            x, e, hw = attempt(lambda H=H, kw=kw, dt=dt: H.solve(g64.to(dt), damping=0.0, **kw))
            if e is None:
                be = backward_error(p.ref, 0.0, x, g64)
                res = ("silently_wrong", {"returned": "a vector", "backward_error": be,
                                          "warnings": hw})  # fmt: skip
            elif isinstance(e, hessinv.SingularHessianError):
                res = ("clear_error", exc_info(e))
            else:
                res = (classify_exc(e, False), exc_info(e))
            recs.append(_r(name, q, DT_NAME[dt], 0.0, res))
    return recs


# -- 6: loss scales ------------------------------------------------------------------------


def _scaled_problem(c: float, dampings_rel: list[float], n: int = 3):
    X, y = _data(n, 3, 2, seed=5)
    torch.manual_seed(5)
    m = _mlp(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 2), seed=5)

    def loss(o, t):
        return c * ((o - t) ** 2).sum()

    p = _problem(f"loss scale c={c:g}", m, loss, X, y, refusal_ok=False, dampings=[0.0])
    return p


def case_loss_scales() -> tuple[list, list[dict]]:
    """Scaled problems (evaluated against the reference) and the scale-consistency records.

    Consistency: for ``c`` in 1e-12, 1e12, ``solve``/``logdet``/``inertia`` of ``c loss`` at
    damping ``c d`` must equal those of ``loss`` at ``d`` (solve: relative difference within
    ``100 W eps cond``; logdet: ``log|det|`` shifted by ``W log c`` to ``1e-8 W``; inertia:
    equal). Well-conditioned ``H + dI`` must not be refused (``false_refusal`` in the
    reference evaluation). A singular ``H`` (batch 3 < its rank bound) at damping 0 checks
    that ``inertia(0)`` counts only the true null space as zero.
    """
    base = _scaled_problem(1.0, [])
    hn = base.ref.hnorm
    rel = [0.0, 1e-2, -0.3 * float(base.ref.evals.max()) / hn, 1e-6]
    problems, recs = [], []
    for c in (1.0, 1e-12, 1e12):
        p = _scaled_problem(c, [])
        p.dampings = [c * r * hn for r in rel]
        problems.append(p)
    g = base.ref.g.reshape(-1, 1)
    for p, c in zip(problems[1:], (1e-12, 1e12), strict=True):
        for dt in (F64, F32):
            H0, Hc = base.make_op(dt), p.make_op(dt)
            for r_ in rel[1:]:
                recs += _consistency_records(H0, Hc, g.to(dt), c, r_ * hn, base, dt)
    return problems, recs


def _consistency_records(H0, Hc, g, c: float, d: float, base, dt) -> list[dict]:
    recs = []
    for q in ("solve", "logdet", "inertia"):
        a, ea, _ = attempt(lambda q=q: _quantity(H0, q, g, d))
        b, eb, hw = attempt(lambda q=q: _quantity(Hc, q, c * g, c * d))
        res = _consistency(q, a, ea, b, eb, c, base, d, dt, hw)
        recs.append(_r(f"loss scale consistency c={c:g}", q, DT_NAME[dt], d, res))
    return recs


def _quantity(H, q: str, g, d: float):
    if q == "solve":
        return H.solve(g, damping=d)
    return H.logdet(d) if q == "logdet" else tuple(H.inertia(d))[:3]


def _consistency(q, a, ea, b, eb, c, base, d, dt, hw):
    if ea is not None and eb is not None:
        same = type(ea) is type(eb)
        return ("clear_error" if same and is_clear(eb) else "unclear_error",
                {"base": exc_info(ea), "scaled": exc_info(eb)})  # fmt: skip
    if eb is not None:
        return classify_exc(eb, False), exc_info(eb) | {"base": "returned"}
    if ea is not None:
        return "silently_wrong", {"base": exc_info(ea), "scaled": "returned a value"}
    eps = torch.finfo(dt).eps
    mu = (base.ref.evals + d).abs()
    W = base.ref.W
    if q == "solve":
        cond = float(mu.max() / mu.min())
        diff = float(torch.linalg.norm(a.to(F64) - b.to(F64)) / torch.linalg.norm(a.to(F64)))
        ok, det = diff <= 100 * W * eps * cond, {"rel_diff": diff, "cond": cond}
    elif q == "logdet":
        shift = W * math.log(c)
        if math.isfinite(a[1]) and math.isfinite(b[1]):
            diff = abs(b[1] - shift - a[1])
        else:  # both singular is consistent; one singular is not
            diff = 0.0 if a[1] == b[1] else math.inf
        ok = a[0] == b[0] and diff <= 1e-8 * W * max(1.0, eps / 2.2e-16)
        det = {"base": list(a), "scaled": list(b), "shifted_diff": diff}
    else:
        ok, det = tuple(a) == tuple(b), {"base": list(a), "scaled": list(b)}
    if ok:
        return "correct", det
    return ("wrong_warned" if hw else "silently_wrong"), det | {"warnings": hw}


def case_singular_small_eigs() -> list:
    """A singular ``H`` whose smallest nonzero eigenvalues are far below ``||H||``, damping 0."""
    out = []
    for c in (1.0, 1e-12, 1e12):
        X, y = _data(2, 4, 2, seed=7)
        m = _mlp(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2), seed=7)
        with torch.no_grad():
            m[2].weight.mul_(0.05)  # small middle layer: eigenvalues ~1e-3 ||H||

        def loss(o, t, c=c):
            return c * ((o - t) ** 2).sum()

        out.append(_problem(f"singular H, small eigenvalues, c={c:g}", m, loss, X, y,
                            refusal_ok=False, dampings=[0.0]))  # fmt: skip
    return out


# -- 7: Gauss-Newton -----------------------------------------------------------------------


def gn_reference(out_model: nn.Module, loss, X, y) -> Reference:  # noqa: N803
    """``J^T H_loss J`` with ``J`` the Jacobian of ``out_model``'s outputs (jacrev, float64)."""
    with torch.no_grad():  # the problem is the float32-rounded one (as in model_problem)
        for p in out_model.parameters():
            p.copy_(p.float().double())
    X = X.float().double() if X.dtype.is_floating_point else X
    mats = {}
    for dt in (F64, F32):
        m = out_model.to(dt)
        xx = X.to(dt)
        yy = y.to(dt) if y.dtype.is_floating_point else y
        f_out, x0 = model_loss_fn(m, lambda o, t: o, xx, yy)
        o = f_out(x0).detach()
        J = torch.func.jacrev(f_out)(x0).reshape(o.numel(), -1)

        def lo(v, o=o, yy=yy):
            return loss(v.reshape(o.shape), yy)

        Hl = torch.func.hessian(lo)(o.reshape(-1))
        gl = torch.func.grad(lo)(o.reshape(-1))
        mats[dt] = (J.T @ Hl @ J, J.T @ gl, float(loss(o, yy)))
    out_model.to(F64)
    ref = Reference(mats[F64][0].detach(), mats[F64][1].detach(), mats[F64][2],
                    mats[F32][0].detach(), mats[F32][1].detach())  # fmt: skip
    return ref


def gn_problems():
    """GN of a small CNN on scikit-learn's digits (PSD) and of LogSoftmax + NLLLoss."""
    from sklearn.datasets import load_digits

    dig = load_digits()
    n = 4
    X = torch.tensor(dig.images[:n] / 16.0, dtype=F64).reshape(n, 1, 8, 8)
    y = torch.tensor(dig.target[:n])
    cnn = _mlp(nn.Conv2d(1, 2, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(18, 10), seed=3)
    ce = nn.CrossEntropyLoss()
    ref = gn_reference(cnn, ce, X, y)
    p1 = model_problem("GaussNewton: CNN on digits, CE", cnn, ce, X, y, None, dampings=[0.0],
                       gauss_newton=True, ref=ref)  # fmt: skip
    p1.dampings = [0.0, 1e-3 * ref.hnorm]
    X2, _ = _data(5, 3, 3, seed=9)
    y2 = torch.tensor([0, 2, 1, 1, 0])
    body = _mlp(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3), seed=9)
    full = nn.Sequential(*body, nn.LogSoftmax(dim=1))
    ref2 = gn_reference(body, nn.CrossEntropyLoss(reduction="sum"), X2, y2)
    p2 = model_problem("GaussNewton: LogSoftmax + NLLLoss (= GN of CE on the logits)", full,
                       nn.NLLLoss(reduction="sum"), X2, y2, None, dampings=[0.0],
                       gauss_newton=True, ref=ref2)  # fmt: skip
    p2.dampings = [0.0, 1e-3 * ref2.hnorm]
    return [p1, p2]


# -- 8: Woodbury ---------------------------------------------------------------------------


def woodbury_problems():
    """Section 6 pipelines, deeper and with larger gains (ill-conditioned ``A`` / ``S_H``)."""
    out = []
    for seed in (9000, 9001, 9002, 9004, 9018, 9030, 9031):  # depth <= 12: Section 6 applies
        rng = np.random.default_rng(seed)
        p = random_woodbury(seed, rng, torch.Generator().manual_seed(seed), max_depth=12)
        p.name = f"woodbury pipeline seed {seed}"
        p.dampings = [0.0]
        out.append(p)
    return out


# -- 9: fail-late cases ---------------------------------------------------------------------

_HUGE = r"""
import resource, sys, time, torch
resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))
import hessinv
from torch import nn
torch.manual_seed(0)
m = nn.Sequential(nn.Linear(2000, 2000), nn.Tanh(), nn.Linear(2000, 2000), nn.Tanh(),
                  nn.Linear(2000, 1))
X, y = torch.randn(8, 2000), torch.randn(8, 1)
t = time.time()
try:
    H = hessinv.Hessian(m, nn.MSELoss(), X, y)
    print("STAGE construction-ok", time.time() - t, flush=True)
    H.solve(H.gradient(), damping=1e-3)
    print("RESULT returned", time.time() - t)
except BaseException as e:
    print("RESULT", type(e).__module__, type(e).__name__, time.time() - t, "|", str(e)[:300])
"""


def case_huge() -> list[dict]:
    """Width 2000: must refuse quickly (MemoryError naming GiB), not allocate (6 GiB cap)."""
    name = "width 2000 (must refuse quickly, MemoryError naming GiB)"
    t = time.time()
    try:
        cp = subprocess.run([sys.executable, "-c", _HUGE], capture_output=True, text=True,
                            timeout=120)  # fmt: skip
        text = cp.stdout + cp.stderr[-500:]
    except subprocess.TimeoutExpired:
        text = "RESULT timeout"
    dt = time.time() - t
    line = [ln for ln in text.splitlines() if ln.startswith("RESULT")]
    det = {"output": text[-600:], "seconds": dt}
    if not line or "timeout" in line[0]:
        res = ("unclear_error", det | {"why": "no answer within 120 s or crashed"})
    elif "returned" in line[0]:
        res = ("correct", det)
    elif " MemoryError " in line[0] and "GiB" in line[0] and dt < 60:
        res = ("clear_error", det)
    elif " hessinv" in line[0] or " MemoryError" in line[0] or " ValueError" in line[0]:
        res = ("clear_error" if "GiB" in line[0] else "unclear_error", det)
    else:
        res = ("unclear_error", det)
    return [_r(name, "construction+solve", "float32", 1e-3, res)]


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def case_damping_search() -> list[dict]:
    """60 dampings on one operator: the factorizations must not all be kept alive."""
    name = "60-value damping search (factorizations kept alive)"
    torch.manual_seed(0)
    mods = [nn.Linear(8, 12), nn.Tanh()]
    for _ in range(6):
        mods += [nn.Linear(12, 12), nn.Tanh()]
    m = nn.Sequential(*mods, nn.Linear(12, 2)).to(F64)
    X, y = _data(8, 8, 2)
    H = hessinv.Hessian(m, nn.MSELoss(), X.to(F64), y.to(F64))
    g = H.gradient()

    def live() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o).__name__.endswith("Factorization"))

    before = live()
    for d in np.logspace(-6, 0, 60):
        _, e, _ = attempt(lambda d=d: H.solve(g, damping=float(d), method="lifted"))
        if e is not None:
            return [_r(name, "memory", "float64", None, (classify_exc(e, False), exc_info(e)))]
    kept = live() - before
    det = {"factorizations_alive_after_60": kept, "max_rss_mib": _rss_mib()}
    res = ("correct", det) if kept <= 4 else ("silently_wrong", det)
    return [_r(name, "memory", "float64", None, res)]


def case_input_checks() -> list[dict]:
    """float16/bfloat16 refused at construction; (W, 0) rhs; numpy / bool dampings."""
    recs = []
    X, y = _data(3, 3, 2)
    for low in (torch.float16, torch.bfloat16):
        name = "low precision (must refuse at construction)"
        m = _mlp(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(low)
        v, e, _ = attempt(lambda m=m, low=low: hessinv.Hessian(m, nn.MSELoss(), X.to(low),
                                                                 y.to(low)))  # fmt: skip
        res = (classify_exc(e, True), exc_info(e)) if e else ("silently_wrong", {"accepted": 1})
        recs.append(_r(name, "construction", str(low).split(".")[1], None, res))
    p = _problem("small MLP", _mlp(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), nn.MSELoss(),
                 X, y, refusal_ok=False)  # fmt: skip
    H = p.make_op(F64)
    W = p.ref.W
    empty = torch.zeros(W, 0, dtype=F64)

    def shape_ok(v):
        return isinstance(v, torch.Tensor) and tuple(v.shape) == (W, 0), {"shape": str(v.shape)}

    recs.append(
        _r(
            "(W, 0) right-hand side",
            "solve",
            "float64",
            1e-3,
            outcome(lambda: H.solve(empty, damping=1e-3), shape_ok, True),
        )
    )
    recs.append(_r("(W, 0) right-hand side", "H@V", "float64", None,
                   outcome(lambda: H @ empty, shape_ok, True)))  # fmt: skip
    g = p.ref.g.reshape(-1, 1)
    d32 = np.float32(1e-3)
    recs.append(
        _r(
            "damping=np.float32(1e-3)",
            "solve",
            "float64",
            float(d32),
            outcome(
                lambda: H.solve(g, damping=d32),
                lambda x: _solve_judge(p.ref, float(d32), x, g),
                False,
            ),
        )
    )
    for bad in (True, "1e-3", float("nan")):
        v, e, hw = attempt(lambda bad=bad: H.solve(g, damping=bad))
        res = (classify_exc(e, True), exc_info(e)) if e else ("silently_wrong", {"accepted": 1})
        recs.append(_r(f"damping={bad!r} (must be rejected)", "solve", "float64", None, res))
    return recs


def _solve_judge(ref, d, x, g):
    from reliability_ref import solve_ok

    return solve_ok(ref, d, x, g, F64)


def case_stale() -> list[dict]:
    """After an in-place weight change, ``H @ v`` / ``H.loss()`` must raise or be current."""
    recs = []
    X, y = _data(3, 3, 2)
    m = _mlp(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    H = hessinv.Hessian(m, nn.MSELoss(), X.to(F64), y.to(F64))
    with torch.no_grad():
        m[0].weight.add_(0.5)
    f, x0 = model_loss_fn(m, nn.MSELoss(), X.to(F64), y.to(F64))
    ref = build_reference(f, x0, None, None)
    v = torch.randn(ref.W, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    name = "weights changed in place after construction"
    checks = {
        "H@V": (lambda: H @ v, ref.H @ v),
        "loss": (lambda: H.loss(), torch.tensor(ref.loss, dtype=F64)),
        "gradient": (lambda: H.gradient(), ref.g),
        "solve": (lambda: H.solve(v, damping=1e-3), None),
    }
    for q, (fn, want) in checks.items():

        def judge(val, want=want, q=q):
            if q == "solve":
                return _solve_judge(ref, 1e-3, val, v)
            err = float(torch.linalg.norm(val.to(F64) - want) / torch.linalg.norm(want))
            return err <= 1e-10, {"rel_error_vs_new_weights": err}

        recs.append(_r(name, q, "float64", None, outcome(fn, judge, True)))
    return recs


def all_problems() -> list:
    """Every off-path case that is a whole problem (evaluated like the random networks)."""
    probs = structural_problems() + case_singular_small_eigs() + gn_problems()
    probs += woodbury_problems()
    X, y = _data(3, 3, 2)
    big = _problem("damping +-1e18", _mlp(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)),
                   nn.MSELoss(), X, y, refusal_ok=False, dampings=[1e18, -1e18])  # fmt: skip
    return probs + [big]


def run_offpath() -> list[dict]:
    """All off-path records (problem evaluations and the special rules)."""
    recs = []
    scaled, cons = case_loss_scales()
    for p in all_problems() + scaled:
        recs += evaluate(p)
    recs += cons + case_singular_in_range() + case_input_checks() + case_stale()
    recs += case_damping_search() + case_huge()
    return recs
