"""How deep a JSON schema nests once its `$ref`s are followed.

The body's nesting limit bounds one JSON value, not a chain of references: a 1 MB schema of 1,000
definitions, each holding a property that refers to the next, made llguidance's compiler (native
code, recursing once per level) overflow its stack, and a segmentation fault ended the whole
server. So the depth a compiler can reach is measured first: along the longest chain of
references, each definition's own nesting depth, and for definitions that refer to each other in
a cycle, all of the cycle's members (a compiler may enter every one of them before it meets one
it has seen). Strongly connected components (Tarjan's algorithm, without recursion) give those
cycles, and the chain is the longest path through them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .schema_finite import reference_targets, references_in

ROOT = ""  # the schema itself, as a node beside its references


def reference_depth(schema: Any) -> int:
    """The deepest nesting a compiler that follows `$ref`s can meet in `schema`."""
    nodes = {ROOT: schema, **reference_targets(schema)}
    edges = {name: sorted(set(references_in(node)) & nodes.keys()) for name, node in nodes.items()}
    components = list(_strongly_connected(edges))
    component_of = {name: index for index, members in enumerate(components) for name in members}
    deepest: list[int] = []
    for index, members in enumerate(components):  # Tarjan's order: successors come first
        onward = [
            deepest[component_of[target]]
            for name in members
            for target in edges[name]
            if component_of[target] != index
        ]
        deepest.append(sum(json_depth(nodes[name]) for name in members) + max(onward, default=0))
    return deepest[component_of[ROOT]]


def json_depth(value: Any) -> int:
    """Levels of objects and arrays in `value` (a scalar is 0), walked without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        )
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _strongly_connected(edges: dict[str, list[str]]) -> Iterator[list[str]]:
    """Tarjan's strongly connected components, each after every component it reaches."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    for start, first_children in edges.items():
        if start in index:
            continue
        work = [(start, iter(first_children))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            name, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[name])
                if low[name] == index[name]:
                    yield _pop_component(stack, on_stack, name)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(edges[child])))
            elif child in on_stack:
                low[name] = min(low[name], index[child])


def _pop_component(stack: list[str], on_stack: set[str], head: str) -> list[str]:
    members = []
    while True:
        member = stack.pop()
        on_stack.discard(member)
        members.append(member)
        if member == head:
            return members
