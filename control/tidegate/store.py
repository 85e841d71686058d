"""The durable version store and audit log (SQLite, one file per host).

Every applied rule set is a numbered version with author, reason, time and
content. An apply is three steps: (1) `begin_version` records the content as
'pending', (2) the kernel swaps it in (the kernel remembers the version
number of its active set), (3) `commit_active` marks it active. A crash
between any two steps is repaired at the next start by `reconcile`, which
makes the store follow the kernel: the kernel is what filters traffic.

Recovery from a damaged file (StoreCorruptError): stop the agent, move
tidegate.db (and -wal/-shm) aside, then either restore a backup made with
`VersionStore.backup()` (`tidegate agent` writes one to tidegate.db.bak
before every schema migration) or start the agent with `--rules FILE`. The
XDP program keeps filtering with its last rule set meanwhile: the agent
never resets the kernel to "allow all" because its store is unreadable.

Threads: the gRPC server calls from several threads; one connection is
shared under a lock, because SQLite serialises writers anyway and one
connection keeps every transaction's view simple.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

SCHEMA_VERSION = 2  # 2: audit rows indexed by version (a review reads its version's guard events)
DB_NAME = "tidegate.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    number INTEGER PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('pending', 'shadow', 'applied', 'aborted')),
    created REAL NOT NULL,
    author TEXT NOT NULL,
    reason TEXT NOT NULL,
    source TEXT NOT NULL,
    digest TEXT NOT NULL,
    content TEXT NOT NULL,
    error TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS activations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    version INTEGER NOT NULL REFERENCES versions(number),
    kind TEXT NOT NULL,
    time REAL NOT NULL,
    author TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    action TEXT NOT NULL,
    result TEXT NOT NULL,
    author TEXT NOT NULL,
    peer TEXT NOT NULL,
    version INTEGER,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_version ON audit (version);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS reviews (version INTEGER PRIMARY KEY, review TEXT NOT NULL, time REAL NOT NULL);
CREATE TRIGGER IF NOT EXISTS audit_append_only_u BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit rows are never changed'); END;
CREATE TRIGGER IF NOT EXISTS audit_append_only_d BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit rows are never deleted'); END;
"""


class StoreError(Exception):
    pass


class StoreCorruptError(StoreError):
    pass


class StoreConflictError(StoreError):
    pass


class VersionNotFound(StoreError):
    pass


RECOVERY = (
    "stop the agent, move {path} (and its -wal/-shm files) aside, then restore a backup "
    "(tidegate.db.bak) or start the agent with --rules FILE; the XDP program keeps filtering "
    "with its last rule set meanwhile"
)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


@dataclass
class VersionRecord:
    number: int
    state: str
    created: float
    author: str
    reason: str
    source: str
    digest: str
    content: str
    error: str
    active: bool
    activations: int

    @property
    def created_iso(self) -> str:
        return _iso(self.created)


@dataclass
class AuditRecord:
    id: int
    time: float
    action: str
    result: str
    author: str
    peer: str
    version: int | None
    detail: str

    @property
    def time_iso(self) -> str:
        return _iso(self.time)


@dataclass
class ReconcileResult:
    kernel_version: int | None
    store_version: int | None
    action: str  # none | followed-kernel | kernel-empty
    aborted: list[int]


class VersionStore:
    def __init__(self, conn: sqlite3.Connection, path: Path):
        self._conn = conn
        self._path = path
        self._lock = threading.RLock()

    @classmethod
    def open(cls, state_dir: str | Path) -> "VersionStore":
        d = Path(state_dir)
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create state dir {d}: {e.strerror}") from None
        if not os.access(d, os.R_OK | os.W_OK | os.X_OK):
            raise StoreError(f"state dir {d} is not readable and writable by this user")
        path = d / DB_NAME
        existed = path.exists() and path.stat().st_size > 0
        if path.exists() and path.stat().st_size == 0:
            existed = True  # a zero-length file is damage, not a fresh store
        try:
            conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=10)
            conn.execute("PRAGMA busy_timeout = 10000")
            if existed:
                if path.stat().st_size == 0:
                    raise sqlite3.DatabaseError("zero-length file")
                ok = conn.execute("PRAGMA integrity_check").fetchone()[0]
                if ok != "ok":
                    raise sqlite3.DatabaseError(ok)
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                if "versions" not in tables:
                    raise sqlite3.DatabaseError("not a tidegate store (no versions table)")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            user_version = conn.execute("PRAGMA user_version").fetchone()[0]
            if user_version > SCHEMA_VERSION:
                raise StoreError(f"{path} was written by a newer tidegate (schema {user_version})")
            if user_version < SCHEMA_VERSION:
                if existed:
                    # an older store: keep it as it was before the migration touches it
                    _backup(conn, Path(str(path) + ".bak"))
                # CREATE ... IF NOT EXISTS throughout: safe to re-run after a crash here
                conn.executescript(_SCHEMA)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as e:
            raise StoreCorruptError(f"{path} is damaged ({e}); " + RECOVERY.format(path=path)) from None
        os.chmod(path, 0o600)
        return cls(conn, path)

    @property
    def path(self) -> Path:
        return self._path

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def checkpoint_later(self) -> None:
        """The agent's choice: SQLite no longer copies the WAL into the
        database inside a commit (every ~1,000 pages written: every other
        100,000-CIDR version, tens of ms of that apply's answer); the agent
        calls checkpoint() every few seconds instead. Commits stay as durable."""
        with self._lock:
            self._conn.execute("PRAGMA wal_autocheckpoint = 0")

    def checkpoint(self) -> tuple[int, int]:
        """Copy what the WAL holds into the database file, without waiting
        for readers (PASSIVE). Returns (WAL pages, pages copied)."""
        with self._lock:
            _, pages, copied = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return pages, copied

    # ------------------------------------------------------------- versions
    def _tx(self):
        return _Tx(self._conn, self._lock)

    def begin_version(self, content: str, digest: str, author: str, reason: str, source: str = "apply") -> int:
        with self._tx() as c:
            cur = c.execute(
                "INSERT INTO versions (state, created, author, reason, source, digest, content) "
                "VALUES ('pending', ?, ?, ?, ?, ?, ?)",
                (time.time(), author, reason, source, digest, content),
            )
            return int(cur.lastrowid)

    def commit_active(self, version: int, kind: str, author: str = "", reason: str = "", peer: str = "") -> None:
        now = time.time()
        with self._tx() as c:
            row = c.execute("SELECT state, author, reason FROM versions WHERE number = ?", (version,)).fetchone()
            if row is None:
                raise VersionNotFound(f"version {version} does not exist")
            if row[0] == "aborted":
                raise StoreError(f"version {version} was aborted and cannot become active")
            author = author or row[1]
            reason = reason or row[2]
            c.execute("UPDATE versions SET state = 'applied' WHERE number = ?", (version,))
            c.execute(
                "INSERT INTO activations (version, kind, time, author, reason) VALUES (?, ?, ?, ?, ?)",
                (version, kind, now, author, reason),
            )
            c.execute(
                "INSERT INTO audit (time, action, result, author, peer, version, detail) VALUES (?, ?, 'ok', ?, ?, ?, ?)",
                (now, kind, author, peer, version, reason),
            )

    def abort_version(self, version: int, error: str) -> None:
        with self._tx() as c:
            c.execute("UPDATE versions SET state = 'aborted', error = ? WHERE number = ? "
                      "AND state IN ('pending', 'shadow')", (error, version))  # fmt: skip

    def mark_shadow(self, version: int, author: str = "", peer: str = "") -> None:
        """A pending version is now loaded as the kernel's shadow set."""
        with self._tx() as c:
            c.execute("UPDATE versions SET state = 'shadow' WHERE number = ? AND state = 'pending'", (version,))
            c.execute(
                "INSERT INTO audit (time, action, result, author, peer, version, detail) "
                "VALUES (?, 'shadow-load', 'ok', ?, ?, ?, '')",
                (time.time(), author, peer, version),
            )

    def shadow_version(self) -> int | None:
        with self._lock:
            row = self._conn.execute("SELECT MAX(number) FROM versions WHERE state = 'shadow'").fetchone()
            return row[0]

    def active_version(self) -> int | None:
        with self._lock:
            row = self._conn.execute("SELECT version FROM activations ORDER BY id DESC LIMIT 1").fetchone()
            return int(row[0]) if row else None

    def _record(self, row, active: int | None) -> VersionRecord:
        n = row[0]
        count = self._conn.execute("SELECT COUNT(*) FROM activations WHERE version = ?", (n,)).fetchone()[0]
        return VersionRecord(n, row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8], n == active, count)

    _COLS = "number, state, created, author, reason, source, digest, content, error"

    def get_version(self, number: int, with_content: bool = True) -> VersionRecord:
        """One version; without its text (content '') unless with_content."""
        if not 0 < number < 2**63:  # SQLite integers are 64-bit signed
            raise VersionNotFound(f"version {number} does not exist")
        cols = self._COLS if with_content else self._COLS.replace("content", "'' AS content")
        with self._lock:
            row = self._conn.execute(f"SELECT {cols} FROM versions WHERE number = ?", (number,)).fetchone()
            if row is None:
                raise VersionNotFound(f"version {number} does not exist")
            return self._record(row, self.active_version())

    def list_versions(self, limit: int = 50, offset: int = 0) -> list[VersionRecord]:
        """The newest versions, without their text (content is ''): a listing of large rule sets must
        not read megabytes a version; get_version reads one version's text."""
        cols = self._COLS.replace("content", "'' AS content")
        with self._lock:
            active = self.active_version()
            rows = self._conn.execute(
                f"SELECT {cols} FROM versions ORDER BY number DESC LIMIT ? OFFSET ?", (limit, offset)
            ).fetchall()
            return [self._record(r, active) for r in rows]

    def latest_version(self) -> int | None:
        with self._lock:
            row = self._conn.execute("SELECT MAX(number) FROM versions").fetchone()
            return row[0]

    def previous_active(self, before: int | None = None) -> int | None:
        """The version that was active before the current one (or before
        `before`), skipping re-activations of the current version."""
        with self._lock:
            current = before if before is not None else self.active_version()
            rows = self._conn.execute("SELECT version FROM activations ORDER BY id DESC").fetchall()
            for (v,) in rows:
                if v != current:
                    return int(v)
            return None

    def activations(self, limit: int = 100) -> list[tuple[int, str, float, str, str]]:
        with self._lock:
            return self._conn.execute(
                "SELECT version, kind, time, author, reason FROM activations ORDER BY id DESC LIMIT ?", (limit,)
            ).fetchall()

    def activated_at(self, version: int) -> float | None:
        """When `version` last became active (apply, rollback, promote, reconcile), or None."""
        with self._lock:
            row = self._conn.execute("SELECT time FROM activations WHERE version = ? ORDER BY id DESC LIMIT 1",
                                     (version,)).fetchone()  # fmt: skip
        return row[0] if row else None

    def reconcile(self, kernel_version: int | None, peer: str = "startup",
                  kernel_shadow: int | None = None) -> ReconcileResult:  # fmt: skip
        """Make the store agree with the kernel after a start (or a crash)."""
        with self._tx() as c:
            store_active = self.active_version()
            pending = [r[0] for r in c.execute("SELECT number FROM versions WHERE state IN ('pending', 'shadow')")]
            if kernel_shadow is not None:
                c.execute("UPDATE versions SET state = 'shadow' WHERE number = ? AND state IN ('pending', 'aborted')",
                          (kernel_shadow,))  # fmt: skip
                pending = [n for n in pending if n != kernel_shadow]
            aborted = []
            action = "none"
            if kernel_version is None:
                action = "kernel-empty"
            else:
                row = c.execute("SELECT state FROM versions WHERE number = ?", (kernel_version,)).fetchone()
                if row is None:
                    raise StoreConflictError(
                        f"the kernel runs rule-set version {kernel_version}, which this store does not know "
                        f"(store: {self._path}); use the state dir that belongs to this interface, or "
                        "`tidegate detach` and start with --rules FILE"
                    )
                if row[0] == "aborted":
                    c.execute("UPDATE versions SET state = 'applied', error = '' WHERE number = ?", (kernel_version,))
                if kernel_version != store_active or row[0] == "pending":
                    now = time.time()
                    c.execute("UPDATE versions SET state = 'applied' WHERE number = ?", (kernel_version,))
                    c.execute(
                        "INSERT INTO activations (version, kind, time, author, reason) "
                        "VALUES (?, 'reconcile', ?, 'agent', 'the kernel had this version active at start')",
                        (kernel_version, now),
                    )
                    c.execute(
                        "INSERT INTO audit (time, action, result, author, peer, version, detail) "
                        "VALUES (?, 'reconcile', 'ok', 'agent', ?, ?, ?)",
                        (now, peer, kernel_version, f"store said {store_active}, kernel runs {kernel_version}"),
                    )
                    action = "followed-kernel"
            for n in pending:
                if n != kernel_version:
                    c.execute(
                        "UPDATE versions SET state = 'aborted', error = 'agent stopped before the kernel swap' "
                        "WHERE number = ?",
                        (n,),
                    )
                    aborted.append(n)
            return ReconcileResult(kernel_version, store_active, action, aborted)

    # ---------------------------------------------------------------- audit
    def audit(self, action: str, result: str, author: str, peer: str, detail: str = "",
              version: int | None = None) -> None:  # fmt: skip
        with self._tx() as c:
            c.execute(
                "INSERT INTO audit (time, action, result, author, peer, version, detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (time.time(), action, result, author, peer, version, detail),
            )

    def list_audit(self, limit: int = 100, since: float | None = None, action: str | None = None,
                   version: int | None = None, action_prefix: str | None = None) -> list[AuditRecord]:  # fmt: skip
        q = "SELECT id, time, action, result, author, peer, version, detail FROM audit WHERE 1=1"
        args: list = []
        if version is not None:  # indexed: a version's rows, however many others came after them
            q += " AND version = ?"
            args.append(version)
        if action_prefix:
            q += " AND substr(action, 1, ?) = ?"
            args += [len(action_prefix), action_prefix]
        if since is not None:
            q += " AND time >= ?"
            args.append(since)
        if action:
            q += " AND action = ?"
            args.append(action)
        q += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        with self._lock:
            return [AuditRecord(*r) for r in self._conn.execute(q, args).fetchall()]

    # ------------------------------------------------------------ meta etc.
    def set_meta(self, key: str, value) -> None:
        text = value if isinstance(value, str) else json.dumps(value)
        with self._tx() as c:
            c.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = ?",
                      (key, text, text))  # fmt: skip

    def get_meta(self, key: str, default=None):
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            return row[0] if row else default

    def delete_meta(self, key: str) -> None:
        with self._tx() as c:
            c.execute("DELETE FROM meta WHERE key = ?", (key,))

    def save_review(self, version: int, review_json: str) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT INTO reviews (version, review, time) VALUES (?, ?, ?) "
                "ON CONFLICT(version) DO UPDATE SET review = excluded.review, time = excluded.time",
                (version, review_json, time.time()),
            )

    def get_review(self, version: int) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT review FROM reviews WHERE version = ?", (version,)).fetchone()
            return row[0] if row else None

    def backup(self, dest: str | Path) -> None:
        with self._lock:
            _backup(self._conn, dest)


def _backup(conn: sqlite3.Connection, dest: str | Path) -> None:
    """A consistent copy of the store at dest: SQLite's online backup into a
    temporary file, fsync, then an atomic rename (never a half-written copy)."""
    tmp = Path(str(dest) + ".tmp")
    target = sqlite3.connect(str(tmp))
    try:
        conn.backup(target)
    finally:
        target.close()
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, dest)


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT under the store lock; ROLLBACK on error."""

    def __init__(self, conn: sqlite3.Connection, lock: threading.RLock):
        self.conn = conn
        self.lock = lock

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except Exception:
            self.lock.release()
            raise
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.conn.execute("COMMIT")
            else:
                self.conn.execute("ROLLBACK")
        finally:
            self.lock.release()
