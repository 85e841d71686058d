#!/usr/bin/env bash
# Edge VM (the .deb installed by the Vagrantfile): run tidegate-agent@IFACE on
# the private NIC as the user tidegate, gRPC with mTLS on all addresses (the private address and, through the forwarded
# port, the host's loopback). The lab PKI was uploaded to /tmp/tidegate-pki
# by the Vagrantfile's file provisioners (made on the host by e2e.sh or
# `tidegate certs`); the admin client key never leaves the host.
set -euo pipefail
edge_ip="$1"
pki=/etc/tidegate/pki
iface="$(ip -o -4 addr show | awk -v ip="${edge_ip}" '$4 ~ "^"ip"/" {print $2; exit}')"
[ -n "${iface}" ] || { echo "provision-edge: no interface has ${edge_ip}" >&2; exit 1; }
install -d -m 0755 /etc/tidegate
# the agent runs as tidegate: it reads the server key through its group
install -d -m 0750 -g tidegate "${pki}"
for f in ca.pem server.pem roles.json probe.pem; do
    install -m 0644 "/tmp/tidegate-pki/${f}" "${pki}/${f}"
done
install -m 0640 -g tidegate /tmp/tidegate-pki/server.key "${pki}/server.key"
install -m 0600 /tmp/tidegate-pki/probe.key "${pki}/probe.key"
rm -rf /tmp/tidegate-pki
install -m 0644 /opt/tidegate/examples/lab.yaml /etc/tidegate/rules.yaml
cat > "/etc/tidegate/${iface}.env" <<ENV
# written by vagrant/provision-edge.sh (see /etc/tidegate/example.env)
LISTEN=0.0.0.0:50051
METRICS_LISTEN=0.0.0.0:9640
XDP_MODE=auto
RULES=/etc/tidegate/rules.yaml
EXTRA_ARGS=--sample-interval 1 --tls-cert ${pki}/server.pem --tls-key ${pki}/server.key --tls-client-ca ${pki}/ca.pem --role-map ${pki}/roles.json
ENV
systemctl enable "tidegate-agent@${iface}"
# restart, not start: a re-provision must pick up new certificates
systemctl restart "tidegate-agent@${iface}"
# the agent's own check, over mTLS on the private address, with the
# read-only probe certificate (the server certificate names the edge IP)
probe=(tidegate --server "${edge_ip}:50051" --timeout 5
       --ca "${pki}/ca.pem" --cert "${pki}/probe.pem" --key "${pki}/probe.key")
for _ in $(seq 120); do
    if "${probe[@]}" status >/dev/null 2>&1; then
        echo "provision-edge: agent serving mTLS on ${edge_ip}:50051, XDP on ${iface}"
        exit 0
    fi
    sleep 1
done
"${probe[@]}" status || true
journalctl -u "tidegate-agent@${iface}" --no-pager | tail -30
exit 1
