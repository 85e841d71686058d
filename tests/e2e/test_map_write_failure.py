"""A map write that fails partway through a batch: the version is marked
failed in the store with an audit row, the kernel keeps filtering with the
set it had, and the agent re-reads what the written slot really holds, so
the next apply (which reuses that slot) succeeds and leaves the kernel
holding exactly the store's active version.

The failure is injected by the kernel layer's test hook
(TIDEGATE_FAIL_BATCH_WRITE=N: the agent's Nth batched map write writes half
its entries, then fails), in a real agent."""

from __future__ import annotations

import os
import sqlite3

import grpc
import pytest

from tidegate.kernel import bpfsys
from tidegate.kernel.entries import build_kernel_rule_set, kernel_port_entries, kernel_trie_entries
from tidegate.kernel.layout import PORT_RANGE
from tidegate.ruleset.parse import parse_rule_set

from .conftest import BASE_RULES

pytestmark = pytest.mark.e2e


def _with_deny(first: int, count: int = 400) -> str:
    nets = ", ".join(f'"198.{18 + (i >> 8)}.{i & 255}.0/24"' for i in range(first, first + count))
    return BASE_RULES.replace("rules:\n", f"deny: [{nets}]\nrules:\n", 1)


A, B, C, D, E, F = (_with_deny(400 * i) for i in range(6))
# Batched writes per apply into an empty slot: the IPv4 trie, the port table (A: 1-2, B: 3-4).
# C reuses A's slot: delete A's trie entries (5), write C's (6: fails halfway). D, into that
# slot again: delete what is really there (7), write D (8), ports (9). E as shadow, into B's
# slot: 10-12. F as shadow replaces E in E's slot: delete E's entries (13), write F's (14: fails).
FAIL_AT = "6,14"


def _slot_contents(agent, slot: int) -> tuple[dict, dict]:
    """The IPv4 trie entries and port-table masks one slot holds, read from
    the agent's pinned maps."""
    fd = bpfsys.obj_get(f"{agent.pin_dir}/tg_cidrs4")
    try:
        keys, values, n = bpfsys.lookup_batch(fd, 12, 16, 1 << 20)
    finally:
        os.close(fd)
    kb, vb = keys.tobytes(), values.tobytes()
    trie = {kb[i * 12:(i + 1) * 12]: vb[i * 16:(i + 1) * 16] for i in range(n)}
    trie = {k: v for k, v in trie.items() if int.from_bytes(k[4:8], "little") == slot}
    fd = bpfsys.obj_get(f"{agent.pin_dir}/tg_ports")
    try:
        _, values, n = bpfsys.lookup_batch(fd, 4, 8, 3 * PORT_RANGE)
    finally:
        os.close(fd)
    masks = values.view("<u8")[slot * PORT_RANGE:(slot + 1) * PORT_RANGE]
    return trie, {int(i): int(masks[i]) for i in masks.nonzero()[0]}


def _active_slot(agent) -> int:
    fd = bpfsys.obj_get(f"{agent.pin_dir}/tg_ctl")
    try:
        _, values, _ = bpfsys.lookup_batch(fd, 4, 8, 1)
    finally:
        os.close(fd)
    return int(values[0])


def _expected(text: str, slot: int) -> tuple[dict, dict]:
    krs = build_kernel_rule_set(parse_rule_set(text, "expected"))
    v4, v6 = kernel_trie_entries(krs, slot)
    assert not v6
    return v4, kernel_port_entries(krs)


def test_a_failed_map_write_is_recorded_and_the_next_apply_starts_from_the_truth(start_agent, monkeypatch):
    monkeypatch.setenv("TIDEGATE_FAIL_BATCH_WRITE", str(FAIL_AT))
    agent = start_agent("mapw")  # no rule set: every batched write below is an apply's
    monkeypatch.delenv("TIDEGATE_FAIL_BATCH_WRITE")
    api = agent.api
    va = api.ApplyRuleSet(yaml=A, reason="A").version
    assert _active_slot(agent) == 0
    vb = api.ApplyRuleSet(yaml=B, reason="set B", force=True).version
    st = api.GetStatus()
    assert st.active_version == vb and st.attached
    assert _active_slot(agent) == 1
    a_slot = 0  # A went to slot 0, B to slot 1: C (and then D) reuse slot 0, the free one
    assert _slot_contents(agent, a_slot) == _expected(A, a_slot)

    err = api.error("ApplyRuleSet", yaml=C, reason="set C", force=True)
    assert err.code() == grpc.StatusCode.INTERNAL and "injected failure" in err.details(), err.details()
    # the kernel still runs B; C is recorded as failed, with an audit row
    st = api.GetStatus()
    assert (st.active_version, st.attached) == (vb, True)
    versions = {v.number: v for v in api.ListVersions(limit=10).versions}
    vc = max(versions)
    assert (versions[vc].state, versions[va].state, versions[vb].state) == ("aborted", "applied", "applied")
    assert "injected failure" in versions[vc].error and versions[vb].active
    audit = [a for a in api.ListAudit(limit=20).entries if a.version == vc]
    assert [(a.action, a.result) for a in audit] == [("apply", "error")] and "injected failure" in audit[0].detail
    # partway: A's entries are gone, half of C's are written
    trie, ports = _slot_contents(agent, a_slot)
    c_trie, c_ports = _expected(C, a_slot)
    assert len(trie) == len(c_trie) // 2 and set(trie) < set(c_trie)

    # the next apply reuses that slot and succeeds; the kernel holds exactly the store's active version
    vd = api.ApplyRuleSet(yaml=D, reason="D after a failed write", force=True).version
    st = api.GetStatus()
    assert st.active_version == vd and st.attached
    stored = api.GetVersion(number=vd).yaml
    assert _slot_contents(agent, a_slot) == _expected(stored, a_slot)
    assert api.GetVersion(number=vd).info.state == "applied"
    db = sqlite3.connect(f"file:{agent.state_dir / 'tidegate.db'}?mode=ro", uri=True)
    try:
        assert db.execute("SELECT version FROM activations ORDER BY id DESC LIMIT 1").fetchone() == (vd,)
    finally:
        db.close()

    # a shadow load that fails: the shadow set it was replacing is unloaded already, and the store says so
    ve = api.ApplyRuleSet(yaml=E, reason="shadow E", shadow=True).version
    assert api.GetStatus().shadow_version == ve
    err = api.error("ApplyRuleSet", yaml=F, reason="shadow F", shadow=True)
    assert err.code() == grpc.StatusCode.INTERNAL and "injected failure" in err.details(), err.details()
    st = api.GetStatus()
    assert (st.active_version, st.shadow_version) == (vd, 0)
    versions = {v.number: v for v in api.ListVersions(limit=10).versions}
    vf = max(versions)
    assert (versions[ve].state, versions[vf].state) == ("aborted", "aborted")
    assert "unloaded" in versions[ve].error and "injected failure" in versions[vf].error
    assert api.error("ShadowReport").code() == grpc.StatusCode.FAILED_PRECONDITION
    # and the next shadow load, into the slot F half filled, works and holds exactly what it should
    vg = api.ApplyRuleSet(yaml=A, reason="shadow A again", shadow=True).version
    assert api.GetStatus().shadow_version == vg
    assert _slot_contents(agent, 1) == _expected(api.GetVersion(number=vg).yaml, 1)
    assert agent.proc.poll() is None, "the agent kept running"
