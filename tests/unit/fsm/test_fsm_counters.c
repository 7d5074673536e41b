/*
 * test_fsm_counters.c - counters (add, compare-and-set, overflow), the versioned route table, and
 * the idempotency records every /v1 write may carry: a replay returns the original result byte
 * for byte and applies nothing; a key reused with other arguments is refused; records expire with
 * fsm time and are evicted oldest first beyond their bound.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#include "fsm_harness.h"

static void counter_add_returns_the_new_value(void **state)
{
    struct h h;
    h_init(&h);
    assert_int_equal(gw_fsm_get_counter(h.f, "hits", 4, &h.res), 0);
    assert_res(&h, 200, "{\"name\":\"hits\",\"value\":0}");
    h_add(&h, "hits", 1);
    assert_res(&h, 200, "{\"name\":\"hits\",\"value\":1}");
    h_add(&h, "hits", -5);
    assert_res(&h, 200, "{\"name\":\"hits\",\"value\":-4}");
    assert_int_equal(gw_fsm_get_counter(h.f, "hits", 4, &h.res), 0);
    assert_res(&h, 200, "{\"name\":\"hits\",\"value\":-4}");
    assert_int_equal(gw_fsm_get_counter(h.f, "bad/name", 8, &h.res), 0);
    assert_err(&h, 400, "invalid_name");
    h_add(&h, "", 1);
    assert_err(&h, 400, "invalid_name");
    h_free(&h);
}

static void counter_overflow_is_400_invalid_field_and_keeps_the_value(void **state)
{
    struct h h;
    h_init(&h);
    h_set(&h, "c", INT64_MAX - 1, false, 0);
    h_add(&h, "c", 1);
    assert_res(&h, 200, "{\"name\":\"c\",\"value\":9223372036854775807}");
    h_add(&h, "c", 1);
    assert_err(&h, 400, "invalid_field");
    assert_contains(h.res.body, "\"field\":\"add\",\"value\":9223372036854775807");
    h_set(&h, "d", INT64_MIN, false, 0);
    assert_res(&h, 200, "{\"name\":\"d\",\"value\":-9223372036854775808}");
    h_add(&h, "d", -1);
    assert_err(&h, 400, "invalid_field");
    h_add(&h, "d", INT64_MAX);
    assert_res(&h, 200, "{\"name\":\"d\",\"value\":-1}");
    h_free(&h);
}

static void counter_set_with_expect_is_a_compare_and_set(void **state)
{
    struct h h;
    h_init(&h);
    h_set(&h, "c", 5, true, 0); /* never written counts as 0 */
    assert_res(&h, 200, "{\"name\":\"c\",\"value\":5}");
    h_set(&h, "c", 6, true, 4);
    assert_res(&h, 409,
               "{\"error\":{\"code\":\"cas_failed\",\"message\":\"the counter's value is not the "
               "expected one\",\"value\":5}}");
    h_set(&h, "c", 6, true, 5);
    assert_res(&h, 200, "{\"name\":\"c\",\"value\":6}");
    h_set(&h, "c", -3, false, 0);
    assert_res(&h, 200, "{\"name\":\"c\",\"value\":-3}");
    h_free(&h);
}

static void counter_table_full_is_503_too_many_counters(void **state)
{
    struct gw_fsm_config cfg;
    gw_fsm_config_default(&cfg);
    cfg.max_counters = 2;
    struct h h;
    h_init_cfg(&h, &cfg);
    h_add(&h, "a", 1);
    h_add(&h, "b", 1);
    h_add(&h, "c", 1);
    assert_err(&h, 503, "too_many_counters");
    h_add(&h, "a", 1);
    assert_int_equal(h.res.status, 200);
    h_free(&h);
}

struct route_seen {
    int n;
    char names[8][16];
    uint64_t versions[8];
};

static int collect_route(void *ctx, const char *name, size_t name_len, const char *json, size_t json_len,
                         uint64_t version)
{
    struct route_seen *s = ctx;
    snprintf(s->names[s->n], sizeof(s->names[0]), "%.*s", (int)name_len, name);
    s->versions[s->n++] = version;
    (void)json;
    (void)json_len;
    return 0;
}

static void routes_are_versioned_put_get_and_delete(void **state)
{
    struct h h;
    h_init(&h);
    h_route_put(&h, "orders", "{\"name\":\"orders\"}");
    assert_res(&h, 200, "{\"name\":\"orders\",\"version\":1}");
    h_route_put(&h, "a", "{\"name\":\"a\"}");
    assert_res(&h, 200, "{\"name\":\"a\",\"version\":2}");
    h_route_put(&h, "orders", "{\"name\":\"orders\",\"v\":2}");
    assert_res(&h, 200, "{\"name\":\"orders\",\"version\":3}");
    assert_int_equal(gw_fsm_get_route(h.f, "orders", 6, &h.res), 0);
    assert_res(&h, 200, "{\"name\":\"orders\",\"v\":2}");
    struct route_seen seen = {0};
    assert_int_equal(gw_fsm_routes_foreach(h.f, collect_route, &seen), 0);
    assert_int_equal(seen.n, 2);
    assert_string_equal(seen.names[0], "a");
    assert_string_equal(seen.names[1], "orders");
    assert_int_equal(seen.versions[1], 3);
    h_route_delete(&h, "a");
    assert_res(&h, 204, "");
    assert_int_equal(gw_fsm_routes_version(h.f), 4);
    h_route_delete(&h, "a");
    assert_err(&h, 404, "route_not_found");
    assert_int_equal(gw_fsm_get_route(h.f, "a", 1, &h.res), 0);
    assert_err(&h, 404, "route_not_found");
    h_route_put(&h, "x", "");
    assert_err(&h, 400, "invalid_field");
    assert_int_equal(gw_fsm_routes_version(h.f), 4);
    h_free(&h);
}

static void route_table_bounds_count_and_size(void **state)
{
    struct gw_fsm_config cfg;
    gw_fsm_config_default(&cfg);
    cfg.max_routes = 1;
    cfg.max_route_bytes = 8;
    struct h h;
    h_init_cfg(&h, &cfg);
    h_route_put(&h, "a", "{\"x\":12}");
    assert_int_equal(h.res.status, 200);
    h_route_put(&h, "b", "{}");
    assert_err(&h, 503, "too_many_routes");
    h_route_put(&h, "a", "{\"x\":123}");
    assert_err(&h, 400, "invalid_field");
    assert_contains(h.res.body, "\"field\":\"route\"");
    assert_int_equal(gw_fsm_get_route(h.f, "a/", 2, &h.res), 0);
    assert_err(&h, 400, "invalid_name");
    h_free(&h);
}

static void idempotent_replay_returns_the_original_bytes_and_applies_once(void **state)
{
    struct h h;
    h_init(&h);
    h.idem = "k-1";
    h_add(&h, "c", 1);
    assert_res(&h, 200, "{\"name\":\"c\",\"value\":1}");
    assert_false(h.res.replayed);
    char first[128];
    snprintf(first, sizeof(first), "%s", h.res.body);
    for (int i = 0; i < 5; i++) {
        h.now += 1000;
        h.idem = "k-1";
        h_add(&h, "c", 1);
        assert_true(h.res.replayed);
        assert_res(&h, 200, first);
    }
    assert_int_equal(gw_fsm_get_counter(h.f, "c", 1, &h.res), 0);
    assert_res(&h, 200, "{\"name\":\"c\",\"value\":1}");
    /* A lease grant replays the same id rather than granting a second lease. */
    h.idem = "g";
    uint64_t id = h_grant(&h, 5000);
    h.idem = "g";
    h_grant(&h, 5000);
    assert_true(h.res.replayed);
    char want[64];
    snprintf(want, sizeof(want), "{\"id\":\"%llu\",\"ttl_ms\":5000}", (unsigned long long)id);
    assert_res(&h, 201, want);
    struct gw_fsm_stats st;
    gw_fsm_stats(h.f, &st);
    assert_int_equal(st.leases, 1);
    /* Errors are results too: a 409 replays as the 409 it was. */
    h_set(&h, "z", 1, false, 0);
    h.idem = "cas";
    h_set(&h, "z", 2, true, 0);
    assert_err(&h, 409, "cas_failed");
    h_set(&h, "z", 0, false, 0);
    h.idem = "cas";
    h_set(&h, "z", 2, true, 0);
    assert_true(h.res.replayed);
    assert_err(&h, 409, "cas_failed");
    assert_contains(h.res.body, "\"value\":1");
    /* 204 replays as 204. */
    h.idem = "rv";
    h_revoke(&h, id);
    assert_res(&h, 204, "");
    h.idem = "rv";
    h_revoke(&h, id);
    assert_true(h.res.replayed);
    assert_res(&h, 204, "");
    h_free(&h);
}

static void idempotency_key_reused_with_other_arguments_is_422(void **state)
{
    struct h h;
    h_init(&h);
    h.idem = "k";
    h_add(&h, "c", 1);
    h.idem = "k";
    h_add(&h, "c", 2);
    assert_err(&h, 422, "idempotency_key_mismatch");
    h.idem = "k";
    h_add(&h, "other", 1);
    assert_err(&h, 422, "idempotency_key_mismatch");
    /* Keys are scoped per command kind: the same key on a set is a different record. */
    h.idem = "k";
    h_set(&h, "c", 10, false, 0);
    assert_res(&h, 200, "{\"name\":\"c\",\"value\":10}");
    assert_false(h.res.replayed);
    h_free(&h);
}

static void idempotency_key_with_unprintable_bytes_is_400(void **state)
{
    struct h h;
    h_init(&h);
    h.idem = "bad\x01key";
    h_add(&h, "c", 1);
    assert_err(&h, 400, "idempotency_key_invalid");
    assert_int_equal(gw_fsm_get_counter(h.f, "c", 1, &h.res), 0);
    assert_res(&h, 200, "{\"name\":\"c\",\"value\":0}");
    char key[256];
    memset(key, 'k', 255);
    key[255] = '\0';
    assert_true(gw_fsm_idem_key_valid(key, 255));
    assert_false(gw_fsm_idem_key_valid(key, 0));
    h.idem = key;
    h_add(&h, "c", 1);
    assert_int_equal(h.res.status, 200);
    h_free(&h);
}

static void idempotency_record_expires_after_its_ttl(void **state)
{
    struct gw_fsm_config cfg;
    gw_fsm_config_default(&cfg);
    cfg.idem_ttl_ms = 60000;
    struct h h;
    h_init_cfg(&h, &cfg);
    h.idem = "k";
    h_add(&h, "c", 1);
    h.now += 59999;
    h.idem = "k";
    h_add(&h, "c", 1);
    assert_true(h.res.replayed);
    h.now += 1;
    h.idem = "k";
    h_add(&h, "c", 1);
    assert_false(h.res.replayed);
    assert_res(&h, 200, "{\"name\":\"c\",\"value\":2}");
    h_free(&h);
}

static void idempotency_records_beyond_the_bound_evict_the_oldest(void **state)
{
    struct gw_fsm_config cfg;
    gw_fsm_config_default(&cfg);
    cfg.max_idem_records = 3;
    struct h h;
    h_init_cfg(&h, &cfg);
    const char *keys[4] = {"a", "b", "c", "d"};
    for (int i = 0; i < 4; i++) {
        h.idem = keys[i];
        h_add(&h, "n", 1);
    }
    struct gw_fsm_stats st;
    gw_fsm_stats(h.f, &st);
    assert_int_equal(st.idem_records, 3);
    assert_int_equal(st.idem_evicted, 1);
    h.idem = "b";
    h_add(&h, "n", 1);
    assert_true(h.res.replayed);
    h.idem = "a"; /* evicted: applies again */
    h_add(&h, "n", 1);
    assert_false(h.res.replayed);
    assert_res(&h, 200, "{\"name\":\"n\",\"value\":5}");
    h_free(&h);
}

static void capacity_errors_are_not_stored_so_a_retry_can_succeed(void **state)
{
    struct gw_fsm_config cfg;
    gw_fsm_config_default(&cfg);
    cfg.max_counters = 1;
    struct h h;
    h_init_cfg(&h, &cfg);
    h_add(&h, "a", 1);
    h.idem = "k";
    h_add(&h, "b", 1);
    assert_err(&h, 503, "too_many_counters");
    h_set(&h, "a", 0, false, 0);
    h.idem = "k"; /* still full, but not replayed: a fresh attempt */
    h_add(&h, "b", 1);
    assert_false(h.res.replayed);
    assert_err(&h, 503, "too_many_counters");
    h_free(&h);
}

static void replay_of_a_queued_acquire_follows_the_waiter(void **state)
{
    struct h h;
    h_init(&h);
    h_acquire(&h, "L", "w1", 0, 10000, 0);
    h.idem = "acq";
    uint64_t w = h_acquire(&h, "L", "w2", 0, 10000, 5000);
    assert_true(h.res.queued);
    /* A retry while it waits attaches to the same waiter. */
    h.idem = "acq";
    h_acquire(&h, "L", "w2", 0, 10000, 5000);
    assert_true(h.res.replayed);
    assert_true(h.res.queued);
    assert_int_equal(h.res.waiter_id, w);
    assert_int_equal(gw_fsm_get_lock(h.f, "L", 1, &h.res), 0);
    assert_contains(h.res.body, "\"waiters\":1");
    h_release(&h, "L", 1);
    const struct gw_fsm_wakeup *wk = h_wakeup(&h, w);
    assert_non_null(wk);
    char granted[256];
    snprintf(granted, sizeof(granted), "%s", wk->body);
    /* After the grant, a retry gets the grant itself, byte for byte. */
    h.idem = "acq";
    h_acquire(&h, "L", "w2", 0, 10000, 5000);
    assert_true(h.res.replayed);
    assert_false(h.res.queued);
    assert_res(&h, 200, granted);
    /* A waiter that timed out replays its 409. */
    h.idem = "acq2";
    uint64_t w3 = h_acquire(&h, "L", "w3", 0, 10000, 5000);
    h_cancel(&h, "L", w3);
    h.idem = "acq2";
    h_acquire(&h, "L", "w3", 0, 10000, 5000);
    assert_true(h.res.replayed);
    assert_err(&h, 409, "lock_held");
    h_free(&h);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(counter_add_returns_the_new_value),
        cmocka_unit_test(counter_overflow_is_400_invalid_field_and_keeps_the_value),
        cmocka_unit_test(counter_set_with_expect_is_a_compare_and_set),
        cmocka_unit_test(counter_table_full_is_503_too_many_counters),
        cmocka_unit_test(routes_are_versioned_put_get_and_delete),
        cmocka_unit_test(route_table_bounds_count_and_size),
        cmocka_unit_test(idempotent_replay_returns_the_original_bytes_and_applies_once),
        cmocka_unit_test(idempotency_key_reused_with_other_arguments_is_422),
        cmocka_unit_test(idempotency_key_with_unprintable_bytes_is_400),
        cmocka_unit_test(idempotency_record_expires_after_its_ttl),
        cmocka_unit_test(idempotency_records_beyond_the_bound_evict_the_oldest),
        cmocka_unit_test(capacity_errors_are_not_stored_so_a_retry_can_succeed),
        cmocka_unit_test(replay_of_a_queued_acquire_follows_the_waiter),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
