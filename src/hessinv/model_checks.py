"""Refusals of model structures the ``nn.Sequential`` adapter would silently get wrong.

The adapter reads a model as the chain of its leaf modules and evaluates each
leaf by a functional form of its class (:mod:`hessinv.layers`). That reading is
the model only if

* every container is a plain ``nn.Sequential`` (a subclass that overrides
  ``forward`` computes something else: :func:`check_plain_sequential`, the one
  place a tracer of general ``forward`` methods would plug in);
* every leaf computes what its torch class computes: no overridden ``forward``,
  no forward hooks or pre-hooks (old-style ``weight_norm``/``spectral_norm``),
  no ``torch.nn.utils.parametrize`` parametrizations (:func:`check_leaf`);
* every trainable tensor is used once: tied weights (one module used twice,
  a ``Parameter`` shared by two modules) would be treated as independent
  parameters, a Hessian of a different, larger model (:func:`check_untied`);
* every trainable parameter lives in a leaf of the chain
  (:func:`check_params_covered`).

Each check raises ``ValueError`` naming the module or parameter.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from .derivatives.registry import registered
from .module_params import all_parameters, first_repeat, model_parameters
from .pipeline import first_overlap

WAY_OUT = "write the network as hessinv.Stage functions (Hessian.from_stages)"


def check_plain_sequential(module: nn.Module, name: str) -> None:
    """Refuse an ``nn.Sequential`` subclass whose ``forward`` is not the plain chain.

    This is the single refusal a ``torch.fx`` tracer of custom ``forward``
    methods would replace.

    Raises:
        ValueError: ``module`` overrides ``nn.Sequential.forward``.
    """
    if isinstance(module, nn.Sequential) and type(module).forward is not nn.Sequential.forward:
        where = f"'{name}'" if name else "the model"
        raise ValueError(
            f"{where} is a {type(module).__name__}, an nn.Sequential subclass that overrides "
            "forward: its forward is not a plain chain of its children, and reading it as one "
            f"would give a wrong H. Use a plain nn.Sequential, or {WAY_OUT}"
        )


def leaf_modules(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of the leaves of a (nested) ``nn.Sequential``, in order.

    Raises:
        ValueError: A container at any level that is not a plain chain.
    """
    check_plain_sequential(model, prefix)
    if isinstance(model, nn.Sequential):
        out: list[tuple[str, nn.Module]] = []
        # every entry, as Sequential.forward runs them: named_children() lists a module
        # used twice only once, which dropped its second use from the pipeline
        for key, m in model._modules.items():
            if m is not None:
                out.extend(leaf_modules(m, f"{prefix}.{key}" if prefix else key))
        return out
    return [(prefix, model)]


def _torch_base(m: nn.Module) -> type | None:
    """The first class in ``type(m)``'s MRO defined by torch (``nn.Linear`` for a subclass)."""
    for cls in type(m).__mro__:
        if cls.__module__.startswith("torch.nn.modules"):
            return cls
    return None


def hooks_of(m: nn.Module) -> list[str]:
    """The kinds of hooks registered on ``m`` itself."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return [h for h in kinds if getattr(m, h, None)]


def check_leaf(m: nn.Module, name: str) -> None:
    """Refuse a leaf whose output is not its torch class's: parametrized, hooked, overridden.

    Raises:
        ValueError: Naming the module (and the parametrized parameters).
    """
    label = f"module '{name}' ({type(m).__name__})" if name else f"the model ({type(m).__name__})"
    # (register_parametrization adds the submodule "parametrizations": a plain leaf has none)
    if m._modules and parametrize.is_parametrized(m):
        names = ", ".join(sorted(m.parametrizations.keys()))  # type: ignore[union-attr]
        raise ValueError(
            f"{label} has torch.nn.utils.parametrize parametrizations of {names}: hessinv "
            "would differentiate with respect to the stored tensor, not the parametrized "
            f"weight. Remove them (parametrize.remove_parametrizations), or {WAY_OUT}"
        )
    hooks = hooks_of(m)
    if hooks:
        raise ValueError(
            f"{label} has {', '.join(hooks)} (e.g. weight_norm or spectral_norm): hessinv "
            f"evaluates the module functionally and would skip them. Remove them, or {WAY_OUT}"
        )
    base = _torch_base(m)
    mine = type(m) in registered() and not type(m).__module__.startswith("torch.")
    if mine:  # the user registered derivatives for this very class: its methods are theirs
        return
    if base is not None and type(m) is not base and type(m).forward is not base.forward:
        raise ValueError(
            f"{label} subclasses nn.{base.__name__} but overrides forward; hessinv would "
            f"evaluate it as a plain {base.__name__}. {WAY_OUT[0].upper()}{WAY_OUT[1:]}"
        )
    if base is None or base is nn.Module:
        return
    for attr in ("forward", "__call__", "_call_impl"):  # torch's own, not patched or overridden
        where = getattr(getattr(type(m), attr, None), "__module__", None) or ""
        if not where.startswith("torch."):
            raise ValueError(
                f"{label}: {type(m).__name__}.{attr} is not torch's own (defined in "
                f"{where or 'an unknown module'}: patched on the class, or overridden by a "
                f"subclass); hessinv evaluates nn.{base.__name__} functionally and would "
                f"ignore it. Restore torch's {attr}, or {WAY_OUT}"
            )


def check_not_compiled(model: nn.Module) -> None:
    """Refuse a ``torch.jit`` or ``torch.compile`` wrapper, naming it and the way out.

    hessinv evaluates and traces the Python modules themselves; a scripted or
    compiled wrapper hides them.

    Raises:
        ValueError: Naming the wrapper.
    """
    if isinstance(model, torch.jit.ScriptModule):
        kind, way = "torch.jit (scripted or traced)", "the module before scripting"
    elif "_orig_mod" in model._modules:
        kind, way = "torch.compile", "the original module (model._orig_mod)"
    else:
        return
    raise ValueError(
        f"the model is a {kind} wrapper ({type(model).__name__}); hessinv differentiates "
        f"the Python modules themselves. Pass {way}, or {WAY_OUT}"
    )


def check_no_instance_forward(model: nn.Module) -> None:
    """Refuse a ``forward`` assigned on a module object (``m.forward = ...``).

    hessinv evaluates a known module from its class (its layer function) and
    traces a model from its class's ``forward``: a function stored on the
    instance would be ignored, and ``H`` would be that of another network.

    Raises:
        ValueError: Naming the module.
    """
    for name, m in model.named_modules():
        custom = type(m) not in registered() and _torch_base(m) is nn.Module
        if name and custom:  # a user's module is called (or traced) with its instance's forward
            continue
        if "forward" in vars(m):
            label = f"module '{name}' ({type(m).__name__})" if name else "the model"
            raise ValueError(
                f"{label} has a forward assigned on the object (m.forward = ...); hessinv "
                "evaluates a module from its class and would ignore it. Define a subclass "
                f"with that forward instead (it is traced), or {WAY_OUT}"
            )


def global_hooks() -> list[str]:
    """The kinds of torch's global module hooks registered now (empty: none)."""
    mod = nn.modules.module
    kinds = (
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
        "_global_backward_hooks",
        "_global_backward_pre_hooks",
    )
    return [k for k in kinds if getattr(mod, k, None)]


def check_no_global_hooks() -> None:
    """Refuse torch's global module hooks (``register_module_forward_hook`` and kin).

    hessinv evaluates known modules functionally (``F.linear``, closed-form
    derivatives), which such hooks never see: ``H`` would be that of the
    network without them.

    Raises:
        ValueError: Naming the kinds of hooks registered.
    """
    kinds = global_hooks()
    if kinds:
        raise ValueError(
            f"torch has global module hooks registered ({', '.join(kinds)}; e.g. by "
            "torch.nn.modules.module.register_module_forward_hook): hessinv evaluates modules "
            "functionally and would skip them. Remove them (handle.remove()) while building the "
            f"operator, or {WAY_OUT}"
        )


def check_container_hooks(model: nn.Module, *, root_only: bool = False) -> None:
    """Refuse hooks on the model itself or (``root_only=False``) on a module with children.

    A plain chain is evaluated leaf by leaf: a hook on any container would be
    skipped. torch.fx traces the model's own ``forward`` (its hooks are
    skipped) and calls every submodule with its hooks (``root_only=True``).

    Raises:
        ValueError: Naming the container.
    """
    for name, m in model.named_modules():
        if name and (root_only or not m._modules):
            continue  # leaves: check_leaf (or, traced, called with their hooks)
        hooks = hooks_of(m)
        if hooks:
            label = f"container '{name}'" if name else "the model"
            raise ValueError(
                f"{label} ({type(m).__name__}) has {', '.join(hooks)}: hessinv evaluates "
                "the model module by module (or traces its forward) and would skip them. "
                f"Remove them, or {WAY_OUT}"
            )


def check_untied(model: nn.Module) -> None:
    """Refuse trainable tensors used in two places (tied weights, a module used twice).

    Raises:
        ValueError: Naming both places.
    """
    listed = model_parameters(model, remove_duplicate=False)
    pair = first_repeat(listed, trainable_only=True)
    if pair is not None:
        raise ValueError(
            f"parameter '{pair[1]}' is the same tensor as '{pair[0]}' (tied weights, or "
            "one module used twice): hessinv would treat the two uses as separate "
            "parameters, the Hessian of a different, larger model. Untie them "
            f"(copy.deepcopy the module), or {WAY_OUT} with the tie written out"
        )
    # (each trainable tensor is listed once now: a repeated one was refused above)
    pair = first_overlap([(n, p) for n, p in listed if p.requires_grad])
    if pair is not None:
        raise ValueError(
            f"parameters '{pair[0]}' and '{pair[1]}' share memory (tied weights): hessinv "
            f"would treat them as independent. Untie them, or {WAY_OUT}"
        )


def check_params_covered(model: nn.Module, leaves: list[tuple[str, nn.Module]]) -> None:
    """Refuse trainable parameters outside every leaf (e.g. set on a Sequential subclass).

    Raises:
        ValueError: Naming the parameter.
    """
    inside = {id(p) for _, m in leaves for _, p in all_parameters(m)}
    for name, p in model_parameters(model):
        if p.requires_grad and id(p) not in inside:
            raise ValueError(
                f"parameter '{name}' is not inside any module of the chain (registered on a "
                f"container): the chain does not use it as hessinv reads it. {WAY_OUT[0].upper()}"
                f"{WAY_OUT[1:]}"
            )


def out_of_place(m: nn.Module) -> nn.Module:
    """``m``, or a copy with ``inplace=False`` if it computes in place (the user's is untouched).

    In-place activations (``nn.ReLU(inplace=True)``, ``nn.ELU(inplace=True)``, ...)
    overwrite their input, which autograd's higher derivatives and ``torch.func``
    transforms cannot differentiate through; out of place they compute the same.
    """
    if getattr(m, "inplace", False) is True:
        c = copy.deepcopy(m)
        c.inplace = False
        return c
    return m
