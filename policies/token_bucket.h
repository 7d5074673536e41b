/*
 * Token bucket (API.md §3): a bucket starts full at `capacity` tokens and refills continuously at
 * `refill_per_sec`; each admitted request takes one token. Time is kept in integer nano-tokens
 * (1 token = 10^9 nano-tokens) so a refill of refill_per_sec tokens per second adds exactly
 * refill_per_sec nano-tokens per elapsed nanosecond: however small the steps between calls, no
 * fraction of a token is ever rounded away and the bucket never drifts.
 *
 * Invariants: 0 <= nanotokens <= capacity * 10^9; updated_ns never moves backwards (a clock
 * reading older than the last one is treated as "no time passed"). A bucket may be kept across a
 * config change: with less capacity it is clamped at the next call.
 *
 * Take N / give back N exist for a cluster quota-leasing layer (a node leases a batch of tokens
 * from the replicated budget, spends them locally, and gives back what it did not use).
 *
 * Memory: 16 bytes per bucket (struct gw_token_bucket); the config is shared by all keys of a
 * route.
 */
#ifndef GW_TOKEN_BUCKET_H
#define GW_TOKEN_BUCKET_H

#include "policy.h"

#define GW_TOKEN_BUCKET_CAPACITY_MAX UINT64_C(1000000000) /* keeps capacity * 10^9 in 64 bits */
#define GW_TOKEN_BUCKET_REFILL_MAX UINT64_C(1000000000)

struct gw_token_bucket_config {
  uint64_t capacity;       /* tokens, 1..GW_TOKEN_BUCKET_CAPACITY_MAX */
  uint64_t refill_per_sec; /* tokens per second, 1..GW_TOKEN_BUCKET_REFILL_MAX */
};

struct gw_token_bucket {
  uint64_t nanotokens; /* tokens available, in units of 10^-9 token */
  uint64_t updated_ns; /* the clock reading the refill was last applied at */
};

/* 0 if cfg is usable, else GW_POLICY_EINVALID_CONFIG. Every other function assumes a valid cfg. */
int gw_token_bucket_config_check(const struct gw_token_bucket_config *cfg);

/* Sets b full (capacity tokens) as of now_ns. */
void gw_token_bucket_init(struct gw_token_bucket *b, const struct gw_token_bucket_config *cfg,
                          uint64_t now_ns);

/*
 * Takes n tokens if at least n are available at now_ns (all or nothing) and returns true;
 * otherwise takes nothing and returns false. n = 0 always succeeds.
 */
bool gw_token_bucket_try_take(struct gw_token_bucket *b, const struct gw_token_bucket_config *cfg,
                              uint64_t n, uint64_t now_ns);

/* Gives n tokens back (e.g. an unused lease); the bucket never exceeds capacity. */
void gw_token_bucket_give(struct gw_token_bucket *b, const struct gw_token_bucket_config *cfg,
                          uint64_t n, uint64_t now_ns);

/* Whole tokens available at now_ns. */
uint64_t gw_token_bucket_available(struct gw_token_bucket *b,
                                   const struct gw_token_bucket_config *cfg, uint64_t now_ns);

/*
 * Nanoseconds from now_ns until n tokens are available (0 if they are now); UINT64_MAX if n
 * exceeds capacity and so never will be.
 */
uint64_t gw_token_bucket_wait_ns(struct gw_token_bucket *b,
                                 const struct gw_token_bucket_config *cfg, uint64_t n,
                                 uint64_t now_ns);

/*
 * The per-request decision: takes one token if one is available and returns true, else false.
 * When info is not NULL it is filled for the header fields: q = capacity, w = seconds to refill
 * an empty bucket (rounded up), r = whole tokens left, t = seconds until full, Retry-After =
 * seconds until the next token (rounded up; only on a refusal).
 */
bool gw_token_bucket_admit(struct gw_token_bucket *b, const struct gw_token_bucket_config *cfg,
                           uint64_t now_ns, struct gw_ratelimit_info *info);

#endif
