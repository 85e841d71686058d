/* Not a row of the main table: one map lookup after the floor's parsing,
 * to price the pieces of tidegate's path with other layouts than the one it
 * uses (bench/packet_path.py fills the maps with the same entries tidegate
 * gets). -DPROBE=
 *   1  LPM trie, one key for both families: u32 prefixlen, u32 slot,
 *      16-byte address (IPv4 as ::ffff:a.b.c.d), 20 bytes of data compared
 *      per node
 *   2  LPM trie, IPv4 only: u32 prefixlen, u32 slot, u32 address (8 bytes):
 *      tidegate's tg_cidrs4
 *   3  LPM trie, IPv4 only, one trie per slot: u32 prefixlen, u32 address
 *   4  hash (slot, proto, port) -> rule mask
 *   5  array indexed by slot, proto class and port (inlined by the
 *      verifier): tidegate's tg_ports
 * IPv4 frames; probes 4-5 read the UDP/TCP destination port of an untagged
 * frame with a 20-byte IP header. The looked-up value feeds the verdict. */
#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include <linux/if_ether.h>
#include <linux/ip.h>

#ifndef PROBE
#define PROBE 1
#endif

#if PROBE == 1
struct probe_key { __u32 prefixlen; __u32 slot; __u64 hi; __u64 lo; };
BPF_LPM_TRIE(table, struct probe_key, __u64, 393216);
#elif PROBE == 2
struct probe_key { __u32 prefixlen; __u32 slot; __u32 addr; };
BPF_LPM_TRIE(table, struct probe_key, __u64, 393216);
#elif PROBE == 3
struct probe_key { __u32 prefixlen; __u32 addr; };
BPF_LPM_TRIE(table, struct probe_key, __u64, 131072);
#elif PROBE == 4
struct probe_key { __u8 slot; __u8 proto; __u16 port; };
BPF_HASH(table, struct probe_key, __u64, 24576);
#elif PROBE == 5
BPF_ARRAY(table, __u64, 3 * 2 * 65536);
#endif

int bench_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	__u64 *v;
#if PROBE == 1
	struct probe_key k = { .prefixlen = 32 + 128, .slot = 1, .hi = 0,
			 .lo = 0xffff0000ULL | ((__u64)ip->saddr << 32) };
	v = table.lookup(&k);
#elif PROBE == 2
	struct probe_key k = { .prefixlen = 32 + 32, .slot = 1, .addr = ip->saddr };
	v = table.lookup(&k);
#elif PROBE == 3
	struct probe_key k = { .prefixlen = 32, .addr = ip->saddr };
	v = table.lookup(&k);
#else
	__be16 *ports = (void *)(ip + 1);
	if ((void *)(ports + 2) > end)
		return XDP_PASS;
	__u16 port = bpf_ntohs(ports[1]);
#if PROBE == 4
	struct probe_key k = { .slot = 1, .proto = ip->protocol, .port = port };
	v = table.lookup(&k);
#else
	__u32 idx = (1 * 2 + (ip->protocol == IPPROTO_UDP)) * 65536 + port;
	v = table.lookup(&idx);
#endif
#endif
	return (v && *v == 0x5a5a) ? XDP_PASS : XDP_DROP;
}
