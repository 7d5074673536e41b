/*
 * Strict loading of the JSON configuration (API.md section 2).
 *
 * The walker keeps the path of the value it is looking at ("routes[1].policies.retry") so every
 * problem names where it is. Each object is checked for unknown and duplicate keys first, then
 * each field is read with its type and range; a missing optional field takes its default. All
 * problems are collected, so `--check-config` reports a whole file at once.
 */
#include "config.h"
#include "pipeline.h"
#include "router.h"

#include <arpa/inet.h>
#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

struct ctx {
  struct gw_config_errors *errs;
  char path[512];
  size_t path_len;
};

static void fail(struct ctx *c, const char *key, const char *fmt, ...)
  __attribute__((format(printf, 3, 4)));

static void fail(struct ctx *c, const char *key, const char *fmt, ...)
{
  struct gw_config_errors *e = c->errs;
  if (e->count >= GW_CONFIG_MAX_ERRORS) {
    e->dropped++;
    return;
  }
  char what[256];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(what, sizeof(what), fmt, ap);
  va_end(ap);
  const char *sep = (c->path_len && key && key[0] != '[') ? "." : "";
  char full[600];
  snprintf(full, sizeof(full), "%s%s%s", c->path, key ? sep : "", key ? key : "");
  snprintf(e->lines[e->count++], sizeof(e->lines[0]), "config error at %s: %s",
           full[0] ? full : "(top level)", what);
}

/* Path push/pop: push returns the old length to restore. */
static size_t push(struct ctx *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static size_t push(struct ctx *c, const char *fmt, ...)
{
  size_t old = c->path_len;
  char part[256];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(part, sizeof(part), fmt, ap);
  va_end(ap);
  const char *sep = (c->path_len && part[0] != '[') ? "." : "";
  int n = snprintf(c->path + c->path_len, sizeof(c->path) - c->path_len, "%s%s", sep, part);
  if (n > 0)
    c->path_len += (size_t)n < sizeof(c->path) - c->path_len ? (size_t)n
                                                             : sizeof(c->path) - c->path_len - 1;
  return old;
}

static void pop(struct ctx *c, size_t old)
{
  c->path_len = old;
  c->path[old] = '\0';
}

static char *xstrdup(const char *s)
{
  char *d = strdup(s ? s : "");
  if (!d)
    abort(); /* configuration is loaded outside the request path; no memory here is fatal */
  return d;
}

/* Unknown keys, duplicate keys and a non-object are errors. Returns false if obj unusable. */
static bool check_object(struct ctx *c, const cJSON *obj, const char *key,
                         const char *const *allowed)
{
  if (!cJSON_IsObject(obj)) {
    fail(c, key, "must be an object");
    return false;
  }
  size_t old = key ? push(c, "%s", key) : c->path_len;
  for (const cJSON *it = obj->child; it; it = it->next) {
    bool known = false;
    for (const char *const *a = allowed; *a; a++)
      if (strcmp(*a, it->string) == 0)
        known = true;
    if (!known)
      fail(c, it->string, "unknown key");
    for (const cJSON *prev = obj->child; prev != it; prev = prev->next)
      if (strcmp(prev->string, it->string) == 0) {
        fail(c, it->string, "duplicate key");
        break;
      }
  }
  pop(c, old);
  return true;
}

static const cJSON *get(const cJSON *obj, const char *key)
{
  return cJSON_GetObjectItemCaseSensitive(obj, key);
}

/* An integer in [min, max]; *out keeps its default when the key is absent. */
static bool get_int(struct ctx *c, const cJSON *obj, const char *key, uint64_t min, uint64_t max,
                    bool required, uint64_t *out)
{
  const cJSON *v = get(obj, key);
  if (!v) {
    if (required)
      fail(c, key, "is required (an integer from %llu to %llu)", (unsigned long long)min,
           (unsigned long long)max);
    return !required;
  }
  double d = v->valuedouble;
  if (!cJSON_IsNumber(v) || d != floor(d) || d < (double)min || d > (double)max) {
    fail(c, key, "must be an integer from %llu to %llu", (unsigned long long)min,
         (unsigned long long)max);
    return false;
  }
  *out = (uint64_t)d;
  return true;
}

static bool get_u32(struct ctx *c, const cJSON *obj, const char *key, uint32_t min, uint32_t max,
                    bool required, uint32_t *out)
{
  uint64_t v = *out;
  bool ok = get_int(c, obj, key, min, max, required, &v);
  *out = (uint32_t)v;
  return ok;
}

static bool get_num(struct ctx *c, const cJSON *obj, const char *key, double min, double max,
                    bool min_exclusive, bool required, double *out)
{
  const cJSON *v = get(obj, key);
  if (!v) {
    if (required)
      fail(c, key, "is required");
    return !required;
  }
  double d = v->valuedouble;
  if (!cJSON_IsNumber(v) || !isfinite(d) || d > max || d < min || (min_exclusive && d == min)) {
    fail(c, key, "must be a number %s %g and at most %g", min_exclusive ? "above" : "from", min,
         max);
    return false;
  }
  *out = d;
  return true;
}

static bool get_bool(struct ctx *c, const cJSON *obj, const char *key, bool *out)
{
  const cJSON *v = get(obj, key);
  if (!v)
    return true;
  if (!cJSON_IsBool(v)) {
    fail(c, key, "must be true or false");
    return false;
  }
  *out = cJSON_IsTrue(v);
  return true;
}

/* A string of 1..max-1 bytes copied into buf. */
static bool get_str(struct ctx *c, const cJSON *obj, const char *key, bool required, char *buf,
                    size_t max)
{
  const cJSON *v = get(obj, key);
  if (!v) {
    if (required)
      fail(c, key, "is required (a string)");
    return !required;
  }
  if (!cJSON_IsString(v) || !v->valuestring[0] || strlen(v->valuestring) >= max) {
    fail(c, key, "must be a non-empty string of at most %zu bytes", max - 1);
    return false;
  }
  memcpy(buf, v->valuestring, strlen(v->valuestring) + 1);
  return true;
}

/* One of names[] (NULL-terminated); *out is the index. */
static bool get_enum(struct ctx *c, const cJSON *obj, const char *key, const char *const *names,
                     int *out)
{
  const cJSON *v = get(obj, key);
  if (!v)
    return true;
  if (cJSON_IsString(v))
    for (int i = 0; names[i]; i++)
      if (strcmp(names[i], v->valuestring) == 0) {
        *out = i;
        return true;
      }
  char list[256] = "";
  for (int i = 0; names[i]; i++) {
    strncat(list, i ? ", " : "", sizeof(list) - strlen(list) - 1);
    strncat(list, names[i], sizeof(list) - strlen(list) - 1);
  }
  fail(c, key, "must be one of %s", list);
  return false;
}

static void status_set_add(struct gw_status_set *s, int status)
{
  gw_status_set_add(s, status); /* callers pass 100..599 only */
}

static bool get_statuses(struct ctx *c, const cJSON *obj, const char *key,
                         struct gw_status_set *out)
{
  const cJSON *v = get(obj, key);
  if (!v)
    return true;
  if (!cJSON_IsArray(v)) {
    fail(c, key, "must be an array of HTTP status codes");
    return false;
  }
  struct gw_status_set s;
  memset(&s, 0, sizeof(s));
  bool ok = true;
  int i = 0;
  for (const cJSON *it = v->child; it; it = it->next, i++) {
    double d = it->valuedouble;
    if (!cJSON_IsNumber(it) || d != floor(d) || d < 100 || d > 599) {
      char k[160];
      snprintf(k, sizeof(k), "%s[%d]", key, i);
      fail(c, k, "must be an HTTP status code from 100 to 599");
      ok = false;
      continue;
    }
    status_set_add(&s, (int)d);
  }
  if (ok)
    *out = s;
  return ok;
}

/* A list of names from allowed[] into a bit set (bit i for allowed[i]). */
static bool get_flags(struct ctx *c, const cJSON *obj, const char *key, const char *const *allowed,
                      unsigned *out)
{
  const cJSON *v = get(obj, key);
  if (!v)
    return true;
  if (!cJSON_IsArray(v)) {
    fail(c, key, "must be an array of strings");
    return false;
  }
  unsigned bits = 0;
  bool ok = true;
  int i = 0;
  for (const cJSON *it = v->child; it; it = it->next, i++) {
    int found = -1;
    if (cJSON_IsString(it))
      for (int j = 0; allowed[j]; j++)
        if (strcmp(allowed[j], it->valuestring) == 0)
          found = j;
    if (found < 0) {
      char k[160], list[256] = "";
      snprintf(k, sizeof(k), "%s[%d]", key, i);
      for (int j = 0; allowed[j]; j++) {
        strncat(list, j ? ", " : "", sizeof(list) - strlen(list) - 1);
        strncat(list, allowed[j], sizeof(list) - strlen(list) - 1);
      }
      fail(c, k, "must be one of %s", list);
      ok = false;
      continue;
    }
    bits |= 1u << found;
  }
  if (ok)
    *out = bits;
  return ok;
}

/* RFC 9110 section 5.6.2: token = 1*tchar. */
static bool is_token(const char *s)
{
  if (!*s)
    return false;
  for (; *s; s++) {
    unsigned char ch = (unsigned char)*s;
    if (!(ch > 0x20 && ch < 0x7f && !strchr("\"(),/:;<=>?@[\\]{}", ch)))
      return false;
  }
  return true;
}

/* A list of HTTP methods (tokens), upper-cased as written. */
static bool get_methods(struct ctx *c, const cJSON *obj, const char *key, char ***out,
                        size_t *count)
{
  const cJSON *v = get(obj, key);
  if (!v)
    return true;
  int n = cJSON_GetArraySize(v);
  if (!cJSON_IsArray(v) || n == 0 || n > 64) {
    fail(c, key, "must be a non-empty array of HTTP methods");
    return false;
  }
  char **m = calloc((size_t)n, sizeof(*m));
  if (!m)
    abort();
  bool ok = true;
  int i = 0;
  for (const cJSON *it = v->child; it; it = it->next, i++) {
    bool good = cJSON_IsString(it) && strlen(it->valuestring) <= 32 && is_token(it->valuestring);
    if (good)
      for (const char *p = it->valuestring; *p; p++)
        if (*p >= 'a' && *p <= 'z')
          good = false;
    if (!good) {
      char k[160];
      snprintf(k, sizeof(k), "%s[%d]", key, i);
      fail(c, k, "must be an upper-case HTTP method such as \"GET\"");
      ok = false;
      continue;
    }
    m[i] = xstrdup(it->valuestring);
  }
  if (!ok) {
    for (int j = 0; j < n; j++)
      free(m[j]);
    free(m);
    return false;
  }
  *out = m;
  *count = (size_t)n;
  return true;
}

/* "host:port" or "[v6]:port", resolved numerically (or "localhost"). */
static bool parse_addr(const char *text, struct gw_addr *out)
{
  char host[128];
  const char *port;
  size_t tl = strlen(text);
  if (tl == 0 || tl >= sizeof(out->text))
    return false;
  if (text[0] == '[') {
    const char *end = strchr(text, ']');
    if (!end || end[1] != ':')
      return false;
    size_t hl = (size_t)(end - text - 1);
    if (hl == 0 || hl >= sizeof(host))
      return false;
    memcpy(host, text + 1, hl);
    host[hl] = '\0';
    port = end + 2;
  } else {
    const char *colon = strrchr(text, ':');
    if (!colon || colon == text || strchr(text, ':') != colon)
      return false;
    size_t hl = (size_t)(colon - text);
    if (hl >= sizeof(host))
      return false;
    memcpy(host, text, hl);
    host[hl] = '\0';
    port = colon + 1;
  }
  if (!*port || strlen(port) > 5)
    return false;
  for (const char *p = port; *p; p++)
    if (*p < '0' || *p > '9')
      return false;
  long pn = strtol(port, NULL, 10);
  if (pn < 0 || pn > 65535)
    return false;
  struct addrinfo hints, *res = NULL;
  memset(&hints, 0, sizeof(hints));
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV | (strcmp(host, "localhost") ? AI_NUMERICHOST : 0);
  if (getaddrinfo(host, port, &hints, &res) != 0 || !res)
    return false;
  memcpy(&out->ss, res->ai_addr, res->ai_addrlen);
  out->len = res->ai_addrlen;
  freeaddrinfo(res);
  memcpy(out->text, text, tl + 1);
  return true;
}

static bool get_addr(struct ctx *c, const cJSON *obj, const char *key, bool required,
                     struct gw_addr *out)
{
  const cJSON *v = get(obj, key);
  if (!v) {
    if (required)
      fail(c, key, "is required (an address \"host:port\")");
    return !required;
  }
  if (!cJSON_IsString(v) || !parse_addr(v->valuestring, out)) {
    fail(c, key, "must be an address \"host:port\" with a numeric IP (or localhost) and a port");
    return false;
  }
  return true;
}

/* "http://host[:port][/path]" (or https). */
static bool parse_target(const char *url, struct gw_target *t)
{
  const char *rest;
  if (strncmp(url, "http://", 7) == 0)
    rest = url + 7;
  else if (strncmp(url, "https://", 8) == 0)
    rest = url + 8;
  else
    return false;
  size_t hostlen = strcspn(rest, "/?#");
  if (hostlen == 0 || rest[hostlen] == '?' || rest[hostlen] == '#')
    return false;
  for (size_t i = 0; i < hostlen; i++) {
    unsigned char ch = (unsigned char)rest[i];
    if (ch <= 0x20 || ch >= 0x7f || ch == '@' || ch == '\\')
      return false;
  }
  /* host[:port] with a non-empty host and, when present, a port from 1 to 65535. */
  const char *hend = rest + hostlen;
  const char *colon = NULL;
  if (rest[0] == '[') {
    const char *rb = memchr(rest, ']', hostlen);
    if (!rb || rb == rest + 1)
      return false;
    if (rb + 1 < hend && rb[1] != ':')
      return false;
    colon = rb + 1 < hend ? rb + 1 : NULL;
  } else {
    colon = memchr(rest, ':', hostlen);
    if (colon == rest)
      return false;
  }
  if (colon) {
    size_t pl0 = (size_t)(hend - colon - 1);
    if (pl0 == 0 || pl0 > 5)
      return false;
    long port = 0;
    for (const char *p = colon + 1; p < hend; p++) {
      if (*p < '0' || *p > '9')
        return false;
      port = port * 10 + (*p - '0');
    }
    if (port < 1 || port > 65535)
      return false;
  }
  const char *path = rest + hostlen;
  if (strpbrk(path, "?# \t\r\n"))
    return false;
  size_t baselen = (size_t)(path - url);
  t->base = malloc(baselen + 1);
  if (!t->base)
    abort();
  memcpy(t->base, url, baselen);
  t->base[baselen] = '\0';
  /* A trailing slash in the path prefix would double with the request's own. */
  size_t pl = strlen(path);
  while (pl > 0 && path[pl - 1] == '/')
    pl--;
  t->path = malloc(pl + 1);
  if (!t->path)
    abort();
  memcpy(t->path, path, pl);
  t->path[pl] = '\0';
  t->path_len = pl;
  return true;
}

static bool parse_key(struct ctx *c, const cJSON *obj, struct gw_limit_key *out)
{
  const cJSON *v = get(obj, "key");
  if (!v) {
    out->kind = GW_KEY_ROUTE;
    return true;
  }
  if (cJSON_IsString(v)) {
    const char *s = v->valuestring;
    if (strcmp(s, "route") == 0) {
      out->kind = GW_KEY_ROUTE;
      return true;
    }
    if (strcmp(s, "client_ip") == 0) {
      out->kind = GW_KEY_CLIENT_IP;
      return true;
    }
    if (strncmp(s, "header:", 7) == 0 && is_token(s + 7) && strlen(s + 7) < sizeof(out->header)) {
      out->kind = GW_KEY_HEADER;
      memcpy(out->header, s + 7, strlen(s + 7) + 1);
      return true;
    }
  }
  fail(c, "key", "must be \"route\", \"client_ip\" or \"header:NAME\"");
  return false;
}

static const char *const scope_names[] = {"local", "cluster", NULL};
static const char *const store_error_names[] = {"allow", "deny", NULL};

/* The fields both limiters have: key, scope, max_keys, on_store_error. */
static void parse_limiter_common(struct ctx *c, const cJSON *o, struct gw_limit_key *key,
                                 enum gw_scope *scope, uint32_t *max_keys, bool *deny_on_error)
{
  int sc = 0, deny = 0;
  *max_keys = 100000;
  parse_key(c, o, key);
  get_enum(c, o, "scope", scope_names, &sc);
  get_u32(c, o, "max_keys", 1, 10000000, false, max_keys);
  get_enum(c, o, "on_store_error", store_error_names, &deny);
  *scope = (enum gw_scope)sc;
  *deny_on_error = deny == 1;
}

static void parse_token_bucket(struct ctx *c, const cJSON *o, struct gw_route *route)
{
  struct gw_token_bucket_conf *tb = &route->token_bucket;
  static const char *const keys[] = {"capacity", "refill_per_sec", "key", "scope", "max_keys",
                                     "on_store_error", NULL};
  if (!check_object(c, o, NULL, keys))
    return;
  tb->enabled = true;
  get_int(c, o, "capacity", 1, GW_TOKEN_BUCKET_CAPACITY_MAX, true, &tb->c.capacity);
  get_int(c, o, "refill_per_sec", 1, GW_TOKEN_BUCKET_REFILL_MAX, true, &tb->c.refill_per_sec);
  parse_limiter_common(c, o, &tb->key, &tb->scope, &tb->max_keys, &tb->deny_on_store_error);
}

static void parse_sliding_window(struct ctx *c, const cJSON *o, struct gw_route *route)
{
  struct gw_sliding_window_conf *sw = &route->sliding_window;
  static const char *const keys[] = {"limit",    "window_ms",      "key", "scope",
                                     "max_keys", "on_store_error", NULL};
  if (!check_object(c, o, NULL, keys))
    return;
  sw->enabled = true;
  get_int(c, o, "limit", 1, 10000000, true, &sw->c.limit);
  get_int(c, o, "window_ms", 1, GW_SLIDING_WINDOW_MS_MAX, true, &sw->c.window_ms);
  /* Admission times rounded up to 1 ms (never early, so never over the limit); a window
   * shorter than 1 ms keeps every nanosecond. */
  sw->c.granularity_ns = sw->c.window_ms > 1 ? GW_NS_PER_MS : 1;
  parse_limiter_common(c, o, &sw->key, &sw->scope, &sw->max_keys, &sw->deny_on_store_error);
}

static void parse_breaker(struct ctx *c, const cJSON *o, struct gw_route *route)
{
  struct gw_breaker_conf *bc = &route->breaker;
  static const char *const keys[] = {"window",        "window_size",      "min_calls",
                                     "failure_rate",  "slow_call_ms",     "slow_call_rate",
                                     "open_ms",       "half_open_calls",  "failure_statuses",
                                     NULL};
  static const char *const windows[] = {"count", "time", NULL};
  if (!check_object(c, o, NULL, keys))
    return;
  struct gw_breaker_config *b = &bc->c;
  bc->enabled = true;
  b->window = GW_BREAKER_WINDOW_COUNT;
  b->window_size = 20;
  b->min_calls = 10;
  b->failure_rate = 0.5;
  b->slow_call_ms = 0; /* slow calls are not tracked unless slow_call_ms is set */
  b->slow_call_rate = 1.0;
  b->open_ms = 30000;
  b->half_open_calls = 5;
  memset(&b->failure_statuses, 0, sizeof(b->failure_statuses));
  status_set_add(&b->failure_statuses, 500);
  status_set_add(&b->failure_statuses, 502);
  status_set_add(&b->failure_statuses, 503);
  status_set_add(&b->failure_statuses, 504);
  int w = 0;
  get_enum(c, o, "window", windows, &w);
  b->window = (enum gw_breaker_window)w;
  bool size_ok = get_u32(c, o, "window_size", 1, GW_BREAKER_WINDOW_MAX, false, &b->window_size);
  bool min_ok = get_u32(c, o, "min_calls", 1, GW_BREAKER_WINDOW_MAX, false, &b->min_calls);
  get_num(c, o, "failure_rate", 0, 1, true, false, &b->failure_rate);
  get_int(c, o, "slow_call_ms", 1, 3600000, false, &b->slow_call_ms);
  get_num(c, o, "slow_call_rate", 0, 1, true, false, &b->slow_call_rate);
  get_int(c, o, "open_ms", 1, 86400000, false, &b->open_ms);
  get_u32(c, o, "half_open_calls", 1, 10000, false, &b->half_open_calls);
  get_statuses(c, o, "failure_statuses", &b->failure_statuses);
  if (size_ok && min_ok && b->window == GW_BREAKER_WINDOW_COUNT && b->min_calls > b->window_size)
    fail(c, "min_calls", "must not exceed window_size for a count window");
}

static void parse_retry(struct ctx *c, const cJSON *o, struct gw_route *route)
{
  struct gw_retry_conf *rc = &route->retry;
  static const char *const keys[] = {"max_attempts",       "base_ms",       "max_backoff_ms",
                                     "jitter",             "per_try_timeout_ms", "on",
                                     "statuses",           "budget_percent", "budget_min_per_sec",
                                     NULL};
  static const char *const jitters[] = {"none", "full", "equal", "decorrelated", NULL};
  static const char *const ons[] = {"connect_failure", "timeout", "status", NULL};
  if (!check_object(c, o, NULL, keys))
    return;
  struct gw_retry_config *r = &rc->c;
  rc->enabled = true;
  r->max_attempts = 3;
  r->base_ms = 50;
  r->max_backoff_ms = 2000;
  r->jitter = GW_JITTER_FULL;
  r->per_try_timeout_ms = 0;
  r->on = GW_RETRY_ON_CONNECT_FAILURE | GW_RETRY_ON_TIMEOUT | GW_RETRY_ON_STATUS;
  memset(&r->statuses, 0, sizeof(r->statuses));
  status_set_add(&r->statuses, 502);
  status_set_add(&r->statuses, 503);
  status_set_add(&r->statuses, 504);
  r->budget_percent = 20;
  r->budget_min_per_sec = 10;
  int j = GW_JITTER_FULL;
  get_u32(c, o, "max_attempts", 1, GW_RETRY_MAX_ATTEMPTS, false, &r->max_attempts);
  bool base_ok = get_int(c, o, "base_ms", 1, 600000, false, &r->base_ms);
  bool max_ok = get_int(c, o, "max_backoff_ms", 1, 600000, false, &r->max_backoff_ms);
  get_enum(c, o, "jitter", jitters, &j);
  r->jitter = (enum gw_jitter)j;
  get_int(c, o, "per_try_timeout_ms", 1, 3600000, false, &r->per_try_timeout_ms);
  get_flags(c, o, "on", ons, &r->on);
  get_statuses(c, o, "statuses", &r->statuses);
  get_u32(c, o, "budget_percent", 0, 100, false, &r->budget_percent);
  get_u32(c, o, "budget_min_per_sec", 0, 1000000, false, &r->budget_min_per_sec);
  if (base_ok && max_ok && r->max_backoff_ms < r->base_ms)
    fail(c, "max_backoff_ms", "must be at least base_ms");
}

static void parse_fallback(struct ctx *c, const cJSON *o, struct gw_degradation_conf *d)
{
  static const char *const keys[] = {"status", "headers", "body", NULL};
  if (!check_object(c, o, "fallback", keys))
    return;
  size_t old = push(c, "fallback");
  uint64_t status = 200;
  get_int(c, o, "status", 100, 599, false, &status);
  d->fallback_status = (int)status;
  const cJSON *h = get(o, "headers");
  if (h) {
    if (!cJSON_IsObject(h)) {
      fail(c, "headers", "must be an object of header names to string values");
    } else {
      size_t n = (size_t)cJSON_GetArraySize(h);
      d->fallback_headers = calloc(n ? n : 1, sizeof(*d->fallback_headers));
      if (!d->fallback_headers)
        abort();
      for (const cJSON *it = h->child; it; it = it->next) {
        bool bad_value = !cJSON_IsString(it);
        if (!bad_value)
          for (const char *p = it->valuestring; *p; p++)
            if ((unsigned char)*p < 0x20 && *p != '\t')
              bad_value = true;
        if (!is_token(it->string) || bad_value) {
          size_t o2 = push(c, "headers");
          fail(c, it->string, "must be a header name with a printable string value");
          pop(c, o2);
          continue;
        }
        struct gw_header_pair *p = &d->fallback_headers[d->fallback_header_count++];
        p->name = xstrdup(it->string);
        p->value = xstrdup(it->valuestring);
      }
    }
  }
  const cJSON *b = get(o, "body");
  bool has_type = false;
  for (size_t i = 0; i < d->fallback_header_count; i++)
    has_type |= strcasecmp(d->fallback_headers[i].name, "Content-Type") == 0;
  if (!has_type) {
    /* A body written as JSON is JSON; a string is sent as text. */
    struct gw_header_pair *grown =
        realloc(d->fallback_headers, (d->fallback_header_count + 1) * sizeof(*grown));
    if (!grown)
      abort();
    d->fallback_headers = grown;
    grown[d->fallback_header_count].name = xstrdup("Content-Type");
    grown[d->fallback_header_count].value =
        xstrdup(b && !cJSON_IsString(b) ? "application/json" : "text/plain; charset=utf-8");
    d->fallback_header_count++;
  }
  if (b) {
    d->fallback_body = cJSON_IsString(b) ? xstrdup(b->valuestring) : cJSON_PrintUnformatted(b);
    if (!d->fallback_body)
      abort();
    d->fallback_body_len = strlen(d->fallback_body);
  } else {
    d->fallback_body = xstrdup("");
  }
  pop(c, old);
  d->c.has_fallback = true;
}

static void parse_degradation(struct ctx *c, const cJSON *o, struct gw_route *route)
{
  struct gw_degradation_conf *d = &route->degradation;
  static const char *const keys[] = {"fallback", "on", "max_concurrent", "slow_ms",
                                     "slow_window_ms", "stale_if_error_ms", NULL};
  static const char *const ons[] = {"circuit_open", "upstream_error", "shed", "slow",
                                    "forced",       "stale",          NULL};
  if (!check_object(c, o, NULL, keys))
    return;
  d->enabled = true;
  d->c.on = GW_DEGRADE_ON(GW_DEGRADE_CIRCUIT_OPEN) | GW_DEGRADE_ON(GW_DEGRADE_UPSTREAM_ERROR) |
            GW_DEGRADE_ON(GW_DEGRADE_SHED) | GW_DEGRADE_ON(GW_DEGRADE_SLOW);
  d->c.slow_window_ms = 10000;
  const cJSON *fb = get(o, "fallback");
  if (fb)
    parse_fallback(c, fb, d);
  get_flags(c, o, "on", ons, &d->c.on); /* names in the order of enum gw_degrade_reason */
  get_u32(c, o, "max_concurrent", 1, 10000000, false, &d->c.max_concurrent);
  get_int(c, o, "slow_ms", 1, 3600000, false, &d->c.slow_ms);
  get_int(c, o, "slow_window_ms", 100, 3600000, false, &d->c.slow_window_ms);
  get_int(c, o, "stale_if_error_ms", 0, 86400000ull * 30, false, &d->c.stale_if_error_ms);
}

static void parse_idempotency(struct ctx *c, const cJSON *o, struct gw_route *route)
{
  struct gw_idempotency_conf *ic = &route->idempotency;
  static const char *const keys[] = {"header",   "methods",        "ttl_ms",
                                     "required", "on_store_error", NULL};
  if (!check_object(c, o, NULL, keys))
    return;
  ic->enabled = true;
  strcpy(ic->header, "Idempotency-Key");
  ic->ttl_ms = 86400000;
  if (get(o, "header")) {
    char h[sizeof(ic->header)];
    if (get_str(c, o, "header", false, h, sizeof(h))) {
      if (is_token(h))
        memcpy(ic->header, h, sizeof(h));
      else
        fail(c, "header", "must be an HTTP header name");
    }
  }
  if (!get(o, "methods")) {
    ic->methods = calloc(2, sizeof(char *));
    if (!ic->methods)
      abort();
    ic->methods[0] = xstrdup("POST");
    ic->methods[1] = xstrdup("PATCH");
    ic->method_count = 2;
  } else {
    get_methods(c, o, "methods", &ic->methods, &ic->method_count);
  }
  get_int(c, o, "ttl_ms", 1000, 86400000ull * 30, false, &ic->ttl_ms);
  get_bool(c, o, "required", &ic->required);
  int deny = 1;
  get_enum(c, o, "on_store_error", store_error_names, &deny);
  ic->allow_on_store_error = deny == 0;
}

/* The policies of section 2, each parsed by its own function. */
static const struct {
  const char *name;
  void (*parse)(struct ctx *c, const cJSON *o, struct gw_route *r);
} policy_parsers[] = {
    {"token_bucket", parse_token_bucket}, {"sliding_window", parse_sliding_window},
    {"circuit_breaker", parse_breaker},   {"retry", parse_retry},
    {"degradation", parse_degradation},   {"idempotency", parse_idempotency},
};
#define POLICY_COUNT (sizeof(policy_parsers) / sizeof(policy_parsers[0]))

static void parse_policies(struct ctx *c, const cJSON *o, struct gw_route *r)
{
  const char *keys[POLICY_COUNT + 1];
  for (size_t i = 0; i < POLICY_COUNT; i++)
    keys[i] = policy_parsers[i].name;
  keys[POLICY_COUNT] = NULL;
  if (!check_object(c, o, NULL, keys))
    return;
  for (size_t i = 0; i < POLICY_COUNT; i++) {
    const cJSON *v = get(o, policy_parsers[i].name);
    if (!v)
      continue;
    size_t old = push(c, "%s", policy_parsers[i].name);
    policy_parsers[i].parse(c, v, r);
    pop(c, old);
  }
}

static bool valid_route_name(const char *s)
{
  size_t n = strlen(s);
  if (n == 0 || n > 200)
    return false;
  for (; *s; s++)
    if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
          strchr("._:-", *s)))
      return false;
  return true;
}

static void parse_upstream(struct ctx *c, const cJSON *o, struct gw_route *r)
{
  static const char *const keys[] = {"targets", "strip_prefix", "balance", "timeout_ms",
                                     "connect_timeout_ms", NULL};
  static const char *const balances[] = {"round_robin", "least_outstanding", NULL};
  if (!check_object(c, o, NULL, keys))
    return;
  const cJSON *t = get(o, "targets");
  int n = cJSON_GetArraySize(t);
  if (!t) {
    fail(c, "targets", "is required (an array of \"http://host:port\" URLs)");
  } else if (!cJSON_IsArray(t) || n < 1 || n > GW_CONFIG_MAX_TARGETS) {
    fail(c, "targets", "must be an array of 1 to %d \"http://host:port\" URLs",
         GW_CONFIG_MAX_TARGETS);
  } else {
    int i = 0;
    for (const cJSON *it = t->child; it; it = it->next, i++) {
      if (!cJSON_IsString(it) || strlen(it->valuestring) > 2000 ||
          !parse_target(it->valuestring, &r->targets[r->target_count])) {
        char k[64];
        snprintf(k, sizeof(k), "targets[%d]", i);
        fail(c, k, "must be a URL \"http://host:port\" with an optional path");
        continue;
      }
      r->target_count++;
    }
  }
  get_bool(c, o, "strip_prefix", &r->strip_prefix);
  int b = 0;
  get_enum(c, o, "balance", balances, &b);
  r->balance = (enum gw_balance)b;
  get_int(c, o, "timeout_ms", 1, 3600000, false, &r->timeout_ms);
  get_int(c, o, "connect_timeout_ms", 1, 600000, false, &r->connect_timeout_ms);
}

static void parse_route(struct ctx *c, const cJSON *o, struct gw_route *r)
{
  static const char *const keys[] = {"name", "match", "upstream", "policies", NULL};
  static const char *const match_keys[] = {"path_prefix", "methods", "host", NULL};
  r->timeout_ms = 5000;
  r->connect_timeout_ms = 1000;
  if (!check_object(c, o, NULL, keys)) {
    /* Still a whole route, so the rest of the loader never meets a half-built one. */
    r->name = xstrdup("");
    r->path_prefix = xstrdup("/");
    r->policies_json = xstrdup("");
    r->outstanding = calloc(1, sizeof(*r->outstanding));
    if (!r->outstanding)
      abort();
    return;
  }
  r->json = cJSON_PrintUnformatted(o);
  char name[256] = "";
  if (get_str(c, o, "name", true, name, sizeof(name))) {
    if (!valid_route_name(name))
      fail(c, "name", "must be 1-200 bytes of [A-Za-z0-9._:-]");
  }
  r->name = xstrdup(name);
  const cJSON *m = get(o, "match");
  size_t old;
  if (!m) {
    fail(c, "match", "is required (an object with path_prefix)");
  } else if (check_object(c, m, "match", match_keys)) {
    old = push(c, "match");
    char prefix[2048] = "";
    if (get_str(c, m, "path_prefix", true, prefix, sizeof(prefix))) {
      bool bad = prefix[0] != '/';
      for (const char *p = prefix; *p; p++)
        if ((unsigned char)*p <= 0x20 || (unsigned char)*p >= 0x7f || *p == '?' || *p == '#')
          bad = true;
      if (bad)
        fail(c, "path_prefix", "must start with / and hold no spaces, ? or #");
    }
    r->path_prefix = xstrdup(prefix);
    r->prefix_len = strlen(prefix);
    get_methods(c, m, "methods", &r->methods, &r->method_count);
    char host[256];
    if (get(m, "host") && get_str(c, m, "host", false, host, sizeof(host))) {
      for (char *p = host; *p; p++)
        if (*p >= 'A' && *p <= 'Z')
          *p = (char)(*p - 'A' + 'a');
      r->host = xstrdup(host);
    }
    pop(c, old);
  }
  if (!r->path_prefix)
    r->path_prefix = xstrdup("/");
  const cJSON *u = get(o, "upstream");
  if (!u) {
    fail(c, "upstream", "is required (an object with targets)");
  } else {
    old = push(c, "upstream");
    parse_upstream(c, u, r);
    pop(c, old);
  }
  const cJSON *p = get(o, "policies");
  r->policies_json = p ? cJSON_PrintUnformatted(p) : xstrdup("");
  if (!r->policies_json)
    abort();
  if (p) {
    old = push(c, "policies");
    parse_policies(c, p, r);
    pop(c, old);
  }
  r->outstanding = calloc(r->target_count ? r->target_count : 1, sizeof(*r->outstanding));
  if (!r->outstanding)
    abort();
}

static void parse_node(struct ctx *c, const cJSON *o, struct gw_config *cfg)
{
  static const char *const keys[] = {"id",
                                     "listen",
                                     "api_listen",
                                     "data_dir",
                                     "shutdown_grace_ms",
                                     "max_body_bytes",
                                     "max_connections",
                                     "workers",
                                     "idle_timeout_ms",
                                     "max_response_bytes",
                                     "connection_memory_bytes",
                                     NULL};
  if (!check_object(c, o, "node", keys))
    return;
  size_t old = push(c, "node");
  if (get_str(c, o, "id", false, cfg->node_id, sizeof(cfg->node_id)) &&
      !valid_route_name(cfg->node_id))
    fail(c, "id", "must be 1-63 bytes of [A-Za-z0-9._:-]");
  get_addr(c, o, "listen", false, &cfg->listen);
  get_addr(c, o, "api_listen", false, &cfg->api_listen);
  bool has_dir = get(o, "data_dir") != NULL;
  if (has_dir)
    get_str(c, o, "data_dir", false, cfg->data_dir, sizeof(cfg->data_dir));
  get_int(c, o, "shutdown_grace_ms", 0, 3600000, false, &cfg->shutdown_grace_ms);
  get_int(c, o, "max_body_bytes", 0, 1ull << 30, false, &cfg->max_body_bytes);
  get_u32(c, o, "max_connections", 1, 10000000, false, &cfg->max_connections);
  get_u32(c, o, "workers", 1, 256, false, &cfg->workers);
  get_int(c, o, "max_response_bytes", 1024, 1ull << 31, false, &cfg->max_response_bytes);
  get_int(c, o, "connection_memory_bytes", 4096, 1u << 20, false, &cfg->connection_memory_bytes);
  get_int(c, o, "idle_timeout_ms", 1000, 3600000, false, &cfg->idle_timeout_ms);
  pop(c, old);
}

static void parse_backend(struct ctx *c, const cJSON *o, struct gw_config *cfg)
{
  static const char *const keys[] = {"type", "redis", NULL};
  static const char *const redis_keys[] = {"url", "timeout_ms", NULL};
  static const char *const types[] = {"memory", "raft", "redis", NULL};
  if (!check_object(c, o, "backend", keys))
    return;
  size_t old = push(c, "backend");
  int t = 0;
  get_enum(c, o, "type", types, &t);
  cfg->backend = (enum gw_backend_type)t;
  const cJSON *r = get(o, "redis");
  if (r && check_object(c, r, "redis", redis_keys)) {
    size_t o2 = push(c, "redis");
    if (get_str(c, r, "url", false, cfg->redis_url, sizeof(cfg->redis_url)) &&
        strncmp(cfg->redis_url, "redis://", 8) != 0)
      fail(c, "url", "must be a redis://host:port[/db] URL");
    get_int(c, r, "timeout_ms", 1, 60000, false, &cfg->redis_timeout_ms);
    pop(c, o2);
  }
  pop(c, old);
}

static void parse_cluster(struct ctx *c, const cJSON *o, struct gw_config *cfg)
{
  static const char *const keys[] = {"raft_listen", "peers", "election_timeout_ms",
                                     "heartbeat_ms", "snapshot_every", "join", NULL};
  static const char *const peer_keys[] = {"id", "raft", "api", NULL};
  if (!check_object(c, o, "cluster", keys))
    return;
  cfg->has_cluster = true;
  size_t old = push(c, "cluster");
  get_addr(c, o, "raft_listen", true, &cfg->raft_listen);
  const cJSON *peers = get(o, "peers");
  int n = cJSON_GetArraySize(peers);
  if (peers && (!cJSON_IsArray(peers) || n > GW_CONFIG_MAX_PEERS)) {
    fail(c, "peers", "must be an array of at most %d peers", GW_CONFIG_MAX_PEERS);
  } else if (peers) {
    int i = 0;
    for (const cJSON *it = peers->child; it; it = it->next, i++) {
      size_t o2 = push(c, "peers[%d]", i);
      if (check_object(c, it, NULL, peer_keys)) {
        struct gw_peer *p = &cfg->peers[cfg->peer_count];
        bool ok = get_str(c, it, "id", true, p->id, sizeof(p->id));
        ok &= get_addr(c, it, "raft", true, &p->raft);
        ok &= get_addr(c, it, "api", true, &p->api);
        for (size_t j = 0; ok && j < cfg->peer_count; j++)
          if (strcmp(cfg->peers[j].id, p->id) == 0) {
            fail(c, "id", "duplicate peer id \"%s\"", p->id);
            ok = false;
          }
        if (ok)
          cfg->peer_count++;
      }
      pop(c, o2);
    }
  }
  bool et = get_int(c, o, "election_timeout_ms", 10, 60000, false, &cfg->election_timeout_ms);
  bool hb = get_int(c, o, "heartbeat_ms", 1, 10000, false, &cfg->heartbeat_ms);
  get_int(c, o, "snapshot_every", 10, 100000000, false, &cfg->snapshot_every);
  get_bool(c, o, "join", &cfg->join);
  if (et && hb && cfg->heartbeat_ms * 2 > cfg->election_timeout_ms)
    fail(c, "heartbeat_ms", "must be at most half of election_timeout_ms");
  pop(c, old);
  if (cfg->peer_count) {
    bool found = false;
    for (size_t j = 0; j < cfg->peer_count; j++)
      found |= strcmp(cfg->peers[j].id, cfg->node_id) == 0;
    if (!found)
      fail(c, "node.id", "must name one of cluster.peers");
  }
}

static void cross_checks(struct ctx *c, struct gw_config *cfg)
{
  for (size_t i = 0; i < cfg->route_count; i++) {
    struct gw_route *r = &cfg->routes[i];
    for (size_t j = 0; j < i; j++)
      if (r->name[0] && strcmp(cfg->routes[j].name, r->name) == 0) {
        size_t old = push(c, "routes[%zu]", i);
        fail(c, "name", "duplicate route name \"%s\" (also routes[%zu])", r->name, j);
        pop(c, old);
      }
    bool cluster_scope = (r->token_bucket.enabled && r->token_bucket.scope == GW_SCOPE_CLUSTER) ||
                         (r->sliding_window.enabled && r->sliding_window.scope == GW_SCOPE_CLUSTER);
    if (cluster_scope && cfg->backend == GW_BACKEND_MEMORY) {
      size_t old = push(c, "routes[%zu].policies", i);
      fail(c, r->token_bucket.scope == GW_SCOPE_CLUSTER ? "token_bucket.scope"
                                                        : "sliding_window.scope",
           "\"cluster\" needs backend.type \"raft\" or \"redis\"");
      pop(c, old);
    }
  }
  if (cfg->listen.len && cfg->api_listen.len && strcmp(cfg->listen.text, cfg->api_listen.text) == 0)
    fail(c, "node.api_listen", "must differ from node.listen");
}

static void route_free(struct gw_route *r)
{
  free(r->name);
  free(r->path_prefix);
  for (size_t i = 0; i < r->method_count; i++)
    free(r->methods[i]);
  free(r->methods);
  free(r->host);
  for (size_t i = 0; i < r->target_count; i++) {
    free(r->targets[i].base);
    free(r->targets[i].path);
  }
  for (size_t i = 0; i < r->degradation.fallback_header_count; i++) {
    free(r->degradation.fallback_headers[i].name);
    free(r->degradation.fallback_headers[i].value);
  }
  free(r->degradation.fallback_headers);
  free(r->degradation.fallback_body);
  for (size_t i = 0; i < r->idempotency.method_count; i++)
    free(r->idempotency.methods[i]);
  free(r->idempotency.methods);
  free(r->json);
  free(r->policies_json);
  free(r->outstanding);
  gw_route_rt_unref(r->rt);
}

static void config_free(struct gw_config *cfg)
{
  for (size_t i = 0; i < cfg->route_count; i++)
    route_free(&cfg->routes[i]);
  free(cfg->routes);
  free(cfg->match_order);
  free(cfg->doc);
  free(cfg);
}

struct gw_config *gw_config_parse(const char *text, size_t len, struct gw_config_errors *errs)
{
  struct ctx c;
  memset(&c, 0, sizeof(c));
  memset(errs, 0, sizeof(*errs));
  c.errs = errs;

  const char *end = NULL;
  cJSON *root = cJSON_ParseWithLengthOpts(text, len, &end, false);
  if (!root) {
    size_t at = end && end >= text ? (size_t)(end - text) : 0;
    fail(&c, NULL, "invalid JSON near byte %zu", at);
    return NULL;
  }
  /* Only whitespace may follow the document. */
  for (const char *p = end; p && p < text + len; p++)
    if (!strchr(" \t\r\n", *p) && *p) {
      fail(&c, NULL, "unexpected text after the JSON document at byte %zu", (size_t)(p - text));
      cJSON_Delete(root);
      return NULL;
    }

  struct gw_config *cfg = calloc(1, sizeof(*cfg));
  if (!cfg)
    abort();
  atomic_init(&cfg->refs, 1);
  strcpy(cfg->node_id, "n1");
  parse_addr("127.0.0.1:8080", &cfg->listen);
  parse_addr("127.0.0.1:9090", &cfg->api_listen);
  cfg->shutdown_grace_ms = 10000;
  cfg->max_body_bytes = 1048576;
  cfg->max_response_bytes = 8u << 20;
  cfg->connection_memory_bytes = 14u << 10;
  cfg->max_connections = 20000;
  cfg->idle_timeout_ms = 75000;
  cfg->backend = GW_BACKEND_MEMORY;
  strcpy(cfg->redis_url, "redis://127.0.0.1:6379/0");
  cfg->redis_timeout_ms = 200;
  cfg->election_timeout_ms = 1000;
  cfg->heartbeat_ms = 100;
  cfg->snapshot_every = 10000;

  static const char *const keys[] = {"node", "admin", "backend", "cluster", "routes", NULL};
  static const char *const admin_keys[] = {"token", NULL};
  if (check_object(&c, root, NULL, keys)) {
    const cJSON *v;
    if ((v = get(root, "node")))
      parse_node(&c, v, cfg);
    if (!get(root, "node") || !get(get(root, "node"), "data_dir"))
      snprintf(cfg->data_dir, sizeof(cfg->data_dir), "var/%s", cfg->node_id);
    if ((v = get(root, "admin")) && check_object(&c, v, "admin", admin_keys)) {
      size_t old = push(&c, "admin");
      get_str(&c, v, "token", false, cfg->admin_token, sizeof(cfg->admin_token));
      pop(&c, old);
    }
    if ((v = get(root, "backend")))
      parse_backend(&c, v, cfg);
    if ((v = get(root, "cluster")))
      parse_cluster(&c, v, cfg);
    v = get(root, "routes");
    int n = cJSON_GetArraySize(v);
    if (v && (!cJSON_IsArray(v) || n > GW_CONFIG_MAX_ROUTES)) {
      fail(&c, "routes", "must be an array of at most %d routes", GW_CONFIG_MAX_ROUTES);
    } else if (v && n > 0) {
      cfg->routes = calloc((size_t)n, sizeof(*cfg->routes));
      if (!cfg->routes)
        abort();
      int i = 0;
      for (const cJSON *it = v->child; it; it = it->next, i++) {
        size_t old = push(&c, "routes[%d]", i);
        parse_route(&c, it, &cfg->routes[cfg->route_count++]);
        pop(&c, old);
      }
    }
    cross_checks(&c, cfg);
  }
  cfg->doc = cJSON_PrintUnformatted(root);
  if (!cfg->doc)
    abort();
  cJSON_Delete(root);
  if (errs->count) {
    config_free(cfg);
    return NULL;
  }
  gw_router_prepare(cfg);
  const char *env_token = getenv("GATEWAY_ADMIN_TOKEN");
  if (env_token && *env_token && !cfg->admin_token[0])
    snprintf(cfg->admin_token, sizeof(cfg->admin_token), "%s", env_token);
  return cfg;
}

struct gw_config *gw_config_load(const char *path, struct gw_config_errors *errs)
{
  memset(errs, 0, sizeof(*errs));
  FILE *f = fopen(path, "rb");
  if (!f) {
    snprintf(errs->lines[errs->count++], sizeof(errs->lines[0]),
             "config error at (file): cannot open %s: %s", path, strerror(errno));
    return NULL;
  }
  char *buf = malloc(GW_CONFIG_MAX_FILE_BYTES + 1);
  if (!buf)
    abort();
  size_t n = fread(buf, 1, GW_CONFIG_MAX_FILE_BYTES + 1, f);
  bool err = ferror(f);
  fclose(f);
  if (err || n > GW_CONFIG_MAX_FILE_BYTES) {
    snprintf(errs->lines[errs->count++], sizeof(errs->lines[0]),
             "config error at (file): %s is unreadable or larger than %u bytes", path,
             GW_CONFIG_MAX_FILE_BYTES);
    free(buf);
    return NULL;
  }
  struct gw_config *cfg = gw_config_parse(buf, n, errs);
  free(buf);
  return cfg;
}

struct gw_config *gw_config_ref(struct gw_config *c)
{
  atomic_fetch_add_explicit(&c->refs, 1, memory_order_relaxed);
  return c;
}

void gw_config_unref(struct gw_config *c)
{
  if (c && atomic_fetch_sub_explicit(&c->refs, 1, memory_order_acq_rel) == 1)
    config_free(c);
}

/* Rewrite "config error at routes[k]..." as "config error at route..." for the route an admin
 * call changed, so its errors name paths inside the object the caller sent. */
static void name_paths_for_route(struct gw_config_errors *errs, int k)
{
  char from[32];
  int fl = snprintf(from, sizeof(from), "config error at routes[%d]", k);
  for (size_t i = 0; i < errs->count; i++) {
    char *line = errs->lines[i];
    if (strncmp(line, from, (size_t)fl) != 0)
      continue;
    /* "routes[k]" becomes "route": the line only gets shorter. */
    size_t cut = (size_t)fl - strlen("config error at route");
    memmove(line + fl - cut, line + fl, strlen(line + fl) + 1);
  }
}

struct gw_config *gw_config_with_route(const struct gw_config *base, const char *name,
                                       const char *route_json, size_t len,
                                       struct gw_config_errors *errs)
{
  memset(errs, 0, sizeof(*errs));
  cJSON *doc = cJSON_Parse(base->doc);
  cJSON *route = NULL;
  if (route_json) {
    route = cJSON_ParseWithLength(route_json, len);
    if (!route) {
      snprintf(errs->lines[errs->count++], sizeof(errs->lines[0]),
               "config error at route: invalid JSON");
      cJSON_Delete(doc);
      return NULL;
    }
    if (!cJSON_IsObject(route)) {
      snprintf(errs->lines[errs->count++], sizeof(errs->lines[0]),
               "config error at route: must be an object");
      cJSON_Delete(route);
      cJSON_Delete(doc);
      return NULL;
    }
    {
      const cJSON *n = cJSON_GetObjectItemCaseSensitive(route, "name");
      if (!n)
        cJSON_AddStringToObject(route, "name", name);
      else if (!cJSON_IsString(n) || strcmp(n->valuestring, name) != 0) {
        snprintf(errs->lines[errs->count++], sizeof(errs->lines[0]),
                 "config error at route.name: must equal the name in the URL (%s)", name);
        cJSON_Delete(route);
        cJSON_Delete(doc);
        return NULL;
      }
    }
  }
  if (!doc) {
    cJSON_Delete(route);
    return NULL;
  }
  cJSON *routes = cJSON_GetObjectItemCaseSensitive(doc, "routes");
  if (!routes) {
    routes = cJSON_AddArrayToObject(doc, "routes");
  }
  int k = -1, i = 0;
  for (cJSON *it = routes->child; it; it = it->next, i++) {
    const cJSON *n = cJSON_GetObjectItemCaseSensitive(it, "name");
    if (cJSON_IsString(n) && strcmp(n->valuestring, name) == 0) {
      k = i;
      break;
    }
  }
  if (route) {
    if (k >= 0) {
      cJSON_ReplaceItemInArray(routes, k, route);
    } else {
      k = cJSON_GetArraySize(routes);
      cJSON_AddItemToArray(routes, route);
    }
  } else if (k >= 0) {
    cJSON_DeleteItemFromArray(routes, k);
  }
  char *text = cJSON_PrintUnformatted(doc);
  cJSON_Delete(doc);
  if (!text)
    return NULL;
  struct gw_config *cfg = gw_config_parse(text, strlen(text), errs);
  free(text);
  if (!cfg && k >= 0)
    name_paths_for_route(errs, k);
  return cfg;
}

struct gw_config *gw_config_with_routes(const struct gw_config *base, const char *routes_json,
                                        struct gw_config_errors *errs)
{
  memset(errs, 0, sizeof(*errs));
  cJSON *doc = cJSON_Parse(base->doc);
  cJSON *routes = cJSON_Parse(routes_json);
  if (!doc || !cJSON_IsArray(routes)) {
    cJSON_Delete(doc);
    cJSON_Delete(routes);
    snprintf(errs->lines[errs->count++], sizeof(errs->lines[0]),
             "config error at routes: not an array");
    return NULL;
  }
  cJSON_DeleteItemFromObjectCaseSensitive(doc, "routes");
  cJSON_AddItemToObject(doc, "routes", routes);
  char *text = cJSON_PrintUnformatted(doc);
  cJSON_Delete(doc);
  if (!text)
    return NULL;
  struct gw_config *cfg = gw_config_parse(text, strlen(text), errs);
  free(text);
  return cfg;
}
