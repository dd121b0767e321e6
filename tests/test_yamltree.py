"""gateway.config.yamltree: libyaml's events into the very tree PyYAML's pure composer builds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from yaml.nodes import Node

from gateway.config import yamltree

ROOT = Path(__file__).resolve().parent.parent

DOCUMENTS = [
    "",
    "# only a comment\n",
    "key:\n",
    "listen: 0.0.0.0:8080\nadmin: {listen: '127.0.0.1:8081', token_env: TOKEN}\n",
    "routes:\n  - prefix: /a\n    service: a\n  - {prefix: /b, service: b, strip_prefix: yes}\n",
    "defaults: &d {timeout: 5s, retries: 2}\nroutes:\n  - {prefix: /a, service: a}\n"
    "other: *d\nmerged:\n  <<: *d\n  retries: 3\n",
    "typed: !!str 123\nnumber: 0x1F\nfloat: 1.5e3\nnull: ~\nbool: off\nlocal: !custom x\n",
    "bang: ! 12\n",
    "block: |\n  line one\n  line two\nfolded: >-\n  a\n  b\n",
    "quoted: 'it''s'\ndouble: \"tab\\there\"\n",
    "- 1\n- [2, 3, {four: 4}]\n- - nested\n  - block\n",
    "? complex key\n: value\n",
    "---\nexplicit: document\n...\n",
    "%YAML 1.1\n---\nversion: directive\n",
    "emoji: \U0001f600\n",
]


def dump(node: Node | None, seen: dict[int, int] | None = None) -> Any:
    """A node as plain data: tag, value, marks and style, shared nodes once."""
    if node is None:
        return None
    seen = {} if seen is None else seen
    if id(node) in seen:
        return ("alias", seen[id(node)])
    seen[id(node)] = len(seen)
    marks = (node.start_mark.line, node.start_mark.column, node.end_mark.line)
    if isinstance(node.value, str):
        return (node.tag, node.value, marks, getattr(node, "style", None))
    if isinstance(node, yaml.MappingNode):
        value: Any = [(dump(k, seen), dump(v, seen)) for k, v in node.value]
    else:
        value = [dump(item, seen) for item in node.value]
    return (type(node).__name__, node.tag, value, marks, node.flow_style)


def pure(text: str) -> Node | None:
    return yaml.compose(text, Loader=yaml.SafeLoader)


@pytest.mark.parametrize("text", DOCUMENTS)
def test_the_tree_is_the_pure_composers(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = dump(pure(text))
    # The fast path alone: no fallback to the pure composer for a valid document.
    monkeypatch.setattr(yaml, "compose", None)
    assert dump(yamltree.compose(text)) == expected


def test_shipped_routes_yaml_composes_alike() -> None:
    text = (ROOT / "routes.yaml").read_text()
    assert dump(yamltree.compose(text)) == dump(pure(text))


@pytest.mark.parametrize(
    "text",
    [
        "a: *nowhere\n",
        "a: &x 1\nb: &x 2\n",
        "---\na: 1\n---\nb: 2\n",
        "routes:\n\t- x\n",
        "a: [1, 2\n",
        "a: 'open\n",
    ],
)
def test_errors_are_the_pure_composers(text: str) -> None:
    with pytest.raises(yaml.YAMLError) as expected:
        pure(text)
    with pytest.raises(yaml.YAMLError) as got:
        yamltree.compose(text)
    assert str(got.value) == str(expected.value)


def test_deep_nesting_is_left_to_the_pure_composer() -> None:
    """libyaml slows quadratically with depth and its composer recurses in C: past
    MAX_DEPTH the pure composer takes over (and gives up with RecursionError)."""
    depth = yamltree.MAX_DEPTH + 1
    text = "[" * depth + "]" * depth
    assert dump(yamltree.compose(text)) == dump(pure(text))
    with pytest.raises(RecursionError):
        yamltree.compose("[" * 100_000 + "]" * 100_000)


def test_dismantle_empties_every_collection_once() -> None:
    """The tree is taken apart node by node (so a reload thread never frees it in one
    long cascade); shared (aliased) nodes are met twice and must not trip it."""
    root = yamltree.compose("a: &x [1, {b: [2, 3]}]\nc: *x\nd: {e: f}\n")
    assert root is not None
    collections = []
    stack: list[Node] = [root]
    while stack:
        node = stack.pop()
        if isinstance(node.value, list):
            collections.append(node)
            for child in node.value:
                stack.extend(child if isinstance(child, tuple) else (child,))
    yamltree.dismantle(root)
    assert collections and all(node.value == [] for node in collections)
    yamltree.dismantle(None)
