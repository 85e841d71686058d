/* Row "minimal token bucket": what a user writes in an afternoon. One LRU
 * hash keyed by the 16-byte source address, a bucket of credit measured in
 * nanoseconds (GCRA style: one packet costs 1e9/RATE ns of credit, the
 * bucket holds BURST packets), bpf_ktime_get_ns, updated in place without
 * locks. No lists, no rules, no counters, no shadow.
 * -D flags: RATE (pps), BURST (packets), MAX_SOURCES (LRU size).
 * Variants for comparison rows (not the reference itself):
 * -DCOARSE_CLOCK=1 reads bpf_ktime_get_coarse_ns instead, -DLRU_FLAGS=2
 * creates the LRU with BPF_F_NO_COMMON_LRU (per-CPU LRU lists), -DKEY_PAD=N
 * -DVAL_PAD=M add N and M 8-byte words to the key and the value: the bench
 * gives the entries tidegate's sizes (bench/packet_workload.py entry_pads),
 * to show what the entry's size alone costs a cache-missing lookup. */
#include <uapi/linux/bpf.h>
#include "parse.h"

#ifndef RATE
#define RATE 1000
#endif
#ifndef BURST
#define BURST 2000
#endif
#ifndef MAX_SOURCES
#define MAX_SOURCES 1048576
#endif

#ifndef LRU_FLAGS
#define LRU_FLAGS 0
#endif

#define COST_NS (1000000000ULL / RATE)
#define FULL_NS (COST_NS * BURST)

#ifndef KEY_PAD
#define KEY_PAD 0
#endif
#ifndef VAL_PAD
#define VAL_PAD 0
#endif

struct bucket {
	__u64 credit_ns;
	__u64 last_ns;
#if VAL_PAD
	__u64 pad[VAL_PAD];
#endif
};

struct bucket_key {
	struct src_key src;
#if KEY_PAD
	__u64 pad[KEY_PAD];
#endif
};

BPF_F_TABLE("lru_hash", struct bucket_key, struct bucket, buckets, MAX_SOURCES, LRU_FLAGS);

int bench_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct bucket_key k = {};
	if (parse_source(data, end, &k.src) < 0)
		return XDP_PASS;
#ifdef COARSE_CLOCK
	__u64 now = bpf_ktime_get_coarse_ns();
#else
	__u64 now = bpf_ktime_get_ns();
#endif
	struct bucket *b = buckets.lookup(&k);
	if (!b) {
		struct bucket fresh = { FULL_NS - COST_NS, now };  /* the rest zero */
		buckets.update(&k, &fresh);
		return XDP_PASS;
	}
	__u64 credit = b->credit_ns + (now - b->last_ns);
	if (credit > FULL_NS)
		credit = FULL_NS;
	b->last_ns = now;
	if (credit < COST_NS) {
		b->credit_ns = credit;
		return XDP_DROP;
	}
	b->credit_ns = credit - COST_NS;
	return XDP_PASS;
}
