/*
 * Circuit breaker state machine; see circuit_breaker.h. The closed-state window keeps running
 * totals (calls, failures, slow) next to its ring so the trip check is O(1).
 */
#include "circuit_breaker.h"

#include <stdlib.h>
#include <string.h>

#define PPM UINT64_C(1000000)
#define OUT_FAILURE 1u
#define OUT_SLOW 2u

struct sec_bucket {
  uint32_t calls;
  uint32_t failures;
  uint32_t slow;
};

struct gw_breaker {
  struct gw_breaker_config cfg;
  uint32_t failure_ppm;
  uint32_t slow_ppm;
  enum gw_breaker_state state;
  enum gw_breaker_mode mode;
  uint64_t generation;
  uint64_t opened_ns;
  /* closed-state window */
  uint8_t *ring;           /* count window: one outcome per call */
  struct sec_bucket *secs; /* time window: one bucket per second */
  uint32_t ring_pos;       /* next slot to write */
  uint32_t ring_len;       /* slots in use */
  uint64_t last_sec;       /* newest second written (time window) */
  uint32_t calls, failures, slow;
  /* half-open trials */
  uint32_t trials_admitted, trials_done, trial_failures, trial_slow;
  /* counters */
  uint64_t to_open, to_half_open, to_closed;
  uint64_t admitted, rejected, late_results;
};

static uint32_t to_ppm(double rate) { return (uint32_t)(rate * 1e6 + 0.5); }

int gw_breaker_config_check(const struct gw_breaker_config *cfg)
{
  if (cfg->window != GW_BREAKER_WINDOW_COUNT && cfg->window != GW_BREAKER_WINDOW_TIME)
    return GW_POLICY_EINVALID_CONFIG;
  if (cfg->window_size < 1 || cfg->window_size > GW_BREAKER_WINDOW_MAX)
    return GW_POLICY_EINVALID_CONFIG;
  if (cfg->min_calls < 1)
    return GW_POLICY_EINVALID_CONFIG;
  if (!(cfg->failure_rate > 0.0 && cfg->failure_rate <= 1.0))
    return GW_POLICY_EINVALID_CONFIG;
  if (!(cfg->slow_call_rate > 0.0 && cfg->slow_call_rate <= 1.0))
    return GW_POLICY_EINVALID_CONFIG;
  if (cfg->open_ms < 1 || cfg->open_ms > UINT64_MAX / GW_NS_PER_MS)
    return GW_POLICY_EINVALID_CONFIG;
  if (cfg->half_open_calls < 1)
    return GW_POLICY_EINVALID_CONFIG;
  return 0;
}

size_t gw_breaker_memory_bytes(const struct gw_breaker_config *cfg)
{
  size_t per = cfg->window == GW_BREAKER_WINDOW_COUNT ? 1 : sizeof(struct sec_bucket);
  return sizeof(struct gw_breaker) + per * cfg->window_size;
}

int gw_breaker_create(const struct gw_breaker_config *cfg, struct gw_breaker **out)
{
  int rc = gw_breaker_config_check(cfg);
  if (rc < 0)
    return rc;
  struct gw_breaker *b = calloc(1, sizeof(*b));
  if (!b)
    return GW_POLICY_ENOMEM;
  b->cfg = *cfg;
  b->failure_ppm = to_ppm(cfg->failure_rate);
  b->slow_ppm = to_ppm(cfg->slow_call_rate);
  if (cfg->window == GW_BREAKER_WINDOW_COUNT)
    b->ring = calloc(cfg->window_size, 1);
  else
    b->secs = calloc(cfg->window_size, sizeof(struct sec_bucket));
  if (!b->ring && !b->secs) {
    free(b);
    return GW_POLICY_ENOMEM;
  }
  b->state = GW_BREAKER_CLOSED;
  b->mode = GW_BREAKER_AUTO;
  *out = b;
  return 0;
}

void gw_breaker_destroy(struct gw_breaker *b)
{
  if (!b)
    return;
  free(b->ring);
  free(b->secs);
  free(b);
}

bool gw_breaker_is_failure(const struct gw_breaker_config *cfg, enum gw_try_result result,
                           int status)
{
  if (result != GW_TRY_RESPONSE)
    return true;
  return gw_status_set_has(&cfg->failure_statuses, status);
}

static void window_reset(struct gw_breaker *b)
{
  if (b->ring)
    memset(b->ring, 0, b->cfg.window_size);
  if (b->secs)
    memset(b->secs, 0, sizeof(struct sec_bucket) * b->cfg.window_size);
  b->ring_pos = b->ring_len = 0;
  b->last_sec = 0;
  b->calls = b->failures = b->slow = 0;
}

static void trials_reset(struct gw_breaker *b)
{
  b->trials_admitted = b->trials_done = b->trial_failures = b->trial_slow = 0;
}

static void enter(struct gw_breaker *b, enum gw_breaker_state s, uint64_t now_ns)
{
  b->state = s;
  b->generation++;
  trials_reset(b);
  switch (s) {
  case GW_BREAKER_OPEN:
    b->opened_ns = now_ns;
    b->to_open++;
    window_reset(b);
    break;
  case GW_BREAKER_HALF_OPEN:
    b->to_half_open++;
    break;
  case GW_BREAKER_CLOSED:
    b->to_closed++;
    window_reset(b);
    break;
  }
}

/* Applies OPEN -> HALF_OPEN once open_ms has passed (AUTO mode only). */
static void advance(struct gw_breaker *b, uint64_t now_ns)
{
  if (b->mode == GW_BREAKER_AUTO && b->state == GW_BREAKER_OPEN &&
      now_ns >= gw_sat_add(b->opened_ns, b->cfg.open_ms * GW_NS_PER_MS))
    enter(b, GW_BREAKER_HALF_OPEN, now_ns);
}

static bool rate_reached(uint64_t part, uint64_t whole, uint32_t threshold_ppm)
{
  return whole > 0 && part * PPM >= (uint64_t)threshold_ppm * whole;
}

bool gw_breaker_acquire(struct gw_breaker *b, uint64_t now_ns, struct gw_breaker_ticket *t)
{
  advance(b, now_ns);
  t->generation = b->generation;
  t->retry_after_ns = 0;
  t->trial = 0;
  t->tracked = 1;
  t->admitted = 1;
  if (b->mode == GW_BREAKER_FORCED_CLOSED) {
    t->tracked = 0;
  } else if (b->mode == GW_BREAKER_FORCED_OPEN) {
    t->admitted = 0;
  } else if (b->state == GW_BREAKER_OPEN) {
    t->admitted = 0;
    t->retry_after_ns = gw_sat_add(b->opened_ns, b->cfg.open_ms * GW_NS_PER_MS) - now_ns;
  } else if (b->state == GW_BREAKER_HALF_OPEN) {
    if (b->trials_admitted < b->cfg.half_open_calls) {
      b->trials_admitted++;
      t->trial = 1;
    } else {
      t->admitted = 0;
    }
  }
  if (t->admitted) {
    b->admitted++;
  } else {
    b->rejected++;
    t->tracked = 0;
  }
  return t->admitted;
}

/* Time window: moves to second sec, clearing the buckets of the seconds that left the window. */
static void roll_to(struct gw_breaker *b, uint64_t sec)
{
  uint32_t n = b->cfg.window_size;
  if (sec <= b->last_sec)
    return;
  uint64_t gap = sec - b->last_sec;
  if (b->calls == 0) {
    /* every bucket is already empty (the totals are their sums) */
  } else if (gap >= n) {
    memset(b->secs, 0, sizeof(struct sec_bucket) * n);
    b->calls = b->failures = b->slow = 0;
  } else {
    for (uint64_t s = b->last_sec + 1; s <= sec; s++) {
      struct sec_bucket *k = &b->secs[s % n];
      b->calls -= k->calls;
      b->failures -= k->failures;
      b->slow -= k->slow;
      *k = (struct sec_bucket){0};
    }
  }
  b->last_sec = sec;
}

static void window_add(struct gw_breaker *b, unsigned outcome, uint64_t now_ns)
{
  if (b->ring) {
    uint32_t n = b->cfg.window_size;
    if (b->ring_len == n) {
      uint8_t old = b->ring[b->ring_pos];
      b->calls--;
      b->failures -= (old & OUT_FAILURE) != 0;
      b->slow -= (old & OUT_SLOW) != 0;
    } else {
      b->ring_len++;
    }
    b->ring[b->ring_pos] = (uint8_t)outcome;
    b->ring_pos = b->ring_pos + 1 == n ? 0 : b->ring_pos + 1;
  } else {
    uint64_t sec = now_ns / GW_NS_PER_S;
    if (sec < b->last_sec && b->calls > 0)
      sec = b->last_sec; /* a clock reading from the past counts in the newest second */
    if (b->calls == 0)
      b->last_sec = sec;
    roll_to(b, sec);
    struct sec_bucket *k = &b->secs[sec % b->cfg.window_size];
    k->calls++;
    k->failures += (outcome & OUT_FAILURE) != 0;
    k->slow += (outcome & OUT_SLOW) != 0;
  }
  b->calls++;
  b->failures += (outcome & OUT_FAILURE) != 0;
  b->slow += (outcome & OUT_SLOW) != 0;
}

static bool tripped(const struct gw_breaker *b, uint64_t calls, uint64_t failures, uint64_t slow)
{
  if (rate_reached(failures, calls, b->failure_ppm))
    return true;
  return b->cfg.slow_call_ms > 0 && rate_reached(slow, calls, b->slow_ppm);
}

void gw_breaker_record(struct gw_breaker *b, struct gw_breaker_ticket *t, bool failure,
                       uint64_t duration_ms, uint64_t now_ns)
{
  if (!t->admitted)
    return;
  t->admitted = 0; /* a ticket reports once */
  if (!t->tracked)
    return;
  if (t->generation != b->generation || b->mode != GW_BREAKER_AUTO) {
    b->late_results++;
    return;
  }
  bool slow = b->cfg.slow_call_ms > 0 && duration_ms > b->cfg.slow_call_ms;
  unsigned outcome = (failure ? OUT_FAILURE : 0) | (slow ? OUT_SLOW : 0);
  if (b->state == GW_BREAKER_CLOSED) {
    window_add(b, outcome, now_ns);
    if (b->calls >= b->cfg.min_calls && tripped(b, b->calls, b->failures, b->slow))
      enter(b, GW_BREAKER_OPEN, now_ns);
  } else if (b->state == GW_BREAKER_HALF_OPEN && t->trial) {
    b->trials_done++;
    b->trial_failures += failure;
    b->trial_slow += slow;
    if (b->trials_done >= b->cfg.half_open_calls) {
      if (tripped(b, b->trials_done, b->trial_failures, b->trial_slow))
        enter(b, GW_BREAKER_OPEN, now_ns);
      else
        enter(b, GW_BREAKER_CLOSED, now_ns);
    }
  }
}

void gw_breaker_cancel(struct gw_breaker *b, struct gw_breaker_ticket *t)
{
  bool was_admitted = t->admitted;
  t->admitted = 0; /* a ticket is given back once */
  if (!was_admitted || !t->trial || t->generation != b->generation)
    return;
  if (b->state == GW_BREAKER_HALF_OPEN && b->trials_admitted > b->trials_done)
    b->trials_admitted--;
}

void gw_breaker_set_mode(struct gw_breaker *b, enum gw_breaker_mode mode, uint64_t now_ns)
{
  if (mode == b->mode)
    return;
  b->mode = mode;
  switch (mode) {
  case GW_BREAKER_FORCED_OPEN:
    if (b->state != GW_BREAKER_OPEN)
      enter(b, GW_BREAKER_OPEN, now_ns);
    else
      b->generation++;
    break;
  case GW_BREAKER_FORCED_CLOSED:
  case GW_BREAKER_AUTO:
    if (b->state != GW_BREAKER_CLOSED)
      enter(b, GW_BREAKER_CLOSED, now_ns);
    else {
      b->generation++;
      window_reset(b);
    }
    break;
  }
}

enum gw_breaker_state gw_breaker_state(struct gw_breaker *b, uint64_t now_ns)
{
  advance(b, now_ns);
  return b->state;
}

void gw_breaker_snapshot(struct gw_breaker *b, uint64_t now_ns, struct gw_breaker_snapshot *out)
{
  advance(b, now_ns);
  if (b->secs && b->calls > 0) {
    uint64_t sec = now_ns / GW_NS_PER_S;
    if (sec > b->last_sec)
      roll_to(b, sec); /* drop seconds that have left the window */
  }
  memset(out, 0, sizeof(*out));
  out->state = b->state;
  out->mode = b->mode;
  out->window_calls = b->calls;
  out->window_failures = b->failures;
  out->window_slow = b->slow;
  if (b->calls > 0) {
    out->failure_rate_ppm = (uint32_t)(b->failures * PPM / b->calls);
    out->slow_rate_ppm = (uint32_t)(b->slow * PPM / b->calls);
  }
  out->trials_admitted = b->trials_admitted;
  out->trials_done = b->trials_done;
  out->trial_failures = b->trial_failures;
  if (b->state == GW_BREAKER_OPEN && b->mode == GW_BREAKER_AUTO)
    out->open_remaining_ms =
        gw_ns_to_ms_ceil(gw_sat_add(b->opened_ns, b->cfg.open_ms * GW_NS_PER_MS) - now_ns);
  out->to_open = b->to_open;
  out->to_half_open = b->to_half_open;
  out->to_closed = b->to_closed;
  out->admitted = b->admitted;
  out->rejected = b->rejected;
  out->late_results = b->late_results;
}

const char *gw_breaker_state_name(enum gw_breaker_state state)
{
  switch (state) {
  case GW_BREAKER_CLOSED:
    return "closed";
  case GW_BREAKER_OPEN:
    return "open";
  case GW_BREAKER_HALF_OPEN:
    return "half_open";
  }
  return "unknown";
}

const char *gw_breaker_mode_name(enum gw_breaker_mode mode)
{
  switch (mode) {
  case GW_BREAKER_AUTO:
    return "auto";
  case GW_BREAKER_FORCED_OPEN:
    return "forced_open";
  case GW_BREAKER_FORCED_CLOSED:
    return "forced_closed";
  }
  return "unknown";
}
