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

from torch import nn
from torch.nn.utils import parametrize

from .derivatives.registry import registered
from .module_params import all_parameters
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
        for key, m in model.named_children():
            out.extend(leaf_modules(m, f"{prefix}.{key}" if prefix else key))
        return out
    return [(prefix, model)]


def _torch_base(m: nn.Module) -> type | None:
    """The first class in ``type(m)``'s MRO defined by torch (``nn.Linear`` for a subclass)."""
    for cls in type(m).__mro__:
        if cls.__module__.startswith("torch.nn.modules"):
            return cls
    return None


def check_leaf(m: nn.Module, name: str) -> None:
    """Refuse a leaf whose output is not its torch class's: parametrized, hooked, overridden.

    Raises:
        ValueError: Naming the module (and the parametrized parameters).
    """
    label = f"module '{name}' ({type(m).__name__})" if name else f"the model ({type(m).__name__})"
    if parametrize.is_parametrized(m):
        names = ", ".join(sorted(m.parametrizations.keys()))  # type: ignore[union-attr]
        raise ValueError(
            f"{label} has torch.nn.utils.parametrize parametrizations of {names}: hessinv "
            "would differentiate with respect to the stored tensor, not the parametrized "
            f"weight. Remove them (parametrize.remove_parametrizations), or {WAY_OUT}"
        )
    hooks = [
        h
        for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks")
        if getattr(m, h, None)
    ]
    if hooks:
        raise ValueError(
            f"{label} has {', '.join(hooks)} (e.g. weight_norm or spectral_norm): hessinv "
            f"evaluates the module functionally and would skip them. Remove them, or {WAY_OUT}"
        )
    base = _torch_base(m)
    if type(m) in registered():  # the user registered derivatives for this very class
        return
    if base is not None and type(m) is not base and type(m).forward is not base.forward:
        raise ValueError(
            f"{label} subclasses nn.{base.__name__} but overrides forward; hessinv would "
            f"evaluate it as a plain {base.__name__}. {WAY_OUT[0].upper()}{WAY_OUT[1:]}"
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
        if "forward" in vars(m):
            label = f"module '{name}' ({type(m).__name__})" if name else "the model"
            raise ValueError(
                f"{label} has a forward assigned on the object (m.forward = ...); hessinv "
                "evaluates a module from its class and would ignore it. Define a subclass "
                f"with that forward instead (it is traced), or {WAY_OUT}"
            )


def check_untied(model: nn.Module) -> None:
    """Refuse trainable tensors used in two places (tied weights, a module used twice).

    Raises:
        ValueError: Naming both places.
    """
    seen: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if not p.requires_grad:
            continue
        if id(p) in seen:
            raise ValueError(
                f"parameter '{name}' is the same tensor as '{seen[id(p)]}' (tied weights, or "
                "one module used twice): hessinv would treat the two uses as separate "
                "parameters, the Hessian of a different, larger model. Untie them "
                f"(copy.deepcopy the module), or {WAY_OUT} with the tie written out"
            )
        seen[id(p)] = name
    pair = first_overlap([(n, p) for n, p in model.named_parameters() if p.requires_grad])
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
    for name, p in model.named_parameters():
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
