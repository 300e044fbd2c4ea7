"""Training benchmark: exact second-order methods against Adam and SGD with momentum.

Two tasks, deep and narrow tanh MLPs, float64, full-batch losses:

* ``synthetic``: regression onto a random teacher network from inputs whose
  scales span three orders of magnitude (an ill-conditioned problem for
  first-order methods);
* ``digits``: scikit-learn's bundled 8x8 digits (shipped with the package, no
  download), PCA to 8 dimensions, 10-way cross-entropy.

Methods: trust-region Newton on the exact Hessian, Levenberg-Marquardt on the
exact Hessian, Levenberg-Marquardt on the Gauss-Newton matrix, Adam and SGD
with momentum 0.9 (learning rates chosen by a small sweep on seed 0, reported).
Three seeds each. Every method gets the same wall-clock budget. It writes
``results/training.json``, ``results/training.png`` (loss against steps and
against seconds) and ``results/training.md`` (the time each method needs to
reach a fixed loss).

Usage: ``python benchmarks/training.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import hessinv

HERE = Path(__file__).resolve().parent
DT = torch.float64


def mlp(d_in: int, width: int, depth: int, d_out: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    mods: list[nn.Module] = [nn.Linear(d_in, width), nn.Tanh()]
    for _ in range(depth - 2):
        mods += [nn.Linear(width, width), nn.Tanh()]
    mods.append(nn.Linear(width, d_out))
    model = nn.Sequential(*mods).to(DT)
    with torch.no_grad():  # gain 1.5: signals propagate through depth
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 1.5 / m.in_features**0.5)
                m.bias.normal_(0.0, 0.1)
    return model


def task_synthetic(args: argparse.Namespace, seed: int):
    g = torch.Generator().manual_seed(1000 + seed)
    n, d = args.synthetic_n, 6
    scales = torch.logspace(-1.5, 1.5, d, dtype=DT)
    X = torch.randn(n, d, generator=g, dtype=DT) * scales
    with torch.no_grad():
        teacher = mlp(d, 6, 3, 1, seed=10_000 + seed)
        y = teacher(X / scales)  # the teacher sees well-scaled inputs; the student does not
    model = mlp(d, args.width, args.depth, 1, seed=seed)
    return model, nn.MSELoss(), X, y


def task_digits(args: argparse.Namespace, seed: int):
    from sklearn.datasets import load_digits
    from sklearn.decomposition import PCA

    data = load_digits()
    Z = PCA(n_components=8, random_state=0).fit_transform(data.data)
    Z = (Z - Z.mean(0)) / Z.std(0)
    X = torch.tensor(Z, dtype=DT)
    y = torch.tensor(data.target, dtype=torch.long)
    if args.digits_n < len(y):
        idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[: args.digits_n]
        X, y = X[idx], y[idx]
    model = mlp(8, args.width, args.depth, 10, seed=seed)
    return model, nn.CrossEntropyLoss(), X, y


TASKS = {"synthetic": task_synthetic, "digits": task_digits}


def run_second_order(model, loss, X, y, kind: str, budget: float, args) -> dict:  # noqa: ANN001
    strategy, curvature = {
        "newton-tr": ("trust-region", "hessian"),
        "lm-hessian": ("levenberg-marquardt", "hessian"),
        "gauss-newton": ("levenberg-marquardt", "gauss-newton"),
    }[kind]
    opt = hessinv.optim.Newton(
        model,
        loss,
        strategy=strategy,
        curvature=curvature,
        radius=1.0,
        damping=1e-2,
        curvature_batch=args.curvature_batch,
    )
    ts, ls = [0.0], [float(opt._loss(X, y))]
    t = 0.0
    while t < budget and len(ls) <= args.max_steps:
        t0 = time.perf_counter()
        opt.step(X, y)
        t += time.perf_counter() - t0
        ts.append(t)
        ls.append(opt.history[-1].new_loss)
    h = opt.history
    return {
        "seconds": ts,
        "loss": ls,
        "accepted": sum(x.accepted for x in h),
        "steps": len(h),
        "negative_eigenvalues": [x.inertia[1] for x in h],
        "damping": [x.damping for x in h],
        "radius": [x.radius for x in h],
    }


def run_first_order(model, loss, X, y, kind: str, lr: float, budget: float, args) -> dict:  # noqa: ANN001
    if kind == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    ts, ls = [0.0], []
    with torch.no_grad():
        ls.append(float(loss(model(X), y)))
    t = 0.0
    steps = 0
    while t < budget and steps < args.max_first_order_steps:
        t0 = time.perf_counter()
        opt.zero_grad()
        val = loss(model(X), y)
        val.backward()
        opt.step()
        t += time.perf_counter() - t0
        steps += 1
        with torch.no_grad():
            cur = float(loss(model(X), y))
        if not math.isfinite(cur):
            break
        ts.append(t)
        ls.append(cur)
    return {"seconds": ts, "loss": ls, "steps": steps, "lr": lr}


def time_to(run: dict, target: float) -> float:
    for t, v in zip(run["seconds"], run["loss"], strict=True):
        if v <= target:
            return t
    return math.inf


def steps_to(run: dict, target: float) -> float:
    for i, v in zip(step_numbers(run), run["loss"], strict=True):
        if v <= target:
            return i
    return math.inf


def step_numbers(run: dict) -> list[int]:
    """The step number of each history entry (histories of long runs are thinned)."""
    return run.get("step") or list(range(len(run["loss"])))


def thin(run: dict, rel: float = 0.01, points: int = 150) -> None:
    """Keep a long first-order history small enough to commit (a few hundred entries).

    Kept: the first, last and best entries, about ``points`` log-spaced steps, and
    every step where the running minimum of the loss fell by ``rel`` (1%)
    since the last such step, so that the time to any target is recorded
    within 1% of its level. Called after the targets were measured on the
    full history; ``step`` records the step numbers kept.
    """
    n = len(run["loss"])
    if n <= 2 * points or "step" in run:
        return
    keep = {0, n - 1, min(range(n), key=run["loss"].__getitem__)}
    keep |= {min(n - 1, round(math.exp(i * math.log(n) / points))) for i in range(points + 1)}
    best = run["loss"][0]
    for i, v in enumerate(run["loss"]):
        if v <= best * (1.0 - rel):
            best = v
            keep.add(i)
    idx = sorted(keep)
    run["step"] = idx
    for key in ("seconds", "loss"):
        run[key] = [float(f"{run[key][i]:.6g}") for i in idx]


SECOND = ["newton-tr", "lm-hessian", "gauss-newton"]
FIRST = {"adam": [1e-3, 3e-3, 1e-2, 3e-2], "sgd-momentum": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--width", type=int, default=6)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--budget", type=float, default=20.0, help="wall-clock seconds per run")
    p.add_argument("--sweep-budget", type=float, default=8.0)
    p.add_argument("--max-steps", type=int, default=400)
    p.add_argument("--max-first-order-steps", type=int, default=200_000)
    p.add_argument("--curvature-batch", type=int, default=None)
    p.add_argument("--synthetic-n", type=int, default=128)
    p.add_argument("--digits-n", type=int, default=600)
    p.add_argument(
        "--target",
        type=float,
        default=0.02,
        help="synthetic: target as a fraction of the initial loss",
    )
    p.add_argument(
        "--target-digits",
        type=float,
        default=0.25,
        help="digits: target loss as a fraction of the initial loss",
    )
    p.add_argument(
        "--retable",
        action="store_true",
        help="recompute targets, table and plot from the saved JSON",
    )
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    if args.retable:
        tag = "training_quick" if args.quick else "training"
        result = json.loads((args.out / f"{tag}.json").read_text())
        for task, res in result["tasks"].items():
            summarize(res, args.target_digits if task == "digits" else args.target)
            thin_runs(res)
        (args.out / f"{tag}.json").write_text(json.dumps(result, indent=1, default=str))
        (args.out / f"{tag}.md").write_text(table(result))
        result["plot"] = plot(result, args.out / f"{tag}.png")
        return result
    if args.quick:
        args.depth, args.width, args.seeds = 4, 3, 1
        args.budget, args.sweep_budget = 1.0, 0.3
        args.synthetic_n, args.digits_n = 32, 64
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "training_quick" if args.quick else "training"
    # warm up torch.func and the factorizations (their first call compiles; not timed)
    wm = mlp(3, 3, 3, 1, seed=0)
    wx = torch.randn(4, 3, dtype=DT)
    for curv in ("hessian", "gauss-newton"):
        hessinv.optim.Newton(wm, nn.MSELoss(), curvature=curv).step(wx, wx[:, :1])
    result: dict = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "tasks": {},
    }
    for task in args.tasks:
        make = TASKS[task]
        res: dict = {"sweep": {}, "runs": {}}
        # learning-rate sweep on seed 0 (final loss after the sweep budget)
        for kind, lrs in FIRST.items():
            sweep = {}
            for lr in lrs:
                r = run_first_order(*make(args, 0), kind, lr, args.sweep_budget, args)
                sweep[str(lr)] = r["loss"][-1] if math.isfinite(r["loss"][-1]) else math.inf
            res["sweep"][kind] = sweep
            print(task, kind, "sweep", sweep, flush=True)
        best_lr = {k: float(min(v, key=v.get)) for k, v in res["sweep"].items()}
        res["best_lr"] = best_lr
        for kind in SECOND + list(FIRST):
            res["runs"][kind] = []
            for seed in range(args.seeds):
                model, loss, X, y = make(args, seed)
                if kind in FIRST:
                    r = run_first_order(model, loss, X, y, kind, best_lr[kind], args.budget, args)
                else:
                    r = run_second_order(model, loss, X, y, kind, args.budget, args)
                res["runs"][kind].append(r)
                print(
                    f"{task} {kind} seed {seed}: {r['loss'][0]:.3e} -> {r['loss'][-1]:.3e} "
                    f"in {r['seconds'][-1]:.1f}s, {len(r['loss']) - 1} steps",
                    flush=True,
                )
        summarize(res, args.target_digits if task == "digits" else args.target)
        thin_runs(res)
        result["tasks"][task] = res
    (args.out / f"{tag}.json").write_text(json.dumps(result, indent=1, default=str))
    md = table(result)
    (args.out / f"{tag}.md").write_text(md)
    result["plot"] = plot(result, args.out / f"{tag}.png")
    print(md)
    return result


def thin_runs(res: dict) -> None:
    """:func:`thin` every first-order run of a task (after :func:`summarize`)."""
    for kind in FIRST:
        for r in res["runs"].get(kind, []):
            thin(r)


def summarize(res: dict, fraction: float) -> None:
    """Target loss (``fraction`` of the median initial loss) and times/steps to reach it."""
    init = statistics.median(r["loss"][0] for runs in res["runs"].values() for r in runs)
    target = fraction * init
    res["target_fraction"] = fraction
    res["target_loss"] = target
    res["time_to_target"] = {
        k: [time_to(r, target) for r in runs] for k, runs in res["runs"].items()
    }
    res["steps_to_target"] = {
        k: [steps_to(r, target) for r in runs] for k, runs in res["runs"].items()
    }
    res["final_loss"] = {k: [r["loss"][-1] for r in runs] for k, runs in res["runs"].items()}
    res["best_loss"] = {k: [min(r["loss"]) for r in runs] for k, runs in res["runs"].items()}


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def table(result: dict) -> str:
    lines = []
    for task, res in result["tasks"].items():
        lines.append(
            f"**{task}** (target loss {res['target_loss']:.3g} = {res['target_fraction']:g} x the "
            f"initial loss; learning rates "
            f"{', '.join(f'{k} {v:g}' for k, v in res['best_lr'].items())})\n"
        )
        lines.append(
            "| method | median s to target | seeds reaching it | median steps | "
            "median final loss | median best loss |"
        )
        lines.append("|---|---|---|---|---|---|")
        best_first = min(_med(res["time_to_target"][k]) for k in FIRST)
        for k, ts in res["time_to_target"].items():
            reached = sum(math.isfinite(t) for t in ts)
            mt = _med(ts)
            speed = ""
            if k in SECOND and math.isfinite(mt) and mt > 0:
                speed = (
                    f" ({best_first / mt:.2g}x the best first-order)"
                    if math.isfinite(best_first)
                    else " (first-order: not reached)"
                )
            lines.append(
                f"| {k} | {mt:.3g}{speed} | {reached}/{len(ts)} | "
                f"{_med(res['steps_to_target'][k]):.3g} | {_med(res['final_loss'][k]):.3g} | "
                f"{_med(res['best_loss'][k]):.3g} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(result["tasks"])
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 4.2 * len(tasks)), squeeze=False)
    colors = dict(zip(SECOND + list(FIRST), plt.cm.tab10.colors, strict=False))
    for row, task in enumerate(tasks):
        res = result["tasks"][task]
        for k, runs in res["runs"].items():
            for i, r in enumerate(runs):
                lab = k if i == 0 else None
                axes[row][0].semilogy(
                    step_numbers(r), r["loss"], color=colors[k], alpha=0.7, label=lab
                )
                axes[row][1].semilogy(
                    r["seconds"], r["loss"], color=colors[k], alpha=0.7, label=lab
                )
        for ax, xl in zip(axes[row], ("steps", "wall-clock seconds"), strict=True):
            ax.axhline(res["target_loss"], color="k", ls=":", lw=1)
            ax.set(xlabel=xl, ylabel="training loss", title=f"{task}")
            ax.grid(True, which="both", alpha=0.3)
        axes[row][0].set_xscale("symlog", linthresh=10)
        axes[row][0].set_xlim(left=0)
        axes[row][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


if __name__ == "__main__":
    main()
