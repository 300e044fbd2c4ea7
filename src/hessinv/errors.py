"""Exceptions raised by hessinv."""

from __future__ import annotations

import torch


class SingularHessianError(torch.linalg.LinAlgError):
    """``H + damping * I`` is singular to working precision.

    Raised by the exact solvers instead of returning a meaningless vector. The
    usual cause is a Hessian with an exact null space: a dense layer whose
    weight only enters through ``W z`` has ``H`` of rank at most ``N * a`` in
    that layer's directions when the batch ``N`` is small. The remedy is to
    pass ``damping > 0`` (Levenberg-Marquardt / Tikhonov regularisation).
    """


HINT = (
    "H + damping*I is singular (or numerically so). A Hessian with a small batch "
    "has an exact null space (a dense layer's weight enters only through W z); "
    "pass damping > 0, e.g. H.solve(g, damping=1e-3)."
)
