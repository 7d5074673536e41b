/*
 * test_fsm_leases.c - leases in the state machine: grant, keepalive, revoke, GET, and expiry as
 * the leader proposes it. Time comes only from the commands (API.md section 4: a lease never
 * expires earlier than ttl_ms after its last grant or keepalive; fsm time never goes back).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#include "fsm_harness.h"

static void lease_grant_returns_201_with_the_log_index_as_id(void **state)
{
    struct h h;
    h_init(&h);
    h.index = 41;
    uint64_t id = h_grant(&h, 10000);
    assert_int_equal(id, 42);
    assert_res(&h, 201, "{\"id\":\"42\",\"ttl_ms\":10000}");
    assert_null(h.res.code);
    assert_false(h.res.queued);
    h_free(&h);
}

static void lease_grant_rejects_ttl_outside_1000_to_3600000(void **state)
{
    struct h h;
    h_init(&h);
    h_grant(&h, 999);
    assert_err(&h, 400, "invalid_field");
    assert_contains(h.res.body, "\"field\":\"ttl_ms\"");
    h_grant(&h, 3600001);
    assert_err(&h, 400, "invalid_field");
    h_grant(&h, 0);
    assert_err(&h, 400, "invalid_field");
    h_grant(&h, 1000);
    assert_int_equal(h.res.status, 201);
    h_grant(&h, 3600000);
    assert_int_equal(h.res.status, 201);
    struct gw_fsm_stats st;
    gw_fsm_stats(h.f, &st);
    assert_int_equal(st.leases, 2);
    h_free(&h);
}

static void lease_keepalive_restarts_the_ttl(void **state)
{
    struct h h;
    h_init(&h);
    uint64_t id = h_grant(&h, 5000);
    h.now += 4000;
    h_keepalive(&h, id);
    assert_res(&h, 200, "{\"id\":\"1\",\"ttl_ms\":5000}");
    h.now += 4000; /* 8 s after the grant, 4 s after the keepalive */
    assert_int_equal(gw_fsm_overdue_leases(h.f, h.now, (uint64_t[4]){0}, 4), 0);
    assert_int_equal(gw_fsm_get_lease(h.f, id, h.now, &h.res), 0);
    assert_res(&h, 200, "{\"id\":\"1\",\"ttl_ms\":5000,\"remaining_ms\":1000,\"locks\":[]}");
    h_free(&h);
}

static void lease_keepalive_of_unknown_or_overdue_lease_is_404(void **state)
{
    struct h h;
    h_init(&h);
    h_keepalive(&h, 77);
    assert_err(&h, 404, "lease_not_found");
    assert_res(&h, 404,
               "{\"error\":{\"code\":\"lease_not_found\",\"message\":\"the lease does not exist or has "
               "expired\",\"lease_id\":\"77\"}}");
    uint64_t id = h_grant(&h, 1000);
    h.now += 1000; /* exactly ttl_ms later: overdue */
    h_keepalive(&h, id);
    assert_err(&h, 404, "lease_not_found");
    struct gw_fsm_stats st;
    gw_fsm_stats(h.f, &st);
    assert_int_equal(st.leases, 0); /* the keepalive expired it on the spot */
    h_free(&h);
}

static void lease_never_expires_before_its_ttl(void **state)
{
    struct h h;
    h_init(&h);
    uint64_t id = h_grant(&h, 3000);
    uint64_t ids[8];
    assert_int_equal(gw_fsm_overdue_leases(h.f, h.now + 2999, ids, 8), 0);
    h.now += 2999;
    h_expire(&h, &id, 1); /* a leader with a fast clock proposes it one ms early */
    assert_res(&h, 200, "{\"expired\":0}");
    h_keepalive(&h, id);
    assert_int_equal(h.res.status, 200);
    assert_int_equal(gw_fsm_overdue_leases(h.f, h.now + 3000, ids, 8), 1);
    assert_int_equal(ids[0], id);
    h_free(&h);
}

static void lease_expire_for_a_lease_kept_alive_in_between_does_nothing(void **state)
{
    struct h h;
    h_init(&h);
    uint64_t id = h_grant(&h, 2000);
    h_acquire(&h, "job", "w1", id, 0, 0);
    assert_int_equal(h.res.status, 200);
    uint64_t ids[4];
    assert_int_equal(gw_fsm_overdue_leases(h.f, h.now + 2500, ids, 4), 1);
    /* The leader saw it overdue, but a keepalive commits before its LEASE_EXPIRE. */
    h.now += 1900;
    h_keepalive(&h, id);
    h.now += 600;
    h_expire(&h, ids, 1);
    assert_res(&h, 200, "{\"expired\":0}");
    assert_int_equal(gw_fsm_get_lock(h.f, "job", 3, &h.res), 0);
    assert_int_equal(h.res.status, 200);
    h_free(&h);
}

static void lease_expire_releases_only_really_overdue_leases(void **state)
{
    struct h h;
    h_init(&h);
    uint64_t a = h_grant(&h, 1000);
    uint64_t b = h_grant(&h, 5000);
    h.now += 1500;
    uint64_t ids[3] = {a, b, 999};
    h_expire(&h, ids, 3);
    assert_res(&h, 200, "{\"expired\":1}");
    assert_int_equal(gw_fsm_get_lease(h.f, a, h.now, &h.res), 0);
    assert_err(&h, 404, "lease_not_found");
    assert_int_equal(gw_fsm_get_lease(h.f, b, h.now, &h.res), 0);
    assert_int_equal(h.res.status, 200);
    h_free(&h);
}

static void lease_revoke_returns_204_and_unknown_is_404(void **state)
{
    struct h h;
    h_init(&h);
    uint64_t id = h_grant(&h, 10000);
    h_revoke(&h, id);
    assert_res(&h, 204, "");
    assert_null(h.res.code);
    h_revoke(&h, id);
    assert_err(&h, 404, "lease_not_found");
    h_free(&h);
}

static void lease_get_reports_remaining_ms_and_sorted_lock_names(void **state)
{
    struct h h;
    h_init(&h);
    uint64_t id = h_grant(&h, 10000);
    h_acquire(&h, "zeta", "w", id, 0, 0);
    h_acquire(&h, "alpha", "w", id, 0, 0);
    h_acquire(&h, "mid.x", "w", id, 0, 0);
    assert_int_equal(gw_fsm_get_lease(h.f, id, h.now + 2500, &h.res), 0);
    assert_res(&h, 200,
               "{\"id\":\"1\",\"ttl_ms\":10000,\"remaining_ms\":7500,\"locks\":[\"alpha\",\"mid.x\","
               "\"zeta\"]}");
    /* A read at a time before the fsm clock uses the fsm clock. */
    assert_int_equal(gw_fsm_get_lease(h.f, id, 5, &h.res), 0);
    assert_contains(h.res.body, "\"remaining_ms\":10000");
    assert_int_equal(gw_fsm_get_lease(h.f, id, h.now + 10000, &h.res), 0);
    assert_err(&h, 404, "lease_not_found");
    assert_int_equal(gw_fsm_get_lease(h.f, 12345, h.now, &h.res), 0);
    assert_err(&h, 404, "lease_not_found");
    h_free(&h);
}

static void fsm_time_never_goes_backwards(void **state)
{
    struct h h;
    h_init(&h);
    h.now = 50000;
    uint64_t id = h_grant(&h, 1000);
    assert_int_equal(gw_fsm_time(h.f), 50000);
    h.now = 10; /* a command stamped with an older time (a new leader with a slow clock) */
    h_keepalive(&h, id);
    assert_int_equal(h.res.status, 200);
    assert_int_equal(gw_fsm_time(h.f), 50000);
    /* The keepalive counted from fsm time, not from the stamp. */
    assert_int_equal(gw_fsm_get_lease(h.f, id, 0, &h.res), 0);
    assert_contains(h.res.body, "\"remaining_ms\":1000");
    h.now = 50999;
    h_keepalive(&h, id);
    assert_int_equal(gw_fsm_time(h.f), 50999);
    assert_int_equal(gw_fsm_applied_index(h.f), 3);
    h_free(&h);
}

static void stamps_near_the_end_of_time_saturate_instead_of_wrapping(void **state)
{
    struct h h;
    h_init(&h);
    h.now = UINT64_MAX - 10;
    uint64_t id = h_grant(&h, 5000);
    h_acquire(&h, "L", "w", id, 0, 0);
    h_acquire(&h, "L", "w2", 0, 5000, 60000);
    assert_true(h.res.queued);
    uint64_t ids[4];
    assert_int_equal(gw_fsm_overdue_leases(h.f, h.now, ids, 4), 0);
    h.now = UINT64_MAX;
    h_expire(&h, &id, 1);
    assert_res(&h, 200, "{\"expired\":1}");
    /* The waiter's new lease is born overdue at the last instant; it is granted all the same. */
    assert_int_equal(h.res.n_wakeups, 1);
    assert_int_equal(h.res.wakeups[0].status, 200);
    assert_int_equal(gw_fsm_time(h.f), UINT64_MAX);
    h_free(&h);
}

static void overdue_leases_are_sorted_and_bounded(void **state)
{
    struct h h;
    h_init(&h);
    for (int i = 0; i < 10; i++)
        h_grant(&h, 1000 + (uint64_t)i * 100);
    uint64_t ids[16];
    size_t n = gw_fsm_overdue_leases(h.f, h.now + 1450, ids, 16);
    assert_int_equal(n, 5);
    for (size_t i = 0; i < n; i++)
        assert_int_equal(ids[i], i + 1);
    assert_int_equal(gw_fsm_overdue_leases(h.f, h.now + 5000, ids, 3), 3);
    assert_true(ids[0] < ids[1] && ids[1] < ids[2]);
    h_free(&h);
}

static void next_deadline_is_the_earliest_expiry_or_wait_end(void **state)
{
    struct h h;
    h_init(&h);
    assert_int_equal(gw_fsm_next_deadline(h.f), UINT64_MAX);
    uint64_t t0 = h.now;
    h_grant(&h, 5000);
    h_acquire(&h, "L", "w", 0, 9000, 0);
    assert_int_equal(gw_fsm_next_deadline(h.f), t0 + 5000);
    h_acquire(&h, "L", "w2", 0, 9000, 1200);
    assert_int_equal(gw_fsm_next_deadline(h.f), t0 + 1200);
    h_free(&h);
}

static void lease_table_full_is_503_too_many_leases(void **state)
{
    struct gw_fsm_config cfg;
    gw_fsm_config_default(&cfg);
    cfg.max_leases = 3;
    struct h h;
    h_init_cfg(&h, &cfg);
    for (int i = 0; i < 3; i++) {
        h_grant(&h, 1000);
        assert_int_equal(h.res.status, 201);
    }
    h_grant(&h, 1000);
    assert_err(&h, 503, "too_many_leases");
    h_acquire(&h, "x", "w", 0, 1000, 0);
    assert_err(&h, 503, "too_many_leases");
    h.now += 1000;
    uint64_t ids[3] = {1, 2, 3};
    h_expire(&h, ids, 3);
    h_grant(&h, 1000);
    assert_int_equal(h.res.status, 201);
    h_free(&h);
}

/*
 * The node's stamping rule across a leader change: the new leader stamps applied fsm time plus
 * the time since it took over, never its own wall clock. Real time is `wall` here.
 */
static void leader_change_extends_a_lease_by_at_most_the_election_gap(void **state)
{
    struct h h;
    h_init(&h);
    uint64_t wall = 0, fsm_base = 1000000;
    h.now = fsm_base; /* leader A: its clock and fsm time agree */
    uint64_t id = h_grant(&h, 5000);
    wall += 2000;
    h.now = fsm_base + wall;
    h_add(&h, "x", 1); /* A's last entry */
    uint64_t gap = 3000;
    wall += gap; /* the election: nothing commits, fsm time stands still */
    uint64_t b_start = wall, b_base = gw_fsm_time(h.f);
    uint64_t ids[4];
    /* Leader B's expiry loop, every 100 ms of real time. */
    uint64_t expired_at_wall = 0;
    for (int tick = 0; tick < 100 && expired_at_wall == 0; tick++) {
        wall += 100;
        h.now = b_base + (wall - b_start);
        size_t n = gw_fsm_overdue_leases(h.f, h.now, ids, 4);
        if (n > 0) {
            h_expire(&h, ids, n);
            if (strcmp(h.res.body, "{\"expired\":1}") == 0)
                expired_at_wall = wall;
        }
    }
    /* Never before ttl_ms of real time; at most ttl_ms + the gap (+ one loop period). */
    assert_true(expired_at_wall >= 5000);
    assert_true(expired_at_wall <= 5000 + gap + 100);
    h_keepalive(&h, id);
    assert_err(&h, 404, "lease_not_found");
    /* A leader whose raw clock is far behind cannot move fsm time back or revive anything. */
    uint64_t t = gw_fsm_time(h.f);
    h.now = 5;
    h_add(&h, "x", 1);
    assert_int_equal(gw_fsm_time(h.f), t);
    h_free(&h);
}

static void repeated_leader_changes_do_not_renew_a_lease(void **state)
{
    struct h h;
    h_init(&h);
    uint64_t id = h_grant(&h, 10000);
    uint64_t fsm_t = h.now;
    /* Ten reigns of 1 s each, with elections between: fsm time advances only during reigns. */
    for (int reign = 0; reign < 10; reign++) {
        fsm_t += 1000;
        h.now = fsm_t;
        uint64_t ids[4];
        size_t n = gw_fsm_overdue_leases(h.f, h.now, ids, 4);
        h_expire(&h, ids, n);
    }
    assert_int_equal(gw_fsm_get_lease(h.f, id, h.now, &h.res), 0);
    assert_err(&h, 404, "lease_not_found");
    struct gw_fsm_stats st;
    gw_fsm_stats(h.f, &st);
    assert_int_equal(st.leases, 0);
    h_free(&h);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(lease_grant_returns_201_with_the_log_index_as_id),
        cmocka_unit_test(lease_grant_rejects_ttl_outside_1000_to_3600000),
        cmocka_unit_test(lease_keepalive_restarts_the_ttl),
        cmocka_unit_test(lease_keepalive_of_unknown_or_overdue_lease_is_404),
        cmocka_unit_test(lease_never_expires_before_its_ttl),
        cmocka_unit_test(lease_expire_for_a_lease_kept_alive_in_between_does_nothing),
        cmocka_unit_test(lease_expire_releases_only_really_overdue_leases),
        cmocka_unit_test(lease_revoke_returns_204_and_unknown_is_404),
        cmocka_unit_test(lease_get_reports_remaining_ms_and_sorted_lock_names),
        cmocka_unit_test(fsm_time_never_goes_backwards),
        cmocka_unit_test(stamps_near_the_end_of_time_saturate_instead_of_wrapping),
        cmocka_unit_test(overdue_leases_are_sorted_and_bounded),
        cmocka_unit_test(next_deadline_is_the_earliest_expiry_or_wait_end),
        cmocka_unit_test(lease_table_full_is_503_too_many_leases),
        cmocka_unit_test(leader_change_extends_a_lease_by_at_most_the_election_gap),
        cmocka_unit_test(repeated_leader_changes_do_not_renew_a_lease),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
