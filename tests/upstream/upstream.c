/* gw-upstream: a small, scriptable HTTP/1.1 origin server for the demo, the integration
 * tests and the benchmarks.
 *
 * It is built on libmicrohttpd with an internal epoll thread pool. The handler sees the raw
 * request target byte for byte: libmicrohttpd percent-decodes the URL it hands to the access
 * handler, so the target is captured earlier, in the URI log callback, which receives it
 * before any decoding. That callback also allocates the per-request state, which the
 * completion callback frees.
 *
 * Endpoints:
 *   /bench              200 "ok\n" from a shared, prebuilt response (the benchmark path)
 *   /status/NNN         status NNN, small JSON body; ?retry_after=S adds Retry-After
 *   /delay/MS           reply after MS ms; the connection is suspended and a timer thread
 *                       resumes it, so no worker thread ever sleeps
 *   /cookies            three Set-Cookie and two X-Multi response headers
 *   /size/N             N bytes of 'x'
 *   /headers?K=V&...    200 with each (percent-decoded) K: V added as a response header
 *   /__control/fail     POST {"count","status","retry_after","delay_ms"}: script failures
 *   /__control/stats    GET counters; /__control/reset POST clears counters and scripts
 *   anything else       a JSON echo of the request
 * Every response carries Upstream-Name. Input is bounded everywhere; bad input gets a 4xx.
 */
#include <arpa/inet.h>
#include <cjson/cJSON.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <microhttpd.h>
#include <netdb.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BODY_MAX_BYTES (64u * 1024u * 1024u)
#define SIZE_MAX_BYTES (256u * 1024u * 1024u)
#define DELAY_MAX_MS 600000L
#define PATHS_MAX 1024
#define TIMERS_MAX 65536
#define TARGET_MAX_BYTES 65536

/* One request. Owner: created by uri_logged(), freed by request_done(). */
struct request {
  char *target; /* raw request target, NUL-terminated */
  size_t target_len;
  char *body; /* request body; grows up to BODY_MAX_BYTES */
  size_t body_len;
  size_t body_cap;
  bool body_too_large;
  bool started;    /* the access handler has seen this request */
  bool suspended;  /* waiting for the timer thread */
  bool timer_done; /* the delay has elapsed */
  bool counted;
  /* the scripted outcome taken when the request arrived, if any */
  bool scripted;
  int script_status;
  long script_retry_after;
};

struct timer {
  uint64_t due_ms;
  struct MHD_Connection *conn;
  struct request *req;
};

/* A failure script: the next `count` non-control requests get `status` after `delay_ms`. */
struct script {
  long count;
  int status;
  long retry_after;
  long delay_ms;
};

static const char *g_name = "upstream";
static struct MHD_Daemon *g_daemon;
static struct MHD_Response *g_bench_response;

static atomic_uint_fast64_t g_received;
static atomic_uint_fast64_t g_bench_count;
static atomic_int g_script_armed;
static atomic_bool g_stopping;

/* Guarded by g_lock: the script and the per-path counters (except /bench, counted apart). */
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static struct script g_script;
static cJSON *g_by_path;
static int g_paths;

/* Guarded by g_timer_lock: a binary min-heap of pending delays. */
static pthread_mutex_t g_timer_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_timer_cond;
static struct timer g_timers[TIMERS_MAX];
static size_t g_ntimers;

static uint64_t now_ms(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* Parses a decimal integer in [min, max] from s[0..len); false on anything else. */
static bool parse_long(const char *s, size_t len, long min, long max, long *out)
{
  long v = 0;
  if (len == 0 || len > 12)
    return false;
  for (size_t i = 0; i < len; i++) {
    if (s[i] < '0' || s[i] > '9')
      return false;
    v = v * 10 + (s[i] - '0');
  }
  if (v < min || v > max)
    return false;
  *out = v;
  return true;
}

/* ---- timers -------------------------------------------------------------------------- */

static void heap_swap(size_t a, size_t b)
{
  struct timer t = g_timers[a];
  g_timers[a] = g_timers[b];
  g_timers[b] = t;
}

static void heap_push(struct timer t)
{
  size_t i = g_ntimers++;
  g_timers[i] = t;
  while (i > 0 && g_timers[(i - 1) / 2].due_ms > g_timers[i].due_ms) {
    heap_swap(i, (i - 1) / 2);
    i = (i - 1) / 2;
  }
}

static struct timer heap_pop(void)
{
  struct timer top = g_timers[0];
  g_timers[0] = g_timers[--g_ntimers];
  size_t i = 0;
  for (;;) {
    size_t l = 2 * i + 1, r = l + 1, m = i;
    if (l < g_ntimers && g_timers[l].due_ms < g_timers[m].due_ms)
      m = l;
    if (r < g_ntimers && g_timers[r].due_ms < g_timers[m].due_ms)
      m = r;
    if (m == i)
      break;
    heap_swap(i, m);
    i = m;
  }
  return top;
}

/* Suspends conn and schedules its resumption; false when the timer table is full. */
static bool delay_request(struct MHD_Connection *conn, struct request *req, long delay_ms)
{
  pthread_mutex_lock(&g_timer_lock);
  if (g_ntimers >= TIMERS_MAX || atomic_load(&g_stopping)) {
    pthread_mutex_unlock(&g_timer_lock);
    return false;
  }
  /* Suspend before the timer thread can see the entry, so a resume never precedes it. */
  req->suspended = true;
  MHD_suspend_connection(conn);
  heap_push((struct timer){now_ms() + (uint64_t)delay_ms, conn, req});
  pthread_cond_signal(&g_timer_cond);
  pthread_mutex_unlock(&g_timer_lock);
  return true;
}

static void *timer_main(void *arg)
{
  (void)arg;
  pthread_mutex_lock(&g_timer_lock);
  for (;;) {
    bool stopping = atomic_load(&g_stopping);
    uint64_t now = now_ms();
    while (g_ntimers > 0 && (stopping || g_timers[0].due_ms <= now)) {
      struct timer t = heap_pop();
      t.req->timer_done = true;
      MHD_resume_connection(t.conn);
    }
    if (stopping)
      break;
    if (g_ntimers == 0) {
      pthread_cond_wait(&g_timer_cond, &g_timer_lock);
    } else {
      uint64_t wait_ms = g_timers[0].due_ms - now;
      struct timespec ts;
      clock_gettime(CLOCK_MONOTONIC, &ts);
      ts.tv_sec += (time_t)(wait_ms / 1000u);
      ts.tv_nsec += (long)(wait_ms % 1000u) * 1000000L;
      if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
      }
      pthread_cond_timedwait(&g_timer_cond, &g_timer_lock, &ts);
    }
  }
  pthread_mutex_unlock(&g_timer_lock);
  return NULL;
}

/* ---- responses ----------------------------------------------------------------------- */

static enum MHD_Result send_buffer(struct MHD_Connection *conn, unsigned status,
                                   const char *content_type, char *body, size_t len,
                                   long retry_after)
{
  struct MHD_Response *resp = MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE);
  if (resp == NULL) {
    free(body);
    return MHD_NO;
  }
  MHD_add_response_header(resp, "Upstream-Name", g_name);
  if (content_type != NULL)
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, content_type);
  if (retry_after >= 0) {
    char buf[32];
    snprintf(buf, sizeof(buf), "%ld", retry_after);
    MHD_add_response_header(resp, MHD_HTTP_HEADER_RETRY_AFTER, buf);
  }
  enum MHD_Result ret = MHD_queue_response(conn, status, resp);
  MHD_destroy_response(resp);
  return ret;
}

/* Sends cJSON `obj` (consumed) with `status`. */
static enum MHD_Result send_json(struct MHD_Connection *conn, unsigned status, cJSON *obj,
                                 long retry_after)
{
  char *text = obj != NULL ? cJSON_PrintUnformatted(obj) : NULL;
  cJSON_Delete(obj);
  if (text == NULL)
    return MHD_NO;
  size_t len = strlen(text);
  /* 204 and 304 never carry a body (RFC 9110 sections 15.3.5 and 15.4.5). */
  if (status == 204 || status == 304)
    len = 0;
  return send_buffer(conn, status, "application/json", text, len, retry_after);
}

static enum MHD_Result send_status(struct MHD_Connection *conn, unsigned status, long retry_after)
{
  cJSON *o = cJSON_CreateObject();
  cJSON_AddStringToObject(o, "upstream", g_name);
  cJSON_AddNumberToObject(o, "status", status);
  return send_json(conn, status, o, retry_after);
}

static enum MHD_Result send_error(struct MHD_Connection *conn, unsigned status, const char *message)
{
  cJSON *o = cJSON_CreateObject();
  cJSON_AddStringToObject(o, "upstream", g_name);
  cJSON_AddStringToObject(o, "error", message);
  return send_json(conn, status, o, -1);
}

/* ---- endpoints ----------------------------------------------------------------------- */

struct echo_ctx {
  cJSON *headers;
};

static enum MHD_Result add_header(void *cls, enum MHD_ValueKind kind, const char *key,
                                  size_t key_size, const char *value, size_t value_size)
{
  struct echo_ctx *ctx = cls;
  (void)kind;
  char *k = strndup(key, key_size);
  char *v = strndup(value != NULL ? value : "", value != NULL ? value_size : 0);
  if (k != NULL && v != NULL) {
    cJSON *pair = cJSON_CreateArray();
    cJSON_AddItemToArray(pair, cJSON_CreateString(k));
    cJSON_AddItemToArray(pair, cJSON_CreateString(v));
    cJSON_AddItemToArray(ctx->headers, pair);
  }
  free(k);
  free(v);
  return MHD_YES;
}

static enum MHD_Result send_echo(struct MHD_Connection *conn, const char *method,
                                 const struct request *req)
{
  cJSON *o = cJSON_CreateObject();
  const char *q = memchr(req->target, '?', req->target_len);
  size_t path_len = q != NULL ? (size_t)(q - req->target) : req->target_len;
  char *path = strndup(req->target, path_len);
  cJSON_AddStringToObject(o, "upstream", g_name);
  cJSON_AddStringToObject(o, "method", method);
  cJSON_AddStringToObject(o, "target", req->target);
  cJSON_AddStringToObject(o, "path", path != NULL ? path : "");
  free(path);
  if (q != NULL)
    cJSON_AddStringToObject(o, "query", q + 1);
  else
    cJSON_AddNullToObject(o, "query");
  struct echo_ctx ctx = {cJSON_AddArrayToObject(o, "headers")};
  MHD_get_connection_values_n(conn, MHD_HEADER_KIND, add_header, &ctx);
  char *body = strndup(req->body != NULL ? req->body : "", req->body_len);
  cJSON_AddStringToObject(o, "body", body != NULL ? body : "");
  free(body);
  cJSON_AddNumberToObject(o, "body_len", (double)req->body_len);
  return send_json(conn, 200, o, -1);
}

static enum MHD_Result send_cookies(struct MHD_Connection *conn)
{
  static const char body[] = "cookies\n";
  struct MHD_Response *resp =
      MHD_create_response_from_buffer(sizeof(body) - 1, (void *)body, MHD_RESPMEM_PERSISTENT);
  if (resp == NULL)
    return MHD_NO;
  MHD_add_response_header(resp, "Upstream-Name", g_name);
  MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "text/plain");
  MHD_add_response_header(resp, MHD_HTTP_HEADER_SET_COOKIE, "a=1");
  MHD_add_response_header(resp, MHD_HTTP_HEADER_SET_COOKIE, "b=2");
  MHD_add_response_header(resp, MHD_HTTP_HEADER_SET_COOKIE, "c=3");
  MHD_add_response_header(resp, "X-Multi", "one");
  MHD_add_response_header(resp, "X-Multi", "two");
  enum MHD_Result ret = MHD_queue_response(conn, 200, resp);
  MHD_destroy_response(resp);
  return ret;
}

static enum MHD_Result send_size(struct MHD_Connection *conn, const char *arg, size_t len)
{
  long n;
  if (!parse_long(arg, len, 0, SIZE_MAX_BYTES, &n))
    return send_error(conn, 400, "size must be an integer from 0 to 268435456");
  char *buf = malloc((size_t)n + 1);
  if (buf == NULL)
    return send_error(conn, 503, "out of memory");
  memset(buf, 'x', (size_t)n);
  return send_buffer(conn, 200, "application/octet-stream", buf, (size_t)n, -1);
}

static int hex_value(char c)
{
  if (c >= '0' && c <= '9')
    return c - '0';
  if (c >= 'a' && c <= 'f')
    return c - 'a' + 10;
  if (c >= 'A' && c <= 'F')
    return c - 'A' + 10;
  return -1;
}

/* Percent-decodes s[0..len) ('+' is a space) into a new string; NULL if it holds a NUL. */
static char *decode_component(const char *s, size_t len)
{
  char *out = malloc(len + 1);
  size_t n = 0;
  if (out == NULL)
    return NULL;
  for (size_t i = 0; i < len; i++) {
    int hi, lo;
    if (s[i] == '%' && i + 2 < len && (hi = hex_value(s[i + 1])) >= 0 &&
        (lo = hex_value(s[i + 2])) >= 0) {
      out[n++] = (char)(hi * 16 + lo);
      i += 2;
    } else {
      out[n++] = s[i] == '+' ? ' ' : s[i];
    }
  }
  out[n] = '\0';
  if (strlen(out) != n) {
    free(out);
    return NULL;
  }
  return out;
}

/* Replies 200 with the response headers named in the query string (at most 64). */
static enum MHD_Result send_headers(struct MHD_Connection *conn, const struct request *req)
{
  static const char body[] = "headers\n";
  struct MHD_Response *resp =
      MHD_create_response_from_buffer(sizeof(body) - 1, (void *)body, MHD_RESPMEM_PERSISTENT);
  if (resp == NULL)
    return MHD_NO;
  MHD_add_response_header(resp, "Upstream-Name", g_name);
  MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "text/plain");
  const char *q = memchr(req->target, '?', req->target_len);
  const char *p = q != NULL ? q + 1 : NULL;
  int added = 0;
  while (p != NULL && *p != '\0' && added < 64) {
    const char *end = strchr(p, '&');
    size_t plen = end != NULL ? (size_t)(end - p) : strlen(p);
    const char *eq = memchr(p, '=', plen);
    if (eq != NULL && eq > p) {
      char *k = decode_component(p, (size_t)(eq - p));
      char *v = decode_component(eq + 1, plen - (size_t)(eq - p) - 1);
      /* MHD refuses names or values with CR, LF or (in names) ':' and spaces. */
      if (k != NULL && v != NULL && MHD_add_response_header(resp, k, v) == MHD_YES)
        added++;
      free(k);
      free(v);
    }
    p = end != NULL ? end + 1 : NULL;
  }
  enum MHD_Result ret = MHD_queue_response(conn, 200, resp);
  MHD_destroy_response(resp);
  return ret;
}

/* Finds "name=value" in a raw query string; the value is not decoded. */
static bool query_param(const char *query, const char *name, const char **val, size_t *len)
{
  size_t nlen = strlen(name);
  const char *p = query;
  while (p != NULL && *p != '\0') {
    const char *end = strchr(p, '&');
    size_t plen = end != NULL ? (size_t)(end - p) : strlen(p);
    if (plen > nlen && strncmp(p, name, nlen) == 0 && p[nlen] == '=') {
      *val = p + nlen + 1;
      *len = plen - nlen - 1;
      return true;
    }
    p = end != NULL ? end + 1 : NULL;
  }
  return false;
}

static enum MHD_Result send_status_endpoint(struct MHD_Connection *conn, const struct request *req,
                                            const char *arg, size_t len)
{
  long status, retry_after = -1;
  if (!parse_long(arg, len, 200, 599, &status))
    return send_error(conn, 400, "status must be an integer from 200 to 599");
  const char *q = memchr(req->target, '?', req->target_len);
  const char *v;
  size_t vlen;
  if (q != NULL && query_param(q + 1, "retry_after", &v, &vlen) &&
      !parse_long(v, vlen, 0, 86400 * 365, &retry_after))
    return send_error(conn, 400, "retry_after must be a non-negative integer");
  return send_status(conn, (unsigned)status, retry_after);
}

/* ---- control ------------------------------------------------------------------------- */

static void count_path(const char *path, size_t len)
{
  char *key = strndup(path, len > 256 ? 256 : len);
  if (key == NULL)
    return;
  pthread_mutex_lock(&g_lock);
  cJSON *item = cJSON_GetObjectItemCaseSensitive(g_by_path, key);
  if (item != NULL) {
    cJSON_SetNumberValue(item, item->valuedouble + 1);
  } else if (g_paths < PATHS_MAX) {
    cJSON_AddNumberToObject(g_by_path, key, 1);
    g_paths++;
  }
  pthread_mutex_unlock(&g_lock);
  free(key);
}

/* Takes one scripted outcome if a script is armed. */
static bool take_script(struct script *out)
{
  if (atomic_load_explicit(&g_script_armed, memory_order_relaxed) == 0)
    return false;
  bool taken = false;
  pthread_mutex_lock(&g_lock);
  if (g_script.count > 0) {
    *out = g_script;
    taken = true;
    if (--g_script.count == 0)
      atomic_store(&g_script_armed, 0);
  }
  pthread_mutex_unlock(&g_lock);
  return taken;
}

static bool json_long(const cJSON *obj, const char *name, long min, long max, long *out)
{
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, name);
  if (v == NULL)
    return true;
  if (!cJSON_IsNumber(v) || v->valuedouble < (double)min || v->valuedouble > (double)max ||
      v->valuedouble != (double)(long)v->valuedouble)
    return false;
  *out = (long)v->valuedouble;
  return true;
}

static enum MHD_Result control_fail(struct MHD_Connection *conn, const struct request *req)
{
  struct script s = {1, 500, -1, 0};
  cJSON *in = req->body_len > 0 ? cJSON_ParseWithLength(req->body, req->body_len) : NULL;
  if (!cJSON_IsObject(in)) {
    cJSON_Delete(in);
    return send_error(conn, 400, "body must be a JSON object");
  }
  long status = s.status;
  bool ok = json_long(in, "count", 0, 100000000, &s.count) &&
            json_long(in, "status", 0, 599, &status) &&
            json_long(in, "retry_after", -1, 86400 * 365, &s.retry_after) &&
            json_long(in, "delay_ms", 0, DELAY_MAX_MS, &s.delay_ms);
  cJSON_Delete(in);
  if (!ok || (status != 0 && status < 200))
    return send_error(conn, 400,
                      "count, status (0 or 200-599), retry_after, delay_ms must be integers");
  s.status = (int)status;
  pthread_mutex_lock(&g_lock);
  g_script = s;
  atomic_store(&g_script_armed, s.count > 0 ? 1 : 0);
  pthread_mutex_unlock(&g_lock);
  cJSON *o = cJSON_CreateObject();
  cJSON_AddStringToObject(o, "upstream", g_name);
  cJSON_AddNumberToObject(o, "count", (double)s.count);
  cJSON_AddNumberToObject(o, "status", s.status);
  return send_json(conn, 200, o, -1);
}

static enum MHD_Result control_stats(struct MHD_Connection *conn)
{
  cJSON *o = cJSON_CreateObject();
  cJSON_AddStringToObject(o, "upstream", g_name);
  cJSON_AddNumberToObject(o, "received", (double)atomic_load(&g_received));
  pthread_mutex_lock(&g_lock);
  cJSON *paths = cJSON_Duplicate(g_by_path, 1);
  long remaining = g_script.count;
  pthread_mutex_unlock(&g_lock);
  uint64_t bench = atomic_load(&g_bench_count);
  if (paths != NULL && bench > 0)
    cJSON_AddNumberToObject(paths, "/bench", (double)bench);
  cJSON_AddItemToObject(o, "by_path", paths != NULL ? paths : cJSON_CreateObject());
  cJSON_AddNumberToObject(o, "script_remaining", (double)remaining);
  return send_json(conn, 200, o, -1);
}

static enum MHD_Result control_reset(struct MHD_Connection *conn)
{
  pthread_mutex_lock(&g_lock);
  cJSON_Delete(g_by_path);
  g_by_path = cJSON_CreateObject();
  g_paths = 0;
  g_script = (struct script){0, 0, -1, 0};
  atomic_store(&g_script_armed, 0);
  atomic_store(&g_received, 0);
  atomic_store(&g_bench_count, 0);
  pthread_mutex_unlock(&g_lock);
  cJSON *o = cJSON_CreateObject();
  cJSON_AddStringToObject(o, "upstream", g_name);
  cJSON_AddBoolToObject(o, "reset", true);
  return send_json(conn, 200, o, -1);
}

static bool has_prefix(const char *s, size_t len, const char *prefix, size_t plen)
{
  return len >= plen && memcmp(s, prefix, plen) == 0;
}

static enum MHD_Result route(struct MHD_Connection *conn, const char *method, struct request *req)
{
  const char *t = req->target;
  const char *q = memchr(t, '?', req->target_len);
  size_t plen = q != NULL ? (size_t)(q - t) : req->target_len;

  if (plen == 6 && memcmp(t, "/bench", 6) == 0)
    return MHD_queue_response(conn, 200, g_bench_response);
  if (has_prefix(t, plen, "/status/", 8))
    return send_status_endpoint(conn, req, t + 8, plen - 8);
  if (has_prefix(t, plen, "/delay/", 7))
    return send_status(conn, 200, -1);
  if (plen == 8 && memcmp(t, "/cookies", 8) == 0)
    return send_cookies(conn);
  if (has_prefix(t, plen, "/size/", 6))
    return send_size(conn, t + 6, plen - 6);
  if (plen == 8 && memcmp(t, "/headers", 8) == 0)
    return send_headers(conn, req);
  return send_echo(conn, method, req);
}

static enum MHD_Result control(struct MHD_Connection *conn, const char *method, struct request *req,
                               const char *path, size_t plen)
{
  bool post = strcmp(method, "POST") == 0;
  if (plen == 15 && memcmp(path, "/__control/fail", 15) == 0 && post)
    return control_fail(conn, req);
  if (plen == 16 && memcmp(path, "/__control/stats", 16) == 0)
    return control_stats(conn);
  if (plen == 16 && memcmp(path, "/__control/reset", 16) == 0 && post)
    return control_reset(conn);
  return send_error(conn, 404, "unknown control endpoint or method");
}

/* Answers a request whose body is complete (or whose delay has elapsed). */
static enum MHD_Result finish(struct MHD_Connection *conn, const char *method, struct request *req)
{
  if (req->body_too_large)
    return send_error(conn, 413, "request body too large");
  if (req->scripted) {
    if (req->script_status == 0)
      return MHD_NO; /* close the connection without a reply */
    return send_status(conn, (unsigned)req->script_status, req->script_retry_after);
  }
  return route(conn, method, req);
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_data_size, void **req_cls)
{
  (void)cls;
  (void)url;
  (void)version;
  struct request *req = *req_cls;
  if (req == NULL)
    return MHD_NO;

  if (!req->started) {
    req->started = true;
    /* The benchmark path: no body, no allocation, a shared response. */
    if (req->target_len == 6 && memcmp(req->target, "/bench", 6) == 0 &&
        atomic_load_explicit(&g_script_armed, memory_order_relaxed) == 0) {
      atomic_fetch_add_explicit(&g_received, 1, memory_order_relaxed);
      atomic_fetch_add_explicit(&g_bench_count, 1, memory_order_relaxed);
      req->counted = true;
    }
    return MHD_YES;
  }

  if (*upload_data_size > 0) {
    size_t n = *upload_data_size;
    *upload_data_size = 0;
    if (req->body_too_large || req->body_len + n > BODY_MAX_BYTES) {
      req->body_too_large = true;
      return MHD_YES;
    }
    if (req->body_len + n + 1 > req->body_cap) {
      size_t cap = req->body_cap ? req->body_cap : 4096;
      while (cap < req->body_len + n + 1)
        cap *= 2;
      char *nb = realloc(req->body, cap);
      if (nb == NULL)
        return MHD_NO;
      req->body = nb;
      req->body_cap = cap;
    }
    memcpy(req->body + req->body_len, upload_data, n);
    req->body_len += n;
    req->body[req->body_len] = '\0';
    return MHD_YES;
  }

  if (req->counted && req->target_len == 6)
    return MHD_queue_response(conn, 200, g_bench_response);

  if (req->suspended) {
    if (!req->timer_done)
      return MHD_YES;
    req->suspended = false;
    return finish(conn, method, req);
  }

  const char *t = req->target;
  const char *q = memchr(t, '?', req->target_len);
  size_t plen = q != NULL ? (size_t)(q - t) : req->target_len;
  if (has_prefix(t, plen, "/__control/", 11))
    return control(conn, method, req, t, plen);

  if (!req->counted) {
    req->counted = true;
    atomic_fetch_add_explicit(&g_received, 1, memory_order_relaxed);
    if (plen == 6 && memcmp(t, "/bench", 6) == 0)
      atomic_fetch_add_explicit(&g_bench_count, 1, memory_order_relaxed);
    else
      count_path(t, plen);
    struct script s;
    long delay_ms = 0;
    if (take_script(&s)) {
      req->scripted = true;
      req->script_status = s.status;
      req->script_retry_after = s.retry_after;
      delay_ms = s.delay_ms;
    } else if (has_prefix(t, plen, "/delay/", 7)) {
      if (!parse_long(t + 7, plen - 7, 0, DELAY_MAX_MS, &delay_ms))
        return send_error(conn, 400, "delay must be an integer from 0 to 600000");
    }
    if (delay_ms > 0) {
      if (delay_request(conn, req, delay_ms))
        return MHD_YES;
      return send_error(conn, 503, "too many delayed requests");
    }
  }
  return finish(conn, method, req);
}

static void *uri_logged(void *cls, const char *uri, struct MHD_Connection *conn)
{
  (void)cls;
  (void)conn;
  struct request *req = calloc(1, sizeof(*req));
  if (req == NULL)
    return NULL;
  size_t len = strnlen(uri, TARGET_MAX_BYTES);
  req->target = strndup(uri, len);
  if (req->target == NULL) {
    free(req);
    return NULL;
  }
  req->target_len = len;
  return req;
}

static void request_done(void *cls, struct MHD_Connection *conn, void **req_cls,
                         enum MHD_RequestTerminationCode toe)
{
  (void)cls;
  (void)conn;
  (void)toe;
  struct request *req = *req_cls;
  if (req == NULL)
    return;
  free(req->target);
  free(req->body);
  free(req);
  *req_cls = NULL;
}

/* ---- main ---------------------------------------------------------------------------- */

static void usage(FILE *out)
{
  fprintf(out, "usage: gw-upstream --listen HOST:PORT [--name NAME] [--threads N]\n");
}

static bool parse_listen(const char *spec, struct sockaddr_storage *ss)
{
  char host[256];
  const char *colon = strrchr(spec, ':');
  if (colon == NULL || (size_t)(colon - spec) >= sizeof(host))
    return false;
  size_t hlen = (size_t)(colon - spec);
  memcpy(host, spec, hlen);
  host[hlen] = '\0';
  if (hlen >= 2 && host[0] == '[' && host[hlen - 1] == ']') {
    memmove(host, host + 1, hlen - 2);
    host[hlen - 2] = '\0';
  }
  long port;
  if (!parse_long(colon + 1, strlen(colon + 1), 1, 65535, &port))
    return false;
  struct addrinfo hints = {.ai_family = AF_UNSPEC,
                           .ai_socktype = SOCK_STREAM,
                           .ai_flags = AI_NUMERICHOST | AI_NUMERICSERV};
  struct addrinfo *res = NULL;
  char portbuf[8];
  snprintf(portbuf, sizeof(portbuf), "%ld", port);
  if (getaddrinfo(host, portbuf, &hints, &res) != 0 || res == NULL)
    return false;
  memcpy(ss, res->ai_addr, res->ai_addrlen);
  freeaddrinfo(res);
  return true;
}

int main(int argc, char **argv)
{
  const char *listen_spec = NULL;
  long threads = 2;
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--listen") == 0 && i + 1 < argc) {
      listen_spec = argv[++i];
    } else if (strcmp(argv[i], "--name") == 0 && i + 1 < argc) {
      g_name = argv[++i];
    } else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
      const char *v = argv[++i];
      if (!parse_long(v, strlen(v), 1, 64, &threads)) {
        fprintf(stderr, "gw-upstream: --threads must be from 1 to 64\n");
        return 2;
      }
    } else if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
      usage(stdout);
      return 0;
    } else {
      usage(stderr);
      return 2;
    }
  }
  struct sockaddr_storage addr;
  memset(&addr, 0, sizeof(addr));
  if (listen_spec == NULL || !parse_listen(listen_spec, &addr)) {
    fprintf(stderr, "gw-upstream: --listen HOST:PORT is required and must be numeric\n");
    usage(stderr);
    return 2;
  }

  /* Many idle connections are part of the benchmarks: use every descriptor allowed. */
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
  unsigned conn_limit = 60000;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
      rl.rlim_cur < conn_limit + 64)
    conn_limit = rl.rlim_cur > 128 ? (unsigned)rl.rlim_cur - 64 : 64;

  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &sigs, NULL); /* every thread inherits this mask */

  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&g_timer_cond, &ca);
  pthread_condattr_destroy(&ca);

  g_by_path = cJSON_CreateObject();
  static const char ok[] = "ok\n";
  g_bench_response =
      MHD_create_response_from_buffer(sizeof(ok) - 1, (void *)ok, MHD_RESPMEM_PERSISTENT);
  if (g_by_path == NULL || g_bench_response == NULL)
    return 1;
  MHD_add_response_header(g_bench_response, "Upstream-Name", g_name);
  MHD_add_response_header(g_bench_response, MHD_HTTP_HEADER_CONTENT_TYPE, "text/plain");

  pthread_t timer;
  if (pthread_create(&timer, NULL, timer_main, NULL) != 0)
    return 1;

  unsigned flags = MHD_USE_EPOLL_INTERNAL_THREAD | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_TURBO;
  if (addr.ss_family == AF_INET6)
    flags |= MHD_USE_IPv6;
  g_daemon = MHD_start_daemon(
      flags, 0, NULL, NULL, on_request, NULL, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&addr,
      MHD_OPTION_THREAD_POOL_SIZE, (unsigned)threads, MHD_OPTION_CONNECTION_LIMIT, conn_limit,
      MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)300, MHD_OPTION_CONNECTION_MEMORY_LIMIT,
      (size_t)(128 * 1024), MHD_OPTION_LISTEN_BACKLOG_SIZE, (unsigned)4096,
      MHD_OPTION_URI_LOG_CALLBACK, uri_logged, NULL, MHD_OPTION_NOTIFY_COMPLETED, request_done,
      NULL, MHD_OPTION_END);
  if (g_daemon == NULL) {
    fprintf(stderr, "gw-upstream: cannot listen on %s\n", listen_spec);
    return 1;
  }
  fprintf(stderr, "gw-upstream %s listening on %s (%ld threads)\n", g_name, listen_spec, threads);

  int sig = 0;
  do {
    sigwait(&sigs, &sig);
  } while (sig == SIGPIPE);

  /* Resume every delayed request (each one answers), then stop the daemon. */
  pthread_mutex_lock(&g_timer_lock);
  atomic_store(&g_stopping, true);
  pthread_cond_signal(&g_timer_cond);
  pthread_mutex_unlock(&g_timer_lock);
  pthread_join(timer, NULL);
  struct timespec pause = {0, 100 * 1000000L};
  nanosleep(&pause, NULL);
  MHD_stop_daemon(g_daemon);
  MHD_destroy_response(g_bench_response);
  cJSON_Delete(g_by_path);
  return 0;
}
