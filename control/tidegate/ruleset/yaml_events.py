"""The YAML layer of rule sets: text to line-numbered nodes, in bounded work.

libyaml's composer (and PyYAML's) recurse once per nesting level with no
limit: `rules: ` followed by 50,000 `[` crashes the process (SIGSEGV) before
any depth check on the composed tree can run. So no recursive code sees the
text here. libyaml's parser is a state machine with its own stack; its
events are composed by a loop with an explicit stack that stops at
MAX_DEPTH nested collections and at `max_values` values, so the work and
the memory a text costs are bounded by those limits, whatever it holds.

Anchors are allowed; aliases are refused (an alias is the anchored value
again: the way YAML bombs multiply a small text into a huge tree).

Large lists of CIDRs come as one line, `allow: ["10.0.0.0/24", ...]` (or
plain IPv4 items, as dump.py writes them): libyaml makes three objects per
item (an event and its two marks), most of the time a 100,000-CIDR text
costs. So such a line is found by one pattern (quoted items of address
characters, or plain ones holding a '/', which YAML can only read as text),
the text is composed with `[]` in its place, and the empty list that
appears exactly there is given the items. This is taken only when it is
the same tree: every placeholder came back as a list, none as a key, and
the text composed without a problem; otherwise the original text is
composed event by event, so every error is the one it has always been
(tests/unit/test_yaml_flow_lists.py compares both on odd and hostile text).
"""

from __future__ import annotations

import re
from typing import Callable

import yaml

# Nested collections (mappings and lists, the document's own mapping
# included): a rule set needs 4 (rules -> a rule -> its limit -> values).
MAX_DEPTH = 8

_PARSER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~10x faster
_RESOLVER = yaml.resolver.Resolver()  # plain scalars' implicit tags, as safe loading does
_SCALARS = yaml.SafeLoader("")
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_BOOL_TAG = "tag:yaml.org,2002:bool"
_NULL_TAG = "tag:yaml.org,2002:null"
# one item of a list of CIDRs: quoted address characters (no escapes, no quote inside: the text is the
# value), or a plain IPv4 CIDR (a '/' in it: no YAML 1.1 implicit type reads it as anything but text)
_CIDR_ITEM = r"(?:\"[0-9A-Fa-f.:/]+\"|'[0-9A-Fa-f.:/]+'|[0-9][0-9.]*/[0-9]+)"
# (the items possessively: no state kept to give one back, which a `]` after a whole item never needs;
# kept, it is megabytes for a 100,000-item line, fresh pages in the agent: 3x the time)
_FLOW_CIDRS = re.compile(rf"\[ *{_CIDR_ITEM}(?: *, *{_CIDR_ITEM})*+ *\]")
_ITEM_TEXT = re.compile(r"[0-9A-Fa-f.:/]+")  # (read from the text itself: no copy of a 2 MB line)
FLOW_LIST_MIN = 64  # items; a shorter list is composed event by event like the rest
_SKIP = object()  # the value of a refused key: composed (to stay in step), then dropped
_KEY_NODE = object()  # a collection is being composed as a key: refused, and its value dropped


class Node:
    """A value with the line it came from (None for plain data input)."""

    __slots__ = ("value", "line", "kind")

    def __init__(self, value, line, kind):
        self.value = value
        self.line = line
        self.kind = kind  # map | seq | scalar


_NODE_VALUE = Node.value  # the slot, for TextItems


class TextItems(Node):
    """A one-line list composed from its items (compose's lists of CIDRs):
    `texts`, the items as they stand, each a text scalar on the list's line.
    Its item nodes (`value`) are made when first read: a large allow list is
    read from `texts` alone (parse._networks)."""

    __slots__ = ("texts",)

    def __init__(self, texts: list[str], line: int):
        self.texts, self.line, self.kind = texts, line, "seq"

    @property
    def value(self) -> list[Node]:
        try:
            return _NODE_VALUE.__get__(self)
        except AttributeError:
            items = [Node(v, self.line, "scalar") for v in self.texts]
            _NODE_VALUE.__set__(self, items)
            return items

    @value.setter
    def value(self, items: list[Node]) -> None:
        _NODE_VALUE.__set__(self, items)


class TextError(Exception):
    """The text cannot be a rule set at all (too deep, too many values, an
    alias, a second document): one error, nothing composed further."""

    def __init__(self, line: int | None, message: str):
        super().__init__(message)
        self.line = line
        self.message = message


AddError = Callable[[str, Node, str], None]


def depth_error(line: int | None) -> TextError:
    return TextError(line, f"nested more than {MAX_DEPTH} levels deep: the depth limit of a rule set is "
                           f"{MAX_DEPTH} (it needs 4: the document, rules, a rule, its limit)")  # fmt: skip


def scalar(tag: str, text: str):
    """A scalar's value, resolved like YAML 1.1 safe loading but keeping the
    type honest: text that does not convert stays text."""
    if tag == _INT_TAG:
        try:
            return _SCALARS.construct_yaml_int(yaml.ScalarNode(tag, text))
        except Exception:
            return text
    if tag == _FLOAT_TAG:
        try:
            return float(_SCALARS.construct_yaml_float(yaml.ScalarNode(tag, text)))
        except Exception:
            return text
    if tag == _BOOL_TAG:
        return text.lower() in ("yes", "true", "on", "y")
    if tag == _NULL_TAG:
        return None
    return text


class _Open:
    """A collection being composed."""

    __slots__ = ("node", "path", "key", "report")

    def __init__(self, node: Node, path: str, report: bool):
        self.node = node
        self.path = path
        self.key = None  # maps: the key whose value comes next (None: a key comes next; _SKIP: drop it)
        self.report = report  # False inside a dropped value: its problems are not the document's

    def child_path(self, index_or_key) -> str:
        if self.node.kind == "seq":
            return f"{self.path}[{index_or_key}]"
        return f"{self.path}.{index_or_key}" if self.path else str(index_or_key)


def compose(text: str, add_error: AddError, max_values: int) -> Node | None:
    """The document's root node (None for an empty text). Field problems
    (duplicate keys, keys that are not names) go to add_error and the rest
    is still composed; TextError for what stops the whole text;
    yaml.YAMLError for syntax errors."""
    lists = _cidr_lists(text)
    if lists:
        root = _compose_lists(text, lists, max_values)
        if root is not None:
            return root
    return _compose_text(text, add_error, max_values)


def _compose_text(text: str, add_error: AddError, max_values: int, lists: dict | None = None) -> Node | None:
    loader = _PARSER(text)
    try:
        return _compose(loader, add_error, max_values, lists)
    finally:
        loader.dispose()


def _cidr_lists(text: str) -> list[re.Match]:
    """The one-line lists of CIDRs in `text` long enough to be worth composing apart."""
    if len(text) < FLOW_LIST_MIN * 8:
        return []
    return [m for m in _FLOW_CIDRS.finditer(text) if text.count(",", m.start(), m.end()) >= FLOW_LIST_MIN - 1]


def _compose_lists(text: str, lists: list[re.Match], max_values: int) -> Node | None:
    """The tree of `text`, each of `lists` composed from its items directly;
    None where that might not be the tree composing `text` makes."""
    parts, items, at, shift = [], {}, 0, 0
    for m in lists:
        parts += [text[at: m.start()], "[]"]
        items[m.start() - shift] = _ITEM_TEXT.findall(text, m.start(), m.end())
        shift += len(m.group()) - 2
        at = m.end()
    parts.append(text[at:])
    problems = []
    try:
        root = _compose_text("".join(parts), lambda *a: problems.append(a), max_values, items)
    except (TextError, yaml.YAMLError):
        return None
    return None if problems or items else root


def _compose(loader, add_error: AddError, max_values: int, lists: dict | None = None) -> Node | None:
    """lists: where the text holds a `[]` standing for a list of CIDRs (character index), its items;
    each is taken out as it is composed (one left: it was not a list of the document)."""
    stack: list[_Open] = []
    root = None
    documents = 0
    values = 0
    next_event = loader.get_event  # None after the last (check_event first would cost a call per event)
    while (ev := next_event()) is not None:
        t = type(ev)
        if t is yaml.ScalarEvent and stack and stack[-1].node.kind == "seq" and ev.tag is None and not ev.implicit[0]:
            # the bulk of a large rule set: a quoted item of a list (a CIDR), text as it stands
            values += 1
            if values > max_values:
                raise _too_many(ev.start_mark.line + 1, max_values)
            stack[-1].node.value.append(Node(ev.value, ev.start_mark.line + 1, "scalar"))
            continue
        if t is yaml.ScalarEvent or t is yaml.MappingStartEvent or t is yaml.SequenceStartEvent:
            line = ev.start_mark.line + 1
            values += 1
            if values > max_values:
                raise _too_many(line, max_values)
            if not stack and root is not None:
                raise TextError(line, "more than one YAML document")
            top = stack[-1] if stack else None
            if t is yaml.ScalarEvent:
                if top is not None and top.node.kind == "map" and top.key is None:  # a key
                    _key(top, ev.value, line, add_error)
                    continue
                tag = ev.tag
                if tag is None or tag == "!":
                    tag = _RESOLVER.resolve(yaml.ScalarNode, ev.value, ev.implicit)
                node = Node(scalar(tag, ev.value), line, "scalar")
                if top is None:
                    root = node
                else:
                    _attach(top, node)
                continue
            if len(stack) >= MAX_DEPTH:
                raise depth_error(line)
            node = Node({} if t is yaml.MappingStartEvent else [], line,
                        "map" if t is yaml.MappingStartEvent else "seq")  # fmt: skip
            if lists and t is yaml.SequenceStartEvent and ev.start_mark.index in lists:
                texts = lists.pop(ev.start_mark.index)
                values += len(texts)
                if values > max_values:
                    raise _too_many(line, max_values)
                node = TextItems(texts, line)
            if top is None:
                stack.append(_Open(node, "", True))
            elif top.node.kind == "map" and top.key is None:  # a collection as a key
                top.key = _KEY_NODE
                if top.report:
                    add_error(top.path, Node(None, line, "scalar"), "mapping keys must be plain names")
                stack.append(_Open(node, top.path, False))
            else:
                dropped = top.key is _SKIP
                at = len(top.node.value) if top.node.kind == "seq" else "" if dropped else shown_key(top.key)
                stack.append(_Open(node, top.path if dropped else top.child_path(at), top.report and not dropped))
        elif t is yaml.MappingEndEvent or t is yaml.SequenceEndEvent:
            done = stack.pop()
            if not stack:
                root = done.node
            else:
                _attach(stack[-1], done.node)
        elif t is yaml.AliasEvent:
            raise TextError(ev.start_mark.line + 1, "YAML anchors and aliases are not allowed in rule sets")
        elif t is yaml.DocumentStartEvent:
            documents += 1
            if documents > 1 and root is not None:
                raise TextError(ev.start_mark.line + 1, "more than one YAML document")
    return root


def _too_many(line: int, max_values: int) -> TextError:
    return TextError(line, f"more than {max_values:,} values (keys, items and entries): more than "
                           "the largest rule set the kernel holds needs")  # fmt: skip


def _key(top: _Open, key: str, line: int, add_error: AddError) -> None:
    m = top.node.value
    if key in m:
        if top.report:
            add_error(top.child_path(shown_key(key)), Node(None, line, "scalar"),
                      f"duplicate key (first on line {m[key].line})")  # fmt: skip
        top.key = _SKIP
    else:
        top.key = key


def _attach(top: _Open, node: Node) -> None:
    if top.node.kind == "seq":
        top.node.value.append(node)
        return
    if top.key is _KEY_NODE:  # a collection key just ended: its value comes next, and is dropped
        top.key = _SKIP
        return
    if top.key is not _SKIP:
        top.node.value[top.key] = node
    top.key = None


def shown_key(key: str, limit: int = 64) -> str:
    """A key as it appears in an error's path: long keys are cut."""
    return key if len(key) <= limit else key[:limit] + "..."
