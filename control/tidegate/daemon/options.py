"""`tidegate agent`'s arguments, and the checks made on them before
anything is touched: addresses, the --auth mode, free ports, TLS files."""

from __future__ import annotations

import argparse
import logging
import socket
import ssl

from tidegate.access.auth import is_loopback as _is_loopback
from tidegate.changes.blocklist import parse_ttl
from tidegate.daemon.paths import DEFAULT_STATE_DIR
from tidegate.fleet.hostagent import add_arguments as fleet_arguments

log = logging.getLogger("tidegate.daemon.options")

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_METRICS = "127.0.0.1:9640"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tidegate agent",
        description="Run the tidegate agent: load the XDP filter on an interface and serve the gRPC API "
        "and Prometheus metrics. Needs root (or CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON, CAP_SYS_ADMIN).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  tidegate agent --interface eth0 --rules /etc/tidegate/rules.yaml
  tidegate agent --interface eth0 --xdp-mode generic --state-dir /var/lib/tidegate
  tidegate agent --interface eth0 --listen 0.0.0.0:50051 --tls-cert s.pem --tls-key s.key --tls-client-ca ca.pem

The program stays attached and its maps stay pinned when the agent stops;
a new agent adopts them. `tidegate detach --interface IFACE` removes them.""",
    )
    p.add_argument("--interface", "-i", required=True, help="network interface to filter")
    p.add_argument("--rules", help="rule set to apply at start when the kernel and the store have none (read "
                   "only then: ignored, with a warning, while the store holds an active version); re-read and applied "
                   "as a new version on SIGHUP (systemctl reload), through the blast-radius check")
    p.add_argument("--listen", default=DEFAULT_LISTEN, help=f"gRPC address (default {DEFAULT_LISTEN})")
    p.add_argument("--metrics-listen", default=DEFAULT_METRICS,
                   help=f"Prometheus /metrics address (default {DEFAULT_METRICS}; 'off' to disable)")  # fmt: skip
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help=f"version store (default {DEFAULT_STATE_DIR})")
    p.add_argument("--xdp-mode", choices=("auto", "native", "generic"), default="auto")
    p.add_argument("--max-sources", type=int, default=1 << 20, help="per-source LRU entries (default 1048576)")
    p.add_argument("--pin-root", default="/sys/fs/bpf/tidegate")
    p.add_argument("--pin-name", help="pin directory name (default: the interface name)")
    p.add_argument("--detach-on-exit", action="store_true", help="remove the program and maps when stopping")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --listen without TLS (logged loudly)")
    p.add_argument("--tls-cert", help="server certificate (PEM)")
    p.add_argument("--tls-key", help="server private key (PEM)")
    p.add_argument("--tls-client-ca", help="CA that signs client certificates (mTLS)")
    p.add_argument("--token-file", help="role tokens for clients without TLS (default <state-dir>/tokens, "
                   "created 0600 on first start)")
    p.add_argument("--auth", choices=("token", "none"), default="token",
                   help="'none' lets any local process change the filter (lab only; on a non-loopback "
                   "--listen it also needs --insecure)")  # fmt: skip
    p.add_argument("--role-map", help="JSON file mapping client-certificate subjects to roles")
    p.add_argument("--read-call-rate", type=float, default=1.0,
                   help="expensive read calls (whatif, validate, shadow report, top --window) a read caller may "
                   "make per second once its burst is used (default 1; admins are not limited)")  # fmt: skip
    p.add_argument("--read-call-burst", type=int, default=10,
                   help="expensive read calls a read caller may make at once (default 10)")
    p.add_argument("--sample-interval", type=float, default=5.0, help="seconds between per-source samples")
    p.add_argument("--estimate-window", type=float, default=300.0, help="seconds of history for what-if estimates")
    p.add_argument("--packet-budget", type=float, default=0.01,
                   help="refuse changes that newly drop more than this share of passing packets (default 0.01)")  # fmt: skip
    p.add_argument("--source-budget", type=float, default=0.05,
                   help="refuse changes that newly drop more than this share of sources (default 0.05)")  # fmt: skip
    p.add_argument("--no-blast-check", action="store_true", help="disable the blast-radius check")
    p.add_argument("--guard", dest="guard_default", action="store_true", help="guard every apply by default")
    p.add_argument("--guard-seconds", type=int, default=60, help="guard window after an apply (default 60)")
    p.add_argument("--guard-drop-increase", type=float, default=0.05,
                   help="roll back when the drop share rises by more than this (default 0.05)")  # fmt: skip
    p.add_argument("--guard-dropped-sources", type=int, default=50,
                   help="roll back when this many more distinct sources are dropped than before (default 50)")  # fmt: skip
    p.add_argument("--insight-baseline-seconds", type=float, default=120.0,
                   help="a source counts as known when first seen at least this long ago (default 120)")
    p.add_argument("--insight-window-seconds", type=float, default=30.0,
                   help="the insight reading's window: packets per source, persistence, prefixes (default 30)")
    am = p.add_argument_group("auto-mitigation (off unless --auto-mitigate; see the README's insight section)")
    am.add_argument("--auto-mitigate", action="store_true",
                    help="apply the insight proposal by itself when a flood or heavy-hitter reading lasts: within "
                    "the blast-radius budgets (on the known sources' traffic), under a guard, audited as "
                    "agent:insight, expiring after --auto-mitigate-ttl as a new version")
    am.add_argument("--auto-mitigate-readings", type=int, default=3, metavar="N",
                    help="consecutive flood, mixed or heavy-hitter readings (one a sample) it takes (default 3)")
    am.add_argument("--auto-mitigate-confidence", type=float, default=0.7, metavar="F",
                    help="each of them with at least this confidence (default 0.7)")
    am.add_argument("--auto-mitigate-known-drop", type=float, default=0.0, metavar="F",
                    help="the proposal's what-if may drop at most this share of known sources' packets and of "
                    "known sources (default 0)")
    am.add_argument("--auto-mitigate-ttl", type=_duration, default=600.0, metavar="DURATION",
                    help="the mitigation expires after this, as a new version (default 10m; 90s, 10m, 1h)")
    am.add_argument("--auto-mitigate-cooldown", type=_duration, default=300.0, metavar="DURATION",
                    help="no new attempt this long after a mitigation ends or an attempt is declined (default 5m)")
    p.add_argument("--review-seconds", type=float, default=3600.0, help="post-deployment review period")
    p.add_argument("--attach-check-seconds", type=float, default=2.0,
                   help="how often to check that the program is still attached, and attach it again if not")
    p.add_argument("--log-level", default="info")
    p.add_argument("--log-format", choices=("logfmt", "json"), default="logfmt",
                   help="stderr lines as key=value (default) or one JSON object each")
    fleet_arguments(p)
    return p


def _duration(text: str) -> float:
    try:
        return float(parse_ttl(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def check_auto_mitigate(opts: argparse.Namespace) -> None:
    if opts.auto_mitigate_readings < 1:
        raise SystemExit("tidegate agent: --auto-mitigate-readings must be at least 1")
    for flag, v in (("--auto-mitigate-confidence", opts.auto_mitigate_confidence),
                    ("--auto-mitigate-known-drop", opts.auto_mitigate_known_drop)):  # fmt: skip
        if not 0.0 <= v <= 1.0:
            raise SystemExit(f"tidegate agent: {flag} must be between 0 and 1, got {v:g}")
    if opts.auto_mitigate_ttl <= 0:
        raise SystemExit("tidegate agent: --auto-mitigate-ttl must be longer than 0 s")


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise ValueError(f"address must be HOST:PORT, got {addr!r}")
    return host, int(port)


def check_auth_mode(opts: argparse.Namespace, host: str) -> None:
    """`--auth none` makes every caller admin, certificate or not: a lab
    switch, so it never goes unnoticed and never reaches the network by
    accident."""
    if opts.auth != "none":
        return
    if not _is_loopback(host) and not opts.insecure:
        raise SystemExit(f"tidegate agent: refusing --auth none on {host}: anyone who can reach it could "
                         "change the filter; it is for labs on loopback (add --insecure to accept the risk)")  # fmt: skip
    log.warning("INSECURE: --auth none: every caller is admin, no token or certificate is checked (lab use only)",
                extra={"listen": opts.listen})  # fmt: skip


def port_unavailable(host: str, port: int) -> str | None:
    """Why `host:port` cannot be listened on (another process listens there), or None. With
    SO_REUSEADDR, as gRPC binds, so the TIME_WAIT connections of an agent that has just ended
    do not count."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return e.strerror
    return None


def check_port_free(host: str, port: int, what: str) -> None:
    if why := port_unavailable(host, port):
        raise SystemExit(f"tidegate agent: {what} address {host}:{port} is not available: {why}")


def read_tls(opts: argparse.Namespace) -> tuple[bytes, bytes, bytes]:
    """Key, certificate and client CA, read before anything is touched."""
    out = []
    for flag, path in (("--tls-key", opts.tls_key), ("--tls-cert", opts.tls_cert),
                       ("--tls-client-ca", opts.tls_client_ca)):  # fmt: skip
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise SystemExit(f"tidegate agent: cannot read {flag} {path}: {e.strerror}")
        if b"-----BEGIN " not in data:
            raise SystemExit(f"tidegate agent: {flag} {path} is not a PEM file")
        out.append(data)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(opts.tls_cert, opts.tls_key)
    except (ssl.SSLError, ValueError) as e:
        raise SystemExit(f"tidegate agent: --tls-cert {opts.tls_cert} and --tls-key {opts.tls_key} are not a "
                         f"usable certificate and matching key: {e}")  # fmt: skip
    try:
        ctx.load_verify_locations(cafile=opts.tls_client_ca)
    except (ssl.SSLError, ValueError) as e:
        raise SystemExit(f"tidegate agent: --tls-client-ca {opts.tls_client_ca} holds no usable CA certificate: {e}")
    return out[0], out[1], out[2]
