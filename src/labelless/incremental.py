"""Recompute only what changes: split a model at a layer into a prefix and a suffix.

When one layer's weights change, everything the forward pass computes before that layer
(and every value that does not depend on it, such as the other branch of a residual
block) stays the same. With the model traced by ``torch.fx``, :func:`split` returns two
callables: ``prefix(x)`` computes the values the layer's dependants need from outside
(the *frontier*), ``suffix(*frontier)`` computes the output from them. A sweep runs the
prefix once per batch and the suffix once per candidate weight. Models ``torch.fx``
cannot trace fall back to an empty prefix and the whole model as the suffix.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch
from torch import fx, nn

__all__ = ["Splitter"]

log = logging.getLogger(__name__)


class Splitter:
    """Prefix/suffix pairs for the layers of one model (traced once).

    Example:
        >>> prefix, suffix = Splitter(model).split("layer3.0.conv1")
        >>> torch.equal(suffix(*prefix(x)), model(x))
        True
    """

    def __init__(self, model: nn.Module):
        self.model = model
        try:
            self.graph_module: fx.GraphModule | None = fx.symbolic_trace(model)
        except Exception as exc:  # untraceable forward: fall back to whole-model evaluation
            log.info("torch.fx cannot trace %s (%s): the sweep recomputes whole forward passes",
                     type(model).__name__, type(exc).__name__)
            self.graph_module = None

    def split(self, fqn: str) -> tuple[Callable[..., tuple], Callable[..., torch.Tensor]]:
        if self.graph_module is None:
            return (lambda x: (x,)), self.model
        graph = self.graph_module.graph
        calls = [n for n in graph.nodes if n.op == "call_module" and n.target == fqn]
        if not calls:
            return (lambda x: (x,)), self.model
        changed = _descendants(calls) | {n for n in graph.nodes if n.op == "output"}
        frontier = [n for n in graph.nodes if n not in changed and n.op != "get_attr" and any(u in changed for u in n.users)]
        prefix = fx.GraphModule(self.graph_module, _prefix_graph(graph, frontier))
        suffix = fx.GraphModule(self.graph_module, _suffix_graph(graph, frontier, changed))
        return prefix, suffix


def _descendants(starts: list[fx.Node]) -> set[fx.Node]:
    return _closure(starts, lambda node: node.users)


def _ancestors(ends: list[fx.Node]) -> set[fx.Node]:
    return _closure(ends, lambda node: node.all_input_nodes)


def _closure(starts: list[fx.Node], neighbours: Callable[[fx.Node], Iterable[fx.Node]]) -> set[fx.Node]:
    """``starts`` and every node reachable from them through ``neighbours``."""
    seen, stack = set(starts), list(starts)
    while stack:
        for node in neighbours(stack.pop()):
            if node not in seen:
                seen.add(node)
                stack.append(node)
    return seen


def _prefix_graph(graph: fx.Graph, frontier: list[fx.Node]) -> fx.Graph:
    needed = _ancestors(frontier)
    prefix, env = fx.Graph(), {}
    for node in graph.nodes:
        if node in needed:
            env[node] = prefix.node_copy(node, lambda n: env[n])
    prefix.output(tuple(env[n] for n in frontier))
    return prefix


def _suffix_graph(graph: fx.Graph, frontier: list[fx.Node], changed: set[fx.Node]) -> fx.Graph:
    suffix, env = fx.Graph(), {}
    for node in frontier:
        env[node] = suffix.placeholder(f"frontier_{len(env)}")
    for node in graph.nodes:
        if node in changed or (node.op == "get_attr" and any(u in changed for u in node.users)):
            env[node] = suffix.node_copy(node, lambda n: env[n])
    return suffix
