"""Build time of ``hessinv.Hessian`` (forward and every stage's derivative blocks).

The per-layer derivative classes (:mod:`hessinv.derivatives`) exist for
speed; this times the operator's construction on a tanh MLP (default width
16, depth 64, batch 8, float64, one thread) as the median and minimum of
``--reps`` runs and prints one JSON line. To compare two source trees, run it
once with each on ``PYTHONPATH``, alternating, on an idle machine::

    PYTHONPATH=/path/to/old/src python benchmarks/build_blocks.py --label old
    PYTHONPATH=/path/to/new/src python benchmarks/build_blocks.py --label new
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

import hessinv


def mlp(width: int, depth: int, batch: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A tanh MLP of ``depth`` Linear layers, width ``width``, scalar output, and data."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(width, 1)).double()
    return model, torch.randn(batch, width, dtype=torch.float64), torch.randn(batch, 1).double()


def main() -> None:
    """Time the build and print ``{"label", "W", "median_s", "min_s", ...}``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=16, help="layer width (default 16)")
    ap.add_argument("--depth", type=int, default=64, help="number of Linear layers (default 64)")
    ap.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    ap.add_argument("--reps", type=int, default=15, help="repetitions (default 15)")
    ap.add_argument("--label", default="", help="a name for this tree in the output")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, x, y = mlp(args.width, args.depth, args.batch)
    hessinv.Hessian(model, nn.MSELoss(), x, y)  # warm-up
    times = []
    for _ in range(args.reps):
        t = time.perf_counter()
        op = hessinv.Hessian(model, nn.MSELoss(), x, y)
        _ = op.stage_blocks
        times.append(time.perf_counter() - t)
    print(json.dumps({
        "label": args.label, "W": op.num_params, "width": args.width, "depth": args.depth,
        "batch": args.batch, "reps": args.reps, "median_s": statistics.median(times),
        "min_s": min(times),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
