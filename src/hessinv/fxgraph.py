r"""Any ``nn.Module`` whose forward is a chain of single tensors, cut into stages by ``torch.fx``.

The model is traced with ``torch.fx`` into a dataflow graph. A node ``v``
(a batched floating tensor) is an **articulation point** when every path from
the input to the output passes through it: then everything after ``v`` depends
on what came before only through ``v``, and the pipeline can be cut there
(``z_l = v``, paper eq. 1). A residual block ``x + f(x)``, a gate
``a * sigmoid(b)`` computed from one input, or a branch inside a block all fall
between two such points and become (part of) one stage.

In a DAG with one source, ``v`` dominates the output exactly when, in a
topological order of the nodes that depend on the input and reach the output,
the values computed up to ``v`` and used after it are ``{v}`` alone (every
node is an ancestor or a descendant of a dominator). One sweep with a count of
live values finds them all, in time linear in the graph.

Segments between consecutive cut points become :class:`~hessinv.Stage`\ s:
a segment's function interprets its sub-graph on the batched state, with its
parameters passed functionally (``get_attr`` nodes and the parameters of leaf
modules are substituted). A segment without trainable parameters joins the
previous one; the ones before the first parametrised segment are applied to the
input once; the loss joins the last segment. A parameter used by two segments
(a module called twice) merges them and everything between into one stage.
These stages have no ``structure``: their blocks come from generic autodiff,
exact for every op with correct derivatives. Torch's fused ``layer_norm`` has
wrong second derivatives (pytorch#196700): it is replaced by
:func:`hessinv.layers.layer_norm`; the fused ``instance_norm`` (also wrong) is
refused. Torch's CELU backward rounds ``1/alpha`` to float32 (derivatives off by
~1e-8 in float64): ``F.celu`` and ``nn.CELU`` run as
:func:`hessinv.derivatives.elementwise.celu`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from .derivatives import is_known
from .derivatives.elementwise import celu
from .fxcheck import CHECKED, check_deterministic, check_graph, record
from .layers import layer_norm


def is_leaf(m: nn.Module) -> bool:
    """True for a module kept as an fx leaf and run as itself (parameters substituted).

    The leaves are the modules with a registered derivatives class
    (:func:`hessinv.derivatives.is_known`: ``torch.nn`` layers and the user's
    registrations; a subclass with its own ``forward`` is traced through), the
    same list the ``nn.Sequential`` adapter uses, and :data:`CHECKED`.
    """
    return isinstance(m, CHECKED) or is_known(m)


#: Functions whose second derivatives torch gets wrong, with a correct replacement.
_FIXED: dict[object, Callable[..., Tensor]] = {}


def _layer_norm_fn(input, normalized_shape, weight=None, bias=None, eps=1e-5):  # noqa: ANN001, ANN202, A002
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    return layer_norm(input, shape, weight, bias, eps)


def _torch_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *_):  # noqa: ANN001, ANN002, ANN202, A002
    return _layer_norm_fn(input, normalized_shape, weight, bias, eps)


_FIXED[F.layer_norm] = _layer_norm_fn
_FIXED[torch.layer_norm] = _torch_layer_norm
_FIXED[F.celu] = celu
_FIXED[torch.celu] = celu


class _Tracer(fx.Tracer):
    """Keeps the modules of :func:`is_leaf` as leaves, traces through the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.path: list[str] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # a user subclass of a leaf type (its own forward) is traced through
        return is_leaf(m)

    def call_module(self, m, forward, args, kwargs):  # noqa: ANN001, ANN201, D102
        self.path.append(f"{self.path_of_module(m) or '(root)'} ({type(m).__name__})")
        out = super().call_module(m, forward, args, kwargs)
        self.path.pop()
        return out


def trace(model: nn.Module) -> fx.GraphModule:
    """``model`` as a ``torch.fx.GraphModule`` (dead code removed).

    Raises:
        ValueError: fx could not trace the model; the message names the module
            being traced and fx's reason (data-dependent control flow, an
            unsupported Python construct, ...).
    """
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:  # noqa: BLE001 - fx raises many kinds; all become one clear refusal
        where = tracer.path[-1] if tracer.path else f"(root) ({type(model).__name__})"
        raise ValueError(
            f"torch.fx could not trace module {where}: {type(e).__name__}: {e}. hessinv needs "
            "a forward without data-dependent control flow; wrap the untraceable part in a "
            "hessinv.Stage(fn, params) and use Hessian.from_stages"
        ) from e
    gm = fx.GraphModule(model, graph)
    gm.graph.eliminate_dead_code()
    return gm


def param_names_of_node(model: nn.Module, n: fx.Node, names: dict[str, int]) -> list[str]:
    """Selected parameter names a node reads directly (``get_attr`` or a leaf module's)."""
    if n.op == "get_attr":
        return [n.target] if n.target in names else []
    if n.op == "call_module":
        pre = n.target + "."
        return [k for k in names if k.startswith(pre)]
    return []


def _carries_tensor(v: object) -> bool:
    if isinstance(v, (tuple, list)):
        return any(_carries_tensor(u) for u in v)
    return isinstance(v, Tensor)


def _inputs(n: fx.Node) -> list[fx.Node]:
    return list(n.all_input_nodes)


@dataclass
class GraphPlan:
    """The graph split into segments (see module docstring).

    Attributes:
        segments: For each segment, ``(input node, nodes in order, output node)``.
        uses: For each segment, the selected parameter names it reads.
        baked: Values of nodes fixed at trace time (shapes, sizes: non-tensor
            values computed from the input's shape).
        dep: The nodes whose value depends on the input (the rest are
            constants: parameters, buffers and functions of them).
    """

    segments: list[tuple[fx.Node, list[fx.Node], fx.Node]]
    uses: list[set[str]]
    baked: dict[fx.Node, object]
    dep: set[fx.Node]


def plan_graph(
    model: nn.Module, gm: fx.GraphModule, x: Tensor, selected: dict[str, int]
) -> GraphPlan:
    """Find the cut points of ``graph`` and the segments between them.

    Args:
        model: The traced module.
        gm: Its fx graph module (:func:`trace`).
        x: The batched input ``X`` (``N`` samples).
        selected: Names of the parameters that are variables, to their index.

    Returns:
        The plan.
    """
    graph = gm.graph
    ph = check_graph(model, graph)
    out_node = next(n for n in graph.nodes if n.op == "output")
    res = out_node.args[0]
    if not isinstance(res, fx.Node):
        raise ValueError(
            f"the model returns {type(res).__name__}; hessinv needs forward to return one tensor"
        )
    n_batch = x.shape[0]
    name = type(model).__name__
    try:
        vals = record(gm, x)
    except Exception as e:  # noqa: BLE001 - torch's own error, re-raised with its cause named
        raise ValueError(
            f"{name}.forward failed on input of shape {tuple(x.shape)} and dtype {x.dtype} "
            f"before it could be cut into stages ({type(e).__name__}: {e}); check X's shape "
            "and dtype against the model's (e.g. model.double() for float64 X)"
        ) from e
    check_deterministic(model, gm, x, vals[res])
    try:  # one more sample tells the batch dimension from a coincidence of sizes
        vals2 = record(gm, torch.cat([x, x[:1]]))
    except Exception:  # noqa: BLE001 - a forward written for this batch size only
        vals2 = vals
    if not isinstance(vals[res], Tensor):
        raise ValueError("the model's forward does not return a tensor")

    order = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    dep: set[fx.Node] = {ph}
    baked: dict[fx.Node, object] = {}
    for n in order:
        if any(a in dep for a in _inputs(n)):
            if _carries_tensor(vals[n]):  # a tensor, or a tuple of them (split, chunk, unbind)
                dep.add(n)
            else:  # a shape or size: fixed for this batch
                baked[n] = vals[n]
    # nodes that reach the result
    reach: set[fx.Node] = {res}
    for n in reversed(order):
        if n in reach:
            reach.update(a for a in _inputs(n) if a not in baked)
    relevant = [n for n in order if n in dep and n in reach]
    rel_set = set(relevant) | {ph}
    users = {n: [u for u in n.users if u in rel_set] for n in rel_set}

    def batched(n: fx.Node) -> bool:
        v, v2 = vals[n], vals2[n]
        return (
            isinstance(v, Tensor)
            and v.is_floating_point()
            and v.dim() >= 1
            and v.shape[0] == n_batch
            and isinstance(v2, Tensor)
            and v2.dim() >= 1
            and v2.shape[0] == v.shape[0] + (vals2 is not vals)
            and v.shape[1:] == v2.shape[1:]
        )

    cuts = [ph]
    remaining = {n: len(users[n]) for n in rel_set}
    live = 1 if users[ph] else 0
    for n in relevant:
        for a in set(_inputs(n)):
            if a in rel_set:
                remaining[a] -= 1
                if remaining[a] == 0:
                    live -= 1
        if users[n]:
            live += 1
            if live == 1 and n is not res and batched(n):
                cuts.append(n)
    if res is ph:
        raise ValueError("the model's forward returns its input unchanged")
    bounds = [*cuts, res]
    pos = {n: i for i, n in enumerate(relevant)}
    segments, uses = [], []
    for i in range(len(bounds) - 1):
        start, end = bounds[i], bounds[i + 1]
        lo = pos[start] + 1 if start is not ph else 0
        body = relevant[lo : pos[end] + 1]
        segments.append((start, body, end))
        uses.append(_segment_uses(model, body, selected, dep, baked))
    return GraphPlan(segments, uses, baked, dep)


def _constant_closure(body: list[fx.Node], dep: set[fx.Node], baked: dict) -> list[fx.Node]:
    """The input-independent nodes ``body`` needs (parameters, buffers, their functions)."""
    need: set[fx.Node] = set()
    stack = [a for n in body for a in _inputs(n) if a not in dep and a not in baked]
    while stack:
        a = stack.pop()
        if a in need:
            continue
        need.add(a)
        stack.extend(b for b in _inputs(a) if b not in dep and b not in baked)
    return [n for n in body[0].graph.nodes if n in need] if body else []


def _segment_uses(
    model: nn.Module, body: list[fx.Node], selected: dict[str, int], dep: set, baked: dict
) -> set[str]:
    used: set[str] = set()
    for n in _constant_closure(body, dep, baked) + body:
        used.update(param_names_of_node(model, n, selected))
    return used


class SegmentFn:
    """``fn(z, params)``: one or more consecutive segments of the graph, interpreted.

    Args:
        model: The traced module (leaf modules and constants are read from it).
        start: The node whose value is ``z``.
        body: The nodes to evaluate, in order.
        end: The node whose value is returned.
        names: The qualified names of ``params``, in order.
        baked: Fixed values of shape nodes.
        dep: Input-dependent nodes (the rest are constants, recomputed here).
        loss: ``(loss_func, y)`` applied to the result, for the last stage.
    """

    def __init__(
        self,
        model: nn.Module,
        start: fx.Node,
        body: list[fx.Node],
        end: fx.Node,
        names: list[str],
        baked: dict,
        dep: set,
        loss: tuple[Callable[..., Tensor], Tensor] | None = None,
    ) -> None:
        self.model = model
        self.start, self.end = start, end
        self.nodes = _constant_closure(body, dep, baked) + body
        self.names = names
        self.baked = baked
        self.loss = loss

    def __call__(self, z: Tensor, params: tuple[Tensor, ...]) -> Tensor:
        """Run the segment on ``z`` with ``params`` (in the order of ``names``)."""
        pm = dict(zip(self.names, params, strict=True))
        env: dict[fx.Node, object] = dict(self.baked)
        env[self.start] = z
        for n in self.nodes:
            args = fx.node.map_arg(n.args, env.__getitem__)
            kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
            env[n] = self._run(n, args, kwargs, pm)
        out = env[self.end]
        if self.loss is not None:
            loss_func, y = self.loss
            out = loss_func(out, y)
        return out

    def _run(self, n: fx.Node, args: tuple, kwargs: dict, pm: dict[str, Tensor]) -> object:
        if n.op == "get_attr":
            if n.target in pm:
                return pm[n.target]
            return _fetch(self.model, n.target)
        if n.op == "call_function":
            fn = _FIXED.get(n.target, n.target)
            return fn(*args, **kwargs)
        if n.op == "call_method":
            self_obj, *rest = args
            return getattr(self_obj, n.target)(*rest, **kwargs)
        if n.op == "call_module":
            m = self.model.get_submodule(n.target)
            pre = n.target + "."
            local = {k[len(pre) :]: v for k, v in pm.items() if k.startswith(pre)}
            # the parameters that are not variables enter as detached constants
            full = {k: v.detach() for k, v in m.named_parameters()}
            full.update(local)
            if isinstance(m, nn.LayerNorm):
                w, b = full.get("weight"), full.get("bias")
                return layer_norm(args[0], tuple(m.normalized_shape), w, b, m.eps)
            if type(m) is nn.CELU:  # torch's CELU backward is off by ~1e-8 (float32 1/alpha)
                return celu(args[0], m.alpha)
            if not full:
                return m(*args, **kwargs)
            return torch.func.functional_call(m, full, args, kwargs)
        raise ValueError(f"unexpected fx node {n.op} {n.name}")  # pragma: no cover


def _fetch(model: nn.Module, target: str) -> object:
    obj: object = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj.detach() if isinstance(obj, Tensor) else obj


def merge_shared(plan: GraphPlan) -> GraphPlan:
    """Merge segments ``i..j`` when a parameter is read by both ``i`` and ``j``."""
    segs, uses = list(plan.segments), list(plan.uses)
    changed = True
    while changed:
        changed = False
        for i in range(len(segs)):
            for j in range(len(segs) - 1, i, -1):
                if uses[i] & uses[j]:
                    start = segs[i][0]
                    body = [n for s in segs[i : j + 1] for n in s[1]]
                    end = segs[j][2]
                    u = set().union(*uses[i : j + 1])
                    segs[i : j + 1] = [(start, body, end)]
                    uses[i : j + 1] = [u]
                    changed = True
                    break
            if changed:
                break
    return GraphPlan(segs, uses, plan.baked, plan.dep)
