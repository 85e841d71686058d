"""The fleet's connection to etcd, through etcd's v3 JSON gateway (etcd3gw).

One `Etcd` holds a client per endpoint and moves to the next endpoint when
one fails (a member down, a leader election in progress), so a 3-member
cluster survives losing one. TLS: a CA for the server's certificate, and a
client certificate + key when etcd requires them (--client-cert-auth).

It counts requests and bytes both ways, for bench/fleet_sim.py.

Watches are used as wake-ups only: `wait_change` returns when the key moved
past a revision, or after a timeout, and the caller then reads the key
again. A dropped stream therefore never loses an update: the read that
follows sees the newest value whatever happened to the stream.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from urllib.parse import urlparse

API_PATH = "/v3/"  # etcd >= 3.4's gateway


class EtcdUnavailable(Exception):
    """No endpoint answered (or every one failed the request)."""


def _b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s)


def _range_end(prefix: str) -> str:
    b = bytearray(prefix.encode())
    b[-1] += 1
    return _b64(bytes(b))


def _why(e: Exception | None) -> str:
    """What went wrong, in a line (etcd3gw keeps the text in detail_text, not in str())."""
    if e is None:
        return "no endpoint tried"
    text = getattr(e, "detail_text", None) or str(e) or type(e).__name__
    why = f"{type(e).__name__}: {' '.join(str(text).split())[:300]}"
    if "SSL" in why:  # TLS 1.3 reports a refused client certificate as a bare EOF: say what to check
        why += (" (TLS refused: etcd wants a client certificate signed by its CA, --etcd-cert/--etcd-key, "
                "and its own certificate must verify against --etcd-ca)")
    return why


class KV:
    """One key as read: value, mod_revision, create_revision, lease."""

    __slots__ = ("key", "value", "mod_revision", "create_revision", "lease")

    def __init__(self, raw: dict):
        self.key = _unb64(raw["key"]).decode()
        self.value = _unb64(raw.get("value", ""))
        self.mod_revision = int(raw.get("mod_revision", 0))
        self.create_revision = int(raw.get("create_revision", 0))
        self.lease = int(raw.get("lease", 0))


def split_endpoints(urls: str | list[str]) -> list[str]:
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    out = [u.strip() for u in items if u.strip()]
    for u in out:
        p = urlparse(u)
        if p.scheme not in ("http", "https") or not p.hostname or not p.port:
            raise ValueError(f"etcd endpoint {u!r} must look like http://HOST:PORT or https://HOST:PORT")
    if not out:
        raise ValueError("no etcd endpoint given")
    return out


def _load_http() -> None:
    """requests and etcd3gw, imported by the first Etcd: every agent imports
    this module (its --fleet-* options), and only a fleet member pays the
    0.1-0.4 s they take to import (agent start-up speed)."""
    global requests, Etcd3Client, Etcd3Exception
    import requests
    from etcd3gw.client import Etcd3Client
    from etcd3gw.exceptions import Etcd3Exception


class Etcd:
    def __init__(self, urls: str | list[str], ca: str | None = None, cert: str | None = None,
                 key: str | None = None, timeout: float = 5.0):  # fmt: skip
        _load_http()
        self.endpoints = split_endpoints(urls)
        self.timeout = timeout
        self._clients = []
        for u in self.endpoints:
            p = urlparse(u)
            self._clients.append(Etcd3Client(host=p.hostname, port=p.port, protocol=p.scheme, ca_cert=ca,
                                             cert_key=key, cert_cert=cert, timeout=timeout, api_path=API_PATH))  # fmt: skip
        # the CA goes with every request: requests lets $REQUESTS_CA_BUNDLE / $CURL_CA_BUNDLE override a
        # session's own CA, and a host with one of those set would then fail (or trust the wrong CAs)
        self._tls = {"verify": ca} if ca else {}
        self._current = 0
        self._lock = threading.Lock()
        self.requests = 0
        self.bytes_out = 0
        self.bytes_in = 0

    # ----------------------------------------------------------- transport
    def _post(self, path: str, body: dict) -> dict:
        data = json.dumps(body)
        last: Exception | None = None
        n = len(self._clients)
        start = self._current
        for i in range(n):
            idx = (start + i) % n
            c = self._clients[idx]
            self._tally(1, len(data), 0)
            try:
                out = c.post(c.get_url(path), data=data, **self._tls)
            except Etcd3Exception as e:  # refused, timed out, 5xx (no leader, leader changed)
                last = e
                continue
            self._current = idx
            self._tally(0, 0, len(json.dumps(out)))
            return out
        raise EtcdUnavailable(f"etcd unreachable at {', '.join(self.endpoints)}: {_why(last)}")

    def _tally(self, requests: int, bytes_out: int, bytes_in: int) -> None:
        with self._lock:
            self.requests += requests
            self.bytes_out += bytes_out
            self.bytes_in += bytes_in

    def close(self) -> None:
        for c in self._clients:
            c.session.close()

    # ------------------------------------------------------------------ kv
    def get(self, key: str) -> tuple[KV | None, int]:
        """(the key or None, the store's revision at the read)."""
        out = self._post("kv/range", {"key": _b64(key)})
        kvs = out.get("kvs") or []
        return (KV(kvs[0]) if kvs else None), int(out["header"]["revision"])

    def get_prefix(self, prefix: str, keys_only: bool = False) -> tuple[list[KV], int]:
        body = {"key": _b64(prefix), "range_end": _range_end(prefix)}
        if keys_only:
            body["keys_only"] = True
        out = self._post("kv/range", body)
        return [KV(k) for k in out.get("kvs") or []], int(out["header"]["revision"])

    def get_prefix_since(self, prefix: str, after_revision: int) -> tuple[list[KV], int, int]:
        """The keys under `prefix` modified after `after_revision` (0: all),
        with the number of keys the prefix holds now and the store's revision:
        (kvs, count, revision). etcd counts before the revision filter, so a
        count below what the caller knows means keys were deleted."""
        body = {"key": _b64(prefix), "range_end": _range_end(prefix)}
        if after_revision:
            body["min_mod_revision"] = after_revision + 1
        out = self._post("kv/range", body)
        return [KV(k) for k in out.get("kvs") or []], int(out.get("count", 0)), int(out["header"]["revision"])

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        body = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = lease
        return int(self._post("kv/put", body)["header"]["revision"])

    def create(self, key: str, value: bytes, lease: int = 0) -> bool:
        """Put only if the key does not exist; True when this call created it."""
        put = {"key": _b64(key), "value": _b64(value)}
        if lease:
            put["lease"] = lease
        out = self._post("kv/txn", {"compare": [{"key": _b64(key), "result": "EQUAL", "target": "CREATE",
                                                 "create_revision": 0}],
                                    "success": [{"request_put": put}], "failure": []})  # fmt: skip
        return bool(out.get("succeeded"))

    def put_if(self, key: str, value: bytes, mod_revision: int) -> bool:
        """Put only if the key was last modified at mod_revision (0: absent)."""
        target = {"target": "MOD", "mod_revision": mod_revision} if mod_revision else {
            "target": "CREATE", "create_revision": 0}  # fmt: skip
        out = self._post("kv/txn", {"compare": [{"key": _b64(key), "result": "EQUAL", **target}],
                                    "success": [{"request_put": {"key": _b64(key), "value": _b64(value)}}],
                                    "failure": []})  # fmt: skip
        return bool(out.get("succeeded"))

    def put_many(self, items: list[tuple[str, bytes]], if_value: tuple[str, bytes] | None = None) -> int:
        """Several puts in one transaction (one revision); returns it, or 0
        when `if_value` (key, value) is given and the key does not hold it
        (the driver's fence: only the lock holder writes)."""
        ops = [{"request_put": {"key": _b64(k), "value": _b64(v)}} for k, v in items]
        cmp = []
        if if_value is not None:
            cmp = [{"key": _b64(if_value[0]), "result": "EQUAL", "target": "VALUE", "value": _b64(if_value[1])}]
        out = self._post("kv/txn", {"compare": cmp, "success": ops, "failure": []})
        if cmp and not out.get("succeeded"):
            return 0
        return int(out["header"]["revision"])

    def delete(self, key: str, prefix: bool = False) -> int:
        body = {"key": _b64(key)}
        if prefix:
            body["range_end"] = _range_end(key)
        return int(self._post("kv/deleterange", body).get("deleted", 0))

    def delete_if_value(self, key: str, value: bytes) -> bool:
        out = self._post("kv/txn", {"compare": [{"key": _b64(key), "result": "EQUAL", "target": "VALUE",
                                                 "value": _b64(value)}],
                                    "success": [{"request_delete_range": {"key": _b64(key)}}], "failure": []})  # fmt: skip
        return bool(out.get("succeeded"))

    # -------------------------------------------------------------- leases
    def grant(self, ttl: int) -> int:
        return int(self._post("lease/grant", {"TTL": int(ttl), "ID": 0})["ID"])

    def keepalive(self, lease: int) -> int:
        """The lease's new TTL; <= 0 when it already expired."""
        out = self._post("lease/keepalive", {"ID": lease})
        return int((out.get("result") or {}).get("TTL", -1))

    def revoke(self, lease: int) -> None:
        self._post("kv/lease/revoke", {"ID": lease})

    def status(self) -> dict:
        return self._post("maintenance/status", {})

    # --------------------------------------------------------------- watch
    def wait_change(self, key: str, after_revision: int, timeout: float, prefix: bool = False) -> bool:
        """Block until `key` (or the prefix) changes after `after_revision`,
        or `timeout` seconds pass. True when something changed (or the watch
        was cancelled, e.g. compacted: read again). Raises EtcdUnavailable
        when the stream cannot be opened."""
        c = self._clients[self._current]
        create = {"key": _b64(key), "start_revision": after_revision + 1}
        if prefix:
            create["range_end"] = _range_end(key)
        body = json.dumps({"create_request": create})
        self._tally(1, len(body), 0)
        try:
            resp = c.session.post(c.get_url("watch"), data=body, stream=True, **self._tls,
                                  timeout=(min(3.0, self.timeout), timeout))  # fmt: skip
        except requests.RequestException as e:
            self._current = (self._current + 1) % len(self._clients)
            raise EtcdUnavailable(f"etcd watch failed at {self.endpoints[self._current - 1]}: {e}") from None
        try:
            if resp.status_code != 200:
                self._current = (self._current + 1) % len(self._clients)
                raise EtcdUnavailable(f"etcd watch answered {resp.status_code}")
            deadline = time.monotonic() + timeout
            for line in resp.iter_lines():
                if line:
                    self._tally(0, 0, len(line))
                    result = json.loads(line).get("result") or {}
                    if result.get("events") or result.get("canceled") or result.get("compact_revision"):
                        return True
                if time.monotonic() >= deadline:  # a stream that trickles (progress, keep-alives) never times out
                    return False
            return True  # the stream ended (member stopping): read again
        except (requests.RequestException, ValueError):
            return False  # read timeout: nothing changed
        finally:
            resp.close()
