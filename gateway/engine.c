/*
 * The proxy engine (see engine.h for the shape).
 *
 * Life of a request in a worker:
 *  1. libmicrohttpd's URI log callback sees the raw request target first; a request context is
 *     taken from the worker's free list and keeps the target byte for byte (the handler's url
 *     argument is percent-decoded and loses the query).
 *  2. The access handler runs: route match, then the body is gathered up to max_body_bytes.
 *  3. An easy handle (kept with the context and reused, so connections to upstreams are kept
 *     alive by the worker's multi handle) is added to the multi handle and the client connection
 *     is suspended.
 *  4. When curl reports the transfer done, the connection is resumed; libmicrohttpd calls the
 *     handler again and the response is queued from the buffers the context owns.
 *  5. The completion callback writes the access log line and returns the context to the list.
 */
#include "engine.h"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "buf.h"
#include "err.h"
#include "headers.h"
#include "log.h"
#include "pipeline.h"
#include "router.h"

#define MAX_WORKERS 256
#define FREE_REQS_MAX 1024
#define REQ_HEADERS_MAX 128 /* request headers forwarded; more is a 431 */
#define RESP_HEADERS_MAX 256

enum tag { TAG_MHD = 1, TAG_EVENT = 2, TAG_CURL = 3 };

enum req_state { REQ_NEW, REQ_BODY, REQ_UPSTREAM, REQ_FINISHING, REQ_DONE, REQ_REPLIED };

struct worker;

/* One request. Owned by its worker; lives on the free list between requests. */
struct req {
  struct req *next_free;
  struct req *up_prev, *up_next; /* the worker's list of running upstream transfers */
  struct worker *w;
  struct MHD_Connection *conn;
  struct gw_config *cfg; /* a reference for the request's lifetime */
  struct gw_route *route;
  int target;
  enum req_state state;
  int err; /* a gw_err to answer with, 0 for the upstream's response */
  bool counted;   /* counted in the worker's in-flight requests */
  bool outstanding_held;
  const char *method; /* owned by libmicrohttpd for the request's lifetime */
  struct gw_buf target_raw; /* the request target as received, NUL-terminated */
  size_t path_len;       /* bytes of target_raw before '?' */
  struct gw_buf body;
  size_t body_sent; /* bytes of body handed to curl (streamed bodies) */
  bool has_body;
  bool body_too_large;
  char request_id[208];
  char client_ip[INET6_ADDRSTRLEN];
  struct timespec started;

  CURL *easy;
  struct curl_slist *up_headers; /* points into hdr_nodes */
  struct gw_buf hdr_text;        /* the header lines, NUL-separated */
  struct gw_buf hdr_nodes;       /* the list nodes */
  size_t hdr_count;
  bool headers_built;
  struct gw_buf url;
  struct gw_resp resp; /* the answer: the upstream's response or the gateway's */
  struct gw_conn_tokens resp_conn;
  bool resp_too_large;
  long resp_content_length; /* for HEAD */

  bool p_active; /* the policy chain runs for this request */
  struct gw_preq p;
  struct gw_req_view view;
  bool suspended;
  struct timespec try_started;
  enum gw_try_result last_result;
  struct req *mbox_next; /* in the worker's mailbox: a store answered asynchronously */
  int64_t timer_at_ms; /* backoff before the next try */
  size_t heap_idx;     /* position in the worker's timer heap, SIZE_MAX when not in it */
};

struct worker {
  struct gw_engine *eng;
  int idx;
  pthread_t thread;
  int epfd, evfd, listen_fd;
  struct MHD_Daemon *mhd;
  CURLM *multi;
  int64_t curl_deadline_ms; /* -1: none */
  struct gw_config *cfg;
  unsigned cfg_gen;
  struct req *free_reqs;
  size_t free_count;
  struct req *upstreams;
  pthread_mutex_t mbox_mu; /* requests handed back by other threads (asynchronous stores) */
  struct req *mbox;
  struct req **timers; /* owned: a binary min-heap of requests waiting out a backoff */
  uint8_t *fd_state;   /* owned: lazy epoll registration of curl's sockets, 2 bytes per fd */
  size_t fd_cap;
  size_t timer_count, timer_cap;
  int inflight;
  bool resumed;
  uint64_t rng;
  struct gw_logbuf log;
};

struct gw_engine {
  pthread_mutex_t cfg_mu;
  struct gw_config *cfg;
  atomic_uint cfg_gen;
  atomic_bool draining;
  atomic_int connections;
  atomic_ullong refused;
  atomic_ullong unrouted[6];
  uint32_t max_connections;
  int64_t drain_deadline_ms;
  size_t nworkers;
  struct worker *workers;
};

static int64_t mono_ms(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static uint64_t rng_next(uint64_t *s)
{
  /* splitmix64: fast, good enough for request ids. */
  uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

/* ---- request contexts ---- */

static struct req *req_get(struct worker *w)
{
  struct req *r = w->free_reqs;
  if (r) {
    w->free_reqs = r->next_free;
    w->free_count--;
  } else {
    r = calloc(1, sizeof(*r));
    if (!r)
      return NULL;
    r->w = w;
  }
  r->next_free = NULL;
  r->state = REQ_NEW;
  r->err = 0;
  r->route = NULL;
  r->target = -1;
  r->counted = false;
  r->outstanding_held = false;
  r->method = NULL;
  r->conn = NULL;
  r->cfg = NULL;
  r->target_raw.len = 0;
  r->path_len = 0;
  r->body.len = 0;
  r->has_body = false;
  r->body_too_large = false;
  r->request_id[0] = '\0';
  r->client_ip[0] = '\0';
  gw_resp_reset(&r->resp);
  r->resp_conn.count = 0;
  r->p_active = false;
  r->suspended = false;
  r->last_result = GW_TRY_RESPONSE;
  r->heap_idx = SIZE_MAX;
  r->resp_too_large = false;
  r->resp_content_length = -1;
  clock_gettime(CLOCK_MONOTONIC, &r->started);
  return r;
}

static void req_release_outstanding(struct req *r)
{
  if (r->outstanding_held) {
    atomic_fetch_sub_explicit(&r->route->outstanding[r->target], 1, memory_order_relaxed);
    r->outstanding_held = false;
  }
}

static void req_put(struct worker *w, struct req *r)
{
  req_release_outstanding(r);
  r->up_headers = NULL;
  r->headers_built = false;
  r->hdr_count = 0;
  gw_buf_trim(&r->hdr_text, 16 * 1024);
  if (r->cfg) {
    gw_config_unref(r->cfg);
    r->cfg = NULL;
  }
  if (w->free_count >= FREE_REQS_MAX) {
    if (r->easy)
      curl_easy_cleanup(r->easy);
    free(r->target_raw.p);
    free(r->body.p);
    free(r->url.p);
    gw_buf_free(&r->hdr_text);
    gw_buf_free(&r->hdr_nodes);
    gw_buf_free(&r->resp.headers);
    gw_buf_free(&r->resp.body);
    free(r);
    return;
  }
  gw_buf_trim(&r->body, 64 * 1024);
  gw_buf_trim(&r->resp.body, 64 * 1024);
  gw_buf_trim(&r->resp.headers, 16 * 1024);
  gw_buf_trim(&r->target_raw, 8 * 1024);
  r->next_free = w->free_reqs;
  w->free_reqs = r;
  w->free_count++;
}

/* ---- responses ---- */

static ssize_t no_body(void *cls, uint64_t pos, char *buf, size_t max)
{
  (void)cls;
  (void)pos;
  (void)buf;
  (void)max;
  return MHD_CONTENT_READER_END_OF_STREAM;
}

/* Queue r->resp on the connection, with the headers every answer carries. */
static enum MHD_Result send_response(struct req *r)
{
  bool head = strcmp(r->method, "HEAD") == 0;
  struct gw_resp *rs = &r->resp;
  struct MHD_Response *resp;
  if (head && r->resp_content_length >= 0) {
    /* HEAD: the upstream's Content-Length, no body. A response of that size whose reader is
     * never called (libmicrohttpd sends no body for HEAD) gives exactly one such header. */
    resp = MHD_create_response_from_callback((uint64_t)r->resp_content_length, 4096, no_body,
                                             NULL, NULL);
  } else {
    resp = MHD_create_response_from_buffer(head ? 0 : rs->body.len,
                                           rs->body.p ? rs->body.p : (char *)"",
                                           MHD_RESPMEM_PERSISTENT);
  }
  if (!resp)
    return MHD_NO;
  const char *p = rs->headers.p;
  for (size_t i = 0; i < rs->header_count; i++) {
    const char *name = p;
    const char *value = name + strlen(name) + 1;
    p = value + strlen(value) + 1;
    if (gw_header_is_hop_by_hop(name, &r->resp_conn) || strcasecmp(name, "Content-Length") == 0 ||
        strcasecmp(name, "X-Request-Id") == 0)
      continue;
    MHD_add_response_header(resp, name, value);
  }
  if (r->request_id[0])
    MHD_add_response_header(resp, "X-Request-Id", r->request_id);
  if (r->p_active) {
    const struct gw_preq *pq = &r->p;
    if (pq->rl_set) {
      char v[512];
      if (gw_ratelimit_format_policy(v, sizeof(v), pq->route->name, &pq->rl) > 0)
        MHD_add_response_header(resp, "RateLimit-Policy", v);
      if (gw_ratelimit_format_state(v, sizeof(v), pq->route->name, &pq->rl) > 0)
        MHD_add_response_header(resp, "RateLimit", v);
    }
    if (pq->replayed)
      MHD_add_response_header(resp, "Idempotent-Replayed", "true");
  }
  if (atomic_load_explicit(&r->w->eng->draining, memory_order_relaxed))
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONNECTION, "close");
  r->state = REQ_REPLIED;
  enum MHD_Result ok = MHD_queue_response(r->conn, (unsigned)rs->status, resp);
  MHD_destroy_response(resp);
  return ok;
}

/* Answer with the gateway's own error (before or outside the policy chain). */
static enum MHD_Result reply_error(struct req *r, int err)
{
  r->err = err;
  r->resp_conn.count = 0;
  r->resp_content_length = -1;
  gw_resp_error(&r->resp, err, 0);
  return send_response(r);
}

/* ---- upstream transfers ---- */

static void upstream_link(struct worker *w, struct req *r);
static int on_curl_close(void *userp, curl_socket_t s);

static size_t on_resp_header(char *data, size_t size, size_t n, void *userp)
{
  struct req *r = userp;
  size_t len = size * n;
  if (len >= 5 && memcmp(data, "HTTP/", 5) == 0) {
    /* A new response (after a 1xx): start over. */
    gw_resp_reset(&r->resp);
    r->resp_conn.count = 0;
    r->resp_content_length = -1;
    return len;
  }
  size_t end = len;
  while (end > 0 && (data[end - 1] == '\r' || data[end - 1] == '\n'))
    end--;
  if (end == 0 || data[0] == ' ' || data[0] == '\t')
    return len; /* the blank line, or an obsolete folded line (RFC 9112 section 5.2) */
  const char *colon = memchr(data, ':', end);
  if (!colon || colon == data || r->resp.header_count >= RESP_HEADERS_MAX)
    return len;
  size_t nl = (size_t)(colon - data);
  const char *v = colon + 1;
  while (v < data + end && (*v == ' ' || *v == '\t'))
    v++;
  size_t vl = (size_t)(data + end - v);
  if (!gw_buf_reserve(&r->resp.headers, nl + vl + 2))
    return 0;
  char *dst = r->resp.headers.p + r->resp.headers.len;
  memcpy(dst, data, nl);
  dst[nl] = '\0';
  memcpy(dst + nl + 1, v, vl);
  dst[nl + 1 + vl] = '\0';
  if (strcasecmp(dst, "Connection") == 0)
    gw_conn_tokens_add(&r->resp_conn, dst + nl + 1);
  else if (strcasecmp(dst, "Content-Length") == 0)
    r->resp_content_length = strtol(dst + nl + 1, NULL, 10);
  r->resp.headers.len += nl + vl + 2;
  r->resp.header_count++;
  return len;
}

static size_t on_resp_body(char *data, size_t size, size_t n, void *userp)
{
  struct req *r = userp;
  size_t len = size * n;
  if (r->resp.body.len + len > r->cfg->max_response_bytes) {
    r->resp_too_large = true;
    return 0; /* aborts the transfer with CURLE_WRITE_ERROR */
  }
  if (!gw_buf_append(&r->resp.body, data, len))
    return 0;
  return len;
}

struct hdr_walk {
  struct req *r;
  struct gw_conn_tokens conn;
  const char *host;
  struct gw_buf xff_in;
  bool has_content_type, has_accept, failed;
  int count;
};

static enum MHD_Result collect_connection(void *cls, enum MHD_ValueKind kind, const char *key,
                                          const char *value)
{
  struct hdr_walk *hw = cls;
  if (strcasecmp(key, "Connection") == 0 && value)
    gw_conn_tokens_add(&hw->conn, value);
  return MHD_YES;
}

/*
 * One upstream request header, in curl's syntax: "Name: value"; "Name;" sends an empty value;
 * value NULL gives "Name:", which stops curl adding a default of its own. The lines live in one
 * per-request buffer and the list nodes in another (no allocation per header).
 */
static bool slist_add(struct req *r, const char *name, size_t nl, const char *value)
{
  size_t vl = value ? strlen(value) : 0;
  if (!gw_buf_reserve(&r->hdr_text, nl + vl + 3))
    return false;
  char *d = r->hdr_text.p + r->hdr_text.len;
  memcpy(d, name, nl);
  if (value && vl) {
    d[nl] = ':';
    d[nl + 1] = ' ';
    memcpy(d + nl + 2, value, vl);
    d[nl + 2 + vl] = '\0';
    r->hdr_text.len += nl + vl + 3;
  } else {
    d[nl] = value ? ';' : ':';
    d[nl + 1] = '\0';
    r->hdr_text.len += nl + 2;
  }
  r->hdr_count++;
  return true;
}

/* Link the lines of r->hdr_text into a curl_slist held in r->hdr_nodes. */
static bool slist_link(struct req *r)
{
  size_t need = r->hdr_count * sizeof(struct curl_slist);
  r->hdr_nodes.len = 0;
  if (!gw_buf_reserve(&r->hdr_nodes, need))
    return false;
  struct curl_slist *nodes = (struct curl_slist *)(void *)r->hdr_nodes.p;
  char *p = r->hdr_text.p;
  for (size_t i = 0; i < r->hdr_count; i++) {
    nodes[i].data = p;
    nodes[i].next = i + 1 < r->hdr_count ? &nodes[i + 1] : NULL;
    p += strlen(p) + 1;
  }
  r->up_headers = r->hdr_count ? nodes : NULL;
  return true;
}

static enum MHD_Result forward_header(void *cls, enum MHD_ValueKind kind, const char *key,
                                      const char *value)
{
  struct hdr_walk *hw = cls;
  struct req *r = hw->r;
  if (gw_header_is_hop_by_hop(key, &hw->conn) || strcasecmp(key, "Host") == 0 ||
      strcasecmp(key, "Content-Length") == 0 || strcasecmp(key, "Expect") == 0 ||
      strcasecmp(key, "X-Request-Id") == 0 || strcasecmp(key, "X-Forwarded-Proto") == 0 ||
      strcasecmp(key, "X-Forwarded-Host") == 0) {
    if (strcasecmp(key, "Host") == 0)
      hw->host = value;
    return MHD_YES;
  }
  if (strcasecmp(key, "X-Forwarded-For") == 0) {
    if (value && *value) {
      if (hw->xff_in.len)
        gw_buf_append(&hw->xff_in, ", ", 2);
      gw_buf_append(&hw->xff_in, value, strlen(value));
    }
    return MHD_YES;
  }
  if (++hw->count > REQ_HEADERS_MAX) {
    hw->failed = true;
    return MHD_NO;
  }
  if (strcasecmp(key, "Content-Type") == 0)
    hw->has_content_type = true;
  if (strcasecmp(key, "Accept") == 0)
    hw->has_accept = true;
  if (!slist_add(r, key, strlen(key), value))
    hw->failed = true;
  return hw->failed ? MHD_NO : MHD_YES;
}

/* RFC 9110 section 9.2.2. */
static bool method_is_idempotent(const char *m)
{
  return !strcmp(m, "GET") || !strcmp(m, "HEAD") || !strcmp(m, "OPTIONS") ||
         !strcmp(m, "TRACE") || !strcmp(m, "PUT") || !strcmp(m, "DELETE");
}

static size_t read_body(char *dst, size_t size, size_t n, void *userp)
{
  struct req *r = userp;
  size_t want = size * n, left = r->body.len - r->body_sent;
  if (want > left)
    want = left;
  if (want)
    memcpy(dst, r->body.p + r->body_sent, want);
  r->body_sent += want;
  return want;
}

static int refuse_seek(void *userp, curl_off_t offset, int origin)
{
  struct req *r = userp;
  if (offset == 0 && origin == SEEK_SET && r->body_sent == 0)
    return CURL_SEEKFUNC_OK; /* nothing was sent yet */
  return CURL_SEEKFUNC_CANTSEEK;
}

static int pick_target(struct gw_route *rt)
{
  size_t n = rt->target_count;
  uint64_t start = atomic_fetch_add_explicit(&rt->rr_next, 1, memory_order_relaxed);
  if (rt->balance == GW_BALANCE_ROUND_ROBIN || n == 1)
    return (int)(start % n);
  /* least_outstanding: the fewest in flight, ties broken round robin. */
  int best = -1, best_n = 0;
  for (size_t i = 0; i < n; i++) {
    size_t t = (start + i) % n;
    int o = atomic_load_explicit(&rt->outstanding[t], memory_order_relaxed);
    if (best < 0 || o < best_n) {
      best = (int)t;
      best_n = o;
    }
  }
  return best;
}

/* Build the request headers once per request (every try sends the same). 0 or a gw_err. */
static int build_upstream_headers(struct req *r);

static int build_upstream_headers(struct req *r)
{
  struct hdr_walk hw;
  memset(&hw, 0, sizeof(hw));
  hw.r = r;
  MHD_get_connection_values(r->conn, MHD_HEADER_KIND, collect_connection, &hw);
  MHD_get_connection_values(r->conn, MHD_HEADER_KIND, forward_header, &hw);
  char xff[4096];
  bool ok = !hw.failed;
  if (ok && gw_xff_append(xff, sizeof(xff), hw.xff_in.len ? hw.xff_in.p : NULL, r->client_ip) < 0)
    ok = false;
  free(hw.xff_in.p);
  if (!ok)
    return GW_EINVALID;
  ok = slist_add(r, "X-Forwarded-For", 15, xff) && slist_add(r, "X-Forwarded-Proto", 17, "http") &&
       (!hw.host || slist_add(r, "X-Forwarded-Host", 16, hw.host)) &&
       slist_add(r, "X-Request-Id", 12, r->request_id) &&
       /* Empty values stop curl adding its own defaults. */
       slist_add(r, "Expect", 6, NULL) && (hw.has_accept || slist_add(r, "Accept", 6, NULL)) &&
       (hw.has_content_type || slist_add(r, "Content-Type", 12, NULL));
  if (!ok || !slist_link(r))
    return GW_ENOMEM;
  r->headers_built = true;
  return 0;
}

/* Build and start one try of the upstream transfer. Returns 0 or a gw_err. */
static int start_upstream(struct req *r, uint64_t timeout_ms)
{
  struct gw_route *rt = r->route;
  r->target = pick_target(rt);
  const struct gw_target *t = &rt->targets[r->target];
  atomic_fetch_add_explicit(&rt->outstanding[r->target], 1, memory_order_relaxed);
  r->outstanding_held = true;

  /* Request target: the target's path, then the request path (less the prefix), then the
   * query, all byte for byte. */
  const char *path = r->target_raw.p;
  size_t path_len = r->path_len;
  const char *query = r->target_raw.p + r->path_len; /* "" or "?..." */
  r->url.len = 0;
  if (!gw_buf_append(&r->url, t->path, t->path_len))
    return GW_ENOMEM;
  if (rt->strip_prefix) {
    size_t cut = rt->prefix_len;
    if (cut > 0 && rt->path_prefix[cut - 1] == '/')
      cut--; /* keep the slash that separates the rest */
    path += cut;
    path_len -= cut;
    if (path_len == 0 || path[0] != '/')
      gw_buf_append(&r->url, "/", 1);
  }
  if (!gw_buf_append(&r->url, path, path_len) || !gw_buf_append(&r->url, query, strlen(query)))
    return GW_ENOMEM;

  if (!r->headers_built) {
    int err = build_upstream_headers(r);
    if (err)
      return err;
  }
  r->resp_conn.count = 0;
  r->resp_content_length = -1;
  r->resp_too_large = false;
  gw_resp_reset(&r->resp);

  /* The handle is reused with the context. Options that never change are set once; those
   * that do are all set again below (curl_easy_reset would zero and rebuild its whole state). */
  if (!r->easy) {
    r->easy = curl_easy_init();
    if (!r->easy)
      return GW_ENOMEM;
    CURL *e0 = r->easy;
    curl_easy_setopt(e0, CURLOPT_PRIVATE, r);
    curl_easy_setopt(e0, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e0, CURLOPT_PROXY, "");
    curl_easy_setopt(e0, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
    curl_easy_setopt(e0, CURLOPT_PATH_AS_IS, 1L);
    curl_easy_setopt(e0, CURLOPT_HEADERFUNCTION, on_resp_header);
    curl_easy_setopt(e0, CURLOPT_HEADERDATA, r);
    curl_easy_setopt(e0, CURLOPT_WRITEFUNCTION, on_resp_body);
    curl_easy_setopt(e0, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(e0, CURLOPT_READDATA, r);
    curl_easy_setopt(e0, CURLOPT_SEEKDATA, r);
    curl_easy_setopt(e0, CURLOPT_CLOSESOCKETFUNCTION, on_curl_close);
    curl_easy_setopt(e0, CURLOPT_CLOSESOCKETDATA, r->w);
  }
  CURL *e = r->easy;
  curl_easy_setopt(e, CURLOPT_URL, t->base);
  curl_easy_setopt(e, CURLOPT_REQUEST_TARGET, r->url.p);
  curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)rt->connect_timeout_ms);
  curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long)timeout_ms);
  curl_easy_setopt(e, CURLOPT_HTTPHEADER, r->up_headers);
  /* Back to a plain GET, then the method's own options. */
  curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
  curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, NULL);
  curl_easy_setopt(e, CURLOPT_READFUNCTION, NULL);
  curl_easy_setopt(e, CURLOPT_SEEKFUNCTION, NULL);
  if (strcmp(r->method, "HEAD") == 0) {
    curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
  } else if (r->has_body) {
    curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)r->body.len);
    if (method_is_idempotent(r->method)) {
      curl_easy_setopt(e, CURLOPT_POSTFIELDS, r->body.p ? r->body.p : "");
    } else {
      /* curl silently resends a request once when a reused connection dies before any reply.
       * For a method that is not idempotent the upstream may already have acted, so the body
       * is streamed from a source that cannot rewind: the resend fails and the client gets a
       * 502 instead of a second execution. */
      r->body_sent = 0;
      curl_easy_setopt(e, CURLOPT_POST, 1L);
      curl_easy_setopt(e, CURLOPT_POSTFIELDS, NULL);
      curl_easy_setopt(e, CURLOPT_READFUNCTION, read_body);
      curl_easy_setopt(e, CURLOPT_SEEKFUNCTION, refuse_seek);
    }
    if (strcmp(r->method, "POST") != 0)
      curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, r->method);
  } else if (strcmp(r->method, "GET") != 0) {
    curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, r->method);
  }
  if (curl_multi_add_handle(r->w->multi, e) != CURLM_OK)
    return GW_ENOMEM;
  upstream_link(r->w, r);
  return 0;
}

static void upstream_link(struct worker *w, struct req *r)
{
  r->up_prev = NULL;
  r->up_next = w->upstreams;
  if (w->upstreams)
    w->upstreams->up_prev = r;
  w->upstreams = r;
}

/* Take the transfer off the multi handle and the worker's list. */
static void upstream_unlink(struct worker *w, struct req *r)
{
  curl_multi_remove_handle(w->multi, r->easy);
  if (r->up_prev)
    r->up_prev->up_next = r->up_next;
  else if (w->upstreams == r)
    w->upstreams = r->up_next;
  if (r->up_next)
    r->up_next->up_prev = r->up_prev;
  r->up_prev = r->up_next = NULL;
}

static uint64_t now_ns(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ---- backoff timers: a binary min-heap of requests by timer_at_ms ---- */

static void heap_swap(struct worker *w, size_t i, size_t j)
{
  struct req *t = w->timers[i];
  w->timers[i] = w->timers[j];
  w->timers[j] = t;
  w->timers[i]->heap_idx = i;
  w->timers[j]->heap_idx = j;
}

static void heap_up(struct worker *w, size_t i)
{
  while (i > 0 && w->timers[(i - 1) / 2]->timer_at_ms > w->timers[i]->timer_at_ms) {
    heap_swap(w, i, (i - 1) / 2);
    i = (i - 1) / 2;
  }
}

static void heap_down(struct worker *w, size_t i)
{
  for (;;) {
    size_t l = 2 * i + 1, m = i;
    if (l < w->timer_count && w->timers[l]->timer_at_ms < w->timers[m]->timer_at_ms)
      m = l;
    if (l + 1 < w->timer_count && w->timers[l + 1]->timer_at_ms < w->timers[m]->timer_at_ms)
      m = l + 1;
    if (m == i)
      return;
    heap_swap(w, i, m);
    i = m;
  }
}

static bool timer_add(struct worker *w, struct req *r, int64_t at_ms)
{
  if (w->timer_count == w->timer_cap) {
    size_t cap = w->timer_cap ? w->timer_cap * 2 : 64;
    struct req **t = realloc(w->timers, cap * sizeof(*t));
    if (!t)
      return false;
    w->timers = t;
    w->timer_cap = cap;
  }
  r->timer_at_ms = at_ms;
  r->heap_idx = w->timer_count;
  w->timers[w->timer_count++] = r;
  heap_up(w, r->heap_idx);
  return true;
}

static void timer_remove(struct worker *w, struct req *r)
{
  size_t i = r->heap_idx;
  if (i == SIZE_MAX)
    return;
  r->heap_idx = SIZE_MAX;
  if (i != --w->timer_count) {
    w->timers[i] = w->timers[w->timer_count];
    w->timers[i]->heap_idx = i;
    heap_down(w, i);
    heap_up(w, i);
  }
}

/* ---- the life of a proxied request ---- */

/* The request is answered: run the end of the policy chain and hand the answer back. */
static void complete(struct req *r, int err)
{
  struct worker *w = r->w;
  r->err = err;
  if (err)
    gw_resp_error(&r->resp, err, 0);
  if (r->p_active && gw_pipeline_finish(&r->p, &r->view, r->last_result, err, now_ns(), &r->resp)) {
    /* The idempotency record is being stored: answer when the store says it is. */
    r->state = REQ_FINISHING;
    if (!r->suspended) {
      MHD_suspend_connection(r->conn);
      r->suspended = true;
    }
    return;
  }
  r->state = REQ_DONE;
  if (r->suspended) {
    r->suspended = false;
    MHD_resume_connection(r->conn);
    w->resumed = true;
  }
}

/* Start the next try, or answer when no try may be made. */
static void next_try(struct req *r)
{
  uint64_t timeout_ms = r->route->timeout_ms;
  if (r->p_active && !gw_pipeline_try_begin(&r->p, now_ns(), &timeout_ms)) {
    /* No (more) tries: the last try's answer stands; with none at all the breaker refused. */
    complete(r, r->p.tries ? r->err : GW_ECIRCUIT_OPEN);
    return;
  }
  clock_gettime(CLOCK_MONOTONIC, &r->try_started);
  int err = start_upstream(r, timeout_ms);
  if (err) {
    req_release_outstanding(r);
    r->last_result = GW_TRY_CONNECT_FAILURE;
    complete(r, err);
  }
}

static void finish_upstream(struct worker *w, struct req *r, CURLcode rc)
{
  upstream_unlink(w, r);
  req_release_outstanding(r);
  int status = 0;
  if (rc == CURLE_OK) {
    long st = 0;
    curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &st);
    r->resp.status = status = (int)st;
    r->err = 0;
    r->last_result = GW_TRY_RESPONSE;
  } else if (r->resp_too_large) {
    r->err = GW_EUPSTREAM_RESPONSE_TOO_LARGE;
    r->last_result = GW_TRY_TIMEOUT; /* sent and answered, but unusable: the upstream saw it */
  } else {
    /* Pre-transfer time stays 0 until a connection (new or reused) is ready: a failure before
     * that is a failed connect, after it the upstream saw the request. */
    curl_off_t ready = 0;
    curl_easy_getinfo(r->easy, CURLINFO_PRETRANSFER_TIME_T, &ready);
    if (ready == 0) {
      r->err = GW_EUPSTREAM_UNAVAILABLE;
      r->last_result = GW_TRY_CONNECT_FAILURE;
    } else if (rc == CURLE_OPERATION_TIMEDOUT) {
      r->err = GW_EUPSTREAM_TIMEOUT;
      r->last_result = GW_TRY_TIMEOUT;
    } else {
      r->err = GW_EUPSTREAM_UNAVAILABLE; /* reset or closed after the request was sent */
      r->last_result = GW_TRY_TIMEOUT;
    }
  }
  if (r->p_active) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    uint64_t took_ms = (uint64_t)((now.tv_sec - r->try_started.tv_sec) * 1000 +
                                  (now.tv_nsec - r->try_started.tv_nsec) / 1000000);
    int64_t retry_after_ms = -1;
    const char *ra = rc == CURLE_OK ? gw_resp_header(&r->resp, "Retry-After") : NULL;
    uint64_t ra_ms;
    if (ra && gw_retry_after_parse_seconds(ra, strlen(ra), &ra_ms) == 0)
      retry_after_ms = (int64_t)ra_ms;
    uint64_t delay_ms = 0;
    if (gw_pipeline_try_end(&r->p, r->last_result, status, retry_after_ms, took_ms, now_ns(),
                            &delay_ms)) {
      if (delay_ms == 0) {
        next_try(r);
      } else if (!timer_add(w, r, mono_ms() + (int64_t)delay_ms)) {
        complete(r, r->err);
      }
      return;
    }
  }
  complete(r, r->err);
}

/* Start the tries whose backoff has ended. */
static void run_timers(struct worker *w)
{
  int64_t now = mono_ms();
  while (w->timer_count && w->timers[0]->timer_at_ms <= now) {
    struct req *r = w->timers[0];
    timer_remove(w, r);
    next_try(r);
  }
}

static void check_multi(struct worker *w)
{
  CURLMsg *m;
  int left;
  while ((m = curl_multi_info_read(w->multi, &left))) {
    if (m->msg != CURLMSG_DONE)
      continue;
    struct req *r = NULL;
    curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&r);
    CURLcode rc = m->data.result;
    if (r)
      finish_upstream(w, r, rc);
  }
}

/*
 * curl's sockets in the worker's epoll. Registration is lazy: when curl stops watching a socket
 * (a keep-alive connection going back to the pool) it stays registered, so the next request on
 * that connection costs no epoll_ctl. An event on a socket curl does not watch removes it then;
 * curl's close callback removes it before the descriptor can be reused.
 */
enum { FD_IN = 1, FD_OUT = 2, FD_REGISTERED = 4 };

static uint8_t *fd_slot(struct worker *w, int fd)
{
  if (fd < 0)
    return NULL;
  if ((size_t)fd >= w->fd_cap) {
    size_t cap = w->fd_cap ? w->fd_cap : 256;
    while (cap <= (size_t)fd)
      cap *= 2;
    uint8_t *p = realloc(w->fd_state, cap * 2);
    if (!p)
      return NULL;
    memset(p + w->fd_cap * 2, 0, (cap - w->fd_cap) * 2);
    w->fd_state = p;
    w->fd_cap = cap;
  }
  return &w->fd_state[fd * 2]; /* [0]: registered mask, [1]: wanted mask */
}

static void fd_apply(struct worker *w, int fd, uint8_t *st)
{
  uint8_t want = st[1];
  if ((st[0] & FD_REGISTERED) && (want == 0 || (st[0] & (FD_IN | FD_OUT)) == want))
    return; /* nothing to change (an unwanted socket is dropped when it fires) */
  struct epoll_event ev;
  memset(&ev, 0, sizeof(ev));
  ev.events = ((want & FD_IN) ? EPOLLIN : 0) | ((want & FD_OUT) ? EPOLLOUT : 0);
  ev.data.u64 = ((uint64_t)TAG_CURL << 32) | (uint32_t)fd;
  if (want == 0)
    return;
  int op = (st[0] & FD_REGISTERED) ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;
  if (epoll_ctl(w->epfd, op, fd, &ev) != 0) {
    op = op == EPOLL_CTL_MOD ? EPOLL_CTL_ADD : EPOLL_CTL_MOD;
    if (epoll_ctl(w->epfd, op, fd, &ev) != 0)
      return;
  }
  st[0] = FD_REGISTERED | want;
}

static void fd_forget(struct worker *w, int fd)
{
  uint8_t *st = fd_slot(w, fd);
  if (st && (st[0] & FD_REGISTERED))
    epoll_ctl(w->epfd, EPOLL_CTL_DEL, fd, NULL);
  if (st)
    st[0] = st[1] = 0;
}

static int on_curl_socket(CURL *e, curl_socket_t s, int what, void *userp, void *socketp)
{
  struct worker *w = userp;
  uint8_t *st = fd_slot(w, s);
  if (!st) {
    /* no memory for the lazy table: register eagerly */
    struct epoll_event ev = {.events = ((what & CURL_POLL_IN) ? EPOLLIN : 0) |
                                       ((what & CURL_POLL_OUT) ? EPOLLOUT : 0),
                             .data.u64 = ((uint64_t)TAG_CURL << 32) | (uint32_t)s};
    if (what == CURL_POLL_REMOVE)
      epoll_ctl(w->epfd, EPOLL_CTL_DEL, s, NULL);
    else if (epoll_ctl(w->epfd, EPOLL_CTL_MOD, s, &ev) != 0)
      epoll_ctl(w->epfd, EPOLL_CTL_ADD, s, &ev);
    return 0;
  }
  st[1] = what == CURL_POLL_REMOVE ? 0
                                   : (uint8_t)(((what & CURL_POLL_IN) ? FD_IN : 0) |
                                               ((what & CURL_POLL_OUT) ? FD_OUT : 0));
  fd_apply(w, s, st);
  return 0;
}

static int on_curl_close(void *userp, curl_socket_t s)
{
  fd_forget(userp, s);
  return close(s);
}

static int on_curl_timer(CURLM *m, long timeout_ms, void *userp)
{
  struct worker *w = userp;
  w->curl_deadline_ms = timeout_ms < 0 ? -1 : mono_ms() + timeout_ms;
  return 0;
}

/* ---- libmicrohttpd callbacks ---- */

static void *on_uri(void *cls, const char *uri, struct MHD_Connection *conn)
{
  struct worker *w = cls;
  struct req *r = req_get(w);
  if (!r)
    return NULL;
  r->conn = conn;
  size_t n = strlen(uri);
  if (!gw_buf_append(&r->target_raw, uri, n)) {
    req_put(w, r);
    return NULL;
  }
  const char *q = memchr(r->target_raw.p, '?', n);
  r->path_len = q ? (size_t)(q - r->target_raw.p) : n;
  return r;
}

static void set_request_id(struct req *r)
{
  const char *in = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, "X-Request-Id");
  if (in && gw_request_id_is_valid(in)) {
    snprintf(r->request_id, sizeof(r->request_id), "%s", in);
    return;
  }
  gw_request_id_format(r->request_id, rng_next(&r->w->rng), rng_next(&r->w->rng));
}

static void set_client_ip(struct req *r)
{
  const union MHD_ConnectionInfo *ci =
      MHD_get_connection_info(r->conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
  const struct sockaddr *sa = ci ? ci->client_addr : NULL;
  if (sa && sa->sa_family == AF_INET)
    inet_ntop(AF_INET, &((const struct sockaddr_in *)sa)->sin_addr, r->client_ip,
              sizeof(r->client_ip));
  else if (sa && sa->sa_family == AF_INET6)
    inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)sa)->sin6_addr, r->client_ip,
              sizeof(r->client_ip));
  else
    snprintf(r->client_ip, sizeof(r->client_ip), "unknown");
}

struct framing {
  int lengths;
  bool conflict;
  const char *first;
};

static enum MHD_Result count_framing(void *cls, enum MHD_ValueKind kind, const char *key,
                                     const char *value)
{
  struct framing *f = cls;
  if (strcasecmp(key, "Content-Length") == 0) {
    if (f->lengths++ > 0 && (!value || !f->first || strcmp(value, f->first) != 0))
      f->conflict = true;
  }
  return MHD_YES;
}

/* First call for a request: route, limits, ids. Returns 0 or a gw_err to answer with. */
static void refresh_config(struct worker *w);

static int begin_request(struct req *r)
{
  struct worker *w = r->w;
  refresh_config(w); /* a change made a moment ago applies to this request already */
  r->cfg = gw_config_ref(w->cfg);
  w->inflight++;
  r->counted = true;
  set_request_id(r);
  set_client_ip(r);
  if (atomic_load_explicit(&w->eng->draining, memory_order_relaxed) &&
      w->eng->drain_deadline_ms && mono_ms() > w->eng->drain_deadline_ms)
    return GW_ESHUTTING_DOWN;
  const char *host = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, "Host");
  /* Paths are matched as received: a percent-encoded path only matches its encoded prefix. */
  r->route = gw_router_match(r->cfg, r->method, r->target_raw.p, r->path_len, host);
  if (!r->route)
    return GW_EROUTE_NOT_FOUND;
  const char *cl = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, "Content-Length");
  const char *te = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, "Transfer-Encoding");
  /* RFC 9112 section 6.3: conflicting framing is an error (and a smuggling vector). */
  struct framing f = {0, 0, cl};
  MHD_get_connection_values(r->conn, MHD_HEADER_KIND, count_framing, &f);
  if (f.conflict || (cl && te))
    return GW_EINVALID;
  if (cl) {
    char *end;
    errno = 0;
    unsigned long long v = strtoull(cl, &end, 10);
    if (errno || *end || end == cl)
      return GW_EINVALID;
    if (v > r->cfg->max_body_bytes)
      return GW_EBODY_TOO_LARGE;
    r->has_body = true;
  }
  if (te)
    r->has_body = true;
  return 0;
}

/* A store answered on its own thread: hand the request back to its worker. */
static void wake_req(void *ctx)
{
  struct req *r = ctx;
  struct worker *w = r->w;
  pthread_mutex_lock(&w->mbox_mu);
  r->mbox_next = w->mbox;
  w->mbox = r;
  pthread_mutex_unlock(&w->mbox_mu);
  uint64_t one = 1;
  if (write(w->evfd, &one, sizeof(one)) < 0) {
    /* the worker drains its mailbox at its next turn anyway */
  }
}

/* Run the policy chain as far as it goes. In the handler (not yet suspended) an answer is
 * queued at once; otherwise the connection is resumed with it. */
static enum MHD_Result continue_pipeline(struct req *r)
{
  if (r->state == REQ_FINISHING) {
    gw_pipeline_finish_done(&r->p);
    r->state = REQ_DONE;
    r->suspended = false;
    MHD_resume_connection(r->conn);
    r->w->resumed = true;
    return MHD_YES;
  }
  enum gw_step st = gw_pipeline_begin(&r->p, &r->view, now_ns(), &r->resp);
  if (st == GW_STEP_ANSWER) {
    bool in_handler = !r->suspended;
    complete(r, 0);
    return in_handler && r->state == REQ_DONE ? send_response(r) : MHD_YES;
  }
  r->state = REQ_UPSTREAM;
  if (!r->suspended) {
    MHD_suspend_connection(r->conn);
    r->suspended = true;
  }
  if (st == GW_STEP_PROXY)
    next_try(r);
  return MHD_YES;
}

static void drain_mailbox(struct worker *w)
{
  pthread_mutex_lock(&w->mbox_mu);
  struct req *list = w->mbox;
  w->mbox = NULL;
  pthread_mutex_unlock(&w->mbox_mu);
  while (list) {
    struct req *r = list;
    list = r->mbox_next;
    r->mbox_next = NULL;
    continue_pipeline(r);
  }
}

static const char *lookup_header(void *ctx, const char *name)
{
  struct req *r = ctx;
  return MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, name);
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version,
                                  const char *upload_data, size_t *upload_data_size,
                                  void **con_cls)
{
  struct worker *w = cls;
  struct req *r = *con_cls;
  if (!r) {
    /* No URI callback ran (out of memory there): refuse and close. */
    return MHD_NO;
  }
  switch (r->state) {
  case REQ_NEW: {
    r->conn = conn;
    r->method = method;
    r->state = REQ_BODY;
    int err = begin_request(r);
    if (err)
      return reply_error(r, err);
    return MHD_YES;
  }
  case REQ_BODY:
    if (*upload_data_size) {
      if (!r->body_too_large) {
        if (r->body.len + *upload_data_size > r->cfg->max_body_bytes)
          r->body_too_large = true;
        else if (!gw_buf_append(&r->body, upload_data, *upload_data_size))
          return MHD_NO;
      }
      *upload_data_size = 0;
      return MHD_YES;
    }
    if (r->body_too_large)
      return reply_error(r, GW_EBODY_TOO_LARGE);
    r->view = (struct gw_req_view){
        .method = r->method,
        .target = r->target_raw.p,
        .target_len = r->target_raw.len,
        .path_len = r->path_len,
        .body = r->body.p ? r->body.p : "",
        .body_len = r->body.len,
        .client_ip = r->client_ip,
        .header = lookup_header,
        .ctx = r,
    };
    gw_pipeline_init(&r->p, r->route, now_ns());
    r->p.wake = wake_req;
    r->p.wake_ctx = r;
    r->p_active = true;
    return continue_pipeline(r);
  case REQ_UPSTREAM:
  case REQ_FINISHING:
    return MHD_YES; /* spurious call while suspended */
  case REQ_DONE:
    return send_response(r);
  case REQ_REPLIED:
    return MHD_YES;
  }
  (void)w;
  (void)url;
  (void)version;
  return MHD_NO;
}

static void access_log(struct worker *w, struct req *r, enum MHD_RequestTerminationCode toe)
{
  struct timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  double ms = (double)(now.tv_sec - r->started.tv_sec) * 1e3 +
              (double)(now.tv_nsec - r->started.tv_nsec) / 1e6;
  char *line = gw_logbuf_reserve(&w->log);
  struct gw_jbuf j;
  gw_log_begin(&j, line, GW_LOG_LINE_MAX, "info", NULL);
  gw_jbuf_str(&j, "type", "access");
  gw_jbuf_str(&j, "route", r->route ? r->route->name : NULL);
  gw_jbuf_str(&j, "method", r->method);
  gw_jbuf_strn(&j, "path", r->target_raw.p, r->path_len);
  gw_jbuf_int(&j, "status", r->resp.status);
  gw_jbuf_str(&j, "upstream", r->route && r->target >= 0 ? r->route->targets[r->target].base : NULL);
  gw_jbuf_num(&j, "duration_ms", ms);
  gw_jbuf_str(&j, "request_id", r->request_id);
  gw_jbuf_str(&j, "client", r->client_ip);
  if (r->err)
    gw_jbuf_str(&j, "error", gw_err_name(r->err));
  if (toe != MHD_REQUEST_TERMINATED_COMPLETED_OK)
    gw_jbuf_str(&j, "aborted", "client connection closed before the response was sent");
  gw_logbuf_commit(&w->log, gw_jbuf_end(&j));
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
  struct worker *w = cls;
  struct req *r = *con_cls;
  *con_cls = NULL;
  if (!r)
    return;
  if (r->state == REQ_UPSTREAM) {
    /* The client went away while the upstream transfer ran or a backoff waited (shutdown). */
    if (r->heap_idx != SIZE_MAX)
      timer_remove(w, r);
    else
      upstream_unlink(w, r);
    req_release_outstanding(r);
    gw_resp_error(&r->resp, GW_ESHUTTING_DOWN, 0);
    if (r->p_active)
      gw_pipeline_finish(&r->p, &r->view, r->last_result, GW_ESHUTTING_DOWN, now_ns(), &r->resp);
  }
  if (r->p_active && r->p.rt && r->state != REQ_FINISHING) /* cannot happen: defensive */
    gw_pipeline_finish(&r->p, &r->view, r->last_result, r->err, now_ns(), &r->resp);
  if (r->counted) {
    if (!r->p_active) {
      int st = r->resp.status;
      atomic_fetch_add_explicit(&w->eng->unrouted[st >= 100 && st < 600 ? st / 100 : 0], 1,
                                memory_order_relaxed);
    }
    if (r->method)
      access_log(w, r, toe);
    w->inflight--;
  }
  req_put(w, r);
}

static void on_connection(void *cls, struct MHD_Connection *conn, void **socket_context,
                          enum MHD_ConnectionNotificationCode toe)
{
  struct worker *w = cls;
  if (toe == MHD_CONNECTION_NOTIFY_STARTED) {
    atomic_fetch_add_explicit(&w->eng->connections, 1, memory_order_relaxed);
    *socket_context = w;
  } else if (toe == MHD_CONNECTION_NOTIFY_CLOSED && *socket_context) {
    atomic_fetch_sub_explicit(&w->eng->connections, 1, memory_order_relaxed);
  }
}

static enum MHD_Result on_accept(void *cls, const struct sockaddr *addr, socklen_t addrlen)
{
  struct gw_engine *e = cls;
  if ((uint32_t)atomic_load_explicit(&e->connections, memory_order_relaxed) >=
      e->max_connections) {
    if (atomic_fetch_add_explicit(&e->refused, 1, memory_order_relaxed) % 1000 == 0)
      gw_logf("warn", "max_connections (%u) reached: refusing new connections",
              e->max_connections);
    return MHD_NO;
  }
  return MHD_YES;
}

/* ---- the worker loop ---- */

static void refresh_config(struct worker *w)
{
  struct gw_engine *e = w->eng;
  unsigned gen = atomic_load_explicit(&e->cfg_gen, memory_order_acquire);
  if (gen == w->cfg_gen)
    return;
  pthread_mutex_lock(&e->cfg_mu);
  struct gw_config *next = gw_config_ref(e->cfg);
  w->cfg_gen = atomic_load_explicit(&e->cfg_gen, memory_order_relaxed);
  pthread_mutex_unlock(&e->cfg_mu);
  gw_config_unref(w->cfg);
  w->cfg = next;
}

/* At the end of the grace period: answer whatever still waits on an upstream. */
static void abort_upstreams(struct worker *w)
{
  while (w->upstreams) {
    struct req *r = w->upstreams;
    upstream_unlink(w, r);
    req_release_outstanding(r);
    complete(r, GW_ESHUTTING_DOWN);
  }
  while (w->timer_count) {
    struct req *r = w->timers[0];
    timer_remove(w, r);
    complete(r, GW_ESHUTTING_DOWN);
  }
}

static void *worker_main(void *arg)
{
  struct worker *w = arg;
  struct gw_engine *e = w->eng;
  struct epoll_event evs[64];
  bool quiesced = false;
  for (;;) {
    refresh_config(w);
    int64_t now = mono_ms();
    bool draining = atomic_load_explicit(&e->draining, memory_order_acquire);
    if (draining && !quiesced) {
      int fd = MHD_quiesce_daemon(w->mhd);
      if (fd >= 0)
        close(fd);
      quiesced = true;
    }
    if (draining && w->inflight == 0)
      break;
    if (draining && now >= e->drain_deadline_ms) {
      abort_upstreams(w);
      MHD_run(w->mhd);
      if (w->inflight == 0 || now >= e->drain_deadline_ms + 1000)
        break;
    }

    int timeout = 1000;
    MHD_UNSIGNED_LONG_LONG mhd_to;
    if (MHD_get_timeout(w->mhd, &mhd_to) == MHD_YES && mhd_to < (MHD_UNSIGNED_LONG_LONG)timeout)
      timeout = (int)mhd_to;
    if (w->curl_deadline_ms >= 0) {
      int64_t d = w->curl_deadline_ms - now;
      if (d < 0)
        d = 0;
      if (d < timeout)
        timeout = (int)d;
    }
    if (w->timer_count) {
      int64_t d = w->timers[0]->timer_at_ms - now;
      if (d < 0)
        d = 0;
      if (d < timeout)
        timeout = (int)d;
    }
    if (draining && timeout > 50)
      timeout = 50;
    if (w->log.len)
      gw_logbuf_flush(&w->log);

    int n = epoll_wait(w->epfd, evs, 64, timeout);
    bool run_mhd = false;
    for (int i = 0; i < n; i++) {
      uint32_t tag = (uint32_t)(evs[i].data.u64 >> 32);
      if (tag == TAG_MHD) {
        run_mhd = true;
      } else if (tag == TAG_EVENT) {
        uint64_t v;
        if (read(w->evfd, &v, sizeof(v)) < 0) {
          /* nothing to do: the counter is reset either way */
        }
        drain_mailbox(w);
      } else if (tag == TAG_CURL) {
        int fd = (int)(uint32_t)evs[i].data.u64;
        uint8_t *st = fd_slot(w, fd);
        if (st && st[1] == 0) {
          fd_forget(w, fd); /* curl no longer watches it: a pooled connection closed or spoke */
          continue;
        }
        int flags = 0, running;
        if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))
          flags |= CURL_CSELECT_IN;
        if (evs[i].events & EPOLLOUT)
          flags |= CURL_CSELECT_OUT;
        if (evs[i].events & EPOLLERR)
          flags |= CURL_CSELECT_ERR;
        curl_multi_socket_action(w->multi, fd, flags, &running);
      }
    }
    if (w->curl_deadline_ms >= 0 && mono_ms() >= w->curl_deadline_ms) {
      int running;
      w->curl_deadline_ms = -1;
      curl_multi_socket_action(w->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    }
    check_multi(w);
    run_timers(w);
    if (n == 0 || run_mhd || w->resumed) {
      w->resumed = false;
      MHD_run(w->mhd);
      check_multi(w); /* requests queued by the run may already have failed */
      if (w->resumed) {
        w->resumed = false;
        MHD_run(w->mhd);
      }
    }
  }
  if (w->log.len)
    gw_logbuf_flush(&w->log);
  return NULL;
}

static int listen_socket(const struct gw_addr *a)
{
  int fd = socket(a->ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return -1;
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
  if (bind(fd, (const struct sockaddr *)&a->ss, a->len) != 0 || listen(fd, 4096) != 0) {
    int saved = errno;
    close(fd);
    errno = saved;
    return -1;
  }
  return fd;
}

static int worker_init(struct worker *w, const struct gw_config *cfg)
{
  w->curl_deadline_ms = -1;
  pthread_mutex_init(&w->mbox_mu, NULL);
  w->epfd = epoll_create1(EPOLL_CLOEXEC);
  w->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (w->epfd < 0 || w->evfd < 0)
    return -1;
  if (getrandom(&w->rng, sizeof(w->rng), 0) != sizeof(w->rng))
    w->rng = (uint64_t)mono_ms() ^ ((uint64_t)w->idx << 32);

  unsigned idle_s = (unsigned)((cfg->idle_timeout_ms + 999) / 1000);
  w->mhd = MHD_start_daemon(
      MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_TURBO | MHD_USE_ERROR_LOG, 0, on_accept,
      w->eng, on_request, w, MHD_OPTION_EXTERNAL_LOGGER, gw_log_vlibrary, "libmicrohttpd",
      MHD_OPTION_LISTEN_SOCKET, w->listen_fd, MHD_OPTION_URI_LOG_CALLBACK,
      on_uri, w, MHD_OPTION_NOTIFY_COMPLETED, on_completed, w, MHD_OPTION_NOTIFY_CONNECTION,
      on_connection, w, MHD_OPTION_CONNECTION_TIMEOUT, idle_s, MHD_OPTION_CONNECTION_LIMIT,
      (unsigned)cfg->max_connections, MHD_OPTION_CONNECTION_MEMORY_LIMIT,
      (size_t)cfg->connection_memory_bytes, MHD_OPTION_END);
  if (!w->mhd)
    return -1;
  const union MHD_DaemonInfo *info = MHD_get_daemon_info(w->mhd, MHD_DAEMON_INFO_EPOLL_FD);
  if (!info)
    return -1;
  struct epoll_event ev;
  memset(&ev, 0, sizeof(ev));
  ev.events = EPOLLIN;
  ev.data.u64 = (uint64_t)TAG_MHD << 32;
  if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, info->epoll_fd, &ev) != 0)
    return -1;
  ev.data.u64 = (uint64_t)TAG_EVENT << 32;
  if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, w->evfd, &ev) != 0)
    return -1;

  w->multi = curl_multi_init();
  if (!w->multi)
    return -1;
  curl_multi_setopt(w->multi, CURLMOPT_SOCKETFUNCTION, on_curl_socket);
  curl_multi_setopt(w->multi, CURLMOPT_SOCKETDATA, w);
  curl_multi_setopt(w->multi, CURLMOPT_TIMERFUNCTION, on_curl_timer);
  curl_multi_setopt(w->multi, CURLMOPT_TIMERDATA, w);
  curl_multi_setopt(w->multi, CURLMOPT_MAXCONNECTS, 1024L);
  return 0;
}

static void curl_init_once(void) { curl_global_init(CURL_GLOBAL_DEFAULT); }

int gw_engine_start(struct gw_engine **out, struct gw_config *cfg)
{
  static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
  pthread_once(&curl_once, curl_init_once);
  struct gw_engine *e = calloc(1, sizeof(*e));
  if (!e)
    return -1;
  pthread_mutex_init(&e->cfg_mu, NULL);
  e->cfg = gw_config_ref(cfg);
  atomic_init(&e->cfg_gen, 1);
  e->max_connections = cfg->max_connections;
  long cores = sysconf(_SC_NPROCESSORS_ONLN);
  e->nworkers = cfg->workers ? cfg->workers : (size_t)(cores > 0 ? cores : 1);
  if (e->nworkers > MAX_WORKERS)
    e->nworkers = MAX_WORKERS;
  e->workers = calloc(e->nworkers, sizeof(*e->workers));
  if (!e->workers)
    goto fail;
  for (size_t i = 0; i < e->nworkers; i++) {
    e->workers[i].epfd = e->workers[i].evfd = e->workers[i].listen_fd = -1;
    e->workers[i].eng = e;
  }
  /* SO_REUSEPORT would let this process share a port another server holds: bind once without
   * it first, so "address in use" means what it says. */
  int probe = socket(cfg->listen.ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int reuse = 1;
  if (probe >= 0)
    setsockopt(probe, SOL_SOCKET, SO_REUSEADDR, &reuse, sizeof(reuse)); /* TIME_WAIT is fine */
  if (probe >= 0 && bind(probe, (const struct sockaddr *)&cfg->listen.ss, cfg->listen.len) != 0) {
    gw_logf("error", "cannot listen on %s: %s", cfg->listen.text, strerror(errno));
    close(probe);
    goto fail;
  }
  if (probe >= 0)
    close(probe);
  for (size_t i = 0; i < e->nworkers; i++) {
    struct worker *w = &e->workers[i];
    w->eng = e;
    w->idx = (int)i;
    w->listen_fd = listen_socket(&cfg->listen);
    if (w->listen_fd < 0) {
      gw_logf("error", "cannot listen on %s: %s", cfg->listen.text, strerror(errno));
      goto fail;
    }
    w->cfg = gw_config_ref(cfg);
    w->cfg_gen = 1;
    if (worker_init(w, cfg) != 0) {
      gw_logf("error", "cannot start worker %zu: %s", i, strerror(errno));
      goto fail;
    }
  }
  for (size_t i = 0; i < e->nworkers; i++)
    if (pthread_create(&e->workers[i].thread, NULL, worker_main, &e->workers[i]) != 0) {
      gw_logf("error", "cannot start worker thread: %s", strerror(errno));
      /* the threads already running stop at once: there is nothing in flight */
      e->drain_deadline_ms = 1;
      atomic_store(&e->draining, true);
      for (size_t j = 0; j < i; j++)
        pthread_join(e->workers[j].thread, NULL);
      goto fail;
    }
  *out = e;
  return 0;
fail:
  if (e->workers)
    for (size_t i = 0; i < e->nworkers; i++)
      if (!e->workers[i].mhd && e->workers[i].listen_fd >= 0)
        close(e->workers[i].listen_fd); /* not yet handed to libmicrohttpd */
  gw_engine_free(e);
  return -1;
}

void gw_engine_set_config(struct gw_engine *e, struct gw_config *cfg)
{
  pthread_mutex_lock(&e->cfg_mu);
  struct gw_config *old = e->cfg;
  e->cfg = gw_config_ref(cfg);
  e->max_connections = cfg->max_connections;
  atomic_fetch_add_explicit(&e->cfg_gen, 1, memory_order_release);
  pthread_mutex_unlock(&e->cfg_mu);
  gw_config_unref(old);
  uint64_t one = 1;
  for (size_t i = 0; i < e->nworkers; i++)
    if (write(e->workers[i].evfd, &one, sizeof(one)) < 0) {
      /* the worker picks the config up at its next turn anyway */
    }
}

struct gw_config *gw_engine_config(struct gw_engine *e)
{
  pthread_mutex_lock(&e->cfg_mu);
  struct gw_config *c = gw_config_ref(e->cfg);
  pthread_mutex_unlock(&e->cfg_mu);
  return c;
}

void gw_engine_stats(struct gw_engine *e, struct gw_engine_stats *out)
{
  out->connections = atomic_load_explicit(&e->connections, memory_order_relaxed);
  out->refused = atomic_load_explicit(&e->refused, memory_order_relaxed);
  for (int i = 0; i < 6; i++)
    out->unrouted[i] = atomic_load_explicit(&e->unrouted[i], memory_order_relaxed);
  out->workers = (unsigned)e->nworkers;
}

bool gw_engine_accepting(const struct gw_engine *e)
{
  return !atomic_load_explicit(&((struct gw_engine *)e)->draining, memory_order_relaxed);
}

void gw_engine_drain(struct gw_engine *e, uint64_t grace_ms)
{
  e->drain_deadline_ms = mono_ms() + (int64_t)grace_ms;
  atomic_store_explicit(&e->draining, true, memory_order_release);
  uint64_t one = 1;
  for (size_t i = 0; i < e->nworkers; i++)
    if (write(e->workers[i].evfd, &one, sizeof(one)) < 0) {
      /* the worker wakes within its poll timeout anyway */
    }
  for (size_t i = 0; i < e->nworkers; i++)
    pthread_join(e->workers[i].thread, NULL);
}

void gw_engine_free(struct gw_engine *e)
{
  for (size_t i = 0; e->workers && i < e->nworkers; i++) {
    struct worker *w = &e->workers[i];
    if (w->mhd)
      MHD_stop_daemon(w->mhd);
    gw_logbuf_flush(&w->log);
    if (w->multi)
      curl_multi_cleanup(w->multi);
    while (w->free_reqs) {
      struct req *r = w->free_reqs;
      w->free_reqs = r->next_free;
      if (r->easy)
        curl_easy_cleanup(r->easy);
      free(r->target_raw.p);
      free(r->body.p);
      free(r->url.p);
      gw_buf_free(&r->hdr_text);
      gw_buf_free(&r->hdr_nodes);
      gw_buf_free(&r->resp.headers);
      gw_buf_free(&r->resp.body);
      free(r);
    }
    gw_config_unref(w->cfg);
    free(w->timers);
    free(w->fd_state);
    if (w->epfd >= 0)
      close(w->epfd);
    if (w->evfd >= 0)
      close(w->evfd);
  }
  free(e->workers);
  gw_config_unref(e->cfg);
  pthread_mutex_destroy(&e->cfg_mu);
  free(e);
}
