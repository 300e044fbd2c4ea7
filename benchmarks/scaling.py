"""Scaling benchmark: exact lifted solve vs dense solve vs MINRES, against depth and batch.

For tanh MLPs (width 4, 8, 16; batch 2 and 8; depth 8..1024; float64; damping
1e-3, as in the paper author's own measurements) it times, side by side in one
run, the medians of 5 repetitions of

* ``build``: the operator (forward pass and all per-stage derivative blocks),
* ``factor``: the pivoted factorization of the lifted system,
* ``solve``: one right-hand side with the default checks on (the Lanczos
  norm estimate, the inverse-iteration singularity check, up to two steps of
  iterative refinement, each one ``H @ v`` and one pass over the factors, and
  the backward-error check),
* ``autograd H@v``: one Hessian-vector product by double backward through
  the same network (forward pass, gradient with ``create_graph``, product),
  the unit of issue #12's targets: ``total / autograd H@v`` is reported,
* ``dense``: forming ``H`` (``H.to_dense()``) and ``torch.linalg.solve`` (LAPACK's
  LU, what a user without hessinv would do; while ``W <= --dense-max``),
* ``minres``: MINRES on the exact ``H @ v``, one run each to ``--minres-rtol``
  (1e-10) and, if that was reached, to the lifted solve's own residual, each
  capped at ``--minres-seconds``; its ``H @ v`` count and whether it got there
  are reported,

plus the peak memory (resident set size above the baseline, sampled) of
build + factor + solve, and a batch sweep at fixed depth. It writes
``results/scaling_<device>.json`` and log-log PNG plots.

``--issue`` runs only issue #12's cases (width 16 batch 2 depth 128; width
4 batch 2 depth 512; width 16 batch 8 depth 64; on CUDA also width 16 batch
64 depth 128) into ``results/scaling_issue_<device>.{json,md}``. Timed runs
use one thread on the CPU (``torch.set_num_threads(1)`` when run as a
script) and record the load average.

Usage: ``python benchmarks/scaling.py [--quick] [--issue] [--device cuda]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import hessinv
from hessinv.baselines import minres
from hessinv.cli import make_mlp

HERE = Path(__file__).resolve().parent
PAPER = {  # the paper author's code, float64, batch 2, damping 1e-3, build + solve (issue #3)
    (4, 128): 2.2,
    (4, 512): 21.7,
    (16, 128): 4.8,
}


def vm_kib(field: str) -> int:
    """A field of /proc/self/status (VmRSS, VmHWM), in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def exercise(
    width: int, batch: int, depth: int, what: str, gain: float, damping: float, device: str
) -> None:
    """One build + factor + solve (``what="exact"``) or build + dense solve."""
    model, loss, X, y = make_mlp(depth, width, batch, dtype=torch.float64, device=device, gain=gain)
    H = hessinv.Hessian(model, loss, X, y)
    g = H.gradient()
    if what == "exact":
        H.factor(damping).solve(g, check=False)
    else:
        dense_lu_solve(H, g, damping)


def dense_lu_solve(H: hessinv.Hessian, g: torch.Tensor, damping: float) -> torch.Tensor:
    """What a user without hessinv does: form ``H + dI`` densely and LU-solve (no checks).

    ``H.to_dense()`` forms ``H`` from the blocks (``W`` columns of ``H @ v``, batched);
    ``torch.linalg.solve`` is LAPACK's partial-pivoting LU.
    """
    a = H.to_dense()
    a.diagonal().add_(damping)
    return torch.linalg.solve(a, g)


def memory_child(width: int, batch: int, depth: int, what: str, gain: float, damping: float) -> int:
    """Peak bytes of :func:`exercise` in this (fresh) process, from its high-water mark."""
    for kind in ("exact", "dense"):  # torch.func's first-call cost, not counted
        exercise(3, 2, 4, kind, 1.0, 1.0, "cpu")
    base = vm_kib("VmHWM")
    exercise(width, batch, depth, what, gain, damping, "cpu")
    return (vm_kib("VmHWM") - base) * 1024


def first_call_child(width: int, batch: int, depth: int, damping: float, gain: float) -> str:
    """``"first warm"`` seconds of ``Hessian(...)`` + default solve, in this fresh process.

    ``import torch, hessinv`` is done before the clock starts; the first call then
    pays whatever torch and hessinv initialise lazily, the second (a new
    ``Hessian`` of the same network) does not.
    """
    model, loss, X, y = make_mlp(depth, width, batch, dtype=torch.float64, device="cpu", gain=gain)
    out = []
    for _ in range(2):
        gc.collect()
        t0 = time.perf_counter()
        H = hessinv.Hessian(model, loss, X, y)
        H.solve(H.gradient(), damping=damping)
        out.append(time.perf_counter() - t0)
        del H  # freed before the next call's clock starts
    return f"{out[0]} {out[1]}"


def first_call(width: int, batch: int, depth: int, args: argparse.Namespace, reps: int = 3) -> dict:
    """First and warm call of :func:`first_call_child`, medians over ``reps`` fresh processes.

    Each process runs with one thread; the medians are taken per column (first,
    warm, and their difference per process).
    """
    cmd = [sys.executable, __file__, "--first-call-child", str(width), str(batch), str(depth)]
    cmd += ["--gain", str(args.gain), "--damping", str(args.damping)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    runs = []
    for _ in range(reps):
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        runs.append(tuple(map(float, out.stdout.strip().splitlines()[-1].split())))
    return {
        "width": width,
        "batch": batch,
        "depth": depth,
        "first_call_s": statistics.median(f for f, _ in runs),
        "warm_call_s": statistics.median(w for _, w in runs),
        "first_call_extra_s": statistics.median(f - w for f, w in runs),
        "processes": reps,
    }


def peak_memory(width: int, batch: int, depth: int, what: str, args: argparse.Namespace) -> int:
    """Peak memory of :func:`exercise`: the CUDA allocator, or a fresh CPU process.

    ``-1`` (not measured) under ``--no-memory`` (the default of ``--quick``): on the CPU each
    measurement is a fresh Python process, seconds of start-up per case.
    """
    if args.no_memory:
        return -1
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        exercise(width, batch, depth, what, args.gain, args.damping, args.device)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    cmd = [
        sys.executable,
        __file__,
        "--memory-child",
        str(width),
        str(batch),
        str(depth),
        what,
        "--gain",
        str(args.gain),
        "--damping",
        str(args.damping),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def _mib(b: int) -> str:
    return "-" if b < 0 else f"{b / 2**20:.0f}"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


#: The clock of :func:`timed`: wall time, or (``--clock process``, one thread on a loaded
#: CPU) the process's CPU time, which other processes' load does not inflate as much.
CLOCK = {"wall": time.perf_counter, "process": time.process_time}
_clock = time.perf_counter


def timed(fn, device: str):  # noqa: ANN001, ANN201
    sync(device)
    t0 = _clock()
    out = fn()
    sync(device)
    return out, _clock() - t0


def autograd_hvp(model: torch.nn.Module, loss: torch.nn.Module, X, y, v: list) -> list:  # noqa: ANN001
    """One Pearlmutter product ``H v`` by double backward, from the forward pass on."""
    params = list(model.parameters())
    out = loss(model(X), y)
    grads = torch.autograd.grad(out, params, create_graph=True)
    return list(torch.autograd.grad(grads, params, grad_outputs=v))


def run_case(width: int, batch: int, depth: int, args: argparse.Namespace) -> dict:
    dev, d = args.device, args.damping
    model, loss, X, y = make_mlp(
        depth, width, batch, dtype=torch.float64, device=dev, gain=args.gain
    )
    rec: dict = {"width": width, "batch": batch, "depth": depth}
    vs = [torch.randn_like(p) for p in model.parameters()]
    t_build, t_fac, t_solve, t_hvp, t_inert, t_call = [], [], [], [], [], []
    if args.issue:  # the autograd H @ v timed back to back with itself (a warm allocator)
        autograd_hvp(model, loss, X, y, vs)
        t_b2b = [timed(lambda: autograd_hvp(model, loss, X, y, vs), dev)[1] for _ in range(5)]
        rec["autograd_hvp_b2b_s"] = statistics.median(t_b2b)
    for rep in range(args.reps):
        if rep >= 3 and sum(t_build) + sum(t_fac) + sum(t_solve) > 3 * args.slow_seconds:
            break  # a slow case: median of 3 (recorded in "reps")
        _, th = timed(lambda: autograd_hvp(model, loss, X, y, vs), dev)
        H, tb = timed(lambda: hessinv.Hessian(model, loss, X, y), dev)
        g, tg = timed(H.gradient, dev)
        fac, tf = timed(lambda H=H: H.factor(d), dev)
        x, ts = timed(lambda fac=fac, g=g: fac.solve(g), dev)  # default checks on
        if args.issue and rep < args.inertia_reps:  # the inertia of this factorization
            _, ti = timed(lambda fac=fac: fac.inertia(), dev)
            t_inert.append(ti)
        t_hvp.append(th)
        t_build.append(tb)
        t_fac.append(tf)
        t_solve.append(ts)
        t_call.append(tb + tg + tf + ts)  # one call: Hessian, gradient, factor, solve
        del fac
        H._factors.clear()
        gc.collect()
    rec["autograd_hvp_s"] = statistics.median(t_hvp)
    res = float(H.residual(x[:, None], g[:, None], d)[0])
    rec["params"] = H.num_params
    del x
    gc.collect()
    # memory in a separate, untimed run: a fresh process on the CPU (its high-water mark
    # is not hidden by memory the allocator kept from earlier cases), the allocator on CUDA
    rec["peak_memory_bytes"] = peak_memory(width, batch, depth, "exact", args)
    rec.update(
        reps=len(t_build),
        build_s=statistics.median(t_build),
        factor_s=statistics.median(t_fac),
        solve_s=statistics.median(t_solve),
        residual=res,
    )
    if t_inert:
        rec["inertia_s"] = statistics.median(t_inert)
        rec["inertia_over_factor"] = rec["inertia_s"] / rec["factor_s"]
    rec["total_s"] = rec["build_s"] + rec["factor_s"] + rec["solve_s"]
    rec["total_over_hvp"] = rec["total_s"] / rec["autograd_hvp_s"]
    if args.issue:  # per call (not a sum of per-phase medians), against both H @ v timings
        rec["call_s"] = statistics.median(t_call)
        rec["call_over_hvp"] = rec["call_s"] / rec["autograd_hvp_s"]
        rec["call_over_hvp_b2b"] = rec["call_s"] / rec["autograd_hvp_b2b_s"]
    W = H.num_params
    if W <= args.dense_max:
        td = []
        for _ in range(args.reps):
            xd, t = timed(lambda: dense_lu_solve(H, g, d), dev)
            td.append(t)
        rec["dense_s"] = statistics.median(td) + rec["build_s"]
        rec["dense_peak_memory_bytes"] = peak_memory(width, batch, depth, "dense", args)
        rec["dense_residual"] = float(H.residual(xd[:, None], g[:, None], d)[0])
    if depth <= args.minres_max_depth:

        def mv(v: torch.Tensor) -> torch.Tensor:
            return H.matmat(v[:, None])[:, 0] + d * v

        # (a) to a common practical tolerance, (b) to the exact solve's residual
        for key, target in (("minres", args.minres_rtol), ("minres_same", max(res, 1e-16))):
            (xm, info), t = timed(
                lambda target=target: minres(
                    mv,
                    g,
                    rtol=target,
                    maxiter=args.minres_maxiter,
                    max_seconds=args.minres_seconds,
                ),
                dev,
            )
            rec.update(
                {
                    f"{key}_rtol": target,
                    f"{key}_s": t + rec["build_s"],
                    f"{key}_matvecs": info.matvecs,
                    f"{key}_residual": info.residual,
                    f"{key}_reached": bool(info.residual <= 1.01 * target),
                }
            )
            if not info.residual <= 1.01 * target:
                break
    paper = PAPER.get((width, depth)) if batch == 2 else None
    if paper is not None:
        rec["paper_author_s"] = paper
    return rec


def factor_bytes(width: int, batch: int, depth: int) -> int:
    """Estimated bytes of the lifted factors: ``2 n^2`` float64 per stage, ``n = k + 2 N a``.

    Per stage the ``(v, lam)`` block (``k + m``) and the ``u`` block (``m``)
    store their panel LU and fill-in rows: ``2 (k + 2m)(k + m) + 2 m (k + 2m)``.
    """
    p = width * width + width
    k = min(p, 2 * batch * width)  # directions kept after dropping null ones (lifted.py)
    n = k + 2 * batch * width
    return 8 * 2 * n * n * depth


def fit_slope(rows: list[dict], key: str = "total_s", min_depth: int = 32) -> float:
    pts = [(math.log(r["depth"]), math.log(r[key])) for r in rows if r["depth"] >= min_depth]
    if len(pts) < 2:
        return math.nan
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    num = sum((px - mx) * (py - my) for px, py in pts)
    den = sum((px - mx) ** 2 for px, _ in pts)
    return num / den


def save_figure(fig, axes, path: Path, *, legend_size: int) -> str:  # noqa: ANN001
    """Legends and log grids on ``axes``, then write ``fig`` to ``path`` and close it."""
    import matplotlib.pyplot as plt

    for a in axes:
        a.legend(fontsize=legend_size)
        a.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot(result: dict, out: Path, tag: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    groups: dict[tuple[int, int], list[dict]] = {}
    for r in result["depth_sweep"]:
        groups.setdefault((r["width"], r["batch"]), []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.cm.viridis([i / max(1, len(groups) - 1) for i in range(len(groups))])
    for c, ((w, b), rows) in zip(colors, sorted(groups.items()), strict=True):
        rows = sorted(rows, key=lambda r: r["depth"])
        dep = [r["depth"] for r in rows]
        axes[0].loglog(
            dep,
            [r["total_s"] for r in rows],
            "o-",
            color=c,
            label=f"exact w={w} N={b} (slope {result['slopes'][f'w{w}_b{b}']:.2f})",
        )
        dd = [(r["depth"], r["dense_s"]) for r in rows if "dense_s" in r]
        if dd:
            axes[0].loglog(*zip(*dd, strict=True), "s--", color=c, alpha=0.6)
        mm = [(r["depth"], r["minres_s"]) for r in rows if r.get("minres_reached")]
        if mm:
            axes[0].loglog(*zip(*mm, strict=True), "^:", color=c, alpha=0.6)
        axes[1].loglog(
            dep,
            [max(r["peak_memory_bytes"], 1) / 2**20 for r in rows],
            "o-",
            color=c,
            label=f"exact w={w} N={b}",
        )
        dm = [
            (r["depth"], r["dense_peak_memory_bytes"] / 2**20)
            for r in rows
            if "dense_peak_memory_bytes" in r and r["dense_peak_memory_bytes"] > 0
        ]
        if dm:
            axes[1].loglog(*zip(*dm, strict=True), "s--", color=c, alpha=0.6)
    for (pw, dep), t in PAPER.items():
        axes[0].loglog([dep], [t], "kx", markersize=10)
        axes[0].annotate(
            f"w={pw}", (dep, t), textcoords="offset points", xytext=(6, -4), fontsize=7
        )
    axes[0].plot([], [], "ks--", alpha=0.6, label="dense (forms H)")
    axes[0].plot([], [], "k^:", alpha=0.6, label="MINRES to rtol 1e-10 (where reached)")
    axes[0].plot([], [], "kx", label="paper author's code, N=2")
    axes[0].set(
        xlabel="depth L",
        ylabel="seconds (build + factor + solve)",
        title=f"time, float64, damping {result['damping']:g} [{tag}]",
    )
    axes[1].set(
        xlabel="depth L",
        ylabel="peak memory (MiB)",
        title="peak memory, fresh-process high-water mark: exact (o), dense (s)",
    )
    files.append(save_figure(fig, axes, out / f"scaling_depth_{tag}.png", legend_size=7))

    bs = sorted(result["batch_sweep"], key=lambda r: r["batch"])
    if bs:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        nb = [r["batch"] for r in bs]
        for key, lab in (
            ("build_s", "build"),
            ("factor_s", "factor"),
            ("solve_s", "solve"),
            ("total_s", "exact total"),
        ):
            ax.loglog(nb, [r[key] for r in bs], "o-", label=lab)
        dd = [(r["batch"], r["dense_s"]) for r in bs if "dense_s" in r]
        if dd:
            ax.loglog(*zip(*dd, strict=True), "s--", label="dense")
        r0 = bs[0]
        ax.set(
            xlabel="batch N",
            ylabel="seconds",
            title=f"batch sweep, depth {r0['depth']}, width {r0['width']} [{tag}]",
        )
        files.append(save_figure(fig, [ax], out / f"scaling_batch_{tag}.png", legend_size=8))
    return files


def table(result: dict) -> str:
    lines = [
        "| width | batch | depth | W | build s | factor s | solve s | total s | autograd H@v s | "
        "total / H@v | residual | peak MiB | dense s | MINRES 1e-10: s (H@v) | paper s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = result["depth_sweep"]
    for r in sorted(rows, key=lambda r: (r["width"], r["batch"], r["depth"])):
        dense = f"{r['dense_s']:.3g}" if "dense_s" in r else "-"
        mres = "-"
        if "minres_s" in r:
            if r["minres_reached"]:
                mres = f"{r['minres_s']:.3g} ({r['minres_matvecs']})"
            else:
                mres = f"fails: {r['minres_residual']:.0e} after {r['minres_matvecs']}"
            if "minres_same_reached" in r and not r["minres_same_reached"]:
                mres += f"; floor {r['minres_same_residual']:.0e}"
        paper = f"{r['paper_author_s']:.3g}" if "paper_author_s" in r else ""
        hvp = f"{r['autograd_hvp_s']:.3g}" if "autograd_hvp_s" in r else "-"
        ratio = f"{r['total_over_hvp']:.1f}" if "total_over_hvp" in r else "-"
        lines.append(
            f"| {r['width']} | {r['batch']} | {r['depth']} | {r['params']} | {r['build_s']:.3g} | "
            f"{r['factor_s']:.3g} | {r['solve_s']:.3g} | {r['total_s']:.3g} | "
            f"{hvp} | {ratio} | {r['residual']:.1e} | {_mib(r['peak_memory_bytes'])} | "
            f"{dense} | {mres} | {paper} |"
        )
    return "\n".join(lines)


def _md_section(intro: str, columns: list[str], rows: list[list[object]]) -> str:
    """A paragraph and its markdown table; empty without rows."""
    if not rows:
        return ""
    out = f"\n{intro}\n\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return out + "".join("| " + " | ".join(str(c) for c in r) + " |\n" for r in rows)


def report(result: dict) -> str:
    """The markdown table, slopes and skipped cases."""
    head = (
        f"device {result.get('device_name', result['device'])}, torch {result['torch']}, "
        f"{result['threads']} thread(s), clock {result.get('clock', 'wall')}, load average "
        f"{result.get('load_average', '?')} at start, {result.get('load_average_end', '?')} at "
        "end; medians; a new Hessian per call; solve with the default checks\n\n"
    )
    if "slopes" not in result:  # --issue
        out = head + table(result) + "\n"
        out += _md_section(
            "Inertia of the same factorization after the solve, against the factorization:",
            ["width", "batch", "depth", "factor s", "inertia s", "inertia / factor"],
            [
                [r["width"], r["batch"], r["depth"], f"{r['factor_s']:.3g}",
                 f"{r['inertia_s']:.3g}", f"{r['inertia_over_factor']:.2f}"]
                for r in result["depth_sweep"] if "inertia_s" in r
            ],
        )  # fmt: skip
        out += _md_section(
            "Per call (`Hessian(...)`, `gradient()`, `factor(d)`, `solve(g)`: the median of "
            "their sums, not a sum of medians), against the autograd `H @ v` as timed above "
            "(alternating with the solves) and timed back to back with itself (a warm "
            "allocator, no page faults):",
            ["width", "batch", "depth", "call s", "H@v s (alternating)", "call / H@v",
             "H@v s (back to back)", "call / H@v"],
            [
                [r["width"], r["batch"], r["depth"], f"{r['call_s']:.3g}",
                 f"{r['autograd_hvp_s']:.3g}", f"{r['call_over_hvp']:.1f}",
                 f"{r['autograd_hvp_b2b_s']:.3g}", f"{r['call_over_hvp_b2b']:.1f}"]
                for r in result["depth_sweep"] if "call_s" in r
            ],
        )  # fmt: skip
        out += _md_section(
            "First call in a fresh process (`import torch, hessinv` done; `Hessian(...)` and "
            "the default solve) against a second call with a new `Hessian`, medians over three "
            "fresh processes run before the timed cases:",
            ["width", "batch", "depth", "first s", "warm s", "first - warm s"],
            [
                [r["width"], r["batch"], r["depth"], f"{r['first_call_s']:.3f}",
                 f"{r['warm_call_s']:.3f}", f"{r['first_call_extra_s']:.3f}"]
                for r in result.get("first_call") or []
            ],
        )  # fmt: skip
        for note in result.get("notes", []):
            out += f"\nNote: {note}\n"
        return out
    out = head + table(result) + "\n\nslopes (log time vs log depth, depth >= 32): "
    out += json.dumps({k: round(v, 3) for k, v in result["slopes"].items()}) + "\n"
    for sk in result.get("skipped", []):
        why = sk.get("reason") or (
            f"the factors alone need about {sk['factor_bytes_estimate'] / 2**30:.1f} GiB"
        )
        out += f"\nskipped: width {sk['width']}, batch {sk['batch']}, depth {sk['depth']} ({why})\n"
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a small sweep (for tests)")
    p.add_argument("--issue", action="store_true", help="only issue #12's target cases")
    p.add_argument(
        "--clock",
        choices=list(CLOCK),
        default="wall",
        help="'process': CPU time of this (one-thread) process, for a loaded machine",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--widths", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--batches", type=int, nargs="+", default=[2, 8])
    p.add_argument("--depths", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512, 1024])
    p.add_argument("--sweep-batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--sweep-depth", type=int, default=64)
    p.add_argument("--sweep-width", type=int, default=8)
    p.add_argument("--damping", type=float, default=1e-3)
    p.add_argument(
        "--gain",
        type=float,
        default=1.2,
        help="weight scale: std gain/sqrt(width); 1.2 keeps H indefinite without "
        "the exponential gradient growth of gain 1.5 at depth 1024",
    )
    p.add_argument("--reps", type=int, default=5)
    p.add_argument(
        "--inertia-reps",
        type=int,
        default=1000,
        help="with --issue: time the inertia in the first this many repetitions only",
    )
    p.add_argument("--note", nargs="*", default=[], help="notes printed under the table")
    p.add_argument(
        "--cases",
        nargs="+",
        default=None,
        help="with --issue: only these width,batch,depth cases (e.g. 16,64,128)",
    )
    p.add_argument(
        "--no-memory",
        action="store_true",
        help="skip the peak-memory runs (default with --quick)",
    )
    p.add_argument("--dense-max", type=int, default=6000, help="largest W for the dense solve")
    p.add_argument("--minres-max-depth", type=int, default=128)
    p.add_argument("--minres-maxiter", type=int, default=20000)
    p.add_argument("--minres-seconds", type=float, default=6.0)
    p.add_argument(
        "--slow-seconds",
        type=float,
        default=20.0,
        help="cases whose build+factor+solve takes longer use 3 repetitions",
    )
    p.add_argument("--minres-rtol", type=float, default=1e-10)
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--memory-child", nargs=4, default=None, help=argparse.SUPPRESS)
    p.add_argument("--first-call-child", nargs=3, type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--resume", action="store_true", help="reuse the cases of a partial run")
    p.add_argument(
        "--skip",
        nargs="+",
        default=[],
        metavar="W,N,L",
        help="cases (width,batch,depth) not to run, recorded as skipped with --skip-reason",
    )
    p.add_argument("--skip-reason", default="skipped on request")
    p.add_argument("--replot", action="store_true", help="redraw plots and table from the JSON")
    p.add_argument(
        "--memory-budget-gb",
        type=float,
        default=6.0,
        help="skip cases whose factors alone would need more (24 GiB machine: the "
        "operator, its blocks and a second operator during repetitions come on top)",
    )
    args = p.parse_args(argv)
    global _clock
    _clock = CLOCK[args.clock]
    if args.memory_child:
        w, b, dep, what = args.memory_child
        print(memory_child(int(w), int(b), int(dep), what, args.gain, args.damping))
        return {}
    if args.first_call_child:
        torch.set_num_threads(1)
        print(first_call_child(*args.first_call_child, args.damping, args.gain))
        return {}
    if args.replot:
        tag = args.device.split(":")[0]
        result = json.loads((args.out / f"scaling_{tag}.json").read_text())
        result["plots"] = plot(result, args.out, tag)
        (args.out / f"scaling_{tag}.md").write_text(report(result))
        return result
    if args.quick:
        args.widths, args.batches, args.depths = [3], [2], [4, 8, 16, 32, 64]
        args.sweep_batches, args.sweep_depth, args.sweep_width = [1, 2, 4], 8, 3
        args.reps, args.minres_seconds = 2, min(args.minres_seconds, 2.0)
        args.no_memory = True
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "quick" if args.quick else args.device.split(":")[0]
    if args.issue:
        tag = "issue_" + tag
    # warm up torch.func (its first call compiles; not part of any measurement)
    m0 = make_mlp(4, 3, 2, dtype=torch.float64, device=args.device)
    hessinv.Hessian(*m0).factor(1.0).solve(hessinv.Hessian(*m0).gradient())
    result: dict = {
        "device": args.device,
        "device_name": (
            torch.cuda.get_device_name()
            if args.device.startswith("cuda")
            else platform.processor() or platform.machine()
        ),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": round(os.getloadavg()[0], 2),
        # glibc's malloc settings change how often large blocks are page-faulted in
        # again between calls (README, "How the ratio is measured")
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "clock": args.clock,
        "damping": args.damping,
        "gain": args.gain,
        "reps": args.reps,
        "depth_sweep": [],
        "batch_sweep": [],
        "skipped": [],
        "memory_budget_gb": args.memory_budget_gb,
        "notes": args.note,
    }
    if args.issue:
        cases = [(16, 2, 128), (4, 2, 512), (16, 8, 64)]
        if args.device.startswith("cuda"):
            cases.append((16, 64, 128))
        if args.cases:
            cases = [tuple(int(v) for v in c.split(",")) for c in args.cases]
        args.dense_max, args.minres_max_depth = 0, 0
        if not args.device.startswith("cuda"):  # the first call in a fresh process, first:
            # run after the timed cases it read 0.3 s more on a loaded machine
            result["first_call"] = [first_call(4, 2, 4, args)] + [
                first_call(w, b, dep, args) for w, b, dep in cases
            ]
        for w, b, dep in cases:
            r = run_case(w, b, dep, args)
            result["depth_sweep"].append(r)
            print(
                f"w={w} N={b} L={dep}: total {r['total_s']:.3f}s = "
                f"{r['total_over_hvp']:.1f} autograd H@v; res {r['residual']:.1e}",
                flush=True,
            )
            # after every case: a run cut short keeps what it measured
            (args.out / f"scaling_{tag}.json").write_text(json.dumps(result, indent=1))
        result["load_average_end"] = round(os.getloadavg()[0], 2)
        (args.out / f"scaling_{tag}.json").write_text(json.dumps(result, indent=1))
        (args.out / f"scaling_{tag}.md").write_text(report(result))
        print(report(result))
        return result
    partial = args.out / f"scaling_{tag}.partial.json"
    done: dict = {}
    if args.resume and partial.exists():
        old = json.loads(partial.read_text())
        done = {(r["width"], r["batch"], r["depth"]): r for r in old["depth_sweep"]}
        done_b = {r["batch"]: r for r in old["batch_sweep"]}
    else:
        done_b = {}
    for w in args.widths:
        for b in args.batches:
            for dep in args.depths:
                est = factor_bytes(w, b, dep)
                if f"{w},{b},{dep}" in args.skip:
                    result["skipped"].append(
                        {"width": w, "batch": b, "depth": dep, "reason": args.skip_reason}
                    )
                    print(f"w={w} N={b} L={dep}: skipped ({args.skip_reason})", flush=True)
                    continue
                if (w, b, dep) in done:
                    r = done[(w, b, dep)]
                elif est > args.memory_budget_gb * 2**30:
                    result["skipped"].append(
                        {"width": w, "batch": b, "depth": dep, "factor_bytes_estimate": est}
                    )
                    print(
                        f"w={w} N={b} L={dep}: skipped, the factors alone need about "
                        f"{est / 2**30:.1f} GiB",
                        flush=True,
                    )
                    continue
                else:
                    r = run_case(w, b, dep, args)
                result["depth_sweep"].append(r)
                partial.write_text(json.dumps(result, indent=1))
                print(
                    f"w={w} N={b} L={dep} W={r['params']} total={r['total_s']:.3f}s "
                    f"res={r['residual']:.1e} dense={r.get('dense_s', float('nan')):.3f}s "
                    f"minres={r.get('minres_s', float('nan')):.3f}s/{r.get('minres_matvecs', '-')}",
                    flush=True,
                )
    for b in args.sweep_batches:
        r = done_b.get(b) or run_case(args.sweep_width, b, args.sweep_depth, args)
        result["batch_sweep"].append(r)
        partial.write_text(json.dumps(result, indent=1))
        print(f"batch sweep N={b} total={r['total_s']:.3f}s", flush=True)
    result["slopes"] = {
        f"w{w}_b{b}": fit_slope(
            [r for r in result["depth_sweep"] if r["width"] == w and r["batch"] == b]
        )
        for w in args.widths
        for b in args.batches
    }
    result["load_average_end"] = round(os.getloadavg()[0], 2)
    path = args.out / f"scaling_{tag}.json"
    path.write_text(json.dumps(result, indent=1))
    partial.unlink(missing_ok=True)
    result["plots"] = plot(result, args.out, tag)
    (args.out / f"scaling_{tag}.md").write_text(report(result))
    print(table(result))
    print("slopes:", result["slopes"])
    return result


if __name__ == "__main__":
    if "--device" not in sys.argv or "cpu" in sys.argv:
        torch.set_num_threads(1)  # timings are one-thread on the CPU (issue #12)
    main()
