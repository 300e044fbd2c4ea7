"""Spectrum benchmark: exact eigenvalue histograms, eigsh and diag((H + dI)^{-1}) vs dense and SLQ.

For tanh MLPs (:func:`hessinv.cli.make_mlp`, gain 1, float64; width 8 and 16,
batch 2 and 8, depth 16..512) it measures, on one thread (CPU seconds of the
process in the table, wall seconds in the JSON; the machine is shared):

* ``hist``: the exact histogram (:meth:`hessinv.Hessian.spectral_histogram`,
  one inertia per edge; ``bins`` equal bins over ``[-1.02 ||H||, 1.02 ||H||]``,
  an odd number so that the exact null space of a small batch, eigenvalue 0,
  lies inside a bin), and whether every count was verified;
* ``slq``: stochastic Lanczos quadrature (:func:`hessinv.spectrum.slq`, 8 probes
  x 80 Lanczos steps, the estimate PyHessian and curvlinops compute, here
  hessinv's own implementation on the same exact products), and its
  histogram's error off the bin that holds 0
  (``sum |slq - exact| / sum exact`` over the other bins: with a small batch
  nearly all eigenvalues are exactly 0, which any estimate gets right);
* ``eigsh``: the 4 largest (``LA``, Lanczos) and 4 smallest (``SA``, bisection on
  the counts + shift-invert) eigenpairs, with their count checks;
* ``invdiag``: ``H.inverse_diagonal(1e-3)``;
* ``dense`` (while ``W <= --dense-max``): forming ``H`` and ``torch.linalg.eigvalsh``,
  and against it: bins that differ, the eigsh eigenvalues' largest error /
  ``||H||``, and the inverse diagonal's largest error / its largest entry
  (against ``torch.linalg.inv``).

* ``pyh`` (when ``pyhessian`` imports, the ``bench`` extra, and ``W <=
  --pyhessian-max``): PyHessian 0.1 itself on the same net and batch
  (``benchmarks/pyhessian_run.py``): its 4 top eigenvalues by power iteration
  (``eigenvalues(maxIter=100, tol=1e-3, top_n=4)``, its defaults), each one's
  relative error against the exact eigenvalue of the same rank in magnitude,
  and its density (``density(iter=80, n_v=8)``, SLQ) histogrammed in the same
  bins, with the same error off the 0 bin.

The headline net (depth 256, width 16, batch 2, ``W = 69,377``) gets a
41-bin histogram and the plot of the exact counts beside SLQ.

Usage: ``python benchmarks/spectrum.py [--quick] [--out DIR]``; writes
``DIR/spectrum.{json,md,png}`` (``spectrum_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import hessinv
from hessinv import spectrum
from hessinv.cli import make_mlp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import pyhessian_run  # noqa: E402

CPU: dict[str, float] = {}


def timed(fn, key: str | None = None):  # noqa: ANN001, ANN201
    """``(fn(), wall seconds)``; the process's CPU seconds go to ``CPU[key]``.

    On a shared machine the wall time includes waiting for a core; the CPU time
    of this one-threaded process is the work itself.
    """
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    if key is not None:
        CPU[key] = time.process_time() - c
    return out, time.perf_counter() - t


def off_zero_error(edges: np.ndarray, est: np.ndarray, exact: np.ndarray) -> float:
    """``sum |est - exact| / sum exact`` over the bins that do not contain 0.

    With a small batch most eigenvalues are exactly 0 (the null space), so the
    bin holding 0 dominates any whole-histogram error; this one measures the rest.
    """
    keep = ~((edges[:-1] <= 0.0) & (0.0 < edges[1:]))
    return float(np.abs(est[keep] - exact[keep]).sum() / max(exact[keep].sum(), 1))


def run_one(
    width: int,
    batch: int,
    depth: int,
    bins: int,
    dense_max: int,
    slq_kw: dict,
    pyh_max_w: int = 0,
) -> dict:
    CPU.clear()
    model, loss, X, y = make_mlp(depth, width, batch, dtype=torch.float64, device="cpu", gain=1.0)
    H, t_build = timed(lambda: hessinv.Hessian(model, loss, X, y))
    w = H.num_params
    nrm, t_norm = timed(lambda: spectrum.norm_estimate(H))
    edges = np.linspace(-1.02 * nrm, 1.02 * nrm, bins + 1)
    hist, t_hist = timed(lambda: H.spectral_histogram(edges), "hist")
    est, t_slq = timed(lambda: spectrum.slq(H, **slq_kw), "slq")
    slq_counts = est.histogram(edges)
    (la, _), t_la = timed(lambda: H.eigsh(4, which="LA"), "LA")
    (sa, _), t_sa = timed(lambda: H.eigsh(4, which="SA"), "SA")
    idg, t_inv = timed(lambda: H.inverse_diagonal(1e-3), "invdiag")
    row = {
        "width": width,
        "batch": batch,
        "depth": depth,
        "W": w,
        "norm": nrm,
        "build_s": t_build,
        "norm_s": t_norm,
        "bins": bins,
        "hist_s": t_hist,
        "per_count_s": t_hist / (bins + 1),
        "verified": hist.verified,
        "counts": hist.counts.tolist(),
        "edges": edges.tolist(),
        "slq_s": t_slq,
        "slq_wrong_share": float(np.abs(slq_counts - hist.counts).sum() / (2 * w)),
        "slq_off_zero_err": off_zero_error(edges, slq_counts, hist.counts),
        "slq_counts": slq_counts.tolist(),
        "eigsh_LA_s": t_la,
        "eigsh_SA_s": t_sa,
        "LA": la.tolist(),
        "SA": sa.tolist(),
        "invdiag_s": t_inv,
        "cpu_s": dict(CPU),
    }
    if pyhessian_run.AVAILABLE and w <= pyh_max_w:
        ph = pyhessian_run.run(H, depth, width, batch, edges, 4, slq_kw)
        row["pyh"] = {
            **{k: v for k, v in ph.items() if k != "counts"},
            "exact_top_abs": pyhessian_run.top_abs(la.numpy(), sa.numpy(), 4).tolist(),
            "eig_rel_err": pyhessian_run.eig_errors(ph["eig"], la.numpy(), sa.numpy()),
            "density_off_zero_err": off_zero_error(edges, np.asarray(ph["counts"]), hist.counts),
            "density_counts": ph["counts"],
        }
        row["cpu_s"]["pyh_eig"] = ph["eig_cpu_s"]
        row["cpu_s"]["pyh_density"] = ph["density_cpu_s"]
    if w <= dense_max:
        (hd, ev), row["dense_s"] = timed(
            lambda: (lambda m: (m, torch.linalg.eigvalsh(m)))(H.to_dense()), "dense"
        )
        row["cpu_s"]["dense"] = CPU["dense"]
        ref = np.histogram(ev.numpy(), bins=edges)[0]
        row["bins_differing"] = int((ref != hist.counts).sum())
        row["eig_err"] = float(
            max((la - ev[-4:]).abs().max(), (sa - ev[:4]).abs().max()) / ev.abs().max()
        )
        inv = torch.linalg.inv(hd + 1e-3 * torch.eye(w, dtype=hd.dtype))
        row["invdiag_err"] = float((idg - inv.diagonal()).abs().max() / inv.diagonal().abs().max())
        del hd, inv
    return row


def table(rows: list[dict]) -> str:
    """Markdown table; times are CPU seconds of the one-threaded process (wall in the JSON)."""
    cols = (
        "width | batch | depth | W | exact hist: CPU s (per count) | verified | SLQ CPU s "
        "| SLQ error off the 0 bin | eigsh LA CPU s | eigsh SA CPU s | inv diag CPU s "
        "| dense eigvalsh CPU s | bins differing | eig err / norm H | inv diag err "
        "| PyHessian top-4 CPU s | PyHessian top-4 rel err | PyHessian SLQ CPU s "
        "| PyHessian SLQ error off the 0 bin"
    )
    out = "| " + cols + " |\n|" + "---|" * (cols.count("|") + 1) + "\n"
    for r in rows:
        c = r["cpu_s"]

        def f(key: str, fmt: str, r: dict = r) -> str:
            return fmt.format(r[key]) if key in r else "-"

        dense = f"{c['dense']:.3g}" if "dense" in c else "-"
        ph = r.get("pyh")
        pyh = (
            f"{c['pyh_eig']:.3g} | {min(ph['eig_rel_err']):.1e} - {max(ph['eig_rel_err']):.1e} | "
            f"{c['pyh_density']:.3g} | {ph['density_off_zero_err']:.0%}"
            if ph
            else "- | - | - | -"
        )
        out += (
            f"| {r['width']} | {r['batch']} | {r['depth']} | {r['W']} | {c['hist']:.3g} "
            f"({c['hist'] / (r['bins'] + 1):.2g}) | {r['verified']} | {c['slq']:.3g} | "
            f"{r['slq_off_zero_err']:.0%} | {c['LA']:.3g} | {c['SA']:.3g} | "
            f"{c['invdiag']:.3g} | {dense} | {f('bins_differing', '{}')} | "
            f"{f('eig_err', '{:.1e}')} | {f('invdiag_err', '{:.1e}')} | {pyh} |\n"
        )
    return out


def plot(row: dict, est: spectrum.SLQResult | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = spectrum.SpectralHistogram(
        edges=np.asarray(row["edges"]),
        counts=np.asarray(row["counts"]),
        below=0,
        above=0,
        at_edges=np.zeros(len(row["edges"]), dtype=np.int64),
        verified=row["verified"],
        total=row["W"],
    )
    fig, ax = plt.subplots(figsize=(8, 4.5))
    spectrum.plot_spectrum(
        hist,
        est,
        ax=ax,
        title=(
            f"tanh MLP depth {row['depth']}, width {row['width']}, batch {row['batch']}, "
            f"W = {row['W']:,}: exact in {row['cpu_s']['hist']:.0f} CPU s"
        ),
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (the test suite runs it)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--dense-max", type=int, default=5000)
    ap.add_argument(
        "--pyhessian-max",
        type=int,
        default=5000,
        help="run PyHessian (when installed) on the nets with W at most this",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        configs = [(4, 2, [4, 8])]
        headline = (4, 2, 6)
        bins, head_bins = 9, 11
        slq_kw = {"n_probes": 2, "n_steps": 20}
    else:
        configs = [
            (8, 2, [16, 32, 64, 128, 256, 512]),
            (16, 2, [16, 32, 64, 128]),
            (8, 8, [16, 32, 64, 128]),
            (16, 8, [16, 32]),
        ]
        headline = (16, 2, 256)
        bins, head_bins = 21, 41
        slq_kw = {"n_probes": 8, "n_steps": 80}
    rows = []
    t0 = time.perf_counter()
    for width, batch, depths in configs:
        for depth in depths:
            r = run_one(width, batch, depth, bins, args.dense_max, slq_kw, args.pyhessian_max)
            rows.append(r)
            print(
                f"w{width} b{batch} L{depth} W={r['W']} {r['cpu_s']} wall {r['hist_s']:.1f}",
                flush=True,
            )
    width, batch, depth = headline
    head = run_one(width, batch, depth, head_bins, args.dense_max, slq_kw, args.pyhessian_max)
    rows.append(head)
    model, loss, X, y = make_mlp(depth, width, batch, dtype=torch.float64, device="cpu", gain=1.0)
    est = spectrum.slq(hessinv.Hessian(model, loss, X, y), **slq_kw)
    stem = "spectrum_quick" if args.quick else "spectrum"
    png = out / f"{stem}.png"
    plot(head, est, png)
    result = {
        "machine": {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "pyhessian": pyhessian_run.VERSION,
        },
        "total_s": time.perf_counter() - t0,
        "rows": rows,
        "headline": {
            **{k: head[k] for k in ("width", "batch", "depth", "W", "hist_s", "bins")},
            "hist_cpu_s": head["cpu_s"]["hist"],
        },
    }
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(table(rows))
    print(table(rows))
    return {"json": str(out / f"{stem}.json"), "plot": str(png)}


if __name__ == "__main__":
    main()
