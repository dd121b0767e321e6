"""YAML text into the node tree PyYAML's composer gives, ~10x faster where libyaml exists.

``yaml.compose`` with the pure-Python SafeLoader takes ~9 s on a 10,000-route file
(most of `gateway check` and of a reload). libyaml's CSafeLoader composes in C by
recursion (a deeply nested document crashes the process), so only its event parser is
used here, and the tree is built from the events by a loop with an explicit stack.
Whatever the fast path does not accept (any error, several documents, nesting deeper
than MAX_DEPTH) is composed again
by the pure-Python loader, so that messages and line numbers stay exactly its own (an
error is reported in the pure loader's time: ~9 s for a mistake at the end of 10,000
routes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

try:
    from yaml import CSafeLoader as _EventLoader
except ImportError:  # PyYAML built without libyaml
    _EventLoader = None  # type: ignore[assignment, misc]

_resolve: Callable[[type[Node], str | None, Any], str] = yaml.resolver.Resolver().resolve
# libyaml's event parser slows quadratically with nesting (20,000 levels: 2.7 s), and no
# config is more than a few levels deep: past this, the pure loader says "too deep".
MAX_DEPTH = 100


class _Unsupported(Exception):
    """Left to the pure-Python composer, which reports it in its own words."""


def compose(text: str) -> Node | None:
    """The single document in ``text`` as nodes (None when empty), or yaml.YAMLError."""
    if _EventLoader is not None:
        try:
            return _compose_events(yaml.parse(text, Loader=_EventLoader))
        except (yaml.YAMLError, _Unsupported):
            pass  # the pure composer below finds the same problem and words it
    return yaml.compose(text, Loader=yaml.SafeLoader)


def _compose_events(events: Iterable[Any]) -> Node | None:
    anchors: dict[str, Node] = {}
    # Each open collection: its node and, for a mapping, the key awaiting its value.
    stack: list[list[Any]] = []
    root: Node | None = None
    documents = 0

    def add(node: Node) -> None:
        nonlocal root
        if not stack:
            root = node
            return
        top = stack[-1]
        parent = top[0]
        if isinstance(parent, SequenceNode):
            parent.value.append(node)
        elif top[1] is None:
            top[1] = node
        else:
            parent.value.append((top[1], node))
            top[1] = None

    def anchor(event: Any, node: Node) -> None:
        if event.anchor is not None:
            if event.anchor in anchors:
                raise _Unsupported  # a duplicate anchor
            anchors[event.anchor] = node

    for event in events:
        start: Any = getattr(event, "start_mark", None)  # libyaml's Mark, not yaml.Mark
        end: Any = getattr(event, "end_mark", None)
        if isinstance(event, yaml.ScalarEvent):
            tag = event.tag
            if tag is None or tag == "!":
                tag = _resolve(ScalarNode, event.value, event.implicit)
            node: Node = ScalarNode(tag, event.value, start, end, style=event.style or None)
            anchor(event, node)
            add(node)
        elif isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
            tag = event.tag
            is_mapping = isinstance(event, yaml.MappingStartEvent)
            kind = MappingNode if is_mapping else SequenceNode
            if tag is None or tag == "!":
                tag = _resolve(kind, None, event.implicit)
            node = kind(tag, [], start, None, flow_style=event.flow_style)
            anchor(event, node)
            add(node)
            stack.append([node, None])
            if len(stack) > MAX_DEPTH:
                raise _Unsupported
        elif isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
            stack.pop()[0].end_mark = end
        elif isinstance(event, yaml.AliasEvent):
            if event.anchor not in anchors:
                raise _Unsupported  # an undefined alias
            add(anchors[event.anchor])
        elif isinstance(event, yaml.DocumentStartEvent):
            documents += 1
            if documents > 1:
                raise _Unsupported  # "expected a single document in the stream"
    return root


def dismantle(root: Node | None) -> None:
    """Free a tree node by node. Dropped at once, a 10,000-route tree goes in one cascade
    of deallocations in C (15 ms holding the GIL: a reload thread would stall the event
    loop that long); taken apart by a Python loop, the GIL can change hands meanwhile."""
    stack: list[Any] = [] if root is None else [root]
    while stack:
        node = stack.pop()
        children = node.value
        if isinstance(children, list):
            node.value = []  # an alias met again finds it empty
            for child in children:
                if isinstance(child, tuple):
                    stack.extend(child)
                else:
                    stack.append(child)
