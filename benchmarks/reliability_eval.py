"""Run every quantity of a :class:`~reliability_nets.Problem` and classify each outcome.

Outcome classes (per case, quantity and dtype):

* ``correct``: a value that meets the criterion of :mod:`reliability_ref`;
* ``clear_error``: a refusal that is clear (an exception class defined in
  hessinv, or ``ValueError``/``TypeError``/``MemoryError``, with a message) and
  justified (the reference finds the matrix ill-conditioned, or the case is
  one hessinv may legitimately refuse);
* ``false_refusal``: a clear refusal that is not justified;
* ``unclear_error``: any other exception;
* ``wrong_warned``: a wrong value returned with a hessinv warning (still a
  failure of "exact or a clear error", but not silent);
* ``silently_wrong``: a wrong value returned without a warning.
"""

from __future__ import annotations

import math
import traceback
import warnings
from collections.abc import Callable

import torch
from reliability_nets import Problem
from reliability_ref import (
    CLEAR_BUILTINS,
    F32,
    F64,
    inertia_ok,
    logdet_ok,
    pd_ok,
    refusal_justified,
    solve_ok,
    vector_ok,
)

CLASSES = [
    "correct", "clear_error", "false_refusal", "unclear_error", "wrong_warned", "silently_wrong",
]  # fmt: skip
DTYPE_NAME = {F64: "float64", F32: "float32"}


def is_clear(e: BaseException) -> bool:
    """A hessinv exception class, or ValueError/TypeError/MemoryError, with a message."""
    mod = type(e).__module__ or ""
    return (type(e) in CLEAR_BUILTINS or mod.startswith("hessinv")) and bool(str(e).strip())


def attempt(fn: Callable):
    """``(value, exception, hessinv_warnings)`` of ``fn()``."""
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        try:
            v = fn()
            exc = None
        except Exception as e:  # noqa: BLE001 - every exception is an outcome
            v, exc = None, e
    hw = [
        str(w.message)[:200]
        for w in ws
        if type(w.message).__module__.startswith("hessinv") or "hessinv" in str(w.filename)
    ]
    return v, exc, hw


def exc_info(e: BaseException) -> dict:
    tb = traceback.extract_tb(e.__traceback__)
    where = f"{tb[-1].filename.split('/')[-1]}:{tb[-1].lineno}" if tb else ""
    return {"exception": type(e).__name__, "message": str(e)[:300], "where": where}


def classify_exc(e: BaseException, justified: bool) -> str:
    if is_clear(e):
        return "clear_error" if justified else "false_refusal"
    return "unclear_error"


def outcome(fn: Callable, judge: Callable, justified: bool):
    """Run ``fn``; judge a value with ``judge(v) -> (ok, detail)``."""
    v, e, hw = attempt(fn)
    if e is not None:
        return classify_exc(e, justified), exc_info(e) | {"warnings": hw}
    try:
        ok, det = judge(v)
    except Exception as je:  # noqa: BLE001 - a malformed value is wrong, not a crash
        ok, det = False, {"judge_failed": f"{type(je).__name__}: {je}"[:300]}
    if ok:
        return "correct", det
    return ("wrong_warned" if hw else "silently_wrong"), det | {"warnings": hw}


def _rhs(p: Problem, dt: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    r = torch.randn(p.ref.W, 1, generator=gen, dtype=F64)
    return torch.cat([p.ref.g.reshape(-1, 1), r], dim=1).to(dt)


def evaluate(p: Problem, quantities: set[str] | None = None) -> list[dict]:
    """Records ``{case, quantity, dtype, damping, outcome, detail}`` for every quantity."""
    recs: list[dict] = []

    def rec(q: str, dt: torch.dtype, d: float | None, res) -> None:
        """Record ``res`` (an outcome, or a thunk computing it only if ``q`` is wanted)."""
        if quantities is None or q in quantities:
            res = res() if callable(res) else res
            recs.append(
                {
                    "case": p.name,
                    "quantity": q,
                    "dtype": DTYPE_NAME[dt],
                    "damping": d,
                    "outcome": res[0],
                    "detail": res[1],
                }  # fmt: skip
            )

    for dt in p.dtypes:
        H, e, hw = attempt(lambda dt=dt: p.make_op(dt))
        if e is not None:
            res = (classify_exc(e, p.refusal_ok), exc_info(e) | {"stage": "construction"})
            for q in ["gradient", "H@V", "diagonal"]:
                rec(q, dt, None, res)
            for d in p.dampings:
                for q in ["solve", "solve_lifted", "logdet", "inertia"]:
                    rec(q, dt, d, res)
            continue
        _products(p, H, dt, rec)
        G = _rhs(p, dt)
        for d in p.dampings:
            _factored(p, H, dt, d, G, rec)
    for r in recs:
        r["detail"] = _jsonable(r["detail"])
    return recs


def _products(p: Problem, H, dt: torch.dtype, rec: Callable) -> None:
    """Gradient, ``H @ V`` (3 random columns) and the diagonal."""
    ref = p.ref
    judge_g = lambda v: vector_ok(v, ref.g, ref.g32, dt)  # noqa: E731
    rec("gradient", dt, None, lambda: outcome(H.gradient, judge_g, False))
    V = torch.randn(ref.W, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    hv32 = None if ref.H32 is None else ref.H32 @ V.to(F32)
    rec(
        "H@V", dt, None,
        lambda: outcome(lambda: H @ V.to(dt), lambda v: vector_ok(v, ref.H @ V, hv32, dt), False),
    )  # fmt: skip
    d32 = None if ref.H32 is None else torch.diagonal(ref.H32)
    rec(
        "diagonal", dt, None,
        lambda: outcome(H.diagonal, lambda v: vector_ok(v, torch.diagonal(ref.H), d32, dt), False),
    )  # fmt: skip


def _factored(p: Problem, H, dt: torch.dtype, d: float, G: torch.Tensor, rec: Callable) -> None:
    """Solves (default, lifted, woodbury), logdet, inertia, PD verdict at damping ``d``."""
    ref = p.ref
    just = refusal_justified(ref, d, dt) or p.refusal_ok

    def judge_x(x):
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != tuple(G.shape):
            return False, {"shape": str(getattr(x, "shape", type(x)))}
        return solve_ok(ref, d, x, G, dt)

    def solve(method: str | None, justified: bool):
        kw = {} if method is None else {"method": method}
        return lambda: outcome(lambda: H.solve(G, damping=d, **kw), judge_x, justified)

    rec("solve", dt, d, solve(None, just))
    rec("solve_lifted", dt, d, solve("lifted", just))
    if p.woodbury:
        rec("solve_woodbury", dt, d, solve("woodbury", True))

    def judge_logdet(v):
        return logdet_ok(ref, d, v, dt)

    def judge_inertia(v):
        return inertia_ok(ref, d, v, dt)

    rec("logdet", dt, d, lambda: outcome(lambda: H.logdet(d), judge_logdet, just))
    rec("inertia", dt, d, lambda: outcome(lambda: H.inertia(d), judge_inertia, just))
    fac, _, _ = attempt(lambda: H.factor(d))
    if fac is not None and hasattr(fac, "is_positive_definite"):  # the solver protocol's verdict

        def judge_pd(v):
            return pd_ok(ref, d, v, dt)

        rec("is_positive_definite", dt, d,
            lambda: outcome(fac.is_positive_definite, judge_pd, just))  # fmt: skip


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, (bool, int, float, str)) or x is None:
        return x
    return str(x)
