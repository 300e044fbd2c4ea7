"""Laplace log-evidence from the exact log-determinant of the (generalised) Hessian.

With a Gaussian prior of precision ``alpha`` and the MAP weights ``w``,
``log p(D) ~ -L(w) - alpha/2 |w|^2 + (W/2) log(alpha) - 1/2 log det(H + alpha I)``
(up to constants), with ``H`` the Hessian of the data loss or its Gauss-Newton
approximation. The exact inertia tells whether ``H + alpha I`` is positive
definite, which the Laplace approximation assumes.
"""

import math

import torch
from torch import nn

import hessinv

torch.manual_seed(1)
X = torch.randn(50, 3, dtype=torch.float64)
y = (X[:, :1] * X[:, 1:2] > 0).to(torch.float64)
lossf = nn.BCEWithLogitsLoss(reduction="sum")
alpha = 1.0


def fit(model):
    opt = torch.optim.LBFGS(model.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        prior = sum(p.pow(2).sum() for p in model.parameters())
        val = lossf(model(X), y) + 0.5 * alpha * prior
        val.backward()
        return val

    opt.step(closure)
    return model


for width in (2, 4, 8):
    model = fit(nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 1)).double())
    w2 = sum(float(p.detach().pow(2).sum()) for p in model.parameters())
    for name, op in (("hessian", hessinv.Hessian), ("gauss-newton", hessinv.GaussNewton)):
        C = op(model, lossf, X, y)
        W = C.num_params
        n_pos, n_neg, _ = C.inertia(alpha)
        sign, logdet = C.logdet(alpha)
        evidence = -float(C.loss()) - 0.5 * alpha * w2 + 0.5 * W * math.log(alpha) - 0.5 * logdet
        print(
            f"width {width} {name:12s} W={W:3d} negative eigenvalues={n_neg} "
            f"log evidence={evidence:.2f}"
        )
