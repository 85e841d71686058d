"""The packet-path bench's report: the tables of a run's results (ratios within the run).

Used by packet_path.py.
"""

from __future__ import annotations

import report

# --------------------------------------------------------------------------- report
CASES = [
    ("v4", "v4 hot", "one IPv4 source, within its rate"),
    ("over", "v4 hot over", "one IPv4 source over its rate (100 pps)"),
    ("v6", "v6 hot", "one IPv6 source, within its rate"),
    ("vlan", "VLAN hot", "one 802.1Q-tagged IPv4 source, within its rate"),
    ("cycle", "v4 64k of 1M", "65,536 sources round robin, maps prefilled with 1M sources (through the cycler)"),
    ("spread", "v4 64k spread", "65,536 sources spread over all of IPv4 (some hit the allow/deny lists), "
     "round robin, maps full"),
    ("hot1m", "v4 hot, 1M", "one IPv4 source, maps holding ~1M sources"),
    ("churn", "v4 2M churn", "2,097,152 sources round robin through maps of 1,048,576 entries: every packet is "
     "a source the map no longer holds (insert + evict)"),
]


def summarize(results: dict) -> tuple[str, list[str]]:
    """Per case: a table of rows with ns and ratios vs the token bucket and the floor."""
    out = []
    cases = results["cases"]
    labels = results["labels"]
    for ckey, cname, cdesc in CASES:
        c = cases.get(ckey)
        if not c:
            continue
        tb = c.get(c["_tb"], {}).get("ns")
        floor = c.get(c["_floor"], {}).get("ns")
        rows = []
        for k, v in c.items():
            if k.startswith("_"):
                continue
            rs = v.get("reasons")
            rs_s = ", ".join(f"{r} {p:.0%}" for r, p in sorted(rs.items(), key=lambda x: -x[1])) if rs else ""
            rows.append([labels[k], report.fmt(v["ns"], 0), f"{min(v['runs'])}-{max(v['runs'])}",
                         report.fmt(report.ratio(v["ns"], tb), 2), report.fmt(report.ratio(v["ns"], floor), 2),
                         v["verdict"] + (f" ({rs_s})" if rs_s else "")])
        out.append(f"### {cname}: {cdesc}\n")
        out.append(report.table(["row", "ns/pkt", "range", "x token bucket", "x floor", "verdict"], rows))
        out.append("")
    return "\n".join(out), []


def cost_breakdown(results: dict) -> str:
    """What each part of tidegate's path costs: differences between rows."""
    pairs = [
        ("clock: bpf_ktime_get_ns", "parse_ktime", "parse"),
        ("clock: bpf_ktime_get_coarse_ns", "parse_coarse", "parse"),
        ("clock: bpf_jiffies64 (tidegate's)", "parse_jiffies", "parse"),
        ("minimal token bucket over the floor", "tb", "parse"),
        ("token bucket: coarse clock instead of ktime", "tb_coarse", "tb"),
        ("token bucket: per-CPU LRU lists", "tb_pcpu", "tb"),
        ("token bucket: tidegate's entry size (its state key and value)", "tb_big", "tb"),
        ("tidegate defaults-only over the floor", "tg_defaults", "parse"),
        ("per-prefix bucket (prefix limit on)", "tg_prefix", "tg_defaults"),
        ("allow/deny tries, 2x10k CIDRs (trie, or the cached answer)", "tg_lists", "tg_prefix"),
        ("50 rules, any source (port table + rule bit)", "tg_rules_any", "tg_prefix"),
        ("50 rules, 10 with source CIDRs (+ small trie)", "tg_rules", "tg_prefix"),
        ("full set over defaults+prefix", "tg_full", "tg_prefix"),
        ("shadow set loaded (its own buckets; same matching)", "tg_shadow", "tg_full"),
    ]
    rows = []
    for label, a, b in pairs:
        cells = [label]
        for ckey in ("v4", "v6", "cycle", "spread", "hot1m", "churn"):
            c = results["cases"].get(ckey, {})
            if a in c and b in c and c[a]["ns"] is not None and c[b]["ns"] is not None:
                cells.append(f"{c[a]['ns'] - c[b]['ns']:+.0f}")
            else:
                cells.append("n/a")
        rows.append(cells)
    return report.table(["difference", "v4 hot", "v6 hot", "v4 64k of 1M", "v4 64k spread", "v4 hot, 1M",
                         "v4 2M churn"], rows)


# Reference figures quoted in issue 7 (measured on another machine like this one)
ISSUE7_REFERENCE = [
    ("bare drop", "v4", "bare", None, 23),
    ("parse+drop", "v4", "parse", None, 24),
    ("bpf_ktime_get_ns alone (over the floor)", "v4", "parse_ktime", "parse", 30),
    ("minimal token bucket, one source", "v4", "tb", None, 80),
    ("minimal token bucket, 64k cycling in 1M", "cycle", "tb", None, 380),
    ("xdp-filter (low end of 62-109)", "v4", "xdpf", None, 62),
]


def reference_table(results: dict) -> str:
    rows = []
    for label, ckey, a, b, ref in ISSUE7_REFERENCE:
        c = results["cases"].get(ckey, {})
        if a not in c:
            rows.append([label, ref, "n/a", "n/a"])
            continue
        v = c[a]["ns"] - (c[b]["ns"] if b else 0)
        rows.append([label, ref, report.fmt(float(v), 0), report.fmt(report.ratio(v, ref), 2)])
    return report.table(["figure", "issue 7 reference, ns", "measured here, ns", "here / reference"], rows)


# issue 15's packet-path rows: (case, row, target ratio to the minimal token bucket)
TARGETS = [("v4", "tg_full", 1.0), ("cycle", "tg_full", 1.0), ("spread", "tg_full", 1.0),
           ("v4", "tg_shadow", 1.3), ("cycle", "tg_shadow", 1.3), ("spread", "tg_shadow", 1.3),
           ("v6", "tg_full", 1.0), ("vlan", "tg_full", 1.0)]  # fmt: skip


def targets_table(results: dict) -> str:
    """Issue 15's packet-path rows (and issue 7's): tidegate / minimal token bucket, same run."""
    rows = []
    listed = set()
    for ckey, k, target in TARGETS:
        listed.add((ckey, k))
        rows.append(_target_row(results, ckey, k, target))
    for ckey, _, _ in CASES:
        for k in ("tg_full", "tg_shadow", "tg_defaults", "tg_full_over", "tg_shadow_over", "tg_defaults_over"):
            if (ckey, k) not in listed:
                rows.append(_target_row(results, ckey, k, 1.3 if "shadow" in k else 1.0))
    return report.table(["case", "row", "x minimal token bucket", "target", "per round: median (quartiles)"],
                        [r for r in rows if r])  # fmt: skip


def paired_ratios(c: dict, k: str, ref: str) -> list[float]:
    """The row's ns / the reference's ns within each measuring round: every round measures every row
    once, so the pair shares whatever load the machine had then."""
    return sorted(a / b for a, b in zip(c[k].get("runs") or (), c[ref].get("runs") or ()) if b)


def spread_text(rs: list[float]) -> str:
    """Median and quartiles of per-round ratios: how sure a verdict near its target is."""
    if len(rs) < 2:
        return "n/a"
    return f"{report.median(rs):.2f} ({report.pct(rs, 25):.2f}-{report.pct(rs, 75):.2f})"


def _target_row(results: dict, ckey: str, k: str, target: float) -> list | None:
    c = results["cases"].get(ckey, {})
    tbk = c.get("_tb")
    if not tbk or tbk not in c or k not in c:
        return None
    r = report.ratio(c[k]["ns"], c[tbk]["ns"])
    cname = next(n for key, n, _ in CASES if key == ckey)
    ok = r is not None and r <= target
    return [cname, results["labels"][k], report.fmt(r, 2), f"meets (<= {target})" if ok else f"MISSES (<= {target})",
            spread_text(paired_ratios(c, k, tbk))]  # fmt: skip


def pieces_table(results: dict) -> str:
    rows = []
    for k in ("probe_lpm24", "probe_lpm8", "probe_lpm4", "probe_port_hash", "probe_port_array"):
        cells = [results["labels"].get(k, k)]
        for ckey in ("v4", "cycle", "spread"):
            c = results["cases"].get(ckey, {})
            if k in c and "parse" in c:
                cells.append(f"{c[k]['ns'] - c['parse']['ns']:+.0f}")
            else:
                cells.append("n/a")
        rows.append(cells)
    return report.table(["one lookup, ns over the floor", "v4 hot", "v4 64k of 1M", "v4 64k spread"], rows)


def cycler_cost(results):
    c = results["cases"].get("cycle", {})
    if "bare" in c and "bare" in results["cases"].get("v4", {}):
        return c["bare"]["ns"] - results["cases"]["v4"]["bare"]["ns"]
    return None


def issue2_lines(results) -> list[str]:
    c1, cm = results["cases"].get("v4", {}), results["cases"].get("hot1m", {})
    if "tg_full" not in c1 or "tg_full" not in cm:
        return []
    rows = []
    for k in ("parse", "tb", "tg_defaults", "tg_full", "tg_shadow"):
        if k in c1 and k in cm:
            rows.append([results["labels"][k], report.fmt(c1[k]["ns"], 0), report.fmt(cm[k]["ns"], 0),
                         report.fmt(report.ratio(c1[k]["ns"], c1["parse"]["ns"]), 2),
                         report.fmt(report.ratio(cm[k]["ns"], cm["parse"]["ns"]), 2)])
    return ["### Issue 2 figures: one hot source with 1 and with ~1M sources in the map\n",
            report.table(["row", "ns, 1 source", "ns, 1M sources", "x floor (1)", "x floor (1M)"], rows), ""]
