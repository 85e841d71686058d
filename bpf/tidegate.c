/* tidegate XDP program: per-source rate filter with atomic rule-set swap
 * and a shadow (candidate) rule set.
 *
 * Atomic swap — double buffering with one selector word, chosen over
 * map-in-map. A rule set is spread over several maps (set config, rules,
 * CIDR trie, port table); map-in-map would need one outer map per kind and
 * two outer updates could be seen half done. Instead every map holds
 * TG_SLOTS copies, indexed by slot (the slot is part of the array index,
 * the trie key and the port key). The control plane writes a complete rule
 * set into a slot no packet reads, then stores the new selection in
 * tg_ctl.sel, a single 32-bit word. Each packet loads sel exactly once and
 * then reads only the slots it names, so it sees the whole old set or the
 * whole new one. Before a retired slot is rewritten, the control plane
 * waits for an RCU grace period (every XDP run in flight at the flip has
 * finished), so no packet can read a slot that is being rewritten.
 *
 * Shadow: when sel names a shadow slot, every packet is evaluated by both
 * sets; only the active verdict is enforced, the shadow one is counted per
 * rule (would-drop, and would-drop where the active set passed) and per
 * source (its own state entries, keyed by the shadow set's epoch). A shadow
 * set that matches exactly like the active one (same_match_as, the common
 * "same rules, other limits" candidate) reuses its classification and keeps
 * its per-source state in the active set's entry for the source (struct
 * tg_shadow), and its prefix buckets in the active set's entry for the
 * prefix where both key prefixes alike: it pays only for its own buckets
 * and counters, not for lookups of its own.
 */
#include <uapi/linux/bpf.h>

#include "kernel_defs.h"
#include "layout.h"
#include "maps.h"
#include "parse.h"
#include "keys.h"
#include "bucket.h"
#include "stats.h"
#include "classify.h"
#include "prefix.h"
#include "rules.h"

static __always_inline void tg_count_rule(struct tg_rule_count *rc, struct tg_verdict v,
					  __u32 len)
{
	if (!rc)
		return;
	if (!v.drop) {
		rc->pass_pkts++;
		rc->pass_bytes += len;
		return;
	}
	rc->drop_pkts++;
	rc->drop_bytes += len;
	if (v.reason == TG_R_RATE)
		rc->drop_rate++;
	else if (v.reason == TG_R_PREFIX)
		rc->drop_prefix++;
	else if (v.reason == TG_R_BLOCKED)
		rc->drop_blocked++;
	else
		rc->drop_deny++;
}

int tidegate_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct tg_pkt p = {};

	if (tg_parse(data, end, &p) < 0) {
		tg_count_reason(TG_R_UNPARSED, p.len);
		return XDP_PASS;
	}
	/* The protocol as a number the verifier does not know (bpf/parse.h
	 * tg_opaque). Parsing leaves it a known constant on many of the
	 * verifier's paths (6 behind the TCP test, 17 behind UDP, ranges behind
	 * the extension-header tests), and the rule matching indexes a table
	 * with it, so each was a state of its own through the whole
	 * evaluation: 184,957 instructions verified, 84,235 now
	 * (bench/compile_time.py). It costs every packet a store and a load. */
	p.proto = tg_opaque(p.proto, 0xff);

	__u32 zero = 0;
	struct tg_ctl *ctl = tg_ctl.lookup(&zero);
	__u32 sel = ctl ? *(volatile __u32 *)&ctl->sel : TG_NO_SLOT;
	__u32 aslot = sel & 0xff;
	__u32 sslot = (sel >> 8) & 0xff;
	if (aslot >= TG_SLOTS) {
		tg_count_reason(TG_R_NOCONFIG, p.len);
		return XDP_PASS;
	}
	struct tg_set_cfg *acfg = tg_sets.lookup(&aslot);
	if (!acfg) {
		tg_count_reason(TG_R_NOCONFIG, p.len);
		return XDP_PASS;
	}

	__u64 now = tg_now();
	struct tg_verdict matched;
	struct tg_src *as;  /* the active set's entry for the source, if it had one */
	struct tg_verdict v = tg_eval(aslot, acfg, &p, now, 0, 0, 0, &matched, &as);
	tg_count_rule(tg_rule_counter(aslot, v.rule), v, p.len);
	__u32 reason = v.reason;
	if (p.ext_unparsed && (v.rule == TG_RULE_EXTHDR || v.rule == TG_RULE_DEFAULT))
		reason = v.drop ? TG_R_EXT_DROP : TG_R_EXT_PASS;
	tg_count_reason(reason, p.len);

	if (sslot < TG_SLOTS) {
		struct tg_set_cfg *scfg = tg_sets.lookup(&sslot);
		if (scfg) {
			struct tg_verdict sv = matched;
			/* a candidate that matches like the active set takes its match;
			 * its limits run on its state in the active set's entry where
			 * it keeps it there, else on entries of its own (tg_eval) */
			const struct tg_verdict *known = 0;
			int limited = 0;
			if (scfg->same_match_as == aslot) {
				known = &matched;
				if (sv.reason == TG_R_PASS)
					limited = tg_shadow_limit(aslot, acfg, sslot, scfg, &p, now,
								  &sv, v.drop, as);
			}
			if (!limited) {
				struct tg_verdict smatched;
				struct tg_src *own;
				sv = tg_eval(sslot, scfg, &p, now, 1, v.drop, known, &smatched, &own);
			}
			struct tg_rule_count *sc = tg_rule_counter(sslot, sv.rule);
			if (sc) {
				sc->shadow_pkts++;
				if (sv.drop) {
					sc->shadow_drop++;
					sc->shadow_bytes_drop += p.len;
					/* where the active set passed. Arithmetic, not a branch:
					 * v.drop is a known constant on many of the verifier's
					 * paths through the active set, and a branch decided by a
					 * known value makes the verifier keep those paths apart
					 * through the whole shadow evaluation above (states that
					 * differ in a value a branch depended on are not pruned):
					 * 498k instructions verified instead of 369k, a quarter
					 * of every load's verifier time (bench/compile_time.py). */
					sc->shadow_new_drop += (v.drop & 1) ^ 1;
				}
			}
		}
	}
	return v.drop ? XDP_DROP : XDP_PASS;
}
