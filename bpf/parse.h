/* Packet parsing: Ethernet, up to two 802.1Q/802.1ad tags, IPv4, IPv6 (and
 * up to TG_IPV6_EXT_MAX extension headers). Only the source address (fixed
 * header), the L4 protocol and the destination port are extracted. Anything
 * not readable returns -1 and the caller passes it, counted as "unparsed";
 * an IPv6 packet whose extension chain is longer is marked ext_unparsed. */
#ifndef TIDEGATE_PARSE_H
#define TIDEGATE_PARSE_H

#define TG_ETH_P_IP 0x0800
#define TG_ETH_P_IPV6 0x86DD
#define TG_ETH_P_8021Q 0x8100
#define TG_ETH_P_8021AD 0x88A8
#define TG_IPV6_EXT_MAX 8

struct tg_pkt {
	__u64 addr_hi;
	__u64 addr_lo;
	__u32 len;
	__u16 dport;
	__u8 proto;
	__u8 family;
	__u8 has_port;
	__u8 ext_unparsed;   /* IPv6: the extension chain was not walked to its end */
};

struct tg_vlan_hdr {
	__be16 tci;
	__be16 proto;
};

static __always_inline int tg_is_vlan(__be16 proto)
{
	return proto == bpf_htons(TG_ETH_P_8021Q) || proto == bpf_htons(TG_ETH_P_8021AD);
}

static __always_inline void tg_l4(struct tg_pkt *p, void *l4, void *end, int first_fragment)
{
	if (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP)
		return;
	/* Non-first fragments carry no L4 header; they still match on the
	 * source address and on rules without port lists. */
	if (!first_fragment)
		return;
	__be16 *ports = l4;
	if ((void *)(ports + 2) > end)
		return;
	p->dport = bpf_ntohs(ports[1]);
	p->has_port = 1;
}

/* The IPv6 extension header types (IANA), but ESP (50): what follows ESP
 * is encrypted, so ESP is the packet's protocol as far as rules go. */
static __always_inline int tg_is_ipv6_ext(__u8 nh)
{
	return nh == 0 || nh == 43 || nh == 44 || nh == 51 || nh == 60 || nh == 135 || nh == 139 ||
	       nh == 140 || nh == 253 || nh == 254;
}

/* A 16-bit value as a number the verifier does not know: it goes through
 * a stack slot in a way the verifier keeps no value for (a 2-byte store at
 * a slot's byte 2: it tracks aligned spills only), and comes back masked.
 * At run time, for a value within the mask, nothing changes. The verifier
 * then sees any value within the mask, so the ways through the program
 * that left it different constants meet again: an offset in
 * tg_parse_ipv6_ext, the protocol in tidegate.c. */
#define TG_OFF_MAX 0x7fff
static __always_inline __u32 tg_opaque(__u32 x, __u32 mask)
{
	__u64 slot = 0;
	volatile __u16 *half = (volatile __u16 *)&slot + 1;
	/* the slot's address escapes, so the compiler keeps it whole (an
	 * aligned 8-byte slot) and stores at its byte 2 */
	asm volatile("" : : "r"(&slot) : "memory");
	*half = (__u16)x;
	return *half & mask;
}

/* An offset within the packet, at most TG_OFF_MAX (below it the mask
 * changes nothing), as a number the verifier does not know. */
static __always_inline __u32 tg_opaque_offset(__u32 off)
{
	return tg_opaque(off, TG_OFF_MAX);
}

static __always_inline int tg_parse_ipv6_ext(struct tg_pkt *p, void *data, void *end, __u32 *offp)
{
	/* Walk at most TG_IPV6_EXT_MAX extension headers, from offset *offp,
	 * to the L4 header (its offset back in *offp). A longer (or truncated)
	 * chain leaves an extension type in p->proto: the packet is marked
	 * ext_unparsed and the rule set's ipv6_unparsed_extensions policy
	 * decides it, so a port rule cannot be dodged by stacking headers.
	 *
	 * Each step reads its header at an offset the verifier does not know
	 * (tg_opaque_offset). The verifier keeps a packet pointer's constant
	 * offset in its state (a fragment header adds 8, a VLAN tag 4), so
	 * every sequence of header kinds was a state of its own: the verifier
	 * walked 360,722 instructions for the whole program, where it walks
	 * 184,957 now, half the time of every load (bench/compile_time.py, on
	 * kernel 6.18). From an unknown offset the ways through each step meet
	 * again, and the verdicts are the same (tests/kernel/
	 * test_ipv6_ext_policy.py, a walk written out in Python). The offset
	 * never exceeds TG_OFF_MAX: 14 + 2 x 4 + 40 bytes of headers, then
	 * each step adds at most 2,048. Only packets with an extension header
	 * come here; a step costs them a store and a load. */
	int first = 1;
	__u32 off = *offp;
#pragma unroll
	for (int i = 0; i < TG_IPV6_EXT_MAX; i++) {
		__u8 nh = p->proto;
		off = tg_opaque_offset(off);
		__u8 *h = data + off;
		if (nh == 44) {
			if ((void *)(h + 8) > end)
				break;
			p->proto = h[0];
			__u16 fo = ((__u16)h[2] << 8 | h[3]) & 0xfff8;
			if (fo)
				first = 0;
			off += 8;
		} else if (tg_is_ipv6_ext(nh)) {
			if ((void *)(h + 2) > end)
				break;
			p->proto = h[0];
			/* AH counts 4-octet units minus 2, the others 8-octet units minus 1 */
			off += nh == 51 ? ((__u32)h[1] + 2) * 4 : ((__u32)h[1] + 1) * 8;
		} else {
			break;
		}
	}
	p->ext_unparsed = tg_is_ipv6_ext(p->proto);
	*offp = tg_opaque_offset(off);
	return first;
}

static __always_inline int tg_parse(void *data, void *end, struct tg_pkt *p)
{
	struct ethhdr *eth = data;
	p->len = (__u32)(end - data);
	if ((void *)(eth + 1) > end)
		return -1;
	__be16 proto = eth->h_proto;
	void *cur = eth + 1;
	__u32 off = sizeof(*eth);  /* cur's offset, for tg_parse_ipv6_ext */
#pragma unroll
	for (int i = 0; i < 2; i++) {
		if (tg_is_vlan(proto)) {
			struct tg_vlan_hdr *vh = cur;
			if ((void *)(vh + 1) > end)
				return -1;
			proto = vh->proto;
			cur = vh + 1;
			off += sizeof(*vh);
		}
	}
	if (proto == bpf_htons(TG_ETH_P_IP)) {
		struct iphdr *ip = cur;
		if ((void *)(ip + 1) > end)
			return -1;
		if (ip->version != 4 || ip->ihl < 5)
			return -1;
		p->family = 4;
		p->addr_hi = 0;
		/* ::ffff:a.b.c.d as loaded little-endian from bytes 8..15 */
		p->addr_lo = 0xffff0000ULL | ((__u64)ip->saddr << 32);
		p->proto = ip->protocol;
		int first = (ip->frag_off & bpf_htons(0x1fff)) == 0;
		tg_l4(p, cur + ip->ihl * 4, end, first);
		return 0;
	}
	if (proto == bpf_htons(TG_ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = cur;
		if ((void *)(ip6 + 1) > end)
			return -1;
		p->family = 6;
		__builtin_memcpy(&p->addr_hi, &ip6->saddr, 8);
		__builtin_memcpy(&p->addr_lo, (__u8 *)&ip6->saddr + 8, 8);
		p->proto = ip6->nexthdr;
		if (!tg_is_ipv6_ext(p->proto)) {
			tg_l4(p, ip6 + 1, end, 1);  /* no extension header: most packets */
			return 0;
		}
		off += sizeof(*ip6);
		int first = tg_parse_ipv6_ext(p, data, end, &off);
		tg_l4(p, data + off, end, first);
		return 0;
	}
	return -1;
}

#endif
