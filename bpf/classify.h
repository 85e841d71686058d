/* Rule-set matching for one slot: allow/deny tries and the first matching
 * rule (bpf/rules.h then applies the rule's limits).
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
#ifndef TIDEGATE_CLASSIFY_H
#define TIDEGATE_CLASSIFY_H

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

#endif
