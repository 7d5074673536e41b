/*
 * The gateway program (API.md section 1): load and validate the config, start the data plane
 * engine and the control listener, then wait for signals in the main thread. SIGHUP reloads the
 * file (a bad file is logged and the running config stays), SIGTERM and SIGINT drain gracefully
 * within shutdown_grace_ms and exit 0.
 */
#include <errno.h>
#include <stdatomic.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ftw.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include "buf.h"
#include "config.h"
#include "control.h"
#include "engine.h"
#include "log.h"
#include "node.h"
#include "pipeline.h"
#include "raft_store.h"
#include "redis.h"

static void usage(FILE *f)
{
  fprintf(f, "usage: gateway -c FILE            run a node\n"
             "       gateway --check-config -c FILE   validate FILE and exit 0, or 1 with one\n"
             "                                        line per problem\n"
             "       gateway --version                print the version\n");
}

static void report(const struct gw_config_errors *errs, bool as_log)
{
  for (size_t i = 0; i < errs->count; i++) {
    if (as_log)
      gw_logf("error", "%s", errs->lines[i]);
    else
      printf("%s\n", errs->lines[i]);
  }
  if (errs->dropped) {
    if (as_log)
      gw_logf("error", "and %zu more problems", errs->dropped);
    else
      printf("and %zu more problems\n", errs->dropped);
  }
}

static int remove_one(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
  (void)sb;
  (void)flag;
  (void)ftw;
  return remove(path);
}

/* Create the directories above path (the log creates path itself). */
static void mkdir_parents(const char *path)
{
  char buf[1024];
  snprintf(buf, sizeof(buf), "%s", path);
  for (char *p = buf + 1; *p; p++)
    if (*p == '/') {
      *p = '\0';
      mkdir(buf, 0755);
      *p = '/';
    }
}

static void remove_tree(const char *dir) { nftw(dir, remove_one, 16, FTW_DEPTH | FTW_PHYS); }

/*
 * The coordination group behind /v1: backend raft keeps it durable in data_dir (one peer or no
 * cluster: a single-node group); other backends run a single-node group in a private temporary
 * directory without fsync, removed at exit (nothing is persisted, as for backend memory).
 */
static void node_config(const struct gw_config *cfg, struct gw_node_config *n, char *tmp_dir,
                        size_t tmp_cap)
{
  memset(n, 0, sizeof(*n));
  snprintf(n->name, sizeof(n->name), "%s", cfg->node_id);
  n->election_timeout_ms = cfg->election_timeout_ms;
  n->heartbeat_ms = cfg->heartbeat_ms;
  n->snapshot_every = cfg->snapshot_every;
  n->cluster_id = 0x67776179; /* "gway" */
  if (cfg->backend == GW_BACKEND_RAFT) {
    snprintf(n->data_dir, sizeof(n->data_dir), "%s", cfg->data_dir);
    mkdir_parents(n->data_dir);
    n->sync = true;
  } else {
    snprintf(tmp_dir, tmp_cap, "%s/gateway-%s-XXXXXX",
             getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp", cfg->node_id);
    if (!mkdtemp(tmp_dir))
      tmp_dir[0] = '\0';
    snprintf(n->data_dir, sizeof(n->data_dir), "%s", tmp_dir);
    n->sync = false;
  }
  bool clustered = cfg->backend == GW_BACKEND_RAFT && cfg->has_cluster &&
                   (cfg->peer_count > 1 || cfg->join);
  n->join = clustered && cfg->join;
  if (clustered) {
    memcpy(&n->raft_listen, &cfg->raft_listen.ss, cfg->raft_listen.len);
    n->raft_listen_len = cfg->raft_listen.len;
    for (size_t i = 0; i < cfg->peer_count && i < GW_NODE_MAX_PEERS; i++) {
      struct gw_node_peer *p = &n->peers[n->peer_count++];
      p->id = gw_node_id_from_name(cfg->peers[i].id);
      snprintf(p->name, sizeof(p->name), "%s", cfg->peers[i].id);
      memcpy(&p->raft, &cfg->peers[i].raft.ss, cfg->peers[i].raft.len);
      p->raft_len = cfg->peers[i].raft.len;
      snprintf(p->api, sizeof(p->api), "%s", cfg->peers[i].api.text);
    }
  } else {
    struct gw_node_peer *p = &n->peers[n->peer_count++];
    p->id = gw_node_id_from_name(cfg->node_id);
    snprintf(p->name, sizeof(p->name), "%s", cfg->node_id);
    snprintf(p->api, sizeof(p->api), "%s", cfg->api_listen.text);
  }
}

/* The routes of cfg as a JSON array of their objects as written. malloc'd. */
static char *routes_json(const struct gw_config *cfg)
{
  size_t n = 3;
  for (size_t i = 0; i < cfg->route_count; i++)
    n += strlen(cfg->routes[i].json) + 1;
  char *out = malloc(n);
  if (!out)
    return NULL;
  size_t o = 0;
  out[o++] = '[';
  for (size_t i = 0; i < cfg->route_count; i++) {
    if (i)
      out[o++] = ',';
    size_t l = strlen(cfg->routes[i].json);
    memcpy(out + o, cfg->routes[i].json, l);
    o += l;
  }
  out[o++] = ']';
  out[o] = '\0';
  return out;
}

/* Make next current (attaching live policy state from cur), or log why not. */
static void apply_config(struct gw_engine *eng, struct gw_config *cur, struct gw_config *next,
                         const char *why)
{
  if (gw_pipeline_attach(next, cur) != 0) {
    gw_logf("error", "%s rejected: keeping the running config", why);
    gw_config_unref(next);
    return;
  }
  if (strcmp(next->listen.text, cur->listen.text) != 0 ||
      strcmp(next->api_listen.text, cur->api_listen.text) != 0)
    gw_logf("warn", "listen addresses change only on restart");
  gw_engine_set_config(eng, next);
  gw_logf("info", "%s: %zu routes (route table version %llu)", why, next->route_count,
          (unsigned long long)next->routes_version);
  gw_config_unref(next);
}

/*
 * SIGHUP: re-read the file. With backend raft the routes are the cluster's replicated table, so
 * the file's other settings apply and the running routes stay.
 */
static void reload(const char *path, struct gw_engine *eng)
{
  static struct gw_config_errors errs;
  struct gw_config *cur = gw_engine_config(eng);
  struct gw_config *next = gw_config_load(path, &errs);
  if (next && cur->backend == GW_BACKEND_RAFT) {
    char *routes = routes_json(cur);
    struct gw_config *merged = routes ? gw_config_with_routes(next, routes, &errs) : NULL;
    free(routes);
    gw_config_unref(next);
    next = merged;
    if (next)
      next->routes_version = cur->routes_version;
  } else if (next) {
    next->routes_version = cur->routes_version + 1;
  }
  if (!next) {
    gw_logf("error", "reload rejected: keeping the running config");
    report(&errs, true);
  } else {
    apply_config(eng, cur, next, "config reloaded");
  }
  gw_config_unref(cur);
}

struct route_fold {
  struct gw_buf json;
  bool first;
};

static int fold_route(void *ctx, const char *name, size_t name_len, const char *json,
                      size_t json_len, uint64_t version)
{
  struct route_fold *f = ctx;
  (void)name;
  (void)name_len;
  (void)version;
  if (!f->first)
    gw_buf_append(&f->json, ",", 1);
  f->first = false;
  gw_buf_append(&f->json, json, json_len);
  return 0;
}

/* The replicated route table changed (node thread): rebuild this node's config from it. */
static struct {
  _Atomic(struct gw_engine *) eng;
} route_target;

static void on_routes(void *ctx, const struct gw_fsm *fsm)
{
  static struct gw_config_errors errs;
  struct gw_engine *eng = atomic_load(&((__typeof__(route_target) *)ctx)->eng);
  if (!eng)
    return; /* handed again by gw_node_resync_routes once the engine runs */
  if (gw_fsm_routes_version(fsm) == 0)
    return; /* no table yet: the file's routes serve until the cluster's arrives */
  struct route_fold f = {{NULL, 0, 0}, true};
  gw_buf_append(&f.json, "[", 1);
  gw_fsm_routes_foreach(fsm, fold_route, &f);
  gw_buf_append(&f.json, "]", 1);
  struct gw_config *cur = gw_engine_config(eng);
  struct gw_config *next = f.json.p ? gw_config_with_routes(cur, f.json.p, &errs) : NULL;
  gw_buf_free(&f.json);
  if (!next) {
    gw_logf("error", "the cluster's route table does not validate on this node: keeping the "
                     "running routes");
    report(&errs, true);
  } else {
    next->routes_version = gw_fsm_routes_version(fsm);
    apply_config(eng, cur, next, "routes changed in the cluster");
  }
  gw_config_unref(cur);
}

static void raise_fd_limit(void)
{
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
}

int main(int argc, char **argv)
{
  const char *path = NULL;
  bool check = false;
  for (int i = 1; i < argc; i++) {
    if ((strcmp(argv[i], "-c") == 0 || strcmp(argv[i], "--config") == 0) && i + 1 < argc) {
      path = argv[++i];
    } else if (strcmp(argv[i], "--check-config") == 0) {
      check = true;
    } else if (strcmp(argv[i], "--version") == 0 || strcmp(argv[i], "-v") == 0) {
      printf("gateway %s\n", GW_VERSION);
      return 0;
    } else if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
      usage(stdout);
      return 0;
    } else {
      fprintf(stderr, "gateway: unknown argument %s\n", argv[i]);
      usage(stderr);
      return 2;
    }
  }
  if (!path) {
    usage(stderr);
    return 2;
  }

  static struct gw_config_errors errs;
  struct gw_config *cfg = gw_config_load(path, &errs);
  if (check) {
    if (!cfg) {
      report(&errs, false);
      return 1;
    }
    printf("config ok: %zu routes\n", cfg->route_count);
    gw_config_unref(cfg);
    return 0;
  }
  if (!cfg) {
    report(&errs, true);
    return 1;
  }
  static char tmp_dir[256];
  struct gw_node *node = NULL;
  void *raft_store = NULL, *redis = NULL;
  struct gw_engine *eng = NULL;
  struct gw_control *ctl = NULL;
  struct gw_node_config ncfg;
  node_config(cfg, &ncfg, tmp_dir, sizeof(tmp_dir));
  if (cfg->backend == GW_BACKEND_RAFT) {
    /* Routes are replicated: the table starts from this file if the cluster has none yet. */
    static const char *seed_names[GW_CONFIG_MAX_ROUTES], *seed_jsons[GW_CONFIG_MAX_ROUTES];
    for (size_t i = 0; i < cfg->route_count; i++) {
      seed_names[i] = strdup(cfg->routes[i].name);
      seed_jsons[i] = strdup(cfg->routes[i].json);
    }
    ncfg.seed_names = seed_names;
    ncfg.seed_jsons = seed_jsons;
    ncfg.seed_count = cfg->route_count;
    ncfg.on_routes = on_routes;
    ncfg.routes_ctx = &route_target; /* its engine is set once the engine runs */
  }
  char nerr[1024];
  if (gw_node_start(&ncfg, &node, nerr, sizeof(nerr)) != 0) {
    gw_logf("error", "%s", nerr);
    node = NULL;
    goto fail;
  }
  if (cfg->backend == GW_BACKEND_RAFT) {
    if (gw_store_raft_open(node, cfg->node_id, &raft_store) != 0) {
      gw_logf("error", "backend raft: cannot open the shared store");
      goto fail;
    }
    gw_pipeline_set_shared_store(&gw_store_raft, raft_store);
  }
  if (cfg->backend == GW_BACKEND_REDIS) {
    char rerr[256];
    if (gw_store_redis_open(cfg->redis_url, cfg->redis_timeout_ms, &redis, rerr, sizeof(rerr))) {
      gw_logf("error", "backend redis: %s", rerr);
      redis = NULL;
      goto fail;
    }
    if (!gw_store_redis_connected(redis))
      gw_logf("warn", "backend redis: %s is not reachable yet; limits fail open and idempotent "
                      "requests are refused until it is (per route on_store_error)",
              cfg->redis_url);
    gw_pipeline_set_shared_store(&gw_store_redis, redis);
  }
  if (gw_pipeline_attach(cfg, NULL) != 0)
    goto fail;

  /* Signals go to this thread only: block them before any other thread starts. */
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &set, NULL);
  signal(SIGPIPE, SIG_IGN);
  raise_fd_limit();

  if (gw_engine_start(&eng, cfg) != 0) {
    eng = NULL;
    goto fail;
  }
  atomic_store(&route_target.eng, eng);
  gw_node_resync_routes(node); /* the cluster's routes, now that there is an engine to take them */
  if (gw_control_start(&ctl, &cfg->api_listen, eng, node, cfg->node_id,
                       cfg->backend == GW_BACKEND_RAFT) != 0) {
    ctl = NULL;
    goto fail;
  }
  if (raft_store) {
    struct gw_store_raft_forward fwd = {gw_control_forward_fsm, ctl};
    gw_store_raft_set_forward(raft_store, &fwd);
  }
  gw_logf("info", "gateway %s node %s serving on %s (control %s), %zu routes", GW_VERSION,
          cfg->node_id, cfg->listen.text, cfg->api_listen.text, cfg->route_count);
  gw_config_unref(cfg); /* from here on the engine holds the current config */

  int sig = 0;
  for (;;) {
    if (sigwait(&set, &sig) != 0)
      continue;
    if (sig == SIGHUP) {
      reload(path, eng);
      continue;
    }
    break;
  }
  cfg = gw_engine_config(eng);
  gw_logf("info", "%s: draining (at most %llu ms)", sig == SIGINT ? "SIGINT" : "SIGTERM",
          (unsigned long long)cfg->shutdown_grace_ms);
  gw_engine_drain(eng, cfg->shutdown_grace_ms);
  if (raft_store) {
    gw_store_raft_close(raft_store); /* its last operations go through the node, still up */
    raft_store = NULL;
  }
  gw_control_stop_forwarding(ctl);
  gw_node_stop(node);
  gw_control_stop(ctl);
  if (tmp_dir[0])
    remove_tree(tmp_dir);
  gw_engine_free(eng);
  gw_config_unref(cfg); /* the last routes' parts go: then the store behind them */
  if (redis)
    gw_store_redis_close(redis);
  gw_logf("info", "stopped");
  return 0;

fail:
  /* Startup failed: take down what was started, in the order of a normal stop, so the exit is
   * clean (exit status 1). */
  if (eng)
    gw_engine_drain(eng, 0);
  if (raft_store)
    gw_store_raft_close(raft_store);
  if (ctl)
    gw_control_stop_forwarding(ctl);
  if (node)
    gw_node_stop(node);
  if (ctl)
    gw_control_stop(ctl);
  if (eng)
    gw_engine_free(eng);
  if (tmp_dir[0])
    remove_tree(tmp_dir);
  gw_config_unref(cfg);
  if (redis)
    gw_store_redis_close(redis);
  return 1;
}
