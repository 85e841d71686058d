/* Rule-set evaluation for one slot: allow/deny tries, first matching rule,
 * then the rule's per-source and per-prefix buckets.
 *
 * Rule matching costs at most one trie lookup and one array load whatever
 * the number of rules: the control plane precomputes, for every CIDR entry,
 * the bit mask of rules whose sources contain it (the longest match then
 * carries every rule that covers the address), and for every (protocol,
 * port) the mask of rules that accept it. The first matching rule is the
 * lowest bit of the AND of the two masks. */
#ifndef TIDEGATE_RULES_H
#define TIDEGATE_RULES_H

struct tg_verdict {
	__u8 drop;
	__u8 reason;
	__u8 rule;
	__u8 pad;
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

static __always_inline struct tg_verdict tg_classify(__u32 slot, const struct tg_set_cfg *cfg,
						     const struct tg_pkt *p)
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
			src_mask |= cv->rule_mask;
		}
	}
	if (p->ext_unparsed) {
		/* no L4 header: no rule can be matched on protocol or port */
		v.rule = (cfg->flags & TG_SET_EXT_DEFAULT) ? TG_RULE_DEFAULT : TG_RULE_EXTHDR;
		v.reason = TG_R_PASS;
		return v;
	}
	__u64 port_mask = cfg->proto_mask[p->proto];
	if ((cfg->flags & TG_SET_HAS_PORTS) && p->has_port) {
		__u32 pidx = TG_PORT_IDX(slot, p->proto == IPPROTO_UDP, p->dport);
		__u64 *pm = tg_ports.lookup(&pidx);
		if (pm && *pm)
			port_mask = *pm;
	}
	__u64 m = src_mask & port_mask;
	v.rule = m ? tg_lowest_bit(m) : TG_RULE_DEFAULT;
	v.reason = TG_R_PASS;
	return v;
}

/* Apply the rule's limits. shadow: this slot is the candidate set, its
 * state entries count would-drops; active_drop: what the active set did. */
static __always_inline struct tg_verdict tg_limit(__u32 slot, const struct tg_set_cfg *cfg,
						  const struct tg_pkt *p, __u64 now,
						  struct tg_verdict v, int shadow, int active_drop)
{
	__u32 ridx = slot * TG_RULE_IDX + v.rule;
	struct tg_rule_cfg *rc = tg_rules.lookup(&ridx);
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
	tg_state_key(&sk, p, km, cfg->epoch, v.rule, TG_KIND_SOURCE);
	int bytes = rc->flags & TG_RF_BYTES;
	struct tg_src *s = tg_state.lookup(&sk);
	if (!s) {
		struct tg_src fresh;
		int ok = tg_fresh(&fresh, &rc->src, now, p->len, bytes);
		fresh.packets = 1;
		fresh.bytes = p->len;
		fresh.drops = !ok;
		fresh.new_drops = !ok && shadow && !active_drop;
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
		if (s->blocked_until > now) {
			v.drop = 1;
			v.reason = TG_R_BLOCKED;
			goto counted;
		}
		if (!tg_take(s, &rc->src, now, p->len, bytes)) {
			v.drop = 1;
			v.reason = TG_R_RATE;
			if (rc->block_ns)
				s->blocked_until = now + rc->block_ns;
			goto counted;
		}
	}
prefix:
	if (rc->flags & TG_RF_PREFIX) {
		struct tg_state_key pk;
		tg_state_key(&pk, p, p->family == 4 ? &rc->pfx4 : &rc->pfx6, cfg->epoch, v.rule,
			     TG_KIND_PREFIX);
		int pbytes = rc->flags & TG_RF_PFX_BYTES;
		struct tg_src *ps = tg_state.lookup(&pk);
		if (!ps) {
			struct tg_src fresh;
			int ok = tg_fresh(&fresh, &rc->pfx, now, p->len, pbytes);
			fresh.packets = 1;
			fresh.bytes = p->len;
			fresh.drops = !ok;
			fresh.new_drops = !ok && shadow && !active_drop;
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
			if (!tg_take(ps, &rc->pfx, now, p->len, pbytes)) {
				v.drop = 1;
				v.reason = TG_R_PREFIX;
				ps->drops++;
				if (shadow && !active_drop)
					ps->new_drops++;
			}
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

#endif
