/* Counters. Everything a packet always touches is per-CPU; the agent sums. */
#ifndef TIDEGATE_STATS_H
#define TIDEGATE_STATS_H

static __always_inline void tg_count_reason(__u32 reason, __u32 len)
{
	struct tg_count *c = tg_stats.lookup(&reason);
	if (c) {
		c->packets++;
		c->bytes += len;
	}
}

static __always_inline void tg_lru_count(__u32 which)
{
	__u64 *c = tg_lru.lookup(&which);
	if (c)
		(*c)++;
}

static __always_inline struct tg_rule_count *tg_rule_counter(__u32 slot, __u32 rule)
{
	__u32 idx = slot * TG_RULE_IDX + rule;
	return tg_rule_stats.lookup(&idx);
}

#endif
