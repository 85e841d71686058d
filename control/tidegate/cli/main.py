"""tidegate — the operators' command line.

    tidegate [--server ADDR] [-o table|json] [--timeout S] VERB [ARGS]

Every verb except `agent`, `validate`, `replay`, `lab`, `detach`, `certs`,
`completion` and `version` is a gRPC call to the agent (package tidegate.v1);
the CLI never touches kernel maps itself (`detach` is the one explicit
exception: it removes the program and pins of an interface whose agent is
stopped). Tables are for people; `-o json` prints one JSON document (one
object per line for `watch`) with the .proto's snake_case field names, every
field present and numbers as JSON numbers.

Exit codes:
  0  success
  1  the agent refused or failed the operation (INVALID_ARGUMENT,
     FAILED_PRECONDITION, NOT_FOUND, PERMISSION_DENIED, ...; also a verb the
     agent does not implement yet)
  2  usage error or bad local input (unknown option, missing or unreadable
     file, invalid rule set in `validate`)
  3  the agent cannot be reached (one line on stderr, never a traceback)
  4  a guarded apply was rolled back by the agent
  5  `whatif`, `validate --against-agent`: the agent's check would refuse the
     file (over the blast-radius budget, or a canary would be dropped)
  6  `validate --strict`: valid, with warnings
130  interrupted (Ctrl-C), except `watch`, where Ctrl-C is the normal way out (0)
`diff FILE` follows `diff(1)`: 0 same as the active version, 1 different, 2 error.
With -o json (or yaml), an error is one JSON object (YAML document) on stderr:
{"error": {"message", "code", "exit_code", "violations", "source"}}.
"""

from __future__ import annotations

import argparse
import difflib
import itertools
import json
import os
import re
import sys
import textwrap
from dataclasses import dataclass

from tidegate import __version__
from tidegate.client import DEFAULT_SERVER, ClientError
from tidegate.ruleset.checks import EXIT_CHECK_REFUSED
from tidegate.cli.output import Output, colour_diff, make_table, message_to_dict, per_second, use_colour

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_ROLLED_BACK, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130

EXIT_STATUS = """EXIT STATUS
  0    success
  1    the agent refused or failed the operation (its gRPC status is printed)
  2    usage error or bad local input (missing file, invalid rule set)
  3    the agent cannot be reached
  4    a guarded apply was rolled back by the agent
  5    whatif, validate --against-agent: the agent's check would refuse it (budget, canary)
  6    validate --strict: valid, with warnings
  130  interrupted (Ctrl-C); `watch` exits 0 on Ctrl-C
  diff FILE: 0 same as the active version, 1 different, 2 error"""

ENVIRONMENT = """ENVIRONMENT
  TIDEGATE_SERVER      agent address (default 127.0.0.1:50051)
  TIDEGATE_AUTHOR      recorded as the author of every change (default user@host)
  TIDEGATE_TOKEN       API token (instead of the token file)
  TIDEGATE_TOKEN_FILE  token file (default /var/lib/tidegate/tokens, readable by root); read on its
                       own only for a loopback --server. A token is never sent in clear text to
                       any other address: that is refused (exit 2); remote agents use mTLS
  TIDEGATE_CA, TIDEGATE_CERT, TIDEGATE_KEY
                       TLS: CA of the agent, client certificate and key (mTLS)
  NO_COLOR             no colour in `diff`"""


@dataclass(frozen=True)
class Verb:
    summary: str
    description: str
    examples: str
    remote: bool = True  # talks to the agent


VERBS: dict[str, Verb] = {
    "agent": Verb(
        "run the agent that owns the XDP filter and serves the API",
        "Loads the XDP program on an interface, restores the last active version, serves the gRPC API and\n"
        "Prometheus metrics. Every option is described by `tidegate agent --help`.",
        "tidegate agent --interface eth0 --rules /etc/tidegate/rules.yaml\n"
        "tidegate agent --interface eth0 --xdp-mode generic --state-dir /var/lib/tidegate",
        remote=False),
    "status": Verb(
        "show the agent, its interface, the attachment and the active version",
        "Prints the interface, whether the XDP program is attached and in which mode, the active and\n"
        "shadow versions, the tracked sources, whether a guard is watching, the program id and pins.",
        "tidegate status\n"
        "tidegate --server edge1:50051 --ca ca.pem --cert me.pem --key me.key status\n"
        "tidegate -o json status | jq .active_version"),
    "validate": Verb(
        "check a rule-set file offline (no agent needed)",
        "Parses and validates FILE exactly as the agent would, without contacting it. Every problem is\n"
        "printed on its own line as FILE:LINE: path: message. FILE may be - for standard input.\n"
        "Warnings (FILE:LINE: path: warning: ...): no default limit (unmatched traffic passes unlimited),\n"
        "a deny entry inside an allow entry (never fires), a rule an earlier rule hides (never matches).\n"
        "--against-agent also asks the agent for its blast-radius estimate (like whatif).\n"
        "Exit status 0 when the rule set is valid, 2 when it is not or cannot be read, 6 with --strict\n"
        "and warnings, 5 when the agent's check would refuse it.",
        "tidegate validate examples/edge-default.yaml\n"
        "tidegate -o json validate rules.yaml | jq .errors\n"
        "tidegate validate --strict --against-agent rules.yaml && tidegate apply rules.yaml -r ...\n"
        "git show HEAD:rules.yaml | tidegate validate -",
        remote=False),
    "apply": Verb(
        "apply a rule set as a new version (blast-radius checked, optionally guarded)",
        "Sends FILE to the agent, which validates it, estimates from the traffic it saw what the new set\n"
        "would newly drop, and refuses the change (FAILED_PRECONDITION, exit 1) when that exceeds its\n"
        "budget unless --force is given with a reason. The swap in the kernel is atomic; the new version\n"
        "is recorded with your name ($TIDEGATE_AUTHOR or user@host) and --reason.\n\n"
        "--shadow loads the set next to the active one: evaluated on every packet, counted, never enforced\n"
        "(see `tidegate shadow report`, `tidegate promote`).\n"
        "--guard watches the traffic for --guard-seconds after the swap and rolls back by itself when the\n"
        "drop share or the dropped sources jump, or a canary source is dropped; the command waits for the\n"
        "verdict (exit 4 when rolled back) unless --no-wait.",
        "tidegate apply rules.yaml --reason 'raise dns limit, ticket OPS-12'\n"
        "tidegate apply candidate.yaml --shadow --reason 'try on live traffic'\n"
        "tidegate apply rules.yaml --guard --guard-seconds 120 --reason 'tighter api limit'\n"
        "tidegate apply rules.yaml --force --reason 'flood in progress, risk accepted by on-call'"),
    "rollback": Verb(
        "make the previous (or a given) version active again",
        "Swaps the kernel back to the version active before the current one, or to --to VERSION, in one\n"
        "atomic step, and records who did it and why. `tidegate versions` lists the numbers.",
        "tidegate rollback --reason 'too tight, users blocked'\n"
        "tidegate rollback --to 3 --reason 'back to known good'"),
    "versions": Verb(
        "list rule-set versions with author, reason and state",
        "Every applied rule set is a numbered version; the active one is marked with *.",
        "tidegate versions\n"
        "tidegate versions --limit 5\n"
        "tidegate -o json versions | jq '.[] | select(.active)'"),
    "show": Verb(
        "print one version's rule set (canonical YAML) and metadata",
        "Prints the version's canonical YAML preceded by comment lines with its author, time and reason;\n"
        "the YAML can be edited and applied again.",
        "tidegate show 4\n"
        "tidegate show 4 > rules.yaml   # edit, then: tidegate apply rules.yaml --reason ..."),
    "diff": Verb(
        "compare two versions, or a file with the active version (unified diff)",
        "A unified diff of the canonical YAML of version A and version B, coloured on a terminal.\n"
        "With one FILE: FILE's canonical YAML against the active version (comments, order and\n"
        "spelling do not count); exit 0 when the same, 1 when different, 2 on an error (kubectl diff).",
        "tidegate diff 3 4\n"
        "tidegate diff 3 4 | less -R\n"
        "tidegate diff /etc/tidegate/rules.yaml || echo 'the file is not what runs'"),
    "counters": Verb(
        "packets by verdict and reason, per rule, and shadow would-drops",
        "Totals since the program was loaded: pass/drop by reason, per rule (passed, dropped by rate,\n"
        "prefix limit, block or deny), the shadow set's would-drops, and the per-source table's inserts.",
        "tidegate counters\n"
        "tidegate -o json counters | jq '.rules[] | {rule, drop_packets}'"),
    "top": Verb(
        "the busiest sources over the agent's last sample interval",
        "Sources (addresses masked to the rule set's prefix) ranked by packets or by drops, with their\n"
        "rates and the rule that matched them.",
        "tidegate top\n"
        "tidegate top -n 20 --by drops\n"
        "tidegate top --shadow --by drops   # whom the shadow set would drop"),
    "watch": Verb(
        "live view: pass/drop by reason, per rule, top sources",
        "Refreshes in place every --interval seconds: packet rates by verdict and reason, per-rule pass and\n"
        "drop rates, the top sources by drops, and the traffic shape (active and new sources, share from\n"
        "known sources, prefix concentration, per-source rate spread) with its plain reading: surge or\n"
        "flood. Ctrl-C leaves (exit 0). With -o json, prints one JSON object per line per update (the\n"
        "counters, and the shape under \"insight\"), for scripts and log shippers.",
        "tidegate watch\n"
        "tidegate watch --interval 0.5\n"
        "tidegate -o json watch --count 10 > counters.jsonl"),
    "set-limit": Verb(
        "change one rule's (or the default) rate limit as a new version",
        "Copies the active rule set, changes the limit of RULE (or of the defaults with `default`) and\n"
        "applies it like any apply: validated, blast-radius checked, versioned, audited. --bps is in\n"
        "bits per second, as `bps` in rule sets; without it the rule keeps its byte limit.",
        "tidegate set-limit dns --pps 200 --burst 400 --reason 'more resolvers'\n"
        "tidegate set-limit default --pps 50 --reason 'tighten during incident' --force\n"
        "tidegate set-limit bulk --pps 5000 --bps 80000000 --reason 'at most 10 MB/s per source'"),
    "promote": Verb(
        "make the shadow rule set the active one",
        "Atomically activates the rule set loaded with `apply --shadow` (its version becomes active) and\n"
        "clears the shadow slot.",
        "tidegate promote --reason 'shadow looked clean for 1h'"),
    "shadow": Verb(
        "report on or clear the shadow (candidate) rule set",
        "`report`: per rule, what the candidate would drop that the active set passes (packets, sources,\n"
        "share of traffic) and the most affected sources. `clear`: unload the candidate.",
        "tidegate shadow report\n"
        "tidegate shadow report --top 20\n"
        "tidegate shadow clear --reason 'candidate too tight'"),
    "whatif": Verb(
        "estimate what a rule set would newly drop, without applying it",
        "Asks the agent what FILE would newly drop compared with the active set, from the per-source\n"
        "rates it observed over its estimate window, and whether an apply would pass the blast-radius\n"
        "check. Nothing is changed. Exit 5 when the check would refuse it (over budget, or a canary\n"
        "would be dropped).",
        "tidegate whatif candidate.yaml\n"
        "tidegate -o json whatif candidate.yaml | jq .packet_share"),
    "review": Verb(
        "post-deployment review of a version: before and after",
        "Traffic before and after the version became active (pass/drop share and rates, per rule), the\n"
        "sources it newly dropped (not dropped in the 5 min before it), and whether a guard fired. The\n"
        "agent records it when its review period (default 1 h) ends or the version is replaced.",
        "tidegate review 4\n"
        "tidegate -o json review 4"),
    "audit": Verb(
        "who changed what, when, why and from where",
        "The agent's append-only audit log: applies, rollbacks, refused changes, guard decisions and\n"
        "denied calls, with author and peer address.",
        "tidegate audit\n"
        "tidegate audit --limit 20 --action rollback\n"
        "tidegate audit --action auth-denied"),
    "insight": Verb(
        "read the traffic's shape: legitimate surge or flood?",
        "A hint from the counters (not a verdict): known versus new sources, concentration in prefixes,\n"
        "heavy hitters.",
        "tidegate insight\n"
        "tidegate insight --propose --out proposal.yaml   # then: tidegate apply proposal.yaml --shadow\n"
        "tidegate -o json insight"),
    "replay": Verb(
        "run a pcap through the real XDP program offline",
        "Replays FILE's packets through the XDP program with BPF_PROG_TEST_RUN, the capture's timestamps\n"
        "driving the token buckets, and prints per rule what would be dropped; with --against, the\n"
        "difference between two rule sets. Needs root, no agent and no interface.",
        "tidegate replay --pcap cap.pcap --rules new.yaml\n"
        "tidegate replay --pcap cap.pcap --rules new.yaml --against current.yaml",
        remote=False),
    "detach": Verb(
        "remove the XDP program and its pinned maps from an interface",
        "The agent leaves the program attached when it stops, so the host stays filtered; this removes\n"
        "it. STOP THE AGENT FIRST (systemctl stop tidegate): a running agent on that interface would\n"
        "keep serving an API for a filter that is gone. After this the interface is UNFILTERED.\n"
        "Needs root.",
        "systemctl stop tidegate && tidegate detach --interface eth0",
        remote=False),
    "lab": Verb(
        "local lab: namespaces, veth, an agent, a flood and legitimate traffic",
        "Everything on one machine, as root, no arguments needed; removes what it created on exit.",
        "sudo tidegate lab\n"
        "sudo tidegate lab --duration 60 --no-view",
        remote=False),
    "certs": Verb(
        "make a lab CA, a server certificate and client certificates (mTLS)",
        "Writes into --out: ca.pem/ca.key and server.pem/server.key for --server-name (both made\n"
        "only when missing: adding a client never replaces them), <client>.pem/<client>.key per\n"
        "--client, and roles.json mapping client names to --role (the agent's --role-map). Keys\n"
        "are mode 0600. --out must be a directory only you can write (not /tmp); links in it are\n"
        "never followed. Uses the Python `cryptography` package, or the openssl command when it\n"
        "is missing. For labs: a production CA belongs elsewhere.",
        "tidegate certs --out /etc/tidegate/pki --server-name edge1 --client alice --role admin\n"
        "tidegate certs --out /etc/tidegate/pki --client grafana --role read",
        remote=False),
    "completion": Verb(
        "print a shell completion script (bash or zsh)",
        "Prints a completion script for verbs, options and choices.",
        "source <(tidegate completion bash)\n"
        "tidegate completion bash > /etc/bash_completion.d/tidegate\n"
        "tidegate completion zsh > \"${fpath[1]}/_tidegate\"",
        remote=False),
    "fleet": Verb(
        "roll rule sets out across many hosts through etcd (tidegate fleet --help)",
        "Fleet-wide shadow, waves with bake time, halt and revert on any host's failure; status, history,\n"
        "rollback and resume. Talks to etcd, not to an agent. Every option: `tidegate fleet VERB --help`.",
        "tidegate fleet --etcd http://etcd1:2379 --fleet edge rollout rules.yaml --reason 'raise api limit'\n"
        "tidegate fleet -o json status --fleet edge",
        remote=False),
    "deny": Verb(
        "quick block list: deny a CIDR for a while, remove it, list with expiry",
        "`add CIDR --ttl 10m --reason R` makes a new version: the active rule set with CIDR on its deny\n"
        "list, through the same checks as apply (validated, audited, blast-radius checked: a canary cannot\n"
        "be denied; --force overrides, audited). After --ttl the agent removes it again as a new version\n"
        "by agent:ttl. `remove CIDR --reason R` removes any deny entry as a new version. `list` shows the\n"
        "active deny list, who added each quick entry and when it expires.",
        "tidegate deny add 203.0.113.0/24 --ttl 10m --reason 'scanner, INC-42'\n"
        "tidegate deny list\n"
        "tidegate deny remove 203.0.113.0/24 --reason 'scanner gone'"),
    "schema": Verb(
        "print the JSON Schema of rule-set files (for editors)",
        "Built from the validator's model; editors with a YAML language server use it for completion and\n"
        "checks as you type. `tidegate validate` remains the full check.",
        "tidegate schema > /etc/tidegate/rules.schema.json\n"
        "# first line of a rule set: # yaml-language-server: $schema=/etc/tidegate/rules.schema.json",
        remote=False),
    "version": Verb(
        "print tidegate's version, and the agent's when it is reachable",
        "Never fails because the agent is away: its version is then shown as unknown.",
        "tidegate version\n"
        "tidegate -o json version",
        remote=False),
}  # fmt: skip


class LocalError(Exception):
    """Bad local input: exit 2, one line."""


# ------------------------------------------------------------------ parser
def _global_options(p: argparse.ArgumentParser, suppress: bool) -> None:
    """The connection and output options, accepted before and after the verb."""

    def d(value):
        return argparse.SUPPRESS if suppress else value

    g = p.add_argument_group("global options")
    g.add_argument("--server", metavar="ADDR", default=d(os.environ.get("TIDEGATE_SERVER", DEFAULT_SERVER)),
                   help="agent address host:port (default $TIDEGATE_SERVER or 127.0.0.1:50051)")  # fmt: skip
    g.add_argument("-o", "--output", choices=("table", "json", "yaml"), default=d("table"),
                   help="table for people (default), json or yaml for scripts (errors too, on stderr)")  # fmt: skip
    g.add_argument("--timeout", type=float, metavar="S", default=d(30.0), help="seconds per call (default 30)")
    g.add_argument("--ca", metavar="PEM", default=d(None), help="CA that signed the agent's certificate (TLS)")
    g.add_argument("--cert", metavar="PEM", default=d(None), help="client certificate (mTLS)")
    g.add_argument("--key", metavar="PEM", default=d(None), help="client private key (mTLS)")
    g.add_argument("--server-name", metavar="NAME", default=d(None),
                   help="name expected in the agent's certificate (default: the host in --server)")  # fmt: skip
    g.add_argument("--token", default=d(None), help="API token (prefer $TIDEGATE_TOKEN: arguments show in ps); "
                   "never sent in clear text to a non-loopback --server")  # fmt: skip
    g.add_argument("--token-file", metavar="FILE", default=d(None),
                   help="token file (default $TIDEGATE_TOKEN_FILE or /var/lib/tidegate/tokens, read on its own "
                   "only for a loopback --server)")  # fmt: skip


def _epilog(v: Verb) -> str:
    examples = "\n".join("  " + ln for ln in v.examples.splitlines())
    parts = [f"EXAMPLES\n{examples}", EXIT_STATUS]
    if v.remote:
        parts.append(ENVIRONMENT)
    return "\n\n".join(parts)


def build_parser() -> argparse.ArgumentParser:
    verbs = "\n".join(f"  {name:<11} {v.summary}" for name, v in VERBS.items())
    p = argparse.ArgumentParser(
        prog="tidegate",
        allow_abbrev=False,
        usage="tidegate [--server ADDR] [-o table|json] [--timeout S] VERB [ARGS]",
        description="tidegate: an XDP edge filter with safe rule changes.\n\n"
        "The `tidegate` command is the operators' client: it talks to the agent over gRPC (loopback by\n"
        "default, mTLS for remote agents). `tidegate VERB --help` describes each verb.\n\n"
        f"VERBS\n{verbs}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="EXAMPLES\n"
        "  tidegate validate rules.yaml && tidegate whatif rules.yaml\n"
        "  tidegate apply rules.yaml --guard --reason 'raise api limit'\n"
        "  tidegate rollback --reason 'users blocked'\n"
        "  tidegate -o json counters\n\n" + EXIT_STATUS + "\n\n" + ENVIRONMENT,
    )
    p.add_argument("-V", "--version", action="version", version=f"tidegate {__version__}")
    _global_options(p, suppress=False)
    sub = p.add_subparsers(dest="verb", metavar="VERB", help=argparse.SUPPRESS)

    made: list[tuple[str, argparse.ArgumentParser]] = []

    def verb(name: str) -> argparse.ArgumentParser:
        v = VERBS[name]
        sp = sub.add_parser(name, prog=f"tidegate {name}", allow_abbrev=False, epilog=_epilog(v),
                            description=f"tidegate {name} — {v.summary}\n\n{v.description}",
                            formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        made.append((name, sp))
        return sp

    a = verb("agent")
    a.add_argument("args", nargs=argparse.REMAINDER, help="the agent's options (tidegate agent --help)")

    verb("status")

    v = verb("validate")
    v.add_argument("file", metavar="FILE", help="rule-set YAML file, or - for standard input")
    from tidegate.ruleset.checks import add_validate_options

    add_validate_options(v)

    ap = verb("apply")
    ap.add_argument("file", metavar="FILE", help="rule-set YAML file")
    ap.add_argument("--reason", "-r", default="", help="why (required; recorded in the audit log)")
    ap.add_argument("--shadow", action="store_true", help="load as the shadow set: counted, not enforced")
    ap.add_argument("--force", action="store_true", help="override the blast-radius check (audited; needs a reason)")
    ap.add_argument("--guard", dest="guard", action="store_true", default=None,
                    help="watch after the swap and roll back automatically (default: the agent's setting)")  # fmt: skip
    ap.add_argument("--no-guard", dest="guard", action="store_false",
                    help="no guard, even if the agent defaults to one")  # fmt: skip
    ap.add_argument("--guard-seconds", type=int, default=0, metavar="N",
                    help="guard window in seconds (default: the agent's, 60)")  # fmt: skip
    ap.add_argument("--no-wait", action="store_true", help="with --guard: return at once, the guard keeps watching")

    rb = verb("rollback")
    rb.add_argument("--to", type=int, default=0, metavar="VERSION", help="version (default: the previous one)")
    rb.add_argument("--reason", "-r", default="", help="why (required; recorded in the audit log)")

    vs = verb("versions")
    vs.add_argument("--limit", type=int, default=50, metavar="N", help="newest N versions (default 50)")

    verb("show").add_argument("version", type=int, metavar="VERSION")

    d = verb("diff")
    d.add_argument("a", metavar="A|FILE", help="old version, or a rule-set file to compare with the active version")
    d.add_argument("b", type=int, nargs="?", metavar="B", help="new version")

    verb("counters")

    t = verb("top")
    t.add_argument("-n", type=int, default=10, metavar="N", help="how many sources (default 10)")
    t.add_argument("--by", choices=("packets", "drops"), default="packets", help="ranking (default packets)")
    t.add_argument("--shadow", action="store_true", help="rank by what the shadow set would drop")

    w = verb("watch")
    w.add_argument("--interval", type=float, default=1.0, metavar="S", help="seconds between updates (default 1)")
    w.add_argument("--count", type=int, default=0, metavar="N", help="stop after N updates (default: until Ctrl-C)")
    w.add_argument("--top", type=int, default=5, metavar="N", help="top sources shown (default 5, 0 hides them)")

    sl = verb("set-limit")
    sl.add_argument("rule", metavar="RULE", help="rule name, or `default` for the defaults")
    sl.add_argument("--pps", type=int, required=True, help="packets per second per source")
    sl.add_argument("--burst", type=int, default=0, help="bucket size in packets (default: the new --pps)")
    sl.add_argument("--bps", type=int, default=0, metavar="BITS",
                    help="byte-rate limit in bits per second per source, like the rule set's `bps` "
                    "(e.g. 80000000 for 10 MB/s; default: keep the rule's current byte limit)")  # fmt: skip
    sl.add_argument("--reason", "-r", default="", help="why (required)")
    sl.add_argument("--force", action="store_true", help="override the blast-radius check (audited)")

    pr = verb("promote")
    pr.add_argument("--reason", "-r", default="", help="why (recorded in the audit log)")
    pr.add_argument("--force", action="store_true", help="override the blast-radius check (audited)")

    sh = verb("shadow")
    sh.add_argument("action", choices=("report", "clear"), help="report or clear")
    sh.add_argument("--reason", "-r", default="", help="with clear: why")
    sh.add_argument("--top", type=int, default=10, metavar="N",
                    help="with report: affected sources shown per rule (default 10, at most 100)")

    verb("whatif").add_argument("file", metavar="FILE", help="candidate rule-set YAML file")

    verb("review").add_argument("version", type=int, metavar="VERSION")

    au = verb("audit")
    au.add_argument("--limit", type=int, default=50, metavar="N", help="newest N entries (default 50)")
    au.add_argument("--action", default="", help="only this action (apply, rollback, guard-rollback, auth-denied, ...)")

    ins = verb("insight")
    ins.add_argument("--propose", action="store_true",
                     help="also propose a rule-set change from the reading, with its what-if (nothing is applied)")
    ins.add_argument("--out", metavar="FILE", default="proposal.yaml",
                     help="with --propose: write the candidate rule set here (default proposal.yaml)")

    r = verb("replay")
    r.add_argument("--pcap", required=True, metavar="FILE", help="capture to replay")
    r.add_argument("--rules", required=True, metavar="FILE", help="rule set to evaluate")
    r.add_argument("--against", metavar="FILE", help="base rule set to compare with (e.g. the active one)")
    r.add_argument("--top", type=int, default=10, metavar="N", help="newly dropped sources shown (default 10)")

    dt = verb("detach")
    dt.add_argument("--interface", "-i", required=True, metavar="IFACE")
    dt.add_argument("--pin-root", default="/sys/fs/bpf/tidegate", help="bpffs directory of the pins")
    dt.add_argument("--pin-name", help="pin directory name (default: the interface name)")

    lb = verb("lab")
    lb.add_argument("--rules", help="rule set for the lab agent (default examples/lab.yaml)")
    lb.add_argument("--duration", type=float, default=0, help="stop after N seconds (default: until Ctrl-C)")
    lb.add_argument("--flood-pps", type=float, default=2000)
    lb.add_argument("--legit-pps", type=float, default=20)
    lb.add_argument("--no-view", action="store_true", help="print a summary instead of the live view")

    c = verb("certs")
    c.add_argument("--out", required=True, metavar="DIR", help="directory for the files (created)")
    c.add_argument("--server-name", default=None, metavar="NAME",
                   help="the agent's DNS name (also valid: localhost, 127.0.0.1); default tidegate, or the "
                   "name of the server certificate already in --out")  # fmt: skip
    c.add_argument("--client", action="append", default=[], metavar="NAME",
                   help="client common name (repeatable; default: admin)")  # fmt: skip
    c.add_argument("--role", choices=("admin", "read"), default="admin", help="role of these clients")
    c.add_argument("--days", type=int, default=365, help="validity (default 365)")

    verb("completion").add_argument("shell", choices=("bash", "zsh"))

    verb("fleet").add_argument("args", nargs=argparse.REMAINDER, help="VERB and its options (tidegate fleet --help)")

    from tidegate.changes.blocklist import add_arguments as deny_arguments

    deny_arguments(verb("deny"))

    verb("schema")

    verb("version")

    for name, sp in made:
        # usage shows the verb's own arguments; the connection options are listed under "global options"
        words = sp.format_usage().split()[1:]
        glob = ["[global options]"] if VERBS[name].remote or name in ("version", "validate") else []
        text = re.sub(r"\[[^\]]*\]", lambda m: m.group(0).replace(" ", "\0"), " ".join(words[:2] + glob + words[2:]))
        sp.usage = textwrap.fill(text, 96, subsequent_indent=" " * 7, break_on_hyphens=False).replace("\0", " ")
        if VERBS[name].remote or name in ("version", "validate"):  # validate --against-agent calls the agent
            _global_options(sp, suppress=True)
        elif name not in ("agent", "fleet"):
            sp.add_argument("-o", "--output", choices=("table", "json", "yaml"), default=argparse.SUPPRESS,
                            help="table (default), json or yaml")  # fmt: skip
    return p


# ----------------------------------------------------------------- helpers
def _client(args):
    from tidegate.client import Client

    return Client(args.server, args.timeout, args.ca, args.cert, args.key, token=args.token,
                  token_file=args.token_file, server_name=args.server_name)  # fmt: skip


def _read_file(path: str) -> str:
    try:
        if path == "-":
            return sys.stdin.read()
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise LocalError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise LocalError(f"{path}: is a directory, not a rule-set file") from None
    except PermissionError:
        raise LocalError(f"{path}: permission denied") from None
    except UnicodeDecodeError as e:
        raise LocalError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise LocalError(f"{path}: cannot read: {e.strerror}") from None


def _field_lines(violations, source: str) -> list[str]:
    """FILE:LINE: path: message, one per violation."""
    lines = []
    for v in violations:
        if source and v.line:
            lines.append(f"{source}:{v.line}: {v.path or '(document)'}: {v.message}")
        elif source:
            lines.append(f"{source}: {v.path or '(document)'}: {v.message}")
        else:
            lines.append(f"  {v.path or '(request)'}: {v.message}")
    return lines


def _print_estimate(out: Output, est, stream=None) -> None:
    if est is None or not est.summary:
        return
    p = (lambda s: print(s, file=stream)) if stream else out.note
    p(f"blast radius: {est.summary}")
    for r in list(est.rules)[:5]:
        p(f"  rule {r.rule}: {r.sources_newly_dropped:,} sources, {r.newly_dropped_pps:,.0f} pps newly dropped")


# ------------------------------------------------------------------- verbs
def cmd_agent(args, out: Output) -> int:
    from tidegate.daemon.agent import main as agent_main

    return agent_main(args.args)


def cmd_fleet(args, out: Output) -> int:
    from tidegate.fleet.cli import main as fleet_main

    return fleet_main(["-o", args.output, *args.args])


def cmd_validate(args, out: Output) -> int:
    from tidegate.ruleset.checks import cmd_validate_checked

    source = "<stdin>" if args.file == "-" else args.file
    return cmd_validate_checked(args, out, source, _read_file(args.file), _client)


def cmd_status(args, out: Output) -> int:
    cl = _client(args)
    s = cl.call("GetStatus", cl.pb.GetStatusRequest())
    if out.is_json:
        out.json(message_to_dict(s))
        return EXIT_OK
    out.kv(f"tidegate agent at {args.server}", [
        ("interface", s.interface),
        ("attached", f"yes ({s.xdp_mode})" if s.attached else "NO — traffic is not filtered"),
        ("active version", s.active_version or "none"),
        ("shadow version", s.shadow_version or "none"),
        ("guard", f"watching version {s.guard_version}" if s.guard_active else "idle"),
        ("tracked sources", f"{s.tracked_sources:,} (sampled {s.sample_age_seconds:.0f} s ago)"),
        ("uptime", _duration(s.uptime_seconds)),
        ("program id", s.prog_id or "-"),
        ("pins", s.pin_dir or "-"),
        ("agent version", s.agent_version),
    ])  # fmt: skip
    return EXIT_OK


def _duration(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + (f"{h}h " if d or h else "") + f"{m}m {s}s"


def cmd_apply(args, out: Output) -> int:
    text = _read_file(args.file)
    cl = _client(args)
    wait = bool(args.guard) and not args.no_wait and not args.shadow
    req = cl.pb.ApplyRequest(yaml=text, source=args.file, reason=args.reason, shadow=args.shadow, force=args.force,
                             guard=bool(args.guard), no_guard=args.guard is False, guard_seconds=args.guard_seconds,
                             wait_for_guard=wait)  # fmt: skip
    guard_s = args.guard_seconds or 60
    timeout = args.timeout + guard_s + 30 if wait else None
    label = (f"applying {args.file}; the guard watches for {guard_s} s ..." if wait
             else f"applying {args.file} ...")  # fmt: skip
    with out.progress(label):
        r = cl.call("ApplyRuleSet", req, timeout=timeout)
    rolled_back = r.guard_outcome == "rolled-back"
    if out.is_json:
        out.json(message_to_dict(r))
    else:
        kind = "shadow version" if r.shadow else "version"
        out.line(f"applied {args.file} as {kind} {r.version}")
        if r.estimate and r.estimate.summary:
            _print_estimate(out, r.estimate, sys.stdout)
        if r.guarded:
            if rolled_back:
                out.line(f"GUARD ROLLED BACK to version {r.rolled_back_to}: {r.guard_cause}")
            elif r.guard_outcome == "watching":
                out.line(f"guard: watching version {r.version} (see `tidegate status`, `tidegate audit`)")
            else:
                out.line(f"guard: {r.guard_outcome or 'watching'}")
    if rolled_back and out.is_json:
        out.note(f"tidegate: guard rolled back to version {r.rolled_back_to}: {r.guard_cause}")
    return EXIT_ROLLED_BACK if rolled_back else EXIT_OK


def cmd_rollback(args, out: Output) -> int:
    cl = _client(args)
    with out.progress("rolling back ..."):
        r = cl.call("Rollback", cl.pb.RollbackRequest(to_version=args.to, reason=args.reason))
    if out.is_json:
        out.json(message_to_dict(r))
    else:
        out.line(f"rolled back: version {r.version} is active")
    return EXIT_OK


def cmd_versions(args, out: Output) -> int:
    cl = _client(args)
    r = cl.call("ListVersions", cl.pb.ListVersionsRequest(limit=args.limit))
    if out.is_json:
        out.json([message_to_dict(v) for v in r.versions])
        return EXIT_OK
    out.table("versions", ["#", "active", "state", "created", "author", "source", "reason"],
              [[v.number, "*" if v.active else "", v.state, v.created, v.author, v.source, v.reason]
               for v in r.versions], empty="no versions yet: tidegate apply FILE --reason TEXT")  # fmt: skip
    return EXIT_OK


def cmd_show(args, out: Output) -> int:
    cl = _client(args)
    v = cl.call("GetVersion", cl.pb.GetVersionRequest(number=args.version))
    if out.is_json:
        out.json(message_to_dict(v))
        return EXIT_OK
    i = v.info
    out.line(f"# version {i.number} ({i.state}{', active' if i.active else ''}), {i.created}, by {i.author}")
    out.line(f"# reason: {i.reason}")
    if i.source:
        out.line(f"# source: {i.source}")
    out.line(f"# digest: {i.digest}")
    sys.stdout.write(v.yaml if v.yaml.endswith("\n") else v.yaml + "\n")
    return EXIT_OK


def cmd_diff(args, out: Output) -> int:
    if args.b is None and args.a.isdigit() and not os.path.exists(args.a):
        raise LocalError(f"diff: {args.a}: two version numbers, or one rule-set file")
    if args.b is None:
        from tidegate.ruleset.checks import cmd_diff_file

        return cmd_diff_file(args, out, _client(args), _read_file)
    if not args.a.isdigit():
        raise LocalError(f"diff: {args.a!r}: two version numbers, or one rule-set file")
    args.a = int(args.a)
    cl = _client(args)
    a = cl.call("GetVersion", cl.pb.GetVersionRequest(number=args.a))
    b = cl.call("GetVersion", cl.pb.GetVersionRequest(number=args.b))
    lines = list(difflib.unified_diff(a.yaml.splitlines(), b.yaml.splitlines(), f"version {args.a}",
                                      f"version {args.b}", lineterm=""))  # fmt: skip
    if out.is_json:
        out.json({"a": args.a, "b": args.b, "identical": not lines, "diff": lines})
        return EXIT_OK
    if not lines:
        out.line(f"versions {args.a} and {args.b} are identical")
    for ln in colour_diff(lines, use_colour()):
        out.line(ln)
    return EXIT_OK


def _counter_tables(c) -> list:
    total = c.packets or 1
    tables = [make_table(f"packets (active version {c.active_version}): {c.packets:,} seen, {c.dropped:,} dropped",
                         ["verdict", "reason", "packets", "share", "bytes"],
                         [[r.verdict, r.reason, r.packets, f"{r.packets / total:.1%}", r.bytes]
                          for r in c.reasons if r.packets])]  # fmt: skip
    tables.append(make_table("per rule", ["rule", "pass packets", "drop packets", "rate", "prefix", "blocked", "deny"],
                             [[r.rule, r.pass_packets, r.drop_packets, r.drop_rate, r.drop_prefix, r.drop_blocked,
                               r.drop_deny] for r in c.rules if r.pass_packets or r.drop_packets]))  # fmt: skip
    if c.shadow_version:
        tables.append(make_table(f"shadow version {c.shadow_version} (counted, not enforced)",
                                 ["rule", "packets", "would drop", "newly"],
                                 [[s.rule, s.packets, s.would_drop, s.would_drop_new] for s in c.shadow]))  # fmt: skip
    return tables


def cmd_counters(args, out: Output) -> int:
    cl = _client(args)
    c = cl.call("GetCounters", cl.pb.GetCountersRequest())
    if out.is_json:
        out.json(message_to_dict(c))
        return EXIT_OK
    for t in _counter_tables(c):
        out.console.print(t)
    out.line(f"per-source table: {c.lru_inserts:,} inserts, {c.lru_insert_failures:,} insert failures")
    return EXIT_OK


def cmd_top(args, out: Output) -> int:
    cl = _client(args)
    r = cl.call("TopSources", cl.pb.TopSourcesRequest(n=args.n, by=args.by, shadow=args.shadow))
    if out.is_json:
        out.json(message_to_dict(r))
        return EXIT_OK
    what = "shadow would-drops" if args.shadow and args.by == "drops" else args.by
    out.table(f"top sources by {what} (last {r.interval_seconds:.1f} s, {r.tracked_sources:,} tracked)",
              ["source", "rule", "pps", "drop pps", "packets", "drops"],
              [[s.address, s.rule, s.pps, s.drop_pps, s.packets, s.drops] for s in r.sources],
              empty="no samples yet: the agent samples sources every few seconds")  # fmt: skip
    return EXIT_OK


def _shape_table(d: dict):
    """The insight figures behind the reading (see `tidegate insight`)."""
    def share(k):
        return f"{d[k]:.0%}" if d.get(k) is not None else "-"

    hist = d.get("rate_histogram") or {}
    spread = ", ".join(f"{k.removeprefix('le_')}: {v:,}" for k, v in hist.items())
    rows = [
        ["sources in the window", f"{d.get('sources', 0):,}", "first seen within the baseline", share("new_source_share")],
        ["packets from known sources", share("known_source_packet_share"), "top 10 prefixes' share",
         share("top_prefixes_packet_share")],
        ["distinct /24 and /48 prefixes", f"{d.get('distinct_prefixes', 0):,}", "sources per prefix",
         f"{d.get('sources_per_prefix', 0):g}"],
        ["median pps per source", f"{d.get('median_source_pps', 0):g}", "traffic vs its baseline",
         f"x{d['traffic_factor']:g}" if d.get("traffic_factor") else "-"],
        ["spoof-only address space", share("impossible_source_share"), "confidence", share("confidence")],
    ]  # fmt: skip
    if spread:
        rows.append(["sources by pps (<= bucket)", spread, "", ""])
    heavy = ", ".join(f"{p['prefix']} ({p['packet_share']:.0%}, {p['sources']:,} src)"
                      for p in d.get("top_prefixes", [])[:3])
    if heavy:
        rows.append(["heaviest prefixes", heavy, "", ""])
    return make_table(f"traffic shape: {d.get('verdict', '?')}", ["figure", "value", "figure", "value"], rows)


def _insight(cl) -> dict | None:
    """The agent's last insight figures, or None when it has none to give."""
    try:
        r = cl.call("Insight", cl.pb.InsightRequest())
    except ClientError:
        return None
    d = json.loads(r.json or "{}")
    d.setdefault("reading", r.reading)
    return d


def _watch_frame(c, prev, top, server: str, shape: dict | None = None):
    """One refresh of the live view: rates by reason, per rule, top sources."""
    from rich.console import Group
    from rich.text import Text

    dt = (c.time - prev.time) if prev else 0.0
    old_reasons = {(r.verdict, r.reason): r.packets for r in prev.reasons} if prev else {}
    old_rules = {r.rule: r for r in prev.rules} if prev else {}
    pps = per_second(c.packets, prev.packets if prev else None, dt)
    dps = per_second(c.dropped, prev.dropped if prev else None, dt)
    head = Text.assemble(
        ("tidegate ", "bold"), f"{server} — active v{c.active_version}",
        (f", shadow v{c.shadow_version}" if c.shadow_version else ""),
        f" — {pps:,.0f} pps, ", (f"{dps:,.0f} dropped/s", "bold red" if dps else ""),
        f" ({dps / pps:.1%})" if pps else "", "   Ctrl-C to quit",
    )  # fmt: skip
    reasons = make_table("by verdict and reason", ["verdict", "reason", "pps", "packets"],
                         [[r.verdict, r.reason, per_second(r.packets, old_reasons.get((r.verdict, r.reason)), dt),
                           r.packets] for r in c.reasons if r.packets])  # fmt: skip
    rows = []
    for r in c.rules:
        o = old_rules.get(r.rule)
        if r.pass_packets or r.drop_packets:
            rows.append([r.rule, per_second(r.pass_packets, o.pass_packets if o else None, dt),
                         per_second(r.drop_packets, o.drop_packets if o else None, dt), r.drop_packets])  # fmt: skip
    parts = [head, reasons, make_table("per rule", ["rule", "pass pps", "drop pps", "dropped packets"], rows)]
    if c.shadow_version:
        parts.append(make_table(f"shadow v{c.shadow_version} (not enforced)", ["rule", "would drop", "newly"],
                                [[s.rule, s.would_drop, s.would_drop_new] for s in c.shadow if s.packets]))  # fmt: skip
    if top is not None:
        parts.append(make_table(f"top sources by drops (last {top.interval_seconds:.0f} s)",
                                ["source", "rule", "pps", "drop pps"],
                                [[s.address, s.rule, s.pps, s.drop_pps] for s in top.sources]))  # fmt: skip
    if shape:
        if "sources" in shape:
            parts.append(_shape_table(shape))
        parts.append(Text(shape.get("reading", "")))
    return Group(*parts)


def cmd_watch(args, out: Output) -> int:
    cl = _client(args)
    req = cl.pb.WatchRequest(interval_ms=max(100, int(args.interval * 1000)), max_updates=args.count)
    updates = cl.stream("WatchCounters", req)
    try:
        with out.progress(f"connecting to the agent at {args.server} ..."):
            first = next(updates, None)
        if first is None:
            return EXIT_OK
        if out.is_json:
            # each line: the counters, and the traffic-shape figures of the
            # agent's last sample under "insight"
            for c in itertools.chain([first], updates):
                out.json_line({**message_to_dict(c), "insight": _insight(cl)})
            return EXIT_OK
        from rich.live import Live

        def top_sources():
            if args.top <= 0:
                return None
            try:
                return cl.call("TopSources", cl.pb.TopSourcesRequest(n=args.top, by="drops"))
            except ClientError:
                return None

        prev = None
        with Live(_watch_frame(first, None, top_sources(), args.server, _insight(cl)), console=out.console,
                  refresh_per_second=4, auto_refresh=False) as live:  # fmt: skip
            prev = first
            for c in updates:
                live.update(_watch_frame(c, prev, top_sources(), args.server, _insight(cl)), refresh=True)
                prev = c
        if not out.console.is_terminal:
            out.line()
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        _quiet_broken_pipe()
    return EXIT_OK


def cmd_set_limit(args, out: Output) -> int:
    cl = _client(args)
    with out.progress(f"changing the limit of {args.rule} ..."):
        r = cl.call("UpdateThresholds", cl.pb.UpdateThresholdsRequest(
            rule=args.rule, pps=args.pps, burst=args.burst, bps=args.bps, reason=args.reason, force=args.force))  # fmt: skip
    if out.is_json:
        out.json(message_to_dict(r))
    else:
        burst = f", burst {args.burst}" if args.burst else ""
        bps = f", {args.bps} bits/s" if args.bps else ""
        out.line(f"limit of {args.rule} set to {args.pps} pps{burst}{bps}: version {r.version} is active")
        _print_estimate(out, r.estimate, sys.stdout)
    return EXIT_OK


def cmd_promote(args, out: Output) -> int:
    cl = _client(args)
    with out.progress("promoting the shadow set ..."):
        r = cl.call("PromoteShadow", cl.pb.PromoteRequest(reason=args.reason, force=args.force))
    if out.is_json:
        out.json(message_to_dict(r))
    else:
        out.line(f"promoted: shadow version {r.version} is now active")
    return EXIT_OK


def cmd_shadow(args, out: Output) -> int:
    cl = _client(args)
    if args.action == "clear":
        r = cl.call("ClearShadow", cl.pb.ClearShadowRequest(reason=args.reason))
        if out.is_json:
            out.json(message_to_dict(r))
        else:
            out.line(f"shadow version {r.cleared_version} cleared")
        return EXIT_OK
    r = cl.call("ShadowReport", cl.pb.ShadowReportRequest(top=args.top))
    if out.is_json:
        out.json(message_to_dict(r))
        return EXIT_OK
    out.line(f"shadow version {r.shadow_version} vs active {r.active_version}: loaded {_duration(r.loaded_seconds)},"
             f" {r.packets:,} packets seen, would newly drop {r.would_drop_new:,} ({r.share:.2%})")
    out.table("per rule (the candidate is counted, not enforced)",
              ["rule", "packets", "would drop", "newly dropped", "sources", "share"],
              [[x.rule, x.packets, x.would_drop, x.would_drop_new, x.sources, f"{x.share:.2%}"] for x in r.rules])  # fmt: skip
    for x in r.rules:  # who each rule would hurt: one bounded table per rule
        if x.top_affected:
            out.table(f"most affected sources: {x.rule} ({x.sources:,} sources)",
                      ["source", "packets", "newly dropped"], [[s.address, s.packets, s.drops] for s in x.top_affected])
    return EXIT_OK


def cmd_whatif(args, out: Output) -> int:
    text = _read_file(args.file)
    cl = _client(args)
    with out.progress(f"estimating {args.file} against the observed traffic ..."):
        e = cl.call("WhatIf", cl.pb.RuleSetText(yaml=text, source=args.file))
    refused = EXIT_OK if e.within_budget else EXIT_CHECK_REFUSED
    if out.is_json:
        out.json(message_to_dict(e))
        return refused
    verdict = "within budget" if e.within_budget else "OVER BUDGET (an apply would be refused without --force)"
    out.line(f"{args.file}: {verdict}")
    out.line(f"  {e.summary}" if e.summary else "")
    out.line(f"  over the last {e.window_seconds:.0f} s: {e.sources_seen:,} sources, {e.packets_per_second:,.1f} pps;"
             f" newly dropped {e.sources_newly_dropped:,} sources ({e.source_share:.2%}, budget {e.source_budget:.0%}),"
             f" {e.newly_dropped_pps:,.1f} pps ({e.packet_share:.2%}, budget {e.packet_budget:.0%})")  # fmt: skip
    if e.rules:
        out.table("newly dropped by rule", ["rule", "sources", "pps"],
                  [[r.rule, r.sources_newly_dropped, r.newly_dropped_pps] for r in e.rules])  # fmt: skip
    if e.top_affected:
        out.table("most affected sources", ["source", "rule", "pps", "drop pps"],
                  [[s.address, s.rule, s.pps, s.drop_pps] for s in e.top_affected])  # fmt: skip
    return refused


def cmd_review(args, out: Output) -> int:
    cl = _client(args)
    r = cl.call("GetReview", cl.pb.GetReviewRequest(version=args.version))
    data = json.loads(r.json or "{}")
    if out.is_json:
        out.json(data)
        return EXIT_OK
    ended = data.get("ended") or {}
    if r.complete:
        state = "complete"
    elif ended.get("kind") == "replaced":
        how = f"{ended.get('how')}, {ended['cause']}" if ended.get("cause") else ended.get("how")
        state = (f"ended after {ended.get('after_seconds', 0):.0f} s: replaced by version "
                 f"{ended.get('by_version')} ({how})")
    elif r.final:
        state = f"ended after {ended.get('after_seconds', 0):.0f} s: {ended.get('kind', 'recorded')}"
    else:
        state = "in progress"
    who = f": by {data['author']} — {data.get('reason', '')}" if data.get("author") else ""
    out.line(f"review of version {args.version} ({state}){who}")
    for side in ("before", "after"):
        s = data.get(side)
        if isinstance(s, dict):
            out.line(f"  {side:6s}: {s.get('pps', 0):,.1f} pps, drop share {s.get('drop_share', 0):.2%}"
                     f" over {s.get('seconds', 0):.0f} s")  # fmt: skip
    before, after = data.get("before") or {}, data.get("after") or {}
    rules = sorted(set(before.get("by_rule_pps", {})) | set(after.get("by_rule_pps", {})))
    if rules:
        def cell(side, name, k):
            return side.get("by_rule_pps", {}).get(name, {}).get(k, 0.0)

        out.table("per rule (pps)", ["rule", "pass before", "pass after", "drop before", "drop after"],
                  [[n, cell(before, n, "pass"), cell(after, n, "pass"), cell(before, n, "drop"),
                    cell(after, n, "drop")] for n in rules])  # fmt: skip
    if data.get("newly_dropped_sources") is not None:
        floor = "more than " if r.newly_dropped_capped else ""
        out.line(f"  newly dropped sources: {floor}{r.newly_dropped_sources:,} (dropped after the change; not "
                 f"among the {data.get('before_dropped_sources') or 0:,} dropped in the "
                 f"{_duration(data.get('before_sampled_seconds') or 0)} sampled before it)")  # fmt: skip
        if r.top_newly_dropped:
            out.table("top newly dropped sources", ["source", "rule", "packets", "drops"],
                      [[s.address, s.rule, s.packets, s.drops] for s in r.top_newly_dropped])  # fmt: skip
    out.line(f"  guard fired: {'YES' if data.get('guard_fired') else 'no'}")
    for g in data.get("guard") or []:
        out.line(f"    {g.get('action')}: {g.get('result')} {g.get('detail', '')}")
    if data.get("note"):
        out.line(f"  note: {data['note']}")
    return EXIT_OK


def cmd_audit(args, out: Output) -> int:
    cl = _client(args)
    r = cl.call("ListAudit", cl.pb.ListAuditRequest(limit=args.limit, action=args.action))
    if out.is_json:
        out.json([message_to_dict(e) for e in r.entries])
        return EXIT_OK
    out.table("audit log", ["time", "action", "result", "author", "peer", "version", "detail"],
              [[e.time, e.action, e.result, e.author, e.peer, e.version or "", e.detail] for e in r.entries],
              empty="nothing recorded")  # fmt: skip
    return EXIT_OK


def cmd_insight(args, out: Output) -> int:
    cl = _client(args)
    r = cl.call("Insight", cl.pb.InsightRequest(propose=args.propose))
    data = json.loads(r.json or "{}")
    if args.propose:
        from tidegate.safety.propose import words, write_rule_set

        p = data.get("proposal") or {"action": "none", "reason": "no reading yet"}
        if p.get("rule_set"):
            try:
                write_rule_set(args.out, p)
            except OSError as e:
                raise LocalError(f"{args.out}: cannot write the proposal: {e.strerror}") from None
            p["written_to"] = args.out
    if out.is_json:
        out.json(data)
        return EXIT_OK
    out.line(r.reading)
    if args.propose:
        out.line(words(p))
        if p.get("written_to"):
            out.line(f"written to {args.out}: tidegate apply {args.out} --shadow --reason '{p['verdict']}: "
                     f"{p['action']}'")  # fmt: skip
    return EXIT_OK


def cmd_replay(args, out: Output) -> int:
    from tidegate.lab.replay import replay
    from tidegate.ruleset.model import RuleSetError, load_rule_set

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
        res = replay(args.pcap, rs, base)
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


def cmd_detach(args, out: Output) -> int:
    if os.geteuid() != 0:
        raise LocalError("detach needs root (CAP_NET_ADMIN and CAP_BPF)")
    from tidegate.kernel.filter import FilterConfig, KernelError, KernelFilter

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


def cmd_version(args, out: Output) -> int:
    data: dict = {"tidegate": __version__, "agent": None, "server": args.server}
    try:
        cl = _client(args)
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


def _options_of(parser: argparse.ArgumentParser) -> tuple[list[str], dict[str, list[str]]]:
    """(option strings, {option: choices}) of one parser."""
    opts, choices = [], {}
    for a in parser._actions:
        for s in a.option_strings:
            if s.startswith("--") or s in ("-o", "-n", "-r", "-i"):
                opts.append(s)
                if a.choices:
                    choices[s] = list(a.choices)
    return opts, choices


def completion_script(shell: str) -> str:
    """A completion script for verbs, each verb's options and their choices."""
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    verbs = list(VERBS)
    top_opts, _ = _options_of(parser)
    per_verb = {}
    positional_choices = {}
    for name in verbs:
        sp = subs.choices[name]
        opts, _ = _options_of(sp)
        per_verb[name] = opts
        for a in sp._actions:
            if not a.option_strings and a.choices:
                positional_choices[name] = list(a.choices)
    if shell == "bash":
        cases = "\n".join(
            f"        {name}) pos=\"{' '.join(positional_choices.get(name, []))}\"; "
            f"opts=\"{' '.join(per_verb[name])}\" ;;"
            for name in verbs
        )
        return f"""# bash completion for tidegate
# use: source <(tidegate completion bash)   or save it in /etc/bash_completion.d/tidegate
_tidegate() {{
    local cur prev verb pos opts i
    cur=${{COMP_WORDS[COMP_CWORD]}}
    prev=${{COMP_WORDS[COMP_CWORD-1]}}
    case "$prev" in
        -o|--output) COMPREPLY=( $(compgen -W "table json" -- "$cur") ); return ;;
        --by) COMPREPLY=( $(compgen -W "packets drops" -- "$cur") ); return ;;
        --role) COMPREPLY=( $(compgen -W "admin read" -- "$cur") ); return ;;
        -i|--interface) COMPREPLY=( $(compgen -W "$(ls /sys/class/net 2>/dev/null)" -- "$cur") ); return ;;
        --server|--timeout|--reason|-r|--pps|--burst|--bps|--to|--limit|-n|--interval|--count|--top|--token) return ;;
    esac
    verb=""
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${{COMP_WORDS[i]}}" in
            --server|-o|--output|--timeout|--ca|--cert|--key|--server-name|--token|--token-file) ((i++)) ;;
            -*) ;;
            *) verb=${{COMP_WORDS[i]}}; break ;;
        esac
    done
    if [ -z "$verb" ]; then
        COMPREPLY=( $(compgen -W "{' '.join(verbs)} {' '.join(top_opts)}" -- "$cur") )
        return
    fi
    case "$verb" in
{cases}
        *) pos=""; opts="" ;;
    esac
    if [[ "$cur" == -* ]]; then
        COMPREPLY=( $(compgen -W "$opts" -- "$cur") )
    elif [ -n "$pos" ]; then
        COMPREPLY=( $(compgen -W "$pos" -- "$cur") )
    else
        compopt -o filenames 2>/dev/null
        COMPREPLY=( $(compgen -f -- "$cur") )
    fi
}}
complete -F _tidegate tidegate
"""
    cases = "\n".join(
        f"        {name}) compadd -- {' '.join(positional_choices.get(name, []) + per_verb[name])}; _files ;;"
        for name in verbs
    )
    described = "\n".join(f"        '{name}:{VERBS[name].summary.replace(chr(39), '')}'" for name in verbs)
    return f"""#compdef tidegate
# zsh completion for tidegate
# use: source <(tidegate completion zsh)   or save it as _tidegate in a directory of $fpath
_tidegate() {{
    local -a verbs
    verbs=(
{described}
    )
    local verb i
    for ((i = 2; i < CURRENT; i++)); do
        case "${{words[i]}}" in
            --server|-o|--output|--timeout|--ca|--cert|--key|--server-name|--token|--token-file) ((i++)) ;;
            -*) ;;
            *) verb=${{words[i]}}; break ;;
        esac
    done
    if [[ -z "$verb" ]]; then
        _describe 'verb' verbs
        compadd -- {' '.join(top_opts)}
        return
    fi
    case "$verb" in
{cases}
        *) _files ;;
    esac
}}
if [[ "$funcstack[1]" == "_tidegate" ]]; then
    _tidegate "$@"
else
    compdef _tidegate tidegate
fi
"""


def cmd_completion(args, out: Output) -> int:
    sys.stdout.write(completion_script(args.shell))
    return EXIT_OK


def cmd_certs(args, out: Output) -> int:
    from tidegate.access.certs import CertsError, make_lab_pki

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


def cmd_lab(args, out: Output) -> int:
    from tidegate.lab.run import run_lab

    return run_lab(args, out)


def cmd_deny(args, out: Output) -> int:
    from tidegate.changes.blocklist import cmd_deny as deny

    return deny(args, out, _client, LocalError)


def cmd_schema(args, out: Output) -> int:
    from tidegate.ruleset.schema import cmd_schema as print_schema

    return print_schema(args, out)


COMMANDS = {
    "agent": cmd_agent, "status": cmd_status, "validate": cmd_validate, "apply": cmd_apply,
    "rollback": cmd_rollback, "versions": cmd_versions, "show": cmd_show, "diff": cmd_diff,
    "counters": cmd_counters, "top": cmd_top, "watch": cmd_watch, "set-limit": cmd_set_limit,
    "promote": cmd_promote, "shadow": cmd_shadow, "whatif": cmd_whatif, "review": cmd_review,
    "audit": cmd_audit, "insight": cmd_insight, "replay": cmd_replay, "detach": cmd_detach,
    "version": cmd_version, "completion": cmd_completion, "certs": cmd_certs, "lab": cmd_lab,
    "fleet": cmd_fleet, "schema": cmd_schema, "deny": cmd_deny,
}  # fmt: skip


def _quiet_broken_pipe() -> None:
    # `tidegate -o json watch | head -1`: the reader left; don't complain at exit.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass


def _report(e: ClientError, verb: str, fallback_source: str = "") -> None:
    if e.code == "UNIMPLEMENTED":
        print(f"tidegate: the agent does not support `{verb}` yet ({e.details})", file=sys.stderr)
        return
    message = e.message
    if e.violations:
        # the agent's text repeats the field errors; print them once, in the FILE:LINE form
        message = message.splitlines()[0]
    print(f"tidegate: {message}", file=sys.stderr)
    has_lines = any(v.line for v in e.violations)
    for line in _field_lines(e.violations, e.source or (fallback_source if has_lines else "")):
        print(line, file=sys.stderr)
    if e.estimate is not None and e.estimate.summary:
        print(f"estimate: {e.estimate.summary}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "agent":
        # the agent has its own parser (and its compile child needs bcc): no client code on that path
        from tidegate.daemon.agent import main as agent_main

        return agent_main(argv[1:])
    if "fleet" in argv[:3] and argv[:argv.index("fleet")] in ([], ["-o", "json"], ["-o", "table"]):
        # the fleet verbs have their own parser (tidegate/fleet/cli.py) and talk to etcd, not to an agent
        from tidegate.fleet.cli import main as fleet_main

        return fleet_main(argv[:argv.index("fleet")] + argv[argv.index("fleet") + 1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code not in (0, None) else EXIT_OK
    if not args.verb:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    for name, default in (("server", DEFAULT_SERVER), ("output", "table"), ("timeout", 30.0), ("ca", None),
                          ("cert", None), ("key", None), ("server_name", None), ("token", None),
                          ("token_file", None)):  # fmt: skip
        if not hasattr(args, name):
            setattr(args, name, default)
    out = Output(args.output)
    try:
        return COMMANDS[args.verb](args, out)
    except ClientError as e:
        if out.is_json:
            from tidegate.ruleset.checks import error_document, print_error

            print_error(error_document(e.message, e.exit_code, e.code, e.violations, e.source, e.estimate), out.mode)
        else:
            _report(e, args.verb, getattr(args, "file", "") or "")
        return e.exit_code
    except LocalError as e:
        if out.is_json:
            from tidegate.ruleset.checks import error_document, print_error

            print_error(error_document(str(e), EXIT_USAGE), out.mode)
        else:
            print(f"tidegate: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("tidegate: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _quiet_broken_pipe()
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
