"""The fast parameter walks list what torch's own ``named_parameters`` lists."""

import pytest
import torch
from torch import nn

from hessinv.module_params import all_buffers, model_parameters


def _shared() -> nn.Module:
    lin = nn.Linear(2, 2)
    inner = nn.Sequential(lin, nn.Linear(2, 3, bias=False), nn.Sequential())
    model = nn.Sequential(lin, inner, nn.Tanh(), lin, inner)  # modules used twice
    model[1][1].weight = lin.weight  # a tensor under two names
    model.register_parameter("extra", nn.Parameter(torch.ones(1)))  # on a container
    model.register_parameter("gone", None)
    model[1].add_module("empty", None)
    return model


def _frozen() -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 1))
    model[1].weight.requires_grad_(False)
    return model


@pytest.mark.parametrize("make", [_shared, _frozen, lambda: nn.Linear(2, 2), nn.Tanh])
@pytest.mark.parametrize("remove_duplicate", [True, False])
def test_model_parameters_is_named_parameters(make, remove_duplicate):
    model = make()
    ours = model_parameters(model, remove_duplicate=remove_duplicate)
    torchs = list(model.named_parameters(remove_duplicate=remove_duplicate))
    assert [(n, id(p)) for n, p in ours] == [(n, id(p)) for n, p in torchs]


def test_all_buffers_is_named_buffers():
    bn = nn.BatchNorm1d(3)
    bn.register_buffer("twice", bn.running_mean)
    bn.register_buffer("none", None)
    for m in (bn, nn.Sequential(bn, nn.BatchNorm1d(2)), nn.Linear(2, 2)):
        assert [(n, id(b)) for n, b in all_buffers(m)] == [(n, id(b)) for n, b in m.named_buffers()]


def test_first_repeat_names_the_first_two_places_of_one_tensor():
    from hessinv.module_params import first_repeat, model_parameters

    shared = nn.Linear(2, 2)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    model = nn.Sequential(nn.Linear(2, 2), frozen, frozen, shared, nn.Tanh(), shared)
    listed = model_parameters(model, remove_duplicate=False)
    assert [n for n, _ in listed] == [n for n, _ in model.named_parameters(remove_duplicate=False)]
    assert first_repeat(listed) == ("1.weight", "2.weight")
    assert first_repeat(listed, trainable_only=True) == ("3.weight", "5.weight")
    assert first_repeat(model_parameters(model)) is None


def test_walk_memo_walks_once_and_keeps_models_apart(monkeypatch) -> None:  # noqa: ANN001
    """Inside ``walk_memo`` a model is walked once per flag, with the lists torch gives;
    another model (or the same one after the block) is walked afresh."""
    import hessinv.module_params as mp  # noqa: PLC0415

    calls: list[int] = []
    walk = mp._walk_parameters
    monkeypatch.setattr(mp, "_walk_parameters", lambda m, r: calls.append(1) or walk(m, r))
    a = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    b = torch.nn.Sequential(torch.nn.Linear(4, 1))
    with mp.walk_memo():
        for _ in range(3):
            for flag in (True, False):
                got = mp.model_parameters(a, remove_duplicate=flag)
                assert got == list(a.named_parameters(remove_duplicate=flag))
                got.clear()  # a copy: the memo is not the caller's list
        assert mp.model_parameters(b) == list(b.named_parameters())
    assert len(calls) == 3
    mp.model_parameters(a)
    assert len(calls) == 4
