"""Any network a user already has: ``nn.Module`` -> stages, and the ``params=`` selection.

:func:`stages_for_model` is what :class:`hessinv.Hessian` calls. An
``nn.Sequential`` of the modules :mod:`hessinv.layers` knows (nested plain
``nn.Sequential`` included) keeps its fast, structured derivative paths
(:func:`hessinv.layers.stages_from_sequential`); everything else (classes with
their own ``forward``, ``nn.Sequential`` subclasses that override it,
Sequentials holding other modules, a ``params=`` subset that splits a module)
is traced by ``torch.fx`` and cut at its articulation points
(:mod:`hessinv.fxgraph`, :func:`stages_from_module`), with generic-autodiff
blocks.

The flat parameter vector (``H @ v``, ``gradient``, ``solve``, the list form of
vectors) follows the order of ``params=``. The pipeline keeps each stage's
parameters together and the stages in the order forward runs them, so a
``params=`` order that interleaves two stages, or puts a later stage first, is
refused with the order to use. Without ``params=`` the variables are the
parameters with ``requires_grad``; their order is ``model.parameters()`` order
where forward uses them in that order (a plain ``nn.Sequential``, a class that
registers its modules in the order it calls them), else the order in which
forward first uses them, with a warning that names it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.fx as fx
from torch import Tensor, nn

from .fxgraph import SegmentFn, merge_shared, param_names_of_node, plan_graph, trace
from .layers import (
    flatten_sequential,
    loss_reduction_check,
    sequential_known,
    stages_from_sequential,
)
from .mixing import batch_splits, on_side
from .model_checks import (
    check_container_hooks,
    check_no_global_hooks,
    check_no_instance_forward,
    check_not_compiled,
)
from .module_params import all_parameters, first_repeat, model_parameters
from .pipeline import Pipeline, Stage

ParamsArg = Iterable[Tensor] | Mapping[str, Tensor] | None


def stages_from_module(
    model: nn.Module,
    loss_func: Callable[..., Tensor],
    X: Tensor,  # noqa: N803
    y: Tensor,
    params: list[tuple[str, Tensor]] | None = None,
) -> tuple[list[Stage], Tensor]:
    """Trace ``model`` and cut it into stages at its articulation points.

    Args:
        model: Any ``nn.Module`` with ``forward(x) -> tensor``, traceable by ``torch.fx``.
        loss_func: ``loss_func(model(X), y)``, reduction ``"sum"`` or ``"mean"``.
        X: The inputs, batch first (floating, or integer indices for an Embedding).
        y: The targets, batch first.
        params: ``(name, parameter)`` pairs, the variables, in flat-vector order;
            default: the parameters with ``requires_grad`` in ``named_parameters()``
            order. Every other parameter is a constant.

    Returns:
        The stages (generic derivative path) and the first stage's input ``z0``.

    Raises:
        ValueError: fx cannot trace the model (the construct is named), an unsafe
            or unsupported module or function, a forward with several inputs or
            outputs, tied weights, no variable the output depends on, or an
            order of ``params`` that interleaves stages.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not callable(loss_func):
        raise TypeError("loss_func must be callable")
    loss_reduction_check(loss_func)
    check_tied(model)
    explicit = params is not None
    if params is None:
        params = resolve_params(model, None)
    selected = {n: i for i, (n, _) in enumerate(params)}
    tensors = dict(params)
    gm = trace(model)
    graph = gm.graph
    plan = plan_graph(model, gm, X, selected)
    plan = merge_shared(plan)
    dep = plan.dep

    groups: list[list[int]] = []  # segment indices per stage
    pre: list[int] = []  # parameter-free segments before the first stage
    for i, u in enumerate(plan.uses):
        if u:
            groups.append([i])
        elif groups:
            groups[-1].append(i)
        else:
            pre.append(i)
    if not groups:
        raise ValueError(
            "the model's output depends on none of the variables (no trainable parameter, or "
            "none of params=, is used by forward)"
        )
    unused = set(selected) - set().union(*plan.uses)
    if unused:
        raise ValueError(
            f"parameters {sorted(unused)} are variables but the model's output does not "
            "depend on them (their rows of H are zero); freeze them or leave them out of params="
        )
    if len(groups) == 1 and _n_parametrised(model, graph, selected) > 1:
        _warn_one_stage(model)
    z0 = X
    if pre:
        start, end = plan.segments[pre[0]][0], plan.segments[pre[-1]][2]
        body = [n for i in pre for n in plan.segments[i][1]]
        with torch.no_grad():
            z0 = SegmentFn(model, start, body, end, [], plan.baked, dep)(X, ())
    stages: list[Stage] = []
    for k, grp in enumerate(groups):
        start, end = plan.segments[grp[0]][0], plan.segments[grp[-1]][2]
        body = [n for i in grp for n in plan.segments[i][1]]
        used = set().union(*(plan.uses[i] for i in grp))
        names = sorted(used, key=selected.__getitem__)
        loss = (loss_func, y) if k == len(groups) - 1 else None
        fn = SegmentFn(model, start, body, end, names, plan.baked, dep, loss)
        stages.append(Stage(fn, tuple(tensors[n].detach() for n in names)))
    check_order([n for n, _ in params], [list(s.fn.names) for s in stages], explicit=explicit)
    return stages, z0.detach()


def _n_parametrised(model: nn.Module, graph: fx.Graph, selected: dict[str, int]) -> int:
    """How many nodes of the graph read a variable (leaf modules, ``get_attr``)."""
    return sum(1 for n in graph.nodes if param_names_of_node(model, n, selected))


def _warn_one_stage(model: nn.Module) -> None:
    warnings.warn(
        f"{type(model).__name__}: the traced graph has no articulation point between its "
        "parametrised parts (no single tensor carries everything forward), so the whole model "
        "is one stage: still exact, but the lifted system is one dense block of size "
        "W + N * a_out, cubic in W; Hessian(...).solve(method='dense') costs about the same",
        stacklevel=3,
    )


def check_tied(model: nn.Module) -> None:
    """Refuse a model that registers one parameter under two names (tied weights)."""
    pair = first_repeat(model_parameters(model, remove_duplicate=False))
    if pair is not None:
        raise ValueError(
            f"tied weights: {pair[0]} and {pair[1]} are the same parameter; hessinv "
            "would count it twice. Untie them, or write the model as hessinv.Stage(fn, "
            "params) objects with the shared tensor in one stage"
        )


def check_order(order: list[str], stage_names: list[list[str]], *, explicit: bool = True) -> None:
    """Refuse a ``params=`` order that does not follow the stages (flat order = ``params``).

    Without ``params=`` (``explicit=False``) the flat order would be
    ``model.parameters()`` order; when forward uses the parameters in another
    order, that is refused too (a user's vector in ``model.parameters()`` order
    would be read in the wrong order without an error), naming the order to
    pass as ``params=``.
    """
    flat = [n for names in stage_names for n in names]
    if flat != order and not explicit:
        raise ValueError(
            "forward uses this model's parameters in another order than model.parameters(), "
            "and hessinv's flat vectors follow the order of use; to make that order explicit "
            f"(and vectors in it unambiguous), pass params= in the order {flat}"
        )
    if flat != order:
        raise ValueError(
            "the flat vector follows the order of params=, so the parameters of one stage must "
            "be contiguous and the stages in the order forward uses them; pass params= in the "
            f"order {flat}"
        )


def resolve_params(model: nn.Module, params: ParamsArg) -> list[tuple[str, Tensor]]:
    """``params=`` as ``(name, parameter)`` pairs in the given order.

    Args:
        model: The network.
        params: ``None`` (the parameters with ``requires_grad``), an iterable of
            the model's parameters, or a dict name -> parameter (names as in
            ``model.named_parameters()``).

    Raises:
        TypeError: Not an iterable of tensors, or a non-floating parameter.
        ValueError: A tensor that is not a parameter of ``model``, a name that
            does not match it, a repeated parameter, or an empty selection.
    """
    listed = model_parameters(model)
    named = {id(p): n for n, p in listed}
    if params is None:
        out = [(n, p) for n, p in listed if p.requires_grad]
        if not out:
            raise ValueError("the model has no trainable parameters")
        return out
    if isinstance(params, Tensor):
        raise TypeError("params must be an iterable of parameters or a dict, not one tensor")
    if isinstance(params, Mapping):
        items = list(params.items())
    else:
        try:
            items = [(None, p) for p in params]
        except TypeError as e:
            raise TypeError(f"params must be iterable, got {type(params).__name__}") from e
    out: list[tuple[str, Tensor]] = []
    seen: set[int] = set()
    for i, (key, p) in enumerate(items):
        what = f"params[{key!r}]" if key is not None else f"params[{i}]"
        if not isinstance(p, Tensor):
            raise TypeError(f"{what} must be a parameter of the model, got {type(p).__name__}")
        if id(p) not in named:
            raise ValueError(f"{what} (shape {tuple(p.shape)}) is not a parameter of the model")
        name = named[id(p)]
        if key is not None and key != name:
            raise ValueError(f"{what} is the model's parameter {name!r}, not {key!r}")
        if id(p) in seen:
            raise ValueError(f"{what} ({name}) appears twice in params")
        if not p.dtype.is_floating_point:
            raise TypeError(f"{what} ({name}) has dtype {p.dtype}; parameters must be floating")
        seen.add(id(p))
        out.append((name, p))
    if not out:
        raise ValueError("params is empty: select at least one parameter")
    return out


def _plain_sequential(model: nn.Module) -> bool:
    """A (nested) plain ``nn.Sequential`` or a lone module, all of them known to layers.py.

    Known: a module with a registered derivatives class (``torch.nn``'s or the
    user's, :func:`hessinv.layers.sequential_known`).
    """
    for m in model.modules():
        if isinstance(m, nn.Sequential) and type(m).forward is not nn.Sequential.forward:
            return False
    # a subclass with its own forward (no registered class of its own) is traced
    return all(sequential_known(m) for m in flatten_sequential(model))


def _sequential_frozen(model: nn.Module, chosen: list[tuple[str, Tensor]]) -> set[int] | None:
    """Modules the selection leaves out entirely, if the Sequential path can take it.

    The Sequential path takes a selection made of whole modules (each module's
    ``requires_grad`` parameters all in, or all out) listed in model order;
    ``None`` otherwise.
    """
    ids = {id(p) for _, p in chosen}
    frozen: set[int] = set()
    order: list[int] = []
    for m in flatten_sequential(model):
        listed = all_parameters(m)
        if not listed:
            continue
        own = [p for _, p in listed if p.requires_grad]
        inside = [p for _, p in listed if id(p) in ids]
        if not inside:
            if own:
                frozen.add(id(m))
            continue
        if [id(p) for p in inside] != [id(p) for p in own]:
            return None
        order += [id(p) for p in own]
    if order != [id(p) for _, p in chosen]:
        return None
    return frozen


def stages_for_model(
    model: nn.Module,
    loss_func: Callable[..., Tensor],
    X: Tensor,  # noqa: N803
    y: Tensor,
    params: ParamsArg = None,
) -> tuple[list[Stage], Tensor]:
    """Stages of any supported model; the route is chosen as the module docstring says.

    Traced stages (arbitrary operations) are verified not to mix samples
    (:func:`check_no_mixing`) before they are returned.

    Returns:
        ``(stages, z0)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_not_compiled(model)
    check_tied(model)
    check_no_global_hooks()
    check_container_hooks(model, root_only=True)
    check_no_instance_forward(model)
    chosen = resolve_params(model, params)
    if _plain_sequential(model):
        frozen = _sequential_frozen(model, chosen)
        if frozen is not None:
            return stages_from_sequential(model, loss_func, X, y, frozen=frozen)
    stages, z0 = stages_from_module(model, loss_func, X, y, None if params is None else chosen)
    check_no_mixing(Pipeline(stages, z0))
    return stages, z0


def check_no_mixing(pipeline: Pipeline) -> None:
    """Raise if a stage after the first mixes samples (``ceil(log2 N)`` JVPs per stage).

    The per-sample blocks ``Jz``, ``Tzz`` (comb tangents,
    :mod:`hessinv.derivatives`) assume that sample ``n`` of a stage's output
    depends on sample ``n`` of its input only. For each split of the batch by a
    bit of the sample index (:func:`hessinv.mixing.batch_splits`: any two
    samples are separated by one), a tangent on one side of the input must
    leave the other side of the output's tangent (for the last stage: of ``d2
    loss / dz2 @ t``, by reverse over reverse, which every loss supports) at
    round-off level relative to the tangent side's response (exact zeros
    without mixing; the test follows a scaling of the loss). The first stage
    is exempt: its input is data, and its blocks (``Jx``, ``Txx``, the
    gradient) are full Jacobians of the batch, exact whether or not it mixes.

    Raises:
        ValueError: A stage that mixes samples, named by its index.
    """
    n = pipeline.batch_size
    if n < 2:
        return
    zs = pipeline.forward()
    gen = torch.Generator(device="cpu").manual_seed(0)
    last = len(pipeline.stages) - 1
    for i, st in enumerate(pipeline.stages):
        z = zs[i]
        if i == 0:
            continue
        noise = torch.randn(z.shape, generator=gen, dtype=z.dtype).to(z.device)
        leak = ref = 0.0
        for side in batch_splits(n, z.device):  # every pair of samples separated once
            t = on_side(noise, side)
            if i == last:

                def gz(zz: Tensor, st: Stage = st) -> Tensor:
                    return torch.func.grad(lambda q: st.fn(q, st.params).reshape(()))(zz)

                out = torch.func.grad(lambda zz, gz=gz, t=t: (gz(zz) * t).sum())(z)
            else:
                out = torch.func.jvp(lambda zz, st=st: st.fn(zz, st.params), (z,), (t,))[1]
            leak = max(leak, float(out[~side].abs().max()))
            ref = max(ref, float(out[side].abs().max()))
        # relative to the tangent side's own response (so loss * c is judged as loss): with
        # no mixing, the other side sees exactly zero tangents and responds with exact zeros
        if leak > 1e3 * torch.finfo(z.dtype).eps * ref:
            raise ValueError(
                f"stage {i} of the traced model mixes samples (a change to some samples "
                f"changes others by {leak:.2e}): every operation after the first stage must treat "
                "samples independently (batch norm in training mode, x - x.mean(0), ... do not)"
            )
