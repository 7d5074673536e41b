/* Retry decisions: methods, conditions, jitter bounds, Retry-After, deadline, attempts, budget. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "retry.h"

#define S GW_NS_PER_S
#define MS GW_NS_PER_MS
#define T0 (UINT64_C(777) * S)

static struct gw_retry_config base_config(void)
{
  struct gw_retry_config c = {.max_attempts = 3,
                              .base_ms = 50,
                              .max_backoff_ms = 2000,
                              .jitter = GW_JITTER_NONE,
                              .per_try_timeout_ms = 1000,
                              .on = GW_RETRY_ON_CONNECT_FAILURE | GW_RETRY_ON_TIMEOUT |
                                    GW_RETRY_ON_STATUS,
                              .budget_percent = 20,
                              .budget_min_per_sec = 10};
  gw_status_set_add(&c.statuses, 502);
  gw_status_set_add(&c.statuses, 503);
  gw_status_set_add(&c.statuses, 504);
  return c;
}

static const struct gw_retry_input connect_failed = {GW_TRY_CONNECT_FAILURE, 0, -1};

static void begin(struct gw_retry_state *s, const char *method, bool key, uint64_t timeout_ms,
                  uint64_t now)
{
  gw_retry_begin(s, method, strlen(method), key, timeout_ms, now);
}

static void config_out_of_range_is_rejected(void **state)
{
  struct gw_retry_config c = base_config();
  assert_int_equal(gw_retry_config_check(&c), 0);
  c.max_attempts = 0;
  assert_int_equal(gw_retry_config_check(&c), GW_POLICY_EINVALID_CONFIG);
  c = base_config();
  c.max_attempts = 11;
  assert_int_equal(gw_retry_config_check(&c), GW_POLICY_EINVALID_CONFIG);
  c = base_config();
  c.max_backoff_ms = 10;
  assert_int_equal(gw_retry_config_check(&c), GW_POLICY_EINVALID_CONFIG);
  c = base_config();
  c.budget_percent = 101;
  assert_int_equal(gw_retry_config_check(&c), GW_POLICY_EINVALID_CONFIG);
  c = base_config();
  c.jitter = (enum gw_jitter)9;
  assert_int_equal(gw_retry_config_check(&c), GW_POLICY_EINVALID_CONFIG);
}

static void idempotent_methods_follow_rfc9110(void **state)
{
  const char *yes[] = {"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"};
  const char *no[] = {"POST", "PATCH", "CONNECT", "get", "GETX", "GE", ""};
  for (size_t i = 0; i < sizeof(yes) / sizeof(yes[0]); i++)
    assert_true(gw_retry_method_is_idempotent(yes[i], strlen(yes[i])));
  for (size_t i = 0; i < sizeof(no) / sizeof(no[0]); i++)
    assert_false(gw_retry_method_is_idempotent(no[i], strlen(no[i])));
}

static void retryable_conditions_follow_on_and_statuses(void **state)
{
  struct gw_retry_config c = base_config();
  assert_true(gw_retry_is_retryable(&c, GW_TRY_CONNECT_FAILURE, 0));
  assert_true(gw_retry_is_retryable(&c, GW_TRY_TIMEOUT, 0));
  assert_true(gw_retry_is_retryable(&c, GW_TRY_RESPONSE, 503));
  assert_false(gw_retry_is_retryable(&c, GW_TRY_RESPONSE, 500));
  assert_false(gw_retry_is_retryable(&c, GW_TRY_RESPONSE, 200));
  c.on = GW_RETRY_ON_CONNECT_FAILURE;
  assert_true(gw_retry_is_retryable(&c, GW_TRY_CONNECT_FAILURE, 0));
  assert_false(gw_retry_is_retryable(&c, GW_TRY_TIMEOUT, 0));
  assert_false(gw_retry_is_retryable(&c, GW_TRY_RESPONSE, 503));
}

static void exponential_cap_doubles_until_max_backoff(void **state)
{
  struct gw_retry_config c = base_config();
  struct gw_rng rng;
  gw_rng_seed(&rng, 1);
  uint64_t want[] = {50, 100, 200, 400, 800, 1600, 2000, 2000};
  for (uint32_t k = 1; k <= 8; k++)
    assert_int_equal(gw_retry_backoff_ms(&c, k, 0, &rng), want[k - 1]);
  assert_int_equal(gw_retry_backoff_ms(&c, 200, 0, &rng), 2000); /* no overflow */
}

static void full_jitter_stays_within_zero_and_cap(void **state)
{
  struct gw_retry_config c = base_config();
  c.jitter = GW_JITTER_FULL;
  struct gw_rng rng;
  gw_rng_seed(&rng, 12345);
  for (uint32_t k = 1; k <= 8; k++) {
    uint64_t cap = k >= 7 ? 2000 : 50u << (k - 1);
    uint64_t lo = UINT64_MAX, hi = 0, sum = 0;
    for (int i = 0; i < 20000; i++) {
      uint64_t v = gw_retry_backoff_ms(&c, k, 0, &rng);
      assert_true(v <= cap);
      lo = v < lo ? v : lo;
      hi = v > hi ? v : hi;
      sum += v;
    }
    assert_int_equal(lo, 0);
    assert_int_equal(hi, cap);
    uint64_t mean = sum / 20000;
    assert_true(mean * 100 >= cap * 45 && mean * 100 <= cap * 55);
  }
}

static void equal_jitter_stays_within_half_cap_and_cap(void **state)
{
  struct gw_retry_config c = base_config();
  c.jitter = GW_JITTER_EQUAL;
  struct gw_rng rng;
  gw_rng_seed(&rng, 999);
  for (uint32_t k = 1; k <= 8; k++) {
    uint64_t cap = k >= 7 ? 2000 : 50u << (k - 1);
    uint64_t lo = UINT64_MAX, hi = 0;
    for (int i = 0; i < 20000; i++) {
      uint64_t v = gw_retry_backoff_ms(&c, k, 0, &rng);
      assert_true(v >= cap / 2 && v <= cap);
      lo = v < lo ? v : lo;
      hi = v > hi ? v : hi;
    }
    assert_int_equal(lo, cap / 2);
    assert_int_equal(hi, cap);
  }
}

static void decorrelated_jitter_stays_within_base_and_three_times_previous(void **state)
{
  struct gw_retry_config c = base_config();
  c.jitter = GW_JITTER_DECORRELATED;
  struct gw_rng rng;
  gw_rng_seed(&rng, 4242);
  for (int chain = 0; chain < 2000; chain++) {
    uint64_t prev = c.base_ms;
    for (uint32_t k = 1; k <= 8; k++) {
      uint64_t v = gw_retry_backoff_ms(&c, k, prev, &rng);
      uint64_t hi = prev * 3 < c.max_backoff_ms ? prev * 3 : c.max_backoff_ms;
      assert_true(v >= c.base_ms && v <= hi);
      prev = v;
    }
  }
}

static void attempt_budget_counts_the_first_try(void **state)
{
  struct gw_retry_config c = base_config();
  struct gw_retry_state s;
  struct gw_rng rng;
  gw_rng_seed(&rng, 1);
  uint64_t now = T0, timeout_ns, delay;
  begin(&s, "GET", false, 60000, now);
  for (int i = 0; i < 3; i++) {
    assert_true(gw_retry_start_try(&s, &c, now, &timeout_ns));
    enum gw_retry_verdict v = gw_retry_decide(&s, &c, NULL, &rng, &connect_failed, now, &delay);
    if (i < 2) {
      assert_int_equal(v, GW_RETRY_YES);
      assert_int_equal(delay, 50u << i);
      now += delay * MS;
    } else {
      assert_int_equal(v, GW_RETRY_NO_ATTEMPTS);
    }
  }
  assert_false(gw_retry_start_try(&s, &c, now, &timeout_ns));
  assert_int_equal(s.attempts, 3);
}

static void single_attempt_config_never_retries(void **state)
{
  struct gw_retry_config c = base_config();
  c.max_attempts = 1;
  struct gw_retry_state s;
  uint64_t t, delay;
  begin(&s, "GET", false, 60000, T0);
  assert_true(gw_retry_start_try(&s, &c, T0, &t));
  assert_int_equal(gw_retry_decide(&s, &c, NULL, NULL, &connect_failed, T0, &delay),
                   GW_RETRY_NO_ATTEMPTS);
}

static void non_idempotent_method_is_retried_only_with_idempotency_key(void **state)
{
  struct gw_retry_config c = base_config();
  struct gw_retry_state s;
  uint64_t t, delay;
  begin(&s, "POST", false, 60000, T0);
  assert_true(gw_retry_start_try(&s, &c, T0, &t));
  assert_int_equal(gw_retry_decide(&s, &c, NULL, NULL, &connect_failed, T0, &delay),
                   GW_RETRY_NO_METHOD);
  begin(&s, "POST", true, 60000, T0);
  assert_true(gw_retry_start_try(&s, &c, T0, &t));
  assert_int_equal(gw_retry_decide(&s, &c, NULL, NULL, &connect_failed, T0, &delay), GW_RETRY_YES);
  begin(&s, "PATCH", false, 60000, T0);
  assert_true(gw_retry_start_try(&s, &c, T0, &t));
  assert_int_equal(gw_retry_decide(&s, &c, NULL, NULL, &connect_failed, T0, &delay),
                   GW_RETRY_NO_METHOD);
}

static void status_outside_statuses_is_not_retried(void **state)
{
  struct gw_retry_config c = base_config();
  struct gw_retry_state s;
  uint64_t t, delay;
  begin(&s, "GET", false, 60000, T0);
  assert_true(gw_retry_start_try(&s, &c, T0, &t));
  struct gw_retry_input in = {GW_TRY_RESPONSE, 500, -1};
  assert_int_equal(gw_retry_decide(&s, &c, NULL, NULL, &in, T0, &delay), GW_RETRY_NO_NOT_RETRYABLE);
  in.status = 502;
  assert_int_equal(gw_retry_decide(&s, &c, NULL, NULL, &in, T0, &delay), GW_RETRY_YES);
}

static void upstream_retry_after_replaces_backoff_up_to_max_backoff(void **state)
{
  struct gw_retry_config c = base_config();
  c.jitter = GW_JITTER_FULL;
  struct gw_rng rng;
  gw_rng_seed(&rng, 3);
  struct gw_retry_state s;
  uint64_t t, delay;
  struct gw_retry_input in = {GW_TRY_RESPONSE, 503, 1500};
  begin(&s, "GET", false, 60000, T0);
  assert_true(gw_retry_start_try(&s, &c, T0, &t));
  assert_int_equal(gw_retry_decide(&s, &c, NULL, &rng, &in, T0, &delay), GW_RETRY_YES);
  assert_int_equal(delay, 1500);
  in.retry_after_ms = 2000; /* equal to max_backoff_ms: still honoured */
  assert_int_equal(gw_retry_decide(&s, &c, NULL, &rng, &in, T0, &delay), GW_RETRY_YES);
  assert_int_equal(delay, 2000);
  in.retry_after_ms = 2001;
  assert_int_equal(gw_retry_decide(&s, &c, NULL, &rng, &in, T0, &delay), GW_RETRY_NO_RETRY_AFTER);
  assert_int_equal(delay, 0);
  in.retry_after_ms = 0;
  assert_int_equal(gw_retry_decide(&s, &c, NULL, &rng, &in, T0, &delay), GW_RETRY_YES);
  assert_int_equal(delay, 0);
}

static void retry_after_header_value_parses_delay_seconds(void **state)
{
  uint64_t ms = 1;
  assert_int_equal(gw_retry_after_parse_seconds("120", 3, &ms), 0);
  assert_int_equal(ms, 120000);
  assert_int_equal(gw_retry_after_parse_seconds(" 0 ", 3, &ms), 0);
  assert_int_equal(ms, 0);
  assert_int_equal(gw_retry_after_parse_seconds("99999999999999999999999", 23, &ms), 0);
  assert_int_equal(ms, 86400000);
  assert_int_equal(gw_retry_after_parse_seconds("-1", 2, &ms), GW_POLICY_EBAD_VALUE);
  assert_int_equal(gw_retry_after_parse_seconds("1.5", 3, &ms), GW_POLICY_EBAD_VALUE);
  assert_int_equal(gw_retry_after_parse_seconds("", 0, &ms), GW_POLICY_EBAD_VALUE);
  const char *date = "Fri, 31 Dec 1999 23:59:59 GMT";
  assert_int_equal(gw_retry_after_parse_seconds(date, strlen(date), &ms), GW_POLICY_EBAD_VALUE);
}

static void http_dates_parse_in_all_three_formats(void **state)
{
  const uint64_t now = 1700000000; /* 2023-11-14 22:13:20 UTC */
  const uint64_t want = 784111777; /* Sun, 06 Nov 1994 08:49:37 GMT (RFC 9110's example) */
  uint64_t t = 0;
  const char *imf = "Sun, 06 Nov 1994 08:49:37 GMT";
  const char *rfc850 = "Sunday, 06-Nov-94 08:49:37 GMT";
  const char *asc = "Sun Nov  6 08:49:37 1994";
  assert_int_equal(gw_http_date_parse(imf, strlen(imf), now, &t), 0);
  assert_int_equal(t, want);
  t = 0;
  assert_int_equal(gw_http_date_parse(rfc850, strlen(rfc850), now, &t), 0);
  assert_int_equal(t, want);
  t = 0;
  assert_int_equal(gw_http_date_parse(asc, strlen(asc), now, &t), 0);
  assert_int_equal(t, want);
  const char *leap = "Thu, 29 Feb 2024 00:00:00 GMT";
  assert_int_equal(gw_http_date_parse(leap, strlen(leap), now, &t), 0);
  assert_int_equal(t, 1709164800);
  const char *bad[] = {"Sun, 06 Nov 1994 08:49:37 UTC",
                       "Sun, 6 Nov 1994 08:49:37 GMT",
                       "Sun, 06 Nov 1994 08:49:37 GMT ",
                       "Fri, 29 Feb 2023 00:00:00 GMT",
                       "Sun, 06 Foo 1994 08:49:37 GMT",
                       "Sun, 06 Nov 1994 24:00:00 GMT",
                       "Sun, 06 Nov 1969 08:49:37 GMT",
                       "yesterday",
                       ""};
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
    assert_int_equal(gw_http_date_parse(bad[i], strlen(bad[i]), now, &t), GW_POLICY_EBAD_VALUE);
}

static void retry_after_date_becomes_a_delay_from_now(void **state)
{
  const uint64_t now = 1700000000;
  uint64_t ms = 1;
  const char *later = "Tue, 14 Nov 2023 22:13:50 GMT"; /* 30 s after now */
  assert_int_equal(gw_retry_after_parse(later, strlen(later), now, &ms), 0);
  assert_int_equal(ms, 30000);
  const char *past = "Sun, 06 Nov 1994 08:49:37 GMT";
  assert_int_equal(gw_retry_after_parse(past, strlen(past), now, &ms), 0);
  assert_int_equal(ms, 0);
  const char *far = "Fri, 01 Jan 2100 00:00:00 GMT";
  assert_int_equal(gw_retry_after_parse(far, strlen(far), now, &ms), 0);
  assert_int_equal(ms, 86400000);
  assert_int_equal(gw_retry_after_parse(" 7 ", 3, now, &ms), 0);
  assert_int_equal(ms, 7000);
  assert_int_equal(gw_retry_after_parse("soon", 4, now, &ms), GW_POLICY_EBAD_VALUE);
}

static void per_try_timeout_is_cut_to_the_deadline(void **state)
{
  struct gw_retry_config c = base_config();
  struct gw_retry_state s;
  uint64_t t;
  begin(&s, "GET", false, 5000, T0);
  assert_true(gw_retry_start_try(&s, &c, T0, &t));
  assert_int_equal(t, 1000 * MS);
  assert_true(gw_retry_start_try(&s, &c, T0 + 4700 * MS, &t));
  assert_int_equal(t, 300 * MS);
  s.attempts = 0;
  assert_true(gw_retry_start_try(&s, &c, T0 + 5000 * MS - 1, &t));
  assert_int_equal(t, 1);
  assert_false(gw_retry_start_try(&s, &c, T0 + 5000 * MS, &t));
  c.per_try_timeout_ms = 0; /* only the deadline */
  s.attempts = 0;
  assert_true(gw_retry_start_try(&s, &c, T0 + 1000 * MS, &t));
  assert_int_equal(t, 4000 * MS);
}

static void no_backoff_is_scheduled_past_the_deadline(void **state)
{
  struct gw_retry_config c = base_config(); /* no jitter: first backoff 50 ms */
  struct gw_retry_state s;
  uint64_t t, delay;
  begin(&s, "GET", false, 1000, T0);
  assert_true(gw_retry_start_try(&s, &c, T0, &t));
  /* Backoff would end exactly at the deadline: no try could start. */
  assert_int_equal(gw_retry_decide(&s, &c, NULL, NULL, &connect_failed, T0 + 950 * MS, &delay),
                   GW_RETRY_NO_DEADLINE);
  assert_int_equal(gw_retry_decide(&s, &c, NULL, NULL, &connect_failed, T0 + 950 * MS - 1, &delay),
                   GW_RETRY_YES);
  /* With min_try_ms, the try also needs that much time after the backoff. */
  c.min_try_ms = 100;
  assert_int_equal(gw_retry_decide(&s, &c, NULL, NULL, &connect_failed, T0 + 850 * MS + 1, &delay),
                   GW_RETRY_NO_DEADLINE);
  assert_int_equal(gw_retry_decide(&s, &c, NULL, NULL, &connect_failed, T0 + 850 * MS, &delay),
                   GW_RETRY_YES);
  assert_false(gw_retry_start_try(&s, &c, T0 + 900 * MS + 1, &t));
  assert_true(gw_retry_start_try(&s, &c, T0 + 900 * MS, &t));
}

static void retry_after_past_the_deadline_is_not_waited_for(void **state)
{
  struct gw_retry_config c = base_config();
  struct gw_retry_state s;
  uint64_t t, delay;
  begin(&s, "GET", false, 1000, T0);
  assert_true(gw_retry_start_try(&s, &c, T0, &t));
  struct gw_retry_input in = {GW_TRY_RESPONSE, 503, 1000};
  assert_int_equal(gw_retry_decide(&s, &c, NULL, NULL, &in, T0, &delay), GW_RETRY_NO_DEADLINE);
}

static void budget_allows_percent_of_requests_plus_minimum(void **state)
{
  struct gw_retry_config c = base_config();
  c.budget_percent = 20;
  c.budget_min_per_sec = 0;
  struct gw_retry_budget b;
  gw_retry_budget_init(&b);
  assert_false(gw_retry_budget_try_withdraw(&b, &c, T0)); /* no requests, no minimum */
  for (int i = 0; i < 100; i++)
    gw_retry_budget_on_request(&b, T0 + (uint64_t)i * 10 * MS);
  int granted = 0;
  for (int i = 0; i < 50; i++)
    granted += gw_retry_budget_try_withdraw(&b, &c, T0 + 1 * S);
  assert_int_equal(granted, 20);
  /* 10 s after the requests, they and the retries have left the window. */
  assert_false(gw_retry_budget_try_withdraw(&b, &c, T0 + 10 * S));
  for (int i = 0; i < 5; i++)
    gw_retry_budget_on_request(&b, T0 + 20 * S);
  assert_true(gw_retry_budget_try_withdraw(&b, &c, T0 + 20 * S)); /* 1 <= 5 * 0.2 */
  assert_false(gw_retry_budget_try_withdraw(&b, &c, T0 + 20 * S));
}

static void budget_minimum_per_second_applies_without_traffic(void **state)
{
  struct gw_retry_config c = base_config();
  c.budget_percent = 0;
  c.budget_min_per_sec = 2;
  struct gw_retry_budget b;
  gw_retry_budget_init(&b);
  int granted = 0;
  for (int i = 0; i < 100; i++)
    granted += gw_retry_budget_try_withdraw(&b, &c, T0 + (uint64_t)i * 10 * MS);
  assert_int_equal(granted, 20); /* 2/s over the 10 s window */
  /* Retries leave the window after 10 s (100 ms slots). */
  assert_false(gw_retry_budget_try_withdraw(&b, &c, T0 + 10 * S - 1));
  assert_true(gw_retry_budget_try_withdraw(&b, &c, T0 + 10 * S));
}

static void exhausted_budget_stops_retries(void **state)
{
  struct gw_retry_config c = base_config();
  c.budget_percent = 10;
  c.budget_min_per_sec = 0;
  struct gw_retry_budget b;
  gw_retry_budget_init(&b);
  uint64_t t, delay;
  int yes = 0, no_budget = 0;
  for (int i = 0; i < 50; i++) {
    struct gw_retry_state s;
    gw_retry_budget_on_request(&b, T0);
    begin(&s, "GET", false, 60000, T0);
    assert_true(gw_retry_start_try(&s, &c, T0, &t));
    enum gw_retry_verdict v = gw_retry_decide(&s, &c, &b, NULL, &connect_failed, T0, &delay);
    yes += v == GW_RETRY_YES;
    no_budget += v == GW_RETRY_NO_BUDGET;
  }
  assert_int_equal(yes, 5);
  assert_int_equal(no_budget, 45);
  assert_string_equal(gw_retry_verdict_name(GW_RETRY_NO_BUDGET), "budget_exhausted");
}

static void refused_retry_does_not_spend_budget(void **state)
{
  struct gw_retry_config c = base_config();
  c.budget_percent = 0;
  c.budget_min_per_sec = 1; /* 10 retries per window */
  struct gw_retry_budget b;
  gw_retry_budget_init(&b);
  uint64_t t, delay;
  struct gw_retry_state s;
  begin(&s, "POST", false, 60000, T0);
  assert_true(gw_retry_start_try(&s, &c, T0, &t));
  for (int i = 0; i < 30; i++)
    assert_int_equal(gw_retry_decide(&s, &c, &b, NULL, &connect_failed, T0, &delay),
                     GW_RETRY_NO_METHOD);
  assert_int_equal(b.retries, 0);
}

int main(void)
{
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(config_out_of_range_is_rejected),
      cmocka_unit_test(idempotent_methods_follow_rfc9110),
      cmocka_unit_test(retryable_conditions_follow_on_and_statuses),
      cmocka_unit_test(exponential_cap_doubles_until_max_backoff),
      cmocka_unit_test(full_jitter_stays_within_zero_and_cap),
      cmocka_unit_test(equal_jitter_stays_within_half_cap_and_cap),
      cmocka_unit_test(decorrelated_jitter_stays_within_base_and_three_times_previous),
      cmocka_unit_test(attempt_budget_counts_the_first_try),
      cmocka_unit_test(single_attempt_config_never_retries),
      cmocka_unit_test(non_idempotent_method_is_retried_only_with_idempotency_key),
      cmocka_unit_test(status_outside_statuses_is_not_retried),
      cmocka_unit_test(upstream_retry_after_replaces_backoff_up_to_max_backoff),
      cmocka_unit_test(retry_after_header_value_parses_delay_seconds),
      cmocka_unit_test(http_dates_parse_in_all_three_formats),
      cmocka_unit_test(retry_after_date_becomes_a_delay_from_now),
      cmocka_unit_test(per_try_timeout_is_cut_to_the_deadline),
      cmocka_unit_test(no_backoff_is_scheduled_past_the_deadline),
      cmocka_unit_test(retry_after_past_the_deadline_is_not_waited_for),
      cmocka_unit_test(budget_allows_percent_of_requests_plus_minimum),
      cmocka_unit_test(budget_minimum_per_second_applies_without_traffic),
      cmocka_unit_test(exhausted_budget_stops_retries),
      cmocka_unit_test(refused_retry_does_not_spend_budget),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
