#!/usr/bin/env bash
# tidegate set-up for a plain Debian/Ubuntu host, as root. Idempotent: run it
# again at any time. The Vagrant VMs provision with this same script.
#
#   TIDEGATE_VENV=DIR          venv location (default: <repo>/.venv)
#   TIDEGATE_NO_PROMETHEUS=1   skip the Prometheus server (edge hosts)
#   TIDEGATE_MINIMAL=1         skip developer/test tools (shellcheck, tcpdump)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TIDEGATE_VENV:-${root}/.venv}"
export DEBIAN_FRONTEND=noninteractive

say() { printf 'install: %s\n' "$*"; }
die() { printf 'install: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (BPF, kernel headers and packages need it): sudo make install"
command -v apt-get >/dev/null || die "this script supports Debian/Ubuntu (apt-get not found)"

apt_updated=0
apt_update() {
    if [ "${apt_updated}" -eq 0 ]; then
        say "apt-get update"
        apt-get update -qq
        apt_updated=1
    fi
}
# refresh package lists once if they are missing or older than a day
if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -mmin -1440 2>/dev/null | head -1)" ]; then
    apt_update
fi

has_candidate() {
    local c
    c="$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}')"
    [ -n "${c}" ] && [ "${c}" != "(none)" ]
}

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

apt_install() {
    local missing=()
    local p
    for p in "$@"; do
        installed "${p}" || missing+=("${p}")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    for p in "${missing[@]}"; do
        if ! has_candidate "${p}"; then
            apt_update
            break
        fi
    done
    say "apt-get install ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

optional_install() {
    local p
    for p in "$@"; do
        if has_candidate "${p}"; then
            apt_install "${p}"
        else
            say "note: package ${p} not available here, skipped"
        fi
    done
}

# --- system packages --------------------------------------------------------
apt_install python3 python3-venv python3-pip python3-bpfcc iproute2 nftables iptables \
    ca-certificates kmod
# shell completion for the tidegate command (the venv sees it, like bcc)
apt_install python3-argcomplete
# the fleet's engine: etcdctl for operators, etcd itself for the fleet tests (they start their own
# members on free loopback ports) and for a lab's single-member fleet
apt_install etcd-client etcd-server
optional_install netsniff-ng xdp-tools bpftool
if [ "${TIDEGATE_MINIMAL:-0}" != "1" ]; then
    # developer and CI tools: lint, captures, `vagrant validate`, the VM box builder
    optional_install shellcheck tcpdump vagrant vagrant-libvirt debootstrap qemu-utils
    # the rule-set JSON Schema's tests, and `make deb`'s package check
    optional_install python3-jsonschema lintian
fi
if [ "${TIDEGATE_NO_PROMETHEUS:-0}" != "1" ]; then
    optional_install prometheus
    # tests start their own Prometheus on a free loopback port
    if [ -d /run/systemd/system ] && systemctl is-enabled prometheus >/dev/null 2>&1; then
        say "disabling the distribution's prometheus service (tidegate's tests run their own)"
        systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
fi

# --- kernel headers for BCC -------------------------------------------------
kver="$(uname -r)"
moddir="/lib/modules/${kver}"
headers_ok() { [ -e "${moddir}/build/Makefile" ] || [ -e "${moddir}/build/include/generated/autoconf.h" ]; }
if headers_ok; then
    say "kernel headers for ${kver}: present"
elif has_candidate "linux-headers-${kver}"; then
    apt_install "linux-headers-${kver}"
else
    # a kernel without a headers package of its own (custom or cloud kernels):
    # link the distribution's generic headers, which BCC accepts
    arch="$(dpkg --print-architecture)"
    generic="linux-headers-${arch}"
    if grep -qi ubuntu /etc/os-release 2>/dev/null; then
        generic="linux-headers-generic"
    fi
    apt_install "${generic}"
    build="$(find /usr/src -maxdepth 1 -type d -name "linux-headers-*-${arch}" | sort -V | tail -1)"
    if [ -z "${build}" ]; then
        build="$(find /usr/src -maxdepth 1 -type d -name 'linux-headers-*-generic' | sort -V | tail -1)"
    fi
    [ -n "${build}" ] || die "no kernel headers found under /usr/src after installing ${generic}"
    common="${build%-"${arch}"}-common"
    [ -d "${common}" ] || common="${build}"
    mkdir -p "${moddir}"
    ln -sfn "${build}" "${moddir}/build"
    ln -sfn "${common}" "${moddir}/source"
    say "kernel ${kver} has no headers package: linked ${build##*/} into ${moddir}/{build,source}"
fi

# --- bpffs ------------------------------------------------------------------
if ! awk '$2 == "/sys/fs/bpf" && $3 == "bpf" {found=1} END {exit !found}' /proc/mounts; then
    say "mounting bpffs on /sys/fs/bpf"
    mkdir -p /sys/fs/bpf
    mount -t bpf bpf /sys/fs/bpf
fi

# --- Python venv --------------------------------------------------------------
# Debian's Python has bcc (python3-bpfcc); the venv sees it through
# --system-site-packages and takes everything else from PyPI.
if [ ! -x "${venv}/bin/python" ]; then
    say "creating venv ${venv}"
    /usr/bin/python3 -m venv --system-site-packages "${venv}"
fi
say "installing tidegate (editable) and its Python dependencies"
"${venv}/bin/python" -m pip install -q --upgrade pip >/dev/null
"${venv}/bin/python" -m pip install -q -e "${root}[test]"

# --- generated gRPC code ------------------------------------------------------
bash "${root}/scripts/gen_proto.sh" "${venv}/bin/python"

# --- check ------------------------------------------------------------------
"${venv}/bin/python" - <<'PY' || die "the installed environment does not work (see above)"
import sys
import bcc, grpc, yaml, pyroute2, prometheus_client, scapy, numpy  # noqa: F401
from bcc import BPF
try:
    BPF(text=b"int f(void *ctx) { return 0; }")
except Exception as e:
    sys.exit(f"BCC cannot compile a BPF program ({e}); kernel headers are probably broken")
print("install: check ok: bcc compiles, Python dependencies import")
PY
say "done. Run the tests with: make test    (the CLI is ${venv}/bin/tidegate)"
