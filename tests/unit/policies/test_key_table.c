/* Key table: lookups, LRU eviction order and counts, long keys, and a randomised model check. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "key_table.h"
#include "rng.h"

static struct gw_key_table *make(uint32_t max_keys, uint32_t key_max, uint32_t value_bytes)
{
  struct gw_key_table_config c = {
      .max_keys = max_keys, .key_max_bytes = key_max, .value_bytes = value_bytes, .seed = {11, 22}};
  struct gw_key_table *t = NULL;
  assert_int_equal(gw_key_table_create(&c, &t), 0);
  assert_non_null(t);
  return t;
}

static void *put(struct gw_key_table *t, const char *key, unsigned *flags)
{
  void *v = NULL;
  assert_int_equal(gw_key_table_get_or_insert(t, key, strlen(key), &v, flags), 0);
  assert_non_null(v);
  assert_int_equal((uintptr_t)v % 8, 0);
  return v;
}

static bool has(struct gw_key_table *t, const char *key)
{
  return gw_key_table_contains(t, key, strlen(key));
}

static void config_out_of_range_is_rejected(void **state)
{
  struct gw_key_table_config c = {.max_keys = 0, .key_max_bytes = 64, .value_bytes = 16};
  struct gw_key_table *t = NULL;
  assert_int_equal(gw_key_table_create(&c, &t), GW_POLICY_EINVALID_CONFIG);
  assert_null(t);
  c.max_keys = 10;
  c.key_max_bytes = 15;
  assert_int_equal(gw_key_table_config_check(&c), GW_POLICY_EINVALID_CONFIG);
  c.key_max_bytes = 1025;
  assert_int_equal(gw_key_table_config_check(&c), GW_POLICY_EINVALID_CONFIG);
  c.key_max_bytes = 64;
  c.value_bytes = GW_KEY_TABLE_VALUE_MAX + 1;
  assert_int_equal(gw_key_table_config_check(&c), GW_POLICY_EINVALID_CONFIG);
}

static void memory_bytes_follow_the_documented_formula(void **state)
{
  struct gw_key_table_config c = {.max_keys = 1000000, .key_max_bytes = 46, .value_bytes = 16};
  size_t table_overhead =
      gw_key_table_memory_bytes(&c) - 1000000 * (24 + 48 + 16) - 4 * (size_t)(1 << 21);
  assert_true(table_overhead < 256);
}

static void inserted_key_is_found_with_a_zeroed_value(void **state)
{
  struct gw_key_table *t = make(4, 16, 16);
  unsigned flags;
  uint64_t *v = put(t, "10.0.0.1", &flags);
  assert_int_equal(flags, GW_KEY_TABLE_CREATED);
  assert_int_equal(v[0], 0);
  assert_int_equal(v[1], 0);
  v[0] = 42;
  uint64_t *again = put(t, "10.0.0.1", &flags);
  assert_int_equal(flags, 0);
  assert_ptr_equal(again, v);
  assert_int_equal(again[0], 42);
  assert_ptr_equal(gw_key_table_find(t, "10.0.0.1", 8), v);
  assert_null(gw_key_table_find(t, "10.0.0.2", 8));
  assert_null(gw_key_table_find(t, "10.0.0.", 7)); /* a prefix is another key */
  put(t, "", &flags);                              /* the empty key is a key too */
  assert_int_equal(flags, GW_KEY_TABLE_CREATED);
  assert_true(gw_key_table_contains(t, "", 0));
  gw_key_table_destroy(t);
}

static void full_table_evicts_least_recently_used_first(void **state)
{
  struct gw_key_table *t = make(3, 16, 8);
  unsigned flags;
  put(t, "a", &flags);
  put(t, "b", &flags);
  put(t, "c", &flags);
  assert_non_null(gw_key_table_find(t, "a", 1)); /* order now (MRU..LRU): a c b */
  put(t, "d", &flags);
  assert_int_equal(flags, GW_KEY_TABLE_CREATED | GW_KEY_TABLE_EVICTED);
  assert_false(has(t, "b"));
  assert_true(has(t, "a") && has(t, "c") && has(t, "d"));
  put(t, "c", &flags); /* get_or_insert touches too: d c... order c d a */
  assert_int_equal(flags, 0);
  put(t, "e", &flags);
  assert_false(has(t, "a"));
  put(t, "f", &flags);
  assert_false(has(t, "d"));
  assert_true(has(t, "c") && has(t, "e") && has(t, "f"));
  struct gw_key_table_stats st;
  gw_key_table_stats(t, &st);
  assert_int_equal(st.count, 3);
  assert_int_equal(st.max_keys, 3);
  assert_int_equal(st.evictions, 3);
  assert_int_equal(st.inserts, 6);
  gw_key_table_destroy(t);
}

static void contains_does_not_change_eviction_order(void **state)
{
  struct gw_key_table *t = make(2, 16, 8);
  put(t, "a", NULL);
  put(t, "b", NULL);
  assert_true(has(t, "a"));
  put(t, "c", NULL);
  assert_false(has(t, "a"));
  assert_true(has(t, "b"));
  gw_key_table_destroy(t);
}

static void flood_of_distinct_keys_stays_bounded_and_counts_evictions(void **state)
{
  struct gw_key_table *t = make(100, 32, 16);
  char key[32];
  for (int i = 0; i < 10000; i++) {
    snprintf(key, sizeof(key), "client-%d", i);
    put(t, key, NULL);
  }
  struct gw_key_table_stats st;
  gw_key_table_stats(t, &st);
  assert_int_equal(st.count, 100);
  assert_int_equal(st.evictions, 9900);
  for (int i = 9900; i < 10000; i++) {
    snprintf(key, sizeof(key), "client-%d", i);
    assert_true(has(t, key));
  }
  snprintf(key, sizeof(key), "client-%d", 9899);
  assert_false(has(t, key));
  gw_key_table_destroy(t);
}

static void removed_key_is_gone_and_its_slot_reused(void **state)
{
  struct gw_key_table *t = make(2, 16, 8);
  put(t, "a", NULL);
  put(t, "b", NULL);
  assert_int_equal(gw_key_table_remove(t, "a", 1), 0);
  assert_int_equal(gw_key_table_remove(t, "a", 1), GW_POLICY_ENOT_FOUND);
  unsigned flags;
  uint64_t *v = put(t, "c", &flags);
  assert_int_equal(flags, GW_KEY_TABLE_CREATED); /* room was free: no eviction */
  assert_int_equal(*v, 0);
  assert_true(has(t, "b") && has(t, "c"));
  struct gw_key_table_stats st;
  gw_key_table_stats(t, &st);
  assert_int_equal(st.evictions, 0);
  assert_int_equal(st.count, 2);
  gw_key_table_destroy(t);
}

static void long_keys_are_told_apart_by_digest(void **state)
{
  struct gw_key_table *t = make(8, 16, 8);
  char a[300], b[300];
  memset(a, 'x', sizeof(a));
  memset(b, 'x', sizeof(b));
  b[299] = 'y';
  uint64_t *va, *vb;
  assert_int_equal(gw_key_table_get_or_insert(t, a, sizeof(a), (void **)&va, NULL), 0);
  assert_int_equal(gw_key_table_get_or_insert(t, b, sizeof(b), (void **)&vb, NULL), 0);
  assert_ptr_not_equal(va, vb);
  *va = 1;
  *vb = 2;
  assert_int_equal(*(uint64_t *)gw_key_table_find(t, a, sizeof(a)), 1);
  assert_int_equal(*(uint64_t *)gw_key_table_find(t, b, sizeof(b)), 2);
  assert_false(gw_key_table_contains(t, a, 17)); /* a shorter (still long) prefix differs */
  assert_false(gw_key_table_contains(t, a, 16)); /* as does a short one */
  gw_key_table_destroy(t);
}

/* Randomised check against a model: an array of keys in LRU order (index 0 = most recent). */
static void random_operations_match_an_lru_model(void **state)
{
  enum { MAX = 8, KEYS = 20 };
  struct gw_key_table *t = make(MAX, 16, 8);
  int model[MAX];
  int n = 0;
  uint64_t evictions = 0;
  struct gw_rng rng;
  gw_rng_seed(&rng, 77);
  for (int step = 0; step < 20000; step++) {
    int k = (int)gw_rng_below(&rng, KEYS);
    char key[8];
    snprintf(key, sizeof(key), "k%d", k);
    int pos = -1;
    for (int i = 0; i < n; i++)
      if (model[i] == k)
        pos = i;
    int op = (int)gw_rng_below(&rng, 10);
    if (op < 6) { /* get_or_insert */
      unsigned flags;
      uint64_t *v = put(t, key, &flags);
      if (pos >= 0) {
        assert_int_equal(flags, 0);
        assert_int_equal(*v, (uint64_t)k + 1);
        memmove(model + 1, model, sizeof(int) * (size_t)pos);
      } else {
        assert_true(flags & GW_KEY_TABLE_CREATED);
        assert_int_equal(*v, 0);
        *v = (uint64_t)k + 1;
        if (n == MAX) {
          assert_true(flags & GW_KEY_TABLE_EVICTED);
          evictions++;
          n--;
        } else {
          assert_false(flags & GW_KEY_TABLE_EVICTED);
        }
        memmove(model + 1, model, sizeof(int) * (size_t)n);
        n++;
      }
      model[0] = k;
    } else if (op < 8) { /* find */
      uint64_t *v = gw_key_table_find(t, key, strlen(key));
      if (pos < 0) {
        assert_null(v);
      } else {
        assert_int_equal(*v, (uint64_t)k + 1);
        memmove(model + 1, model, sizeof(int) * (size_t)pos);
        model[0] = k;
      }
    } else { /* remove */
      assert_int_equal(gw_key_table_remove(t, key, strlen(key)),
                       pos >= 0 ? 0 : GW_POLICY_ENOT_FOUND);
      if (pos >= 0) {
        memmove(model + pos, model + pos + 1, sizeof(int) * (size_t)(n - pos - 1));
        n--;
      }
    }
    struct gw_key_table_stats st;
    gw_key_table_stats(t, &st);
    assert_int_equal(st.count, n);
    assert_int_equal(st.evictions, evictions);
    for (int i = 0; i < KEYS; i++) {
      snprintf(key, sizeof(key), "k%d", i);
      bool in = false;
      for (int j = 0; j < n; j++)
        in |= model[j] == i;
      assert_int_equal(gw_key_table_contains(t, key, strlen(key)), in);
    }
  }
  gw_key_table_destroy(t);
}

int main(void)
{
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(config_out_of_range_is_rejected),
      cmocka_unit_test(memory_bytes_follow_the_documented_formula),
      cmocka_unit_test(inserted_key_is_found_with_a_zeroed_value),
      cmocka_unit_test(full_table_evicts_least_recently_used_first),
      cmocka_unit_test(contains_does_not_change_eviction_order),
      cmocka_unit_test(flood_of_distinct_keys_stays_bounded_and_counts_evictions),
      cmocka_unit_test(removed_key_is_gone_and_its_slot_reused),
      cmocka_unit_test(long_keys_are_told_apart_by_digest),
      cmocka_unit_test(random_operations_match_an_lru_model),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
