"""The curvlinops and BackPACK model catalogues, rewritten for ``hessinv.Hessian``.

Each case is a model of a peer library's own test suite, rebuilt here from
``torch.nn`` (neither curvlinops nor BackPACK is imported, so the tests do not
depend on them), in float64, with the peer's loss, input shapes and parameter
freezing. ``source`` names the peer file and case. Sources (read from the
repositories at the versions installed beside this project, curvlinops 3.0.1
and backpack-for-pytorch 1.7.1):

* curvlinops ``test/kfac_cases.py``: deep linear networks, a bare ``Linear``,
  a ``WeightShareModel`` with three output dimensions.
* curvlinops ``test/cases.py``: ``INV_CASES`` / ``CASES`` (MLPs with
  cross-entropy, BCE-with-logits and MSE, ``mean``/``sum``, two batches each,
  extra input/output dimensions, a ``WeightShareModel`` with a sequence
  dimension, a dict-input model, a model given as a function), ``CNN_CASES``
  and ``NON_DETERMINISTIC_CASES`` (dropout, batch norm in training mode);
  ``test/utils.py``: ``WeightShareModel`` (expand, expand-flatten, reduce),
  ``SplitConcatModel``, ``WeightTiedSplitConcatModel``, ``Conv2dModel``,
  ``UnetModel``.
* BackPACK ``test/extensions/secondorder/secondorder_settings.py`` (shared by
  its Hessian-diagonal, GGN and square-root-GGN tests), with
  ``automated_settings.py``'s ``make_simple_act_setting``,
  ``make_simple_cnn_setting``, ``make_simple_pooling_setting`` (last linear
  layer frozen), ``diag_hessian/diagh_settings.py`` (LogSigmoid, adaptive
  average pooling), ``test/core/derivatives/*_settings.py`` (embedding, batch
  norm, permute, scale module, RNN/LSTM) and ``test/converter/converter_cases.py``
  (custom ``forward`` methods; ResNet-18 needs torchvision, so a small residual
  CNN with batch norm in eval mode stands in for it).

A case either runs through ``hessinv.Hessian`` as it is (``refused is None``),
or must be refused with the named exception and message (``refused``).
The data of a case with two batches in the peer are the two batches
concatenated: the loss of the whole data set (the mean over all samples for
``reduction="mean"``), what curvlinops' operators compute over the batches;
``split`` keeps the first batch's size, for the same data as ``data=``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

DT = torch.float64


@dataclass(frozen=True)
class PeerCase:
    """One model of a peer's test suite.

    Attributes:
        name: A short id.
        source: The peer's file and case it is rewritten from.
        build: ``build() -> (model, loss_func, X, y)``, run under ``torch.manual_seed(seed)``.
        subset: ``subset(model) -> list of parameters`` for a ``params=`` test, or ``None``.
        refused: ``(exception type, message regex)`` when hessinv must refuse the case.
        seed: The seed ``build`` runs under.
        known_bug: A hessinv bug this case shows (the test is a strict xfail until fixed).
        split: For a case of two batches in the peer, the size of the first (``X[:split]``).
    """

    name: str
    source: str
    build: Callable[[], tuple]
    subset: Callable[[nn.Module], list] | None = None
    refused: tuple[type[BaseException], str] | None = None
    seed: int = 0
    known_bug: str | None = None
    split: int | None = None

    def make(self) -> tuple:
        """``(model, loss_func, X, y)`` in float64, deterministic."""
        torch.manual_seed(self.seed)
        model, loss, X, y = self.build()
        model = model.double() if isinstance(model, nn.Module) else model
        if isinstance(X, Tensor) and X.dtype.is_floating_point:
            X = X.double()
        if isinstance(y, Tensor) and y.dtype.is_floating_point:
            y = y.double()
        return model, loss, X, y


def cls_targets(size: tuple, k: int) -> Tensor:
    """Class indices in ``[0, k)`` (the peers' ``classification_targets``)."""
    return torch.randint(0, k, size)


def reg_targets(size: tuple) -> Tensor:
    """Regression targets (the peers' ``regression_targets``)."""
    return torch.rand(size)


def two_batches(n1: int, n2: int, x_shape: tuple, y_fn: Callable[[int], Tensor]) -> tuple:
    """Two batches of curvlinops' data, concatenated (the whole data set)."""
    X = torch.cat([torch.rand(n1, *x_shape), torch.rand(n2, *x_shape)])
    y = torch.cat([y_fn(n1), y_fn(n2)])
    return X, y


def weights_only(model: nn.Module) -> list:
    """The ``params=`` subset of curvlinops' ``exclude="bias"``: every weight, in order."""
    return [p for n, p in model.named_parameters() if p.requires_grad and "bias" not in n]


def last_two(model: nn.Module) -> list:
    """The last two trainable tensors (typically the last layer's weight and bias)."""
    return [p for p in model.parameters() if p.requires_grad][-2:]


# -- modules rewritten from the peers' test utilities --------------------------------------
class Permute(nn.Module):
    """``x.permute(*dims)`` (BackPACK's ``Permute`` module, einops ``Rearrange``)."""

    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(*self.dims)


class Pad(nn.Module):
    """BackPACK's ``custom_module.pad.Pad``: ``F.pad`` as a module."""

    def __init__(self, pad: tuple, mode: str = "constant", value: float = 0.0) -> None:
        super().__init__()
        self.pad, self.mode, self.value = pad, mode, value

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x, self.pad, self.mode, self.value)


class Slicing(nn.Module):
    """BackPACK's ``custom_module.slicing.Slicing``: ``x[slice_info]``."""

    def __init__(self, slice_info: tuple) -> None:
        super().__init__()
        self.slice_info = slice_info

    def forward(self, x: Tensor) -> Tensor:
        return x[self.slice_info]


class ScaleModule(nn.Module):
    """BackPACK's ``custom_module.scale_module.ScaleModule``: ``weight * x``."""

    def __init__(self, weight: float = 2.0) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


class WeightShare(nn.Sequential):
    """curvlinops' ``WeightShareModel``: a Sequential, then the weight-sharing axis processed.

    ``expand``: output ``(N, seq, c)`` kept (moved to ``(N, c, seq)`` for
    cross-entropy); ``expand-flatten``: flattened per sample; ``reduce``: mean
    over the shared axis. (The peer applies this per sample with ``vmap``;
    these are the same maps on the batch.)
    """

    def __init__(self, *mods: nn.Module, setting: str = "expand", loss: str = "MSE") -> None:
        super().__init__(*mods)
        self.setting, self.loss = setting, loss

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        if self.setting == "reduce":
            return out.flatten(1, -2).mean(1)
        if self.setting == "expand-flatten":
            return out.flatten(1)
        if self.loss == "CE":
            return out.movedim(-1, 1)
        return out


class SplitConcat(nn.Module):
    """curvlinops' ``SplitConcatModel``: one ``Linear`` applied to both halves of the input."""

    def __init__(self, d: int, bias: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(d, d, bias=bias)
        self.d = d

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = x.split(self.d, dim=-1)
        return torch.cat([self.linear(x1), self.linear(x2)], dim=-1)


class TiedSplitConcat(nn.Module):
    """curvlinops' ``WeightTiedSplitConcatModel``: two modules sharing one weight."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d, d, bias=False)
        self.linear2 = nn.Linear(d, d, bias=True)
        self.linear2.weight = self.linear1.weight
        self.d = d

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = x.split(self.d, dim=-1)
        return torch.cat([self.linear1(x1), self.linear2(x2)], dim=-1)


class DictInput(nn.Module):
    """curvlinops' ``ModelWithDictInput``: reads ``data["x"]``."""

    def __init__(self, k: int = 2) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, k))

    def forward(self, data: dict) -> Tensor:
        return self.net(data["x"])


class FunctionalMLP(nn.Module):
    """curvlinops' callable case (``model_func(p, X)`` with ``F.linear``), as a module."""

    def __init__(self) -> None:
        super().__init__()
        self.W1 = nn.Parameter(torch.rand(5, 10))
        self.b1 = nn.Parameter(torch.rand(5))
        self.W2 = nn.Parameter(torch.rand(3, 5))
        self.b2 = nn.Parameter(torch.rand(3))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.relu(F.linear(x, self.W1, self.b1)), self.W2, self.b2)


def functional_mlp(p: dict, x: Tensor) -> Tensor:
    """curvlinops' callable model, as the function it is there."""
    return F.linear(F.relu(F.linear(x, p["W1"], p["b1"])), p["W2"], p["b2"])


class Unet(nn.Module):
    """curvlinops' ``UnetModel`` (strided conv, conv, nearest upsampling, conv)."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 2, 3, padding=1, stride=2),
            nn.Conv2d(2, 2, 3, padding=1),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(2, 3, 3, padding=1),
        )
        self.out = out

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x)
        if self.out == "pixels-into-batch":  # "batch c h w -> (batch h w) c"
            return h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
        if self.out == "flat":  # "batch c h w -> batch (h w c)"
            return h.permute(0, 2, 3, 1).flatten(1)
        return h  # (N, c, h, w): cross-entropy per pixel


# -- BackPACK converter cases (custom forward methods) -------------------------------------
class InplaceActivation(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear, self.relu, self.linear2 = (
            nn.Linear(3, 2),
            nn.ReLU(inplace=True),
            nn.Linear(2, 2),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.relu(self.linear(x)))


class MultipleUsages(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear, self.relu, self.linear2 = nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.linear2(self.relu(self.linear(self.relu(x)))))


class FlattenNetwork(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear, self.linear2 = nn.Linear(4, 3), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(self.linear(x), 2)
        return self.linear2(x).flatten(1)


class Multiply(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return (0.5 * self.linear(x * 2.5)).multiply(3.1415)


class Add(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear, self.linear1, self.linear2 = nn.Linear(3, 3), nn.Linear(3, 2), nn.Linear(3, 2)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear(x)
        x1, x2 = self.linear1(x), self.linear2(x)
        return self.relu(x1 + x2).add(x2)


class PermuteNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear, self.linear2 = nn.Linear(3, 2), nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.permute(self.linear2(self.linear(x).permute(0, 2, 1)), (0, 2, 1))


class TransposeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear, self.linear2 = nn.Linear(3, 2), nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return torch.transpose(self.linear2(self.linear(x).transpose(1, 2)), 1, 2)


class CharRNN(nn.Module):
    """BackPACK's ``_TolstoiCharRNN`` (smaller): embedding, LSTM or RNN, dense."""

    def __init__(self, cell: type = nn.LSTM) -> None:
        super().__init__()
        self.embedding = nn.Embedding(7, 4)
        self.lstm = cell(input_size=4, hidden_size=4, num_layers=2, batch_first=True)
        self.dense = nn.Linear(4, 7)

    def forward(self, x: Tensor) -> Tensor:
        x, _ = self.lstm(self.embedding(x))
        return self.dense(x).permute(0, 2, 1)


class BasicBlock(nn.Module):
    """A ResNet basic block (two 3x3 convolutions, batch norm, identity or 1x1 shortcut)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class TinyResNet(nn.Module):
    """Stand-in for BackPACK's ``_ResNet18`` converter case (torchvision's ResNet-18, eval)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 2, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(2)
        self.layer1 = BasicBlock(2, 2)
        self.layer2 = BasicBlock(2, 3, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters, then eval mode."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


# -- BackPACK automated settings -----------------------------------------------------------
def _frozen_linear(d: int, k: int = 5) -> nn.Linear:
    lin = nn.Linear(d, k)
    lin.requires_grad_(False)
    return lin


def _out_dim(module: nn.Module, shape: tuple) -> int:
    with torch.no_grad():
        out = module(torch.rand(shape))
    return out.numel() // out.shape[0]


def simple_act(act: type, bias: bool) -> Callable[[], tuple]:
    """``make_simple_act_setting``: Conv2d(3, 2, 2), activation, Flatten, frozen Linear(72, 5)."""

    def build() -> tuple:
        model = nn.Sequential(
            nn.Conv2d(3, 2, 2, bias=bias), act(), nn.Flatten(), _frozen_linear(72)
        )
        return model, nn.CrossEntropyLoss(), torch.rand(3, 3, 7, 7), cls_targets((3,), 5)

    return build


def simple_cnn(shape: tuple, conv: type, args: tuple) -> Callable[[], tuple]:
    """``make_simple_cnn_setting``: conv, ReLU, Flatten, frozen Linear; CE (sum)."""

    def build() -> tuple:
        layer = conv(*args)
        d = _out_dim(layer, shape)
        model = nn.Sequential(layer, nn.ReLU(), nn.Flatten(), _frozen_linear(d))
        return model, nn.CrossEntropyLoss(reduction="sum"), torch.rand(shape), cls_targets((3,), 5)

    return build


def simple_pool(shape: tuple, conv: type, pool: type, args: tuple) -> Callable[[], tuple]:
    """``make_simple_pooling_setting``: conv(3, 2, 2), ReLU, pool, Flatten, frozen Linear."""

    def build() -> tuple:
        c, p = conv(3, 2, 2), pool(*args)
        d = _out_dim(nn.Sequential(c, p), shape)
        model = nn.Sequential(c, nn.ReLU(), p, nn.Flatten(), _frozen_linear(d))
        return model, nn.CrossEntropyLoss(reduction="sum"), torch.rand(shape), cls_targets((3,), 5)

    return build


# -- the catalogue --------------------------------------------------------------------------
CL = "curvlinops test/cases.py"
CLU = "curvlinops test/utils.py"
BP2 = "backpack test/extensions/secondorder/secondorder_settings.py"
BPD = "backpack test/core/derivatives"
BPC = "backpack test/converter/converter_cases.py"


def _mlp(d_in: int, h: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, h), nn.ReLU(), nn.Linear(h, k))


CURVLINOPS: list[PeerCase] = [
    PeerCase(
        "cl-mlp-ce-mean",
        f"{CL} INV_CASES[0]",
        lambda: (
            _mlp(10, 5, 3),
            nn.CrossEntropyLoss(),
            *two_batches(3, 4, (10,), lambda n: cls_targets((n,), 3)),
        ),
        subset=weights_only,
        split=3,
    ),
    PeerCase(
        "cl-mlp-ce-sum",
        f"{CL} INV_CASES[1]",
        lambda: (
            _mlp(10, 5, 3),
            nn.CrossEntropyLoss(reduction="sum"),
            *two_batches(3, 4, (10,), lambda n: cls_targets((n,), 3)),
        ),
        subset=last_two,
        split=3,
    ),
    PeerCase(
        "cl-mlp-bce1-mean",
        f"{CL} INV_CASES[2]",
        lambda: (
            _mlp(10, 5, 1),
            nn.BCEWithLogitsLoss(),
            *two_batches(3, 4, (10,), lambda n: torch.rand(n, 1)),
        ),
        split=3,
    ),
    PeerCase(
        "cl-mlp-bce2-mean",
        f"{CL} INV_CASES[3]",
        lambda: (
            _mlp(10, 5, 2),
            nn.BCEWithLogitsLoss(),
            *two_batches(3, 4, (10,), lambda n: torch.rand(n, 2)),
        ),
        split=3,
    ),
    PeerCase(
        "cl-mlp-bce2-sum",
        f"{CL} INV_CASES[4]",
        lambda: (
            _mlp(10, 5, 2),
            nn.BCEWithLogitsLoss(reduction="sum"),
            *two_batches(3, 4, (10,), lambda n: torch.rand(n, 2)),
        ),
        split=3,
    ),
    PeerCase(
        "cl-mlp-mse-mean",
        f"{CL} INV_CASES[5]",
        lambda: (
            _mlp(8, 5, 3),
            nn.MSELoss(),
            *two_batches(2, 6, (8,), lambda n: reg_targets((n, 3))),
        ),
        subset=weights_only,
        split=2,
    ),
    PeerCase(
        "cl-mlp-mse-sum",
        f"{CL} INV_CASES[6]",
        lambda: (
            _mlp(8, 5, 3),
            nn.MSELoss(reduction="sum"),
            *two_batches(2, 6, (8,), lambda n: reg_targets((n, 3))),
        ),
        split=2,
    ),
    PeerCase(
        "cl-dict-input",
        f"{CL} INV_CASES[7:10] (ModelWithDictInput)",
        lambda: (
            DictInput(3),
            nn.CrossEntropyLoss(),
            {"x": torch.rand(3, 10)},
            cls_targets((3,), 3),
        ),
        refused=(TypeError, "X and y must be tensors"),
    ),
    PeerCase(
        "cl-weightshare-ce-mean",
        f"{CL} CASES (WeightShareModel, expand, CE)",
        lambda: (
            WeightShare(*_mlp(10, 5, 3), setting="expand", loss="CE"),
            nn.CrossEntropyLoss(),
            *two_batches(3, 4, (5, 10), lambda n: cls_targets((n, 5), 3)),
        ),
        subset=last_two,
        split=3,
    ),
    PeerCase(
        "cl-weightshare-ce-sum",
        f"{CL} CASES (WeightShareModel, expand, CE, sum)",
        lambda: (
            WeightShare(*_mlp(10, 5, 3), setting="expand", loss="CE"),
            nn.CrossEntropyLoss(reduction="sum"),
            *two_batches(3, 4, (5, 10), lambda n: cls_targets((n, 5), 3)),
        ),
        split=3,
    ),
    PeerCase(
        "cl-bce-extra-dim-mean",
        f"{CL} CASES (BCE, additional dimension)",
        lambda: (
            _mlp(10, 5, 2),
            nn.BCEWithLogitsLoss(),
            *two_batches(3, 4, (5, 10), lambda n: torch.rand(n, 5, 2)),
        ),
        split=3,
    ),
    PeerCase(
        "cl-bce-extra-dim-sum",
        f"{CL} CASES (BCE, additional dimension, sum)",
        lambda: (
            _mlp(10, 5, 2),
            nn.BCEWithLogitsLoss(reduction="sum"),
            *two_batches(3, 4, (5, 10), lambda n: torch.rand(n, 5, 2)),
        ),
        split=3,
    ),
    PeerCase(
        "cl-mse-extra-dim-mean",
        f"{CL} CASES (MSE, additional dimension)",
        lambda: (
            _mlp(8, 5, 3),
            nn.MSELoss(),
            *two_batches(2, 6, (5, 8), lambda n: reg_targets((n, 5, 3))),
        ),
        split=2,
    ),
    PeerCase(
        "cl-mse-extra-dim-sum",
        f"{CL} CASES (MSE, additional dimension, sum)",
        lambda: (
            _mlp(8, 5, 3),
            nn.MSELoss(reduction="sum"),
            *two_batches(2, 6, (5, 8), lambda n: reg_targets((n, 5, 3))),
        ),
        subset=weights_only,
        split=2,
    ),
    PeerCase(
        "cl-functional-module",
        f"{CL} CALLABLE_CASES (F.linear model, as an nn.Module)",
        lambda: (
            FunctionalMLP(),
            nn.MSELoss(),
            *two_batches(3, 4, (10,), lambda n: reg_targets((n, 3))),
        ),
        subset=last_two,
        split=3,
    ),
    PeerCase(
        "cl-functional-callable",
        f"{CL} CALLABLE_CASES (a plain function of (params, X))",
        lambda: (functional_mlp, nn.MSELoss(), torch.rand(3, 10), reg_targets((3, 3))),
        refused=(TypeError, "model must be an nn.Module"),
    ),
    PeerCase(
        "cl-cnn",
        f"{CL} CNN_CASES[0] (input 16x16 instead of 20x20)",
        lambda: (
            nn.Sequential(
                nn.Conv2d(1, 3, 5),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(3, 6, 5),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(6, 10),
            ),
            nn.CrossEntropyLoss(),
            *two_batches(2, 2, (1, 16, 16), lambda n: cls_targets((n,), 10)),
        ),
        subset=last_two,
        split=2,
    ),
    PeerCase(
        "cl-kfac-deep-linear",
        "curvlinops test/kfac_cases.py (deep linear network, MSE)",
        lambda: (
            nn.Sequential(nn.Linear(6, 3), nn.Linear(3, 1)),
            nn.MSELoss(),
            *two_batches(3, 4, (6,), lambda n: reg_targets((n, 1))),
        ),
        subset=weights_only,
        split=3,
    ),
    PeerCase(
        "cl-kfac-bare-linear",
        "curvlinops test/kfac_cases.py (a bare Linear(5, 3) as the model, CE)",
        lambda: (nn.Linear(5, 3), nn.CrossEntropyLoss(), torch.rand(4, 5), cls_targets((4,), 3)),
    ),
    PeerCase(
        "cl-kfac-weightshare-3d",
        "curvlinops test/kfac_cases.py (WeightShareModel(Linear(5, 3)), output (N, 4, 8, 3))",
        lambda: (
            WeightShare(nn.Linear(5, 3), setting="expand"),
            nn.MSELoss(),
            torch.rand(2, 4, 8, 5),
            reg_targets((2, 4, 8, 3)),
        ),
    ),
    PeerCase(
        "cl-dropout-train",
        f"{CL} NON_DETERMINISTIC_CASES (Dropout)",
        lambda: (
            nn.Sequential(nn.Linear(10, 5), nn.Dropout(), nn.ReLU(), nn.Linear(5, 2)).train(),
            nn.CrossEntropyLoss(),
            torch.rand(6, 10),
            cls_targets((6,), 2),
        ),
        refused=(ValueError, r"Dropout in training mode is random; call model.eval\(\)"),
    ),
    PeerCase(
        "cl-batchnorm-train",
        f"{CL} NON_DETERMINISTIC_CASES (BatchNorm1d)",
        lambda: (
            nn.Sequential(nn.Linear(10, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2)).train(),
            nn.CrossEntropyLoss(),
            torch.rand(6, 10),
            cls_targets((6,), 2),
        ),
        refused=(ValueError, r"BatchNorm1d in training mode mixes samples.*model.eval\(\)"),
    ),
    PeerCase(
        "cl-batchnorm-eval",
        f"{CL} NON_DETERMINISTIC_CASES (BatchNorm1d), in eval mode",
        lambda: (
            _randomize_bn(
                nn.Sequential(nn.Linear(10, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))
            ),
            nn.CrossEntropyLoss(),
            torch.rand(6, 10),
            cls_targets((6,), 2),
        ),
    ),
    PeerCase(
        "cl-weightshare-expand-flatten",
        f"{CLU} WeightShareModel (expand-flatten, MSE)",
        lambda: (
            WeightShare(*_mlp(10, 5, 3), setting="expand-flatten"),
            nn.MSELoss(),
            torch.rand(4, 5, 10),
            reg_targets((4, 15)),
        ),
    ),
    PeerCase(
        "cl-weightshare-reduce",
        f"{CLU} WeightShareModel (reduce, CE)",
        lambda: (
            WeightShare(*_mlp(10, 5, 3), setting="reduce", loss="CE"),
            nn.CrossEntropyLoss(),
            torch.rand(4, 5, 10),
            cls_targets((4,), 3),
        ),
    ),
    PeerCase(
        "cl-split-concat",
        f"{CLU} SplitConcatModel (one Linear used twice)",
        lambda: (SplitConcat(3, bias=True), nn.MSELoss(), torch.rand(5, 6), reg_targets((5, 6))),
    ),
    PeerCase(
        "cl-weight-tied-split-concat",
        f"{CLU} WeightTiedSplitConcatModel",
        lambda: (TiedSplitConcat(3), nn.MSELoss(), torch.rand(5, 6), reg_targets((5, 6))),
        refused=(
            ValueError,
            "tied weights: linear1.weight and linear2.weight are the same parameter",
        ),
    ),
    PeerCase(
        "cl-conv2d-expand",
        f"{CLU} Conv2dModel (expand: conv, then c to last)",
        lambda: (
            nn.Sequential(nn.Conv2d(3, 2, 4, padding=2), Permute(0, 2, 3, 1)),
            nn.MSELoss(),
            torch.rand(2, 3, 4, 4),
            reg_targets((2, 5, 5, 2)),
        ),
    ),
    PeerCase(
        "cl-conv2d-reduce",
        f"{CLU} Conv2dModel (reduce: AdaptiveAvgPool2d(1), Flatten)",
        lambda: (
            nn.Sequential(nn.Conv2d(3, 2, 4, padding=2), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
            nn.CrossEntropyLoss(),
            torch.rand(3, 3, 4, 4),
            cls_targets((3,), 2),
        ),
    ),
    PeerCase(
        "cl-unet-mse",
        f"{CLU} UnetModel (MSE, flatten)",
        lambda: (Unet("flat"), nn.MSELoss(), torch.rand(2, 3, 4, 4), reg_targets((2, 48))),
        subset=last_two,
    ),
    PeerCase(
        "cl-unet-ce",
        f"{CLU} UnetModel (CE per pixel, (N, c, h, w))",
        lambda: (
            Unet("image"),
            nn.CrossEntropyLoss(),
            torch.rand(2, 3, 4, 4),
            cls_targets((2, 4, 4), 3),
        ),
    ),
    PeerCase(
        "cl-unet-ce-pixels-into-batch",
        f"{CLU} UnetModel (CE, 'batch c h w -> (batch h w) c')",
        lambda: (
            Unet("pixels-into-batch"),
            nn.CrossEntropyLoss(),
            torch.rand(2, 3, 4, 4),
            cls_targets((32,), 3),
        ),
        refused=(ValueError, "X has 2 samples but y has 32"),
    ),
]


def _act_cases() -> list[PeerCase]:
    acts = [nn.ReLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.LogSigmoid, nn.ELU, nn.SELU]
    return [
        PeerCase(
            f"bp-act-{a.__name__}-{'bias' if b else 'nobias'}",
            "backpack automated_settings.py make_simple_act_setting",
            simple_act(a, b),
        )
        for a in acts
        for b in (True, False)
    ]


def _pool_cases() -> list[PeerCase]:
    out = []
    specs = []
    for d, conv, mx, av, ad in [
        (1, nn.Conv1d, nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d),
        (2, nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d),
        (3, nn.Conv3d, nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d),
    ]:
        small = (3, 3) + (7,) * d
        first = (3, 3) + ((7,) if d == 1 else (11, 11) if d == 2 else (7, 7, 7))
        specs += [
            (first, conv, mx, (2, 1)),
            (small, conv, mx, (2, 1, 0, 2)),
            (small, conv, mx, (2, 1, 0, 2, False, True)),
            (first, conv, av, (2, 1)),
            (small, conv, av, (2, 1, 0, True)),
            (small, conv, av, (2, 1, 0, False)),
            (first, conv, ad, (2,)),
        ]
    for shape, conv, pool, args in specs:
        src = (
            "diag_hessian/diagh_settings.py"
            if "Adaptive" in pool.__name__
            else "secondorder_settings.py"
        )
        out.append(
            PeerCase(
                f"bp-{pool.__name__}-{'-'.join(map(str, args))}",
                f"backpack {src} make_simple_pooling_setting",
                simple_pool(shape, conv, pool, args),
            )
        )
    return out


def _cnn_cases() -> list[PeerCase]:
    C1, C2, C3 = nn.Conv1d, nn.Conv2d, nn.Conv3d
    T1, T2, T3 = nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d
    specs = [
        ((3, 3, 7), C1, (3, 2, 2)),
        ((3, 2, 7), C1, (2, 3, 2, 2, 0, 2)),
        ((3, 3, 7), C1, (3, 2, 2, 2, 1)),
        ((3, 3, 8), C1, (3, 6, 2, 4, 2, 3)),
        ((3, 3, 7), C1, (3, 2, 2, 4, 2, 1, 1, False)),
        ((3, 3, 7, 7), C2, (3, 2, 2)),
        ((3, 2, 7, 7), C2, (2, 3, 2, 2, 0, 2)),
        ((3, 3, 7, 7), C2, (3, 2, 2, 2, 1)),
        ((3, 3, 8, 8), C2, (3, 6, 2, 4, 2, 3)),
        ((3, 3, 7, 7), C2, (3, 2, 2, 4, 2, 1, 1, False)),
        ((3, 3, 2, 7, 7), C3, (3, 2, 2)),
        ((3, 2, 3, 7, 7), C3, (2, 3, 2, 2, 0, 2)),
        ((3, 3, 2, 7, 7), C3, (3, 2, 2, 3, 2)),
        ((3, 3, 4, 8, 8), C3, (3, 6, 2, 4, 2, 3)),
        ((3, 3, 2, 7, 7), C3, (3, 2, 2, 4, 2, 1, 1, False)),
        ((3, 3, 7), T1, (3, 2, 2)),
        ((3, 2, 7), T1, (2, 3, 2, 2, 0, 0, 1, True, 2)),
        ((3, 3, 7), T1, (3, 2, 2, 2, 1)),
        ((3, 3, 8), T1, (3, 6, 2, 4, 2, 0, 1, True, 3)),
        ((3, 3, 7), T1, (3, 2, 2, 4, 2, 0, 1, False)),
        ((3, 3, 7, 7), T2, (3, 2, 2)),
        ((3, 2, 9, 9), T2, (2, 4, 2, 1, 0, 0, 1, True, 2)),
        ((3, 3, 7, 7), T2, (3, 2, 2, 2, 1)),
        ((3, 3, 7, 7), T2, (3, 2, 2, 4, 2, 0, 1, False)),
        ((3, 3, 2, 7, 7), T3, (3, 2, 2)),
        ((3, 2, 3, 5, 5), T3, (2, 3, 2, 2, 2, 0, 1, True, 2)),
        ((3, 3, 2, 7, 7), T3, (3, 2, 2, 4, 2, 0, 1, False)),
        # GROUP_CONV_SETTINGS
        ((3, 6, 7), C1, (6, 4, 2, 1, 0, 1, 2)),
        ((3, 6, 7, 5), C2, (6, 3, 2, 1, 0, 1, 3)),
        ((3, 4, 7, 5, 6), C3, (4, 2, 2, 1, 0, 2, 2)),
        ((3, 6, 8), T1, (6, 3, 2, 4, 2, 0, 3, True, 3)),
        ((3, 4, 9, 9), T2, (4, 2, 2, 1, 0, 0, 2, True, 2)),
        ((3, 4, 3, 5, 5), T3, (4, 2, (2, 2, 1), 2, 2, 0, 2, True, 2)),
    ]
    return [
        PeerCase(
            f"bp-{conv.__name__}-{i}",
            f"{BP2} make_simple_cnn_setting {conv.__name__}{args}",
            simple_cnn(shape, conv, args),
        )
        for i, (shape, conv, args) in enumerate(specs)
    ]


BACKPACK: list[PeerCase] = [
    PeerCase(
        "bp-example",
        f"{BP2} example",
        lambda: (
            nn.Sequential(nn.Linear(10, 5)),
            nn.CrossEntropyLoss(),
            torch.rand(3, 10),
            cls_targets((3,), 5),
        ),
    ),
    PeerCase(
        "bp-linear-linear-ce",
        BP2,
        lambda: (
            nn.Sequential(nn.Linear(10, 7), nn.Linear(7, 5)),
            nn.CrossEntropyLoss(),
            torch.rand(3, 10),
            cls_targets((3,), 5),
        ),
        subset=weights_only,
    ),
    PeerCase(
        "bp-relu-ce-sum",
        BP2,
        lambda: (
            nn.Sequential(nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 5)),
            nn.CrossEntropyLoss(reduction="sum"),
            torch.rand(3, 10),
            cls_targets((3,), 5),
        ),
    ),
    PeerCase(
        "bp-sigmoid-mse",
        BP2,
        lambda: (
            nn.Sequential(nn.Linear(10, 7), nn.Sigmoid(), nn.Linear(7, 5)),
            nn.MSELoss(),
            torch.rand(3, 10),
            reg_targets((3, 5)),
        ),
        subset=last_two,
    ),
    *_act_cases(),
    *_pool_cases(),
    *_cnn_cases(),
    # LINEAR_ADDITIONAL_DIMENSIONS_SETTINGS
    PeerCase(
        "bp-lin-1add-mse",
        f"{BP2} one-additional (MSE)",
        lambda: (
            nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 2), nn.Flatten()),
            nn.MSELoss(),
            torch.rand(3, 4, 5),
            reg_targets((3, 8)),
        ),
    ),
    PeerCase(
        "bp-lin-2add-mse",
        f"{BP2} two-additional (MSE)",
        lambda: (
            nn.Sequential(nn.Linear(5, 3), nn.Sigmoid(), nn.Linear(3, 2), nn.Flatten()),
            nn.MSELoss(),
            torch.rand(3, 4, 2, 5),
            reg_targets((3, 16)),
        ),
    ),
    PeerCase(
        "bp-lin-3add-mse-sum",
        f"{BP2} three-additional (MSE, sum)",
        lambda: (
            nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 2), nn.Flatten()),
            nn.MSELoss(reduction="sum"),
            torch.rand(3, 4, 2, 3, 5),
            reg_targets((3, 48)),
        ),
    ),
    PeerCase(
        "bp-lin-1add-ce",
        f"{BP2} one-additional (CE)",
        lambda: (
            nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 2), nn.Flatten()),
            nn.CrossEntropyLoss(),
            torch.rand(3, 4, 5),
            cls_targets((3,), 8),
        ),
    ),
    PeerCase(
        "bp-lin-2add-ce",
        f"{BP2} two-additional (CE)",
        lambda: (
            nn.Sequential(nn.Linear(5, 3), nn.Sigmoid(), nn.Linear(3, 2), nn.Flatten()),
            nn.CrossEntropyLoss(),
            torch.rand(3, 4, 2, 5),
            cls_targets((3,), 16),
        ),
    ),
    PeerCase(
        "bp-lin-3add-ce-sum",
        f"{BP2} three-additional (CE, sum)",
        lambda: (
            nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2), nn.Flatten()),
            nn.CrossEntropyLoss(reduction="sum"),
            torch.rand(3, 4, 2, 3, 5),
            cls_targets((3,), 48),
        ),
    ),
    PeerCase(
        "bp-multi-d-ce",
        f"{BP2} multi-d-CrossEntropyLoss (output (N, 4, 2, 3, 2), classes on dim 1)",
        lambda: (
            nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2)),
            nn.CrossEntropyLoss(reduction="sum"),
            torch.rand(3, 4, 2, 3, 5),
            cls_targets((3, 2, 3, 2), 4),
        ),
    ),
    PeerCase(
        "bp-pad-1",
        f"{BP2} Custom Pad mod [0]",
        lambda: (
            nn.Sequential(
                nn.Conv2d(3, 2, 2),
                Pad((1, 1, 0, 2)),
                nn.Conv2d(2, 2, 3, stride=2),
                nn.Flatten(),
                nn.Linear(8, 2),
            ),
            nn.MSELoss(),
            torch.rand(5, 3, 4, 4),
            reg_targets((5, 2)),
        ),
    ),
    PeerCase(
        "bp-pad-2",
        f"{BP2} Custom Pad mod [1]",
        lambda: (
            nn.Sequential(
                nn.Conv2d(3, 2, 3, padding=1),
                nn.ReLU(),
                Pad((1, 1, 2, 0, 1, 2), value=1.0),
                nn.Conv2d(5, 2, 3, stride=2),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(8, 3),
            ),
            nn.CrossEntropyLoss(),
            torch.rand(5, 3, 4, 4),
            cls_targets((5,), 3),
        ),
        subset=weights_only,
    ),
    PeerCase(
        "bp-slicing-1",
        f"{BP2} Custom Slicing mod [0]",
        lambda: (
            nn.Sequential(
                nn.Conv2d(3, 2, 2, padding=1),
                Slicing((slice(None), 0, slice(None, None, 2), slice(0, 2))),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(6, 4),
            ),
            nn.CrossEntropyLoss(),
            torch.rand(3, 3, 4, 5),
            cls_targets((3,), 4),
        ),
    ),
    PeerCase(
        "bp-slicing-2",
        f"{BP2} Custom Slicing mod [1]",
        lambda: (
            nn.Sequential(
                nn.Conv2d(3, 2, 2, padding=1),
                Slicing((slice(None), slice(None), 2)),
                nn.ReLU(),
                Slicing((slice(None), 1)),
                nn.Linear(6, 4),
            ),
            nn.MSELoss(),
            torch.rand(3, 3, 4, 5),
            reg_targets((3, 4)),
        ),
    ),
    PeerCase(
        "bp-bce-soft",
        f"{BP2} BCEWithLogitsLoss non-binary-labels",
        lambda: (
            nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 1)),
            nn.BCEWithLogitsLoss(),
            torch.rand(3, 6),
            torch.rand(3, 1),
        ),
    ),
    PeerCase(
        "bp-bce-binary-sum",
        f"{BP2} BCEWithLogitsLoss binary-labels",
        lambda: (
            nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 1)),
            nn.BCEWithLogitsLoss(reduction="sum"),
            torch.rand(3, 6),
            cls_targets((3, 1), 2).double(),
        ),
    ),
    # test/core/derivatives/*_settings.py: single layers, here between trainable layers
    PeerCase(
        "bp-embedding",
        f"{BPD}/embedding_settings.py Embedding(5, 7) on (8, 3, 3)",
        lambda: (
            nn.Sequential(nn.Embedding(5, 7), nn.Flatten(), nn.Tanh(), nn.Linear(63, 2)),
            nn.MSELoss(),
            torch.randint(0, 5, (8, 3, 3)),
            reg_targets((8, 2)),
        ),
        subset=last_two,
    ),
    PeerCase(
        "bp-batchnorm1d-eval",
        f"{BPD}/batch_norm_settings.py BatchNorm1d(7) (eval)",
        lambda: (
            _randomize_bn(
                nn.Sequential(nn.Linear(4, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 2))
            ),
            nn.MSELoss(),
            torch.rand(5, 4),
            reg_targets((5, 2)),
        ),
    ),
    PeerCase(
        "bp-batchnorm2d-eval",
        f"{BPD}/batch_norm_settings.py BatchNorm2d(7) (eval)",
        lambda: (
            _randomize_bn(
                nn.Sequential(
                    nn.Conv2d(2, 7, 2), nn.BatchNorm2d(7), nn.Tanh(), nn.Flatten(), nn.Linear(42, 2)
                )
            ),
            nn.MSELoss(),
            torch.rand(5, 2, 3, 4),
            reg_targets((5, 2)),
        ),
    ),
    PeerCase(
        "bp-batchnorm3d-eval",
        f"{BPD}/batch_norm_settings.py BatchNorm3d(3) (eval)",
        lambda: (
            _randomize_bn(
                nn.Sequential(
                    nn.Conv3d(2, 3, 2), nn.BatchNorm3d(3), nn.Tanh(), nn.Flatten(), nn.Linear(24, 2)
                )
            ),
            nn.MSELoss(),
            torch.rand(5, 2, 3, 3, 3),
            reg_targets((5, 2)),
        ),
    ),
    PeerCase(
        "bp-batchnorm-train",
        f"{BPD}/batch_norm_settings.py BatchNorm1d (training mode)",
        lambda: (
            nn.Sequential(nn.Linear(4, 7), nn.BatchNorm1d(7), nn.Linear(7, 2)).train(),
            nn.MSELoss(),
            torch.rand(5, 4),
            reg_targets((5, 2)),
        ),
        refused=(ValueError, "BatchNorm1d in training mode mixes samples"),
    ),
    PeerCase(
        "bp-permute",
        f"{BPD}/permute_settings.py Permute(0, 3, 1, 2)",
        lambda: (
            nn.Sequential(
                nn.Linear(2, 3), Permute(0, 3, 1, 2), nn.Tanh(), nn.Flatten(), nn.Linear(36, 2)
            ),
            nn.MSELoss(),
            torch.rand(5, 4, 3, 2),
            reg_targets((5, 2)),
        ),
    ),
    PeerCase(
        "bp-scale-module",
        f"{BPD}/scale_module_settings.py ScaleModule(0.3)",
        lambda: (
            nn.Sequential(
                nn.Linear(2, 3), ScaleModule(0.3), nn.Tanh(), nn.Identity(), nn.Linear(3, 2)
            ),
            nn.MSELoss(),
            torch.rand(4, 2),
            reg_targets((4, 2)),
        ),
    ),
    PeerCase(
        "bp-rnn",
        f"{BPD}/rnn_settings.py RNN",
        lambda: (
            CharRNN(nn.RNN),
            nn.CrossEntropyLoss(),
            torch.randint(0, 7, (3, 4)),
            cls_targets((3, 4), 7),
        ),
        refused=(ValueError, "RNN is recurrent"),
    ),
    PeerCase(
        "bp-lstm",
        f"{BPD}/lstm_settings.py LSTM; {BPC} _TolstoiCharRNN",
        lambda: (
            CharRNN(nn.LSTM),
            nn.CrossEntropyLoss(),
            torch.randint(0, 7, (3, 4)),
            cls_targets((3, 4), 7),
        ),
        refused=(ValueError, "LSTM is recurrent"),
    ),
    # test/converter/converter_cases.py: custom forward methods
    PeerCase(
        "bp-conv-inplace",
        f"{BPC} _InplaceActivation",
        lambda: (InplaceActivation(), nn.MSELoss(), torch.rand(3, 3), reg_targets((3, 2))),
    ),
    PeerCase(
        "bp-conv-multiple-usages",
        f"{BPC} _MultipleUsages",
        lambda: (MultipleUsages(), nn.MSELoss(), torch.rand(3, 3), reg_targets((3, 2))),
    ),
    PeerCase(
        "bp-conv-flatten",
        f"{BPC} _FlattenNetwork",
        lambda: (FlattenNetwork(), nn.MSELoss(), torch.rand(3, 2, 2, 4), reg_targets((3, 6))),
    ),
    PeerCase(
        "bp-conv-multiply",
        f"{BPC} _Multiply",
        lambda: (Multiply(), nn.MSELoss(), torch.rand(2, 4), reg_targets((2, 3))),
    ),
    PeerCase(
        "bp-conv-add",
        f"{BPC} _Add",
        lambda: (Add(), nn.MSELoss(), torch.rand(3, 3), reg_targets((3, 2))),
    ),
    PeerCase(
        "bp-conv-permute",
        f"{BPC} _Permute",
        lambda: (PermuteNet(), nn.CrossEntropyLoss(), torch.rand(3, 5, 3), cls_targets((3, 2), 2)),
    ),
    PeerCase(
        "bp-conv-transpose",
        f"{BPC} _Transpose",
        lambda: (
            TransposeNet(),
            nn.CrossEntropyLoss(),
            torch.rand(3, 5, 3),
            cls_targets((3, 2), 3),
        ),
    ),
    PeerCase(
        "bp-conv-resnet",
        f"{BPC} _ResNet18 (a small residual CNN stands in for torchvision's)",
        lambda: (
            _randomize_bn(TinyResNet()),
            nn.MSELoss(),
            torch.rand(2, 3, 6, 6),
            reg_targets((2, 4)),
        ),
        subset=last_two,
    ),
]

#: At seed 0 every ReLU of these is inactive on the data (``H = 0``, a case of its own
#: below); seed 1 gives them curvature.
DEAD_AT_SEED_0 = {
    "bp-MaxPool1d-2-1",
    "bp-MaxPool1d-2-1-0-2",
    "bp-MaxPool1d-2-1-0-2-False-True",
    "bp-AvgPool1d-2-1",
    "bp-AvgPool1d-2-1-0-True",
    "bp-AvgPool1d-2-1-0-False",
    "bp-AdaptiveAvgPool1d-2",
    "bp-Conv1d-2",
    "bp-Conv3d-12",
    "bp-ConvTranspose1d-15",
    "bp-conv-multiple-usages",
}
# bp-Conv3d-14 (stride 4, padding 2 on depth 2) and bp-ConvTranspose3d-26 (bias-free, padding
# 2) have H = 0 for every seed: every output the frozen layer sees is read from zero padding
# only, so every ReLU sits at 0, where its derivative is 0. They stay, as BackPACK has them.
BACKPACK = [replace(c, seed=1) if c.name in DEAD_AT_SEED_0 else c for c in BACKPACK] + [
    replace(
        next(c for c in BACKPACK if c.name == "bp-MaxPool1d-2-1"),
        name="bp-MaxPool1d-2-1-all-relus-inactive",
        source="backpack make_simple_pooling_setting, a seed where every ReLU is off: H = 0",
    )
]

PEER_CASES: list[PeerCase] = CURVLINOPS + BACKPACK
