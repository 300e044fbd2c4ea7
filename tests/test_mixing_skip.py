"""The sample-mixing check skips only stages that are per sample by construction."""

import warnings

import pytest
import torch
from torch import nn

import hessinv
import hessinv.mixing as val


class MixingLinear(nn.Linear):
    """A Linear subclass whose forward couples the samples (``- mean over the batch``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out - out.mean(0, keepdim=True)


def _data(n: int = 6):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, generator=gen, dtype=torch.float64), torch.randn(
        n, 1, generator=gen, dtype=torch.float64
    )


def _probes(monkeypatch) -> list[bool]:  # noqa: ANN001
    """The ``scalar`` flags of the mixing probes made from now on (True: the loss stage)."""
    calls: list[bool] = []
    orig = val._leak

    def counting(fn, z, scalar, gen):  # noqa: ANN001, ANN202
        calls.append(scalar)
        return orig(fn, z, scalar, gen)

    monkeypatch.setattr(val, "_leak", counting)
    return calls


def _chain() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    return model.double()


def test_plain_stages_and_a_per_sample_loss_are_not_probed(monkeypatch):
    calls = _probes(monkeypatch)
    X, y = _data()
    hessinv.Hessian(_chain(), nn.MSELoss(), X, y)
    assert calls == []


class MyMSE(nn.MSELoss):
    pass


def _hooked_mse() -> nn.MSELoss:
    loss = nn.MSELoss()
    loss.register_forward_hook(lambda m, i, o: None)
    return loss


@pytest.mark.parametrize(
    "loss, target",
    [
        (nn.MSELoss(), lambda y: y[:, 0]),  # (N,) against (N, 1): a broadcast
        (MyMSE(), lambda y: y),  # a subclass
        (_hooked_mse(), lambda y: y),  # a hook on the loss
        (lambda o, t: ((o - t) ** 2).sum(), lambda y: y),  # a function
    ],
    ids=["broadcast", "subclass", "hooked", "function"],
)
def test_other_losses_are_probed(monkeypatch, loss, target):
    calls = _probes(monkeypatch)
    X, y = _data()
    with warnings.catch_warnings():  # (torch warns of the broadcast)
        warnings.simplefilter("ignore", UserWarning)
        hessinv.Hessian(_chain(), loss, X, target(y))
    assert calls == [True]  # the last stage (with the loss) only


def test_per_sample_losses_by_shape():
    n, c = 5, 3
    idx = torch.zeros(n, dtype=torch.long)
    probs = torch.full((n, c), 1.0 / c, dtype=torch.float64)
    ok = val._per_sample_loss
    assert ok(nn.CrossEntropyLoss(), idx, (n, c))
    assert ok(nn.CrossEntropyLoss(reduction="sum"), probs, (n, c))
    assert ok(nn.NLLLoss(), idx, (n, c))
    assert ok(nn.BCEWithLogitsLoss(), probs, (n, c))
    assert ok(nn.MSELoss(), probs, (n, c))
    assert not ok(nn.NLLLoss(), probs, (n, c))  # (NLL takes class indices)
    assert not ok(nn.MSELoss(), probs[:, 0], (n, 1))  # a broadcast
    assert not ok(nn.BCEWithLogitsLoss(), idx, (n,))  # no rows
    assert not ok(nn.CrossEntropyLoss(), idx[:-1], (n, c))  # another batch
    assert not ok(nn.L1Loss(), probs, (n, c))  # not in the list
    assert not ok(nn.MSELoss(reduction="none"), probs, (n, c))


def test_a_mixing_loss_function_is_refused():
    X, y = _data()
    with pytest.raises(ValueError, match="stage 2: the loss .* mixes samples"):
        hessinv.Hessian(_chain(), lambda o, t: ((o - t).sum()) ** 2, X, y)


def test_a_subclass_that_mixes_is_still_probed_and_refused():
    layers = [nn.Linear(3, 4), nn.Tanh(), MixingLinear(4, 4), nn.Tanh(), nn.Linear(4, 1)]
    X, y = _data()
    with pytest.raises(ValueError, match="stage 1 .*mixes samples"):
        hessinv.Hessian(nn.Sequential(*layers).double(), nn.MSELoss(), X, y)


@pytest.mark.parametrize("where", [0, 2, None])
def test_a_forward_assigned_on_the_object_is_refused(where):
    """It used to be ignored silently: H was the plain Linear's (off by 0.8 here)."""
    model = nn.Sequential(
        nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1)
    ).double()
    m = model if where is None else model[where]
    plain = m.forward
    m.forward = lambda x: plain(x) - plain(x).mean(0, keepdim=True)
    X, y = _data()
    label = "the model" if where is None else f"module '{where}' \\(Linear\\)"
    with pytest.raises(ValueError, match=label + " has a forward assigned on the object"):
        hessinv.Hessian(model, nn.MSELoss(), X, y)


def test_a_global_forward_hook_turns_the_probe_back_on(monkeypatch):
    calls = []
    orig = val._leak
    monkeypatch.setattr(val, "_leak", lambda fn, z, s, gen: calls.append(s) or orig(fn, z, s, gen))
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        assert not val._row_wise(nn.Tanh())
    finally:
        handle.remove()
    assert val._row_wise(nn.Tanh()) and val._row_wise(nn.Linear(2, 2))
    assert not val._row_wise(nn.Softmax(dim=0)) and not val._row_wise(MixingLinear(2, 2))


def test_side_sizes_count_each_split():
    for n in (2, 3, 7, 8, 9, 64, 100, 1000):
        sides = val.batch_splits(n, torch.device("cpu"))
        assert val._side_sizes(n) == [int(s.sum()) for s in sides]
