"""Whether a JSON schema has a finite valid value, its local `$ref`s followed.

llguidance refuses a schema that is unsatisfiable on its face (`false`, an empty `enum`, a minimum
above its maximum, a required property that is `false`), but it compiles one whose only values
would be infinite: a `$ref` loop with no way out (`{"$defs": {"n": {"$ref": "#/$defs/n"}},
"$ref": "#/$defs/n"}`) or an object that requires itself. Such a grammar has no sentence:
generation ends at once with nothing, or runs on until the parser's depth limit breaks it. And
llguidance quietly drops an unsatisfiable `anyOf` branch, which can leave only a looping one.

The answer is a least fixpoint over the references: every reference starts as "no finite value"
and becomes finite once its schema has a finite value given the references already known finite,
until nothing changes (a worklist, so each reference is looked at again only when one it uses
became finite). Keywords not modelled here count as satisfiable: only what is proven to have no
finite value is refused.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

ALL_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
COMBINATORS = ("allOf", "anyOf", "oneOf")


def has_finite_instance(schema: Any) -> bool:
    """True unless `schema` provably admits no finite JSON value."""
    return _Finiteness(schema).of_root()


class _Finiteness:
    def __init__(self, root: Any) -> None:
        self.root = root
        self.targets = reference_targets(root)
        self.known: set[str] = set()

    def of_root(self) -> bool:
        self._settle_references()
        return self.finite(self.root)

    def _settle_references(self) -> None:
        users: dict[str, set[str]] = {ref: set() for ref in self.targets}
        for ref, target in self.targets.items():
            for used in references_in(target):
                if used in users:
                    users[used].add(ref)
        pending = list(self.targets)
        while pending:
            ref = pending.pop()
            if ref not in self.known and self.finite(self.targets[ref]):
                self.known.add(ref)
                pending.extend(user for user in users[ref] if user not in self.known)

    def finite(self, node: Any) -> bool:
        if isinstance(node, bool):
            return node
        if not isinstance(node, dict):
            return True  # not a schema: llguidance's to refuse
        if not (self._reference_finite(node) and self._combinators_finite(node)):
            return False
        types = _allowed_types(node)
        if "const" in node:
            return _fits_types(node["const"], types)
        enum = node.get("enum")
        if isinstance(enum, list):
            return any(_fits_types(value, types) for value in enum)
        return any(self._type_finite(kind, node) for kind in types)

    def _reference_finite(self, node: dict[str, Any]) -> bool:
        ref = node.get("$ref")
        return not (isinstance(ref, str) and ref in self.targets and ref not in self.known)

    def _combinators_finite(self, node: dict[str, Any]) -> bool:
        for key in COMBINATORS:
            branches = node.get(key)
            if not isinstance(branches, list):
                continue
            check = all if key == "allOf" else any
            if not check(self.finite(branch) for branch in branches):
                return False
        return True

    def _type_finite(self, kind: str, node: dict[str, Any]) -> bool:
        if kind == "object":
            return self._object_finite(node)
        if kind == "array":
            return self._array_finite(node)
        if kind == "string":
            return _at_most(node.get("minLength"), node.get("maxLength"))
        if kind in ("number", "integer"):
            return _number_range_holds(node, integer=kind == "integer")
        return True

    def _object_finite(self, node: dict[str, Any]) -> bool:
        required = node.get("required")
        names = (
            [name for name in required if isinstance(name, str)]
            if isinstance(required, list)
            else []
        )
        if not _at_most(node.get("minProperties"), node.get("maxProperties")):
            return False
        if not _at_most(len(set(names)), node.get("maxProperties")):
            return False
        return all(
            self.finite(schema) for name in names for schema in _property_schemas(node, name)
        )

    def _array_finite(self, node: dict[str, Any]) -> bool:
        min_items = node.get("minItems", 0)
        if not _at_most(min_items, node.get("maxItems")):
            return False
        prefix, rest = _item_schemas(node)
        needed = min_items if isinstance(min_items, int) else 0
        if not all(self.finite(schema) for schema in prefix[:needed]):
            return False
        if needed > len(prefix) and not self.finite(rest):
            return False
        contains = node.get("contains")
        wanted = node.get("minContains", 1)
        return contains is None or wanted == 0 or self.finite(contains)


_MISSING = object()


def reference_targets(root: Any) -> dict[str, Any]:
    """Every local `$ref` in the schema (in `$defs` too) and the subschema it names."""
    targets: dict[str, Any] = {}
    for ref in references_in(root):
        if ref not in targets:
            target = resolve_pointer(root, ref)
            if target is not _MISSING:
                targets[ref] = target
    return targets


def resolve_pointer(root: Any, ref: str) -> Any:
    """The subschema a local reference (`#`, `#/$defs/a~1b`) names; _MISSING for any other."""
    if ref != "#" and not ref.startswith("#/"):
        return _MISSING  # an anchor or another document: not followed here
    node = root
    for raw in ref[2:].split("/") if ref != "#" else ():
        step = unquote(raw).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and step in node:
            node = node[step]
        elif isinstance(node, list) and step.isascii() and step.isdigit() and int(step) < len(node):
            node = node[int(step)]
        else:
            return _MISSING
    return node


def references_in(node: Any) -> Iterator[str]:
    """Every `$ref` string anywhere inside `node`."""
    stack = [node]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            ref = value.get("$ref")
            if isinstance(ref, str):
                yield ref
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


def _allowed_types(node: dict[str, Any]) -> frozenset[str]:
    """The types `type` allows, narrowed by the `type` of each `allOf` branch."""
    allowed = _declared_types(node)
    for branch in node.get("allOf") or ():
        if isinstance(branch, dict):
            allowed &= _declared_types(branch)
    return allowed


def _declared_types(node: dict[str, Any]) -> frozenset[str]:
    declared = node.get("type")
    if isinstance(declared, str):
        declared = [declared]
    if not isinstance(declared, list):
        return ALL_TYPES
    kinds = {kind for kind in declared if kind in ALL_TYPES}
    if "number" in kinds:
        kinds.add("integer")
    return frozenset(kinds)


def _fits_types(value: Any, types: frozenset[str]) -> bool:
    if isinstance(value, bool):
        kinds = {"boolean"}
    elif isinstance(value, int):
        kinds = {"integer", "number"}
    elif isinstance(value, float):
        kinds = {"number", "integer"} if value.is_integer() else {"number"}
    else:
        kinds = {_JSON_TYPES.get(type(value), "")}
    return bool(kinds & types)


_JSON_TYPES = {str: "string", list: "array", dict: "object", type(None): "null"}


def _property_schemas(node: dict[str, Any], name: str) -> list[Any]:
    """Every schema a property called `name` must match."""
    properties = node.get("properties")
    if isinstance(properties, dict) and name in properties:
        return [properties[name]]
    patterns = node.get("patternProperties")
    matching = [
        schema
        for pattern, schema in (patterns.items() if isinstance(patterns, dict) else ())
        if _matches(pattern, name)
    ]
    return matching or [node.get("additionalProperties", True)]


def _matches(pattern: str, name: str) -> bool:
    try:
        return re.search(pattern, name) is not None
    except re.error:
        return True  # a pattern Python cannot read: assume it applies (llguidance judges it)


def _item_schemas(node: dict[str, Any]) -> tuple[list[Any], Any]:
    """The schemas of the first items and the schema of every item after them."""
    items = node.get("items", True)
    if isinstance(node.get("prefixItems"), list):
        return list(node["prefixItems"]), items
    if isinstance(items, list):  # draft 4-7 tuple form
        return list(items), node.get("additionalItems", True)
    return [], items


def _at_most(low: Any, high: Any) -> bool:
    """`low <= high`, where either bound may be absent (or not a number: not judged here)."""
    if not _is_number(low) or not _is_number(high):
        return True
    return bool(low <= high)


def _number_range_holds(node: dict[str, Any], *, integer: bool) -> bool:
    low, low_open = _bound(node, "minimum", "exclusiveMinimum", max)
    high, high_open = _bound(node, "maximum", "exclusiveMaximum", min)
    if low is None or high is None:
        return True
    if integer:
        return bool(_first_integer(low, low_open) <= _last_integer(high, high_open))
    return bool(low < high if (low_open or high_open) else low <= high)


def _first_integer(low: float, is_open: bool) -> int:
    """The least integer above `low` (or at it, unless open); exact for huge integers."""
    whole = isinstance(low, int) or low.is_integer()
    return (int(low) + 1 if is_open else int(low)) if whole else math.ceil(low)


def _last_integer(high: float, is_open: bool) -> int:
    whole = isinstance(high, int) or high.is_integer()
    return (int(high) - 1 if is_open else int(high)) if whole else math.floor(high)


def _bound(node: dict[str, Any], inclusive: str, exclusive: str, tighter: Any) -> tuple[Any, bool]:
    """The tightest bound of one side, and whether it is open."""
    bounds = []
    if _is_number(node.get(inclusive)):
        bounds.append((node[inclusive], False))
    if _is_number(node.get(exclusive)):  # draft 6+: a number; draft 4's boolean is ignored
        bounds.append((node[exclusive], True))
    if not bounds:
        return None, False
    value = tighter(bound for bound, _ in bounds)
    return value, any(bound == value and is_open for bound, is_open in bounds)


def _is_number(value: Any) -> bool:
    """A JSON number: an int of any size (never converted to float), or a finite float."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
