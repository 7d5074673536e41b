/*
 * The raft store (see raft_store.h): cluster limiters by quota leasing and replicated idempotency
 * records, on top of the node's request queue.
 *
 * Limiter, per key (a bounded LRU key table): up to four live grants (id, units left, local
 * deadline), the units held, a request rate over two 100 ms buckets, and the last cluster report.
 * Admission spends one unit of the grant that ends first, never a unit whose lease has ended
 * locally. A grant's local deadline is the time the request was sent plus lease_ms less 1/64
 * (clock-rate margin): the leader stamps the grant later than that, and the state machine's
 * clock never runs faster than real time, so every local spend falls inside the lease the state
 * machine accounts for. When the allotment falls to half a batch, one QUOTA_ACQUIRE goes out
 * (never two at once per key). The housekeeping thread gives back (QUOTA_RELEASE) what keys idle
 * for idle_ms still hold, after removing it locally, so a released unit is never spent.
 *
 * Requests own copies of every string the command points to, and the limiter they belong to is
 * reference counted, so a limiter destroyed with refills in flight is freed by the last answer.
 */
#include "raft_store.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "key_table.h"
#include "node.h"

#define STORE_MAGIC 0x52465453u /* "RFTS" */
#define SCOPE_MAGIC 0x52465343u /* "RFSC" */
#define NGRANTS 4
#define RING 256
#define RING_KEY_MAX 255
#define NS_PER_MS UINT64_C(1000000)
#define RATE_BUCKET_NS (100 * NS_PER_MS)
#define FAIL_BACKOFF_NS (50 * NS_PER_MS)
#define HOUSEKEEP_MS 50
#define CLAIM_BUCKETS 1024
#define MAX_CLAIMS 65536
/* A stored response must fit one log entry (1 MiB by default) with the command around it. */
#define MAX_RESPONSE ((1u << 20) - 4096)

static uint64_t mono_ns(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

const char *gw_store_raft_strerror(int err)
{
  switch (err) {
  case GW_STORE_RAFT_ENO_LEADER:
    return "the raft group has no leader";
  case GW_STORE_RAFT_EUNKNOWN:
    return "the write's outcome is unknown";
  case GW_STORE_RAFT_EBUSY:
    return "the raft node is busy";
  case GW_STORE_RAFT_EDISK_FULL:
    return "the raft log is full";
  case GW_STORE_RAFT_ENOT_LEADER:
    return "this node is not the leader and cannot forward";
  case GW_STORE_RAFT_EFULL:
    return "the replicated record store is full";
  case GW_STORE_RAFT_EPROTO:
    return "unexpected answer from the state machine";
  case GW_STORE_RAFT_ESTOPPING:
    return "the raft node is stopping";
  }
  return NULL;
}

/* ---- Instance ------------------------------------------------------------------------------ */

struct raft_limiter;

struct raft_store {
  uint32_t magic;
  struct gw_node *node;
  char node_name[GW_FSM_MAX_NODE + 1];
  size_t node_name_len;
  pthread_mutex_t mu; /* limiters, forward hook, tuning, stop (taken before a limiter's) */
  pthread_cond_t cv;
  pthread_mutex_t imu; /* inflight only (a leaf: taken under a limiter's lock too) */
  pthread_cond_t icv;
  struct raft_limiter *limiters;
  struct gw_store_raft_forward fwd;
  struct gw_store_raft_tuning tune;
  uint64_t inflight;
  bool stop;
  pthread_t hk;
  /* Limiters and idempotency stores alive on this store: the store is freed when it is closed
   * and the last of them goes (they may outlive the node: after close nothing is submitted). */
  _Atomic int users;
  _Atomic bool closed;
  _Atomic uint64_t refills, refill_units, refill_failures, releases, release_units, forwarded,
      claims, replays;
};

struct gw_store_raft_scope gw_store_raft_scope(void *impl, const char *route)
{
  struct gw_store_raft_scope s = {SCOPE_MAGIC, impl, route};
  return s;
}

void gw_store_raft_set_forward(void *impl, const struct gw_store_raft_forward *fwd)
{
  struct raft_store *st = impl;
  pthread_mutex_lock(&st->mu);
  st->fwd = *fwd;
  pthread_mutex_unlock(&st->mu);
}

void gw_store_raft_tune(void *impl, const struct gw_store_raft_tuning *t)
{
  struct raft_store *st = impl;
  pthread_mutex_lock(&st->mu);
  if (t->tb_lease_ms >= 1 && t->tb_lease_ms <= GW_FSM_QUOTA_LEASE_MAX_MS)
    st->tune.tb_lease_ms = t->tb_lease_ms;
  if (t->horizon_ms >= 1)
    st->tune.horizon_ms = t->horizon_ms;
  if (t->idle_ms >= 1)
    st->tune.idle_ms = t->idle_ms;
  if (t->batch_div >= 1)
    st->tune.batch_div = t->batch_div;
  if (t->wait_ms >= 1)
    st->tune.wait_ms = t->wait_ms;
  pthread_mutex_unlock(&st->mu);
}

void gw_store_raft_stats(void *impl, struct gw_store_raft_stats *out)
{
  struct raft_store *st = impl;
  out->refills = atomic_load(&st->refills);
  out->refill_units = atomic_load(&st->refill_units);
  out->refill_failures = atomic_load(&st->refill_failures);
  out->releases = atomic_load(&st->releases);
  out->release_units = atomic_load(&st->release_units);
  out->forwarded = atomic_load(&st->forwarded);
  out->claims = atomic_load(&st->claims);
  out->replays = atomic_load(&st->replays);
}

/* ---- Requests -------------------------------------------------------------------------------- */

enum rq_kind { RQ_ACQUIRE, RQ_RELEASE, RQ_BEGIN, RQ_FINISH };

struct rq {
  struct gw_node_req nr; /* first: done gets &nr */
  struct raft_store *st;
  enum rq_kind kind;
  bool forwarded;
  bool retried;   /* FINISH: sent a second time after a failed outcome */
  bool too_large; /* FINISH: the response did not fit and the claim is released instead */
  /* Owned copies the command points to. */
  char id[GW_FSM_MAX_QUOTA_ID + 1];
  char route[GW_FSM_GWIDEM_MAX_ROUTE + 1];
  char key[GW_IDEM_KEY_MAX + 1];
  uint8_t *blob; /* FINISH: headers then body */
  /* ACQUIRE */
  struct raft_limiter *lim;
  struct lwait *wait_head, *wait_tail; /* requests waiting for this grant, oldest first */
  struct rq *wprev, *wnext;           /* the limiter's list of acquires with waiters */
  uint8_t lkey_buf[RING_KEY_MAX + 1];
  uint8_t *lkey; /* the limiter key: lkey_buf, or owned when longer */
  size_t lkey_len;
  uint64_t send_ns;
  /* BEGIN / FINISH */
  struct raft_idem *idem;
  struct gw_store_op *op;
  gw_store_copy_fn copy;
  void *copy_ctx;
};

static void rq_answer(struct rq *q, int err, int status, const char *body, size_t len);

static int outcome_err(enum gw_node_outcome o)
{
  switch (o) {
  case GW_NODE_OK:
    return 0;
  case GW_NODE_NOT_LEADER:
    return GW_STORE_RAFT_ENOT_LEADER;
  case GW_NODE_NO_LEADER:
    return GW_STORE_RAFT_ENO_LEADER;
  case GW_NODE_UNKNOWN:
    return GW_STORE_RAFT_EUNKNOWN;
  case GW_NODE_BUSY:
    return GW_STORE_RAFT_EBUSY;
  case GW_NODE_DISK_FULL:
    return GW_STORE_RAFT_EDISK_FULL;
  case GW_NODE_STOPPING:
    return GW_STORE_RAFT_ESTOPPING;
  }
  return GW_STORE_RAFT_EPROTO;
}

static void fwd_done(void *arg, int status, const char *body, size_t len)
{
  struct rq *q = arg;
  if (status == 0)
    rq_answer(q, GW_STORE_RAFT_ENO_LEADER, 0, NULL, 0);
  else
    rq_answer(q, 0, status, body ? body : "", body ? len : 0);
}

/* Sends a follower's command to the leader through the hook; false when it cannot. */
static bool try_forward(struct rq *q)
{
  struct raft_store *st = q->st;
  pthread_mutex_lock(&st->mu);
  struct gw_store_raft_forward fwd = st->fwd;
  pthread_mutex_unlock(&st->mu);
  if (fwd.send == NULL || q->forwarded || q->nr.leader_api[0] == '\0')
    return false;
  size_t need = gw_fsm_cmd_encoded_len(&q->nr.cmd);
  uint8_t *buf = need ? malloc(need) : NULL;
  size_t len;
  if (buf == NULL || gw_fsm_cmd_encode(&q->nr.cmd, buf, need, &len) != 0) {
    free(buf);
    return false;
  }
  q->forwarded = true;
  atomic_fetch_add(&st->forwarded, 1);
  char api[sizeof(q->nr.leader_api)];
  memcpy(api, q->nr.leader_api, sizeof(api));
  int rc = fwd.send(fwd.ctx, api, buf, len, fwd_done, q);
  free(buf);
  return rc == 0;
}

/* The node's answer, on the node thread. */
static void node_done(struct gw_node_req *nr)
{
  struct rq *q = (struct rq *)nr;
  char *body = nr->body;
  nr->body = NULL;
  if (nr->outcome == GW_NODE_NOT_LEADER && try_forward(q)) {
    free(body);
    return;
  }
  if (nr->outcome != GW_NODE_OK)
    rq_answer(q, outcome_err(nr->outcome), 0, NULL, 0);
  else
    rq_answer(q, 0, nr->status, body ? body : "", body ? nr->body_len : 0);
  free(body);
}

static void rq_free(struct rq *q)
{
  struct raft_store *st = q->st;
  free(q->blob);
  if (q->lkey != q->lkey_buf)
    free(q->lkey);
  free(q);
  pthread_mutex_lock(&st->imu);
  st->inflight--;
  pthread_cond_broadcast(&st->icv);
  pthread_mutex_unlock(&st->imu);
}

static struct rq *rq_new(struct raft_store *st, enum rq_kind kind)
{
  struct rq *q = calloc(1, sizeof(*q));
  if (q == NULL)
    return NULL;
  q->st = st;
  q->kind = kind;
  q->lkey = q->lkey_buf;
  q->nr.op = GW_NODE_WRITE;
  q->nr.done = node_done;
  q->nr.cmd.owner = st->node_name;
  q->nr.cmd.owner_len = st->node_name_len;
  pthread_mutex_lock(&st->imu);
  st->inflight++;
  pthread_mutex_unlock(&st->imu);
  return q;
}

/* Submits q; on a full queue frees it and returns GW_STORE_RAFT_EBUSY. */
static void store_release(struct raft_store *st);

static int rq_submit(struct rq *q)
{
  if (atomic_load(&q->st->closed) || gw_node_submit(q->st->node, &q->nr) != 0) {
    rq_free(q);
    return GW_STORE_RAFT_EBUSY;
  }
  return 0;
}

/* ---- Tiny readers for the state machine's JSON answers ------------------------------------- */

static const char *json_find(const char *body, size_t len, const char *key)
{
  char pat[48];
  int n = snprintf(pat, sizeof(pat), "\"%s\":", key);
  if (n <= 0 || (size_t)n >= sizeof(pat) || len < (size_t)n)
    return NULL;
  for (size_t i = 0; i + (size_t)n <= len; i++)
    if (memcmp(body + i, pat, (size_t)n) == 0)
      return body + i + n;
  return NULL;
}

static bool json_u64(const char *body, size_t len, const char *key, uint64_t *out)
{
  const char *p = json_find(body, len, key);
  if (p == NULL)
    return false;
  const char *end = body + len;
  if (p < end && *p == '"')
    p++;
  if (p >= end || *p < '0' || *p > '9')
    return false;
  uint64_t v = 0;
  while (p < end && *p >= '0' && *p <= '9') {
    unsigned d = (unsigned)(*p++ - '0');
    if (v > (UINT64_MAX - d) / 10)
      return false;
    v = v * 10 + d;
  }
  *out = v;
  return true;
}

/* A string value (no escapes: the machine writes only plain words and base64 here). */
static bool json_str(const char *body, size_t len, const char *key, const char **s, size_t *n)
{
  const char *p = json_find(body, len, key);
  const char *end = body + len;
  if (p == NULL || p >= end || *p != '"')
    return false;
  p++;
  const char *q = memchr(p, '"', (size_t)(end - p));
  if (q == NULL)
    return false;
  *s = p;
  *n = (size_t)(q - p);
  return true;
}

static bool json_is(const char *body, size_t len, const char *key, const char *want)
{
  const char *s;
  size_t n;
  return json_str(body, len, key, &s, &n) && n == strlen(want) && memcmp(s, want, n) == 0;
}

static int b64_val(char c)
{
  if (c >= 'A' && c <= 'Z')
    return c - 'A';
  if (c >= 'a' && c <= 'z')
    return c - 'a' + 26;
  if (c >= '0' && c <= '9')
    return c - '0' + 52;
  if (c == '+')
    return 62;
  if (c == '/')
    return 63;
  return -1;
}

/* Decodes n base64 characters into out (room for n / 4 * 3); returns the length or -1. */
static long b64_decode(const char *s, size_t n, uint8_t *out)
{
  if (n % 4 != 0)
    return -1;
  size_t o = 0;
  for (size_t i = 0; i < n; i += 4) {
    int v[4];
    int pad = 0;
    for (int k = 0; k < 4; k++) {
      if (s[i + k] == '=' && i + 4 == n && k >= 2) {
        v[k] = 0;
        pad++;
      } else if (pad || (v[k] = b64_val(s[i + k])) < 0) {
        return -1;
      }
    }
    uint32_t w = (uint32_t)v[0] << 18 | (uint32_t)v[1] << 12 | (uint32_t)v[2] << 6 | (uint32_t)v[3];
    out[o++] = (uint8_t)(w >> 16);
    if (pad < 2)
      out[o++] = (uint8_t)(w >> 8);
    if (pad < 1)
      out[o++] = (uint8_t)w;
  }
  return (long)o;
}

/* ---- Limiters ---------------------------------------------------------------------------- */

struct grant {
  uint64_t id, units, left, deadline_ns;
};

/* Per key; a fixed-size blob in the key table. */
struct lstate {
  struct grant g[NGRANTS];
  uint64_t held;
  uint64_t last_ns;           /* last admission attempt */
  uint64_t born_ns;           /* first attempt (the rate of a young key counts from it) */
  uint64_t rate_bucket;       /* now / RATE_BUCKET_NS of cur */
  uint64_t rate_cur, rate_prev;
  uint64_t rep_remaining, rep_spent, rep_next_ms, rep_reset_ms;
  uint64_t forgot_units, forgot_until; /* spent grants dropped from g[] before their lease's end */
  uint64_t backoff_until;     /* no acquire before (the cluster had none, or failed) */
  uint64_t drained_until;     /* the cluster ran dry: refuse rather than wait until then */
  uint32_t n;
  struct rq *refill;           /* the QUOTA_ACQUIRE in flight for this key, if any */
  uint8_t have_report, in_ring, pad_[6];
};

/* A request with no unit at hand, waiting (at most wait_ns) for the acquire in flight. */
struct lwait {
  struct lwait *next;
  struct gw_store_op *op;
  uint64_t deadline_ns;
};

struct ring_ent {
  uint16_t len;
  uint8_t key[RING_KEY_MAX];
};

struct raft_limiter {
  struct raft_store *st;
  struct raft_limiter *next; /* the instance's list */
  pthread_mutex_t mu;
  struct gw_limiter_spec spec;
  char prefix[128];
  size_t prefix_len;
  struct gw_key_table *keys; /* owned */
  struct lstate single;
  bool single_init;
  uint64_t q;        /* capacity or limit */
  uint64_t lease_ms;
  uint64_t max_batch;
  uint64_t horizon_ms, idle_ns;
  uint64_t rtt_ns; /* smoothed refill round trip (1/8 weight per answer) */
  uint64_t wait_ns; /* the longest a request waits for a grant */
  struct rq *waiting; /* acquires in flight that requests wait for */
  uint64_t admitted, rejected, evictions;
  int refs; /* 1 for the owner + one per request in flight */
  bool dead;
  struct ring_ent *ring; /* owned: keys that hold an allotment, for idle release */
  uint32_t ring_n;
};

static void lim_unref_locked_and_unlock(struct raft_limiter *l)
{
  bool free_it = --l->refs == 0;
  pthread_mutex_unlock(&l->mu);
  if (free_it) {
    gw_key_table_destroy(l->keys);
    pthread_mutex_destroy(&l->mu);
    free(l->ring);
    free(l);
  }
}

static int raft_limiter_create(void *impl, const struct gw_limiter_spec *spec, void **out)
{
  const struct gw_store_raft_scope *sc = impl;
  struct raft_store *st;
  const char *route = "-";
  if (sc != NULL && sc->magic == SCOPE_MAGIC) {
    st = sc->raft;
    if (sc->route != NULL && sc->route[0] != '\0')
      route = sc->route;
  } else {
    st = impl;
  }
  if (st == NULL || st->magic != STORE_MAGIC)
    return GW_POLICY_EINVALID_CONFIG;
  if (spec->kind == GW_LIMITER_TOKEN_BUCKET ? gw_token_bucket_config_check(&spec->tb)
                                            : gw_sliding_window_config_check(&spec->sw))
    return GW_POLICY_EINVALID_CONFIG;
  size_t rl = strlen(route);
  if (rl > 100)
    return GW_POLICY_EINVALID_CONFIG;
  for (size_t i = 0; i < rl; i++)
    if ((unsigned char)route[i] < 0x21 || (unsigned char)route[i] > 0x7e)
      return GW_POLICY_EINVALID_CONFIG;
  struct raft_limiter *l = calloc(1, sizeof(*l));
  if (l == NULL)
    return GW_POLICY_ENOMEM;
  l->ring = calloc(RING, sizeof(*l->ring));
  struct gw_key_table_config kc = {
      .max_keys = spec->max_keys ? spec->max_keys : 1,
      .key_max_bytes = 64,
      .value_bytes = (uint32_t)((sizeof(struct lstate) + 7) & ~(size_t)7),
      .seed = spec->seed,
  };
  if (l->ring == NULL || gw_key_table_create(&kc, &l->keys) != 0) {
    free(l->ring);
    free(l);
    return GW_POLICY_ENOMEM;
  }
  l->st = st;
  l->spec = *spec;
  l->prefix_len = (size_t)snprintf(l->prefix, sizeof(l->prefix), "%s/%s/", route,
                                   spec->kind == GW_LIMITER_TOKEN_BUCKET ? "tb" : "sw");
  pthread_mutex_lock(&st->mu);
  struct gw_store_raft_tuning t = st->tune;
  pthread_mutex_unlock(&st->mu);
  if (spec->kind == GW_LIMITER_TOKEN_BUCKET) {
    /* Granted tokens count against the bucket until their lease ends, so the cluster can
     * take at most capacity per lease: keep the lease to a quarter of the time the bucket
     * takes to refill, so the bucket, not the leasing, is what limits. */
    l->q = spec->tb.capacity;
    uint64_t fill_ms = spec->tb.capacity * 1000 / spec->tb.refill_per_sec;
    l->lease_ms = fill_ms / 4;
    if (l->lease_ms < 20)
      l->lease_ms = 20;
    if (l->lease_ms > t.tb_lease_ms)
      l->lease_ms = t.tb_lease_ms;
  } else {
    l->q = spec->sw.limit;
    uint64_t w = spec->sw.window_ms / 20;
    l->lease_ms = w < 50 ? 50 : w > 1000 ? 1000 : w;
  }
  l->horizon_ms = t.horizon_ms < l->lease_ms / 2 ? t.horizon_ms : l->lease_ms / 2;
  if (l->horizon_ms == 0)
    l->horizon_ms = 1;
  l->max_batch = l->q / t.batch_div;
  if (l->max_batch < 1)
    l->max_batch = 1;
  if (l->max_batch > GW_FSM_QUOTA_COUNT_MAX)
    l->max_batch = GW_FSM_QUOTA_COUNT_MAX;
  l->idle_ns = t.idle_ms * NS_PER_MS;
  l->wait_ns = t.wait_ms * NS_PER_MS;
  l->refs = 1;
  pthread_mutex_init(&l->mu, NULL);
  pthread_mutex_lock(&st->mu);
  l->next = st->limiters;
  st->limiters = l;
  pthread_mutex_unlock(&st->mu);
  atomic_fetch_add(&st->users, 1);
  *out = l;
  return 0;
}

static void limiter_housekeep(struct raft_limiter *l, uint64_t now, struct rq **out, size_t *n_out,
                              size_t cap, bool all);

static void raft_limiter_destroy(void *p)
{
  struct raft_limiter *l = p;
  if (l == NULL)
    return;
  struct raft_store *st = l->st;
  pthread_mutex_lock(&st->mu);
  for (struct raft_limiter **pp = &st->limiters; *pp; pp = &(*pp)->next)
    if (*pp == l) {
      *pp = l->next;
      break;
    }
  pthread_mutex_unlock(&st->mu);
  /* Dead first: a grant answered from here on goes straight back. */
  pthread_mutex_lock(&l->mu);
  l->dead = true;
  pthread_mutex_unlock(&l->mu);
  /* Refuse any waiter and give back what the keys still hold (a lost release only leaves
   * units to their lease). */
  size_t cap = RING * NGRANTS, n = 0;
  struct rq **give = malloc(cap * sizeof(*give));
  limiter_housekeep(l, mono_ns(), give, &n, give != NULL ? cap : 0, true);
  for (size_t i = 0; i < n; i++)
    rq_submit(give[i]);
  free(give);
  pthread_mutex_lock(&l->mu);
  lim_unref_locked_and_unlock(l);
  store_release(st);
}

/* The limiter id of key: prefix + the key when short and printable, else a fixed-key digest
 * (the same on every node). */
static size_t limiter_id(const struct raft_limiter *l, const void *key, size_t len, char *out)
{
  memcpy(out, l->prefix, l->prefix_len);
  size_t n = l->prefix_len;
  const unsigned char *k = key;
  bool plain = len <= 120;
  for (size_t i = 0; plain && i < len; i++)
    if (k[i] < 0x21 || k[i] > 0x7e || k[i] == '#')
      plain = false;
  if (plain) {
    if (len)
      memcpy(out + n, key, len);
    return n + len;
  }
  static const struct gw_hash_key fk[2] = {{0x7261667471756f74ull, 0x615f6b65795f3031ull},
                                           {0x6c696d697465725full, 0x6469676573745f32ull}};
  uint64_t h0 = gw_siphash(&fk[0], 2, 4, key, len), h1 = gw_siphash(&fk[1], 2, 4, key, len);
  n += (size_t)snprintf(out + n, 40, "#%016llx%016llx", (unsigned long long)h0, (unsigned long long)h1);
  return n;
}

/* Drops the grants whose lease ended (spent ones stay until then: their count corrects the
 * cluster's report) and sums what is left. */
static void prune(struct lstate *s, uint64_t now)
{
  uint64_t held = 0;
  for (uint32_t i = 0; i < s->n;) {
    if (s->g[i].deadline_ns <= now) {
      s->g[i] = s->g[--s->n];
      continue;
    }
    held += s->g[i].left;
    i++;
  }
  s->held = held;
}

static void rate_tick(struct lstate *s, uint64_t now)
{
  uint64_t b = now / RATE_BUCKET_NS;
  if (b != s->rate_bucket) {
    s->rate_prev = b == s->rate_bucket + 1 ? s->rate_cur : 0;
    s->rate_cur = 0;
    s->rate_bucket = b;
  }
  s->rate_cur++;
}

/* Units for the next horizon at the observed rate (attempts over the last 100-200 ms). */
static uint64_t batch_size(const struct raft_limiter *l, const struct lstate *s, uint64_t now)
{
  uint64_t span = RATE_BUCKET_NS + now % RATE_BUCKET_NS;
  if (now - s->born_ns + NS_PER_MS < span)
    span = now - s->born_ns + NS_PER_MS; /* a key seen for less than that */
  uint64_t n = s->rate_prev + s->rate_cur;
  /* The batch must last a few round trips: a slow commit (a busy disk) stretches the horizon,
   * up to half the lease. */
  uint64_t horizon = l->horizon_ms * NS_PER_MS;
  if (3 * l->rtt_ns > horizon)
    horizon = 3 * l->rtt_ns;
  if (horizon > l->lease_ms * NS_PER_MS / 2)
    horizon = l->lease_ms * NS_PER_MS / 2;
  /* n attempts over span ns -> per horizon */
  long double want = (long double)n * (long double)horizon / (long double)span;
  uint64_t b = (uint64_t)want + 1;
  if (b > l->max_batch)
    b = l->max_batch;
  return b;
}

static void ring_add(struct raft_limiter *l, struct lstate *s, const void *key, size_t len)
{
  if (s->in_ring || len > RING_KEY_MAX || l->ring_n >= RING)
    return; /* untracked: its allotment simply runs out at its lease's end */
  struct ring_ent *e = &l->ring[l->ring_n++];
  e->len = (uint16_t)len;
  if (len)
    memcpy(e->key, key, len);
  s->in_ring = 1;
}

static struct lstate *state_for(struct raft_limiter *l, const void *key, size_t len, bool create,
                                bool *evicted)
{
  if (len == 0) {
    if (!l->single_init) {
      if (!create)
        return NULL;
      memset(&l->single, 0, sizeof(l->single));
      l->single_init = true;
    }
    return &l->single;
  }
  if (!create)
    return gw_key_table_contains(l->keys, key, len) ? gw_key_table_find(l->keys, key, len) : NULL;
  void *v;
  unsigned flags = 0;
  gw_key_table_get_or_insert(l->keys, key, len, &v, &flags);
  if (flags & GW_KEY_TABLE_EVICTED) {
    l->evictions++;
    if (evicted)
      *evicted = true;
  }
  return v;
}

static void fill_info(const struct raft_limiter *l, const struct lstate *s, bool ok,
                      struct gw_ratelimit_info *info)
{
  if (info == NULL)
    return;
  memset(info, 0, sizeof(*info));
  info->limit = l->q;
  if (l->spec.kind == GW_LIMITER_TOKEN_BUCKET)
    info->window_s = l->spec.tb.capacity / l->spec.tb.refill_per_sec +
                     (l->spec.tb.capacity % l->spec.tb.refill_per_sec != 0);
  else
    info->window_s = l->spec.sw.window_ms / 1000 + (l->spec.sw.window_ms % 1000 != 0);
  if (s->have_report) {
    info->remaining = s->rep_remaining > s->rep_spent ? s->rep_remaining - s->rep_spent : 0;
    info->reset_s = s->rep_reset_ms / 1000 + (s->rep_reset_ms % 1000 != 0);
    info->next_s = s->held > 0 ? 0 : s->rep_next_ms / 1000 + (s->rep_next_ms % 1000 != 0);
  } else {
    info->remaining = s->held;
  }
  if (!ok) {
    info->remaining = 0; /* what this node can admit now, whatever other nodes still hold */
    info->retry_after_s = info->next_s > 0 ? info->next_s : 1;
  }
}

static struct rq *refill_prepare(struct raft_limiter *l, struct lstate *s, const void *key,
                                 size_t len, uint64_t now)
{
  uint64_t b = batch_size(l, s, now);
  struct rq *q = rq_new(l->st, RQ_ACQUIRE);
  if (q == NULL)
    return NULL;
  size_t idl = limiter_id(l, key, len, q->id);
  q->nr.cmd.kind = GW_FSM_QUOTA_ACQUIRE;
  q->nr.cmd.name = q->id;
  q->nr.cmd.name_len = idl;
  q->nr.cmd.quota_kind =
      l->spec.kind == GW_LIMITER_TOKEN_BUCKET ? GW_FSM_QUOTA_TOKEN_BUCKET : GW_FSM_QUOTA_SLIDING_WINDOW;
  q->nr.cmd.quota_a = l->q;
  q->nr.cmd.quota_b = l->spec.kind == GW_LIMITER_TOKEN_BUCKET ? l->spec.tb.refill_per_sec : l->spec.sw.window_ms;
  q->nr.cmd.count = b;
  q->nr.cmd.ttl_ms = l->lease_ms;
  q->lim = l;
  q->send_ns = now;
  if (len > RING_KEY_MAX && (q->lkey = malloc(len)) == NULL) {
    q->lkey = q->lkey_buf;
    rq_free(q);
    return NULL;
  }
  if (len)
    memcpy(q->lkey, key, len);
  q->lkey_len = len;
  l->refs++;
  s->refill = q;
  return q;
}

static struct rq *release_prepare(struct raft_store *st, const char *id, size_t idl, uint64_t grant,
                                  uint64_t n)
{
  struct rq *q = rq_new(st, RQ_RELEASE);
  if (q == NULL)
    return NULL;
  memcpy(q->id, id, idl);
  q->nr.cmd.kind = GW_FSM_QUOTA_RELEASE;
  q->nr.cmd.name = q->id;
  q->nr.cmd.name_len = idl;
  q->nr.cmd.grant_id = grant;
  q->nr.cmd.count = n;
  atomic_fetch_add(&st->releases, 1);
  atomic_fetch_add(&st->release_units, n);
  return q;
}

/* ---- Requests waiting for a grant ---- */

static void waiting_link(struct raft_limiter *l, struct rq *q)
{
  q->wprev = NULL;
  q->wnext = l->waiting;
  if (l->waiting != NULL)
    l->waiting->wprev = q;
  l->waiting = q;
}

static void waiting_unlink(struct raft_limiter *l, struct rq *q)
{
  if (q->wprev != NULL)
    q->wprev->wnext = q->wnext;
  else if (l->waiting == q)
    l->waiting = q->wnext;
  else
    return; /* not listed */
  if (q->wnext != NULL)
    q->wnext->wprev = q->wprev;
  q->wprev = q->wnext = NULL;
}

/* Parks w on the acquire q (l->mu held). */
static void wait_on(struct raft_limiter *l, struct rq *q, struct lwait *w)
{
  w->next = NULL;
  if (q->wait_head == NULL) {
    q->wait_head = w;
    waiting_link(l, q);
  } else {
    q->wait_tail->next = w;
  }
  q->wait_tail = w;
}

/* Takes q's waiters off it (l->mu held): the caller answers or parks them again. */
static struct lwait *waiters_take(struct raft_limiter *l, struct rq *q)
{
  struct lwait *w = q->wait_head;
  waiting_unlink(l, q);
  q->wait_head = q->wait_tail = NULL;
  return w;
}

/* Fills a waiter's answer: admitted, or refused with the key's report (l->mu held). */
static void waiter_decide(struct raft_limiter *l, const struct lstate *s, struct lwait *w, bool ok)
{
  struct gw_store_op *op = w->op;
  op->err = 0;
  op->admitted = ok;
  if (ok)
    l->admitted++;
  else
    l->rejected++;
  if (s != NULL) {
    fill_info(l, s, ok, &op->info);
  } else {
    struct lstate fresh;
    memset(&fresh, 0, sizeof(fresh));
    fill_info(l, &fresh, ok, &op->info);
  }
}

/* Calls done for a list of decided waiters and frees them (no lock held). */
static void waiters_done(struct lwait *w);

/* Refuses the waiters whose time is up, or all of them (l->mu held): a node that cannot reach
 * its cluster spends only what it holds. Returns them for waiters_done. */
static struct lwait *waiters_expire(struct raft_limiter *l, uint64_t now, bool all)
{
  struct lwait *expired = NULL;
  for (struct rq *q = l->waiting, *qn; q != NULL; q = qn) {
    qn = q->wnext;
    const struct lstate *ks = state_for(l, q->lkey, q->lkey_len, false, NULL);
    struct lwait **pp = &q->wait_head, *last = NULL;
    while (*pp != NULL) {
      struct lwait *w = *pp;
      if (all || now >= w->deadline_ns) {
        *pp = w->next;
        waiter_decide(l, ks, w, false);
        w->next = expired;
        expired = w;
      } else {
        last = w;
        pp = &w->next;
      }
    }
    q->wait_tail = last;
    if (q->wait_head == NULL)
      waiting_unlink(l, q);
  }
  return expired;
}

static void waiters_done(struct lwait *w)
{
  while (w != NULL) {
    struct lwait *next = w->next;
    w->op->done(w->op);
    free(w);
    w = next;
  }
}

/* Refuses every waiter of a list (l->mu held); returns the list for waiters_done. */
static struct lwait *waiters_refuse(struct raft_limiter *l, const struct lstate *s, struct lwait *w)
{
  for (struct lwait *x = w; x != NULL; x = x->next)
    waiter_decide(l, s, x, false);
  return w;
}

/*
 * Submits an acquire. When it cannot go out (queue full, store closed) its waiters are refused,
 * except mine (the caller's own, if parked on q), which is taken off and freed: the caller
 * answers it itself. Returns false then.
 */
static bool refill_submit(struct raft_limiter *l, struct rq *q, struct lwait *mine)
{
  if (!atomic_load(&q->st->closed) && gw_node_submit(q->st->node, &q->nr) == 0)
    return true;
  atomic_fetch_add(&l->st->refill_failures, 1);
  pthread_mutex_lock(&l->mu);
  struct lstate *s = state_for(l, q->lkey, q->lkey_len, false, NULL);
  if (s != NULL && s->refill == q) {
    s->refill = NULL;
    s->backoff_until = mono_ns() + FAIL_BACKOFF_NS;
  }
  struct lwait *list = waiters_take(l, q);
  for (struct lwait **pp = &list; mine != NULL && *pp != NULL; pp = &(*pp)->next)
    if (*pp == mine) {
      *pp = mine->next;
      free(mine);
      break;
    }
  struct lwait *refused = waiters_refuse(l, s, list);
  lim_unref_locked_and_unlock(l);
  waiters_done(refused);
  rq_free(q);
  return false;
}

/* Spends one unit of the grant that ends first (s->held > 0). */
static void spend(struct lstate *s)
{
  uint32_t best = NGRANTS;
  for (uint32_t i = 0; i < s->n; i++)
    if (s->g[i].left > 0 && (best == NGRANTS || s->g[i].deadline_ns < s->g[best].deadline_ns))
      best = i;
  s->g[best].left--;
  s->held--;
  s->rep_spent++;
}

/*
 * The local decision, shared by both forms (l->mu held): spends a unit when the key holds one
 * and starts a refill when the allotment runs low (*refill, to submit after unlocking). Returns
 * 1 admitted, 0 refused, or -1: nothing held but the cluster may have some (the synchronous form
 * refuses then; the asynchronous one waits for the grant).
 */
static int decide(struct raft_limiter *l, struct lstate *s, const void *key, size_t len,
                  uint64_t now_ns, struct rq **refill)
{
  if (s->born_ns == 0)
    s->born_ns = now_ns;
  prune(s, now_ns);
  rate_tick(s, now_ns);
  s->last_ns = now_ns;
  int ok = -1;
  if (s->held > 0) {
    spend(s);
    ok = 1;
  } else if (now_ns < s->drained_until || (s->refill == NULL && now_ns < s->backoff_until)) {
    ok = 0; /* the cluster answered "none" (or failed) a moment ago */
  }
  if (s->refill == NULL && now_ns >= s->backoff_until && s->held <= batch_size(l, s, now_ns))
    *refill = refill_prepare(l, s, key, len, now_ns);
  return ok;
}

/* Leases are checked against the clock itself: a caller's reading taken a while ago must not
 * let a unit be spent after its local deadline. */
static uint64_t clock_at_least(uint64_t now_ns)
{
  uint64_t clock = mono_ns();
  return clock > now_ns ? clock : now_ns;
}

static bool raft_limiter_admit(void *p, const void *key, size_t len, uint64_t now_ns,
                               struct gw_ratelimit_info *info, bool *evicted)
{
  struct raft_limiter *l = p;
  struct rq *refill = NULL;
  now_ns = clock_at_least(now_ns);
  pthread_mutex_lock(&l->mu);
  struct lstate *s = state_for(l, key, len, true, evicted);
  bool ok = decide(l, s, key, len, now_ns, &refill) == 1;
  if (ok)
    l->admitted++;
  else
    l->rejected++;
  fill_info(l, s, ok, info);
  pthread_mutex_unlock(&l->mu);
  if (refill != NULL)
    refill_submit(l, refill, NULL);
  return ok;
}

/*
 * As raft_limiter_admit while the key holds a unit (GW_STORE_DONE, no round trip). A key that
 * holds none while the cluster may still have some (a key seen for the first time, or whose
 * allotment ran out) waits for the acquire in flight, at most wait_ns: so no request is refused
 * while the limit has room, and none waits while its node holds units.
 */
static int raft_limiter_admit_async(void *p, const void *key, size_t len, uint64_t now_ns,
                                    struct gw_store_op *op)
{
  struct raft_limiter *l = p;
  struct rq *refill = NULL;
  now_ns = clock_at_least(now_ns);
  struct lwait *w = NULL;
  struct rq *parked_on = NULL;
  pthread_mutex_lock(&l->mu);
  struct lstate *s = state_for(l, key, len, true, &op->evicted);
  int ok = decide(l, s, key, len, now_ns, &refill);
  if (ok < 0 && s->refill != NULL && (w = malloc(sizeof(*w))) != NULL) {
    w->op = op;
    w->deadline_ns = now_ns + l->wait_ns;
    parked_on = s->refill;
    wait_on(l, parked_on, w);
  } else {
    struct lwait self = {NULL, op, 0};
    waiter_decide(l, s, &self, ok == 1); /* decided now, by the return value */
    ok = ok == 1;
  }
  pthread_mutex_unlock(&l->mu);
  if (refill != NULL && !refill_submit(l, refill, parked_on == refill ? w : NULL) &&
      parked_on == refill) {
    /* The acquire this request waited for could not go out: refused now, by this call. */
    pthread_mutex_lock(&l->mu);
    struct lwait self = {NULL, op, 0};
    waiter_decide(l, state_for(l, key, len, false, NULL), &self, false);
    pthread_mutex_unlock(&l->mu);
    return GW_STORE_DONE;
  }
  return ok < 0 ? 0 : GW_STORE_DONE;
}

/* A QUOTA_ACQUIRE's answer (node thread, or the forward hook's thread). */
static void acquire_answer(struct rq *q, int err, int status, const char *body, size_t len)
{
  struct raft_limiter *l = q->lim;
  struct raft_store *st = q->st;
  uint64_t granted = 0, grant = 0, remaining = 0, next_ms = 0, reset_ms = 0, lease_ms = 0;
  bool good = err == 0 && status == 200 && json_u64(body, len, "granted", &granted) &&
              json_u64(body, len, "grant", &grant) && json_u64(body, len, "remaining", &remaining) &&
              json_u64(body, len, "next_ms", &next_ms) && json_u64(body, len, "reset_ms", &reset_ms) &&
              json_u64(body, len, "lease_ms", &lease_ms);
  struct rq *give_back = NULL, *again = NULL;
  struct lwait *answered = NULL;
  pthread_mutex_lock(&l->mu);
  struct lwait *waiters = waiters_take(l, q);
  struct lstate *s = NULL;
  if (!l->dead) {
    /* A key with waiters is in use: bring back its state if the table evicted it meanwhile. */
    s = state_for(l, q->lkey, q->lkey_len, waiters != NULL, NULL);
    if (s != NULL && s->refill == q)
      s->refill = NULL;
  }
  uint64_t now = mono_ns();
  if (s != NULL)
    prune(s, now); /* no waiter is served from a grant whose lease ended */
  bool kept = false; /* the grant joined the key's allotment (else it goes back) */
  if (!good) {
    atomic_fetch_add(&st->refill_failures, 1);
    if (s != NULL)
      s->backoff_until = now + FAIL_BACKOFF_NS;
  } else {
    atomic_fetch_add(&st->refills, 1);
    atomic_fetch_add(&st->refill_units, granted);
    uint64_t rtt = now - q->send_ns;
    l->rtt_ns = l->rtt_ns ? l->rtt_ns - l->rtt_ns / 8 + rtt / 8 : rtt;
    if (s != NULL) {
      /* The machine counts every unit of this node's live grants as still to be spent: take
       * off those spent already, so a node alone reports the exact remaining. */
      uint64_t spent_live = 0;
      for (uint32_t i = 0; i < s->n; i++)
        spent_live += s->g[i].units - s->g[i].left;
      if (now < s->forgot_until)
        spent_live += s->forgot_units;
      else
        s->forgot_units = s->forgot_until = 0;
      s->have_report = 1;
      s->rep_remaining = remaining > spent_live ? remaining - spent_live : 0;
      s->rep_spent = 0;
      s->rep_next_ms = next_ms;
      s->rep_reset_ms = reset_ms;
      if (granted < q->nr.cmd.count) {
        /* The cluster ran dry: ask again when it may have more, no sooner than a horizon (a
         * drained bucket's trickle is fetched in batches), and until its budget is whole again
         * (or a grant comes back whole) refuse what finds no unit rather than make it wait:
         * under overload only the requests that find a unit are admitted, at local speed. */
        uint64_t again_ms = next_ms > l->horizon_ms ? next_ms : l->horizon_ms;
        s->backoff_until = q->send_ns + again_ms * NS_PER_MS;
        s->drained_until = q->send_ns + (reset_ms > again_ms ? reset_ms : again_ms) * NS_PER_MS;
      } else {
        s->drained_until = 0;
      }
    }
    if (granted > 0) {
      uint64_t lease_ns = lease_ms * NS_PER_MS;
      uint64_t deadline = q->send_ns + lease_ns - lease_ns / 64;
      if (s != NULL && s->n == NGRANTS) {
        /* Full: fold a spent grant into the forgotten ones (kept for the report's correction
         * until the latest of their leases ends). */
        for (uint32_t i = 0; i < s->n; i++)
          if (s->g[i].left == 0) {
            s->forgot_units += s->g[i].units;
            if (s->g[i].deadline_ns > s->forgot_until)
              s->forgot_until = s->g[i].deadline_ns;
            s->g[i] = s->g[--s->n];
            break;
          }
      }
      if (s != NULL && s->n < NGRANTS && now < deadline) {
        s->g[s->n++] = (struct grant){grant, granted, granted, deadline};
        s->held += granted;
        kept = true;
        ring_add(l, s, q->lkey, q->lkey_len);
      } else {
        give_back = release_prepare(st, q->nr.cmd.name, q->nr.cmd.name_len, grant, granted);
        if (s != NULL) /* it came too late for its lease (slow commits): pause a little */
          s->backoff_until = now + FAIL_BACKOFF_NS;
      }
    }
  }
  /* The waiters, oldest first: a unit each while the key holds one. */
  struct lwait **tail = &answered;
  bool served = false;
  while (waiters != NULL && s != NULL && s->held > 0) {
    served = true;
    struct lwait *w = waiters;
    waiters = w->next;
    spend(s);
    waiter_decide(l, s, w, true);
    *tail = w;
    tail = &w->next;
  }
  *tail = NULL;
  if (waiters != NULL && s != NULL && kept && granted == q->nr.cmd.count) {
    /* More waited than this grant covered, and the cluster gave all that was asked: ask again
     * for at least as many, and let them wait for that. */
    if (s->refill == NULL && (again = refill_prepare(l, s, q->lkey, q->lkey_len, now)) != NULL) {
      uint64_t n = 0;
      for (struct lwait *w = waiters; w != NULL; w = w->next)
        n++;
      if (n > again->nr.cmd.count)
        again->nr.cmd.count = n < GW_FSM_QUOTA_COUNT_MAX ? n : GW_FSM_QUOTA_COUNT_MAX;
    }
    if (s->refill != NULL) {
      /* Older than any request parked there since: they go first. */
      struct rq *r = s->refill;
      struct lwait *last = waiters;
      while (last->next != NULL)
        last = last->next;
      last->next = r->wait_head;
      if (r->wait_head == NULL) {
        r->wait_tail = last;
        waiting_link(l, r);
      }
      r->wait_head = waiters;
      waiters = NULL;
    }
  }
  /* The rest: the cluster had no more (or could not be asked). */
  if (waiters != NULL)
    *tail = waiters_refuse(l, s, waiters);
  else if (served && s->refill == NULL && now >= s->backoff_until &&
           s->held <= batch_size(l, s, now))
    again = refill_prepare(l, s, q->lkey, q->lkey_len, now); /* ahead of the next request */
  lim_unref_locked_and_unlock(l);
  waiters_done(answered);
  if (give_back != NULL)
    rq_submit(give_back);
  if (again != NULL)
    refill_submit(l, again, NULL);
}

static void raft_limiter_stats(void *p, struct gw_limiter_stats *out)
{
  struct raft_limiter *l = p;
  struct gw_key_table_stats ks;
  pthread_mutex_lock(&l->mu);
  gw_key_table_stats(l->keys, &ks);
  out->keys = ks.count + (l->single_init ? 1 : 0);
  out->admitted = l->admitted;
  out->rejected = l->rejected;
  out->evictions = l->evictions;
  pthread_mutex_unlock(&l->mu);
}

static void raft_limiter_peek(void *p, const void *key, size_t len, uint64_t now_ns,
                              struct gw_ratelimit_info *info)
{
  struct raft_limiter *l = p;
  pthread_mutex_lock(&l->mu);
  struct lstate *s = state_for(l, key, len, false, NULL);
  if (s == NULL) {
    struct lstate fresh;
    memset(&fresh, 0, sizeof(fresh));
    fill_info(l, &fresh, true, info);
    info->remaining = l->q;
  } else {
    prune(s, now_ns);
    fill_info(l, s, true, info);
  }
  pthread_mutex_unlock(&l->mu);
}

/* Housekeeping: refuse requests that waited too long, give back what idle keys hold. */
static void limiter_housekeep(struct raft_limiter *l, uint64_t now, struct rq **out, size_t *n_out,
                              size_t cap, bool all)
{
  pthread_mutex_lock(&l->mu);
  struct lwait *expired = waiters_expire(l, now, all);
  uint32_t w = 0;
  for (uint32_t i = 0; i < l->ring_n; i++) {
    struct ring_ent *e = &l->ring[i];
    struct lstate *s = state_for(l, e->key, e->len, false, NULL);
    if (s == NULL)
      continue; /* evicted */
    prune(s, now);
    bool idle = all || (now > s->last_ns && now - s->last_ns >= l->idle_ns && s->refill == NULL);
    if (s->n == 0 || (idle && *n_out + s->n <= cap)) {
      if (s->n > 0) {
        char id[GW_FSM_MAX_QUOTA_ID + 1];
        size_t idl = limiter_id(l, e->key, e->len, id);
        for (uint32_t k = 0; k < s->n; k++) {
          /* Gone locally first: a released unit is never spent. */
          struct rq *q = s->g[k].left ? release_prepare(l->st, id, idl, s->g[k].id, s->g[k].left)
                                      : NULL;
          if (q != NULL)
            out[(*n_out)++] = q;
        }
        s->n = 0;
        s->held = 0;
      }
      s->in_ring = 0;
      continue;
    }
    if (w != i)
      l->ring[w] = *e;
    w++;
  }
  l->ring_n = w;
  pthread_mutex_unlock(&l->mu);
  waiters_done(expired);
}

static void *housekeeper(void *arg)
{
  struct raft_store *st = arg;
  struct rq *batch[RING * NGRANTS];
  pthread_mutex_lock(&st->mu);
  while (!st->stop) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* the condition variable's clock */
    ts.tv_nsec += HOUSEKEEP_MS * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
      ts.tv_sec++;
      ts.tv_nsec -= 1000000000L;
    }
    pthread_cond_timedwait(&st->cv, &st->mu, &ts);
    if (st->stop)
      break;
    uint64_t now = mono_ns();
    /* Take a reference on every listed limiter, then work without the instance lock: a
     * limiter destroyed meanwhile is freed by the last reference. */
    size_t count = 0, k = 0;
    for (struct raft_limiter *l = st->limiters; l; l = l->next)
      count++;
    struct raft_limiter **all = count ? malloc(count * sizeof(*all)) : NULL;
    for (struct raft_limiter *l = all ? st->limiters : NULL; l; l = l->next) {
      pthread_mutex_lock(&l->mu);
      l->refs++;
      pthread_mutex_unlock(&l->mu);
      all[k++] = l;
    }
    pthread_mutex_unlock(&st->mu);
    for (size_t j = 0; j < k; j++) {
      size_t n = 0;
      limiter_housekeep(all[j], now, batch, &n, sizeof(batch) / sizeof(batch[0]), false);
      for (size_t i = 0; i < n; i++)
        rq_submit(batch[i]); /* releases */
      pthread_mutex_lock(&all[j]->mu);
      lim_unref_locked_and_unlock(all[j]);
    }
    free(all);
    pthread_mutex_lock(&st->mu);
  }
  pthread_mutex_unlock(&st->mu);
  return NULL;
}

/* ---- Idempotency ------------------------------------------------------------------------- */

struct claim_ent {
  struct claim_ent *next;
  uint64_t id;
  uint8_t route_len, key_len;
  char route[GW_FSM_GWIDEM_MAX_ROUTE + 1];
  char key[GW_IDEM_KEY_MAX + 1];
};

struct raft_idem {
  struct raft_store *st;
  struct gw_idem_config cfg;
  pthread_mutex_t mu;
  struct claim_ent *claims[CLAIM_BUCKETS]; /* claims this node holds, by id */
  uint32_t n_claims;
  uint64_t replays, full;
};

static int raft_idem_create(void *impl, const struct gw_idem_config *cfg, void **out)
{
  const struct gw_store_raft_scope *sc = impl;
  struct raft_store *st = (sc != NULL && sc->magic == SCOPE_MAGIC) ? sc->raft : impl;
  if (st == NULL || st->magic != STORE_MAGIC || gw_idem_config_check(cfg) != 0)
    return GW_POLICY_EINVALID_CONFIG;
  struct raft_idem *m = calloc(1, sizeof(*m));
  if (m == NULL)
    return GW_POLICY_ENOMEM;
  m->st = st;
  m->cfg = *cfg;
  pthread_mutex_init(&m->mu, NULL);
  atomic_fetch_add(&st->users, 1);
  *out = m;
  return 0;
}

static void raft_idem_destroy(void *p)
{
  struct raft_idem *m = p;
  if (m == NULL)
    return;
  for (size_t i = 0; i < CLAIM_BUCKETS; i++)
    for (struct claim_ent *c = m->claims[i], *next; c; c = next) {
      next = c->next;
      free(c);
    }
  struct raft_store *st = m->st;
  pthread_mutex_destroy(&m->mu);
  free(m);
  store_release(st);
}

static int raft_idem_begin_async(void *p, const char *route, size_t route_len, const char *key,
                                 size_t key_len, const struct gw_idem_fingerprint *fp,
                                 uint64_t now_ns, gw_store_copy_fn copy, void *copy_ctx,
                                 struct gw_store_op *op)
{
  struct raft_idem *m = p;
  (void)now_ns;
  if (route_len == 0 || route_len > GW_FSM_GWIDEM_MAX_ROUTE || key_len == 0 || key_len > GW_IDEM_KEY_MAX)
    return GW_POLICY_EINVALID_CONFIG;
  struct rq *q = rq_new(m->st, RQ_BEGIN);
  if (q == NULL)
    return GW_POLICY_ENOMEM;
  memcpy(q->route, route, route_len);
  memcpy(q->key, key, key_len);
  q->idem = m;
  q->op = op;
  q->copy = copy;
  q->copy_ctx = copy_ctx;
  q->nr.cmd.kind = GW_FSM_IDEM_BEGIN;
  q->nr.cmd.name = q->route;
  q->nr.cmd.name_len = route_len;
  q->nr.cmd.key = q->key;
  q->nr.cmd.key_len = key_len;
  q->nr.cmd.fp_hi = fp->hi;
  q->nr.cmd.fp_lo = fp->lo;
  q->nr.cmd.ttl_ms = m->cfg.ttl_ms;
  return rq_submit(q);
}

static int http_err(int status)
{
  if (status == 507)
    return GW_STORE_RAFT_EDISK_FULL;
  if (status == 503)
    return GW_STORE_RAFT_EFULL;
  return GW_STORE_RAFT_EPROTO;
}

static void begin_answer(struct rq *q, int err, int status, const char *body, size_t len)
{
  struct raft_idem *m = q->idem;
  struct gw_store_op *op = q->op;
  op->err = err;
  if (err == 0 && status != 200)
    op->err = http_err(status);
  if (op->err == 0) {
    if (json_is(body, len, "decision", "execute")) {
      uint64_t id = 0;
      struct claim_ent *c = calloc(1, sizeof(*c));
      if (!json_u64(body, len, "claim", &id) || c == NULL) {
        free(c);
        op->err = c == NULL ? GW_POLICY_ENOMEM : GW_STORE_RAFT_EPROTO;
      } else {
        c->id = id;
        c->route_len = (uint8_t)q->nr.cmd.name_len;
        c->key_len = (uint8_t)q->nr.cmd.key_len;
        memcpy(c->route, q->route, c->route_len);
        memcpy(c->key, q->key, c->key_len);
        pthread_mutex_lock(&m->mu);
        if (m->n_claims >= MAX_CLAIMS) {
          pthread_mutex_unlock(&m->mu);
          free(c);
          m->full++;
          op->err = GW_POLICY_EFULL; /* the claim stays until its safety expiry */
        } else {
          size_t b = id % CLAIM_BUCKETS;
          c->next = m->claims[b];
          m->claims[b] = c;
          m->n_claims++;
          pthread_mutex_unlock(&m->mu);
          op->decision = GW_IDEM_EXECUTE;
          op->claim.id = id;
          op->claim.hash = id * 0x9e3779b97f4a7c15ull;
          atomic_fetch_add(&q->st->claims, 1);
        }
      }
    } else if (json_is(body, len, "decision", "in_flight")) {
      op->decision = GW_IDEM_IN_FLIGHT;
    } else if (json_is(body, len, "decision", "mismatch")) {
      op->decision = GW_IDEM_MISMATCH;
    } else if (json_is(body, len, "decision", "replay")) {
      const char *hs, *bs;
      size_t hn, bn;
      uint64_t stv;
      if (!json_u64(body, len, "status", &stv) || !json_str(body, len, "headers", &hs, &hn) ||
          !json_str(body, len, "body", &bs, &bn)) {
        op->err = GW_STORE_RAFT_EPROTO;
      } else {
        uint8_t *buf = malloc(hn / 4 * 3 + bn / 4 * 3 + 2);
        long hl = buf ? b64_decode(hs, hn, buf) : -1;
        long bl = hl >= 0 ? b64_decode(bs, bn, buf + hl) : -1;
        if (bl < 0) {
          op->err = buf ? GW_STORE_RAFT_EPROTO : GW_POLICY_ENOMEM;
        } else {
          struct gw_idem_response r = {.status = (int)stv,
                                       .headers = buf,
                                       .headers_len = (size_t)hl,
                                       .body = buf + hl,
                                       .body_len = (size_t)bl};
          op->decision = GW_IDEM_REPLAY;
          op->err = q->copy ? q->copy(q->copy_ctx, &r) : 0;
          pthread_mutex_lock(&m->mu);
          m->replays++;
          pthread_mutex_unlock(&m->mu);
          atomic_fetch_add(&q->st->replays, 1);
        }
        free(buf);
      }
    } else {
      op->err = GW_STORE_RAFT_EPROTO;
    }
  }
  op->done(op);
}

static int raft_idem_finish_async(void *p, const struct gw_idem_claim *claim,
                                  enum gw_idem_origin origin, const struct gw_idem_response *resp,
                                  uint64_t now_ns, struct gw_store_op *op)
{
  struct raft_idem *m = p;
  (void)now_ns;
  pthread_mutex_lock(&m->mu);
  struct claim_ent *c = NULL;
  for (struct claim_ent **pp = &m->claims[claim->id % CLAIM_BUCKETS]; *pp; pp = &(*pp)->next)
    if ((*pp)->id == claim->id) {
      c = *pp;
      *pp = c->next;
      m->n_claims--;
      break;
    }
  pthread_mutex_unlock(&m->mu);
  if (c == NULL)
    return GW_POLICY_ESTALE;
  bool store = gw_idem_should_store(origin) && resp != NULL;
  bool too_large = store && resp->headers_len + resp->body_len > MAX_RESPONSE;
  if (too_large)
    store = false; /* released, so a retry executes again rather than waiting for expiry */
  struct rq *q = rq_new(m->st, RQ_FINISH);
  size_t hl = store ? resp->headers_len : 0, bl = store ? resp->body_len : 0;
  if (q != NULL && hl + bl > 0 && (q->blob = malloc(hl + bl)) == NULL) {
    rq_free(q);
    q = NULL;
  }
  if (q == NULL) {
    free(c);
    return GW_POLICY_ENOMEM;
  }
  if (hl)
    memcpy(q->blob, resp->headers, hl);
  if (bl)
    memcpy(q->blob + hl, resp->body, bl);
  memcpy(q->route, c->route, c->route_len);
  memcpy(q->key, c->key, c->key_len);
  q->idem = m;
  q->op = op;
  q->too_large = too_large;
  q->nr.cmd.kind = GW_FSM_IDEM_FINISH;
  q->nr.cmd.name = q->route;
  q->nr.cmd.name_len = c->route_len;
  q->nr.cmd.key = q->key;
  q->nr.cmd.key_len = c->key_len;
  q->nr.cmd.claim_id = c->id;
  q->nr.cmd.store = store;
  q->nr.cmd.status = store ? (uint16_t)resp->status : 0;
  q->nr.cmd.ttl_ms = m->cfg.ttl_ms;
  q->nr.cmd.headers = q->blob;
  q->nr.cmd.headers_len = hl;
  q->nr.cmd.body = q->blob ? q->blob + hl : NULL;
  q->nr.cmd.body_len = bl;
  free(c);
  return rq_submit(q);
}

static void finish_answer(struct rq *q, int err, int status, const char *body, size_t len)
{
  struct gw_store_op *op = q->op;
  if (op == NULL)
    return;
  op->err = err;
  if (err == 0 && status != 200)
    op->err = http_err(status);
  else if (err == 0 && json_is(body, len, "result", "stale"))
    op->err = q->retried ? 0 : GW_POLICY_ESTALE; /* after a retry: the first one took effect */
  else if (err == 0 && q->too_large)
    op->err = GW_POLICY_ETOO_LARGE;
  else if (err == 0 && json_is(body, len, "result", "too_large"))
    op->err = GW_POLICY_ETOO_LARGE;
  else if (err == 0 && !json_is(body, len, "result", "stored") && !json_is(body, len, "result", "released"))
    op->err = GW_STORE_RAFT_EPROTO;
  op->done(op);
}

static void raft_idem_stats(void *p, struct gw_idem_stats *out)
{
  struct raft_idem *m = p;
  memset(out, 0, sizeof(*out));
  pthread_mutex_lock(&m->mu);
  out->in_flight = m->n_claims;
  out->replays = m->replays;
  out->full = m->full;
  pthread_mutex_unlock(&m->mu);
}

/* ---- Answers --------------------------------------------------------------------------------- */

static void rq_answer(struct rq *q, int err, int status, const char *body, size_t len)
{
  if (q->kind == RQ_FINISH && err != 0 && err != GW_STORE_RAFT_ESTOPPING && !q->retried) {
    /* A claim left in flight would hold its key until the safety expiry: try once more.
     * FINISH names its claim, so applying it twice is harmless (the second is "stale"). */
    q->retried = true;
    q->forwarded = false;
    q->nr.first_ms_ = 0;
    if (gw_node_submit(q->st->node, &q->nr) == 0)
      return;
  }
  switch (q->kind) {
  case RQ_ACQUIRE:
    acquire_answer(q, err, status, body, len);
    break;
  case RQ_RELEASE:
    break; /* nothing waits: a lost release only leaves units to their lease's end */
  case RQ_BEGIN:
    begin_answer(q, err, status, body, len);
    break;
  case RQ_FINISH:
    finish_answer(q, err, status, body, len);
    break;
  }
  rq_free(q);
}

/* ---- Open and close ---------------------------------------------------------------------- */

int gw_store_raft_open(struct gw_node *node, const char *node_name, void **impl)
{
  size_t nl = node_name ? strlen(node_name) : 0;
  if (node == NULL || nl == 0 || nl > GW_FSM_MAX_NODE)
    return GW_POLICY_EINVALID_CONFIG;
  for (size_t i = 0; i < nl; i++)
    if ((unsigned char)node_name[i] < 0x20 || (unsigned char)node_name[i] > 0x7e)
      return GW_POLICY_EINVALID_CONFIG;
  struct raft_store *st = calloc(1, sizeof(*st));
  if (st == NULL)
    return GW_POLICY_ENOMEM;
  st->magic = STORE_MAGIC;
  st->node = node;
  memcpy(st->node_name, node_name, nl);
  st->node_name_len = nl;
  st->tune.tb_lease_ms = 1000;
  st->tune.horizon_ms = 200;
  st->tune.idle_ms = 300;
  st->tune.batch_div = 8;
  st->tune.wait_ms = 1000;
  pthread_mutex_init(&st->mu, NULL);
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC); /* housekeeping ignores wall-clock steps */
  pthread_cond_init(&st->cv, &ca);
  pthread_condattr_destroy(&ca);
  pthread_mutex_init(&st->imu, NULL);
  pthread_cond_init(&st->icv, NULL);
  if (pthread_create(&st->hk, NULL, housekeeper, st) != 0) {
    pthread_cond_destroy(&st->cv);
    pthread_mutex_destroy(&st->mu);
    free(st);
    return GW_POLICY_ENOMEM;
  }
  *impl = st;
  return 0;
}

static void store_free(struct raft_store *st)
{
  pthread_cond_destroy(&st->icv);
  pthread_mutex_destroy(&st->imu);
  pthread_cond_destroy(&st->cv);
  pthread_mutex_destroy(&st->mu);
  free(st);
}

/* A limiter or idempotency store on st went away. */
static void store_release(struct raft_store *st)
{
  if (atomic_fetch_sub(&st->users, 1) == 1 && atomic_load(&st->closed))
    store_free(st);
}

void gw_store_raft_close(void *impl)
{
  struct raft_store *st = impl;
  if (st == NULL)
    return;
  pthread_mutex_lock(&st->mu);
  st->stop = true;
  pthread_cond_broadcast(&st->cv);
  pthread_mutex_unlock(&st->mu);
  pthread_join(st->hk, NULL);
  pthread_mutex_lock(&st->imu);
  while (st->inflight > 0)
    pthread_cond_wait(&st->icv, &st->imu);
  pthread_mutex_unlock(&st->imu);
  atomic_store(&st->closed, true); /* from here on nothing reaches the node */
  if (atomic_load(&st->users) == 0)
    store_free(st);
}

const struct gw_store_ops gw_store_raft = {
    .version = GW_STORE_OPS_VERSION,
    .name = "raft",
    .limiter_create = raft_limiter_create,
    .limiter_destroy = raft_limiter_destroy,
    .limiter_admit = raft_limiter_admit,
    .limiter_admit_async = raft_limiter_admit_async,
    .limiter_stats = raft_limiter_stats,
    .limiter_peek = raft_limiter_peek,
    .idem_create = raft_idem_create,
    .idem_destroy = raft_idem_destroy,
    .idem_stats = raft_idem_stats,
    .idem_begin_async = raft_idem_begin_async,
    .idem_finish_async = raft_idem_finish_async,
};
