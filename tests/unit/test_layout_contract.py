"""bpf/layout.h and bpf/maps.h against control/tidegate/kernel/layout.py,
the only Python copy of the kernel contract.

The C headers are read as text: every constant (#define TG_*), every
reason, every struct (field names, order, types, offsets and size) and
every map (key and value type, per-CPU or not, pin name, order) must have
the same value on the Python side, and the other way round. The mutation
cases at the end show that a change on either side is caught.
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import pytest

from tidegate.kernel import entries, layout

BPF = Path(__file__).resolve().parents[2] / "bpf"
C_TYPES = {"__u8": 1, "__u16": 2, "__u32": 4, "__u64": 8, "u8": 1, "u16": 2, "u32": 4, "u64": 8}
PY_TYPES = {ctypes.c_ubyte: "__u8", ctypes.c_ushort: "__u16", ctypes.c_uint: "__u32", ctypes.c_ulonglong: "__u64"}


def _strip_comments(text: str) -> str:
    return re.sub(r"/\*.*?\*/|//[^\n]*", "", text, flags=re.S)


def c_eval(expr: str, defines: dict[str, int]) -> int | None:
    """An integer expression of C literals and TG_* names, or None if it is something else."""
    expr = re.sub(r"\b(0x[0-9a-fA-F]+|\d+)[uUlL]+\b", r"\1", expr.strip())
    expr = re.sub(r"\bTG_\w+\b", lambda m: str(defines.get(m[0], "?")), expr)
    if not re.fullmatch(r"[\da-fA-Fx\s()*+<>|-]+", expr):
        return None
    return eval(expr, {"__builtins__": {}})  # digits and operators only


def c_defines(text: str) -> dict[str, int]:
    """#define TG_NAME <integer expression>, evaluated (function-like macros left out)."""
    out: dict[str, int] = {}
    for name, expr in re.findall(r"^#define\s+(TG_\w+)[ \t]+([^\n]+)$", _strip_comments(text), re.M):
        value = c_eval(expr, out)
        if value is not None:
            out[name] = value
    return out


def c_structs(text: str) -> dict[str, list[tuple[str, str, int]]]:
    """struct tg_x { ... }: [(field, type, array length or 1)]."""
    out = {}
    for name, body in re.findall(r"struct\s+(tg_\w+)\s*\{(.*?)\};", _strip_comments(text), re.S):
        fields = []
        for ftype, fname, count in re.findall(r"((?:struct\s+)?\w+)\s+(\w+)(?:\[(\d+)\])?\s*;", body):
            fields.append((fname, " ".join(ftype.split()), int(count or 1)))
        out[name] = fields
    return out


def c_maps(text: str) -> list[tuple[str, str, str, str, str, str | None]]:
    """BPF_TABLE[_PINNED](type, key, value, name, entries[, pin]) as (name, type, key, value,
    entries, pin name or None), in order."""
    decl = (r'BPF_TABLE(_PINNED)?\(\s*"(\w+)",\s*([^,]+?),\s*([^,]+?),\s*(\w+),\s*([^,)]+?)\s*'
            r'(?:,\s*TG_PIN_DIR\s*"/(\w+)")?\s*[,)]')
    return [(m[5], m[2], " ".join(m[3].split()), " ".join(m[4].split()), m[6], m[7] or None)
            for m in re.finditer(decl, _strip_comments(text))]  # fmt: skip


def c_layout(structs: dict, name: str) -> tuple[list[tuple[str, int]], int, int]:
    """C's natural layout of a struct: ([(field, offset)], size, alignment)."""
    offsets, off, align = [], 0, 1
    for fname, ftype, count in structs[name]:
        if ftype.startswith("struct "):
            _, size, a = c_layout(structs, ftype.split()[1])
        else:
            size = a = C_TYPES[ftype]
        off = -(-off // a) * a
        offsets.append((fname, off))
        off += size * count
        align = max(align, a)
    return offsets, -(-off // align) * align, align


def _py_type(t: type) -> tuple[str, int]:
    if hasattr(t, "_length_"):
        return _py_type(t._type_)[0], t._length_
    if issubclass(t, ctypes.Structure):
        return f"struct {t.__name__}", 1
    return PY_TYPES[t], 1


def _c_type(ctype: str) -> str:
    return ctype if ctype.startswith("struct ") else "__" + ctype.removeprefix("__")


def reason_name(define: str) -> str:
    """TG_R_RATE -> "rate"; the EXT_ reasons are spelled ipv6-ext-... on the Python side."""
    name = define.removeprefix("TG_R_").lower().replace("_", "-")
    return "ipv6-" + name if name.startswith("ext-") else name


def contract_differences(layout_h: str, maps_h: str, classify_h: str, program_c: str, py=layout) -> list[str]:
    """Every way the C headers and the Python layout module disagree."""
    diffs = []
    d = c_defines(layout_h)
    m = c_defines(maps_h)

    # constants: every TG_* define has a Python twin of the same name and value (reasons: below)
    for name, value in d.items():
        if name.startswith("TG_R_") or name == "TG_REASONS":
            continue
        py_name = name.removeprefix("TG_")
        if getattr(py, py_name, None) != value:
            diffs.append(f"{name} = {value} in layout.h, layout.{py_name} = {getattr(py, py_name, 'missing')}")
    for name, py_name in (("TG_MAX_SOURCES", "MAX_SOURCES"), ("TG_MAX_CIDRS", "MAX_CIDRS")):
        if m.get(name) != getattr(py, py_name):
            diffs.append(f"{name} = {m.get(name)} in maps.h, layout.{py_name} = {getattr(py, py_name)}")
    if py.SLOT_CIDRS * d.get("TG_SLOTS", 0) != m.get("TG_MAX_CIDRS"):
        diffs.append("layout.SLOT_CIDRS is not TG_MAX_CIDRS / TG_SLOTS")
    # TG_PORT_IDX(slot, udp, port): where a slot's range starts, and an entry's index inside it
    port_idx = re.search(r"#define TG_PORT_IDX\(slot, udp, port\)\s+(.+)", layout_h)
    if port_idx:
        def idx(slot: int, udp: int, port: int) -> int:
            expr = re.sub(r"\b(slot|udp|port)\b", lambda x: str({"slot": slot, "udp": udp, "port": port}[x[0]]),
                          port_idx[1])  # fmt: skip
            return eval(expr, {"__builtins__": {}})

        krs = entries.KernelRuleSet(0, 0, [0] * 256, py.Mask(0, 0), py.Mask(0, 0), {}, {}, {(17, 53): 1})
        (inner,) = entries.kernel_port_entries(krs)
        if idx(1, 0, 0) != py.PORT_RANGE or idx(2, 1, 53) != 2 * py.PORT_RANGE + inner:
            diffs.append("TG_PORT_IDX and layout.PORT_RANGE / entries.kernel_port_entries disagree")
    else:
        diffs.append("TG_PORT_IDX not found in layout.h")

    # reasons: TG_R_<NAME> = i  <->  REASONS[i] = name
    reasons = {v: reason_name(k) for k, v in d.items() if k.startswith("TG_R_")}
    if d.get("TG_REASONS") != len(py.REASONS) or reasons != dict(enumerate(py.REASONS)):
        diffs.append(f"reasons: layout.h {reasons} (TG_REASONS {d.get('TG_REASONS')}), layout.REASONS {py.REASONS}")
    if not set(py.DROP_REASONS) <= set(py.REASONS):
        diffs.append(f"DROP_REASONS {py.DROP_REASONS} names reasons the program does not count")
    pseudo = {v for k, v in d.items() if k.startswith("TG_RULE_") and k != "TG_RULE_IDX"}
    if set(py.PSEUDO_RULES) != pseudo:
        diffs.append(f"pseudo-rules: layout.h {sorted(pseudo)}, layout.PSEUDO_RULES {sorted(py.PSEUDO_RULES)}")

    # structs: the same fields, in the same order, of the same types, at the same offsets
    structs = c_structs(layout_h)
    py_structs = {n: t for n, t in vars(py).items() if isinstance(t, type) and issubclass(t, ctypes.Structure)}
    for name in sorted(set(structs) | set(py_structs)):
        if name not in structs or name not in py_structs:
            diffs.append(f"struct {name} only in {'layout.py' if name in py_structs else 'layout.h'}")
            continue
        cls = py_structs[name]
        want = [(f, _c_type(t), n) for f, t, n in structs[name]]
        got = [(f, *_py_type(t)) for f, t in cls._fields_]
        if want != got:
            diffs.append(f"struct {name}: layout.h {want}, layout.py {got}")
            continue
        offsets, size, _ = c_layout(structs, name)
        if offsets != [(f, getattr(cls, f).offset) for f, _ in cls._fields_] or size != ctypes.sizeof(cls):
            diffs.append(f"struct {name}: C layout {offsets} ({size} bytes), ctypes {ctypes.sizeof(cls)} bytes")
    for name in ("RULE_DROP_REASONS",):
        fields = {f for f, _, _ in structs.get("tg_rule_count", [])}
        split = {f for f in fields if f.startswith("drop_")} - {"drop_pkts", "drop_bytes"}
        if split != {f"drop_{r}" for r in getattr(py, name)}:
            diffs.append(f"layout.{name} {getattr(py, name)}, tg_rule_count's drop split {sorted(split)}")

    # maps: name, order, key/value types, per-CPU, pin name; counter sizes the loader checks
    maps = c_maps(maps_h)
    got_maps = {n: (_c_type(k), _c_type(v), kind.startswith("percpu_")) for n, kind, k, v, _, _ in maps}
    want_maps = {n: (_py_type(k)[0], _py_type(v)[0], p) for n, (k, v, p) in py.LAYOUTS.items()}
    if got_maps != want_maps or list(got_maps) != list(want_maps):
        diffs.append(f"maps: maps.h {got_maps}, layout.LAYOUTS {want_maps}")
    pinned = tuple(n for n, *_, pin in maps if pin)
    if pinned != py.MAP_NAMES or any(pin and pin != n for n, *_, pin in maps):
        diffs.append(f"pinned maps: maps.h {pinned}, layout.MAP_NAMES {py.MAP_NAMES}")
    sizes = {n: size for n, *_, size, _ in maps}
    for name, entries_ in py.RESIZABLE_COUNTERS.items():
        if c_eval(sizes.get(name, "-1"), d) != entries_:
            diffs.append(f"map {name} has {sizes.get(name)} entries in maps.h, {entries_} in RESIZABLE_COUNTERS")

    # the lowest-bit multiplier and the program's name
    mul = re.search(r"\*\s*(0x[0-9a-fA-F]+)ULL\)\s*>>\s*58", classify_h)
    if not mul or int(mul[1], 16) != py.DEBRUIJN:
        diffs.append(f"de Bruijn multiplier: classify.h {mul and mul[1]}, layout.DEBRUIJN {py.DEBRUIJN:#x}")
    if not re.search(rf"\bint\s+{py.PROG_NAME}\s*\(\s*struct xdp_md\b", program_c):
        diffs.append(f"tidegate.c has no XDP function named {py.PROG_NAME}")
    return diffs


def _sources() -> dict[str, str]:
    return {k: (BPF / f).read_text() for k, f in (("layout_h", "layout.h"), ("maps_h", "maps.h"),
                                                   ("classify_h", "classify.h"), ("program_c", "tidegate.c"))}  # fmt: skip


def test_the_c_headers_and_layout_py_agree():
    assert contract_differences(**_sources()) == []


def test_the_raw_trie_entries_have_the_structs_layout():
    """entries.py packs trie keys and values with struct (faster than ctypes): the same bytes."""
    assert entries.CIDR_VAL.pack(0x0102030405060708, 3, 0) == bytes(layout.tg_cidr_val(0x0102030405060708, 3, 0))
    head = entries.CIDR_KEY_HEAD.pack(56, 2)
    assert head + bytes([10, 1, 2, 0]) == bytes(layout.tg_cidr4_key(56, 2, int.from_bytes(bytes([10, 1, 2, 0]),
                                                                                             "little")))  # fmt: skip
    assert len(head) + 16 == ctypes.sizeof(layout.tg_cidr6_key)


# one change to the C side each: (file, text, changed text, what a difference must name)
C_MUTATIONS = {
    "a constant": ("layout_h", "#define TG_MAX_RULES 64", "#define TG_MAX_RULES 65", "TG_MAX_RULES"),
    "a new constant": ("layout_h", "#define TG_LRU_COUNTERS 2", "#define TG_LRU_COUNTERS 2\n#define TG_NEW 1",
                       "TG_NEW"),
    "a reason renamed": ("layout_h", "#define TG_R_BLOCKED 5", "#define TG_R_PENALTY 5", "'penalty'"),
    "a reason added": ("layout_h", "#define TG_REASONS 10", "#define TG_R_NEW 10\n#define TG_REASONS 11",
                       "TG_REASONS 11"),
    "a field type": ("layout_h", "__u32 epoch;       /* per-source", "__u64 epoch;       /* per-source",
                     "struct tg_set_cfg"),
    "a field renamed": ("layout_h", "__u64 drops;       /* enforced", "__u64 dropped;       /* enforced",
                        "struct tg_src"),
    "fields swapped": ("layout_h", "__u64 tokens;\n\t__u64 last_ns;\n\t__u64 packets;\n\t__u64 bytes;",
                       "__u64 last_ns;\n\t__u64 tokens;\n\t__u64 packets;\n\t__u64 bytes;", "struct tg_src"),
    "a shadow state field": ("layout_h", "__u64 drops;          /* would-drops */",
                             "__u32 drops;          /* would-drops */", "struct tg_shadow"),
    "an array length": ("layout_h", "proto_mask[256]", "proto_mask[255]", "struct tg_set_cfg"),
    "a new struct": ("layout_h", "struct tg_count {", "struct tg_new { __u32 x; };\nstruct tg_count {",
                     "struct tg_new only in layout.h"),
    "a map's value type": ("maps_h", "u32, u64, tg_ports", "u32, u32, tg_ports", "maps:"),
    "a map made per-CPU": ("maps_h", '"array", u32, u32, tg_debruijn', '"percpu_array", u32, u32, tg_debruijn',
                           "maps:"),
    "a map size default": ("maps_h", "#define TG_MAX_SOURCES 1048576", "#define TG_MAX_SOURCES 65536",
                           "TG_MAX_SOURCES"),
    "the counter map's size": ("maps_h", "tg_stats, TG_REASONS,", "tg_stats, TG_REASONS + 1,", "map tg_stats"),
    "the port index": ("layout_h", "(slot) * 2 + (udp)) << 16", "(slot) * 2 + (udp)) << 17", "TG_PORT_IDX"),
    "the de Bruijn multiplier": ("classify_h", "0x022fdd63cc95386dULL", "0x022fdd63cc95386cULL", "de Bruijn"),
}  # fmt: skip


@pytest.mark.parametrize("what", C_MUTATIONS)
def test_a_change_on_the_c_side_is_caught(what):
    src = _sources()
    part, old, new, named = C_MUTATIONS[what]
    assert old in src[part], f"the mutation {what!r} no longer applies: update it"
    src[part] = src[part].replace(old, new, 1)
    diffs = contract_differences(**src)
    assert any(named in d for d in diffs), f"{what}: {diffs or 'went unnoticed'}"


class _Changed:
    """layout.py with some names changed."""

    def __init__(self, **changes):
        self.__dict__.update(vars(layout))
        self.__dict__.update(changes)


class tg_ctl(ctypes.Structure):  # noqa: N801 - named as the C struct it stands for
    _fields_ = [("sel", ctypes.c_uint), ("pad", ctypes.c_ushort), ("more", ctypes.c_ushort)]


# one change to layout.py each: (the changed names, what a difference must name)
PY_MUTATIONS = {
    "a constant": ({"SLOTS": 4}, "layout.SLOTS"),
    "a reason": ({"REASONS": layout.REASONS[:-1] + ("ipv6-ext-dropped",)}, "ipv6-ext-dropped"),
    "reasons reordered": ({"REASONS": ("allow", "pass") + layout.REASONS[2:]}, "reasons:"),
    "a struct": ({"tg_ctl": tg_ctl}, "struct tg_ctl"),
    "a map's layout": ({"LAYOUTS": {**layout.LAYOUTS, "tg_ports": (ctypes.c_uint, ctypes.c_uint, False)}}, "maps:"),
    "the pinned maps": ({"MAP_NAMES": layout.MAP_NAMES[1:]}, "MAP_NAMES"),
    "a size default": ({"MAX_CIDRS": 1 << 17}, "MAX_CIDRS"),
    "the per-rule drop split": ({"RULE_DROP_REASONS": ("rate", "prefix", "blocked")}, "RULE_DROP_REASONS"),
    "the program's name": ({"PROG_NAME": "tidegate"}, "no XDP function"),
}


@pytest.mark.parametrize("what", PY_MUTATIONS)
def test_a_change_on_the_python_side_is_caught(what):
    changes, named = PY_MUTATIONS[what]
    diffs = contract_differences(**_sources(), py=_Changed(**changes))
    assert any(named in d for d in diffs), f"{what}: {diffs or 'went unnoticed'}"
