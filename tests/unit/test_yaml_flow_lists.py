"""The fast paths of large CIDR lists give what the item-by-item paths give.

yaml_events composes a one-line list of CIDRs from its items (no event per
item) and cidrs.parse_v4_list reads a list of IPv4 CIDRs with numpy; both
must make the same tree, the same networks, keys and texts, and the same
errors as the slow paths, on the usual shapes and on odd and hostile text.
The slow paths are taken here by raising the minimum list lengths."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tidegate.ruleset import cidrs, yaml_events
from tidegate.ruleset.model import Capacity, RuleSetError
from tidegate.ruleset import parse as ruleset_parse
from tidegate.ruleset.parse import parse_rule_set, rule_set_from_dict

N = 70  # items: past both paths' minimum length (64)
V4 = [f"10.{i // 256}.{i % 256}.0/24" for i in range(N)]
V6 = [f"2001:db8:{i:x}::/48" for i in range(N)]


def flow(items, quote='"') -> str:
    return "[" + ", ".join(f"{quote}{i}{quote}" for i in items) + "]"


def tree(node):
    """A composed tree as plain data: (kind, line, value), all the way down."""
    if node is None:
        return None
    if node.kind == "map":
        return ("map", node.line, {k: tree(v) for k, v in node.value.items()})
    if node.kind == "seq":
        return ("seq", node.line, [tree(v) for v in node.value])
    return ("scalar", node.line, node.value)


def compose_both(text: str, max_values: int = 10**6):
    """(outcome with the fast paths, outcome item by item): a tree with its
    field problems, or the error raised."""
    out = []
    for fast in (True, False):
        saved = yaml_events.FLOW_LIST_MIN
        yaml_events.FLOW_LIST_MIN = saved if fast else 10**9
        problems = []
        try:
            out.append((tree(yaml_events.compose(text, lambda *a: problems.append((a[0], a[1].line, a[2])),
                                                 max_values)), problems))  # fmt: skip
        except Exception as e:  # noqa: BLE001 - the error itself is compared
            out.append((type(e).__name__, str(e), getattr(e, "line", None)))
        finally:
            yaml_events.FLOW_LIST_MIN = saved
    return out


def read_both(read, monkeypatch, slow):
    """read()'s outcome with the fast paths and with the (module, knob)s in `slow` raised past any
    list: the rule set's lists (networks, their attributes but a /32's or /128's `hosts` function,
    keys, texts), ports and digest, or the error text."""
    out = []
    for fast in (True, False):
        with monkeypatch.context() as m:
            for module, knob in () if fast else slow:
                m.setattr(module, knob, 10**9)
            try:
                rs = read()
                out.append([(tuple(n), [type(x) for x in n], [{k: v for k, v in vars(x).items() if not callable(v)} for x in n], n.unified_keys, n.texts)
                            for n in (rs.allow, rs.deny, rs.canaries, *(r.sources for r in rs.rules))]
                           + [[r.dst_ports for r in rs.rules], rs.digest()])  # fmt: skip
            except RuleSetError as e:
                out.append(str(e))
    return out


def parse_both(text: str, monkeypatch, **kw):
    """parse_rule_set's outcome with the fast paths and without."""
    return read_both(lambda: parse_rule_set(text, "t.yaml", **kw), monkeypatch,
                     [(yaml_events, "FLOW_LIST_MIN"), (cidrs, "V4_LIST_MIN")])


ODD = [
    f"allow: {flow(V4)}\nrules: []\n",
    f"allow: {flow(V4, '')}\nrules: []\n",  # plain items, as dump.py writes them
    f"allow: {flow(V4, chr(39))}\ndeny: {flow(V6)}\nrules: []\n",
    f"allow: {flow(V4)}\r\nrules: []\r\n",
    f"description: \"é 😀 \u2028\"\nallow: {flow(V4)}\nrules: []\n",  # code points before the list
    f"allow: {flow(V4)}\nallow: {flow(V4)}\nrules: []\n",  # a duplicate key
    f"{flow(V4)}: 1\nrules: []\n",  # a list as a key
    f"rules: []\n{flow(V4)}\n",  # no ':' after it
    f"rules: []\nx: {flow(V4)}: 2\n",
    f"# allow: {flow(V4)}\nrules: []\n",  # in a comment
    f"description: '{flow(V4)}'\nrules: []\n",  # in quotes (and the quotes of its items end the scalar)
    f"description: |\n  {flow(V4)}\nrules: []\n",  # in a block scalar
    f"description: x {flow(V4)}\nrules: []\n",  # in a plain scalar
    f"allow: [{flow(V4)}]\nrules: []\n",  # nested
    f"allow: &a {flow(V4)}\nrules: []\n",  # an anchor
    f"allow: !!seq {flow(V4)}\nrules: []\n",
    f"allow: {flow(V4)}\ndeny: *a\nrules: []\n",  # an alias after it
    f"allow: {flow(V4)}\nrules: [\n",  # a syntax error after it
    f"allow: {flow(V4)} x\nrules: []\n",
    f"allow: {flow(V4)}\n---\nrules: []\n",  # a second document
    f"rules:\n  - name: a\n    sources: {flow(V4)}\n    limit: {{pps: 1}}\n",
    f"rules:\n- {flow(V4)}\n",
    f"allow: {flow(V4[:5] + ['1.2.3.4/24'] + V4[5:])}\nrules: []\n",  # host bits set
    f"allow: {flow(V4 + V4[:1])}\nrules: []\n",  # listed twice
    f"allow: {flow(V4 + ['010.0.0.0/8', '1.2.3.0/33', '256.0.0.0/8', '1.2.3.4/32', '0.0.0.0/0'])}\nrules: []\n",
    f"allow: {flow(V4 + ['dead:beef::/32'])}\ndeny: {flow(V4[:3])}\nrules: []\n",  # on both lists
    f"allow: {flow(['1:30/1'] * 3 + V4, '')}\nrules: []\n",  # plain items YAML reads as numbers
    "allow: [" + ", ".join(V4) + ", 1.5]\nrules: []\n",
    f"allow: {flow(V4)}\ndefaults: {{limit: {{pps: 0}}}}\nrules: []\n",  # an error elsewhere
]


@pytest.mark.parametrize("text", ODD)
def test_the_same_tree_and_problems_either_way(text):
    fast, slow = compose_both(text)
    assert fast == slow


@pytest.mark.parametrize("text", ODD)
def test_the_same_rule_set_or_errors_either_way(text, monkeypatch):
    fast, slow = parse_both(text, monkeypatch)
    assert fast == slow


def test_the_usual_lists_take_the_fast_paths(monkeypatch):
    """Neither the event-by-event composer nor the per-item parser sees the
    items of a large usual list (else this test measures nothing)."""
    seen = {"parse_entries": 0, "events": 0}
    parse_entries, parser = cidrs.parse_entries, yaml_events._PARSER

    def counting_entries(texts):
        seen["parse_entries"] += len(texts)
        return parse_entries(texts)

    class Counting(parser):
        def get_event(self):
            seen["events"] += 1
            return super().get_event()

    monkeypatch.setattr(cidrs, "parse_entries", counting_entries)
    monkeypatch.setattr(yaml_events, "_PARSER", Counting)
    rs = parse_rule_set(f"allow: {flow(V4 * 0 + [f'10.{i // 256}.{i % 256}.0/24' for i in range(5000)])}\n"
                        "rules: []\n")  # fmt: skip
    assert len(rs.allow) == 5000 and seen["parse_entries"] == 0 and seen["events"] < 30


def test_values_are_still_counted(monkeypatch):
    text = f"allow: {flow(V4)}\nrules: []\n"
    fast, slow = compose_both(text, max_values=N)
    assert fast == slow and "more than 70 values" in fast[1]
    fast, slow = parse_both(text, monkeypatch, capacity=Capacity(max_cidrs=N - 1))
    assert fast == slow and "at most 69" in fast


def from_data_both(data, monkeypatch):
    """rule_set_from_dict's outcome with lists of text kept as text items and item by item."""
    return read_both(lambda: rule_set_from_dict(data, "data"), monkeypatch,
                     [(ruleset_parse, "TEXT_LIST_MIN"), (cidrs, "V4_LIST_MIN")])


DATA = [
    {"allow": V4, "rules": []},
    {"allow": V4 + [" 10.99.0.0/16"], "deny": ["192.0.2.0/24 "], "rules": []},  # spaces around an item
    {"allow": V4[:5] + ["1.2.3.4/24"] + V4[5:], "rules": []},  # host bits set
    {"allow": V4 + V4[:1], "rules": []},  # listed twice
    {"deny": V4 + ["dead:beef::/32"], "allow": V4[:3], "rules": []},  # on both lists
    {"allow": V4 + [5], "rules": []},
    {"allow": V4 + [None, ["10.200.0.0/16"], {"a": 1}], "rules": []},
    {"allow": [], "canaries": ["192.0.2.7", "2001:db8::1"], "rules": []},
    {"rules": [{"name": "a", "sources": V4 + V6, "dst_ports": ["80", "443-445", 22], "limit": {"pps": 1}}]},
    {"rules": [{"name": "a", "protocol": "udp", "dst_ports": ["53", " 54", "x"]}]},
    {"rules": [{"name": "a", "protocol": "tcp", "dst_ports": ["1-2-3"]}], "description": "d", "x": ["y"]},
]


@pytest.mark.parametrize("data", DATA)
def test_plain_data_gives_the_same_rule_set_or_errors_either_way(data, monkeypatch):
    """A rule set changed as plain data (a quick block: ChangeService.revise) is read like a file:
    its lists of text are read at once, as a one-line YAML list's are, with the same outcome."""
    fast, slow = from_data_both(data, monkeypatch)
    assert fast == slow


def test_a_long_list_of_plain_data_keeps_its_compact_form():
    rs = rule_set_from_dict({"deny": [f"10.{i // 256}.{i % 256}.0/24" for i in range(5000)], "rules": []})
    assert type(rs.deny) is cidrs.V4Networks and len(rs.deny) == 5000


def _v4_text(addr: int, plen: int, style: int) -> str:
    net = ipaddress.IPv4Network((addr, plen), strict=False)
    a = net.network_address if style % 4 else ipaddress.IPv4Address(addr)
    return [f"{a}/{plen}", f"{a}/0{plen}", str(a), f" {a}/{plen}", f"{a}/{plen}\n1.0.0.0/8"][style % 5]


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.integers(0, N), st.builds(_v4_text, st.integers(0, 2**32 - 1), st.integers(0, 32),
                                                       st.integers(0, 30))), max_size=3))  # fmt: skip
def test_the_numpy_reading_is_the_per_item_reading(odd):
    """parse_v4_list's codes and texts, read as a V4Networks, give parse_entries'
    networks, keys (from the codes) and texts, or None (then parse_entries
    decides, errors included): a usual list with up to three items of any form put in."""
    texts = list(V4)
    for at, text in odd:
        texts.insert(at, text)
    got = cidrs.parse_v4_list(texts)
    entries = cidrs.parse_entries(texts)
    if got is None:
        assert odd
        return
    codes, shown = got
    listed = cidrs.V4Networks(codes, shown)
    nets, keys = list(listed), listed.unified_keys  # made from the codes
    assert [e[0] for e in entries] == nets and [e[1] for e in entries] == keys and [e[2] for e in entries] == shown
    assert [vars(n) for n in nets] == [vars(e[0]) for e in entries]
    assert [hash(n) for n in nets] == [hash(ipaddress.ip_network(t)) for t in texts]


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.text(alphabet="0123456789./\n :a", max_size=20), min_size=64, max_size=70))
def test_the_numpy_reading_refuses_what_it_cannot_read_exactly(texts):
    got = cidrs.parse_v4_list(texts)
    if got is not None:
        assert got[1] == [e[2] for e in cidrs.parse_entries(texts)] == texts


@pytest.mark.parametrize("style", ["flow", "block"])
def test_every_list_keeps_its_networks_canonical_texts(style):
    """Whichever path read an item (the numpy list, parse_entry, or
    ipaddress for a form only it reads: upper-case hex, a mapped address),
    the list's texts are its networks' canonical texts, which the canonical
    dump and the digest are made of."""
    items = ["10.0.0.0/8", "2001:DB8::/32", "::ffff:10.1.0.0/120", "192.0.2.1", "2001:db8:0:0::1/128"]
    many = [f"10.{i // 256}.{i % 256}.0/24" for i in range(200)]
    for listed in (items, many, many[:100] + items):
        if style == "flow":
            text = "allow: [" + ", ".join(f'"{x}"' for x in listed) + "]\nrules: []\n"
        else:
            text = "allow:\n" + "".join(f'  - "{x}"\n' for x in listed) + "rules: []\n"
        nets = parse_rule_set(text).allow
        assert nets.texts == [str(n) for n in nets] == [str(ipaddress.ip_network(x)) for x in listed]
