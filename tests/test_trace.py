"""Any ``nn.Module`` through ``torch.fx`` (hessinv.trace), and ``params=``.

Every model is checked against an independent dense reference: the loss as a
function of the flat parameters built from the model itself with
``functional_call`` (``cases.reference_loss_fn``; LayerNorm swapped for the
test-local ``RefLayerNorm``, functional layer norms switched to a test-local
elementary one), differentiated by ``torch.func.hessian``. The reference itself
is checked against central differences of its gradient (first derivatives only,
so a wrong second-derivative formula inside torch cannot hide in both).
Stage blocks come from generic autodiff, so a wrong second derivative of a
torch op would show in both ``H`` and the dense reference: the central
differences are what rule that out.
"""

from __future__ import annotations

import ast
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from cases import DT, _swap_layernorm, reference_loss_fn, rel, swap_celu
from torch import nn

import hessinv

DAMP = 1e-2


def _ln(h: torch.Tensor, w: torch.Tensor, ref: bool) -> torch.Tensor:
    """``F.layer_norm`` in the model; a test-local elementary form in the reference."""
    if not ref:
        return F.layer_norm(h, (h.shape[-1],), w, None, 1e-5)
    mu = h.mean(-1, keepdim=True)
    var = ((h - mu) ** 2).mean(-1, keepdim=True)
    return (h - mu) / torch.sqrt(var + 1e-5) * w


class ResMLP(nn.Module):
    def __init__(self, d: int = 3, w: int = 4, depth: int = 3, out: int = 2) -> None:
        super().__init__()
        self.inp = nn.Linear(d, w)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(w, w), nn.Tanh(), nn.Linear(w, w)) for _ in range(depth)
        )
        self.out = nn.Linear(w, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        for b in self.blocks:
            h = h + b(h)
        return self.out(h)


class GatedLN(nn.Module):
    """Pre-norm gated residual blocks: ``h + a(LN h) * sigmoid(b(LN h))``, then F.layer_norm."""

    def __init__(self, ref: bool = False) -> None:
        super().__init__()
        self.ref = ref
        self.inp = nn.Linear(3, 4)
        self.ln = nn.LayerNorm(4)
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.g = nn.Parameter(1.0 + 0.3 * torch.randn(4))
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        u = self.ln(h)
        h = h + self.a(u) * torch.sigmoid(self.b(u))
        return self.out(_ln(h, self.g, self.ref))


class SkipCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 2, 3, padding=1)
        self.c2 = nn.Conv2d(2, 2, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.c1(x))
        h = h + torch.tanh(self.c2(h))
        return self.fc(self.pool(h).flatten(1))


class EmbedConv(nn.Module):
    """Embedding -> Conv1d with a skip -> pools -> ConvTranspose1d -> LogSigmoid -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 2)
        self.conv = nn.Conv1d(2, 2, 3, padding=1)
        self.mp = nn.MaxPool1d(2)
        self.ap = nn.AvgPool1d(2)
        self.up = nn.ConvTranspose1d(2, 1, 2, stride=2)
        self.fc = nn.Linear(4, 2)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx).transpose(1, 2)  # (N, 2, 8)
        h = h + F.selu(self.conv(h))
        h = self.ap(self.mp(h))  # (N, 2, 2)
        h = F.logsigmoid(self.up(h))  # (N, 1, 4)
        return self.fc(h.flatten(1))


class SeqSubclass(nn.Sequential):
    """An nn.Sequential subclass with its own forward (a skip around the middle)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self[1](self[0](x))
        return self[3](h + self[2](h))


def _idx(n: int, length: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, k, (n, length), generator=g)


def m_resmlp(g):
    return ResMLP().to(DT), nn.MSELoss(), *_reg(5, 3, 2, g)


def m_gated_ln(g):
    m = GatedLN().to(DT)
    with torch.no_grad():
        m.ln.weight.add_(0.3 * torch.randn(4, generator=g, dtype=DT))
        m.ln.bias.add_(0.3 * torch.randn(4, generator=g, dtype=DT))
    return m, nn.MSELoss(), *_reg(4, 3, 2, g)


def m_skip_cnn(g):
    X = torch.randn(3, 1, 4, 4, generator=g, dtype=DT)
    return SkipCNN().to(DT), nn.CrossEntropyLoss(), X, torch.randint(0, 3, (3,), generator=g)


def m_embed_conv(g):
    X = _idx(4, 8, 5, g)
    return (
        EmbedConv().to(DT),
        nn.MSELoss(reduction="sum"),
        X,
        torch.randn(4, 2, generator=g, dtype=DT),
    )


def m_seq_embedding(g):
    m = nn.Sequential(nn.Embedding(6, 2), nn.Flatten(), nn.Linear(6, 3), nn.SELU(), nn.Linear(3, 2))
    return m.to(DT), nn.CrossEntropyLoss(), _idx(5, 3, 6, g), torch.randint(0, 2, (5,), generator=g)


def m_seq_pool1d(g):
    m = nn.Sequential(
        nn.Conv1d(2, 2, 3, padding=1),
        nn.LogSigmoid(),
        nn.MaxPool1d(2),
        nn.AvgPool1d(2),
        nn.Flatten(),
        nn.Linear(4, 2),
    )
    X = torch.randn(3, 2, 8, generator=g, dtype=DT)
    return m.to(DT), nn.MSELoss(), X, torch.randn(3, 2, generator=g, dtype=DT)


def m_seq_pool2d(g):
    m = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.SELU(),
        nn.MaxPool2d(2),
        nn.AvgPool2d(1),
        nn.Conv2d(2, 2, 2, padding=1),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d((2, 1)),
        nn.Flatten(),
        nn.Linear(4, 2),
    )
    X = torch.randn(3, 1, 4, 4, generator=g, dtype=DT)
    return m.to(DT), nn.MSELoss(), X, torch.randn(3, 2, generator=g, dtype=DT)


def m_seq_conv3d(g):
    m = nn.Sequential(nn.Conv3d(1, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(16, 2))
    X = torch.randn(3, 1, 3, 3, 3, generator=g, dtype=DT)
    return m.to(DT), nn.MSELoss(), X, torch.randn(3, 2, generator=g, dtype=DT)


def m_seq_convtranspose(g):
    m = nn.Sequential(
        nn.ConvTranspose2d(1, 2, 2, stride=2),
        nn.Tanh(),
        nn.Flatten(start_dim=2),
        nn.ConvTranspose1d(2, 1, 3),
        nn.LogSigmoid(),
        nn.Flatten(),
        nn.Linear(18, 2),
    )
    X = torch.randn(3, 1, 2, 2, generator=g, dtype=DT)
    return m.to(DT), nn.MSELoss(), X, torch.randn(3, 2, generator=g, dtype=DT)


def m_seq_extras(g):
    """More traced leaves: PReLU, CELU, GroupNorm, Hardtanh, ReLU6."""
    m = nn.Sequential(
        nn.Linear(3, 4),
        nn.PReLU(),
        nn.Linear(4, 4),
        nn.CELU(0.7),
        nn.Unflatten(1, (2, 2)),
        nn.GroupNorm(1, 2),
        nn.Flatten(),
        nn.Hardtanh(-0.5, 0.5),
        nn.Linear(4, 3),
        nn.ReLU6(),
        nn.Linear(3, 2),
    )
    return m.to(DT), nn.MSELoss(), *_reg(4, 3, 2, g)


def m_seq_subclass(g):
    m = SeqSubclass(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Linear(4, 2))
    return m.to(DT), nn.MSELoss(), *_reg(4, 3, 2, g)


def _reg(n, d_in, d_out, g):
    return torch.randn(n, d_in, generator=g, dtype=DT), torch.randn(n, d_out, generator=g, dtype=DT)


MODELS = [
    m_resmlp,
    m_gated_ln,
    m_skip_cnn,
    m_embed_conv,
    m_seq_embedding,
    m_seq_pool1d,
    m_seq_pool2d,
    m_seq_conv3d,
    m_seq_convtranspose,
    m_seq_subclass,
    m_seq_extras,
]


def _build(make, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    return make(g)


def _reference(model, loss_func, X, y, names=None):
    """Dense ``(H, g)`` of the loss in the flat parameters ``names`` (in that order).

    ``names=None``: every trainable parameter, ``named_parameters()`` order
    (``cases.reference_loss_fn``).
    """
    ref = swap_celu(_swap_layernorm(copy.deepcopy(model)))
    if isinstance(ref, GatedLN):
        ref.ref = True
    if names is None:
        f, x0 = reference_loss_fn(ref, loss_func, X, y)
    else:
        for n, p in ref.named_parameters():
            p.requires_grad_(n in names)  # the others are constants
        ps = dict(ref.named_parameters())
        shapes = [ps[n].shape for n in names]
        x0 = torch.cat([ps[n].detach().reshape(-1) for n in names])

        def f(flat):
            vals, i = {}, 0
            for n, sh in zip(names, shapes, strict=True):
                k = sh.numel()
                vals[n] = flat[i : i + k].reshape(sh)
                i += k
            return loss_func(torch.func.functional_call(ref, vals, (X,)), y)

    # dense reference, reverse over reverse (as torch.func.hessian, faster on conv nets)
    try:
        h = torch.func.jacrev(torch.func.grad(f))(x0)
    except RuntimeError:  # vmap cannot batch some backward kernels (embedding + conv1d)
        h = torch.func.hessian(f)(x0)
    g = torch.func.grad(f)(x0)
    # the reference against central differences of its gradient along 3 random directions
    # (first derivatives only; they reach ~1e-9 relative here)
    v = torch.randn(x0.numel(), 3, dtype=DT)
    eps = 1e-5
    fd = [
        (torch.func.grad(f)(x0 + eps * c) - torch.func.grad(f)(x0 - eps * c)) / (2 * eps)
        for c in v.T
    ]
    assert rel(h @ v, torch.stack(fd, 1)) < 1e-6
    return h, g


def _flat_names(H):  # noqa: N803
    """Names of the flat order of the operator (traced stages; or per-layer Sequential stages)."""
    names = []
    for st in H.pipeline.stages:
        if st.structure is None:
            names += st.fn.names
        else:
            ptrs = {p.data_ptr() for p in st.params}
            names += [s.name for s in st.structure.sources if s.tensor.data_ptr() in ptrs]
    return names


def _check_against(H, h_ref, g_ref):  # noqa: N803
    w = h_ref.shape[0]
    eps = torch.finfo(DT).eps
    hn = float(torch.linalg.matrix_norm(h_ref, 2))
    assert H.shape == (w, w)
    # H @ V: the reference's round-off is ~ W eps ||H||; allow 1e3 times that
    v = torch.randn(w, 3, dtype=DT)
    hv = H @ v
    assert not hv.requires_grad and not H.gradient().requires_grad  # constants stay constant
    assert float((hv - h_ref @ v).norm()) <= 1e3 * w * eps * hn * float(v.norm())
    assert rel(H.gradient(), g_ref) <= 1e3 * w * eps
    # solve, damping 1e-2: error bound cond * eps, times a margin
    a = h_ref + DAMP * torch.eye(w, dtype=DT)
    x_ref = torch.linalg.solve(a, g_ref)
    cond = float(torch.linalg.cond(a))
    x = H.solve(g_ref, damping=DAMP, method="lifted")
    assert rel(x, x_ref) <= 1e3 * cond * eps
    # logdet and inertia of H + 1e-2 I
    s_ref, la_ref = torch.linalg.slogdet(a)
    s, la = H.logdet(DAMP)
    assert s == float(s_ref)
    assert abs(la - float(la_ref)) <= 1e3 * w * eps * (1 + abs(float(la_ref))) * cond
    ev = torch.linalg.eigvalsh(a)
    assert float(ev.abs().min()) > 1e-8  # the counts below are well defined
    assert tuple(H.inertia(DAMP)) == (int((ev > 0).sum()), int((ev < 0).sum()), 0)


def _operator_in_use_order(model, loss_func, X, y):  # noqa: N803
    """The operator; where forward's order of use differs from named_parameters() order the
    model is refused with the order to pass as params=, which then works."""
    try:
        return hessinv.Hessian(model, loss_func, X, y), False
    except ValueError as e:
        msg = str(e)
        assert "pass params= in the order" in msg
        order = ast.literal_eval(msg[msg.index("[") :])
        ps = dict(model.named_parameters())
        return hessinv.Hessian(model, loss_func, X, y, params={n: ps[n] for n in order}), True


@pytest.mark.parametrize("make", MODELS, ids=lambda f: f.__name__[2:])
def test_model_against_dense_reference(make):
    model, loss_func, X, y = _build(make)
    H, refused = _operator_in_use_order(model, loss_func, X, y)
    # the traced route, except plain Sequentials of registered modules (per-layer closed forms)
    plain = hessinv.trace._plain_sequential(model)
    assert all((st.structure is not None) == plain for st in H.pipeline.stages)
    names = _flat_names(H)
    default = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(names) == sorted(default)
    # a model is refused (never silently reordered) exactly when the orders differ
    assert (names != default) == refused
    h_ref, g_ref = _reference(model, loss_func, X, y, names)
    _check_against(H, h_ref, g_ref)


def test_articulation_points_give_one_stage_per_block():
    model, loss_func, X, y = _build(m_resmlp)
    H = hessinv.Hessian(model, loss_func, X, y)
    # tanh(inp x) | three residual blocks | out + loss
    assert [st.num_params for st in H.pipeline.stages] == [16, 40, 40, 40, 10]
    model, loss_func, X, y = _build(m_gated_ln)
    stages = _operator_in_use_order(model, loss_func, X, y)[0].pipeline.stages
    # inp | the gated block (LN, a, b) | F.layer_norm(g) | out + loss
    assert [len(st.params) for st in stages] == [2, 6, 1, 2]


@pytest.mark.parametrize("make", [m_resmlp, m_gated_ln, m_embed_conv], ids=["res", "gated", "emb"])
def test_params_subset(make):
    """Weights only (splitting modules: the traced route), in named order and as a dict."""
    model, loss_func, X, y = _build(make)
    ps = dict(model.named_parameters())
    order = _flat_names(_operator_in_use_order(model, loss_func, X, y)[0])
    sel = {n: ps[n] for n in order if not n.endswith("bias")}
    h_ref, g_ref = _reference(model, loss_func, X, y, names=list(sel))
    _check_against(hessinv.Hessian(model, loss_func, X, y, params=list(sel.values())), h_ref, g_ref)
    _check_against(hessinv.Hessian(model, loss_func, X, y, params=sel), h_ref, g_ref)


def test_params_subset_sequential_keeps_fast_path():
    """Whole modules of a plain Sequential: structured stages, frozen modules become constants."""
    g = torch.Generator().manual_seed(1)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    m = m.to(DT)
    X, y = _reg(4, 3, 2, g)
    sel = [m[2].weight, m[2].bias, m[4].weight, m[4].bias]
    H = hessinv.Hessian(m, nn.MSELoss(), X, y, params=sel)
    assert all(st.structure is not None for st in H.pipeline.stages)
    names = ["2.weight", "2.bias", "4.weight", "4.bias"]
    _check_against(H, *_reference(m, nn.MSELoss(), X, y, names=names))
    # within one module in another order: the traced route honours it
    sel2 = [m[2].bias, m[2].weight]
    H2 = hessinv.Hessian(m, nn.MSELoss(), X, y, params=sel2)
    assert all(st.structure is None for st in H2.pipeline.stages)
    _check_against(H2, *_reference(m, nn.MSELoss(), X, y, names=["2.bias", "2.weight"]))


def test_plain_sequential_unchanged():
    """A Sequential of known modules still takes the structured route."""
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    X, y = _reg(3, 3, 2, torch.Generator().manual_seed(0))
    H = hessinv.Hessian(m, nn.MSELoss(), X, y)
    assert all(st.structure is not None for st in H.pipeline.stages)


def test_shared_module_merges_stages():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.mid, self.b = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.b(torch.tanh(self.a(torch.tanh(self.mid(torch.tanh(self.a(x)))))))

    model, X, y = Twice().to(DT), *_reg(4, 3, 2, torch.Generator().manual_seed(0))
    H = hessinv.Hessian(model, nn.MSELoss(), X, y)
    assert len(H.pipeline.stages) == 2  # a, mid, a merged; then b
    _check_against(H, *_reference(model, nn.MSELoss(), X, y))


def test_no_articulation_point_warns_one_stage():
    class Parallel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            return torch.tanh(self.a(x)) * self.b(x)

    model, X, y = Parallel().to(DT), *_reg(4, 3, 2, torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="one stage"):
        H = hessinv.Hessian(model, nn.MSELoss(), X, y)
    assert len(H.pipeline.stages) == 1
    _check_against(H, *_reference(model, nn.MSELoss(), X, y))


def test_params_order_and_membership_refused():
    model, loss_func, X, y = _build(m_resmlp)
    ps = dict(model.named_parameters())
    with pytest.raises(ValueError, match="in the order"):
        hessinv.Hessian(model, loss_func, X, y, params=[ps["out.weight"], ps["inp.weight"]])
    with pytest.raises(ValueError, match="not a parameter of the model"):
        hessinv.Hessian(model, loss_func, X, y, params=[torch.zeros(3, dtype=DT)])
    with pytest.raises(ValueError, match="twice"):
        hessinv.Hessian(model, loss_func, X, y, params=[ps["inp.weight"], ps["inp.weight"]])
    with pytest.raises(ValueError, match="not 'x'"):
        hessinv.Hessian(model, loss_func, X, y, params={"x": ps["inp.weight"]})
    with pytest.raises(ValueError, match="empty"):
        hessinv.Hessian(model, loss_func, X, y, params=[])


def test_tied_weights_refused():
    model, loss_func, X, y = _build(m_resmlp)
    model.blocks[1][0].weight = model.blocks[0][0].weight
    with pytest.raises(ValueError, match="tied weights"):
        hessinv.Hessian(model, loss_func, X, y)
    seq = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3)).to(DT)
    seq[2].weight = seq[0].weight
    with pytest.raises(ValueError, match="tied weights"):
        hessinv.Hessian(seq, nn.MSELoss(), X, torch.randn(5, 3, dtype=DT))


class Centre(nn.Module):
    """``h - h.mean(0)``: mixes samples, in the first stage or (``late``) in the second."""

    def __init__(self, late: bool) -> None:
        super().__init__()
        self.late = late
        self.a, self.c, self.b = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.late:
            h = torch.tanh(self.c(h))
        return self.b(h - h.mean(0, keepdim=True))


def test_mixing_inside_traced_graph_refused():
    X, y = _reg(4, 3, 2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="stage 1 of the traced model mixes samples"):
        hessinv.Hessian(Centre(late=True).to(DT), nn.MSELoss(), X, y)


def test_mixing_in_first_stage_is_exact():
    """The first stage's blocks are full batch Jacobians: mixing there is harmless."""
    model = Centre(late=False).to(DT)
    model.c.requires_grad_(False)  # unused by forward
    X, y = _reg(4, 3, 2, torch.Generator().manual_seed(0))
    H = hessinv.Hessian(model, nn.MSELoss(), X, y)
    _check_against(H, *_reference(model, nn.MSELoss(), X, y, _flat_names(H)))


@pytest.mark.parametrize(
    "module, match",
    [
        (nn.BatchNorm1d(3), "training mode"),
        (nn.Dropout(0.3), "training mode"),
        (nn.InstanceNorm1d(3, affine=True), "instance_norm"),
        (nn.MultiheadAttention(3, 1, batch_first=True), "could not trace module"),
    ],
    ids=["batchnorm", "dropout", "instancenorm", "mha"],
)
def test_refusals_inside_classes(module, match):
    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.m, self.b = nn.Linear(3, 3), module, nn.Linear(3, 2)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            if isinstance(self.m, nn.MultiheadAttention):
                return self.b(self.m(h, h, h)[0])
            if isinstance(self.m, nn.InstanceNorm1d):
                return self.b(self.m(h.unsqueeze(-1)).squeeze(-1))
            return self.b(self.m(h))

    X, y = _reg(4, 3, 2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=match):
        hessinv.Hessian(Wrap().to(DT), nn.MSELoss(), X, y)


def test_untraceable_control_flow_refused():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 2)

        def forward(self, x):
            return self.a(x) if x.sum() > 0 else self.a(-x)

    X, y = _reg(4, 3, 2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="torch.fx could not trace module .*Branchy"):
        hessinv.Hessian(Branchy().to(DT), nn.MSELoss(), X, y)


def test_batchnorm_eval_in_class_accepted():
    class BN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.bn, self.b = nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)

        def forward(self, x):
            return self.b(torch.tanh(self.bn(self.a(x))))

    model = BN().to(DT)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    model.eval()
    X, y = _reg(4, 3, 2, torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        H = hessinv.Hessian(model, nn.MSELoss(), X, y)
    _check_against(H, *_reference(model, nn.MSELoss(), X, y))


@pytest.mark.parametrize("c", [1e-12, 1.0, 1e12])
def test_mixing_check_follows_loss_scale(c):
    """loss * c: the mixing stage is refused and a clean model accepted, at every c."""
    X, y = _reg(4, 3, 2, torch.Generator().manual_seed(0))

    def loss(out, t):
        return c * F.mse_loss(out, t)

    with pytest.raises(ValueError, match="mixes samples"):
        hessinv.Hessian(Centre(late=True).to(DT), loss, X, y)

    class LateCentreInLoss(nn.Module):  # the mixing op in the last (loss) stage
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            h = self.b(torch.tanh(self.a(x)))
            return h * h.sum(0, keepdim=True)

    with pytest.raises(ValueError, match="stage 1 of the traced model mixes samples"):
        hessinv.Hessian(LateCentreInLoss().to(DT), loss, X, y)
    model, _, X2, y2 = _build(m_resmlp)
    H = hessinv.Hessian(model, loss, X2, y2)
    assert len(H.pipeline.stages) == 5


def test_embedding_max_norm_refused():
    m = nn.Sequential(nn.Embedding(5, 2, max_norm=1.0), nn.Flatten(), nn.Linear(6, 2)).to(DT)
    X = torch.randint(0, 5, (4, 3))
    with pytest.raises(ValueError, match="max_norm"):
        hessinv.Hessian(m, nn.MSELoss(), X, torch.randn(4, 2, dtype=DT))


def test_subclass_of_leaf_module_traced_through():
    """A user subclass of nn.Linear with its own forward runs that forward, not Linear's."""

    class Doubled(nn.Linear):
        def forward(self, x):
            return 2.0 * super().forward(x) + self.weight.sum()

    model = nn.Sequential(Doubled(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    X, y = _reg(4, 3, 2, torch.Generator().manual_seed(0))
    H = hessinv.Hessian(model, nn.MSELoss(), X, y)
    assert all(st.structure is None for st in H.pipeline.stages)
    _check_against(H, *_reference(model, nn.MSELoss(), X, y, _flat_names(H)))
