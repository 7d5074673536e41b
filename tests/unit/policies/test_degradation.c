/* Degradation: reasons, fallback vs stale, concurrency shedding, the slow detector, forced mode. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "degradation.h"

#define S GW_NS_PER_S
#define MS GW_NS_PER_MS
#define T0 (UINT64_C(50) * S)

static struct gw_degrade_config base_config(void)
{
  struct gw_degrade_config c = {
      .on = GW_DEGRADE_ON(GW_DEGRADE_CIRCUIT_OPEN) | GW_DEGRADE_ON(GW_DEGRADE_UPSTREAM_ERROR) |
            GW_DEGRADE_ON(GW_DEGRADE_SHED) | GW_DEGRADE_ON(GW_DEGRADE_SLOW),
      .has_fallback = true,
      .max_concurrent = 2,
      .slow_ms = 100,
      .slow_window_ms = 10000,
      .stale_if_error_ms = 60000};
  return c;
}

static struct gw_degrade_decision decide(struct gw_degrade *d, const struct gw_degrade_config *c,
                                         enum gw_degrade_reason r, const char *method,
                                         bool have_stale, uint64_t stored, uint64_t now)
{
  struct gw_degrade_decision out;
  gw_degrade_decide(d, c, r, method, strlen(method), have_stale, stored, now, &out);
  return out;
}

static void config_out_of_range_is_rejected(void **state)
{
  struct gw_degrade_config c = base_config();
  assert_int_equal(gw_degrade_config_check(&c), 0);
  c.on |= 1u << 9;
  assert_int_equal(gw_degrade_config_check(&c), GW_POLICY_EINVALID_CONFIG);
  c = base_config();
  c.slow_window_ms = 0;
  assert_int_equal(gw_degrade_config_check(&c), GW_POLICY_EINVALID_CONFIG);
  c.slow_ms = 0; /* no slow detection: the window does not matter */
  assert_int_equal(gw_degrade_config_check(&c), 0);
}

static void reason_names_match_the_header_values(void **state)
{
  const char *want[] = {"circuit_open", "upstream_error", "shed", "slow", "forced", "stale"};
  for (int r = 0; r < GW_DEGRADE_REASONS; r++)
    assert_string_equal(gw_degrade_reason_name((enum gw_degrade_reason)r), want[r]);
  assert_string_equal(gw_degrade_reason_name((enum gw_degrade_reason)17), "unknown");
}

static void requests_over_max_concurrent_are_shed(void **state)
{
  struct gw_degrade_config c = base_config();
  struct gw_degrade d;
  enum gw_degrade_reason why;
  gw_degrade_init(&d);
  assert_true(gw_degrade_admit(&d, &c, T0, &why));
  assert_true(gw_degrade_admit(&d, &c, T0, &why));
  assert_false(gw_degrade_admit(&d, &c, T0, &why));
  assert_int_equal(why, GW_DEGRADE_SHED);
  assert_int_equal(d.shed, 1);
  gw_degrade_leave(&d);
  assert_true(gw_degrade_admit(&d, &c, T0, &why));
  assert_int_equal(d.in_flight, 2);
  c.max_concurrent = 0; /* no limit */
  for (int i = 0; i < 1000; i++)
    assert_true(gw_degrade_admit(&d, &c, T0, &why));
}

static void shed_without_fallback_is_not_degraded(void **state)
{
  struct gw_degrade_config c = base_config();
  c.has_fallback = false;
  struct gw_degrade d;
  gw_degrade_init(&d);
  struct gw_degrade_decision o = decide(&d, &c, GW_DEGRADE_SHED, "POST", false, 0, T0);
  assert_int_equal(o.action, GW_DEGRADE_PROCEED); /* the gateway answers 503 overloaded */
}

static void mean_latency_above_slow_ms_is_slow(void **state)
{
  struct gw_degrade_config c = base_config();
  struct gw_degrade d;
  gw_degrade_init(&d);
  assert_false(gw_degrade_is_slow(&d, &c, T0)); /* no samples */
  gw_degrade_record_latency(&d, &c, 100, T0);
  gw_degrade_record_latency(&d, &c, 100, T0);
  assert_false(gw_degrade_is_slow(&d, &c, T0)); /* equal to slow_ms is not above it */
  gw_degrade_record_latency(&d, &c, 101, T0 + 1 * S);
  assert_true(gw_degrade_is_slow(&d, &c, T0 + 1 * S));
  assert_int_equal(gw_degrade_mean_latency_ms(&d, &c, T0 + 1 * S), 100);
  gw_degrade_record_latency(&d, &c, 0, T0 + 1 * S);
  assert_false(gw_degrade_is_slow(&d, &c, T0 + 1 * S));
}

static void slow_samples_leave_after_slow_window_ms(void **state)
{
  struct gw_degrade_config c = base_config();
  struct gw_degrade d;
  gw_degrade_init(&d);
  gw_degrade_record_latency(&d, &c, 5000, T0);
  assert_true(gw_degrade_is_slow(&d, &c, T0 + 9 * S));
  assert_false(gw_degrade_is_slow(&d, &c, T0 + 10 * S)); /* 20 slots of 500 ms later */
  gw_degrade_record_latency(&d, &c, 5000, T0 + 20 * S);
  gw_degrade_record_latency(&d, &c, 10, T0 + 25 * S);
  assert_int_equal(gw_degrade_mean_latency_ms(&d, &c, T0 + 25 * S), 2505);
  assert_int_equal(gw_degrade_mean_latency_ms(&d, &c, T0 + 31 * S), 10);
  assert_int_equal(gw_degrade_mean_latency_ms(&d, &c, T0 + 3600 * S), 0);
}

static void slow_route_short_circuits_only_when_slow_is_listed(void **state)
{
  struct gw_degrade_config c = base_config();
  struct gw_degrade d;
  enum gw_degrade_reason why;
  gw_degrade_init(&d);
  gw_degrade_record_latency(&d, &c, 3000, T0);
  assert_false(gw_degrade_admit(&d, &c, T0, &why));
  assert_int_equal(why, GW_DEGRADE_SLOW);
  struct gw_degrade_decision o = decide(&d, &c, why, "POST", false, 0, T0);
  assert_int_equal(o.action, GW_DEGRADE_SERVE_FALLBACK);
  assert_int_equal(o.header, GW_DEGRADE_SLOW);
  c.on &= ~GW_DEGRADE_ON(GW_DEGRADE_SLOW);
  assert_true(gw_degrade_admit(&d, &c, T0, &why));
}

static void forced_mode_degrades_every_request_until_auto(void **state)
{
  struct gw_degrade_config c = base_config();
  c.on = 0; /* forced does not need to be listed */
  struct gw_degrade d;
  enum gw_degrade_reason why;
  gw_degrade_init(&d);
  gw_degrade_set_mode(&d, GW_DEGRADE_FORCED_MODE);
  assert_false(gw_degrade_admit(&d, &c, T0, &why));
  assert_int_equal(why, GW_DEGRADE_FORCED);
  struct gw_degrade_decision o = decide(&d, &c, why, "GET", false, 0, T0);
  assert_int_equal(o.action, GW_DEGRADE_SERVE_FALLBACK);
  assert_int_equal(o.header, GW_DEGRADE_FORCED);
  assert_int_equal(d.in_flight, 0);
  gw_degrade_set_mode(&d, GW_DEGRADE_AUTO);
  assert_true(gw_degrade_admit(&d, &c, T0, &why));
}

static void unlisted_reason_is_not_degraded(void **state)
{
  struct gw_degrade_config c = base_config();
  c.on = GW_DEGRADE_ON(GW_DEGRADE_CIRCUIT_OPEN);
  struct gw_degrade d;
  gw_degrade_init(&d);
  assert_int_equal(decide(&d, &c, GW_DEGRADE_UPSTREAM_ERROR, "GET", true, T0, T0).action,
                   GW_DEGRADE_PROCEED);
  struct gw_degrade_decision o = decide(&d, &c, GW_DEGRADE_CIRCUIT_OPEN, "POST", false, 0, T0);
  assert_int_equal(o.action, GW_DEGRADE_SERVE_FALLBACK);
  assert_int_equal(o.header, GW_DEGRADE_CIRCUIT_OPEN);
  assert_int_equal(d.degraded[GW_DEGRADE_CIRCUIT_OPEN], 1);
  assert_int_equal(d.degraded[GW_DEGRADE_UPSTREAM_ERROR], 0);
}

static void get_prefers_a_fresh_stale_response_over_the_fallback(void **state)
{
  struct gw_degrade_config c = base_config();
  struct gw_degrade d;
  gw_degrade_init(&d);
  uint64_t stored = T0;
  struct gw_degrade_decision o =
      decide(&d, &c, GW_DEGRADE_UPSTREAM_ERROR, "GET", true, stored, T0 + 60 * S - 1);
  assert_int_equal(o.action, GW_DEGRADE_SERVE_STALE);
  assert_int_equal(o.header, GW_DEGRADE_STALE);
  /* At exactly stale_if_error_ms it is no longer younger: the fallback is used. */
  o = decide(&d, &c, GW_DEGRADE_UPSTREAM_ERROR, "GET", true, stored, T0 + 60 * S);
  assert_int_equal(o.action, GW_DEGRADE_SERVE_FALLBACK);
  assert_int_equal(o.header, GW_DEGRADE_UPSTREAM_ERROR);
  /* Not for other methods. */
  o = decide(&d, &c, GW_DEGRADE_CIRCUIT_OPEN, "HEAD", true, stored, T0 + 1);
  assert_int_equal(o.action, GW_DEGRADE_SERVE_FALLBACK);
  /* Without a fallback the stale response still serves; without either, nothing. */
  c.has_fallback = false;
  o = decide(&d, &c, GW_DEGRADE_CIRCUIT_OPEN, "GET", true, stored, T0 + 1);
  assert_int_equal(o.action, GW_DEGRADE_SERVE_STALE);
  o = decide(&d, &c, GW_DEGRADE_CIRCUIT_OPEN, "GET", false, 0, T0 + 1);
  assert_int_equal(o.action, GW_DEGRADE_PROCEED);
  assert_int_equal(d.degraded[GW_DEGRADE_STALE], 2);
}

static void stale_rule_needs_get_and_a_configured_age(void **state)
{
  struct gw_degrade_config c = base_config();
  assert_true(gw_degrade_may_serve_stale(&c, "GET", 3, T0, T0));
  assert_true(gw_degrade_may_serve_stale(&c, "GET", 3, T0, T0 + 60 * S - 1));
  assert_false(gw_degrade_may_serve_stale(&c, "GET", 3, T0, T0 + 60 * S));
  assert_false(gw_degrade_may_serve_stale(&c, "get", 3, T0, T0));
  assert_false(gw_degrade_may_serve_stale(&c, "POST", 4, T0, T0));
  assert_true(gw_degrade_may_serve_stale(&c, "GET", 3, T0 + S, T0)); /* clock went back */
  c.stale_if_error_ms = 0;
  assert_false(gw_degrade_may_serve_stale(&c, "GET", 3, T0, T0));
}

int main(void)
{
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(config_out_of_range_is_rejected),
      cmocka_unit_test(reason_names_match_the_header_values),
      cmocka_unit_test(requests_over_max_concurrent_are_shed),
      cmocka_unit_test(shed_without_fallback_is_not_degraded),
      cmocka_unit_test(mean_latency_above_slow_ms_is_slow),
      cmocka_unit_test(slow_samples_leave_after_slow_window_ms),
      cmocka_unit_test(slow_route_short_circuits_only_when_slow_is_listed),
      cmocka_unit_test(forced_mode_degrades_every_request_until_auto),
      cmocka_unit_test(unlisted_reason_is_not_degraded),
      cmocka_unit_test(get_prefers_a_fresh_stale_response_over_the_fallback),
      cmocka_unit_test(stale_rule_needs_get_and_a_configured_age),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
