"""Per-stage derivative blocks (the paper's section 5).

Modules of this package:

* :mod:`~hessinv.derivatives.blocks`: :class:`StageBlocks` (the blocks ``Jz``,
  ``Jx``, ``Tzz``, ``Tzx``, ``Txx`` of one stage, with flags saying which are
  zero) and :func:`comb_jacobian`.
* :mod:`~hessinv.derivatives.autodiff`: :class:`AutodiffDerivatives`, the
  blocks of any stage by ``torch.func`` (the fallback of everything).
* :mod:`~hessinv.derivatives.registry`: the per-layer derivative classes
  (BackPACK style: one class per module type, with ``hessian_is_zero`` /
  ``hessian_is_diagonal`` / ``params_linear`` flags) and the registry
  ``module type -> class`` (:func:`register`, :func:`derivatives_class`).
* closed forms: :mod:`~hessinv.derivatives.elementwise` (activations),
  :mod:`~hessinv.derivatives.linear` (Linear, Embedding),
  :mod:`~hessinv.derivatives.conv` (Conv, ConvTranspose 1d/2d/3d),
  :mod:`~hessinv.derivatives.pooling` (Max/Avg/AdaptiveAvg pooling, Flatten),
  :mod:`~hessinv.derivatives.norm` (LayerNorm, BatchNorm in eval mode).
* :mod:`~hessinv.derivatives.chain`: :func:`stage_blocks`, a model stage's
  blocks by the chain rule over its modules' classes.
"""

from . import conv, elementwise, linear, norm, pooling  # noqa: F401 - registrations
from .autodiff import AutodiffDerivatives, GenericDerivatives
from .blocks import StageBlocks, comb_jacobian
from .chain import layer_derivatives, module_derivatives, stage_blocks, structured_blocks
from .conv import ConvDerivatives, ConvTransposeDerivatives
from .elementwise import TanhDerivatives
from .linear import EmbeddingDerivatives, LinearDerivatives
from .norm import BatchNormDerivatives, LayerNormDerivatives, layer_norm
from .pooling import AvgPoolDerivatives, MaxPoolDerivatives
from .registry import (
    ElementwiseDerivatives,
    ModuleDerivatives,
    PiecewiseLinearElementwise,
    derivatives_class,
    is_known,
    register,
    registered,
    registered_types,
    unregister,
)

__all__ = [
    "AutodiffDerivatives",
    "AvgPoolDerivatives",
    "BatchNormDerivatives",
    "ConvDerivatives",
    "ConvTransposeDerivatives",
    "ElementwiseDerivatives",
    "EmbeddingDerivatives",
    "GenericDerivatives",
    "LayerNormDerivatives",
    "LinearDerivatives",
    "MaxPoolDerivatives",
    "ModuleDerivatives",
    "PiecewiseLinearElementwise",
    "StageBlocks",
    "TanhDerivatives",
    "comb_jacobian",
    "derivatives_class",
    "is_known",
    "layer_derivatives",
    "layer_norm",
    "module_derivatives",
    "register",
    "registered",
    "registered_types",
    "stage_blocks",
    "structured_blocks",
    "unregister",
]
