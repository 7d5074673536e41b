/*
 * The control plane listener (api_listen): /healthz, /readyz and the /v1 coordination API of
 * API.md section 4, on its own libmicrohttpd thread.
 *
 * A /v1 request is parsed and validated here (400s never reach Raft), then handed to the node
 * thread as a struct gw_node_req and its connection suspended. The node's answer arrives on the
 * node thread, which stores it and resumes the connection; when the node is not the leader the
 * request is forwarded to the leader's control plane by the forwarder thread instead (once: a
 * forwarded request is never forwarded again). Every /v1 response carries Raft-Index.
 */
#include "control.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <inttypes.h>
#include <microhttpd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include "buf.h"
#include "err.h"
#include "forward.h"
#include "fsm.h"
#include "log.h"
#include "node.h"
#include "control_int.h"

#define V1_MAX_BODY (64u << 10)

/* ---- answers ---- */

void gw_control_set_error(struct creq *q, int status, const char *code, const char *message,
                          const char *field)
{
  char buf[768];
  char esc_msg[320];
  size_t n = gw_json_escape(esc_msg, sizeof(esc_msg) - 1, message, strlen(message), NULL);
  esc_msg[n] = '\0';
  if (field)
    snprintf(buf, sizeof(buf), "{\"error\":{\"code\":\"%s\",\"message\":\"%s\",\"field\":\"%s\"}}",
             code, esc_msg, field);
  else
    snprintf(buf, sizeof(buf), "{\"error\":{\"code\":\"%s\",\"message\":\"%s\"}}", code, esc_msg);
  q->status = status;
  gw_buf_set(&q->out, buf, strlen(buf));
}

void gw_control_set_gw_error(struct creq *q, int err)
{
  gw_control_set_error(q, gw_err_status(err), gw_err_name(err), gw_strerror(err), NULL);
}

#define set_error gw_control_set_error
#define set_gw_error gw_control_set_gw_error

static enum MHD_Result send_answer(struct creq *q)
{
  struct MHD_Response *resp = MHD_create_response_from_buffer(
      q->out.len, q->out.p ? q->out.p : (char *)"", MHD_RESPMEM_PERSISTENT);
  if (!resp)
    return MHD_NO;
  if (q->out.len)
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE,
                            q->content_type ? q->content_type : "application/json");
  if (q->raft_index[0])
    MHD_add_response_header(resp, "Raft-Index", q->raft_index);
  if (q->retry_after[0])
    MHD_add_response_header(resp, "Retry-After", q->retry_after);
  if (q->www_authenticate)
    MHD_add_response_header(resp, "WWW-Authenticate", q->www_authenticate);
  if (q->allow[0])
    MHD_add_response_header(resp, "Allow", q->allow);
  q->state = C_DONE;
  enum MHD_Result ok = MHD_queue_response(q->conn, (unsigned)q->status, resp);
  MHD_destroy_response(resp);
  return ok;
}

static void set_raft_index_now(struct creq *q)
{
  if (!q->c->node)
    return;
  struct gw_node_status st;
  gw_node_status(q->c->node, &st);
  snprintf(q->raft_index, sizeof(q->raft_index), "%" PRIu64, st.applied_index);
}

/* ---- the node's answer, on the node thread ---- */

static void resume(struct creq *q)
{
  q->state = C_DONE;
  MHD_resume_connection(q->conn);
}

static void on_caught_up(struct gw_node_req *nr)
{
  struct creq *q = nr->ctx;
  free(nr->body);
  nr->body = NULL;
  resume(q);
}

static void on_forwarded(struct gw_forward_job *j)
{
  struct creq *q = j->ctx;
  if (j->failed && j->not_sent) {
    /* The leader we knew is gone and nothing reached it: wait (within the request's 5 s) for
     * the node to learn of another leader, then go there. */
    gw_buf_free(&j->resp_body);
    q->nr.avoid_leader = q->nr.leader_id;
    if (gw_node_submit(q->c->node, &q->nr) == 0)
      return;
  }
  if (j->failed) {
    if (q->nr.op == GW_NODE_WRITE)
      set_error(q, 503, "outcome_unknown",
                "the leader could not be reached: the write may or may not have been applied", NULL);
    else
      set_error(q, 503, "no_leader", "the leader could not be reached", NULL);
    snprintf(q->retry_after, sizeof(q->retry_after), "1");
  } else {
    q->status = j->status;
    gw_buf_set(&q->out, j->resp_body.p ? j->resp_body.p : "", j->resp_body.len);
    snprintf(q->raft_index, sizeof(q->raft_index), "%s", j->raft_index);
    snprintf(q->retry_after, sizeof(q->retry_after), "%s", j->retry_after);
    /* Read your writes through this node: answer once it has applied what the leader did. */
    uint64_t index = strtoull(j->raft_index, NULL, 10);
    if (index && q->c->node && q->status < 500) {
      gw_buf_free(&j->resp_body);
      memset(&q->nr, 0, sizeof(q->nr));
      q->nr.op = GW_NODE_WAIT_APPLIED;
      q->nr.id = index;
      q->nr.done = on_caught_up;
      q->nr.ctx = q;
      if (gw_node_submit(q->c->node, &q->nr) == 0)
        return;
    }
  }
  gw_buf_free(&j->resp_body);
  resume(q);
}

static bool forward(struct creq *q, const char *leader_api)
{
  struct gw_forward_job *j = &q->fj;
  memset(j, 0, sizeof(*j));
  int n = snprintf(j->url, sizeof(j->url), "http://%s%s", leader_api, q->uri);
  if (n < 0 || (size_t)n >= sizeof(j->url))
    return false;
  j->method = q->method;
  j->body = q->body.p;
  j->body_len = q->body.len;
  j->idem_key = q->idem[0] ? q->idem : NULL;
  j->authorization = MHD_lookup_connection_value(q->conn, MHD_HEADER_KIND, "Authorization");
  j->forwarded_by = q->c->node_name;
  /* A lock acquire may wait up to wait_ms on the leader before its answer. */
  j->timeout_ms = 20000 + (q->nr.op == GW_NODE_WRITE && q->nr.cmd.kind == GW_FSM_LOCK_ACQUIRE
                               ? (long)q->nr.cmd.wait_ms
                           : q->nr.op == GW_NODE_ADD_MEMBER ? 60000
                                                            : 0);
  j->done = on_forwarded;
  j->ctx = q;
  return gw_forwarder_submit(q->c->fwd, j) == 0;
}

static void on_node_done(struct gw_node_req *nr)
{
  struct creq *q = nr->ctx;
  snprintf(q->raft_index, sizeof(q->raft_index), "%" PRIu64, nr->applied_index);
  switch (nr->outcome) {
  case GW_NODE_OK:
    q->status = nr->status;
    gw_buf_set(&q->out, nr->body ? nr->body : "", nr->body_len);
    break;
  case GW_NODE_NOT_LEADER:
    if (!q->forwarded_in && nr->leader_api[0] && q->c->fwd && forward(q, nr->leader_api)) {
      free(nr->body);
      nr->body = NULL;
      return; /* answered by on_forwarded */
    }
    /* nowhere to send it */
    __attribute__((fallthrough));
  case GW_NODE_NO_LEADER:
    set_error(q, 503, "no_leader", "no Raft leader is known: retry shortly", NULL);
    snprintf(q->retry_after, sizeof(q->retry_after), "1");
    break;
  case GW_NODE_UNKNOWN:
    set_error(q, 503, "outcome_unknown",
              "the write was proposed but its commit could not be confirmed: retry with the same "
              "Idempotency-Key",
              NULL);
    snprintf(q->retry_after, sizeof(q->retry_after), "1");
    break;
  case GW_NODE_BUSY:
    set_error(q, 503, "overloaded", "the coordination queue is full: retry shortly", NULL);
    snprintf(q->retry_after, sizeof(q->retry_after), "1");
    break;
  case GW_NODE_DISK_FULL:
    set_error(q, 507, "disk_full", "this node cannot write its log (disk full): nothing was applied",
              NULL);
    snprintf(q->retry_after, sizeof(q->retry_after), "5");
    break;
  case GW_NODE_STOPPING:
    set_gw_error(q, GW_ESHUTTING_DOWN);
    break;
  }
  free(nr->body);
  nr->body = NULL;
  resume(q);
}

bool gw_control_submit(struct creq *q)
{
  q->nr.done = on_node_done;
  q->nr.ctx = q;
  q->state = C_WAIT;
  MHD_suspend_connection(q->conn);
  if (gw_node_submit(q->c->node, &q->nr) != 0) {
    set_error(q, 503, "overloaded", "the coordination queue is full: retry shortly", NULL);
    snprintf(q->retry_after, sizeof(q->retry_after), "1");
    set_raft_index_now(q);
    resume(q);
    return false;
  }
  return true;
}

/* ---- /v1 parsing ---- */

static bool json_u64(const cJSON *v, uint64_t *out)
{
  if (cJSON_IsNumber(v)) {
    double d = v->valuedouble;
    if (d < 0 || d > 9007199254740991.0 || d != (double)(uint64_t)d)
      return false;
    *out = (uint64_t)d;
    return true;
  }
  if (cJSON_IsString(v) && v->valuestring[0]) {
    char *end;
    errno = 0;
    unsigned long long x = strtoull(v->valuestring, &end, 10);
    if (errno || *end || v->valuestring[0] == '-')
      return false;
    *out = x;
    return true;
  }
  return false;
}

static bool json_i64(const cJSON *v, int64_t *out)
{
  if (!cJSON_IsNumber(v))
    return false;
  double d = v->valuedouble;
  if (d < -9007199254740991.0 || d > 9007199254740991.0 || d != (double)(int64_t)d)
    return false;
  *out = (int64_t)d;
  return true;
}

static bool parse_u64_text(const char *s, size_t len, uint64_t *out)
{
  if (len == 0 || len > 20)
    return false;
  uint64_t v = 0;
  for (size_t i = 0; i < len; i++) {
    if (s[i] < '0' || s[i] > '9')
      return false;
    uint64_t d = (uint64_t)(s[i] - '0');
    if (v > (UINT64_MAX - d) / 10)
      return false;
    v = v * 10 + d;
  }
  *out = v;
  return true;
}

/* Copy a name from the URL after validating it. */
static bool take_name(struct creq *q, const char *s, size_t len)
{
  if (!gw_fsm_name_valid(s, len)) {
    set_error(q, 400, "invalid_name", "names are 1-200 bytes of [A-Za-z0-9._:-]", NULL);
    return false;
  }
  memcpy(q->name, s, len);
  q->name[len] = '\0';
  q->nr.name = q->name;
  q->nr.name_len = len;
  return true;
}

static cJSON *parse_body(struct creq *q, bool required)
{
  if (q->body.len == 0) {
    if (required)
      set_error(q, 400, "invalid_json", "the request body must be a JSON object", NULL);
    return required ? NULL : cJSON_CreateObject();
  }
  cJSON *doc = cJSON_ParseWithLength(q->body.p, q->body.len);
  if (!doc || !cJSON_IsObject(doc)) {
    cJSON_Delete(doc);
    set_error(q, 400, "invalid_json", "the request body must be a JSON object", NULL);
    return NULL;
  }
  return doc;
}

static bool bad_field(struct creq *q, const char *field, const char *what)
{
  char msg[256];
  snprintf(msg, sizeof(msg), "%s %s", field, what);
  set_error(q, 400, "invalid_field", msg, field);
  return false;
}

/* Build the node request for a /v1 call. False with q->status/out set when it is answered here. */
static bool prepare_v1(struct creq *q, const char *path)
{
  struct gw_node_req *nr = &q->nr;
  struct gw_fsm_cmd *c = &nr->cmd;
  memset(nr, 0, sizeof(*nr));
  nr->done = on_node_done;
  nr->ctx = q;
  const char *m = q->method;
  bool get = strcmp(m, "GET") == 0 || strcmp(m, "HEAD") == 0;
  const char *consistency =
      MHD_lookup_connection_value(q->conn, MHD_GET_ARGUMENT_KIND, "consistency");
  nr->stale = consistency && strcmp(consistency, "stale") == 0;
  const char *idem = MHD_lookup_connection_value(q->conn, MHD_HEADER_KIND, "Idempotency-Key");
  if (idem && !get) {
    if (!gw_fsm_idem_key_valid(idem, strlen(idem))) {
      set_error(q, 400, "idempotency_key_invalid",
                "the Idempotency-Key must be 1-255 printable ASCII bytes", NULL);
      return false;
    }
    snprintf(q->idem, sizeof(q->idem), "%s", idem);
    c->idem_key = q->idem;
    c->idem_key_len = strlen(q->idem);
  }
  nr->op = GW_NODE_WRITE;

  /* Split "/v1/<kind>/<rest>". */
  const char *kind = path + 4;
  const char *slash = strchr(kind, '/');
  size_t kind_len = slash ? (size_t)(slash - kind) : strlen(kind);
  const char *rest = slash ? slash + 1 : NULL;
  size_t rest_len = rest ? strlen(rest) : 0;

  if (kind_len == 6 && strncmp(kind, "leases", 6) == 0) {
    if (!rest || rest_len == 0) {
      if (strcmp(m, "POST") != 0)
        goto not_allowed;
      cJSON *doc = parse_body(q, true);
      if (!doc)
        return false;
      uint64_t ttl;
      bool ok = json_u64(cJSON_GetObjectItemCaseSensitive(doc, "ttl_ms"), &ttl);
      cJSON_Delete(doc);
      if (!ok || ttl < GW_FSM_TTL_MIN_MS || ttl > GW_FSM_TTL_MAX_MS)
        return bad_field(q, "ttl_ms", "must be an integer from 1000 to 3600000");
      c->kind = GW_FSM_LEASE_GRANT;
      c->ttl_ms = ttl;
      return true;
    }
    const char *idend = memchr(rest, '/', rest_len);
    size_t idlen = idend ? (size_t)(idend - rest) : rest_len;
    uint64_t id;
    if (!parse_u64_text(rest, idlen, &id)) {
      set_error(q, 404, "lease_not_found", "no such lease", NULL);
      return false;
    }
    if (idend) {
      if (strcmp(idend, "/keepalive") != 0)
        goto not_found;
      if (strcmp(m, "POST") != 0)
        goto not_allowed;
      c->kind = GW_FSM_LEASE_KEEPALIVE;
      c->lease_id = id;
      return true;
    }
    if (get) {
      nr->op = GW_NODE_READ_LEASE;
      nr->id = id;
      return true;
    }
    if (strcmp(m, "DELETE") == 0) {
      c->kind = GW_FSM_LEASE_REVOKE;
      c->lease_id = id;
      return true;
    }
    goto not_allowed;
  }

  if (kind_len == 5 && strncmp(kind, "locks", 5) == 0) {
    if (!rest || memchr(rest, '/', rest_len))
      goto not_found;
    if (!take_name(q, rest, rest_len))
      return false;
    c->name = q->name;
    c->name_len = rest_len;
    if (get) {
      nr->op = GW_NODE_READ_LOCK;
      return true;
    }
    if (strcmp(m, "DELETE") == 0) {
      const char *tok = MHD_lookup_connection_value(q->conn, MHD_GET_ARGUMENT_KIND, "token");
      uint64_t token;
      if (!tok || !parse_u64_text(tok, strlen(tok), &token))
        return bad_field(q, "token", "must be the lock's token as a query parameter");
      c->kind = GW_FSM_LOCK_RELEASE;
      c->token = token;
      return true;
    }
    if (strcmp(m, "POST") != 0)
      goto not_allowed;
    cJSON *doc = parse_body(q, true);
    if (!doc)
      return false;
    const cJSON *owner = cJSON_GetObjectItemCaseSensitive(doc, "owner");
    const cJSON *lease = cJSON_GetObjectItemCaseSensitive(doc, "lease_id");
    const cJSON *ttl = cJSON_GetObjectItemCaseSensitive(doc, "ttl_ms");
    const cJSON *wait = cJSON_GetObjectItemCaseSensitive(doc, "wait_ms");
    bool ok = true;
    if (!cJSON_IsString(owner) || !gw_fsm_owner_valid(owner->valuestring, strlen(owner->valuestring)))
      ok = bad_field(q, "owner", "must be a string of 1-200 printable bytes");
    else
      snprintf(q->owner, sizeof(q->owner), "%s", owner->valuestring);
    if (ok && lease && !cJSON_IsNull(lease)) {
      if (!json_u64(lease, &c->lease_id) || c->lease_id == 0)
        ok = bad_field(q, "lease_id", "must be a lease id");
    } else if (ok) {
      if (!json_u64(ttl, &c->ttl_ms) || c->ttl_ms < GW_FSM_TTL_MIN_MS || c->ttl_ms > GW_FSM_TTL_MAX_MS)
        ok = bad_field(q, "ttl_ms", "must be an integer from 1000 to 3600000 when lease_id is absent");
    }
    if (ok && wait && (!json_u64(wait, &c->wait_ms) || c->wait_ms > GW_FSM_WAIT_MAX_MS))
      ok = bad_field(q, "wait_ms", "must be an integer from 0 to 60000");
    cJSON_Delete(doc);
    if (!ok)
      return false;
    c->kind = GW_FSM_LOCK_ACQUIRE;
    c->owner = q->owner;
    c->owner_len = strlen(q->owner);
    return true;
  }

  if (kind_len == 8 && strncmp(kind, "counters", 8) == 0) {
    if (!rest || memchr(rest, '/', rest_len))
      goto not_found;
    if (!take_name(q, rest, rest_len))
      return false;
    c->name = q->name;
    c->name_len = rest_len;
    if (get) {
      nr->op = GW_NODE_READ_COUNTER;
      return true;
    }
    bool post = strcmp(m, "POST") == 0, put = strcmp(m, "PUT") == 0;
    if (!post && !put)
      goto not_allowed;
    cJSON *doc = parse_body(q, true);
    if (!doc)
      return false;
    bool ok = true;
    if (post) {
      if (!json_i64(cJSON_GetObjectItemCaseSensitive(doc, "add"), &c->delta))
        ok = bad_field(q, "add", "must be an integer");
      c->kind = GW_FSM_COUNTER_ADD;
    } else {
      const cJSON *expect = cJSON_GetObjectItemCaseSensitive(doc, "expect");
      if (!json_i64(cJSON_GetObjectItemCaseSensitive(doc, "value"), &c->value))
        ok = bad_field(q, "value", "must be an integer");
      else if (expect && !cJSON_IsNull(expect)) {
        if (!json_i64(expect, &c->expect))
          ok = bad_field(q, "expect", "must be an integer");
        c->has_expect = true;
      }
      c->kind = GW_FSM_COUNTER_SET;
    }
    cJSON_Delete(doc);
    return ok;
  }

not_found:
  set_gw_error(q, GW_ENOT_FOUND);
  return false;
not_allowed:
  set_gw_error(q, GW_EMETHOD_NOT_ALLOWED);
  if (kind_len == 6 && !rest)
    snprintf(q->allow, sizeof(q->allow), "POST");
  else if (kind_len == 6 && rest && strstr(rest, "/keepalive"))
    snprintf(q->allow, sizeof(q->allow), "POST");
  else if (kind_len == 6)
    snprintf(q->allow, sizeof(q->allow), "GET, HEAD, DELETE");
  else if (kind_len == 5)
    snprintf(q->allow, sizeof(q->allow), "GET, HEAD, POST, DELETE");
  else
    snprintf(q->allow, sizeof(q->allow), "GET, HEAD, POST, PUT");
  return false;
}

/* ---- the cluster's own calls ---- */

/*
 * POST /internal/v1/fsm: a follower's shared-store command (quota leases, idempotency records)
 * proposed on the leader. The body is the encoded command; only those kinds are accepted, the
 * answer is the state machine's, and it is never forwarded again. Needs the admin token when
 * one is configured.
 */
static bool internal_fsm(struct creq *q)
{
  struct gw_control *c = q->c;
  if (strcmp(q->method, "POST") != 0) {
    set_gw_error(q, GW_EMETHOD_NOT_ALLOWED);
    snprintf(q->allow, sizeof(q->allow), "POST");
    return true;
  }
  struct gw_config *cfg = gw_engine_config(c->eng);
  bool ok = true;
  if (cfg->admin_token[0]) {
    const char *h = MHD_lookup_connection_value(q->conn, MHD_HEADER_KIND, "Authorization");
    ok = h && strncasecmp(h, "Bearer ", 7) == 0 && strcmp(h + 7, cfg->admin_token) == 0;
  }
  gw_config_unref(cfg);
  if (!ok) {
    set_error(q, 401, "unauthorized", "this endpoint needs the admin token", NULL);
    return true;
  }
  if (!c->node) {
    set_error(q, 503, "no_leader", "this node runs no coordination group", NULL);
    return true;
  }
  memset(&q->nr, 0, sizeof(q->nr));
  q->forwarded_in = true;
  if (q->too_large || gw_fsm_cmd_decode((const uint8_t *)q->body.p, q->body.len, &q->nr.cmd) != 0) {
    set_error(q, 400, "invalid_command", "the body is not a state machine command", NULL);
    return true;
  }
  uint8_t k = q->nr.cmd.kind;
  if (!((k >= GW_FSM_QUOTA_FIRST && k <= GW_FSM_QUOTA_LAST) ||
        (k >= GW_FSM_IDEM_FIRST && k <= GW_FSM_IDEM_LAST))) {
    set_error(q, 403, "forbidden", "only shared-store commands are accepted here", NULL);
    return true;
  }
  q->nr.op = GW_NODE_WRITE;
  gw_control_submit(q);
  return false;
}

struct fsm_forward {
  struct gw_forward_job job;
  void (*done)(void *arg, int status, const char *body, size_t len);
  void *arg;
  uint8_t cmd[];
};

static void on_fsm_forwarded(struct gw_forward_job *j)
{
  struct fsm_forward *f = (struct fsm_forward *)j;
  f->done(f->arg, j->failed ? 0 : j->status, j->resp_body.p ? j->resp_body.p : "",
          j->resp_body.len);
  gw_buf_free(&j->resp_body);
  free(f);
}

int gw_control_forward_fsm(void *ctx, const char *leader_api, const uint8_t *cmd, size_t len,
                           void (*done)(void *arg, int status, const char *body, size_t len),
                           void *arg)
{
  struct gw_control *c = ctx;
  if (!c->fwd || !leader_api[0])
    return -1;
  struct fsm_forward *f = calloc(1, sizeof(*f) + len);
  if (!f)
    return -1;
  memcpy(f->cmd, cmd, len);
  f->done = done;
  f->arg = arg;
  struct gw_forward_job *j = &f->job;
  snprintf(j->url, sizeof(j->url), "http://%s/internal/v1/fsm", leader_api);
  j->method = "POST";
  j->body = (const char *)f->cmd;
  j->body_len = len;
  j->content_type = "application/octet-stream";
  j->forwarded_by = c->node_name;
  j->authorization = c->internal_auth[0] ? c->internal_auth : NULL;
  j->timeout_ms = 11000;
  j->done = on_fsm_forwarded;
  j->ctx = f;
  if (gw_forwarder_submit(c->fwd, j) != 0) {
    free(f);
    return -1;
  }
  return 0;
}

/* ---- the handler ---- */

static void *on_uri(void *cls, const char *uri, struct MHD_Connection *conn)
{
  struct creq *q = calloc(1, sizeof(*q));
  if (!q)
    return NULL;
  q->c = cls;
  q->conn = conn;
  q->uri = strdup(uri);
  if (!q->uri) {
    free(q);
    return NULL;
  }
  return q;
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
  struct creq *q = *con_cls;
  *con_cls = NULL;
  if (!q)
    return;
  free(q->uri);
  gw_buf_free(&q->body);
  gw_buf_free(&q->out);
  free(q);
}

/* With replicated routes, ready once the cluster's route table (seeded from the first leader's
 * file) has been applied here: before that this node would answer from its own file. */
static bool routes_in_sync(struct gw_control *c)
{
  struct gw_config *cfg = gw_engine_config(c->eng);
  bool ok = cfg->routes_version >= c->seed_routes; /* every seeded route is one version */
  gw_config_unref(cfg);
  return ok;
}

static enum MHD_Result route(struct creq *q, const char *url)
{
  struct gw_control *c = q->c;
  bool get = strcmp(q->method, "GET") == 0 || strcmp(q->method, "HEAD") == 0;
  if (strcmp(url, "/healthz") == 0) {
    if (!get) {
      set_gw_error(q, GW_EMETHOD_NOT_ALLOWED);
      snprintf(q->allow, sizeof(q->allow), "GET, HEAD");
    } else {
      q->status = 200;
      gw_buf_set(&q->out, "{\"status\":\"ok\"}", 15);
    }
    return send_answer(q);
  }
  if (strcmp(url, "/readyz") == 0) {
    struct gw_node_status st;
    if (c->node)
      gw_node_status(c->node, &st);
    if (!get) {
      set_gw_error(q, GW_EMETHOD_NOT_ALLOWED);
      snprintf(q->allow, sizeof(q->allow), "GET, HEAD");
    } else if (!gw_engine_accepting(c->eng))
      set_gw_error(q, GW_ESHUTTING_DOWN);
    else if (c->node && st.leader_id == 0)
      set_error(q, 503, "no_leader", "no Raft leader is known yet", NULL);
    else if (c->replicated_routes && !routes_in_sync(c))
      set_error(q, 503, "not_ready", "the cluster's route table has not reached this node yet",
                NULL);
    else {
      q->status = 200;
      gw_buf_set(&q->out, "{\"status\":\"ready\"}", 18);
    }
    return send_answer(q);
  }
  if (strncmp(url, "/v1/", 4) == 0) {
    if (!c->node) {
      set_error(q, 503, "no_leader", "this node runs no coordination group", NULL);
      return send_answer(q);
    }
    if (q->too_large) {
      set_gw_error(q, GW_EBODY_TOO_LARGE);
      set_raft_index_now(q);
      return send_answer(q);
    }
    /* The path without the query: the raw target up to '?'. */
    char path[512];
    size_t pl = strcspn(q->uri, "?");
    if (pl >= sizeof(path)) {
      set_gw_error(q, GW_ENOT_FOUND);
      set_raft_index_now(q);
      return send_answer(q);
    }
    memcpy(path, q->uri, pl);
    path[pl] = '\0';
    q->forwarded_in =
        MHD_lookup_connection_value(q->conn, MHD_HEADER_KIND, "Gateway-Forwarded-By") != NULL;
    if (!prepare_v1(q, path)) {
      set_raft_index_now(q);
      return send_answer(q);
    }
    gw_control_submit(q);
    return MHD_YES;
  }
  if (strcmp(url, "/internal/v1/fsm") == 0) {
    if (internal_fsm(q))
      return send_answer(q);
    return MHD_YES;
  }
  if (strcmp(url, "/metrics") == 0 || strncmp(url, "/admin", 6) == 0) {
    char path[512];
    size_t pl = strcspn(q->uri, "?");
    if (pl >= sizeof(path)) {
      set_gw_error(q, GW_ENOT_FOUND);
      return send_answer(q);
    }
    memcpy(path, q->uri, pl);
    path[pl] = '\0';
    if (gw_admin_handle(q, path))
      return send_answer(q);
    return MHD_YES;
  }
  set_gw_error(q, GW_ENOT_FOUND);
  return send_answer(q);
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version,
                                  const char *upload_data, size_t *upload_data_size,
                                  void **con_cls)
{
  struct creq *q = *con_cls;
  if (!q)
    return MHD_NO;
  if (!q->method) {
    q->method = method;
    q->conn = conn;
    return MHD_YES;
  }
  if (q->state == C_BODY && *upload_data_size) {
    if (q->body.len + *upload_data_size > V1_MAX_BODY)
      q->too_large = true;
    else if (!gw_buf_append(&q->body, upload_data, *upload_data_size))
      return MHD_NO;
    *upload_data_size = 0;
    return MHD_YES;
  }
  if (q->state == C_WAIT)
    return MHD_YES;
  if (q->state == C_DONE)
    return send_answer(q);
  (void)version;
  return route(q, url);
}

int gw_control_start(struct gw_control **out, const struct gw_addr *addr, struct gw_engine *eng,
                     struct gw_node *node, const char *node_name, bool replicated_routes)
{
  struct gw_control *c = calloc(1, sizeof(*c));
  if (!c)
    return -1;
  c->replicated_routes = replicated_routes && node;
  pthread_mutex_init(&c->admin_mu, NULL);
  {
    struct gw_config *cfg = gw_engine_config(eng);
    c->seed_routes = cfg->routes_version ? 0 : cfg->route_count;
    if (cfg->admin_token[0])
      snprintf(c->internal_auth, sizeof(c->internal_auth), "Bearer %s", cfg->admin_token);
    gw_config_unref(cfg);
  }
  c->eng = eng;
  c->node = node;
  snprintf(c->node_name, sizeof(c->node_name), "%s", node_name ? node_name : "");
  if (node && gw_forwarder_start(&c->fwd) != 0) {
    gw_logf("error", "cannot start the leader forwarder");
    free(c);
    return -1;
  }
  int fd = socket(addr->ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  int one = 1;
  if (fd >= 0)
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (fd < 0 || bind(fd, (const struct sockaddr *)&addr->ss, addr->len) != 0 ||
      listen(fd, 1024) != 0) {
    gw_logf("error", "cannot listen on %s: %s", addr->text, strerror(errno));
    if (fd >= 0)
      close(fd);
    gw_forwarder_stop(c->fwd);
    free(c);
    return -1;
  }
  c->mhd = MHD_start_daemon(
      MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME |
          MHD_USE_ERROR_LOG,
      0, NULL, NULL, on_request, c, MHD_OPTION_EXTERNAL_LOGGER, gw_log_vlibrary, "libmicrohttpd",
      MHD_OPTION_LISTEN_SOCKET, fd, MHD_OPTION_URI_LOG_CALLBACK, on_uri, c,
      MHD_OPTION_NOTIFY_COMPLETED, on_completed, c, MHD_OPTION_CONNECTION_TIMEOUT, 60u,
      MHD_OPTION_CONNECTION_LIMIT, 4096u, MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)16384,
      MHD_OPTION_END);
  if (!c->mhd) {
    gw_logf("error", "cannot start the control listener on %s", addr->text);
    close(fd);
    gw_forwarder_stop(c->fwd);
    free(c);
    return -1;
  }
  *out = c;
  return 0;
}

void gw_control_stop_forwarding(struct gw_control *c)
{
  if (c && c->fwd) {
    gw_forwarder_stop(c->fwd);
    c->fwd = NULL;
  }
}

void gw_control_stop(struct gw_control *c)
{
  if (!c)
    return;
  gw_control_stop_forwarding(c);
  MHD_stop_daemon(c->mhd);
  free(c);
}
