/* Per-prefix buckets and prefix credit. */
#ifndef TIDEGATE_PREFIX_H
#define TIDEGATE_PREFIX_H

/* Prefix credit: a source whose prefix bucket is far from its limit (over
 * half its burst) takes an eighth of what is above half, at most
 * TG_CREDIT_MAX packets, and sends that many packets without looking its
 * prefix up. Credit is lent in windows of the bucket clock (now >>
 * TG_CREDIT_SHIFT, about 268 ms) and is good until the window after the
 * one it was lent in ends: a source sending a packet every few tens of ms
 * (a round robin over 64k sources) visits its prefix once per
 * TG_CREDIT_MAX + 1 packets. Only a source back at its prefix within
 * those two windows gets credit (a source seen once, as in a spoofed
 * flood, takes nothing). At the source's next visit (credit used up or
 * expired) its packets sent on credit are added to the prefix's counters
 * and what it did not use goes back to the bucket.
 *
 * The prefix bucket counts what it has lent in the current and the
 * previous window (pfx_lent, pfx_lent_prev) and refills only up to its
 * burst less that, so tokens + credit held never exceed the burst: the
 * prefix never passes more than a plain bucket would (burst + rate x
 * time). What it costs in accuracy: credit a source takes and does not
 * use is missing from the bucket until the source comes back or the loan
 * expires (at most two windows, about 0.54 s), so a prefix may drop
 * earlier than a plain bucket, by at most about half its burst (nothing
 * is lent below half the burst) during that time. Near its limit, or with
 * a byte limit, a prefix lends nothing and every packet is charged to it
 * as it comes. An evicted prefix entry forgets its loans: until they
 * expire, its sources may pass up to the half burst lent on top of the
 * new entry's burst. */
#define TG_CREDIT_MAX 64

/* Where a source keeps its prefix credit: the fields of its own entry, or
 * those of the shadow state kept in the active set's entry (struct
 * tg_shadow, which keeps no owed bytes: owed_bytes 0). */
struct tg_credit {
	__u32 *win;        /* the window of the source's last prefix visit */
	__u8 *credit;      /* packets still to send on credit */
	__u8 *owed;        /* packets sent on credit, not yet added to the prefix */
	__u32 *owed_bytes;
};

/* What the prefix's bucket may hold: its burst less the credit its sources
 * hold. */
static __always_inline __u64 tg_pfx_cap(const struct tg_src *ps, const struct tg_limit *l)
{
	if (!(ps->flags & TG_SF_LENT))
		return l->burst;
	__u64 held = ((__u64)ps->pfx_lent + ps->pfx_lent_prev) * TG_UNIT;
	return l->burst > held ? l->burst - held : 0;
}

/* Prefix credit bookkeeping (see the top of this file). First the time
 * since the last visit refills the bucket up to its burst less the credit
 * held during that time (after a loan comes back or expires, the bucket
 * may hold more: refilled later, the elapsed time would fill that room at
 * once). Then the loan counters roll to window win: loans of older
 * windows have expired. Only a prefix that lends (never one with a byte
 * limit) has TG_SF_LENT. */
static __always_inline void tg_pfx_roll(struct tg_src *ps, const struct tg_limit *l, __u64 now,
					__u32 win)
{
	if (!(ps->flags & TG_SF_LENT))
		return;
	__u64 elapsed = now > ps->last_ns ? now - ps->last_ns : 0;
	ps->last_ns = now > ps->last_ns ? now : ps->last_ns;
	ps->tokens = tg_refill(ps->tokens, elapsed, l->rate, tg_pfx_cap(ps, l), l->fill_ns);
	if (ps->credit_win == win)
		return;
	__u32 prev = win - ps->credit_win == 1 ? ps->pfx_lent : 0;
	ps->pfx_lent_prev = prev;
	ps->pfx_lent = 0;
	ps->credit_win = win;
	if (!prev)
		ps->flags &= ~TG_SF_LENT;
}

/* A source back at its prefix settles its last loan: the packets it sent on
 * credit reach the prefix's counters, the prefix stops holding the loan (if
 * it still counts it) and what was left goes back to the bucket. */
static __always_inline void tg_pfx_settle(struct tg_src *ps, const struct tg_credit *c, __u32 win,
					  const struct tg_limit *l)
{
	__u32 n = (__u32)*c->credit + *c->owed;
	if (!n)
		return;
	ps->packets += *c->owed;
	if (c->owed_bytes) {
		ps->bytes += *c->owed_bytes;
		*c->owed_bytes = 0;
	}
	if (ps->flags & TG_SF_LENT) {
		if (*c->win == win)
			ps->pfx_lent -= n < ps->pfx_lent ? n : ps->pfx_lent;
		else if (win - *c->win == 1)
			ps->pfx_lent_prev -= n < ps->pfx_lent_prev ? n : ps->pfx_lent_prev;
	}
	__u64 cap = tg_pfx_cap(ps, l);
	__u64 back = ps->tokens + (__u64)*c->credit * TG_UNIT;
	ps->tokens = back > cap ? cap : back;
	*c->credit = 0;
	*c->owed = 0;
}

/* Lend a source back within the credit windows, its prefix far from its
 * limit, an eighth of what is above half the burst, at most TG_CREDIT_MAX
 * packets. */
static __always_inline void tg_pfx_lend(struct tg_src *ps, const struct tg_credit *c, __u32 win,
					const struct tg_limit *l)
{
	if (ps->tokens <= l->burst / 2)
		return;
	__u64 n = ((ps->tokens - l->burst / 2) >> 3) / TG_UNIT;
	if (n > TG_CREDIT_MAX)
		n = TG_CREDIT_MAX;
	if (!n)
		return;
	if (!(ps->flags & TG_SF_LENT)) {
		ps->credit_win = win;
		ps->pfx_lent = 0;
		ps->pfx_lent_prev = 0;
		ps->flags |= TG_SF_LENT;
	}
	ps->pfx_lent += n;
	ps->tokens -= n * TG_UNIT;
	*c->credit = n;
}

/* The rule's per-prefix bucket, after the source's own passed. c: where the
 * source keeps its credit, 0 for a source seen for the first time (which
 * takes no credit). */
static __always_inline struct tg_verdict tg_prefix(const struct tg_set_cfg *cfg,
						   const struct tg_pkt *p, __u64 now,
						   struct tg_verdict v, int shadow, int active_drop,
						   const struct tg_rule_cfg *rc,
						   const struct tg_credit *c)
{
	int pbytes = rc->flags & TG_RF_PFX_BYTES;
	__u32 win = now >> TG_CREDIT_SHIFT;
	/* on credit: a packet of a source holding tokens it took from its
	 * prefix bucket in this window or the last needs no prefix lookup */
	if (c && *c->credit && win - *c->win <= 1) {
		(*c->credit)--;
		(*c->owed)++;
		if (c->owed_bytes)
			*c->owed_bytes += p->len;
		return v;
	}
	struct tg_state_key pk;
	tg_state_key(&pk, p, p->family == 4 ? &rc->pfx4 : &rc->pfx6, cfg->epoch, v.rule,
		     TG_KIND_PREFIX);
	struct tg_src *ps = tg_state.lookup(&pk);
	if (!ps) {
		struct tg_src fresh;
		struct tg_class none = {};
		int ok = tg_fresh(&fresh, &rc->pfx, now, p->len, pbytes);
		fresh.packets = 1;
		fresh.bytes = p->len;
		fresh.drops = !ok;
		fresh.new_drops = !ok && shadow && !active_drop;
		tg_cache_class(&fresh, p, &none);
		if (!ok) {
			v.drop = 1;
			v.reason = TG_R_PREFIX;
		}
		if (tg_state.insert(&pk, &fresh) == 0)
			tg_lru_count(TG_LRU_INSERTS);
		else if (!tg_state.lookup(&pk))
			tg_lru_count(TG_LRU_FAILS);
		return v;
	}
	ps->packets++;
	ps->bytes += p->len;
	tg_pfx_roll(ps, &rc->pfx, now, win);
	if (c)
		tg_pfx_settle(ps, c, win, &rc->pfx);
	/* (the roll refilled a lending prefix already: nothing elapses here) */
	if (!tg_take(ps, &rc->pfx, now, p->len, pbytes)) {
		v.drop = 1;
		v.reason = TG_R_PREFIX;
		ps->drops++;
		if (shadow && !active_drop)
			ps->new_drops++;
	} else if (c && !pbytes && win - *c->win <= 1) {
		tg_pfx_lend(ps, c, win, &rc->pfx);
	}
	if (c)
		*c->win = win;  /* its last prefix visit */
	return v;
}

#endif
