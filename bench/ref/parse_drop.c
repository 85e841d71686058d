/* Row "parse+drop" (the floor): parse Ethernet (+VLAN) and IPv4/IPv6, read
 * the source address, drop. Built with -DCLOCK=1 it also reads
 * bpf_ktime_get_ns, with -DCLOCK=2 bpf_ktime_get_coarse_ns, with -DCLOCK=3
 * bpf_jiffies64 (tidegate's bucket clock): the cost of the clock alone, next
 * to the floor. The source and the clock feed the verdict
 * so the compiler cannot drop the work. */
#include <uapi/linux/bpf.h>
#include "parse.h"

#ifndef CLOCK
#define CLOCK 0
#endif

int bench_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct src_key k;
	if (parse_source(data, end, &k) < 0)
		return XDP_PASS;
	__u64 x = k.hi | k.lo;
#if CLOCK == 1
	x |= bpf_ktime_get_ns();
#elif CLOCK == 2
	x |= bpf_ktime_get_coarse_ns();
#elif CLOCK == 3
	x |= bpf_jiffies64();
#endif
	return x ? XDP_DROP : XDP_PASS;
}
