/* Map declarations. Every map is pinned under TG_PIN_DIR (one directory per
 * interface) so the filter keeps working while no agent runs and a new agent
 * adopts the same maps. Sizes come from the agent as -D flags. */
#ifndef TIDEGATE_MAPS_H
#define TIDEGATE_MAPS_H

#ifndef TG_PIN_DIR
#error "TG_PIN_DIR must be defined by the loader"
#endif
#ifndef TG_MAX_SOURCES
#define TG_MAX_SOURCES 1048576
#endif
#ifndef TG_MAX_CIDRS
#define TG_MAX_CIDRS 393216
#endif

BPF_TABLE_PINNED("array", u32, struct tg_ctl, tg_ctl, 1, TG_PIN_DIR "/tg_ctl");
BPF_TABLE_PINNED("array", u32, struct tg_set_cfg, tg_sets, TG_SLOTS, TG_PIN_DIR "/tg_sets");
BPF_TABLE_PINNED("array", u32, struct tg_rule_cfg, tg_rules, TG_SLOTS * TG_RULE_IDX,
		 TG_PIN_DIR "/tg_rules");
BPF_TABLE_PINNED("lpm_trie", struct tg_cidr4_key, struct tg_cidr_val, tg_cidrs4, TG_MAX_CIDRS,
		 TG_PIN_DIR "/tg_cidrs4", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct tg_cidr6_key, struct tg_cidr_val, tg_cidrs6, TG_MAX_CIDRS,
		 TG_PIN_DIR "/tg_cidrs6", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("array", u32, u64, tg_ports, TG_PORT_ENTRIES, TG_PIN_DIR "/tg_ports");
/* Per-source state. BPF_F_NO_COMMON_LRU gives each CPU its own LRU lists
 * (TG_MAX_SOURCES / CPUs entries each, one shared hash table): an insert
 * under a spoofed-source flood takes a free entry or evicts from its own
 * CPU's list without the global LRU lock, about half the cost per new source
 * (bench/packet_path.py, "2M churn"), and a flood arriving on one CPU evicts
 * only that CPU's entries. */
BPF_TABLE_PINNED("lru_hash", struct tg_state_key, struct tg_src, tg_state, TG_MAX_SOURCES,
		 TG_PIN_DIR "/tg_state", BPF_F_NO_COMMON_LRU);
BPF_TABLE_PINNED("percpu_array", u32, struct tg_count, tg_stats, TG_REASONS, TG_PIN_DIR "/tg_stats");
BPF_TABLE_PINNED("percpu_array", u32, struct tg_rule_count, tg_rule_stats, TG_SLOTS * TG_RULE_IDX,
		 TG_PIN_DIR "/tg_rule_stats");
BPF_TABLE_PINNED("percpu_array", u32, u64, tg_lru, TG_LRU_COUNTERS, TG_PIN_DIR "/tg_lru");

/* de Bruijn index -> bit number, filled once by the control plane */
BPF_TABLE_PINNED("array", u32, u32, tg_debruijn, 64, TG_PIN_DIR "/tg_debruijn");

#ifdef TG_REPLAY_CLOCK
/* Replay builds read time from this map, set from the capture's timestamps
 * before each packet, so token buckets follow the capture's own pacing. */
BPF_TABLE("array", u32, u64, tg_clock, 1);
#endif

#endif
