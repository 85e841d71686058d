/* Shared layout of tidegate's BPF maps.
 *
 * These structs and constants are the contract between the XDP program and
 * the control plane. Its one Python copy is control/tidegate/kernel/layout.py:
 * tests/unit/test_layout_contract.py fails when the two disagree, and the
 * compile child checks the structs against BCC's view of them at every
 * compile. Changing a struct here changes the map format: a running agent
 * refuses to adopt pinned maps whose key or value size differs.
 */
#ifndef TIDEGATE_LAYOUT_H
#define TIDEGATE_LAYOUT_H

/* Three rule-set slots: one active, one shadow (candidate) and one free to
 * stage the next apply while the other two are in use. */
#define TG_SLOTS 3
#define TG_NO_SLOT 0xff

/* Per-slot rule index space: 64 user rules, then pseudo-rules so that every
 * verdict is attributable to something an operator can name. */
#define TG_MAX_RULES 64
#define TG_RULE_DEFAULT 64
#define TG_RULE_DENYLIST 65
#define TG_RULE_ALLOWLIST 66
#define TG_RULE_EXTHDR 67    /* IPv6 packets whose extension headers were not all walked */
#define TG_RULE_IDX 68

/* One packet of token-bucket credit, in the bucket's fixed-point unit.
 * Rates are then "units per nanosecond" == packets (or bytes) per second,
 * so refill is one multiply and no division on the packet path. */
#define TG_UNIT 1000000000ULL

/* Verdict reasons (global per-CPU counters are indexed by these). */
#define TG_R_PASS 0      /* matched a rule or the default and was within its rate */
#define TG_R_ALLOW 1     /* allow list */
#define TG_R_DENY 2      /* deny list or a rule with action drop */
#define TG_R_RATE 3      /* per-source bucket empty */
#define TG_R_PREFIX 4    /* per-prefix bucket empty */
#define TG_R_BLOCKED 5   /* source inside its block_seconds penalty */
#define TG_R_UNPARSED 6  /* not Ethernet/IPv4/IPv6 the program can read: passed */
#define TG_R_NOCONFIG 7  /* no active rule set (never after a normal start) */
/* IPv6 packets with more extension headers than the parser walks (so no L4
 * header, no port), decided by the rule set's ipv6_unparsed_extensions
 * policy: passed or dropped by it, or by the default rule's limits. Allow
 * and deny lists still decide first (and count as allow / deny). */
#define TG_R_EXT_PASS 8
#define TG_R_EXT_DROP 9
#define TG_REASONS 10

/* set_cfg.flags */
#define TG_SET_HAS_TRIE 1   /* at least one CIDR entry: look the source up */
#define TG_SET_HAS_PORTS 2  /* at least one (protocol, port) entry */
#define TG_SET_EXT_DEFAULT 4 /* unwalked IPv6 extension chains go to the default rule,
			      * not to TG_RULE_EXTHDR (whose action is pass or drop) */

/* rule_cfg.action */
#define TG_ACT_LIMIT 0
#define TG_ACT_PASS 1
#define TG_ACT_DROP 2

/* rule_cfg.flags */
#define TG_RF_PKT 1      /* packet-rate bucket */
#define TG_RF_BYTES 2    /* byte-rate bucket */
#define TG_RF_PREFIX 4   /* per-prefix bucket */
#define TG_RF_PFX_BYTES 8

/* rule_cfg.shadow_link: where a shadow set's rule keeps its state, written
 * when the control plane links the shadow slot to an active one (after
 * same_match_as, before the flip that makes that slot active). Bits 0-1:
 * the active slot + 1 that the rest holds for (0: none; a value naming a
 * slot that is not active is ignored, as same_match_as is). Then, per family,
 * the rule keeps its per-source state in the active set's entry for the
 * source (struct tg_shadow: both rules keep per-source state, this one no
 * byte bucket, both sets key sources alike) and its prefix bucket in the
 * active set's entry for the prefix (both limit prefixes keyed alike, this
 * one counts no bytes). One byte, so a packet reads the slot and the modes
 * in one load and never a mix of two links. */
#define TG_LINK_SLOT 3
#define TG_LINK_STATE4 4
#define TG_LINK_PFX4 8
#define TG_LINK_STATE6 16
#define TG_LINK_PFX6 32

/* cidr_val.flags */
#define TG_CF_ALLOW 1
#define TG_CF_DENY 2

/* state key kinds */
#define TG_KIND_SOURCE 0
#define TG_KIND_PREFIX 1

/* The layout of struct tg_src that the pinned tg_state map was made for,
 * written by the control plane next to the selection (0 before it was kept):
 * a program whose tg_src has another layout of the same size gets a new
 * tg_state map, as one of another size does (the loader's prepare_pin_dir).
 * Change it with every change of struct tg_src. */
#define TG_STATE_LAYOUT 4

/* Prefix credit windows (bpf/prefix.h): now >> TG_CREDIT_SHIFT, about 268 ms.
 * Credit lent in window w is good until window w + 1 ends. */
#define TG_CREDIT_SHIFT 28

struct tg_ctl {
	/* bits 0-7 active slot, bits 8-15 shadow slot (TG_NO_SLOT = none).
	 * One 32-bit word so a reader loads the selection in one instruction. */
	__u32 sel;
	__u32 state_layout;  /* TG_STATE_LAYOUT; the program does not read it */
};

/* Addresses are kept as 16 bytes: IPv6 as is, IPv4 as ::ffff:a.b.c.d.
 * hi/lo are the two halves loaded from memory as they are (network order
 * bytes), so masking is a plain AND. */
struct tg_mask {
	__u64 hi;
	__u64 lo;
};

struct tg_limit {
	__u64 rate;       /* units per ns (== pps) */
	__u64 burst;      /* units */
	__u64 fill_ns;    /* time to fill an empty bucket; caps elapsed time */
	__u64 brate;      /* byte units per ns (== bytes/s); 0 = no byte limit */
	__u64 bburst;
	__u64 bfill_ns;
};

struct tg_rule_cfg {
	__u32 action;
	__u16 flags;
	__u8 shadow_link;  /* TG_LINK_*: shadow slots only */
	__u8 pad;
	__u64 block_ns;
	struct tg_limit src;
	struct tg_limit pfx;
	struct tg_mask pfx4;
	struct tg_mask pfx6;
};

struct tg_set_cfg {
	__u64 version;     /* the store's version number of this rule set */
	__u32 epoch;       /* per-source state is keyed by epoch: fresh buckets per set */
	__u32 flags;
	__u64 any_src_mask;              /* rules whose sources are "any" */
	/* by IP protocol number: rules accepting it on any port. Indexed by the
	 * packet's own protocol byte so no per-class branches are needed. */
	__u64 proto_mask[256];
	struct tg_mask key4;             /* per-source key masks (ipv4_prefix, ipv6_prefix) */
	struct tg_mask key6;
	/* Shadow slots only: the active slot whose matching (tries, port table,
	 * protocol and any-source masks) is identical to this set's, so a packet
	 * reuses the active set's classification instead of repeating it; the
	 * usual candidate changes limits, not what matches. TG_NO_SLOT when they
	 * differ. A value naming a slot that is not the active one is ignored,
	 * so it can only go stale towards "classify again". */
	__u32 same_match_as;
	__u32 pad;
};

/* Source CIDR tries, one per family: an IPv4 lookup walks a 64-bit key
 * (slot + address) instead of the 160 bits of a unified 128-bit space,
 * which measured 23 ns against 39 per lookup (bench/packet_path.py probes).
 * The slot leads the key so one trie holds all three slots. */
struct tg_cidr4_key {
	__u32 prefixlen;   /* 32 (slot) + IPv4 prefix length */
	__u32 slot;
	__u32 addr;        /* network order, as in the packet */
};

struct tg_cidr6_key {
	__u32 prefixlen;   /* 32 (slot) + IPv6 prefix length */
	__u32 slot;
	__u64 addr_hi;
	__u64 addr_lo;
};

struct tg_cidr_val {
	__u64 rule_mask;   /* rules with a source CIDR containing this prefix */
	__u32 flags;       /* TG_CF_ALLOW / TG_CF_DENY */
	__u32 pad;
};

/* The (protocol, port) table is an array indexed by
 * ((slot * 2 + is_udp) << 16 | port): a direct load where a hash lookup
 * measured three times the cost. 0 = no rule lists this port. */
#define TG_PORT_IDX(slot, udp, port) ((((slot) * 2 + (udp)) << 16) | (port))
#define TG_PORT_ENTRIES (TG_SLOTS * 2 * 65536)

struct tg_state_key {
	__u64 addr_hi;
	__u64 addr_lo;
	__u32 epoch;
	__u8 rule;
	__u8 kind;
	__u16 pad;
};

/* A shadow set's state for one source or prefix, kept in the active set's
 * entry for it (struct tg_src.sh) when the shadow set matches like the active
 * one and keys its sources (and, for a prefix, its prefixes) alike: a packet
 * then finds both sets' state with one lookup, where a separate shadow entry
 * cost a second, cache-missing one (bench/packet_path.py, shadow rows). The
 * control plane reads it as a row of its own, keyed by the shadow set's epoch
 * (kernel/readers.py), so the shadow state looks the same whichever place
 * holds it. What it does not keep: a byte bucket (a shadow rule with a byte
 * limit keeps separate entries), and byte counts (a shadow set's byte figures
 * come from its per-rule counters). A prefix never blocks: in prefix
 * entries, blocked_until holds the prefix's loans (bpf/prefix.h), the packets
 * lent in window credit_win (its low 32 bits) and in the window before. */
struct tg_shadow {
	__u64 tokens;
	__u64 last_ns;
	__u64 packets;
	__u64 drops;          /* would-drops */
	__u64 new_drops;      /* would-drops the active set passed */
	__u64 blocked_until;  /* sources: valid when flags has TG_SF_BLOCKED; prefixes: loans */
	__u64 first_ns;
	__u32 credit_win;     /* prefix credit, as in struct tg_src */
	__u8 flags;           /* TG_SF_BLOCKED, or for prefixes TG_SF_LENT */
	__u8 pfx_credit;
	__u8 pfx_owed;
	__u8 pad;
};

/* Per-source (and per-prefix) state, 184 bytes. In the LRU hash an entry is
 * a 48-byte element header, the 24-byte key, then this value: 256 bytes, four
 * 64-byte cache lines, the first holding the header and the key's address,
 * the second the rest of the key and the value's first 56 bytes. The fields a
 * packet of a known source reads or writes (bucket, counters, cached
 * classification, prefix credit) are those 56 bytes, so a cache-missing
 * lookup costs two lines of the entry, not four (bench/packet_path.py,
 * cycled cases); the third line is read only when a flag says so, on a drop
 * or by the control plane, and the fourth (sh) only while a shadow set
 * keeps its state there. */
struct tg_src {
	__u64 tokens;
	__u64 last_ns;
	__u64 packets;
	__u64 bytes;
	/* Source entries: the classification cache (bpf/classify.h): the trie's
	 * answer for one address under this entry's rule set (the key's epoch).
	 * cls_lo is the address's low half; the high half is compared only
	 * when the key does not hold it (IPv6 keys shorter than /64). */
	__u64 cls_lo;
	/* Prefix credit (bpf/prefix.h), in credit windows (now >> TG_CREDIT_SHIFT).
	 * Source entries: the window of the last prefix visit, where the credit
	 * held was lent. Prefix entries: the window pfx_lent counts. */
	__u32 credit_win;
	__u32 pfx_lent;    /* prefix entries: packets lent in window credit_win */
	__u8 cls_ok;       /* 1: cls_* hold a trie answer */
	__u8 flags;        /* TG_SF_* */
	__u8 pfx_credit;   /* packets still to send on tokens taken from the prefix */
	__u8 pfx_owed;     /* packets sent on credit not yet added to the prefix */
	__u32 pfx_owed_bytes;
	/* read only when flags say so, on drops, or by the control plane */
	__u64 blocked_until;  /* valid when flags has TG_SF_BLOCKED */
	__u64 byte_tokens;    /* rules with a byte limit */
	__u64 drops;       /* enforced drops, or would-drops for shadow entries */
	__u64 new_drops;   /* shadow only: would-drops the active set passed */
	__u64 first_ns;    /* CLOCK_MONOTONIC (coarse) of the first packet */
	__u64 cls_mask;    /* the trie's rule mask; valid when flags has TG_SF_CLS_MASK */
	__u64 cls_hi;
	__u32 pfx_lent_prev;  /* prefix entries: packets lent in the window before credit_win */
	__u32 sh_epoch;       /* the epoch of the shadow set sh belongs to (0: none) */
	struct tg_shadow sh;
};

/* tg_src.flags */
#define TG_SF_BLOCKED 1   /* blocked_until was set: compare it with now */
#define TG_SF_CLS_MASK 2  /* cls_mask is not 0 */
#define TG_SF_LENT 4      /* prefix entries: pfx_lent or pfx_lent_prev is not 0 */

struct tg_count {
	__u64 packets;
	__u64 bytes;
};

struct tg_rule_count {
	__u64 pass_pkts;
	__u64 pass_bytes;
	__u64 drop_pkts;
	__u64 drop_bytes;
	__u64 drop_rate;     /* drop_pkts split by reason */
	__u64 drop_prefix;
	__u64 drop_blocked;
	__u64 drop_deny;
	__u64 shadow_pkts;   /* this slot evaluated as the shadow set */
	__u64 shadow_drop;
	__u64 shadow_new_drop;
	__u64 shadow_bytes_drop;
};

#define TG_LRU_INSERTS 0
#define TG_LRU_FAILS 1
#define TG_LRU_COUNTERS 2

#endif
