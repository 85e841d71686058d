"""The fleet's etcd client and the driver's bookkeeping against a real
single-member etcd (no agents): the driver's incremental status view, a
wave written over several transactions, and a watch that cannot outlive
its timeout."""

from __future__ import annotations

import http.server
import threading
import time

import pytest

from tidegate.fleet.driver import Driver, Settings, StatusView
from tidegate.fleet.etcd import Etcd
from tidegate.fleet.keys import Keys, decode, encode

from .fleet_harness import EtcdCluster

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"), 1, tag="v").start()
    yield cluster
    cluster.stop()


def status(host: str, **fields) -> bytes:
    return encode({"host": host, "heartbeat": time.time(), **fields})


def test_status_view_reads_only_what_changed_and_drops_expired_hosts(etcd):
    keys = Keys("view")
    e = Etcd(etcd.endpoints)
    lease = e.grant(30)
    for i in range(20):
        e.put(keys.status(f"h{i:02d}"), status(f"h{i:02d}", pad="x" * 500), lease=lease if i == 7 else 0)
    view = StatusView(e, keys.status_prefix)
    b = e.bytes_in
    sts = view.refresh()
    full = e.bytes_in - b
    assert sorted(sts) == [f"h{i:02d}" for i in range(20)]
    e.put(keys.status("h03"), status("h03", pad="y" * 500, last={"result": "ACK"}))
    b = e.bytes_in
    sts = view.refresh()
    one = e.bytes_in - b
    assert sts["h03"]["last"] == {"result": "ACK"} and sts["h04"]["pad"] == "x" * 500 and len(sts) == 20
    assert one * 10 < full, (one, full)  # one record, not twenty
    b = e.bytes_in
    assert view.refresh() == sts  # nothing changed: nothing read but the header
    assert (e.bytes_in - b) * 20 < full
    e.revoke(lease)  # h07's status goes with its lease, as a dead host's does
    e.put(keys.status("h20"), status("h20"))  # and a new host joins in the same interval
    sts = view.refresh()
    assert "h07" not in sts and "h20" in sts and len(sts) == 20
    e.put(keys.status("h05"), b"not json")
    assert "h05" not in view.refresh() and len(view.refresh()) == 19
    e.close()


def test_a_wave_over_several_transactions_is_answered_per_revision(etcd):
    """Each transaction of a wave is its own revision: every host is waited
    for at the revision of its own write (the cause of large waves that
    never completed: all were compared with the last transaction's)."""
    keys = Keys("txn")
    e = Etcd(etcd.endpoints)
    drv = Driver(e, keys, "test", Settings(txn_ops=2, poll=0.1))
    drv.acquire()
    try:
        hosts = [f"h{i}" for i in range(5)]
        rec = {"id": "r1", "operator": "test", "reason": "batches"}
        revs = drv._write_desired(rec, hosts, "w0", active="d" * 64)
        assert len(set(revs.values())) == 3  # 2 + 2 + 1
        for h in hosts:
            kv, _ = e.get(keys.desired(h))
            assert kv.mod_revision == revs[h] and decode(kv.value)["active"] == "d" * 64
        for h in hosts:  # each host answers the revision it was written at, as an agent does
            e.put(keys.status(h), status(h, last={"result": "ACK", "desired_revision": revs[h], "time": time.time()}))
        results, _ = drv._wait_results(hosts, revs, timeout=5)
        assert sorted(results) == hosts
    finally:
        drv.release()
        e.close()


class _Trickle(http.server.BaseHTTPRequestHandler):
    """A gateway stand-in whose watch stream never ends and never carries an
    event: a created message, then a progress line every 0.2 s."""

    protocol_version = "HTTP/1.1"
    streamed_to_the_end = threading.Event()

    def do_POST(self):  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for _ in range(300):  # bounded: 60 s at most
                line = b'{"result":{"header":{"revision":"9"}}}\n'
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
                time.sleep(0.2)
            self.streamed_to_the_end.set()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *a):
        pass


def test_a_watch_returns_at_its_timeout_even_when_the_stream_trickles():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    e = Etcd(f"http://127.0.0.1:{srv.server_address[1]}")
    try:
        changed = e.wait_change("/k", 8, timeout=1.0)
        assert changed is False  # nothing changed: the caller reads the key again
        # it gave up while the stream was still going: a per-read timeout alone waits for the whole stream
        assert not _Trickle.streamed_to_the_end.is_set()
    finally:
        e.close()
        srv.shutdown()
