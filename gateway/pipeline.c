/*
 * The per-route policy chain; see pipeline.h for its shape and API.md section 3 for the rules.
 *
 * Shared state is touched under short critical sections: the limiters and idempotency records
 * lock inside the store, the breaker, retry budget, degradation state and stale cache under the
 * route's own mutex. No lock is held across I/O, and none is global.
 */
#include "pipeline.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>

#include <cjson/cJSON.h>

#include "err.h"
#include "hash.h"
#include "log.h"
#include "raft_store.h"
#include "redis.h"

#define STALE_SLOTS 256
#define STALE_MAX_BODY (1u << 20)
#define IDEM_MAX_RECORDS 100000
#define IDEM_MAX_BYTES (64u << 20)
#define LIMITER_MAX_RESERVED_BYTES (256u << 20)

const uint64_t gw_latency_bounds_us[GW_LATENCY_BUCKETS] = {
    1000,    2500,    5000,    10000,    25000,    50000,    100000,
    250000,  500000,  1000000, 2500000,  5000000, 10000000, UINT64_MAX};

/* ---- responses ---- */

bool gw_resp_add_header(struct gw_resp *r, const char *name, const char *value)
{
  size_t nl = strlen(name), vl = strlen(value);
  if (!gw_buf_reserve(&r->headers, nl + vl + 2))
    return false;
  memcpy(r->headers.p + r->headers.len, name, nl + 1);
  memcpy(r->headers.p + r->headers.len + nl + 1, value, vl + 1);
  r->headers.len += nl + vl + 2;
  r->header_count++;
  return true;
}

const char *gw_resp_header(const struct gw_resp *r, const char *name)
{
  const char *p = r->headers.p;
  for (size_t i = 0; i < r->header_count; i++) {
    const char *v = p + strlen(p) + 1;
    if (strcasecmp(p, name) == 0)
      return v;
    p = v + strlen(v) + 1;
  }
  return NULL;
}

void gw_resp_reset(struct gw_resp *r)
{
  r->status = 0;
  r->headers.len = 0;
  r->header_count = 0;
  r->body.len = 0;
}

void gw_resp_error(struct gw_resp *resp, int err, uint64_t retry_after_s)
{
  char body[320];
  int n = snprintf(body, sizeof(body), "{\"error\":{\"code\":\"%s\",\"message\":\"%s\"}}",
                   gw_err_name(err), gw_strerror(err));
  gw_resp_reset(resp);
  resp->status = gw_err_status(err);
  gw_resp_add_header(resp, "Content-Type", "application/json");
  if (retry_after_s) {
    char ra[24];
    snprintf(ra, sizeof(ra), "%llu", (unsigned long long)retry_after_s);
    gw_resp_add_header(resp, "Retry-After", ra);
  }
  gw_buf_set(&resp->body, body, (size_t)n);
}

static int copy_resp(struct gw_resp *dst, const struct gw_resp *src)
{
  gw_resp_reset(dst);
  dst->status = src->status;
  if (!gw_buf_set(&dst->headers, src->headers.p ? src->headers.p : "", src->headers.len) ||
      !gw_buf_set(&dst->body, src->body.p ? src->body.p : "", src->body.len))
    return GW_ENOMEM;
  dst->header_count = src->header_count;
  return 0;
}

/* ---- the stale cache: last good GET response per request target ---- */

struct stale_entry {
  char *key; /* owned; NULL when the slot is empty */
  size_t key_len;
  uint64_t stored_ns;
  struct gw_resp resp;
};

struct gw_stale_cache {
  struct gw_hash_key seed;
  struct stale_entry slots[STALE_SLOTS];
};

static struct stale_entry *stale_slot(struct gw_stale_cache *c, const char *key, size_t len)
{
  return &c->slots[gw_siphash(&c->seed, 1, 3, key, len) % STALE_SLOTS];
}

/* The entry for key if one is stored, else NULL. Under rt->mu. */
static struct stale_entry *stale_find(struct gw_stale_cache *c, const char *key, size_t len)
{
  struct stale_entry *e = stale_slot(c, key, len);
  return e->key && e->key_len == len && memcmp(e->key, key, len) == 0 ? e : NULL;
}

/* Keep resp as the last good response for key (direct-mapped: a collision replaces). */
static void stale_store(struct gw_stale_cache *c, const char *key, size_t len,
                        const struct gw_resp *resp, uint64_t now_ns)
{
  if (resp->body.len > STALE_MAX_BODY)
    return;
  struct stale_entry *e = stale_slot(c, key, len);
  if (!e->key || e->key_len != len || memcmp(e->key, key, len) != 0) {
    char *k = malloc(len + 1);
    if (!k)
      return;
    memcpy(k, key, len);
    k[len] = '\0';
    free(e->key);
    e->key = k;
    e->key_len = len;
  }
  if (copy_resp(&e->resp, resp) != 0) {
    free(e->key);
    e->key = NULL;
    return;
  }
  e->stored_ns = now_ns;
}

static void stale_free(struct gw_stale_cache *c)
{
  if (!c)
    return;
  for (size_t i = 0; i < STALE_SLOTS; i++) {
    free(c->slots[i].key);
    gw_buf_free(&c->slots[i].resp.headers);
    gw_buf_free(&c->slots[i].resp.body);
  }
  free(c);
}

/* ---- live route state ---- */

static struct gw_hash_key random_key(void)
{
  struct gw_hash_key k = {0x736f6d6570736575ull, 0x646f72616e646f6dull};
  if (getrandom(&k, sizeof(k), 0) != sizeof(k)) {
    /* fall back to the fixed key: only the hash-flooding resistance is lost */
  }
  return k;
}

static int limiter_create(const struct gw_store_ops *store, enum gw_limiter_kind kind,
                          const struct gw_route *r, void **out)
{
  struct gw_limiter_spec spec;
  memset(&spec, 0, sizeof(spec));
  spec.kind = kind;
  spec.seed = random_key();
  bool route_key;
  if (kind == GW_LIMITER_TOKEN_BUCKET) {
    spec.tb = r->token_bucket.c;
    spec.max_keys = r->token_bucket.max_keys;
    route_key = r->token_bucket.key.kind == GW_KEY_ROUTE;
  } else {
    spec.sw = r->sliding_window.c;
    spec.max_keys = r->sliding_window.max_keys;
    route_key = r->sliding_window.key.kind == GW_KEY_ROUTE;
  }
  if (route_key)
    spec.max_keys = 1;
  /* Bound what the key table reserves: big windows get fewer keys. */
  size_t per_key = 96 + (kind == GW_LIMITER_TOKEN_BUCKET ? sizeof(struct gw_token_bucket)
                                                         : gw_sliding_window_state_bytes(&spec.sw));
  if ((uint64_t)per_key * spec.max_keys > LIMITER_MAX_RESERVED_BYTES) {
    uint32_t fit = (uint32_t)(LIMITER_MAX_RESERVED_BYTES / per_key);
    gw_logf("warn", "route %s: %s keeps at most %u keys (%zu bytes each), not %u", r->name,
            kind == GW_LIMITER_TOKEN_BUCKET ? "token_bucket" : "sliding_window",
            fit ? fit : 1, per_key, spec.max_keys);
    spec.max_keys = fit ? fit : 1;
  }
  return store->limiter_create(NULL, &spec, out);
}

static void part_unref(struct gw_part *p)
{
  if (!p || atomic_fetch_sub_explicit(&p->refs, 1, memory_order_acq_rel) != 1)
    return;
  p->destroy(p->obj);
  pthread_mutex_destroy(&p->mu);
  free(p->json);
  free(p);
}

static struct gw_part *part_new(const struct gw_store_ops *ops, void *obj,
                                void (*destroy)(void *), const char *json)
{
  struct gw_part *p = calloc(1, sizeof(*p));
  if (!p)
    return NULL;
  p->ops = ops;
  atomic_init(&p->refs, 1);
  pthread_mutex_init(&p->mu, NULL);
  p->obj = obj;
  p->destroy = destroy;
  p->json = strdup(json ? json : "");
  return p;
}

/* The printed JSON of one policy within a route's policies object ("" when absent). */
static char *policy_json(const char *policies_json, const char *key)
{
  cJSON *doc = cJSON_Parse(policies_json);
  const cJSON *v = doc ? cJSON_GetObjectItemCaseSensitive(doc, key) : NULL;
  char *out = v ? cJSON_PrintUnformatted(v) : strdup("");
  cJSON_Delete(doc);
  return out;
}

/* prev's part for the same policy when its configuration is unchanged, with a new reference. */
static struct gw_part *reuse_part(struct gw_part *prev, const char *json)
{
  if (!prev || !json || strcmp(prev->json, json) != 0)
    return NULL;
  atomic_fetch_add_explicit(&prev->refs, 1, memory_order_relaxed);
  return prev;
}

static void destroy_breaker(void *b) { gw_breaker_destroy(b); }

static void rt_free(struct gw_route_rt *rt)
{
  part_unref(rt->token_bucket);
  part_unref(rt->sliding_window);
  part_unref(rt->idem);
  part_unref(rt->breaker);
  stale_free(rt->stale);
  pthread_mutex_destroy(&rt->mu);
  free(rt->name);
  free(rt->policies_json);
  free(rt);
}

/* The shared store (backend redis), set once at startup; NULL: everything is local. */
static const struct gw_store_ops *shared_ops;
static void *shared_impl;

void gw_pipeline_set_shared_store(const struct gw_store_ops *ops, void *impl)
{
  shared_ops = ops;
  shared_impl = impl;
}

void gw_pipeline_shared_store(const struct gw_store_ops **ops, void **impl)
{
  *ops = shared_ops;
  *impl = shared_impl;
}

static void destroy_mem_limiter(void *l) { gw_store_memory.limiter_destroy(l); }
static void destroy_mem_idem(void *i) { gw_store_memory.idem_destroy(i); }
static void destroy_shared_limiter(void *l) { shared_ops->limiter_destroy(l); }
static void destroy_shared_idem(void *i) { shared_ops->idem_destroy(i); }

/* A part for one policy: prev's when unchanged, else a new one from make() on ops. */
static int make_part(struct gw_part **out, struct gw_part *prev, const char *policies_json,
                     const char *key, const struct gw_store_ops *ops,
                     int (*make)(const struct gw_route *, void **), void (*destroy)(void *),
                     const struct gw_route *r)
{
  char *json = policy_json(policies_json, key);
  if (!json)
    return GW_ENOMEM;
  *out = reuse_part(prev, json);
  if (*out) {
    free(json);
    return 0;
  }
  void *obj = NULL;
  int rc = make(r, &obj);
  if (rc == 0) {
    *out = part_new(ops, obj, destroy, json);
    if (!*out) {
      destroy(obj);
      rc = GW_ENOMEM;
    }
  }
  free(json);
  return rc;
}

static int make_tb(const struct gw_route *r, void **o)
{
  return limiter_create(&gw_store_memory, GW_LIMITER_TOKEN_BUCKET, r, o);
}
static int make_sw(const struct gw_route *r, void **o)
{
  return limiter_create(&gw_store_memory, GW_LIMITER_SLIDING_WINDOW, r, o);
}
static int make_breaker(const struct gw_route *r, void **o)
{
  return gw_breaker_create(&r->breaker.c, (struct gw_breaker **)o);
}
/* Cluster-scope limiters and idempotency records on the shared store (backend redis). */
static int make_shared_limiter(const struct gw_route *r, void **o, enum gw_limiter_kind kind)
{
  struct gw_limiter_spec spec;
  memset(&spec, 0, sizeof(spec));
  spec.kind = kind;
  spec.seed = random_key();
  if (kind == GW_LIMITER_TOKEN_BUCKET) {
    spec.tb = r->token_bucket.c;
    spec.max_keys = r->token_bucket.max_keys;
  } else {
    spec.sw = r->sliding_window.c;
    spec.max_keys = r->sliding_window.max_keys;
  }
  if (shared_ops == &gw_store_raft) {
    struct gw_store_raft_scope scope = gw_store_raft_scope(shared_impl, r->name);
    return shared_ops->limiter_create(&scope, &spec, o);
  }
  struct gw_store_redis_scope scope = gw_store_redis_scope(shared_impl, r->name);
  return shared_ops->limiter_create(&scope, &spec, o);
}
static int make_shared_tb(const struct gw_route *r, void **o)
{
  return make_shared_limiter(r, o, GW_LIMITER_TOKEN_BUCKET);
}
static int make_shared_sw(const struct gw_route *r, void **o)
{
  return make_shared_limiter(r, o, GW_LIMITER_SLIDING_WINDOW);
}
static int make_shared_idem(const struct gw_route *r, void **o)
{
  struct gw_idem_config ic = {.max_records = IDEM_MAX_RECORDS,
                              .max_bytes = IDEM_MAX_BYTES,
                              .ttl_ms = r->idempotency.ttl_ms,
                              .seed = random_key()};
  return shared_ops->idem_create(shared_impl, &ic, o);
}

static int make_idem(const struct gw_route *r, void **o)
{
  struct gw_idem_config ic = {.max_records = IDEM_MAX_RECORDS,
                              .max_bytes = IDEM_MAX_BYTES,
                              .ttl_ms = r->idempotency.ttl_ms,
                              .seed = random_key()};
  return gw_store_memory.idem_create(NULL, &ic, o);
}

static int rt_create(const struct gw_route *r, const struct gw_route_rt *prev,
                     struct gw_route_rt **out)
{
  struct gw_route_rt *rt = calloc(1, sizeof(*rt));
  if (!rt)
    return GW_ENOMEM;
  atomic_init(&rt->refs, 1);
  pthread_mutex_init(&rt->mu, NULL);
  rt->name = strdup(r->name);
  rt->policies_json = strdup(r->policies_json);
  gw_retry_budget_init(&rt->budget);
  gw_degrade_init(&rt->degrade);
  uint64_t seed;
  if (getrandom(&seed, sizeof(seed), 0) != sizeof(seed))
    seed = (uint64_t)(uintptr_t)rt;
  gw_rng_seed(&rt->rng, seed);
  int rc = 0;
  if (!rt->name || !rt->policies_json)
    rc = GW_ENOMEM;
  bool tb_shared = shared_ops && r->token_bucket.scope == GW_SCOPE_CLUSTER;
  bool sw_shared = shared_ops && r->sliding_window.scope == GW_SCOPE_CLUSTER;
  if (!rc && r->token_bucket.enabled)
    rc = make_part(&rt->token_bucket, prev ? prev->token_bucket : NULL, r->policies_json,
                   "token_bucket", tb_shared ? shared_ops : &gw_store_memory,
                   tb_shared ? make_shared_tb : make_tb,
                   tb_shared ? destroy_shared_limiter : destroy_mem_limiter, r);
  if (!rc && r->sliding_window.enabled)
    rc = make_part(&rt->sliding_window, prev ? prev->sliding_window : NULL, r->policies_json,
                   "sliding_window", sw_shared ? shared_ops : &gw_store_memory,
                   sw_shared ? make_shared_sw : make_sw,
                   sw_shared ? destroy_shared_limiter : destroy_mem_limiter, r);
  if (!rc && r->breaker.enabled)
    rc = make_part(&rt->breaker, prev ? prev->breaker : NULL, r->policies_json,
                   "circuit_breaker", &gw_store_memory, make_breaker, destroy_breaker, r);
  if (!rc && r->idempotency.enabled)
    rc = make_part(&rt->idem, prev ? prev->idem : NULL, r->policies_json, "idempotency",
                   shared_ops ? shared_ops : &gw_store_memory,
                   shared_ops ? make_shared_idem : make_idem,
                   shared_ops ? destroy_shared_idem : destroy_mem_idem, r);
  if (!rc && r->degradation.enabled && r->degradation.c.stale_if_error_ms) {
    rt->stale = calloc(1, sizeof(*rt->stale));
    if (!rt->stale)
      rc = GW_ENOMEM;
    else
      rt->stale->seed = random_key();
  }
  if (rc) {
    rt_free(rt);
    return rc;
  }
  *out = rt;
  return 0;
}

void gw_route_rt_unref(struct gw_route_rt *rt)
{
  if (rt && atomic_fetch_sub_explicit(&rt->refs, 1, memory_order_acq_rel) == 1)
    rt_free(rt);
}

static struct gw_route_rt *rt_ref(struct gw_route_rt *rt)
{
  atomic_fetch_add_explicit(&rt->refs, 1, memory_order_relaxed);
  return rt;
}

int gw_pipeline_attach(struct gw_config *cfg, const struct gw_config *prev)
{
  for (size_t i = 0; i < cfg->route_count; i++) {
    struct gw_route *r = &cfg->routes[i];
    if (r->rt)
      continue;
    for (size_t j = 0; prev && j < prev->route_count; j++) {
      const struct gw_route *o = &prev->routes[j];
      if (o->rt && strcmp(o->name, r->name) == 0 &&
          strcmp(o->policies_json, r->policies_json) == 0) {
        r->rt = rt_ref(o->rt); /* unchanged policies keep their state */
        break;
      }
    }
    const struct gw_route_rt *same_name = NULL;
    for (size_t j = 0; prev && j < prev->route_count; j++)
      if (prev->routes[j].rt && strcmp(prev->routes[j].name, r->name) == 0)
        same_name = prev->routes[j].rt;
    if (!r->rt) {
      /* Changed policies: new state, but each unchanged stateful policy keeps its part, and
       * an operator's degrade override stays. */
      int rc = rt_create(r, same_name, &r->rt);
      if (rc == 0 && same_name && r->degradation.enabled)
        gw_degrade_set_mode(&r->rt->degrade, same_name->degrade.mode);
      if (rc) {
        gw_logf("error", "route %s: cannot create its policy state: %s", r->name,
                gw_strerror(rc));
        return rc;
      }
    }
  }
  return 0;
}

/* ---- the chain ---- */

void gw_pipeline_init(struct gw_preq *p, const struct gw_route *route, uint64_t now_ns)
{
  memset(p, 0, sizeof(*p));
  p->route = route;
  p->rt = rt_ref(route->rt);
  p->start_ns = now_ns;
  atomic_fetch_add_explicit(&p->rt->inflight, 1, memory_order_relaxed);
  atomic_fetch_add_explicit(&p->rt->requests, 1, memory_order_relaxed);
}

static bool method_listed(char *const *methods, size_t n, const char *m)
{
  for (size_t i = 0; i < n; i++)
    if (strcmp(methods[i], m) == 0)
      return true;
  return false;
}

static int copy_replay(void *ctx, const struct gw_idem_response *r)
{
  struct gw_resp *resp = ctx;
  gw_resp_reset(resp);
  resp->status = r->status;
  if (!gw_buf_set(&resp->headers, r->headers, r->headers_len) ||
      !gw_buf_set(&resp->body, r->body, r->body_len))
    return GW_ENOMEM;
  /* The header blob is "name\0value\0" pairs: count them. */
  size_t pairs = 0;
  for (size_t i = 0; i < r->headers_len; i++)
    pairs += resp->headers.p[i] == '\0';
  resp->header_count = pairs / 2;
  return 0;
}

/* The bytes a limiter is keyed by for this request (len 0: the route's one shared state). */
static const char *limit_key(const struct gw_limit_key *k, const struct gw_req_view *v,
                             size_t *len)
{
  const char *s = NULL;
  if (k->kind == GW_KEY_CLIENT_IP)
    s = v->client_ip;
  else if (k->kind == GW_KEY_HEADER)
    s = v->header(v->ctx, k->header); /* requests without it share one state */
  *len = s ? strlen(s) : 0;
  return s;
}

static void fallback(struct gw_preq *p, enum gw_degrade_reason reason, struct gw_resp *resp)
{
  const struct gw_degradation_conf *d = &p->route->degradation;
  gw_resp_reset(resp);
  resp->status = d->fallback_status;
  for (size_t i = 0; i < d->fallback_header_count; i++)
    gw_resp_add_header(resp, d->fallback_headers[i].name, d->fallback_headers[i].value);
  gw_buf_set(&resp->body, d->fallback_body, d->fallback_body_len);
  p->degraded = gw_degrade_reason_name(reason);
  gw_resp_add_header(resp, "Gateway-Degraded", p->degraded);
}

/*
 * Degrade for reason if the route says so: true when resp now holds the stale response or the
 * fallback. Under no lock; takes rt->mu.
 */
static bool degrade(struct gw_preq *p, const struct gw_req_view *v, enum gw_degrade_reason reason,
                    uint64_t now_ns, struct gw_resp *resp)
{
  const struct gw_degradation_conf *dc = &p->route->degradation;
  if (!dc->enabled)
    return false;
  struct gw_route_rt *rt = p->rt;
  struct gw_degrade_decision dd;
  bool served = false;
  pthread_mutex_lock(&rt->mu);
  struct stale_entry *se = rt->stale && p->is_get ? stale_find(rt->stale, v->target, v->target_len)
                                                  : NULL;
  gw_degrade_decide(&rt->degrade, &dc->c, reason, v->method, strlen(v->method), se != NULL,
                    se ? se->stored_ns : 0, now_ns, &dd);
  if (dd.action == GW_DEGRADE_SERVE_STALE && se && copy_resp(resp, &se->resp) == 0) {
    p->degraded = gw_degrade_reason_name(GW_DEGRADE_STALE);
    gw_resp_add_header(resp, "Gateway-Degraded", p->degraded);
    served = true;
  }
  pthread_mutex_unlock(&rt->mu);
  if (!served && dd.action != GW_DEGRADE_PROCEED && dc->c.has_fallback) {
    fallback(p, reason, resp);
    served = true;
  }
  if (served)
    atomic_fetch_add_explicit(&rt->degraded, 1, memory_order_relaxed);
  return served;
}

static void keep_tightest(struct gw_preq *p, const struct gw_ratelimit_info *info)
{
  if (!p->rl_set || info->remaining < p->rl.remaining) {
    p->rl = *info;
    p->rl_set = true;
  }
}

static void op_done(struct gw_store_op *op)
{
  struct gw_preq *p = op->ctx;
  p->wake(p->wake_ctx);
}

enum {
  ST_IDEM = 0,  /* idempotency: replay, 409, 422 */
  ST_IDEM_RESULT,
  ST_LIMIT,     /* the limiters, p->limit_i = 0 (token bucket) then 1 (sliding window) */
  ST_LIMIT_RESULT,
  ST_ADMIT,     /* degradation admission and the breaker (local, synchronous) */
};

/* Stage ST_IDEM: start the idempotency lookup. Returns a step, or -1 to go on. */
static int idem_start(struct gw_preq *p, const struct gw_req_view *v, uint64_t now_ns,
                      struct gw_resp *resp)
{
  const struct gw_route *r = p->route;
  struct gw_route_rt *rt = p->rt;
  if (!r->idempotency.enabled ||
      !method_listed(r->idempotency.methods, r->idempotency.method_count, v->method)) {
    p->stage = ST_LIMIT;
    return -1;
  }
  const char *key = v->header(v->ctx, r->idempotency.header);
  switch (gw_idem_key_check(key, key ? strlen(key) : 0, r->idempotency.required)) {
  case GW_IDEM_KEY_MISSING:
    gw_resp_error(resp, GW_EIDEMPOTENCY_KEY_MISSING, 0);
    return GW_STEP_ANSWER;
  case GW_IDEM_KEY_INVALID:
    gw_resp_error(resp, GW_EIDEMPOTENCY_KEY_INVALID, 0);
    return GW_STEP_ANSWER;
  case GW_IDEM_KEY_ABSENT:
    p->stage = ST_LIMIT;
    return -1;
  case GW_IDEM_KEY_VALID:
    break;
  }
  struct gw_idem_fingerprint fp;
  gw_idem_fingerprint(v->method, strlen(v->method), v->target, v->target_len, v->body,
                      v->body_len, &fp);
  const struct gw_store_ops *ops = rt->idem->ops;
  memset(&p->op, 0, sizeof(p->op));
  p->stage = ST_IDEM_RESULT;
  if (ops->idem_begin_async) {
    p->op.done = op_done;
    p->op.ctx = p;
    int rc = ops->idem_begin_async(rt->idem->obj, r->name, strlen(r->name), key, strlen(key), &fp,
                                   now_ns, copy_replay, resp, &p->op);
    if (rc == 0)
      return GW_STEP_WAIT;
    p->op.err = rc;
    return -1;
  }
  p->op.err = ops->idem_begin(rt->idem->obj, r->name, strlen(r->name), key, strlen(key), &fp,
                              now_ns, &p->op.decision, &p->op.claim, copy_replay, resp);
  return -1;
}

/* Stage ST_IDEM_RESULT. */
static int idem_result(struct gw_preq *p, struct gw_resp *resp)
{
  struct gw_route_rt *rt = p->rt;
  if (p->op.err) {
    /* The records cannot be consulted: by default refuse (executing now could execute twice);
     * with on_store_error "allow", go on without idempotency. */
    atomic_fetch_add_explicit(&rt->store_errors, 1, memory_order_relaxed);
    if (!p->route->idempotency.allow_on_store_error) {
      gw_resp_error(resp, GW_ESTORE_UNAVAILABLE, 1);
      return GW_STEP_ANSWER;
    }
    p->stage = ST_LIMIT;
    p->limit_i = 0;
    return -1;
  }
  switch (p->op.decision) {
  case GW_IDEM_IN_FLIGHT:
    gw_resp_error(resp, GW_EIDEMPOTENCY_IN_FLIGHT, 1);
    return GW_STEP_ANSWER;
  case GW_IDEM_MISMATCH:
    gw_resp_error(resp, GW_EIDEMPOTENCY_KEY_MISMATCH, 0);
    return GW_STEP_ANSWER;
  case GW_IDEM_REPLAY:
    p->replayed = true;
    atomic_fetch_add_explicit(&rt->replays, 1, memory_order_relaxed);
    return GW_STEP_ANSWER;
  case GW_IDEM_EXECUTE:
    p->claim = p->op.claim;
    p->idem_claimed = true;
    break;
  }
  p->stage = ST_LIMIT;
  p->limit_i = 0;
  return -1;
}

static struct gw_part *limiter_part(struct gw_route_rt *rt, int i)
{
  return i == 0 ? rt->token_bucket : rt->sliding_window;
}

/* Stage ST_LIMIT: ask the next limiter. */
static int limit_start(struct gw_preq *p, const struct gw_req_view *v, uint64_t now_ns)
{
  const struct gw_route *r = p->route;
  while (p->limit_i < 2 && !limiter_part(p->rt, p->limit_i))
    p->limit_i++;
  if (p->limit_i >= 2) {
    p->stage = ST_ADMIT;
    return -1;
  }
  struct gw_part *part = limiter_part(p->rt, p->limit_i);
  const struct gw_limit_key *key = p->limit_i == 0 ? &r->token_bucket.key : &r->sliding_window.key;
  size_t klen;
  const char *k = limit_key(key, v, &klen);
  memset(&p->op, 0, sizeof(p->op));
  p->stage = ST_LIMIT_RESULT;
  if (part->ops->limiter_admit_async) {
    p->op.done = op_done;
    p->op.ctx = p;
    int rc = part->ops->limiter_admit_async(part->obj, k, klen, now_ns, &p->op);
    if (rc == 0)
      return GW_STEP_WAIT;
    if (rc != GW_STORE_DONE)
      p->op.err = rc;
    return -1;
  }
  p->op.admitted = part->ops->limiter_admit(part->obj, k, klen, now_ns, &p->op.info, &p->op.evicted);
  return -1;
}

/* Stage ST_LIMIT_RESULT. */
static int limit_result(struct gw_preq *p, struct gw_resp *resp)
{
  const struct gw_route *r = p->route;
  struct gw_route_rt *rt = p->rt;
  if (p->op.evicted) {
    static atomic_ullong evictions;
    if (atomic_fetch_add_explicit(&evictions, 1, memory_order_relaxed) % 10000 == 0)
      gw_logf("warn", "route %s: the limiter's key table is full: evicting least recently used "
                      "keys", r->name);
  }
  if (p->op.err) {
    /* The shared limit cannot be consulted. By default fail open (a limiter protects capacity:
     * refusing everything while its store is down would turn a store outage into an outage);
     * with on_store_error "deny", refuse as limited. */
    bool deny = p->limit_i == 0 ? r->token_bucket.deny_on_store_error
                                : r->sliding_window.deny_on_store_error;
    atomic_fetch_add_explicit(&rt->store_errors, 1, memory_order_relaxed);
    if (deny) {
      atomic_fetch_add_explicit(&rt->rate_limited, 1, memory_order_relaxed);
      gw_resp_error(resp, GW_ERATE_LIMITED, 1);
      return GW_STEP_ANSWER;
    }
    p->limit_i++;
    p->stage = ST_LIMIT;
    return -1;
  }
  if (!p->op.admitted) {
    p->rl = p->op.info;
    p->rl_set = true;
    atomic_fetch_add_explicit(&rt->rate_limited, 1, memory_order_relaxed);
    gw_resp_error(resp, GW_ERATE_LIMITED, p->op.info.retry_after_s ? p->op.info.retry_after_s : 1);
    return GW_STEP_ANSWER;
  }
  keep_tightest(p, &p->op.info);
  p->limit_i++;
  p->stage = ST_LIMIT;
  return -1;
}

static enum gw_step admit(struct gw_preq *p, const struct gw_req_view *v, uint64_t now_ns,
                          struct gw_resp *resp);

enum gw_step gw_pipeline_begin(struct gw_preq *p, const struct gw_req_view *v, uint64_t now_ns,
                               struct gw_resp *resp)
{
  if (p->stage == ST_IDEM)
    p->is_get = strcmp(v->method, "GET") == 0;
  for (;;) {
    int step = -1;
    switch (p->stage) {
    case ST_IDEM:
      step = idem_start(p, v, now_ns, resp);
      break;
    case ST_IDEM_RESULT:
      step = idem_result(p, resp);
      break;
    case ST_LIMIT:
      step = limit_start(p, v, now_ns);
      break;
    case ST_LIMIT_RESULT:
      step = limit_result(p, resp);
      break;
    default:
      return admit(p, v, now_ns, resp);
    }
    if (step >= 0)
      return (enum gw_step)step;
  }
}

static enum gw_step admit(struct gw_preq *p, const struct gw_req_view *v, uint64_t now_ns,
                          struct gw_resp *resp)
{
  const struct gw_route *r = p->route;
  struct gw_route_rt *rt = p->rt;
  /* 3. Degradation admission (forced, slow, concurrency limit), then the breaker. */
  if (r->degradation.enabled) {
    enum gw_degrade_reason reason;
    pthread_mutex_lock(&rt->mu);
    bool ok = gw_degrade_admit(&rt->degrade, &r->degradation.c, now_ns, &reason);
    pthread_mutex_unlock(&rt->mu);
    if (ok) {
      p->conc_held = true;
    } else {
      if (degrade(p, v, reason, now_ns, resp))
        return GW_STEP_ANSWER;
      if (reason == GW_DEGRADE_SHED) {
        gw_resp_error(resp, GW_EOVERLOADED, 1);
        return GW_STEP_ANSWER;
      }
      /* forced or slow with nothing to serve instead: go to the upstream */
    }
  }
  if (rt->breaker) {
    pthread_mutex_lock(&rt->breaker->mu);
    bool ok = gw_breaker_acquire(rt->breaker->obj, now_ns, &p->ticket);
    pthread_mutex_unlock(&rt->breaker->mu);
    if (!ok) {
      atomic_fetch_add_explicit(&rt->breaker_rejected, 1, memory_order_relaxed);
      if (degrade(p, v, GW_DEGRADE_CIRCUIT_OPEN, now_ns, resp))
        return GW_STEP_ANSWER;
      uint64_t ra = gw_ns_to_s_ceil(p->ticket.retry_after_ns);
      gw_resp_error(resp, GW_ECIRCUIT_OPEN, ra ? ra : 1);
      return GW_STEP_ANSWER;
    }
  }

  /* 4. Retries: the request's attempt budget and deadline. */
  if (r->retry.enabled) {
    p->retry_on = true;
    gw_retry_begin(&p->retry, v->method, strlen(v->method), p->idem_claimed, r->timeout_ms,
                   now_ns);
    pthread_mutex_lock(&rt->mu);
    gw_retry_budget_on_request(&rt->budget, now_ns);
    pthread_mutex_unlock(&rt->mu);
  }
  return GW_STEP_PROXY;
}

bool gw_pipeline_try_begin(struct gw_preq *p, uint64_t now_ns, uint64_t *timeout_ms)
{
  struct gw_route_rt *rt = p->rt;
  if (p->tries > 0 && rt->breaker) {
    pthread_mutex_lock(&rt->breaker->mu);
    bool ok = gw_breaker_acquire(rt->breaker->obj, now_ns, &p->ticket);
    pthread_mutex_unlock(&rt->breaker->mu);
    if (!ok)
      return false;
  }
  *timeout_ms = p->route->timeout_ms;
  if (p->retry_on) {
    uint64_t try_ns;
    if (!gw_retry_start_try(&p->retry, &p->route->retry.c, now_ns, &try_ns)) {
      if (p->ticket.admitted) {
        pthread_mutex_lock(&rt->breaker->mu);
        gw_breaker_cancel(rt->breaker->obj, &p->ticket);
        pthread_mutex_unlock(&rt->breaker->mu);
      }
      return false;
    }
    *timeout_ms = gw_ns_to_ms_ceil(try_ns);
    if (*timeout_ms == 0)
      *timeout_ms = 1;
  }
  p->tries++;
  return true;
}

bool gw_pipeline_try_end(struct gw_preq *p, enum gw_try_result result, int status,
                         int64_t retry_after_ms, uint64_t duration_ms, uint64_t now_ns,
                         uint64_t *delay_ms)
{
  struct gw_route_rt *rt = p->rt;
  if (result != GW_TRY_CONNECT_FAILURE)
    p->upstream_saw = true;
  bool again = false;
  if (rt->breaker && p->ticket.admitted) {
    bool failure = gw_breaker_is_failure(&p->route->breaker.c, result, status);
    pthread_mutex_lock(&rt->breaker->mu);
    gw_breaker_record(rt->breaker->obj, &p->ticket, failure, duration_ms, now_ns);
    pthread_mutex_unlock(&rt->breaker->mu);
  }
  pthread_mutex_lock(&rt->mu);
  if (p->retry_on) {
    struct gw_retry_input in = {.result = result, .status = status,
                                .retry_after_ms = retry_after_ms};
    again = gw_retry_decide(&p->retry, &p->route->retry.c, &rt->budget, &rt->rng, &in, now_ns,
                            delay_ms) == GW_RETRY_YES;
  }
  pthread_mutex_unlock(&rt->mu);
  if (again)
    atomic_fetch_add_explicit(&rt->retries, 1, memory_order_relaxed);
  return again;
}

static const char *store_strerror(int rc)
{
  if (rc <= -2100 && rc > -2200)
    return gw_store_redis_strerror(rc);
  if (rc <= -2200 && rc > -2300)
    return gw_store_raft_strerror(rc);
  return gw_policy_strerror(rc);
}

static void finish_log(const struct gw_route *r, int rc)
{
  if (rc && rc != GW_POLICY_ESTALE)
    gw_logf("warn", "route %s: the idempotent response was not kept (%s): a retry will "
                    "execute again", r->name, store_strerror(rc));
}

void gw_pipeline_finish_done(struct gw_preq *p)
{
  if (!p->rt)
    return;
  finish_log(p->route, p->op.err);
  gw_route_rt_unref(p->rt);
  p->rt = NULL;
}

bool gw_pipeline_finish(struct gw_preq *p, const struct gw_req_view *v, enum gw_try_result result,
                        int err, uint64_t now_ns, struct gw_resp *resp)
{
  struct gw_route_rt *rt = p->rt;
  const struct gw_route *r = p->route;
  bool waiting = false;
  if (!rt)
    return false;
  if (p->tries > 0 && !p->replayed) {
    bool failed = err != 0 || result != GW_TRY_RESPONSE ||
                  (r->breaker.enabled ? gw_status_set_has(&r->breaker.c.failure_statuses,
                                                          resp->status)
                                      : resp->status >= 500);
    if (r->degradation.enabled) {
      pthread_mutex_lock(&rt->mu);
      gw_degrade_record_latency(&rt->degrade, &r->degradation.c,
                                (now_ns - p->start_ns) / GW_NS_PER_MS, now_ns);
      if (!failed && p->is_get && rt->stale && resp->status >= 200 && resp->status < 300)
        stale_store(rt->stale, v->target, v->target_len, resp, now_ns);
      pthread_mutex_unlock(&rt->mu);
    }
    if (failed)
      degrade(p, v, GW_DEGRADE_UPSTREAM_ERROR, now_ns, resp);
  }
  if (p->idem_claimed) {
    enum gw_idem_origin origin = !p->upstream_saw ? GW_IDEM_NOT_SENT
                                 : err == GW_EUPSTREAM_TIMEOUT ? GW_IDEM_UPSTREAM_TIMEOUT
                                                               : GW_IDEM_FROM_UPSTREAM;
    struct gw_idem_response ir = {.status = resp->status,
                                  .headers = resp->headers.p ? resp->headers.p : "",
                                  .headers_len = resp->headers.len,
                                  .body = resp->body.p ? resp->body.p : "",
                                  .body_len = resp->body.len};
    const struct gw_store_ops *ops = rt->idem->ops;
    if (ops->idem_finish_async) {
      /* The answer leaves only once the record is stored, so a duplicate sent anywhere right
       * after it is replayed, not told the first one is still in flight. */
      memset(&p->op, 0, sizeof(p->op));
      p->op.done = op_done;
      p->op.ctx = p;
      int rc = ops->idem_finish_async(rt->idem->obj, &p->claim, origin, &ir, now_ns, &p->op);
      if (rc == 0)
        waiting = true;
      else
        finish_log(r, rc);
    } else {
      finish_log(r, ops->idem_finish(rt->idem->obj, &p->claim, origin, &ir, now_ns));
    }
    p->idem_claimed = false;
  }
  int st = resp->status;
  atomic_fetch_add_explicit(&rt->status_class[st >= 100 && st < 600 ? st / 100 : 0], 1,
                            memory_order_relaxed);
  uint64_t us = now_ns > p->start_ns ? (now_ns - p->start_ns) / 1000 : 0;
  for (int i = 0; i < GW_LATENCY_BUCKETS; i++)
    if (us <= gw_latency_bounds_us[i]) {
      atomic_fetch_add_explicit(&rt->latency_bucket[i], 1, memory_order_relaxed);
      break;
    }
  atomic_fetch_add_explicit(&rt->latency_sum_us, us, memory_order_relaxed);
  atomic_fetch_add_explicit(&rt->latency_count, 1, memory_order_relaxed);
  atomic_fetch_sub_explicit(&rt->inflight, 1, memory_order_relaxed);
  if (p->ticket.admitted) {
    pthread_mutex_lock(&rt->breaker->mu);
    gw_breaker_cancel(rt->breaker->obj, &p->ticket);
    pthread_mutex_unlock(&rt->breaker->mu);
  }
  pthread_mutex_lock(&rt->mu);
  if (p->conc_held)
    gw_degrade_leave(&rt->degrade);
  pthread_mutex_unlock(&rt->mu);
  p->conc_held = false;
  if (waiting)
    return true; /* the live state stays referenced until gw_pipeline_finish_done */
  gw_route_rt_unref(rt);
  p->rt = NULL;
  return false;
}
