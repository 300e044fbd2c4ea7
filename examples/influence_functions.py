"""Influence functions with the exact inverse Hessian (Koh & Liang), no LiSSA, no CG.

The influence of up-weighting training point ``i`` on the loss at a test point
is ``-grad L_test^T (H + d I)^{-1} grad L_i``. One exact solve against the
test gradient serves every training point.
"""

import torch
from torch import nn

import hessinv

torch.manual_seed(0)
X = torch.randn(64, 4, dtype=torch.float64)
y = torch.sin(X.sum(1, keepdim=True))
model = nn.Sequential(
    nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)
).double()
loss = nn.MSELoss(reduction="sum")
H = hessinv.Hessian(model, loss, X, y)


def grad_at(xi, yi):
    return hessinv.Hessian(model, loss, xi[None], yi[None]).gradient()


x_test, y_test = torch.randn(4, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
s_test = H.solve(grad_at(x_test, y_test), damping=1e-3)  # exact (H + dI)^{-1} grad L_test
influence = torch.stack([-(s_test @ grad_at(X[i], y[i])) for i in range(len(X))])
print("most helpful training points:", influence.argsort()[:5].tolist())
print("most harmful training points:", influence.argsort(descending=True)[:5].tolist())
