/*
 * Graceful degradation (API.md §3): when something goes wrong the route can answer with a
 * configured fallback, or for GET with the last good response while it is younger than
 * stale_if_error_ms, marking the answer with `Gateway-Degraded: <reason>`.
 *
 * Reasons: circuit_open (the breaker refused), upstream_error (the tries failed), shed (more than
 * max_concurrent requests in flight), slow (mean latency over the last slow_window_ms above
 * slow_ms), forced (the admin set mode forced), stale (the header value when the last good
 * response is served instead of the fallback). A reason degrades only if it is listed in `on`;
 * forced always does. Without a fallback, shed still refuses the request (503 overloaded).
 *
 * The pieces, all O(1) and allocation-free:
 * - gw_degrade_admit: the forced mode, the slow detector (if `slow` is in `on`) and the
 *   concurrency limiter, in that order, before the request goes upstream.
 * - gw_degrade_record_latency: feeds the slow detector. The window is kept as 20 slots of
 *   slow_window_ms / 20, so the mean covers the last 19 to 20 slots.
 * - gw_degrade_decide: what to answer for a reason.
 * - gw_degrade_may_serve_stale: the stale-if-error rule alone (RFC 5861 gives the idea).
 *
 * Memory: 328 bytes of state per route (struct gw_degrade).
 */
#ifndef GW_DEGRADATION_H
#define GW_DEGRADATION_H

#include "policy.h"

#define GW_DEGRADE_SLOW_SLOTS 20

enum gw_degrade_reason {
  GW_DEGRADE_CIRCUIT_OPEN = 0,
  GW_DEGRADE_UPSTREAM_ERROR = 1,
  GW_DEGRADE_SHED = 2,
  GW_DEGRADE_SLOW = 3,
  GW_DEGRADE_FORCED = 4,
  GW_DEGRADE_STALE = 5,
  GW_DEGRADE_REASONS = 6,
};

#define GW_DEGRADE_ON(reason) (1u << (reason))

enum gw_degrade_mode {
  GW_DEGRADE_AUTO = 0,
  GW_DEGRADE_FORCED_MODE = 1,
};

struct gw_degrade_config {
  unsigned on;                /* GW_DEGRADE_ON(reason) bits */
  bool has_fallback;          /* a fallback response is configured */
  uint32_t max_concurrent;    /* in flight at most; 0 = no limit */
  uint64_t slow_ms;           /* 0 = no slow detection */
  uint64_t slow_window_ms;    /* >= 1 when slow_ms is set */
  uint64_t stale_if_error_ms; /* 0 = never serve a stale response */
};

enum gw_degrade_action {
  GW_DEGRADE_PROCEED = 0,        /* do not degrade: go on, or return the error as it is */
  GW_DEGRADE_SERVE_STALE = 1,    /* answer with the stored last good response */
  GW_DEGRADE_SERVE_FALLBACK = 2, /* answer with the configured fallback */
};

struct gw_degrade_decision {
  enum gw_degrade_action action;
  enum gw_degrade_reason header; /* Gateway-Degraded value when action != PROCEED */
};

struct gw_degrade {
  enum gw_degrade_mode mode;
  uint32_t in_flight;
  uint64_t slot;          /* index of the newest slow-detector slot */
  uint64_t sum_ms, count; /* over the slots */
  uint64_t slot_sum_ms[GW_DEGRADE_SLOW_SLOTS];
  uint32_t slot_count[GW_DEGRADE_SLOW_SLOTS];
  uint64_t degraded[GW_DEGRADE_REASONS]; /* answers degraded, by Gateway-Degraded value */
  uint64_t shed;                         /* admissions refused by the concurrency limit */
};

/* 0 if cfg is usable, else GW_POLICY_EINVALID_CONFIG. */
int gw_degrade_config_check(const struct gw_degrade_config *cfg);

/* Initialises d: AUTO mode, nothing in flight, no latency samples. */
void gw_degrade_init(struct gw_degrade *d);

/* Sets the admin mode (POST /admin/routes/{name}/degrade). */
void gw_degrade_set_mode(struct gw_degrade *d, enum gw_degrade_mode mode);

/*
 * Before the upstream call at now_ns: returns true if the request may proceed, in which case it
 * holds a concurrency slot and the caller must call gw_degrade_leave when it ends. Returns false
 * with *reason = GW_DEGRADE_FORCED, GW_DEGRADE_SLOW or GW_DEGRADE_SHED; then pass the reason to
 * gw_degrade_decide (shed without a fallback is 503 overloaded).
 */
bool gw_degrade_admit(struct gw_degrade *d, const struct gw_degrade_config *cfg, uint64_t now_ns,
                      enum gw_degrade_reason *reason);

/* Releases the concurrency slot taken by a successful gw_degrade_admit. */
void gw_degrade_leave(struct gw_degrade *d);

/* Feeds one upstream latency (a completed request) to the slow detector. */
void gw_degrade_record_latency(struct gw_degrade *d, const struct gw_degrade_config *cfg,
                               uint64_t latency_ms, uint64_t now_ns);

/* Mean latency over the window at now_ns (0 without samples) and whether it exceeds slow_ms. */
uint64_t gw_degrade_mean_latency_ms(struct gw_degrade *d, const struct gw_degrade_config *cfg,
                                    uint64_t now_ns);
bool gw_degrade_is_slow(struct gw_degrade *d, const struct gw_degrade_config *cfg, uint64_t now_ns);

/*
 * Whether a stored last good response may be served: the method is GET, stale_if_error_ms is
 * set, and the response (stored at stored_ns) is younger than stale_if_error_ms at now_ns.
 */
bool gw_degrade_may_serve_stale(const struct gw_degrade_config *cfg, const char *method,
                                size_t method_len, uint64_t stored_ns, uint64_t now_ns);

/*
 * What to answer for reason: nothing special unless the reason is forced or listed in `on`; then
 * the stale response if one may be served (have_stale: one is stored, at stale_stored_ns), else
 * the fallback if configured, else nothing. Counts the degraded answer.
 */
void gw_degrade_decide(struct gw_degrade *d, const struct gw_degrade_config *cfg,
                       enum gw_degrade_reason reason, const char *method, size_t method_len,
                       bool have_stale, uint64_t stale_stored_ns, uint64_t now_ns,
                       struct gw_degrade_decision *out);

/* The Gateway-Degraded value / JSON name of a reason ("circuit_open", ..., "stale"). */
const char *gw_degrade_reason_name(enum gw_degrade_reason reason);

#endif
