"""The one structural analysis of a model, shared by ENorm, LSUV and the Grassmann optimizers.

`trace(model)` runs `torch.fx` symbolic tracing with every known layer as a leaf and returns a
:class:`ModelGraph`: the layers (linear, conv, transposed conv, normalization, other parametric leaves) in
execution order, and for each one the :class:`Edge` s that connect it to the layers it reads from and feeds,
with the operations found in between (activations, pooling, reshapes, additions, concatenations ...).

When fx cannot trace a model (data-dependent control flow, say) and an example input is given, a hooked
forward pass gives the execution order and the *direct* layer-to-layer edges (a layer whose input is the
very tensor another layer returned); ``ModelGraph.traced`` is then False and questions that need the
operations between layers raise :class:`UntraceableModelError`.

Sharded models (FSDP2 ``fully_shard``, DTensor parameters) are traced as they are: blocks wrapped by
``fully_shard`` are traced through their ``forward`` (their hooks would all-gather), and shapes are
propagated on the meta device with every parameter and buffer swapped for a meta tensor of its global shape,
so no DTensor meets a plain tensor and no rank communicates. The hook-based fallback runs the real forward
(a collective under FSDP: call it on every rank).
"""

from __future__ import annotations

import contextlib
import enum
import operator
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp
from torch.overrides import TorchFunctionMode

__all__ = [
    "AddJoin",
    "ChannelBlocks",
    "ChannelPath",
    "ChannelPathError",
    "Edge",
    "LayerKind",
    "LayerNode",
    "ModelGraph",
    "Op",
    "OpKind",
    "ParamIndex",
    "UntraceableModelError",
    "WeightCalls",
    "add_functional_layers",
    "attention_layer_names",
    "attention_projections",
    "call_weight_and_bias",
    "channel_dim",
    "channel_path",
    "functional_layer_name",
    "functional_units",
    "has_hidden_weights",
    "in_channels",
    "inspection_mode",
    "is_normalization",
    "is_per_channel_normalization",
    "layer_kind",
    "no_fused_attention",
    "out_channels",
    "tied_sources",
    "trace",
    "unwrap_model",
    "weight_function_kind",
    "weight_holders",
]


class UntraceableModelError(RuntimeError):
    """The model could not be traced by torch.fx and the question needs the traced graph."""


class LayerKind(enum.Enum):
    LINEAR = "linear"
    CONV = "conv"
    CONV_TRANSPOSE = "conv_transpose"
    NORM = "norm"
    OTHER = "other"  # a leaf module with parameters we do not model (Embedding, LSTM, attention ...)


class OpKind(enum.Enum):
    IDENTITY = "identity"  # dropout, nn.Identity, contiguous, clone, type casts
    SCALE_COMMUTING = "scale_commuting"  # f(s*x) = s*f(x) per channel, s > 0: ReLU, pooling, zero padding
    RESHAPE = "reshape"  # flatten, view, reshape: channels become blocks of features
    PERMUTE = "permute"  # permute, transpose: the channel axis moves to another position
    ADD = "add"
    CAT = "cat"
    OTHER = "other"


_LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear,)
_CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T_TYPES: tuple[type[nn.Module], ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_PER_CHANNEL_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
)
_GROUP_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.GroupNorm,
    nn.LayerNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def _renorm_types() -> tuple[type[nn.Module], ...]:
    from normkit.nn.batchrenorm import _BatchRenormBase  # local: normkit.nn never imports graph

    return (_BatchRenormBase,)


def is_per_channel_normalization(module: nn.Module) -> bool:
    """BatchNorm, InstanceNorm and Batch Renormalization: each channel normalized on its own."""
    return isinstance(module, _PER_CHANNEL_NORM_TYPES + _renorm_types())


def is_normalization(module: nn.Module) -> bool:
    """Any normalization layer: the per-channel ones, GroupNorm, LayerNorm, RMSNorm."""
    return is_per_channel_normalization(module) or isinstance(module, _GROUP_NORM_TYPES)


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The kind of a module as a graph node, or None when it is an operation (activation, pooling ...)."""
    if isinstance(module, _LINEAR_TYPES):
        return LayerKind.LINEAR
    if isinstance(module, _CONV_T_TYPES):
        return LayerKind.CONV_TRANSPOSE
    if isinstance(module, _CONV_TYPES):
        return LayerKind.CONV
    if is_normalization(module):
        return LayerKind.NORM
    if isinstance(module, nn.PReLU):
        return None  # an activation, even though it has a parameter
    if any(True for _ in module.parameters(recurse=False)):
        return LayerKind.OTHER
    return None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module behind DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


# --- operation classification ----------------------------------------------------------------------------

_IDENTITY_MODULES: tuple[type[nn.Module], ...] = (nn.Identity, nn.modules.dropout._DropoutNd)
_SCALE_COMMUTING_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.padding._ReflectionPadNd,
    nn.modules.padding._ReplicationPadNd,
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ZeroPad3d,
)
_RESHAPE_MODULES: tuple[type[nn.Module], ...] = (nn.Flatten, nn.Unflatten)

_IDENTITY_FUNCTIONS: set[Any] = {
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    torch.clone,
}
_SCALE_COMMUTING_FUNCTIONS: set[Any] = {
    F.relu,
    torch.relu,
    F.leaky_relu,
    F.prelu,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
}
_RESHAPE_FUNCTIONS: set[Any] = {torch.flatten, torch.reshape}
_ADD_FUNCTIONS: set[Any] = {operator.add, operator.iadd, torch.add}
_CAT_FUNCTIONS: set[Any] = {torch.cat, torch.concat}

_PERMUTE_FUNCTIONS: set[Any] = {torch.permute, torch.transpose, torch.swapaxes, torch.swapdims}
_PERMUTE_METHODS = {"permute", "transpose", "swapaxes", "swapdims"}
# Per-sample drop (stochastic depth / drop path) multiplies each sample by 0 or 1/(1 - p): like dropout, it
# acts on all channels alike. Recognized by name, so the core imports neither torchvision nor timm.
_DROP_PATH_FUNCTIONS = {
    ("torchvision.ops.stochastic_depth", "stochastic_depth"),
    ("timm.layers.drop", "drop_path"),
}


def _is_drop_path(fn: Any) -> bool:
    return (getattr(fn, "__module__", None), getattr(fn, "__name__", None)) in _DROP_PATH_FUNCTIONS


_IDENTITY_METHODS = {"contiguous", "clone", "float", "double", "half", "bfloat16", "to", "type_as", "detach"}
_SCALE_COMMUTING_METHODS = {"relu", "relu_"}
_RESHAPE_METHODS = {"view", "reshape", "flatten"}
_ADD_METHODS = {"add", "add_"}
# Uses of a tensor that read only its metadata: they carry no data along a path.
_META_METHODS = {"size", "dim", "numel", "ndimension"}
_META_ATTRS = {"shape", "dtype", "device", "ndim"}


def _classify(node: fx.Node, modules: dict[str, nn.Module]) -> OpKind:
    if node.op == "call_module":
        mod = modules[str(node.target)]
        if isinstance(mod, _IDENTITY_MODULES):
            return OpKind.IDENTITY
        if isinstance(mod, _SCALE_COMMUTING_MODULES):
            return OpKind.SCALE_COMMUTING
        if isinstance(mod, _RESHAPE_MODULES):
            return OpKind.RESHAPE
        return OpKind.OTHER
    if node.op == "call_function":
        fn = node.target
        if fn in _IDENTITY_FUNCTIONS or _is_drop_path(fn):
            return OpKind.IDENTITY
        if fn in _PERMUTE_FUNCTIONS:
            return OpKind.PERMUTE
        if fn is F.pad:
            value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
            mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
            if mode != "constant" or not value:
                return OpKind.SCALE_COMMUTING
            return OpKind.OTHER
        if fn in _SCALE_COMMUTING_FUNCTIONS:
            return OpKind.SCALE_COMMUTING
        if fn in _RESHAPE_FUNCTIONS:
            return OpKind.RESHAPE
        if fn in _ADD_FUNCTIONS:
            return OpKind.ADD
        if fn in _CAT_FUNCTIONS:
            return OpKind.CAT
        return OpKind.OTHER
    if node.op == "call_method":
        name = str(node.target)
        if name in _IDENTITY_METHODS:
            return OpKind.IDENTITY
        if name in _SCALE_COMMUTING_METHODS:
            return OpKind.SCALE_COMMUTING
        if name in _RESHAPE_METHODS:
            return OpKind.RESHAPE
        if name in _PERMUTE_METHODS:
            return OpKind.PERMUTE
        if name in _ADD_METHODS:
            return OpKind.ADD
        return OpKind.OTHER
    return OpKind.OTHER


def _is_meta_use(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in _META_METHODS:
        return True
    return node.op == "call_function" and node.target is getattr and node.args[1] in _META_ATTRS


# --- the graph structure ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One operation on a path between two layers."""

    name: str  # the fx node's name (unique in the graph: tells apart two adds on different paths)
    kind: OpKind
    target: Any  # module type, function, or method name
    input_index: int  # position of the incoming tensor among the op's tensor inputs (block of a cat)
    module: nn.Module | None = None
    node: fx.Node | None = field(default=None, compare=False, repr=False)

    @property
    def shape(self) -> tuple[int, ...] | None:
        """Output shape of the op, when the graph was traced with an example input."""
        return _node_shape(self.node)


@dataclass(frozen=True)
class Edge:
    """A data path from ``src`` (layer name, None = the model input) to ``dst`` (None = the model output)."""

    src: str | None
    dst: str | None
    ops: tuple[Op, ...]
    src_call: int = 0  # which call of a module used more than once per forward
    dst_call: int = 0

    @property
    def direct(self) -> bool:
        """No operation on the path changes the values (at most dropout / identity / casts)."""
        return all(op.kind is OpKind.IDENTITY for op in self.ops)

    def kinds(self) -> set[OpKind]:
        return {op.kind for op in self.ops}


@dataclass
class LayerNode:
    """A layer of the model (a leaf module with parameters, or a normalization layer)."""

    name: str  # qualified module name, as in model.named_modules()
    module: nn.Module
    kind: LayerKind
    order: int  # position in execution order (first call)
    calls: int = 1  # how many times the module runs per forward
    producers: list[Edge] = field(default_factory=list)
    consumers: list[Edge] = field(default_factory=list)
    output_shape: tuple[int, ...] | None = None  # of the first call, when traced with an example input
    # A layer the forward computes by a functional call (F.linear / F.conv*) on a weight ``module`` owns,
    # never by calling ``module``: Swin's ``F.linear(x, self.qkv.weight)``, MultiheadAttention's projections.
    # Found by running an example input; ``param`` names the weight, ``rows`` the output rows it covers
    # (MultiheadAttention's packed ``in_proj_weight`` holds three projections: q, k, v).
    functional: bool = False
    param: str = "weight"
    rows: tuple[int, int] | None = None

    def __repr__(self) -> str:
        return f"LayerNode({self.name!r}, {self.kind.value}, order={self.order}, calls={self.calls})"


class ModelGraph:
    """Layers of a model in execution order, with the data paths between them."""

    def __init__(
        self,
        model: nn.Module,
        layers: list[LayerNode],
        *,
        traced: bool,
        graph_module: fx.GraphModule | None = None,
        trace_error: BaseException | None = None,
    ) -> None:
        self.model = model
        self.layers: dict[str, LayerNode] = {layer.name: layer for layer in layers}
        self.traced = traced
        self.graph_module = graph_module
        self.trace_error = trace_error

    def __iter__(self) -> Iterator[LayerNode]:
        return iter(self.layers.values())

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> LayerNode:
        try:
            return self.layers[name]
        except KeyError:
            raise KeyError(f"no layer named {name!r}; layers are {list(self.layers)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self.layers

    def __repr__(self) -> str:
        """A readable summary: the layers in execution order, where each one's output goes (through which
        operations), and the groups the techniques act on."""

        def op_name(op: Op) -> str:
            if op.module is not None:
                return type(op.module).__name__
            return getattr(op.target, "__name__", str(op.target))

        def module_text(module: nn.Module) -> str:
            weight = getattr(module, "weight", None)
            shape = f" {list(weight.shape)}" if isinstance(weight, torch.Tensor) else ""
            return type(module).__name__ + shape

        def destinations(layer: LayerNode) -> str:
            parts = []
            for edge in layer.consumers:
                via = " via " + ", ".join(op_name(op) for op in edge.ops) if edge.ops else ""
                parts.append(("output" if edge.dst is None else edge.dst) + via)
            return "; ".join(parts) or "-"

        how = (
            "torch.fx"
            if self.traced
            else f"a hooked forward pass (fx failed: {type(self.trace_error).__name__})"
        )
        lines = [f"ModelGraph of {type(self.model).__name__}: {len(self)} layers, from {how}"]
        rows = [
            (
                str(layer.order),
                layer.name or "(model)",
                layer.kind.value,
                module_text(layer.module),
                destinations(layer),
            )
            for layer in self
        ]
        header = ("#", "layer", "kind", "module [weight shape]", "feeds")
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
        for row in [header, *rows]:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[4])
        scale_invariant = [
            layer.name
            for layer in self
            if layer.kind in (LayerKind.LINEAR, LayerKind.CONV)
            and self.feeds_normalization(layer.name, per_channel=True)
        ]
        lines.append(
            "feed a per-channel normalization (scale-invariant): " + (", ".join(scale_invariant) or "none")
        )
        if self.traced:
            tied = [g for g in tied_sources(self) if len(g) > 1]
            text = " | ".join(", ".join("input" if n is None else n for n in g) for g in tied)
            lines.append("summed by residual additions: " + (text or "none"))
        return "\n".join(lines)

    def execution_order(self, kinds: Iterable[LayerKind] | None = None) -> list[LayerNode]:
        """Layers in the order the forward pass first runs them, optionally only some kinds."""
        wanted = set(kinds) if kinds is not None else None
        return [layer for layer in self.layers.values() if wanted is None or layer.kind in wanted]

    def edges(self) -> list[Edge]:
        """Every path, from the model input, between layers, and to the model output."""
        self._require_traced("list every edge")
        seen: list[Edge] = []
        for layer in self.layers.values():
            seen.extend(layer.producers)
        seen.extend(e for layer in self.layers.values() for e in layer.consumers if e.dst is None)
        return seen

    def feeds_normalization(
        self,
        name: str,
        *,
        per_channel: bool = False,
        through: Iterable[OpKind] = (OpKind.IDENTITY,),
    ) -> bool:
        """True when every output path of layer ``name`` ends in a normalization layer.

        Only operations of the kinds in ``through`` may stand on the paths (default: none that change values).
        With ``per_channel`` the normalization must normalize each channel on its own (BatchNorm, BatchRenorm,
        InstanceNorm): then a positive rescaling of one output unit's weights leaves the function unchanged.
        There a concatenation along the channel axis (dim 1, DenseNet's ``torch.cat(features, 1)``) counts as
        no operation: each concatenated channel stays a channel of its own.
        """
        layer = self[name]
        allowed = set(through)
        if not layer.consumers:
            return False
        if not self.traced and allowed != {OpKind.IDENTITY}:
            self._require_traced("follow operations between layers")
        shape = layer.output_shape
        if per_channel and layer.kind is LayerKind.LINEAR and shape is not None and len(shape) > 2:
            return False  # (N, L, F) into a BatchNorm1d: its channels are the L axis, not the features
        for edge in layer.consumers:
            if edge.dst is None:
                return False
            kinds = {op.kind for op in edge.ops if not (per_channel and _cat_along_channels(op))}
            if not kinds <= allowed:
                return False
            dst = self.layers[edge.dst].module
            ok = is_per_channel_normalization(dst) if per_channel else is_normalization(dst)
            if not ok:
                return False
        if not self.traced:
            # Only direct edges are visible without tracing; a layer with another, hidden use of its
            # output cannot be told apart, so the hook recorder records how often each output was used.
            return layer.name in self._fully_direct
        return True

    _fully_direct: frozenset[str] = frozenset()
    functional_run = False  # add_functional_layers found layers by running the model

    def _require_traced(self, what: str) -> None:
        if not self.traced:
            raise UntraceableModelError(
                f"cannot {what}: torch.fx could not trace {type(self.model).__name__} "
                f"({type(self.trace_error).__name__}: {self.trace_error}); the layer order came from a "
                "hooked forward pass, which shows only direct layer-to-layer connections. Pass the structure "
                "explicitly, or make the forward traceable by torch.fx."
            )


def weight_holders(graph: ModelGraph, weight: torch.Tensor) -> list[str | None]:
    """Every use of ``weight`` in the model: the name of each graph layer holding it as its weight (a tied /
    shared weight has several), and None for any other use (another parameter slot, a module the forward
    never calls, a direct read ``self.a.weight`` in the traced forward). A property of the weight, such as
    scale invariance, holds only if it holds at every use."""
    found: list[str | None] = []
    for name, module in graph.model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if p is not weight:
                continue
            layer = graph.layers.get(name)
            found.append(name if layer is not None and layer.param == pname and layer.rows is None else None)
    gm = graph.graph_module
    if gm is not None:
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                try:
                    value = gm.get_parameter(str(node.target))
                except AttributeError:
                    continue
                if value is weight:
                    found.append(None)
    return found


def _cat_along_channels(op: Op) -> bool:
    """A concatenation along dim 1, the channel axis of a per-channel normalization's input."""
    node = op.node
    if op.kind is not OpKind.CAT or node is None:
        return False
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    if not isinstance(dim, int):
        return False
    if dim < 0:
        shape = op.shape
        if shape is None:
            return False
        dim += len(shape)
    return dim == 1


# --- tracing ---------------------------------------------------------------------------------------------


class _LayerTracer(fx.Tracer):
    """Keeps every linear / conv / normalization layer and torch.nn module as a leaf. Other modules, also
    those owning a parameter of their own (ConvNeXt's layer scale, ViT's position embedding), are traced
    into, so the layers they call stay visible; with ``opaque_owners`` those are leaves too (the fallback
    when tracing into them fails)."""

    def __init__(self, extra_leaves: tuple[type[nn.Module], ...], opaque_owners: bool = False) -> None:
        super().__init__()
        self.extra_leaves = extra_leaves
        self.opaque_owners = opaque_owners

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        kind = layer_kind(m)
        if kind is not None and (kind is not LayerKind.OTHER or self.opaque_owners):
            return True
        if isinstance(m, self.extra_leaves):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        # Trace into an FSDP-wrapped block through its ``forward``, not its ``__call__``: FSDP's forward
        # hooks would all-gather its weights and mark it as a root of its own, which breaks the next forward.
        if _is_fsdp_module(m):
            forward = m.forward
        return super().call_module(m, forward, args, kwargs)


def _is_fsdp_module(module: nn.Module) -> bool:
    """An FSDP2 ``fully_shard`` module (matched by class name: the core does not import torch.distributed)."""
    return any(cls.__name__ == "FSDPModule" for cls in type(module).__mro__)


def _node_shape(node: fx.Node | None) -> tuple[int, ...] | None:
    if node is None:
        return None
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    flat: list[fx.Node] = []

    def visit(a: Any) -> None:
        if isinstance(a, fx.Node):
            flat.append(a)
        elif isinstance(a, (list, tuple)):
            for x in a:
                visit(x)
        elif isinstance(a, dict):
            for x in a.values():
                visit(x)

    visit(node.args)
    visit(node.kwargs)
    return flat


_MAX_PATHS = 100_000


def _build_from_fx(model: nn.Module, gm: fx.GraphModule) -> ModelGraph:
    modules = dict(model.named_modules())
    layer_of: dict[fx.Node, str] = {}
    call_index: dict[fx.Node, int] = {}
    layers: dict[str, LayerNode] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        name = str(node.target)
        kind = layer_kind(modules[name])
        if kind is None:
            continue
        layer_of[node] = name
        if name in layers:
            call_index[node] = layers[name].calls
            layers[name].calls += 1
        else:
            call_index[node] = 0
            layers[name] = LayerNode(
                name, modules[name], kind, order=len(layers), output_shape=_node_shape(node)
            )

    def walk(start: fx.Node, src: str | None, src_call: int) -> list[Edge]:
        found: list[Edge] = []
        stack: list[tuple[fx.Node, tuple[Op, ...]]] = [(start, ())]
        while stack:
            node, ops = stack.pop()
            for user in node.users:
                if _is_meta_use(user):
                    continue
                if user in layer_of:
                    found.append(Edge(src, layer_of[user], ops, src_call, call_index[user]))
                elif user.op == "output":
                    found.append(Edge(src, None, ops, src_call, 0))
                else:
                    module = modules.get(str(user.target)) if user.op == "call_module" else None
                    target: Any = type(module) if module is not None else user.target
                    index = _tensor_inputs(user).index(node)
                    op = Op(user.name, _classify(user, modules), target, index, module, user)
                    stack.append((user, (*ops, op)))
            if len(found) > _MAX_PATHS:
                raise UntraceableModelError(
                    f"more than {_MAX_PATHS} paths leave {src!r}: graph too entangled"
                )
        # Keep the order in which the graph lists the users (execution order), not the stack's.
        return found[::-1] if len(found) > 1 else found

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            edges = walk(node, None, 0)
        elif node in layer_of:
            edges = walk(node, layer_of[node], call_index[node])
        else:
            continue
        for edge in edges:
            if edge.src is not None:
                layers[edge.src].consumers.append(edge)
            if edge.dst is not None:
                layers[edge.dst].producers.append(edge)
    return ModelGraph(model, list(layers.values()), traced=True, graph_module=gm)


def _build_from_hooks(model: nn.Module, example_input: Any, error: BaseException) -> ModelGraph:
    modules = dict(model.named_modules())
    layers: dict[str, LayerNode] = {}
    produced: dict[int, tuple[str, int]] = {}  # id(output tensor) -> (layer, call)
    direct_uses: dict[str, int] = {}
    keep_alive: list[torch.Tensor] = []  # ids stay unique only while the tensors live

    def pre_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            kind = layer_kind(module)
            assert kind is not None
            node = layers.get(name)
            if node is None:
                node = layers[name] = LayerNode(name, module, kind, order=len(layers), calls=0)
            call = node.calls
            node.calls += 1
            if args and isinstance(args[0], torch.Tensor) and id(args[0]) in produced:
                src, src_call = produced[id(args[0])]
                edge = Edge(src, name, (), src_call, call)
                layers[src].consumers.append(edge)
                node.producers.append(edge)
                direct_uses[src] = direct_uses.get(src, 0) + 1

        return hook

    def post_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if isinstance(out, torch.Tensor):
                produced[id(out)] = (name, layers[name].calls - 1)
                keep_alive.append(out)
                if layers[name].output_shape is None:
                    layers[name].output_shape = tuple(out.shape)

        return hook

    handles = []
    for name, module in modules.items():
        if layer_kind(module) is not None:
            handles.append(module.register_forward_pre_hook(pre_hook(name)))
            handles.append(module.register_forward_hook(post_hook(name)))
    try:
        with inspection_mode(model):
            _call(model, example_input)
    finally:
        for h in handles:
            h.remove()
    graph = ModelGraph(model, list(layers.values()), traced=False, trace_error=error)
    # Without the data flow we cannot see non-layer uses of an output; we only claim "feeds normalization"
    # for a layer whose every call's output went straight into another layer.
    graph._fully_direct = frozenset(n for n, node in layers.items() if direct_uses.get(n, 0) >= node.calls)
    return graph


# --- layers computed by functional calls on a module's weight ---------------------------------------------

_WEIGHT_FUNCTIONS: dict[Any, LayerKind] = {
    F.linear: LayerKind.LINEAR,
    F.conv1d: LayerKind.CONV,
    F.conv2d: LayerKind.CONV,
    F.conv3d: LayerKind.CONV,
    F.conv_transpose1d: LayerKind.CONV_TRANSPOSE,
    F.conv_transpose2d: LayerKind.CONV_TRANSPOSE,
    F.conv_transpose3d: LayerKind.CONV_TRANSPOSE,
}


def weight_function_kind(func: Any) -> LayerKind | None:
    """The layer kind of a functional linear / conv call (``F.linear``, ``F.conv2d`` ...), else None."""
    return _WEIGHT_FUNCTIONS.get(func)


def call_weight_and_bias(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """The ``weight`` and ``bias`` arguments of a functional linear / conv call."""
    weight = args[1] if len(args) > 1 else kwargs.get("weight")
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    return weight, bias


class WeightCalls(TorchFunctionMode):
    """A torch function mode that hands every functional linear / conv call to ``handler(func, kind, args,
    kwargs)`` (which must compute and return the result) and runs everything else unchanged."""

    def __init__(self, handler: Callable[[Any, LayerKind, tuple[Any, ...], dict[str, Any]], Any]) -> None:
        super().__init__()
        self.handler = handler

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        kind = _WEIGHT_FUNCTIONS.get(func)
        if kind is None:
            return func(*args, **kwargs)
        return self.handler(func, kind, args, kwargs)


class ParamIndex:
    """Finds which module parameter a weight tensor is, or which rows of it (a row slice / chunk)."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = dict(model.named_modules())
        self._by_storage: dict[int, list[tuple[str, str, torch.Tensor]]] = {}
        for mname, module in self.modules.items():
            for pname, p in module.named_parameters(recurse=False):
                self._by_storage.setdefault(p.untyped_storage().data_ptr(), []).append((mname, pname, p))

    def resolve(self, w: Any) -> tuple[str, str, tuple[int, int]] | None:
        """(owner module name, parameter name, (first row, end row)) of weight ``w``, or None."""
        if not isinstance(w, torch.Tensor) or w.dim() < 1:
            return None
        for mname, pname, p in self._by_storage.get(w.untyped_storage().data_ptr(), ()):
            if w.shape[1:] != p.shape[1:] or w.stride() != p.stride():
                continue
            row = p.stride(0) if p.dim() > 1 else 1
            offset = w.storage_offset() - p.storage_offset()
            if offset < 0 or offset % row:
                continue
            r0 = offset // row
            if r0 + w.shape[0] <= p.shape[0]:
                return mname, pname, (int(r0), int(r0 + w.shape[0]))
        return None


def attention_projections(module: nn.MultiheadAttention) -> list[tuple[str, tuple[int, int] | None]]:
    """The input projections of a ``nn.MultiheadAttention`` as (parameter, rows): q, k, v rows of the packed
    ``in_proj_weight``, or the separate ``q/k/v_proj_weight`` when key / value sizes differ."""
    e = module.embed_dim
    if module.in_proj_weight is not None:
        return [("in_proj_weight", (i * e, (i + 1) * e)) for i in range(3)]
    return [("q_proj_weight", None), ("k_proj_weight", None), ("v_proj_weight", None)]


def attention_layer_names(name: str, module: nn.MultiheadAttention) -> list[str]:
    """Names of the four projections of a ``nn.MultiheadAttention`` (q, k, v, out) as graph layers."""
    prefix = f"{name}." if name else ""
    e = module.embed_dim
    names = [
        functional_layer_name(name, module, p, rows or (0, e), 3 * e if rows else e)
        for p, rows in attention_projections(module)
    ]
    return [*names, prefix + "out_proj"]


def functional_units(
    module: nn.Module, param: str, rows: tuple[int, int], n_rows: int
) -> list[tuple[int, int]]:
    """The row ranges of a parameter that count as separate layers within one call's rows:
    MultiheadAttention's packed ``in_proj_weight`` is three projections (q, k, v); else the call's rows."""
    if isinstance(module, nn.MultiheadAttention) and param == "in_proj_weight":
        third = n_rows // 3
        return [(a, a + third) for a in (0, third, 2 * third) if rows[0] <= a and a + third <= rows[1]]
    return [rows]


def functional_layer_name(
    owner: str, module: nn.Module, param: str, rows: tuple[int, int], n_rows: int
) -> str:
    """Report name of a layer computed from (rows of) a module's parameter."""
    prefix = f"{owner}." if owner else ""
    if param == "weight" and layer_kind(module) in _CHANNEL_LAYER_KINDS and rows == (0, n_rows):
        return owner
    if isinstance(module, nn.MultiheadAttention) and param == "in_proj_weight":
        return f"{prefix}{param}[{'qkv'[3 * rows[0] // n_rows]}]"
    if rows == (0, n_rows):
        return prefix + param
    return f"{prefix}{param}[{rows[0]}:{rows[1]}]"


@contextlib.contextmanager
def no_fused_attention() -> Iterator[None]:
    """Turn off the fused fast path of ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` (taken in
    eval mode without grad), so their projections run as ``F.linear`` calls that can be seen."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def has_hidden_weights(graph: ModelGraph) -> bool:
    """Whether the model holds a weight (a parameter of 2 or more dims) that no layer of ``graph`` owns, or a
    ``nn.MultiheadAttention``: then only running it (:func:`add_functional_layers`) shows where it is used."""
    owned = {id(p) for layer in graph for p in layer.module.parameters()}
    for module in graph.model.modules():
        if isinstance(module, nn.MultiheadAttention) and not any(
            layer.module is module and layer.functional for layer in graph
        ):
            return True
    return any(p.dim() >= 2 and id(p) not in owned for p in graph.model.parameters())


def add_functional_layers(graph: ModelGraph, example_input: Any) -> ModelGraph:
    """Run ``example_input`` once and add the linear / conv computations the graph does not show: layers
    called inside modules fx keeps opaque (``nn.TransformerEncoder``), and functional calls on a module weight
    (``F.linear(x, self.qkv.weight)``, MultiheadAttention's projections). Layers are then renumbered in the
    order this forward runs them. The added layers have no edges: what surrounds them is not known."""
    model = graph.model
    if graph.functional_run or not has_hidden_weights(graph):
        return graph
    index = ParamIndex(model)
    modules = index.modules
    seen: list[str] = []  # first-call order of every layer, old and new
    added: dict[str, LayerNode] = {}
    running: list[nn.Module] = []  # linear / conv modules whose forward is running

    def on_call(func: Any, kind: LayerKind, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        out = func(*args, **kwargs)
        weight, _ = call_weight_and_bias(args, kwargs)
        found = index.resolve(weight)
        if found is None:
            return out
        owner, param, rows = found
        module = modules[owner]
        n_rows = int(getattr(module, param).shape[0])
        by_module = bool(running) and running[-1] is module and param == "weight"
        if by_module and owner in graph.layers:
            return out
        for unit in functional_units(module, param, rows, n_rows):
            name = functional_layer_name(owner, module, param, unit, n_rows)
            node = added.get(name)
            if node is None:
                full = unit == (0, n_rows)
                node = added[name] = LayerNode(
                    name,
                    module,
                    kind,
                    order=0,
                    calls=0,
                    functional=not by_module,
                    param=param,
                    rows=None if full and param == "weight" else unit,
                )
                seen.append(name)
            node.calls += 1
        return out

    def add(name: str, module: nn.Module, kind: LayerKind, param: str, rows: tuple[int, int] | None) -> None:
        node = added.get(name)
        if node is None:
            node = added[name] = LayerNode(
                name, module, kind, order=0, calls=0, functional=True, param=param, rows=rows
            )
            seen.append(name)
        node.calls += 1

    def pre(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            if layer_kind(module) in _CHANNEL_LAYER_KINDS:
                running.append(module)
            if name in graph.layers and name not in first:
                first.add(name)
                seen.append(name)
            if isinstance(module, nn.MultiheadAttention):
                # its projections run inside F.multi_head_attention_forward, which a function mode cannot
                # look into: q, k, v before the call, out_proj (the last op, its output is the module's) after
                names = attention_layer_names(name, module)
                for (param, rows), unit in zip(attention_projections(module), names):
                    add(unit, module, LayerKind.LINEAR, param, rows)

        return hook

    def post(module: nn.Module, args: Any, out: Any) -> None:
        if running and running[-1] is module:
            running.pop()
        if isinstance(module, nn.MultiheadAttention):
            add(
                attention_layer_names(attention_names[id(module)], module)[3],
                module.out_proj,
                LayerKind.LINEAR,
                "weight",
                None,
            )

    attention_names = {id(m): n for n, m in modules.items() if isinstance(m, nn.MultiheadAttention)}

    first: set[str] = set()
    handles = []
    for name, module in modules.items():
        if layer_kind(module) is not None:
            handles.append(module.register_forward_pre_hook(pre(name)))
            handles.append(module.register_forward_hook(post))
    try:
        with inspection_mode(model), no_fused_attention(), WeightCalls(on_call):
            _call(model, example_input)
    finally:
        for h in handles:
            h.remove()
    graph.functional_run = True
    if not added:
        return graph
    rank = {name: i for i, name in enumerate(seen)}
    everything = {**graph.layers, **added}
    ordered = sorted(everything.values(), key=lambda n: rank.get(n.name, len(rank) + n.order))
    for i, node in enumerate(ordered):
        node.order = i
    graph.layers = {node.name: node for node in ordered}
    return graph


@contextlib.contextmanager
def inspection_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no_grad for a probing forward pass (running statistics untouched); every submodule's
    own train/eval flag is restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, flag in flags:
            m.training = flag


def _call(model: nn.Module, example_input: Any) -> Any:
    if isinstance(example_input, dict):
        return model(**example_input)
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    return model(example_input)


def trace(
    model: nn.Module,
    example_input: Any = None,
    *,
    leaf_modules: tuple[type[nn.Module], ...] = (),
    fallback: bool = True,
    functional: bool = False,
) -> ModelGraph:
    """Analyse ``model``'s structure.

    Args:
        model: the model (DDP / torch.compile wrappers are looked through; names are the inner model's).
        example_input: optional input (tensor, tuple of positional args, or dict of keyword args). With it the
            traced graph carries tensor shapes (``LayerNode.output_shape``, ``Op.shape``), and an untraceable
            model falls back to a hooked forward pass.
        leaf_modules: extra module types to keep opaque (never traced into).
        fallback: allow the hook-based fallback; when False an untraceable model raises.
        functional: also find, by running ``example_input``, the linear / conv computations fx does not show
            (:func:`add_functional_layers`): layers inside modules kept opaque (``nn.TransformerEncoder``),
            ``F.linear`` / ``F.conv*`` on a module's weight (Swin), ``nn.MultiheadAttention``'s projections.

    Raises:
        UntraceableModelError: fx cannot trace the model and no fallback is possible.
    """
    model = unwrap_model(model)
    try:
        try:
            tracer = _LayerTracer(leaf_modules)
            graph = tracer.trace(model)
        except Exception:
            tracer = _LayerTracer(leaf_modules, opaque_owners=True)
            graph = tracer.trace(model)
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as exc:
        if fallback and example_input is not None:
            hooked = _build_from_hooks(model, example_input, exc)
            return add_functional_layers(hooked, example_input) if functional else hooked
        raise UntraceableModelError(
            f"torch.fx could not trace {type(model).__name__} ({type(exc).__name__}: {exc}). "
            + (
                "Pass example_input= to get the execution order from a hooked forward pass instead."
                if fallback
                else "Symbolic tracing stopped at that error; trace(model, example_input) still gives the "
                "layer order from a hooked forward pass."
            )
        ) from exc
    if example_input is not None and not isinstance(example_input, dict):
        args = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
        with inspection_mode(model):
            if _has_dtensors(model):
                _meta_shape_prop(model, gm, tuple(args))
            else:
                ShapeProp(gm).propagate(*args)
    built = _build_from_fx(model, gm)
    if functional:
        if example_input is None:
            raise ValueError("trace(functional=True) runs the model: pass example_input=")
        return add_functional_layers(built, example_input)
    return built


def _has_dtensors(model: nn.Module) -> bool:
    from normkit._dtensor import is_dtensor

    return any(is_dtensor(t) for t in (*model.parameters(), *model.buffers()))


class _HooklessShapeProp(ShapeProp):
    """ShapeProp that calls FSDP-wrapped leaf modules' ``forward`` directly: their hooks would all-gather
    the real weights (a collective) and put them back on the module in place of the meta ones."""

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        submod = self.fetch_attr(target)
        if _is_fsdp_module(submod):
            return submod.forward(*args, **kwargs)
        return submod(*args, **kwargs)


def _meta_shape_prop(model: nn.Module, gm: fx.GraphModule, args: tuple[Any, ...]) -> None:
    """Shape propagation for a model with DTensor parameters (FSDP2, tensor parallel): every parameter and
    buffer is swapped for a meta tensor of its global shape for the run (restored after), the inputs are
    moved to the meta device, so no DTensor meets a plain tensor, nothing is computed and no rank talks to
    another. The shapes are those of the rank's own batch."""
    from torch.utils._pytree import tree_map

    def to_meta(t: Any) -> Any:
        if isinstance(t, torch.Tensor):
            return torch.empty(tuple(t.shape), dtype=t.dtype, device="meta")
        return t

    swapped: list[tuple[dict[str, Any], str, Any]] = []  # (module._parameters or _buffers, name, tensor)
    meta: dict[int, torch.Tensor] = {}
    for module in model.modules():
        stores: tuple[dict[str, Any], ...] = (module._parameters, module._buffers)
        for store in stores:
            for name, t in list(store.items()):
                if t is None:
                    continue
                swapped.append((store, name, t))
                store[name] = meta.setdefault(id(t), to_meta(t))
    try:
        _HooklessShapeProp(gm).propagate(*tree_map(to_meta, args))
    except Exception as exc:
        raise UntraceableModelError(
            f"shape propagation on the meta device failed for {type(model).__name__}, a model with DTensor "
            f"parameters ({type(exc).__name__}: {exc}). Trace the unsharded model (before fully_shard) and "
            "reuse its groups by parameter name, or trace without example_input."
        ) from exc
    finally:
        for store, name, t in reversed(swapped):
            store[name] = t


# --- channel bookkeeping along paths (used by ENorm; general structure) ----------------------------------

_CHANNEL_LAYER_KINDS = (LayerKind.LINEAR, LayerKind.CONV, LayerKind.CONV_TRANSPOSE)


def channel_dim(module: nn.Module) -> int:
    """Dimension of a linear / (transposed) conv layer's input and output that holds its channels, counted
    from the end (so it holds for batched and unbatched inputs): -1 for Linear, -(d + 1) for a d-dim conv."""
    if isinstance(module, _LINEAR_TYPES):
        return -1
    if isinstance(module, _CONV_TYPES + _CONV_T_TYPES):
        return -(len(module.kernel_size) + 1)  # type: ignore[arg-type]
    raise TypeError(f"{type(module).__name__} is not a linear or convolution layer")


def out_channels(module: nn.Module) -> int:
    """Number of output channels (features) of a linear / (transposed) conv layer."""
    if isinstance(module, _LINEAR_TYPES):
        return int(module.out_features)  # type: ignore[arg-type]
    return int(module.out_channels)  # type: ignore[arg-type]


def in_channels(module: nn.Module) -> int:
    """Number of input channels (features) of a linear / (transposed) conv layer."""
    if isinstance(module, _LINEAR_TYPES):
        return int(module.in_features)  # type: ignore[arg-type]
    return int(module.in_channels)  # type: ignore[arg-type]


class ChannelPathError(ValueError):
    """A path does not carry a layer's output channels to another layer's input channels unchanged."""


@dataclass(frozen=True)
class ChannelBlocks:
    """Where the source's channels lie on an axis: channel c covers positions
    ``offset + c*block ... offset + (c+1)*block - 1`` of dimension ``dim`` (counted from the end), of size
    ``size``."""

    dim: int
    size: int
    block: int = 1
    offset: int = 0


@dataclass(frozen=True)
class AddJoin:
    """An addition a channel path passes through: its fx node name, which operand the path is, how many
    tensor operands it has, whether it also adds a plain number, and where the channels are there."""

    name: str
    input_index: int
    n_inputs: int
    has_scalar: bool
    blocks: ChannelBlocks


@dataclass(frozen=True)
class ChannelPath:
    """An edge between two channel layers along which every op acts on each channel on its own and commutes
    with a positive per-channel scale (activations like ReLU, pooling, padding, dropout, reshapes that turn a
    channel into a block of features, concatenations, additions). ``blocks`` says where the source's output
    channels land among the destination's input channels; ``adds`` lists the additions on the way (their other
    operands must be scaled alike)."""

    edge: Edge
    blocks: ChannelBlocks
    adds: tuple[AddJoin, ...]


_ELEMENTWISE: set[Any] = {
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    F.relu,
    torch.relu,
    F.leaky_relu,
    F.prelu,
    "relu",
    "relu_",
}
_ALL_DIMS = 1 << 30  # an op whose reach we cannot tell: treat it as acting on every dimension


def _spatial_rank(op: Op) -> int | None:
    """How many trailing dims a pooling / padding op acts on; None for elementwise ops (ReLU, PReLU ...)."""
    classes = op.target.__mro__ if isinstance(op.target, type) else (op.target,)
    if any(target in _ELEMENTWISE for target in classes):
        return None
    node = op.node
    if node is not None and node.op == "call_function" and node.target is F.pad:
        pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
        return len(pad) // 2 if isinstance(pad, (list, tuple)) else _ALL_DIMS
    for target in classes:
        name = getattr(target, "__name__", str(target))
        for rank in (1, 2, 3):
            if name.endswith(f"{rank}d"):
                return rank
    return _ALL_DIMS


def _normalize_dim(dim: int, ndim: int) -> int:
    return dim - ndim if dim >= 0 else dim


def _input_shape(op: Op) -> tuple[int, ...] | None:
    if op.node is None:
        return None
    inputs = _tensor_inputs(op.node)
    return _node_shape(inputs[op.input_index]) if op.input_index < len(inputs) else None


def _through_reshape(blocks: ChannelBlocks, op: Op) -> ChannelBlocks:
    shape_in, shape_out = _input_shape(op), op.shape
    if shape_in is None or shape_out is None:
        raise ChannelPathError(
            f"{op.name}: a reshape needs tensor shapes to map channels to features; trace with an "
            "example input"
        )
    a = len(shape_in) + blocks.dim
    outer = 1
    for s in shape_in[:a]:
        outer *= s
    trail = 1
    for s in shape_in[a + 1 :]:
        trail *= s
    axis_total = shape_in[a] * trail
    prefix = 1
    for b, size in enumerate(shape_out):
        rest = 1
        for s in shape_out[b + 1 :]:
            rest *= s
        if (
            prefix == outer
            and size * rest == axis_total
            and (blocks.block * trail) % rest == 0
            and (blocks.offset * trail) % rest == 0
        ):
            return ChannelBlocks(
                b - len(shape_out), size, blocks.block * trail // rest, blocks.offset * trail // rest
            )
        prefix *= size
    raise ChannelPathError(
        f"{op.name}: reshape {tuple(shape_in)} -> {tuple(shape_out)} does not keep each channel a contiguous "
        "block of one dimension"
    )


def _through_permute(blocks: ChannelBlocks, op: Op) -> ChannelBlocks:
    """Follow the channel axis through permute / transpose (channels keep their blocks; the axis moves)."""
    node = op.node
    assert node is not None
    rest: list[Any] = [*node.args[1:], *node.kwargs.values()]
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    shape_in = _input_shape(op)
    if name == "permute":
        given = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
        ndim = len(given)
    else:
        given = list(rest[:2])
        ndim = len(shape_in) if shape_in is not None else 0
    if not all(isinstance(d, int) for d in given):
        raise ChannelPathError(f"{op.name}: {name} with non-constant dimensions")
    dims: list[int] = [int(d) for d in given]
    if ndim == 0 and any(d >= 0 for d in dims):
        raise ChannelPathError(
            f"{op.name}: {name} needs tensor shapes to follow the channels; trace with an example input"
        )
    axis = blocks.dim if ndim == 0 else blocks.dim + ndim
    dims = [d if ndim == 0 or d >= 0 else d + ndim for d in dims]
    if name == "permute":
        new = dims.index(axis)
    else:
        new = dims[1] if axis == dims[0] else dims[0] if axis == dims[1] else axis
    return ChannelBlocks(new - ndim if ndim else new, blocks.size, blocks.block, blocks.offset)


def _through_cat(blocks: ChannelBlocks, op: Op) -> ChannelBlocks:
    node = op.node
    assert node is not None
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    shape_out = op.shape
    if not isinstance(dim, int):
        raise ChannelPathError(f"{op.name}: concatenation along a non-constant dimension")
    if dim >= 0 and shape_out is None:
        raise ChannelPathError(
            f"{op.name}: a concatenation needs tensor shapes to place the channels; trace with an "
            "example input"
        )
    dim = _normalize_dim(dim, len(shape_out) if shape_out is not None else 0)
    if dim != blocks.dim:
        return blocks  # concatenation along another axis: channels stay where they are
    parts = node.args[0] if node.args else node.kwargs.get("tensors")
    assert isinstance(parts, (list, tuple))
    offset = 0
    for part in list(parts)[: op.input_index]:
        shape = _node_shape(part) if isinstance(part, fx.Node) else None
        if shape is None:
            raise ChannelPathError(
                f"{op.name}: a concatenation needs tensor shapes to place the channels; trace with an "
                "example input"
            )
        offset += shape[dim]
    size = shape_out[dim] if shape_out is not None else blocks.size + offset
    return ChannelBlocks(blocks.dim, size, blocks.block, blocks.offset + offset)


_PRODUCTS: set[Any] = {operator.mul, operator.imul, torch.mul, operator.truediv, torch.div, torch.true_divide}
_PRODUCT_METHODS = {"mul", "mul_", "div", "div_", "true_divide"}
_FACTOR_METHODS = {
    "view",
    "reshape",
    "unsqueeze",
    "to",
    "type_as",
    "expand_as",
    "flatten",
    "float",
    "contiguous",
}
_SPLITS = {"getitem", "chunk", "split", "unbind", "tensor_split", "narrow", "select", "index_select"}
_NOT_HOMOGENEOUS = {
    "gelu", "silu", "sigmoid", "tanh", "softmax", "log_softmax", "elu", "selu", "celu", "mish", "hardswish",
    "hardsigmoid", "hardtanh", "relu6", "softplus", "exp", "log", "sin", "cos", "layer_norm", "group_norm",
    "rms_norm", "batch_norm", "instance_norm", "normalize", "GELU", "SiLU", "Sigmoid", "Tanh", "Softmax",
    "LogSoftmax", "ELU", "SELU", "CELU", "Mish", "Hardswish", "Hardsigmoid", "Hardtanh", "ReLU6", "Softplus",
}  # fmt: skip
_MIXING = {"matmul", "bmm", "mm", "linear", "einsum", "baddbmm", "addmm", "conv1d", "conv2d", "conv3d"}


def _is_fixed(arg: Any) -> bool:
    """A number, or a tensor computed from model attributes alone (``self.gamma.reshape(1, -1, 1, 1)``)."""
    if isinstance(arg, (int, float)):
        return True
    while isinstance(arg, fx.Node):
        if arg.op == "get_attr":
            return True
        if arg.op == "call_method" and arg.target in _FACTOR_METHODS and arg.args:
            arg = arg.args[0]
            continue
        return False
    return False


def _fixed_factor(op: Op) -> bool:
    """A multiplication (or division) of the path's tensor by a factor that does not depend on the input:
    a layer scale (timm ``LayerScale``, ConvNeXt's ``gamma``) or a constant."""
    node = op.node
    if node is None or len(node.args) != 2 or node.kwargs:
        return False
    if not (
        (node.op == "call_function" and node.target in _PRODUCTS)
        or (node.op == "call_method" and node.target in _PRODUCT_METHODS)
    ):
        return False
    divides = "div" in getattr(node.target, "__name__", str(node.target))
    mine = [i for i, a in enumerate(node.args) if isinstance(a, fx.Node) and not _is_fixed(a)]
    if len(mine) != 1 or (divides and mine[0] != 0):
        return False
    return _is_fixed(node.args[1 - mine[0]])


def _refusal(op: Op) -> str:
    """Why ``op`` stops a channel path, in words that say what is refused."""
    node = op.node
    name = (
        op.target.__name__ if isinstance(op.target, type) else getattr(op.target, "__name__", str(op.target))
    )
    if name == "_patch_merging_pad":  # torchvision's Swin
        return (
            f"{op.name}: Swin's patch merging moves 2×2 neighbouring positions into the channel axis "
            "(channel i lands at i, C+i, 2C+i, 3C+i); ENorm follows a channel only as one contiguous block"
        )
    if name in _SPLITS:
        return (
            f"{op.name}: {name} takes part of the tensor (indexing / chunk / split); ENorm does not follow "
            "channels into the parts"
        )
    if name in _NOT_HOMOGENEOUS:
        return f"{op.name}: {name} does not commute with a positive per-channel scale"
    if name in _MIXING:
        return f"{op.name}: {name} mixes the channels"
    if node is not None and (node.target in _PRODUCTS or node.target in _PRODUCT_METHODS):
        return (
            f"{op.name}: {name} multiplies two input-dependent tensors (gating, attention): not positively "
            "homogeneous per channel"
        )
    return (
        f"{op.name}: {name} is not an operation ENorm knows to carry each channel unchanged (it may mix "
        "channels, move them, or not be positively homogeneous), so the path is refused"
    )


def channel_path(graph: ModelGraph, edge: Edge, *, start: ChannelBlocks | None = None) -> ChannelPath:
    """Follow the source layer's output channels along ``edge`` to the destination layer's input channels.

    ``start``: where the channels are at the source, for a source that is not a linear / convolution layer
    but whose channels the caller has located (ENorm crossing a normalization layer); default: the source
    layer's own output channels.

    Raises:
        ChannelPathError: naming the node that breaks the per-channel correspondence (an op that mixes
            channels or is not positively homogeneous, a reshape that does not turn channels into blocks,
            a missing shape) or saying which end is not a linear / convolution layer.
    """
    graph._require_traced("follow channels between layers")
    if start is not None:
        blocks = start
    elif edge.src is None or graph[edge.src].kind not in _CHANNEL_LAYER_KINDS:
        raise ChannelPathError(f"source {edge.src!r} is not a linear or convolution layer")
    else:
        src = graph[edge.src].module
        blocks = ChannelBlocks(channel_dim(src), out_channels(src))
    adds: list[AddJoin] = []
    for op in edge.ops:
        if op.kind is OpKind.IDENTITY:
            continue
        if op.kind is OpKind.SCALE_COMMUTING:
            rank = _spatial_rank(op)
            if rank is not None and -blocks.dim <= rank:
                raise ChannelPathError(f"{op.name}: {op.target} acts across the channel dimension")
            continue
        if op.kind is OpKind.RESHAPE:
            blocks = _through_reshape(blocks, op)
            continue
        if op.kind is OpKind.CAT:
            blocks = _through_cat(blocks, op)
            continue
        if op.kind is OpKind.PERMUTE:
            blocks = _through_permute(blocks, op)
            continue
        if op.kind is OpKind.ADD and op.node is not None:
            operands = [*op.node.args, *(v for k, v in op.node.kwargs.items() if k != "alpha")]
            n_inputs = len(_tensor_inputs(op.node))
            has_scalar = any(not isinstance(a, fx.Node) for a in operands)
            adds.append(AddJoin(op.name, op.input_index, n_inputs, has_scalar, blocks))
            continue
        if _fixed_factor(op):
            shape_in, shape_out = _input_shape(op), op.shape
            if shape_in is None or shape_out is None:
                raise ChannelPathError(
                    f"{op.name}: a product with a fixed factor (a layer scale) needs tensor shapes to check "
                    "that it keeps the channels where they are; trace with an example input"
                )
            if tuple(shape_in) != tuple(shape_out):
                raise ChannelPathError(f"{op.name}: a product that broadcasts {shape_in} to {shape_out}")
            continue  # (s·x)·g = s·(x·g) for a factor g that does not depend on the input
        raise ChannelPathError(_refusal(op))
    if edge.dst is None:
        raise ChannelPathError(f"the path from {edge.src!r} reaches the model output")
    dst = graph[edge.dst]
    if dst.kind not in _CHANNEL_LAYER_KINDS:
        raise ChannelPathError(
            f"the path from {edge.src!r} ends in {edge.dst!r} ({type(dst.module).__name__})"
        )
    want_dim, want_size = channel_dim(dst.module), in_channels(dst.module)
    if blocks.dim != want_dim or blocks.size != want_size:
        raise ChannelPathError(
            f"{edge.src!r}'s channels reach {edge.dst!r} on dim {blocks.dim} (size {blocks.size}), not on "
            f"its channel dim {want_dim} (size {want_size})"
        )
    return ChannelPath(edge, blocks, tuple(adds))


def tied_sources(graph: ModelGraph) -> list[tuple[str | None, ...]]:
    """Partition the sources of data (layers, None = the model input) into sets whose outputs are summed,
    directly or through a chain of additions (a residual stream): a positive per-channel scale of one member's
    output must be applied to all of them. Sets in execution order of their first member; singletons included.
    """
    graph._require_traced("find the layers joined by additions")
    parent: dict[str | None, str | None] = {}

    def find(x: str | None) -> str | None:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    first_at_add: dict[str, str | None] = {}
    sources: list[str | None] = [None, *graph.layers]
    for src in sources:
        find(src)
    for edge in graph.edges():
        for op in edge.ops:
            if op.kind is OpKind.ADD:
                other = first_at_add.setdefault(op.name, edge.src)
                ra, rb = find(other), find(edge.src)
                if ra != rb:
                    parent[rb] = ra
    sets: dict[str | None, list[str | None]] = {}
    for src in sources:
        sets.setdefault(find(src), []).append(src)
    return [tuple(members) for members in sets.values()]
