/*
 * The Redis store against a real redis-server that the test starts on a free loopback port
 * (no persistence) and kills at the end: limits exact across two instances ("nodes") hammering
 * one key from several threads, the RateLimit numbers equal to the memory store's, idempotency
 * decisions and byte-exact replays, and what a killed, stopped or restarted Redis does to
 * outstanding and new operations. Without redis-server on PATH the test is skipped (exit 77).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "redis.h"

#define TIMEOUT_MS 300
#define SLACK_MS 250 /* scheduling on a loaded machine; the store itself completes at the deadline */
#define MS GW_NS_PER_MS

static int port;
static pid_t server = -1;
static char url[64];

static uint64_t mono_ns(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * GW_NS_PER_S + (uint64_t)ts.tv_nsec;
}

static void sleep_ms(unsigned ms)
{
  struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
  while (nanosleep(&ts, &ts) && errno == EINTR) {
  }
}

/* ---- the server ---- */

static bool on_path(const char *prog)
{
  const char *path = getenv("PATH");
  if (!path)
    return false;
  char buf[4096];
  while (*path) {
    size_t n = strcspn(path, ":");
    snprintf(buf, sizeof(buf), "%.*s/%s", (int)n, path, prog);
    if (access(buf, X_OK) == 0)
      return true;
    path += n + (path[n] == ':');
  }
  return false;
}

static int free_port(void)
{
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t len = sizeof(a);
  if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof(a)) ||
      getsockname(fd, (struct sockaddr *)&a, &len))
    return -1;
  close(fd);
  return ntohs(a.sin_port);
}

/* One inline command on a fresh connection; the first reply line goes to out. */
static int raw_cmd(const char *cmd, char *out, size_t outlen)
{
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                          .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  struct timeval tv = {.tv_sec = 1};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  if (connect(fd, (struct sockaddr *)&a, sizeof(a))) {
    close(fd);
    return -1;
  }
  char line[512];
  int n = snprintf(line, sizeof(line), "%s\r\n", cmd);
  if (write(fd, line, (size_t)n) != n) {
    close(fd);
    return -1;
  }
  size_t got = 0;
  while (got + 1 < sizeof(line)) {
    ssize_t k = read(fd, line + got, 1);
    if (k <= 0)
      break;
    got++;
    if (line[got - 1] == '\n')
      break;
  }
  close(fd);
  line[got] = '\0';
  if (!got)
    return -1;
  size_t n_out = got < outlen ? got : outlen - 1;
  memcpy(out, line, n_out);
  out[n_out] = '\0';
  return 0;
}

static long raw_int(const char *cmd)
{
  char out[256];
  if (raw_cmd(cmd, out, sizeof(out)) || out[0] != ':')
    return -999;
  return strtol(out + 1, NULL, 10);
}

static void server_start(void)
{
  char p[16];
  snprintf(p, sizeof(p), "%d", port);
  server = fork();
  if (server == 0) {
    FILE *f = freopen("/dev/null", "w", stdout);
    (void)f;
    execlp("redis-server", "redis-server", "--port", p, "--bind", "127.0.0.1", "--save", "",
           "--appendonly", "no", "--daemonize", "no", (char *)NULL);
    _exit(127);
  }
  char out[64];
  for (int i = 0; i < 500; i++) {
    if (raw_cmd("PING", out, sizeof(out)) == 0 && strncmp(out, "+PONG", 5) == 0)
      return;
    sleep_ms(10);
  }
  fail_msg("redis-server did not answer PING on port %d", port);
}

static void server_kill(void)
{
  if (server > 0) {
    kill(server, SIGKILL);
    waitpid(server, NULL, 0);
    server = -1;
  }
}

static int group_setup(void **state)
{
  port = free_port();
  snprintf(url, sizeof(url), "redis://127.0.0.1:%d/0", port);
  server_start();
  return 0;
}

static int group_teardown(void **state)
{
  server_kill();
  return 0;
}

static int flush(void **state)
{
  char out[64];
  raw_cmd("FLUSHALL", out, sizeof(out));
  return 0;
}

/* ---- waiting for an operation ---- */

struct wait_op {
  struct gw_store_op op;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  bool done;
  int calls;
  uint64_t t0, t1;
};

static void wait_done(struct gw_store_op *op)
{
  struct wait_op *w = op->ctx;
  pthread_mutex_lock(&w->mu);
  w->calls++;
  w->done = true;
  w->t1 = mono_ns();
  pthread_cond_signal(&w->cv);
  pthread_mutex_unlock(&w->mu);
}

static void wait_init(struct wait_op *w)
{
  memset(w, 0, sizeof(*w));
  pthread_mutex_init(&w->mu, NULL);
  pthread_cond_init(&w->cv, NULL);
  w->op.done = wait_done;
  w->op.ctx = w;
  w->t0 = mono_ns();
}

static void wait_for(struct wait_op *w)
{
  pthread_mutex_lock(&w->mu);
  while (!w->done)
    pthread_cond_wait(&w->cv, &w->mu);
  pthread_mutex_unlock(&w->mu);
}

static void wait_fini(struct wait_op *w)
{
  pthread_cond_destroy(&w->cv);
  pthread_mutex_destroy(&w->mu);
}

/* One admission: 1 admitted, 0 refused, negative error (at once or through done). */
static int admit(void *lim, const char *key, struct gw_ratelimit_info *info)
{
  struct wait_op w;
  wait_init(&w);
  int rc = gw_store_redis.limiter_admit_async(lim, key, strlen(key), 0, &w.op);
  if (rc == 0) {
    wait_for(&w);
    rc = w.op.err ? w.op.err : w.op.admitted;
    if (info)
      *info = w.op.info;
  }
  wait_fini(&w);
  return rc;
}

static void *open_store(void)
{
  void *r = NULL;
  char err[128];
  assert_int_equal(gw_store_redis_open(url, TIMEOUT_MS, &r, err, sizeof(err)), 0);
  for (int i = 0; i < 300 && !gw_store_redis_connected(r); i++)
    sleep_ms(10);
  assert_true(gw_store_redis_connected(r));
  return r;
}

static void *make_limiter(void *r, const char *route, const struct gw_limiter_spec *spec)
{
  struct gw_store_redis_scope sc = gw_store_redis_scope(r, route);
  void *lim = NULL;
  assert_int_equal(gw_store_redis.limiter_create(&sc, spec, &lim), 0);
  return lim;
}

static struct gw_limiter_spec tb_spec(uint64_t cap, uint64_t rate)
{
  struct gw_limiter_spec s;
  memset(&s, 0, sizeof(s));
  s.kind = GW_LIMITER_TOKEN_BUCKET;
  s.tb.capacity = cap;
  s.tb.refill_per_sec = rate;
  s.max_keys = 1000;
  return s;
}

static struct gw_limiter_spec sw_spec(uint64_t limit, uint64_t window_ms)
{
  struct gw_limiter_spec s;
  memset(&s, 0, sizeof(s));
  s.kind = GW_LIMITER_SLIDING_WINDOW;
  s.sw.limit = limit;
  s.sw.window_ms = window_ms;
  s.max_keys = 1000;
  return s;
}

/* ---- limits across two nodes ---- */

struct hammer {
  void *lim;
  int tries;
  int admitted, failed;
};

static void *hammer_main(void *arg)
{
  struct hammer *h = arg;
  for (int i = 0; i < h->tries; i++) {
    int rc = admit(h->lim, "shared", NULL);
    if (rc == 1)
      h->admitted++;
    else if (rc < 0)
      h->failed++;
  }
  return NULL;
}

/* 2 nodes x 3 threads, tries each; returns the total admitted. */
static int hammer_two_nodes(const struct gw_limiter_spec *spec, int tries, uint64_t *elapsed_ns)
{
  void *n1 = open_store(), *n2 = open_store();
  void *l1 = make_limiter(n1, "orders", spec), *l2 = make_limiter(n2, "orders", spec);
  struct hammer h[6];
  pthread_t t[6];
  uint64_t t0 = mono_ns();
  for (int i = 0; i < 6; i++) {
    h[i] = (struct hammer){.lim = i % 2 ? l2 : l1, .tries = tries};
    pthread_create(&t[i], NULL, hammer_main, &h[i]);
  }
  int total = 0;
  for (int i = 0; i < 6; i++) {
    pthread_join(t[i], NULL);
    total += h[i].admitted;
    assert_int_equal(h[i].failed, 0);
  }
  *elapsed_ns = mono_ns() - t0;
  struct gw_limiter_stats s1, s2;
  gw_store_redis.limiter_stats(l1, &s1);
  gw_store_redis.limiter_stats(l2, &s2);
  assert_int_equal(s1.admitted + s2.admitted, (uint64_t)total);
  assert_int_equal(s1.admitted + s1.rejected + s2.admitted + s2.rejected, (uint64_t)6 * tries);
  gw_store_redis.limiter_destroy(l1);
  gw_store_redis.limiter_destroy(l2);
  gw_store_redis_close(n1);
  gw_store_redis_close(n2);
  return total;
}

static void token_bucket_admits_capacity_across_two_nodes(void **state)
{
  struct gw_limiter_spec spec = tb_spec(100, 1);
  uint64_t el;
  int admitted = hammer_two_nodes(&spec, 80, &el);
  /* One token a second refills: within a second of the first request exactly capacity. */
  if (el < 900 * MS)
    assert_int_equal(admitted, 100);
  else
    assert_in_range(admitted, 100, 100 + el / GW_NS_PER_S + 1);
}

static void sliding_window_admits_limit_across_two_nodes(void **state)
{
  struct gw_limiter_spec spec = sw_spec(150, 60000);
  uint64_t el;
  assert_int_equal(hammer_two_nodes(&spec, 60, &el), 150);
  char out[64];
  assert_int_equal(raw_cmd("ZCARD gw:{orders}:sw:shared", out, sizeof(out)), 0);
  assert_string_equal(out, ":150\r\n");
  long pttl = raw_int("PTTL gw:{orders}:sw:shared");
  assert_in_range(pttl, 55000, 60002);
}

static void token_bucket_refills_over_time(void **state)
{
  void *r = open_store();
  struct gw_limiter_spec spec = tb_spec(2, 5); /* a token every 200 ms */
  void *lim = make_limiter(r, "refill", &spec);
  struct gw_ratelimit_info info;
  assert_int_equal(admit(lim, "k", NULL), 1);
  assert_int_equal(admit(lim, "k", NULL), 1);
  assert_int_equal(admit(lim, "k", &info), 0);
  assert_int_equal(info.retry_after_s, 1);
  assert_int_equal(info.remaining, 0);
  sleep_ms(230);
  assert_int_equal(admit(lim, "k", NULL), 1);
  assert_int_equal(admit(lim, "k", NULL), 0);
  sleep_ms(500); /* 2.5 tokens accrue, capped at 2 */
  assert_int_equal(admit(lim, "k", &info), 1);
  assert_int_equal(info.remaining, 1);
  assert_int_equal(admit(lim, "k", NULL), 1);
  assert_int_equal(admit(lim, "k", NULL), 0);
  /* The idle key vanishes once it would be full again (400 ms + a margin). */
  sleep_ms(600);
  assert_int_equal(raw_int("EXISTS gw:{refill}:tb:k"), 0);
  gw_store_redis.limiter_destroy(lim);
  gw_store_redis_close(r);
}

static void sliding_window_frees_slots_as_admissions_age(void **state)
{
  void *r = open_store();
  struct gw_limiter_spec spec = sw_spec(3, 1000);
  void *lim = make_limiter(r, "slide", &spec);
  for (int i = 0; i < 3; i++)
    assert_int_equal(admit(lim, "k", NULL), 1);
  assert_int_equal(admit(lim, "k", NULL), 0);
  sleep_ms(1050);
  for (int i = 0; i < 3; i++)
    assert_int_equal(admit(lim, "k", NULL), 1);
  assert_int_equal(admit(lim, "k", NULL), 0);
  gw_store_redis.limiter_destroy(lim);
  gw_store_redis_close(r);
}

static void assert_info_equal(const struct gw_ratelimit_info *a, const struct gw_ratelimit_info *b)
{
  assert_int_equal(a->limit, b->limit);
  assert_int_equal(a->window_s, b->window_s);
  assert_int_equal(a->remaining, b->remaining);
  assert_int_equal(a->reset_s, b->reset_s);
  assert_int_equal(a->next_s, b->next_s);
  assert_int_equal(a->retry_after_s, b->retry_after_s);
}

/* The same decisions and header numbers as the memory store, a few microseconds apart. */
static void ratelimit_info_matches_the_memory_store(void **state)
{
  void *r = open_store();
  struct gw_limiter_spec specs[3] = {tb_spec(3, 2), tb_spec(5, 3), sw_spec(3, 10000)};
  for (int s = 0; s < 3; s++) {
    void *lim = make_limiter(r, "info", &specs[s]);
    void *mem = NULL;
    assert_int_equal(gw_store_memory.limiter_create(NULL, &specs[s], &mem), 0);
    char key[8];
    snprintf(key, sizeof(key), "k%d", s);
    for (int i = 0; i < 7; i++) {
      struct gw_ratelimit_info a, b;
      int got = admit(lim, key, &a);
      bool want = gw_store_memory.limiter_admit(mem, key, strlen(key),
                                                UINT64_C(1000000000000) + (uint64_t)i * 1000, &b,
                                                NULL);
      assert_int_equal(got, want);
      assert_info_equal(&a, &b);
    }
    struct gw_ratelimit_info p;
    gw_store_redis.limiter_peek(lim, key, strlen(key), 0, &p);
    assert_int_equal(p.limit, s == 1 ? 5 : 3);
    assert_int_equal(p.remaining, 0);
    assert_int_equal(p.retry_after_s, 0);
    assert_true(p.reset_s > 0);
    gw_store_redis.limiter_peek(lim, "never", 5, 0, &p);
    assert_int_equal(p.remaining, p.limit);
    gw_store_memory.limiter_destroy(mem);
    gw_store_redis.limiter_destroy(lim);
  }
  gw_store_redis_close(r);
}

static void long_limiter_keys_are_hashed_and_the_route_key_is_shared(void **state)
{
  void *r = open_store();
  struct gw_limiter_spec spec = tb_spec(1, 1);
  void *lim = make_limiter(r, "keys", &spec);
  char big[300];
  memset(big, 'x', sizeof(big) - 1);
  big[sizeof(big) - 1] = '\0';
  assert_int_equal(admit(lim, big, NULL), 1);
  assert_int_equal(admit(lim, big, NULL), 0);
  big[5] = 'y';
  assert_int_equal(admit(lim, big, NULL), 1); /* a different key */
  assert_int_equal(admit(lim, "", NULL), 1);
  assert_int_equal(admit(lim, "", NULL), 0);
  assert_int_equal(raw_int("EXISTS gw:{keys}:tb:"), 1);
  char out[256];
  assert_int_equal(raw_cmd("KEYS gw:{keys}:tb#*", out, sizeof(out)), 0);
  assert_string_equal(out, "*2\r\n");
  /* A limiter needs a scope naming its route. */
  void *bad = NULL;
  assert_int_equal(gw_store_redis.limiter_create(r, &spec, &bad), GW_POLICY_EINVALID_CONFIG);
  gw_store_redis.limiter_destroy(lim);
  gw_store_redis_close(r);
}

/* ---- idempotency ---- */

struct copied {
  int status;
  char headers[256];
  size_t headers_len;
  char body[4096];
  size_t body_len;
};

static int copy_resp(void *ctx, const struct gw_idem_response *resp)
{
  struct copied *c = ctx;
  c->status = resp->status;
  c->headers_len = resp->headers_len;
  memcpy(c->headers, resp->headers, resp->headers_len);
  c->body_len = resp->body_len;
  memcpy(c->body, resp->body, resp->body_len);
  return 0;
}

static int begin(void *st, const char *key, const struct gw_idem_fingerprint *fp,
                 enum gw_idem_decision *d, struct gw_idem_claim *claim, struct copied *c)
{
  struct wait_op w;
  wait_init(&w);
  int rc = gw_store_redis.idem_begin_async(st, "pay", 3, key, strlen(key), fp, 0, copy_resp, c,
                                           &w.op);
  if (rc == 0) {
    wait_for(&w);
    rc = w.op.err;
    *d = w.op.decision;
    *claim = w.op.claim;
  }
  wait_fini(&w);
  return rc;
}

static int finish(void *st, const struct gw_idem_claim *claim, enum gw_idem_origin origin,
                  const struct gw_idem_response *resp)
{
  struct wait_op w;
  wait_init(&w);
  int rc = gw_store_redis.idem_finish_async(st, claim, origin, resp, 0, &w.op);
  if (rc == 0) {
    wait_for(&w);
    rc = w.op.err;
    assert_int_equal(w.calls, 1);
  }
  wait_fini(&w);
  return rc;
}

static void *make_idem(void *r, uint64_t ttl_ms)
{
  struct gw_idem_config cfg = {.max_records = 1000, .max_bytes = 1 << 20, .ttl_ms = ttl_ms};
  void *st = NULL;
  assert_int_equal(gw_store_redis.idem_create(r, &cfg, &st), 0);
  return st;
}

static void idempotency_executes_then_conflicts_then_replays_bytes(void **state)
{
  void *r = open_store();
  void *st = make_idem(r, 60000);
  struct gw_idem_fingerprint fp = {1, 2}, other = {1, 3};
  enum gw_idem_decision d;
  struct gw_idem_claim claim, c2;
  struct copied got;
  memset(&got, 0, sizeof(got));
  assert_int_equal(begin(st, "k1", &fp, &d, &claim, &got), 0);
  assert_int_equal(d, GW_IDEM_EXECUTE);
  long pttl = raw_int("PTTL gw:{pay}:idem:k1");
  assert_in_range(pttl, 3500000, 3600000); /* the safety bound while in flight */
  assert_int_equal(begin(st, "k1", &fp, &d, &c2, &got), 0);
  assert_int_equal(d, GW_IDEM_IN_FLIGHT);
  assert_int_equal(begin(st, "k1", &other, &d, &c2, &got), 0);
  assert_int_equal(d, GW_IDEM_MISMATCH);
  struct gw_idem_stats s;
  gw_store_redis.idem_stats(st, &s);
  assert_int_equal(s.in_flight, 1);

  char body[3000];
  for (size_t i = 0; i < sizeof(body); i++)
    body[i] = (char)(i * 7); /* NUL bytes and high bytes included */
  const char headers[] = "Content-Type: application/octet-stream\r\nX-A: \0b\r\n";
  struct gw_idem_response resp = {.status = 201,
                                  .headers = headers,
                                  .headers_len = sizeof(headers) - 1,
                                  .body = body,
                                  .body_len = sizeof(body)};
  assert_int_equal(finish(st, &claim, GW_IDEM_FROM_UPSTREAM, &resp), 0);
  pttl = raw_int("PTTL gw:{pay}:idem:k1");
  assert_in_range(pttl, 59000, 60000);
  /* A second finish of the same claim is stale. */
  assert_int_equal(gw_store_redis.idem_finish_async(st, &claim, GW_IDEM_FROM_UPSTREAM, &resp, 0,
                                                    NULL),
                   GW_POLICY_ESTALE);

  /* Another node replays it byte for byte. */
  void *r2 = open_store();
  void *st2 = make_idem(r2, 60000);
  assert_int_equal(begin(st2, "k1", &fp, &d, &c2, &got), 0);
  assert_int_equal(d, GW_IDEM_REPLAY);
  assert_int_equal(got.status, 201);
  assert_int_equal(got.headers_len, sizeof(headers) - 1);
  assert_memory_equal(got.headers, headers, sizeof(headers) - 1);
  assert_int_equal(got.body_len, sizeof(body));
  assert_memory_equal(got.body, body, sizeof(body));
  assert_int_equal(begin(st2, "k1", &other, &d, &c2, &got), 0);
  assert_int_equal(d, GW_IDEM_MISMATCH);
  gw_store_redis.idem_stats(st2, &s);
  assert_int_equal(s.replays, 1);

  /* An empty response replays too. */
  assert_int_equal(begin(st, "k-empty", &fp, &d, &claim, &got), 0);
  assert_int_equal(d, GW_IDEM_EXECUTE);
  struct gw_idem_response empty = {.status = 504, .headers = "", .body = ""};
  assert_int_equal(finish(st, &claim, GW_IDEM_UPSTREAM_TIMEOUT, &empty), 0);
  memset(&got, 0xff, sizeof(got));
  assert_int_equal(begin(st2, "k-empty", &fp, &d, &c2, &got), 0);
  assert_int_equal(d, GW_IDEM_REPLAY);
  assert_int_equal(got.status, 504);
  assert_int_equal(got.headers_len, 0);
  assert_int_equal(got.body_len, 0);

  gw_store_redis.idem_destroy(st2);
  gw_store_redis_close(r2);
  gw_store_redis.idem_destroy(st);
  gw_store_redis_close(r);
}

static void idempotency_release_lets_a_retry_execute(void **state)
{
  void *r = open_store();
  void *st = make_idem(r, 60000);
  struct gw_idem_fingerprint fp = {5, 6};
  enum gw_idem_decision d;
  struct gw_idem_claim claim;
  struct copied got;
  assert_int_equal(begin(st, "k2", &fp, &d, &claim, &got), 0);
  assert_int_equal(d, GW_IDEM_EXECUTE);
  struct gw_idem_response resp = {.status = 429, .headers = "", .body = "no"};
  assert_int_equal(finish(st, &claim, GW_IDEM_NOT_SENT, &resp), 0);
  assert_int_equal(raw_int("EXISTS gw:{pay}:idem:k2"), 0);
  assert_int_equal(begin(st, "k2", &fp, &d, &claim, &got), 0);
  assert_int_equal(d, GW_IDEM_EXECUTE);
  /* A response over max_bytes is not kept: the claim is released. */
  struct gw_idem_config cfg = {.max_records = 10, .max_bytes = 4096, .ttl_ms = 1000};
  void *small = NULL;
  assert_int_equal(gw_store_redis.idem_create(r, &cfg, &small), 0);
  assert_int_equal(begin(small, "k3", &fp, &d, &claim, &got), 0);
  assert_int_equal(d, GW_IDEM_EXECUTE);
  static char huge[8192];
  struct gw_idem_response big = {.status = 200, .headers = "", .body = huge,
                                 .body_len = sizeof(huge)};
  assert_int_equal(gw_store_redis.idem_finish_async(small, &claim, GW_IDEM_FROM_UPSTREAM, &big, 0,
                                                    NULL),
                   GW_POLICY_ETOO_LARGE);
  for (int i = 0; i < 100 && raw_int("EXISTS gw:{pay}:idem:k3") != 0; i++)
    sleep_ms(5);
  assert_int_equal(raw_int("EXISTS gw:{pay}:idem:k3"), 0);
  gw_store_redis.idem_destroy(small);
  gw_store_redis.idem_destroy(st);
  gw_store_redis_close(r);
}

static void idempotency_record_expires_ttl_after_completion(void **state)
{
  void *r = open_store();
  void *st = make_idem(r, 500);
  struct gw_idem_fingerprint fp = {7, 8};
  enum gw_idem_decision d;
  struct gw_idem_claim claim;
  struct copied got;
  assert_int_equal(begin(st, "k4", &fp, &d, &claim, &got), 0);
  assert_int_equal(d, GW_IDEM_EXECUTE);
  sleep_ms(600); /* in flight longer than ttl_ms: the claim holds */
  assert_int_equal(begin(st, "k4", &fp, &d, &claim, &got), 0);
  assert_int_equal(d, GW_IDEM_IN_FLIGHT);
  struct gw_idem_claim mine;
  assert_int_equal(begin(st, "k4b", &fp, &d, &mine, &got), 0);
  struct gw_idem_response resp = {.status = 200, .headers = "", .body = "ok", .body_len = 2};
  assert_int_equal(finish(st, &mine, GW_IDEM_FROM_UPSTREAM, &resp), 0);
  assert_int_equal(begin(st, "k4b", &fp, &d, &claim, &got), 0);
  assert_int_equal(d, GW_IDEM_REPLAY);
  sleep_ms(600);
  assert_int_equal(begin(st, "k4b", &fp, &d, &claim, &got), 0);
  assert_int_equal(d, GW_IDEM_EXECUTE);
  gw_store_redis.idem_destroy(st);
  gw_store_redis_close(r);
}

struct racer {
  struct wait_op w;
  struct copied c;
};

static void idempotency_fifty_racing_begins_execute_once(void **state)
{
  void *n1 = open_store(), *n2 = open_store();
  void *s1 = make_idem(n1, 60000), *s2 = make_idem(n2, 60000);
  struct gw_idem_fingerprint fp = {9, 9};
  static struct racer rc[50];
  for (int i = 0; i < 50; i++)
    wait_init(&rc[i].w);
  for (int i = 0; i < 50; i++)
    assert_int_equal(gw_store_redis.idem_begin_async(i % 2 ? s2 : s1, "pay", 3, "race", 4, &fp, 0,
                                                     copy_resp, &rc[i].c, &rc[i].w.op),
                     0);
  int exec = 0, in_flight = 0;
  for (int i = 0; i < 50; i++) {
    wait_for(&rc[i].w);
    assert_int_equal(rc[i].w.op.err, 0);
    assert_int_equal(rc[i].w.calls, 1);
    if (rc[i].w.op.decision == GW_IDEM_EXECUTE)
      exec++;
    else if (rc[i].w.op.decision == GW_IDEM_IN_FLIGHT)
      in_flight++;
    wait_fini(&rc[i].w);
  }
  assert_int_equal(exec, 1);
  assert_int_equal(in_flight, 49);
  gw_store_redis.idem_destroy(s1);
  gw_store_redis.idem_destroy(s2);
  gw_store_redis_close(n1);
  gw_store_redis_close(n2);
}

/* ---- failures ---- */

static void wait_connected(void *r);

#define BURST 200

/* Starts BURST admissions; returns how many were refused at once. */
static int start_burst(void *lim, struct wait_op *w)
{
  int refused = 0;
  for (int i = 0; i < BURST; i++) {
    wait_init(&w[i]);
    int rc = gw_store_redis.limiter_admit_async(lim, "k", 1, 0, &w[i].op);
    if (rc) {
      assert_true(rc == GW_STORE_REDIS_EDOWN || rc == GW_STORE_REDIS_EBUSY);
      w[i].done = true;
      w[i].calls = 1;
      w[i].op.err = rc;
      w[i].t1 = w[i].t0;
      refused++;
    }
  }
  return refused;
}

/* Every operation completes once, none later than timeout_ms (plus scheduling slack). */
static int end_burst(struct wait_op *w)
{
  int failed = 0;
  for (int i = 0; i < BURST; i++) {
    wait_for(&w[i]);
    assert_int_equal(w[i].calls, 1);
    assert_true(w[i].t1 - w[i].t0 <= (TIMEOUT_MS + SLACK_MS) * MS);
    if (w[i].op.err)
      failed++;
    wait_fini(&w[i]);
  }
  return failed;
}

static void wait_connected(void *r)
{
  for (int i = 0; i < 400 && !gw_store_redis_connected(r); i++)
    sleep_ms(10);
  assert_true(gw_store_redis_connected(r));
}

/* SCRIPT FLUSH: NOSCRIPT answers are sent again with EVAL. A killed connection (the data stays):
 * a finish that could not be sent releases its claim once reconnected. */
static void script_flush_and_killed_connection_are_survived(void **state)
{
  void *r = open_store();
  struct gw_limiter_spec spec = tb_spec(100, 1);
  void *lim = make_limiter(r, "flush", &spec);
  assert_int_equal(admit(lim, "k", NULL), 1);
  char out[64];
  assert_int_equal(raw_cmd("SCRIPT FLUSH", out, sizeof(out)), 0);
  struct gw_ratelimit_info info;
  assert_int_equal(admit(lim, "k", &info), 1);
  assert_int_equal(info.remaining, 98);
  assert_int_equal(admit(lim, "k", &info), 1);
  assert_int_equal(info.remaining, 97);

  void *st = make_idem(r, 60000);
  struct gw_idem_fingerprint fp = {2, 2};
  enum gw_idem_decision d;
  struct gw_idem_claim claim;
  struct copied got;
  assert_int_equal(begin(st, "kk", &fp, &d, &claim, &got), 0);
  assert_int_equal(d, GW_IDEM_EXECUTE);
  assert_int_equal(raw_cmd("CLIENT KILL TYPE normal", out, sizeof(out)), 0);
  for (int i = 0; i < 2000 && gw_store_redis_connected(r); i++)
    usleep(100);
  struct gw_idem_response resp = {.status = 200, .headers = "", .body = "x", .body_len = 1};
  int rc = finish(st, &claim, GW_IDEM_FROM_UPSTREAM, &resp);
  wait_connected(r);
  print_message("finish across the killed connection: %s\n",
                rc ? "failed, the claim is released after reconnecting" : "stored");
  if (rc == GW_STORE_REDIS_EDOWN) {
    for (int i = 0; i < 200 && raw_int("EXISTS gw:{pay}:idem:kk") != 0; i++)
      sleep_ms(5);
    assert_int_equal(raw_int("EXISTS gw:{pay}:idem:kk"), 0);
    assert_int_equal(begin(st, "kk", &fp, &d, &claim, &got), 0);
    assert_int_equal(d, GW_IDEM_EXECUTE);
  } else {
    assert_int_equal(rc, 0); /* reconnected first: stored */
    assert_int_equal(begin(st, "kk", &fp, &d, &claim, &got), 0);
    assert_int_equal(d, GW_IDEM_REPLAY);
  }
  gw_store_redis.idem_destroy(st);
  gw_store_redis.limiter_destroy(lim);
  gw_store_redis_close(r);
}

static void killed_redis_fails_fast_and_restart_reconnects(void **state)
{
  void *r = open_store();
  struct gw_limiter_spec spec = tb_spec(1000000, 1000);
  void *lim = make_limiter(r, "kill", &spec);
  static struct wait_op w[BURST];
  start_burst(lim, w);
  server_kill(); /* mid-run */
  end_burst(w);
  /* Down: refused at once, or failed through done within the timeout. */
  for (int round = 0; round < 3; round++) {
    uint64_t t0 = mono_ns();
    start_burst(lim, w);
    assert_int_equal(end_burst(w), BURST);
    assert_true(mono_ns() - t0 < (TIMEOUT_MS + SLACK_MS) * MS);
  }
  assert_false(gw_store_redis_connected(r));
  char err[160];
  gw_store_redis_last_error(r, err, sizeof(err));
  print_message("last error: %s\n", err);
  assert_true(strstr(err, "redis") != NULL);
  /* A claim whose finish could not be stored is released once Redis is back. */
  server_start();
  wait_connected(r);
  void *st = make_idem(r, 60000);
  struct gw_idem_fingerprint fp = {3, 3};
  enum gw_idem_decision d;
  struct gw_idem_claim claim;
  struct copied got;
  assert_int_equal(begin(st, "kr", &fp, &d, &claim, &got), 0);
  assert_int_equal(d, GW_IDEM_EXECUTE);
  assert_int_equal(admit(lim, "k", NULL), 1);
  server_kill();
  for (int i = 0; i < 200 && gw_store_redis_connected(r); i++)
    sleep_ms(5);
  struct gw_idem_response resp = {.status = 200, .headers = "", .body = "x", .body_len = 1};
  int rc = finish(st, &claim, GW_IDEM_FROM_UPSTREAM, &resp);
  assert_true(rc == GW_STORE_REDIS_EDOWN);
  server_start();
  wait_connected(r);
  for (int i = 0; i < 100; i++) {
    if (admit(lim, "k", NULL) == 1)
      break;
    sleep_ms(10);
  }
  assert_int_equal(admit(lim, "k", NULL), 1);
  struct gw_store_redis_stats s;
  gw_store_redis_stats(r, &s);
  assert_true(s.connects >= 2);
  assert_true(s.failed > 0);
  assert_int_equal(s.outstanding, 0);
  gw_store_redis.idem_destroy(st);
  gw_store_redis.limiter_destroy(lim);
  gw_store_redis_close(r);
}

static void stopped_redis_times_out_and_recovers(void **state)
{
  void *r = open_store();
  struct gw_limiter_spec spec = tb_spec(1000000, 1000);
  void *lim = make_limiter(r, "stop", &spec);
  void *st = make_idem(r, 60000);
  assert_int_equal(admit(lim, "k", NULL), 1);
  kill(server, SIGSTOP);
  struct gw_idem_fingerprint fp = {4, 4};
  enum gw_idem_decision d;
  struct gw_idem_claim claim;
  struct copied got;
  uint64_t t0 = mono_ns();
  /* The begin may reach Redis, which will claim the key once it runs again. */
  assert_int_equal(begin(st, "ks", &fp, &d, &claim, &got), GW_STORE_REDIS_ETIMEDOUT);
  assert_true(mono_ns() - t0 < (TIMEOUT_MS + SLACK_MS) * MS);
  static struct wait_op w[BURST];
  start_burst(lim, w);
  assert_int_equal(end_burst(w), BURST);
  kill(server, SIGCONT);
  wait_connected(r);
  for (int i = 0; i < 100 && admit(lim, "k", NULL) != 1; i++)
    sleep_ms(10);
  assert_int_equal(admit(lim, "k", NULL), 1);
  /* The begin that timed out had its claim released: a retry executes. */
  for (int i = 0; i < 100 && raw_int("EXISTS gw:{pay}:idem:ks") != 0; i++)
    sleep_ms(10);
  assert_int_equal(begin(st, "ks", &fp, &d, &claim, &got), 0);
  assert_int_equal(d, GW_IDEM_EXECUTE);
  gw_store_redis.idem_destroy(st);
  gw_store_redis.limiter_destroy(lim);
  gw_store_redis_close(r);
}

static void open_rejects_bad_urls_and_succeeds_while_down(void **state)
{
  void *r = NULL;
  char err[128];
  assert_int_equal(gw_store_redis_open("http://x", 100, &r, err, sizeof(err)),
                   GW_STORE_REDIS_EURL);
  assert_true(err[0] != '\0');
  assert_int_equal(gw_store_redis_open("redis://h:99999", 100, &r, err, sizeof(err)),
                   GW_STORE_REDIS_EURL);
  assert_int_equal(gw_store_redis_open("redis://h:1/x", 100, &r, err, sizeof(err)),
                   GW_STORE_REDIS_EURL);
  assert_int_equal(gw_store_redis_open("redis://h:1", 0, &r, err, sizeof(err)),
                   GW_POLICY_EINVALID_CONFIG);
  int dead = free_port();
  char u[64];
  snprintf(u, sizeof(u), "redis://127.0.0.1:%d", dead);
  uint64_t t0 = mono_ns();
  assert_int_equal(gw_store_redis_open(u, 100, &r, err, sizeof(err)), 0);
  assert_true(mono_ns() - t0 < 200 * MS);
  assert_false(gw_store_redis_connected(r));
  struct gw_limiter_spec spec = tb_spec(1, 1);
  void *lim = make_limiter(r, "down", &spec);
  struct wait_op w;
  wait_init(&w);
  assert_int_equal(gw_store_redis.limiter_admit_async(lim, "k", 1, 0, &w.op), GW_STORE_REDIS_EDOWN);
  assert_int_equal(w.calls, 0); /* refused at once: done is never called */
  wait_fini(&w);
  struct gw_store_op bare;
  memset(&bare, 0, sizeof(bare));
  assert_int_equal(gw_store_redis.limiter_admit_async(lim, "k", 1, 0, &bare),
                   GW_POLICY_EINVALID_CONFIG);
  gw_store_redis.limiter_destroy(lim);
  gw_store_redis_close(r);
  assert_string_equal(gw_store_redis_strerror(GW_STORE_REDIS_ETIMEDOUT),
                      "the Redis store did not answer in time");
}

struct chaos {
  void *lim, *st;
  int id;
  atomic_bool *stop;
  int ops, errors, late;
};

static void *chaos_main(void *arg)
{
  struct chaos *c = arg;
  unsigned seed = (unsigned)c->id * 7919u + 1;
  while (!atomic_load(c->stop)) {
    char key[16];
    snprintf(key, sizeof(key), "c%d", rand_r(&seed) % 50);
    struct wait_op w;
    wait_init(&w);
    int rc;
    if (rand_r(&seed) % 2) {
      rc = gw_store_redis.limiter_admit_async(c->lim, key, strlen(key), 0, &w.op);
    } else {
      struct gw_idem_fingerprint fp = {1, (uint64_t)c->id};
      struct copied got;
      rc = gw_store_redis.idem_begin_async(c->st, "chaos", 5, key, strlen(key), &fp, 0, copy_resp,
                                           &got, &w.op);
      if (rc == 0) {
        wait_for(&w);
        if (!w.op.err && w.op.decision == GW_IDEM_EXECUTE) {
          struct gw_idem_response resp = {.status = 200, .headers = "h", .headers_len = 1,
                                          .body = "b", .body_len = 1};
          enum gw_idem_origin o = rand_r(&seed) % 2 ? GW_IDEM_FROM_UPSTREAM : GW_IDEM_NOT_SENT;
          gw_store_redis.idem_finish_async(c->st, &w.op.claim, o, &resp, 0, NULL);
        }
      }
    }
    if (rc < 0) { /* refused at once while down: done is never called */
      assert_int_equal(w.calls, 0);
      c->errors++;
      sleep_ms(1);
    } else {
      wait_for(&w);
      assert_int_equal(w.calls, 1);
      if (w.t1 - w.t0 > (TIMEOUT_MS + SLACK_MS) * MS)
        c->late++;
      if (w.op.err)
        c->errors++;
    }
    c->ops++;
    wait_fini(&w);
  }
  return NULL;
}

/* Mixed operations from four threads while Redis is killed, restarted, stopped and resumed:
 * every operation completes once and in time, and the store settles with nothing outstanding. */
static void chaos_kills_and_stops_never_hang_an_operation(void **state)
{
  void *r = open_store();
  struct gw_limiter_spec spec = sw_spec(1000000, 1000);
  void *lim = make_limiter(r, "chaos", &spec);
  void *st = make_idem(r, 1000);
  atomic_bool stop = false;
  struct chaos c[4];
  pthread_t t[4];
  for (int i = 0; i < 4; i++) {
    c[i] = (struct chaos){.lim = lim, .st = st, .id = i, .stop = &stop};
    pthread_create(&t[i], NULL, chaos_main, &c[i]);
  }
  sleep_ms(300);
  server_kill();
  sleep_ms(300);
  server_start();
  sleep_ms(300);
  kill(server, SIGSTOP);
  sleep_ms(500);
  kill(server, SIGCONT);
  sleep_ms(300);
  server_kill();
  server_start();
  sleep_ms(300);
  atomic_store(&stop, true);
  int ops = 0, errors = 0;
  for (int i = 0; i < 4; i++) {
    pthread_join(t[i], NULL);
    ops += c[i].ops;
    errors += c[i].errors;
    assert_int_equal(c[i].late, 0);
  }
  print_message("chaos: %d operations, %d failed\n", ops, errors);
  assert_true(errors > 0 && errors < ops);
  wait_connected(r);
  struct gw_store_redis_stats s;
  for (int i = 0; i < 200; i++) {
    gw_store_redis_stats(r, &s);
    if (s.outstanding == 0)
      break;
    sleep_ms(10);
  }
  assert_int_equal(s.outstanding, 0);
  gw_store_redis.idem_destroy(st);
  gw_store_redis.limiter_destroy(lim);
  gw_store_redis_close(r);
}

int main(void)
{
  if (!on_path("redis-server")) {
    printf("redis-server is not installed (apt-get install redis-server): skipping the Redis "
           "store tests\n");
    return 77;
  }
  signal(SIGPIPE, SIG_IGN);
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup(token_bucket_admits_capacity_across_two_nodes, flush),
      cmocka_unit_test_setup(sliding_window_admits_limit_across_two_nodes, flush),
      cmocka_unit_test_setup(token_bucket_refills_over_time, flush),
      cmocka_unit_test_setup(sliding_window_frees_slots_as_admissions_age, flush),
      cmocka_unit_test_setup(ratelimit_info_matches_the_memory_store, flush),
      cmocka_unit_test_setup(long_limiter_keys_are_hashed_and_the_route_key_is_shared, flush),
      cmocka_unit_test_setup(idempotency_executes_then_conflicts_then_replays_bytes, flush),
      cmocka_unit_test_setup(idempotency_release_lets_a_retry_execute, flush),
      cmocka_unit_test_setup(idempotency_record_expires_ttl_after_completion, flush),
      cmocka_unit_test_setup(idempotency_fifty_racing_begins_execute_once, flush),
      cmocka_unit_test_setup(open_rejects_bad_urls_and_succeeds_while_down, flush),
      cmocka_unit_test_setup(script_flush_and_killed_connection_are_survived, flush),
      cmocka_unit_test_setup(stopped_redis_times_out_and_recovers, flush),
      cmocka_unit_test_setup(killed_redis_fails_fast_and_restart_reconnects, flush),
      cmocka_unit_test_setup(chaos_kills_and_stops_never_hang_an_operation, flush),
  };
  return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
