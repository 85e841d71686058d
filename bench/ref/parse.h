/* The parsing every row above "bare drop" shares: Ethernet, up to two VLAN
 * tags, IPv4 or IPv6, the source address as a 16-byte key (IPv4 in the
 * first four bytes, the rest zero). Returns 0 when parsed, -1 otherwise. */
#ifndef BENCH_PARSE_H
#define BENCH_PARSE_H

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>

struct src_key {
	__u64 hi;
	__u64 lo;
};

struct vlan_hdr_ {
	__be16 tci;
	__be16 proto;
};

static __always_inline int parse_source(void *data, void *end, struct src_key *k)
{
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return -1;
	__be16 proto = eth->h_proto;
	void *cur = eth + 1;
#pragma unroll
	for (int i = 0; i < 2; i++) {
		if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD)) {
			struct vlan_hdr_ *vh = cur;
			if ((void *)(vh + 1) > end)
				return -1;
			proto = vh->proto;
			cur = vh + 1;
		}
	}
	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = cur;
		if ((void *)(ip + 1) > end)
			return -1;
		k->hi = ip->saddr;
		k->lo = 0;
		return 0;
	}
	if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = cur;
		if ((void *)(ip6 + 1) > end)
			return -1;
		__builtin_memcpy(k, &ip6->saddr, 16);
		return 0;
	}
	return -1;
}

#endif
