/*
 * The admin API (API.md section 5) and /metrics, on the control plane.
 *
 * Routes: GET lists the current config's route objects (as written) with the route table's
 * version. PUT and DELETE build the would-be config and validate it exactly like the file (400
 * invalid_config naming the path inside the route). With backend raft the change is then
 * proposed to the replicated route table and every node applies it when committed (node.h,
 * on_routes); otherwise it applies to this node at once. Requests in flight keep the config they
 * started with, and a route whose policies did not change keeps its limiter and breaker state.
 *
 * Overrides (breaker open/closed/auto, degrade forced/auto) act on this node's live state of the
 * route. When an admin token is configured (or GATEWAY_ADMIN_TOKEN is set), every /admin path needs
 * `Authorization: Bearer <token>`, compared in constant time.
 */
#include <cjson/cJSON.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "config.h"
#include "control_int.h"
#include "err.h"
#include "log.h"
#include "metrics.h"
#include "pipeline.h"

extern const char gw_admin_ui_html[];

static uint64_t mono_ns(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Compare in time that depends only on the lengths, not on where they differ. */
static bool same_secret(const char *a, const char *b)
{
  size_t la = strlen(a), lb = strlen(b);
  unsigned char diff = (unsigned char)(la != lb);
  for (size_t i = 0; i < la; i++)
    diff |= (unsigned char)(a[i] ^ b[i % (lb ? lb : 1)]);
  return diff == 0;
}

static bool authorized(struct creq *q, const struct gw_config *cfg)
{
  if (!cfg->admin_token[0])
    return true;
  const char *h = MHD_lookup_connection_value(q->conn, MHD_HEADER_KIND, "Authorization");
  /* RFC 9110 section 11.1: the scheme is case-insensitive. */
  return h && strncasecmp(h, "Bearer ", 7) == 0 && same_secret(h + 7, cfg->admin_token);
}

static void set_json(struct creq *q, int status, cJSON *doc)
{
  char *text = cJSON_PrintUnformatted(doc);
  cJSON_Delete(doc);
  if (!text) {
    gw_control_set_gw_error(q, GW_ENOMEM);
    return;
  }
  q->status = status;
  gw_buf_set(&q->out, text, strlen(text));
  free(text);
}

static const struct gw_route *find_route(const struct gw_config *cfg, const char *name,
                                         size_t len)
{
  for (size_t i = 0; i < cfg->route_count; i++)
    if (strlen(cfg->routes[i].name) == len && memcmp(cfg->routes[i].name, name, len) == 0)
      return &cfg->routes[i];
  return NULL;
}

static void route_not_found(struct creq *q)
{
  gw_control_set_error(q, 404, "route_not_found", "no route has this name", NULL);
}

static void invalid_config(struct creq *q, const struct gw_config_errors *errs)
{
  cJSON *doc = cJSON_CreateObject();
  cJSON *e = cJSON_AddObjectToObject(doc, "error");
  cJSON_AddStringToObject(e, "code", "invalid_config");
  cJSON_AddStringToObject(e, "message", errs->count ? errs->lines[0] : "the route is invalid");
  if (errs->count) {
    /* "config error at PATH: ..." -> PATH */
    const char *p = errs->lines[0] + strlen("config error at ");
    const char *colon = strstr(p, ": ");
    char path[512];
    size_t n = colon ? (size_t)(colon - p) : strlen(p);
    if (n >= sizeof(path))
      n = sizeof(path) - 1;
    memcpy(path, p, n);
    path[n] = '\0';
    cJSON_AddStringToObject(e, "path", path);
  }
  cJSON *list = cJSON_AddArrayToObject(e, "errors");
  for (size_t i = 0; i < errs->count; i++)
    cJSON_AddItemToArray(list, cJSON_CreateString(errs->lines[i]));
  set_json(q, 400, doc);
}

/* ---- routes ---- */

static void list_routes(struct creq *q, const struct gw_config *cfg)
{
  cJSON *doc = cJSON_CreateObject();
  cJSON_AddNumberToObject(doc, "version", (double)cfg->routes_version);
  cJSON *arr = cJSON_AddArrayToObject(doc, "routes");
  for (size_t i = 0; i < cfg->route_count; i++) {
    cJSON *r = cJSON_Parse(cfg->routes[i].json);
    if (r)
      cJSON_AddItemToArray(arr, r);
  }
  set_json(q, 200, doc);
}

static void get_route(struct creq *q, const struct gw_config *cfg, const char *name, size_t len)
{
  const struct gw_route *r = find_route(cfg, name, len);
  if (!r) {
    route_not_found(q);
    return;
  }
  q->status = 200;
  gw_buf_set(&q->out, r->json, strlen(r->json));
}

/* PUT or DELETE. Returns true when answered, false when proposed to the node. */
static bool change_route(struct creq *q, struct gw_control *c, const char *name, size_t len,
                         bool put)
{
  char nm[256];
  memcpy(nm, name, len);
  nm[len] = '\0';
  pthread_mutex_lock(&c->admin_mu);
  struct gw_config *base = gw_engine_config(c->eng);
  static struct gw_config_errors errs; /* under admin_mu */
  bool exists = find_route(base, name, len) != NULL;
  if (!put && !exists) {
    gw_config_unref(base);
    pthread_mutex_unlock(&c->admin_mu);
    route_not_found(q);
    return true;
  }
  struct gw_config *next =
      gw_config_with_route(base, nm, put ? q->body.p : NULL, put ? q->body.len : 0, &errs);
  if (!next) {
    gw_config_unref(base);
    pthread_mutex_unlock(&c->admin_mu);
    invalid_config(q, &errs);
    return true;
  }
  if (c->replicated_routes) {
    /* Propose the route as the validated config holds it; every node applies the committed
     * table (node.h on_routes). */
    const struct gw_route *r = put ? find_route(next, name, len) : NULL;
    memset(&q->nr, 0, sizeof(q->nr));
    q->nr.op = GW_NODE_WRITE;
    snprintf(q->name, sizeof(q->name), "%s", nm);
    q->nr.cmd.kind = put ? GW_FSM_ROUTE_PUT : GW_FSM_ROUTE_DELETE;
    q->nr.cmd.name = q->name;
    q->nr.cmd.name_len = len;
    if (r) {
      gw_buf_set(&q->body, r->json, strlen(r->json)); /* the body buffer now holds the json */
      q->nr.cmd.json = q->body.p;
      q->nr.cmd.json_len = q->body.len;
    }
    gw_config_unref(next);
    gw_config_unref(base);
    pthread_mutex_unlock(&c->admin_mu);
    gw_control_submit(q);
    return false;
  }
  if (gw_pipeline_attach(next, base) != 0) {
    gw_config_unref(next);
    gw_config_unref(base);
    pthread_mutex_unlock(&c->admin_mu);
    gw_control_set_gw_error(q, GW_ENOMEM);
    return true;
  }
  next->routes_version = base->routes_version + 1;
  gw_engine_set_config(c->eng, next);
  uint64_t version = next->routes_version;
  gw_config_unref(next);
  gw_config_unref(base);
  pthread_mutex_unlock(&c->admin_mu);
  gw_logf("info", "route %s %s through the admin API (version %" PRIu64 ")", nm,
          put ? "set" : "deleted", version);
  if (!put) {
    q->status = 204;
    q->out.len = 0;
    return true;
  }
  cJSON *doc = cJSON_CreateObject();
  cJSON_AddStringToObject(doc, "name", nm);
  cJSON_AddNumberToObject(doc, "version", (double)version);
  set_json(q, 200, doc);
  return true;
}

/* ---- live state and overrides ---- */

static void limiter_json(cJSON *parent, const char *key, const struct gw_part *part, uint64_t now)
{
  struct gw_limiter_stats ls;
  struct gw_ratelimit_info info;
  part->ops->limiter_stats(part->obj, &ls);
  part->ops->limiter_peek(part->obj, NULL, 0, now, &info);
  cJSON *o = cJSON_AddObjectToObject(parent, key);
  cJSON_AddNumberToObject(o, "limit", (double)info.limit);
  cJSON_AddNumberToObject(o, "remaining", (double)info.remaining); /* the route-wide key */
  cJSON_AddNumberToObject(o, "keys", ls.keys);
  cJSON_AddNumberToObject(o, "admitted", (double)ls.admitted);
  cJSON_AddNumberToObject(o, "rejected", (double)ls.rejected);
  cJSON_AddNumberToObject(o, "evictions", (double)ls.evictions);
}

static void route_state(struct creq *q, const struct gw_route *r)
{
  struct gw_route_rt *rt = r->rt;
  uint64_t now = mono_ns();
  cJSON *doc = cJSON_CreateObject();
  cJSON_AddStringToObject(doc, "name", r->name);
  cJSON_AddNumberToObject(doc, "in_flight", atomic_load(&rt->inflight));
  cJSON_AddNumberToObject(doc, "requests", (double)atomic_load(&rt->requests));
  if (rt->breaker) {
    struct gw_breaker_snapshot s;
    pthread_mutex_lock(&rt->breaker->mu);
    gw_breaker_snapshot(rt->breaker->obj, now, &s);
    pthread_mutex_unlock(&rt->breaker->mu);
    cJSON *b = cJSON_AddObjectToObject(doc, "breaker");
    cJSON_AddStringToObject(b, "state", gw_breaker_state_name(s.state));
    cJSON_AddStringToObject(b, "mode", gw_breaker_mode_name(s.mode));
    cJSON_AddNumberToObject(b, "window_calls", s.window_calls);
    cJSON_AddNumberToObject(b, "window_failures", s.window_failures);
    cJSON_AddNumberToObject(b, "window_slow", s.window_slow);
    cJSON_AddNumberToObject(b, "failure_rate", s.failure_rate_ppm / 1e6);
    cJSON_AddNumberToObject(b, "slow_call_rate", s.slow_rate_ppm / 1e6);
    cJSON_AddNumberToObject(b, "trials_admitted", s.trials_admitted);
    cJSON_AddNumberToObject(b, "trials_done", s.trials_done);
    cJSON_AddNumberToObject(b, "open_remaining_ms", (double)s.open_remaining_ms);
    cJSON *t = cJSON_AddObjectToObject(b, "transitions");
    cJSON_AddNumberToObject(t, "open", (double)s.to_open);
    cJSON_AddNumberToObject(t, "half_open", (double)s.to_half_open);
    cJSON_AddNumberToObject(t, "closed", (double)s.to_closed);
    cJSON_AddNumberToObject(b, "rejected", (double)s.rejected);
  }
  if (rt->token_bucket)
    limiter_json(doc, "token_bucket", rt->token_bucket, now);
  if (rt->sliding_window)
    limiter_json(doc, "sliding_window", rt->sliding_window, now);
  if (r->degradation.enabled) {
    cJSON *d = cJSON_AddObjectToObject(doc, "degradation");
    pthread_mutex_lock(&rt->mu);
    bool forced = rt->degrade.mode == GW_DEGRADE_FORCED_MODE;
    uint64_t mean = gw_degrade_mean_latency_ms(&rt->degrade, &r->degradation.c, now);
    bool slow = gw_degrade_is_slow(&rt->degrade, &r->degradation.c, now);
    uint32_t in_flight = rt->degrade.in_flight;
    uint64_t shed = rt->degrade.shed;
    pthread_mutex_unlock(&rt->mu);
    cJSON_AddStringToObject(d, "mode", forced ? "forced" : "auto");
    cJSON_AddNumberToObject(d, "in_flight", in_flight);
    cJSON_AddNumberToObject(d, "max_concurrent", r->degradation.c.max_concurrent);
    cJSON_AddNumberToObject(d, "mean_latency_ms", (double)mean);
    cJSON_AddBoolToObject(d, "slow", slow);
    cJSON_AddNumberToObject(d, "shed", (double)shed);
    cJSON_AddNumberToObject(d, "degraded", (double)atomic_load(&rt->degraded));
  }
  cJSON *cnt = cJSON_AddObjectToObject(doc, "counters");
  cJSON_AddNumberToObject(cnt, "rate_limited", (double)atomic_load(&rt->rate_limited));
  cJSON_AddNumberToObject(cnt, "breaker_rejected", (double)atomic_load(&rt->breaker_rejected));
  cJSON_AddNumberToObject(cnt, "retries", (double)atomic_load(&rt->retries));
  cJSON_AddNumberToObject(cnt, "replays", (double)atomic_load(&rt->replays));
  cJSON_AddNumberToObject(cnt, "store_errors", (double)atomic_load(&rt->store_errors));
  set_json(q, 200, doc);
}

static const char *body_string(struct creq *q, const char *field, char *buf, size_t cap)
{
  cJSON *doc = q->body.len ? cJSON_ParseWithLength(q->body.p, q->body.len) : NULL;
  if (!cJSON_IsObject(doc)) {
    cJSON_Delete(doc);
    gw_control_set_error(q, 400, "invalid_json", "the request body must be a JSON object", NULL);
    return NULL;
  }
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(doc, field);
  const char *out = NULL;
  if (cJSON_IsString(v) && strlen(v->valuestring) < cap) {
    snprintf(buf, cap, "%s", v->valuestring);
    out = buf;
  }
  cJSON_Delete(doc);
  return out;
}

static void set_breaker(struct creq *q, const struct gw_route *r)
{
  char v[32];
  if (!body_string(q, "state", v, sizeof(v))) {
    if (q->status == 0)
      gw_control_set_error(q, 400, "invalid_field", "state must be open, closed or auto", "state");
    return;
  }
  enum gw_breaker_mode mode;
  if (strcmp(v, "open") == 0)
    mode = GW_BREAKER_FORCED_OPEN;
  else if (strcmp(v, "closed") == 0)
    mode = GW_BREAKER_FORCED_CLOSED;
  else if (strcmp(v, "auto") == 0)
    mode = GW_BREAKER_AUTO;
  else {
    gw_control_set_error(q, 400, "invalid_field", "state must be open, closed or auto", "state");
    return;
  }
  if (!r->rt->breaker) {
    gw_control_set_error(q, 409, "policy_not_configured",
                         "this route has no circuit_breaker policy", NULL);
    return;
  }
  pthread_mutex_lock(&r->rt->breaker->mu);
  gw_breaker_set_mode(r->rt->breaker->obj, mode, mono_ns());
  pthread_mutex_unlock(&r->rt->breaker->mu);
  gw_logf("info", "route %s: breaker set to %s through the admin API", r->name, v);
  route_state(q, r);
}

static void set_degrade(struct creq *q, const struct gw_route *r)
{
  char v[32];
  if (!body_string(q, "mode", v, sizeof(v)) ||
      (strcmp(v, "forced") != 0 && strcmp(v, "auto") != 0)) {
    if (q->status == 0)
      gw_control_set_error(q, 400, "invalid_field", "mode must be forced or auto", "mode");
    return;
  }
  if (!r->degradation.enabled) {
    gw_control_set_error(q, 409, "policy_not_configured",
                         "this route has no degradation policy", NULL);
    return;
  }
  pthread_mutex_lock(&r->rt->mu);
  gw_degrade_set_mode(&r->rt->degrade,
                      strcmp(v, "forced") == 0 ? GW_DEGRADE_FORCED_MODE : GW_DEGRADE_AUTO);
  pthread_mutex_unlock(&r->rt->mu);
  gw_logf("info", "route %s: degradation set to %s through the admin API", r->name, v);
  route_state(q, r);
}

/* ---- cluster ---- */

static void cluster_status(struct creq *q, struct gw_control *c, const struct gw_config *cfg)
{
  cJSON *doc = cJSON_CreateObject();
  if (!c->node) {
    cJSON_AddStringToObject(doc, "node_id", cfg->node_id);
    set_json(q, 200, doc);
    return;
  }
  struct gw_node_status st;
  gw_node_status(c->node, &st);
  cJSON_AddStringToObject(doc, "node_id", st.name);
  if (st.leader[0])
    cJSON_AddStringToObject(doc, "leader", st.leader);
  else
    cJSON_AddNullToObject(doc, "leader");
  cJSON_AddStringToObject(doc, "role", st.role);
  cJSON_AddNumberToObject(doc, "term", (double)st.term);
  cJSON_AddNumberToObject(doc, "commit_index", (double)st.commit_index);
  cJSON_AddNumberToObject(doc, "applied_index", (double)st.applied_index);
  cJSON *members = cJSON_AddArrayToObject(doc, "members");
  for (size_t i = 0; i < st.member_count; i++) {
    const struct gw_node_member *m = &st.members[i];
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", m->name);
    cJSON_AddStringToObject(o, "raft", m->raft);
    cJSON_AddStringToObject(o, "api", m->api);
    cJSON_AddStringToObject(o, "role", m->role);
    cJSON_AddNumberToObject(o, "match_index", (double)m->match_index);
    cJSON_AddItemToArray(members, o);
  }
  set_json(q, 200, doc);
}

/* Membership changes and leadership transfer go to the node (and on to the leader). */
static bool cluster_change(struct creq *q, struct gw_control *c, enum gw_node_op op,
                           const char *member)
{
  if (!c->node || !c->replicated_routes) {
    gw_control_set_error(q, 409, "not_clustered", "this node runs no Raft cluster (backend raft)",
                         NULL);
    return true;
  }
  memset(&q->nr, 0, sizeof(q->nr));
  q->nr.op = op;
  if (member) {
    snprintf(q->nr.member.name, sizeof(q->nr.member.name), "%s", member);
  } else {
    cJSON *doc = q->body.len ? cJSON_ParseWithLength(q->body.p, q->body.len) : NULL;
    if (!cJSON_IsObject(doc)) {
      cJSON_Delete(doc);
      gw_control_set_error(q, 400, "invalid_json", "the request body must be a JSON object", NULL);
      return true;
    }
    const char *fields[3] = {op == GW_NODE_TRANSFER ? "to" : "id", "raft", "api"};
    char *dst[3] = {q->nr.member.name, q->nr.member.raft, q->nr.member.api};
    size_t cap[3] = {sizeof(q->nr.member.name), sizeof(q->nr.member.raft),
                     sizeof(q->nr.member.api)};
    int need = op == GW_NODE_ADD_MEMBER ? 3 : 1;
    for (int i = 0; i < need; i++) {
      const cJSON *v = cJSON_GetObjectItemCaseSensitive(doc, fields[i]);
      if (!cJSON_IsString(v) || !v->valuestring[0] || strlen(v->valuestring) >= cap[i]) {
        cJSON_Delete(doc);
        char msg[128];
        snprintf(msg, sizeof(msg), "%s must be a non-empty string", fields[i]);
        gw_control_set_error(q, 400, "invalid_field", msg, fields[i]);
        return true;
      }
      snprintf(dst[i], cap[i], "%s", v->valuestring);
    }
    cJSON_Delete(doc);
  }
  gw_control_submit(q);
  return false;
}

/* ---- dispatch ---- */

/* Endpoint handlers: arg is the path segment matched by "*" (NULL when none). They return true
 * when q's answer is ready, false when q waits on the node. */
typedef bool (*admin_fn)(struct creq *q, struct gw_config *cfg, const char *arg, size_t arg_len);

static bool h_metrics(struct creq *q, struct gw_config *cfg, const char *a, size_t n)
{
  q->status = 200;
  q->content_type = "text/plain; version=0.0.4; charset=utf-8";
  gw_metrics_render(&q->out, q->c->eng, q->c->node);
  return true;
}

static bool h_ui(struct creq *q, struct gw_config *cfg, const char *a, size_t n)
{
  /* A static page with no data in it: it asks for the token and sends it with its calls. */
  q->status = 200;
  q->content_type = "text/html; charset=utf-8";
  gw_buf_set(&q->out, gw_admin_ui_html, strlen(gw_admin_ui_html));
  return true;
}

static bool h_routes(struct creq *q, struct gw_config *cfg, const char *a, size_t n)
{
  list_routes(q, cfg);
  return true;
}

static bool h_route_get(struct creq *q, struct gw_config *cfg, const char *a, size_t n)
{
  get_route(q, cfg, a, n);
  return true;
}

static bool h_route_change(struct creq *q, struct gw_config *cfg, const char *a, size_t n)
{
  if (q->too_large) {
    gw_control_set_gw_error(q, GW_EBODY_TOO_LARGE);
    return true;
  }
  if (strcmp(q->method, "PUT") == 0 && q->body.len == 0) {
    gw_control_set_error(q, 400, "invalid_json", "the request body must be a route object", NULL);
    return true;
  }
  return change_route(q, q->c, a, n, strcmp(q->method, "PUT") == 0);
}

static const struct gw_route *live_route(struct creq *q, struct gw_config *cfg, const char *a,
                                         size_t n)
{
  const struct gw_route *r = find_route(cfg, a, n);
  if (!r || !r->rt)
    route_not_found(q);
  return r && r->rt ? r : NULL;
}

static bool h_state(struct creq *q, struct gw_config *cfg, const char *a, size_t n)
{
  const struct gw_route *r = live_route(q, cfg, a, n);
  if (r)
    route_state(q, r);
  return true;
}

static bool h_breaker(struct creq *q, struct gw_config *cfg, const char *a, size_t n)
{
  const struct gw_route *r = live_route(q, cfg, a, n);
  if (r)
    set_breaker(q, r);
  return true;
}

static bool h_degrade(struct creq *q, struct gw_config *cfg, const char *a, size_t n)
{
  const struct gw_route *r = live_route(q, cfg, a, n);
  if (r)
    set_degrade(q, r);
  return true;
}

static bool h_cluster(struct creq *q, struct gw_config *cfg, const char *a, size_t n)
{
  cluster_status(q, q->c, cfg);
  return true;
}

static bool h_member_add(struct creq *q, struct gw_config *cfg, const char *a, size_t n)
{
  return cluster_change(q, q->c, GW_NODE_ADD_MEMBER, NULL);
}

static bool h_member_remove(struct creq *q, struct gw_config *cfg, const char *a, size_t n)
{
  char id[64];
  if (n >= sizeof(id)) {
    gw_control_set_error(q, 404, "member_not_found", "no such member", NULL);
    return true;
  }
  memcpy(id, a, n);
  id[n] = '\0';
  return cluster_change(q, q->c, GW_NODE_REMOVE_MEMBER, id);
}

static bool h_transfer(struct creq *q, struct gw_config *cfg, const char *a, size_t n)
{
  return cluster_change(q, q->c, GW_NODE_TRANSFER, NULL);
}

/* The endpoints. A pattern's "*" matches one non-empty path segment. */
static const struct {
  const char *pattern;
  const char *method; /* GET also answers HEAD */
  bool open;          /* served without the admin token */
  admin_fn fn;
} endpoints[] = {
    {"/metrics", "GET", true, h_metrics},
    {"/admin/ui", "GET", true, h_ui},
    {"/admin/routes", "GET", false, h_routes},
    {"/admin/routes/*", "GET", false, h_route_get},
    {"/admin/routes/*", "PUT", false, h_route_change},
    {"/admin/routes/*", "DELETE", false, h_route_change},
    {"/admin/routes/*/state", "GET", false, h_state},
    {"/admin/routes/*/breaker", "POST", false, h_breaker},
    {"/admin/routes/*/degrade", "POST", false, h_degrade},
    {"/admin/cluster", "GET", false, h_cluster},
    {"/admin/cluster/members", "POST", false, h_member_add},
    {"/admin/cluster/members/*", "DELETE", false, h_member_remove},
    {"/admin/cluster/transfer", "POST", false, h_transfer},
};

/* Match path against pattern; the "*" segment is returned in arg. */
static bool match(const char *pattern, const char *path, const char **arg, size_t *arg_len)
{
  *arg = NULL;
  *arg_len = 0;
  while (*pattern && *path) {
    if (*pattern == '*') {
      size_t n = strcspn(path, "/");
      if (n == 0 || n > 200)
        return false;
      *arg = path;
      *arg_len = n;
      path += n;
      pattern++;
      continue;
    }
    if (*pattern != *path)
      return false;
    pattern++;
    path++;
  }
  return !*pattern && !*path;
}

bool gw_admin_handle(struct creq *q, const char *path)
{
  const char *m = q->method;
  bool is_get = strcmp(m, "GET") == 0 || strcmp(m, "HEAD") == 0;
  char allow[64] = "";
  int hit = -1;
  const char *arg = NULL;
  size_t arg_len = 0;
  for (size_t i = 0; i < sizeof(endpoints) / sizeof(endpoints[0]); i++) {
    const char *a;
    size_t al;
    if (!match(endpoints[i].pattern, path, &a, &al))
      continue;
    size_t used = strlen(allow);
    snprintf(allow + used, sizeof(allow) - used, "%s%s%s", used ? ", " : "", endpoints[i].method,
             strcmp(endpoints[i].method, "GET") == 0 ? ", HEAD" : "");
    if (strcmp(endpoints[i].method, m) == 0 || (is_get && strcmp(endpoints[i].method, "GET") == 0)) {
      hit = (int)i;
      arg = a;
      arg_len = al;
    }
  }
  if (hit < 0) {
    /* Every /admin path but the page needs the token, known or not: an unknown path must not
     * tell a caller without it which paths exist. */
    if (strncmp(path, "/admin", 6) == 0) {
      struct gw_config *cfg = gw_engine_config(q->c->eng);
      bool ok = authorized(q, cfg);
      gw_config_unref(cfg);
      if (!ok) {
        gw_control_set_error(q, 401, "unauthorized",
                             "this endpoint needs Authorization: Bearer <admin token>", NULL);
        q->www_authenticate = "Bearer realm=\"gateway admin\"";
        return true;
      }
    }
    if (allow[0]) {
      gw_control_set_gw_error(q, GW_EMETHOD_NOT_ALLOWED);
      snprintf(q->allow, sizeof(q->allow), "%s", allow);
    } else {
      gw_control_set_gw_error(q, GW_ENOT_FOUND);
    }
    return true;
  }
  struct gw_config *cfg = gw_engine_config(q->c->eng);
  bool answered = true;
  if (!endpoints[hit].open && !authorized(q, cfg)) {
    gw_control_set_error(q, 401, "unauthorized",
                         "this endpoint needs Authorization: Bearer <admin token>", NULL);
    q->www_authenticate = "Bearer realm=\"gateway admin\"";
  } else {
    answered = endpoints[hit].fn(q, cfg, arg, arg_len);
  }
  gw_config_unref(cfg);
  return answered;
}
