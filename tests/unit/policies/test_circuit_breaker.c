/* Circuit breaker transitions, windows, trials, late results and overrides on a fake clock. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "circuit_breaker.h"
#include "rng.h"

#define S GW_NS_PER_S
#define MS GW_NS_PER_MS
#define T0 (UINT64_C(100) * S)

static struct gw_breaker_config base_config(void)
{
  struct gw_breaker_config c = {.window = GW_BREAKER_WINDOW_COUNT,
                                .window_size = 20,
                                .min_calls = 10,
                                .failure_rate = 0.5,
                                .slow_call_ms = 2000,
                                .slow_call_rate = 1.0,
                                .open_ms = 30000,
                                .half_open_calls = 3};
  gw_status_set_add(&c.failure_statuses, 500);
  gw_status_set_add(&c.failure_statuses, 502);
  gw_status_set_add(&c.failure_statuses, 503);
  gw_status_set_add(&c.failure_statuses, 504);
  return c;
}

static struct gw_breaker *make(const struct gw_breaker_config *c)
{
  struct gw_breaker *b = NULL;
  assert_int_equal(gw_breaker_create(c, &b), 0);
  return b;
}

/* One admitted call that ends with failure (or not) after duration_ms. */
static void call(struct gw_breaker *b, uint64_t now, bool failure, uint64_t duration_ms)
{
  struct gw_breaker_ticket t;
  assert_true(gw_breaker_acquire(b, now, &t));
  gw_breaker_record(b, &t, failure, duration_ms, now);
}

static void trip(struct gw_breaker *b, uint64_t now)
{
  for (int i = 0; i < 10; i++)
    call(b, now, true, 1);
  assert_int_equal(gw_breaker_state(b, now), GW_BREAKER_OPEN);
}

static void config_out_of_range_is_rejected(void **state)
{
  struct gw_breaker_config c = base_config();
  assert_int_equal(gw_breaker_config_check(&c), 0);
  c.failure_rate = 0;
  assert_int_equal(gw_breaker_config_check(&c), GW_POLICY_EINVALID_CONFIG);
  c = base_config();
  c.failure_rate = 1.01;
  assert_int_equal(gw_breaker_config_check(&c), GW_POLICY_EINVALID_CONFIG);
  c = base_config();
  c.window_size = 0;
  assert_int_equal(gw_breaker_config_check(&c), GW_POLICY_EINVALID_CONFIG);
  c = base_config();
  c.half_open_calls = 0;
  assert_int_equal(gw_breaker_config_check(&c), GW_POLICY_EINVALID_CONFIG);
  c = base_config();
  c.min_calls = 0;
  struct gw_breaker *b = NULL;
  assert_int_equal(gw_breaker_create(&c, &b), GW_POLICY_EINVALID_CONFIG);
  assert_null(b);
}

static void memory_bytes_grow_with_the_window(void **state)
{
  struct gw_breaker_config c = base_config();
  size_t count20 = gw_breaker_memory_bytes(&c);
  c.window_size = 120;
  assert_int_equal(gw_breaker_memory_bytes(&c), count20 + 100);
  c.window = GW_BREAKER_WINDOW_TIME;
  assert_int_equal(gw_breaker_memory_bytes(&c), count20 - 20 + 12 * 120);
  assert_true(count20 < 512);
}

static void failures_are_connect_failures_timeouts_and_listed_statuses(void **state)
{
  struct gw_breaker_config c = base_config();
  assert_true(gw_breaker_is_failure(&c, GW_TRY_CONNECT_FAILURE, 0));
  assert_true(gw_breaker_is_failure(&c, GW_TRY_TIMEOUT, 0));
  assert_true(gw_breaker_is_failure(&c, GW_TRY_RESPONSE, 503));
  assert_false(gw_breaker_is_failure(&c, GW_TRY_RESPONSE, 501));
  assert_false(gw_breaker_is_failure(&c, GW_TRY_RESPONSE, 200));
  assert_false(gw_breaker_is_failure(&c, GW_TRY_RESPONSE, 404));
}

static void breaker_stays_closed_below_min_calls(void **state)
{
  struct gw_breaker_config c = base_config();
  struct gw_breaker *b = make(&c);
  for (int i = 0; i < 9; i++)
    call(b, T0, true, 1);
  assert_int_equal(gw_breaker_state(b, T0), GW_BREAKER_CLOSED);
  call(b, T0, true, 1);
  assert_int_equal(gw_breaker_state(b, T0), GW_BREAKER_OPEN);
  gw_breaker_destroy(b);
}

static void breaker_opens_exactly_when_failure_rate_reached(void **state)
{
  struct gw_breaker_config c = base_config();
  struct gw_breaker *b = make(&c);
  for (int i = 0; i < 10; i++)
    call(b, T0, false, 1);
  for (int i = 0; i < 9; i++)
    call(b, T0, true, 1);
  struct gw_breaker_snapshot snap;
  gw_breaker_snapshot(b, T0, &snap);
  assert_int_equal(snap.state, GW_BREAKER_CLOSED); /* 9 of 19 < 0.5 */
  assert_int_equal(snap.window_calls, 19);
  assert_int_equal(snap.window_failures, 9);
  assert_int_equal(snap.failure_rate_ppm, 9 * 1000000 / 19);
  call(b, T0, true, 1); /* 10 of 20 = 0.5 */
  gw_breaker_snapshot(b, T0, &snap);
  assert_int_equal(snap.state, GW_BREAKER_OPEN);
  assert_int_equal(snap.to_open, 1);
  assert_int_equal(snap.open_remaining_ms, 30000);
  gw_breaker_destroy(b);
}

static void count_window_forgets_the_oldest_call(void **state)
{
  struct gw_breaker_config c = base_config();
  c.window_size = 4;
  c.min_calls = 4;
  c.failure_rate = 0.75;
  struct gw_breaker *b = make(&c);
  call(b, T0, true, 1);
  call(b, T0, true, 1);
  call(b, T0, false, 1);
  call(b, T0, false, 1); /* F F S S: 2 of 4 */
  call(b, T0, true, 1);  /* F S S F: 2 of 4, the first F left */
  struct gw_breaker_snapshot snap;
  gw_breaker_snapshot(b, T0, &snap);
  assert_int_equal(snap.window_calls, 4);
  assert_int_equal(snap.window_failures, 2);
  assert_int_equal(snap.state, GW_BREAKER_CLOSED);
  call(b, T0, true, 1); /* S S F F */
  assert_int_equal(gw_breaker_state(b, T0), GW_BREAKER_CLOSED);
  call(b, T0, true, 1); /* S F F F: 3 of 4 */
  assert_int_equal(gw_breaker_state(b, T0), GW_BREAKER_OPEN);
  gw_breaker_destroy(b);
}

static void breaker_opens_on_slow_call_rate(void **state)
{
  struct gw_breaker_config c = base_config();
  c.slow_call_ms = 100;
  c.slow_call_rate = 0.5;
  struct gw_breaker *b = make(&c);
  for (int i = 0; i < 5; i++)
    call(b, T0, false, 100); /* exactly slow_call_ms is not slow */
  for (int i = 0; i < 4; i++)
    call(b, T0, false, 101);
  struct gw_breaker_snapshot snap;
  gw_breaker_snapshot(b, T0, &snap);
  assert_int_equal(snap.window_slow, 4);
  assert_int_equal(snap.state, GW_BREAKER_CLOSED);
  call(b, T0, false, 5000); /* 5 of 10 slow */
  assert_int_equal(gw_breaker_state(b, T0), GW_BREAKER_OPEN);
  gw_breaker_destroy(b);
}

static void slow_calls_are_ignored_when_slow_call_ms_is_zero(void **state)
{
  struct gw_breaker_config c = base_config();
  c.slow_call_ms = 0;
  c.slow_call_rate = 0.1;
  struct gw_breaker *b = make(&c);
  for (int i = 0; i < 30; i++)
    call(b, T0, false, 1000000);
  assert_int_equal(gw_breaker_state(b, T0), GW_BREAKER_CLOSED);
  gw_breaker_destroy(b);
}

static void open_rejects_with_retry_after_until_open_ms(void **state)
{
  struct gw_breaker_config c = base_config();
  struct gw_breaker *b = make(&c);
  trip(b, T0);
  struct gw_breaker_ticket t;
  assert_false(gw_breaker_acquire(b, T0, &t));
  assert_false(t.admitted);
  assert_int_equal(t.retry_after_ns, 30 * S);
  assert_false(gw_breaker_acquire(b, T0 + 30 * S - 1, &t));
  assert_int_equal(t.retry_after_ns, 1);
  assert_true(gw_breaker_acquire(b, T0 + 30 * S, &t));
  assert_true(t.trial);
  assert_int_equal(gw_breaker_state(b, T0 + 30 * S), GW_BREAKER_HALF_OPEN);
  struct gw_breaker_snapshot snap;
  gw_breaker_snapshot(b, T0 + 30 * S, &snap);
  assert_int_equal(snap.rejected, 2);
  assert_int_equal(snap.to_half_open, 1);
  gw_breaker_destroy(b);
}

static void half_open_admits_exactly_half_open_calls_trials(void **state)
{
  struct gw_breaker_config c = base_config();
  struct gw_breaker *b = make(&c);
  trip(b, T0);
  uint64_t now = T0 + 30 * S;
  struct gw_breaker_ticket t[5];
  assert_true(gw_breaker_acquire(b, now, &t[0]));
  assert_true(gw_breaker_acquire(b, now, &t[1]));
  assert_true(gw_breaker_acquire(b, now, &t[2]));
  assert_false(gw_breaker_acquire(b, now, &t[3]));
  assert_int_equal(t[3].retry_after_ns, 0);
  assert_false(gw_breaker_acquire(b, now + 10 * S, &t[4]));
  struct gw_breaker_snapshot snap;
  gw_breaker_snapshot(b, now, &snap);
  assert_int_equal(snap.state, GW_BREAKER_HALF_OPEN);
  assert_int_equal(snap.trials_admitted, 3);
  assert_int_equal(snap.trials_done, 0);
  /* Two results are not enough to decide; the third is. */
  gw_breaker_record(b, &t[0], false, 1, now);
  gw_breaker_record(b, &t[1], false, 1, now);
  assert_int_equal(gw_breaker_state(b, now), GW_BREAKER_HALF_OPEN);
  assert_false(gw_breaker_acquire(b, now, &t[3]));
  gw_breaker_record(b, &t[2], false, 1, now);
  gw_breaker_snapshot(b, now, &snap);
  assert_int_equal(snap.state, GW_BREAKER_CLOSED);
  assert_int_equal(snap.window_calls, 0);
  assert_int_equal(snap.to_closed, 1);
  assert_true(gw_breaker_acquire(b, now, &t[3]));
  gw_breaker_destroy(b);
}

static void half_open_reopens_when_trial_failure_rate_reached(void **state)
{
  struct gw_breaker_config c = base_config();
  c.half_open_calls = 4;
  struct gw_breaker *b = make(&c);
  trip(b, T0);
  uint64_t now = T0 + 30 * S;
  struct gw_breaker_ticket t[4];
  for (int i = 0; i < 4; i++)
    assert_true(gw_breaker_acquire(b, now, &t[i]));
  gw_breaker_record(b, &t[0], true, 1, now);
  gw_breaker_record(b, &t[1], false, 1, now);
  gw_breaker_record(b, &t[2], true, 1, now + 1 * S);
  gw_breaker_record(b, &t[3], false, 1, now + 2 * S); /* 2 of 4 = 0.5 */
  struct gw_breaker_snapshot snap;
  gw_breaker_snapshot(b, now + 2 * S, &snap);
  assert_int_equal(snap.state, GW_BREAKER_OPEN);
  assert_int_equal(snap.to_open, 2);
  assert_int_equal(snap.open_remaining_ms, 30000); /* a fresh open period from the reopen */
  struct gw_breaker_ticket r;
  assert_false(gw_breaker_acquire(b, now + 32 * S - 1, &r));
  assert_true(gw_breaker_acquire(b, now + 32 * S, &r));
  gw_breaker_destroy(b);
}

static void half_open_closes_when_trial_failure_rate_below(void **state)
{
  struct gw_breaker_config c = base_config();
  c.half_open_calls = 3;
  struct gw_breaker *b = make(&c);
  trip(b, T0);
  uint64_t now = T0 + 30 * S;
  struct gw_breaker_ticket t[3];
  for (int i = 0; i < 3; i++)
    assert_true(gw_breaker_acquire(b, now, &t[i]));
  gw_breaker_record(b, &t[0], true, 1, now);
  gw_breaker_record(b, &t[1], false, 1, now);
  gw_breaker_record(b, &t[2], false, 1, now); /* 1 of 3 < 0.5 */
  assert_int_equal(gw_breaker_state(b, now), GW_BREAKER_CLOSED);
  gw_breaker_destroy(b);
}

static void half_open_reopens_on_slow_trials(void **state)
{
  struct gw_breaker_config c = base_config();
  c.slow_call_ms = 100;
  c.slow_call_rate = 1.0;
  c.half_open_calls = 2;
  struct gw_breaker *b = make(&c);
  trip(b, T0);
  uint64_t now = T0 + 30 * S;
  struct gw_breaker_ticket t[2];
  for (int i = 0; i < 2; i++)
    assert_true(gw_breaker_acquire(b, now, &t[i]));
  gw_breaker_record(b, &t[0], false, 500, now);
  gw_breaker_record(b, &t[1], false, 500, now);
  assert_int_equal(gw_breaker_state(b, now), GW_BREAKER_OPEN);
  gw_breaker_destroy(b);
}

static void late_result_from_closed_is_not_counted_as_trial(void **state)
{
  struct gw_breaker_config c = base_config();
  struct gw_breaker *b = make(&c);
  struct gw_breaker_ticket early;
  assert_true(gw_breaker_acquire(b, T0, &early)); /* admitted while closed */
  trip(b, T0);
  uint64_t now = T0 + 30 * S;
  struct gw_breaker_ticket t[3];
  assert_true(gw_breaker_acquire(b, now, &t[0]));
  gw_breaker_record(b, &early, true, 1, now); /* finishes late, in half-open */
  struct gw_breaker_snapshot snap;
  gw_breaker_snapshot(b, now, &snap);
  assert_int_equal(snap.state, GW_BREAKER_HALF_OPEN);
  assert_int_equal(snap.trials_done, 0);
  assert_int_equal(snap.trial_failures, 0);
  assert_int_equal(snap.late_results, 1);
  /* It did not take a trial slot either: two more trials are admitted, then no more. */
  assert_true(gw_breaker_acquire(b, now, &t[1]));
  assert_true(gw_breaker_acquire(b, now, &t[2]));
  struct gw_breaker_ticket x;
  assert_false(gw_breaker_acquire(b, now, &x));
  for (int i = 0; i < 3; i++)
    gw_breaker_record(b, &t[i], false, 1, now);
  assert_int_equal(gw_breaker_state(b, now), GW_BREAKER_CLOSED);
  gw_breaker_destroy(b);
}

static void late_result_from_an_earlier_closed_period_is_ignored(void **state)
{
  struct gw_breaker_config c = base_config();
  c.min_calls = 1;
  c.window_size = 1;
  c.half_open_calls = 1;
  struct gw_breaker *b = make(&c);
  struct gw_breaker_ticket old, t;
  assert_true(gw_breaker_acquire(b, T0, &old));
  call(b, T0, true, 1); /* opens */
  assert_true(gw_breaker_acquire(b, T0 + 30 * S, &t));
  gw_breaker_record(b, &t, false, 1, T0 + 30 * S); /* closes again */
  assert_int_equal(gw_breaker_state(b, T0 + 30 * S), GW_BREAKER_CLOSED);
  gw_breaker_record(b, &old, true, 1, T0 + 31 * S); /* would reopen if counted */
  assert_int_equal(gw_breaker_state(b, T0 + 31 * S), GW_BREAKER_CLOSED);
  struct gw_breaker_snapshot snap;
  gw_breaker_snapshot(b, T0 + 31 * S, &snap);
  assert_int_equal(snap.late_results, 1);
  assert_int_equal(snap.window_calls, 0);
  gw_breaker_destroy(b);
}

static void cancelled_trial_frees_its_slot(void **state)
{
  struct gw_breaker_config c = base_config();
  c.half_open_calls = 1;
  struct gw_breaker *b = make(&c);
  trip(b, T0);
  uint64_t now = T0 + 30 * S;
  struct gw_breaker_ticket t, u;
  assert_true(gw_breaker_acquire(b, now, &t));
  assert_false(gw_breaker_acquire(b, now, &u));
  gw_breaker_cancel(b, &t);
  assert_true(gw_breaker_acquire(b, now, &u));
  gw_breaker_cancel(b, &t); /* a second cancel of a stale ticket changes nothing */
  struct gw_breaker_ticket v;
  assert_false(gw_breaker_acquire(b, now, &v));
  gw_breaker_record(b, &u, false, 1, now);
  assert_int_equal(gw_breaker_state(b, now), GW_BREAKER_CLOSED);
  gw_breaker_destroy(b);
}

static void forced_open_rejects_and_auto_restores_fresh_closed(void **state)
{
  struct gw_breaker_config c = base_config();
  struct gw_breaker *b = make(&c);
  struct gw_breaker_ticket inflight, t;
  assert_true(gw_breaker_acquire(b, T0, &inflight));
  gw_breaker_set_mode(b, GW_BREAKER_FORCED_OPEN, T0);
  assert_false(gw_breaker_acquire(b, T0 + 3600 * S, &t)); /* never goes half-open by itself */
  assert_int_equal(gw_breaker_state(b, T0 + 3600 * S), GW_BREAKER_OPEN);
  gw_breaker_record(b, &inflight, true, 1, T0);
  gw_breaker_set_mode(b, GW_BREAKER_AUTO, T0 + 3600 * S);
  struct gw_breaker_snapshot snap;
  gw_breaker_snapshot(b, T0 + 3600 * S, &snap);
  assert_int_equal(snap.state, GW_BREAKER_CLOSED);
  assert_int_equal(snap.mode, GW_BREAKER_AUTO);
  assert_int_equal(snap.window_calls, 0);
  assert_int_equal(snap.late_results, 1);
  assert_int_equal(snap.to_open, 1);
  assert_int_equal(snap.to_closed, 1);
  assert_true(gw_breaker_acquire(b, T0 + 3600 * S, &t));
  gw_breaker_destroy(b);
}

static void forced_closed_admits_everything_and_never_trips(void **state)
{
  struct gw_breaker_config c = base_config();
  struct gw_breaker *b = make(&c);
  trip(b, T0);
  gw_breaker_set_mode(b, GW_BREAKER_FORCED_CLOSED, T0);
  for (int i = 0; i < 100; i++)
    call(b, T0, true, 1);
  struct gw_breaker_snapshot snap;
  gw_breaker_snapshot(b, T0, &snap);
  assert_int_equal(snap.state, GW_BREAKER_CLOSED);
  assert_int_equal(snap.mode, GW_BREAKER_FORCED_CLOSED);
  assert_int_equal(snap.window_calls, 0);
  assert_string_equal(gw_breaker_mode_name(snap.mode), "forced_closed");
  assert_string_equal(gw_breaker_state_name(GW_BREAKER_HALF_OPEN), "half_open");
  gw_breaker_destroy(b);
}

static void time_window_counts_only_the_last_window_seconds(void **state)
{
  struct gw_breaker_config c = base_config();
  c.window = GW_BREAKER_WINDOW_TIME;
  c.window_size = 10;
  c.min_calls = 4;
  c.failure_rate = 0.5;
  struct gw_breaker *b = make(&c);
  call(b, T0, true, 1);
  call(b, T0 + 1 * S, true, 1);
  call(b, T0 + 2 * S, true, 1);
  struct gw_breaker_snapshot snap;
  gw_breaker_snapshot(b, T0 + 9 * S + 999 * MS, &snap);
  assert_int_equal(snap.window_calls, 3);
  gw_breaker_snapshot(b, T0 + 10 * S, &snap); /* the call of second T0 has left */
  assert_int_equal(snap.window_calls, 2);
  call(b, T0 + 11 * S, true, 1); /* seconds T0+2 and T0+11: 2 calls, below min_calls */
  gw_breaker_snapshot(b, T0 + 11 * S, &snap);
  assert_int_equal(snap.window_calls, 2);
  assert_int_equal(snap.state, GW_BREAKER_CLOSED);
  call(b, T0 + 11 * S, false, 1);
  call(b, T0 + 12 * S, false, 1); /* T0+2 s left again: F S S, 3 calls */
  gw_breaker_snapshot(b, T0 + 12 * S, &snap);
  assert_int_equal(snap.window_calls, 3);
  assert_int_equal(snap.state, GW_BREAKER_CLOSED);
  call(b, T0 + 12 * S + 500 * MS, true, 1); /* F S S F: 2 of 4 -> opens */
  assert_int_equal(gw_breaker_state(b, T0 + 13 * S), GW_BREAKER_OPEN);
  gw_breaker_destroy(b);
}

static void time_window_after_long_idle_starts_empty(void **state)
{
  struct gw_breaker_config c = base_config();
  c.window = GW_BREAKER_WINDOW_TIME;
  c.window_size = 5;
  c.min_calls = 3;
  struct gw_breaker *b = make(&c);
  call(b, T0, true, 1);
  call(b, T0, true, 1);
  call(b, T0 + 1000 * S, true, 1);
  call(b, T0 + 1000 * S, false, 1);
  struct gw_breaker_snapshot snap;
  gw_breaker_snapshot(b, T0 + 1000 * S, &snap);
  assert_int_equal(snap.window_calls, 2);
  assert_int_equal(snap.state, GW_BREAKER_CLOSED);
  call(b, T0 + 1003 * S, false, 1); /* 1 of 3 */
  call(b, T0 + 1004 * S, true, 1);  /* 2 of 4 */
  assert_int_equal(gw_breaker_state(b, T0 + 1004 * S), GW_BREAKER_OPEN);
  gw_breaker_destroy(b);
}

static void full_cycle_counts_every_transition(void **state)
{
  struct gw_breaker_config c = base_config();
  c.half_open_calls = 1;
  struct gw_breaker *b = make(&c);
  uint64_t now = T0;
  for (int cycle = 0; cycle < 3; cycle++) {
    trip(b, now);
    now += 30 * S;
    struct gw_breaker_ticket t;
    assert_true(gw_breaker_acquire(b, now, &t));
    gw_breaker_record(b, &t, cycle == 0, 1, now); /* first trial fails: reopen */
    if (cycle == 0) {
      now += 30 * S;
      assert_true(gw_breaker_acquire(b, now, &t));
      gw_breaker_record(b, &t, false, 1, now);
    }
    assert_int_equal(gw_breaker_state(b, now), GW_BREAKER_CLOSED);
  }
  struct gw_breaker_snapshot snap;
  gw_breaker_snapshot(b, now, &snap);
  assert_int_equal(snap.to_open, 4);
  assert_int_equal(snap.to_half_open, 4);
  assert_int_equal(snap.to_closed, 3);
  gw_breaker_destroy(b);
}

/* Random operations: the documented invariants hold after every step. */
static void random_operations_keep_the_invariants(void **state)
{
  struct gw_rng rng;
  gw_rng_seed(&rng, 8);
  for (int round = 0; round < 20; round++) {
    struct gw_breaker_config c = base_config();
    c.window = gw_rng_below(&rng, 2) ? GW_BREAKER_WINDOW_TIME : GW_BREAKER_WINDOW_COUNT;
    c.window_size = 1 + (uint32_t)gw_rng_below(&rng, 10);
    c.min_calls = 1 + (uint32_t)gw_rng_below(&rng, 5);
    c.half_open_calls = 1 + (uint32_t)gw_rng_below(&rng, 4);
    c.open_ms = 1 + gw_rng_below(&rng, 3000);
    c.slow_call_ms = gw_rng_below(&rng, 3) * 100;
    struct gw_breaker *b = make(&c);
    enum { OUT = 16 };
    struct gw_breaker_ticket out[OUT];
    int nout = 0;
    uint64_t now = T0, admitted = 0, rejected = 0;
    for (int step = 0; step < 5000; step++) {
      now += gw_rng_below(&rng, 200 * MS);
      uint64_t op = gw_rng_below(&rng, 100);
      if (op < 45 && nout < OUT) {
        if (gw_breaker_acquire(b, now, &out[nout])) {
          nout++;
          admitted++;
        } else {
          rejected++;
        }
      } else if (op < 90 && nout > 0) {
        int i = (int)gw_rng_below(&rng, (uint64_t)nout);
        if (op < 88)
          gw_breaker_record(b, &out[i], gw_rng_below(&rng, 3) == 0, gw_rng_below(&rng, 300), now);
        else
          gw_breaker_cancel(b, &out[i]);
        out[i] = out[--nout];
      } else if (op == 99) {
        gw_breaker_set_mode(b, (enum gw_breaker_mode)gw_rng_below(&rng, 3), now);
      }
      struct gw_breaker_snapshot s;
      gw_breaker_snapshot(b, now, &s);
      assert_int_equal(s.admitted, admitted);
      assert_int_equal(s.rejected, rejected);
      assert_true(s.window_failures <= s.window_calls);
      assert_true(s.window_slow <= s.window_calls);
      if (c.window == GW_BREAKER_WINDOW_COUNT)
        assert_true(s.window_calls <= c.window_size);
      if (s.state != GW_BREAKER_HALF_OPEN)
        assert_int_equal(s.trials_admitted, 0);
      assert_true(s.trials_admitted <= c.half_open_calls);
      assert_true(s.trials_done <= s.trials_admitted);
      assert_true(s.trial_failures <= s.trials_done);
      if (s.state != GW_BREAKER_CLOSED)
        assert_int_equal(s.window_calls, 0);
      if (s.mode == GW_BREAKER_AUTO && s.state == GW_BREAKER_OPEN)
        assert_true(s.open_remaining_ms >= 1 && s.open_remaining_ms <= c.open_ms);
      /* a closed, auto breaker never stays past its thresholds */
      if (s.mode == GW_BREAKER_AUTO && s.state == GW_BREAKER_CLOSED &&
          s.window_calls >= c.min_calls && c.window == GW_BREAKER_WINDOW_COUNT)
        assert_true(s.failure_rate_ppm < 500000);
    }
    while (nout > 0)
      gw_breaker_cancel(b, &out[--nout]);
    gw_breaker_destroy(b);
  }
}

int main(void)
{
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(config_out_of_range_is_rejected),
      cmocka_unit_test(memory_bytes_grow_with_the_window),
      cmocka_unit_test(failures_are_connect_failures_timeouts_and_listed_statuses),
      cmocka_unit_test(breaker_stays_closed_below_min_calls),
      cmocka_unit_test(breaker_opens_exactly_when_failure_rate_reached),
      cmocka_unit_test(count_window_forgets_the_oldest_call),
      cmocka_unit_test(breaker_opens_on_slow_call_rate),
      cmocka_unit_test(slow_calls_are_ignored_when_slow_call_ms_is_zero),
      cmocka_unit_test(open_rejects_with_retry_after_until_open_ms),
      cmocka_unit_test(half_open_admits_exactly_half_open_calls_trials),
      cmocka_unit_test(half_open_reopens_when_trial_failure_rate_reached),
      cmocka_unit_test(half_open_closes_when_trial_failure_rate_below),
      cmocka_unit_test(half_open_reopens_on_slow_trials),
      cmocka_unit_test(late_result_from_closed_is_not_counted_as_trial),
      cmocka_unit_test(late_result_from_an_earlier_closed_period_is_ignored),
      cmocka_unit_test(cancelled_trial_frees_its_slot),
      cmocka_unit_test(forced_open_rejects_and_auto_restores_fresh_closed),
      cmocka_unit_test(forced_closed_admits_everything_and_never_trips),
      cmocka_unit_test(time_window_counts_only_the_last_window_seconds),
      cmocka_unit_test(time_window_after_long_idle_starts_empty),
      cmocka_unit_test(full_cycle_counts_every_transition),
      cmocka_unit_test(random_operations_keep_the_invariants),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
