#!/usr/bin/env bash
# Build the tidegate/debian12 Vagrant box (libvirt) from Debian packages,
# for anyone without access to a box registry. Needs root, debootstrap,
# e2fsprogs and qemu-utils; about 3 minutes and ~250 MB.
#
# No partitions, no boot loader, no loop devices: debootstrap fills a
# directory, `mkfs.ext4 -d` turns it into a disk image, and the box boots
# its kernel directly (libvirt direct kernel boot, root=/dev/vda).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-${here}/boxes}"
name="${TIDEGATE_BOX:-tidegate/debian12}"
suite="${TIDEGATE_BOX_SUITE:-bookworm}"
mirror="${TIDEGATE_BOX_MIRROR:-http://deb.debian.org/debian}"
size="${TIDEGATE_BOX_SIZE:-8G}"
# Vagrant's well-known insecure public key: vagrant replaces it on first boot
insecure_key="ssh-rsa AAAAB3NzaC1yc2EAAAABIwAAAQEA6NF8iallvQVp22WDkTkyrtvp9eWW6A8YVr+kz4TjGYe7gHzIw+niNltGEFHzD8+v1I2YJ6oXevct1YeS0o9HZyN1Q9qgCgzUFtdOKLv6IedplqoPkcmF0aYet2PkEDo3MlTBckFXPITAMzF8dJSIFo9D8HfdOV0IAdx4O7PtixWKn5y2hMNG0zQPyUecp4pzC6kivAIhyfHilFR61RGL+GPXQ2MWZWFYbAGjyiYJnAmCP3NOTd0jMZEnDkbUvxhMmBYSdETk1rRgm+R4LOzFUGaHqHDLKLX+FIPKcF96hrucXzcWyLbIbEgE98OHlnVYCzRdK8jlqm8tehUc9c9WhQ== vagrant insecure public key"

say() { printf 'build-box: %s\n' "$*"; }
[ "$(id -u)" -eq 0 ] || { echo "build-box: run as root (debootstrap)" >&2; exit 1; }
for tool in debootstrap mkfs.ext4 qemu-img; do
    command -v "${tool}" >/dev/null || { echo "build-box: needs ${tool} (apt-get install debootstrap e2fsprogs qemu-utils)" >&2; exit 1; }
done

work="$(mktemp -d /var/tmp/tidegate-box.XXXXXX)"
trap 'rm -rf "${work}"' EXIT
root="${work}/root"

say "debootstrap ${suite} (a few minutes)"
debootstrap --variant=minbase \
    --include=linux-image-amd64,systemd-sysv,udev,openssh-server,sudo,iproute2,iputils-ping,ca-certificates,rsync,python3,kmod,procps,ifupdown,isc-dhcp-client \
    "${suite}" "${root}" "${mirror}" >"${work}/debootstrap.log"

say "configuring the vagrant user, ssh and networking"
echo "tidegate-box" >"${root}/etc/hostname"
cat >"${root}/etc/fstab" <<FSTAB
/dev/vda / ext4 defaults,errors=remount-ro 0 1
FSTAB
cat >"${root}/etc/network/interfaces" <<NET
auto lo
iface lo inet loopback
allow-hotplug ens5
iface ens5 inet dhcp
allow-hotplug eth0
iface eth0 inet dhcp
NET
chroot "${root}" useradd -m -s /bin/bash -G sudo vagrant
echo "vagrant:vagrant" | chroot "${root}" chpasswd
echo "vagrant ALL=(ALL) NOPASSWD:ALL" >"${root}/etc/sudoers.d/vagrant"
chmod 0440 "${root}/etc/sudoers.d/vagrant"
install -d -m 0700 -o 1000 -g 1000 "${root}/home/vagrant/.ssh"
echo "${insecure_key}" >"${root}/home/vagrant/.ssh/authorized_keys"
chown 1000:1000 "${root}/home/vagrant/.ssh/authorized_keys"
chmod 0600 "${root}/home/vagrant/.ssh/authorized_keys"
echo "UseDNS no" >>"${root}/etc/ssh/sshd_config"
rm -f "${root}"/etc/ssh/ssh_host_*
cat >"${root}/etc/systemd/system/ssh-keygen.service" <<UNIT
[Unit]
Description=Generate SSH host keys on first boot
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key
[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A
[Install]
WantedBy=multi-user.target
UNIT
chroot "${root}" systemctl enable ssh-keygen.service >/dev/null 2>&1
chroot "${root}" apt-get clean

kernel="$(find "${root}/boot" -name 'vmlinuz-*' | sort -V | tail -1)"
initrd="$(find "${root}/boot" -name 'initrd.img-*' | sort -V | tail -1)"
if [ -z "${kernel}" ] || [ -z "${initrd}" ]; then echo "build-box: no kernel in the image" >&2; exit 1; fi

say "making the disk image (${size})"
mkdir -p "${work}/box"
cp "${kernel}" "${work}/box/vmlinuz"
cp "${initrd}" "${work}/box/initrd.img"
mkfs.ext4 -q -L root -d "${root}" "${work}/root.raw" "${size}"
qemu-img convert -O qcow2 "${work}/root.raw" "${work}/box/box.img"
vsize="$(qemu-img info --output=json "${work}/box/box.img" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"] // 2**30)')"
cat >"${work}/box/metadata.json" <<META
{"provider": "libvirt", "format": "qcow2", "virtual_size": ${vsize}}
META
cat >"${work}/box/Vagrantfile" <<'VF'
# Direct kernel boot: qemu runs as libvirt's own user, which cannot read
# ~/.vagrant.d of the user who added the box, so the kernel and initrd are
# copied next to libvirt's images first.
require "fileutils"
boot = "/var/lib/libvirt/boot/tidegate-debian12"
%w[vmlinuz initrd.img].each do |f|
  src = File.expand_path(f, __dir__)
  dst = File.join(boot, f)
  begin
    FileUtils.mkdir_p(boot)
    FileUtils.cp(src, dst) unless File.exist?(dst) && File.size(dst) == File.size(src)
    File.chmod(0o644, dst)
  rescue SystemCallError => e
    warn "tidegate box: cannot copy #{f} to #{boot} (#{e.message}); run vagrant as root or copy it by hand"
  end
end
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    lv.kernel = File.join(boot, "vmlinuz")
    lv.initrd = File.join(boot, "initrd.img")
    lv.cmd_line = "root=/dev/vda rw console=ttyS0 net.ifnames=0"
    lv.disk_bus = "virtio"
  end
end
VF
mkdir -p "${out}"
box="${out}/tidegate-debian12.box"
tar -C "${work}/box" -czf "${box}" metadata.json Vagrantfile box.img vmlinuz initrd.img
say "built ${box} ($(du -h "${box}" | cut -f1))"
if command -v vagrant >/dev/null; then
    vagrant box add --force --name "${name}" "${box}" >/dev/null
    say "added as ${name}"
fi
