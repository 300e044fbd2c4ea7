"""The ``hessinv`` command: ``hessinv demo`` on a built-in default problem."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from .errors import SingularHessianError
from .hessian import Hessian

T = TypeVar("T")


def make_mlp(
    depth: int,
    width: int,
    batch: int,
    *,
    dtype: torch.dtype,
    device: str,
    seed: int = 0,
    gain: float = 1.5,
) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """A deep, narrow tanh MLP and a regression task on data the code makes.

    Weights are drawn with standard deviation ``gain / sqrt(width)``. With
    PyTorch's default init (gain about 0.58) a deep tanh net collapses to a
    near-constant map and its Hessian to a numerically singular one; with gain
    1.5 signals propagate and the Hessian is indefinite, but past a few hundred
    layers the net is chaotic: gradients grow exponentially with depth and
    ``H + dI`` becomes too ill-conditioned for float64 (``||H|| ~ 1e16`` at
    depth 1024, width 16). Gain 1 sits at the edge of chaos.
    """
    gen = torch.Generator().manual_seed(seed)
    mods: list[nn.Module] = []
    for _ in range(depth - 1):
        lin = nn.Linear(width, width)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(width, width, generator=gen) * gain / width**0.5)
            lin.bias.copy_(torch.randn(width, generator=gen) * 0.1)
        mods += [lin, nn.Tanh()]
    last = nn.Linear(width, 1)
    with torch.no_grad():
        last.weight.copy_(torch.randn(1, width, generator=gen) / width**0.5)
        last.bias.zero_()
    mods.append(last)
    model = nn.Sequential(*mods).to(dtype=dtype, device=device)
    X = torch.randn(batch, width, generator=gen).to(dtype=dtype, device=device)
    y = torch.sin(X.sum(1, keepdim=True))
    return model, nn.MSELoss(), X, y


class Progress:
    """A one-line-per-step progress display on stderr."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.i, self.enabled = total, 0, enabled

    def run(self, label: str, fn: Callable[[], T]) -> tuple[T, float]:
        """Run ``fn`` under ``label``; return its value and the seconds it took."""
        self.i += 1
        if self.enabled:
            print(f"[{self.i}/{self.total}] {label} ...", end="", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if self.enabled:
            print(f" {dt:.3f} s", file=sys.stderr, flush=True)
        return out, dt


def demo(args: argparse.Namespace) -> int:
    """Build, multiply, solve exactly and densely, and report (see ``--help``)."""
    dtype = {"float64": torch.float64, "float32": torch.float32}[args.dtype]
    steps = 6 if args.dense else 5
    pr = Progress(steps, enabled=not args.quiet)
    model, loss, X, y = make_mlp(
        args.depth, args.width, args.batch, dtype=dtype, device=args.device
    )
    H, t_build = pr.run(
        "building the operator (derivative blocks)", lambda: Hessian(model, loss, X, y)
    )
    g = H.gradient()
    _, t_hv = pr.run("H @ v", lambda: H @ g)
    fac, t_fac = pr.run(
        f"factoring H + {args.damping:g} I (lifted, pivoted)", lambda: H.factor(args.damping)
    )

    def exact_solve() -> torch.Tensor:
        return fac.solve(g, check=False)

    try:
        x, t_solve = pr.run("exact solve", exact_solve)
        res = float(H.residual(x[:, None], g[:, None], args.damping)[0])
    except SingularHessianError as e:
        print(f"\nexact solve refused: {e}", file=sys.stderr)
        return 2
    (inertia, (sign, logdet)), t_in = pr.run(
        "inertia and log-determinant", lambda: (fac.inertia(), fac.logdet())
    )
    lines = [
        f"network        tanh MLP, depth {args.depth}, width {args.width}, batch {args.batch}, "
        f"{args.dtype}, {args.device}",
        f"parameters     {H.num_params}",
        f"build          {t_build:.3f} s",
        f"H @ v          {t_hv * 1e3:.2f} ms",
        f"exact solve    {(t_fac + t_solve):.3f} s "
        f"(factor {t_fac:.3f} s + solve {t_solve * 1e3:.2f} ms)",
        f"  residual     {res:.2e}   ||(H + dI) x - g|| / ||g||, damping {args.damping:g}",
    ]
    if args.dense:
        try:
            xd, t_dense = pr.run(
                "dense solve (forms H, torch.linalg)",
                lambda: H.solve(g, damping=args.damping, method="dense", check=False),
            )
            res_d = float(H.residual(xd[:, None], g[:, None], args.damping)[0])
            lines += [
                f"dense solve    {t_dense:.3f} s "
                f"({t_dense / (t_fac + t_solve):.1f}x the exact solve)",
                f"  residual     {res_d:.2e}",
            ]
        except (SingularHessianError, RuntimeError) as e:
            lines.append(f"dense solve    failed: {e}")
    lines += [
        f"inertia        {inertia[0]} positive, {inertia[1]} negative, {inertia[2]} zero "
        f"eigenvalues of H + dI ({t_in:.3f} s)",
        f"log|det|       {logdet:.6g} (sign {sign:+.0f})",
    ]
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hessinv`` command."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="hessinv", description=__doc__)
    parser.add_argument("--version", action="version", version=f"hessinv {__version__}")
    sub = parser.add_subparsers(dest="cmd")
    d = sub.add_parser(
        "demo",
        help="exact Hessian solve on a deep, narrow tanh MLP",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d.add_argument("--depth", type=int, default=64, help="number of hidden layers")
    d.add_argument("--width", type=int, default=8, help="width of every hidden layer")
    d.add_argument("--batch", type=int, default=4, help="number of samples")
    d.add_argument("--damping", type=float, default=1e-3, help="the shift d in (H + d I)")
    d.add_argument("--dtype", choices=["float64", "float32"], default="float64", help="precision")
    d.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    d.add_argument(
        "--no-dense",
        dest="dense",
        action="store_false",
        help="skip the dense comparison solve (by default it runs)",
    )
    d.add_argument("--quiet", action="store_true", help="no progress display")
    args = parser.parse_args(argv)
    if args.cmd != "demo":
        parser.print_help()
        return 0 if args.cmd is None and argv == [] else 1
    for name in ("depth", "width", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    return demo(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
