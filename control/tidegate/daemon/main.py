"""`tidegate agent`: the daemon that owns the filter on one interface.

Start-up order matters for "never fail open" and "a failed start leaves
nothing behind": the gRPC and metrics ports are bound first, then the store
is opened, then the program is loaded (adopting an attached program and its
pinned maps), the store is reconciled with the kernel, and only then, if
the kernel had no rule set, the initial one is written and the program
attached. On SIGTERM the agent stops serving and leaves the program
attached with its maps pinned (unless --detach-on-exit): traffic stays
filtered by the last rule set while no agent runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from tidegate.access import auth
from tidegate.access.auth import is_loopback as _is_loopback
from tidegate.api import server as api
from tidegate.changes.mitigation import Mitigator, Policy
from tidegate.daemon import early
from tidegate.daemon.agent import Agent
from tidegate.daemon.logfmt import KeyValueFormatter
from tidegate.daemon.logjson import JsonFormatter
from tidegate.daemon.memory import give_back_freed_memory, map_large_buffers, settle_collector
from tidegate.daemon.options import (build_parser, check_auth_mode, check_auto_mitigate, check_port_free, read_tls,
                                     split_addr)  # fmt: skip
from tidegate.daemon.privileges import check_agent_privileges
from tidegate.daemon.reload import Reloader
from tidegate.fleet import hostagent
from tidegate.kernel.filter import FilterConfig, KernelError, KernelFilter
from tidegate.observation import metrics
from tidegate.operation import Caller, OperationError
from tidegate.ruleset.model import RuleSetError
from tidegate.ruleset.parse import load_rule_set
from tidegate.safety import propose
from tidegate.store import StoreError, VersionStore

log = logging.getLogger("tidegate.daemon.main")


def _origin(loaded) -> str:
    """How this start got its program, in the operator's words."""
    if loaded.adopted:
        return "adopted the attached program"
    return {"pinned": "opened the pinned program", "cached": "loaded the cached program (not compiled)"}.get(
        loaded.origin, "compiled")


def _undo_start(kf: KernelFilter, loaded) -> None:
    """A start that fails leaves what it found: a program that was attached
    before stays attached; one this run attached is detached, and maps this
    run created are unpinned."""
    try:
        if not (loaded.adopted or loaded.replaced):
            kf.detach(remove_pins=loaded.fresh_maps)
    except KernelError as e:
        log.error("cleaning up after a failed start", extra={"error": str(e)})
    kf.close()


def main(argv: list[str] | None = None) -> int:
    # everything the agent creates (the store and its -wal/-shm/.bak, tokens, backups) is root's alone,
    # whatever umask the shell or service manager gave it
    os.umask(0o077)
    opts = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if opts.log_format == "json" else KeyValueFormatter())
    logging.basicConfig(level=getattr(logging, opts.log_level.upper(), logging.INFO), handlers=[handler])
    try:
        return run(opts)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 2
        raise


def run(opts: argparse.Namespace) -> int:
    check_agent_privileges()
    map_large_buffers()
    try:
        host, port = split_addr(opts.listen)
        mhost, mport = split_addr(opts.metrics_listen) if opts.metrics_listen != "off" else (None, None)
    except ValueError as e:
        raise SystemExit(f"tidegate agent: {e}")
    tls = bool(opts.tls_cert or opts.tls_key or opts.tls_client_ca)
    if tls and not (opts.tls_cert and opts.tls_key and opts.tls_client_ca):
        raise SystemExit("tidegate agent: TLS needs --tls-cert, --tls-key and --tls-client-ca together (mTLS)")
    if not _is_loopback(host) and not tls:
        if not opts.insecure:
            raise SystemExit(
                f"tidegate agent: refusing to listen on {host} without TLS: remote access needs mTLS "
                "(--tls-cert/--tls-key/--tls-client-ca), or pass --insecure to accept the risk"
            )
        log.warning("INSECURE: gRPC listens on a non-loopback address without TLS; anyone who can reach "
                    "it can change the filter", extra={"listen": opts.listen})  # fmt: skip
    check_auth_mode(opts, host)
    check_auto_mitigate(opts)
    hostagent.check_options(opts)
    opts.tls_material = read_tls(opts) if tls else None
    # ports first: a start that fails here has touched nothing
    check_port_free(host, port, "gRPC")
    if mhost is not None:
        check_port_free(mhost, mport, "metrics")

    try:
        store = VersionStore.open(opts.state_dir)
    except StoreError as e:
        raise SystemExit(f"tidegate agent: {e}")
    if opts.auth == "token" and not tls:
        # before the kernel is touched, like the store: a token file nobody can use is a start-up error,
        # not an agent that answers every call UNAUTHENTICATED
        try:
            auth.ensure_token_file(auth.token_path(opts))
        except auth.TokenFileError as e:
            raise SystemExit(f"tidegate agent: {e}")

    initial = None
    if opts.rules:
        # the seed file is read only when it would be used, on a store with no active version: a
        # missing or broken seed never stops a restart on the store's good version
        stored = store.active_version()
        if stored is None:
            try:
                initial = load_rule_set(opts.rules)
            except RuleSetError as e:
                if len(e.errors) == 1:  # one line, e.g. rules.yaml: (document): no such file
                    raise SystemExit(f"tidegate agent: --rules {e}")
                raise SystemExit(f"tidegate agent: --rules is not a valid rule set ({len(e.errors)} errors):\n{e}")
        else:
            log.warning("--rules not applied (not even read): the store holds an active version, which this start "
                        "runs; use `tidegate apply` to change it", extra={"version": stored, "rules": opts.rules})

    kf = KernelFilter(FilterConfig(interface=opts.interface, xdp_mode=opts.xdp_mode, pin_root=opts.pin_root,
                                   max_sources=opts.max_sources, pin_name=opts.pin_name,
                                   cache_dir=early.cache_dir(opts.state_dir)))  # fmt: skip
    try:
        loaded = kf.load()
    except KernelError as e:
        raise SystemExit(f"tidegate agent: {e}")
    log.info("program ready", extra={"interface": opts.interface, "program": _origin(loaded), "adopted": loaded.adopted,
                                     "replaced": loaded.replaced, "compiled": loaded.compiled,
                                     "compile_s": round(loaded.compile_seconds, 2),
                                     "load_s": round(loaded.load_seconds, 2)})  # fmt: skip
    store.checkpoint_later()  # in the watchdog loop below, not inside an apply's commit
    agent = Agent(kf, store, opts)
    boot = Caller(author="agent", peer="startup")
    try:
        kver, sver = kf.active_version(), kf.shadow_version()
        res = store.reconcile(kver, kernel_shadow=sver)
        if res.action != "none" or res.aborted:
            log.info("store reconciled", extra={"kernel": kver, "store": res.store_version,
                                                "action": res.action, "aborted": res.aborted})  # fmt: skip
        for v in (kver, sver):
            if v:
                kf.bind_names(v, agent.changes.rule_set_of(v))
        # a review the previous agent left open (it crashed) is closed as last written
        agent.reviews.recover((res.store_version, kver))
        if res.action == "followed-kernel":
            agent.reviews.activated(kver, "reconcile")
        if kver is None:
            # the kernel has no rule set (first start, reboot, `tidegate detach`): the store's last
            # active version wins, so a reboot never swaps an operator's change for the --rules file;
            # --rules seeds a store that has none
            stored = store.active_version()
            if stored is not None:
                rs = agent.changes.rule_set_of(stored)
                kf.apply(rs, stored)
                store.commit_active(stored, "restore", "agent", "restored at start", "startup")
                agent.reviews.activated(stored, "restore")
                mode = kf.attach()
                log.info("restored", extra={"version": stored, "interface": opts.interface, "mode": mode})
            elif initial is not None:
                agent.changes.apply(initial, f"initial rules from {opts.rules}", boot, source="apply")
            else:
                log.warning("no rule set: the filter is loaded but not attached until the first apply",
                            extra={"interface": opts.interface})  # fmt: skip
        elif not agent.attached():
            kf.attach()
        elif initial is not None:  # a first apply that crashed after the swap: the kernel's version wins
            log.info("--rules ignored: the kernel already runs a rule set", extra={"version": kver})
    except (StoreError, KernelError, OperationError) as e:
        _undo_start(kf, loaded)
        raise SystemExit(f"tidegate agent: {e}")

    # everything a ready agent is asked for works before the API answers (readiness is the first
    # answer): signals are handled, /metrics is bound, the sampler and counter history run
    stop = threading.Event()

    def on_signal(signum, frame):
        log.info("stopping", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, Reloader(agent.changes, opts.rules).on_signal)  # systemctl reload
    agent.sampler.listeners.append(give_back_freed_memory)  # last: after insight and reviews
    agent.sampler.start()
    agent.history.start()
    server = msrv = None
    try:
        msrv = metrics.serve(agent, mhost, mport) if mhost is not None else None
        server = api.serve(agent, opts)
    except (SystemExit, Exception) as e:
        # lost a race for a port, an unusable certificate, an unwritable token file...
        if server is not None:
            server.stop(grace=0)
        if msrv is not None:
            msrv.shutdown()
        agent.sampler.stop()
        agent.history.stop()
        _undo_start(kf, loaded)
        msg = e.code if isinstance(e, SystemExit) else f"tidegate agent: cannot serve: {e}"
        raise SystemExit(msg) from None
    # always: a mitigation an earlier agent left active still expires; new ones only with --auto-mitigate
    agent.mitigation = Mitigator(agent, Policy.of(opts), propose.propose, propose.spared)
    agent.mitigation.start()
    if opts.auto_mitigate:
        log.warning("auto-mitigation on: lasting flood readings are mitigated without an operator",
                    extra={"ttl": opts.auto_mitigate_ttl, "readings": opts.auto_mitigate_readings})  # fmt: skip
    fleet = hostagent.start(agent, opts)  # after serving: the local API works whatever etcd does
    settle_collector()
    st = kf.state()
    log.info("serving", extra={"listen": opts.listen, "metrics": opts.metrics_listen, "attached": st.attached,
                               "mode": st.mode, "active_version": st.active.version if st.active else 0})  # fmt: skip
    while not stop.wait(opts.attach_check_seconds):
        try:
            agent.health.refresh()  # health watchers hear of a detached filter before it is attached again
            agent.check_attachment()
            agent.health.refresh()
        except Exception as e:  # the watchdog must never take the agent down
            log.error("attachment check failed", extra={"error": str(e)})
        try:
            store.checkpoint()
        except Exception as e:  # noqa: BLE001 - the next one copies the rest
            log.warning("store checkpoint failed", extra={"error": str(e)})
    if fleet is not None:
        fleet.stop()
    agent.mitigation.stop()
    agent.health.enter_graceful_shutdown()
    server.stop(grace=2).wait()
    agent.admission.close()  # the refused-call counts of the last minute
    if msrv is not None:
        msrv.shutdown()
    agent.sampler.stop()
    agent.history.stop()
    if agent.changes.guard is not None:
        agent.changes.guard.cancel()
    agent.reviews.stop()  # the active version's review ends with this agent
    if opts.detach_on_exit:
        kf.detach(remove_pins=True)
        log.info("detached", extra={"interface": opts.interface})
    kf.close()
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
