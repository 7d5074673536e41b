/*
 * test_fsm_locks.c - locks in the state machine (API.md section 4): owners, leases, fencing tokens,
 * re-entrant acquire, FIFO waiters answered through wakeups, the re-check of a waiter's lease
 * before it is granted, and the release of locks when their lease expires or is revoked.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#include "fsm_harness.h"

static void lock_acquire_with_ttl_creates_a_lease_with_the_index_as_id(void **state)
{
    struct h h;
    h_init(&h);
    h.index = 9;
    uint64_t idx = h_acquire(&h, "orders.lock", "worker-1", 0, 10000, 0);
    assert_res(&h, 200,
               "{\"name\":\"orders.lock\",\"owner\":\"worker-1\",\"token\":1,\"lease_id\":\"10\","
               "\"ttl_ms\":10000}");
    assert_int_equal(gw_fsm_get_lease(h.f, idx, h.now, &h.res), 0);
    assert_res(&h, 200, "{\"id\":\"10\",\"ttl_ms\":10000,\"remaining_ms\":10000,\"locks\":[\"orders.lock\"]}");
    assert_int_equal(gw_fsm_get_lock(h.f, "orders.lock", 11, &h.res), 0);
    assert_res(&h, 200,
               "{\"name\":\"orders.lock\",\"owner\":\"worker-1\",\"token\":1,\"lease_id\":\"10\","
               "\"waiters\":0}");
    h_free(&h);
}

static void lock_acquire_validates_name_owner_wait_and_ttl(void **state)
{
    struct h h;
    h_init(&h);
    char long_name[202];
    memset(long_name, 'a', 201);
    long_name[201] = '\0';
    h_acquire(&h, long_name, "w", 0, 1000, 0);
    assert_err(&h, 400, "invalid_name");
    long_name[200] = '\0';
    h_acquire(&h, long_name, "w", 0, 1000, 0);
    assert_int_equal(h.res.status, 200);
    h_acquire(&h, "", "w", 0, 1000, 0);
    assert_err(&h, 400, "invalid_name");
    h_acquire(&h, "a/b", "w", 0, 1000, 0);
    assert_err(&h, 400, "invalid_name");
    h_acquire(&h, "ok", "", 0, 1000, 0);
    assert_err(&h, 400, "invalid_field");
    assert_contains(h.res.body, "\"field\":\"owner\"");
    h_acquire(&h, "ok", "tab\there", 0, 1000, 0);
    assert_err(&h, 400, "invalid_field");
    h_acquire(&h, "ok", "w", 0, 1000, 60001);
    assert_err(&h, 400, "invalid_field");
    assert_contains(h.res.body, "\"field\":\"wait_ms\"");
    h_acquire(&h, "ok", "w", 0, 999, 0);
    assert_err(&h, 400, "invalid_field");
    assert_contains(h.res.body, "\"field\":\"ttl_ms\"");
    h_acquire(&h, "ok", "w", 4242, 0, 0);
    assert_err(&h, 404, "lease_not_found");
    assert_true(gw_fsm_name_valid("A-z_0.9:x", 9));
    assert_false(gw_fsm_name_valid("sp ace", 6));
    h_free(&h);
}

static void lock_owner_with_quotes_is_escaped_in_json(void **state)
{
    struct h h;
    h_init(&h);
    h_acquire(&h, "q", "a\"b\\c", 0, 1000, 0);
    assert_res(&h, 200,
               "{\"name\":\"q\",\"owner\":\"a\\\"b\\\\c\",\"token\":1,\"lease_id\":\"1\",\"ttl_ms\":1000}");
    h_free(&h);
}

static void lock_held_by_another_is_409_with_holder_and_token(void **state)
{
    struct h h;
    h_init(&h);
    h_acquire(&h, "L", "w1", 0, 10000, 0);
    h_acquire(&h, "L", "w2", 0, 10000, 0);
    assert_res(&h, 409,
               "{\"error\":{\"code\":\"lock_held\",\"message\":\"the lock is held by another owner\","
               "\"holder\":\"w1\",\"token\":1}}");
    h_free(&h);
}

static void lock_reacquire_by_same_owner_and_lease_returns_the_same_token(void **state)
{
    struct h h;
    h_init(&h);
    uint64_t l1 = h_grant(&h, 10000);
    uint64_t l2 = h_grant(&h, 10000);
    h_acquire(&h, "L", "w1", l1, 0, 0);
    assert_int_equal(body_token(h.res.body), 1);
    h_acquire(&h, "L", "w1", l1, 0, 0);
    assert_int_equal(h.res.status, 200);
    assert_int_equal(body_token(h.res.body), 1);
    h_acquire(&h, "L", "w1", l2, 0, 0); /* same owner, other lease */
    assert_err(&h, 409, "lock_held");
    h_acquire(&h, "L", "w2", l1, 0, 0); /* same lease, other owner */
    assert_err(&h, 409, "lock_held");
    h_free(&h);
}

static void lock_release_wrong_token_is_409_and_free_lock_is_404(void **state)
{
    struct h h;
    h_init(&h);
    h_release(&h, "L", 1);
    assert_err(&h, 404, "lock_not_found");
    h_acquire(&h, "L", "w1", 0, 10000, 0);
    h_release(&h, "L", 2);
    assert_err(&h, 409, "lock_not_held");
    h_release(&h, "L", 1);
    assert_res(&h, 204, "");
    assert_int_equal(gw_fsm_get_lock(h.f, "L", 1, &h.res), 0);
    assert_err(&h, 404, "lock_not_found");
    h_release(&h, "bad name", 1);
    assert_err(&h, 400, "invalid_name");
    h_free(&h);
}

static void fencing_tokens_strictly_increase_across_many_holders(void **state)
{
    struct h h;
    h_init(&h);
    uint64_t last = 0;
    for (int i = 0; i < 2000; i++) {
        char owner[16];
        snprintf(owner, sizeof(owner), "w%d", i);
        uint64_t lease = h_acquire(&h, "fence", owner, 0, 1000, 0);
        assert_int_equal(h.res.status, 200);
        uint64_t tok = body_token(h.res.body);
        assert_true(tok > last);
        last = tok;
        switch (i % 3) {
        case 0: /* released */
            h_release(&h, "fence", tok);
            break;
        case 1: { /* its lease expires */
            h.now += 1000;
            uint64_t ids[4];
            size_t n = gw_fsm_overdue_leases(h.f, h.now, ids, 4);
            h_expire(&h, ids, n);
            break;
        }
        case 2: { /* revoked, after a snapshot and restore into a fresh machine */
            uint8_t *img;
            size_t len;
            assert_int_equal(gw_fsm_snapshot(h.f, &img, &len), 0);
            struct gw_fsm_config cfg;
            gw_fsm_config_default(&cfg);
            struct gw_fsm *g;
            assert_int_equal(gw_fsm_new(&cfg, &g), 0);
            assert_int_equal(gw_fsm_restore(g, img, len), 0);
            free(img);
            gw_fsm_free(h.f);
            h.f = g;
            h_revoke(&h, lease);
            assert_int_equal(h.res.status, 204);
            break;
        }
        }
        /* Other names draw from the same counter and never reuse a token either. */
        if (i % 50 == 0) {
            h_acquire(&h, "other", "x", 0, 1000, 0);
            uint64_t t2 = body_token(h.res.body);
            assert_true(t2 > last);
            last = t2;
            h_release(&h, "other", t2);
        }
    }
    h_free(&h);
}

static void waiters_are_granted_in_arrival_order(void **state)
{
    struct h h;
    h_init(&h);
    h_acquire(&h, "L", "w0", 0, 10000, 0);
    uint64_t w[4];
    for (int i = 0; i < 4; i++) {
        char owner[8];
        snprintf(owner, sizeof(owner), "w%d", i + 1);
        w[i] = h_acquire(&h, "L", owner, 0, 10000, 5000);
        assert_true(h.res.queued);
        assert_int_equal(h.res.status, 0);
        assert_int_equal(h.res.waiter_id, w[i]);
        assert_int_equal(h.res.body_len, 0);
    }
    assert_int_equal(gw_fsm_get_lock(h.f, "L", 1, &h.res), 0);
    assert_contains(h.res.body, "\"waiters\":4");
    uint64_t tok = 1;
    for (int i = 0; i < 4; i++) {
        h_release(&h, "L", tok);
        assert_int_equal(h.res.status, 204);
        assert_int_equal(h.res.n_wakeups, 1);
        const struct gw_fsm_wakeup *wk = h_wakeup(&h, w[i]);
        assert_non_null(wk);
        assert_int_equal(wk->status, 200);
        char owner[8];
        snprintf(owner, sizeof(owner), "\"w%d\"", i + 1);
        assert_contains(wk->body, owner);
        /* A waiter with ttl_ms gets a lease created at grant, id = its waiter id. */
        char lease[32];
        snprintf(lease, sizeof(lease), "\"lease_id\":\"%llu\"", (unsigned long long)w[i]);
        assert_contains(wk->body, lease);
        assert_int_equal(strlen(wk->body), wk->body_len);
        uint64_t nt = body_token(wk->body);
        assert_true(nt > tok);
        tok = nt;
    }
    h_free(&h);
}

static void waiter_is_granted_only_if_its_lease_is_still_alive(void **state)
{
    struct h h;
    h_init(&h);
    uint64_t holder = h_grant(&h, 60000);
    uint64_t short_lease = h_grant(&h, 1000);
    uint64_t long_lease = h_grant(&h, 60000);
    h_acquire(&h, "L", "holder", holder, 0, 0);
    uint64_t w1 = h_acquire(&h, "L", "short", short_lease, 0, 30000);
    assert_true(h.res.queued);
    uint64_t w2 = h_acquire(&h, "L", "long", long_lease, 0, 30000);
    assert_true(h.res.queued);
    /* The short lease is overdue, but no LEASE_EXPIRE has been committed yet. */
    h.now += 2000;
    h_release(&h, "L", 1);
    assert_int_equal(h.res.status, 204);
    assert_int_equal(h.res.n_wakeups, 2);
    const struct gw_fsm_wakeup *a = h_wakeup(&h, w1);
    assert_int_equal(a->status, 404);
    assert_contains(a->body, "\"code\":\"lease_not_found\"");
    const struct gw_fsm_wakeup *b = h_wakeup(&h, w2);
    assert_int_equal(b->status, 200);
    assert_contains(b->body, "\"owner\":\"long\"");
    /* The dead lease was expired on the spot. */
    assert_int_equal(gw_fsm_get_lease(h.f, short_lease, 0, &h.res), 0);
    assert_err(&h, 404, "lease_not_found");
    struct gw_fsm_stats st;
    gw_fsm_stats(h.f, &st);
    assert_int_equal(st.leases, 2);
    h_free(&h);
}

static void lease_expiry_releases_its_locks_and_wakes_the_next_waiter(void **state)
{
    struct h h;
    h_init(&h);
    uint64_t l = h_grant(&h, 2000);
    h_acquire(&h, "a", "w1", l, 0, 0);
    h_acquire(&h, "b", "w1", l, 0, 0);
    uint64_t wa = h_acquire(&h, "a", "w2", 0, 5000, 10000);
    uint64_t wb = h_acquire(&h, "b", "w3", 0, 5000, 10000);
    h.now += 2000;
    uint64_t ids[4];
    size_t n = gw_fsm_overdue_leases(h.f, h.now, ids, 4);
    assert_int_equal(n, 1);
    h_expire(&h, ids, n);
    assert_res(&h, 200, "{\"expired\":1}");
    assert_int_equal(h.res.n_wakeups, 2);
    /* Locks are released in the order their lease got them: a then b. */
    assert_int_equal(h.res.wakeups[0].waiter_id, wa);
    assert_int_equal(h.res.wakeups[1].waiter_id, wb);
    assert_int_equal(body_token(h.res.wakeups[0].body), 3);
    assert_int_equal(body_token(h.res.wakeups[1].body), 4);
    assert_int_equal(gw_fsm_get_lock(h.f, "a", 1, &h.res), 0);
    assert_contains(h.res.body, "\"owner\":\"w2\"");
    h_free(&h);
}

static void lease_revoke_releases_its_locks_and_drops_its_waiters(void **state)
{
    struct h h;
    h_init(&h);
    uint64_t l1 = h_grant(&h, 10000);
    uint64_t l2 = h_grant(&h, 10000);
    h_acquire(&h, "held", "w1", l1, 0, 0);
    h_acquire(&h, "other", "x", 0, 10000, 0);
    uint64_t mine = h_acquire(&h, "other", "w1", l1, 0, 10000); /* l1 also waits elsewhere */
    uint64_t next = h_acquire(&h, "held", "w2", l2, 0, 10000);
    h_revoke(&h, l1);
    assert_int_equal(h.res.status, 204);
    assert_int_equal(h.res.n_wakeups, 2);
    assert_int_equal(h_wakeup(&h, mine)->status, 404);
    assert_contains(h_wakeup(&h, mine)->body, "\"lease_id\":\"1\"");
    assert_int_equal(h_wakeup(&h, next)->status, 200);
    assert_int_equal(gw_fsm_get_lock(h.f, "other", 5, &h.res), 0);
    assert_contains(h.res.body, "\"waiters\":0");
    struct gw_fsm_stats st;
    gw_fsm_stats(h.f, &st);
    assert_int_equal(st.waiters, 0);
    assert_int_equal(st.locks, 2);
    h_free(&h);
}

static void acquire_against_an_overdue_holder_expires_it_first(void **state)
{
    struct h h;
    h_init(&h);
    h_acquire(&h, "L", "old", 0, 1000, 0);
    h.now += 1000;
    h_acquire(&h, "L", "new", 0, 1000, 0);
    assert_int_equal(h.res.status, 200);
    assert_contains(h.res.body, "\"owner\":\"new\",\"token\":2");
    /* A queued waiter keeps its place: the expiry grants it, the newcomer is told it is held. */
    h_acquire(&h, "M", "old", 0, 1000, 0);
    uint64_t w = h_acquire(&h, "M", "waiting", 0, 1000, 10000);
    h.now += 1000;
    h_acquire(&h, "M", "late", 0, 1000, 0);
    assert_err(&h, 409, "lock_held");
    assert_contains(h.res.body, "\"holder\":\"waiting\"");
    assert_int_equal(h_wakeup(&h, w)->status, 200);
    h_free(&h);
}

static void release_by_a_holder_whose_lease_is_overdue_is_404(void **state)
{
    struct h h;
    h_init(&h);
    h_acquire(&h, "L", "w", 0, 1000, 0);
    h.now += 1000;
    h_add(&h, "tick", 1); /* fsm time reaches the lease's end */
    assert_int_equal(gw_fsm_get_lock(h.f, "L", 1, &h.res), 0);
    assert_err(&h, 404, "lock_not_found");
    h.now += 500;
    h_release(&h, "L", 1);
    assert_err(&h, 404, "lock_not_found");
    h_free(&h);
}

static void cancel_wait_answers_the_waiter_with_409_lock_held(void **state)
{
    struct h h;
    h_init(&h);
    h_acquire(&h, "L", "w1", 0, 10000, 0);
    uint64_t w = h_acquire(&h, "L", "w2", 0, 10000, 3000);
    struct gw_fsm_waiter_ref refs[4];
    assert_int_equal(gw_fsm_overdue_waiters(h.f, h.now + 2999, refs, 4), 0);
    assert_int_equal(gw_fsm_overdue_waiters(h.f, h.now + 3000, refs, 4), 1);
    assert_int_equal(refs[0].waiter_id, w);
    assert_int_equal(refs[0].name_len, 1);
    assert_memory_equal(refs[0].name, "L", 1);
    h.now += 3000;
    h_cancel(&h, "L", w);
    assert_res(&h, 204, "");
    assert_int_equal(h.res.n_wakeups, 1);
    assert_int_equal(h.res.wakeups[0].waiter_id, w);
    assert_int_equal(h.res.wakeups[0].status, 409);
    assert_string_equal(h.res.wakeups[0].body,
                        "{\"error\":{\"code\":\"lock_held\",\"message\":\"the lock is held by another "
                        "owner\",\"holder\":\"w1\",\"token\":1}}");
    h_cancel(&h, "L", w);
    assert_err(&h, 404, "waiter_not_found");
    h_free(&h);
}

static void cancel_wait_after_the_waiter_was_granted_is_404(void **state)
{
    struct h h;
    h_init(&h);
    h_acquire(&h, "L", "w1", 0, 10000, 0);
    uint64_t w = h_acquire(&h, "L", "w2", 0, 10000, 3000);
    h_release(&h, "L", 1);
    assert_int_equal(h_wakeup(&h, w)->status, 200);
    h_cancel(&h, "L", w);
    assert_err(&h, 404, "waiter_not_found");
    h_free(&h);
}

static void waiters_beyond_the_bound_get_503_too_many_waiters(void **state)
{
    struct gw_fsm_config cfg;
    gw_fsm_config_default(&cfg);
    cfg.max_waiters_per_lock = 3;
    cfg.max_waiters = 4;
    struct h h;
    h_init_cfg(&h, &cfg);
    h_acquire(&h, "L", "w", 0, 10000, 0);
    for (int i = 0; i < 3; i++) {
        h_acquire(&h, "L", "x", 0, 10000, 1000);
        assert_true(h.res.queued);
    }
    h_acquire(&h, "L", "x", 0, 10000, 1000);
    assert_err(&h, 503, "too_many_waiters");
    h_acquire(&h, "M", "w", 0, 10000, 0);
    h_acquire(&h, "M", "x", 0, 10000, 1000);
    assert_true(h.res.queued);
    h_acquire(&h, "M", "x", 0, 10000, 1000); /* the total bound */
    assert_err(&h, 503, "too_many_waiters");
    h_free(&h);
}

static void lock_table_full_is_503_too_many_locks(void **state)
{
    struct gw_fsm_config cfg;
    gw_fsm_config_default(&cfg);
    cfg.max_locks = 2;
    struct h h;
    h_init_cfg(&h, &cfg);
    h_acquire(&h, "a", "w", 0, 10000, 0);
    h_acquire(&h, "b", "w", 0, 10000, 0);
    h_acquire(&h, "c", "w", 0, 10000, 0);
    assert_err(&h, 503, "too_many_locks");
    struct gw_fsm_stats st;
    gw_fsm_stats(h.f, &st);
    assert_int_equal(st.leases, 2); /* no lease left behind */
    h_free(&h);
}

static void a_chain_of_dead_waiters_is_drained_without_recursion(void **state)
{
    struct h h;
    h_init(&h);
    /* 500 locks; lock i is held by lease i and waited on by lease i+1, all overdue together. */
    enum { N = 500 };
    uint64_t leases[N];
    for (int i = 0; i < N; i++)
        leases[i] = h_grant(&h, 1000);
    char name[16];
    for (int i = 0; i < N; i++) {
        snprintf(name, sizeof(name), "c%d", i);
        h_acquire(&h, name, "o", leases[i], 0, 0);
    }
    for (int i = 0; i + 1 < N; i++) {
        snprintf(name, sizeof(name), "c%d", i);
        h_acquire(&h, name, "o2", leases[i + 1], 0, 60000);
        assert_true(h.res.queued);
    }
    h.now += 1000;
    h_revoke(&h, leases[0]); /* overdue: 404, and the whole chain falls in this one apply */
    assert_err(&h, 404, "lease_not_found");
    assert_int_equal(h.res.n_wakeups, N - 1); /* every waiter told its lease is gone */
    for (size_t i = 0; i < h.res.n_wakeups; i++)
        assert_int_equal(h.res.wakeups[i].status, 404);
    struct gw_fsm_stats st;
    gw_fsm_stats(h.f, &st);
    assert_int_equal(st.leases, 0);
    assert_int_equal(st.locks, 0);
    assert_int_equal(st.waiters, 0);
    h_free(&h);
}

static void releasing_one_of_several_locks_of_a_lease_keeps_the_others(void **state)
{
    struct h h;
    h_init(&h);
    uint64_t l = h_grant(&h, 10000);
    uint64_t o = h_grant(&h, 10000);
    h_acquire(&h, "a", "w", l, 0, 0);
    h_acquire(&h, "b", "w", l, 0, 0);
    h_acquire(&h, "c", "w", l, 0, 0);
    h_release(&h, "b", 2);
    assert_int_equal(gw_fsm_get_lease(h.f, l, h.now, &h.res), 0);
    assert_contains(h.res.body, "\"locks\":[\"a\",\"c\"]");
    /* The same lease waits on three locks; the middle wait ends first. */
    h_acquire(&h, "x", "o", o, 0, 0);
    h_acquire(&h, "y", "o", o, 0, 0);
    h_acquire(&h, "z", "o", o, 0, 0);
    uint64_t wx = h_acquire(&h, "x", "w", l, 0, 5000);
    uint64_t wy = h_acquire(&h, "y", "w", l, 0, 5000);
    uint64_t wz = h_acquire(&h, "z", "w", l, 0, 5000);
    h_cancel(&h, "y", wy);
    assert_int_equal(h_wakeup(&h, wy)->status, 409);
    h_release(&h, "z", 6);
    assert_int_equal(h_wakeup(&h, wz)->status, 200);
    h_revoke(&h, l); /* drops the wait on x, releases a, c and z */
    assert_int_equal(h.res.n_wakeups, 1);
    assert_int_equal(h_wakeup(&h, wx)->status, 404);
    struct gw_fsm_stats st;
    gw_fsm_stats(h.f, &st);
    assert_int_equal(st.locks, 2);
    assert_int_equal(st.waiters, 0);
    h_free(&h);
}

static void waiter_whose_lease_cannot_be_created_gets_503(void **state)
{
    struct gw_fsm_config cfg;
    gw_fsm_config_default(&cfg);
    cfg.max_leases = 2;
    struct h h;
    h_init_cfg(&h, &cfg);
    h_acquire(&h, "L", "w1", 0, 10000, 0);
    uint64_t w = h_acquire(&h, "L", "w2", 0, 10000, 5000);
    uint64_t w2 = h_acquire(&h, "L", "w3", 0, 10000, 5000);
    h_grant(&h, 10000); /* the table is now full */
    h_revoke(&h, 1);    /* frees one slot: the first waiter's lease takes it */
    assert_int_equal(h_wakeup(&h, w)->status, 200);
    h_release(&h, "L", 2);
    assert_int_equal(h_wakeup(&h, w2)->status, 503);
    assert_contains(h_wakeup(&h, w2)->body, "\"code\":\"too_many_leases\"");
    h_free(&h);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(lock_acquire_with_ttl_creates_a_lease_with_the_index_as_id),
        cmocka_unit_test(lock_acquire_validates_name_owner_wait_and_ttl),
        cmocka_unit_test(lock_owner_with_quotes_is_escaped_in_json),
        cmocka_unit_test(lock_held_by_another_is_409_with_holder_and_token),
        cmocka_unit_test(lock_reacquire_by_same_owner_and_lease_returns_the_same_token),
        cmocka_unit_test(lock_release_wrong_token_is_409_and_free_lock_is_404),
        cmocka_unit_test(fencing_tokens_strictly_increase_across_many_holders),
        cmocka_unit_test(waiters_are_granted_in_arrival_order),
        cmocka_unit_test(waiter_is_granted_only_if_its_lease_is_still_alive),
        cmocka_unit_test(lease_expiry_releases_its_locks_and_wakes_the_next_waiter),
        cmocka_unit_test(lease_revoke_releases_its_locks_and_drops_its_waiters),
        cmocka_unit_test(acquire_against_an_overdue_holder_expires_it_first),
        cmocka_unit_test(release_by_a_holder_whose_lease_is_overdue_is_404),
        cmocka_unit_test(cancel_wait_answers_the_waiter_with_409_lock_held),
        cmocka_unit_test(cancel_wait_after_the_waiter_was_granted_is_404),
        cmocka_unit_test(waiters_beyond_the_bound_get_503_too_many_waiters),
        cmocka_unit_test(lock_table_full_is_503_too_many_locks),
        cmocka_unit_test(a_chain_of_dead_waiters_is_drained_without_recursion),
        cmocka_unit_test(releasing_one_of_several_locks_of_a_lease_keeps_the_others),
        cmocka_unit_test(waiter_whose_lease_cannot_be_created_gets_503),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
