"""Serving the gRPC API: the Filter and Blocklist services behind the
admission interceptor, health (SERVING only while the filter is attached)
and reflection, on TLS or loopback."""

from __future__ import annotations

from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tidegate.access.auth import Authorizer
from tidegate.api import blocklist as blocklist_api
from tidegate.api.admission import MAX_MESSAGE_BYTES, SERVICE, Admission
from tidegate.api.readiness import FilterHealth
from tidegate.api.service import WORKERS, FilterService
from tidegate.changes.blocklist import Blocklist
from tidegate.v1 import tidegate_pb2 as pb
from tidegate.v1 import tidegate_pb2_grpc as pbg


def serve(agent, opts) -> grpc.Server:
    """`agent`: the daemon's parts (daemon/agent.py); sets its admission, health and block list."""
    admission = Admission(Authorizer.from_options(opts), agent.store, rate=getattr(opts, "read_call_rate", 1.0),
                          burst=getattr(opts, "read_call_burst", 10))  # fmt: skip
    agent.admission = admission  # metrics read its counts; the agent closes it (last summary rows) at stop
    # one message at most: a rule set at its size limit and the request's other fields, both ways; and a
    # fixed 256 KiB receive window a stream (no BDP probing, which grew it to megabytes): a refused caller's
    # body that is never read costs the agent that much buffering at most, not the whole message
    limits = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
              ("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 256 << 10)]  # fmt: skip
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=WORKERS), interceptors=[admission],
                         maximum_concurrent_rpcs=64, options=limits)  # fmt: skip
    service = FilterService(agent, admission)
    pbg.add_FilterServicer_to_server(service, server)
    agent.blocklist = Blocklist(agent.changes)
    blocklist_name = blocklist_api.register(server, service, agent.blocklist)  # tidegate deny add|remove|list
    agent.blocklist.start()
    # SERVING only while the filter is attached (readiness.py)
    agent.health = FilterHealth(agent.kf.program_attached, (SERVICE,))
    agent.changes.on_attached.append(agent.health.refresh)
    health_pb2_grpc.add_HealthServicer_to_server(agent.health, server)
    names = (pb.DESCRIPTOR.services_by_name["Filter"].full_name, blocklist_name, health.SERVICE_NAME,
             reflection.SERVICE_NAME)  # fmt: skip
    reflection.enable_server_reflection(names, server)
    tls = getattr(opts, "tls_material", None)
    if tls is None and opts.tls_cert:
        with open(opts.tls_key, "rb") as k, open(opts.tls_cert, "rb") as c, open(opts.tls_client_ca, "rb") as ca:
            tls = (k.read(), c.read(), ca.read())
    if tls is not None:
        key, cert, ca = tls
        # mutual TLS: a client without a certificate signed by the CA cannot connect
        creds = grpc.ssl_server_credentials(((key, cert),), root_certificates=ca, require_client_auth=True)
    try:
        port = server.add_secure_port(opts.listen, creds) if tls is not None else server.add_insecure_port(opts.listen)
    except RuntimeError:  # grpcio raises where older versions returned 0
        port = 0
    if not port:
        why = " with that TLS key and certificate (do they match? see the line above)" if tls is not None else ""
        raise SystemExit(f"tidegate agent: cannot listen on {opts.listen}{why}")
    server.start()
    return server
