/*
 * Where policy state lives. The gateway keeps limiter state and idempotency records behind this
 * small, versioned ops table (in the manner of sqlite3_vfs), so the same policy code runs on the
 * embedded memory store, on the Raft-replicated state machine, or on Redis.
 *
 * Objects: a limiter (one token bucket or sliding window per key, bounded key count) and an
 * idempotency store (records keyed by key within one route). Each object is created for one
 * route's policy and is safe to call from any worker thread.
 *
 * The synchronous functions complete before they return (memory). Backends that need a round
 * trip (raft, redis) provide the _async forms instead: the call returns 0 and later fills the
 * struct gw_store_op and calls op->done(op) exactly once, from the backend's own thread (or
 * returns a negative error at once and never calls done). For each operation a backend sets
 * either form; callers use the _async one when it is set. A backend may set both forms of
 * limiter_admit: then the synchronous one never waits (it refuses when it cannot decide
 * locally), and limiter_admit_async may decide at once (it returns GW_STORE_DONE with op
 * filled, and done is not called) or later.
 */
#ifndef GW_STORE_H
#define GW_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "hash.h"
#include "idempotency.h"
#include "policy.h"
#include "sliding_window.h"
#include "token_bucket.h"

#define GW_STORE_OPS_VERSION 3

/* limiter_admit_async decided at once: op is filled and done is not called. */
#define GW_STORE_DONE 1

enum gw_limiter_kind { GW_LIMITER_TOKEN_BUCKET, GW_LIMITER_SLIDING_WINDOW };

struct gw_limiter_spec {
  enum gw_limiter_kind kind;
  struct gw_token_bucket_config tb;   /* for GW_LIMITER_TOKEN_BUCKET */
  struct gw_sliding_window_config sw; /* for GW_LIMITER_SLIDING_WINDOW */
  uint32_t max_keys;                  /* per-key state kept for at most this many keys (LRU) */
  struct gw_hash_key seed;            /* secret for the key hash */
};

struct gw_limiter_stats {
  uint32_t keys;
  uint64_t admitted, rejected, evictions;
};

/* Called with a replayed response while the store's lock is held: copy what you need. */
typedef int (*gw_store_copy_fn)(void *ctx, const struct gw_idem_response *resp);

/* One asynchronous operation: its results, then the completion. Owned by the caller. */
struct gw_store_op {
  int err; /* 0, or the backend could not answer (the route's on_store_error applies) */
  bool admitted; /* limiter */
  bool evicted;
  struct gw_ratelimit_info info;
  enum gw_idem_decision decision; /* idempotency begin (a replay went through copy first) */
  struct gw_idem_claim claim;
  void (*done)(struct gw_store_op *op);
  void *ctx;
};

struct gw_store_ops {
  unsigned version; /* GW_STORE_OPS_VERSION */
  const char *name; /* "memory", "raft", "redis" */

  /* A limiter for spec on the backend instance impl (NULL for memory); *out owns it.
   * Errors: GW_POLICY_EINVALID_CONFIG, GW_POLICY_ENOMEM. */
  int (*limiter_create)(void *impl, const struct gw_limiter_spec *spec, void **out);
  void (*limiter_destroy)(void *lim);
  /*
   * One request for key (len bytes; len 0 is the route's single shared key) at now_ns: true if
   * admitted. info (may be NULL) gets the numbers for the RateLimit and Retry-After fields;
   * *evicted (may be NULL) is set when making room for the key evicted another.
   */
  bool (*limiter_admit)(void *lim, const void *key, size_t len, uint64_t now_ns,
                        struct gw_ratelimit_info *info, bool *evicted);
  void (*limiter_stats)(void *lim, struct gw_limiter_stats *out);
  /* The fill of key's state at now_ns without taking anything: info's limit, remaining and
   * reset (a key never seen reads as full). For the admin API. */
  void (*limiter_peek)(void *lim, const void *key, size_t len, uint64_t now_ns,
                       struct gw_ratelimit_info *info);

  /* An idempotency store on impl; *out owns it. Errors as gw_idem_create. */
  int (*idem_create)(void *impl, const struct gw_idem_config *cfg, void **out);
  void (*idem_destroy)(void *st);
  /*
   * gw_idem_begin for (route, key): on GW_IDEM_REPLAY the stored response is passed to copy
   * (under the store's lock) and its return value returned. Other returns as gw_idem_begin.
   */
  int (*idem_begin)(void *st, const char *route, size_t route_len, const char *key,
                    size_t key_len, const struct gw_idem_fingerprint *fp, uint64_t now_ns,
                    enum gw_idem_decision *decision, struct gw_idem_claim *claim,
                    gw_store_copy_fn copy, void *copy_ctx);
  /* gw_idem_finish. */
  int (*idem_finish)(void *st, const struct gw_idem_claim *claim, enum gw_idem_origin origin,
                     const struct gw_idem_response *resp, uint64_t now_ns);
  void (*idem_stats)(void *st, struct gw_idem_stats *out);

  /* The asynchronous forms (see the top of this file). op->done and op->ctx are set by the
   * caller; idem_finish_async may be given op NULL when nobody waits for it. */
  int (*limiter_admit_async)(void *lim, const void *key, size_t len, uint64_t now_ns,
                             struct gw_store_op *op);
  int (*idem_begin_async)(void *st, const char *route, size_t route_len, const char *key,
                          size_t key_len, const struct gw_idem_fingerprint *fp, uint64_t now_ns,
                          gw_store_copy_fn copy, void *copy_ctx, struct gw_store_op *op);
  int (*idem_finish_async)(void *st, const struct gw_idem_claim *claim,
                           enum gw_idem_origin origin, const struct gw_idem_response *resp,
                           uint64_t now_ns, struct gw_store_op *op);
};

/* The embedded store: state in this process's memory, one mutex per object. */
extern const struct gw_store_ops gw_store_memory;

#endif
