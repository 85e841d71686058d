"""A labelled library of traffic shapes, read by the insight reader.

Each shape is a YAML file (see examples/shapes/): what it is, the verdict
it must read as, and the groups of sources that make it. The runner
synthesizes the sampler's intervals for it (Poisson packet counts per
source and interval, the way the kernel's per-source entries move) on top
of a steady background of clients with some churn, with the agent up for
30 s, 2 min and 1 h (the shape itself lasts the last `seconds`, 20 s by
default), feeds them to `reading.Reader` and prints a confusion table of
shape against reading:

    python -m tidegate.observation.shapes examples/shapes [--interval 5]

The same shapes also run through the real agent on veth (tests/e2e); this
runner is the cheap way to read them at every age.
"""

from __future__ import annotations

import argparse
import copy
import ipaddress
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from tidegate.kernel.layout import RULE_DEFAULT
from tidegate.observation.reading import VERDICTS, Reader
from tidegate.observation.sampler import Interval

AGES = (30.0, 120.0, 3600.0)
EPOCH = 1
# where real clients come from in the synthesized background: a few access
# networks (documentation and test ranges stand in for ISPs' space)
CLIENT_NETS = ("81.2.0.0/16", "92.40.0.0/16", "100.64.0.0/12", "151.12.0.0/16", "188.20.0.0/16")
IMPOSSIBLE = (0, 127) + tuple(range(224, 256))


@dataclass
class Group:
    """Sources that behave alike within a shape."""

    kind: str  # "new" (sources not seen before the shape), "known" (the background clients), "hitter"
    pps: float  # total packets per second of the group
    sources: int = 0  # pool size; 0: every packet from a fresh address (never repeating)
    space: list[str] = field(default_factory=lambda: list(CLIENT_NETS))  # or ["whole"]
    drop_share: float = 0.0  # share of the group's packets a limit drops
    rule: int = RULE_DEFAULT


@dataclass
class Shape:
    name: str
    expect: str
    groups: list[Group]
    seconds: float = 20.0
    path: str = ""


def load_shape(path: Path) -> Shape:
    d = yaml.safe_load(path.read_text())
    if d.get("expect") not in VERDICTS:
        raise ValueError(f"{path}: expect must be one of {', '.join(VERDICTS)}, not {d.get('expect')!r}")
    groups = []
    for g in d.get("groups") or []:
        space = g.get("space", list(CLIENT_NETS))
        groups.append(Group(kind=g["kind"], pps=float(g["pps"]), sources=int(g.get("sources", 0)),
                            space=[space] if isinstance(space, str) else list(space),
                            drop_share=float(g.get("drop_share", 0.0)),
                            rule=int(g.get("rule", RULE_DEFAULT))))  # fmt: skip
    return Shape(d["name"], d["expect"], groups, float(d.get("seconds", 20.0)), str(path))


def load_library(directory: Path) -> list[Shape]:
    return [load_shape(p) for p in sorted(Path(directory).glob("*.yaml"))]


def v4_halves(ips: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's (hi, lo) key halves of IPv4 addresses given as uint32."""
    ips = ips.astype(np.uint32)
    lo = (ips.byteswap().astype(np.uint64) << np.uint64(32)) | np.uint64(0xFFFF0000)
    return np.zeros(len(ips), np.uint64), lo


def addresses(rng: np.random.Generator, space: list[str], n: int) -> np.ndarray:
    """n random IPv4 addresses (uint32) from the networks in `space`
    ("whole": the whole IPv4 space, as random spoofing draws them)."""
    if space == ["whole"]:
        return rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    nets = [ipaddress.ip_network(s) for s in space]
    pick = rng.integers(0, len(nets), n)
    base = np.array([int(x.network_address) for x in nets], np.uint64)[pick]
    size = np.array([x.num_addresses for x in nets], np.uint64)[pick]
    return (base + (rng.random(n) * size).astype(np.uint64)).astype(np.uint32)


class Background:
    """The steady clients every shape runs on: `clients` at `pps` each, a
    share of them replaced by new ones every minute."""

    def __init__(self, rng, clients: int = 500, pps: float = 1.0, churn_per_minute: float = 0.05):
        self.rng = rng
        self.pps = pps
        self.churn = churn_per_minute
        self.pool = addresses(rng, list(CLIENT_NETS), clients)

    def step(self, seconds: float) -> np.ndarray:
        k = self.rng.binomial(len(self.pool), min(1.0, self.churn * seconds / 60.0))
        if k:
            self.pool[self.rng.choice(len(self.pool), k, replace=False)] = addresses(self.rng, list(CLIENT_NETS), k)
        return self.pool


def _rows(rng, ips: np.ndarray, pps_each: float, seconds: float) -> tuple[np.ndarray, np.ndarray]:
    pk = rng.poisson(pps_each * seconds, len(ips)).astype(np.uint64)
    keep = pk > 0
    return ips[keep], pk[keep]


def interval(t0: float, t1: float, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]]) -> Interval:
    """An Interval of per-source rows: parts of (ips, packets, drops, rule)."""
    ips = np.concatenate([p[0] for p in parts]) if parts else np.array([], np.uint32)
    hi, lo = v4_halves(ips)
    n = len(ips)
    cat = np.concatenate
    return Interval(t0, t1, hi, lo, np.full(n, EPOCH, np.uint32),
                    cat([np.full(len(p[0]), p[3], np.uint8) for p in parts]) if parts else np.array([], np.uint8),
                    np.zeros(n, np.uint8), cat([p[1] for p in parts]) if parts else np.array([], np.uint64),
                    cat([p[2] for p in parts]) if parts else np.array([], np.uint64), np.zeros(n, np.uint64),
                    np.zeros(n, np.uint64))  # fmt: skip


class ShapeTraffic:
    """Per-interval rows of one shape's groups (pools drawn once)."""

    def __init__(self, shape: Shape, rng, background: Background):
        self.shape = shape
        self.rng = rng
        self.bg = background
        self.pools = []
        for g in shape.groups:
            if g.kind == "hitter":  # the first addresses of its network, one each
                net = ipaddress.ip_network(g.space[0])
                pool = (int(net.network_address) + np.arange(max(1, g.sources))).astype(np.uint32)
            elif g.kind == "new" and g.sources:
                pool = addresses(rng, g.space, g.sources)
            else:
                pool = None
            self.pools.append(pool)

    def rows(self, seconds: float) -> list:
        out = []
        for g, pool in zip(self.shape.groups, self.pools):
            if g.kind == "known":
                ips, pk = _rows(self.rng, self.bg.pool, g.pps / len(self.bg.pool), seconds)
            elif pool is None:  # never repeating: one packet per fresh address
                n = self.rng.poisson(g.pps * seconds)
                ips, pk = addresses(self.rng, g.space, n), np.ones(n, np.uint64)
            elif g.kind == "new" and len(pool) > g.pps * seconds:
                # a big pool at a low rate each: draw the packets, count per source
                draws = self.rng.integers(0, len(pool), self.rng.poisson(g.pps * seconds))
                idx, pk = np.unique(draws, return_counts=True)
                ips, pk = pool[idx], pk.astype(np.uint64)
            else:
                ips, pk = _rows(self.rng, pool, g.pps / len(pool), seconds)
            dr = np.floor(pk * g.drop_share).astype(np.uint64)
            out.append((ips, pk, dr, g.rule))
        return out


def _rule_name(r: int) -> str:
    return "default" if r == RULE_DEFAULT else f"rule{r}"


def baseline_reader(age: float, shape_seconds: float, interval_s: float, seed: int) -> tuple[Reader, Background, float]:
    """A reader fed the background alone from agent start until the shape starts."""
    rng = np.random.default_rng(seed)
    bg = Background(rng)
    reader = Reader(sample_interval=interval_s, start=0.0)
    t = 0.0
    while t + interval_s <= age - shape_seconds + 1e-9:
        pool = bg.step(interval_s)
        ips, pk = _rows(rng, pool, bg.pps, interval_s)
        reader.add(interval(t, t + interval_s, [(ips, pk, np.zeros(len(pk), np.uint64), RULE_DEFAULT)]), _rule_name)
        t += interval_s
    return reader, bg, t


def read_shape(shape: Shape, age: float, interval_s: float = 5.0, seed: int = 7, start=None) -> dict:
    """The reading at `age` seconds of agent uptime, the shape running for
    its last `shape.seconds`."""
    reader, bg, t = copy.deepcopy(start) if start is not None else baseline_reader(age, shape.seconds, interval_s,
                                                                                     seed)  # fmt: skip
    rng = np.random.default_rng(seed + 1)
    bg.rng = rng
    traffic = ShapeTraffic(shape, rng, bg)
    d: dict = {}
    while t + interval_s <= age + 1e-9:
        pool = bg.step(interval_s)
        surge = any(g.kind == "known" for g in shape.groups)
        parts = [] if surge else [(lambda r: (r[0], r[1], np.zeros(len(r[1]), np.uint64), RULE_DEFAULT))(
            _rows(rng, pool, bg.pps, interval_s))]  # fmt: skip
        parts += traffic.rows(interval_s)
        d = reader.add(interval(t, t + interval_s, parts), _rule_name)
        t += interval_s
    return d


def run_library(shapes: list[Shape], ages=AGES, interval_s: float = 5.0, seed: int = 7) -> list[dict]:
    """One result per shape and age: expected, read, confidence, reading."""
    out = []
    for age in ages:
        by_len: dict[float, tuple] = {}
        for s in shapes:
            if s.seconds not in by_len:
                by_len[s.seconds] = baseline_reader(age, s.seconds, interval_s, seed)
            d = read_shape(s, age, interval_s, seed, start=by_len[s.seconds])
            out.append({"shape": s.name, "age": age, "expect": s.expect, "verdict": d.get("verdict"),
                        "confidence": d.get("confidence"), "reading": d.get("reading", "")})  # fmt: skip
    return out


def _age(s: float) -> str:
    return f"{s / 3600:g} h" if s >= 3600 else f"{s / 60:g} min" if s >= 120 else f"{s:g} s"


def confusion_table(results: list[dict]) -> str:
    """Shape against reading (one row per shape, its reading at each age),
    then expected against read, counted."""
    ages = sorted({r["age"] for r in results})
    names = list(dict.fromkeys(r["shape"] for r in results))
    width = max(len(n) for n in names) + 2
    lines = [f"{'shape':<{width}}{'expect':<14}" + "".join(f"{_age(a):<22}" for a in ages)]
    for n in names:
        rs = {r["age"]: r for r in results if r["shape"] == n}
        exp = next(iter(rs.values()))["expect"]
        cells = []
        for a in ages:
            r = rs[a]
            mark = "" if r["verdict"] == r["expect"] else " ✗"
            cells.append(f"{r['verdict']} {r['confidence']:.2f}{mark}")
        lines.append(f"{n:<{width}}{exp:<14}" + "".join(f"{c:<22}" for c in cells))
    used = [v for v in VERDICTS if any(r["verdict"] == v or r["expect"] == v for r in results)]
    lines.append("")
    head = "expected \\ read"
    lines.append(f"{head:<16}" + "".join(f"{v:>14}" for v in used))
    for e in used:
        if not any(r["expect"] == e for r in results):
            continue
        lines.append(f"{e:<16}" + "".join(
            f"{sum(1 for r in results if r['expect'] == e and r['verdict'] == v):>14}" for v in used))  # fmt: skip
    right = sum(1 for r in results if r["verdict"] == r["expect"])
    lines.append(f"\n{right} of {len(results)} readings right")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tidegate.observation.shapes", description=__doc__.split("\n\n")[0])
    p.add_argument("directory", nargs="?", default="examples/shapes")
    p.add_argument("--interval", type=float, default=5.0, help="the sampler's interval, seconds")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("-v", "--verbose", action="store_true", help="print each reading in full")
    a = p.parse_args(argv)
    res = run_library(load_library(Path(a.directory)), interval_s=a.interval, seed=a.seed)
    print(confusion_table(res))
    if a.verbose:
        for r in res:
            print(f"\n[{r['shape']} @ {_age(r['age'])}] {r['reading']}")
    return 0 if all(r["verdict"] == r["expect"] for r in res) else 1


if __name__ == "__main__":
    sys.exit(main())
