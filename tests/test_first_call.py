"""The first call in a fresh process pays no lazy import of ``torch._dynamo`` or ``sympy``.

``torch.func.grad`` imports ``torch._dynamo`` (about 0.8 s) and
``torch.autograd.grad`` with ``grad_outputs`` imports ``sympy`` (about 0.4 s)
the first time they run; issue #12 wants the first ``Hessian(...)`` within
0.5 s of a warm one. ``benchmarks/scaling.py --issue`` measures the time.
(``GaussNewton`` still uses ``torch.func`` for its per-sample Jacobians, and
pays the import once.)
"""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
import torch
from torch import nn
import hessinv
before = set(sys.modules)
torch.manual_seed(0)
CASES = ((nn.MSELoss(), torch.randn(5, 3)), (nn.CrossEntropyLoss(), torch.tensor([0, 2, 1, 0, 2])))
for loss, y in CASES:
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    model = model.double()
    X = torch.randn(5, 4, dtype=torch.float64)
    y = y.double() if y.is_floating_point() else y
    H = hessinv.Hessian(model, loss, X, y)
    H.solve(H.gradient(), damping=1e-3)
    H.inertia(1e-3)
    H.logdet(1e-3)
new = set(sys.modules) - before
print(sorted({n.split(".")[0] + "." + n.split(".")[1] if n.startswith("torch.") else n.split(".")[0]
              for n in new if n.startswith(("torch._dynamo", "sympy"))}))
"""


def test_first_call_imports_neither_dynamo_nor_sympy():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
