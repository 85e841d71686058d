"""The `tidegate` CLI without an agent and without root: offline validation,
usage errors, help, completion, certs, and how every kind of agent answer
(unreachable, refused with field errors, unimplemented, rolled back, slow)
becomes an exit code and one clear line.

Answers are produced by small fake gRPC servers on loopback; the
unreachable cases run the installed `tidegate` as a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from fixtures import rule_set
from tidegate import __version__
from tidegate.api import messages
from tidegate.cli import main as cli
from tidegate.cli.output import message_to_dict
from tidegate.v1 import tidegate_pb2 as pb
from tidegate.v1 import tidegate_pb2_grpc as pbg

BIN = Path(sys.executable).parent / "tidegate"

GOOD = rule_set("offline-good")

BAD = rule_set("offline-bad")


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def run(*args: str, env: dict | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith("TIDEGATE_")}
    e.update(env or {})
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, env=e, input=stdin, timeout=60)


def call(capsys, *args: str) -> tuple[int, str, str]:
    """The CLI in-process (fast): (exit code, stdout, stderr)."""
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def files(tmp_path):
    (tmp_path / "good.yaml").write_text(GOOD)
    (tmp_path / "bad.yaml").write_text(BAD)
    return tmp_path


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("TIDEGATE_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("TIDEGATE_AUTHOR", "unit-test")


# ------------------------------------------------------------- validate
def test_validate_good_file(capsys, files):
    code, out, err = call(capsys, "validate", str(files / "good.yaml"))
    assert code == 0, err
    assert out.strip() == f"{files / 'good.yaml'}: valid (1 rules, 0 allow, 0 deny)"


def test_validate_bad_file_prints_file_line_path_message(capsys, files):
    code, out, err = call(capsys, "validate", str(files / "bad.yaml"))
    assert code == 2
    lines = err.strip().splitlines()
    src = str(files / "bad.yaml")
    assert any(ln.startswith(f"{src}:5: rules[0].protocol: ") for ln in lines), lines
    assert f"{src}:7: rules[0].limit.pps: must be between 1 and 1000000000, got -1" in lines
    assert all(ln.startswith(f"{src}:") for ln in lines)
    assert out == ""


def test_validate_json(capsys, files):
    code, out, _ = call(capsys, "-o", "json", "validate", str(files / "good.yaml"))
    data = json.loads(out)
    assert code == 0 and data["valid"] is True and data["rules"] == 1 and len(data["digest"]) == 64
    assert data["errors"] == []
    code, out, err = call(capsys, "validate", "-o", "json", str(files / "bad.yaml"))
    data = json.loads(out)
    assert code == 2 and data["valid"] is False
    by_path = {e["path"]: e for e in data["errors"]}
    assert by_path["rules[0].limit.pps"]["line"] == 7
    assert isinstance(by_path["rules[0].limit.pps"]["message"], str)


def test_validate_missing_file_is_one_line(files):
    r = run("validate", str(files / "nope.yaml"))
    assert r.returncode == 2
    assert r.stderr == f"tidegate: {files / 'nope.yaml'}: no such file\n"
    assert r.stdout == ""


def test_validate_directory_and_malformed_yaml(capsys, files):
    code, _, err = call(capsys, "validate", str(files))
    assert code == 2 and "is a directory" in err and err.count("\n") == 1
    (files / "broken.yaml").write_text("rules: [\n  - name: x\n")
    code, _, err = call(capsys, "validate", str(files / "broken.yaml"))
    assert code == 2 and err.startswith(f"{files / 'broken.yaml'}:")


def test_validate_reads_stdin(files):
    r = run("validate", "-", stdin=GOOD)
    assert r.returncode == 0 and "<stdin>: valid" in r.stdout
    r = run("validate", "-", stdin=BAD)
    assert r.returncode == 2 and "<stdin>:7: rules[0].limit.pps" in r.stderr


# ------------------------------------------------------------ unreachable
@pytest.mark.parametrize("argv", [
    ("status",), ("versions",), ("counters",), ("-o", "json", "status"), ("watch", "--count", "1"),
    ("rollback", "--reason", "x"), ("audit",),
])  # fmt: skip
def test_unreachable_agent_is_exit_3_and_one_line(argv):
    port = free_port()
    r = run("--server", f"127.0.0.1:{port}", *argv)
    assert r.returncode == 3, (r.stdout, r.stderr)
    message = f"cannot reach the agent at 127.0.0.1:{port} (connection refused) — is `tidegate agent` running?"
    if "json" in argv:  # -o json: the error is one JSON object too
        assert r.stderr.count("\n") == 1 and json.loads(r.stderr)["error"]["message"] == message
    else:
        assert r.stderr == f"tidegate: {message}\n"
    assert r.stdout == ""


def test_unreachable_apply_and_env_server(files):
    port = free_port()
    r = run("apply", str(files / "good.yaml"), "--reason", "x", env={"TIDEGATE_SERVER": f"127.0.0.1:{port}"})
    assert r.returncode == 3 and r.stderr.count("\n") == 1 and f"127.0.0.1:{port}" in r.stderr
    assert "Traceback" not in r.stderr


def test_global_options_also_after_the_verb():
    port = free_port()
    r = run("status", "--server", f"127.0.0.1:{port}", "-o", "json")
    assert r.returncode == 3 and f"127.0.0.1:{port}" in r.stderr


def test_apply_missing_file_is_usage_error_before_any_call(files):
    r = run("--server", "127.0.0.1:1", "apply", str(files / "nope.yaml"), "--reason", "x")
    assert r.returncode == 2
    assert r.stderr == f"tidegate: {files / 'nope.yaml'}: no such file\n"


def test_unresolvable_name():
    r = run("--server", "no-such-host.invalid:50051", "status")
    assert r.returncode == 3 and r.stderr.count("\n") == 1 and "cannot reach the agent" in r.stderr


def test_version_without_agent(capsys):
    port = free_port()
    code, out, _ = call(capsys, "--server", f"127.0.0.1:{port}", "version")
    assert code == 0 and out.strip() == f"tidegate {__version__} (agent at 127.0.0.1:{port}: unknown)"
    code, out, _ = call(capsys, "--server", f"127.0.0.1:{port}", "-o", "json", "version")
    data = json.loads(out)
    assert data["tidegate"] == __version__ and data["agent"] is None and "cannot reach" in data["agent_error"]


# ------------------------------------------------------------ usage, help
def test_usage_errors_exit_2(capsys):
    assert call(capsys, "frobnicate")[0] == 2
    assert call(capsys)[0] == 2
    assert call(capsys, "set-limit", "app", "--reason", "x")[0] == 2  # --pps is required
    assert call(capsys, "show", "three")[0] == 2
    assert call(capsys, "-o", "xml", "status")[0] == 2
    assert call(capsys, "rollback", "--tok", "1")[0] == 2  # no abbreviations: --to is not --token


def test_help_of_every_verb(capsys):
    code, out, _ = call(capsys, "--help")
    assert code == 0 and "EXAMPLES" in out and "EXIT STATUS" in out
    for name in cli.VERBS:
        assert f"\n  {name:<11} " in out, name
        if name == "agent":
            continue  # the agent's own parser, checked below
        code, out_v, _ = call(capsys, name, "--help")
        assert code == 0, name
        assert f"usage: tidegate {name}" in out_v
        assert "EXAMPLES\n  " in out_v and "EXIT STATUS" in out_v, name
        assert f"tidegate {name}" in out_v.split("EXAMPLES", 1)[1], name


def test_agent_help_delegates_without_bcc():
    r = run("agent", "--help")
    assert r.returncode == 0 and "--interface" in r.stdout and "examples" in r.stdout.lower()


def test_exit_codes_are_documented(capsys):
    for text in (cli.__doc__, cli.EXIT_STATUS):
        for code in ("0", "1", "2", "3", "4"):
            assert f"\n  {code} " in text or f"\n{code} " in text or f"  {code}  " in text, (code, text)
    _, out, _ = call(capsys, "apply", "--help")
    assert "4    a guarded apply was rolled back" in out


def complete(script: str, line: str, *server: str) -> list[str]:
    """What bash offers for LINE (cursor at its end) through the printed script, which runs the
    installed `tidegate` the way bash does (COMP_LINE, COMP_POINT)."""
    words = line.split() + ([""] if line.endswith(" ") else [])
    env = {**os.environ, "PATH": f"{BIN.parent}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", "-c", script + '\nCOMP_LINE="$1"; COMP_POINT=${#COMP_LINE}; shift; COMP_WORDS=("$@"); '
                        'COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); _python_argcomplete_tidegate; '
                        'printf "%s\\n" "${COMPREPLY[@]}"', "-", line, *words], capture_output=True, text=True,
                       env=env, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return [w.strip() for w in r.stdout.splitlines() if w.strip()]


def test_completion_scripts(capsys):
    code, out, _ = call(capsys, "completion", "bash")
    assert code == 0 and "\ncomplete -o nospace -o default -o bashdefault -F _python_argcomplete_tidegate tidegate\n" in out
    if shutil.which("bash"):
        assert sorted(complete(out, "tidegate ")) == sorted(cli.VERBS)
        assert complete(out, "tidegate shadow ") == ["report", "clear"]
        assert complete(out, "tidegate apply --gu") == ["--guard", "--guard-seconds"]
        assert complete(out, "tidegate -o ") == ["table", "json", "yaml"]
    code, out, _ = call(capsys, "completion", "zsh")
    assert code == 0 and out.startswith("#compdef tidegate") and "bashcompinit" in out


@pytest.mark.skipif(not shutil.which("bash"), reason="no bash")
def test_completion_asks_the_agent_for_versions(capsys, fake_agent):
    script = call(capsys, "completion", "bash")[1]
    assert complete(script, f"tidegate --server {fake_agent} show ") == ["2", "1"]
    assert complete(script, f"tidegate --server {fake_agent} rollback --to ") == ["2", "1"]
    # an agent that does not answer adds nothing: no versions, and `default` for set-limit's rule
    assert complete(script, "tidegate --server 127.0.0.1:1 show ") == []
    assert complete(script, "tidegate --server 127.0.0.1:1 set-limit ") == ["default"]


# ------------------------------------------------------------------ certs
@pytest.mark.parametrize("backend", ["cryptography", "openssl"])
def test_certs(tmp_path, backend):
    from tidegate.access.certs import make_lab_pki

    if backend == "openssl" and not shutil.which("openssl"):
        pytest.skip("no openssl command")
    if backend == "cryptography":
        pytest.importorskip("cryptography")
    made = make_lab_pki(tmp_path, "edge1", ["alice"], "admin", backend=backend)
    assert made["roles"] == {"alice": "admin"}
    for name in ("ca", "server", "alice"):
        assert (tmp_path / f"{name}.pem").read_text().startswith("-----BEGIN CERTIFICATE-----")
        assert (tmp_path / f"{name}.key").stat().st_mode & 0o777 == 0o600
    ca = (tmp_path / "ca.pem").read_bytes()
    # a second run adds a client with the same CA and merges the role map
    made = make_lab_pki(tmp_path, "edge1", ["grafana"], "read", backend=backend)
    assert (tmp_path / "ca.pem").read_bytes() == ca
    assert json.loads((tmp_path / "roles.json").read_text()) == {"alice": "admin", "grafana": "read"}
    if shutil.which("openssl"):
        r = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.pem"), str(tmp_path / "server.pem"),
                            str(tmp_path / "alice.pem"), str(tmp_path / "grafana.pem")], capture_output=True,
                           text=True)  # fmt: skip
        assert r.returncode == 0, r.stderr
        r = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "server.pem"), "-noout", "-text"],
                           capture_output=True, text=True)  # fmt: skip
        assert "DNS:edge1" in r.stdout and "IP Address:127.0.0.1" in r.stdout and "TLS Web Server" in r.stdout


def test_certs_verb(capsys, tmp_path):
    code, out, err = call(capsys, "certs", "--out", str(tmp_path / "pki"), "--server-name", "edge1", "--client", "bob")
    assert code == 0 and str(tmp_path / "pki" / "bob.pem") in out.splitlines()
    assert "--tls-client-ca" in err
    code, _, err = call(capsys, "certs", "--out", str(tmp_path / "pki"), "--client", "../x")
    assert code == 2 and err.count("\n") == 1


# ------------------------------------------------- answers from an agent
class FakeFilter(pbg.FilterServicer):
    """Answers the way the agent does, for the cases the CLI must render."""

    def GetStatus(self, request, context):
        md = dict(context.invocation_metadata())
        return pb.Status(interface="eth9", xdp_mode="native", attached=True, active_version=2**40,
                         agent_version="9.9.9", tracked_sources=3, uptime_seconds=12.5,
                         pin_dir=md.get("tidegate-author", ""))  # fmt: skip

    def ApplyRuleSet(self, request, context):
        if request.reason == "refuse":
            errs = pb.ValidationErrors(source=request.source, violations=[
                pb.FieldViolation(path="rules[0].limit.pps", line=7, message="must be between 1 and 1000000000"),
                pb.FieldViolation(path="rules[0].protocol", line=5, message="must be one of tcp, udp")])  # fmt: skip
            context.set_trailing_metadata((("tidegate-errors-bin", errs.SerializeToString()),))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "invalid rule set: 2 error(s)\nbad.yaml:7: rules[0].limit.pps: must be between ...")  # fmt: skip
        if request.reason == "too wide":
            est = pb.Estimate(summary="would newly drop 80.0% of passing packets", packet_share=0.8)
            context.set_trailing_metadata((("tidegate-estimate-bin", est.SerializeToString()),))
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "refused by the blast-radius check: 80% > 1%")
        if request.reason == "slow":
            time.sleep(3)
        if request.guard:
            return pb.ApplyResponse(version=7, guarded=True, guard_outcome="rolled-back", rolled_back_to=6,
                                    guard_cause="canary 10.0.0.1 dropped")  # fmt: skip
        return pb.ApplyResponse(version=7, estimate=pb.Estimate(summary="fine"))

    def ListVersions(self, request, context):
        return pb.ListVersionsResponse(versions=[pb.VersionInfo(number=2, active=True), pb.VersionInfo(number=1)])

    def GetVersion(self, request, context):
        if request.number > 2:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no version {request.number}")
        limit = "500" if request.number == 1 else "50"
        return pb.Version(info=pb.VersionInfo(number=request.number, state="applied"),
                          yaml=f"rules:\n  - name: app\n    limit: {{pps: {limit}}}\n")  # fmt: skip

    def WatchCounters(self, request, context):
        for i in range(request.max_updates or 1000):
            yield pb.Counters(packets=100 * (i + 1), dropped=10 * i, time=1000.0 + i, active_version=2,
                              reasons=[pb.ReasonCount(reason="pass", verdict="pass", packets=100 * (i + 1))],
                              rules=[pb.RuleCount(rule="app", pass_packets=90 * (i + 1), drop_packets=10 * i)])  # fmt: skip
            time.sleep(request.interval_ms / 1000.0)

    def Insight(self, request, context):
        d = {"verdict": "flood", "sources": 12000, "new_source_share": 0.97, "known_source_packet_share": 0.02,
             "top_prefixes_packet_share": 0.16, "distinct_prefixes": 64, "sources_per_prefix": 187.5,
             "median_source_pps": 0.4, "traffic_factor": None, "rate_histogram": {"le_1": 11900, "le_inf": 12000},
             "top_prefixes": [{"prefix": "198.18.7.0/24", "packet_share": 0.02, "sources": 190}],
             "reading": "looks like a spoofed flood (a hint, not a verdict)"}  # fmt: skip
        return messages.insight(d)

    def TopSources(self, request, context):
        return pb.TopSourcesResponse(sources=[pb.SourceRate(address="198.18.0.1", rule="app", pps=5.0, drops=9)],
                                     interval_seconds=1.0, tracked_sources=1)  # fmt: skip

    def GetReview(self, request, context):
        top = [{"address": "10.50.0.7", "rule": "api", "packets": 900, "drops": 700}]
        data = {"version": request.version, "author": "alice", "reason": "tighten", "complete": False, "final": True,
                "ended": {"kind": "replaced", "by_version": 3, "how": "rollback", "cause": "guard-drop-share",
                          "after_seconds": 12.0},
                "before": {"seconds": 300, "pps": 100.0, "drop_share": 0.01, "by_rule_pps": {}},
                "after": {"seconds": 12, "pps": 100.0, "drop_share": 0.6, "by_rule_pps": {}},
                "guard": [{"action": "guard-rollback", "result": "rolled-back", "detail": "drop share 60%"}],
                "guard_fired": True, "newly_dropped_sources": 51, "newly_dropped_capped": False,
                "before_dropped_sources": 4, "before_sampled_seconds": 300.0, "top_newly_dropped": top}  # fmt: skip
        return messages.review(data)

    def ShadowReport(self, request, context):
        def src(a, rule, d):
            return pb.SourceRate(address=a, rule=rule, packets=2 * d, drops=d)

        api = pb.ShadowRule(rule="api", packets=1000, would_drop_new=300, sources=2, share=0.3,
                            top_affected=[src("10.50.0.1", "api", 200), src("10.50.0.2", "api", 100)][:request.top])
        sink = pb.ShadowRule(rule="sink", packets=500, would_drop_new=50, sources=1, share=0.05,
                             top_affected=[src("198.18.0.9", "sink", 50)])
        return pb.ShadowReportResponse(shadow_version=5, active_version=4, packets=1500, would_drop_new=350,
                                       share=0.23, rules=[api, sink],
                                       top_affected=[src("10.50.0.1", "api", 200), src("10.50.0.2", "api", 100)])


@pytest.fixture(scope="module")
def fake_agent():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pbg.add_FilterServicer_to_server(FakeFilter(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def test_status_json_is_typed(capsys, fake_agent):
    code, out, _ = call(capsys, "--server", fake_agent, "-o", "json", "status")
    data = json.loads(out)
    assert code == 0
    assert data["active_version"] == 2**40 and isinstance(data["tracked_sources"], int)  # numbers, not strings
    assert data["attached"] is True and data["shadow_version"] == 0 and data["xdp_mode"] == "native"
    assert data["pin_dir"] == "unit-test", "the author travels as tidegate-author metadata"
    code, out, _ = call(capsys, "--server", fake_agent, "status")
    assert code == 0 and "eth9" in out and "yes (native)" in out and "1,099,511,627,776" in out


def test_field_errors_from_the_agent(capsys, fake_agent, files):
    code, out, err = call(capsys, "--server", fake_agent, "apply", str(files / "good.yaml"), "--reason", "refuse")
    assert code == 1 and out == ""
    src = str(files / "good.yaml")
    assert err.splitlines() == [
        "tidegate: INVALID_ARGUMENT: invalid rule set: 2 error(s)",
        f"{src}:7: rules[0].limit.pps: must be between 1 and 1000000000",
        f"{src}:5: rules[0].protocol: must be one of tcp, udp",
    ]


def test_blast_radius_refusal_shows_estimate(capsys, fake_agent, files):
    code, _, err = call(capsys, "--server", fake_agent, "apply", str(files / "good.yaml"), "--reason", "too wide")
    assert code == 1
    assert err.splitlines() == ["tidegate: FAILED_PRECONDITION: refused by the blast-radius check: 80% > 1%",
                                "estimate: would newly drop 80.0% of passing packets"]  # fmt: skip


def test_guard_rollback_is_exit_4(capsys, fake_agent, files):
    code, out, _ = call(capsys, "--server", fake_agent, "apply", str(files / "good.yaml"), "-r", "x", "--guard")
    assert code == 4 and "GUARD ROLLED BACK to version 6: canary 10.0.0.1 dropped" in out
    code, out, err = call(capsys, "--server", fake_agent, "-o", "json", "apply", str(files / "good.yaml"), "-r", "x",
                          "--guard")  # fmt: skip
    data = json.loads(out)
    assert code == 4 and data["guard_outcome"] == "rolled-back" and data["rolled_back_to"] == 6
    assert "guard rolled back" in err


def test_apply_ok(capsys, fake_agent, files):
    code, out, _ = call(capsys, "--server", fake_agent, "-o", "json", "apply", str(files / "good.yaml"), "-r", "x")
    data = json.loads(out)
    assert code == 0 and data["version"] == 7 and data["estimate"]["summary"] == "fine" and data["shadow"] is False


def test_review_lists_newly_dropped_sources(capsys, fake_agent):
    code, out, _ = call(capsys, "--server", fake_agent, "review", "2")
    assert code == 0
    assert "replaced by version 3 (rollback, guard-drop-share)" in out
    assert "newly dropped sources: 51 (dropped after the change; not among the 4 dropped in the 5m 0s sampled" in out
    assert "10.50.0.7" in out and "700" in out and "guard fired: YES" in out
    code, out, _ = call(capsys, "--server", fake_agent, "-o", "json", "review", "2")
    data = json.loads(out)
    assert data["newly_dropped_sources"] == 51 and data["top_newly_dropped"][0]["address"] == "10.50.0.7"
    assert data["guard_fired"] is True and data["final"] is True


def test_shadow_report_top_sources_per_rule(capsys, fake_agent):
    code, out, _ = call(capsys, "--server", fake_agent, "shadow", "report", "--top", "1")
    assert code == 0
    assert "most affected sources: api (2 sources)" in out and "most affected sources: sink (1 sources)" in out
    assert "10.50.0.1" in out and "10.50.0.2" not in out and "198.18.0.9" in out
    code, out, _ = call(capsys, "--server", fake_agent, "-o", "json", "shadow", "report")
    rules = {r["rule"]: r for r in json.loads(out)["rules"]}
    assert [s["address"] for s in rules["api"]["top_affected"]] == ["10.50.0.1", "10.50.0.2"]
    assert rules["sink"]["top_affected"] == [{"address": "198.18.0.9", "rule": "sink", "packets": 100, "drops": 50,
                                              "pps": 0.0, "drop_pps": 0.0, "first_seen_seconds_ago": 0.0}]


def test_not_found_and_diff(capsys, fake_agent):
    code, _, err = call(capsys, "--server", fake_agent, "show", "9")
    assert code == 1 and err == "tidegate: NOT_FOUND: no version 9\n"
    code, out, _ = call(capsys, "--server", fake_agent, "diff", "1", "2")
    assert code == 0 and "-    limit: {pps: 500}" in out and "+    limit: {pps: 50}" in out
    assert "\x1b[" not in out, "no colour when stdout is not a terminal"
    code, out, _ = call(capsys, "--server", fake_agent, "-o", "json", "diff", "1", "2")
    data = json.loads(out)
    assert data["identical"] is False and "+    limit: {pps: 50}" in data["diff"]


def test_unimplemented_verb(capsys, fake_agent):
    code, out, err = call(capsys, "--server", fake_agent, "audit")
    assert code == 1 and out == ""
    assert err.startswith("tidegate: the agent does not support `audit` yet") and err.count("\n") == 1


def test_slow_agent_is_a_failed_call_not_unreachable(capsys, fake_agent, files):
    code, _, err = call(capsys, "--server", fake_agent, "--timeout", "0.5", "apply", str(files / "good.yaml"),
                        "-r", "slow")  # fmt: skip
    assert code == 1
    assert err.strip() == f"tidegate: the agent at {fake_agent} did not answer within 0.5 s (raise --timeout?)"


def test_watch_json_lines_and_table(capsys, fake_agent):
    code, out, _ = call(capsys, "--server", fake_agent, "-o", "json", "watch", "--count", "3", "--interval", "0.1")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 3
    updates = [json.loads(ln) for ln in lines]
    assert [u["packets"] for u in updates] == [100, 200, 300]
    assert all(u["insight"]["verdict"] == "flood" and u["insight"]["sources_per_prefix"] == 187.5 for u in updates)
    code, out, _ = call(capsys, "--server", fake_agent, "watch", "--count", "3", "--interval", "0.1")
    assert code == 0 and "per rule" in out and "198.18.0.1" in out and "active v2" in out
    # the traffic shape, live: the figures behind the reading, and the reading
    assert "traffic shape: flood" in out and "12,000" in out and "97%" in out and "187.5" in out
    assert "looks like a spoofed flood" in out and "198.18.7.0/24 (2%, 190 src)" in out


@pytest.mark.parametrize("mode", ["table", "json"])
def test_watch_ctrl_c_exits_0(fake_agent, mode):
    import signal

    # the CLI starts with SIGINT at its default, as from a terminal: a suite run as a background job
    # (`cmd &` in a script) inherits SIGINT ignored, and Python then leaves it ignored
    p = subprocess.Popen([str(BIN), "--server", fake_agent, "-o", mode, "watch", "--interval", "0.1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    time.sleep(1.5)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=10)
    assert p.returncode == 0 and "Traceback" not in err, err
    if mode == "json":
        assert len([json.loads(ln) for ln in out.splitlines()]) >= 3


def test_author(monkeypatch):
    from tidegate.client import default_author

    host = socket.gethostname()
    assert default_author() == "unit-test"
    monkeypatch.delenv("TIDEGATE_AUTHOR")
    monkeypatch.setenv("SUDO_USER", "alice")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_author() == f"alice@{host} (sudo)"
    monkeypatch.delenv("SUDO_USER")
    monkeypatch.setenv("USER", "bob")
    monkeypatch.setenv("LOGNAME", "bob")
    assert default_author() == f"bob@{host}"


def test_message_to_dict_is_complete_and_typed():
    d = message_to_dict(pb.ApplyResponse(version=3))
    assert d == {"version": 3, "shadow": False, "estimate": None, "guarded": False, "guard_outcome": "",
                 "guard_cause": "", "rolled_back_to": 0}  # fmt: skip
    c = message_to_dict(pb.Counters(rules=[pb.RuleCount(rule="a", drop_packets=2**63)]))
    assert c["rules"][0]["drop_packets"] == 2**63 and c["shadow"] == []
