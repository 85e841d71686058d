"""The Blocklist gRPC service (`tidegate deny add|remove|list`): a thin
adapter on changes.blocklist.Blocklist; authorization, admission and error
mapping are the Filter service's (FilterService._run)."""

from __future__ import annotations

from tidegate.api.service import FilterService, estimate_pb
from tidegate.changes.blocklist import Blocklist, network
from tidegate.v1 import blocklist_pb2 as bpb
from tidegate.v1 import blocklist_pb2_grpc as bpbg


class BlocklistService(bpbg.BlocklistServicer):
    def __init__(self, filter_service: FilterService, blocklist: Blocklist):
        self.filter_service = filter_service
        self.blocklist = blocklist

    def DenyAdd(self, request, context):
        def fn(c):
            out, expires = self.blocklist.add(request.cidr, request.ttl_seconds, request.reason, c, request.force)
            return bpb.DenyChange(version=out.version, cidr=str(network(request.cidr)), expires=expires,
                                  estimate=estimate_pb(out.estimate))  # fmt: skip

        return self.filter_service._run(context, "DenyAdd", fn)

    def DenyRemove(self, request, context):
        def fn(c):
            out = self.blocklist.remove(request.cidr, request.reason, c)
            return bpb.DenyChange(version=out.version, cidr=str(network(request.cidr)))

        return self.filter_service._run(context, "DenyRemove", fn)

    def DenyList(self, request, context):
        def fn(c):
            version, entries = self.blocklist.entries()
            return bpb.DenyListResponse(active_version=version, entries=[
                bpb.DenyEntry(cidr=e["cidr"], expires=e["expires"], reason=e["reason"], author=e["author"],
                              added=e["added"], quick=e["quick"]) for e in entries])  # fmt: skip

        return self.filter_service._run(context, "DenyList", fn)


def register(server, filter_service: FilterService, blocklist: Blocklist) -> str:
    """Adds the Blocklist service to the server; returns its full name."""
    bpbg.add_BlocklistServicer_to_server(BlocklistService(filter_service, blocklist), server)
    return bpb.DESCRIPTOR.services_by_name["Blocklist"].full_name
