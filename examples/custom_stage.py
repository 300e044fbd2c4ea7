"""Writing your own stage, and checking its derivative blocks by finite differences."""

import torch

import hessinv

torch.manual_seed(0)
N, a = 5, 3
W1, b1 = torch.randn(a, a, dtype=torch.float64), torch.zeros(a, dtype=torch.float64)
gamma = torch.ones(a, dtype=torch.float64)
W2 = torch.randn(2, a, dtype=torch.float64)
target = torch.randn(N, 2, dtype=torch.float64)


def gated(z, p):  # a residual, gated stage: z + sigmoid(gamma * z) * tanh(W z + b)
    W, b, g = p
    return z + torch.sigmoid(g * z) * torch.tanh(z @ W.T + b)


stages = [
    hessinv.Stage(gated, (W1, b1, gamma)),
    hessinv.Stage(lambda z, p: 0.5 * ((z @ p[0].T - target) ** 2).sum(), (W2,)),
]
z0 = torch.randn(N, a, dtype=torch.float64)
report = hessinv.check.check_stage(stages[0], z0)
print("stage blocks vs central differences:", {k: f"{v:.1e}" for k, v in report.errors.items()})
report.raise_if_failed()
H = hessinv.Hessian.from_stages(stages, z0)
hessinv.check.check_hvp(H).raise_if_failed()
print("H @ v vs central differences: ok;  inertia:", H.inertia())
