"""The rule-set model: YAML for people, plain data for the wire, one
validated internal form in between (this module). Text and data become the
model in ruleset/parse.py; the model is written back as YAML by ruleset/dump.py.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from tidegate.kernel.layout import MAX_RULES, PSEUDO_RULES, SLOT_CIDRS, network_key

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


class Networks(tuple):
    """A rule set's list of networks as the parser made it: a tuple of
    ipaddress networks that also carries each one's key in the kernel's
    unified space (`unified_keys`, kernel.layout.network_key) and its
    canonical text (`texts`), found while parsing, so an apply does not
    work them out again per network. Any other tuple of networks (a rule
    set changed with dataclasses.replace) has neither: its users compute
    them (network_keys, _cidr_texts). A long IPv4 list is read into a
    ruleset/cidrs.V4Networks instead: codes and texts, no network kept."""

    __repr__ = tuple.__repr__

    def __new__(cls, nets, unified_keys: list[tuple[int, int]], texts: list[str]):
        self = super().__new__(cls, nets)
        self.unified_keys = unified_keys
        self.texts = texts
        return self

    def __getnewargs__(self):  # copy and pickle
        return tuple(self), self.unified_keys, self.texts


TOP_KEYS = ("defaults", "allow", "deny", "rules", "canaries", "description")
DEFAULT_KEYS = ("limit", "ipv4_prefix", "ipv6_prefix", "prefix_limit", "block_seconds", "ipv6_unparsed_extensions")
RULE_KEYS = ("name", "protocol", "dst_ports", "sources", "action", "limit", "prefix_limit", "block_seconds")
LIMIT_KEYS = ("pps", "burst", "bps", "burst_bytes")
PREFIX_KEYS = ("ipv4_prefix", "ipv6_prefix") + LIMIT_KEYS

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
    def canonical(self) -> dict:
        """to_dict() made once (the set is frozen), for the digest and the
        canonical YAML an apply computes: read-only."""
        return self._plain_dict()

    def _plain_dict(self) -> dict:
        d: dict[str, Any] = {}
        if self.description:
            d["description"] = self.description
        dd: dict[str, Any] = {}
        if self.defaults.limit:
            dd["limit"] = limit_dict(self.defaults.limit)
        dd["ipv4_prefix"] = self.defaults.ipv4_prefix
        dd["ipv6_prefix"] = self.defaults.ipv6_prefix
        if self.defaults.prefix_limit:
            dd["prefix_limit"] = prefix_dict(self.defaults.prefix_limit)
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
                rd["limit"] = limit_dict(r.limit)
            if r.prefix_limit and r.prefix_limit != self.defaults.prefix_limit:
                rd["prefix_limit"] = prefix_dict(r.prefix_limit)
            elif r.action == "limit" and r.prefix_limit is None and self.defaults.prefix_limit:
                rd["prefix_limit"] = None
            if r.block_seconds:
                rd["block_seconds"] = r.block_seconds
            rules.append(rd)
        d["rules"] = rules
        return d

    @cached_property
    def _digest(self) -> str:
        return hashlib.sha256(json.dumps(self.canonical, sort_keys=True).encode()).hexdigest()

    def digest(self) -> str:
        return self._digest


def network_count(rs: RuleSet) -> int:
    """The networks a rule set lists: allow, deny, canaries and every rule's sources."""
    return len(rs.allow) + len(rs.deny) + len(rs.canaries) + sum(len(r.sources) for r in rs.rules)


def _cidr_texts(nets) -> list[str]:
    """str() of each network: the parser's texts (Networks), else IPv4 ones
    formatted here from the integer (ipaddress's str costs ~1.5 us each,
    most of a 10,000-CIDR digest)."""
    texts = getattr(nets, "texts", None)
    if texts is not None:
        return list(texts)
    out = []
    for n in nets:
        if n.version == 4:
            a = int(n.network_address)
            out.append(f"{a >> 24}.{(a >> 16) & 255}.{(a >> 8) & 255}.{a & 255}/{n.prefixlen}")
        else:
            out.append(str(n))
    return out


def network_keys(nets) -> list[tuple[int, int]]:
    """Each network's (addr128, prefixlen128) in the kernel's unified space:
    the parser's (Networks), else computed."""
    keys = getattr(nets, "unified_keys", None)
    return keys if keys is not None else [network_key(n) for n in nets]


def limit_dict(limit: Limit) -> dict:
    d: dict[str, Any] = {"pps": limit.pps, "burst": limit.burst}
    if limit.bps is not None:
        d["bps"] = limit.bps
    if limit.burst_bytes is not None:
        d["burst_bytes"] = limit.burst_bytes
    return d


def prefix_dict(p: PrefixLimit) -> dict:
    return {"ipv4_prefix": p.ipv4_prefix, "ipv6_prefix": p.ipv6_prefix, **limit_dict(p.limit)}
