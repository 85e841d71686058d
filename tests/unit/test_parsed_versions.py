"""Which parsed versions the agent keeps in memory (changes/service.py,
ChangeService._keep), and that the kernel-entry cache (kernel/entries.py,
build_kernel_rule_set) keeps no rule set alive by itself. A parsed network
costs about 300 bytes: four kept 100,000-CIDR versions were most of the
agent's memory (bench/agent_process.py, "agent RSS").

The version store is the real SQLite file; the kernel filter is reduced to
the two versions it reports (this is the logic above the kernel layer)."""

from __future__ import annotations

import gc
import weakref

import pytest

from tidegate.changes import service as changes
from tidegate.changes.service import ChangeService
from tidegate.kernel import entries
from tidegate.ruleset.dump import dump_yaml
from tidegate.ruleset.model import network_count
from tidegate.ruleset.parse import parse_rule_set
from tidegate.store import VersionStore


class Kernel:
    """The versions the kernel holds (KernelFilter.active_version / shadow_version)."""

    def __init__(self):
        self.active: int | None = None
        self.shadow: int | None = None

    def active_version(self):
        return self.active

    def shadow_version(self):
        return self.shadow


def text(cidrs: int, first: int = 0) -> str:
    allow = ", ".join(f'"10.{(i // 256) % 256}.{i % 256}.0/24"' for i in range(first, first + cidrs))
    return f"defaults: {{limit: {{pps: 100, burst: 100}}}}\nallow: [{allow}]\nrules: []\n"


@pytest.fixture
def service(tmp_path):
    store = VersionStore.open(tmp_path / "state")
    kernel = Kernel()
    svc = ChangeService(kf=kernel, store=store, sampler=None, options=None, reviews=None, guard_factory=None)
    yield svc, store, kernel
    store.close()


def stored(store: VersionStore, cidrs: int, first: int) -> int:
    rs = parse_rule_set(text(cidrs, first))
    v = store.begin_version(dump_yaml(rs), rs.digest(), "test", "kept versions")
    store.commit_active(v, "apply", "test", "kept versions")
    return v


def test_small_versions_are_kept_up_to_the_count(service):
    svc, store, kernel = service
    versions = [stored(store, 10, 10 * i) for i in range(6)]
    kernel.active = versions[-1]
    first = {v: svc.rule_set_of(v) for v in versions}  # the oldest asked first
    assert all(network_count(rs) == 10 for rs in first.values())
    # the active one, and the RULE_SETS_KEPT most recently asked of the others, come back as they were
    for v in [versions[-1]] + versions[-1 - changes.RULE_SETS_KEPT:-1]:
        assert svc.rule_set_of(v) is first[v], v
    # the one before them was parsed again from the store: equal, not the same object
    again = svc.rule_set_of(versions[0])
    assert again is not first[versions[0]] and again.digest() == first[versions[0]].digest()


def test_large_versions_are_kept_only_within_the_network_budget(service, monkeypatch):
    svc, store, kernel = service
    monkeypatch.setattr(changes, "NETWORKS_KEPT", 100)
    v1, v2, v3, v4 = (stored(store, 60, 60 * i) for i in range(4))
    kernel.active, kernel.shadow = v4, v3
    first = {v: svc.rule_set_of(v) for v in (v1, v2, v3, v4)}
    assert svc.rule_set_of(v2) is first[v2]  # 60 networks: within the budget
    assert svc.rule_set_of(v1) is not first[v1]  # 60 more would be 120: parsed again
    # the kernel's active and shadow versions are kept whatever they hold
    monkeypatch.setattr(changes, "NETWORKS_KEPT", 0)
    svc.rule_set_of(v2)
    assert svc.rule_set_of(v4) is first[v4] and svc.rule_set_of(v3) is first[v3]
    assert svc.rule_set_of(v2) is not first[v2]


def test_the_kernel_entry_cache_keeps_no_rule_set_alive():
    rs = parse_rule_set(text(100))
    krs = entries.build_kernel_rule_set(rs)
    assert entries.build_kernel_rule_set(rs) is krs  # the estimate's entries, reused by the write
    gone = weakref.ref(rs)
    del rs
    gc.collect()
    assert gone() is None
