/*
 * Shared vocabulary of the policies/ modules: the error codes they return, a set of HTTP
 * statuses, the numbers a limiter reports for the Retry-After and RateLimit header fields,
 * and a few time conversions.
 *
 * Everything in policies/ is pure: time is an argument (monotonic nanoseconds, read once per
 * event-loop turn by the caller), randomness comes from a generator the caller owns (rng.h),
 * there is no I/O, no global state, no thread and no lock. Only creation functions and the
 * idempotency store allocate; decisions never do. The modules depend on libc only, so the
 * error codes live here rather than in gateway/err.h; the gateway maps them onto its own table.
 */
#ifndef GW_POLICY_H
#define GW_POLICY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define GW_NS_PER_MS UINT64_C(1000000)
#define GW_NS_PER_S UINT64_C(1000000000)

/* Error codes: 0 is success, these are negative. X(name, snake_case, message). */
#define GW_POLICY_ERRNO_MAP(X)                                                                     \
  X(INVALID_CONFIG, "invalid_config", "a policy configuration value is out of range")              \
  X(NOMEM, "out_of_memory", "the policy state could not be allocated")                             \
  X(FULL, "store_full", "the store has reached its configured bound")                              \
  X(TOO_LARGE, "too_large", "the item is larger than the store accepts")                           \
  X(STALE, "stale_claim", "the claim no longer owns its record")                                   \
  X(NOT_FOUND, "not_found", "no such entry")                                                       \
  X(BAD_VALUE, "invalid_value", "the value cannot be parsed")

/* clang-format off */
enum gw_policy_err {
  GW_POLICY_OK = 0,
  GW_POLICY_E__FIRST = -2000,
#define GW_POLICY_ERR_ENUM(name, code, msg) GW_POLICY_E##name,
  GW_POLICY_ERRNO_MAP(GW_POLICY_ERR_ENUM)
#undef GW_POLICY_ERR_ENUM
  GW_POLICY_E__LAST
};
/* clang-format on */

/* The snake_case name of a policy error code ("unknown_error" for anything else). */
const char *gw_policy_err_name(int err);
/* One sentence describing a policy error code. */
const char *gw_policy_strerror(int err);

/*
 * What a limiter decision reports, in the units of the response header fields
 * (draft-ietf-httpapi-ratelimit-headers; RFC 9110 §10.2.3 for Retry-After):
 *   RateLimit-Policy: "<route>";q=<limit>;w=<window_s>
 *   RateLimit: "<route>";r=<remaining>;t=<reset_s>
 *   Retry-After: <retry_after_s>            (only on a refusal)
 * All second values are whole seconds rounded up, so a client that waits that long is never early.
 */
struct gw_ratelimit_info {
  uint64_t limit;         /* q: quota units in one window */
  uint64_t window_s;      /* w: the window the quota applies to */
  uint64_t remaining;     /* r: units left now (after this decision) */
  uint64_t reset_s;       /* t: until the quota is back to its full value */
  uint64_t next_s;        /* until at least one more unit is available (0 if one is now) */
  uint64_t retry_after_s; /* on a refusal: next_s, at least 1; 0 when admitted */
};

/*
 * Formats the two header field values (without the field names) into buf. The route name is
 * written as a structured-field string with '"' and '\\' escaped. Returns the length written,
 * or GW_POLICY_ETOO_LARGE if buf (cap bytes, including the terminating NUL) is too small.
 */
int gw_ratelimit_format_policy(char *buf, size_t cap, const char *route,
                               const struct gw_ratelimit_info *info);
int gw_ratelimit_format_state(char *buf, size_t cap, const char *route,
                              const struct gw_ratelimit_info *info);

/* A set of HTTP status codes 100..599, e.g. failure_statuses or retry statuses. */
struct gw_status_set {
  uint64_t bits[10];
};

/* Adds status to set; returns GW_POLICY_EINVALID_CONFIG unless 100 <= status <= 599. */
int gw_status_set_add(struct gw_status_set *set, int status);
/* Whether status is in set (false for anything outside 100..599). */
bool gw_status_set_has(const struct gw_status_set *set, int status);

/* How one try at the upstream ended (the breaker, retry and degradation all classify it). */
enum gw_try_result {
  GW_TRY_RESPONSE = 0,        /* a response arrived; its status decides */
  GW_TRY_CONNECT_FAILURE = 1, /* no connection: the upstream never saw the request */
  GW_TRY_TIMEOUT = 2,         /* sent, but no complete response in time */
};

/* ns rounded up to whole seconds (for Retry-After and RateLimit t=). */
static inline uint64_t gw_ns_to_s_ceil(uint64_t ns)
{
  return ns / GW_NS_PER_S + (ns % GW_NS_PER_S != 0);
}

/* ns rounded up to whole milliseconds. */
static inline uint64_t gw_ns_to_ms_ceil(uint64_t ns)
{
  return ns / GW_NS_PER_MS + (ns % GW_NS_PER_MS != 0);
}

/* a + b, saturating at UINT64_MAX. */
static inline uint64_t gw_sat_add(uint64_t a, uint64_t b)
{
  return a > UINT64_MAX - b ? UINT64_MAX : a + b;
}

/* a * b, saturating at UINT64_MAX. */
static inline uint64_t gw_sat_mul(uint64_t a, uint64_t b)
{
  if (a != 0 && b > UINT64_MAX / a)
    return UINT64_MAX;
  return a * b;
}

#endif
