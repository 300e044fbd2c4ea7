"""Where the time of the default exact solve goes, phase by phase (issue #12).

For the issue's three tanh MLPs (width 16 batch 2 depth 128; width 4 batch 2
depth 512; width 16 batch 8 depth 64; float64, damping 1e-3, gain 1.2 as in
``scaling.py``) it times, one thread, medians of ``--reps`` runs, a fresh
``Hessian`` each time, the phases of ``H.solve(g, damping)`` with its default
checks:

* ``build``: ``Hessian(...)`` (forward pass, all per-stage derivative blocks),
* ``lanczos``: the 16-product Lanczos estimate of ``||H||`` (the contract's norm),
* ``lifted``: the lifted system's bases and all its blocks (built, not factored),
* ``stage elimination``: what ``H.factor(d)`` does (``hessinv.riccati_solve``; the
  pivoted block LU, timed apart, is its fallback),
* ``sigma_min``: the 5 inverse iterations of the singularity check,
* ``solve``: one application of the factors and the refinement (``H @ v`` each),
* ``check``: the backward-error check (one ``H @ v``),

next to one autograd ``H @ v`` of the same network (a forward pass, the
gradient with ``create_graph`` and its product with ``v``: Pearlmutter's
algorithm as a user would call it) and the whole default ``solve`` of a fresh
``Hessian``. With ``--cprofile`` it adds the top functions by own time of one
whole solve. Writes markdown to stdout (``--out`` to a file).

Usage: ``python benchmarks/profile_solve.py [--reps 5] [--cprofile] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

import hessinv
from hessinv.blocktri import BlockTriLU
from hessinv.cli import make_mlp
from hessinv.lifted import LiftedSystem, curvature_scale
from hessinv.solvers.base import refined_solve
from hessinv.solvers.lifted import LiftedFactorization

CASES = [(16, 2, 128), (4, 2, 512), (16, 8, 64)]
DAMPING = 1e-3
GAIN = 1.2


def autograd_hvp(model: torch.nn.Module, loss: torch.nn.Module, X, y, v: list) -> list:  # noqa: ANN001
    """One Pearlmutter product ``H v`` by double backward, from the forward pass on."""
    params = list(model.parameters())
    out = loss(model(X), y)
    grads = torch.autograd.grad(out, params, create_graph=True)
    return list(torch.autograd.grad(grads, params, grad_outputs=v))


def median_time(fn: Callable[[], object], reps: int) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def phases(width: int, batch: int, depth: int, reps: int) -> dict[str, float]:
    """Median seconds per phase of the default solve (each phase on a fresh operator)."""
    model, loss, X, y = make_mlp(depth, width, batch, dtype=torch.float64, device="cpu", gain=GAIN)
    v = [torch.randn_like(p) for p in model.parameters()]
    out: dict[str, list[float]] = {}

    def rec(key: str, t0: float) -> float:
        t1 = time.perf_counter()
        out.setdefault(key, []).append(t1 - t0)
        return t1

    for _ in range(reps):
        t = time.perf_counter()
        autograd_hvp(model, loss, X, y, v)
        t = rec("autograd H@v", t)
        H = hessinv.Hessian(model, loss, X, y)
        t = rec("build", t)
        g = H.gradient()[:, None]
        t = time.perf_counter()
        H.spectral_bounds()
        t = rec("lanczos (16 H@v)", t)
        s = curvature_scale(H.blocks, DAMPING)
        ls = LiftedSystem(H.blocks, DAMPING, scale=s)
        ls.assemble()
        t = rec("lifted build (bases + blocks)", t)
        fac = LiftedFactorization(H, DAMPING)
        t = rec("stage elimination (bases cached)", t)
        fac._trust = True  # as after a first solve that proved it accurate (profiling only)
        fac.sigma_min_estimate()
        t = rec("sigma_min (5 inverse iterations on their own)", t)
        x = refined_solve(H.matmat, fac._apply, g, DAMPING, 2)
        t = rec("solve + refinement", t)
        fac.check(x, g)
        t = rec("check (1 H@v)", t)
        H2 = hessinv.Hessian(model, loss, X, y)
        t = time.perf_counter()
        H2.solve(H2.gradient(), damping=DAMPING)
        rec("default solve after build", t)
        t = time.perf_counter()
        H3 = hessinv.Hessian(model, loss, X, y)
        H3.solve(H3.gradient(), damping=DAMPING)
        rec("TOTAL: fresh Hessian + default solve", t)
        fac2 = H3.factor(DAMPING)
        t = time.perf_counter()
        fac2.inertia()
        rec("inertia (after the solve)", t)
        t = time.perf_counter()
        BlockTriLU(fac2.system.diag, fac2.system.upper)
        rec("block LU alone (the fallback; blocks built as consumed)", t)
        t = time.perf_counter()
        hessinv.products.hvp(H.blocks, g)
        rec("hessinv H@v (blocks built)", t)
        del H, H2, H3, fac, fac2, ls, x  # freed here, not inside the next repetition's clock
        gc.collect()
    return {k: statistics.median(v) for k, v in out.items()}


class _Timed(Sequence):
    """The lifted blocks, with the time each ``__getitem__`` takes and when it returns."""

    def __init__(self, seq: Sequence, log: list) -> None:
        self.seq, self.log = seq, log

    def __len__(self) -> int:
        return len(self.seq)

    def __getitem__(self, i: int):  # noqa: ANN204
        t0 = time.perf_counter()
        out = self.seq[i]
        t1 = time.perf_counter()
        self.log.append((i, t1 - t0, t1))
        return out


def per_block_type(width: int, batch: int, depth: int, reps: int) -> dict[str, float]:
    """Median seconds of the block LU by kind of step: ``(v, lam)`` and ``u`` eliminations.

    Step ``k`` runs from the fetch of ``diag[k + 1]`` to that of ``diag[k + 2]``;
    the blocks' construction (``diag`` and ``upper`` items) is counted apart.
    """
    model, loss, X, y = make_mlp(depth, width, batch, dtype=torch.float64, device="cpu", gain=GAIN)
    H = hessinv.Hessian(model, loss, X, y)
    ls = LiftedSystem(H.blocks, DAMPING, scale=curvature_scale(H.blocks, DAMPING))
    out: dict[str, list[float]] = {}
    for _ in range(reps):
        dl: list = []
        ul: list = []
        t_start = time.perf_counter()
        BlockTriLU(_Timed(ls.diag, dl), _Timed(ls.upper, ul))
        t_end = time.perf_counter()
        build = sum(b for _, b, _ in dl) + sum(b for _, b, _ in ul)
        ends = [t for _, _, t in dl] + [t_end]
        vl = u = 0.0
        for k in range(len(dl) - 1):  # step k: from fetching block k+1 to fetching k+2
            dt = ends[k + 2] - ends[k + 1] if k + 2 < len(ends) else 0.0
            if k % 2 == 0:
                vl += dt
            else:
                u += dt
        for key, val in (
            ("build lifted blocks (in the loop)", build),
            ("eliminate (v, lam) blocks (panel LU, U12, Schur)", vl),
            ("eliminate u blocks (panel LU, U12, Schur)", u),
            ("block LU total", t_end - t_start),
        ):
            out.setdefault(key, []).append(val)
    return {k: statistics.median(v) for k, v in out.items()}


def top_functions(width: int, batch: int, depth: int, n: int = 25) -> str:
    model, loss, X, y = make_mlp(depth, width, batch, dtype=torch.float64, device="cpu", gain=GAIN)
    H = hessinv.Hessian(model, loss, X, y)
    H.solve(H.gradient(), damping=DAMPING)  # warm
    prof = cProfile.Profile()
    prof.enable()
    H = hessinv.Hessian(model, loss, X, y)
    H.solve(H.gradient(), damping=DAMPING)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(n)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    keep = [ln for ln in lines if "function calls" in ln or "ncalls" in ln or ln[:1] == " "]
    return "\n".join(keep)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--cprofile", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    m0 = make_mlp(4, 3, 2, dtype=torch.float64, device="cpu")  # warm-up, not measured
    H0 = hessinv.Hessian(*m0)
    H0.solve(H0.gradient(), damping=1.0)
    H0.inertia(1.0)
    lines = [
        f"torch {torch.__version__}, 1 thread, float64, damping {DAMPING:g}, gain {GAIN}, "
        f"medians of {args.reps}; load average {os.getloadavg()[0]:.2f} at start",
        "",
    ]
    for w, b, dep in CASES:
        ph = phases(w, b, dep, args.reps)
        hv = ph["autograd H@v"]
        lines += [f"### width {w}, batch {b}, depth {dep}", "", "| phase | ms | x autograd H@v |"]
        lines.append("|---|---|---|")
        for k, t in ph.items():
            lines.append(f"| {k} | {1e3 * t:.2f} | {t / hv:.1f} |")
        lines += ["", "| block LU by step type | ms |", "|---|---|"]
        for k, t in per_block_type(w, b, dep, args.reps).items():
            lines.append(f"| {k} | {1e3 * t:.2f} |")
        lines.append("")
        if args.cprofile:
            lines += ["```", top_functions(w, b, dep), "```", ""]
    lines.append(f"load average {os.getloadavg()[0]:.2f} at end")
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
