/* Tests of the shared pieces: error table, status sets, RateLimit formatting, SipHash, the rng. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "hash.h"
#include "policy.h"
#include "rng.h"

static void error_names_come_from_the_table(void **state)
{
  assert_string_equal(gw_policy_err_name(GW_POLICY_EFULL), "store_full");
  assert_string_equal(gw_policy_err_name(GW_POLICY_EINVALID_CONFIG), "invalid_config");
  assert_string_equal(gw_policy_err_name(0), "unknown_error");
  assert_string_equal(gw_policy_err_name(-1), "unknown_error");
  assert_true(strlen(gw_policy_strerror(GW_POLICY_ESTALE)) > 10);
}

static void status_set_holds_only_added_statuses(void **state)
{
  struct gw_status_set s = {0};
  assert_int_equal(gw_status_set_add(&s, 502), 0);
  assert_int_equal(gw_status_set_add(&s, 100), 0);
  assert_int_equal(gw_status_set_add(&s, 599), 0);
  assert_int_equal(gw_status_set_add(&s, 600), GW_POLICY_EINVALID_CONFIG);
  assert_int_equal(gw_status_set_add(&s, 99), GW_POLICY_EINVALID_CONFIG);
  assert_true(gw_status_set_has(&s, 502));
  assert_true(gw_status_set_has(&s, 100));
  assert_true(gw_status_set_has(&s, 599));
  assert_false(gw_status_set_has(&s, 503));
  assert_false(gw_status_set_has(&s, 501));
  assert_false(gw_status_set_has(&s, 0));
  assert_false(gw_status_set_has(&s, 1000));
}

static void ratelimit_fields_are_formatted_as_structured_fields(void **state)
{
  struct gw_ratelimit_info info = {.limit = 100, .window_s = 2, .remaining = 7, .reset_s = 3};
  char buf[64];
  int n = gw_ratelimit_format_policy(buf, sizeof(buf), "orders", &info);
  assert_string_equal(buf, "\"orders\";q=100;w=2");
  assert_int_equal(n, (int)strlen(buf));
  n = gw_ratelimit_format_state(buf, sizeof(buf), "orders", &info);
  assert_string_equal(buf, "\"orders\";r=7;t=3");
  gw_ratelimit_format_state(buf, sizeof(buf), "a\"b\\c", &info);
  assert_string_equal(buf, "\"a\\\"b\\\\c\";r=7;t=3");
  assert_int_equal(gw_ratelimit_format_state(buf, 10, "orders", &info), GW_POLICY_ETOO_LARGE);
  assert_int_equal(gw_ratelimit_format_state(buf, 3, "orders", &info), GW_POLICY_ETOO_LARGE);
}

static void ceil_conversions_round_up(void **state)
{
  assert_int_equal(gw_ns_to_s_ceil(0), 0);
  assert_int_equal(gw_ns_to_s_ceil(1), 1);
  assert_int_equal(gw_ns_to_s_ceil(GW_NS_PER_S), 1);
  assert_int_equal(gw_ns_to_s_ceil(GW_NS_PER_S + 1), 2);
  assert_int_equal(gw_ns_to_ms_ceil(GW_NS_PER_MS - 1), 1);
  assert_int_equal(gw_sat_add(UINT64_MAX - 1, 5), UINT64_MAX);
  assert_int_equal(gw_sat_mul(UINT64_MAX / 2, 3), UINT64_MAX);
  assert_int_equal(gw_sat_mul(0, UINT64_MAX), 0);
}

/* Reference vectors from the SipHash paper (key 00..0f, message 00..len-1). */
static void siphash24_matches_reference_vectors(void **state)
{
  struct gw_hash_key key = {UINT64_C(0x0706050403020100), UINT64_C(0x0f0e0d0c0b0a0908)};
  uint8_t msg[64];
  for (int i = 0; i < 64; i++)
    msg[i] = (uint8_t)i;
  assert_int_equal(gw_siphash(&key, 2, 4, msg, 0), UINT64_C(0x726fdb47dd0e0e31));
  assert_int_equal(gw_siphash(&key, 2, 4, msg, 15), UINT64_C(0xa129ca6149be45e5));
}

static void siphash_incremental_equals_one_shot(void **state)
{
  struct gw_hash_key key = {1234, 5678};
  uint8_t msg[100];
  for (int i = 0; i < 100; i++)
    msg[i] = (uint8_t)(i * 7 + 3);
  for (size_t len = 0; len <= 100; len++) {
    for (size_t split = 0; split <= len; split += 3) {
      struct gw_siphash_state st;
      gw_siphash24_init(&st, &key);
      gw_siphash24_update(&st, msg, split);
      gw_siphash24_update(&st, msg + split, len - split);
      assert_int_equal(gw_siphash24_final(&st), gw_siphash(&key, 2, 4, msg, len));
    }
  }
}

static void rng_same_seed_replays_exactly(void **state)
{
  struct gw_rng a, b, c;
  gw_rng_seed(&a, 42);
  gw_rng_seed(&b, 42);
  gw_rng_seed(&c, 43);
  int differ = 0;
  for (int i = 0; i < 1000; i++) {
    uint64_t x = gw_rng_next(&a);
    assert_int_equal(x, gw_rng_next(&b));
    differ += x != gw_rng_next(&c);
  }
  assert_true(differ > 990);
}

static void rng_between_stays_in_bounds_and_reaches_both_ends(void **state)
{
  struct gw_rng r;
  gw_rng_seed(&r, 7);
  int hits[11] = {0};
  for (int i = 0; i < 20000; i++) {
    uint64_t v = gw_rng_between(&r, 10, 20);
    assert_true(v >= 10 && v <= 20);
    hits[v - 10]++;
  }
  for (int i = 0; i <= 10; i++)
    assert_true(hits[i] > 1500 && hits[i] < 2200); /* about 1818 each */
  assert_int_equal(gw_rng_between(&r, 5, 5), 5);
  assert_int_equal(gw_rng_below(&r, 1), 0);
  (void)gw_rng_between(&r, 0, UINT64_MAX);
}

int main(void)
{
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(error_names_come_from_the_table),
      cmocka_unit_test(status_set_holds_only_added_statuses),
      cmocka_unit_test(ratelimit_fields_are_formatted_as_structured_fields),
      cmocka_unit_test(ceil_conversions_round_up),
      cmocka_unit_test(siphash24_matches_reference_vectors),
      cmocka_unit_test(siphash_incremental_equals_one_shot),
      cmocka_unit_test(rng_same_seed_replays_exactly),
      cmocka_unit_test(rng_between_stays_in_bounds_and_reaches_both_ends),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
