"""How ``fuse`` finds and rewrites Linear -> activation pairs (modelled on
``torch/fx/experimental/optimization.py``).

Plan, then apply. Every module whose ``forward`` can call a Linear is looked at on its own:

* an ``nn.Sequential`` (with Sequential's own forward) by walking its children in order;
* any other module by a *shallow* ``torch.fx`` trace of its own ``forward`` (every submodule call
  is a leaf), in train and in eval mode, and once more with its optional arguments at their
  defaults if it has any. A pair counts only if every trace shows it. A module that cannot be
  traced leaves the Linears it calls alone; its children are still looked at on their own.

A pair is a call of an ``nn.Linear`` (exactly that class, no hooks, called once in the whole
model) whose output goes only, through no-ops (``nn.Identity``, dropout with p=0), to an
activation in ``ACTIVATIONS`` as a module, a function or a tensor method.

Rewrites, in order of preference:

* *swap* (the user's class and forward stay): the Linear's attribute becomes the fused layer
  (``from_linear``: the same Parameters, the same state-dict keys) and the activation module's
  attribute becomes ``nn.Identity``, when that module sits in one place and is called once;
* *graph*: when the activation is a function or method call (or a module called elsewhere too),
  the module becomes the ``torch.fx.GraphModule`` of its traced forward with the activation call
  removed; it keeps the same submodules, parameters and buffers under the same names (its class
  is ``GraphModule``; it deep-copies, pickles and compiles). Only for a forward without optional
  arguments that traces the same in train and eval mode and a module without hooks used in one
  place. Every module above it is changed in place; the module passed to ``fuse`` itself, if it
  needs this rewrite, is left as it was and the GraphModule is returned instead.
"""

from __future__ import annotations

import copy
import inspect
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .activations import ACTIVATIONS, DEFAULT_NEGATIVE_SLOPE, ActivationSpec
from .modules import FUSED_LAYERS, FusedLinearAct, fused_layer_from_linear


_PARAM_DEFAULTS = {"approximate": "none", "negative_slope": DEFAULT_NEGATIVE_SLOPE}

# Every activation fuse recognises (the registry's modules/functions/methods/params); those with a
# fused layer (modules.FUSED_LAYERS) are fused, the others reported as "unsupported activation".
SUPPORTED = tuple(name for name in ACTIVATIONS if name in FUSED_LAYERS)

_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_DROPOUT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout)
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
          "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


@dataclass(frozen=True)
class FuseRecord:
    """What ``fuse`` did with one ``nn.Linear``: ``name`` is its qualified name in the model."""

    name: str
    activation: Optional[str]  # the activation it was fused with, None if left
    reason: str                # "fused" or why it was left

    @property
    def fused(self) -> bool:
        return self.activation is not None

    def __str__(self) -> str:
        return f"{self.name}: fused with {self.activation}" if self.fused else f"{self.name}: left ({self.reason})"


def format_report(records) -> str:
    fused = sum(r.fused for r in records)
    return "\n".join([f"fuse: {fused} of {len(records)} Linear layers fused"] + [f"  {r}" for r in records])


# --- matching -----------------------------------------------------------------------------------

class _ShallowTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True  # trace one module's own forward; each submodule it calls is one node


def _trace(module: nn.Module, training: bool, concrete: Optional[dict]) -> fx.GraphModule:
    """Trace ``module.forward`` in the given mode, leaving ``module`` as it was (tracing may set
    attributes on it, e.g. tensor constants, and ``train()`` sets every submodule's mode)."""
    saved, modes = dict(module.__dict__), [(m, m.training) for m in module.modules()]
    try:
        module.train(training)
        graph = _ShallowTracer().trace(module, concrete_args=concrete)
        return fx.GraphModule(module, graph, class_name=type(module).__name__)
    finally:
        module.__dict__.clear()
        module.__dict__.update(saved)
        for m, mode in modes:
            m.training = mode


def _has_hooks(m: nn.Module) -> bool:
    return any(getattr(m, h, None) for h in _HOOKS)


def _has_forward(m: nn.Module) -> bool:
    return type(m).forward is not nn.Module.forward  # containers (ModuleList, ModuleDict) have none


def _single_input(node: fx.Node, arg: fx.Node) -> bool:
    return node.args[:1] == (arg,) and len(node.args) == 1 and arg not in node.kwargs.values()


def _params_match(act: ActivationSpec, get) -> bool:
    """Whether the attributes / keywords ``get`` reads select ``act`` (a None in its params: any value)."""
    return all(v is None or get(k, _PARAM_DEFAULTS.get(k)) == v for k, v in act.params.items())


def _slope(get) -> float:
    return float(get("negative_slope", DEFAULT_NEGATIVE_SLOPE))


def _is_noop_module(m: nn.Module) -> bool:
    return not _has_hooks(m) and (type(m) is nn.Identity or (type(m) in _DROPOUT_MODULES and m.p == 0))


class _Matcher:
    """Recognises activations and no-ops at fx nodes; caches what it learns about modules."""

    def __init__(self):
        self._wrappers: dict[int, Optional[str]] = {}

    def module_activation(self, m: nn.Module) -> Optional[str]:
        for name, act in ACTIVATIONS.items():
            if type(m) in act.modules and _params_match(act, lambda k, d: getattr(m, k, d)):
                return name
        if id(m) not in self._wrappers:  # a wrapper whose forward is only an activation (GELUActivation)
            self._wrappers[id(m)] = None
            self._wrappers[id(m)] = self._wrapper_activation(m)
        return self._wrappers[id(m)]

    def _wrapper_activation(self, m: nn.Module) -> Optional[str]:
        if (not _has_forward(m) or isinstance(m, (nn.Linear, FusedLinearAct)) or next(m.parameters(), None) is not None
                or next(m.buffers(), None) is not None):
            return None
        names = set()
        for training in (True, False):
            try:
                nodes = list(_trace(m, training, None).graph.nodes)
            except Exception:
                return None
            if len(nodes) != 3 or nodes[0].op != "placeholder" or nodes[2].args != (nodes[1],) \
                    or not _single_input(nodes[1], nodes[0]):
                return None
            names.add(self.node_activation(nodes[1], m))
        name = names.pop() if len(names) == 1 else None
        # A parameter value (leaky relu's slope) inside a wrapper's forward is not carried over.
        return name if name is None or None not in ACTIVATIONS[name].params.values() else None

    def node_activation(self, node: fx.Node, owner: nn.Module) -> Optional[str]:
        if node.op == "call_module":
            return self.module_activation(owner.get_submodule(node.target))
        for name, act in ACTIVATIONS.items():
            if ((node.op == "call_function" and node.target in act.functions)
                    or (node.op == "call_method" and node.target in act.methods)) \
                    and set(node.kwargs) <= {"inplace", *act.params} and _params_match(act, node.kwargs.get):
                return name
        return None

    @staticmethod
    def is_noop(node: fx.Node, owner: nn.Module) -> bool:
        if node.op == "call_module":
            return _is_noop_module(owner.get_submodule(node.target))
        return node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS and (
            node.kwargs.get("p", 0.5) == 0 or node.kwargs.get("training", True) is False)

    def follow(self, node: fx.Node, owner: nn.Module):
        """(activation node, name) where ``node``'s value goes only to an activation, through no-ops
        only; else (None, reason)."""
        cur = node
        while True:
            if len(cur.users) > 1:
                return None, "pre-activation used elsewhere"
            user = next(iter(cur.users), None)
            if user is None or not _single_input(user, cur):
                return None, "pre-activation used elsewhere" if cur is not node and user is not None \
                    else "no activation after it"
            if self.is_noop(user, owner):
                cur = user
                continue
            name = self.node_activation(user, owner)
            return (user, name) if name is not None else (None, "no activation after it")


# --- planning -----------------------------------------------------------------------------------

@dataclass
class _Pair:
    owner: nn.Module          # the module whose forward makes both calls
    linear: str               # target of the Linear, relative to owner
    activation: str
    act_node: Optional[fx.Node] = None  # fx path: the activation call
    act_slot: Optional[str] = None      # the activation module's target (module form)
    negative_slope: float = DEFAULT_NEGATIVE_SLOPE  # leaky relu's, as the model has it


@dataclass
class _Unit:
    """One module looked at: its decisions per Linear target, and its trace (fx path)."""

    module: nn.Module
    decisions: dict           # target -> _Pair | reason
    gm: Optional[fx.GraphModule] = None
    graph_ok: Optional[str] = None  # None if the graph rewrite is allowed, else why not
    sequential: bool = False


def _reason_for(name: str, allowed) -> Optional[str]:
    if name not in SUPPORTED:
        return f"unsupported activation '{name}'"
    return None if name in allowed else f"activation '{name}' not selected"


def _analyse_graph(gm: fx.GraphModule, module: nn.Module, matcher: _Matcher, allowed, calls: Counter) -> dict:
    decisions = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        sub = module.get_submodule(node.target)
        calls[id(sub)] += 1
        if not isinstance(sub, nn.Linear):
            continue
        act_node, found = matcher.follow(node, module)
        if act_node is None:
            decisions[node.target] = found
        else:
            slot = act_node.target if act_node.op == "call_module" else None
            get = (lambda k, d: getattr(module.get_submodule(slot), k, d)) if slot else act_node.kwargs.get
            decisions[node.target] = _reason_for(found, allowed) or _Pair(
                module, node.target, found, act_node, slot, _slope(get))
    return decisions


def _same(a, b) -> bool:
    if isinstance(a, _Pair) and isinstance(b, _Pair):
        return (a.linear, a.activation, a.act_slot, a.act_node.op, a.act_node.target, a.negative_slope) == \
               (b.linear, b.activation, b.act_slot, b.act_node.op, b.act_node.target, b.negative_slope)
    return a == b


def _look_at(module: nn.Module, matcher: _Matcher, allowed, calls: Counter) -> _Unit:
    """Raises when ``module``'s forward cannot be traced."""
    if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        return _walk_sequential(module, matcher, allowed, calls)
    params = list(inspect.signature(module.forward).parameters.values())
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    variadic = any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)
    variants = [(t, c) for c in ([None, defaults] if defaults else [None]) for t in (True, False)]
    local = Counter()  # calls per module: the most any one trace makes
    gms = [_trace(module, t, c) for t, c in variants]
    runs = []
    for gm in gms:
        counts = Counter()
        runs.append(_analyse_graph(gm, module, matcher, allowed, counts))
        for k, v in counts.items():
            local[k] = max(local[k], v)
    calls.update(local)
    decisions = {}
    for target in {t for run in runs for t in run}:
        found = [run.get(target) for run in runs]
        same = all(_same(found[0], f) for f in found[1:])
        decisions[target] = found[0] if same else "forward branches on training mode or optional arguments"
    graph_ok = None
    if defaults or variadic:
        graph_ok = "activation called in a forward with optional arguments"
    elif gms[0].code != gms[1].code:
        graph_ok = "forward branches on training mode"
    elif _has_hooks(module):
        graph_ok = "enclosing module has hooks"
    return _Unit(module, decisions, gms[0], graph_ok)


def _walk_sequential(seq: nn.Sequential, matcher: _Matcher, allowed, calls: Counter) -> _Unit:
    """Sequential's forward feeds child i's output to child i + 1 only: no trace needed."""
    names = list(seq._modules)
    decisions = {}
    for i, name in enumerate(names):
        calls[id(seq._modules[name])] += 1
        if not isinstance(seq._modules[name], nn.Linear):
            continue
        j = i + 1
        while j < len(names) and _is_noop_module(seq._modules[names[j]]):
            j += 1
        found = matcher.module_activation(seq._modules[names[j]]) if j < len(names) else None
        decisions[name] = ("no activation after it" if found is None
                           else _reason_for(found, allowed) or _Pair(
                               seq, name, found, act_slot=names[j],
                               negative_slope=_slope(lambda k, d: getattr(seq._modules[names[j]], k, d))))
    return _Unit(seq, decisions, graph_ok="activation module used elsewhere", sequential=True)


def _containers_below(module: nn.Module):
    """The modules ``module``'s forward calls directly: its children, looking into containers."""
    for child in module.children():
        yield child
        if not _has_forward(child):
            yield from _containers_below(child)


def plan(root: nn.Module, allowed=SUPPORTED):
    """(records, swaps, graphs): what fuse would do; nothing is changed."""
    matcher, calls = _Matcher(), Counter()
    slots = Counter(id(m) for _, m in root.named_modules(remove_duplicate=False))
    parents = {id(c): (m, n) for m in root.modules() for n, c in m.named_children()}
    has_linear: dict[int, bool] = {}

    def holds_linear(m):
        if id(m) not in has_linear:
            has_linear[id(m)] = any(isinstance(c, nn.Linear) or holds_linear(c) for c in m.children())
        return has_linear[id(m)]

    units, unseen = [], set()  # unseen: called by a forward that could not be traced
    for m in root.modules():
        if not _has_forward(m) or isinstance(m, (nn.Linear, FusedLinearAct)) or not holds_linear(m):
            continue
        try:
            units.append(_look_at(m, matcher, allowed, calls))
        except Exception:
            unseen.update(id(c) for c in _containers_below(m))

    decided: dict[int, str | _Pair] = {}
    swaps, graphs = [], []
    for unit in units:
        needs_graph, unit_pairs = False, []
        for target, d in unit.decisions.items():
            lin = unit.module.get_submodule(target)
            if type(lin) is not nn.Linear:
                d = "subclass of nn.Linear"
            elif _has_hooks(lin):
                d = "has hooks"
            elif id(lin) in unseen:
                d = "untraceable forward"
            elif calls[id(lin)] != 1 or slots[id(lin)] != 1:
                d = "called more than once"
            elif isinstance(d, _Pair):
                act = unit.module.get_submodule(d.act_slot) if d.act_slot is not None else None
                if act is not None and _has_hooks(act):
                    d = "has hooks"
                elif act is not None and calls[id(act)] == slots[id(act)] and (unit.sequential or slots[id(act)] == 1) \
                        and id(act) not in unseen and next(act.parameters(), None) is None \
                        and next(act.buffers(), None) is None:
                    pass  # swap: a Sequential calls each slot once, even when one module fills two
                elif unit.graph_ok is not None:
                    d = unit.graph_ok
                else:
                    d.act_slot = None  # the graph rewrite removes the call, not the module
                    needs_graph = True
                if isinstance(d, _Pair):
                    unit_pairs.append(d)
            decided.setdefault(id(lin), d)
        if needs_graph and unit.module is not root and slots[id(unit.module)] != 1:
            for p in unit_pairs:
                if p.act_slot is None:
                    decided[id(unit.module.get_submodule(p.linear))] = "enclosing module used more than once"
            unit_pairs = [p for p in unit_pairs if p.act_slot is not None]
            needs_graph = False
        if needs_graph:
            graphs.append((unit, unit_pairs, parents.get(id(unit.module))))
        else:
            swaps.extend(unit_pairs)

    records = []
    for name, m in root.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        d = decided.get(id(m))
        if d is None:
            d = ("subclass of nn.Linear" if type(m) is not nn.Linear else "no activation after it" if m is root
                 else "untraceable forward" if id(m) in unseen else "not called in a traced forward")
        records.append(FuseRecord(name, d.activation, "fused") if isinstance(d, _Pair) else FuseRecord(name, None, d))
    depth = {id(m): n.count(".") + (n != "") for n, m in root.named_modules()}
    graphs.sort(key=lambda g: -depth[id(g[0].module)])
    return records, swaps, graphs


# --- rewriting ----------------------------------------------------------------------------------

def _fused(linear: nn.Linear, pair: _Pair, recompute: bool, backend: str) -> FusedLinearAct:
    return fused_layer_from_linear(linear, pair.activation, negative_slope=pair.negative_slope, recompute=recompute,
                                   backend=backend)


def _set_copied(module: nn.Module, target: str, new: nn.Module) -> None:
    """``module.<target> = new``, copying the containers on the way (the original keeps its own)."""
    *path, last = target.split(".")
    for p in path:
        child = copy.copy(module._modules[p])
        child._modules = dict(child._modules)
        module._modules[p], module = child, child
    module._modules[last] = new


def _graph_module(unit: _Unit, pairs, recompute: bool, backend: str) -> fx.GraphModule:
    src, gm = unit.module, unit.gm
    gm._modules = dict(src._modules)
    gm._parameters, gm._buffers = dict(src._parameters), dict(src._buffers)
    gm._non_persistent_buffers_set = set(src._non_persistent_buffers_set)
    gm.training = src.training
    for p in pairs:
        _set_copied(gm, p.linear, _fused(src.get_submodule(p.linear), p, recompute, backend))
        p.act_node.replace_all_uses_with(p.act_node.args[0])
        gm.graph.erase_node(p.act_node)
    gm.graph.lint()
    gm.recompile()
    return gm


def apply(root: nn.Module, swaps, graphs, *, recompute: bool, backend: str) -> nn.Module:
    for p in swaps:
        (lin_parent, lin_name), (act_parent, act_name) = _split(p.owner, p.linear), _split(p.owner, p.act_slot)
        lin_parent._modules[lin_name] = _fused(lin_parent._modules[lin_name], p, recompute, backend)
        act_parent._modules[act_name] = nn.Identity()
    for unit, pairs, parent in graphs:  # deepest first: a parent copies its children's rewrites
        gm = _graph_module(unit, pairs, recompute, backend)
        if unit.module is root:
            return gm
        parent[0]._modules[parent[1]] = gm
    return root


def _split(owner: nn.Module, target: str):
    prefix, _, name = target.rpartition(".")
    return (owner.get_submodule(prefix) if prefix else owner), name
