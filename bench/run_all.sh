#!/bin/bash
# Run every benchmark in bench/ (each one standalone; see bench/README.md).
#   sudo bash bench/run_all.sh            # full runs, results saved in bench/results/
#   sudo bash bench/run_all.sh --quick    # short runs, printed only
# Extra arguments are passed to every bench. Uses the project's venv if it
# exists (made by `make install`), else Debian's python3 (it has bcc); never
# a python without bcc.
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="$here/../.venv/bin/python"
[ -x "$py" ] || py=/usr/bin/python3
if [ "$(id -u)" -ne 0 ]; then
    echo "run_all.sh: the benchmarks load BPF programs and create namespaces; run as root" >&2
    exit 1
fi
failed=()
for bench in packet_path load_spread veth_flood control_plane agent_process agent_start compile_time under_attack fleet_sim hostile_calls; do
    script="$here/$bench.py"
    [ -f "$script" ] || continue
    own=()
    # the lean-agent target is the agent's memory with a 1M-entry LRU under the flood
    [ "$bench" = under_attack ] && own=(--max-sources 1048576)
    echo "=== $bench ==="
    if ! "$py" "$script" "${own[@]}" "$@"; then
        failed+=("$bench")
    fi
done
echo "=== the lean-agent targets, from the saved results ==="
"$py" "$here/targets.py"
if [ "${#failed[@]}" -ne 0 ]; then
    echo "run_all.sh: failed: ${failed[*]}" >&2
    exit 1
fi
