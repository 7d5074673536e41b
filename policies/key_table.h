/*
 * Bounded key table for per-key limiter state (API.md §2, `key`: `client_ip`, `header:NAME`).
 * Maps a key (opaque bytes) to a fixed-size value blob (a token bucket or a sliding window) with
 * at most `max_keys` entries. When full, inserting a new key evicts the least recently used one
 * and counts the eviction (the caller logs or exports the counter), so a flood of distinct keys
 * costs a bounded amount of memory and only ever forgets the coldest keys.
 *
 * All memory is reserved at creation (one slot array, one bucket array; pages are touched only as
 * slots are first used); lookups, inserts and evictions allocate nothing and are O(1) on average:
 * chained hashing over a power-of-two bucket array at load factor <= 0.5, and an intrusive doubly
 * linked LRU list. The hash is SipHash-1-3 keyed with the caller's secret seed, so chosen keys
 * cannot be aimed at one chain. Keys longer than key_max_bytes are stored as a 128-bit SipHash
 * digest of the key (two independent keyed 64-bit hashes), so arbitrarily long header values
 * stay bounded; two long keys are confused only on a 128-bit collision.
 *
 * Not thread-safe: one table per worker, or a lock around each call (as the benchmark does).
 *
 * Memory: gw_key_table_memory_bytes(cfg) = max_keys * (16 + 8 + round8(key_max_bytes) +
 * round8(value_bytes)) + 4 * buckets + sizeof(table), buckets = next power of two >= 2 * max_keys.
 * (16 bytes of links and hash bits per key live in a separate dense array; see key_table.c.)
 */
#ifndef GW_KEY_TABLE_H
#define GW_KEY_TABLE_H

#include "hash.h"
#include "policy.h"

#define GW_KEY_TABLE_MAX_KEYS (UINT32_C(1) << 28)
#define GW_KEY_TABLE_KEY_MIN 16 /* room for a digest */
#define GW_KEY_TABLE_KEY_MAX 1024
#define GW_KEY_TABLE_VALUE_MAX (1u << 24)

struct gw_key_table_config {
  uint32_t max_keys;       /* 1..GW_KEY_TABLE_MAX_KEYS */
  uint32_t key_max_bytes;  /* keys up to this length are stored as they are; 16..1024 */
  uint32_t value_bytes;    /* size of each value blob, 0..GW_KEY_TABLE_VALUE_MAX; 8-aligned */
  struct gw_hash_key seed; /* secret per table, e.g. from getrandom() at startup */
};

struct gw_key_table;

/* Flags reported by gw_key_table_get_or_insert. */
enum {
  GW_KEY_TABLE_CREATED = 1, /* the key was not present: the value is zeroed, initialise it */
  GW_KEY_TABLE_EVICTED = 2, /* making room evicted the least recently used key */
};

/* 0 if cfg is usable, else GW_POLICY_EINVALID_CONFIG. */
int gw_key_table_config_check(const struct gw_key_table_config *cfg);

/* Bytes the table reserves for cfg (see the formula above). */
size_t gw_key_table_memory_bytes(const struct gw_key_table_config *cfg);

/*
 * Creates a table; on success *out owns it (free with gw_key_table_destroy) and 0 is returned.
 * Errors: GW_POLICY_EINVALID_CONFIG, GW_POLICY_ENOMEM.
 */
int gw_key_table_create(const struct gw_key_table_config *cfg, struct gw_key_table **out);

/* Frees the table and every value; t may be NULL. */
void gw_key_table_destroy(struct gw_key_table *t);

/*
 * The value for key, marking it most recently used; NULL if the key is absent. The pointer stays
 * valid until the key is removed or evicted (any later insert of another key may evict it).
 */
void *gw_key_table_find(struct gw_key_table *t, const void *key, size_t len);

/* Whether key is present, without changing the LRU order. */
bool gw_key_table_contains(const struct gw_key_table *t, const void *key, size_t len);

/*
 * The value for key, inserting the key first if absent (evicting the least recently used key if
 * the table is full), and marking it most recently used. *value receives the blob (8-aligned,
 * value_bytes long, zeroed when created); *flags (if not NULL) receives GW_KEY_TABLE_CREATED and
 * GW_KEY_TABLE_EVICTED bits. Always returns 0: a full table evicts rather than fails.
 */
int gw_key_table_get_or_insert(struct gw_key_table *t, const void *key, size_t len, void **value,
                               unsigned *flags);

/* Removes key; returns 0, or GW_POLICY_ENOT_FOUND if it was absent. */
int gw_key_table_remove(struct gw_key_table *t, const void *key, size_t len);

struct gw_key_table_stats {
  uint32_t count; /* keys held */
  uint32_t max_keys;
  uint64_t inserts;   /* keys created since creation */
  uint64_t evictions; /* keys evicted to make room since creation */
};

void gw_key_table_stats(const struct gw_key_table *t, struct gw_key_table_stats *out);

#endif
