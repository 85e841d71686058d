/* Rule-set evaluation for one slot: allow/deny tries, first matching rule,
 * then the rule's per-source and per-prefix buckets.
 *
 * Rule matching costs at most one trie lookup and one array load whatever
 * the number of rules: the control plane precomputes, for every CIDR entry,
 * the bit mask of rules whose sources contain it (the longest match then
 * carries every rule that covers the address), and for every (protocol,
 * port) the mask of rules that accept it. The first matching rule is the
 * lowest bit of the AND of the two masks.
 *
 * Classification cache: the trie's answer for a source (not listed, and the
 * mask of rules whose sources contain it) is kept in the source's state
 * entry, with the full address it was computed for (the part of it that
 * the entry's key does not already hold is compared). A state entry belongs
 * to one rule set: its key holds the set's epoch, and a slot is never
 * rewritten under the same epoch. So a cached answer can only be read by
 * packets of the set that wrote it, and a swap invalidates every cached
 * classification at once (the new set's keys name its own epoch). The
 * packet path first guesses the rule from the port alone (the first
 * any-source rule accepting it, else the default), looks up that rule's
 * entry, and if it holds this address's answer and the answer confirms the
 * guess, skips the trie: one hash lookup instead of a trie walk and a hash
 * lookup. Anything else (a miss, another address under a shorter key
 * prefix, a source-restricted rule winning) takes the full path, which
 * stores the answer for the next packet. Allow- and deny-listed sources get
 * no entry (as before): they take the trie every time. */
#ifndef TIDEGATE_RULES_H
#define TIDEGATE_RULES_H

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

struct tg_verdict {
	__u8 drop;
	__u8 reason;
	__u8 rule;
	__u8 pad;
};

/* What a packet's match found out about its source, for the cache. */
struct tg_class {
	__u64 mask;   /* the trie's rule mask (0: no entry) */
	__u32 ok;     /* 1: a trie answer for a source on no list, worth caching */
	__u32 pad;
};

static __always_inline __u32 tg_lowest_bit(__u64 m)
{
	/* index of the lowest set bit: isolate it, de Bruijn multiply, and look
	 * the 6-bit result up in a table map. A table lookup rather than a
	 * branch ladder also keeps the rule index an unknown scalar for the
	 * verifier, which would otherwise walk the rest of the program once
	 * per possible rule. */
	__u32 idx = (__u32)(((m & -m) * 0x022fdd63cc95386dULL) >> 58);
	__u32 *r = tg_debruijn.lookup(&idx);
	return r ? *r : TG_RULE_DEFAULT;
}

static __always_inline __u32 tg_first_rule(__u64 m)
{
	return m ? tg_lowest_bit(m) : TG_RULE_DEFAULT;
}

/* The mask of rules accepting the packet's protocol and port. */
static __always_inline __u64 tg_port_mask(__u32 slot, const struct tg_set_cfg *cfg,
					  const struct tg_pkt *p)
{
	__u64 port_mask = cfg->proto_mask[p->proto];
	if ((cfg->flags & TG_SET_HAS_PORTS) && p->has_port) {
		__u32 pidx = TG_PORT_IDX(slot, p->proto == IPPROTO_UDP, p->dport);
		__u64 *pm = tg_ports.lookup(&pidx);
		if (pm && *pm)
			port_mask = *pm;
	}
	return port_mask;
}

static __always_inline struct tg_verdict tg_classify(__u32 slot, const struct tg_set_cfg *cfg,
						     const struct tg_pkt *p, __u64 port_mask,
						     struct tg_class *cls)
{
	struct tg_verdict v = {};
	__u64 src_mask = cfg->any_src_mask;
	if (cfg->flags & TG_SET_HAS_TRIE) {
		struct tg_cidr_val *cv;
		if (p->family == 4) {
			struct tg_cidr4_key ck = {
				.prefixlen = 32 + 32, .slot = slot, .addr = (__u32)(p->addr_lo >> 32),
			};
			cv = tg_cidrs4.lookup(&ck);
		} else {
			struct tg_cidr6_key ck = {
				.prefixlen = 32 + 128, .slot = slot,
				.addr_hi = p->addr_hi, .addr_lo = p->addr_lo,
			};
			cv = tg_cidrs6.lookup(&ck);
		}
		if (cv) {
			if (cv->flags & TG_CF_ALLOW) {
				v.reason = TG_R_ALLOW;
				v.rule = TG_RULE_ALLOWLIST;
				return v;
			}
			if (cv->flags & TG_CF_DENY) {
				v.drop = 1;
				v.reason = TG_R_DENY;
				v.rule = TG_RULE_DENYLIST;
				return v;
			}
			cls->mask = cv->rule_mask;
			src_mask |= cv->rule_mask;
		}
		cls->ok = 1;
	}
	if (p->ext_unparsed) {
		/* no L4 header: no rule can be matched on protocol or port */
		v.rule = (cfg->flags & TG_SET_EXT_DEFAULT) ? TG_RULE_DEFAULT : TG_RULE_EXTHDR;
		v.reason = TG_R_PASS;
		return v;
	}
	v.rule = tg_first_rule(src_mask & port_mask);
	v.reason = TG_R_PASS;
	return v;
}

static __always_inline struct tg_rule_cfg *tg_rule_of(__u32 slot, __u32 rule)
{
	__u32 ridx = slot * TG_RULE_IDX + rule;
	return tg_rules.lookup(&ridx);
}

/* A rule whose packets are charged to a per-source state entry. */
static __always_inline int tg_has_state(const struct tg_rule_cfg *rc)
{
	return rc->action == TG_ACT_LIMIT && (rc->flags & TG_RF_PKT);
}

static __always_inline void tg_cache_class(struct tg_src *s, const struct tg_pkt *p,
					   const struct tg_class *cls)
{
	s->cls_lo = p->addr_lo;
	s->cls_hi = p->addr_hi;
	s->cls_ok = cls->ok;
	if (cls->mask) {
		s->cls_mask = cls->mask;
		s->flags |= TG_SF_CLS_MASK;
	} else {
		s->flags &= ~TG_SF_CLS_MASK;
	}
}

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
static __always_inline void tg_pfx_settle(struct tg_src *ps, struct tg_src *s, __u32 win,
					  const struct tg_limit *l)
{
	__u32 n = (__u32)s->pfx_credit + s->pfx_owed;
	if (!n)
		return;
	ps->packets += s->pfx_owed;
	ps->bytes += s->pfx_owed_bytes;
	if (ps->flags & TG_SF_LENT) {
		if (s->credit_win == win)
			ps->pfx_lent -= n < ps->pfx_lent ? n : ps->pfx_lent;
		else if (win - s->credit_win == 1)
			ps->pfx_lent_prev -= n < ps->pfx_lent_prev ? n : ps->pfx_lent_prev;
	}
	__u64 cap = tg_pfx_cap(ps, l);
	__u64 back = ps->tokens + (__u64)s->pfx_credit * TG_UNIT;
	ps->tokens = back > cap ? cap : back;
	s->pfx_credit = 0;
	s->pfx_owed = 0;
	s->pfx_owed_bytes = 0;
}

/* Lend a source back within the credit windows, its prefix far from its
 * limit, an eighth of what is above half the burst, at most TG_CREDIT_MAX
 * packets. */
static __always_inline void tg_pfx_lend(struct tg_src *ps, struct tg_src *s, __u32 win,
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
	s->pfx_credit = n;
}

/* Apply the rule's limits. shadow: this slot is the candidate set, its
 * state entries count would-drops; active_drop: what the active set did.
 * s: the source's entry if the caller already found it; cls: the match's
 * answer to cache in the entry. */
static __always_inline struct tg_verdict tg_limit(__u32 slot, const struct tg_set_cfg *cfg,
						  const struct tg_pkt *p, __u64 now,
						  struct tg_verdict v, int shadow, int active_drop,
						  struct tg_rule_cfg *rc, struct tg_src *s,
						  const struct tg_class *cls)
{
	if (!rc)
		return v;
	if (rc->action == TG_ACT_DROP) {
		v.drop = 1;
		v.reason = TG_R_DENY;
		return v;
	}
	if (rc->action == TG_ACT_PASS || !(rc->flags & TG_RF_PKT))
		return v;

	struct tg_state_key sk;
	const struct tg_mask *km = p->family == 4 ? &cfg->key4 : &cfg->key6;
	int bytes = rc->flags & TG_RF_BYTES;
	if (!s) {
		tg_state_key(&sk, p, km, cfg->epoch, v.rule, TG_KIND_SOURCE);
		s = tg_state.lookup(&sk);
		if (s && cls->ok)
			tg_cache_class(s, p, cls);
	}
	if (!s) {
		struct tg_src fresh;
		int ok = tg_fresh(&fresh, &rc->src, now, p->len, bytes);
		fresh.packets = 1;
		fresh.bytes = p->len;
		fresh.drops = !ok;
		fresh.new_drops = !ok && shadow && !active_drop;
		tg_cache_class(&fresh, p, cls);
		if (tg_state.insert(&sk, &fresh) == 0)
			tg_lru_count(TG_LRU_INSERTS);
		else if (!tg_state.lookup(&sk))
			/* the LRU could not allocate (or another CPU raced us) */
			tg_lru_count(TG_LRU_FAILS);
		if (!ok) {
			v.drop = 1;
			v.reason = TG_R_RATE;
			return v;
		}
	} else {
		s->packets++;
		s->bytes += p->len;
		if (s->flags & TG_SF_BLOCKED) {
			if (s->blocked_until > now) {
				v.drop = 1;
				v.reason = TG_R_BLOCKED;
				goto counted;
			}
			s->flags &= ~TG_SF_BLOCKED;
		}
		if (!tg_take(s, &rc->src, now, p->len, bytes)) {
			v.drop = 1;
			v.reason = TG_R_RATE;
			if (rc->block_ns) {
				s->blocked_until = now + rc->block_ns;
				s->flags |= TG_SF_BLOCKED;
			}
			goto counted;
		}
	}
	if (rc->flags & TG_RF_PREFIX) {
		int pbytes = rc->flags & TG_RF_PFX_BYTES;
		__u32 win = now >> TG_CREDIT_SHIFT;
		/* on credit: a packet of a source holding tokens it took from its
		 * prefix bucket in this window or the last needs no prefix lookup */
		if (s && s->pfx_credit && win - s->credit_win <= 1) {
			s->pfx_credit--;
			s->pfx_owed++;
			s->pfx_owed_bytes += p->len;
			goto counted;
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
		} else {
			ps->packets++;
			ps->bytes += p->len;
			tg_pfx_roll(ps, &rc->pfx, now, win);
			if (s)
				tg_pfx_settle(ps, s, win, &rc->pfx);
			/* (the roll refilled a lending prefix already: nothing elapses here) */
			if (!tg_take(ps, &rc->pfx, now, p->len, pbytes)) {
				v.drop = 1;
				v.reason = TG_R_PREFIX;
				ps->drops++;
				if (shadow && !active_drop)
					ps->new_drops++;
			} else if (s && !pbytes && win - s->credit_win <= 1) {
				tg_pfx_lend(ps, s, win, &rc->pfx);
			}
			if (s)
				s->credit_win = win;  /* its last prefix visit */
		}
	}
counted:
	if (s && v.drop) {
		s->drops++;
		if (shadow && !active_drop)
			s->new_drops++;
	}
	return v;
}

/* Evaluate one slot: match (through the cache when the source's entry
 * holds its answer), then limits. *matched gets the verdict before limits. */
static __always_inline struct tg_verdict tg_eval(__u32 slot, const struct tg_set_cfg *cfg,
						 const struct tg_pkt *p, __u64 now, int shadow,
						 int active_drop, struct tg_verdict *matched)
{
	struct tg_class cls = {};
	struct tg_verdict v = {};
	__u64 port_mask = tg_port_mask(slot, cfg, p);
	if ((cfg->flags & TG_SET_HAS_TRIE) && !p->ext_unparsed) {
		/* the guess: the rule the port alone chooses */
		__u32 guess = tg_first_rule(cfg->any_src_mask & port_mask);
		struct tg_rule_cfg *rc = tg_rule_of(slot, guess);
		if (rc && tg_has_state(rc)) {
			struct tg_state_key sk;
			tg_state_key(&sk, p, p->family == 4 ? &cfg->key4 : &cfg->key6, cfg->epoch,
				     guess, TG_KIND_SOURCE);
			struct tg_src *s = tg_state.lookup(&sk);
			/* the trie adds rules to the port's any-source ones: the guess
			 * stands unless one of them comes first */
			__u64 m0 = cfg->any_src_mask & port_mask;
			__u64 extra = s && (s->flags & TG_SF_CLS_MASK) ? s->cls_mask & port_mask & ~m0 : 0;
			/* the entry's key holds the address's high half unless an IPv6
			 * key is shorter than /64 (IPv4's high half is always 0) */
			if (s && s->cls_ok && s->cls_lo == p->addr_lo &&
			    (p->family == 4 || cfg->key6.hi == ~0ULL || s->cls_hi == p->addr_hi) &&
			    (!extra || (m0 && (extra & -extra) > (m0 & -m0)))) {
				v.rule = guess;
				v.reason = TG_R_PASS;
				*matched = v;
				return tg_limit(slot, cfg, p, now, v, shadow, active_drop, rc, s, &cls);
			}
		}
	}
	v = tg_classify(slot, cfg, p, port_mask, &cls);
	*matched = v;
	if (v.reason != TG_R_PASS)
		return v;
	return tg_limit(slot, cfg, p, now, v, shadow, active_drop, tg_rule_of(slot, v.rule), 0,
			&cls);
}

#endif
