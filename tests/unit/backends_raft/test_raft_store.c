/*
 * test_raft_store.c - the raft store against a real single-node Raft group in this process (a
 * gw_node on a temporary data directory). Several store instances on the one node, each with
 * its own node name, stand for the gateway nodes of a cluster: they share the state machine's
 * budget exactly as separate nodes would, so the cluster-wide bound can be checked here: across
 * all instances, admissions never exceed the limit; the local allotment path serves requests
 * without waiting, and a key without units waits (bounded) for its grant; idle allotments go back; and the idempotency records answer execute, in
 * flight, mismatch and replay across instances.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include "node.h"
#include "raft_store.h"

static struct gw_node *node;
static char dir[256];

static uint64_t now_ns(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void sleep_ms(unsigned ms)
{
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

/* A port the kernel just handed out (closed again: a small race, acceptable in a test). */
static uint16_t free_port(void)
{
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t sl = sizeof(sa);
  uint16_t port = 0;
  if (fd >= 0 && bind(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0 &&
      getsockname(fd, (struct sockaddr *)&sa, &sl) == 0)
    port = ntohs(sa.sin_port);
  if (fd >= 0)
    close(fd);
  return port;
}

static int setup(void **state)
{
  (void)state;
  snprintf(dir, sizeof(dir), "%s/raftstore-XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
  if (!mkdtemp(dir))
    return -1;
  struct gw_node_config c;
  memset(&c, 0, sizeof(c));
  snprintf(c.name, sizeof(c.name), "n1");
  snprintf(c.data_dir, sizeof(c.data_dir), "%s", dir);
  c.election_timeout_ms = 150;
  c.heartbeat_ms = 30;
  c.snapshot_every = 100000;
  c.cluster_id = 7;
  c.peers[0].id = gw_node_id_from_name("n1");
  snprintf(c.peers[0].name, sizeof(c.peers[0].name), "n1");
  snprintf(c.peers[0].api, sizeof(c.peers[0].api), "127.0.0.1:1");
  c.peer_count = 1;
  char err[512];
  if (gw_node_start(&c, &node, err, sizeof(err)) != 0) {
    fprintf(stderr, "%s\n", err);
    return -1;
  }
  for (int i = 0; i < 500; i++) {
    struct gw_node_status st;
    gw_node_status(node, &st);
    if (st.role && strcmp(st.role, "leader") == 0)
      return 0;
    sleep_ms(10);
  }
  return -1;
}

static int teardown(void **state)
{
  (void)state;
  gw_node_stop(node);
  char cmd[300];
  snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
  return system(cmd) == 0 ? 0 : -1;
}

static void *open_store(const char *name)
{
  void *st;
  assert_int_equal(gw_store_raft_open(node, name, &st), 0);
  return st;
}

static void *make_limiter(void *st, const char *route, enum gw_limiter_kind kind, uint64_t a, uint64_t b)
{
  struct gw_limiter_spec spec;
  memset(&spec, 0, sizeof(spec));
  spec.kind = kind;
  spec.max_keys = 64;
  spec.seed.k0 = 1;
  if (kind == GW_LIMITER_TOKEN_BUCKET) {
    spec.tb.capacity = a;
    spec.tb.refill_per_sec = b;
  } else {
    spec.sw.limit = a;
    spec.sw.window_ms = b;
  }
  struct gw_store_raft_scope sc = gw_store_raft_scope(st, route);
  void *lim;
  assert_int_equal(gw_store_raft.limiter_create(&sc, &spec, &lim), 0);
  return lim;
}

static void cold_key_is_refused_then_served_from_the_allotment(void **state)
{
  (void)state;
  void *st = open_store("g1");
  void *lim = make_limiter(st, "cold", GW_LIMITER_TOKEN_BUCKET, 100, 10);
  struct gw_ratelimit_info info;
  assert_false(gw_store_raft.limiter_admit(lim, "k", 1, now_ns(), &info, NULL));
  assert_int_equal(info.retry_after_s, 1);
  int ok = 0;
  for (int i = 0; i < 200 && ok == 0; i++) {
    sleep_ms(5);
    ok += gw_store_raft.limiter_admit(lim, "k", 1, now_ns(), &info, NULL);
  }
  assert_int_equal(ok, 1);
  assert_int_equal(info.limit, 100);
  assert_true(info.remaining >= 90 && info.remaining <= 100);
  struct gw_store_raft_stats s;
  gw_store_raft_stats(st, &s);
  assert_true(s.refills >= 1);
  gw_store_raft.limiter_destroy(lim);
  gw_store_raft_close(st);
}

/* Three instances hammer one key for about a second: never more than the limit in all. */
static void three_nodes_never_exceed_a_token_bucket(void **state)
{
  (void)state;
  void *st[3] = {open_store("a1"), open_store("a2"), open_store("a3")};
  void *lim[3];
  for (int i = 0; i < 3; i++)
    lim[i] = make_limiter(st[i], "tb3", GW_LIMITER_TOKEN_BUCKET, 200, 400);
  uint64_t t0 = now_ns(), admitted = 0, attempts = 0;
  while (now_ns() - t0 < 1000000000ull) {
    for (int i = 0; i < 3; i++) {
      attempts++;
      admitted += gw_store_raft.limiter_admit(lim[i], "", 0, now_ns(), NULL, NULL);
    }
    if (attempts % 300 == 0)
      sleep_ms(1);
  }
  uint64_t el_ms = (now_ns() - t0) / 1000000 + 1;
  uint64_t bound = 200 + 400 * el_ms / 1000;
  fprintf(stderr, "token bucket: %llu admitted of %llu attempts, bound %llu\n",
          (unsigned long long)admitted, (unsigned long long)attempts, (unsigned long long)bound);
  assert_true(admitted <= bound);
  assert_true(admitted >= bound / 2); /* the allotments keep up */
  for (int i = 0; i < 3; i++) {
    gw_store_raft.limiter_destroy(lim[i]);
    gw_store_raft_close(st[i]);
  }
}

static void three_nodes_never_exceed_a_sliding_window(void **state)
{
  (void)state;
  void *st[3] = {open_store("b1"), open_store("b2"), open_store("b3")};
  void *lim[3];
  for (int i = 0; i < 3; i++)
    lim[i] = make_limiter(st[i], "sw3", GW_LIMITER_SLIDING_WINDOW, 150, 2000);
  uint64_t t0 = now_ns(), admitted = 0;
  while (now_ns() - t0 < 1500000000ull) {
    for (int i = 0; i < 3; i++)
      admitted += gw_store_raft.limiter_admit(lim[i], "ip", 2, now_ns(), NULL, NULL);
    sleep_ms(1);
  }
  /* any trailing 2 s window: all of them, since the run is shorter */
  fprintf(stderr, "sliding window: %llu admitted (limit 150 per 2 s)\n", (unsigned long long)admitted);
  assert_true(admitted <= 150);
  assert_true(admitted >= 100);
  for (int i = 0; i < 3; i++) {
    gw_store_raft.limiter_destroy(lim[i]);
    gw_store_raft_close(st[i]);
  }
}

static void idle_allotment_goes_back_to_the_cluster(void **state)
{
  (void)state;
  void *a = open_store("c1"), *b = open_store("c2");
  void *la = make_limiter(a, "idle", GW_LIMITER_TOKEN_BUCKET, 40, 1);
  void *lb = make_limiter(b, "idle", GW_LIMITER_TOKEN_BUCKET, 40, 1);
  /* a takes a few batches, then goes idle holding part of them */
  int got = 0;
  for (int i = 0; i < 100 && got < 12; i++) {
    got += gw_store_raft.limiter_admit(la, "", 0, now_ns(), NULL, NULL);
    sleep_ms(1);
  }
  assert_int_equal(got, 12);
  sleep_ms(600); /* idle: what a holds goes back (its first request was refused, so the
                  * store kept an allotment ready for a retry; the retry came, so no longer) */
  struct gw_store_raft_stats s;
  gw_store_raft_stats(a, &s);
  fprintf(stderr, "idle: a admitted %d, released %llu units in %llu releases\n", got,
          (unsigned long long)s.release_units, (unsigned long long)s.releases);
  assert_true(s.release_units > 0);
  int got_b = 0;
  for (int i = 0; i < 600; i++) {
    got_b += gw_store_raft.limiter_admit(lb, "", 0, now_ns(), NULL, NULL);
    sleep_ms(1);
  }
  fprintf(stderr, "idle: then b admitted %d\n", got_b);
  assert_true(got + got_b <= 40 + 3); /* refill 1/s over at most 2 s */
  assert_true(got_b >= 20);
  gw_store_raft.limiter_destroy(la);
  gw_store_raft.limiter_destroy(lb);
  gw_store_raft_close(a);
  gw_store_raft_close(b);
}

/* ---- Idempotency ---------------------------------------------------------------------------- */

struct waiter {
  struct gw_store_op op;
  atomic_int done;
  char copied[64];
  int copied_status;
};

static void on_done(struct gw_store_op *op)
{
  struct waiter *w = op->ctx;
  atomic_store(&w->done, 1);
}

static int copy_fn(void *ctx, const struct gw_idem_response *r)
{
  struct waiter *w = ctx;
  w->copied_status = r->status;
  snprintf(w->copied, sizeof(w->copied), "%.*s|%.*s", (int)r->headers_len, (const char *)r->headers,
           (int)r->body_len, (const char *)r->body);
  return 0;
}

static void wait_op(struct waiter *w)
{
  for (int i = 0; i < 5000 && !atomic_load(&w->done); i++)
    sleep_ms(1);
  assert_true(atomic_load(&w->done));
}

static void begin(void *idem, const char *key, uint64_t fp, struct waiter *w)
{
  memset(w, 0, sizeof(*w));
  w->op.done = on_done;
  w->op.ctx = w;
  struct gw_idem_fingerprint f = {fp, fp + 1};
  assert_int_equal(gw_store_raft.idem_begin_async(idem, "orders", 6, key, strlen(key), &f, now_ns(),
                                                  copy_fn, w, &w->op),
                   0);
  wait_op(w);
}

static void idempotency_across_nodes(void **state)
{
  (void)state;
  void *a = open_store("d1"), *b = open_store("d2");
  struct gw_idem_config cfg = {.max_records = 1000, .max_bytes = 1 << 20, .ttl_ms = 60000};
  void *ia, *ib;
  assert_int_equal(gw_store_raft.idem_create(a, &cfg, &ia), 0);
  assert_int_equal(gw_store_raft.idem_create(b, &cfg, &ib), 0);
  struct waiter w;
  begin(ia, "key-1", 10, &w);
  assert_int_equal(w.op.err, 0);
  assert_int_equal(w.op.decision, GW_IDEM_EXECUTE);
  struct gw_idem_claim claim = w.op.claim;
  begin(ib, "key-1", 10, &w);
  assert_int_equal(w.op.decision, GW_IDEM_IN_FLIGHT);
  begin(ib, "key-1", 11, &w);
  assert_int_equal(w.op.decision, GW_IDEM_MISMATCH);
  /* a claim this instance does not hold */
  struct gw_idem_response resp = {.status = 201, .headers = "X-A: 1", .headers_len = 6, .body = "made",
                                  .body_len = 4};
  assert_int_equal(gw_store_raft.idem_finish_async(ib, &claim, GW_IDEM_FROM_UPSTREAM, &resp, now_ns(), NULL),
                   GW_POLICY_ESTALE);
  memset(&w, 0, sizeof(w));
  w.op.done = on_done;
  w.op.ctx = &w;
  assert_int_equal(gw_store_raft.idem_finish_async(ia, &claim, GW_IDEM_FROM_UPSTREAM, &resp, now_ns(), &w.op), 0);
  wait_op(&w);
  assert_int_equal(w.op.err, 0);
  begin(ib, "key-1", 10, &w);
  assert_int_equal(w.op.err, 0);
  assert_int_equal(w.op.decision, GW_IDEM_REPLAY);
  assert_int_equal(w.copied_status, 201);
  assert_string_equal(w.copied, "X-A: 1|made");
  /* not sent: released, so the key can be claimed again */
  begin(ia, "key-2", 1, &w);
  assert_int_equal(w.op.decision, GW_IDEM_EXECUTE);
  claim = w.op.claim;
  assert_int_equal(gw_store_raft.idem_finish_async(ia, &claim, GW_IDEM_NOT_SENT, NULL, now_ns(), NULL), 0);
  for (int i = 0; i < 100; i++) {
    begin(ib, "key-2", 1, &w);
    if (w.op.decision == GW_IDEM_EXECUTE)
      break;
    sleep_ms(5);
  }
  assert_int_equal(w.op.decision, GW_IDEM_EXECUTE);
  /* a response that cannot fit one log entry: released, reported too large */
  claim = w.op.claim;
  size_t big = 1u << 20;
  char *body = calloc(1, big);
  struct gw_idem_response bigr = {.status = 200, .headers = "", .body = body, .body_len = big};
  memset(&w, 0, sizeof(w));
  w.op.done = on_done;
  w.op.ctx = &w;
  assert_int_equal(gw_store_raft.idem_finish_async(ib, &claim, GW_IDEM_FROM_UPSTREAM, &bigr, now_ns(), &w.op), 0);
  free(body);
  wait_op(&w);
  assert_int_equal(w.op.err, GW_POLICY_ETOO_LARGE);
  begin(ia, "key-2", 1, &w);
  assert_int_equal(w.op.decision, GW_IDEM_EXECUTE);
  struct gw_idem_stats is;
  gw_store_raft.idem_stats(ia, &is);
  assert_int_equal(is.in_flight, 1);
  gw_store_raft.idem_stats(ib, &is);
  assert_int_equal(is.in_flight, 0);
  assert_int_equal(is.replays, 1);
  claim = w.op.claim;
  assert_int_equal(gw_store_raft.idem_finish_async(ia, &claim, GW_IDEM_NOT_SENT, NULL, now_ns(), NULL), 0);
  gw_store_raft.idem_destroy(ia);
  gw_store_raft.idem_destroy(ib);
  gw_store_raft_close(a);
  gw_store_raft_close(b);
}

/* A node that cannot reach a majority: admissions never wait, nothing is admitted without an
 * allotment, and idempotency answers an error (no leader) instead of a decision. */
/* ---- The asynchronous admit: a key without units waits for its grant ------------------ */

static int admit_async(void *lim, const char *key, struct waiter *w)
{
  memset(w, 0, sizeof(*w));
  w->op.done = on_done;
  w->op.ctx = w;
  int rc = gw_store_raft.limiter_admit_async(lim, key, strlen(key), now_ns(), &w->op);
  if (rc == GW_STORE_DONE)
    atomic_store(&w->done, 1);
  return rc;
}

/* Fifteen requests for a cold key of a window of ten: all wait for grants (asked again when
 * more wait than a grant covers), exactly ten are admitted, the rest refused with nothing left;
 * then a request is refused at once (the cluster said none). A bucket's key with units at hand
 * is decided without waiting. */
static void async_admit_waits_for_a_grant_only_when_it_holds_nothing(void **state)
{
  (void)state;
  void *st = open_store("w1");
  void *lim = make_limiter(st, "wait", GW_LIMITER_SLIDING_WINDOW, 10, 60000); /* batch 1 */
  struct waiter w[15];
  int waited = 0;
  for (int i = 0; i < 15; i++) {
    int rc = admit_async(lim, "k", &w[i]);
    assert_true(rc == 0 || rc == GW_STORE_DONE);
    waited += rc == 0;
  }
  assert_true(waited >= 1);
  int admitted = 0;
  for (int i = 0; i < 15; i++) {
    wait_op(&w[i]);
    assert_int_equal(w[i].op.err, 0);
    admitted += w[i].op.admitted;
    assert_int_equal(w[i].op.info.limit, 10);
    if (!w[i].op.admitted) {
      assert_int_equal(w[i].op.info.remaining, 0);
      assert_true(w[i].op.info.retry_after_s >= 1);
    }
  }
  assert_int_equal(admitted, 10);
  struct waiter late;
  assert_int_equal(admit_async(lim, "k", &late), GW_STORE_DONE);
  assert_false(late.op.admitted);
  struct gw_limiter_stats ls;
  gw_store_raft.limiter_stats(lim, &ls);
  assert_int_equal(ls.admitted, 10);
  assert_int_equal(ls.rejected, 6);

  void *tb = make_limiter(st, "wait", GW_LIMITER_TOKEN_BUCKET, 100, 10); /* batch 12 */
  struct waiter first;
  assert_int_equal(admit_async(tb, "k", &first), 0);
  wait_op(&first);
  assert_true(first.op.admitted);
  for (int i = 0; i < 5; i++) {
    struct waiter x;
    assert_int_equal(admit_async(tb, "k", &x), GW_STORE_DONE);
    assert_true(x.op.admitted);
    assert_true(x.op.info.remaining <= 99);
  }
  gw_store_raft.limiter_destroy(tb);
  gw_store_raft.limiter_destroy(lim);
  gw_store_raft_close(st);
}

/* A store closed under a live limiter: a cold key's acquire cannot go out, and the request is
 * refused by the call itself (GW_STORE_DONE), never by a completion on the caller's stack. */
static void async_admit_on_a_closed_store_answers_at_once(void **state)
{
  (void)state;
  void *st = open_store("x1");
  void *lim = make_limiter(st, "closed", GW_LIMITER_SLIDING_WINDOW, 10, 60000);
  gw_store_raft_close(st); /* the limiter keeps the instance alive; nothing reaches the node */
  struct waiter w;
  memset(&w, 0, sizeof(w));
  w.op.done = on_done;
  w.op.ctx = &w;
  assert_int_equal(gw_store_raft.limiter_admit_async(lim, "k", 1, now_ns(), &w.op), GW_STORE_DONE);
  assert_int_equal(atomic_load(&w.done), 0);
  assert_int_equal(w.op.err, 0);
  assert_false(w.op.admitted);
  assert_true(w.op.info.retry_after_s >= 1);
  gw_store_raft.limiter_destroy(lim);
}

static void cut_off_node_admits_nothing_it_does_not_hold_and_never_waits(void **state)
{
  (void)state;
  char d2[256];
  snprintf(d2, sizeof(d2), "%s/raftstore-XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
  assert_non_null(mkdtemp(d2));
  struct gw_node_config c;
  memset(&c, 0, sizeof(c));
  snprintf(c.name, sizeof(c.name), "m1");
  snprintf(c.data_dir, sizeof(c.data_dir), "%s", d2);
  c.election_timeout_ms = 150;
  c.heartbeat_ms = 30;
  c.snapshot_every = 100000;
  c.cluster_id = 8;
  struct sockaddr_in *sa = (struct sockaddr_in *)&c.raft_listen;
  sa->sin_family = AF_INET;
  sa->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  sa->sin_port = htons(free_port());
  c.raft_listen_len = sizeof(*sa);
  for (int i = 0; i < 2; i++) {
    struct gw_node_peer *p = &c.peers[i];
    snprintf(p->name, sizeof(p->name), "m%d", i + 1);
    p->id = gw_node_id_from_name(p->name);
    memcpy(&p->raft, sa, sizeof(*sa));
    if (i == 1)
      ((struct sockaddr_in *)&p->raft)->sin_port = htons(free_port());
    p->raft_len = sizeof(*sa);
  }
  c.peer_count = 2; /* the second member never answers: no majority */
  char err[512];
  struct gw_node *lonely;
  if (gw_node_start(&c, &lonely, err, sizeof(err)) != 0) {
    fprintf(stderr, "skipped: %s\n", err);
    return;
  }
  void *st;
  assert_int_equal(gw_store_raft_open(lonely, "m1", &st), 0);
  struct gw_store_raft_tuning tn = {.wait_ms = 200};
  gw_store_raft_tune(st, &tn);
  struct gw_limiter_spec spec;
  memset(&spec, 0, sizeof(spec));
  spec.kind = GW_LIMITER_TOKEN_BUCKET;
  spec.tb.capacity = 100;
  spec.tb.refill_per_sec = 100;
  spec.max_keys = 8;
  struct gw_store_raft_scope sc = gw_store_raft_scope(st, "lonely");
  void *lim;
  assert_int_equal(gw_store_raft.limiter_create(&sc, &spec, &lim), 0);
  struct gw_idem_config icfg = {.max_records = 10, .max_bytes = 1 << 20, .ttl_ms = 1000};
  void *idem;
  assert_int_equal(gw_store_raft.idem_create(st, &icfg, &idem), 0);
  struct waiter w;
  memset(&w, 0, sizeof(w));
  w.op.done = on_done;
  w.op.ctx = &w;
  struct gw_idem_fingerprint f = {1, 2};
  assert_int_equal(gw_store_raft.idem_begin_async(idem, "r", 1, "k", 1, &f, now_ns(), copy_fn, &w, &w.op), 0);
  uint64_t worst = 0, admitted = 0;
  uint64_t t0 = now_ns();
  while (now_ns() - t0 < 6000000000ull) {
    uint64_t a = now_ns();
    admitted += gw_store_raft.limiter_admit(lim, "", 0, a, NULL, NULL);
    uint64_t el = now_ns() - a;
    if (el > worst)
      worst = el;
    sleep_ms(2);
  }
  fprintf(stderr, "cut off: admitted %llu, slowest admit %llu us\n", (unsigned long long)admitted,
          (unsigned long long)(worst / 1000));
  assert_int_equal(admitted, 0);
  assert_true(worst < 50000000ull); /* never a wait on Raft (50 ms leaves room for a loaded machine) */
  /* The asynchronous form waits for a grant at most wait_ms (here 200), then refuses. */
  struct waiter aw;
  uint64_t a0 = now_ns();
  int arc = admit_async(lim, "cold", &aw);
  assert_true(arc == 0 || arc == GW_STORE_DONE);
  wait_op(&aw);
  uint64_t waited_ms = (now_ns() - a0) / 1000000;
  fprintf(stderr, "cut off: a cold key waited %llu ms\n", (unsigned long long)waited_ms);
  assert_int_equal(aw.op.err, 0);
  assert_false(aw.op.admitted);
  assert_true(waited_ms < 2000);
  wait_op(&w);
  assert_int_equal(w.op.err, GW_STORE_RAFT_ENO_LEADER);
  struct gw_store_raft_stats s;
  gw_store_raft_stats(st, &s);
  assert_true(s.refill_failures >= 1);
  gw_store_raft.limiter_destroy(lim);
  gw_store_raft.idem_destroy(idem);
  gw_store_raft_close(st);
  gw_node_stop(lonely);
  char cmd[300];
  snprintf(cmd, sizeof(cmd), "rm -rf '%s'", d2);
  assert_int_equal(system(cmd), 0);
}

/* ---- A three-node group: followers forward through the hook ---------------------------- */

struct trio {
  struct gw_node *n[3];
  char api[3][32];
  char dir[3][256];
};

/* One forwarded command: the bytes the command points into, the leader's request, the hook's
 * completion. What the gateway's control plane would do on POST /internal/v1/fsm. */
struct fwd_job {
  struct gw_node_req nr;
  uint8_t *bytes;
  void (*done)(void *arg, int status, const char *body, size_t len);
  void *arg;
};

static void fwd_job_done(struct gw_node_req *nr)
{
  struct fwd_job *j = (struct fwd_job *)nr;
  if (nr->outcome == GW_NODE_OK)
    j->done(j->arg, nr->status, nr->body ? nr->body : "", nr->body ? nr->body_len : 0);
  else
    j->done(j->arg, 503, "{}", 2);
  free(nr->body);
  free(j->bytes);
  free(j);
}

static int fwd_send(void *ctx, const char *leader_api, const uint8_t *cmd, size_t len,
                    void (*done)(void *arg, int status, const char *body, size_t len), void *arg)
{
  struct trio *t = ctx;
  int k = -1;
  for (int i = 0; i < 3; i++)
    if (strcmp(t->api[i], leader_api) == 0)
      k = i;
  if (k < 0)
    return -1;
  struct fwd_job *j = calloc(1, sizeof(*j));
  j->bytes = malloc(len);
  memcpy(j->bytes, cmd, len);
  if (gw_fsm_cmd_decode(j->bytes, len, &j->nr.cmd) != 0) {
    free(j->bytes);
    free(j);
    return -1;
  }
  j->nr.op = GW_NODE_WRITE;
  j->nr.done = fwd_job_done;
  j->done = done;
  j->arg = arg;
  if (gw_node_submit(t->n[k], &j->nr) != 0) {
    free(j->bytes);
    free(j);
    return -1;
  }
  return 0;
}

static bool trio_start(struct trio *t)
{
  memset(t, 0, sizeof(*t));
  struct gw_node_config c;
  memset(&c, 0, sizeof(c));
  c.election_timeout_ms = 150;
  c.heartbeat_ms = 30;
  c.snapshot_every = 100000;
  c.cluster_id = 11;
  c.peer_count = 3;
  for (int i = 0; i < 3; i++) {
    struct gw_node_peer *p = &c.peers[i];
    snprintf(p->name, sizeof(p->name), "t%d", i + 1);
    p->id = gw_node_id_from_name(p->name);
    struct sockaddr_in *sa = (struct sockaddr_in *)&p->raft;
    sa->sin_family = AF_INET;
    sa->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    sa->sin_port = htons(free_port());
    p->raft_len = sizeof(*sa);
    snprintf(t->api[i], sizeof(t->api[i]), "127.0.0.1:%u", (unsigned)(60000 + i)); /* a name only */
    snprintf(p->api, sizeof(p->api), "%s", t->api[i]);
  }
  for (int i = 0; i < 3; i++) {
    snprintf(t->dir[i], sizeof(t->dir[i]), "%s/raftstore-XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (!mkdtemp(t->dir[i]))
      return false;
    snprintf(c.name, sizeof(c.name), "t%d", i + 1);
    snprintf(c.data_dir, sizeof(c.data_dir), "%s", t->dir[i]);
    memcpy(&c.raft_listen, &c.peers[i].raft, sizeof(struct sockaddr_in));
    c.raft_listen_len = sizeof(struct sockaddr_in);
    char err[512];
    if (gw_node_start(&c, &t->n[i], err, sizeof(err)) != 0) {
      fprintf(stderr, "skipped: %s\n", err);
      return false;
    }
  }
  for (int w = 0; w < 1000; w++) {
    struct gw_node_status st;
    gw_node_status(t->n[0], &st);
    if (st.leader[0] != '\0')
      return true;
    sleep_ms(10);
  }
  return false;
}

static void trio_stop(struct trio *t)
{
  for (int i = 0; i < 3; i++) {
    if (t->n[i])
      gw_node_stop(t->n[i]);
    if (t->dir[i][0]) {
      char cmd[300];
      snprintf(cmd, sizeof(cmd), "rm -rf '%s'", t->dir[i]);
      if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", t->dir[i]);
    }
  }
}

static void followers_forward_and_three_real_nodes_share_one_budget(void **state)
{
  (void)state;
  static struct trio t;
  if (!trio_start(&t)) {
    trio_stop(&t);
    skip();
  }
  void *st[3], *lim[3];
  struct gw_store_raft_forward fwd = {fwd_send, &t};
  for (int i = 0; i < 3; i++) {
    char name[8];
    snprintf(name, sizeof(name), "t%d", i + 1);
    assert_int_equal(gw_store_raft_open(t.n[i], name, &st[i]), 0);
    gw_store_raft_set_forward(st[i], &fwd);
    lim[i] = make_limiter(st[i], "trio", GW_LIMITER_TOKEN_BUCKET, 200, 400);
  }
  uint64_t t0 = now_ns(), admitted = 0, per[3] = {0, 0, 0};
  while (now_ns() - t0 < 1500000000ull) {
    for (int i = 0; i < 3; i++) {
      bool ok = gw_store_raft.limiter_admit(lim[i], "", 0, now_ns(), NULL, NULL);
      admitted += ok;
      per[i] += ok;
    }
    sleep_ms(1);
  }
  uint64_t el_ms = (now_ns() - t0) / 1000000 + 1;
  uint64_t bound = 200 + 400 * el_ms / 1000;
  uint64_t forwarded = 0;
  for (int i = 0; i < 3; i++) {
    struct gw_store_raft_stats s;
    gw_store_raft_stats(st[i], &s);
    forwarded += s.forwarded;
  }
  fprintf(stderr, "three nodes: %llu admitted (%llu/%llu/%llu), bound %llu, %llu forwarded\n",
          (unsigned long long)admitted, (unsigned long long)per[0], (unsigned long long)per[1],
          (unsigned long long)per[2], (unsigned long long)bound, (unsigned long long)forwarded);
  assert_true(admitted <= bound);
  assert_true(admitted >= bound / 2);
  assert_true(forwarded > 0);
  for (int i = 0; i < 3; i++)
    assert_true(per[i] > 0); /* followers got allotments through the leader */
  /* idempotency through a follower */
  struct gw_idem_config icfg = {.max_records = 10, .max_bytes = 1 << 20, .ttl_ms = 60000};
  void *ia, *ib;
  assert_int_equal(gw_store_raft.idem_create(st[0], &icfg, &ia), 0);
  assert_int_equal(gw_store_raft.idem_create(st[1], &icfg, &ib), 0);
  struct waiter w;
  begin(ia, "trio-key", 3, &w);
  assert_int_equal(w.op.err, 0);
  assert_int_equal(w.op.decision, GW_IDEM_EXECUTE);
  begin(ib, "trio-key", 3, &w);
  assert_int_equal(w.op.err, 0);
  assert_int_equal(w.op.decision, GW_IDEM_IN_FLIGHT);
  gw_store_raft.idem_destroy(ia);
  gw_store_raft.idem_destroy(ib);
  for (int i = 0; i < 3; i++) {
    gw_store_raft.limiter_destroy(lim[i]);
    gw_store_raft_close(st[i]);
  }
  trio_stop(&t);
}

static void argument_checks_and_error_names(void **state)
{
  (void)state;
  void *p = NULL;
  assert_int_equal(gw_store_raft_open(node, "", &p), GW_POLICY_EINVALID_CONFIG);
  assert_int_equal(gw_store_raft_open(node, "bad\001name", &p), GW_POLICY_EINVALID_CONFIG);
  assert_string_equal(gw_store_raft_strerror(GW_STORE_RAFT_ENO_LEADER), "the raft group has no leader");
  assert_null(gw_store_raft_strerror(-1));
}

int main(void)
{
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(cold_key_is_refused_then_served_from_the_allotment),
      cmocka_unit_test(three_nodes_never_exceed_a_token_bucket),
      cmocka_unit_test(three_nodes_never_exceed_a_sliding_window),
      cmocka_unit_test(idle_allotment_goes_back_to_the_cluster),
      cmocka_unit_test(idempotency_across_nodes),
      cmocka_unit_test(async_admit_waits_for_a_grant_only_when_it_holds_nothing),
      cmocka_unit_test(async_admit_on_a_closed_store_answers_at_once),
      cmocka_unit_test(cut_off_node_admits_nothing_it_does_not_hold_and_never_waits),
      cmocka_unit_test(followers_forward_and_three_real_nodes_share_one_budget),
      cmocka_unit_test(argument_checks_and_error_names),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
