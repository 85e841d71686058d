"""Verbs that hand their arguments to another program's parser: `agent`
(the daemon, tidegate/daemon/main.py) and `fleet` (rollouts through etcd,
tidegate/fleet/cli.py). cli/main.py runs them before its own parser, so
`tidegate agent --help` is the agent's help."""

from __future__ import annotations

import argparse

from tidegate.cli.verb import arg, verb


def delegated(name: str, summary: str, description: str, examples: str, what: str):
    """A verb whose arguments (WHAT) all go to the program it hands them to, which parses them."""
    return verb(name, summary, description, examples, arg("args", nargs=argparse.REMAINDER, help=what),
                remote=False, own_parser=True)  # fmt: skip


@delegated("agent", "run the agent that owns the XDP filter and serves the API",
      "Loads the XDP program on an interface, restores the last active version, serves the gRPC API and\n"
      "Prometheus metrics. Every option is described by `tidegate agent --help`.",
      "tidegate agent --interface eth0 --rules /etc/tidegate/rules.yaml\n"
      "tidegate agent --interface eth0 --xdp-mode generic --state-dir /var/lib/tidegate",
      "the agent's options (tidegate agent --help)")  # fmt: skip
def agent(args, out) -> int:
    # lazy: the daemon's imports (grpc server, kernel layer) only on this path; the compile or the cached
    # program's load first, when one will be needed, so that it runs beside those imports (the `tidegate`
    # command has started it before its own imports: cli/entry.py; started once, this is then a no-op)
    from tidegate.daemon.early import start_ahead_once

    start_ahead_once(args.args)
    from tidegate.daemon.main import main as agent_main

    return agent_main(args.args)


@delegated("fleet", "roll rule sets out across many hosts through etcd (tidegate fleet --help)",
      "Fleet-wide shadow, waves with bake time, halt and revert on any host's failure; status, history,\n"
      "rollback and resume. Talks to etcd, not to an agent. Every option: `tidegate fleet VERB --help`.",
      "tidegate fleet --etcd http://etcd1:2379 --fleet edge rollout rules.yaml --reason 'raise api limit'\n"
      "tidegate fleet -o json status --fleet edge",
      "VERB and its options (tidegate fleet --help)")  # fmt: skip
def fleet(args, out) -> int:
    from tidegate.fleet.cli import main as fleet_main  # lazy: the etcd client only on this path

    return fleet_main(["-o", args.output, *args.args])
