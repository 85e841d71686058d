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
 * TG_CREDIT_MAX + 1 packets. Credit goes to a source back at its prefix
 * within those two windows, or back after a pause having sent packets on
 * its last loan (a steady sender: it borrows again at its first visit, not
 * its second); a source seen once, as in a spoofed flood, takes nothing,
 * and neither does one that left its last loan unused. At the source's
 * next visit (credit used up or expired) its packets sent on credit are
 * added to the prefix's counters and what it did not use goes back to the
 * bucket.
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

/* Where a prefix keeps its bucket, loans and counters: the fields of its own
 * entry (entry: that entry, for a byte limit), or those of a shadow set's
 * prefix state kept in the active set's prefix entry (struct tg_shadow; entry
 * and bytes 0: no byte bucket, no byte count). */
struct tg_pfx {
	struct tg_src *entry;
	__u64 *tokens;
	__u64 *last_ns;
	__u64 *packets;
	__u64 *bytes;
	__u64 *drops;
	__u64 *new_drops;
	__u32 *win;        /* the window *lent counts */
	__u32 *lent;       /* packets lent in window *win */
	__u32 *lent_prev;  /* packets lent in the window before */
	__u8 *flags;       /* TG_SF_LENT */
};

/* What the prefix's bucket may hold: its burst less the credit its sources
 * hold. */
static __always_inline __u64 tg_pfx_cap(const struct tg_pfx *b, const struct tg_limit *l)
{
	if (!(*b->flags & TG_SF_LENT))
		return l->burst;
	__u64 held = ((__u64)*b->lent + *b->lent_prev) * TG_UNIT;
	return l->burst > held ? l->burst - held : 0;
}

/* Prefix credit bookkeeping (see the top of this file). First the time
 * since the last visit refills the bucket up to its burst less the credit
 * held during that time (after a loan comes back or expires, the bucket
 * may hold more: refilled later, the elapsed time would fill that room at
 * once). Then the loan counters roll to window win: loans of older
 * windows have expired. Only a prefix that lends (never one with a byte
 * limit) has TG_SF_LENT. */
static __always_inline void tg_pfx_roll(const struct tg_pfx *b, const struct tg_limit *l, __u64 now,
					__u32 win)
{
	if (!(*b->flags & TG_SF_LENT))
		return;
	__u64 last = *b->last_ns;
	__u64 elapsed = now > last ? now - last : 0;
	*b->last_ns = now > last ? now : last;
	*b->tokens = tg_refill(*b->tokens, elapsed, l->rate, tg_pfx_cap(b, l), l->fill_ns);
	if (*b->win == win)
		return;
	__u32 prev = win - *b->win == 1 ? *b->lent : 0;
	*b->lent_prev = prev;
	*b->lent = 0;
	*b->win = win;
	if (!prev)
		*b->flags &= ~TG_SF_LENT;
}

/* A source back at its prefix settles its last loan: the packets it sent on
 * credit reach the prefix's counters, the prefix stops holding the loan (if
 * it still counts it) and what was left goes back to the bucket. */
static __always_inline void tg_pfx_settle(const struct tg_pfx *b, const struct tg_credit *c, __u32 win,
					  const struct tg_limit *l)
{
	__u32 n = (__u32)*c->credit + *c->owed;
	if (!n)
		return;
	*b->packets += *c->owed;
	if (c->owed_bytes) {
		if (b->bytes)
			*b->bytes += *c->owed_bytes;
		*c->owed_bytes = 0;
	}
	if (*b->flags & TG_SF_LENT) {
		if (*c->win == win)
			*b->lent -= n < *b->lent ? n : *b->lent;
		else if (win - *c->win == 1)
			*b->lent_prev -= n < *b->lent_prev ? n : *b->lent_prev;
	}
	__u64 cap = tg_pfx_cap(b, l);
	__u64 back = *b->tokens + (__u64)*c->credit * TG_UNIT;
	*b->tokens = back > cap ? cap : back;
	*c->credit = 0;
	*c->owed = 0;
}

/* Lend a source back within the credit windows, its prefix far from its
 * limit, an eighth of what is above half the burst, at most TG_CREDIT_MAX
 * packets. */
static __always_inline void tg_pfx_lend(const struct tg_pfx *b, const struct tg_credit *c, __u32 win,
					const struct tg_limit *l)
{
	__u64 tokens = *b->tokens;
	if (tokens <= l->burst / 2)
		return;
	__u64 n = ((tokens - l->burst / 2) >> 3) / TG_UNIT;
	if (n > TG_CREDIT_MAX)
		n = TG_CREDIT_MAX;
	if (!n)
		return;
	if (!(*b->flags & TG_SF_LENT)) {
		*b->win = win;
		*b->lent = 0;
		*b->lent_prev = 0;
		*b->flags |= TG_SF_LENT;
	}
	*b->lent += n;
	*b->tokens = tokens - n * TG_UNIT;
	*c->credit = n;
}

/* A packet may go on credit: its source holds tokens it took from its
 * prefix bucket in window loan_win, this one or the last, and needs no
 * prefix lookup. The caller then takes one packet of credit, on the
 * source's fields themselves: a struct tg_credit of their addresses went
 * through the stack on every packet (bench/packet_path.py hot rows). */
static __always_inline int tg_on_credit(__u8 credit, __u32 loan_win, __u32 win)
{
	return credit && win - loan_win <= 1;
}

/* A packet's visit to a prefix bucket it found: the source's last loan
 * settles, the packet takes its token, and a source back within the credit
 * windows, or one that sent packets on its last loan, may borrow (c: where
 * the source keeps its credit, 0 for a source seen for the first time,
 * which takes no credit). */
static __always_inline struct tg_verdict tg_pfx_visit(const struct tg_pfx *b, const struct tg_pkt *p,
						      __u64 now, __u32 win, struct tg_verdict v,
						      int shadow, int active_drop,
						      const struct tg_rule_cfg *rc,
						      const struct tg_credit *c)
{
	int pbytes = rc->flags & TG_RF_PFX_BYTES;
	/* what the source sent on its last loan, read before the settle clears it */
	__u32 used = c ? *c->owed : 0;
	(*b->packets)++;
	if (b->bytes)
		*b->bytes += p->len;
	tg_pfx_roll(b, &rc->pfx, now, win);
	if (c)
		tg_pfx_settle(b, c, win, &rc->pfx);
	/* (the roll refilled a lending prefix already: nothing elapses here) */
	int ok = b->entry ? tg_take(b->entry, &rc->pfx, now, p->len, pbytes)
			  : tg_take_packet(b->tokens, b->last_ns, &rc->pfx, now);
	if (!ok) {
		v.drop = 1;
		v.reason = TG_R_PREFIX;
		(*b->drops)++;
		if (shadow && !active_drop)
			(*b->new_drops)++;
	} else if (c && !pbytes && (win - *c->win <= 1 || used)) {
		tg_pfx_lend(b, c, win, &rc->pfx);
	}
	if (c)
		*c->win = win;  /* its last prefix visit */
	return v;
}

/* The entry of the packet's prefix under rule `rule` of the set with this
 * epoch, keyed by rc's prefix lengths (its key in *pk); 0 if it has none. */
static __always_inline struct tg_src *tg_pfx_find(struct tg_state_key *pk, const struct tg_pkt *p,
						  const struct tg_rule_cfg *rc, __u32 epoch, __u32 rule)
{
	tg_state_key(pk, p, p->family == 4 ? &rc->pfx4 : &rc->pfx6, epoch, rule, TG_KIND_PREFIX);
	return tg_state.lookup(pk);
}

/* A new prefix entry for the packet's prefix (key pk) under rule rc:
 * counted, it takes the packet's token from a full bucket. 0 if the packet
 * fits. */
static __always_inline int tg_pfx_insert(struct tg_state_key *pk, const struct tg_pkt *p, __u64 now,
					 int shadow, int active_drop,
					 const struct tg_rule_cfg *rc)
{
	struct tg_src fresh;
	struct tg_class none = {};
	int ok = tg_fresh(&fresh, &rc->pfx, now, p->len, rc->flags & TG_RF_PFX_BYTES);
	fresh.packets = 1;
	fresh.bytes = p->len;
	fresh.drops = !ok;
	fresh.new_drops = !ok && shadow && !active_drop;
	tg_cache_class(&fresh, p, &none);
	if (tg_state.insert(pk, &fresh) == 0)
		tg_lru_count(TG_LRU_INSERTS);
	else if (!tg_state.lookup(pk))
		tg_lru_count(TG_LRU_FAILS);
	return ok;
}

/* The rule's per-prefix bucket, after the source's own passed and found
 * no credit to send on (tg_on_credit, which the caller asks first). c:
 * where the source keeps its credit, 0 for a source seen for the first
 * time (which takes no credit). */
static __always_inline struct tg_verdict tg_prefix(const struct tg_set_cfg *cfg,
						   const struct tg_pkt *p, __u64 now,
						   struct tg_verdict v, int shadow, int active_drop,
						   const struct tg_rule_cfg *rc,
						   const struct tg_credit *c)
{
	__u32 win = now >> TG_CREDIT_SHIFT;
	struct tg_state_key pk;
	struct tg_src *ps = tg_pfx_find(&pk, p, rc, cfg->epoch, v.rule);
	if (!ps) {
		if (!tg_pfx_insert(&pk, p, now, shadow, active_drop, rc)) {
			v.drop = 1;
			v.reason = TG_R_PREFIX;
		}
		return v;
	}
	struct tg_pfx b = {
		ps, &ps->tokens, &ps->last_ns, &ps->packets, &ps->bytes, &ps->drops, &ps->new_drops,
		&ps->credit_win, &ps->pfx_lent, &ps->pfx_lent_prev, &ps->flags,
	};
	return tg_pfx_visit(&b, p, now, win, v, shadow, active_drop, rc, c);
}

/* A shadow set's prefix bucket kept in the active set's entry for the
 * prefix (struct tg_shadow in it; its loans in sh.blocked_until, which a
 * prefix never needs): arc, the active set's rule, keys prefixes like rc,
 * the candidate's, which has no byte limit on its prefix. One lookup then
 * serves both sets' prefix visits, and the entry is the one the active set
 * has just visited when both do on the same packet. Where the active set
 * has no entry for the prefix (evicted, or none of its packets got that
 * far), one is made with its bucket full and no packet counted. As for
 * tg_prefix, the caller has found no credit to send on. The
 * candidate's first packet of the prefix starts its state afresh, as a new
 * entry of its own would, and takes no credit. */
static __always_inline struct tg_verdict tg_prefix_shadow(const struct tg_set_cfg *acfg,
							  const struct tg_set_cfg *scfg,
							  const struct tg_pkt *p, __u64 now,
							  struct tg_verdict v, int active_drop,
							  const struct tg_rule_cfg *arc,
							  const struct tg_rule_cfg *rc,
							  const struct tg_credit *c)
{
	__u32 win = now >> TG_CREDIT_SHIFT;
	struct tg_state_key pk;
	struct tg_src *ps = tg_pfx_find(&pk, p, arc, acfg->epoch, v.rule);
	if (!ps) {
		struct tg_src fresh;
		struct tg_class none = {};
		tg_fresh(&fresh, &arc->pfx, now, 0, 0);
		fresh.tokens = arc->pfx.burst;  /* (tg_fresh took a packet's token) */
		tg_cache_class(&fresh, p, &none);
		if (tg_state.insert(&pk, &fresh) == 0)
			tg_lru_count(TG_LRU_INSERTS);
		ps = tg_state.lookup(&pk);
		if (!ps) {
			tg_lru_count(TG_LRU_FAILS);
			return v;
		}
	}
	struct tg_shadow *h = &ps->sh;
	__u32 *loans = (__u32 *)&h->blocked_until;
	if (ps->sh_epoch != scfg->epoch) {
		h->tokens = rc->pfx.burst;
		h->last_ns = now;
		int ok = tg_take_packet(&h->tokens, &h->last_ns, &rc->pfx, now);
		h->packets = 1;
		h->drops = !ok;
		h->new_drops = !ok && !active_drop;
		h->blocked_until = 0;
		h->first_ns = tg_wall();
		h->credit_win = win;
		h->flags = 0;
		h->pfx_credit = 0;
		h->pfx_owed = 0;
		ps->sh_epoch = scfg->epoch;
		if (!ok) {
			v.drop = 1;
			v.reason = TG_R_PREFIX;
		}
		return v;
	}
	struct tg_pfx b = {
		0, &h->tokens, &h->last_ns, &h->packets, 0, &h->drops, &h->new_drops,
		&h->credit_win, &loans[0], &loans[1], &h->flags,
	};
	return tg_pfx_visit(&b, p, now, win, v, 1, active_drop, rc, c);
}

#endif
