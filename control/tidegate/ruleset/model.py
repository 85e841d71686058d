"""The rule-set model: YAML for people, plain data for the wire, one
validated internal form in between.

Validation walks the YAML node tree (not the loaded data), so every error
names the field path and the file line. All errors are collected (up to
100) before anything is rejected; nothing reaches the kernel unless the
whole rule set is valid.
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import json
import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from tidegate.kernel.layout import MAX_RULES, PSEUDO_RULES, SLOT_CIDRS
from tidegate.ruleset import cidrs
from tidegate.ruleset.yaml_events import MAX_DEPTH, Node, TextError, compose, depth_error, shown_key as _shown_key

PROTOCOLS = ("tcp", "udp", "icmp", "icmpv6", "any")
ACTIONS = ("limit", "pass", "drop")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")  # always fullmatch: `$` accepts a final newline
RESERVED_NAMES = set(PSEUDO_RULES.values())  # the kernel's pseudo-rules
# defaults.ipv6_unparsed_extensions: IPv6 packets with more extension headers than the program walks
IPV6_EXT_POLICIES = ("drop", "pass", "default")
# The largest rule set the kernel holds (Capacity: 131,072 CIDRs) is 2.1 MB of YAML with IPv4 /24s
# in a flow list and 7.1 MB with full-length IPv6 addresses one a line; the API's message limit
# (admission.MAX_MESSAGE_BYTES) is this plus room for the request's other fields.
MAX_FILE_BYTES = 8 << 20
MAX_ERRORS = 100

MAX_PPS = 10**9
MAX_BURST = 10**9
MAX_BPS = 10**12
MAX_BURST_BYTES = 10**10
MAX_BLOCK_SECONDS = 86400
MAX_DESCRIPTION = 1024

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
ANY_SOURCES: tuple = ()


@dataclass(frozen=True)
class Capacity:
    """What the kernel maps can hold for one rule set."""

    max_rules: int = MAX_RULES
    max_cidrs: int = SLOT_CIDRS
    max_port_entries: int = 8192
    max_name_len: int = 32

    @property
    def max_values(self) -> int:
        """Values (keys, list items, entries) a rule-set text may hold: what
        the largest rule set this capacity holds needs (every CIDR, twice the
        port entries, every rule with all its keys), and some room. More is
        refused before anything is built from it."""
        return self.max_cidrs + 2 * self.max_port_entries + 64 * self.max_rules + 1024


@dataclass(frozen=True)
class FieldError:
    path: str
    line: int | None
    message: str


class RuleSetError(Exception):
    def __init__(self, errors: list[FieldError], source: str = "<string>"):
        self.errors = errors[:MAX_ERRORS]
        self.source = source[:200]  # a name: it is repeated on every error line
        super().__init__(str(self))

    def __str__(self) -> str:
        out = []
        for e in self.errors:
            where = f"{self.source}:{e.line}" if e.line else self.source
            out.append(f"{where}: {e.path or '(document)'}: {e.message}")
        return "\n".join(out)


@dataclass(frozen=True)
class Limit:
    pps: int
    burst: int
    bps: int | None = None
    burst_bytes: int | None = None


@dataclass(frozen=True)
class PrefixLimit:
    ipv4_prefix: int
    ipv6_prefix: int
    limit: Limit


@dataclass(frozen=True)
class PortRange:
    lo: int
    hi: int


@dataclass(frozen=True)
class Rule:
    name: str
    protocol: str = "any"
    dst_ports: tuple[PortRange, ...] = ()
    sources: tuple[Network, ...] = ()  # empty = any source
    action: str = "limit"
    limit: Limit | None = None  # resolved: inherits defaults.limit
    prefix_limit: PrefixLimit | None = None
    block_seconds: int = 0


@dataclass(frozen=True)
class Defaults:
    limit: Limit | None = None
    ipv4_prefix: int = 32
    ipv6_prefix: int = 64
    prefix_limit: PrefixLimit | None = None
    block_seconds: int = 0
    ipv6_unparsed_extensions: str = "drop"  # IPV6_EXT_POLICIES


@dataclass(frozen=True)
class RuleSet:
    defaults: Defaults = field(default_factory=Defaults)
    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()
    rules: tuple[Rule, ...] = ()
    canaries: tuple[Network, ...] = ()
    description: str = ""

    def rule(self, name: str) -> Rule | None:
        return next((r for r in self.rules if r.name == name), None)

    def to_dict(self) -> dict:
        """The rule set as plain data (a new dict the caller may change)."""
        return self._plain_dict()

    @cached_property
    def _plain(self) -> dict:
        """to_dict() made once (the set is frozen), for the digest and the
        canonical YAML an apply computes: read-only."""
        return self._plain_dict()

    def _plain_dict(self) -> dict:
        d: dict[str, Any] = {}
        if self.description:
            d["description"] = self.description
        dd: dict[str, Any] = {}
        if self.defaults.limit:
            dd["limit"] = _limit_dict(self.defaults.limit)
        dd["ipv4_prefix"] = self.defaults.ipv4_prefix
        dd["ipv6_prefix"] = self.defaults.ipv6_prefix
        if self.defaults.prefix_limit:
            dd["prefix_limit"] = _prefix_dict(self.defaults.prefix_limit)
        if self.defaults.block_seconds:
            dd["block_seconds"] = self.defaults.block_seconds
        if self.defaults.ipv6_unparsed_extensions != "drop":  # the default stays out: digests stay as they were
            dd["ipv6_unparsed_extensions"] = self.defaults.ipv6_unparsed_extensions
        d["defaults"] = dd
        if self.allow:
            d["allow"] = _cidr_texts(self.allow)
        if self.deny:
            d["deny"] = _cidr_texts(self.deny)
        if self.canaries:
            d["canaries"] = _cidr_texts(self.canaries)
        rules = []
        for r in self.rules:
            rd: dict[str, Any] = {"name": r.name, "protocol": r.protocol}
            if r.dst_ports:
                rd["dst_ports"] = [p.lo if p.lo == p.hi else f"{p.lo}-{p.hi}" for p in r.dst_ports]
            if r.sources:
                rd["sources"] = _cidr_texts(r.sources)
            if r.action != "limit":
                rd["action"] = r.action
            if r.action == "limit" and r.limit and r.limit != self.defaults.limit:
                rd["limit"] = _limit_dict(r.limit)
            if r.prefix_limit and r.prefix_limit != self.defaults.prefix_limit:
                rd["prefix_limit"] = _prefix_dict(r.prefix_limit)
            elif r.action == "limit" and r.prefix_limit is None and self.defaults.prefix_limit:
                rd["prefix_limit"] = None
            if r.block_seconds:
                rd["block_seconds"] = r.block_seconds
            rules.append(rd)
        d["rules"] = rules
        return d

    @cached_property
    def _digest(self) -> str:
        return hashlib.sha256(json.dumps(self._plain, sort_keys=True).encode()).hexdigest()

    def digest(self) -> str:
        return self._digest


def _cidr_texts(nets) -> list[str]:
    """str() of each network; IPv4 ones formatted here from the integer
    (ipaddress's str costs ~1.5 us each, most of a 10,000-CIDR digest)."""
    out = []
    for n in nets:
        if n.version == 4:
            a = int(n.network_address)
            out.append(f"{a >> 24}.{(a >> 16) & 255}.{(a >> 8) & 255}.{a & 255}/{n.prefixlen}")
        else:
            out.append(str(n))
    return out


def _limit_dict(limit: Limit) -> dict:
    d: dict[str, Any] = {"pps": limit.pps, "burst": limit.burst}
    if limit.bps is not None:
        d["bps"] = limit.bps
    if limit.burst_bytes is not None:
        d["burst_bytes"] = limit.burst_bytes
    return d


def _prefix_dict(p: PrefixLimit) -> dict:
    return {"ipv4_prefix": p.ipv4_prefix, "ipv6_prefix": p.ipv6_prefix, **_limit_dict(p.limit)}


def _inline(value) -> str:
    """A value in YAML flow style. The shapes a rule's fields mostly are
    (a number, a name, a limit's {pps: N, burst: N}) are written here: the
    emitter takes ~60 us a value, ~9 ms of a 50-rule set's canonical text.
    Anything else, and a word YAML would read as another type, is left to
    _emit (tests/unit/test_ruleset_errors.py compares the two)."""
    if type(value) is int:
        return str(value)
    if type(value) is str and _is_plain_word(value):
        return value
    if type(value) is dict and all(type(k) is str and _is_plain_word(k) and type(v) is int for k, v in value.items()):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    return _emit(value)


_PLAIN_WORD = re.compile(r"[a-z][a-z0-9_-]*")
_YAML_WORDS = {"yes", "no", "true", "false", "on", "off", "null"}  # lower-case words YAML 1.1 reads as bool/null


def _is_plain_word(text: str) -> bool:
    return _PLAIN_WORD.fullmatch(text) is not None and text not in _YAML_WORDS


def _emit(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


_PLAIN_V4 = re.compile(r"[0-9.]+/[0-9]+")
_QUOTED_V6 = re.compile(r"[0-9a-f.]*:[0-9a-f:.]*/[0-9]+")


def _inline_cidrs(cidrs: list[str]) -> str:
    """_inline of a list of CIDR strings, without PyYAML's emitter per item
    (40 us each: most of a 10,000-entry apply, 3 s for 131,072 IPv6 ones).
    IPv4 CIDRs are plain scalars in a flow sequence, IPv6 ones (':' is a flow
    indicator) single-quoted; anything else is left to PyYAML, so the text is
    exactly what _inline prints (tests/unit/test_ruleset_errors.py)."""
    return "[" + ", ".join(c if _PLAIN_V4.fullmatch(c) else f"'{c}'" if _QUOTED_V6.fullmatch(c)
                           else _inline([c])[1:-1] for c in cidrs) + "]"  # fmt: skip


def _inline_ports(ports: list) -> str:
    """_inline of dst_ports (ints and "lo-hi" strings, both plain scalars) without the emitter per item."""
    return "[" + ", ".join(str(p) for p in ports) + "]"


def dump_yaml(rule_set: RuleSet) -> str:
    """Canonical YAML text of a rule set (round-trips through parse_rule_set):
    block style for sections and rules, flow style for values."""
    d = rule_set._plain
    out = []
    if "description" in d:
        out.append(f"description: {_inline(d['description'])}")
    out.append("defaults:")
    out += [f"  {k}: {_inline(v)}" for k, v in d["defaults"].items()]
    for key in ("allow", "deny", "canaries"):
        if key in d:
            out.append(f"{key}: {_inline_cidrs(d[key])}")
    if not d["rules"]:
        out.append("rules: []")
    else:
        out.append("rules:")
        for r in d["rules"]:
            items = list(r.items())
            out.append(f"  - {items[0][0]}: {_inline(items[0][1])}")
            inline = {"sources": _inline_cidrs, "dst_ports": _inline_ports}
            out += [f"    {k}: {inline.get(k, _inline)(v)}" for k, v in items[1:]]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------- parse
_Node = Node  # values with their lines: from the YAML layer, or from plain data (line None)


class _Capped(Exception):
    """MAX_ERRORS are collected: validation stops (the answer is those errors)."""


class _Collector:
    def __init__(self, source: str):
        self.source = source
        self.errors: list[FieldError] = []

    def add(self, path: str, node: _Node | None, message: str) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(FieldError(path, node.line if node is not None else None, message))
        if len(self.errors) >= MAX_ERRORS:  # the rest would not be shown: stop working them out
            raise _Capped


def _from_data(value, col: _Collector, path: str = "", depth: int = 1) -> _Node | None:
    if depth > MAX_DEPTH and isinstance(value, (dict, list, tuple)):
        col.add(path, None, depth_error(None).message)
        return None
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                col.add(path, None, f"keys must be strings, not {type(k).__name__}")
                continue
            kp = f"{path}.{k}" if path else k
            child = _from_data(v, col, kp, depth + 1)
            if child is not None:
                out[k] = child
        return _Node(out, None, "map")
    if isinstance(value, (list, tuple)):
        return _Node([_from_data(v, col, f"{path}[{i}]", depth + 1) or _Node(None, None, "scalar")
                      for i, v in enumerate(value)], None, "seq")  # fmt: skip
    return _Node(value, None, "scalar")


def load_rule_set(path: str | Path, capacity: Capacity | None = None) -> RuleSet:
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise RuleSetError([FieldError("", None, f"file is {size:,} bytes, more than {MAX_FILE_BYTES:,} "
                                                     f"({MAX_FILE_BYTES >> 20} MiB), the limit for a rule set")],
                               str(p))  # fmt: skip
        data = p.read_bytes()
    except RuleSetError:
        raise
    except FileNotFoundError:
        raise RuleSetError([FieldError("", None, "no such file")], str(p)) from None
    except IsADirectoryError:
        raise RuleSetError([FieldError("", None, "is a directory, not a rule-set file")], str(p)) from None
    except OSError as e:
        raise RuleSetError([FieldError("", None, f"cannot read: {e.strerror}")], str(p)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RuleSetError([FieldError("", None, f"not valid UTF-8 (byte {e.start})")], str(p)) from None
    return parse_rule_set(text, str(p), capacity)


def parse_rule_set(text: str, source: str = "<string>", capacity: Capacity | None = None) -> RuleSet:
    col = _Collector(source)
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RuleSetError([FieldError("", None, f"not valid UTF-8 (byte {e.start})")], source) from None
    if len(text) > MAX_FILE_BYTES or (len(text) * 4 > MAX_FILE_BYTES
                                      and len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES):  # fmt: skip
        raise RuleSetError([FieldError("", None, f"rule-set text larger than {MAX_FILE_BYTES:,} bytes "
                                                 f"({MAX_FILE_BYTES >> 20} MiB), the limit for a rule set")], source)
    try:
        root = compose(text, col.add, max_values=(capacity or Capacity()).max_values)
    except _Capped:
        raise RuleSetError(col.errors, source) from None
    except TextError as e:
        raise RuleSetError([FieldError("", e.line, e.message)], source) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        col_no = f", column {mark.column + 1}" if mark else ""
        raise RuleSetError([FieldError("", line, f"YAML syntax error{col_no}: {e.problem or e}")], source) from None
    except yaml.YAMLError as e:
        raise RuleSetError([FieldError("", None, f"YAML error: {e}")], source) from None
    if root is None:
        raise RuleSetError([FieldError("", None, "empty document: a rule set needs at least `rules:`")], source)
    return _build_capped(root, col, capacity or Capacity())


def _build_capped(root: _Node | None, col: _Collector, cap: Capacity) -> RuleSet:
    try:
        return _build(root, col, cap)
    except _Capped:
        raise RuleSetError(col.errors, col.source) from None


def rule_set_from_dict(data: Any, source: str = "<message>", capacity: Capacity | None = None) -> RuleSet:
    col = _Collector(source)
    try:
        root = _from_data(data, col)
    except RecursionError:
        raise RuleSetError([FieldError("", None, "nested too deeply for a rule set")], source) from None
    return _build_capped(root, col, capacity or Capacity())


# --------------------------------------------------------------------- build
TOP_KEYS = ("defaults", "allow", "deny", "rules", "canaries", "description")
DEFAULT_KEYS = ("limit", "ipv4_prefix", "ipv6_prefix", "prefix_limit", "block_seconds", "ipv6_unparsed_extensions")
RULE_KEYS = ("name", "protocol", "dst_ports", "sources", "action", "limit", "prefix_limit", "block_seconds")
LIMIT_KEYS = ("pps", "burst", "bps", "burst_bytes")
PREFIX_KEYS = ("ipv4_prefix", "ipv6_prefix") + LIMIT_KEYS


def _check_keys(node: _Node, allowed: tuple[str, ...], path: str, col: _Collector) -> None:
    for key, child in node.value.items():
        if key not in allowed:
            hint = difflib.get_close_matches(key[:64], allowed, n=1)
            extra = f" (did you mean `{hint[0]}`?)" if hint else f" (known: {', '.join(allowed)})"
            col.add(f"{path}.{_shown_key(key)}" if path else _shown_key(key), child, f"unknown key{extra}")


def _want_map(node: _Node | None, path: str, col: _Collector) -> bool:
    if node is None or node.kind != "map":
        col.add(path, node, f"must be a mapping, not {_kind(node)}")
        return False
    return True


def _kind(node: _Node | None) -> str:
    if node is None or node.value is None:
        return "empty"
    if node.kind != "scalar":
        return {"map": "a mapping", "seq": "a list"}[node.kind]
    v = node.value
    if isinstance(v, bool):
        return f"a boolean ({str(v).lower()})"
    if isinstance(v, (int, float)):
        return f"a number ({_shown(v)})"
    return f"text ({_shown(str(v))})"


def _shown(v, limit: int = 40) -> str:
    """A value as an error message echoes it: at most `limit` characters of it."""
    if isinstance(v, str):
        return repr(v) if len(v) <= limit else repr(v[:limit]) + "..."
    text = str(v)
    return text if len(text) <= limit else text[:limit] + "..."


def _int(node: _Node | None, path: str, col: _Collector, lo: int, hi: int) -> int | None:
    v = node.value if node is not None and node.kind == "scalar" else None
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
            col.add(path, node, "must be a whole number, not NaN or infinity")
        else:
            col.add(path, node, f"must be a whole number, not {_kind(node)}")
        return None
    if v < lo or v > hi:
        col.add(path, node, f"must be between {lo} and {hi}, got {_shown(v)}")
        return None
    return v


def _limit(node: _Node, path: str, col: _Collector, keys=LIMIT_KEYS) -> Limit | None:
    if not _want_map(node, path, col):
        return None
    _check_keys(node, keys, path, col)
    m = node.value
    if "pps" not in m:
        col.add(f"{path}.pps", node, "is required")
        return None
    pps = _int(m["pps"], f"{path}.pps", col, 1, MAX_PPS)
    burst = _int(m["burst"], f"{path}.burst", col, 1, MAX_BURST) if "burst" in m else pps
    bps = _int(m["bps"], f"{path}.bps", col, 8, MAX_BPS) if "bps" in m else None
    bb = None
    if "burst_bytes" in m:
        bb = _int(m["burst_bytes"], f"{path}.burst_bytes", col, 64, MAX_BURST_BYTES)
        if "bps" not in m:
            col.add(f"{path}.burst_bytes", m["burst_bytes"], "needs `bps` next to it")
    if pps is None or burst is None or ("bps" in m and bps is None) or ("burst_bytes" in m and bb is None):
        return None
    return Limit(pps, burst, bps, bb if bb is not None else (bps // 8 if bps else None))


def _prefix_limit(node: _Node, path: str, col: _Collector) -> PrefixLimit | None:
    if not _want_map(node, path, col):
        return None
    _check_keys(node, PREFIX_KEYS, path, col)
    m = node.value
    # 0 is allowed here: one bucket per rule and family, the aggregate limit
    # that still holds when a flood's sources are random over the whole space
    v4 = _int(m["ipv4_prefix"], f"{path}.ipv4_prefix", col, 0, 32) if "ipv4_prefix" in m else 24
    v6 = _int(m["ipv6_prefix"], f"{path}.ipv6_prefix", col, 0, 128) if "ipv6_prefix" in m else 48
    limit_node = _Node({k: v for k, v in m.items() if k in LIMIT_KEYS}, node.line, "map")
    lim = _limit(limit_node, path, col, keys=PREFIX_KEYS)
    if v4 is None or v6 is None or lim is None:
        return None
    return PrefixLimit(v4, v6, lim)


def _network(node: _Node, path: str, col: _Collector) -> Network | None:
    v = node.value if node.kind == "scalar" else None
    if not isinstance(v, str) or isinstance(v, bool):
        col.add(path, node, f"must be an address or CIDR in quotes, not {_kind(node)}")
        return None
    net = cidrs.parse(v.strip())
    if net is not None:
        return net
    try:
        return ipaddress.ip_network(v.strip(), strict=True)
    except ValueError as e:
        if "has host bits set" not in str(e):  # anything else: one parse is enough to say so
            why = str(e) if len(v) <= 40 else "see the value"  # ipaddress's messages quote the whole value
            col.add(path, node, f"{_shown(v)} is not a valid address or CIDR ({why})")
            return None
        net = ipaddress.ip_network(v.strip(), strict=False)
        col.add(path, node, f"{_shown(v)} has host bits set; did you mean {net}?")
        return None


def _networks(node: _Node | None, path: str, col: _Collector) -> tuple[Network, ...]:
    if node is None or node.value is None:
        return ()
    if node.kind != "seq":
        col.add(path, node, f"must be a list of CIDRs, not {_kind(node)}")
        return ()
    out = []
    seen: dict[Network, int] = {}
    fast = cidrs.parse
    for i, item in enumerate(node.value):
        v = item.value
        # the common case first, without building the item's path: a quoted CIDR in the usual form
        n = fast(v.strip()) if type(v) is str and item.kind == "scalar" else None
        if n is None:
            n = _network(item, f"{path}[{i}]", col)
            if n is None:
                continue
        first = seen.setdefault(n, i)
        if first != i:
            col.add(f"{path}[{i}]", item, f"{n} is listed twice (also item {first})")
            continue
        out.append(n)
    return tuple(out)


def _ports(node: _Node | None, path: str, col: _Collector) -> tuple[PortRange, ...]:
    if node is None or node.value is None:
        return ()
    if node.kind != "seq":
        col.add(path, node, f"must be a list of ports or ranges like \"8000-8100\", not {_kind(node)}")
        return ()
    out = []
    for i, item in enumerate(node.value):
        p = f"{path}[{i}]"
        v = item.value if item.kind == "scalar" else None
        if isinstance(v, int) and not isinstance(v, bool):
            if 1 <= v <= 65535:
                out.append(PortRange(v, v))
            else:
                col.add(p, item, f"port must be between 1 and 65535, got {v}")
        elif isinstance(v, str) and re.fullmatch(r"\s*\d{1,5}\s*-\s*\d{1,5}\s*", v):
            lo, hi = (int(x) for x in v.split("-"))
            if not (1 <= lo <= hi <= 65535):
                col.add(p, item, f"range {v!r} must satisfy 1 <= low <= high <= 65535")
            else:
                out.append(PortRange(lo, hi))
        else:
            col.add(p, item, f"must be a port number or a range like \"8000-8100\", not {_kind(item)}")
    return tuple(out)


def _str(node: _Node, path: str, col: _Collector) -> str | None:
    v = node.value if node.kind == "scalar" else None
    if not isinstance(v, str):
        col.add(path, node, f"must be text, not {_kind(node)}")
        return None
    return v


def _build(root: _Node | None, col: _Collector, cap: Capacity) -> RuleSet:
    if root is None or root.kind != "map":
        col.add("", root, f"a rule set must be a mapping with `rules:`, not {_kind(root)}")
        raise RuleSetError(col.errors, col.source)
    _check_keys(root, TOP_KEYS, "", col)
    m = root.value

    defaults = Defaults()
    if "defaults" in m and m["defaults"].value is not None:
        dn = m["defaults"]
        if _want_map(dn, "defaults", col):
            _check_keys(dn, DEFAULT_KEYS, "defaults", col)
            dm = dn.value
            lim = _limit(dm["limit"], "defaults.limit", col) if "limit" in dm else None
            v4 = _int(dm["ipv4_prefix"], "defaults.ipv4_prefix", col, 1, 32) if "ipv4_prefix" in dm else 32
            v6 = _int(dm["ipv6_prefix"], "defaults.ipv6_prefix", col, 1, 128) if "ipv6_prefix" in dm else 64
            pl = _prefix_limit(dm["prefix_limit"], "defaults.prefix_limit", col) if "prefix_limit" in dm else None
            bs = (
                _int(dm["block_seconds"], "defaults.block_seconds", col, 0, MAX_BLOCK_SECONDS)
                if "block_seconds" in dm
                else 0
            )
            ext = "drop"
            if "ipv6_unparsed_extensions" in dm:
                ev = _str(dm["ipv6_unparsed_extensions"], "defaults.ipv6_unparsed_extensions", col)
                if ev is not None and ev not in IPV6_EXT_POLICIES:
                    col.add("defaults.ipv6_unparsed_extensions", dm["ipv6_unparsed_extensions"],
                            f"must be one of {', '.join(IPV6_EXT_POLICIES)}, got {ev[:40]!r}")  # fmt: skip
                ext = ev if ev in IPV6_EXT_POLICIES else ext
            defaults = Defaults(lim, v4 or 32, v6 or 64, pl, bs or 0, ext)

    allow = _networks(m.get("allow"), "allow", col)
    deny = _networks(m.get("deny"), "deny", col)
    canaries = _networks(m.get("canaries"), "canaries", col)
    both = set(allow) & set(deny)
    for n in sorted(both, key=str):
        i = deny.index(n)
        col.add(f"deny[{i}]", m["deny"].value[i] if m.get("deny") else None, f"{n} is also on the allow list")

    description = ""
    if "description" in m and m["description"].value is not None:
        d = _str(m["description"], "description", col)
        if d is not None:
            if len(d) > MAX_DESCRIPTION:
                col.add("description", m["description"], f"longer than {MAX_DESCRIPTION} characters")
            description = d

    rules: list[Rule] = []
    rn = m.get("rules")
    if rn is not None and rn.value is not None:
        if rn.kind != "seq":
            col.add("rules", rn, f"must be a list of rules, not {_kind(rn)}")
        else:
            if len(rn.value) > cap.max_rules:
                col.add("rules", rn, f"{len(rn.value)} rules, the kernel holds at most {cap.max_rules}")
            names: dict[str, int] = {}
            for i, node in enumerate(rn.value[: cap.max_rules + 1]):
                r = _rule(node, f"rules[{i}]", col, defaults, cap)
                if r is None:
                    continue
                if r.name in names:
                    col.add(f"rules[{i}].name", node.value.get("name"), f"duplicate rule name {r.name!r} "
                            f"(also rules[{names[r.name]}])")  # fmt: skip
                    continue
                names[r.name] = i
                rules.append(r)

    cidrs = len(allow) + len(deny) + len(canaries) + sum(len(r.sources) for r in rules)
    if cidrs > cap.max_cidrs:
        col.add("", root, f"{cidrs} CIDR entries (allow + deny + canaries + rule sources), "
                f"the kernel holds at most {cap.max_cidrs}")  # fmt: skip
    port_entries = set()
    for r in rules:
        for proto in {"tcp": (6,), "udp": (17,), "any": (6, 17)}.get(r.protocol, ()):
            for pr in r.dst_ports:
                if len(port_entries) > cap.max_port_entries:
                    break
                port_entries.update((proto, p) for p in range(pr.lo, min(pr.hi, pr.lo + cap.max_port_entries) + 1))
    if len(port_entries) > cap.max_port_entries:
        col.add("rules", rn, f"more than {cap.max_port_entries} distinct (protocol, port) entries "
                "across all rules' dst_ports")  # fmt: skip

    if col.errors:
        raise RuleSetError(col.errors, col.source)
    return RuleSet(defaults, allow, deny, tuple(rules), canaries, description)


def _rule(node: _Node, path: str, col: _Collector, defaults: Defaults, cap: Capacity) -> Rule | None:
    if not _want_map(node, path, col):
        return None
    _check_keys(node, RULE_KEYS, path, col)
    m = node.value
    ok = True
    name = None
    if "name" not in m:
        col.add(f"{path}.name", node, "is required")
        ok = False
    else:
        name = _str(m["name"], f"{path}.name", col)
        if name is not None:
            if not NAME_RE.fullmatch(name) or len(name) > cap.max_name_len:
                col.add(f"{path}.name", m["name"], f"{name[:40]!r} is not a valid rule name: 1-32 ASCII letters, "
                        "digits, '_', '.', '-', starting with a letter or digit")  # fmt: skip
                ok = False
            elif name in RESERVED_NAMES:
                col.add(f"{path}.name", m["name"], f"{name!r} is reserved")
                ok = False
        else:
            ok = False
    protocol = "any"
    if "protocol" in m:
        pv = _str(m["protocol"], f"{path}.protocol", col)
        if pv is not None and pv.lower() not in PROTOCOLS:
            col.add(f"{path}.protocol", m["protocol"], f"must be one of {', '.join(PROTOCOLS)}, got {_shown(pv)}")
            ok = False
        elif pv is None:
            ok = False
        else:
            protocol = pv.lower()
    ports = _ports(m.get("dst_ports"), f"{path}.dst_ports", col)
    if ports and protocol in ("icmp", "icmpv6"):
        col.add(f"{path}.dst_ports", m["dst_ports"], f"{protocol} has no ports; remove dst_ports or use tcp/udp/any")
        ok = False
    sources = _networks(m.get("sources"), f"{path}.sources", col)
    action = "limit"
    if "action" in m:
        av = _str(m["action"], f"{path}.action", col)
        if av not in ACTIONS:
            if av is not None:
                col.add(f"{path}.action", m["action"], f"must be one of {', '.join(ACTIONS)}, got {_shown(av)}")
            ok = False
        else:
            action = av
    limit = None
    if "limit" in m:
        if action != "limit":
            col.add(f"{path}.limit", m["limit"], f"a rule with action {action} takes no limit")
            ok = False
        else:
            limit = _limit(m["limit"], f"{path}.limit", col)
            ok = ok and limit is not None
    elif action == "limit":
        limit = defaults.limit
        if limit is None:
            col.add(f"{path}.limit", node, "is required (or set defaults.limit for rules to inherit)")
            ok = False
    # rules inherit the default prefix limit; `prefix_limit: null` opts out
    pl = defaults.prefix_limit if action == "limit" else None
    if "prefix_limit" in m and m["prefix_limit"].value is None:
        pl = None
    elif "prefix_limit" in m:
        if action != "limit":
            col.add(f"{path}.prefix_limit", m["prefix_limit"], f"a rule with action {action} takes no prefix_limit")
            ok = False
        else:
            pl = _prefix_limit(m["prefix_limit"], f"{path}.prefix_limit", col)
            ok = ok and pl is not None
    bs = 0
    if "block_seconds" in m:
        bs = _int(m["block_seconds"], f"{path}.block_seconds", col, 0, MAX_BLOCK_SECONDS)
        ok = ok and bs is not None
    if not ok:
        return None
    return Rule(name, protocol, ports, sources, action, limit, pl, bs or 0)
