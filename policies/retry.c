/* Retry decisions and the retry budget; see retry.h for the rules and their sources. */
#include "retry.h"

#include <string.h>

int gw_retry_config_check(const struct gw_retry_config *cfg)
{
  if (cfg->max_attempts < 1 || cfg->max_attempts > GW_RETRY_MAX_ATTEMPTS)
    return GW_POLICY_EINVALID_CONFIG;
  if (cfg->base_ms < 1 || cfg->max_backoff_ms < cfg->base_ms)
    return GW_POLICY_EINVALID_CONFIG;
  if (cfg->max_backoff_ms > UINT64_C(86400000))
    return GW_POLICY_EINVALID_CONFIG;
  if (cfg->jitter > GW_JITTER_DECORRELATED)
    return GW_POLICY_EINVALID_CONFIG;
  if (cfg->on & ~(unsigned)(GW_RETRY_ON_CONNECT_FAILURE | GW_RETRY_ON_TIMEOUT | GW_RETRY_ON_STATUS))
    return GW_POLICY_EINVALID_CONFIG;
  if (cfg->budget_percent > 100)
    return GW_POLICY_EINVALID_CONFIG;
  if (cfg->per_try_timeout_ms > UINT64_MAX / GW_NS_PER_MS ||
      cfg->min_try_ms > UINT64_MAX / GW_NS_PER_MS)
    return GW_POLICY_EINVALID_CONFIG;
  return 0;
}

bool gw_retry_method_is_idempotent(const char *method, size_t len)
{
  static const char *const idempotent[] = {"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"};
  for (size_t i = 0; i < sizeof(idempotent) / sizeof(idempotent[0]); i++)
    if (strlen(idempotent[i]) == len && memcmp(idempotent[i], method, len) == 0)
      return true;
  return false;
}

bool gw_retry_is_retryable(const struct gw_retry_config *cfg, enum gw_try_result result, int status)
{
  switch (result) {
  case GW_TRY_CONNECT_FAILURE:
    return cfg->on & GW_RETRY_ON_CONNECT_FAILURE;
  case GW_TRY_TIMEOUT:
    return cfg->on & GW_RETRY_ON_TIMEOUT;
  case GW_TRY_RESPONSE:
    return (cfg->on & GW_RETRY_ON_STATUS) && gw_status_set_has(&cfg->statuses, status);
  }
  return false;
}

/* min(max_backoff_ms, base_ms * 2^(k-1)) without overflow. */
static uint64_t exp_cap(const struct gw_retry_config *cfg, uint32_t k)
{
  uint64_t v = cfg->base_ms;
  for (uint32_t i = 1; i < k && v < cfg->max_backoff_ms; i++)
    v = gw_sat_mul(v, 2);
  return v < cfg->max_backoff_ms ? v : cfg->max_backoff_ms;
}

uint64_t gw_retry_backoff_ms(const struct gw_retry_config *cfg, uint32_t k, uint64_t prev_ms,
                             struct gw_rng *rng)
{
  uint64_t cap = exp_cap(cfg, k < 1 ? 1 : k);
  switch (cfg->jitter) {
  case GW_JITTER_NONE:
    return cap;
  case GW_JITTER_FULL:
    return gw_rng_between(rng, 0, cap);
  case GW_JITTER_EQUAL:
    return cap / 2 + gw_rng_between(rng, 0, cap - cap / 2);
  case GW_JITTER_DECORRELATED: {
    uint64_t hi = gw_sat_mul(prev_ms < cfg->base_ms ? cfg->base_ms : prev_ms, 3);
    uint64_t v = gw_rng_between(rng, cfg->base_ms, hi);
    return v < cfg->max_backoff_ms ? v : cfg->max_backoff_ms;
  }
  }
  return cap;
}

void gw_retry_begin(struct gw_retry_state *s, const char *method, size_t method_len,
                    bool has_idempotency_key, uint64_t timeout_ms, uint64_t now_ns)
{
  s->deadline_ns = gw_sat_add(now_ns, gw_sat_mul(timeout_ms, GW_NS_PER_MS));
  s->prev_backoff_ms = 0;
  s->attempts = 0;
  s->method_allows_retry = has_idempotency_key || gw_retry_method_is_idempotent(method, method_len);
}

/* Whether a try starting at start_ns would have min_try_ms (at least 1 ns) before the deadline. */
static bool try_fits(const struct gw_retry_state *s, const struct gw_retry_config *cfg,
                     uint64_t start_ns)
{
  uint64_t need = cfg->min_try_ms * GW_NS_PER_MS;
  if (need == 0)
    need = 1;
  return start_ns < s->deadline_ns && s->deadline_ns - start_ns >= need;
}

bool gw_retry_start_try(struct gw_retry_state *s, const struct gw_retry_config *cfg,
                        uint64_t now_ns, uint64_t *try_timeout_ns)
{
  if (s->attempts >= cfg->max_attempts || !try_fits(s, cfg, now_ns))
    return false;
  uint64_t left = s->deadline_ns - now_ns;
  uint64_t per_try = cfg->per_try_timeout_ms * GW_NS_PER_MS;
  *try_timeout_ns = per_try > 0 && per_try < left ? per_try : left;
  s->attempts++;
  return true;
}

enum gw_retry_verdict gw_retry_decide(struct gw_retry_state *s, const struct gw_retry_config *cfg,
                                      struct gw_retry_budget *budget, struct gw_rng *rng,
                                      const struct gw_retry_input *in, uint64_t now_ns,
                                      uint64_t *delay_ms)
{
  *delay_ms = 0;
  if (!gw_retry_is_retryable(cfg, in->result, in->status))
    return GW_RETRY_NO_NOT_RETRYABLE;
  if (!s->method_allows_retry)
    return GW_RETRY_NO_METHOD;
  if (s->attempts >= cfg->max_attempts)
    return GW_RETRY_NO_ATTEMPTS;
  uint64_t delay;
  if (in->retry_after_ms >= 0) {
    if ((uint64_t)in->retry_after_ms > cfg->max_backoff_ms)
      return GW_RETRY_NO_RETRY_AFTER;
    delay = (uint64_t)in->retry_after_ms;
  } else {
    uint64_t prev = s->prev_backoff_ms ? s->prev_backoff_ms : cfg->base_ms;
    delay = gw_retry_backoff_ms(cfg, s->attempts, prev, rng);
  }
  if (!try_fits(s, cfg, gw_sat_add(now_ns, delay * GW_NS_PER_MS)))
    return GW_RETRY_NO_DEADLINE;
  if (budget && !gw_retry_budget_try_withdraw(budget, cfg, now_ns))
    return GW_RETRY_NO_BUDGET;
  if (in->retry_after_ms < 0)
    s->prev_backoff_ms = delay;
  *delay_ms = delay;
  return GW_RETRY_YES;
}

const char *gw_retry_verdict_name(enum gw_retry_verdict v)
{
  switch (v) {
  case GW_RETRY_YES:
    return "yes";
  case GW_RETRY_NO_NOT_RETRYABLE:
    return "not_retryable";
  case GW_RETRY_NO_METHOD:
    return "not_idempotent";
  case GW_RETRY_NO_ATTEMPTS:
    return "attempts_exhausted";
  case GW_RETRY_NO_RETRY_AFTER:
    return "retry_after_too_long";
  case GW_RETRY_NO_DEADLINE:
    return "deadline";
  case GW_RETRY_NO_BUDGET:
    return "budget_exhausted";
  }
  return "unknown";
}

void gw_retry_budget_init(struct gw_retry_budget *b) { memset(b, 0, sizeof(*b)); }

/* Moves the window so that its newest slot is now's; slots that left are subtracted. */
static void budget_roll(struct gw_retry_budget *b, uint64_t now_ns)
{
  uint64_t slot = now_ns / GW_RETRY_BUDGET_SLOT_NS;
  if (slot <= b->slot)
    return; /* same slot, or a clock reading from the past: count in the newest slot */
  if (slot - b->slot >= GW_RETRY_BUDGET_SLOTS) {
    memset(b->slot_requests, 0, sizeof(b->slot_requests));
    memset(b->slot_retries, 0, sizeof(b->slot_retries));
    b->requests = b->retries = 0;
  } else {
    for (uint64_t s = b->slot + 1; s <= slot; s++) {
      uint32_t i = (uint32_t)(s % GW_RETRY_BUDGET_SLOTS);
      b->requests -= b->slot_requests[i];
      b->retries -= b->slot_retries[i];
      b->slot_requests[i] = 0;
      b->slot_retries[i] = 0;
    }
  }
  b->slot = slot;
}

void gw_retry_budget_on_request(struct gw_retry_budget *b, uint64_t now_ns)
{
  budget_roll(b, now_ns);
  b->slot_requests[b->slot % GW_RETRY_BUDGET_SLOTS]++;
  b->requests++;
}

bool gw_retry_budget_try_withdraw(struct gw_retry_budget *b, const struct gw_retry_config *cfg,
                                  uint64_t now_ns)
{
  budget_roll(b, now_ns);
  /* retries + 1 <= requests * percent / 100 + min_per_sec * 10, in hundredths */
  uint64_t allowed = b->requests * cfg->budget_percent + (uint64_t)cfg->budget_min_per_sec * 1000;
  if ((b->retries + 1) * 100 > allowed)
    return false;
  b->slot_retries[b->slot % GW_RETRY_BUDGET_SLOTS]++;
  b->retries++;
  return true;
}

int gw_retry_after_parse_seconds(const char *value, size_t len, uint64_t *ms)
{
  while (len > 0 && (*value == ' ' || *value == '\t')) {
    value++;
    len--;
  }
  while (len > 0 && (value[len - 1] == ' ' || value[len - 1] == '\t'))
    len--;
  if (len == 0)
    return GW_POLICY_EBAD_VALUE;
  uint64_t secs = 0;
  for (size_t i = 0; i < len; i++) {
    if (value[i] < '0' || value[i] > '9')
      return GW_POLICY_EBAD_VALUE;
    if (secs < 86400)
      secs = secs * 10 + (uint64_t)(value[i] - '0');
  }
  if (secs > 86400)
    secs = 86400;
  *ms = secs * 1000;
  return 0;
}

/* ---- HTTP-date (RFC 9110 §5.6.7) ---------------------------------------------------------- */

struct cursor {
  const char *p;
  const char *end;
};

static bool eat(struct cursor *c, const char *lit)
{
  size_t n = strlen(lit);
  if ((size_t)(c->end - c->p) < n || memcmp(c->p, lit, n) != 0)
    return false;
  c->p += n;
  return true;
}

/* Exactly n digits (n = 0: one or more, at most 9). */
static bool digits(struct cursor *c, int n, int *out)
{
  int v = 0, got = 0;
  while (c->p < c->end && *c->p >= '0' && *c->p <= '9' && (n == 0 ? got < 9 : got < n)) {
    v = v * 10 + (*c->p++ - '0');
    got++;
  }
  if (got == 0 || (n > 0 && got != n))
    return false;
  *out = v;
  return true;
}

static int month_of(struct cursor *c)
{
  static const char *const months[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                       "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
  for (int i = 0; i < 12; i++)
    if (eat(c, months[i]))
      return i + 1;
  return 0;
}

static bool weekday(struct cursor *c, bool long_name)
{
  static const char *const shorts[] = {"Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"};
  static const char *const longs[] = {"Monday", "Tuesday",  "Wednesday", "Thursday",
                                      "Friday", "Saturday", "Sunday"};
  for (int i = 0; i < 7; i++)
    if (eat(c, long_name ? longs[i] : shorts[i]))
      return true;
  return false;
}

static bool time_of_day(struct cursor *c, int *h, int *m, int *s)
{
  return digits(c, 2, h) && eat(c, ":") && digits(c, 2, m) && eat(c, ":") && digits(c, 2, s) &&
         *h <= 23 && *m <= 59 && *s <= 60;
}

/* Days from 1970-01-01 to y-m-d in the proleptic Gregorian calendar (y >= 1970). */
static int64_t days_from_civil(int64_t y, int m, int d)
{
  y -= m <= 2;
  int64_t era = y / 400;
  int64_t yoe = y - era * 400;
  int64_t doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
  int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
  return era * 146097 + doe - 719468;
}

static bool valid_day(int y, int m, int d)
{
  static const int mdays[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
  bool leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
  return d >= 1 && d <= mdays[m - 1] + (m == 2 && leap);
}

int gw_http_date_parse(const char *value, size_t len, uint64_t now_unix_s, uint64_t *unix_s)
{
  struct cursor c = {value, value + len};
  int y = 0, mo = 0, d = 0, h = 0, mi = 0, s = 0;
  struct cursor save = c;
  if (weekday(&c, false) && eat(&c, ", ")) {
    /* IMF-fixdate: Sun, 06 Nov 1994 08:49:37 GMT */
    if (!(digits(&c, 2, &d) && eat(&c, " ") && (mo = month_of(&c)) && eat(&c, " ") &&
          digits(&c, 4, &y) && eat(&c, " ") && time_of_day(&c, &h, &mi, &s) && eat(&c, " GMT")))
      return GW_POLICY_EBAD_VALUE;
  } else if ((c = save, weekday(&c, true)) && eat(&c, ", ")) {
    /* RFC 850: Sunday, 06-Nov-94 08:49:37 GMT */
    int yy;
    if (!(digits(&c, 2, &d) && eat(&c, "-") && (mo = month_of(&c)) && eat(&c, "-") &&
          digits(&c, 2, &yy) && eat(&c, " ") && time_of_day(&c, &h, &mi, &s) && eat(&c, " GMT")))
      return GW_POLICY_EBAD_VALUE;
    /* §5.6.7: a two-digit year more than 50 years in the future means the past century. */
    int now_year = 1970 + (int)(now_unix_s / 31556952);
    y = now_year - now_year % 100 + yy;
    if (y > now_year + 50)
      y -= 100;
  } else if ((c = save, weekday(&c, false)) && eat(&c, " ")) {
    /* asctime: Sun Nov  6 08:49:37 1994 */
    if (!((mo = month_of(&c)) && eat(&c, " ")))
      return GW_POLICY_EBAD_VALUE;
    if (c.p < c.end && *c.p == ' ') {
      c.p++;
      if (!digits(&c, 1, &d))
        return GW_POLICY_EBAD_VALUE;
    } else if (!digits(&c, 2, &d)) {
      return GW_POLICY_EBAD_VALUE;
    }
    if (!(eat(&c, " ") && time_of_day(&c, &h, &mi, &s) && eat(&c, " ") && digits(&c, 4, &y)))
      return GW_POLICY_EBAD_VALUE;
  } else {
    return GW_POLICY_EBAD_VALUE;
  }
  if (c.p != c.end || y < 1970 || !valid_day(y, mo, d))
    return GW_POLICY_EBAD_VALUE;
  *unix_s = (uint64_t)(days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + s);
  return 0;
}

int gw_retry_after_parse(const char *value, size_t len, uint64_t now_unix_s, uint64_t *ms)
{
  while (len > 0 && (*value == ' ' || *value == '\t')) {
    value++;
    len--;
  }
  while (len > 0 && (value[len - 1] == ' ' || value[len - 1] == '\t'))
    len--;
  if (len > 0 && value[0] >= '0' && value[0] <= '9')
    return gw_retry_after_parse_seconds(value, len, ms);
  uint64_t when;
  int rc = gw_http_date_parse(value, len, now_unix_s, &when);
  if (rc < 0)
    return rc;
  uint64_t secs = when > now_unix_s ? when - now_unix_s : 0;
  *ms = (secs > 86400 ? 86400 : secs) * 1000;
  return 0;
}
