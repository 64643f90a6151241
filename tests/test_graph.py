import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from normkit.graph import LayerKind, OpKind, UntraceableModelError, trace
from normkit.nn import BatchRenorm2d


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)
    )


def test_mlp_order_edges_and_normalization():
    g = trace(mlp())
    assert [n.name for n in g] == ["0", "2", "3", "5"]
    assert [n.kind for n in g] == [LayerKind.LINEAR, LayerKind.LINEAR, LayerKind.NORM, LayerKind.LINEAR]
    (edge,) = g["0"].consumers
    assert edge.dst == "2" and [op.kind for op in edge.ops] == [OpKind.SCALE_COMMUTING]
    assert g["0"].producers[0].src is None  # reads the model input
    assert g["5"].consumers[0].dst is None  # feeds the model output
    assert g.feeds_normalization("2") and g.feeds_normalization("2", per_channel=True)
    assert not g.feeds_normalization("0")
    # ReLU between a layer and BN is allowed only when asked for.
    assert not g.feeds_normalization("0", through={OpKind.IDENTITY, OpKind.SCALE_COMMUTING})


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.bn = BatchRenorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = F.avg_pool2d(F.relu(self.bn(self.conv2(x))), 2)
        return self.fc(x.view(x.size(0), -1))


def test_conv_pool_flatten_shapes():
    g = trace(ConvNet(), torch.randn(2, 3, 16, 16))
    assert [n.name for n in g] == ["conv1", "conv2", "bn", "fc"]  # pooling is an operation, not a layer
    (edge,) = g["conv1"].consumers
    assert edge.dst == "conv2"
    assert [op.kind for op in edge.ops] == [OpKind.SCALE_COMMUTING, OpKind.SCALE_COMMUTING]
    assert edge.ops[1].module is g.model.pool
    (to_fc,) = g["bn"].consumers
    assert [op.kind for op in to_fc.ops] == [OpKind.SCALE_COMMUTING, OpKind.SCALE_COMMUTING, OpKind.RESHAPE]
    assert to_fc.ops[-1].shape == (2, 96)  # the size() call is metadata, not a path
    assert g["conv2"].output_shape == (2, 6, 8, 8)
    assert g.feeds_normalization("conv2", per_channel=True)  # BatchRenorm counts as normalization


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.stem = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.head(F.relu(x + y))


def test_residual_block_tied_add():
    g = trace(Residual())
    stem_edges = {e.dst: e for e in g["stem"].consumers}
    assert set(stem_edges) == {"conv1", "head"}
    assert [op.kind for op in stem_edges["head"].ops] == [OpKind.ADD, OpKind.SCALE_COMMUTING]
    (bn2_edge,) = g["bn2"].consumers
    # Both paths go through the same add node: that is how ENorm sees the tied channels.
    assert bn2_edge.ops[0].name == stem_edges["head"].ops[0].name
    assert {stem_edges["head"].ops[0].input_index, bn2_edge.ops[0].input_index} == {0, 1}
    assert not g.feeds_normalization("stem")  # also feeds the add
    assert g.feeds_normalization("conv1") and g.feeds_normalization("conv2")


class Reordered(nn.Module):
    """Defines its layers in the reverse of the order it runs them."""

    def __init__(self) -> None:
        super().__init__()
        self.last = nn.Linear(8, 2)
        self.middle = nn.Linear(8, 8)
        self.first = nn.Linear(4, 8)

    def forward(self, x):
        return self.last(torch.relu(self.middle(torch.relu(self.first(x)))))


def test_execution_order_not_registration_order():
    assert [name for name, _ in Reordered().named_children()] == ["last", "middle", "first"]
    g = trace(Reordered())
    assert [n.name for n in g.execution_order()] == ["first", "middle", "last"]


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.block = nn.Linear(8, 8)
        self.out = nn.Linear(8, 1)

    def forward(self, x):
        x = self.inp(x)
        x = self.block(torch.relu(self.block(torch.relu(x))))
        return self.out(x)


def test_shared_module_counts_calls():
    g = trace(Shared())
    assert g["block"].calls == 2
    assert [n.name for n in g] == ["inp", "block", "out"]
    assert {(e.src, e.src_call, e.dst_call) for e in g["block"].producers} == {("inp", 0, 0), ("block", 0, 1)}


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4)
        self.a = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
            x = -x
        return self.a(torch.relu(self.norm(self.b(x))))


def test_untraceable_model_error_and_hook_fallback():
    with pytest.raises(UntraceableModelError, match="example_input"):
        trace(Untraceable())
    with pytest.raises(UntraceableModelError, match="could not trace"):
        trace(Untraceable(), torch.randn(3, 4), fallback=False)
    model = Untraceable().train()
    g = trace(model, torch.randn(3, 4))
    assert not g.traced
    assert [n.name for n in g] == ["b", "norm", "a"]
    assert g.feeds_normalization("b") and not g.feeds_normalization("norm")
    assert model.training and int(model.norm.num_batches_tracked) == 0  # the probe forward left no trace
    with pytest.raises(UntraceableModelError, match="Untraceable"):
        g.edges()


def test_shape_propagation_leaves_running_stats_alone():
    model = mlp().train()
    trace(model, torch.randn(5, 4))
    assert model.training
    assert torch.equal(model[3].running_mean, torch.zeros(8)) and int(model[3].num_batches_tracked) == 0


def test_other_parametric_layers_and_wrappers():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2))
    g = trace(nn.parallel.DataParallel(model))  # wrappers are looked through
    assert [n.kind for n in g] == [LayerKind.OTHER, LayerKind.LINEAR]
    assert g["2"].producers[0].ops[0].kind is OpKind.RESHAPE


# --- modules that own parameters, functional calls on module weights, attention --------------------------


class ScaledBlock(nn.Module):
    """ConvNeXt-style: a module with a parameter of its own (layer scale) around layers it calls."""

    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((8,), 0.1))
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)

    def forward(self, x):
        return x + self.gamma * self.fc2(F.gelu(self.fc1(x)))


def test_modules_owning_a_parameter_are_traced_into():
    model = nn.Sequential(nn.Linear(4, 8), ScaledBlock(), nn.Linear(8, 2))
    g = trace(model)
    assert [n.name for n in g] == ["0", "1.fc1", "1.fc2", "2"]  # before: "1" was one opaque layer
    (edge,) = g["1.fc1"].consumers
    assert edge.dst == "1.fc2"


class FunctionalAttention(nn.Module):
    """Swin-style: the forward uses its child layers' weights through F.linear, never calling them."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8)
        self.table = nn.Parameter(torch.zeros(3))

    def forward(self, x):
        q, k, v = F.linear(x, self.qkv.weight, self.qkv.bias).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(-2, -1) + self.table.sum(), dim=-1)
        return F.linear(a @ v, self.proj.weight, self.proj.bias)


class AttentionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.swin = FunctionalAttention()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 1, enable_nested_tensor=False
        )
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.swin(self.embed(x))
        h = h + self.mha(h, h, h, need_weights=False)[0]
        return self.head(self.encoder(h))


def test_functional_attention_and_opaque_layers_are_found_by_running():
    torch.manual_seed(0)
    model = AttentionNet()
    x = torch.randn(2, 6, 5)
    assert [n.name for n in trace(model)] == ["embed", "mha", "head"]  # fx alone sees no more
    g = trace(model, x, functional=True)
    names = [n.name for n in g]
    enc = "encoder.layers.0."
    assert names == [
        "embed",
        "swin.qkv",
        "swin.proj",
        "mha",
        "mha.in_proj_weight[q]",
        "mha.in_proj_weight[k]",
        "mha.in_proj_weight[v]",
        "mha.out_proj",
        enc + "self_attn.in_proj_weight[q]",
        enc + "self_attn.in_proj_weight[k]",
        enc + "self_attn.in_proj_weight[v]",
        enc + "self_attn.out_proj",
        enc + "linear1",
        enc + "linear2",
        "head",
    ]
    assert [n.order for n in g] == list(range(len(names)))
    assert g["swin.qkv"].functional and g["swin.qkv"].module is model.swin.qkv
    assert g["mha.in_proj_weight[k]"].rows == (8, 16) and g["mha.in_proj_weight[k]"].module is model.mha
    assert not g[enc + "linear1"].functional  # called as a module, inside a module fx keeps opaque
    # the added layers' surroundings are unknown: no claim that they feed a normalization layer
    assert not g.feeds_normalization(enc + "linear2")


class DenseNetLike(nn.Module):
    """DenseNet's pattern: new features concatenated to the old ones (channel axis) before a BatchNorm,
    a transition conv through average pooling, and a spatial concatenation that mixes statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.grow = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(8)
        self.trans = nn.Conv2d(8, 4, 1, bias=False)
        self.norm_t = nn.BatchNorm2d(4)
        self.grow2 = nn.Conv2d(4, 4, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(8)
        self.side = nn.Conv2d(3, 3, 1, bias=False)
        self.norm3 = nn.BatchNorm2d(3)

    def forward(self, x):
        a = self.stem(x)
        h = F.relu(self.norm(torch.cat([a, self.grow(a)], 1)))
        t = F.avg_pool2d(self.trans(h), 2)
        new = self.grow2(F.relu(self.norm_t(torch.cat([t], 1))))
        h2 = self.norm2(torch.cat([t, new], dim=-3))
        xp = F.avg_pool2d(x, 2)
        side = self.norm3(torch.cat([self.side(xp), xp], 2))  # a spatial concatenation
        return torch.cat([F.relu(h2).flatten(1), F.relu(side).flatten(1)], 1)


def test_concatenated_weights_feed_per_channel_normalization():
    torch.manual_seed(0)
    model = DenseNetLike()
    x = torch.randn(4, 3, 8, 8)
    g = trace(model, x)
    commuting = {OpKind.IDENTITY, OpKind.SCALE_COMMUTING}
    feeds = {
        n.name
        for n in g
        if n.kind is LayerKind.CONV and g.feeds_normalization(n.name, per_channel=True, through=commuting)
    }
    assert feeds == {"grow", "trans", "grow2"}
    # "stem" also reads into a later cat but is used by "grow" too; "side" meets other values on its channels
    # what the graph claims, checked on the function: train-mode output unchanged by positive row scales
    model = model.double().train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1e-30
    xd = x.double()
    base = model(xd)
    for n in g:
        if n.kind is not LayerKind.CONV:
            continue
        w = n.module.weight
        saved = w.detach().clone()
        with torch.no_grad():
            w.mul_(torch.rand(w.shape[0], 1, 1, 1, dtype=torch.float64) + 0.5)
        invariant = torch.allclose(model(xd), base, rtol=1e-9, atol=1e-12)
        with torch.no_grad():
            w.copy_(saved)
        assert invariant == (n.name in feeds), n.name


def test_linear_on_sequences_into_batchnorm1d_is_not_per_channel():
    # (N, L, F) into BatchNorm1d(L): the normalized channels are the L positions, not the linear's features
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(5))
    g = trace(model, torch.randn(6, 5, 4))
    assert g.feeds_normalization("0") and not g.feeds_normalization("0", per_channel=True)
    g2 = trace(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), torch.randn(6, 4))
    assert g2.feeds_normalization("0", per_channel=True)
