"""``from_torch``: an ordinary torch.nn model → a module tree.

Order of lookup for each submodule: ``custom`` (by instance, class or parameter-name prefix),
declarations (``declarations.py``), the known layers below, ``nn.Sequential`` (a composition of
its children), and finally torch.fx tracing of the forward. Tracing builds, for every value in
the graph, the chain of modules that produced it from the input; where two branches meet (a
residual add, a concatenation, a product) the common prefix of their chains is factored out, so
x + f(x) becomes compose(E, parallel(identity, F)) and E's weights are counted once.

The rules of the known layers and of nn.Sequential describe torch's forward: a subclass with its
own forward is traced where it is an nn.Sequential (x + super().forward(x) is a residual block)
and refused where it is a known layer (a ScaledLinear's × 10 would be lost).

Refusals, each saying what to do: unknown layers, subclasses of known layers with their own
forward, bare parameters used in a forward, a parameter reached twice (tied weights, a layer
called twice — in a forward or listed twice in an nn.Sequential), a trainable weight of a known
layer that the description never places (a declaration or custom description that forgets it,
or a layer the forward does not use), grouped convolutions, attention met by tracing, 1/x and
rounding divisions, multiple inputs or outputs, empty weights, meta or non-finite values where
they are read (biases, gains, frozen weights), and a model whose tree carries no mass.

Feature axes. Every bound is an RMS over each position's features (module.py): a Conv's are on
dim 1, a Linear's, an Embedding's output's, LayerNorm's and RMSNorm's on the last dim. The tracer
sees no shapes, so it refuses what may move or mix that axis: a flatten other than (start_dim=1,
end_dim=-1), a view or reshape other than (x.size(0), -1), a normalisation over several dims
(LayerNorm([C, H, W])), and a last-dim layer fed by a conv, or a conv by a last-dim layer, with no
such flatten between (``_check_axes``; a custom description's or declaration's tree is not judged).

Frozen parameters (requires_grad=False) still act on the signal, so they stay in the tree: a
frozen weight with mass 0 and its actual operator norm as sensitivity (the optimizer neither
steps nor projects it), frozen biases and gains as the passengers they are anyway. They are
outside the budget. Dropout follows the module's mode when the tree is built: in training mode
it multiplies the kept entries by 1/(1 − p), so its sensitivity and bound are 1/(1 − p); in eval
mode it is the identity. A freshly built model is in training mode.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from .._checks import is_finite_real, is_real
from ..optim.roles import is_transformers_conv1d
from . import bonds
from .atoms import BiasAtom, EmbeddingAtom, GainAtom, MatrixAtom, _check_scale
from .module import Atom, Bond, Compose, ModularError, Module, Parallel, Tare, compose


@dataclass
class Options:
    scale: str | None = None
    masses: dict = field(default_factory=dict)  # parameter name → mass (overrides the defaults)
    norm_min_rms: float = 1.0
    embedding_radius: float = 1.0
    custom: dict = field(default_factory=dict)
    tare: dict = field(default_factory=dict)  # submodule name → total mass of its weights
    tared: set = field(default_factory=set)
    described: set = field(default_factory=set)  # id()s of the trees custom descriptions and declarations gave

    def mass(self, name: str, default: float, param: torch.Tensor | None = None) -> float:
        """The mass of parameter ``name``: 0 when ``param`` is frozen (it is not trained)."""
        if param is not None and not param.requires_grad:
            if self.masses.get(name, 0.0) > 0:
                raise ModularError(f"masses gives the frozen parameter {name!r} (requires_grad=False) mass "
                                   f"{self.masses[name]!r}; a frozen weight is not trained and has mass 0 — "
                                   "unfreeze it or drop it from masses")
            return 0.0
        return float(self.masses.get(name, default))


_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.GELU: "gelu", nn.SiLU: "silu", nn.Tanh: "tanh"}
_ACTIVATION_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.gelu: "gelu", F.silu: "silu",
                         torch.tanh: "tanh", F.tanh: "tanh"}
_ACTIVATION_METHODS = {"relu": "relu", "tanh": "tanh"}
_SHAPE_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten)
_SHAPE_FUNCTIONS = {torch.flatten, torch.reshape}
_SHAPE_METHODS = {"flatten", "view", "reshape", "contiguous", "float", "to", "type_as", "clone"}
_META_METHODS = {"size", "dim"}
_META_ATTRIBUTES = {"dtype", "device", "shape", "ndim"}  # no use of a tensor's values (.T would be)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_KNOWN_TYPES = (nn.Linear, nn.Embedding, nn.LayerNorm, nn.MultiheadAttention, nn.Dropout, *_CONVS,
                *_ACTIVATION_MODULES, *_SHAPE_MODULES) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _is_known(module: nn.Module) -> bool:
    """A layer ``_known_layer`` describes (or refuses by name), by its type alone: while torch.fx
    traces, reading ``module.weight`` would put a get_attr node in the graph."""
    return isinstance(module, _KNOWN_TYPES) or type(module).__name__ in ("RMSNorm", "Conv1D")


def _replaced_forward(module: nn.Module) -> type | None:
    """The torch.nn class (nn.Linear, nn.Sequential, …) whose rule would describe ``module``, where
    ``module``'s own class replaces that class's forward; else None. The rules describe torch's
    forward: a subclass that scales or adds to it (x + super().forward(x), transformers'
    *ScaledWordEmbedding's rows × √d) was described as the plain layer, its scale or residual path
    lost (a probe measured 9.3× past the weight bound)."""
    if not isinstance(module, (*_KNOWN_TYPES, nn.Sequential)):
        return None
    base = next(c for c in type(module).__mro__ if c.__module__.startswith("torch.nn."))
    return base if type(module).forward is not base.forward else None


def _join(prefix: str, attr: str) -> str:
    return f"{prefix}.{attr}" if prefix else attr


def _with_bias(core: Module, module: nn.Module, prefix: str, opts: Options) -> Module:
    bias = getattr(module, "bias", None)
    if bias is None:
        return core
    name = _join(prefix, "bias")
    return Compose(core, BiasAtom(name, bias, opts.mass(name, 0.0, bias)))


def _check_flatten(start_dim, end_dim, where: str) -> None:
    """Refuse a flatten other than (start_dim=1, end_dim=-1), which merges each example's features
    into one vector. Another one may change the trailing axis the next layer reads: flatten(2) of a
    channel-first (B, C, H, W) activation gives (B, C, H·W), and a Linear after it mixes positions,
    which a conv's per-position bound says nothing about (a probe: 1.5× past the weight bound)."""
    if start_dim != 1 or end_dim != -1:
        raise ModularError(f"{where}: flatten(start_dim={start_dim}, end_dim={end_dim}) may change the trailing axis "
                           "the next layer reads (flatten(2) of a channel-first (B, C, H, W) activation gives "
                           "(B, C, H·W): positions, not channels), or merge examples, and the tracer sees no "
                           "shapes to tell: flatten with torch.flatten(x, 1) or nn.Flatten() (start_dim=1, "
                           "end_dim=-1), or describe the model with modman.modular.declare")


def _flattening(name: str) -> Bond:
    """flatten(x, 1) or view(x.size(0), -1): each example's features merged into one vector, read
    alike by a conv's channels and a Linear's last dim (``_check_axes``)."""
    bond = bonds.identity(name)
    bond.axis = "flat"
    return bond


def _axis(m: Module) -> str | None:
    """The axis ``m`` reads and writes its features on: "channels" (dim 1: a conv), "last" (a
    Linear, an Embedding's output, LayerNorm, RMSNorm), "flat" (a flatten), or None (elementwise
    layers, biases, reshapes that keep the axes)."""
    if isinstance(m, MatrixAtom):
        return "channels" if m.kind == "conv" else "last"
    if isinstance(m, EmbeddingAtom):
        return "last"
    return getattr(m, "axis", None) if isinstance(m, Bond) else None


def _check_axes(tree: Module, fed_by: Module | None, described: set) -> Module | None:
    """The last layer in ``tree`` that sets the feature axis, given ``fed_by``, the one before it;
    refuses a layer reading the last dim fed by a convolution, whose features are on dim 1 (or the
    reverse) with no flatten(x, 1) between: it reads another axis than the one the bounds are about
    (RMS over each position's features; a probe's Conv1d → Linear over the length axis went 2× past
    its weight bound). A custom description's or declaration's tree is not judged: it may permute
    inside, and its layout is its own."""
    if id(tree) in described:
        return None
    if isinstance(tree, Parallel):  # every branch sees the input; their common output axis, if any
        outs = [o for o in (_check_axes(m, fed_by, described) for m in tree.modules) if o is not None]
        return outs[0] if len({_axis(o) for o in outs}) == 1 else None
    if tree.children():  # Compose, Scale, Tare: in order
        for m in tree.children():
            fed_by = _check_axes(m, fed_by, described)
        return fed_by
    axis = _axis(tree)
    if axis is None:
        return fed_by
    before = None if fed_by is None or isinstance(tree, EmbeddingAtom) else _axis(fed_by)  # (it reads indices)
    who = repr(tree.name) if isinstance(tree, Atom) else tree.name
    by = None if fed_by is None else repr(fed_by.name) if isinstance(fed_by, Atom) else fed_by.name
    advice = ("flatten between them with torch.flatten(x, 1) or nn.Flatten() if that is what the model does, or "
              "describe the model with modman.modular.declare")
    if before == "channels" and axis == "last":
        raise ModularError(f"{who} reads its features on the last dim, but is fed by {by}, a convolution whose "
                           "features (channels) are on dim 1: it would read positions, not channels, where the "
                           f"bounds (RMS over each position's features) say nothing; {advice}")
    if before == "last" and axis == "channels":
        raise ModularError(f"{who} is a convolution reading its features (channels) on dim 1, but is fed by {by}, "
                           "which writes them on the last dim: it would read positions, not features, where the "
                           f"bounds (RMS over each position's features) say nothing; {advice}")
    return tree


def _norm_layer(module: nn.Module, prefix: str, opts: Options, kind: str) -> Module:
    shape = getattr(module, "normalized_shape", None)  # (a class named RMSNorm may have none)
    if isinstance(shape, int):  # torch's convention: d means (d,) (a user's RMSNorm kept the int; a review)
        shape = (shape,)
    if shape is not None and len(tuple(shape)) != 1:
        shape = tuple(shape)
        # LayerNorm([C, H, W]) normalises the whole block: a position's features can come out with
        # RMS up to √(H·W), not 1 (a probe measured 6 on a 6×6 map)
        raise ModularError(f"{repr(prefix) if prefix else 'the model'} ({type(module).__name__}) normalises over the "
                           f"last {len(shape)} dims {shape} together, not over each position's features (the RMS "
                           "the norms here are measured in): modman describes a normalisation over the last dim "
                           "only — normalize channel-last activations with normalized_shape=(d,), or describe "
                           "the model with modman.modular.declare")
    norm = bonds.normalize(kind, opts.norm_min_rms, prefix)
    norm.axis = "last"  # (_check_axes)
    parts: list[Module] = [norm]
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):  # frozen or not, the gain scales the signal
        parts.append(GainAtom(_join(prefix, "weight"), weight, opts.mass(_join(prefix, "weight"), 0.0, weight)))
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        parts.append(BiasAtom(_join(prefix, "bias"), bias, opts.mass(_join(prefix, "bias"), 0.0, bias)))
    return compose(*parts)


def _dropout(p, training: bool) -> Bond:
    """Dropout in training mode keeps each entry with probability 1 − p and scales it by 1/(1 − p):
    for a fixed mask the map is diag(mask)/(1 − p), of RMS→RMS norm 1/(1 − p) (0 when p = 1)."""
    if not (is_real(p) and 0 <= p <= 1):
        raise ModularError(f"dropout probability must be a number in [0, 1], got {p!r}")
    gain = (0.0 if p == 1 else 1.0 / (1.0 - p)) if training else 1.0
    return Bond(f"dropout(p={p:g}{'' if training else ', eval'})", gain, lambda rho: gain * rho)


def _known_layer(module: nn.Module, prefix: str, opts: Options) -> Module | None:
    """The atom or bond for a layer torch ships, or None."""
    if isinstance(module, nn.Linear):
        name = _join(prefix, "weight")
        w = module.weight
        core = MatrixAtom(name, w, opts.mass(name, 1.0, w), opts.scale, frozen=not w.requires_grad)
        return _with_bias(core, module, prefix, opts)
    if is_transformers_conv1d(module):  # GPT-2's Linear with the weight stored (in, out): x ↦ x W + b
        name = _join(prefix, "weight")
        w = module.weight
        core = MatrixAtom(name, w, opts.mass(name, 1.0, w), opts.scale, frozen=not w.requires_grad, transposed=True)
        return _with_bias(core, module, prefix, opts)
    if isinstance(module, _CONVS):
        if module.groups != 1:
            raise ModularError(f"{prefix or 'the model'}: grouped convolution (groups={module.groups}) is block-diagonal, "
                               "not its flattened matrix; describe it with from_torch(custom={...})")
        name = _join(prefix, "weight")
        w = module.weight
        core = MatrixAtom(name, w, opts.mass(name, 1.0, w), opts.scale, kind="conv", frozen=not w.requires_grad)
        return _with_bias(core, module, prefix, opts)
    if isinstance(module, nn.Embedding):
        name = _join(prefix, "weight")
        w = module.weight
        return EmbeddingAtom(name, w, opts.mass(name, 1.0, w), opts.embedding_radius, frozen=not w.requires_grad)
    if isinstance(module, nn.Dropout):
        return _dropout(module.p, module.training)
    for cls, kind in _ACTIVATION_MODULES.items():
        if isinstance(module, cls):
            return bonds.activation(kind)
    if isinstance(module, nn.Unflatten):
        raise ModularError(f"{prefix or 'the model'}: nn.Unflatten splits a dimension into smaller vectors, whose "
                           "RMS per position can be up to √(d/k) times the input's: modman has no rule for it — "
                           "describe the model with modman.modular.declare")
    if isinstance(module, nn.Flatten):
        _check_flatten(module.start_dim, module.end_dim, repr(prefix) if prefix else "the model")
        return _flattening("flatten")
    if isinstance(module, _SHAPE_MODULES):
        return bonds.identity(type(module).__name__.lower())
    if isinstance(module, nn.LayerNorm):
        return _norm_layer(module, prefix, opts, "layernorm")
    if isinstance(module, getattr(nn, "RMSNorm", ())) or type(module).__name__ == "RMSNorm":
        return _norm_layer(module, prefix, opts, "rmsnorm")
    if isinstance(module, nn.MultiheadAttention):
        raise ModularError(f"{prefix or 'the model'}: softmax attention is not Lipschitz without assumptions "
                           "(Kim et al. 2021); describe the block with a declaration "
                           "(modman.modular.declare) that states them, as declarations.py does for TinyCausalLM")
    return None


def _lookup_custom(module: nn.Module, prefix: str, opts: Options):
    for key in (module, type(module), prefix):
        try:
            if key in opts.custom:
                return opts.custom[key]
        except TypeError:  # unhashable module
            continue
    return None


def convert(module: nn.Module, prefix: str, opts: Options) -> Module:
    """The module tree of ``module``, whose parameters are named under ``prefix``."""
    tree = _convert(module, prefix, opts)
    if prefix in opts.tare:
        opts.tared.add(prefix)
        return Tare(tree, opts.tare[prefix]) if tree.mass > 0 else tree
    return tree


def _convert(module: nn.Module, prefix: str, opts: Options) -> Module:
    from ..optim.roles import unwrap
    from .declarations import DECLARATIONS

    # a torch.compile-d or data-parallel submodule is its bare module, under the same name (as for
    # roles): its OptimizedModule was traced into and refused ("Declare … OptimizedModule"; a probe)
    module = unwrap(module)
    fn = _lookup_custom(module, prefix, opts)
    qualname = f"{type(module).__module__}.{type(module).__qualname__}"
    if fn is None and qualname in DECLARATIONS:
        fn = DECLARATIONS[qualname]
    if fn is not None:
        tree = fn(module, prefix, opts)
        if not isinstance(tree, Module):
            where = repr(prefix) if prefix else "the model"
            raise TypeError(f"the description {getattr(fn, '__qualname__', fn)!r} of {where} ({type(module).__name__}) "
                            f"returned {type(tree).__name__}, not a modman.modular.Module (an atom, a bond or "
                            "their composition)")
        opts.described.add(id(tree))
        return tree
    base = _replaced_forward(module)
    if base is not None and base is not nn.Sequential:  # an nn.Sequential subclass is traced below
        cls = type(module).__name__
        raise ModularError(f"{repr(prefix) if prefix else 'the model'} ({cls}) is an nn.{base.__name__} with its own "
                           f"forward: modman's rule for nn.{base.__name__} describes torch's forward, which the "
                           f"override may scale or add to; describe it with from_torch(model, custom={{{cls}: fn}}) "
                           f"or @modman.modular.declare({cls})")
    known = _known_layer(module, prefix, opts)
    if known is not None:
        return known
    if isinstance(module, nn.Sequential) and base is None:
        # _modules, not named_children(): that drops a layer listed twice, which is applied twice
        children = [(n, child) for n, child in module._modules.items() if child is not None]
        if not children:
            return bonds.identity("empty Sequential")
        return compose(*(convert(child, _join(prefix, n), opts) for n, child in children))
    return _trace(module, prefix, opts)


# --------------------------------------------------------------------------------- tracing
class _Tracer(fx.Tracer):
    """Stops at every submodule modman knows how to describe, so they stay call_module nodes."""

    def __init__(self, opts: Options, prefix: str):
        super().__init__()
        self.opts, self.prefix = opts, prefix

    def is_leaf_module(self, m, qualname):
        from ..optim.roles import unwrap
        from .declarations import DECLARATIONS

        if unwrap(m) is not m:  # a wrapped submodule: one node, described as its bare module (``_convert``)
            return True
        if _lookup_custom(m, _join(self.prefix, qualname), self.opts) is not None:
            return True
        if _join(self.prefix, qualname) in self.opts.tare:  # keep it one node, so its subtree can be tared
            return True
        if f"{type(m).__module__}.{type(m).__qualname__}" in DECLARATIONS:
            return True
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        # a type test only: parameters are proxies while tracing, so no atom is built here. A torch.nn
        # layer without a rule stays one node too, so that a refusal names it: traced into, its
        # F.batch_norm or bare weight was charged to the enclosing module ("describe ResNet")
        return _is_known(m) or _is_torch_layer(m)


def _is_torch_layer(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.nn.")


_META = object()  # values that are not activations (shapes, sizes)


def _merge(chains: list[tuple], combine: str) -> tuple:
    """Factor the common prefix out of several chains and join the rests in parallel."""
    k = 0
    while all(len(c) > k for c in chains) and all(c[k] is chains[0][k] for c in chains):
        k += 1
    rests = [compose(*c[k:]) if len(c) > k else bonds.identity() for c in chains]
    return chains[0][:k] + (Parallel(*rests, combine=combine),)


def _trace(module: nn.Module, prefix: str, opts: Options) -> Module:
    name = prefix or type(module).__name__
    try:
        graph = _Tracer(opts, prefix).trace(module)
    except Exception as exc:  # fx raises several types for data-dependent control flow
        raise ModularError(
            f"cannot describe {name} ({type(module).__name__}): it is not a layer modman knows and torch.fx "
            f"could not trace its forward ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
            f"Declare its structure with @modman.modular.declare({type(module).__name__}) or pass "
            f"from_torch(model, custom={{{type(module).__name__}: fn}})") from exc
    values: dict[fx.Node, object] = {}
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    for node in graph.nodes:
        if node.op == "placeholder":
            if node is not inputs[0] and node.users:
                raise ModularError(f"{name}: forward uses a second input {node.name!r}; the modular norm "
                                   "describes single-input maps — declare the model with modman.modular.declare")
            values[node] = ()
        elif node.op == "get_attr" and node.users and all(
                u.op == "call_function" and u.target is getattr and u.args[1] in _META_ATTRIBUTES
                for u in node.users):
            values[node] = _META  # only its metadata is read: x.to(self.fc.weight.dtype)
        elif node.op == "get_attr" and _is_torch_layer(module):
            cls = type(module).__name__  # "wrap it in a layer" would be advice against a layer
            raise ModularError(f"cannot describe {name} ({cls}): modman has no rule for this torch.nn layer; declare "
                               f"it with @modman.modular.declare({cls}) or pass from_torch(model, custom={{{cls}: fn}})")
        elif node.op == "get_attr":
            raise ModularError(f"{name}: forward uses the bare tensor {_join(prefix, node.target)!r} directly; "
                               "wrap it in a layer or describe the module with from_torch(custom={...})")
        elif node.op == "call_module":
            sub = module.get_submodule(node.target)
            described = convert(sub, _join(prefix, node.target), opts)  # refusals name the layer first
            values[node] = _single_input(node, values, name) + (described,)
        elif node.op in ("call_function", "call_method"):
            values[node] = _function(node, values, name, type(module).__name__)
        elif node.op == "output":
            out = node.args[0]
            if not isinstance(out, fx.Node) or values.get(out) is _META:
                raise ModularError(f"{name}: forward returns {type(out).__name__}, not one tensor; "
                                   "declare the model with modman.modular.declare")
            chain = values[out]
            return compose(*chain) if chain else bonds.identity()
    raise ModularError(f"{name}: traced graph has no output")


def _tensor_args(node: fx.Node, values) -> list[tuple]:
    out = []
    for a in _flat(node.args) + _flat(node.kwargs):
        if isinstance(a, fx.Node) and values[a] is not _META:
            out.append(values[a])
    return out


def _flat(x) -> list:
    if isinstance(x, (list, tuple)):
        return [y for item in x for y in _flat(item)]
    if isinstance(x, dict):
        return [y for item in x.values() for y in _flat(item)]
    return [x]


def _flattens(node) -> bool:
    """A view/reshape of x to (x.size(0), -1) or (x.shape[0], -1): the flatten idiom, which only
    merges vectors (the RMS of a merged vector is at most the largest of its parts'). Any other
    shape may split them — a literal n too: view(4, -1) of a (1, 8) input splits it in four
    (without shapes the tracer cannot tell that from x.view(-1, 48), which only merges)."""
    shape = node.args[1:] if node.op == "call_method" else node.args[1:2]
    if not shape:
        shape = (node.kwargs.get("shape", node.kwargs.get("size")),)
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    if len(shape) != 2 or shape[-1] != -1 or not isinstance(shape[0], torch.fx.Node):
        return False
    first, x = shape[0], node.args[0]
    if first.op == "call_method" and first.target == "size":  # x.size(0)
        return first.args[0] is x and _operand(first, 1, "dim") == 0
    if first.op == "call_function" and first.target is operator.getitem:  # x.shape[0]
        attr = first.args[0]
        return (isinstance(attr, torch.fx.Node) and attr.op == "call_function" and attr.target is getattr
                and attr.args[0] is x and attr.args[1] == "shape" and first.args[1] == 0)
    return False


def _single_input(node, values, name) -> tuple:
    chains = _tensor_args(node, values)
    if len(chains) != 1:
        raise ModularError(f"{name}: {node.target} is called with {len(chains)} tensor inputs; modman describes "
                           "single-input layers — declare the model with modman.modular.declare")
    return chains[0]


def _scalar_arg(node) -> float | None:
    nums = [a for a in (*node.args, node.kwargs.get("other")) if is_real(a)]
    return float(nums[0]) if nums else None


def _operand(node, i: int, key: str):
    """The i-th operand of a binary op, positional or by keyword (torch.add(input, other=…))."""
    return node.args[i] if len(node.args) > i else node.kwargs.get(key)


def _alpha(node, where) -> float:
    """torch.add / torch.sub compute input ± alpha·other."""
    alpha = node.kwargs.get("alpha", 1)
    if not is_real(alpha):
        raise ModularError(f"{where}: alpha={alpha!r} is not a constant number")
    return float(alpha)


def _function(node: fx.Node, values, name, owner: str) -> object:
    """The chain of a call_function/call_method node of ``owner``'s (a class name) forward."""
    target = node.target
    where = f"{name}: {node.op} {getattr(target, '__name__', target)!r}"
    if node.op == "call_method" and target in _META_METHODS:
        return _META
    if target is operator.getitem and isinstance(node.args[0], fx.Node) and values.get(node.args[0]) is _META:
        return _META  # y.shape[0]
    if target is getattr:
        if node.args[1] in _META_ATTRIBUTES:
            return _META
        # y.mT or y.T is the activation's values: as metadata, y + y.mT lost a branch silently
        raise ModularError(f"{where}: attribute {node.args[1]!r} of a tensor is not one modman knows; "
                           "describe the enclosing module with from_torch(model, custom={Class: fn}) or "
                           "@modman.modular.declare(Class)")
    chains = _tensor_args(node, values)
    if node.op == "call_function" and target in _ACTIVATION_FUNCTIONS or \
            node.op == "call_method" and target in _ACTIVATION_METHODS:
        kind = _ACTIVATION_FUNCTIONS.get(target) or _ACTIVATION_METHODS.get(target)
        if kind == "gelu" and node.kwargs.get("approximate", "none") not in ("none", "tanh"):
            raise ModularError(f"{where}: unknown GELU approximation")
        return _single_input(node, values, name) + (bonds.activation(kind),)
    if node.op == "call_function" and target in _SHAPE_FUNCTIONS or \
            node.op == "call_method" and target in _SHAPE_METHODS:
        if target in ("flatten", torch.flatten):  # torch's defaults: start_dim=0, end_dim=-1
            start, end = _operand(node, 1, "start_dim"), _operand(node, 2, "end_dim")
            _check_flatten(0 if start is None else start, -1 if end is None else end, name)
        if target in ("view", "reshape", torch.reshape) and not _flattens(node):
            # (Linear → view(B, C, H, W) → Conv: the bound was taken as the input's, √(d/k) too low)
            raise ModularError(f"{name}: {getattr(target, '__name__', target)} to a shape other than (x.size(0), -1) "
                               "may split vectors into smaller ones, whose RMS per position can be up to √(d/k) "
                               "times the input's, and the tracer sees no shapes to tell a merge from a split: "
                               "flatten with torch.flatten(x, 1) or nn.Flatten, or describe the model with "
                               "modman.modular.declare")
        what = getattr(target, "__name__", str(target))
        merge = target in ("flatten", torch.flatten, "view", "reshape", torch.reshape)  # only merges reach here
        return _single_input(node, values, name) + (_flattening(what) if merge else bonds.identity(what),)
    if node.op == "call_function" and target is F.dropout:
        p, training = _operand(node, 1, "p"), _operand(node, 2, "training")
        return _single_input(node, values, name) + (_dropout(0.5 if p is None else p,
                                                              True if training is None else training),)
    if target in (operator.add, operator.iadd, torch.add, "add", "__add__",
                  operator.sub, operator.isub, torch.sub, "sub"):
        # input ± alpha·other: ‖Δ(a ± αb)‖ ≤ ‖Δa‖ + |α|·‖Δb‖, so other's chain gets a ×|α| stage
        alpha = _alpha(node, where)
        other = _operand(node, 1, "other")
        if len(chains) >= 2:
            if alpha != 1:
                chains[1] = chains[1] + (Bond(f"×{alpha:g}", abs(alpha), lambda r, a=alpha: abs(a) * r),)
            return _merge(chains, "sum")
        c = abs(alpha * other) if is_real(other) else abs(_scalar_arg(node) or 0.0)
        if not is_real(other) and alpha != 1:  # c ± alpha·h: h's chain scaled by |alpha|
            return _single_input(node, values, name) + (Bond(f"{c:g}±{alpha:g}·", abs(alpha),
                                                             lambda r, c=c, a=alpha: abs(a) * r + c),)
        return _single_input(node, values, name) + (Bond(f"±{c:g}", 1.0, lambda r, c=c: r + c),)
    if target in (operator.mul, operator.imul, torch.mul, "mul", operator.truediv, torch.div, "div"):
        divides = target in (operator.truediv, torch.div, "div")
        if divides and node.kwargs.get("rounding_mode") is not None:
            raise ModularError(f"{where}: rounding_mode={node.kwargs['rounding_mode']!r} makes a step function "
                               "(derivative 0 almost everywhere, jumps elsewhere): no Lipschitz bound; describe "
                               "this module with from_torch(custom={...})")
        if len(chains) >= 2:
            if divides:
                raise ModularError(f"{where}: division of two activations has no Lipschitz bound; "
                                   "describe this module with from_torch(custom={...})")
            return _merge(chains, "mul")
        if divides and not isinstance(_operand(node, 0, "input"), fx.Node):
            raise ModularError(f"{where}: a constant divided by an activation (c / h) has no Lipschitz bound "
                               "(unbounded near h = 0); describe this module with from_torch(custom={...})")
        a = _scalar_arg(node)
        if a is None:
            raise ModularError(f"{where}: multiplies by a non-constant; describe it with from_torch(custom={{...}})")
        if divides:
            if a == 0:
                raise ModularError(f"{where}: division by zero")
            a = 1.0 / a
        # a stage of sensitivity |a| after the chain scales every earlier weight's norm by |a|: a·m
        return _single_input(node, values, name) + (Bond(f"×{a:g}", abs(a), lambda r, a=a: abs(a) * r),)
    if node.op == "call_function" and target is torch.cat:
        return _merge(chains, "cat")
    if target in (F.scaled_dot_product_attention,):
        raise ModularError(f"{where}: softmax attention is not Lipschitz without assumptions; declare the "
                           "block with modman.modular.declare, stating them (see declarations.py)")
    # name the class to describe: "describe the enclosing module with custom={Class: fn}" left a
    # user guessing which (a newcomer's MaxPool2d)
    raise ModularError(f"{where} is not a function modman knows; describe {owner} with "
                       f"from_torch(model, custom={{{owner}: fn}}) or @modman.modular.declare({owner})")


def check_placed_once(tree: Module, names: dict[int, str] | None = None) -> None:
    """Refuse a tree that places one parameter twice (the modular norm counts a weight once per use)
    or two parameters under one name (a budget has one entry per name). ``names``: {id(parameter):
    its name in the model}, which the tree's names are read as. from_torch runs it, and budget()
    on a hand-built tree (W placed twice gave {'W': 0.5}; a probe)."""
    names = names or {}
    seen: dict[int, str] = {}
    named: dict[str, torch.Tensor] = {}
    for atom in tree.atoms():
        if id(atom.param) in seen:
            raise ModularError(
                f"parameter {names.get(id(atom.param), atom.name)!r} is used twice (as {seen[id(atom.param)]!r} and "
                f"{atom.name!r}: tied weights, a layer called twice, or one intermediate result used twice in a "
                "sum or concatenation, which the tracer describes as two copies — a + f(x) + a: write 2 * a + f(x); "
                "cat([u, f(u)]) with u = cat([x, h]) named once). The modular norm counts a weight once per use; "
                "untie the weights, or declare the model (modman.modular.declare) placing it once")
        seen[id(atom.param)] = atom.name
        name = names.get(id(atom.param), atom.name)
        if name in named:
            raise ModularError(f"two atoms are named {name!r} (parameters of shapes {tuple(named[name].shape)} and "
                               f"{tuple(atom.param.shape)}): a budget has one entry per name — name each "
                               "parameter once")
        named[name] = atom.param


def from_torch(model: nn.Module, *, scale: str | None = None, masses: dict | None = None,
               norm_min_rms: float = 1.0, embedding_radius: float = 1.0, custom: dict | None = None,
               tare: dict | None = None) -> Module:
    """The module tree of ``model`` (see the module docstring); parameter names as in
    ``model.named_parameters()``.

    Args:
        scale: the Stiefel scale the optimizer uses (None: spectral norm; "rms": RMS→RMS), which
            sets each weight's sensitivity and own norm.
        masses: {parameter name: mass, a finite number ≥ 0}; defaults 1 for Linear/Conv/Embedding
            weights, 0 for biases and norm gains (passengers, trained by the fallback); frozen
            parameters (requires_grad=False) always 0.
        norm_min_rms: the assumed smallest RMS of a normalisation layer's input (for LayerNorm, which
            centres first, its standard deviation), a finite number > 0.
        embedding_radius: the row-sphere radius (ManifoldMuon's default 1), a finite number > 0.
        custom: {module instance | class | name prefix: fn(module, prefix, options) -> Module}.
        tare: {submodule name (as in ``model.named_modules()``): total mass}. The weights below
            that submodule keep their relative masses but share this total (modula's ``tare``;
            see ``module.Tare``). The recipe for depth transfer in a residual network: blocks
            x ↦ (1 − 1/L)·x + (1/L)·block(x) held in one container, tared to a fixed mass, so
            that adding blocks neither starves the input/output layers nor the blocks.
    """
    from ..optim.roles import named_modules, unwrap

    if not isinstance(model, nn.Module):
        raise TypeError(f"from_torch needs a torch.nn.Module, got {type(model).__name__}")
    model = unwrap(model)  # torch.compile's wrapper: describe (and name parameters as) the eager model
    _check_scale(scale)
    if not (is_finite_real(norm_min_rms) and norm_min_rms > 0):  # (checked only at a norm layer before)
        raise ValueError(f"norm_min_rms must be a finite number > 0 (the assumed smallest RMS of a normalisation "
                         f"layer's input), got {norm_min_rms!r}")
    if not (is_real(embedding_radius) and 0 < embedding_radius < float("inf")):
        raise ValueError(f"embedding_radius must be a finite number > 0 (the row-sphere radius of embeddings), "
                         f"got {embedding_radius!r}")
    opts = Options(scale=scale, masses=dict(masses or {}), norm_min_rms=norm_min_rms,
                   embedding_radius=embedding_radius, custom=dict(custom or {}), tare=dict(tare or {}))
    # (a probe: "abc" failed in float() naming no parameter, None with a TypeError, "2" was taken as 2)
    for key, mass in opts.masses.items():
        value = mass.item() if isinstance(mass, torch.Tensor) and mass.numel() == 1 and not (
            mass.dtype.is_complex or mass.dtype == torch.bool) else mass  # a 0-d tensor from a computation
        if not (is_finite_real(value) and value >= 0):
            raise ModularError(f"masses[{key!r}] must be a finite number ≥ 0, got {mass!r}")
        opts.masses[key] = float(value)
    for key, fn in opts.custom.items():
        if not callable(fn):  # (it failed as "'int' object is not callable" while converting)
            raise TypeError(f"custom[{key!r}] must be a function fn(module, prefix, options) -> Module, got "
                            f"{type(fn).__name__}")
    # names through compile and data-parallel wrappers of submodules, as the optimizers give them
    # (model.named_parameters()'s "0._orig_mod.weight" matched no optimizer name: no budget; a probe)
    modules = list(named_modules(model))
    submodules = dict(modules)
    for key, total in opts.tare.items():
        if key not in submodules:
            raise ModularError(f"tare names {key!r}, which is not a submodule of the model; use names from "
                               "model.named_modules() (a container holding the blocks, e.g. an nn.Sequential), "
                               "without the _orig_mod/module of torch.compile or data-parallel wrappers")
        if not (is_finite_real(total) and total > 0):
            raise ModularError(f"tare[{key!r}] must be a finite mass > 0, got {total!r}")
    names: dict[int, str] = {}
    for m_name, m in modules:
        for p_name, p in m.named_parameters(recurse=False):
            names.setdefault(id(p), _join(m_name, p_name))
    unknown = set(opts.masses) - set(names.values())
    if unknown:
        raise ModularError(f"masses names unknown parameters {sorted(unknown)}; use the optimizer's names "
                           "(model.named_parameters() without the _orig_mod/module of torch.compile or "
                           "data-parallel wrappers; optimizer.describe() lists them)")
    tree = convert(model, "", opts)
    _check_axes(tree, None, opts.described)
    missed = set(opts.tare) - opts.tared
    if missed:
        raise ModularError(f"tare names {sorted(missed)}, but the description of the model never reached them as one "
                           "module (a custom description or declaration above them describes their layers); tare "
                           "inside that description with modman.modular.tare")
    check_placed_once(tree, names)
    for atom in tree.atoms():
        # named by identity: a custom description naming layer 2's weight "0.weight" (a slip) dropped
        # 2.weight's budget entry silently (a probe)
        atom.name = names.get(id(atom.param), atom.name)
    # A trainable weight of a layer modman knows that the tree never places would get no lr_scale
    # (the optimizer would step it by lr × 1, outside the norm): refuse instead of budgeting without it.
    placed = {id(atom.param) for atom in tree.atoms()}
    missing = [_join(m_name, p_name) for m_name, m in modules if _is_known(m)
               for p_name, p in m.named_parameters(recurse=False) if p.requires_grad and id(p) not in placed]
    if missing:
        raise ModularError(
            f"the description of {type(model).__name__} never places the trainable parameters {missing}: a "
            "declaration or custom description that leaves them out, or layers the forward does not use. Place "
            "them in the description, or freeze unused layers (requires_grad_(False))")
    return tree
