/* A rule's limits for one slot: the per-source bucket and block penalty,
 * then the per-prefix bucket (bpf/prefix.h); a same-matching shadow set's
 * state kept in the active set's entry; and the evaluation of one slot,
 * through the classification cache (bpf/classify.h). */
#ifndef TIDEGATE_RULES_H
#define TIDEGATE_RULES_H

/* Which way a branch mostly goes on the packet path: the compiler lays the
 * rare way (a new source, a drop, a prefix visit) out of the common one's
 * instructions, which then fill fewer cache lines. */
#define tg_likely(x) __builtin_expect(!!(x), 1)
#define tg_unlikely(x) __builtin_expect(!!(x), 0)

/* A source inside its block penalty (a rule's block_seconds after a rate
 * drop): flags and blocked_until of its entry or of its shadow state. */
static __always_inline int tg_blocked(__u8 *flags, __u64 blocked_until, __u64 now)
{
	if (!(*flags & TG_SF_BLOCKED))
		return 0;
	if (blocked_until > now)
		return 1;
	*flags &= ~TG_SF_BLOCKED;
	return 0;
}

static __always_inline void tg_block(__u8 *flags, __u64 *blocked_until,
				     const struct tg_rule_cfg *rc, __u64 now)
{
	if (rc->block_ns) {
		*blocked_until = now + rc->block_ns;
		*flags |= TG_SF_BLOCKED;
	}
}

/* What a rule without per-source state does with a packet it matched: 1
 * leaves the match as it is (a pass rule, one without a packet limit, or
 * none), 2 denies it (a drop rule); 0 for a rule whose limits tg_limit
 * applies. */
#define TG_STATELESS_PASS 1
#define TG_STATELESS_DENY 2
static __always_inline int tg_stateless(const struct tg_rule_cfg *rc)
{
	if (!rc)
		return TG_STATELESS_PASS;
	if (rc->action == TG_ACT_DROP)
		return TG_STATELESS_DENY;
	return rc->action == TG_ACT_PASS || !(rc->flags & TG_RF_PKT) ? TG_STATELESS_PASS : 0;
}

/* Apply the limits of rc, a rule with per-source state (not tg_stateless).
 * shadow: this slot is the candidate set, its state entries count
 * would-drops; active_drop: what the active set did. s: the source's entry
 * if the caller already found it; cls: the match's answer to cache in the
 * entry. *found: the source's entry if it had one (0 for a source seen for
 * the first time). */
static __always_inline struct tg_verdict tg_limit(__u32 slot, const struct tg_set_cfg *cfg,
						  const struct tg_pkt *p, __u64 now,
						  struct tg_verdict v, int shadow, int active_drop,
						  struct tg_rule_cfg *rc, struct tg_src *s,
						  const struct tg_class *cls, struct tg_src **found)
{
	struct tg_state_key sk;
	const struct tg_mask *km = p->family == 4 ? &cfg->key4 : &cfg->key6;
	int bytes = rc->flags & TG_RF_BYTES;
	if (!s) {
		tg_state_key(&sk, p, km, cfg->epoch, v.rule, TG_KIND_SOURCE);
		s = tg_state.lookup(&sk);
		if (s && cls->ok)
			tg_cache_class(s, p, cls);
	}
	*found = s;
	if (tg_unlikely(!s)) {
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
		if (tg_unlikely(tg_blocked(&s->flags, s->blocked_until, now))) {
			v.drop = 1;
			v.reason = TG_R_BLOCKED;
			goto counted;
		}
		if (tg_unlikely(!tg_take(s, &rc->src, now, p->len, bytes))) {
			v.drop = 1;
			v.reason = TG_R_RATE;
			tg_block(&s->flags, &s->blocked_until, rc, now);
			goto counted;
		}
	}
	if (rc->flags & TG_RF_PREFIX) {
		/* most packets of a known source go on credit: asked here, on the
		 * entry's own fields, before the prefix visit below */
		struct tg_credit own = {};
		if (s) {
			if (tg_likely(tg_on_credit(s->pfx_credit, s->credit_win, now >> TG_CREDIT_SHIFT))) {
				s->pfx_credit--;
				s->pfx_owed++;
				s->pfx_owed_bytes += p->len;
				goto counted;
			}
			own.win = &s->credit_win;
			own.credit = &s->pfx_credit;
			own.owed = &s->pfx_owed;
			own.owed_bytes = &s->pfx_owed_bytes;
		}
		/* a source seen for the first time (no entry) takes no credit. One
		 * inlined copy of the prefix visit for both; the barrier keeps the
		 * compiler from folding the choice into the addresses of c's
		 * fields, which the verifier cannot follow (as in tg_limit_shadow) */
		const struct tg_credit *c = s ? &own : 0;
		asm volatile("" : "+r"(c));
		v = tg_prefix(cfg, p, now, v, shadow, active_drop, rc, c);
	}
counted:
	if (s && v.drop) {
		s->drops++;
		if (shadow && !active_drop)
			s->new_drops++;
	}
	return v;
}

/* The shadow set's limits on the state it keeps in the active set's entry
 * for the source (struct tg_shadow in s): rc keeps per-source state and has
 * no byte limit. Its first packet of the source starts that state afresh, as
 * a new entry of its own would. Its prefix bucket lives in the active set's
 * prefix entry where pfx_here says so (tg_prefix_shadow, with the active
 * set's rule, looked up only on a prefix visit), else in entries of its own. */
static __always_inline struct tg_verdict tg_limit_shadow(__u32 aslot, const struct tg_set_cfg *acfg,
							 const struct tg_set_cfg *cfg,
							 const struct tg_pkt *p, __u64 now,
							 struct tg_verdict v, int active_drop, int pfx_here,
							 const struct tg_rule_cfg *rc, struct tg_src *s)
{
	struct tg_shadow *h = &s->sh;
	int first = s->sh_epoch != cfg->epoch;
	if (tg_unlikely(first)) {
		h->tokens = rc->src.burst;
		h->last_ns = now;
		h->packets = 0;
		h->drops = 0;
		h->new_drops = 0;
		h->blocked_until = 0;
		h->first_ns = tg_wall();
		h->credit_win = now >> TG_CREDIT_SHIFT;  /* as tg_fresh */
		h->flags = 0;
		h->pfx_credit = 0;
		h->pfx_owed = 0;
		s->sh_epoch = cfg->epoch;
	}
	h->packets++;
	if (tg_unlikely(tg_blocked(&h->flags, h->blocked_until, now))) {
		v.drop = 1;
		v.reason = TG_R_BLOCKED;
	} else if (tg_unlikely(!tg_take_packet(&h->tokens, &h->last_ns, &rc->src, now))) {
		v.drop = 1;
		v.reason = TG_R_RATE;
		tg_block(&h->flags, &h->blocked_until, rc, now);
	} else if (rc->flags & TG_RF_PREFIX) {
		if (tg_likely(!first && tg_on_credit(h->pfx_credit, h->credit_win, now >> TG_CREDIT_SHIFT))) {
			h->pfx_credit--;
			h->pfx_owed++;
			goto counted;
		}
		struct tg_credit own = { &h->credit_win, &h->pfx_credit, &h->pfx_owed, 0 };
		/* a source's first packet takes no credit, as in tg_limit. The
		 * barrier keeps the compiler from folding `first` into the
		 * addresses of c's fields, which the verifier cannot follow */
		const struct tg_credit *c = first ? 0 : &own;
		asm volatile("" : "+r"(c));
		const struct tg_rule_cfg *arc = pfx_here ? tg_rule_of(aslot, v.rule) : 0;
		if (arc)
			v = tg_prefix_shadow(acfg, cfg, p, now, v, active_drop, arc, rc, c);
		else
			v = tg_prefix(cfg, p, now, v, 1, active_drop, rc, c);
	}
counted:
	if (v.drop) {
		h->drops++;
		h->new_drops += (active_drop & 1) ^ 1;  /* arithmetic: see tidegate.c */
	}
	return v;
}

/* A shadow set that matches like the active one (same_match_as): *sv is the
 * active set's match, which passed. Its limits run on the state it keeps in
 * the active set's entry for the source (as: that entry, 0 if the active set
 * has just made it) when the rule's link to the active slot says so for the
 * packet's family (layout.h TG_LINK_*: both sets key sources alike and the
 * rule keeps per-source state in both and no byte bucket in the shadow):
 * then *sv is the verdict and 1 is returned. Else 0: its limits run on
 * entries of its own (tg_eval, given the match). Which of the two is fixed by
 * the two sets for each rule and family, so a source's shadow state is never
 * split between them; the control plane decides it once, when it links the
 * slots, rather than every packet comparing the two rules and key masks. */
static __always_inline int tg_shadow_limit(__u32 aslot, const struct tg_set_cfg *acfg,
					   __u32 sslot, const struct tg_set_cfg *scfg,
					   const struct tg_pkt *p, __u64 now,
					   struct tg_verdict *sv, int active_drop,
					   struct tg_src *as)
{
	struct tg_rule_cfg *rc = tg_rule_of(sslot, sv->rule);
	if (!rc)
		return 0;
	/* one load: the slot the link holds for and its modes together */
	__u32 link = *(volatile __u8 *)&rc->shadow_link;
	if ((link & TG_LINK_SLOT) != aslot + 1)
		return 0;
	if (p->family != 4)
		link >>= 2;  /* TG_LINK_STATE6 / TG_LINK_PFX6 to the IPv4 bits */
	if (!(link & TG_LINK_STATE4))
		return 0;
	const struct tg_mask *ak = p->family == 4 ? &acfg->key4 : &acfg->key6;
	if (!as) {
		struct tg_state_key k;
		tg_state_key(&k, p, ak, acfg->epoch, sv->rule, TG_KIND_SOURCE);
		as = tg_state.lookup(&k);
	}
	if (!as)
		return 1;  /* the LRU could not make the active entry (counted) */
	*sv = tg_limit_shadow(aslot, acfg, scfg, p, now, *sv, active_drop, link & TG_LINK_PFX4, rc, as);
	return 1;
}

/* Evaluate one slot: match (known: a match made already, which a shadow set
 * that matches like the active one takes; else through the cache when the
 * source's entry holds its answer, else the tries), then limits. *matched
 * gets the verdict before limits; *found the source's entry where it had
 * one (tg_limit).
 *
 * Each inlined copy of tg_limit (and of the prefix code in it) costs
 * compile time at every fresh start and room in the instruction cache
 * (bench/compile_time.py), so the candidate's ways all end in one call of
 * it. The active set's cached way keeps a call of its own: the verifier
 * walks the candidate's evaluation once per way the active one ends, and
 * with the active set's ways joined too it walked 402,000 instructions
 * instead of 357,000. */
static __always_inline struct tg_verdict tg_eval(__u32 slot, const struct tg_set_cfg *cfg,
						 const struct tg_pkt *p, __u64 now, int shadow,
						 int active_drop, const struct tg_verdict *known,
						 struct tg_verdict *matched, struct tg_src **found)
{
	struct tg_class cls = {};
	struct tg_verdict v = {};
	struct tg_src *s = 0;
	struct tg_rule_cfg *rc = 0;
	if (known) {
		v = *known;
	} else {
		__u64 port_mask = tg_port_mask(slot, cfg, p);
		if ((cfg->flags & TG_SET_HAS_TRIE) && !p->ext_unparsed) {
			/* the guess: the rule the port alone chooses */
			__u32 guess = tg_first_rule(cfg->any_src_mask & port_mask);
			rc = tg_rule_of(slot, guess);
			if (rc && tg_has_state(rc)) {
				struct tg_state_key sk;
				tg_state_key(&sk, p, p->family == 4 ? &cfg->key4 : &cfg->key6,
					     cfg->epoch, guess, TG_KIND_SOURCE);
				s = tg_state.lookup(&sk);
				/* the trie adds rules to the port's any-source ones: the
				 * guess stands unless one of them comes first */
				__u64 m0 = cfg->any_src_mask & port_mask;
				__u64 extra = s && (s->flags & TG_SF_CLS_MASK) ?
						      s->cls_mask & port_mask & ~m0 : 0;
				/* the entry's key holds the address's high half unless an
				 * IPv6 key is shorter than /64 (IPv4's is always 0) */
				if (s && s->cls_ok && s->cls_lo == p->addr_lo &&
				    (p->family == 4 || cfg->key6.hi == ~0ULL || s->cls_hi == p->addr_hi) &&
				    (!extra || (m0 && (extra & -extra) > (m0 & -m0)))) {
					v.rule = guess;
					v.reason = TG_R_PASS;
					if (!shadow) {
						*matched = v;
						return tg_limit(slot, cfg, p, now, v, shadow, active_drop, rc, s,
								&cls, found);
					}
				} else {
					s = 0;
				}
			}
		}
		if (!s)
			v = tg_classify(slot, cfg, p, port_mask, &cls);
	}
	*matched = v;
	*found = 0;
	if (!s) {
		if (v.reason != TG_R_PASS)
			return v;
		rc = tg_rule_of(slot, v.rule);
		/* decided before the ways join: the verifier then walks the
		 * limits once per way, not the actions' branches on the cached
		 * way too (whose rule it cannot know keeps state) */
		int stateless = tg_stateless(rc);
		if (stateless) {
			if (stateless == TG_STATELESS_DENY) {
				v.drop = 1;
				v.reason = TG_R_DENY;
			}
			return v;
		}
	}
	return tg_limit(slot, cfg, p, now, v, shadow, active_drop, rc, s, &cls, found);
}

#endif
