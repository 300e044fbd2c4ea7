"""Random networks of the reliability campaign, each with its independent dense reference.

A :class:`Problem` carries ``make_op(dtype)`` (the hessinv operator, built only
when asked, so that a refusal at construction is an outcome like any other),
the :class:`~reliability_ref.Reference` and the dampings to try. The weights,
inputs and targets are rounded to float32 once, so the float32 and float64
runs describe the same exact problem and share one float64 reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from reliability_ref import F32, F64, Reference, build_reference, model_loss_fn, stages_loss_fn
from torch import nn

import hessinv

ACTS = [
    nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.Softplus, nn.ELU, nn.ReLU, nn.LeakyReLU,
    nn.Mish, nn.Softsign,
]  # fmt: skip
LOSSES = ["mse", "ce", "bce", "nll"]


@dataclass
class Problem:
    """One network, loss and batch, with its reference and the dampings to try."""

    name: str
    make_op: Callable[[torch.dtype], object]
    ref: Reference
    dampings: list[float]
    dtypes: tuple[torch.dtype, ...] = (F64, F32)
    refusal_ok: bool = False  # a clear refusal at construction is justified
    woodbury: bool = False  # also try method="woodbury"
    meta: dict = field(default_factory=dict)


def _round32(t: torch.Tensor) -> torch.Tensor:
    return t.float().double() if t.dtype.is_floating_point else t


def pick_dampings(ref: Reference, rng: np.random.Generator) -> list[float]:
    """``0``, ``+-||H|| 10^U(-8,0)`` and one within ``||H|| 10^U(-10,-2)`` of ``-lambda_k``."""
    hn = ref.hnorm if ref.hnorm > 0 else 1.0
    out = [0.0, hn * 10 ** rng.uniform(-8, 0), -hn * 10 ** rng.uniform(-8, 0)]
    if ref.W:
        lam = float(ref.evals[int(rng.integers(ref.W))])
        out.append(-lam + float(rng.choice([-1, 1])) * hn * 10 ** rng.uniform(-10, -2))
    return out


def _loss_module(kind: str, red: str) -> nn.Module:
    return {
        "mse": nn.MSELoss,
        "ce": nn.CrossEntropyLoss,
        "bce": nn.BCEWithLogitsLoss,
        "nll": nn.NLLLoss,
    }[kind](reduction=red)


def _targets(kind: str, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    if kind in ("ce", "nll"):
        return torch.randint(0, k, (n,), generator=gen)
    if kind == "bce":
        return torch.randint(0, 2, (n, k), generator=gen).to(F64)
    return torch.randn(n, k, generator=gen, dtype=F64)


def scaled(loss: Callable, c: float) -> Callable:
    """``c * loss`` as a plain callable (``c == 1``: the loss module itself)."""
    if c == 1.0:
        return loss

    def f(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return c * loss(o, t)

    return f


def _init_weights(model: nn.Module, gain: float, gen: torch.Generator) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * gain / fan_in**0.5)
                if m.bias is not None:
                    m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen))
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm1d)):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen))
                if isinstance(m, nn.BatchNorm1d):
                    m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=gen))
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


def _act(rng: np.random.Generator) -> nn.Module:
    if rng.random() < 0.05:
        return nn.Softmax(dim=1)
    return ACTS[int(rng.integers(len(ACTS)))]()


def model_problem(
    name: str,
    model: nn.Module,
    loss: Callable,
    X: torch.Tensor,  # noqa: N803
    y: torch.Tensor,
    rng: np.random.Generator | None,
    *,
    dampings: list[float] | None = None,
    gauss_newton: bool = False,
    ref: Reference | None = None,
    **kw,
) -> Problem:
    """A :class:`Problem` for ``Hessian(model, loss, X, y)`` (float32 copy made on demand)."""
    model = model.to(F64)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(_round32(p))
    X, y = _round32(X.to(F64) if X.dtype.is_floating_point else X), _round32(y)
    cls = hessinv.GaussNewton if gauss_newton else hessinv.Hessian

    def cast(t: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        return t.to(dt) if t.dtype.is_floating_point else t

    def make_op(dt: torch.dtype):
        m = model if dt == F64 else _copy_to(model, dt)
        return cls(m, loss, cast(X, dt), cast(y, dt))

    if ref is None:
        f64, x64 = model_loss_fn(model, loss, X, y)
        m32 = _copy_to(model, F32)
        f32, x32 = model_loss_fn(m32, loss, cast(X, F32), cast(y, F32))
        ref = build_reference(f64, x64, f32, x32)
    if dampings is None:
        dampings = pick_dampings(ref, rng)
    return Problem(name, make_op, ref, dampings, **kw)


def _copy_to(model: nn.Module, dt: torch.dtype) -> nn.Module:
    import copy

    return copy.deepcopy(model).to(dt)


def random_mlp(
    seed: int, rng: np.random.Generator, gen: torch.Generator, cnn: bool, max_depth: int = 40
) -> Problem:
    """A random ``nn.Sequential`` (MLP, or convolutions then an MLP) with a random loss."""
    depth = int(rng.integers(1, max_depth + 1))
    wmax = int(np.clip(math.isqrt(max(1, 300 // depth)), 1, 12))
    n = int(rng.integers(1, 11))
    kind, red = LOSSES[int(rng.integers(4))], ["sum", "mean"][int(rng.integers(2))]
    k_out = int(rng.integers(2, 5)) if kind in ("ce", "nll") else int(rng.integers(1, wmax + 1))
    mods: list[nn.Module] = []
    arch: list[str] = []
    if cnn:
        two_d = bool(rng.random() < 0.5)
        c_in, size = int(rng.integers(1, 3)), int(rng.integers(3, 6))
        X = torch.randn((n, c_in, size, size) if two_d else (n, c_in, size), generator=gen)
        c, n_conv = c_in, min(depth, int(rng.integers(1, 3)))
        for _ in range(n_conv):
            c_out, ker = int(rng.integers(1, 3)), int(rng.integers(1, min(3, size) + 1))
            stride, pad = int(rng.integers(1, 3)), int(rng.integers(0, 2))
            conv = (nn.Conv2d if two_d else nn.Conv1d)(c, c_out, ker, stride=stride, padding=pad)
            mods += [conv, _act(rng)]
            arch.append(f"{type(conv).__name__}({c},{c_out},{ker},s{stride},p{pad})")
            size, c = (size + 2 * pad - ker) // stride + 1, c_out
        mods.append(nn.Flatten())
        d_in = c * size * (size if two_d else 1)
        depth -= n_conv
    else:
        d_in = int(rng.integers(1, wmax + 1))
        X = torch.randn(n, d_in, generator=gen)
    a = d_in
    for i in range(depth):
        last = i == depth - 1
        w = k_out if last else int(rng.integers(1, wmax + 1))
        mods.append(nn.Linear(a, w))
        arch.append(f"L{w}")
        if not last:
            r = rng.random()
            if r < 0.08 and w >= 2:
                mods.append(nn.LayerNorm(w))
                arch.append("LN")
            elif r < 0.16:
                mods.append(nn.BatchNorm1d(w))
                arch.append("BN")
            mods.append(_act(rng))
            arch.append(type(mods[-1]).__name__)
        a = w
    if cnn and depth == 0:  # every param layer was a convolution: end with a linear one
        mods.append(nn.Linear(d_in, k_out))
        arch.append(f"L{k_out}")
    if kind == "nll":
        mods.append(nn.LogSoftmax(dim=1))
    model = nn.Sequential(*mods)
    gain = float(rng.uniform(0.1, 3.0))
    _init_weights(model, gain, gen)
    model.eval()
    c = 1.0 if rng.random() < 0.5 else float(np.float32(10 ** rng.uniform(-12, 12)))
    y = _targets(kind, n, k_out, gen)
    loss = scaled(_loss_module(kind, red), c)
    meta = {
        "seed": seed, "family": "cnn" if cnn else "mlp", "arch": " ".join(arch), "batch": n,
        "loss": f"{kind}/{red}", "scale": c, "gain": gain,
    }  # fmt: skip
    p = model_problem(f"random-{seed}", model, loss, X, y, rng, meta=meta)
    p.meta["W"] = p.ref.W
    return p


def _stage_fn(kind: str, act: Callable) -> Callable:
    if kind == "scaled":
        return lambda z, p: act(p[2] * (z @ p[0].T) + p[1])
    if kind == "residual":
        return lambda z, p: z + p[2] * act(z @ p[0].T + p[1])
    return lambda z, p: act(z @ p[0].T + p[1] ** 2)  # "square-bias"


def random_stages(
    seed: int, rng: np.random.Generator, gen: torch.Generator, max_depth: int = 40
) -> Problem:
    """A functional pipeline whose stages have nonzero ``Txx`` (parameters enter nonlinearly)."""
    depth = int(rng.integers(1, max_depth + 1))
    wmax = int(np.clip(math.isqrt(max(1, 300 // depth)), 1, 10))
    n, gain = int(rng.integers(1, 11)), float(rng.uniform(0.1, 3.0))
    a = int(rng.integers(1, wmax + 1))
    z0 = _round32(torch.randn(n, a, generator=gen, dtype=F64))
    fns, params, arch = [], [], []
    for _ in range(depth - 1):
        kind = ["scaled", "residual", "square-bias"][int(rng.integers(3))]
        w = a if kind == "residual" else int(rng.integers(1, wmax + 1))
        act = [torch.tanh, torch.sigmoid, torch.nn.functional.softplus][int(rng.integers(3))]
        A = torch.randn(w, a, generator=gen, dtype=F64) * gain / a**0.5
        ps = (A, 0.3 * torch.randn(w, generator=gen, dtype=F64))
        if kind != "square-bias":
            ps = ps + (1 + 0.3 * torch.randn(1, generator=gen, dtype=F64),)
        fns.append(_stage_fn(kind, act))
        params.append(tuple(_round32(p) for p in ps))
        arch.append(f"{kind}{w}/{act.__name__}")
        a = w
    c = 1.0 if rng.random() < 0.5 else float(np.float32(10 ** rng.uniform(-12, 12)))
    k = int(rng.integers(1, 4))
    t = _round32(torch.randn(n, k, generator=gen, dtype=F64))
    mean = bool(rng.random() < 0.5)

    def loss_fn(z, p, t=t, c=c, mean=mean):
        r = 0.5 * ((z @ (p[0] * p[1]).T - t.to(z.dtype)) ** 2).sum()
        return c * (r / z.shape[0] if mean else r)

    fns.append(loss_fn)
    params.append(
        (
            _round32(torch.randn(k, a, generator=gen, dtype=F64) * gain / a**0.5),
            _round32(1 + 0.3 * torch.randn(k, 1, generator=gen, dtype=F64)),
        )
    )
    arch.append(f"loss{k}{'/mean' if mean else '/sum'}")
    return _stage_problem(seed, fns, params, z0, rng, arch, c, gain, "stages")


def random_woodbury(
    seed: int, rng: np.random.Generator, gen: torch.Generator, max_depth: int = 40
) -> Problem:
    """A one-sample pipeline with one parameter per activation (Section 6's assumptions)."""
    depth = int(rng.integers(2, max(2, max_depth) + 1))
    a, gain = int(rng.integers(1, 7)), float(rng.uniform(0.1, 3.0))
    z0 = _round32(torch.randn(1, a, generator=gen, dtype=F64))
    fns, params = [], []
    for _ in range(depth - 1):
        fns.append(lambda z, p: torch.tanh(p[0] * z + 0.5 * p[0] ** 2))
        params.append((_round32(gain * torch.randn(a, generator=gen, dtype=F64)),))
    c = 1.0 if rng.random() < 0.5 else float(np.float32(10 ** rng.uniform(-12, 12)))
    fns.append(
        lambda z, p, c=c: c * (0.5 * (p[0] ** 2).sum() * (z**2).sum() + p[0].sum() * z.sum())
    )
    params.append((_round32(1 + 0.3 * torch.randn(1, generator=gen, dtype=F64)),))
    arch = [f"tanh(x*z+x^2/2) width {a} x{depth - 1}", "loss"]
    p = _stage_problem(seed, fns, params, z0, rng, arch, c, gain, "woodbury")
    p.woodbury = True
    return p


def _stage_problem(seed, fns, params, z0, rng, arch, c, gain, family) -> Problem:
    def make_op(dt: torch.dtype):
        stages = [
            hessinv.Stage(fn, tuple(q.to(dt) for q in ps))
            for fn, ps in zip(fns, params, strict=True)
        ]
        return hessinv.Hessian.from_stages(stages, z0.to(dt))

    f64, x64 = stages_loss_fn(fns, params, z0)
    p32 = [tuple(q.to(F32) for q in ps) for ps in params]
    f32, x32 = stages_loss_fn(fns, p32, z0.to(F32))
    ref = build_reference(f64, x64, f32, x32)
    meta = {
        "seed": seed, "family": family, "arch": " ".join(arch), "batch": z0.shape[0],
        "loss": "stage", "scale": c, "gain": gain, "W": ref.W,
    }  # fmt: skip
    return Problem(f"random-{seed}", make_op, ref, pick_dampings(ref, rng), meta=meta)


def random_problem(seed: int, max_depth: int = 40) -> Problem:
    """The network of ``seed``: 45% MLP, 20% CNN, 25% stage pipeline, 10% Woodbury pipeline.

    ``max_depth`` (default 40) caps the number of parameter layers (the test suite's
    fast subset uses a smaller cap).
    """
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    r = rng.random()
    if r < 0.45:
        return random_mlp(seed, rng, gen, cnn=False, max_depth=max_depth)
    if r < 0.65:
        return random_mlp(seed, rng, gen, cnn=True, max_depth=max_depth)
    if r < 0.9:
        return random_stages(seed, rng, gen, max_depth=max_depth)
    return random_woodbury(seed, rng, gen, max_depth=max_depth)
