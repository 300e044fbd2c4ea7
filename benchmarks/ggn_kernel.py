"""Gauss-Newton solves: the kernel form vs the lifted system vs dense, one thread, float64.

Cases (damping 1e-3, one right-hand side):

* ``mlp371``: tanh MLP 2-10-10-10-10-1 (``W = 371``), 49 samples on a 7 x 7 grid, MSE;
* ``digits_conv98``: one ``Conv2d(1, 2, 7, bias=False)`` + ``Flatten`` (``W = 98``,
  8 outputs) on all 1797 scikit-learn digits, cross-entropy on ``label mod 8``.

Each method runs in its own subprocess (so the peak resident memory, ``ru_maxrss``,
is its own), first once on 8 samples (torch.func's first call costs seconds), then
``--repeats`` times from a fresh operator; medians are reported (one run for the
lifted digits case):

* ``kernel``: ``GaussNewton`` + ``solve(method="kernel")`` (``J``, ``B = L^{1/2} J``,
  the SVD, the solve);
* ``lifted``: ``GaussNewton`` + ``solve(method="lifted")`` (the stage blocks and the
  pivoted factorization of the lifted system; what ``GaussNewton`` did before);
* ``dense``: ``GaussNewton`` + ``solve(method="dense")`` (``G`` formed, LU);

and ``next``: a second solve at another damping on the same operator (the kernel
reuses its SVD; the lifted route refactors; dense re-forms ``G`` from ``B`` and refactors).

Usage: ``python benchmarks/ggn_kernel.py [--quick] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import hessinv

HERE = Path(__file__).resolve().parent
DT = torch.float64


def case(name: str, quick: bool):  # noqa: ANN201
    torch.manual_seed(0)
    if name == "mlp371":
        g = torch.linspace(-1, 1, 7, dtype=DT)
        X = torch.cartesian_prod(g, g)
        y = (torch.sin(3 * X[:, 0]) * torch.cos(2 * X[:, 1])).unsqueeze(1)
        mods = [nn.Linear(2, 10), nn.Tanh()]
        for _ in range(3):
            mods += [nn.Linear(10, 10), nn.Tanh()]
        mods.append(nn.Linear(10, 1))
        return nn.Sequential(*mods).to(DT), nn.MSELoss(reduction="sum"), X, y
    from sklearn.datasets import load_digits

    d = load_digits()
    n = 200 if quick else len(d.target)
    X = torch.tensor(d.images[:n], dtype=DT).unsqueeze(1) / 16.0
    y = torch.tensor(d.target[:n]) % 8
    model = nn.Sequential(nn.Conv2d(1, 2, 7, bias=False), nn.Flatten()).to(DT)
    return model, nn.CrossEntropyLoss(), X, y


def timed(name: str, method: str, quick: bool, n: int | None = None) -> dict:
    model, loss, X, y = case(name, quick)
    if n is not None:
        X, y = X[:n], y[:n]
    d = 1e-3
    out: dict = {}
    t0 = time.perf_counter()
    op = hessinv.GaussNewton(model, loss, X, y)
    g = torch.randn(op.num_params, dtype=DT, generator=torch.Generator().manual_seed(0))
    x = op.solve(g, damping=d, method=method)
    out["seconds"] = time.perf_counter() - t0
    r = op @ x + d * x - g
    out["residual"] = float(torch.linalg.norm(r) / torch.linalg.norm(g))
    t1 = time.perf_counter()
    op.solve(g, damping=10 * d, method=method)
    out["next_seconds"] = time.perf_counter() - t1
    out["W"] = op.num_params
    out["N"] = X.shape[0]
    return out


def run_one(name: str, method: str, quick: bool, repeats: int) -> dict:
    """Warm up (torch.func's first call costs seconds) on 8 samples, then time in-process."""
    torch.set_num_threads(1)
    timed(name, method, quick, n=8)
    runs = [timed(name, method, quick) for _ in range(repeats)]
    out = dict(runs[0])
    for key in ("seconds", "next_seconds"):
        out[key] = statistics.median(r[key] for r in runs)
    out["residual"] = max(r["residual"] for r in runs)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--one", nargs=2, metavar=("CASE", "METHOD"))
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(run_one(a.one[0], a.one[1], a.quick, a.repeats)))
        return {}
    rows = []
    reps = 1 if a.quick else a.repeats
    for name in ("mlp371", "digits_conv98"):
        row: dict = {"case": name}
        for method in ("kernel", "lifted", "dense"):
            n_rep = 1 if (method == "lifted" and name == "digits_conv98") else reps
            cmd = [sys.executable, __file__, "--one", name, method, "--repeats", str(n_rep)]
            cmd += ["--quick"] if a.quick else []
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            r = json.loads(res.stdout.strip().splitlines()[-1])
            row["W"], row["N"] = r.pop("W"), r.pop("N")
            row[method] = r
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "quick" if a.quick else "cpu"
    meta = {"torch": torch.__version__, "machine": platform.machine(), "threads": 1}
    (out / f"ggn_kernel_{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "| case | W | N | kernel s (next) | lifted s (next) | dense s (next) | peak MiB k/l/d |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        k, li, de = r["kernel"], r["lifted"], r["dense"]
        lines.append(
            f"| {r['case']} | {r['W']} | {r['N']} | {k['seconds']:.3g} ({k['next_seconds']:.2g})"
            f" | {li['seconds']:.3g} ({li['next_seconds']:.2g}) | {de['seconds']:.3g} "
            f"({de['next_seconds']:.2g}) | {k['peak_rss_mib']:.0f} / "
            f"{li['peak_rss_mib']:.0f} / {de['peak_rss_mib']:.0f} |"
        )
    (out / f"ggn_kernel_{tag}.md").write_text("\n".join(lines) + "\n")
    return {"rows": rows}


if __name__ == "__main__":
    main()
