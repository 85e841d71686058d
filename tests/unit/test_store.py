"""VersionStore on real SQLite files: numbering, activation history,
reconciliation with the kernel, corruption handling, crash safety."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tidegate.store import StoreConflictError, StoreCorruptError, VersionNotFound, VersionStore


@pytest.fixture
def store(tmp_path):
    s = VersionStore.open(tmp_path / "state")
    yield s
    s.close()


def apply(store, content="rules: []\n", author="alice", reason="r"):
    v = store.begin_version(content, "d" + content[:4], author, reason)
    store.commit_active(v, "apply")
    return v


def test_numbering_never_reused_after_abort(store):
    v1 = apply(store)
    v2 = store.begin_version("x", "d", "bob", "try")
    store.abort_version(v2, "kernel said no")
    v3 = apply(store)
    assert (v1, v2, v3) == (1, 2, 3)
    assert store.get_version(2).state == "aborted"
    assert store.get_version(2).error == "kernel said no"
    assert store.active_version() == 3
    with pytest.raises(VersionNotFound):
        store.get_version(99)


def test_list_and_previous_active(store):
    v1, v2 = apply(store, reason="first"), apply(store, reason="second")
    assert store.previous_active() == v1
    store.commit_active(v1, "rollback", reason="back")
    assert store.active_version() == v1
    assert store.previous_active() == v2
    v3 = apply(store)
    assert store.previous_active() == v1
    rows = store.list_versions()
    assert [r.number for r in rows] == [v3, v2, v1]
    assert [r.active for r in rows] == [True, False, False]
    assert rows[2].activations == 2 and rows[1].reason == "second"
    assert [r.number for r in store.list_versions(limit=1, offset=1)] == [v2]


def test_reconcile_follows_kernel(store):
    v1 = apply(store)
    v2 = store.begin_version("b", "d", "a", "r")  # crash after the kernel swap, before commit
    v3 = store.begin_version("c", "d", "a", "r")  # crash before the kernel swap
    res = store.reconcile(kernel_version=v2)
    assert res.action == "followed-kernel" and res.aborted == [v3]
    assert store.active_version() == v2
    assert store.get_version(v2).state == "applied"
    assert store.get_version(v3).state == "aborted"
    assert store.reconcile(kernel_version=v2).action == "none"
    assert store.reconcile(kernel_version=None).action == "kernel-empty"
    assert store.active_version() == v2 and v1 == 1
    with pytest.raises(StoreConflictError):
        store.reconcile(kernel_version=42)
    assert [a.action for a in store.list_audit(action="reconcile")] == ["reconcile"]


@pytest.mark.parametrize("damage", ["random", "truncate", "empty"])
def test_corrupt_file_is_refused_and_untouched(tmp_path, damage):
    d = tmp_path / "state"
    s = VersionStore.open(d)
    for i in range(20):
        apply(s, content="x" * 5000 + str(i))
    s.close()
    db = d / "tidegate.db"
    for extra in ("-wal", "-shm"):
        p = d / f"tidegate.db{extra}"
        if p.exists():
            p.unlink()
    data = db.read_bytes()
    if damage == "random":
        data = data[:100] + os.urandom(len(data) - 100)
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = b""
    db.write_bytes(data)
    with pytest.raises(StoreCorruptError) as e:
        VersionStore.open(d)
    assert "tidegate.db" in str(e.value) and "--rules" in str(e.value)
    assert db.read_bytes() == data


def test_audit_is_append_only(store):
    store.audit("apply", "rejected", "mallory", "10.0.0.1:1", "bad rule set")
    with pytest.raises(Exception):
        store._conn.execute("DELETE FROM audit")
    rec = store.list_audit()[0]
    assert (rec.action, rec.result, rec.author, rec.peer) == ("apply", "rejected", "mallory", "10.0.0.1:1")


def test_backup_restores(store, tmp_path):
    apply(store, reason="kept")
    store.backup(tmp_path / "b.db")
    os.makedirs(tmp_path / "restored")
    os.replace(tmp_path / "b.db", tmp_path / "restored" / "tidegate.db")
    r = VersionStore.open(tmp_path / "restored")
    assert r.get_version(1).reason == "kept" and r.active_version() == 1


def test_an_older_store_is_backed_up_before_its_migration(tmp_path):
    """A store of an older schema (user_version below the current one) is
    copied to tidegate.db.bak, as it was, before the migration touches it;
    a store already current is not copied again."""
    import sqlite3

    s = VersionStore.open(tmp_path / "state")
    apply(s, reason="from the old agent")
    s.close()
    db = tmp_path / "state" / "tidegate.db"
    con = sqlite3.connect(db)
    con.execute("PRAGMA user_version = 0")  # what an older tidegate wrote
    con.close()
    s = VersionStore.open(tmp_path / "state")
    assert s.get_version(1).reason == "from the old agent"
    s.close()
    bak = sqlite3.connect(tmp_path / "state" / "tidegate.db.bak")
    assert bak.execute("PRAGMA user_version").fetchone()[0] == 0, "the copy is the store before migrating"
    assert bak.execute("SELECT reason FROM versions").fetchall() == [("from the old agent",)]
    bak.close()
    os.unlink(tmp_path / "state" / "tidegate.db.bak")
    VersionStore.open(tmp_path / "state").close()
    assert not (tmp_path / "state" / "tidegate.db.bak").exists()


def test_survives_sigkill_at_random_points(tmp_path):
    d = tmp_path / "state"
    VersionStore.open(d).close()
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.join(os.path.dirname(__file__), '..', '..', 'control')!r})
        from tidegate.store import VersionStore
        s = VersionStore.open({str(d)!r})
        while True:
            v = s.begin_version("c" * 2000, "d", "a", "r")
            s.audit("apply", "ok", "a", "p", version=v)
            s.commit_active(v, "apply")
    """)
    rnd = random.Random(3)
    for _ in range(40):
        p = subprocess.Popen([sys.executable, "-c", script])
        time.sleep(rnd.uniform(0.05, 0.25))
        p.send_signal(signal.SIGKILL)
        p.wait()
    s = VersionStore.open(d)
    versions = s.list_versions(limit=100000)
    numbers = sorted(v.number for v in versions)
    assert numbers == list(range(1, len(numbers) + 1)), "no gaps in numbering"
    assert all(v.state in ("pending", "applied") for v in versions)
    assert sum(v.active for v in versions) == 1
    # at most one pending row per killed run, and committed ones have activations
    assert all(v.activations == 1 for v in versions if v.state == "applied")
    pending = sorted(v.number for v in versions if v.state == "pending")
    assert pending, "some kill landed between a version's record and its activation"
    active = s.active_version()
    s.reconcile(active)  # the kernel (here: nobody) runs the store's active version
    after = {v.number: v for v in s.list_versions(limit=100000)}
    assert sorted(n for n, v in after.items() if v.state == "aborted") == pending, "every pending row is aborted"
    assert all(after[n].state == v.state for n, v in ((v.number, v) for v in versions) if v.state != "pending")
    assert s.active_version() == active and not any(v.state == "pending" for v in after.values())


def test_the_agents_checkpoints_leave_commits_alone_and_lose_nothing(tmp_path):
    """With checkpoint_later (the agent), no commit copies the WAL into the
    database, however much is written; checkpoint() copies all of it, and a
    store opened again (as after a crash, without either) holds every version."""
    s = VersionStore.open(tmp_path)
    s.checkpoint_later()
    big = "rules: []\n# " + "x" * 400_000 + "\n"  # ~100 pages a version: past 1,000 in a dozen
    versions = [apply(s, big + f"# {i}\n") for i in range(12)]
    wal = tmp_path / (s.path.name + "-wal")
    pages, copied = s.checkpoint()
    assert pages > 1000 and copied == pages, (pages, copied)  # nothing was copied before this call
    assert wal.stat().st_size > 1000 * 4096
    versions.append(apply(s, "rules: []\n"))
    again = VersionStore.open(tmp_path)  # the WAL is still there: it is read like the file
    assert [again.get_version(v).content for v in versions] == [s.get_version(v).content for v in versions]
    again.close()
    s.close()
