"""Rate of the pivoted block LU against the matrix-product rate of the same device (issue #12).

Times, side by side in one run (medians, the device synchronized around each):

* the float64 (and float32) matrix-product rate of the device (``n = 8192``
  on a GPU, ``2048`` on a CPU): the ceiling;
* one tall panel ``P A = L U`` by ``getrf`` (``torch.linalg.lu_factor``) and
  by the recursive LU of :mod:`hessinv.panel_lu` at several leaf widths;
* :class:`hessinv.blocktri.BlockTriLU` on random symmetric block-tridiagonal
  matrices whose blocks are 1024 and more (the lifted ``K`` of a width-16
  MLP at batch 64 alternates blocks of 1296 and 1024), with its flop count
  (panel LUs, triangular solves and Schur products) over its time as a
  fraction of the matrix-product rate; and the number of host
  synchronizations inside it (``torch.cuda.set_sync_debug_mode``).

Writes ``results/factor_rate_<device>.{json,md}``.
Usage: ``python benchmarks/factor_rate.py [--device cuda] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

import hessinv.blocktri as bt
from hessinv import panel_lu as pl

HERE = Path(__file__).resolve().parent


def sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, dev: str, reps: int) -> float:  # noqa: ANN001
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    ts = []
    for _ in range(reps):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def gemm_rate(n: int, dtype: torch.dtype, dev: str, reps: int) -> float:
    a = torch.randn(n, n, dtype=dtype, device=dev)
    b = torch.randn(n, n, dtype=dtype, device=dev)
    return 2.0 * n**3 / timed(lambda: a @ b, dev, reps)


def lu_flops(m: int, n: int) -> float:
    """Flops of ``getrf`` on ``m x n`` (``m >= n``): ``m n^2 - n^3 / 3``."""
    return m * n * n - n**3 / 3.0


def blocktri_flops(sizes: list[int]) -> float:
    """Flops of :class:`BlockTriLU` on blocks ``sizes``: panels, ``U12`` solves, Schur products."""
    f = 0.0
    for k in range(len(sizes) - 1):
        nk, nk1 = sizes[k], sizes[k + 1]
        r = nk1 + (sizes[k + 2] if k + 2 < len(sizes) else 0)
        f += lu_flops(nk + nk1, nk) + nk * nk * r + 2.0 * nk1 * nk * r
    return f + 2.0 * sizes[-1] ** 3 / 3.0


def random_blocktri(sizes: list[int], dtype: torch.dtype, dev: str):  # noqa: ANN201
    gen = torch.Generator(device=dev).manual_seed(0)
    diag, upper = [], []
    for i, n in enumerate(sizes):
        d = torch.randn(n, n, generator=gen, dtype=dtype, device=dev)
        diag.append(d + d.T)
        if i + 1 < len(sizes):
            upper.append(torch.randn(n, sizes[i + 1], generator=gen, dtype=dtype, device=dev))
    return diag, upper


def count_syncs(fn, dev: str) -> int | None:  # noqa: ANN001
    """Host synchronizations ``fn`` makes (CUDA's sync-debug warnings), ``None`` on a CPU."""
    if not dev.startswith("cuda"):
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--replot", action="store_true", help="rewrite the table from the JSON")
    args = p.parse_args(argv)
    if args.replot:
        tag = "quick" if args.quick else args.device.split(":")[0]
        res = json.loads((args.out / f"factor_rate_{tag}.json").read_text())
        (args.out / f"factor_rate_{tag}.md").write_text(report(res))
        return res
    dev, reps = args.device, args.reps
    gpu = dev.startswith("cuda")
    if not gpu:
        torch.set_num_threads(1)
    res: dict = {
        "device": dev,
        "device_name": torch.cuda.get_device_name() if gpu else "cpu (1 thread)",
        "torch": torch.__version__,
        "reps": reps,
    }
    n_mm = 8192 if gpu else 2048
    if args.quick:
        n_mm = 512
    res["gemm_tflops"] = {
        str(dt).split(".")[-1]: gemm_rate(n_mm, dt, dev, reps) / 1e12
        for dt in (torch.float64, torch.float32)
    }
    peak = res["gemm_tflops"]["float64"] * 1e12
    print("gemm TFLOP/s:", res["gemm_tflops"], flush=True)
    panels = [(2048, 1024), (2320, 1296), (2320, 1024), (2048, 2048), (4096, 2048)]
    if args.quick:
        panels = [(200, 100), (300, 160)]
    if gpu:
        routes = {f"getrf_{b}": (b, None) for b in ("default", "magma", "cusolver")}
        routes |= {f"recursive_cusolver_{leaf}": ("cusolver", leaf) for leaf in (64, 128, 256, 512)}
    else:
        routes = {"getrf": (None, None), "recursive_64": (None, 64), "recursive_128": (None, 128)}
    res["panels"] = []
    for m, n in panels:
        a = torch.randn(m, n, dtype=torch.float64, device=dev)
        row: dict = {"m": m, "n": n}
        for name, (backend, leaf) in routes.items():
            if leaf is None:
                fn = lambda a=a, b=backend: pl.getrf(a, b)  # noqa: E731
            elif leaf < n:
                fn = lambda a=a, b=backend, leaf=leaf: pl.recursive_lu(a, leaf, b)  # noqa: E731
            else:
                continue
            row[f"{name}_s"] = timed(fn, dev, reps)
        row["flops"] = lu_flops(m, n)
        row["best"] = min((k for k in row if k.endswith("_s")), key=row.get)
        row["best_fraction_of_gemm"] = row["flops"] / row[row["best"]] / peak
        res["panels"].append(row)
        print(row, flush=True)
    chains = {
        "1024 x 16": [1024] * 16,
        "2048 x 8": [2048] * 8,
        "1296/1024 x 16 (lifted w16 b64)": [1296, 1024] * 8,
    }
    if args.quick:
        chains = {"100 x 6": [100] * 6, "300/260 x 4": [300, 260] * 2}
    block_routes = {"default": bt.panel_lu}
    if gpu:
        block_routes |= {
            "getrf_default": lambda a: pl.getrf(a, "default"),
            "getrf_cusolver": lambda a: pl.getrf(a, "cusolver"),
            "recursive_cusolver_128": lambda a: pl.recursive_lu(a, 128, "cusolver"),
        }
    else:
        block_routes["recursive_64"] = lambda a: pl.recursive_lu(a, 64)
    res["blocktri"] = []
    for name, sizes in chains.items():
        diag, upper = random_blocktri(sizes, torch.float64, dev)
        row = {"blocks": name, "flops": blocktri_flops(sizes)}

        def factor(diag: list = diag, upper: list = upper) -> bt.BlockTriLU:
            return bt.BlockTriLU(diag, upper)

        for route, fn in block_routes.items():
            orig = bt.panel_lu
            bt.panel_lu = fn
            try:
                t = timed(factor, dev, reps)
                row[f"{route}_s"] = t
                row[f"{route}_fraction_of_gemm"] = row["flops"] / t / peak
                row[f"{route}_syncs"] = count_syncs(factor, dev)
            finally:
                bt.panel_lu = orig
        res["blocktri"].append(row)
        print(row, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "quick" if args.quick else dev.split(":")[0]
    (args.out / f"factor_rate_{tag}.json").write_text(json.dumps(res, indent=1))
    (args.out / f"factor_rate_{tag}.md").write_text(report(res))
    print(report(res))
    return res


def report(res: dict) -> str:
    lines = [
        f"# Block LU rate on {res['device_name']} (torch {res['torch']}, medians of {res['reps']})",
        "",
        "Matrix-product rate (the ceiling), TFLOP/s: "
        + ", ".join(f"{k} {v:.2f}" for k, v in res["gemm_tflops"].items()),
        "",
        "## One tall panel, float64",
        "",
    ]
    routes = [k[:-2] for k in res["panels"][0] if k.endswith("_s")]
    lines += [
        "| panel | GFLOP | "
        + " | ".join(f"{r} ms" for r in routes)
        + " | best: TFLOP/s, of gemm |",
        "|---|---|" + "---|" * (len(routes) + 1),
    ]
    for r in res["panels"]:
        b = r["best"]
        cells = [f"{1e3 * r[k + '_s']:.2f}" if k + "_s" in r else "-" for k in routes]
        lines.append(
            f"| {r['m']} x {r['n']} | {r['flops'] / 1e9:.2f} | " + " | ".join(cells) + " | "
            f"{r['flops'] / r[b] / 1e12:.2f}, {100 * r['best_fraction_of_gemm']:.1f} % |"
        )
    routes = [k[:-2] for k in res["blocktri"][0] if k.endswith("_s")]
    lines += [
        "",
        "## Block LU (`BlockTriLU`), float64: ms, fraction of the matrix-product rate, syncs",
        "",
        "| blocks | GFLOP | " + " | ".join(routes) + " |",
        "|---|---|" + "---|" * len(routes),
    ]
    for r in res["blocktri"]:
        cells = [
            f"{1e3 * r[k + '_s']:.1f} ms, {100 * r[k + '_fraction_of_gemm']:.1f} %, "
            f"{r[k + '_syncs']}"
            for k in routes
        ]
        lines.append(f"| {r['blocks']} | {r['flops'] / 1e9:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
