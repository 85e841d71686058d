/* Token buckets in fixed point (TG_UNIT units per packet or byte).
 *
 * Concurrency: a source's state is one entry of a shared LRU hash, updated in
 * place without locks. When two CPUs handle packets of the same source at
 * the same instant, both may read the same token count and both take a
 * token, so a source can get up to (CPUs - 1) packets more than its burst in
 * such a race; counters on the entry may lose an increment the same way.
 * That error is bounded and small next to a spin lock on every packet of a
 * flood. Global and per-rule counters are per-CPU and exact. */
#ifndef TIDEGATE_BUCKET_H
#define TIDEGATE_BUCKET_H

static __always_inline __u64 tg_now(void)
{
#ifdef TG_REPLAY_CLOCK
	__u32 zero = 0;
	__u64 *t = tg_clock.lookup(&zero);
	return t ? *t : 0;
#else
	/* Bucket time: jiffies in ns since the tick started. The same tick
	 * resolution as bpf_ktime_get_coarse_ns (a few ms, plenty for
	 * packet-rate buckets), but the verifier inlines bpf_jiffies64 as one
	 * load: 3 ns over the floor against 20 for the coarse clock and 35 for
	 * bpf_ktime_get_ns (bench/packet_path.py clock rows). It trails
	 * CLOCK_MONOTONIC by a constant of the boot, so only the program reads
	 * it (last_ns, blocked_until, credit_win); first_ns, which the
	 * control plane compares with its own clock, comes from tg_wall(). */
	return (bpf_jiffies64() - (__u64)INITIAL_JIFFIES) * (1000000000ULL / HZ);
#endif
}

/* CLOCK_MONOTONIC (coarse) for the one field the control plane reads as a
 * time: first_ns, written once per new entry. */
static __always_inline __u64 tg_wall(void)
{
#ifdef TG_REPLAY_CLOCK
	return tg_now();
#else
	return bpf_ktime_get_coarse_ns();
#endif
}

static __always_inline __u64 tg_refill(__u64 tokens, __u64 elapsed, __u64 rate, __u64 cap,
				       __u64 fill_ns)
{
	/* elapsed is capped at the fill time, so elapsed * rate cannot overflow */
	if (elapsed > fill_ns)
		elapsed = fill_ns;
	tokens += elapsed * rate;
	return tokens > cap ? cap : tokens;
}

/* Take one packet from a packet bucket (tokens, last_ns: a source's own
 * or its shadow state's). Returns 1 if allowed. */
static __always_inline int tg_take_packet(__u64 *tokens, __u64 *last_ns, const struct tg_limit *l,
					  __u64 now)
{
	__u64 elapsed = now > *last_ns ? now - *last_ns : 0;
	*last_ns = now > *last_ns ? now : *last_ns;
	__u64 t = tg_refill(*tokens, elapsed, l->rate, l->burst, l->fill_ns);
	int ok = t >= TG_UNIT;
	*tokens = ok ? t - TG_UNIT : t;
	return ok;
}

/* Take one packet (and its bytes, if the rule limits them) from a
 * source's buckets. Returns 1 if allowed. */
static __always_inline int tg_take(struct tg_src *s, const struct tg_limit *l, __u64 now,
				   __u32 len, int bytes)
{
	if (!bytes)
		return tg_take_packet(&s->tokens, &s->last_ns, l, now);
	__u64 elapsed = now > s->last_ns ? now - s->last_ns : 0;
	s->last_ns = now > s->last_ns ? now : s->last_ns;
	__u64 t = tg_refill(s->tokens, elapsed, l->rate, l->burst, l->fill_ns);
	__u64 cost = (__u64)len * TG_UNIT;
	__u64 bt = tg_refill(s->byte_tokens, elapsed, l->brate, l->bburst, l->bfill_ns);
	int ok = t >= TG_UNIT && bt >= cost;
	s->byte_tokens = ok ? bt - cost : bt;
	s->tokens = ok ? t - TG_UNIT : t;
	return ok;
}

/* State of a source seen for the first time: a full bucket minus this
 * packet. Returns 1 if the packet fits (it does unless its bytes exceed the
 * byte burst). */
static __always_inline int tg_fresh(struct tg_src *s, const struct tg_limit *l, __u64 now,
				     __u32 len, int bytes)
{
	s->tokens = l->burst;
	s->last_ns = now;
	s->packets = 0;
	s->bytes = 0;
	s->cls_lo = 0;
	s->credit_win = now >> TG_CREDIT_SHIFT;  /* as if it had just visited its prefix */
	s->pfx_lent = 0;
	s->cls_ok = 0;
	s->flags = 0;
	s->pfx_credit = 0;
	s->pfx_owed = 0;
	s->pfx_owed_bytes = 0;
	s->blocked_until = 0;
	s->byte_tokens = l->bburst;
	s->drops = 0;
	s->new_drops = 0;
	s->first_ns = tg_wall();
	s->cls_mask = 0;
	s->cls_hi = 0;
	s->pfx_lent_prev = 0;
	s->sh_epoch = 0;
	__builtin_memset(&s->sh, 0, sizeof(s->sh));
	return tg_take(s, l, now, len, bytes);
}

#endif
