/* Keys: a source address masked to the configured prefix, per rule set
 * epoch and rule, so each rule set starts with fresh buckets (a rollback
 * immediately lifts blocks made by the set it replaces) while a promoted
 * shadow set keeps the state it built up in entries of its own (not what it
 * kept in the active set's entries: struct tg_shadow). */
#ifndef TIDEGATE_KEYS_H
#define TIDEGATE_KEYS_H

static __always_inline void tg_state_key(struct tg_state_key *k, const struct tg_pkt *p,
					 const struct tg_mask *m, __u32 epoch, __u32 rule,
					 __u8 kind)
{
	k->addr_hi = p->addr_hi & m->hi;
	k->addr_lo = p->addr_lo & m->lo;
	k->epoch = epoch;
	k->rule = (__u8)rule;
	k->kind = kind;
	k->pad = 0;
}

#endif
