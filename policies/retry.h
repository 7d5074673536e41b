/*
 * Retry policy (API.md §3): whether and when to try the upstream again.
 *
 * - Attempt budget: at most max_attempts tries in all (the first one included).
 * - Which failures: `on` selects connect failures, timeouts and responses whose status is in
 *   `statuses` (gw_retry_is_retryable).
 * - Which requests: only methods that are idempotent by RFC 9110 §9.2.2 (GET, HEAD, OPTIONS,
 *   TRACE, PUT, DELETE), or any request that carries an Idempotency-Key under an idempotency
 *   policy (draft-ietf-httpapi-idempotency-key-header), because then a repeat is harmless.
 * - Backoff before retry k (k = 1 is the second try) with cap = min(max_backoff_ms,
 *   base_ms * 2^(k-1)), following "Exponential Backoff And Jitter" (Marc Brooker, AWS
 *   Architecture Blog, 2015):
 *     none:         cap
 *     full:         uniform in [0, cap]
 *     equal:        cap/2 + uniform in [0, cap - cap/2]
 *     decorrelated: min(max_backoff_ms, uniform in [base_ms, 3 * previous]), previous = base_ms
 *                   before the first retry.
 *   So the first retry waits at most base_ms: API.md's "[0, min(max_backoff_ms, base_ms·2^(n-1))]
 *   before try n" read with tries counted from 0, which is inside the interval for either count.
 * - Retry-After from the upstream (RFC 9110 §10.2.3) replaces the drawn backoff; when it exceeds
 *   max_backoff_ms the request is not retried.
 * - Deadline: upstream.timeout_ms bounds the whole request. A try starts only with at least
 *   min_try_ms (at least 1 ns) left, and its timeout is cut to what is left; a backoff is
 *   scheduled only if a try could still start after it.
 * - Retry budget, as in Finagle's RetryBudget: a retry is made only while the retries of the last
 *   10 s stay within budget_percent of the route's requests of the last 10 s plus
 *   budget_min_per_sec * 10, so a struggling upstream is not hit by a retry storm. The budget is
 *   per route and counts in 100 ms slots.
 *
 * Per-request state is a small struct on the request (no allocation); the budget is per route.
 */
#ifndef GW_RETRY_H
#define GW_RETRY_H

#include "policy.h"
#include "rng.h"

#define GW_RETRY_MAX_ATTEMPTS 10
#define GW_RETRY_BUDGET_SLOTS 100
#define GW_RETRY_BUDGET_SLOT_NS (100 * GW_NS_PER_MS) /* 100 slots of 100 ms: the last 10 s */

enum gw_jitter {
  GW_JITTER_NONE = 0,
  GW_JITTER_FULL = 1,
  GW_JITTER_EQUAL = 2,
  GW_JITTER_DECORRELATED = 3,
};

/* Bits of gw_retry_config.on. */
enum {
  GW_RETRY_ON_CONNECT_FAILURE = 1,
  GW_RETRY_ON_TIMEOUT = 2,
  GW_RETRY_ON_STATUS = 4,
};

struct gw_retry_config {
  uint32_t max_attempts;   /* tries in all, 1..GW_RETRY_MAX_ATTEMPTS */
  uint64_t base_ms;        /* >= 1 */
  uint64_t max_backoff_ms; /* >= base_ms */
  enum gw_jitter jitter;
  uint64_t per_try_timeout_ms; /* 0: only the overall deadline bounds a try */
  unsigned on;                 /* GW_RETRY_ON_* */
  struct gw_status_set statuses;
  uint32_t budget_percent;     /* 0..100 */
  uint32_t budget_min_per_sec; /* retries per second always allowed */
  uint64_t min_try_ms;         /* a try needs this much time before the deadline; 0 = any */
};

/* Per-request retry state. */
struct gw_retry_state {
  uint64_t deadline_ns;     /* start + upstream.timeout_ms */
  uint64_t prev_backoff_ms; /* for decorrelated jitter */
  uint32_t attempts;        /* tries started */
  bool method_allows_retry; /* idempotent method, or an Idempotency-Key under a policy */
};

/* Per-route retry budget: requests and retries in 100 ms slots over the last 10 s. */
struct gw_retry_budget {
  uint64_t slot;     /* index (now / slot length) of the newest slot */
  uint64_t requests; /* sums over the window */
  uint64_t retries;
  uint32_t slot_requests[GW_RETRY_BUDGET_SLOTS];
  uint32_t slot_retries[GW_RETRY_BUDGET_SLOTS];
};

/* Why gw_retry_decide said no (or GW_RETRY_YES). */
enum gw_retry_verdict {
  GW_RETRY_YES = 0,
  GW_RETRY_NO_NOT_RETRYABLE, /* the failure is not in `on` / `statuses` */
  GW_RETRY_NO_METHOD,        /* not idempotent and no Idempotency-Key */
  GW_RETRY_NO_ATTEMPTS,      /* max_attempts tries made */
  GW_RETRY_NO_RETRY_AFTER,   /* the upstream's Retry-After exceeds max_backoff_ms */
  GW_RETRY_NO_DEADLINE,      /* no try could start after the backoff within the deadline */
  GW_RETRY_NO_BUDGET,        /* the route's retry budget is spent */
};

/* How one try ended, as gw_retry_decide needs it. */
struct gw_retry_input {
  enum gw_try_result result;
  int status;             /* for GW_TRY_RESPONSE */
  int64_t retry_after_ms; /* the upstream's Retry-After in ms, or -1 if it sent none */
};

/* 0 if cfg is usable, else GW_POLICY_EINVALID_CONFIG. */
int gw_retry_config_check(const struct gw_retry_config *cfg);

/* RFC 9110 §9.2.2: GET, HEAD, OPTIONS, TRACE, PUT, DELETE (method names are case-sensitive). */
bool gw_retry_method_is_idempotent(const char *method, size_t len);

/* Whether the try result is one `on` asks to retry. */
bool gw_retry_is_retryable(const struct gw_retry_config *cfg, enum gw_try_result result,
                           int status);

/*
 * The backoff before retry k (k >= 1; k = 1 precedes the second try), drawn per cfg->jitter from
 * rng; prev_ms is the previous backoff (decorrelated jitter only; pass base_ms for k = 1).
 */
uint64_t gw_retry_backoff_ms(const struct gw_retry_config *cfg, uint32_t k, uint64_t prev_ms,
                             struct gw_rng *rng);

/*
 * Starts the retry state of one request at now_ns with overall deadline timeout_ms (upstream
 * timeout). has_idempotency_key: the request carries a valid key under an idempotency policy.
 */
void gw_retry_begin(struct gw_retry_state *s, const char *method, size_t method_len,
                    bool has_idempotency_key, uint64_t timeout_ms, uint64_t now_ns);

/*
 * Before sending a try at now_ns: returns true, counts the attempt and sets *try_timeout_ns to
 * min(per_try_timeout, time left before the deadline); or returns false when the deadline (less
 * min_try_ms) has been reached or max_attempts tries were made, in which case no try is sent.
 * The timeout is in ns because what is left may be under a millisecond.
 */
bool gw_retry_start_try(struct gw_retry_state *s, const struct gw_retry_config *cfg,
                        uint64_t now_ns, uint64_t *try_timeout_ns);

/*
 * After a try failed at now_ns: decides whether to retry. On GW_RETRY_YES *delay_ms is the
 * backoff to wait before calling gw_retry_start_try again, and one retry has been withdrawn from
 * budget (budget may be NULL for no budget; rng may be NULL with jitter none). Any other verdict:
 * give the client this try's outcome. Checks run in the order of the verdicts, so a refused
 * retry never spends budget.
 */
enum gw_retry_verdict gw_retry_decide(struct gw_retry_state *s, const struct gw_retry_config *cfg,
                                      struct gw_retry_budget *budget, struct gw_rng *rng,
                                      const struct gw_retry_input *in, uint64_t now_ns,
                                      uint64_t *delay_ms);

/* snake_case name of a verdict, for logs and metrics labels ("yes", "budget", ...). */
const char *gw_retry_verdict_name(enum gw_retry_verdict v);

/* An empty budget. */
void gw_retry_budget_init(struct gw_retry_budget *b);

/* Counts one client request on the route (the first try of each request) at now_ns. */
void gw_retry_budget_on_request(struct gw_retry_budget *b, uint64_t now_ns);

/* Whether one more retry fits the budget at now_ns; if so it is counted. */
bool gw_retry_budget_try_withdraw(struct gw_retry_budget *b, const struct gw_retry_config *cfg,
                                  uint64_t now_ns);

/*
 * Parses a Retry-After field value given as delay-seconds (RFC 9110 §10.2.3) into milliseconds.
 * Returns 0, or GW_POLICY_EBAD_VALUE for anything else (an HTTP-date needs the wall clock,
 * which the caller has; values over one day are clamped to one day).
 */
int gw_retry_after_parse_seconds(const char *value, size_t len, uint64_t *ms);

/*
 * Parses a Retry-After field value in either form of RFC 9110 §10.2.3: delay-seconds, or an
 * HTTP-date (§5.6.7: IMF-fixdate, and the obsolete RFC 850 and asctime formats a recipient must
 * accept), turned into a delay from now_unix_s (the wall clock, seconds since the epoch; a date in
 * the past is a delay of 0). *ms is clamped to one day. Returns 0 or GW_POLICY_EBAD_VALUE.
 */
int gw_retry_after_parse(const char *value, size_t len, uint64_t now_unix_s, uint64_t *ms);

/* Seconds since the epoch of an HTTP-date (the three formats above); GW_POLICY_EBAD_VALUE else. */
int gw_http_date_parse(const char *value, size_t len, uint64_t now_unix_s, uint64_t *unix_s);

#endif
