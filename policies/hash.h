/*
 * Keyed hashing for the key table and the idempotency store: SipHash (Aumasson and Bernstein,
 * "SipHash: a fast short-input PRF", 2012). Keyed with a per-table secret, a flood of chosen
 * keys cannot be aimed at one hash chain. SipHash-1-3 (as Rust's HashMap uses) for table
 * lookups; SipHash-2-4 for the 128-bit request fingerprint, where it is computed twice with two
 * fixed keys.
 */
#ifndef GW_HASH_H
#define GW_HASH_H

#include <stddef.h>
#include <stdint.h>

struct gw_hash_key {
  uint64_t k0, k1;
};

/* SipHash with c compression and d finalisation rounds over len bytes of data. */
uint64_t gw_siphash(const struct gw_hash_key *key, int c_rounds, int d_rounds, const void *data,
                    size_t len);

/* Incremental SipHash-2-4, for hashing several fields without concatenating them. */
struct gw_siphash_state {
  uint64_t v0, v1, v2, v3;
  uint64_t tail;   /* bytes not yet compressed, little-endian */
  size_t tail_len; /* 0..7 */
  uint64_t total;  /* bytes absorbed */
};

void gw_siphash24_init(struct gw_siphash_state *st, const struct gw_hash_key *key);
void gw_siphash24_update(struct gw_siphash_state *st, const void *data, size_t len);
uint64_t gw_siphash24_final(struct gw_siphash_state *st);

#endif
