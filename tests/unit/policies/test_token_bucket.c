/* Token bucket behaviour on a hand-driven clock. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "rng.h"
#include "token_bucket.h"

#define S GW_NS_PER_S
#define MS GW_NS_PER_MS
#define T0 (UINT64_C(1000) * S) /* an arbitrary start on the monotonic clock */

static void config_out_of_range_is_rejected(void **state)
{
  struct gw_token_bucket_config c = {.capacity = 10, .refill_per_sec = 5};
  assert_int_equal(gw_token_bucket_config_check(&c), 0);
  c.capacity = 0;
  assert_int_equal(gw_token_bucket_config_check(&c), GW_POLICY_EINVALID_CONFIG);
  c.capacity = GW_TOKEN_BUCKET_CAPACITY_MAX + 1;
  assert_int_equal(gw_token_bucket_config_check(&c), GW_POLICY_EINVALID_CONFIG);
  c.capacity = GW_TOKEN_BUCKET_CAPACITY_MAX;
  c.refill_per_sec = 0;
  assert_int_equal(gw_token_bucket_config_check(&c), GW_POLICY_EINVALID_CONFIG);
}

static void bucket_starts_full_and_refuses_when_empty(void **state)
{
  struct gw_token_bucket_config c = {.capacity = 5, .refill_per_sec = 1};
  struct gw_token_bucket b;
  gw_token_bucket_init(&b, &c, T0);
  assert_int_equal(gw_token_bucket_available(&b, &c, T0), 5);
  for (int i = 0; i < 5; i++)
    assert_true(gw_token_bucket_admit(&b, &c, T0, NULL));
  assert_false(gw_token_bucket_admit(&b, &c, T0, NULL));
  assert_int_equal(gw_token_bucket_available(&b, &c, T0), 0);
}

static void refill_never_exceeds_capacity(void **state)
{
  struct gw_token_bucket_config c = {.capacity = 3, .refill_per_sec = 1000};
  struct gw_token_bucket b;
  gw_token_bucket_init(&b, &c, T0);
  assert_true(gw_token_bucket_try_take(&b, &c, 3, T0));
  assert_int_equal(gw_token_bucket_available(&b, &c, T0 + 1000 * S), 3);
  /* A very long idle period does not overflow. */
  assert_int_equal(gw_token_bucket_available(&b, &c, UINT64_MAX - 1), 3);
}

static void refill_fractions_over_tiny_steps_are_not_lost(void **state)
{
  /* 3 tokens/s: one token every 333,333,333.3 ns, so every step leaves a fraction behind. */
  struct gw_token_bucket_config c = {.capacity = 10, .refill_per_sec = 3};
  struct gw_token_bucket b;
  gw_token_bucket_init(&b, &c, T0);
  assert_true(gw_token_bucket_try_take(&b, &c, 10, T0));
  uint64_t now = T0;
  for (int i = 0; i < 1000000; i++) {
    now += 1000; /* 1 µs steps, 1 s in all */
    (void)gw_token_bucket_available(&b, &c, now);
  }
  assert_int_equal(gw_token_bucket_available(&b, &c, now), 3);
  assert_int_equal(b.nanotokens, UINT64_C(3000000000));

  /* Odd step sizes (7 ns) across 10 s accumulate the same as one jump. */
  struct gw_token_bucket x, y;
  struct gw_token_bucket_config big = {.capacity = 1000, .refill_per_sec = 7};
  gw_token_bucket_init(&x, &big, T0);
  gw_token_bucket_init(&y, &big, T0);
  assert_true(gw_token_bucket_try_take(&x, &big, 1000, T0));
  assert_true(gw_token_bucket_try_take(&y, &big, 1000, T0));
  now = T0;
  for (int i = 0; i < 2000000; i++) {
    now += 7;
    gw_token_bucket_give(&x, &big, 0, now);
  }
  (void)gw_token_bucket_available(&y, &big, now);
  assert_int_equal(x.nanotokens, y.nanotokens);
  assert_int_equal(x.nanotokens, UINT64_C(14000000) * 7);
}

static void next_token_arrives_exactly_on_time(void **state)
{
  struct gw_token_bucket_config c = {.capacity = 10, .refill_per_sec = 3};
  struct gw_token_bucket b;
  gw_token_bucket_init(&b, &c, T0);
  assert_true(gw_token_bucket_try_take(&b, &c, 10, T0));
  /* 333,333,333 ns give 999,999,999 nano-tokens: not yet a token. */
  assert_false(gw_token_bucket_admit(&b, &c, T0 + 333333333, NULL));
  assert_int_equal(gw_token_bucket_wait_ns(&b, &c, 1, T0 + 333333333), 1);
  assert_true(gw_token_bucket_admit(&b, &c, T0 + 333333334, NULL));
  assert_false(gw_token_bucket_admit(&b, &c, T0 + 333333334, NULL));
  /* Same at the edge of a full bucket: 333,333,333 ns from empty are not yet "full". */
  struct gw_token_bucket_config one = {.capacity = 1, .refill_per_sec = 3};
  gw_token_bucket_init(&b, &one, T0);
  assert_true(gw_token_bucket_admit(&b, &one, T0, NULL));
  assert_false(gw_token_bucket_admit(&b, &one, T0 + 333333333, NULL));
  assert_int_equal(b.nanotokens, 999999999);
  assert_true(gw_token_bucket_admit(&b, &one, T0 + 333333334, NULL));
}

static void refusal_reports_retry_after_rounded_up(void **state)
{
  struct gw_token_bucket_config c = {.capacity = 10, .refill_per_sec = 3};
  struct gw_token_bucket b;
  struct gw_ratelimit_info info;
  gw_token_bucket_init(&b, &c, T0);
  assert_true(gw_token_bucket_try_take(&b, &c, 10, T0));
  assert_false(gw_token_bucket_admit(&b, &c, T0, &info));
  assert_int_equal(info.limit, 10);
  assert_int_equal(info.window_s, 4); /* 10 tokens at 3/s: 3.33 s */
  assert_int_equal(info.remaining, 0);
  assert_int_equal(info.retry_after_s, 1); /* 0.33 s rounds up to 1 */
  assert_int_equal(info.next_s, 1);
  assert_int_equal(info.reset_s, 4);

  /* Slow refill: 1 token/s, capacity 1, empty: the next token is a whole second away. */
  struct gw_token_bucket_config slow = {.capacity = 2, .refill_per_sec = 1};
  gw_token_bucket_init(&b, &slow, T0);
  assert_true(gw_token_bucket_admit(&b, &slow, T0, &info));
  assert_int_equal(info.remaining, 1);
  assert_int_equal(info.retry_after_s, 0);
  assert_int_equal(info.reset_s, 1);
  assert_true(gw_token_bucket_admit(&b, &slow, T0, &info));
  assert_int_equal(info.remaining, 0);
  assert_int_equal(info.reset_s, 2);
  assert_false(gw_token_bucket_admit(&b, &slow, T0 + 1, &info));
  assert_int_equal(info.retry_after_s, 1);
  assert_int_equal(info.reset_s, 2); /* 1.999999999 s rounds up */
  assert_false(gw_token_bucket_admit(&b, &slow, T0 + 999 * MS, &info));
  assert_int_equal(info.retry_after_s, 1);
  assert_true(gw_token_bucket_admit(&b, &slow, T0 + S, &info));
}

static void admitted_decision_reports_remaining_and_reset(void **state)
{
  struct gw_token_bucket_config c = {.capacity = 100, .refill_per_sec = 50};
  struct gw_token_bucket b;
  struct gw_ratelimit_info info;
  gw_token_bucket_init(&b, &c, T0);
  assert_true(gw_token_bucket_admit(&b, &c, T0, &info));
  assert_int_equal(info.limit, 100);
  assert_int_equal(info.window_s, 2);
  assert_int_equal(info.remaining, 99);
  assert_int_equal(info.reset_s, 1); /* 20 ms to refill one token */
  assert_int_equal(info.next_s, 0);
  assert_int_equal(info.retry_after_s, 0);
}

static void clock_going_backwards_adds_nothing(void **state)
{
  struct gw_token_bucket_config c = {.capacity = 2, .refill_per_sec = 1};
  struct gw_token_bucket b;
  gw_token_bucket_init(&b, &c, T0);
  assert_true(gw_token_bucket_try_take(&b, &c, 2, T0 + 10 * S));
  assert_false(gw_token_bucket_admit(&b, &c, T0, NULL));
  assert_int_equal(b.updated_ns, T0 + 10 * S);
  assert_true(gw_token_bucket_admit(&b, &c, T0 + 11 * S, NULL));
}

static void take_n_is_all_or_nothing_and_give_back_caps_at_capacity(void **state)
{
  struct gw_token_bucket_config c = {.capacity = 10, .refill_per_sec = 1};
  struct gw_token_bucket b;
  gw_token_bucket_init(&b, &c, T0);
  assert_true(gw_token_bucket_try_take(&b, &c, 7, T0));
  assert_false(gw_token_bucket_try_take(&b, &c, 4, T0));
  assert_int_equal(gw_token_bucket_available(&b, &c, T0), 3);
  assert_false(gw_token_bucket_try_take(&b, &c, 11, T0 + 100 * S));
  assert_true(gw_token_bucket_try_take(&b, &c, 0, T0 + 100 * S));
  assert_true(gw_token_bucket_try_take(&b, &c, 10, T0 + 100 * S));
  gw_token_bucket_give(&b, &c, 4, T0 + 100 * S);
  assert_int_equal(gw_token_bucket_available(&b, &c, T0 + 100 * S), 4);
  gw_token_bucket_give(&b, &c, 9, T0 + 100 * S);
  assert_int_equal(gw_token_bucket_available(&b, &c, T0 + 100 * S), 10);
  gw_token_bucket_give(&b, &c, UINT64_MAX, T0 + 100 * S);
  assert_int_equal(gw_token_bucket_available(&b, &c, T0 + 100 * S), 10);
}

static void wait_ns_for_more_than_capacity_is_forever(void **state)
{
  struct gw_token_bucket_config c = {.capacity = 4, .refill_per_sec = 2};
  struct gw_token_bucket b;
  gw_token_bucket_init(&b, &c, T0);
  assert_int_equal(gw_token_bucket_wait_ns(&b, &c, 4, T0), 0);
  assert_int_equal(gw_token_bucket_wait_ns(&b, &c, 5, T0), UINT64_MAX);
  assert_true(gw_token_bucket_try_take(&b, &c, 4, T0));
  assert_int_equal(gw_token_bucket_wait_ns(&b, &c, 3, T0), 1500 * MS);
}

static void admission_rate_matches_refill_rate_over_time(void **state)
{
  /* Offered 1000 req/s for 60 s against capacity 100, refill 50/s: 100 + 60*50 admitted. */
  struct gw_token_bucket_config c = {.capacity = 100, .refill_per_sec = 50};
  struct gw_token_bucket b;
  gw_token_bucket_init(&b, &c, T0);
  uint64_t admitted = 0;
  for (uint64_t i = 0; i <= 60000; i++)
    admitted += gw_token_bucket_admit(&b, &c, T0 + i * MS, NULL);
  assert_int_equal(admitted, 100 + 60 * 50);
}

/* Over any interval [a, b] the admissions never exceed capacity + rate * (b - a) tokens. */
static void admissions_never_exceed_capacity_plus_refill_over_any_interval(void **state)
{
  struct gw_rng rng;
  gw_rng_seed(&rng, 31337);
  for (int round = 0; round < 10; round++) {
    struct gw_token_bucket_config c = {.capacity = 1 + gw_rng_below(&rng, 20),
                                       .refill_per_sec = 1 + gw_rng_below(&rng, 50)};
    struct gw_token_bucket b;
    gw_token_bucket_init(&b, &c, T0);
    enum { N = 3000 };
    static uint64_t at[N];
    size_t n = 0;
    uint64_t t = T0;
    for (int i = 0; i < N; i++) {
      t += gw_rng_below(&rng, 50 * MS);
      if (gw_token_bucket_admit(&b, &c, t, NULL))
        at[n++] = t;
    }
    for (size_t i = 0; i < n; i += 7)
      for (size_t j = i; j < n; j++) {
        /* admissions in [at[i], at[j]] = j - i + 1 <= capacity + rate * elapsed (in nano-tokens) */
        uint64_t elapsed = at[j] - at[i];
        assert_true((j - i + 1) * GW_NS_PER_S <=
                    c.capacity * GW_NS_PER_S + elapsed * c.refill_per_sec);
      }
  }
}

static void bucket_kept_across_a_smaller_capacity_is_clamped(void **state)
{
  struct gw_token_bucket_config big = {.capacity = 10, .refill_per_sec = 1};
  struct gw_token_bucket_config small = {.capacity = 3, .refill_per_sec = 1};
  struct gw_token_bucket b;
  gw_token_bucket_init(&b, &big, T0);
  assert_int_equal(gw_token_bucket_available(&b, &small, T0 + 5 * S), 3);
  for (int i = 0; i < 3; i++)
    assert_true(gw_token_bucket_admit(&b, &small, T0 + 5 * S, NULL));
  assert_false(gw_token_bucket_admit(&b, &small, T0 + 5 * S, NULL));
  assert_true(gw_token_bucket_admit(&b, &small, T0 + 6 * S, NULL));
}

int main(void)
{
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(config_out_of_range_is_rejected),
      cmocka_unit_test(bucket_starts_full_and_refuses_when_empty),
      cmocka_unit_test(refill_never_exceeds_capacity),
      cmocka_unit_test(refill_fractions_over_tiny_steps_are_not_lost),
      cmocka_unit_test(next_token_arrives_exactly_on_time),
      cmocka_unit_test(refusal_reports_retry_after_rounded_up),
      cmocka_unit_test(admitted_decision_reports_remaining_and_reset),
      cmocka_unit_test(clock_going_backwards_adds_nothing),
      cmocka_unit_test(take_n_is_all_or_nothing_and_give_back_caps_at_capacity),
      cmocka_unit_test(wait_ns_for_more_than_capacity_is_forever),
      cmocka_unit_test(admission_rate_matches_refill_rate_over_time),
      cmocka_unit_test(admissions_never_exceed_capacity_plus_refill_over_any_interval),
      cmocka_unit_test(bucket_kept_across_a_smaller_capacity_is_clamped),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
