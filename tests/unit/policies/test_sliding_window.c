/* Sliding-window limiter behaviour on a hand-driven clock, checked against a brute-force model. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include <cmocka.h>

#include "rng.h"
#include "sliding_window.h"

#define S GW_NS_PER_S
#define MS GW_NS_PER_MS
#define T0 (UINT64_C(5000) * S)

static struct gw_sliding_window *make(const struct gw_sliding_window_config *cfg)
{
  assert_int_equal(gw_sliding_window_config_check(cfg), 0);
  struct gw_sliding_window *w = aligned_alloc(8, gw_sliding_window_state_bytes(cfg));
  assert_non_null(w);
  gw_sliding_window_init(w, cfg);
  return w;
}

static void config_out_of_range_is_rejected(void **state)
{
  struct gw_sliding_window_config c = {.limit = 0, .window_ms = 1000};
  assert_int_equal(gw_sliding_window_config_check(&c), GW_POLICY_EINVALID_CONFIG);
  c.limit = 1;
  c.window_ms = 0;
  assert_int_equal(gw_sliding_window_config_check(&c), GW_POLICY_EINVALID_CONFIG);
  c.window_ms = 1000;
  c.granularity_ns = 1001 * MS;
  assert_int_equal(gw_sliding_window_config_check(&c), GW_POLICY_EINVALID_CONFIG);
  c.granularity_ns = MS;
  assert_int_equal(gw_sliding_window_config_check(&c), 0);
  c.limit = GW_SLIDING_WINDOW_LIMIT_MAX + 1;
  assert_int_equal(gw_sliding_window_config_check(&c), GW_POLICY_EINVALID_CONFIG);
}

static void state_bytes_follow_the_documented_formula(void **state)
{
  struct gw_sliding_window_config c = {.limit = 1000, .window_ms = 60000};
  assert_int_equal(gw_sliding_window_state_bytes(&c), 24 + 12 * 1000);
  c.granularity_ns = 60 * MS; /* 1000 granules + 2 > limit: still limit runs */
  assert_int_equal(gw_sliding_window_state_bytes(&c), 24 + 12 * 1000);
  c.limit = 100000;
  c.granularity_ns = MS;
  assert_int_equal(gw_sliding_window_state_bytes(&c), 24 + 12 * 60002);
  c.limit = 1;
  assert_int_equal(gw_sliding_window_state_bytes(&c), 24 + 16); /* 12 rounded up to 8 */
}

static void admits_up_to_limit_then_refuses(void **state)
{
  struct gw_sliding_window_config c = {.limit = 3, .window_ms = 1000};
  struct gw_sliding_window *w = make(&c);
  assert_true(gw_sliding_window_admit(w, &c, T0, NULL));
  assert_true(gw_sliding_window_admit(w, &c, T0 + 1, NULL));
  assert_true(gw_sliding_window_admit(w, &c, T0 + 2, NULL));
  assert_false(gw_sliding_window_admit(w, &c, T0 + 3, NULL));
  assert_false(gw_sliding_window_admit(w, &c, T0 + 500 * MS, NULL));
  assert_int_equal(gw_sliding_window_count(w, &c, T0 + 500 * MS), 3);
  free(w);
}

static void slot_frees_exactly_at_window_ms(void **state)
{
  struct gw_sliding_window_config c = {.limit = 2, .window_ms = 1000};
  struct gw_sliding_window *w = make(&c);
  assert_true(gw_sliding_window_admit(w, &c, T0, NULL));
  assert_true(gw_sliding_window_admit(w, &c, T0 + 100 * MS, NULL));
  /* One nanosecond before the first admission leaves the window: still full. */
  assert_false(gw_sliding_window_admit(w, &c, T0 + 1000 * MS - 1, NULL));
  assert_int_equal(gw_sliding_window_wait_ns(w, &c, T0 + 1000 * MS - 1), 1);
  /* At exactly window_ms the first admission is outside (t - window, t]. */
  assert_true(gw_sliding_window_admit(w, &c, T0 + 1000 * MS, NULL));
  assert_false(gw_sliding_window_admit(w, &c, T0 + 1000 * MS, NULL));
  assert_false(gw_sliding_window_admit(w, &c, T0 + 1100 * MS - 1, NULL));
  assert_true(gw_sliding_window_admit(w, &c, T0 + 1100 * MS, NULL));
  free(w);
}

static void no_burst_across_a_window_edge(void **state)
{
  /* A fixed-window counter would admit 2 * limit around the edge; this must not. */
  struct gw_sliding_window_config c = {.limit = 10, .window_ms = 1000};
  struct gw_sliding_window *w = make(&c);
  int admitted = 0;
  for (int i = 0; i < 10; i++)
    admitted += gw_sliding_window_admit(w, &c, T0 + 999 * MS, NULL);
  for (int i = 0; i < 10; i++)
    admitted += gw_sliding_window_admit(w, &c, T0 + 1001 * MS, NULL);
  assert_int_equal(admitted, 10);
  for (int i = 0; i < 10; i++)
    admitted += gw_sliding_window_admit(w, &c, T0 + 1999 * MS, NULL);
  assert_int_equal(admitted, 20);
  free(w);
}

static void refusal_reports_retry_after_and_reset(void **state)
{
  struct gw_sliding_window_config c = {.limit = 2, .window_ms = 60000};
  struct gw_sliding_window *w = make(&c);
  struct gw_ratelimit_info info;
  assert_true(gw_sliding_window_admit(w, &c, T0, &info));
  assert_int_equal(info.limit, 2);
  assert_int_equal(info.window_s, 60);
  assert_int_equal(info.remaining, 1);
  assert_int_equal(info.reset_s, 60);
  assert_int_equal(info.next_s, 0);
  assert_int_equal(info.retry_after_s, 0);
  assert_true(gw_sliding_window_admit(w, &c, T0 + 30500 * MS, &info));
  assert_int_equal(info.remaining, 0);
  assert_int_equal(info.reset_s, 60);
  assert_int_equal(info.next_s, 30); /* 29.5 s rounded up */
  assert_false(gw_sliding_window_admit(w, &c, T0 + 40 * S, &info));
  assert_int_equal(info.remaining, 0);
  assert_int_equal(info.retry_after_s, 20);
  assert_int_equal(info.reset_s, 51); /* 50.5 s rounded up */
  assert_false(gw_sliding_window_admit(w, &c, T0 + 60 * S - 1, &info));
  assert_int_equal(info.retry_after_s, 1);
  assert_true(gw_sliding_window_admit(w, &c, T0 + 60 * S, &info));
  free(w);
}

static void clock_going_backwards_counts_as_newest(void **state)
{
  struct gw_sliding_window_config c = {.limit = 2, .window_ms = 1000};
  struct gw_sliding_window *w = make(&c);
  assert_true(gw_sliding_window_admit(w, &c, T0 + 500 * MS, NULL));
  assert_true(gw_sliding_window_admit(w, &c, T0, NULL)); /* recorded at T0 + 500 ms */
  assert_false(gw_sliding_window_admit(w, &c, T0 + 1499 * MS, NULL));
  assert_true(gw_sliding_window_admit(w, &c, T0 + 1500 * MS, NULL));
  assert_true(gw_sliding_window_admit(w, &c, T0 + 1500 * MS, NULL));
  free(w);
}

/* Brute-force model: every admission time kept; admit iff fewer than limit in (t - W, t]. */
struct model {
  uint64_t *at;
  size_t n;
};

static bool model_admit(struct model *m, uint64_t limit, uint64_t window_ns, uint64_t t)
{
  uint64_t in = 0;
  for (size_t i = 0; i < m->n; i++)
    in += m->at[i] + window_ns > t;
  if (in >= limit)
    return false;
  m->at[m->n++] = t;
  return true;
}

static void max_in_any_window(const uint64_t *at, size_t n, uint64_t window_ns, uint64_t *max_out)
{
  uint64_t max = 0;
  for (size_t i = 0; i < n; i++) {
    uint64_t in = 0;
    for (size_t j = 0; j <= i; j++)
      in += at[j] + window_ns > at[i];
    if (in > max)
      max = in;
  }
  *max_out = max;
}

static void exact_ring_matches_brute_force_model(void **state)
{
  struct gw_rng rng;
  gw_rng_seed(&rng, 2024);
  for (int round = 0; round < 20; round++) {
    struct gw_sliding_window_config c = {.limit = 1 + gw_rng_below(&rng, 12),
                                         .window_ms = 1 + gw_rng_below(&rng, 50)};
    struct gw_sliding_window *w = make(&c);
    struct model m = {calloc(2000, sizeof(uint64_t)), 0};
    uint64_t t = T0;
    for (int i = 0; i < 2000; i++) {
      t += gw_rng_below(&rng, 4) == 0 ? 0 : gw_rng_below(&rng, 3 * MS); /* bursts and gaps */
      bool want = model_admit(&m, c.limit, c.window_ms * MS, t);
      assert_int_equal(gw_sliding_window_admit(w, &c, t, NULL), want);
    }
    uint64_t max;
    max_in_any_window(m.at, m.n, c.window_ms * MS, &max);
    assert_true(max <= c.limit);
    free(m.at);
    free(w);
  }
}

static void coarse_granularity_never_exceeds_limit(void **state)
{
  struct gw_rng rng;
  gw_rng_seed(&rng, 99);
  for (int round = 0; round < 20; round++) {
    struct gw_sliding_window_config c = {.limit = 5 + gw_rng_below(&rng, 40),
                                         .window_ms = 10 + gw_rng_below(&rng, 30),
                                         .granularity_ns = MS};
    struct gw_sliding_window *w = make(&c);
    assert_true(w->cap <= c.window_ms + 2);
    uint64_t *at = calloc(3000, sizeof(uint64_t));
    size_t n = 0;
    uint64_t t = T0 + gw_rng_below(&rng, MS);
    struct model m = {calloc(3000, sizeof(uint64_t)), 0};
    for (int i = 0; i < 3000; i++) {
      t += gw_rng_below(&rng, 200 * 1000); /* up to 0.2 ms apart: many per granule */
      bool ok = gw_sliding_window_admit(w, &c, t, NULL);
      bool exact = model_admit(&m, c.limit, c.window_ms * MS, t);
      (void)exact;
      if (ok)
        at[n++] = t;
    }
    uint64_t max;
    max_in_any_window(at, n, c.window_ms * MS, &max);
    assert_true(max <= c.limit);
    /* Rounding up frees slots at most one granule late: admissions over the run stay close. */
    assert_true(n * 100 >= m.n * 90);
    free(at);
    free(m.at);
    free(w);
  }
}

static void millisecond_times_are_exact_at_millisecond_granularity(void **state)
{
  struct gw_rng rng;
  gw_rng_seed(&rng, 5);
  struct gw_sliding_window_config c = {.limit = 20, .window_ms = 100, .granularity_ns = MS};
  struct gw_sliding_window *w = make(&c);
  struct model m = {calloc(5000, sizeof(uint64_t)), 0};
  uint64_t t = T0;
  for (int i = 0; i < 5000; i++) {
    t += gw_rng_below(&rng, 4) * MS;
    assert_int_equal(gw_sliding_window_admit(w, &c, t, NULL),
                     model_admit(&m, c.limit, c.window_ms * MS, t));
  }
  free(m.at);
  free(w);
}

static void big_limit_fills_and_drains_the_ring(void **state)
{
  struct gw_sliding_window_config c = {.limit = 100000, .window_ms = 1000};
  struct gw_sliding_window *w = make(&c);
  for (uint64_t i = 0; i < 100000; i++)
    assert_true(gw_sliding_window_admit(w, &c, T0 + i * 5000, NULL)); /* 0.5 s */
  assert_false(gw_sliding_window_admit(w, &c, T0 + 999 * MS, NULL));
  /* Half of them leave at T0 + 1.25 s. */
  assert_int_equal(gw_sliding_window_count(w, &c, T0 + 1250 * MS), 50000 - 1);
  assert_int_equal(gw_sliding_window_count(w, &c, T0 + 2 * S), 0);
  assert_true(gw_sliding_window_admit(w, &c, T0 + 2 * S, NULL));
  free(w);
}

static void state_sized_for_another_config_is_never_overrun(void **state)
{
  struct gw_sliding_window_config small = {.limit = 2, .window_ms = 1000};
  struct gw_sliding_window_config big = {.limit = 5, .window_ms = 1000};
  struct gw_sliding_window *w = make(&small); /* room for 2 runs only */
  assert_true(gw_sliding_window_admit(w, &big, T0, NULL));
  assert_true(gw_sliding_window_admit(w, &big, T0 + 1, NULL));
  assert_true(gw_sliding_window_admit(w, &big, T0 + 1, NULL));  /* same time: same run */
  assert_false(gw_sliding_window_admit(w, &big, T0 + 2, NULL)); /* would need a third run */
  assert_true(gw_sliding_window_admit(w, &big, T0 + 1000 * MS, NULL));
  free(w);

  /* The other way round: more admissions held than the new limit allows. */
  w = make(&big);
  for (int i = 0; i < 5; i++)
    assert_true(gw_sliding_window_admit(w, &big, T0 + (uint64_t)i, NULL));
  struct gw_ratelimit_info info;
  assert_false(gw_sliding_window_admit(w, &small, T0 + 10, &info));
  assert_int_equal(info.remaining, 0);
  assert_int_equal(info.retry_after_s, 1);
  free(w);
}

int main(void)
{
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(config_out_of_range_is_rejected),
      cmocka_unit_test(state_bytes_follow_the_documented_formula),
      cmocka_unit_test(admits_up_to_limit_then_refuses),
      cmocka_unit_test(slot_frees_exactly_at_window_ms),
      cmocka_unit_test(no_burst_across_a_window_edge),
      cmocka_unit_test(refusal_reports_retry_after_and_reset),
      cmocka_unit_test(clock_going_backwards_counts_as_newest),
      cmocka_unit_test(exact_ring_matches_brute_force_model),
      cmocka_unit_test(coarse_granularity_never_exceeds_limit),
      cmocka_unit_test(millisecond_times_are_exact_at_millisecond_granularity),
      cmocka_unit_test(big_limit_fills_and_drains_the_ring),
      cmocka_unit_test(state_sized_for_another_config_is_never_overrun),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
