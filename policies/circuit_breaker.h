/*
 * Circuit breaker (API.md §3), shaped after resilience4j's CircuitBreaker:
 *
 *   CLOSED --(>= min_calls in the window and failure rate >= failure_rate
 *             or slow-call rate >= slow_call_rate)--> OPEN
 *   OPEN --(open_ms elapsed, noticed by the next acquire or snapshot)--> HALF_OPEN
 *   HALF_OPEN: exactly half_open_calls trial calls are admitted, the rest rejected as open; when
 *   all trials have reported, OPEN again if their failure (or slow-call) rate reaches the
 *   threshold, else CLOSED with an empty window.
 *
 * The window is either the last window_size calls (`count`) or the calls of the last window_size
 * seconds (`time`, kept as one bucket per second of the monotonic clock, so it spans between
 * window_size - 1 and window_size seconds as resilience4j's does). A call is slow when it took
 * longer than slow_call_ms (0 disables slow-call tracking). A failure is a connect failure, a
 * timeout, or a status in failure_statuses (gw_breaker_is_failure). Rates are compared in integer
 * parts per million, so 0.5 with 10 of 20 calls failing trips exactly.
 *
 * Every admission returns a ticket carrying the breaker's generation, which changes on every
 * state change. A result whose ticket is from an older generation (a call admitted while closed
 * that finishes after the breaker opened or went half-open) is counted as late and otherwise
 * ignored: it is not a trial and it does not refill the new window.
 *
 * The admin override (POST /admin/routes/{name}/breaker): FORCED_OPEN rejects everything,
 * FORCED_CLOSED admits everything and records nothing, AUTO returns to a fresh CLOSED state.
 *
 * Memory: one allocation at creation, window_size bytes (count) or 12 * window_size bytes (time),
 * plus the struct. Decisions allocate nothing and are O(1), except that a time window skipping
 * k idle seconds clears min(k, window_size) buckets once.
 */
#ifndef GW_CIRCUIT_BREAKER_H
#define GW_CIRCUIT_BREAKER_H

#include "policy.h"

#define GW_BREAKER_WINDOW_MAX 100000u

enum gw_breaker_window {
  GW_BREAKER_WINDOW_COUNT = 0, /* the last window_size calls */
  GW_BREAKER_WINDOW_TIME = 1,  /* the calls of the last window_size seconds */
};

enum gw_breaker_state {
  GW_BREAKER_CLOSED = 0,
  GW_BREAKER_OPEN = 1,
  GW_BREAKER_HALF_OPEN = 2,
};

enum gw_breaker_mode {
  GW_BREAKER_AUTO = 0,
  GW_BREAKER_FORCED_OPEN = 1,
  GW_BREAKER_FORCED_CLOSED = 2,
};

struct gw_breaker_config {
  enum gw_breaker_window window;
  uint32_t window_size;     /* calls or seconds, 1..GW_BREAKER_WINDOW_MAX */
  uint32_t min_calls;       /* calls needed in the window before it can trip, >= 1 */
  double failure_rate;      /* (0, 1] */
  uint64_t slow_call_ms;    /* a call longer than this is slow; 0 = not tracked */
  double slow_call_rate;    /* (0, 1] */
  uint64_t open_ms;         /* how long OPEN lasts, >= 1 */
  uint32_t half_open_calls; /* trial calls in HALF_OPEN, >= 1 */
  struct gw_status_set failure_statuses;
};

/* What an admission hands back; pass it to gw_breaker_record or gw_breaker_cancel. */
struct gw_breaker_ticket {
  uint64_t generation;
  uint64_t retry_after_ns; /* when rejected: time until the breaker may admit again (>= 0) */
  uint8_t admitted;        /* the call may go to the upstream */
  uint8_t trial;           /* admitted as a half-open trial */
  uint8_t tracked;         /* its result counts (false under FORCED_CLOSED) */
};

struct gw_breaker_snapshot {
  enum gw_breaker_state state;
  enum gw_breaker_mode mode;
  uint32_t window_calls; /* closed-state window */
  uint32_t window_failures;
  uint32_t window_slow;
  uint32_t failure_rate_ppm; /* of the window; 0 when it is empty */
  uint32_t slow_rate_ppm;
  uint32_t trials_admitted; /* half-open */
  uint32_t trials_done;
  uint32_t trial_failures;
  uint64_t open_remaining_ms; /* OPEN: until HALF_OPEN, rounded up */
  uint64_t to_open;           /* transitions into each state since creation */
  uint64_t to_half_open;
  uint64_t to_closed;
  uint64_t admitted;     /* acquisitions that were admitted */
  uint64_t rejected;     /* acquisitions that were rejected */
  uint64_t late_results; /* results ignored because their ticket was from an older state */
};

struct gw_breaker;

/* 0 if cfg is usable, else GW_POLICY_EINVALID_CONFIG. */
int gw_breaker_config_check(const struct gw_breaker_config *cfg);

/* Bytes one breaker with cfg allocates (struct and window). */
size_t gw_breaker_memory_bytes(const struct gw_breaker_config *cfg);

/*
 * Creates a CLOSED breaker in AUTO mode; *out owns it (gw_breaker_destroy). The config is copied.
 * Errors: GW_POLICY_EINVALID_CONFIG, GW_POLICY_ENOMEM.
 */
int gw_breaker_create(const struct gw_breaker_config *cfg, struct gw_breaker **out);
void gw_breaker_destroy(struct gw_breaker *b);

/* Whether a try that ended with result (and status, for a response) counts as a failure. */
bool gw_breaker_is_failure(const struct gw_breaker_config *cfg, enum gw_try_result result,
                           int status);

/*
 * Asks to send one call at now_ns. Returns true and an admitted ticket, or false (reject with
 * 503 circuit_open; ticket->retry_after_ns says how long until OPEN ends, 0 if the breaker is
 * half-open with all trials out or forced open, where Retry-After: 1 is the honest answer).
 * Every admitted ticket must later be passed to exactly one of gw_breaker_record or
 * gw_breaker_cancel.
 */
bool gw_breaker_acquire(struct gw_breaker *b, uint64_t now_ns, struct gw_breaker_ticket *ticket);

/*
 * Reports the result of an admitted call: failure as classified by gw_breaker_is_failure,
 * duration_ms as measured by the caller. May change the state. A ticket from an older generation
 * is counted in late_results and otherwise ignored. The ticket is consumed (admitted cleared), so
 * reporting it twice has no effect.
 */
void gw_breaker_record(struct gw_breaker *b, struct gw_breaker_ticket *ticket, bool failure,
                       uint64_t duration_ms, uint64_t now_ns);

/*
 * Gives back an admitted ticket whose call was never sent (client gone, retry budget spent):
 * a half-open trial slot becomes free again; nothing is recorded. The ticket is consumed.
 */
void gw_breaker_cancel(struct gw_breaker *b, struct gw_breaker_ticket *ticket);

/* Sets the admin override (see above); a change of state bumps the generation. */
void gw_breaker_set_mode(struct gw_breaker *b, enum gw_breaker_mode mode, uint64_t now_ns);

/* The state at now_ns (applies a due OPEN -> HALF_OPEN transition). */
enum gw_breaker_state gw_breaker_state(struct gw_breaker *b, uint64_t now_ns);

/* Fills out with the state at now_ns and every count, for the admin endpoint and metrics. */
void gw_breaker_snapshot(struct gw_breaker *b, uint64_t now_ns, struct gw_breaker_snapshot *out);

/* "closed", "open", "half_open"; and "auto", "forced_open", "forced_closed". */
const char *gw_breaker_state_name(enum gw_breaker_state state);
const char *gw_breaker_mode_name(enum gw_breaker_mode mode);

#endif
