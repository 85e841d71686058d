"""The array path of large IPv4 lists (kernel/trie4.py, the parser's codes,
compose's TextItems) gives what the per-item path gives.

Each text is read twice: as it comes (one-line lists composed apart, the
numpy list reader, trie entries as arrays where they apply) and with every
shortcut turned off (composed event by event, item by item, the walk and
its dicts). The two must agree on everything a caller sees: the rule set
(networks, keys, texts), its canonical text and digest, the errors of a bad
text, and the kernel entries (the walk's dict, in the same order, and the
raw trie bytes of a slot). The texts mix IPv4 and IPv6, overlapping and
nested prefixes, /0 and /32, duplicates within and across lists and items
an operator should be told about."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tidegate.kernel import entries as ke
from tidegate.kernel.trie4 import KEY4, VAL, Trie4
from tidegate.ruleset import cidrs, yaml_events
from tidegate.ruleset.dump import dump_yaml
from tidegate.ruleset.model import RuleSetError
from tidegate.ruleset.parse import parse_rule_set

ODD = ["0.0.0.0/0", "10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/23", "10.1.2.128/25", "10.1.2.3/32", "10.1.2.3",
       "10.1.2.2/31", "::/0", "2001:db8::/32", "::ffff:10.1.0.0/120", "192.0.2.0/24", "10.1.5.0/24",
       " 10.1.7.0/24", "2001:DB8::/32"]  # fmt: skip
BAD = ["10.1.2.1/24", "10.1.2.0/33", "010.1.2.0/24", "10.1.2.0/024", "10.1.256.0/24", "1.2.3.4/x", "", "::/129"]


def _pool(rnd: random.Random, n: int) -> list[str]:
    return [f"10.1.{i}.0/24" for i in sorted(rnd.sample(range(256), n))]


def _flow(items: list[str], quote: str) -> str:
    return "[" + ", ".join(f"{quote}{x}{quote}" for x in items) + "]"


def _text(seed: int) -> str:
    rnd = random.Random(seed)
    allow = _pool(rnd, rnd.randint(64, 200))
    if rnd.random() < 0.2:
        rnd.shuffle(allow)
    for _ in range(rnd.choice([0, 0, 0, 1, 2])):
        allow.insert(rnd.randint(0, len(allow)), rnd.choice(ODD + allow[:3]))  # odd items and duplicates
    if rnd.random() < 0.15:
        allow.insert(rnd.randint(0, len(allow)), rnd.choice(BAD))
    deny = rnd.choice([[], [], ["192.0.2.0/24"], [x.replace("10.1.", "10.2.") for x in _pool(rnd, 70)],
                       [rnd.choice(allow)]])  # fmt: skip
    sources = rnd.choice([[], ["10.1.9.0/24"], _pool(rnd, 80), ["10.0.0.0/8", "2001:db8::/48"]])
    quote = rnd.choice(['"', '"', "'", ""])
    rule = "  - name: a\n    protocol: udp\n    dst_ports: [53]\n    limit: {pps: 10, burst: 10}\n"
    if sources:
        rule += f"    sources: {_flow(sources, quote)}\n"
    text = f"allow: {_flow(allow, quote)}\n" + (f"deny: {_flow(deny, quote)}\n" if deny else "")
    if rnd.random() < 0.3:  # block style: no one-line list to compose apart
        text = "allow:\n" + "".join(f'  - "{x}"\n' for x in allow) + text.split("\n", 1)[1]
    return text + "rules:\n" + rule + "  - name: b\n    limit: {pps: 5, burst: 5}\n"


def _read(text: str):
    """Everything a caller sees of the text: the rule set's lists, canonical text, digest and kernel
    entries (the dict, its order, one slot's raw trie bytes), or the error message."""
    try:
        rs = parse_rule_set(text, "t")
    except RuleSetError as e:
        return str(e)
    krs = ke._build_kernel_rule_set(rs)
    lists = [rs.allow, rs.deny, *(r.sources for r in rs.rules)]
    return ([(tuple(n), [_state(x) for x in n], n.unified_keys, n.texts) for n in lists], dump_yaml(rs), rs.digest(),
            rs, krs.cidrs, list(krs.cidrs), krs.flags, ke.kernel_trie_entries(krs, 2))  # fmt: skip


def _state(net) -> tuple:
    """A network object's type and attributes (a /31 or /32's own hosts() function by name only)."""
    return type(net), {k: v.__name__ if callable(v) else v for k, v in vars(net).items()}


def _slow(text: str):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(yaml_events, "FLOW_LIST_MIN", 10**9)
        mp.setattr(cidrs, "V4_LIST_MIN", 10**9)
        mp.setattr(ke, "ARRAY_MIN", 10**9)
        return _read(text)


@pytest.mark.parametrize("seed", range(150))
def test_the_array_path_reads_and_builds_what_the_item_path_does(seed):
    text = _text(seed)
    fast = _read(text)
    assert fast == _slow(text)


_LIST = [f"10.1.{i}.0/24" for i in range(100)]


@pytest.mark.parametrize("extra, arrays", [
    ([], True),
    (["10.3.0.2/31", "10.3.0.3/32"], False),  # the second begins at the first's last address
    (["10.3.0.2/31", "10.3.0.4/32"], True),  # it begins right after
    (["0.0.0.0/0"], False),
    (["255.255.255.255/32", "0.0.0.0/32"], True),
    (["2001:db8::/32"], False),  # an IPv6 item
    (["::ffff:10.3.0.0/120"], True),  # IPv6 text, an IPv4 key (the walk puts it in the IPv4 trie too)
])  # fmt: skip
def test_edges_of_the_array_path(extra, arrays):
    text = f"allow: {_LIST + extra}\nrules: []\n"
    assert (ke._build_kernel_rule_set(parse_rule_set(text)).v4 is not None) == arrays
    assert _read(text) == _slow(text)


def test_the_texts_cover_both_paths_and_the_errors():
    """The generated texts take the array path, the walk, and fail, each many times."""
    kinds = {"error": 0, "arrays": 0, "walk": 0}
    for seed in range(150):
        try:
            rs = parse_rule_set(_text(seed))
        except RuleSetError:
            kinds["error"] += 1
            continue
        kinds["arrays" if ke._build_kernel_rule_set(rs).v4 is not None else "walk"] += 1
    assert min(kinds.values()) >= 15, kinds


def _raw(slot: int, entries: dict[tuple[int, int], tuple[int, int]]) -> dict[bytes, bytes]:
    """{raw key: raw value} of (address, prefix length) -> (mask, flags), as kernel_trie_entries packs them."""
    return {ke.CIDR_KEY_HEAD.pack(32 + p, slot) + a.to_bytes(4, "big"): ke.CIDR_VAL.pack(m, f, 0)
            for (a, p), (m, f) in entries.items()}  # fmt: skip


_ENTRIES = st.dictionaries(st.tuples(st.sampled_from([0, 1, 0x0A010200, 0xFFFFFFFF, 0xC0000200]), st.integers(0, 32)),
                           st.tuples(st.sampled_from([0, 1, 1 << 63, 5]), st.sampled_from([0, 1, 2, 3])),
                           max_size=12)  # fmt: skip


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(_ENTRIES, _ENTRIES, st.integers(0, 2))
def test_the_slot_diff_on_codes_is_the_diff_on_raw_dicts(held, new, slot):
    """What slots.write_slot deletes and writes, and what trim_slot keeps,
    worked out on sorted codes, is what the dicts of raw bytes give."""
    h, n = _raw(slot, held), _raw(slot, new)
    th, tn = Trie4.held(h), Trie4.held(n)
    assert dict(th) == h and th == h and len(th) == len(h)
    assert tn.same(th) == (n == h)
    stale = th.without(tn)
    assert dict(stale) == {k: v for k, v in h.items() if k not in n}
    assert set(Trie4.held(dict(zip(_split(stale.key_bytes(), KEY4.itemsize),
                                   _split(stale.value_bytes(), VAL.itemsize))))) == h.keys() - n.keys()  # fmt: skip
    assert dict(tn.changed_from(th)) == {k: v for k, v in n.items() if h.get(k) != v}
    assert dict(th.within(tn)) == {k: v for k, v in h.items() if k in n}


def _split(b: bytes, size: int) -> list[bytes]:
    return [b[i:i + size] for i in range(0, len(b), size)]


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_the_list_is_read_in_parts_as_at_once(chunk, monkeypatch):
    """parse_v4_list reads a long list in parts (cidrs.V4_CHUNK): the same
    codes and texts, and None for a bad item in any part."""
    texts = [f"10.{i // 256}.{i % 256}.0/24" for i in range(300)] + ["192.168.0.0/16"]
    whole = cidrs.parse_v4_list(texts)
    monkeypatch.setattr(cidrs, "V4_CHUNK", chunk)
    parts = cidrs.parse_v4_list(texts)
    assert parts[0].tolist() == whole[0].tolist() and parts[1] == whole[1]
    for at in (0, 150, 299, 300):
        for bad in ("10.0.0.1/24", "10.0.0.0/31", "2001:db8::/32", "10.0.0.0/024"):
            assert cidrs.parse_v4_list(texts[:at] + [bad] + texts[at + 1:]) is None, (at, bad)


def test_the_estimates_classifier_reads_the_arrays_and_keeps_no_dict(monkeypatch):
    """The blast-radius estimate's classifier over entries held as arrays
    answers as over the walk's dict, a comparison with the walk's entries
    finds them the same, and both leave the kernel rule set without that dict (the filter keeps each slot's kernel rule set: a 100,000-entry
    dict made by every estimate would stay with it)."""
    allow = [f"10.1.{i}.0/24" for i in range(0, 200, 2)]
    deny = [f"10.2.{i}.0/25" for i in range(100)]
    text = (f"allow: {_flow(allow, chr(34))}\ndeny: {_flow(deny, chr(34))}\n"
            "rules: [{name: r, protocol: udp, dst_ports: [53], sources: ['10.3.0.0/16'], limit: {pps: 1, burst: 1}}]\n")
    krs = ke._build_kernel_rule_set(parse_rule_set(text))
    assert krs.v4 is not None and krs._cidrs is None
    with monkeypatch.context() as m:
        m.setattr(cidrs, "V4_LIST_MIN", 10**9)
        m.setattr(ke, "ARRAY_MIN", 10**9)
        walked = ke._build_kernel_rule_set(parse_rule_set(text))
    assert walked.v4 is None
    arrays, ref = ke.Classifier(krs), ke.Classifier(walked)
    rnd = random.Random(7)
    probes = [f"10.{rnd.randrange(1, 4)}.{rnd.randrange(256)}.{rnd.randrange(256)}" for _ in range(500)]
    assert [arrays.classify(a, 17, 53) for a in probes] == [ref.classify(a, 17, 53) for a in probes]
    assert {arrays.classify(a, 17, 53) for a in probes} >= {66, 65, 0, 64}  # allow, deny, the rule, default
    assert ke.same_cidrs(krs, walked) and ke.same_cidrs(walked, krs)  # a trim's or a shadow link's comparison
    assert krs._cidrs is None
