/*
 * Micro-benchmark of the Redis store's limiter decisions: limiter_admit_async against a local
 * redis-server, with 1 and with 64 operations outstanding (a closed loop: each completion queues
 * the next), for the token bucket and the sliding window over 1000 keys. Prints decisions per
 * second and the p50 / p99 / max latency from queueing to completion.
 *
 *   gw-bench-redis-store [redis://127.0.0.1:6379/0] [seconds per run, default 3]
 *
 * Without a URL it starts `redis-server` itself on a free loopback port (no persistence) and
 * stops it at the end.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "redis.h"

#define MAX_SAMPLES 4000000
#define KEYS 1000

static uint64_t mono_ns(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * GW_NS_PER_S + (uint64_t)ts.tv_nsec;
}

struct run;

struct slot {
  struct gw_store_op op;
  struct run *run;
  uint64_t t0;
  unsigned n;
};

struct run {
  void *lim;
  uint64_t end_ns;
  atomic_uint live;
  atomic_ulong count, errors, admitted;
  uint64_t *lat; /* samples, MAX_SAMPLES */
  pthread_mutex_t mu;
  pthread_cond_t cv;
};

static void start(struct slot *s);

static void on_done(struct gw_store_op *op)
{
  struct slot *s = op->ctx;
  struct run *r = s->run;
  uint64_t now = mono_ns();
  unsigned long i = atomic_fetch_add(&r->count, 1);
  if (i < MAX_SAMPLES)
    r->lat[i] = now - s->t0;
  if (op->err)
    atomic_fetch_add(&r->errors, 1);
  else if (op->admitted)
    atomic_fetch_add(&r->admitted, 1);
  if (now < r->end_ns) {
    start(s);
    return;
  }
  if (atomic_fetch_sub(&r->live, 1) == 1) {
    pthread_mutex_lock(&r->mu);
    pthread_cond_signal(&r->cv);
    pthread_mutex_unlock(&r->mu);
  }
}

static void start(struct slot *s)
{
  char key[16];
  int kl = snprintf(key, sizeof(key), "c%u", s->n++ % KEYS);
  memset(&s->op, 0, sizeof(s->op));
  s->op.done = on_done;
  s->op.ctx = s;
  s->t0 = mono_ns();
  int rc = gw_store_redis.limiter_admit_async(s->run->lim, key, (size_t)kl, 0, &s->op);
  if (rc) { /* refused at once (down, busy): this slot stops */
    struct run *r = s->run;
    atomic_fetch_add(&r->errors, 1);
    if (atomic_fetch_sub(&r->live, 1) == 1) {
      pthread_mutex_lock(&r->mu);
      pthread_cond_signal(&r->cv);
      pthread_mutex_unlock(&r->mu);
    }
  }
}

static int cmp_u64(const void *a, const void *b)
{
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

static void bench(void *redis, const char *name, const struct gw_limiter_spec *spec,
                  unsigned outstanding, double seconds)
{
  char route[64];
  snprintf(route, sizeof(route), "bench-%s-%u", name, outstanding);
  struct gw_store_redis_scope sc = gw_store_redis_scope(redis, route);
  struct run r;
  memset(&r, 0, sizeof(r));
  if (gw_store_redis.limiter_create(&sc, spec, &r.lim)) {
    fprintf(stderr, "limiter_create failed\n");
    exit(1);
  }
  r.lat = malloc(MAX_SAMPLES * sizeof(uint64_t));
  pthread_mutex_init(&r.mu, NULL);
  pthread_cond_init(&r.cv, NULL);
  struct slot *slots = calloc(outstanding, sizeof(*slots));
  /* Warm up: keys created, scripts cached. */
  r.end_ns = mono_ns() + GW_NS_PER_S / 4;
  for (int phase = 0; phase < 2; phase++) {
    atomic_store(&r.live, outstanding);
    atomic_store(&r.count, 0);
    atomic_store(&r.errors, 0);
    atomic_store(&r.admitted, 0);
    uint64_t t0 = mono_ns();
    if (phase == 1)
      r.end_ns = t0 + (uint64_t)(seconds * 1e9);
    for (unsigned i = 0; i < outstanding; i++) {
      slots[i].run = &r;
      slots[i].n = i;
      start(&slots[i]);
    }
    pthread_mutex_lock(&r.mu);
    while (atomic_load(&r.live) > 0)
      pthread_cond_wait(&r.cv, &r.mu);
    pthread_mutex_unlock(&r.mu);
    if (phase == 0)
      continue;
    uint64_t el = mono_ns() - t0;
    unsigned long n = atomic_load(&r.count);
    unsigned long m = n < MAX_SAMPLES ? n : MAX_SAMPLES;
    qsort(r.lat, m, sizeof(uint64_t), cmp_u64);
    printf("%-15s outstanding %3u: %9.0f decisions/s  p50 %7.1f us  p99 %7.1f us  max %8.1f us"
           "  (%lu ops, %lu admitted, %lu errors)\n",
           name, outstanding, n / (el / 1e9), r.lat[m / 2] / 1e3, r.lat[m * 99 / 100] / 1e3,
           r.lat[m - 1] / 1e3, n, atomic_load(&r.admitted), atomic_load(&r.errors));
  }
  gw_store_redis.limiter_destroy(r.lim);
  free(slots);
  free(r.lat);
  pthread_cond_destroy(&r.cv);
  pthread_mutex_destroy(&r.mu);
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

int main(int argc, char **argv)
{
  char url[128];
  pid_t server = -1;
  double seconds = argc > 2 ? strtod(argv[2], NULL) : 3.0;
  if (seconds <= 0 || seconds > 60)
    seconds = 3.0;
  if (argc > 1 && strcmp(argv[1], "-") != 0) {
    snprintf(url, sizeof(url), "%s", argv[1]);
  } else {
    int port = free_port();
    char p[16];
    snprintf(p, sizeof(p), "%d", port);
    server = fork();
    if (server == 0) {
      FILE *f = freopen("/dev/null", "w", stdout);
      (void)f;
      execlp("redis-server", "redis-server", "--port", p, "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", (char *)NULL);
      fprintf(stderr, "cannot run redis-server: %s\n", strerror(errno));
      _exit(127);
    }
    snprintf(url, sizeof(url), "redis://127.0.0.1:%d/0", port);
  }
  void *redis = NULL;
  char err[160];
  int rc = gw_store_redis_open(url, 1000, &redis, err, sizeof(err));
  for (int i = 0; rc == 0 && i < 500 && !gw_store_redis_connected(redis); i++)
    usleep(10000);
  if (rc || !gw_store_redis_connected(redis)) {
    if (redis)
      gw_store_redis_last_error(redis, err, sizeof(err));
    fprintf(stderr, "redis store: %s\n", err);
    if (server > 0)
      kill(server, SIGTERM);
    return 1;
  }
  printf("Redis store limiter decisions against %s, %.1f s per run, %d keys\n", url, seconds,
         KEYS);
  struct gw_limiter_spec tb = {.kind = GW_LIMITER_TOKEN_BUCKET,
                               .tb = {.capacity = 1000000, .refill_per_sec = 1000000}};
  struct gw_limiter_spec sw = {.kind = GW_LIMITER_SLIDING_WINDOW,
                               .sw = {.limit = 1000, .window_ms = 1000}};
  unsigned depth[2] = {1, 64};
  for (int d = 0; d < 2; d++) {
    bench(redis, "token_bucket", &tb, depth[d], seconds);
    bench(redis, "sliding_window", &sw, depth[d], seconds);
  }
  gw_store_redis_close(redis);
  if (server > 0) {
    kill(server, SIGTERM);
    waitpid(server, NULL, 0);
  }
  return 0;
}
