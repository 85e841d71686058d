/* Not a row: a front end that makes BPF_PROG_TEST_RUN see many sources.
 *
 * BPF_PROG_TEST_RUN runs a program `repeat` times on one frame, and the
 * frame's bytes persist from one repeat to the next. This program rewrites
 * the IPv4 source address of that frame to base + ((n * order) & mask) *
 * stride (mod 2^32), n counting its own runs, then tail-calls the program
 * under test from slot 0 of `target`. One call with repeat = 1,000,000 thus
 * shows the program under test 1,000,000 packets from mask + 1 sources in
 * round-robin order, each source coming back only after all the others.
 * order 1 walks them in the order of their addresses (the prefill, the
 * warm-up that makes their entries); an odd order far from 1 walks the same
 * sources in another fixed order, so consecutive packets do not find their
 * entries next to each other in memory (bench/packet_workload.py
 * VISIT_ORDER): the worst case for caches.
 * stride 1 keeps them in one block; an odd stride near 2^32 / golden ratio
 * spreads them over the whole IPv4 space, as a random-source flood is.
 *
 * Its own cost (a map lookup, a store into the frame, a tail call) is
 * measured in front of the bare-drop program in the same run, and every
 * row of a cycled case carries it. base, mask and stride live in `cfg` so one
 * loaded program serves both the 1M prefill and the 64k cycle.
 * Untagged Ethernet/IPv4 frames only; the IP checksum is not updated (no
 * row checks it). */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>

struct cycle_cfg {
	__u32 base;   /* first source, host order */
	__u32 mask;   /* number of sources - 1 (a power of two - 1) */
	__u32 n;      /* runs so far */
	__u32 stride; /* distance between consecutive sources */
	__u32 order;  /* odd: run n shows source (n * order) & mask */
};

BPF_PROG_ARRAY(target, 1);
BPF_ARRAY(cfg, struct cycle_cfg, 1);

int bench_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end)
		return XDP_ABORTED;
	__u32 zero = 0;
	struct cycle_cfg *c = cfg.lookup(&zero);
	if (!c)
		return XDP_ABORTED;
	__u32 i = c->n;
	c->n = i + 1;
	ip->saddr = bpf_htonl(c->base + ((i * c->order) & c->mask) * c->stride);
	target.call(ctx, 0);
	return XDP_ABORTED;
}
