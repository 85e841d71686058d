#!/usr/bin/env bash
# A clean Debian root for the package test (tests/package/test_deb.py).
# `clean-root.sh cache` makes (once) a tarball of a minimal bookworm root made
# with debootstrap, plus the package's Debian dependencies and systemd, so a
# test run installs only tidegate itself; `clean-root.sh fresh DIR` unpacks
# it into DIR. Needs root and debootstrap; the first run takes minutes and
# downloads ~300 MB, later runs unpack the cache in seconds.
set -euo pipefail
suite="${TIDEGATE_ROOT_SUITE:-bookworm}"
mirror="${TIDEGATE_ROOT_MIRROR:-http://deb.debian.org/debian}"
cache="${TIDEGATE_ROOT_CACHE:-/var/cache/tidegate-test/${suite}-root.tar}"
arch="$(dpkg --print-architecture)"
# what debian/control's Depends pulls in, installed ahead into the cache
deps=(python3 python3-bpfcc iproute2 adduser "linux-headers-${arch}" systemd)

make_cache() {
    [ -s "${cache}" ] && return 0
    mkdir -p "$(dirname "${cache}")"
    work="$(mktemp -d /var/tmp/tidegate-root.XXXXXX)"
    trap 'umount -R "${work}/root/proc" 2>/dev/null || true; rm -rf "${work}"' EXIT
    debootstrap --variant=minbase "${suite}" "${work}/root" "${mirror}" >"${work}/debootstrap.log" 2>&1 \
        || { tail -20 "${work}/debootstrap.log" >&2; exit 1; }
    mount -t proc proc "${work}/root/proc"
    chroot "${work}/root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${deps[@]}" >"${work}/deps.log" 2>&1 || { tail -20 "${work}/deps.log" >&2; exit 1; }
    chroot "${work}/root" apt-get clean
    umount "${work}/root/proc"
    tar -C "${work}/root" -cf "${cache}.tmp" . && mv "${cache}.tmp" "${cache}"
}

case "${1:-}" in
    cache) make_cache ;;
    fresh) make_cache; mkdir -p "$2"; tar -C "$2" -xf "${cache}" ;;
    *) echo "usage: clean-root.sh cache | fresh DIR" >&2; exit 2 ;;
esac
