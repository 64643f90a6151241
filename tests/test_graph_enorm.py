"""graph.py's channel bookkeeping: where a layer's output channels land in the next layer, additions that tie
layers together."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import StochasticDepth

from normkit.graph import (
    ChannelBlocks,
    ChannelPathError,
    channel_dim,
    channel_path,
    in_channels,
    out_channels,
    tied_sources,
    trace,
)


def _only_edge(g, src: str, dst: str):  # type: ignore[no-untyped-def]
    (edge,) = [e for e in g[src].consumers if e.dst == dst]
    return edge


def test_channel_dims_and_counts() -> None:
    assert channel_dim(nn.Linear(3, 4)) == -1
    assert channel_dim(nn.Conv1d(3, 4, 1)) == -2
    assert channel_dim(nn.Conv2d(3, 4, 1)) == -3
    assert channel_dim(nn.ConvTranspose3d(3, 4, 1)) == -4
    assert (
        in_channels(nn.ConvTranspose2d(6, 4, 1, groups=2)),
        out_channels(nn.ConvTranspose2d(6, 4, 1)),
    ) == (6, 4)
    with pytest.raises(TypeError):
        channel_dim(nn.BatchNorm1d(3))


def test_linear_chain_is_one_to_one() -> None:
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Dropout(), nn.Linear(5, 2))
    g = trace(model)
    path = channel_path(g, _only_edge(g, "0", "3"))
    assert path.blocks == ChannelBlocks(-1, 5) and path.adds == ()
    with pytest.raises(ChannelPathError, match="model output"):
        channel_path(g, g["3"].consumers[0])


class ConvFlatten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.fc(x.reshape(x.shape[0], -1))


def test_flatten_turns_a_channel_into_a_block() -> None:
    g = trace(ConvFlatten(), torch.randn(2, 3, 8, 8))
    path = channel_path(g, _only_edge(g, "conv", "fc"))
    assert path.blocks == ChannelBlocks(-1, 64, block=16, offset=0)
    g_no_shapes = trace(ConvFlatten())
    with pytest.raises(ChannelPathError, match="example input"):
        channel_path(g_no_shapes, _only_edge(g_no_shapes, "conv", "fc"))


class Unflatten(nn.Module):
    """A linear output viewed as an image: one feature is one pixel of a channel, not a whole channel."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2 * 4 * 4)
        self.conv = nn.Conv2d(2, 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.relu(self.fc(x)).view(-1, 2, 4, 4))


def test_unflatten_is_not_a_channel_map() -> None:
    g = trace(Unflatten(), torch.randn(2, 3))
    with pytest.raises(ChannelPathError, match="contiguous block"):
        channel_path(g, _only_edge(g, "fc", "conv"))


class PoolOverFeatures(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(3, 8), nn.Linear(4, 2), nn.Linear(4, 4)
        self.conv = nn.Conv1d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(F.max_pool1d(self.fc1(x), 2))  # pools across the features: mixes units
        y = self.fc3(self.conv(h[:, None].expand(-1, 4, -1)))  # linear on the conv's length axis
        return F.gelu(y)


def test_ops_across_channels_break_the_path() -> None:
    g = trace(PoolOverFeatures())
    with pytest.raises(ChannelPathError, match=r"max_pool1d.*channel dimension"):
        channel_path(g, _only_edge(g, "fc1", "fc2"))
    with pytest.raises(ChannelPathError, match="getitem: getitem takes part of the tensor"):
        channel_path(g, _only_edge(g, "fc2", "conv"))
    with pytest.raises(ChannelPathError, match="on dim -2"):
        channel_path(g, _only_edge(g, "conv", "fc3"))
    with pytest.raises(ChannelPathError, match="gelu"):
        channel_path(g, g["fc3"].consumers[0])


class Cat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 5, 1)
        self.c, self.d = nn.Conv2d(9, 2, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = F.relu(self.a(x)), F.relu(self.b(x))
        y = self.c(torch.cat([x[:, :0], a, b], dim=1))
        return y, self.d(torch.cat([a, a], dim=-1))  # along width: channels stay put


def test_concatenation_offsets() -> None:
    g = trace(Cat(), torch.randn(2, 3, 4, 4))
    assert channel_path(g, _only_edge(g, "a", "c")).blocks == ChannelBlocks(-3, 9, 1, 0)
    assert channel_path(g, _only_edge(g, "b", "c")).blocks == ChannelBlocks(-3, 9, 1, 4)
    assert channel_path(g, _only_edge(g, "a", "d")).blocks == ChannelBlocks(-3, 4, 1, 0)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.f1, self.f2, self.g1, self.head = (nn.Linear(4, 4) for _ in range(5))
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h + self.f2(F.relu(self.f1(h)))
        h = torch.add(h, self.bn(self.g1(h)), alpha=0.5)
        return self.head(F.relu(h + 1.0))


def test_additions_tie_their_operands() -> None:
    g = trace(Residual())
    sets = tied_sources(g)
    assert ("stem", "f2", "bn") in sets and (None,) in sets and ("f1",) in sets
    path = channel_path(g, _only_edge(g, "f2", "head"))
    assert [(j.input_index, j.n_inputs, j.has_scalar) for j in path.adds] == [
        (1, 2, False),
        (0, 2, False),
        (0, 1, True),
    ]
    stem_to_head = channel_path(g, _only_edge(g, "stem", "head"))
    assert [j.name for j in stem_to_head.adds] == [j.name for j in path.adds]  # the same addition nodes


class MyReLU(nn.ReLU):
    pass


class MyPool(nn.MaxPool1d):
    pass


def test_op_reach_from_the_class_hierarchy() -> None:
    model = nn.Sequential(
        nn.Conv1d(2, 3, 3), MyReLU(), MyPool(2), nn.Conv1d(3, 2, 1), MyReLU(), nn.Linear(4, 4)
    )
    g = trace(model)
    assert channel_path(g, _only_edge(g, "0", "3")).blocks == ChannelBlocks(-2, 3)
    model = nn.Sequential(nn.Linear(4, 6), MyPool(2), nn.Linear(3, 2))
    g = trace(model)
    with pytest.raises(ChannelPathError, match="channel dimension"):
        channel_path(g, _only_edge(g, "0", "2"))


class PermuteNet(nn.Module):
    """ConvNeXt / Swin style: channels-first conv, then channels-last linear layers after a permute; a
    transpose back; per-sample drop path on the way."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 5)
        self.conv1d = nn.Conv1d(5, 4, 1)
        self.drop_path = StochasticDepth(0.5, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.permute(F.relu(self.conv(x)), (0, 2, 3, 1))  # (N, H, W, 6)
        h = self.drop_path(self.fc(h))  # (N, H, W, 5)
        h = F.relu(h).flatten(1, 2).transpose(1, 2)  # (N, 5, H*W)
        return self.conv1d(h)


def test_channels_are_followed_through_permute_transpose_and_drop_path() -> None:
    torch.manual_seed(0)
    model = PermuteNet().double()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    g = trace(model, x)
    first = channel_path(g, _only_edge(g, "conv", "fc"))
    assert first.blocks == ChannelBlocks(-1, 6)
    second = channel_path(g, _only_edge(g, "fc", "conv1d"))
    assert second.blocks == ChannelBlocks(-2, 5)
    # what the paths claim, checked by the function itself (drop path on: per-sample masks, same seed)
    for src, dst in (("conv", "fc"), ("fc", "conv1d")):
        torch.manual_seed(1)
        before = model(x)
        d = torch.rand(out_channels(getattr(model, src)), dtype=torch.float64) + 0.5
        with torch.no_grad():
            getattr(model, src).weight.mul_(d.view(-1, *[1] * (getattr(model, src).weight.dim() - 1)))
            getattr(model, src).bias.mul_(d)
            w = getattr(model, dst).weight
            w.div_(d.view(1, -1, *[1] * (w.dim() - 2)))
        torch.manual_seed(1)
        assert torch.allclose(model(x), before, rtol=0, atol=1e-12)


def test_a_permute_that_moves_channels_off_the_next_layers_axis_is_refused() -> None:
    class Wrong(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.fc = nn.Linear(5, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(x).permute(0, 1, 3, 2))  # channels stay on dim 1; fc reads the last

    g = trace(Wrong(), torch.randn(2, 3, 5, 5))
    with pytest.raises(ChannelPathError, match="not on its channel dim"):
        channel_path(g, _only_edge(g, "conv", "fc"))
