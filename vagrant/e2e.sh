#!/usr/bin/env bash
# The scripted VM test: build the box if missing, bring up edge then
# client, flood from the client, check from the host over gRPC that the
# edge drops the flood and passes the steady stream, apply and roll back a
# rule set from the host, destroy. Prints the time each step took.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "${here}/.." && pwd)"
tg="${repo}/.venv/bin/tidegate"
export TIDEGATE_SERVER="127.0.0.1:${TIDEGATE_GRPC_PORT:-50051}"
start=$(date +%s)
step() { printf 'vagrant-e2e: [%4ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }

cd "${here}"
# hardware virtualisation may exist but be unusable by libvirt's qemu user:
# fall back to QEMU software emulation (slower, works everywhere)
if [ -z "${TIDEGATE_VAGRANT_QEMU:-}" ]; then
    if ! [ -e /dev/kvm ] || ! runuser -u libvirt-qemu -- test -w /dev/kvm 2>/dev/null; then
        export TIDEGATE_VAGRANT_QEMU=1
        step "KVM not usable here: using QEMU software emulation"
    fi
fi
trap 'step "destroying"; vagrant destroy -f >/dev/null 2>&1 || true' EXIT
if ! vagrant box list 2>/dev/null | grep -q "^${TIDEGATE_BOX:-tidegate/debian12} "; then
    step "building the box"
    bash "${here}/build-box.sh"
fi
step "vagrant up edge"
vagrant up edge
step "vagrant up client"
vagrant up client
step "edge status over the forwarded gRPC port"
"${tg}" status
step "legitimate stream and spoofed flood from the client (20 s)"
# shellcheck disable=SC2016
vagrant ssh client -c 'set -a; . /etc/default/tidegate-client; set +a; cd /opt/tidegate
  sudo .venv/bin/python -m tidegate.traffic --iface "$IFACE" --dst-mac "$EDGE_MAC" --dst-ip "$EDGE_IP" \
      --src "$(ip -o -4 addr show dev "$IFACE" | awk "{print \$4}" | cut -d/ -f1)" --dport 5555 --count 400 --pps 20 &
  sudo .venv/bin/python -m tidegate.traffic --iface "$IFACE" --dst-mac "$EDGE_MAC" --dst-ip "$EDGE_IP" \
      --src-net 198.18.0.0/16 --sources 20000 --dport 9 --count 40000 --pps 2000 --time-limit 20
  wait'
step "counters from the host"
"${tg}" -o json counters > "${here}/.e2e-counters.json"
python3 - "${here}/.e2e-counters.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
rules = {r["rule"]: r for r in c["rules"]}
app, sink = rules["app"], rules["sink"]
assert int(app["drop_packets"]) == 0 and int(app["pass_packets"]) >= 390, app
assert int(sink["drop_packets"]) > 0.5 * (int(sink["drop_packets"]) + int(sink["pass_packets"])), sink
print(f"vagrant-e2e: legit passed {app['pass_packets']}, flood dropped {sink['drop_packets']} of "
      f"{int(sink['drop_packets']) + int(sink['pass_packets'])}")
PY
step "apply and roll back from the host"
"${tg}" apply "${repo}/examples/too-tight.yaml" --force --no-guard --reason "vagrant e2e"
"${tg}" rollback --reason "vagrant e2e"
"${tg}" versions
step "done"
