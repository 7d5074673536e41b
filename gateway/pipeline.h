/*
 * The per-route policy chain (API.md section 3), between the engine and the policies/ modules:
 *
 *   route match -> idempotency (replay / 409 / 422) -> rate limits -> circuit breaker and
 *   concurrency limit -> proxy with retries -> record the outcome -> degradation -> store the
 *   idempotent response
 *
 * The engine calls gw_pipeline_begin once the request body is complete, then for each try
 * gw_pipeline_try_begin / gw_pipeline_try_end (which says whether to retry and after what
 * backoff), and finally gw_pipeline_finish, which may replace the response with a fallback or a
 * stale one and stores it for idempotent replays. Time is passed in (now_ns, monotonic); nothing
 * here blocks: the backoff is a timer in the engine's loop.
 *
 * The live state of a route's policies (struct gw_route_rt) is shared by every worker; it is
 * created when a config becomes current, and a reload keeps it for a route whose name and
 * policies are unchanged, so limiter and breaker state survive unrelated edits.
 */
#ifndef GW_PIPELINE_H
#define GW_PIPELINE_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "buf.h"
#include "circuit_breaker.h"
#include "degradation.h"
#include "config.h"
#include "idempotency.h"
#include "retry.h"
#include "rng.h"
#include "store.h"

struct gw_stale_cache;

/* A reference-counted piece of a route's live state with its own lock. */
struct gw_part {
  atomic_int refs;
  pthread_mutex_t mu;
  const struct gw_store_ops *ops; /* the store obj belongs to (limiters, idempotency) */
  void *obj;
  char *json; /* owned: the policy's configuration as written, to tell whether it changed */
  void (*destroy)(void *obj);
};

/* Request latency histogram bounds, in microseconds (the last one is +Inf). */
#define GW_LATENCY_BUCKETS 14
extern const uint64_t gw_latency_bounds_us[GW_LATENCY_BUCKETS];

/* Live policy state of one route. Reference counted; shared by the workers. */
struct gw_route_rt {
  atomic_int refs;
  char *name;          /* owned */
  char *policies_json; /* owned: the policies as written, to tell whether a reload changed them */
  /* Stateful parts shared with the next live state of the route when their own policy is
   * unchanged by a reload or an admin change (NULL when the policy is off). */
  struct gw_part *token_bucket;   /* a store limiter (locks inside the store) */
  struct gw_part *sliding_window; /* a store limiter */
  struct gw_part *idem;           /* store idempotency records */
  struct gw_part *breaker;        /* a struct gw_breaker, under the part's mu */

  pthread_mutex_t mu; /* guards the fields below up to the atomics */
  struct gw_retry_budget budget;
  struct gw_rng rng;
  struct gw_degrade degrade; /* forced mode, concurrency limit, slow detector */
  struct gw_stale_cache *stale;

  atomic_ullong requests, rate_limited, breaker_rejected, retries, degraded, replays;
  atomic_ullong store_errors; /* a shared store could not answer */
  atomic_int inflight;
  atomic_ullong status_class[6]; /* [0] other, [1] 1xx ... [5] 5xx */
  atomic_ullong latency_bucket[GW_LATENCY_BUCKETS]; /* requests at or under each bound */
  atomic_ullong latency_sum_us, latency_count;
};

/* Cluster-scope limiters and idempotency records live in this store (backend redis or raft);
 * call once at startup, before the first attach. gw_pipeline_shared_store tells which it is
 * (*ops NULL when none). */
void gw_pipeline_set_shared_store(const struct gw_store_ops *ops, void *impl);
void gw_pipeline_shared_store(const struct gw_store_ops **ops, void **impl);

/* Create the live state of every route of cfg, reusing prev's for unchanged routes. */
int gw_pipeline_attach(struct gw_config *cfg, const struct gw_config *prev);
void gw_route_rt_unref(struct gw_route_rt *rt);

/* What the engine needs to know of a request. */
struct gw_req_view {
  const char *method;
  const char *target; /* path and query as received */
  size_t target_len;
  size_t path_len; /* bytes of target before '?' */
  const void *body;
  size_t body_len;
  const char *client_ip;
  /* The value of a request header, or NULL. */
  const char *(*header)(void *ctx, const char *name);
  void *ctx;
};

/* A response the gateway sends: status, "name\0value\0" header pairs, body. */
struct gw_resp {
  int status;
  struct gw_buf headers;
  size_t header_count;
  struct gw_buf body;
};
bool gw_resp_add_header(struct gw_resp *r, const char *name, const char *value);
const char *gw_resp_header(const struct gw_resp *r, const char *name);
void gw_resp_reset(struct gw_resp *r);

/* Per-request policy state, kept in the engine's request context. */
struct gw_preq {
  struct gw_route_rt *rt; /* a reference while the request lives */
  const struct gw_route *route;
  uint64_t start_ns;
  bool rl_set; /* RateLimit fields to add to the response */
  struct gw_ratelimit_info rl;
  bool conc_held;
  struct gw_breaker_ticket ticket;
  bool retry_on;
  struct gw_retry_state retry;
  bool idem_claimed;
  struct gw_idem_claim claim;
  bool replayed;
  bool upstream_saw; /* some try reached the upstream (it may have acted) */
  const char *degraded; /* the Gateway-Degraded reason, or NULL */
  uint32_t tries;
  bool is_get;
  /* Resuming after a store answered asynchronously: the engine sets wake, which the store's
   * thread calls; the engine then calls gw_pipeline_begin again on the request's worker. */
  int stage;
  int limit_i;
  struct gw_store_op op;
  void (*wake)(void *ctx);
  void *wake_ctx;
};

enum gw_step {
  GW_STEP_PROXY,  /* go to the upstream */
  GW_STEP_ANSWER, /* answer with *resp (an error, a replay or a fallback) now */
  GW_STEP_WAIT,   /* a store answers later: p->wake will be called; then call begin again */
};

/* Reset p for a new request on route. */
void gw_pipeline_init(struct gw_preq *p, const struct gw_route *route, uint64_t now_ns);

/*
 * Runs the admission half of the chain. On GW_STEP_ANSWER, resp holds the answer (errors in the
 * JSON shape of API.md) and the request must still be passed to gw_pipeline_finish with
 * from_upstream false.
 */
enum gw_step gw_pipeline_begin(struct gw_preq *p, const struct gw_req_view *v, uint64_t now_ns,
                               struct gw_resp *resp);

/*
 * Before each try. Returns true with *timeout_ms for this try, or false when no try may be made
 * (the breaker opened meanwhile, the deadline passed, attempts ran out).
 */
bool gw_pipeline_try_begin(struct gw_preq *p, uint64_t now_ns, uint64_t *timeout_ms);

/*
 * After each try. result/status describe it; retry_after_ms is the upstream's Retry-After (-1 if
 * none). Returns true with *delay_ms when another try should follow after that backoff.
 */
bool gw_pipeline_try_end(struct gw_preq *p, enum gw_try_result result, int status,
                         int64_t retry_after_ms, uint64_t duration_ms, uint64_t now_ns,
                         uint64_t *delay_ms);

/*
 * Ends the request. resp is the answer so far: the upstream's response, or the gateway's error
 * (err, 0 when resp came from the upstream, or the gw_err answered). The last try's result is
 * given for the degradation decision. May replace resp with a stale response or a fallback
 * (setting p->degraded), stores it for idempotent replays, and releases what the request held.
 * Returns true when the idempotency record is being stored asynchronously: p->wake will be
 * called, then call gw_pipeline_finish_done before sending resp.
 */
bool gw_pipeline_finish(struct gw_preq *p, const struct gw_req_view *v, enum gw_try_result result,
                        int err, uint64_t now_ns, struct gw_resp *resp);
void gw_pipeline_finish_done(struct gw_preq *p);

/* Fill resp with the JSON error of err (and Retry-After when retry_after_s > 0). */
void gw_resp_error(struct gw_resp *resp, int err, uint64_t retry_after_s);

#endif
