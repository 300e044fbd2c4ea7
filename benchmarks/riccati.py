"""Riccati stage pass vs the lifted LU vs dense eigvalsh, on deep tanh MLPs (one thread).

For tanh MLPs (``hessinv.cli.make_mlp``, gain 1, float64) of depth 16..64,
width 8 and 16, batch 2 and 8, the damping is the smallest of ``1e-2 * 4^j``
that the lifted LU's inertia calls positive definite. Medians of
``--repeats`` runs of

* ``riccati``: :func:`hessinv.riccati.riccati_pass` in ``"cholesky"`` mode
  (the PD certificate, with its error bound), and in ``"inertia"`` mode,
* ``lifted``: ``LiftedFactorization(H, d)`` (the pivoted block LU), and the
  same plus its ``inertia()``,
* ``dense``: ``H.to_dense()`` and ``torch.linalg.eigvalsh`` (while
  ``W <= --dense-max``),

and whether the certificate was obtained. Writes ``results/riccati.json``.

Usage: ``python benchmarks/riccati.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import hessinv
from hessinv.cli import make_mlp
from hessinv.riccati import riccati_pass
from hessinv.solvers.lifted import LiftedFactorization

HERE = Path(__file__).resolve().parent


def _median_time(fn, repeats: int) -> float:  # noqa: ANN001
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def run_one(depth: int, width: int, batch: int, repeats: int, dense_max: int) -> dict:
    """Time the three methods on one MLP at a damping making ``H + dI`` positive definite."""
    m, lf, X, y = make_mlp(depth, width, batch, dtype=torch.float64, device="cpu", gain=1.0)
    H = hessinv.Hessian(m, lf, X, y)
    d = 1e-2
    while LiftedFactorization(H, d).inertia()[1] > 0:
        d *= 4
    r = riccati_pass(H.blocks, d)
    ri = riccati_pass(H.blocks, d, mode="inertia")
    row = {
        "depth": depth,
        "width": width,
        "batch": batch,
        "W": H.num_params,
        "damping": d,
        "certified_pd": r.positive_definite,
        "inertia_reliable": ri.reliable,
        "inertia_agrees_with_lu": ri.inertia == tuple(LiftedFactorization(H, d).inertia()),
        "riccati_cholesky_s": _median_time(lambda: riccati_pass(H.blocks, d), repeats),
        "riccati_inertia_s": _median_time(
            lambda: riccati_pass(H.blocks, d, mode="inertia"), repeats
        ),
        "lifted_factor_s": _median_time(lambda: LiftedFactorization(H, d), repeats),
        "lifted_factor_inertia_s": _median_time(
            lambda: LiftedFactorization(H, d).inertia(), repeats
        ),
        "dense_eigvalsh_s": None,
    }
    if H.num_params <= dense_max:
        row["dense_eigvalsh_s"] = _median_time(
            lambda: torch.linalg.eigvalsh(H.to_dense()), max(1, repeats // 2)
        )
    return row


def main(argv: list[str] | None = None) -> dict:
    """Run the sweep and write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dense-max", type=int, default=5000)
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _sweep(args)
    finally:  # called in-process by the tests: leave the thread count as found
        torch.set_num_threads(threads)


def _sweep(args: argparse.Namespace) -> dict:
    if args.quick:
        grid = [(4, 4, 2), (8, 4, 2)]
        args.repeats = 1
    else:
        grid = [(dep, w, n) for dep in (16, 32, 64) for w in (8, 16) for n in (2, 8)]
    rows = []
    for dep, w, n in grid:
        row = run_one(dep, w, n, args.repeats, args.dense_max)
        rows.append(row)
        print(json.dumps(row))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "riccati_quick.json" if args.quick else "riccati.json"
    (out / name).write_text(json.dumps({"threads": 1, "rows": rows}, indent=1))
    return {"rows": rows}


if __name__ == "__main__":
    main()
