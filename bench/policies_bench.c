/*
 * Nanoseconds per policy decision, for each policies/ module:
 *   - "direct":  one state, no lookup (a per-route policy);
 *   - "table 1": one key reached through the key table;
 *   - "table 1M": 1,000,000 keys through the key table, a uniformly random key per decision
 *                 (cache-cold: this is the cost of per-client state under a flood of clients);
 * each with 1 thread (worker-local, no lock) and 2 threads sharing the state, every decision
 * under one pthread mutex per table as the gateway will do it. The clock is read once every 64
 * decisions, as an event loop reads it once per turn.
 *
 * Each cell is the best of `repeats` runs (default 3): other load on the machine only ever adds
 * time, so the minimum is the most repeatable figure.
 *
 * Usage: gw-bench-policies [decisions per run, default 4000000] [module name or "all"] [repeats]
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "circuit_breaker.h"
#include "degradation.h"
#include "idempotency.h"
#include "key_table.h"
#include "retry.h"
#include "rng.h"
#include "sliding_window.h"
#include "token_bucket.h"

#define KEY_LEN 16
#define MANY (1000u * 1000u)

static uint64_t mono_ns(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * GW_NS_PER_S + (uint64_t)ts.tv_nsec;
}

/* Key number k as 16 bytes ("client-" and 8 hex digits and a pad byte), made on the spot: a
 * real key arrives with the request, already in cache, so the benchmark must not fetch it from a
 * 16 MB array (that would add a cache miss the gateway does not have). */
static inline void key_of(unsigned k, char out[KEY_LEN])
{
  static const char hex[] = "0123456789abcdef";
  memcpy(out, "client-", 7);
  for (int i = 0; i < 8; i++)
    out[7 + i] = hex[(k >> (28 - 4 * i)) & 15];
  out[15] = '.';
}

/* ---- the modules under test --------------------------------------------------------------- */

static const struct gw_token_bucket_config tb_cfg = {.capacity = 100, .refill_per_sec = 1000000};
static const struct gw_sliding_window_config sw_cfg = {.limit = 16, .window_ms = 1};
static struct gw_breaker_config cb_cfg;
static struct gw_retry_config rt_cfg;
static const struct gw_degrade_config dg_cfg = {.on = GW_DEGRADE_ON(GW_DEGRADE_SHED) |
                                                      GW_DEGRADE_ON(GW_DEGRADE_SLOW),
                                                .has_fallback = true,
                                                .max_concurrent = 256,
                                                .slow_ms = 2000,
                                                .slow_window_ms = 10000,
                                                .stale_if_error_ms = 60000};

enum mod { TOKEN_BUCKET, SLIDING_WINDOW, BREAKER, RETRY, DEGRADE, IDEMPOTENCY, KEY_TABLE, MODS };
static const char *const mod_names[MODS] = {"token_bucket", "sliding_window", "circuit_breaker",
                                            "retry",        "degradation",    "idempotency",
                                            "key_table"};

static size_t value_bytes(enum mod m)
{
  switch (m) {
  case TOKEN_BUCKET:
    return sizeof(struct gw_token_bucket);
  case SLIDING_WINDOW:
    return gw_sliding_window_state_bytes(&sw_cfg);
  case BREAKER:
    return sizeof(struct gw_breaker *);
  case RETRY:
    return sizeof(struct gw_retry_budget);
  case DEGRADE:
    return sizeof(struct gw_degrade);
  default:
    return 8;
  }
}

static void init_value(enum mod m, void *v, uint64_t now)
{
  switch (m) {
  case TOKEN_BUCKET:
    gw_token_bucket_init(v, &tb_cfg, now);
    break;
  case SLIDING_WINDOW:
    gw_sliding_window_init(v, &sw_cfg);
    break;
  case BREAKER: {
    struct gw_breaker *b;
    if (gw_breaker_create(&cb_cfg, &b) != 0)
      abort();
    memcpy(v, &b, sizeof(b));
    break;
  }
  case RETRY:
    gw_retry_budget_init(v);
    break;
  case DEGRADE:
    gw_degrade_init(v);
    break;
  default:
    break;
  }
}

/* One decision on state v; returns 1 if it admitted / retried / replayed. */
static int decide(enum mod m, void *v, struct gw_rng *rng, uint64_t now)
{
  switch (m) {
  case TOKEN_BUCKET: {
    struct gw_ratelimit_info info;
    return gw_token_bucket_admit(v, &tb_cfg, now, &info);
  }
  case SLIDING_WINDOW: {
    struct gw_ratelimit_info info;
    return gw_sliding_window_admit(v, &sw_cfg, now, &info);
  }
  case BREAKER: {
    struct gw_breaker *b;
    memcpy(&b, v, sizeof(b));
    struct gw_breaker_ticket t;
    if (!gw_breaker_acquire(b, now, &t))
      return 0;
    gw_breaker_record(b, &t, (gw_rng_next(rng) & 15) == 0, 5, now); /* 1 in 16 fails */
    return 1;
  }
  case RETRY: {
    /* A request that failed once with a 503: budget deposit, backoff draw, budget withdrawal. */
    struct gw_retry_state s;
    uint64_t timeout, delay;
    struct gw_retry_input in = {GW_TRY_RESPONSE, 503, -1};
    gw_retry_budget_on_request(v, now);
    gw_retry_begin(&s, "GET", 3, false, 5000, now);
    gw_retry_start_try(&s, &rt_cfg, now, &timeout);
    return gw_retry_decide(&s, &rt_cfg, v, rng, &in, now, &delay) == GW_RETRY_YES;
  }
  case DEGRADE: {
    enum gw_degrade_reason why;
    if (!gw_degrade_admit(v, &dg_cfg, now, &why))
      return 0;
    gw_degrade_leave(v);
    gw_degrade_record_latency(v, &dg_cfg, 12, now);
    return 1;
  }
  default:
    return 1;
  }
}

/* ---- runs ------------------------------------------------------------------------------------ */

struct run {
  enum mod mod;
  unsigned nkeys; /* 0: direct state, no table */
  void *direct;   /* the state when nkeys == 0 */
  struct gw_key_table *table;
  struct gw_idem_store *idem;
  pthread_mutex_t lock;
  bool locked;
  uint64_t ops;      /* per thread */
  uint64_t start_ns; /* shared start for the clock */
};

struct worker {
  struct run *run;
  uint64_t seed;
  uint64_t elapsed_ns;
  uint64_t admitted;
  pthread_t thread;
};

static struct gw_idem_fingerprint idem_fp;

static void *work(void *arg)
{
  struct worker *w = arg;
  struct run *r = w->run;
  struct gw_rng rng;
  gw_rng_seed(&rng, w->seed);
  uint64_t admitted = 0, now = mono_ns();
  uint64_t t0 = now;
  for (uint64_t i = 0; i < r->ops; i++) {
    if ((i & 63) == 0)
      now = mono_ns();
    unsigned k = r->nkeys > 1 ? (unsigned)gw_rng_below(&rng, r->nkeys) : 0;
    char key[KEY_LEN];
    key_of(k, key);
    if (r->locked)
      pthread_mutex_lock(&r->lock);
    if (r->mod == IDEMPOTENCY) {
      enum gw_idem_decision d;
      struct gw_idem_claim claim;
      struct gw_idem_response replay;
      gw_idem_begin(r->idem, "orders", 6, key, KEY_LEN, &idem_fp, now, &d, &claim, &replay);
      admitted += d == GW_IDEM_REPLAY;
    } else if (r->nkeys == 0) {
      admitted += (uint64_t)decide(r->mod, r->direct, &rng, now);
    } else {
      void *v;
      unsigned flags;
      gw_key_table_get_or_insert(r->table, key, KEY_LEN, &v, &flags);
      if (flags & GW_KEY_TABLE_CREATED)
        init_value(r->mod, v, now);
      if (r->mod != KEY_TABLE)
        admitted += (uint64_t)decide(r->mod, v, &rng, now);
      else
        admitted++;
    }
    if (r->locked)
      pthread_mutex_unlock(&r->lock);
  }
  w->elapsed_ns = mono_ns() - t0;
  w->admitted = admitted;
  return NULL;
}

static void setup(struct run *r)
{
  uint64_t now = mono_ns();
  if (r->mod == IDEMPOTENCY) {
    unsigned n = r->nkeys ? r->nkeys : 1;
    struct gw_idem_config c = {
        .max_records = n, .max_bytes = (uint64_t)n * 512 + 4096, .ttl_ms = 3600000, .seed = {3, 4}};
    if (gw_idem_create(&c, &r->idem) != 0)
      abort();
    static const struct gw_idem_response resp = {201, "Content-Type: application/json\r\n", 32,
                                                 "{\"id\":1}", 8};
    for (unsigned i = 0; i < n; i++) {
      char key[KEY_LEN];
      key_of(i, key);
      enum gw_idem_decision d;
      struct gw_idem_claim claim;
      struct gw_idem_response replay;
      if (gw_idem_begin(r->idem, "orders", 6, key, KEY_LEN, &idem_fp, now, &d, &claim, &replay) !=
              0 ||
          gw_idem_complete(r->idem, &claim, &resp, now) != 0)
        abort();
    }
    return;
  }
  if (r->nkeys == 0) {
    r->direct = aligned_alloc(64, (value_bytes(r->mod) + 63) & ~(size_t)63);
    init_value(r->mod, r->direct, now);
    return;
  }
  struct gw_key_table_config kc = {.max_keys = r->nkeys,
                                   .key_max_bytes = 46,
                                   .value_bytes = (uint32_t)value_bytes(r->mod),
                                   .seed = {0x1234, 0x5678}};
  if (gw_key_table_create(&kc, &r->table) != 0)
    abort();
  for (unsigned i = 0; i < r->nkeys; i++) {
    char key[KEY_LEN];
    key_of(i, key);
    void *v;
    unsigned flags;
    gw_key_table_get_or_insert(r->table, key, KEY_LEN, &v, &flags);
    init_value(r->mod, v, now);
  }
}

static void teardown(struct run *r)
{
  if (r->mod == BREAKER) {
    if (r->nkeys == 0) {
      struct gw_breaker *b;
      memcpy(&b, r->direct, sizeof(b));
      gw_breaker_destroy(b);
    } else {
      for (unsigned i = 0; i < r->nkeys; i++) {
        char key[KEY_LEN];
        key_of(i, key);
        struct gw_breaker **p = gw_key_table_find(r->table, key, KEY_LEN);
        if (p)
          gw_breaker_destroy(*p);
      }
    }
  }
  free(r->direct);
  gw_key_table_destroy(r->table);
  gw_idem_destroy(r->idem);
}

/* Runs the module with threads threads; returns ns per decision per thread; *mops aggregate. */
static double measure(struct run *r, int threads, double *mops, double *admitted_share)
{
  struct worker w[2];
  r->locked = threads > 1;
  pthread_mutex_init(&r->lock, NULL);
  for (int i = 0; i < threads; i++) {
    w[i] = (struct worker){.run = r, .seed = 1000 + (uint64_t)i};
    pthread_create(&w[i].thread, NULL, work, &w[i]);
  }
  uint64_t max_elapsed = 0, admitted = 0;
  double ns = 0;
  for (int i = 0; i < threads; i++) {
    pthread_join(w[i].thread, NULL);
    ns += (double)w[i].elapsed_ns / (double)r->ops;
    admitted += w[i].admitted;
    if (w[i].elapsed_ns > max_elapsed)
      max_elapsed = w[i].elapsed_ns;
  }
  pthread_mutex_destroy(&r->lock);
  *mops = (double)r->ops * threads / ((double)max_elapsed / 1e3);
  *admitted_share = (double)admitted / ((double)r->ops * threads);
  return ns / threads;
}

int main(int argc, char **argv)
{
  uint64_t ops = argc > 1 ? strtoull(argv[1], NULL, 10) : 4000000;
  const char *only = argc > 2 && strcmp(argv[2], "all") != 0 ? argv[2] : NULL;
  int repeats = argc > 3 ? (int)strtol(argv[3], NULL, 10) : 3;
  if (repeats < 1)
    repeats = 1;
  gw_idem_fingerprint("POST", 4, "/api/orders", 11, "{\"item\":42}", 11, &idem_fp);
  cb_cfg = (struct gw_breaker_config){.window = GW_BREAKER_WINDOW_COUNT,
                                      .window_size = 20,
                                      .min_calls = 10,
                                      .failure_rate = 0.5,
                                      .slow_call_ms = 2000,
                                      .slow_call_rate = 1.0,
                                      .open_ms = 30000,
                                      .half_open_calls = 5};
  rt_cfg = (struct gw_retry_config){.max_attempts = 3,
                                    .base_ms = 50,
                                    .max_backoff_ms = 2000,
                                    .jitter = GW_JITTER_FULL,
                                    .per_try_timeout_ms = 1000,
                                    .on = GW_RETRY_ON_STATUS,
                                    .budget_percent = 20,
                                    .budget_min_per_sec = 10};
  gw_status_set_add(&rt_cfg.statuses, 503);

  printf("%-16s %-9s %12s %12s %12s %9s\n", "module", "keys", "1 thr ns/op", "2 thr ns/op",
         "2 thr Mop/s", "admitted");
  for (int m = 0; m < MODS; m++) {
    if (only && strcmp(only, mod_names[m]) != 0)
      continue;
    unsigned variants[3] = {0, 1, MANY};
    for (int vi = 0; vi < 3; vi++) {
      if ((m == KEY_TABLE && vi == 0) || (m == IDEMPOTENCY && vi == 1))
        continue; /* no "direct" key table; the idempotency store is its own table */
      struct run r = {.mod = (enum mod)m, .nkeys = variants[vi], .ops = ops};
      setup(&r);
      double ns1 = 1e18, ns2 = 1e18, mops1 = 0, mops2 = 0, adm1 = 0, adm2 = 0;
      for (int rep = 0; rep < repeats; rep++) {
        double m1, m2, a1, a2;
        double n1 = measure(&r, 1, &m1, &a1);
        double n2 = measure(&r, 2, &m2, &a2);
        if (n1 < ns1) {
          ns1 = n1;
          mops1 = m1;
          adm1 = a1;
        }
        if (n2 < ns2) {
          ns2 = n2;
          mops2 = m2;
          adm2 = a2;
        }
      }
      (void)mops1;
      (void)adm2;
      const char *label = vi == 0 ? "direct" : vi == 1 ? "table 1" : "table 1M";
      if (m == IDEMPOTENCY)
        label = vi == 0 ? "1 record" : "1M rec";
      printf("%-16s %-9s %12.1f %12.1f %12.2f %8.0f%%\n", mod_names[m], label, ns1, ns2, mops2,
             adm1 * 100);
      fflush(stdout);
      teardown(&r);
    }
  }
  return 0;
}
