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
