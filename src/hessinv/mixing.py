"""The sample-mixing check: every stage must treat the samples independently.

Every stage must treat the ``N`` samples of its input
independently: the Jacobian ``d z_l / d z_{l-1}`` is block diagonal over samples
(``J_{mn} = 0`` for ``m != n``) and the loss's Hessian ``d2 z_L / d z_{L-1}^2`` is
block diagonal too. The derivative blocks (the paper's
eqs. 10-13) are computed per sample, so a stage that mixes samples (batch
statistics, a softmax over the batch, a loss of batch sums) would give a wrong
``H`` without any error. :func:`check_no_mixing` probes each stage (each module of
a model stage) with random vectors supported on part of the batch. The batch is
split ``ceil(log2 N)`` ways, by each bit of the sample index (side ``S_b`` holds the
samples whose bit ``b`` is set), so that any two samples ``m != n`` are on
different sides of some split:

* a non-final map ``f``: per split, two vector-Jacobian products, ``u`` supported
  on one side and then on the other; ``(J^T u)`` on the other side,
  ``sum_{m in S} J_{mn}^T u_m`` for ``n`` outside ``S``, must vanish;
* the scalar loss: per split, one Hessian-vector product by reverse over reverse,
  ``v`` supported on one side (``H`` is symmetric, so ``(H v)_n = sum_{m in S}
  H_{nm} v_m`` for ``n`` outside ``S`` covers both directions).

A probe of one sample against the rest would miss a coupling between two other
samples (say ``o[2] * o[3]`` in the loss).

For a stage that treats samples independently the leaks are exact zeros (a
zero cotangent row stays zero through per-sample operations); the threshold,
``100 eps`` times the in-support response, only absorbs round-off of stages that
add and subtract batch sums. Both are measured in the same products, so the
test is invariant under scaling the loss (``1e-12`` and ``1e12`` give the same
verdict). Cost: one forward and ``2 ceil(log2 N)`` backward passes per stage (two
at ``N = 2``); a stage that leaks is probed again module by module, to name the
module at fault.

A model stage made only of modules that act on each sample by construction
(``nn.Linear`` on rows, elementwise activations), and for the last stage a
loss of torch's that sums per-sample terms with targets paired sample by
sample (:func:`_per_sample_loss`), needs no probe and gets none.

The first stage of a functional (or traced) pipeline is exempt: its input is
data and its generic blocks (``Jx``, ``Txx``, the gradient) are full Jacobians
of the batch, exact whether or not it mixes. A model stage on the fast path
is probed even first: its tail's per-sample Jacobians assume no mixing.

**One host read.** Every stage's probe is computed first and its leak and
in-support response are kept as device scalars; they are read on the host
together, once, after the loop over stages (one synchronization per build on
a GPU, not one per stage). Only a stage found leaking is probed again module
by module, on the way to the error. A probe that raises (a stage whose backward
fails) first has the probes before it read, so that an earlier stage that
leaks is still the one refused (stage order, as with one read per stage).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .grad_mode import recording
from .model_checks import global_hooks, hooks_of
from .pipeline import Pipeline, Stage, describe_stage

#: Leak (relative to the in-support response) above which a map mixes samples.
MIXING_RTOL_EPS = 100.0


@dataclass
class _Probe:
    label: str
    fn: Callable[[Tensor], Tensor]
    module: nn.Module | None = None


def _stage_probes(stage: Stage) -> list[_Probe]:
    """The maps of a stage to probe: each module of a model stage, else the whole stage."""
    st = stage.structure
    layer_fn = getattr(st, "layer_fn", None)
    if st is None or layer_fn is None:
        return [_Probe(describe_stage(stage), lambda z: stage.fn(z, stage.params))]
    probes = [_Probe(repr(st.layer), lambda z: layer_fn(z, stage.params), st.layer)]
    for m in st.tail:
        probes.append(_Probe(repr(m), m, m))
    if st.loss is not None:
        loss_func, target = st.loss
        name = repr(loss_func) if isinstance(loss_func, nn.Module) else _callable_name(loss_func)
        probes.append(_Probe(f"the loss {name}", lambda o: loss_func(o, target)))
    return probes


#: Exact module types that map each sample alone by construction (``F.linear`` and
#: elementwise functions act on the last dimension). A stage made only of them,
#: unhooked, needs no mixing probe; a subclass, a hook or a replaced ``forward`` is probed.
_ROW_WISE = (
    nn.Linear,
    nn.Identity,
    nn.Tanh,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.Sigmoid,
    nn.LogSigmoid,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Softplus,
    nn.Softsign,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Tanhshrink,
)


def _row_wise(m: nn.Module) -> bool:
    """``m`` acts on each sample alone by construction (:data:`_ROW_WISE`, no global hooks).

    A module's own hooks and a ``forward`` assigned on it never reach a stage:
    :func:`hessinv.model_checks.check_leaf` and
    :func:`hessinv.model_checks.check_no_instance_forward` refuse them first.
    """
    return type(m) in _ROW_WISE and not global_hooks()


def _row_wise_stage(stage: Stage, z: Tensor) -> bool:
    """A model stage of :data:`_ROW_WISE` modules only, on rows of ``z``, its loss per sample.

    A 1-D batch is not rows: ``nn.Linear`` on ``z`` of shape ``(N,)`` acts
    on the whole batch as one vector. The last stage's loss must be
    :func:`_per_sample_loss` on the output's shape.
    """
    st = stage.structure
    if z.dim() < 2 or st is None or getattr(st, "layer_fn", None) is None:
        return False
    if not (_row_wise(st.layer) and all(_row_wise(m) for m in st.tail)):
        return False
    if st.loss is None:
        return True
    # nn.Linear on rows and elementwise modules after it: the output's shape
    out = (*z.shape[:-1], st.layer.out_features)
    return type(st.layer) is nn.Linear and _per_sample_loss(*st.loss, out)


#: Exact loss classes whose value is a sum over samples of per-sample terms (divided
#: by a constant for ``"mean"``, for CE/NLL by the targets' class weights), given
#: the shapes :func:`_per_sample_loss` accepts: their Hessian in the output is
#: block diagonal over samples by construction.
_PER_SAMPLE_LOSSES = (nn.MSELoss, nn.BCEWithLogitsLoss, nn.CrossEntropyLoss, nn.NLLLoss)


def _per_sample_loss(loss_func: object, target: Tensor, out: tuple[int, ...]) -> bool:
    """``loss_func(o, target)`` with ``o`` of shape ``out`` is a sum of per-sample terms.

    Only torch's own classes, unhooked and with their own ``forward``, with
    ``reduction`` ``"sum"`` or ``"mean"``, and shapes that pair sample ``n``
    of ``o`` with sample ``n`` of ``target``: equal shapes (MSE, BCE with
    logits, class probabilities), or class indices of shape ``(N,)`` for
    ``o`` of shape ``(N, C)`` (CE, NLL). Any broadcast (``(N, 1)`` against
    ``(N,)`` pairs every sample with every target) is left to the probe.
    """
    if type(loss_func) not in _PER_SAMPLE_LOSSES or global_hooks():
        return False
    m: nn.Module = loss_func  # type: ignore[assignment]
    if hooks_of(m) or "forward" in vars(m) or m._modules or m.reduction not in ("sum", "mean"):
        return False
    if not isinstance(target, Tensor) or len(out) < 2:
        return False
    if tuple(target.shape) == out:
        return isinstance(m, (nn.MSELoss, nn.BCEWithLogitsLoss)) or (
            isinstance(m, nn.CrossEntropyLoss) and target.dtype.is_floating_point
        )
    classes = isinstance(m, (nn.CrossEntropyLoss, nn.NLLLoss)) and len(out) == 2
    return classes and tuple(target.shape) == out[:1] and not target.dtype.is_floating_point


def _callable_name(f: object) -> str:
    return getattr(f, "__qualname__", None) or type(f).__name__


def _randn_like(t: Tensor, gen: torch.Generator) -> Tensor:
    return torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)


def batch_splits(n: int, device: torch.device) -> list[Tensor]:
    """Boolean sides of the batch, one per bit of the sample index: every pair is separated.

    Samples ``i != j`` differ in some bit ``b`` of their index, so they fall on
    different sides of split ``b``: ``ceil(log2 n)`` probes see a coupling between
    *any* two samples (a probe of sample 0 against the rest would miss one that
    spares sample 0).
    """
    idx = torch.arange(n, device=device)
    return [((idx >> b) & 1).bool() for b in range(max(1, math.ceil(math.log2(n))))]


def on_side(t: Tensor, side: Tensor) -> Tensor:
    """``t`` (batch first) with the samples outside ``side`` (a boolean per sample) zeroed."""
    return t * side.reshape((-1,) + (1,) * (t.dim() - 1)).to(t.dtype)


def _side_sizes(n: int) -> list[int]:
    """Samples on the ``True`` side of each split of :func:`batch_splits` (on the host).

    Of ``0, ..., n - 1``, bit ``b`` is set in ``2^b`` of every ``2^(b+1)`` consecutive
    indices, and in ``max(0, r - 2^b)`` of the ``r = n mod 2^(b+1)`` left over.
    """
    bits = range(max(1, math.ceil(math.log2(n))))
    return [(n >> (b + 1) << b) + max(0, (n & ((2 << b) - 1)) - (1 << b)) for b in bits]


def _largest(leaks: list[Tensor], refs: list[Tensor], like: Tensor) -> Tensor:
    """``[max leaks, max refs]`` as one device tensor (no host read; zeros if none)."""
    if not leaks:
        return like.new_zeros(2, dtype=torch.float64)
    return torch.stack([torch.stack(leaks).amax(), torch.stack(refs).amax()]).double()


def _record(resp: Tensor, on: Tensor, n_on: int, leaks: list[Tensor], refs: list[Tensor]) -> None:
    """Append what ``resp`` puts outside side ``on`` (the leak) and its per-sample size inside."""
    leaks.append(torch.linalg.vector_norm(on_side(resp, ~on)))
    refs.append(torch.linalg.vector_norm(on_side(resp, on)) / math.sqrt(max(n_on, 1)))


def _jacobian_leak(out: Tensor, z: Tensor, gen: torch.Generator) -> Tensor:
    """``[leak, ref]`` (on the device) of the Jacobian of ``out`` w.r.t. ``z`` (two VJPs per split).

    For each split (:func:`batch_splits`) a random cotangent on one side only: what
    reaches the other side is the leak; ``ref`` is the per-sample size within a side.
    """
    u = _randn_like(out, gen)
    n = z.shape[0]
    splits = batch_splits(n, z.device)
    leaks: list[Tensor] = []
    refs: list[Tensor] = []
    for i, (side, size) in enumerate(zip(splits, _side_sizes(n), strict=True)):
        for j, (on, n_on) in enumerate(((side, size), (~side, n - size))):
            last = i == len(splits) - 1 and j == 1
            ub = on_side(u, on)
            # <out, u> as a scalar, not grad_outputs=u: torch's first call with grad_outputs
            # imports sympy (0.4 s); the gradient is the same
            (g,) = torch.autograd.grad(
                (out * ub).sum(), z, retain_graph=not last, allow_unused=True
            )
            if g is not None:
                _record(g, on, n_on, leaks, refs)
    return _largest(leaks, refs, z)


def _hessian_leak(loss: Tensor, z: Tensor, gen: torch.Generator) -> Tensor:
    """``[leak, ref]`` (on the device) of the Hessian of ``loss`` in ``z`` (reverse over reverse).

    For each split (:func:`batch_splits`) ``H v`` for a random ``v`` on one side: what
    reaches the other side is the leak (``H`` is symmetric: one side suffices).
    """
    (g,) = torch.autograd.grad(loss.reshape(()), z, create_graph=True, allow_unused=True)
    if g is None or not g.requires_grad:
        return z.new_zeros(2, dtype=torch.float64)  # affine in z: zero Hessian
    v = _randn_like(z, gen)
    n = z.shape[0]
    splits = batch_splits(n, z.device)
    leaks: list[Tensor] = []
    refs: list[Tensor] = []
    for i, (side, size) in enumerate(zip(splits, _side_sizes(n), strict=True)):
        vb = on_side(v, side)
        last = i == len(splits) - 1
        (hv,) = torch.autograd.grad((g * vb).sum(), z, retain_graph=not last, allow_unused=True)
        if hv is not None:
            _record(hv, side, size, leaks, refs)
    return _largest(leaks, refs, z)


def _mixing_hint(module: nn.Module | None) -> str:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return (
            " (a BatchNorm without running statistics normalises with batch statistics even "
            "in eval mode: use track_running_stats=True and model.eval())"
        )
    return ""


def _leak(
    fn: Callable[[Tensor], Tensor], z: Tensor, scalar: bool, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``([leak, ref], fn(z))``: the probe of one map (Hessian probe if ``scalar``).

    ``[leak, ref]`` stays on the device (float64): the caller reads it.
    """
    zz = z.clone().requires_grad_(True)
    with torch.enable_grad():
        out = fn(zz)
        if not out.requires_grad:
            return z.new_zeros(2, dtype=torch.float64), out.detach()
        if scalar:
            pair = _hessian_leak(out, zz, gen)
        else:
            pair = _jacobian_leak(out, zz, gen)
    return pair, out.detach()


@recording  # (autograd records nothing inside torch.inference_mode(): hessinv.grad_mode)
def check_no_mixing(pipeline: Pipeline, zs: Sequence[Tensor] | None = None) -> None:
    """Raise ``ValueError`` if a stage mixes samples, naming the module that does.

    Each stage is probed as a whole (one forward, two backward passes; reverse
    over reverse for the loss stage); only a stage that leaks is probed module
    by module, to name the culprit.

    Args:
        pipeline: The pipeline to check.
        zs: Its forward states ``[z_0, ..., z_L]`` if already computed.

    Raises:
        ValueError: Naming the stage index, the module (or stage function) and
            the relative size of the leak.
    """
    n = pipeline.batch_size
    if n < 2:
        return
    if zs is None:
        zs = pipeline.forward()
    gen = torch.Generator(device="cpu").manual_seed(0)
    n_st = len(pipeline.stages)
    probed: list[tuple[int, Tensor, bool]] = []  # (stage, its input, the loss stage)
    pairs: list[Tensor] = []  # their [leak, ref], read on the host at once
    for i, stage in enumerate(pipeline.stages):
        z = zs[i].detach()
        if not z.dtype.is_floating_point:
            continue  # integer inputs (token ids): no direction to probe
        if i == 0 and getattr(stage.structure, "layer_fn", None) is None:
            continue  # generic first stage: its blocks are full batch Jacobians, exact anyway
        scalar = i == n_st - 1
        if _row_wise_stage(stage, z):
            continue  # per sample by construction: nothing to probe
        try:
            pair, _ = _leak(lambda zz, s=stage: s.fn(zz, s.params), z, scalar, gen)
        except Exception:
            # a stage whose probe fails (its backward raises): an earlier stage that
            # leaks is the first problem in stage order, and is named first
            _raise_first_leak(pipeline, probed, pairs, gen)
            raise
        probed.append((i, z, scalar))
        pairs.append(pair)
    _raise_first_leak(pipeline, probed, pairs, gen)


def _raise_first_leak(
    pipeline: Pipeline,
    probed: list[tuple[int, Tensor, bool]],
    pairs: list[Tensor],
    gen: torch.Generator,
) -> None:
    """Read the probes' ``[leak, ref]`` at once; raise for the first stage that leaks."""
    if not pairs:
        return
    read = torch.stack(pairs).tolist()  # the only host read of the probes that pass
    for (i, z, scalar), (leak, ref) in zip(probed, read, strict=True):
        tol = MIXING_RTOL_EPS * torch.finfo(z.dtype).eps  # 100 eps of the stage's input
        if leak > tol * ref:
            _raise_mixing(pipeline.stages[i], i, z, scalar, tol, leak, ref, gen)


def _raise_mixing(
    stage: Stage,
    i: int,
    z: Tensor,
    scalar: bool,
    tol: float,
    leak: float,
    ref: float,
    gen: torch.Generator,
) -> None:
    """Raise the mixing error of stage ``i``, probed again module by module to name one."""
    probes = _stage_probes(stage)
    culprit = probes[0] if len(probes) == 1 else _Probe(describe_stage(stage), stage)
    if len(probes) > 1:  # a model stage: find the module
        zj = z
        for j, probe in enumerate(probes):
            sc = scalar and j == len(probes) - 1
            pair, zj = _leak(probe.fn, zj, sc, gen)
            lj, rj = pair.tolist()
            if lj > tol * rj:
                culprit, leak, ref, scalar = probe, lj, rj, sc
                break
    what = "Hessian" if scalar else "Jacobian"
    raise ValueError(
        f"stage {i}: {culprit.label} mixes samples (its {what} couples samples with "
        f"each other: leak {leak:.2e} against {ref:.2e} within samples)"
        f"{_mixing_hint(culprit.module)}; every stage must treat the samples "
        "(first dimension) independently, or H would come out wrong"
    )
