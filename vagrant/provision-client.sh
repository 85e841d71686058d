#!/usr/bin/env bash
# Client VM: remember the edge's address and MAC for the traffic generator.
set -euo pipefail
edge_ip="$1"
iface="$(ip -o route get "${edge_ip}" | awk '{for (i = 1; i < NF; i++) if ($i == "dev") print $(i + 1)}')"
ping -c 2 -W 2 "${edge_ip}" >/dev/null || true
mac="$(ip neigh show "${edge_ip}" | awk '{print $5; exit}')"
[ -n "${mac}" ] || { echo "provision-client: cannot resolve the edge's MAC" >&2; exit 1; }
cat > /etc/default/tidegate-client <<ENV
EDGE_IP=${edge_ip}
EDGE_MAC=${mac}
IFACE=${iface}
ENV
echo "provision-client: edge ${edge_ip} (${mac}) via ${iface}"
