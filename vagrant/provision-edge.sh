#!/usr/bin/env bash
# Edge VM: run the agent as a systemd service on the private NIC, gRPC on
# all addresses for the forwarded port (--insecure: the VM network is
# host-only; use the mTLS flags in /etc/default/tidegate beyond a lab).
set -euo pipefail
edge_ip="$1"
iface="$(ip -o -4 addr show | awk -v ip="${edge_ip}" '$4 ~ "^"ip"/" {print $2; exit}')"
[ -n "${iface}" ] || { echo "provision-edge: no interface has ${edge_ip}" >&2; exit 1; }
install -d -m 0755 /etc/tidegate
install -m 0644 /opt/tidegate/examples/lab.yaml /etc/tidegate/rules.yaml
cat > /etc/default/tidegate <<ENV
INTERFACE=${iface}
LISTEN=0.0.0.0:50051
METRICS_LISTEN=0.0.0.0:9640
XDP_MODE=auto
EXTRA_ARGS=--rules /etc/tidegate/rules.yaml --insecure --auth none --sample-interval 1
ENV
install -m 0644 /opt/tidegate/deploy/tidegate-agent.service /etc/systemd/system/tidegate-agent.service
systemctl daemon-reload
systemctl enable --now tidegate-agent
for _ in $(seq 60); do
    if /opt/tidegate/.venv/bin/tidegate --server 127.0.0.1:50051 status >/dev/null 2>&1; then
        echo "provision-edge: agent serving on ${iface}"
        exit 0
    fi
    sleep 1
done
journalctl -u tidegate-agent --no-pager | tail -30
exit 1
