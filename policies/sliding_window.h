/*
 * Exact sliding-window limiter (API.md §3): at most `limit` requests are admitted in any
 * trailing window of `window_ms`. A request at time t is admitted iff fewer than `limit`
 * admissions happened in (t - window, t]; equivalently, iff the oldest of the last `limit`
 * admissions is at least window_ms old. An approximation (two fixed windows weighted, as some
 * proxies do) can admit up to twice the limit across a window edge, so this keeps the admission
 * times themselves.
 *
 * Representation: a ring of runs (time, count). Admission times are rounded UP to a multiple of
 * `granularity_ns` and equal times are coalesced into one run. Rounding up can only make an
 * admission look younger than it was, so the limit is never exceeded in any real trailing
 * window; the price is that a slot frees at most one granule late. granularity_ns = 1 keeps every
 * distinct nanosecond (the plain ring of `limit` timestamps); timestamps that are whole
 * milliseconds behave identically at any granularity that divides 1 ms.
 *
 * Memory per key: gw_sliding_window_state_bytes(cfg) = 24 + 12 * runs, where
 * runs = min(limit, window_ns / granularity_ns + 2). Examples: limit 1000 per 60 s: 12,024 bytes
 * at any granularity up to 60 ms; limit 100,000 per 60 s at 1 ms granularity: 720,048 bytes
 * instead of 1.2 MB for every timestamp. The state is a fixed-size blob, so the key table can
 * hold it inline.
 *
 * Invariants: runs are in increasing time order; total = sum of run counts <= limit; a clock
 * reading older than the newest run is counted in the newest run (conservative). A state must be
 * re-initialised when limit, window_ms or granularity_ns change (its size depends on them); a
 * stale one is never overrun, it refuses once its ring is full.
 */
#ifndef GW_SLIDING_WINDOW_H
#define GW_SLIDING_WINDOW_H

#include "policy.h"

#define GW_SLIDING_WINDOW_LIMIT_MAX UINT64_C(100000000)
#define GW_SLIDING_WINDOW_MS_MAX UINT64_C(86400000) /* one day */

struct gw_sliding_window_config {
  uint64_t limit;          /* admissions per window, 1..GW_SLIDING_WINDOW_LIMIT_MAX */
  uint64_t window_ms;      /* 1..GW_SLIDING_WINDOW_MS_MAX */
  uint64_t granularity_ns; /* 0 or 1 = exact nanoseconds; else rounding unit, <= window */
};

struct gw_sliding_window {
  uint64_t total; /* admissions held in the runs */
  uint32_t head;  /* index of the oldest run */
  uint32_t len;   /* runs in use */
  uint32_t cap;   /* runs the blob has room for */
  uint32_t reserved;
  uint64_t runs[]; /* cap run times (ns, rounded up), then cap uint32_t counts */
};

/* 0 if cfg is usable, else GW_POLICY_EINVALID_CONFIG. Every other function assumes a valid cfg. */
int gw_sliding_window_config_check(const struct gw_sliding_window_config *cfg);

/* Bytes of one window's state for cfg (a multiple of 8). */
size_t gw_sliding_window_state_bytes(const struct gw_sliding_window_config *cfg);

/* Initialises an empty window in a blob of gw_sliding_window_state_bytes(cfg) bytes (8-aligned). */
void gw_sliding_window_init(struct gw_sliding_window *w,
                            const struct gw_sliding_window_config *cfg);

/*
 * The per-request decision: admits and records the request if fewer than limit were admitted in
 * (now - window, now], returning true; else returns false and records nothing. When info is not
 * NULL it is filled: q = limit, w = window in seconds (rounded up), r = slots left, t = seconds
 * until every current admission has left the window, Retry-After = seconds until the oldest one
 * leaves (only on a refusal). O(1) amortised; no allocation.
 */
bool gw_sliding_window_admit(struct gw_sliding_window *w,
                             const struct gw_sliding_window_config *cfg, uint64_t now_ns,
                             struct gw_ratelimit_info *info);

/* Admissions counted in the trailing window at now_ns. */
uint64_t gw_sliding_window_count(struct gw_sliding_window *w,
                                 const struct gw_sliding_window_config *cfg, uint64_t now_ns);

/* Nanoseconds from now_ns until a slot frees (0 if one is free now). */
uint64_t gw_sliding_window_wait_ns(struct gw_sliding_window *w,
                                   const struct gw_sliding_window_config *cfg, uint64_t now_ns);

#endif
