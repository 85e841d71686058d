/* Row "bare drop": the cheapest XDP program there is. */
#include <uapi/linux/bpf.h>

int bench_xdp(struct xdp_md *ctx)
{
	return XDP_DROP;
}
