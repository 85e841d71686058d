"""Rule-set text or plain data to the validated model.

Validation walks the YAML node tree (not the loaded data), so every error
names the field path and the file line. All errors are collected (up to
100) before anything is rejected; nothing reaches the kernel unless the
whole rule set is valid.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
from pathlib import Path
from typing import Any

import yaml

from tidegate.kernel.layout import network_key
from tidegate.ruleset import cidrs
from tidegate.ruleset.yaml_events import (
    MAX_DEPTH, Node, TextError, TextItems, compose, depth_error, shown_key as _shown_key,
)
from tidegate.ruleset.model import (
    ACTIONS, Capacity, DEFAULT_KEYS, Defaults, FieldError, IPV6_EXT_POLICIES, LIMIT_KEYS, Limit,
    MAX_BLOCK_SECONDS, MAX_BPS, MAX_BURST, MAX_BURST_BYTES, MAX_DESCRIPTION, MAX_ERRORS, MAX_FILE_BYTES,
    MAX_PPS, NAME_RE, Network, Networks, PREFIX_KEYS, PROTOCOLS, PortRange, PrefixLimit, RESERVED_NAMES, RULE_KEYS,
    Rule, RuleSet, RuleSetError, TOP_KEYS,
)


# --------------------------------------------------------------------- parse
_Node = Node  # values with their lines: from the YAML layer, or from plain data (line None)
TEXT_LIST_MIN = 1  # items: a list of plain data this long, all text, is kept as TextItems (item nodes on demand)


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
        if len(value) >= TEXT_LIST_MIN and all(type(v) is str and v == v.strip() for v in value):
            # as a one-line YAML list: _networks reads a long CIDR list from the texts at once
            return TextItems(list(value), None)
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


def _networks(node: _Node | None, path: str, col: _Collector) -> Networks | cidrs.V4Networks:
    if type(node) is TextItems:  # a one-line list: text scalars as they stand (no spaces around them)
        values = node.texts
    elif node is None or node.value is None:
        return _NO_NETWORKS
    elif node.kind != "seq":
        col.add(path, node, f"must be a list of CIDRs, not {_kind(node)}")
        return _NO_NETWORKS
    else:
        values = [i.value.strip() if type(i.value) is str and i.kind == "scalar" else None for i in node.value]
    # the common case first, without building each item's path: quoted CIDRs in the usual form, none twice
    listed = cidrs.parse_v4_list(values)
    if listed is not None and cidrs.distinct(listed[0]):  # a network's text is its code's: none twice
        return cidrs.V4Networks(*listed)
    items = node.value
    entries = cidrs.parse_entries(values)
    if None not in entries:
        texts = [e[2] for e in entries]
        if len(set(texts)) == len(texts):
            return Networks([e[0] for e in entries], [e[1] for e in entries], texts)
    # an item for ipaddress to judge, a wrong one or one listed twice: item by item, errors in order
    nets: list[Network] = []
    keys: list[tuple[int, int]] = []
    texts = []
    seen: dict[str, int] = {}  # canonical text -> item: one per network, IPv4 and IPv6 apart
    for i, (item, entry) in enumerate(zip(items, entries)):
        if entry is None:
            n = _network(item, f"{path}[{i}]", col)
            if n is None:
                continue
            entry = n, network_key(n), str(n)
        first = seen.setdefault(entry[2], i)
        if first != i:
            col.add(f"{path}[{i}]", item, f"{entry[2]} is listed twice (also item {first})")
            continue
        nets.append(entry[0])
        keys.append(entry[1])
        texts.append(entry[2])
    return Networks(nets, keys, texts)


_NO_NETWORKS = Networks((), [], [])


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
    both = set(allow.texts).intersection(deny.texts) if allow and deny else ()
    for n in sorted(both):
        i = deny.texts.index(n)
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


def _rule_limit(m: dict, key: str, action: str, path: str, col, read):
    """A rule's limit or prefix_limit, read by READ; only a limit rule takes one (None: an error
    was recorded)."""
    if action != "limit":
        col.add(f"{path}.{key}", m[key], f"a rule with action {action} takes no {key}")
        return None
    return read(m[key], f"{path}.{key}", col)


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
        limit = _rule_limit(m, "limit", action, path, col, _limit)
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
        pl = _rule_limit(m, "prefix_limit", action, path, col, _prefix_limit)
        ok = ok and pl is not None
    bs = 0
    if "block_seconds" in m:
        bs = _int(m["block_seconds"], f"{path}.block_seconds", col, 0, MAX_BLOCK_SECONDS)
        ok = ok and bs is not None
    if not ok:
        return None
    return Rule(name, protocol, ports, sources, action, limit, pl, bs or 0)
