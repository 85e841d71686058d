#!/usr/bin/env bash
# The scripted VM test (`make vagrant-e2e`), as root on a Debian host:
# install what the host lacks (libvirt, QEMU, vagrant-libvirt, debootstrap),
# start libvirt, make a lab PKI, build the box if missing, bring up edge then
# client, flood from the client, check from the host over gRPC (mTLS) and
# /metrics that the edge drops the flood and passes the steady stream, apply
# and roll back a rule set from the host, destroy. Prints the time each step
# took, and a summary at the end.
#
#   TIDEGATE_VAGRANT_QEMU=1   force QEMU software emulation (default: when KVM is unusable)
#   TIDEGATE_E2E_KEEP=1       leave the VMs running (no destroy) to look around
#   TIDEGATE_E2E_NO_INSTALL=1 do not apt-get install missing host packages
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "${here}/.." && pwd)"
tg="${repo}/.venv/bin/tidegate"
edge_ip="${TIDEGATE_EDGE_IP:-192.168.121.10}"
grpc_port="${TIDEGATE_GRPC_PORT:-50051}"
metrics_port="${TIDEGATE_METRICS_PORT:-9640}"
box="${TIDEGATE_BOX:-tidegate/debian12}"
# lab PKI and scratch files: under vagrant/.vagrant/ (git-ignored, never
# rsynced into the VMs)
work="${here}/.vagrant"
export TIDEGATE_PKI="${TIDEGATE_PKI:-${work}/pki}"
export TIDEGATE_SERVER="127.0.0.1:${grpc_port}"
export TIDEGATE_AUTHOR="vagrant-e2e"
export LIBVIRT_DEFAULT_URI="qemu:///system"

start=$(date +%s)
step_names=()
step_times=()
step() {
    local now
    now=$(date +%s)
    step_names+=("$*")
    step_times+=("${now}")
    printf 'vagrant-e2e: [%4ss] %s\n' "$(( now - start ))" "$*"
}
summary() {
    local end i n t
    end=$(date +%s)
    n=${#step_names[@]}
    echo "vagrant-e2e: timings"
    for (( i = 0; i < n; i++ )); do
        if (( i + 1 < n )); then t=${step_times[i + 1]}; else t=${end}; fi
        printf 'vagrant-e2e:   %5ss  %s\n' "$(( t - step_times[i] ))" "${step_names[i]}"
    done
    printf 'vagrant-e2e:   %5ss  total\n' "$(( end - start ))"
}
die() { echo "vagrant-e2e: error: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (libvirt's system instance, the box build, the kernel copy)"
[ -x "${tg}" ] || die "no ${tg}: run make install first"

# --- host packages -----------------------------------------------------------
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
host_pkgs=(libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils dnsmasq-base ebtables iptables
           vagrant vagrant-libvirt debootstrap e2fsprogs rsync openssh-client curl)
missing=()
for p in "${host_pkgs[@]}"; do installed "${p}" || missing+=("${p}"); done
if [ ${#missing[@]} -gt 0 ]; then
    [ "${TIDEGATE_E2E_NO_INSTALL:-0}" != "1" ] || die "missing host packages: ${missing[*]}"
    step "installing host packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- libvirt -------------------------------------------------------------------
step "starting libvirt"
if [ "$(ps -p 1 -o comm=)" = "systemd" ]; then
    systemctl start virtlogd.socket libvirtd.service
else
    # no systemd (containers, sandboxes): start the daemons by hand
    if ! pgrep -x virtlogd >/dev/null; then virtlogd -d; fi
    if ! pgrep -x libvirtd >/dev/null; then libvirtd -d; fi
fi
for _ in $(seq 30); do
    virsh version >/dev/null 2>&1 && break
    sleep 1
done
virsh version >/dev/null || die "libvirtd does not answer on ${LIBVIRT_DEFAULT_URI}"

# hardware virtualisation may exist but be unusable by libvirt's qemu user:
# fall back to QEMU software emulation (slower, works everywhere)
if [ -z "${TIDEGATE_VAGRANT_QEMU:-}" ]; then
    if ! [ -e /dev/kvm ] || ! runuser -u libvirt-qemu -- test -w /dev/kvm 2>/dev/null; then
        export TIDEGATE_VAGRANT_QEMU=1
        step "KVM not usable by libvirt-qemu here: using QEMU software emulation"
    fi
fi

# --- from here on, whatever happens: destroy the VMs ---------------------------
finish() {
    local rc=$?
    set +e
    if [ "${rc}" -ne 0 ]; then
        echo "vagrant-e2e: FAILED (exit ${rc}); the edge's agent log:" >&2
        timeout 60 vagrant ssh edge -c "sudo journalctl -u 'tidegate-agent@*' --no-pager | tail -40" 2>/dev/null >&2
    fi
    if [ "${TIDEGATE_E2E_KEEP:-0}" = "1" ]; then
        step "keeping the VMs (TIDEGATE_E2E_KEEP=1): cd vagrant && vagrant destroy -f"
    else
        step "vagrant destroy"
        vagrant destroy -f >"${work}/destroy.log" 2>&1 || { echo "vagrant-e2e: vagrant destroy failed:" >&2; cat "${work}/destroy.log" >&2; }
        local left
        left="$(virsh list --all --name 2>/dev/null | grep '^tidegate-' || true)"
        [ -z "${left}" ] || echo "vagrant-e2e: warning: domains left: ${left}" >&2
        left="$(virsh net-list --all --name 2>/dev/null | grep '^tidegate-' || true)"
        [ -z "${left}" ] || echo "vagrant-e2e: warning: networks left: ${left}" >&2
    fi
    summary
    if [ "${rc}" -eq 0 ]; then echo "vagrant-e2e: PASSED"; fi
    exit "${rc}"
}
cd "${here}"
mkdir -p "${work}"
trap finish EXIT

# --- lab PKI (fresh each run) --------------------------------------------------
step "lab PKI: CA, server certificate for ${edge_ip} and 127.0.0.1, admin and probe clients"
rm -rf "${TIDEGATE_PKI}"
"${tg}" certs --out "${TIDEGATE_PKI}" --server-name "${edge_ip}" --client admin --role admin >"${work}/certs.log" 2>&1 ||
    { cat "${work}/certs.log" >&2; die "tidegate certs failed"; }
"${tg}" certs --out "${TIDEGATE_PKI}" --server-name "${edge_ip}" --client probe --role read >>"${work}/certs.log" 2>&1 ||
    { cat "${work}/certs.log" >&2; die "tidegate certs failed"; }
export TIDEGATE_CA="${TIDEGATE_PKI}/ca.pem" TIDEGATE_CERT="${TIDEGATE_PKI}/admin.pem" TIDEGATE_KEY="${TIDEGATE_PKI}/admin.key"

# --- box and VMs ---------------------------------------------------------------
if ! vagrant box list 2>/dev/null | grep -q "^${box} "; then
    step "building the box"
    bash "${here}/build-box.sh"
fi
step "make deb (the edge installs the package)"
make -C "${repo}" deb >"${work}/deb.log" 2>&1 || { tail -20 "${work}/deb.log" >&2; die "make deb failed"; }
step "vagrant up edge"
vagrant up edge
step "vagrant up client"
vagrant up client

# --- checks from the host ------------------------------------------------------
step "edge status over the forwarded gRPC port (mTLS)"
"${tg}" status
if env -u TIDEGATE_CERT -u TIDEGATE_KEY "${tg}" --timeout 10 status >/dev/null 2>&1; then
    die "the agent answered a client without a certificate"
fi
if env -u TIDEGATE_CA -u TIDEGATE_CERT -u TIDEGATE_KEY TIDEGATE_TOKEN=none "${tg}" --timeout 10 status >/dev/null 2>&1; then
    die "the agent answered a plaintext client"
fi
echo "vagrant-e2e: refused without a client certificate and in plaintext, as it should"

step "legitimate stream and spoofed flood from the client (20 s)"
# traffic stays on the private network between the two VMs: the steady
# stream from the client's own address, the flood from 198.18.0.0/16
# (benchmarking range) addressed to the edge's private IP and MAC
# shellcheck disable=SC2016
vagrant ssh client -c 'set -a; . /etc/default/tidegate-client; set +a; cd /opt/tidegate
  sudo .venv/bin/python -m tidegate.lab.traffic --iface "$IFACE" --dst-mac "$EDGE_MAC" --dst-ip "$EDGE_IP" \
      --src "$(ip -o -4 addr show dev "$IFACE" | awk "{print \$4}" | cut -d/ -f1)" --dport 5555 --count 400 --pps 20 &
  sudo .venv/bin/python -m tidegate.lab.traffic --iface "$IFACE" --dst-mac "$EDGE_MAC" --dst-ip "$EDGE_IP" \
      --src-net 198.18.0.0/16 --sources 20000 --dport 9 --count 40000 --pps 2000 --time-limit 20
  wait'

step "counters from the host over gRPC"
"${tg}" -o json counters > "${work}/e2e-counters.json"
python3 - "${work}/e2e-counters.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
rules = {r["rule"]: r for r in c["rules"]}
app, sink = rules["app"], rules["sink"]
assert int(app["drop_packets"]) == 0 and int(app["pass_packets"]) >= 390, app
assert int(sink["drop_packets"]) > 0.5 * (int(sink["drop_packets"]) + int(sink["pass_packets"])), sink
print(f"vagrant-e2e: legit passed {app['pass_packets']} (dropped {app['drop_packets']}), flood dropped "
      f"{sink['drop_packets']} of {int(sink['drop_packets']) + int(sink['pass_packets'])}")
PY

step "metrics from the host through the forwarded port"
curl -fsS --max-time 20 "http://127.0.0.1:${metrics_port}/metrics" > "${work}/e2e-metrics.txt"
python3 - "${work}/e2e-metrics.txt" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
def total(name, **labels):
    s = 0.0
    for m in re.finditer(r"^%s\{([^}]*)\} (\S+)$" % re.escape(name), text, re.M):
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if all(got.get(k) == v for k, v in labels.items()):
            s += float(m.group(2))
    return s
sink_drop = total("tidegate_rule_packets_total", rule="sink", verdict="drop")
sink_reasons = total("tidegate_rule_drops_total", rule="sink")
app_drop = total("tidegate_rule_packets_total", rule="app", verdict="drop")
app_pass = total("tidegate_rule_packets_total", rule="app", verdict="pass")
assert sink_drop > 0 and sink_reasons > 0, (sink_drop, sink_reasons)
assert app_drop == 0 and app_pass >= 390, (app_drop, app_pass)
print(f"vagrant-e2e: /metrics: sink drops {sink_drop:.0f} (by reason {sink_reasons:.0f}), "
      f"app passes {app_pass:.0f}, app drops {app_drop:.0f}")
PY

step "apply and roll back from the host (mTLS, admin)"
"${tg}" apply "${repo}/examples/too-tight.yaml" --force --no-guard --reason "vagrant e2e"
"${tg}" rollback --reason "vagrant e2e"
"${tg}" versions
"${tg}" -o json versions > "${work}/e2e-versions.json"
python3 - "${work}/e2e-versions.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))
active = [int(r["number"]) for r in rows if r["active"]]
last = max(rows, key=lambda r: int(r["number"]))
assert len(rows) >= 2 and active and active[0] != int(last["number"]), rows
# the change is recorded under the identity of the client certificate
assert last["author"].startswith("cert:admin"), last
print(f"vagrant-e2e: {len(rows)} versions, v{last['number']} applied by {last['author']!r} "
      f"and rolled back, v{active[0]} active")
PY
step "done"
