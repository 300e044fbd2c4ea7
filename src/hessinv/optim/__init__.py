"""Second-order training on the exact Hessian or Gauss-Newton matrix, with proven steps.

:class:`Newton` is a ``torch.optim.Optimizer`` whose :meth:`~Newton.step` takes the batch:

* ``strategy="trust-region"``: the exact trust-region subproblem
  ``min_s g.s + s.C.s/2`` s.t. ``|s| <= radius`` (Moré & Sorensen 1983), radius
  from the ratio ``rho`` of actual to predicted decrease; hard case completed
  along the eigenvector of ``lambda_min``.
* ``strategy="levenberg-marquardt"``: ``s = -(C + lam I)^{-1} g``, ``lam``
  relative to ``|C|_2``, updated by Nielsen's rule (1999): times
  ``max(1/3, 1 - (2 rho - 1)^3)`` after an accepted step, times ``nu`` (then
  ``nu`` doubles) after a rejected one (each retry reuses the decomposition).

Steps cost their maths (:mod:`.curvature`): for ``W`` up to a few thousand one
eigendecomposition of the exact dense ``C`` serves every shift of a step
(:mod:`.spectral`); the Gauss-Newton matrix is decomposed in kernel form (thin
SVD of the ``(N o) x W`` factor ``Lambda^{1/2} J``) when ``N o <= W``; beyond,
one lifted factorization per shift (:mod:`.factored`).

Every step records in :class:`StepInfo` whether ``C + lam I`` was *proven*
positive definite (``certified``) and how; an unproven step is flagged, never
counted as certified. Accepted steps decrease the loss, so the loss never increases.

>>> import torch
>>> from torch import nn
>>> import hessinv.optim
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).double()
>>> X = torch.randn(32, 2, dtype=torch.float64)
>>> y = torch.sin(X[:, :1])
>>> opt = hessinv.optim.Newton(model, nn.MSELoss())
>>> losses = [opt.step(X, y) for _ in range(10)]
>>> losses[-1] < losses[0] and all(h.certified for h in opt.history)
True
"""

from .newton import CURVATURES, STRATEGIES, Newton, StepInfo
from .spectral import ShiftedSolver, Spectrum

__all__ = ["CURVATURES", "STRATEGIES", "Newton", "ShiftedSolver", "Spectrum", "StepInfo"]
