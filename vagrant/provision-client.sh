#!/usr/bin/env bash
# Client VM: wait for the edge (it is brought up first; this also covers a
# `vagrant up client` while the edge is still coming up), then remember the
# edge's address and MAC for the traffic generator.
set -euo pipefail
edge_ip="$1"
wait_s="${2:-600}"
iface="$(ip -o route get "${edge_ip}" | awk '{for (i = 1; i < NF; i++) if ($i == "dev") print $(i + 1)}')"
# the edge is ready when its agent's metrics port answers on the private
# network (the agent starts after the edge's whole provisioning)
deadline=$(( $(date +%s) + wait_s ))
until python3 -c 'import socket, sys; socket.create_connection((sys.argv[1], 9640), timeout=2).close()' "${edge_ip}" 2>/dev/null; do
    if [ "$(date +%s)" -ge "${deadline}" ]; then
        echo "provision-client: the edge's agent (${edge_ip}:9640) did not answer within ${wait_s} s: bring up edge first" >&2
        exit 1
    fi
    sleep 3
done
ping -c 2 -W 2 "${edge_ip}" >/dev/null || true
mac="$(ip neigh show "${edge_ip}" | awk '{print $5; exit}')"
[ -n "${mac}" ] || { echo "provision-client: cannot resolve the edge's MAC" >&2; exit 1; }
cat > /etc/default/tidegate-client <<ENV
EDGE_IP=${edge_ip}
EDGE_MAC=${mac}
IFACE=${iface}
ENV
echo "provision-client: edge ${edge_ip} (${mac}) via ${iface}"
