/*
 * quota_bench.c - the cost and the accuracy of quota leasing (backends/raft.c).
 *
 * Starts a single-node Raft group in a temporary directory (fsync on or off) and measures:
 *   1. ns per limiter_admit on the local allotment path, against the memory store's admit
 *      (the same token bucket) on one thread;
 *   2. three store instances (standing for three gateway nodes) hammering one cluster limit
 *      for a few seconds: admitted against the bound, so utilization, with over-admission
 *      counted, and QUOTA_ACQUIRE refills per second.
 * Usage: gw-bench-quota [seconds per run] [sync 0|1]
 */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "node.h"
#include "raft_store.h"

static uint64_t now_ns(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void sleep_us(unsigned us)
{
  struct timespec ts = {us / 1000000, (long)(us % 1000000) * 1000L};
  nanosleep(&ts, NULL);
}

static struct gw_node *start_node(const char *dir, bool sync)
{
  struct gw_node_config c;
  memset(&c, 0, sizeof(c));
  snprintf(c.name, sizeof(c.name), "n1");
  snprintf(c.data_dir, sizeof(c.data_dir), "%s", dir);
  c.sync = sync;
  c.election_timeout_ms = 150;
  c.heartbeat_ms = 30;
  c.snapshot_every = 20000;
  c.cluster_id = 9;
  c.peers[0].id = gw_node_id_from_name("n1");
  snprintf(c.peers[0].name, sizeof(c.peers[0].name), "n1");
  c.peer_count = 1;
  char err[512];
  struct gw_node *n;
  if (gw_node_start(&c, &n, err, sizeof(err)) != 0) {
    fprintf(stderr, "%s\n", err);
    exit(1);
  }
  for (int i = 0; i < 500; i++) {
    struct gw_node_status st;
    gw_node_status(n, &st);
    if (st.role && strcmp(st.role, "leader") == 0)
      return n;
    sleep_us(10000);
  }
  fprintf(stderr, "no leader\n");
  exit(1);
}

static struct gw_limiter_spec spec_of(enum gw_limiter_kind kind, uint64_t a, uint64_t b)
{
  struct gw_limiter_spec s;
  memset(&s, 0, sizeof(s));
  s.kind = kind;
  s.max_keys = 1024;
  s.seed.k0 = 3;
  if (kind == GW_LIMITER_TOKEN_BUCKET) {
    s.tb.capacity = a;
    s.tb.refill_per_sec = b;
  } else {
    s.sw.limit = a;
    s.sw.window_ms = b;
  }
  return s;
}

static void bench_local_path(struct gw_node *node)
{
  void *st;
  gw_store_raft_open(node, "bench", &st);
  struct gw_limiter_spec s = spec_of(GW_LIMITER_TOKEN_BUCKET, 1000000000, 1000000000);
  struct gw_store_raft_scope sc = gw_store_raft_scope(st, "local");
  void *lr, *lm;
  gw_store_raft.limiter_create(&sc, &s, &lr);
  gw_store_memory.limiter_create(NULL, &s, &lm);
  const int n = 2000000;
  /* warm up: the allotment fills */
  for (int i = 0; i < 20000; i++) {
    gw_store_raft.limiter_admit(lr, "k", 1, now_ns(), NULL, NULL);
    if (i % 1000 == 0)
      sleep_us(1000);
  }
  for (int rep = 0; rep < 3; rep++) {
    struct gw_ratelimit_info info;
    uint64_t ok = 0, t0 = now_ns();
    for (int i = 0; i < n; i++)
      ok += gw_store_raft.limiter_admit(lr, "k", 1, now_ns(), &info, NULL);
    uint64_t t1 = now_ns();
    for (int i = 0; i < n; i++)
      gw_store_memory.limiter_admit(lm, "k", 1, now_ns(), &info, NULL);
    uint64_t t2 = now_ns();
    printf("local path: raft %.1f ns/op (%.1f%% admitted), memory %.1f ns/op\n",
           (double)(t1 - t0) / n, 100.0 * (double)ok / n, (double)(t2 - t1) / n);
  }
  struct gw_store_raft_stats rs;
  gw_store_raft_stats(st, &rs);
  printf("  refills %llu (%llu units)\n", (unsigned long long)rs.refills,
         (unsigned long long)rs.refill_units);
  gw_store_raft.limiter_destroy(lr);
  gw_store_memory.limiter_destroy(lm);
  gw_store_raft_close(st);
}

/* The state machine alone: QUOTA_ACQUIRE + QUOTA_RELEASE applies per second (one core). */
static void bench_fsm(enum gw_fsm_quota_kind kind)
{
  struct gw_fsm_config cfg;
  gw_fsm_config_default(&cfg);
  struct gw_fsm *f;
  gw_fsm_new(&cfg, &f);
  struct gw_fsm_result res;
  gw_fsm_result_init(&res);
  const int n = 400000;
  uint8_t buf[512];
  size_t len;
  char id[32];
  uint64_t t0 = now_ns(), index = 0, granted = 0;
  for (int i = 0; i < n; i++) {
    snprintf(id, sizeof(id), "r/x/%d", i % 64);
    struct gw_fsm_cmd c = {.kind = GW_FSM_QUOTA_ACQUIRE, .now_ms = 1000000 + (uint64_t)i / 40,
                           .name = id, .name_len = strlen(id), .owner = "n1", .owner_len = 2,
                           .quota_kind = (uint8_t)kind, .quota_a = 100000,
                           .quota_b = kind == GW_FSM_QUOTA_TOKEN_BUCKET ? 100000 : 1000,
                           .count = 10, .ttl_ms = 100};
    if (i % 2 == 1) {
      c.kind = GW_FSM_QUOTA_RELEASE;
      c.grant_id = index;
      c.count = 3;
    }
    gw_fsm_cmd_encode(&c, buf, sizeof(buf), &len);
    gw_fsm_apply(f, ++index, buf, len, &res);
    granted += res.status == 200;
  }
  double el = (double)(now_ns() - t0) / 1e9;
  printf("state machine, %s: %.2f M applies/s (acquire + release over 64 limiters)\n",
         kind == GW_FSM_QUOTA_TOKEN_BUCKET ? "token bucket" : "sliding window", (double)n / el / 1e6);
  (void)granted;
  gw_fsm_result_free(&res);
  gw_fsm_free(f);
}

/* Three instances, one key, requests offered at about `offered` per second in all. */
static void bench_cluster(struct gw_node *node, const char *label, struct gw_limiter_spec s,
                          double seconds, uint64_t offered)
{
  void *st[3], *lim[3];
  static int runs;
  char route[64];
  snprintf(route, sizeof(route), "bench-%d", ++runs);
  for (int i = 0; i < 3; i++) {
    char name[8];
    snprintf(name, sizeof(name), "g%d", i);
    gw_store_raft_open(node, name, &st[i]);
    struct gw_store_raft_scope sc = gw_store_raft_scope(st[i], route);
    if (gw_store_raft.limiter_create(&sc, &s, &lim[i]) != 0)
      exit(1);
  }
  /* The reference: one exact limiter (the memory store) seeing the same requests. */
  void *ref;
  gw_store_memory.limiter_create(NULL, &s, &ref);
  uint64_t ref_admitted = 0;
  uint64_t t0 = now_ns(), end = t0 + (uint64_t)(seconds * 1e9);
  uint64_t admitted = 0, attempts = 0;
  uint64_t gap = 1000000000ull / offered;
  uint64_t next = t0;
  while (now_ns() < end) {
    uint64_t t = now_ns();
    while (next <= t) {
      int i = (int)(attempts % 3);
      attempts++;
      admitted += gw_store_raft.limiter_admit(lim[i], "", 0, t, NULL, NULL);
      ref_admitted += gw_store_memory.limiter_admit(ref, "", 0, t, NULL, NULL);
      next += gap;
    }
    sleep_us(200);
  }
  double el = (double)(now_ns() - t0) / 1e9;
  double bound;
  if (s.kind == GW_LIMITER_TOKEN_BUCKET)
    bound = (double)s.tb.capacity + (double)s.tb.refill_per_sec * el;
  else
    bound = (double)s.sw.limit * (double)(uint64_t)(el * 1000.0 / (double)s.sw.window_ms + 0.999999);
  uint64_t refills = 0;
  for (int i = 0; i < 3; i++) {
    struct gw_store_raft_stats rs;
    gw_store_raft_stats(st[i], &rs);
    refills += rs.refills;
  }
  printf("%-24s offered %5llu/s: admitted %6llu, one exact limiter %6llu (utilization %5.1f%%), "
         "bound %.0f, over-admission %s; refills %.0f/s\n",
         label, (unsigned long long)offered, (unsigned long long)admitted,
         (unsigned long long)ref_admitted, 100.0 * (double)admitted / (double)ref_admitted, bound,
         (double)admitted > bound ? "YES" : "0", (double)refills / el);
  gw_store_memory.limiter_destroy(ref);
  for (int i = 0; i < 3; i++) {
    gw_store_raft.limiter_destroy(lim[i]);
    gw_store_raft_close(st[i]);
  }
}

int main(int argc, char **argv)
{
  double seconds = argc > 1 ? atof(argv[1]) : 3.0;
  bool sync = argc > 2 ? atoi(argv[2]) != 0 : false;
  char dir[256];
  snprintf(dir, sizeof(dir), "%s/quota-bench-XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
  if (!mkdtemp(dir))
    return 1;
  struct gw_node *node = start_node(dir, sync);
  setvbuf(stdout, NULL, _IONBF, 0);
  printf("single-node group, fsync %s, %.1f s per run\n", sync ? "on" : "off", seconds);
  bench_fsm(GW_FSM_QUOTA_TOKEN_BUCKET);
  bench_fsm(GW_FSM_QUOTA_SLIDING_WINDOW);
  bench_local_path(node);
  /* Windows: bound = limit x the windows the run touches (rounded up). */
  bench_cluster(node, "token_bucket 1000/s", spec_of(GW_LIMITER_TOKEN_BUCKET, 500, 1000), seconds, 3000);
  bench_cluster(node, "token_bucket 10000/s", spec_of(GW_LIMITER_TOKEN_BUCKET, 5000, 10000), seconds, 30000);
  bench_cluster(node, "sliding_window 1000/1s", spec_of(GW_LIMITER_SLIDING_WINDOW, 1000, 1000), seconds, 2000);
  bench_cluster(node, "sliding_window 10000/1s", spec_of(GW_LIMITER_SLIDING_WINDOW, 10000, 1000), seconds, 20000);
  bench_cluster(node, "sliding_window 60000/60s", spec_of(GW_LIMITER_SLIDING_WINDOW, 60000, 60000), seconds, 2000);
  gw_node_stop(node);
  char cmd[300];
  snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
  return system(cmd) == 0 ? 0 : 1;
}
