/*
 * The Redis store (see redis.h): limiters and idempotency records as atomic Lua scripts in one
 * Redis server. This is the only file that includes hiredis.
 *
 * Threads. Workers build a request (the key and the script's arguments, copied) and push it on a
 * mutex-guarded queue, waking the instance's I/O thread through an eventfd only when the queue
 * was empty. The I/O thread runs hiredis's async API on its own epoll through a small adapter
 * (hiredis ships none for plain epoll), pipelines every request over one connection, and
 * completes each one exactly once: on its reply, at its deadline (queue time + timeout_ms; the
 * reply, if it comes later, is dropped), or with an error when the connection is lost. While the
 * connection is down, new requests are refused at once, so a dead Redis costs a request nothing.
 * A connection on which an operation timed out with no reply at all since it was sent is taken
 * as stalled and dropped; reconnecting backs off from 25 ms to 1 s.
 *
 * Time is Redis's clock (TIME inside each script, microseconds), never the caller's now_ns, so
 * every node decides against one clock. The token bucket counts micro-tokens: refill_per_sec
 * tokens per second is exactly refill_per_sec micro-tokens per microsecond, so no fraction is
 * lost, and capacity * 10^6 <= 10^15 stays exact in Lua's doubles (nano-tokens would not).
 *
 * Idempotency records are one string per (route, key):
 *   in flight:  'F' | fingerprint (16 bytes, hi then lo, big-endian) | claim id (8 bytes)
 *   completed:  'C' | fingerprint | status (2 bytes) | headers length (4 bytes) | headers | body
 * A claim is taken with SET NX PX max(ttl_ms, 1 h): the PX only bounds how long a claim whose
 * gateway died mid-request blocks its key. Finishing compares the whole in-flight value (so only
 * the claim's owner can store or release) and stores with PX ttl_ms, or deletes. The claim id
 * is a per-instance random base plus a counter; the node keeps claim id -> Redis key for its own
 * claims in flight, since gw_idem_claim carries no key. A begin or finish that failed after it
 * was sent may still have claimed the key in Redis, so the node queues a compare-and-delete of
 * its claim behind it (or after the next connect; at most ORPHANS_MAX kept). A key stays blocked
 * for the long PX only if the node dies mid-request, or in one narrow case: a Redis that stalled
 * and was dropped may, once it resumes, run the begin still buffered from the old connection
 * after the release sent on the new one.
 *
 * Long limiter keys are hashed with SipHash under fixed keys (not the spec's per-process seed),
 * so every node maps a client to the same Redis key.
 */
#include "redis.h"

#include <errno.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#define MAGIC_INSTANCE 0x52445349u /* "RDSI" */
#define MAGIC_SCOPE 0x52445353u    /* "RDSS" */
#define MAGIC_LIMITER 0x5244534cu  /* "RDSL" */
#define MAGIC_IDEM 0x52445344u     /* "RDSD" */

#define MICRO UINT64_C(1000000)
#define KEY_RAW_MAX 64              /* longer limiter keys are hashed */
#define CLAIM_SAFETY_MS UINT64_C(3600000)
#define BACKOFF_MIN_NS (25 * GW_NS_PER_MS)
#define BACKOFF_MAX_NS (1000 * GW_NS_PER_MS)
#define CONNECT_MIN_NS (500 * GW_NS_PER_MS)
#define ORPHANS_MAX 4096 /* claim releases kept while disconnected */
#define RELEASE_TRIES 3
#define INFLIGHT_LEN 25 /* 'F' + 16 + 8 */
#define RECORD_HEAD 23  /* 'C' + 16 + 2 + 4 */
#define MAX_ARGS 5      /* key + up to four arguments */

/* ---- the scripts ---- */

enum { S_TB, S_SW, S_BEGIN, S_FINISH, S_COUNT };

/* KEYS[1] hash; ARGV: capacity, refill_per_sec, take (1) or peek (0). Returns {admitted, micro-
 * tokens left}. Idle keys expire when they would be full again. */
static const char script_tb[] =
    "if redis.replicate_commands then pcall(redis.replicate_commands) end\n"
    "local cap = tonumber(ARGV[1])\n"
    "local rate = tonumber(ARGV[2])\n"
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000000 + tonumber(t[2])\n"
    "local full = cap * 1000000\n"
    "local tok, upd = full, now\n"
    "local s = redis.call('HMGET', KEYS[1], 'n', 't')\n"
    "if s[1] and s[2] then\n"
    "  tok = tonumber(s[1])\n"
    "  upd = tonumber(s[2])\n"
    "  if tok > full then tok = full end\n"
    "  if now > upd then\n"
    "    if now - upd >= math.floor((full - tok) / rate) + 1 then tok = full\n"
    "    else tok = tok + (now - upd) * rate end\n"
    "    if tok > full then tok = full end\n"
    "    upd = now\n"
    "  end\n"
    "end\n"
    "local ok = 0\n"
    "if ARGV[3] == '1' then\n"
    "  if tok >= 1000000 then tok = tok - 1000000; ok = 1 end\n"
    "  if tok >= full then redis.call('DEL', KEYS[1]) else\n"
    "    redis.call('HSET', KEYS[1], 'n', string.format('%d', tok), 't', string.format('%d', upd))\n"
    "    local us = math.floor((full - tok + rate - 1) / rate)\n"
    "    redis.call('PEXPIRE', KEYS[1], string.format('%d', math.floor(us / 1000) + 2))\n"
    "  end\n"
    "end\n"
    "return {ok, tok}\n";

/* KEYS[1] sorted set; ARGV: limit, window in microseconds, take (1) or peek (0). Returns
 * {admitted, count in window, us until the newest leaves, us until the oldest leaves}. Members
 * are "<time>:<n>" where n counts the members already at that time, so they stay unique. A clock
 * reading older than the newest admission is recorded at the newest's time (conservative). */
static const char script_sw[] =
    "if redis.replicate_commands then pcall(redis.replicate_commands) end\n"
    "local limit = tonumber(ARGV[1])\n"
    "local win = tonumber(ARGV[2])\n"
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000000 + tonumber(t[2])\n"
    "local cut = string.format('%d', now - win)\n"
    "local take = ARGV[3] == '1'\n"
    "local n\n"
    "if take then\n"
    "  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', cut)\n"
    "  n = redis.call('ZCARD', KEYS[1])\n"
    "else\n"
    "  n = redis.call('ZCOUNT', KEYS[1], '(' .. cut, '+inf')\n"
    "end\n"
    "local newest\n"
    "if n > 0 then\n"
    "  newest = tonumber(redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')[2])\n"
    "end\n"
    "local ok = 0\n"
    "if take and n < limit then\n"
    "  local at = now\n"
    "  if newest and newest > at then at = newest end\n"
    "  local a = string.format('%d', at)\n"
    "  local c = 0\n"
    "  if newest == at then c = redis.call('ZCOUNT', KEYS[1], a, a) end\n"
    "  redis.call('ZADD', KEYS[1], a, a .. ':' .. c)\n"
    "  redis.call('PEXPIRE', KEYS[1], string.format('%d', math.floor((at + win - now) / 1000) + 2))\n"
    "  newest = at\n"
    "  n = n + 1\n"
    "  ok = 1\n"
    "end\n"
    "if n == 0 then return {ok, 0, 0, 0} end\n"
    "local lo\n"
    "if take then lo = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')\n"
    "else lo = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. cut, '+inf', 'WITHSCORES', 'LIMIT', 0, 1) end\n"
    "return {ok, n, newest + win - now, tonumber(lo[2]) + win - now}\n";

/* KEYS[1] record; ARGV: in-flight value, safety PX. Returns 0 (execute: claimed), 1 (in flight),
 * 2 (mismatch) or the completed record (replay). */
static const char script_begin[] =
    "if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end\n"
    "local v = redis.call('GET', KEYS[1])\n"
    "if not v then return 1 end\n"
    "if string.sub(v, 2, 17) ~= string.sub(ARGV[1], 2, 17) then return 2 end\n"
    "if string.sub(v, 1, 1) ~= 'C' then return 1 end\n"
    "return v\n";

/* KEYS[1] record; ARGV: this claim's in-flight value, the record to store ("" releases), ttl_ms.
 * Returns 1, or 0 if the key no longer holds this claim. */
static const char script_finish[] =
    "if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end\n"
    "if ARGV[2] == '' then redis.call('DEL', KEYS[1])\n"
    "else redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end\n"
    "return 1\n";

static const char *const script_text[S_COUNT] = {script_tb, script_sw, script_begin,
                                                 script_finish};

/* ---- types ---- */

enum req_kind {
  K_LIMIT,   /* limiter admit (token bucket or sliding window by script) */
  K_PEEK,    /* limiter peek */
  K_BEGIN,   /* idempotency begin */
  K_FINISH,  /* idempotency finish */
  K_RELEASE, /* compare-and-delete of a claim whose begin or finish failed; nobody waits */
};

struct redis;
struct limiter;
struct idem;

/* One operation, from the worker that queues it to the reply. Owned by the queue, then by
 * hiredis's callback list (freed in the reply callback, even after a timeout). */
struct req {
  struct req *next, *prev;
  enum req_kind kind;
  int script;
  bool sent;      /* handed to hiredis: it owns the req until the callback */
  bool abandoned; /* completed already (timeout): the callback only frees */
  int tries;      /* K_RELEASE */
  uint64_t deadline_ns, sent_ns;
  struct gw_store_op *op; /* may be NULL (finish without a waiter, release) */
  struct limiter *lim;    /* ref held */
  struct idem *idem;      /* ref held */
  uint64_t claim_id;
  struct gw_idem_fingerprint fp;
  gw_store_copy_fn copy;
  void *copy_ctx;
  unsigned nargs; /* arg[0] is the key */
  size_t len[MAX_ARGS];
  const char *arg[MAX_ARGS];
  char data[]; /* the arguments, each NUL-terminated */
};

struct redis {
  uint32_t magic;
  char host[256];
  int port;
  unsigned db;
  char user[128];
  char pass[256];
  uint64_t timeout_ns;
  uint64_t claim_base;
  atomic_ullong claim_seq;
  int epfd, evfd;
  pthread_t thread;

  pthread_mutex_t mu; /* guards the queue, stopping, last_err, first_done */
  pthread_cond_t cv;
  struct req *q_head, *q_tail;
  bool wake_pending, stopping, first_done;
  char last_err[160];

  atomic_bool up;
  atomic_uint outstanding;
  atomic_ullong n_ops, n_failed, n_timeouts, n_refused, n_connects, n_releases;

  /* I/O thread only. */
  redisAsyncContext *ac;
  int fd;
  uint32_t ev_mask, ev_armed;
  bool fd_added, connecting, io_stopping;
  bool reason_set; /* set_err was called since the last connect */
  uint64_t connect_deadline_ns, retry_at_ns, backoff_ns, last_reply_ns;
  struct req *p_head, *p_tail; /* sent and awaiting a reply, in deadline order */
  struct req *o_head, *o_tail; /* releases waiting for a connection */
  size_t n_orphans;
  char sha[S_COUNT][48];
};

struct limiter {
  uint32_t magic;
  atomic_int refs;
  struct redis *r;
  struct gw_limiter_spec spec;
  int script;
  char a1[24], a2[24];
  atomic_ullong admitted, rejected;
  size_t prefix_len;
  char prefix[]; /* "gw:{route}:tb" */
};

struct claim_entry {
  struct claim_entry *next;
  uint64_t id;
  struct gw_idem_fingerprint fp;
  size_t key_len;
  char key[]; /* the Redis key */
};

struct idem {
  uint32_t magic;
  atomic_int refs;
  struct redis *r;
  struct gw_idem_config cfg;
  char ttl[24], safety[24];
  pthread_mutex_t mu; /* guards the claim table and its counters */
  struct claim_entry **buckets;
  size_t mask, in_flight;
  uint64_t full, replays;
};

/* ---- small helpers ---- */

static uint64_t mono_ns(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * GW_NS_PER_S + (uint64_t)ts.tv_nsec;
}

static void set_err(struct redis *r, const char *fmt, ...)
{
  char buf[sizeof(r->last_err)];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  r->reason_set = true; /* only the I/O thread reports errors */
  pthread_mutex_lock(&r->mu);
  memcpy(r->last_err, buf, sizeof(buf));
  pthread_mutex_unlock(&r->mu);
}

const char *gw_store_redis_strerror(int err)
{
  switch (err) {
  case GW_STORE_REDIS_EDOWN:
    return "the Redis store is not connected";
  case GW_STORE_REDIS_ETIMEDOUT:
    return "the Redis store did not answer in time";
  case GW_STORE_REDIS_EBUSY:
    return "too many Redis store operations are outstanding";
  case GW_STORE_REDIS_EREPLY:
    return "the Redis store answered with an error";
  case GW_STORE_REDIS_EURL:
    return "the Redis URL cannot be parsed";
  case GW_STORE_REDIS_ESYS:
    return "the Redis store's thread could not be started";
  default:
    return NULL;
  }
}

static void put_be(unsigned char *p, uint64_t v, int bytes)
{
  for (int i = bytes - 1; i >= 0; i--) {
    p[i] = (unsigned char)(v & 0xff);
    v >>= 8;
  }
}

static uint64_t get_be(const unsigned char *p, int bytes)
{
  uint64_t v = 0;
  for (int i = 0; i < bytes; i++)
    v = v << 8 | p[i];
  return v;
}

static void limiter_unref(struct limiter *l)
{
  if (l && atomic_fetch_sub_explicit(&l->refs, 1, memory_order_acq_rel) == 1)
    free(l);
}

static void idem_free(struct idem *m);

static void idem_unref(struct idem *m)
{
  if (m && atomic_fetch_sub_explicit(&m->refs, 1, memory_order_acq_rel) == 1)
    idem_free(m);
}

/* A request holding nargs strings (each copied, NUL-terminated). */
static struct req *req_new(enum req_kind kind, int script, unsigned nargs, const void *const *a,
                           const size_t *len)
{
  size_t total = 0;
  for (unsigned i = 0; i < nargs; i++)
    total += len[i] + 1;
  struct req *q = calloc(1, sizeof(*q) + total);
  if (!q)
    return NULL;
  q->kind = kind;
  q->script = script;
  q->nargs = nargs;
  char *p = q->data;
  for (unsigned i = 0; i < nargs; i++) {
    if (len[i])
      memcpy(p, a[i], len[i]);
    p[len[i]] = '\0';
    q->arg[i] = p;
    q->len[i] = len[i];
    p += len[i] + 1;
  }
  return q;
}

static void req_free(struct req *q)
{
  limiter_unref(q->lim);
  idem_unref(q->idem);
  free(q);
}

/* A compare-and-delete of the claim in_flight (INFLIGHT_LEN bytes) at key. */
static struct req *release_new(const char *key, size_t key_len, const char *in_flight, int tries)
{
  const void *a[4] = {key, in_flight, "", "1"};
  size_t len[4] = {key_len, INFLIGHT_LEN, 0, 1};
  struct req *q = req_new(K_RELEASE, S_FINISH, 4, a, len);
  if (q)
    q->tries = tries;
  return q;
}

/* ---- the submission queue (any thread) ---- */

static void wake(struct redis *r)
{
  uint64_t one = 1;
  ssize_t n = write(r->evfd, &one, sizeof(one));
  (void)n; /* EAGAIN: the counter is already non-zero, the thread will wake */
}

/* Queues q, or fails at once (q freed) and returns the error. */
static int submit(struct redis *r, struct req *q, bool while_down)
{
  int rc = 0;
  if (!while_down && !atomic_load_explicit(&r->up, memory_order_acquire))
    rc = GW_STORE_REDIS_EDOWN;
  else if (atomic_fetch_add_explicit(&r->outstanding, 1, memory_order_relaxed) >=
           GW_STORE_REDIS_MAX_OUTSTANDING) {
    atomic_fetch_sub_explicit(&r->outstanding, 1, memory_order_relaxed);
    rc = GW_STORE_REDIS_EBUSY;
  }
  if (rc) {
    atomic_fetch_add_explicit(&r->n_refused, 1, memory_order_relaxed);
    req_free(q);
    return rc;
  }
  bool need_wake = false;
  pthread_mutex_lock(&r->mu);
  if (r->stopping) {
    pthread_mutex_unlock(&r->mu);
    atomic_fetch_sub_explicit(&r->outstanding, 1, memory_order_relaxed);
    req_free(q);
    return GW_STORE_REDIS_EDOWN;
  }
  q->deadline_ns = mono_ns() + r->timeout_ns;
  q->next = NULL;
  if (r->q_tail)
    r->q_tail->next = q;
  else
    r->q_head = q;
  r->q_tail = q;
  if (!r->wake_pending) {
    r->wake_pending = true;
    need_wake = true;
  }
  pthread_mutex_unlock(&r->mu);
  atomic_fetch_add_explicit(&r->n_ops, 1, memory_order_relaxed);
  if (need_wake)
    wake(r);
  return 0;
}

/* ---- the I/O thread: completing requests ---- */

static void pending_unlink(struct redis *r, struct req *q)
{
  if (q->prev)
    q->prev->next = q->next;
  else
    r->p_head = q->next;
  if (q->next)
    q->next->prev = q->prev;
  else
    r->p_tail = q->prev;
  q->next = q->prev = NULL;
}

/* Inserts q in deadline order (nearly always at the tail). */
static void pending_append(struct redis *r, struct req *q)
{
  struct req *after = r->p_tail;
  while (after && after->deadline_ns > q->deadline_ns)
    after = after->prev;
  q->prev = after;
  q->next = after ? after->next : r->p_head;
  if (q->next)
    q->next->prev = q;
  else
    r->p_tail = q;
  if (after)
    after->next = q;
  else
    r->p_head = q;
}

static void orphan_push(struct redis *r, struct req *q)
{
  if (r->n_orphans >= ORPHANS_MAX) {
    req_free(q); /* bounded: this claim now lasts until its safety PX */
    return;
  }
  q->next = NULL;
  q->prev = NULL;
  if (r->o_tail)
    r->o_tail->next = q;
  else
    r->o_head = q;
  r->o_tail = q;
  r->n_orphans++;
}

static void send_req(struct redis *r, struct req *q);

/* A claim this node may hold in Redis without knowing it: release it now or after reconnecting. */
static void queue_release(struct redis *r, const char *key, size_t key_len, const char *in_flight,
                          int tries)
{
  if (tries >= RELEASE_TRIES)
    return;
  struct req *q = release_new(key, key_len, in_flight, tries + 1);
  if (!q)
    return;
  atomic_fetch_add_explicit(&r->n_releases, 1, memory_order_relaxed);
  if (r->ac && atomic_load_explicit(&r->up, memory_order_relaxed)) {
    atomic_fetch_add_explicit(&r->outstanding, 1, memory_order_relaxed);
    q->deadline_ns = mono_ns() + r->timeout_ns;
    send_req(r, q);
  } else {
    orphan_push(r, q);
  }
}

/* After a failure of a request that may have claimed a key: undo the claim. */
static void undo_claim(struct redis *r, struct req *q)
{
  if (!q->sent)
    return;
  if (q->kind == K_BEGIN || q->kind == K_FINISH || q->kind == K_RELEASE)
    queue_release(r, q->arg[0], q->len[0], q->arg[1], q->tries);
}

/* Completes q's operation (if anyone waits) with err; the results are already filled. */
static void complete(struct redis *r, struct req *q, int err)
{
  if (err) {
    atomic_fetch_add_explicit(&r->n_failed, 1, memory_order_relaxed);
    if (err == GW_STORE_REDIS_ETIMEDOUT)
      atomic_fetch_add_explicit(&r->n_timeouts, 1, memory_order_relaxed);
  }
  atomic_fetch_sub_explicit(&r->outstanding, 1, memory_order_relaxed);
  if (q->op) {
    q->op->err = err;
    q->op->done(q->op);
    q->op = NULL;
  }
}

/* Fails q (never sent, or its reply can no longer come) and frees it. */
static void fail_unsent(struct redis *r, struct req *q, int err)
{
  if (q->kind == K_FINISH && !r->io_stopping) /* the claim is still in Redis: release it */
    queue_release(r, q->arg[0], q->len[0], q->arg[1], 0);
  if (q->kind == K_RELEASE && err != GW_STORE_REDIS_ETIMEDOUT && !r->io_stopping) {
    orphan_push(r, q); /* keep it for the next connection */
    atomic_fetch_sub_explicit(&r->outstanding, 1, memory_order_relaxed);
    return;
  }
  complete(r, q, err);
  req_free(q);
}

static void fill_tb(const struct limiter *l, bool ok, uint64_t tok, struct gw_ratelimit_info *info)
{
  const struct gw_token_bucket_config *c = &l->spec.tb;
  uint64_t full = c->capacity * MICRO;
  if (tok > full)
    tok = full;
  uint64_t rate = c->refill_per_sec;
  uint64_t to_full_us = (full - tok) / rate + ((full - tok) % rate != 0);
  uint64_t to_next_us = tok >= MICRO ? 0 : (MICRO - tok) / rate + ((MICRO - tok) % rate != 0);
  info->limit = c->capacity;
  info->window_s = c->capacity / rate + (c->capacity % rate != 0);
  info->remaining = tok / MICRO;
  info->reset_s = gw_ns_to_s_ceil(to_full_us * 1000);
  info->next_s = gw_ns_to_s_ceil(to_next_us * 1000);
  info->retry_after_s = ok ? 0 : (info->next_s > 0 ? info->next_s : 1);
}

static void fill_sw(const struct limiter *l, bool ok, uint64_t n, uint64_t newest_us,
                    uint64_t oldest_us, struct gw_ratelimit_info *info)
{
  const struct gw_sliding_window_config *c = &l->spec.sw;
  info->limit = c->limit;
  info->window_s = gw_ns_to_s_ceil(c->window_ms * GW_NS_PER_MS);
  info->remaining = n < c->limit ? c->limit - n : 0;
  if (n == 0) {
    info->reset_s = 0;
    info->next_s = 0;
  } else {
    info->reset_s = gw_ns_to_s_ceil(newest_us * 1000);
    info->next_s = info->remaining > 0 ? 0 : gw_ns_to_s_ceil(oldest_us * 1000);
  }
  info->retry_after_s = ok ? 0 : (info->next_s > 0 ? info->next_s : 1);
}

static bool int_at(const redisReply *rep, size_t i, uint64_t *out)
{
  if (rep->type != REDIS_REPLY_ARRAY || rep->elements <= i ||
      rep->element[i]->type != REDIS_REPLY_INTEGER || rep->element[i]->integer < 0)
    return false;
  *out = (uint64_t)rep->element[i]->integer;
  return true;
}

static int on_limit_reply(struct req *q, const redisReply *rep)
{
  struct limiter *l = q->lim;
  uint64_t ok, a, b = 0, c = 0;
  if (!int_at(rep, 0, &ok) || !int_at(rep, 1, &a))
    return GW_STORE_REDIS_EREPLY;
  if (q->script == S_SW && (!int_at(rep, 2, &b) || !int_at(rep, 3, &c)))
    return GW_STORE_REDIS_EREPLY;
  if (q->kind == K_LIMIT)
    atomic_fetch_add_explicit(ok ? &l->admitted : &l->rejected, 1, memory_order_relaxed);
  if (!q->op)
    return 0;
  struct gw_store_op *op = q->op;
  op->admitted = ok != 0;
  op->evicted = false;
  if (q->script == S_TB)
    fill_tb(l, ok != 0, a, &op->info);
  else
    fill_sw(l, ok != 0, a, b, c, &op->info);
  if (q->kind == K_PEEK)
    op->info.retry_after_s = 0; /* nothing was refused */
  return 0;
}

static int claim_insert(struct idem *m, const struct req *q);

static int on_begin_reply(struct redis *r, struct req *q, const redisReply *rep)
{
  struct idem *m = q->idem;
  struct gw_store_op *op = q->op;
  if (rep->type == REDIS_REPLY_INTEGER && rep->integer >= 0 && rep->integer <= 2) {
    if (rep->integer == 0) {
      if (claim_insert(m, q)) {
        queue_release(r, q->arg[0], q->len[0], q->arg[1], 0);
        return GW_POLICY_ENOMEM;
      }
      op->claim.id = q->claim_id;
      op->claim.hash = q->fp.hi ^ q->fp.lo;
      op->decision = GW_IDEM_EXECUTE;
    } else {
      op->decision = rep->integer == 1 ? GW_IDEM_IN_FLIGHT : GW_IDEM_MISMATCH;
    }
    return 0;
  }
  if (rep->type != REDIS_REPLY_STRING || rep->len < RECORD_HEAD || rep->str[0] != 'C')
    return GW_STORE_REDIS_EREPLY;
  const unsigned char *p = (const unsigned char *)rep->str;
  uint64_t hlen = get_be(p + 19, 4);
  if (hlen > rep->len - RECORD_HEAD)
    return GW_STORE_REDIS_EREPLY;
  struct gw_idem_response resp = {
      .status = (int)get_be(p + 17, 2),
      .headers = p + RECORD_HEAD,
      .headers_len = (size_t)hlen,
      .body = p + RECORD_HEAD + hlen,
      .body_len = rep->len - RECORD_HEAD - (size_t)hlen,
  };
  op->decision = GW_IDEM_REPLAY;
  pthread_mutex_lock(&m->mu);
  m->replays++;
  pthread_mutex_unlock(&m->mu);
  return q->copy ? q->copy(q->copy_ctx, &resp) : 0;
}

static void script_load(struct redis *r, int script);

/* hiredis's reply callback: runs on the I/O thread, also with reply NULL when the connection is
 * torn down (every request gets exactly one call). */
static void on_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
  struct redis *r = ac->data;
  struct req *q = privdata;
  redisReply *rep = reply;
  if (rep)
    r->last_reply_ns = mono_ns();
  else
    atomic_store_explicit(&r->up, false, memory_order_release); /* the connection is going */
  if (q->abandoned) {
    req_free(q);
    return;
  }
  if (rep && rep->type == REDIS_REPLY_ERROR && strncmp(rep->str, "NOSCRIPT", 8) == 0 &&
      r->ac && atomic_load_explicit(&r->up, memory_order_relaxed)) {
    /* The server lost its script cache (restart, SCRIPT FLUSH): load it again, send this one
     * with EVAL meanwhile. It stays in the pending list with its deadline. */
    pending_unlink(r, q);
    if (r->sha[q->script][0]) { /* the first of a pipelined run of NOSCRIPTs reloads */
      r->sha[q->script][0] = '\0';
      script_load(r, q->script);
    }
    send_req(r, q);
    return;
  }
  pending_unlink(r, q);
  int err = 0;
  if (!rep) {
    err = GW_STORE_REDIS_EDOWN;
  } else if (rep->type == REDIS_REPLY_ERROR) {
    set_err(r, "redis replied: %.100s", rep->str);
    err = GW_STORE_REDIS_EREPLY;
  } else {
    switch (q->kind) {
    case K_LIMIT:
    case K_PEEK:
      err = on_limit_reply(q, rep);
      break;
    case K_BEGIN:
      err = on_begin_reply(r, q, rep);
      break;
    case K_FINISH:
    case K_RELEASE:
      if (rep->type != REDIS_REPLY_INTEGER)
        err = GW_STORE_REDIS_EREPLY;
      else if (rep->integer == 0)
        err = GW_POLICY_ESTALE;
      break;
    }
  }
  if (err && err != GW_POLICY_ESTALE && err != GW_POLICY_ENOMEM) {
    if (q->kind == K_RELEASE) {
      if (!rep) {
        q->sent = false;
        fail_unsent(r, q, err); /* back to the orphans */
        return;
      }
    } else {
      undo_claim(r, q);
    }
  }
  complete(r, q, err);
  req_free(q);
}

/* Hands q to hiredis (EVALSHA once the script's digest is known, else EVAL). */
static void send_req(struct redis *r, struct req *q)
{
  const char *argv[3 + MAX_ARGS];
  size_t argl[3 + MAX_ARGS];
  if (r->sha[q->script][0]) {
    argv[0] = "EVALSHA";
    argv[1] = r->sha[q->script];
  } else {
    argv[0] = "EVAL";
    argv[1] = script_text[q->script];
  }
  argl[0] = strlen(argv[0]);
  argl[1] = strlen(argv[1]);
  argv[2] = "1";
  argl[2] = 1;
  for (unsigned i = 0; i < q->nargs; i++) {
    argv[3 + i] = q->arg[i];
    argl[3 + i] = q->len[i];
  }
  if (!r->ac ||
      redisAsyncCommandArgv(r->ac, on_reply, q, (int)(3 + q->nargs), argv, argl) != REDIS_OK) {
    fail_unsent(r, q, GW_STORE_REDIS_EDOWN);
    return;
  }
  q->sent = true;
  q->sent_ns = mono_ns();
  pending_append(r, q);
}

static void on_script_loaded(redisAsyncContext *ac, void *reply, void *privdata)
{
  struct redis *r = ac->data;
  redisReply *rep = reply;
  int script = (int)(intptr_t)privdata;
  if (!rep)
    return;
  r->last_reply_ns = mono_ns();
  if (rep->type == REDIS_REPLY_STRING && rep->len < sizeof(r->sha[0]))
    memcpy(r->sha[script], rep->str, rep->len + 1);
  else if (rep->type == REDIS_REPLY_ERROR)
    set_err(r, "redis SCRIPT LOAD failed: %.100s", rep->str);
}

static void script_load(struct redis *r, int script)
{
  const char *argv[3] = {"SCRIPT", "LOAD", script_text[script]};
  size_t argl[3] = {6, 4, strlen(script_text[script])};
  redisAsyncCommandArgv(r->ac, on_script_loaded, (void *)(intptr_t)script, 3, argv, argl);
}

static void on_setup_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
  struct redis *r = ac->data;
  redisReply *rep = reply;
  if (!rep)
    return;
  r->last_reply_ns = mono_ns();
  if (rep->type == REDIS_REPLY_ERROR) {
    set_err(r, "redis %s failed: %.100s", (const char *)privdata, rep->str);
    atomic_store_explicit(&r->up, false, memory_order_release);
    redisAsyncDisconnect(ac); /* reconnects with backoff */
  }
}

/* ---- the I/O thread: the connection ---- */

/* hiredis asks for write interest on every command: touch epoll only when the mask changes. */
static void ev_update(struct redis *r)
{
  if (r->fd < 0 || (r->fd_added && r->ev_mask == r->ev_armed))
    return;
  struct epoll_event ev = {.events = r->ev_mask, .data.u32 = 1};
  if (!r->fd_added) {
    if (epoll_ctl(r->epfd, EPOLL_CTL_ADD, r->fd, &ev) == 0)
      r->fd_added = true;
  } else {
    epoll_ctl(r->epfd, EPOLL_CTL_MOD, r->fd, &ev);
  }
  r->ev_armed = r->ev_mask;
}

static void ev_add_read(void *p)
{
  struct redis *r = p;
  r->ev_mask |= EPOLLIN;
  ev_update(r);
}

static void ev_del_read(void *p)
{
  struct redis *r = p;
  r->ev_mask &= ~(uint32_t)EPOLLIN;
  ev_update(r);
}

static void ev_add_write(void *p)
{
  struct redis *r = p;
  r->ev_mask |= EPOLLOUT;
  ev_update(r);
}

static void ev_del_write(void *p)
{
  struct redis *r = p;
  r->ev_mask &= ~(uint32_t)EPOLLOUT;
  ev_update(r);
}

/* Called by hiredis as it frees the context (before closing the socket). */
static void ev_cleanup(void *p)
{
  struct redis *r = p;
  if (r->fd >= 0 && r->fd_added)
    epoll_ctl(r->epfd, EPOLL_CTL_DEL, r->fd, NULL);
  r->fd = -1;
  r->fd_added = false;
  r->ev_mask = 0;
  r->ac = NULL;
  atomic_store_explicit(&r->up, false, memory_order_release);
}

static void first_result(struct redis *r)
{
  pthread_mutex_lock(&r->mu);
  if (!r->first_done) {
    r->first_done = true;
    pthread_cond_broadcast(&r->cv);
  }
  pthread_mutex_unlock(&r->mu);
}

/* The connection is gone (or never came): refuse new work and retry after a backoff. */
static void went_down(struct redis *r)
{
  atomic_store_explicit(&r->up, false, memory_order_release);
  r->ac = NULL;
  r->connecting = false;
  if (!r->retry_at_ns) {
    r->retry_at_ns = mono_ns() + r->backoff_ns;
    r->backoff_ns = r->backoff_ns * 2 > BACKOFF_MAX_NS ? BACKOFF_MAX_NS : r->backoff_ns * 2;
  }
  first_result(r);
}

static void send_orphans(struct redis *r)
{
  struct req *q = r->o_head;
  r->o_head = r->o_tail = NULL;
  r->n_orphans = 0;
  uint64_t deadline = mono_ns() + r->timeout_ns;
  while (q) {
    struct req *next = q->next;
    q->next = q->prev = NULL;
    q->deadline_ns = deadline;
    atomic_fetch_add_explicit(&r->outstanding, 1, memory_order_relaxed);
    send_req(r, q);
    q = next;
  }
}

static void on_connect(const redisAsyncContext *cac, int status)
{
  struct redis *r = cac->data;
  redisAsyncContext *ac = r->ac;
  r->connecting = false;
  if (status != REDIS_OK) {
    set_err(r, "cannot connect to redis at %s:%d: %s", r->host, r->port,
            cac->errstr ? cac->errstr : "error");
    went_down(r); /* hiredis frees the context after this returns */
    return;
  }
  r->last_reply_ns = mono_ns();
  if (r->pass[0]) {
    const char *argv[3] = {"AUTH", r->user, r->pass};
    size_t argl[3] = {4, strlen(r->user), strlen(r->pass)};
    if (r->user[0])
      redisAsyncCommandArgv(ac, on_setup_reply, "AUTH", 3, argv, argl);
    else
      redisAsyncCommandArgv(ac, on_setup_reply, "AUTH", 2, (const char *[]){"AUTH", r->pass},
                            (size_t[]){4, argl[2]});
  }
  if (r->db) {
    char db[16];
    snprintf(db, sizeof(db), "%u", r->db);
    redisAsyncCommandArgv(ac, on_setup_reply, "SELECT", 2, (const char *[]){"SELECT", db},
                          (size_t[]){6, strlen(db)});
  }
  for (int s = 0; s < S_COUNT; s++)
    if (!r->sha[s][0])
      script_load(r, s);
  r->backoff_ns = BACKOFF_MIN_NS;
  r->reason_set = false;
  atomic_fetch_add_explicit(&r->n_connects, 1, memory_order_relaxed);
  atomic_store_explicit(&r->up, true, memory_order_release);
  send_orphans(r);
  first_result(r);
}

static void on_disconnect(const redisAsyncContext *cac, int status)
{
  struct redis *r = cac->data;
  if (status != REDIS_OK)
    set_err(r, "lost the connection to redis at %s:%d: %s", r->host, r->port,
            cac->errstr ? cac->errstr : "error");
  else if (!r->reason_set)
    set_err(r, "the connection to redis at %s:%d was closed", r->host, r->port);
  went_down(r);
}

static void start_connect(struct redis *r)
{
  r->retry_at_ns = 0;
  redisAsyncContext *ac = redisAsyncConnect(r->host, r->port);
  if (!ac || ac->err) {
    set_err(r, "cannot connect to redis at %s:%d: %s", r->host, r->port,
            ac ? ac->errstr : "out of memory");
    if (ac)
      redisAsyncFree(ac);
    went_down(r);
    return;
  }
  r->ac = ac;
  ac->data = r;
  r->fd = ac->c.fd;
  r->fd_added = false;
  r->ev_mask = 0;
  ac->ev.data = r;
  ac->ev.addRead = ev_add_read;
  ac->ev.delRead = ev_del_read;
  ac->ev.addWrite = ev_add_write;
  ac->ev.delWrite = ev_del_write;
  ac->ev.cleanup = ev_cleanup;
  r->connecting = true;
  /* Requests never wait for a connection attempt (they are refused while down), so it may take
   * longer than one operation's timeout on a busy network. */
  r->connect_deadline_ns =
      mono_ns() + (r->timeout_ns > CONNECT_MIN_NS ? r->timeout_ns : CONNECT_MIN_NS);
  redisAsyncSetDisconnectCallback(ac, on_disconnect);
  redisAsyncSetConnectCallback(ac, on_connect); /* arms the first write event */
}

/* Drops the connection from the loop (never from inside a hiredis callback). */
static void drop(struct redis *r)
{
  redisAsyncContext *ac = r->ac;
  if (!ac)
    return;
  atomic_store_explicit(&r->up, false, memory_order_release);
  redisAsyncFree(ac); /* pending callbacks run with NULL, then cleanup */
  went_down(r);
}

/* Takes the queued requests and sends them (or fails them at once while down). */
static void drain_queue(struct redis *r)
{
  pthread_mutex_lock(&r->mu);
  struct req *q = r->q_head;
  r->q_head = r->q_tail = NULL;
  r->wake_pending = false;
  pthread_mutex_unlock(&r->mu);
  uint64_t now = mono_ns();
  while (q) {
    struct req *next = q->next;
    q->next = NULL;
    if (q->deadline_ns <= now)
      fail_unsent(r, q, GW_STORE_REDIS_ETIMEDOUT);
    else if (!r->ac || !atomic_load_explicit(&r->up, memory_order_relaxed))
      fail_unsent(r, q, GW_STORE_REDIS_EDOWN);
    else
      send_req(r, q);
    q = next;
  }
}

/* Completes the requests whose deadline has passed; drops a stalled connection. */
static void expire_pending(struct redis *r, uint64_t now)
{
  bool stalled = false;
  while (r->p_head && r->p_head->deadline_ns <= now) {
    struct req *q = r->p_head;
    pending_unlink(r, q);
    q->abandoned = true; /* hiredis still holds it: the callback frees it */
    if (q->sent_ns > r->last_reply_ns)
      stalled = true;
    complete(r, q, GW_STORE_REDIS_ETIMEDOUT);
    undo_claim(r, q);
  }
  if (stalled && r->ac && !r->connecting) {
    set_err(r, "redis at %s:%d stopped answering", r->host, r->port);
    drop(r);
  }
}

static void *io_main(void *arg)
{
  struct redis *r = arg;
  struct epoll_event evs[16];
  for (;;) {
    pthread_mutex_lock(&r->mu);
    bool stopping = r->stopping;
    pthread_mutex_unlock(&r->mu);
    if (stopping)
      break;
    uint64_t now = mono_ns();
    expire_pending(r, now);
    if (r->connecting && r->connect_deadline_ns <= now) {
      set_err(r, "connecting to redis at %s:%d timed out", r->host, r->port);
      drop(r);
    }
    if (!r->ac && r->retry_at_ns && r->retry_at_ns <= now)
      start_connect(r);
    uint64_t next = UINT64_MAX;
    if (r->p_head)
      next = r->p_head->deadline_ns;
    if (r->connecting && r->connect_deadline_ns < next)
      next = r->connect_deadline_ns;
    if (!r->ac && r->retry_at_ns && r->retry_at_ns < next)
      next = r->retry_at_ns;
    now = mono_ns();
    int wait_ms = -1;
    if (next != UINT64_MAX)
      wait_ms = next <= now ? 0 : (int)gw_ns_to_ms_ceil(next - now);
    int n = epoll_wait(r->epfd, evs, 16, wait_ms);
    for (int i = 0; i < n; i++) {
      if (evs[i].data.u32 == 0) {
        uint64_t v;
        ssize_t got = read(r->evfd, &v, sizeof(v));
        (void)got;
        drain_queue(r);
        /* Write the batch now rather than after one more epoll round for EPOLLOUT. */
        if (r->ac && !r->connecting && (r->ev_mask & EPOLLOUT))
          redisAsyncHandleWrite(r->ac);
        continue;
      }
      uint32_t e = evs[i].events;
      if (r->ac && (e & (EPOLLIN | EPOLLERR | EPOLLHUP)) && (r->ev_mask & EPOLLIN))
        redisAsyncHandleRead(r->ac);
      if (r->ac && (e & (EPOLLOUT | EPOLLERR | EPOLLHUP)) && (r->ev_mask & EPOLLOUT))
        redisAsyncHandleWrite(r->ac);
      if (r->ac && (e & (EPOLLERR | EPOLLHUP)) && !(r->ev_mask & (EPOLLIN | EPOLLOUT))) {
        set_err(r, "the connection to redis at %s:%d failed", r->host, r->port);
        drop(r);
      }
    }
  }
  /* Stopping: fail what is queued, then what hiredis holds, then the orphans. */
  r->io_stopping = true;
  drain_queue(r);
  while (r->p_head) {
    struct req *q = r->p_head;
    pending_unlink(r, q);
    q->abandoned = true;
    complete(r, q, GW_STORE_REDIS_EDOWN);
  }
  if (r->ac) {
    redisAsyncFree(r->ac);
    r->ac = NULL;
  }
  while (r->o_head) {
    struct req *q = r->o_head;
    r->o_head = q->next;
    req_free(q);
  }
  return NULL;
}

/* ---- the instance ---- */

static int parse_url(struct redis *r, const char *url)
{
  const char *p = url;
  if (strncmp(p, "redis://", 8) != 0)
    return -1;
  p += 8;
  const char *at = strchr(p, '@');
  if (at) {
    const char *colon = memchr(p, ':', (size_t)(at - p));
    const char *pw = colon ? colon + 1 : p;
    size_t ul = colon ? (size_t)(colon - p) : 0;
    size_t pl = (size_t)(at - pw);
    if (ul >= sizeof(r->user) || pl >= sizeof(r->pass))
      return -1;
    memcpy(r->user, p, ul);
    r->user[ul] = '\0';
    memcpy(r->pass, pw, pl);
    r->pass[pl] = '\0';
    p = at + 1;
  }
  size_t hl;
  const char *rest;
  if (*p == '[') { /* [IPv6] */
    const char *end = strchr(p, ']');
    if (!end)
      return -1;
    hl = (size_t)(end - p - 1);
    if (hl == 0 || hl >= sizeof(r->host))
      return -1;
    memcpy(r->host, p + 1, hl);
    rest = end + 1;
  } else {
    hl = strcspn(p, ":/");
    if (hl == 0 || hl >= sizeof(r->host))
      return -1;
    memcpy(r->host, p, hl);
    rest = p + hl;
  }
  r->host[hl] = '\0';
  r->port = 6379;
  if (*rest == ':') {
    char *end;
    errno = 0;
    unsigned long port = strtoul(rest + 1, &end, 10);
    if (end == rest + 1 || errno || port < 1 || port > 65535)
      return -1;
    r->port = (int)port;
    rest = end;
  }
  r->db = 0;
  if (*rest == '/') {
    rest++;
    if (*rest) {
      char *end;
      errno = 0;
      unsigned long db = strtoul(rest, &end, 10);
      if (end == rest || errno || db > 1000000 || *end)
        return -1;
      r->db = (unsigned)db;
    }
  } else if (*rest) {
    return -1;
  }
  return 0;
}

int gw_store_redis_open(const char *url, uint64_t timeout_ms, void **impl, char *errbuf,
                        size_t errlen)
{
  if (errbuf && errlen)
    errbuf[0] = '\0';
  if (timeout_ms < 1 || timeout_ms > 3600000) {
    if (errbuf)
      snprintf(errbuf, errlen, "redis timeout_ms must be from 1 to 3600000");
    return GW_POLICY_EINVALID_CONFIG;
  }
  struct redis *r = calloc(1, sizeof(*r));
  if (!r)
    return GW_POLICY_ENOMEM;
  r->magic = MAGIC_INSTANCE;
  if (!url || parse_url(r, url)) {
    if (errbuf)
      snprintf(errbuf, errlen, "redis url must look like redis://host:port/db");
    free(r);
    return GW_STORE_REDIS_EURL;
  }
  r->timeout_ns = timeout_ms * GW_NS_PER_MS;
  if (getrandom(&r->claim_base, sizeof(r->claim_base), 0) != sizeof(r->claim_base))
    r->claim_base = mono_ns() * UINT64_C(0x9e3779b97f4a7c15) ^ (uint64_t)getpid();
  atomic_init(&r->claim_seq, 0);
  atomic_init(&r->up, false);
  atomic_init(&r->outstanding, 0);
  r->fd = -1;
  r->backoff_ns = BACKOFF_MIN_NS;
  r->epfd = epoll_create1(EPOLL_CLOEXEC);
  r->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  struct epoll_event ev = {.events = EPOLLIN, .data.u32 = 0};
  if (r->epfd < 0 || r->evfd < 0 || epoll_ctl(r->epfd, EPOLL_CTL_ADD, r->evfd, &ev))
    goto fail_fds;
  pthread_mutex_init(&r->mu, NULL);
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&r->cv, &ca);
  pthread_condattr_destroy(&ca);
  r->retry_at_ns = 1; /* connect at once */
  if (pthread_create(&r->thread, NULL, io_main, r))
    goto fail_thread;
  /* Wait for the first attempt so the first requests do not fail for nothing. */
  uint64_t until = mono_ns() + r->timeout_ns;
  struct timespec ts = {.tv_sec = (time_t)(until / GW_NS_PER_S),
                        .tv_nsec = (long)(until % GW_NS_PER_S)};
  pthread_mutex_lock(&r->mu);
  while (!r->first_done && pthread_cond_timedwait(&r->cv, &r->mu, &ts) != ETIMEDOUT) {
  }
  pthread_mutex_unlock(&r->mu);
  *impl = r;
  return 0;

fail_thread:
  pthread_cond_destroy(&r->cv);
  pthread_mutex_destroy(&r->mu);
fail_fds:
  if (errbuf)
    snprintf(errbuf, errlen, "cannot start the redis store thread: %s", strerror(errno));
  if (r->epfd >= 0)
    close(r->epfd);
  if (r->evfd >= 0)
    close(r->evfd);
  free(r);
  return GW_STORE_REDIS_ESYS;
}

void gw_store_redis_close(void *impl)
{
  struct redis *r = impl;
  if (!r)
    return;
  pthread_mutex_lock(&r->mu);
  r->stopping = true;
  pthread_mutex_unlock(&r->mu);
  wake(r);
  pthread_join(r->thread, NULL);
  close(r->epfd);
  close(r->evfd);
  pthread_cond_destroy(&r->cv);
  pthread_mutex_destroy(&r->mu);
  free(r);
}

bool gw_store_redis_connected(void *impl)
{
  struct redis *r = impl;
  return atomic_load_explicit(&r->up, memory_order_acquire);
}

void gw_store_redis_last_error(void *impl, char *buf, size_t len)
{
  struct redis *r = impl;
  if (!len)
    return;
  pthread_mutex_lock(&r->mu);
  snprintf(buf, len, "%s", r->last_err);
  pthread_mutex_unlock(&r->mu);
}

void gw_store_redis_stats(void *impl, struct gw_store_redis_stats *out)
{
  struct redis *r = impl;
  out->connected = atomic_load(&r->up);
  out->ops = atomic_load(&r->n_ops);
  out->failed = atomic_load(&r->n_failed);
  out->timeouts = atomic_load(&r->n_timeouts);
  out->refused = atomic_load(&r->n_refused);
  out->connects = atomic_load(&r->n_connects);
  out->releases = atomic_load(&r->n_releases);
  out->outstanding = atomic_load(&r->outstanding);
}

struct gw_store_redis_scope gw_store_redis_scope(void *impl, const char *route)
{
  struct gw_store_redis_scope s = {.magic = MAGIC_SCOPE, .redis = impl, .route = route};
  return s;
}

/* ---- limiters ---- */

static int lim_create(void *impl, const struct gw_limiter_spec *spec, void **out)
{
  const struct gw_store_redis_scope *sc = impl;
  if (!sc || sc->magic != MAGIC_SCOPE || !sc->redis || !sc->route ||
      ((struct redis *)sc->redis)->magic != MAGIC_INSTANCE)
    return GW_POLICY_EINVALID_CONFIG;
  if (spec->kind == GW_LIMITER_TOKEN_BUCKET ? gw_token_bucket_config_check(&spec->tb)
                                            : gw_sliding_window_config_check(&spec->sw))
    return GW_POLICY_EINVALID_CONFIG;
  size_t rl = strlen(sc->route);
  if (rl > 200 || memchr(sc->route, '{', rl) || memchr(sc->route, '}', rl))
    return GW_POLICY_EINVALID_CONFIG;
  struct limiter *l = calloc(1, sizeof(*l) + rl + 16);
  if (!l)
    return GW_POLICY_ENOMEM;
  l->magic = MAGIC_LIMITER;
  atomic_init(&l->refs, 1);
  l->r = sc->redis;
  l->spec = *spec;
  bool tb = spec->kind == GW_LIMITER_TOKEN_BUCKET;
  l->script = tb ? S_TB : S_SW;
  snprintf(l->a1, sizeof(l->a1), "%" PRIu64, tb ? spec->tb.capacity : spec->sw.limit);
  snprintf(l->a2, sizeof(l->a2), "%" PRIu64,
           tb ? spec->tb.refill_per_sec : spec->sw.window_ms * 1000);
  l->prefix_len = (size_t)snprintf(l->prefix, rl + 16, "gw:{%s}:%s", sc->route, tb ? "tb" : "sw");
  *out = l;
  return 0;
}

static void lim_destroy(void *p)
{
  limiter_unref(p);
}

/* The Redis key for a limiter key: raw up to KEY_RAW_MAX bytes, else hashed. */
static size_t lim_key(const struct limiter *l, const void *key, size_t len, char *buf)
{
  memcpy(buf, l->prefix, l->prefix_len);
  size_t n = l->prefix_len;
  if (len <= KEY_RAW_MAX) {
    buf[n++] = ':';
    if (len)
      memcpy(buf + n, key, len);
    return n + len;
  }
  static const struct gw_hash_key k1 = {0x67772d7265646973ull, 0x6b65792d68617368ull};
  static const struct gw_hash_key k2 = {0x6c696d697465722dull, 0x6b65792d7365636full};
  uint64_t h1 = gw_siphash(&k1, 2, 4, key, len), h2 = gw_siphash(&k2, 2, 4, key, len);
  n += (size_t)snprintf(buf + n, 40, "#%016" PRIx64 "%016" PRIx64, h1, h2);
  return n;
}

static int lim_submit(struct limiter *l, enum req_kind kind, const void *key, size_t len,
                      struct gw_store_op *op)
{
  char kbuf[256 + KEY_RAW_MAX + 64];
  size_t kl = lim_key(l, key, len, kbuf);
  const void *a[4] = {kbuf, l->a1, l->a2, kind == K_LIMIT ? "1" : "0"};
  size_t al[4] = {kl, strlen(l->a1), strlen(l->a2), 1};
  struct req *q = req_new(kind, l->script, 4, a, al);
  if (!q)
    return GW_POLICY_ENOMEM;
  atomic_fetch_add_explicit(&l->refs, 1, memory_order_relaxed);
  q->lim = l;
  q->op = op;
  return submit(l->r, q, false);
}

static int lim_admit_async(void *p, const void *key, size_t len, uint64_t now_ns,
                           struct gw_store_op *op)
{
  struct limiter *l = p;
  if (!op || !op->done)
    return GW_POLICY_EINVALID_CONFIG;
  if (!atomic_load_explicit(&l->r->up, memory_order_acquire)) {
    atomic_fetch_add_explicit(&l->r->n_refused, 1, memory_order_relaxed);
    return GW_STORE_REDIS_EDOWN;
  }
  return lim_submit(l, K_LIMIT, key, len, op);
}

static void lim_stats(void *p, struct gw_limiter_stats *out)
{
  struct limiter *l = p;
  out->keys = 0;
  out->admitted = atomic_load(&l->admitted);
  out->rejected = atomic_load(&l->rejected);
  out->evictions = 0;
}

struct waiter {
  struct gw_store_op op;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  bool done;
};

static void waiter_done(struct gw_store_op *op)
{
  struct waiter *w = op->ctx;
  pthread_mutex_lock(&w->mu);
  w->done = true;
  pthread_cond_signal(&w->cv);
  pthread_mutex_unlock(&w->mu);
}

static void lim_peek(void *p, const void *key, size_t len, uint64_t now_ns,
                     struct gw_ratelimit_info *info)
{
  struct limiter *l = p;
  struct waiter w;
  memset(&w, 0, sizeof(w));
  w.op.done = waiter_done;
  w.op.ctx = &w;
  pthread_mutex_init(&w.mu, NULL);
  pthread_cond_init(&w.cv, NULL);
  memset(info, 0, sizeof(*info));
  info->limit = l->spec.kind == GW_LIMITER_TOKEN_BUCKET ? l->spec.tb.capacity : l->spec.sw.limit;
  if (lim_submit(l, K_PEEK, key, len, &w.op) == 0) {
    /* The I/O thread completes every request by its deadline. */
    pthread_mutex_lock(&w.mu);
    while (!w.done)
      pthread_cond_wait(&w.cv, &w.mu);
    pthread_mutex_unlock(&w.mu);
    if (w.op.err == 0)
      *info = w.op.info;
  }
  pthread_cond_destroy(&w.cv);
  pthread_mutex_destroy(&w.mu);
}

/* ---- idempotency ---- */

static int idem_create(void *impl, const struct gw_idem_config *cfg, void **out)
{
  struct redis *r = impl;
  if (r && r->magic == MAGIC_SCOPE)
    r = ((const struct gw_store_redis_scope *)impl)->redis;
  if (!r || r->magic != MAGIC_INSTANCE || gw_idem_config_check(cfg))
    return GW_POLICY_EINVALID_CONFIG;
  struct idem *m = calloc(1, sizeof(*m));
  if (!m)
    return GW_POLICY_ENOMEM;
  size_t nb = 64;
  while (nb < cfg->max_records && nb < 65536)
    nb *= 2;
  m->buckets = calloc(nb, sizeof(*m->buckets));
  if (!m->buckets) {
    free(m);
    return GW_POLICY_ENOMEM;
  }
  m->mask = nb - 1;
  m->magic = MAGIC_IDEM;
  atomic_init(&m->refs, 1);
  m->r = r;
  m->cfg = *cfg;
  snprintf(m->ttl, sizeof(m->ttl), "%" PRIu64, cfg->ttl_ms);
  snprintf(m->safety, sizeof(m->safety), "%" PRIu64,
           cfg->ttl_ms > CLAIM_SAFETY_MS ? cfg->ttl_ms : CLAIM_SAFETY_MS);
  pthread_mutex_init(&m->mu, NULL);
  *out = m;
  return 0;
}

static void idem_free(struct idem *m)
{
  for (size_t i = 0; i <= m->mask; i++) {
    struct claim_entry *e = m->buckets[i];
    while (e) {
      struct claim_entry *next = e->next;
      free(e);
      e = next;
    }
  }
  free(m->buckets);
  pthread_mutex_destroy(&m->mu);
  free(m);
}

static void idem_destroy(void *p)
{
  idem_unref(p);
}

/* Records a claim this node now holds (I/O thread, on EXECUTE). */
static int claim_insert(struct idem *m, const struct req *q)
{
  struct claim_entry *e = malloc(sizeof(*e) + q->len[0]);
  if (!e)
    return GW_POLICY_ENOMEM;
  e->id = q->claim_id;
  e->fp = q->fp;
  e->key_len = q->len[0];
  memcpy(e->key, q->arg[0], q->len[0]);
  pthread_mutex_lock(&m->mu);
  struct claim_entry **b = &m->buckets[(e->id * UINT64_C(0x9e3779b97f4a7c15)) >> 40 & m->mask];
  e->next = *b;
  *b = e;
  m->in_flight++;
  pthread_mutex_unlock(&m->mu);
  return 0;
}

/* Removes and returns the claim's entry, or NULL if this node holds no such claim. */
static struct claim_entry *claim_take(struct idem *m, const struct gw_idem_claim *claim)
{
  pthread_mutex_lock(&m->mu);
  struct claim_entry **pe =
      &m->buckets[(claim->id * UINT64_C(0x9e3779b97f4a7c15)) >> 40 & m->mask];
  while (*pe && ((*pe)->id != claim->id || ((*pe)->fp.hi ^ (*pe)->fp.lo) != claim->hash))
    pe = &(*pe)->next;
  struct claim_entry *e = *pe;
  if (e) {
    *pe = e->next;
    m->in_flight--;
  }
  pthread_mutex_unlock(&m->mu);
  return e;
}

static void in_flight_value(char *v, const struct gw_idem_fingerprint *fp, uint64_t id)
{
  unsigned char *p = (unsigned char *)v;
  p[0] = 'F';
  put_be(p + 1, fp->hi, 8);
  put_be(p + 9, fp->lo, 8);
  put_be(p + 17, id, 8);
}

static int idem_begin_async(void *p, const char *route, size_t route_len, const char *key,
                            size_t key_len, const struct gw_idem_fingerprint *fp, uint64_t now_ns,
                            gw_store_copy_fn copy, void *copy_ctx, struct gw_store_op *op)
{
  struct idem *m = p;
  struct redis *r = m->r;
  if (!op || !op->done)
    return GW_POLICY_EINVALID_CONFIG;
  if (route_len > 200 || key_len > GW_IDEM_KEY_MAX || memchr(route, '{', route_len) ||
      memchr(route, '}', route_len))
    return GW_POLICY_ETOO_LARGE;
  if (!atomic_load_explicit(&r->up, memory_order_acquire)) {
    atomic_fetch_add_explicit(&r->n_refused, 1, memory_order_relaxed);
    return GW_STORE_REDIS_EDOWN;
  }
  pthread_mutex_lock(&m->mu);
  bool full = m->in_flight >= m->cfg.max_records;
  if (full)
    m->full++;
  pthread_mutex_unlock(&m->mu);
  if (full)
    return GW_POLICY_EFULL;
  char kbuf[16 + 200 + GW_IDEM_KEY_MAX];
  int kl = snprintf(kbuf, sizeof(kbuf), "gw:{%.*s}:idem:%.*s", (int)route_len, route,
                    (int)key_len, key);
  uint64_t id = r->claim_base + atomic_fetch_add_explicit(&r->claim_seq, 1, memory_order_relaxed);
  char v[INFLIGHT_LEN];
  in_flight_value(v, fp, id);
  const void *a[3] = {kbuf, v, m->safety};
  size_t al[3] = {(size_t)kl, INFLIGHT_LEN, strlen(m->safety)};
  struct req *q = req_new(K_BEGIN, S_BEGIN, 3, a, al);
  if (!q)
    return GW_POLICY_ENOMEM;
  atomic_fetch_add_explicit(&m->refs, 1, memory_order_relaxed);
  q->idem = m;
  q->op = op;
  q->claim_id = id;
  q->fp = *fp;
  q->copy = copy;
  q->copy_ctx = copy_ctx;
  return submit(r, q, false);
}

static int idem_finish_async(void *p, const struct gw_idem_claim *claim,
                             enum gw_idem_origin origin, const struct gw_idem_response *resp,
                             uint64_t now_ns, struct gw_store_op *op)
{
  struct idem *m = p;
  struct redis *r = m->r;
  struct claim_entry *e = claim_take(m, claim);
  if (!e)
    return GW_POLICY_ESTALE;
  char v[INFLIGHT_LEN];
  in_flight_value(v, &e->fp, e->id);
  bool store = gw_idem_should_store(origin);
  int rc = 0;
  size_t rec_len = 0;
  if (store) {
    rec_len = RECORD_HEAD + resp->headers_len + resp->body_len;
    if (resp->headers_len > UINT32_MAX || rec_len > m->cfg.max_bytes || resp->status < 0 ||
        resp->status > 0xffff) {
      rc = GW_POLICY_ETOO_LARGE; /* released instead, as the memory store does */
      store = false;
    }
  }
  char *rec = NULL;
  if (store) {
    rec = malloc(rec_len);
    if (!rec) {
      rc = GW_POLICY_ENOMEM;
      store = false;
    } else {
      unsigned char *u = (unsigned char *)rec;
      u[0] = 'C';
      put_be(u + 1, e->fp.hi, 8);
      put_be(u + 9, e->fp.lo, 8);
      put_be(u + 17, (uint64_t)resp->status, 2);
      put_be(u + 19, resp->headers_len, 4);
      if (resp->headers_len)
        memcpy(rec + RECORD_HEAD, resp->headers, resp->headers_len);
      if (resp->body_len)
        memcpy(rec + RECORD_HEAD + resp->headers_len, resp->body, resp->body_len);
    }
  }
  const void *a[4] = {e->key, v, store ? rec : "", m->ttl};
  size_t al[4] = {e->key_len, INFLIGHT_LEN, store ? rec_len : 0, strlen(m->ttl)};
  /* Queued even while down: the I/O thread then fails it at once and keeps a release of the
   * claim for the next connection, so a retry of the request can execute. */
  struct req *q = req_new(K_FINISH, S_FINISH, 4, a, al);
  free(rec);
  free(e);
  if (!q)
    return GW_POLICY_ENOMEM;
  atomic_fetch_add_explicit(&m->refs, 1, memory_order_relaxed);
  q->idem = m;
  q->op = rc ? NULL : op; /* on an error returned now, done is never called */
  int src = submit(r, q, true);
  return rc ? rc : src;
}

static void idem_stats(void *p, struct gw_idem_stats *out)
{
  struct idem *m = p;
  memset(out, 0, sizeof(*out));
  pthread_mutex_lock(&m->mu);
  out->in_flight = (uint32_t)m->in_flight;
  out->records = (uint32_t)m->in_flight;
  out->full = m->full;
  out->replays = m->replays;
  pthread_mutex_unlock(&m->mu);
}

const struct gw_store_ops gw_store_redis = {
    .version = GW_STORE_OPS_VERSION,
    .name = "redis",
    .limiter_create = lim_create,
    .limiter_destroy = lim_destroy,
    .limiter_stats = lim_stats,
    .limiter_peek = lim_peek,
    .idem_create = idem_create,
    .idem_destroy = idem_destroy,
    .idem_stats = idem_stats,
    .limiter_admit_async = lim_admit_async,
    .idem_begin_async = idem_begin_async,
    .idem_finish_async = idem_finish_async,
};
