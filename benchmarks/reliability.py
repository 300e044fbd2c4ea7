"""Reliability campaign: is every answer of hessinv exact, or a clear error?

``python benchmarks/reliability.py`` (about 10-20 minutes on 2 busy cores) runs
a fixed-seed campaign of 1000 random networks plus the named off-path cases of
the issue "Exact or a clear error", compares every quantity with an
independent dense reference, and writes ``benchmarks/results/reliability.json``
(aggregate counts, and the details of every outcome that is neither correct
nor a justified refusal) and ``benchmarks/results/reliability.md`` (the
tables, also printed). ``--quick N`` runs the first ``N`` networks only.

**Random networks** (:mod:`reliability_nets`): 45% MLPs, 20% Conv1d/Conv2d
then MLP, 25% functional ``hessinv.Stage`` pipelines whose stages have nonzero
``Txx`` (parameters entering nonlinearly: ``act(s W z + b)``, residual
``z + s act(W z + b)``, ``act(W z + b^2)``), 10% one-sample pipelines with one
parameter per activation (the paper's Section 6 assumptions, where
``method="woodbury"`` is tried too). Depth 1-40 parameter layers, uneven
widths 1-12 (capped so that ``W`` stays around 600 or less), batch 1-10, every
supported activation (Tanh, Sigmoid, GELU, SiLU, Softplus, ELU, ReLU,
LeakyReLU, Mish, Softsign, Softmax(dim=1)), LayerNorm and BatchNorm1d (eval)
layers, the losses MSE / CrossEntropy / BCEWithLogits / NLL (after
LogSoftmax) with ``sum`` or ``mean``, weight gains ``U(0.1, 3)``, a loss scale
``c = 10^U(-12, 12)`` on half of the networks, dampings ``0``, ``+||H||
10^U(-8,0)``, ``-||H|| 10^U(-8,0)`` and one within ``||H|| 10^U(-10,-2)`` of
``-lambda_k`` for a random eigenvalue ``lambda_k`` of ``H``. Weights, inputs
and targets are rounded to float32 once, so that the float64 and float32 runs
describe the same problem and share one reference.

**Reference** (:mod:`reliability_ref`): the loss as a function of the flat
parameters (``torch.func.functional_call`` on the model, with ``nn.LayerNorm``
replaced by an elementary one, or the stage functions composed directly);
``torch.func.hessian`` in float64 gives ``H`` and ``torch.linalg.eigvalsh``
its eigenvalues ``lambda_i``; ``mu_i = lambda_i + d``, ``A = H + dI``. The
same autodiff in float32 gives ``H32`` (the dense float32 method), whose
relative spectral-norm distance to ``H`` is the measured forming error
``delta`` (float64's is ``delta * eps64 / eps32``).

**Criteria** (``eps`` of the run's dtype, ``b = W eps ||A|| + 10 delta ||H||``
the undecidable band):

* gradient, ``H @ V`` (3 random columns), diagonal: ``||q - q_ref|| <= 100 (eps
  ||q_ref|| + (eps / eps32) ||q_ref32 - q_ref||)``, i.e. 100 times the error of
  the dense float32 autodiff, scaled to the run's eps (the measured condition
  factor), floored at ``100 eps ||q_ref||``;
* solve (the default method, ``method="lifted"``, and ``"woodbury"`` where
  applicable; right-hand sides ``[g, random]``): the normwise backward error
  ``||A x - g|| / (||A|| ||x|| + ||g||)``, in float64, at most ``100 max(BE of a
  dense LU solve in the run's dtype of the Hessian formed in that dtype, 4 eps)``;
* inertia: eigenvalues with ``|mu| <= b`` are undecidable and may be counted
  as any sign or zero; all others must be counted exactly (``b`` is the issue's
  ``tau ||H + dI||`` with ``tau = W eps``, plus the forming error);
* logdet: the sign exact unless some ``|mu_i| <= b``; ``log|det|`` within
  ``sum_i -log(1 - 100 b / |mu_i|) + 100 eps sum_i |log |mu_i||`` (the
  eigenvalue perturbation bound with ``|delta mu| <= 100 b``), undecidable if
  some ``|mu_i| <= 100 b``; ``(0, -inf)`` counts as a value;
* ``is_positive_definite()`` (when the factorization has it): ``True`` only if
  ``min mu > -b``, ``False`` only if ``min mu < b``, ``None`` always accepted.

**Outcome classes** (:mod:`reliability_eval`): ``correct``; ``clear_error`` (an
exception class defined in hessinv, or ``ValueError``/``TypeError``/
``MemoryError``, with a message, that is justified: for the solve, logdet and
inertia, ``sigma_min(A) <= 1e3 eps ||A||`` (``cond >= 1e-3/eps``) or
``sigma_min(A) <= 10 delta ||H||``; any clear refusal of a case hessinv may
legitimately refuse (sample-mixing models, tied weights, ...; Section 6's
assumptions for Woodbury)); ``false_refusal`` (a clear refusal that is not
justified); ``unclear_error`` (any other exception); ``wrong_warned`` (a wrong
value with a hessinv warning); ``silently_wrong`` (a wrong value, no warning).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

N_DEFAULT = 1000
BAD = ("false_refusal", "unclear_error", "wrong_warned", "silently_wrong")


def _init_worker() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))


def run_seed(seed: int) -> tuple[dict, list[dict], float]:
    """``(meta, records, seconds)`` of random network ``seed``."""
    _init_worker()
    import torch
    from reliability_eval import evaluate, exc_info
    from reliability_nets import random_problem

    t = time.time()
    try:
        p = random_problem(seed)
    except Exception as e:  # noqa: BLE001 - a reference that cannot be built is reported
        return {"seed": seed, "reference_failed": exc_info(e)}, [], time.time() - t
    recs = evaluate(p)
    for r in recs:
        r["seed"] = seed
    p.meta["forming_error_f32"] = p.ref.forming_error(torch.float32)
    return p.meta, recs, time.time() - t


def run_offpath_records() -> list[dict]:
    _init_worker()
    from reliability_cases import run_offpath

    return run_offpath()


def _compact(r: dict) -> dict:
    """A bad record without the long texts: numbers, exception, message start, warned."""
    det = {k: v for k, v in r["detail"].items() if k not in ("warnings", "message", "where")}
    if r["detail"].get("message"):
        det["message"] = r["detail"]["message"][:90]
    det["warned"] = bool(r["detail"].get("warnings"))
    keys = ("seed", "case", "quantity", "dtype", "damping", "outcome")
    return {k: r[k] for k in keys if k in r} | {"detail": det}


KEEP = {"silently_wrong": 200, "unclear_error": 200, "wrong_warned": 30, "false_refusal": 30}


def trim(bad: list[dict]) -> list[dict]:
    """At most ``KEEP[outcome]`` detailed records per quantity, dtype and outcome (all counted)."""
    seen: collections.Counter = collections.Counter()
    out = []
    for r in bad:
        key = (r["quantity"], r["dtype"], r["outcome"])
        seen[key] += 1
        if seen[key] <= KEEP.get(r["outcome"], 30):
            out.append(r)
    return out


def counts(recs: list[dict]) -> dict:
    """``{quantity: {dtype: {outcome: n}}}``."""
    c: dict = collections.defaultdict(lambda: collections.defaultdict(collections.Counter))
    for r in recs:
        c[r["quantity"]][r["dtype"]][r["outcome"]] += 1
    return {q: {d: dict(v) for d, v in sorted(dd.items())} for q, dd in sorted(c.items())}


def table(cnt: dict) -> str:
    from reliability_eval import CLASSES

    lines = [
        "| quantity | dtype | " + " | ".join(CLASSES) + " |",
        "|---|---|" + "---|" * len(CLASSES),
    ]
    for q, dd in cnt.items():
        for d, oc in dd.items():
            lines.append(f"| {q} | {d} | " + " | ".join(str(oc.get(k, 0)) for k in CLASSES) + " |")
    return "\n".join(lines)


def offpath_table(recs: list[dict]) -> str:
    agg: dict = collections.defaultdict(collections.Counter)
    for r in recs:
        agg[(r["case"], r["quantity"], r["dtype"])][r["outcome"]] += 1
    lines = ["| case | quantity | dtype | outcomes |", "|---|---|---|---|"]
    for (case, q, d), oc in agg.items():
        s = ", ".join(f"{k} {v}" for k, v in sorted(oc.items()))
        lines.append(f"| {case} | {q} | {d} | {s} |")
    return "\n".join(lines)


def failure_modes(recs: list[dict]) -> dict:
    """Bad outcomes grouped by ``quantity/dtype/outcome/exception-or-warning``."""
    modes: collections.Counter = collections.Counter()
    for r in recs:
        if r["outcome"] in BAD:
            det = r["detail"]
            why = det.get("exception") or ("warned" if det.get("warnings") else "value")
            msg = (det.get("message") or "")[:40]
            modes[f"{r['quantity']}/{r['dtype']}/{r['outcome']}/{why} {msg}".strip()] += 1
    return dict(modes.most_common())


CAPTION = (
    "Outcome classes per quantity and dtype. correct: within 100x of the dense method in "
    "the same dtype (solve: normwise backward error vs a dense LU; gradient, H@V, diagonal: "
    "error vs the float64 torch.func reference within 100 (eps ||ref|| + (eps/eps32) "
    "||ref32 - ref||)); inertia: exact outside the undecidable band |mu| <= b = W eps ||H+dI|| "
    "+ 10 delta ||H|| (delta: measured error of forming H in that dtype); logdet: sign exact "
    "outside the band, log|det| within the eigenvalue perturbation bound for 100 b. "
    "clear_error: a hessinv/ValueError/TypeError/MemoryError with a message, justified "
    "(cond(H + dI) >= 1e-3/eps, or a case hessinv may refuse); false_refusal: a clear "
    "refusal of a well-conditioned problem; unclear_error: any other exception; "
    "wrong_warned: a wrong value with a hessinv warning; silently_wrong: a wrong value. "
    "Criteria in full: the docstring of benchmarks/reliability.py."
)


def by_case(off: list[dict]) -> str:
    """One row per off-path case: its outcome counts over quantities, dtypes and dampings."""
    from reliability_eval import CLASSES

    agg: dict = {}
    for r in off:
        agg.setdefault(r["case"], collections.Counter())[r["outcome"]] += 1
    lines = ["| case | outcomes (all quantities, dtypes, dampings) |", "|---|---|"]
    for case, c in agg.items():
        lines.append(f"| {case} | " + ", ".join(f"{k} {c[k]}" for k in CLASSES if c[k]) + " |")
    return "\n".join(lines)


def offpath_summary(off: list[dict], seconds: float) -> dict:
    return {
        "seconds": round(seconds, 1),
        "by_case": by_case(off),
        "counts": counts(off),
        "failure_modes": failure_modes(off),
        "table": offpath_table(off),
        "records": [_compact(r) for r in off if r["outcome"] != "correct"],
    }


def render(out: dict) -> str:
    """The Markdown tables of a campaign result."""
    s = out["seeds"]
    md = [
        "# Reliability campaign",
        "",
        f"{out['networks']} random networks (seeds {s[0]}..{s[-1]}), {out['seconds']} s. "
        + CAPTION,
        "",
        "## Random networks",
        "",
        table(out["random"]["counts"]),
        "",
    ]
    if out.get("offpath", {}).get("counts"):
        o = out["offpath"]
        md += ["## Off-path cases", "", o.get("by_case", ""), "", table(o["counts"]), "",
               "### Per case, quantity and dtype", "", o["table"], ""]  # fmt: skip
    return "\n".join(md)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", type=int, default=None, help="only the first N random networks")
    ap.add_argument("--seed0", type=int, default=0, help="first seed")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes")
    ap.add_argument("--no-offpath", action="store_true", help="skip the named off-path cases")
    ap.add_argument(
        "--offpath-only",
        action="store_true",
        help="rerun only the off-path cases and update an existing result in --out",
    )
    ap.add_argument("--out", default=str(HERE / "results"), help="output folder")
    args = ap.parse_args(argv)
    t0 = time.time()
    if args.offpath_only:
        out = json.loads(Path(args.out, "reliability.json").read_text())
        out["offpath"] = offpath_summary(run_offpath_records(), time.time() - t0)
        return _write(out, args.out)
    n = args.quick if args.quick is not None else N_DEFAULT
    seeds = list(range(args.seed0, args.seed0 + n))
    results = []
    off: list[dict] = []
    if args.jobs > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.jobs, initializer=_init_worker) as pool:
            fut = None if args.no_offpath else pool.apply_async(run_offpath_records)
            for res in pool.imap_unordered(run_seed, seeds, chunksize=4):
                results.append(res)
                if len(results) % 50 == 0:
                    print(f"{len(results)}/{n} networks, {time.time() - t0:.0f} s", file=sys.stderr)
            off = [] if fut is None else fut.get()
    else:
        results = [run_seed(s) for s in seeds]
        off = [] if args.no_offpath else run_offpath_records()
    results.sort(key=lambda r: r[0]["seed"])
    recs = [r for _, rs, _ in results for r in rs]
    metas = {m["seed"]: m for m, _, _ in results}
    bad = [_compact(r) for r in recs if r["outcome"] in BAD]
    clear: collections.Counter = collections.Counter()
    for r in recs:
        if r["outcome"] == "clear_error":
            clear[f"{r['detail'].get('exception')}: {r['detail'].get('message', '')[:60]}"] += 1
    ws = sorted(m.get("W", 0) for m in metas.values()) or [0]
    out = {
        "networks": n,
        "seeds": [seeds[0], seeds[-1]] if seeds else [0, -1],
        "seconds": round(time.time() - t0, 1),
        "reference_failed": [m for m in metas.values() if "reference_failed" in m],
        "random": {
            "counts": counts(recs),
            "failure_modes": failure_modes(recs),
            "clear_errors": dict(clear.most_common()),
            "bad": trim(bad),
            "bad_networks": {r["seed"]: metas[r["seed"]] for r in trim(bad)},
            "float32_forming_error_above_1e-3": sum(
                1 for m in metas.values() if m.get("forming_error_f32", 0.0) > 1e-3
            ),
            "W": {"max": ws[-1], "median": ws[len(ws) // 2]},
        },
        "offpath": offpath_summary(off, 0.0) if off else {},
    }
    return _write(out, args.out)


def _write(out: dict, folder: str) -> dict:
    text = render(out)
    print(text)
    Path(folder).mkdir(parents=True, exist_ok=True)
    Path(folder, "reliability.json").write_text(json.dumps(out, separators=(",", ":"), default=str))
    Path(folder, "reliability.md").write_text(text)
    return out


if __name__ == "__main__":
    main()
