/*
 * The memory store: the policies/ modules behind one mutex per object. A limiter keyed by
 * `route` holds one state; keyed by client or header it holds a bounded key table whose least
 * recently used key is evicted when full. Nothing is persisted: with backend `memory` each node
 * enforces its own limits and keeps its own idempotency records.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "key_table.h"
#include "store.h"

struct mem_limiter {
  pthread_mutex_t mu;
  struct gw_limiter_spec spec;
  size_t state_bytes;
  struct gw_key_table *keys; /* owned */
  uint64_t *single;          /* owned: the state for the empty key */
  bool single_init;
  uint64_t admitted, rejected, evictions;
};

static size_t state_bytes(const struct gw_limiter_spec *s)
{
  return s->kind == GW_LIMITER_TOKEN_BUCKET ? sizeof(struct gw_token_bucket)
                                            : gw_sliding_window_state_bytes(&s->sw);
}

static int mem_limiter_create(void *impl, const struct gw_limiter_spec *spec, void **out)
{
  (void)impl;
  if (spec->kind == GW_LIMITER_TOKEN_BUCKET ? gw_token_bucket_config_check(&spec->tb)
                                            : gw_sliding_window_config_check(&spec->sw))
    return GW_POLICY_EINVALID_CONFIG;
  struct mem_limiter *l = calloc(1, sizeof(*l));
  if (!l)
    return GW_POLICY_ENOMEM;
  l->spec = *spec;
  l->state_bytes = state_bytes(spec);
  l->single = calloc(1, l->state_bytes);
  if (!l->single) {
    free(l);
    return GW_POLICY_ENOMEM;
  }
  struct gw_key_table_config kc = {
      .max_keys = spec->max_keys ? spec->max_keys : 1,
      .key_max_bytes = 64, /* an IPv6 address fits; longer header values are digested */
      .value_bytes = (uint32_t)l->state_bytes,
      .seed = spec->seed,
  };
  int rc = gw_key_table_create(&kc, &l->keys);
  if (rc) {
    free(l->single);
    free(l);
    return rc;
  }
  pthread_mutex_init(&l->mu, NULL);
  *out = l;
  return 0;
}

static void mem_limiter_destroy(void *p)
{
  struct mem_limiter *l = p;
  if (!l)
    return;
  gw_key_table_destroy(l->keys);
  pthread_mutex_destroy(&l->mu);
  free(l->single);
  free(l);
}

static void init_state(const struct mem_limiter *l, void *state, uint64_t now_ns)
{
  if (l->spec.kind == GW_LIMITER_TOKEN_BUCKET)
    gw_token_bucket_init(state, &l->spec.tb, now_ns);
  else
    gw_sliding_window_init(state, &l->spec.sw);
}

static bool mem_limiter_admit(void *p, const void *key, size_t len, uint64_t now_ns,
                              struct gw_ratelimit_info *info, bool *evicted)
{
  struct mem_limiter *l = p;
  void *state;
  bool ok;
  pthread_mutex_lock(&l->mu);
  if (len == 0) {
    state = l->single;
    if (!l->single_init) {
      init_state(l, state, now_ns);
      l->single_init = true;
    }
  } else {
    unsigned flags = 0;
    gw_key_table_get_or_insert(l->keys, key, len, &state, &flags);
    if (flags & GW_KEY_TABLE_CREATED)
      init_state(l, state, now_ns);
    if (flags & GW_KEY_TABLE_EVICTED) {
      l->evictions++;
      if (evicted)
        *evicted = true;
    }
  }
  if (l->spec.kind == GW_LIMITER_TOKEN_BUCKET)
    ok = gw_token_bucket_admit(state, &l->spec.tb, now_ns, info);
  else
    ok = gw_sliding_window_admit(state, &l->spec.sw, now_ns, info);
  if (ok)
    l->admitted++;
  else
    l->rejected++;
  pthread_mutex_unlock(&l->mu);
  return ok;
}

static void mem_limiter_stats(void *p, struct gw_limiter_stats *out)
{
  struct mem_limiter *l = p;
  struct gw_key_table_stats ks;
  pthread_mutex_lock(&l->mu);
  gw_key_table_stats(l->keys, &ks);
  out->keys = ks.count + (l->single_init ? 1 : 0);
  out->admitted = l->admitted;
  out->rejected = l->rejected;
  out->evictions = l->evictions;
  pthread_mutex_unlock(&l->mu);
}

static void mem_limiter_peek(void *p, const void *key, size_t len, uint64_t now_ns,
                             struct gw_ratelimit_info *info)
{
  struct mem_limiter *l = p;
  memset(info, 0, sizeof(*info));
  pthread_mutex_lock(&l->mu);
  void *state = len == 0 ? (l->single_init ? l->single : NULL)
                         : (gw_key_table_contains(l->keys, key, len)
                                ? gw_key_table_find(l->keys, key, len)
                                : NULL);
  if (l->spec.kind == GW_LIMITER_TOKEN_BUCKET) {
    info->limit = l->spec.tb.capacity;
    info->remaining = state ? gw_token_bucket_available(state, &l->spec.tb, now_ns)
                            : l->spec.tb.capacity;
  } else {
    info->limit = l->spec.sw.limit;
    uint64_t used = state ? gw_sliding_window_count(state, &l->spec.sw, now_ns) : 0;
    info->remaining = used < l->spec.sw.limit ? l->spec.sw.limit - used : 0;
  }
  pthread_mutex_unlock(&l->mu);
}

struct mem_idem {
  pthread_mutex_t mu;
  struct gw_idem_store *st;
};

static int mem_idem_create(void *impl, const struct gw_idem_config *cfg, void **out)
{
  (void)impl;
  struct mem_idem *m = calloc(1, sizeof(*m));
  if (!m)
    return GW_POLICY_ENOMEM;
  int rc = gw_idem_create(cfg, &m->st);
  if (rc) {
    free(m);
    return rc;
  }
  pthread_mutex_init(&m->mu, NULL);
  *out = m;
  return 0;
}

static void mem_idem_destroy(void *p)
{
  struct mem_idem *m = p;
  if (!m)
    return;
  gw_idem_destroy(m->st);
  pthread_mutex_destroy(&m->mu);
  free(m);
}

static int mem_idem_begin(void *p, const char *route, size_t route_len, const char *key,
                          size_t key_len, const struct gw_idem_fingerprint *fp, uint64_t now_ns,
                          enum gw_idem_decision *decision, struct gw_idem_claim *claim,
                          gw_store_copy_fn copy, void *copy_ctx)
{
  struct mem_idem *m = p;
  struct gw_idem_response replay;
  pthread_mutex_lock(&m->mu);
  gw_idem_expire(m->st, now_ns, 16); /* reclaim a few expired records each time */
  int rc = gw_idem_begin(m->st, route, route_len, key, key_len, fp, now_ns, decision, claim,
                         &replay);
  if (rc == 0 && *decision == GW_IDEM_REPLAY && copy)
    rc = copy(copy_ctx, &replay);
  pthread_mutex_unlock(&m->mu);
  return rc;
}

static int mem_idem_finish(void *p, const struct gw_idem_claim *claim, enum gw_idem_origin origin,
                           const struct gw_idem_response *resp, uint64_t now_ns)
{
  struct mem_idem *m = p;
  pthread_mutex_lock(&m->mu);
  int rc = gw_idem_finish(m->st, claim, origin, resp, now_ns);
  pthread_mutex_unlock(&m->mu);
  return rc;
}

static void mem_idem_stats(void *p, struct gw_idem_stats *out)
{
  struct mem_idem *m = p;
  pthread_mutex_lock(&m->mu);
  gw_idem_stats(m->st, out);
  pthread_mutex_unlock(&m->mu);
}

const struct gw_store_ops gw_store_memory = {
    .version = GW_STORE_OPS_VERSION,
    .name = "memory",
    .limiter_create = mem_limiter_create,
    .limiter_destroy = mem_limiter_destroy,
    .limiter_admit = mem_limiter_admit,
    .limiter_stats = mem_limiter_stats,
    .limiter_peek = mem_limiter_peek,
    .idem_create = mem_idem_create,
    .idem_destroy = mem_idem_destroy,
    .idem_begin = mem_idem_begin,
    .idem_finish = mem_idem_finish,
    .idem_stats = mem_idem_stats,
};
