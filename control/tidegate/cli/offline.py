"""Verbs that need no agent (or only ask it its version): replay, detach,
lab, certs, completion, schema, version."""

from __future__ import annotations

import os
import sys

from tidegate import __version__
from tidegate.client import ClientError
from tidegate.cli import completion
from tidegate.cli.completion import interfaces
from tidegate.cli.output import Output
from tidegate.cli.verb import EXIT_FAILED, EXIT_OK, EXIT_USAGE, LocalError, arg, client_of, verb
from tidegate.ruleset.model import RuleSetError
from tidegate.ruleset.parse import load_rule_set
from tidegate.ruleset.schema import schema_text


@verb("replay", "run a pcap through the real XDP program offline",
      "Replays FILE's packets through the XDP program with BPF_PROG_TEST_RUN, the capture's timestamps\n"
      "driving the token buckets, and prints per rule what would be dropped; with --against, the\n"
      "difference between two rule sets. Needs root, no agent and no interface.",
      "tidegate replay --pcap cap.pcap --rules new.yaml\n"
      "tidegate replay --pcap cap.pcap --rules new.yaml --against current.yaml",
      arg("--pcap", required=True, metavar="FILE", help="capture to replay"),
      arg("--rules", required=True, metavar="FILE", help="rule set to evaluate"),
      arg("--against", metavar="FILE", help="base rule set to compare with (e.g. the active one)"),
      arg("--top", type=int, default=10, metavar="N", help="newly dropped sources shown (default 10)"),
      remote=False)  # fmt: skip
def replay(args, out: Output) -> int:
    from tidegate.lab.replay import replay as run_replay  # lazy: the kernel layer (bcc)

    for path in (args.pcap, args.rules, args.against):
        if path and not os.path.isfile(path):
            raise LocalError(f"{path}: no such file")
    try:
        rs = load_rule_set(args.rules)
        base = load_rule_set(args.against) if args.against else None
    except RuleSetError as e:
        print(str(e), file=sys.stderr)
        return EXIT_USAGE
    with out.progress("compiling the replay program and replaying ..."):
        res = run_replay(args.pcap, rs, base)
    data = res.to_dict(args.top)
    if out.is_json:
        out.json(data)
        return EXIT_OK
    runs = [("candidate", data["candidate"]), ("base", data["base"])] if base else [("result", data)]
    for label, d in runs:
        out.table(f"{label}: {d['packets']:,} packets, {d['dropped']:,} dropped",
                  ["rule", "pass", "drop", "rate", "prefix", "blocked", "deny"],
                  [[n, r["pass_packets"], r["drop_packets"], r["drop_rate"], r["drop_prefix"], r["drop_blocked"],
                    r["drop_deny"]] for n, r in d["rules"].items() if r["pass_packets"] or r["drop_packets"]])  # fmt: skip
    if base:
        out.line(f"candidate newly drops {data['newly_dropped_packets']:,} packets from "
                 f"{data['newly_dropped_sources']:,} sources; newly passes {data['newly_passed_packets']:,}")  # fmt: skip
        for s in data["top_newly_dropped_sources"]:
            out.line(f"  {s['source']}: {s['packets']:,}")
    return EXIT_OK


@verb("detach", "remove the XDP program and its pinned maps from an interface",
      "The agent leaves the program attached when it stops, so the host stays filtered; this removes\n"
      "it. STOP THE AGENT FIRST (systemctl stop tidegate): a running agent on that interface would\n"
      "keep serving an API for a filter that is gone. After this the interface is UNFILTERED.\n"
      "Needs root.",
      "systemctl stop tidegate && tidegate detach --interface eth0",
      arg("--interface", "-i", required=True, metavar="IFACE", completer=interfaces),
      arg("--pin-root", default="/sys/fs/bpf/tidegate", help="bpffs directory of the pins"),
      arg("--pin-name", help="pin directory name (default: the interface name)"),
      remote=False)  # fmt: skip
def detach(args, out: Output) -> int:
    if os.geteuid() != 0:
        raise LocalError("detach needs root (CAP_NET_ADMIN and CAP_BPF)")
    from tidegate.kernel.filter import FilterConfig, KernelError, KernelFilter  # lazy: the kernel layer (bcc)

    kf = KernelFilter(FilterConfig(interface=args.interface, pin_root=args.pin_root, pin_name=args.pin_name))
    try:
        kf.detach(remove_pins=True)
    except KernelError as e:
        print(f"tidegate: detach {args.interface}: {e}", file=sys.stderr)
        return EXIT_FAILED
    if out.is_json:
        out.json({"interface": args.interface, "detached": True, "pin_dir": str(kf.config.pin_dir)})
    else:
        out.line(f"detached tidegate from {args.interface} and removed {kf.config.pin_dir}; "
                 f"{args.interface} is no longer filtered")  # fmt: skip
    return EXIT_OK


@verb("lab", "local lab: namespaces, veth, an agent, a flood and legitimate traffic",
      "Everything on one machine, as root, no arguments needed; removes what it created on exit.",
      "sudo tidegate lab\n"
      "sudo tidegate lab --duration 60 --no-view",
      arg("--rules", help="rule set for the lab agent (default examples/lab.yaml)"),
      arg("--duration", type=float, default=0, help="stop after N seconds (default: until Ctrl-C)"),
      arg("--flood-pps", type=float, default=2000),
      arg("--legit-pps", type=float, default=20),
      arg("--no-view", action="store_true", help="print a summary instead of the live view"),
      remote=False)  # fmt: skip
def lab(args, out: Output) -> int:
    if os.geteuid() != 0:  # said before the lab's imports (grpc, numpy, pyroute2) are paid for
        print("tidegate lab: needs root (it creates a network namespace and loads an XDP program)", file=sys.stderr)
        return EXIT_USAGE
    from tidegate.lab.run import run_lab  # lazy: pyroute2 and the lab's processes

    return run_lab(args, out)


@verb("certs", "make a lab CA, a server certificate and client certificates (mTLS)",
      "Writes into --out: ca.pem/ca.key and server.pem/server.key for --server-name (both made\n"
      "only when missing: adding a client never replaces them), <client>.pem/<client>.key per\n"
      "--client, and roles.json mapping client names to --role (the agent's --role-map). Keys\n"
      "are mode 0600. --out must be a directory only you can write (not /tmp); links in it are\n"
      "never followed. Uses the Python `cryptography` package, or the openssl command when it\n"
      "is missing. For labs: a production CA belongs elsewhere.",
      "tidegate certs --out /etc/tidegate/pki --server-name edge1 --client alice --role admin\n"
      "tidegate certs --out /etc/tidegate/pki --client grafana --role read",
      arg("--out", required=True, metavar="DIR", help="directory for the files (created)"),
      arg("--server-name", default=None, metavar="NAME",
          help="the agent's DNS name (also valid: localhost, 127.0.0.1); default tidegate, or the "
          "name of the server certificate already in --out"),
      arg("--client", action="append", default=[], metavar="NAME", help="client common name (repeatable; default: admin)"),
      arg("--role", choices=("admin", "read"), default="admin", help="role of these clients"),
      arg("--days", type=int, default=365, help="validity (default 365)"),
      remote=False)  # fmt: skip
def certs(args, out: Output) -> int:
    from tidegate.access.certs import CertsError, make_lab_pki  # lazy: subprocess, crypto; keeps start-up fast

    try:
        made = make_lab_pki(args.out, args.server_name, args.client or ["admin"], args.role, days=args.days)
    except CertsError as e:
        raise LocalError(str(e)) from None
    if out.is_json:
        out.json(made)
        return EXIT_OK
    for path in made["written"]:
        out.line(path)
    d = made["dir"]
    first = (args.client or ["admin"])[0]
    if made["kept"]:
        out.note("kept as they were: " + ", ".join(os.path.basename(p) for p in made["kept"]))
    out.note(f"""
agent:  tidegate agent --interface IFACE --listen 0.0.0.0:50051 --tls-cert {d}/server.pem \\
          --tls-key {d}/server.key --tls-client-ca {d}/ca.pem --role-map {d}/roles.json
client: tidegate --server {made["server_name"]}:50051 --ca {d}/ca.pem --cert {d}/{first}.pem \\
          --key {d}/{first}.key status""")
    return EXIT_OK


@verb("completion", "print a shell completion script (bash or zsh)",
      "Prints a completion script (argcomplete: tidegate answers the shell itself) for verbs, options\n"
      "and choices, and version numbers and set-limit's rule names asked of the agent (at most 1 s).",
      "source <(tidegate completion bash)\n"
      "tidegate completion bash > /etc/bash_completion.d/tidegate\n"
      "tidegate completion zsh > \"${fpath[1]}/_tidegate\"",
      arg("shell", choices=("bash", "zsh")),
      remote=False)  # fmt: skip
def completion_verb(args, out: Output) -> int:
    sys.stdout.write(completion.script(args.shell))
    return EXIT_OK


@verb("schema", "print the JSON Schema of rule-set files (for editors)",
      "Built from the validator's model; editors with a YAML language server use it for completion and\n"
      "checks as you type. `tidegate validate` remains the full check.",
      "tidegate schema > /etc/tidegate/rules.schema.json\n"
      "# first line of a rule set: # yaml-language-server: $schema=/etc/tidegate/rules.schema.json",
      remote=False)  # fmt: skip
def schema(args, out: Output) -> int:
    print(schema_text(), end="")
    return EXIT_OK


@verb("version", "print tidegate's version, and the agent's when it is reachable",
      "Never fails because the agent is away: its version is then shown as unknown.",
      "tidegate version\n"
      "tidegate -o json version",
      remote=False, connects=True)  # fmt: skip
def version(args, out: Output) -> int:
    data: dict = {"tidegate": __version__, "agent": None, "server": args.server}
    try:
        cl = client_of(args)
        cl.timeout = min(args.timeout, 3.0)
        data["agent"] = cl.call("GetStatus", cl.pb.GetStatusRequest()).agent_version or None
    except ClientError as e:
        data["agent_error"] = e.message
    if out.is_json:
        out.json(data)
    else:
        agent = f"agent {data['agent']} at {args.server}" if data["agent"] else f"agent at {args.server}: unknown"
        out.line(f"tidegate {__version__} ({agent})")
    return EXIT_OK
