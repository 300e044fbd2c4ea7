"""Adversarial review (adv24) of inference mode, the row-form stage solve and ``_spread``.

References are independent of hessinv: the Gauss-Newton matrix ``J^T Lambda J``
from ``torch.func.jacrev`` of the network as a function of its flat
parameters (``Lambda = 2 I`` for a sum of squares), ``torch.linalg`` for its
inverse, log-determinant and eigenvalues.
"""

from __future__ import annotations

import pytest
import torch

import hessinv
from hessinv import Stage

DT = torch.float64
EPS = torch.finfo(DT).eps


def _functional_net() -> tuple[list[Stage], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear -> tanh (a parameter-free stage of its own) -> Linear, and its dense ``G``."""
    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(4, 3, dtype=DT, generator=g)
    w2 = torch.randn(2, 4, dtype=DT, generator=g)
    X = torch.randn(5, 3, dtype=DT, generator=g)  # noqa: N806
    y = torch.randn(5, 2, dtype=DT, generator=g)
    stages = [
        Stage(lambda z, p: z @ p[0].T, (w1,)),
        Stage(lambda z, p: torch.tanh(z), ()),
        Stage(lambda z, p: z @ p[0].T, (w2,)),
    ]

    def net(flat: torch.Tensor) -> torch.Tensor:
        a, b = flat[:12].reshape(4, 3), flat[12:].reshape(2, 4)
        return (torch.tanh(X @ a.T) @ b.T).reshape(-1)

    jac = torch.func.jacrev(net)(torch.cat([w1.reshape(-1), w2.reshape(-1)]))
    return stages, X, y, 2.0 * jac.T @ jac


def _sse(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return ((o - t) ** 2).sum()


@pytest.mark.parametrize("what", ["inertia", "logdet", "solve"])
def test_gauss_newton_blocks_formed_lazily_inside_inference_mode(what: str) -> None:
    """``GaussNewton`` built outside, its lifted blocks formed on first use inside the mode.

    Before the fix the parameter-free stage's ``Jz`` came out zero (autograd
    recorded nothing): inertia 12 negatives instead of 10, logdet -50.2 instead
    of -33.2, silently; the blocks stayed cached, wrong outside the mode too.
    """
    stages, X, y, ref = _functional_net()  # noqa: N806
    w = ref.shape[0]
    G = hessinv.GaussNewton.from_stages(stages, X, loss_func=_sse, y=y)  # noqa: N806
    d = -1e-3
    a = ref + d * torch.eye(w, dtype=DT)
    with torch.inference_mode():
        if what == "inertia":
            got = G.inertia(d, method="lifted")
            assert got.negative == int((torch.linalg.eigvalsh(a) < 0).sum())
        elif what == "logdet":
            sign, la = G.logdet(d, method="lifted")
            s_ref, la_ref = torch.linalg.slogdet(a)
            assert sign == float(s_ref) and abs(la - float(la_ref)) <= 1e-9 * abs(float(la_ref))
        else:
            g = torch.randn(w, dtype=DT, generator=torch.Generator().manual_seed(1))
            x = G.solve(g, 1e-2, method="lifted")
            a2 = ref + 1e-2 * torch.eye(w, dtype=DT)
            assert float((a2 @ x - g).norm() / g.norm()) <= 1e-10
    # and outside the mode, from the blocks cached inside it
    assert G.inertia(d, method="lifted").negative == int((torch.linalg.eigvalsh(a) < 0).sum())


def test_gauss_newton_lifted_with_parameter_free_stage_outside_inference_mode() -> None:
    """The same pipeline outside inference mode: the lifted route used to raise.

    ``_parameter_free_blocks`` freed the graph after the gradient (no
    ``retain_graph``) and then read ``Jz``'s rows from it: a RuntimeError
    ("backward through the graph a second time") on every ``GaussNewton``
    lifted call with a parameter-free stage before the last.
    """
    stages, X, y, ref = _functional_net()  # noqa: N806
    G = hessinv.GaussNewton.from_stages(stages, X, loss_func=_sse, y=y)  # noqa: N806
    w = ref.shape[0]
    g = torch.randn(w, dtype=DT, generator=torch.Generator().manual_seed(2))
    x = G.solve(g, 1e-2, method="lifted")
    a = ref + 1e-2 * torch.eye(w, dtype=DT)
    assert float((a @ x - g).norm() / g.norm()) <= 1e-10


def test_mixing_check_called_inside_inference_mode_still_refuses() -> None:
    """``check_no_mixing`` called by the user inside the mode: a mixing stage is refused.

    Before, autograd's silence there read as "no dependence": the check passed.
    """
    g = torch.Generator().manual_seed(3)
    w = torch.randn(3, 3, dtype=DT, generator=g)
    stages = [
        Stage(lambda z, p: z @ p[0].T, (w,)),
        Stage(lambda z, p: z - z.mean(0), ()),  # mixes samples
        Stage(lambda z, p: (z**2).sum(), ()),
    ]
    X = torch.randn(4, 3, dtype=DT, generator=g)  # noqa: N806
    with torch.inference_mode(), pytest.raises(ValueError, match="mix"):
        hessinv.validate.check_no_mixing(hessinv.Pipeline(stages, X))


def test_newton_step_inside_inference_mode() -> None:
    """``Newton.step`` inside the mode: the same steps as outside (was an unclear RuntimeError)."""
    from torch import nn

    import hessinv.optim

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    X = torch.randn(16, 2, dtype=DT)  # noqa: N806
    y = torch.sin(X[:, :1])
    out = []
    for inside in (False, True):
        m = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).double()
        m.load_state_dict(base.state_dict())
        opt = hessinv.optim.Newton(m, nn.MSELoss())
        with torch.inference_mode(inside):
            losses = [opt.step(X, y) for _ in range(3)]
        out.append((losses, [p.detach().clone() for p in m.parameters()]))
        assert not any(p.is_inference() for p in m.parameters())
    assert out[0][0] == out[1][0]
    assert all(torch.equal(a, b) for a, b in zip(out[0][1], out[1][1], strict=True))


def _ln_net(batch: int, seed: int) -> tuple:
    torch.manual_seed(seed)
    from torch import nn

    model = nn.Sequential(
        nn.Linear(3, 2), nn.LayerNorm(2), nn.Tanh(), nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)
    ).to(DT)
    X = torch.randn(batch, 3, dtype=DT)  # noqa: N806
    return model, nn.MSELoss(), X, torch.randn(batch, 2, dtype=DT)


@pytest.mark.parametrize(("batch", "seed"), [(1, 46), (4, 1)])
def test_spread_tolerance_still_catches_a_1e10_error(batch: int, seed: int, monkeypatch) -> None:  # noqa: ANN001
    """``test_adversarial_speed._assert_matches_dense`` with the reference's spread (7514ae4).

    A relative 1e-10 error in one stage's ``Jz`` (an H wrong at 1e-10, every
    method consistent with it) must still fail it, also for a LayerNorm over
    two features at batch 1 (seed 46: the spread is ~1200 eps ||H||, the
    tolerance's largest). Unmutated, the same case passes.
    """
    import test_adversarial_speed as speed

    import hessinv.hessian as hessian_module

    model, loss, X, y = _ln_net(batch, seed)  # noqa: N806
    Hd = speed._dense(model, loss, X, y)  # noqa: N806
    d = 1e-3 * float(torch.linalg.matrix_norm(Hd, 2))
    spread = speed._spread(model, loss, X, y, Hd)
    speed._assert_matches_dense(hessinv.Hessian(model, loss, X, y), Hd, d, spread=lambda: spread)
    original = hessian_module.compute_blocks
    hit: list[int] = []

    def mutated(pipeline, **kw):  # noqa: ANN001, ANN003, ANN202
        loss_value, blocks = original(pipeline, **kw)
        for b in blocks[1:]:
            if b.Jz is not None and bool(b.Jz.abs().max() > 0.1):
                b.Jz.mul_(1 + 1e-10)
                hit.append(1)
                break
        return loss_value, blocks

    monkeypatch.setattr(hessian_module, "compute_blocks", mutated)
    H = hessinv.Hessian(model, loss, X, y)  # noqa: N806
    assert hit
    with pytest.raises(AssertionError):
        speed._assert_matches_dense(H, Hd, d, spread=lambda: spread)
    assert spread <= 1e4 * EPS * float(torch.linalg.matrix_norm(Hd, 2))  # the case is honest
