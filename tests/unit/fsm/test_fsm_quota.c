/*
 * test_fsm_quota.c - the quota leasing commands and the gateway's idempotency records.
 *
 * The central check is a property test: random sequences of grants, local spending, releases
 * and time steps by three nodes, with every spend recorded, and the spends then checked against
 * a brute-force model of the limit (a token bucket's conformance over every interval, a sliding
 * window's count over every trailing window). Also: exact results, bounds, determinism and
 * snapshot round trips of the new state, and the version 1 image still restoring.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "fsm_harness.h"

static uint64_t json_u64(const char *body, const char *key)
{
    char pat[64];
    snprintf(pat, sizeof(pat), "\"%s\":", key);
    const char *p = strstr(body, pat);
    assert_non_null(p);
    p += strlen(pat);
    if (*p == '"')
        p++;
    return strtoull(p, NULL, 10);
}

static uint64_t q_acquire(struct h *h, const char *id, const char *node, uint8_t kind, uint64_t a,
                          uint64_t b, uint64_t n, uint64_t lease_ms)
{
    struct gw_fsm_cmd c = {.kind = GW_FSM_QUOTA_ACQUIRE, .name = id, .name_len = strlen(id),
                           .owner = node, .owner_len = strlen(node), .quota_kind = kind,
                           .quota_a = a, .quota_b = b, .count = n, .ttl_ms = lease_ms};
    return h_apply(h, &c);
}

static void q_release(struct h *h, const char *id, const char *node, uint64_t grant, uint64_t n)
{
    struct gw_fsm_cmd c = {.kind = GW_FSM_QUOTA_RELEASE, .name = id, .name_len = strlen(id),
                           .owner = node, .owner_len = strlen(node), .grant_id = grant, .count = n};
    h_apply(h, &c);
}

static void token_bucket_grants_from_the_budget_and_takes_back_releases(void **state)
{
    (void)state;
    struct h h;
    h_init(&h);
    uint64_t g1 = q_acquire(&h, "r/tb/k", "n1", GW_FSM_QUOTA_TOKEN_BUCKET, 10, 5, 6, 1000);
    assert_int_equal(h.res.status, 200);
    assert_int_equal(json_u64(h.res.body, "granted"), 6);
    assert_int_equal(json_u64(h.res.body, "grant"), g1);
    assert_int_equal(json_u64(h.res.body, "remaining"), 10); /* 4 unallotted + 6 held */
    q_acquire(&h, "r/tb/k", "n2", GW_FSM_QUOTA_TOKEN_BUCKET, 10, 5, 6, 1000);
    assert_int_equal(json_u64(h.res.body, "granted"), 4);
    q_acquire(&h, "r/tb/k", "n3", GW_FSM_QUOTA_TOKEN_BUCKET, 10, 5, 6, 1000);
    assert_int_equal(json_u64(h.res.body, "granted"), 0);
    assert_true(json_u64(h.res.body, "next_ms") > 0);
    /* While grants are out the bucket cannot refill past capacity - outstanding. */
    h.now += 500;
    q_acquire(&h, "r/tb/k", "n3", GW_FSM_QUOTA_TOKEN_BUCKET, 10, 5, 6, 1000);
    assert_int_equal(json_u64(h.res.body, "granted"), 0);
    /* A release by another node than the holder changes nothing. */
    q_release(&h, "r/tb/k", "n2", g1, 3);
    assert_int_equal(json_u64(h.res.body, "released"), 0);
    q_release(&h, "r/tb/k", "n1", g1, 3);
    assert_int_equal(json_u64(h.res.body, "released"), 3);
    q_acquire(&h, "r/tb/k", "n3", GW_FSM_QUOTA_TOKEN_BUCKET, 10, 5, 6, 1000);
    assert_int_equal(json_u64(h.res.body, "granted"), 3);
    /* After every lease ended the budget refills from the deadlines on. */
    h.now += 10000;
    q_acquire(&h, "r/tb/k", "n3", GW_FSM_QUOTA_TOKEN_BUCKET, 10, 5, 20, 1000);
    assert_int_equal(json_u64(h.res.body, "granted"), 10);
    h_free(&h);
}

static void sliding_window_slots_occupy_their_lease_plus_the_window(void **state)
{
    (void)state;
    struct h h;
    h_init(&h);
    /* limit 10 per 1000 ms, leases of 200 ms */
    uint64_t g = q_acquire(&h, "w", "n1", GW_FSM_QUOTA_SLIDING_WINDOW, 10, 1000, 7, 200);
    assert_int_equal(json_u64(h.res.body, "granted"), 7);
    q_acquire(&h, "w", "n2", GW_FSM_QUOTA_SLIDING_WINDOW, 10, 1000, 7, 200);
    assert_int_equal(json_u64(h.res.body, "granted"), 3);
    h.now += 1199; /* deadline + window not yet passed */
    q_acquire(&h, "w", "n2", GW_FSM_QUOTA_SLIDING_WINDOW, 10, 1000, 7, 200);
    assert_int_equal(json_u64(h.res.body, "granted"), 0);
    assert_int_equal(json_u64(h.res.body, "next_ms"), 1);
    h.now += 1;
    q_acquire(&h, "w", "n2", GW_FSM_QUOTA_SLIDING_WINDOW, 10, 1000, 7, 200);
    assert_int_equal(json_u64(h.res.body, "granted"), 7);
    /* a release of a grant that ended is refused: its slots may have been spent */
    q_release(&h, "w", "n1", g, 7);
    assert_int_equal(json_u64(h.res.body, "released"), 0);
    h_free(&h);
}

/* Ended grants of a long window are kept compactly: they never use up the live grant bound. */
static void long_window_keeps_granting_past_the_live_grant_bound(void **state)
{
    (void)state;
    struct h h;
    h_init(&h);
    for (int i = 0; i < 1000; i++) {
        q_acquire(&h, "long", "n1", GW_FSM_QUOTA_SLIDING_WINDOW, 100000, 60000, 1, 100);
        assert_int_equal(json_u64(h.res.body, "granted"), 1);
        h.now += 150;
    }
    /* the last 60.1 s of grants (about 400 slots) still occupy the window */
    uint64_t rem = json_u64(h.res.body, "remaining");
    assert_true(rem >= 100000 - 402 && rem <= 100000 - 398);
    /* a full window later every slot is free again */
    h.now += 60000 + 600;
    q_acquire(&h, "long", "n1", GW_FSM_QUOTA_SLIDING_WINDOW, 100000, 60000, 100000, 100);
    assert_int_equal(json_u64(h.res.body, "granted"), 100000);
    uint8_t *img;
    size_t len;
    assert_int_equal(gw_fsm_snapshot(h.f, &img, &len), 0);
    assert_int_equal(gw_fsm_restore(h.f, img, len), 0);
    free(img);
    h_free(&h);
}

static void bad_fields_are_400_and_the_table_bound_is_503(void **state)
{
    (void)state;
    struct h h;
    struct gw_fsm_config cfg;
    gw_fsm_config_default(&cfg);
    cfg.max_quotas = 2;
    h_init_cfg(&h, &cfg);
    q_acquire(&h, "x", "n1", 7, 10, 5, 1, 100);
    assert_int_equal(h.res.status, 400);
    q_acquire(&h, "x", "n1", GW_FSM_QUOTA_TOKEN_BUCKET, 0, 5, 1, 100);
    assert_int_equal(h.res.status, 400);
    q_acquire(&h, "x", "n1", GW_FSM_QUOTA_TOKEN_BUCKET, 10, 5, 0, 100);
    assert_int_equal(h.res.status, 400);
    q_acquire(&h, "x", "n1", GW_FSM_QUOTA_TOKEN_BUCKET, 10, 5, 1, 60001);
    assert_int_equal(h.res.status, 400);
    q_acquire(&h, "x\001", "n1", GW_FSM_QUOTA_TOKEN_BUCKET, 10, 5, 1, 100);
    assert_int_equal(h.res.status, 400);
    q_acquire(&h, "a", "n1", GW_FSM_QUOTA_TOKEN_BUCKET, 10, 5, 1, 100);
    q_acquire(&h, "b", "n1", GW_FSM_QUOTA_TOKEN_BUCKET, 10, 5, 1, 100);
    q_acquire(&h, "c", "n1", GW_FSM_QUOTA_TOKEN_BUCKET, 10, 5, 1, 100);
    assert_int_equal(h.res.status, 503);
    assert_string_equal(h.res.code, "too_many_quotas");
    /* Once their grants ended and the buckets are full again they are forgotten. */
    h.now += 5000;
    q_acquire(&h, "c", "n1", GW_FSM_QUOTA_TOKEN_BUCKET, 10, 5, 1, 100);
    assert_int_equal(h.res.status, 200);
    struct gw_fsm_stats st;
    gw_fsm_stats(h.f, &st);
    assert_int_equal(st.quotas, 1);
    h_free(&h);
}

/* ---- The property test against a brute-force model -------------------------------------- */

struct held {
    uint64_t grant, left, deadline;
};

struct node_state {
    struct held g[64];
    int n;
};

static uint64_t rnd(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

static void check_tb(const uint64_t *spend, size_t n, uint64_t cap, uint64_t rate)
{
    /* spends are in time order; every interval [spend[i], spend[j]] */
    for (size_t i = 0; i < n; i++)
        for (size_t j = i; j < n; j++) {
            uint64_t cnt = j - i + 1;
            uint64_t allowed_milli = cap * 1000 + rate * (spend[j] - spend[i]);
            if (cnt * 1000 > allowed_milli)
                fail_msg("token bucket exceeded: %zu spends in [%llu, %llu]", (size_t)cnt,
                         (unsigned long long)spend[i], (unsigned long long)spend[j]);
        }
}

static void check_sw(const uint64_t *spend, size_t n, uint64_t limit, uint64_t window)
{
    for (size_t j = 0; j < n; j++) {
        uint64_t cnt = 0;
        for (size_t i = 0; i <= j; i++)
            if (spend[i] + window > spend[j])
                cnt++;
        if (cnt > limit)
            fail_msg("sliding window exceeded at %llu: %llu", (unsigned long long)spend[j],
                     (unsigned long long)cnt);
    }
}

static void random_grant_spend_release_never_exceeds_the_limit(void **state)
{
    (void)state;
    static const char *const nodes[3] = {"n1", "n2", "n3"};
    for (uint64_t seed = 1; seed <= 60; seed++) {
        uint64_t s = seed * 0x9e3779b97f4a7c15ull;
        uint8_t kind = seed % 2 ? GW_FSM_QUOTA_TOKEN_BUCKET : GW_FSM_QUOTA_SLIDING_WINDOW;
        uint64_t a = 3 + rnd(&s) % 20;
        uint64_t b = kind == GW_FSM_QUOTA_TOKEN_BUCKET ? 1 + rnd(&s) % 50 : 100 + rnd(&s) % 2000;
        struct h h;
        h_init(&h);
        struct node_state ns[3];
        memset(ns, 0, sizeof(ns));
        static uint64_t spend[20000];
        size_t n_spend = 0;
        uint64_t granted_total = 0;
        for (int step = 0; step < 1500; step++) {
            uint64_t r = rnd(&s) % 100;
            int k = (int)(rnd(&s) % 3);
            struct node_state *nd = &ns[k];
            if (r < 30) {
                h.now += rnd(&s) % (kind == GW_FSM_QUOTA_TOKEN_BUCKET ? 200 : 400);
            } else if (r < 55) {
                uint64_t lease = 1 + rnd(&s) % 500;
                uint64_t want = 1 + rnd(&s) % 8;
                uint64_t idx = q_acquire(&h, "L", nodes[k], kind, a, b, want, lease);
                assert_int_equal(h.res.status, 200);
                uint64_t g = json_u64(h.res.body, "granted");
                assert_true(g <= want);
                granted_total += g;
                if (g > 0 && nd->n < 64) {
                    /* The node's deadline: from when it sent the request (<= the stamp). */
                    nd->g[nd->n++] = (struct held){idx, g, h.now + lease};
                } else if (g > 0) {
                    q_release(&h, "L", nodes[k], idx, g);
                }
            } else if (r < 90) {
                /* spend some held units now, only from grants whose lease lasts */
                uint64_t want = 1 + rnd(&s) % 4;
                for (int i = 0; i < nd->n && want > 0; i++) {
                    struct held *x = &nd->g[i];
                    while (x->left > 0 && x->deadline > h.now && want > 0 && n_spend < 20000) {
                        x->left--;
                        want--;
                        spend[n_spend++] = h.now;
                    }
                }
            } else {
                /* give back the unspent part of one grant (removed locally first) */
                if (nd->n > 0) {
                    int i = (int)(rnd(&s) % (uint64_t)nd->n);
                    struct held x = nd->g[i];
                    nd->g[i] = nd->g[--nd->n];
                    if (x.left > 0 && x.deadline > h.now)
                        q_release(&h, "L", nodes[k], x.grant, x.left);
                }
            }
            /* drop what ended locally */
            for (int i = 0; i < nd->n;)
                if (nd->g[i].deadline <= h.now || nd->g[i].left == 0)
                    nd->g[i] = nd->g[--nd->n];
                else
                    i++;
        }
        assert_true(granted_total > 0);
        if (kind == GW_FSM_QUOTA_TOKEN_BUCKET)
            check_tb(spend, n_spend, a, b);
        else
            check_sw(spend, n_spend, a, b);
        h_free(&h);
    }
}

/* ---- Gateway idempotency -------------------------------------------------------------------- */

static uint64_t i_begin(struct h *h, const char *route, const char *key, uint64_t fp, const char *node,
                        uint64_t ttl)
{
    struct gw_fsm_cmd c = {.kind = GW_FSM_IDEM_BEGIN, .name = route, .name_len = strlen(route),
                           .key = key, .key_len = strlen(key), .fp_hi = fp, .fp_lo = ~fp,
                           .owner = node, .owner_len = strlen(node), .ttl_ms = ttl};
    return h_apply(h, &c);
}

static void i_finish(struct h *h, const char *route, const char *key, uint64_t claim, bool store,
                     const char *hdrs, const char *body, uint64_t ttl)
{
    struct gw_fsm_cmd c = {.kind = GW_FSM_IDEM_FINISH, .name = route, .name_len = strlen(route),
                           .key = key, .key_len = strlen(key), .claim_id = claim, .store = store,
                           .status = 201, .headers = hdrs, .headers_len = strlen(hdrs),
                           .body = body, .body_len = strlen(body), .ttl_ms = ttl};
    h_apply(h, &c);
}

static void idempotency_claim_in_flight_mismatch_replay_and_expiry(void **state)
{
    (void)state;
    struct h h;
    h_init(&h);
    uint64_t claim = i_begin(&h, "orders", "k1", 5, "n1", 60000);
    assert_res(&h, 200, "{\"decision\":\"execute\",\"claim\":\"1\"}");
    assert_int_equal(claim, 1);
    i_begin(&h, "orders", "k1", 5, "n2", 60000);
    assert_res(&h, 200, "{\"decision\":\"in_flight\"}");
    i_begin(&h, "orders", "k1", 6, "n2", 60000);
    assert_res(&h, 200, "{\"decision\":\"mismatch\"}");
    i_begin(&h, "other", "k1", 6, "n2", 60000); /* another route: another record */
    assert_res(&h, 200, "{\"decision\":\"execute\",\"claim\":\"4\"}");
    i_finish(&h, "orders", "k1", 99, true, "a", "b", 60000);
    assert_res(&h, 200, "{\"result\":\"stale\"}");
    i_finish(&h, "orders", "k1", claim, true, "X-A: 1\r\n", "hello", 60000);
    assert_res(&h, 200, "{\"result\":\"stored\"}");
    i_begin(&h, "orders", "k1", 5, "n3", 60000);
    assert_res(&h, 200, "{\"decision\":\"replay\",\"status\":201,\"headers\":\"WC1BOiAxDQo=\",\"body\":\"aGVsbG8=\"}");
    i_finish(&h, "orders", "k1", claim, true, "a", "b", 60000);
    assert_res(&h, 200, "{\"result\":\"stale\"}");
    h.now += 60000;
    i_begin(&h, "orders", "k1", 6, "n3", 60000);
    assert_int_equal(json_u64(h.res.body, "claim"), h.index);
    /* released: the key is free again */
    i_finish(&h, "orders", "k1", h.index, false, "", "", 60000);
    assert_res(&h, 200, "{\"result\":\"released\"}");
    i_begin(&h, "orders", "k1", 6, "n3", 60000);
    assert_int_equal(json_u64(h.res.body, "claim"), h.index);
    /* a claim whose node died: held for max(ttl, 10 min), then free */
    h.now += GW_FSM_GWIDEM_SAFETY_MS - 1;
    i_begin(&h, "orders", "k1", 6, "n1", 60000);
    assert_res(&h, 200, "{\"decision\":\"in_flight\"}");
    h.now += 1;
    i_begin(&h, "orders", "k1", 6, "n1", 60000);
    assert_int_equal(json_u64(h.res.body, "claim"), h.index);
    /* invalid fields */
    i_begin(&h, "orders", "", 6, "n1", 60000);
    assert_int_equal(h.res.status, 400);
    i_begin(&h, "orders", "k", 6, "n1", 0);
    assert_int_equal(h.res.status, 400);
    h_free(&h);
}

static void idempotency_bounds_refuse_claims_and_large_responses(void **state)
{
    (void)state;
    struct h h;
    struct gw_fsm_config cfg;
    gw_fsm_config_default(&cfg);
    cfg.max_gwidem_records = 2;
    cfg.max_gwidem_response = 8;
    h_init_cfg(&h, &cfg);
    uint64_t c1 = i_begin(&h, "r", "a", 1, "n1", 1000);
    i_begin(&h, "r", "b", 1, "n1", 1000);
    i_begin(&h, "r", "c", 1, "n1", 1000);
    assert_int_equal(h.res.status, 503);
    assert_string_equal(h.res.code, "too_many_records");
    i_finish(&h, "r", "a", c1, true, "hdr", "0123456789", 1000);
    assert_res(&h, 200, "{\"result\":\"too_large\"}");
    i_begin(&h, "r", "c", 1, "n1", 1000);
    assert_int_equal(h.res.status, 200);
    /* the sweep reclaims records nobody asks about again */
    h.now += GW_FSM_GWIDEM_SAFETY_MS;
    for (int i = 0; i < 4; i++)
        i_begin(&h, "r", "z", 1, "n1", 1000);
    struct gw_fsm_stats st;
    gw_fsm_stats(h.f, &st);
    assert_int_equal(st.gwidem_records, 1);
    h_free(&h);
}

static void new_state_survives_snapshots_and_version_1_images_restore(void **state)
{
    (void)state;
    struct h h;
    h_init(&h);
    q_acquire(&h, "tb", "n1", GW_FSM_QUOTA_TOKEN_BUCKET, 10, 5, 4, 1000);
    q_acquire(&h, "sw", "n2", GW_FSM_QUOTA_SLIDING_WINDOW, 10, 1000, 4, 1000);
    uint64_t c = i_begin(&h, "r", "k", 1, "n1", 1000);
    i_finish(&h, "r", "k", c, true, "h", "body", 5000);
    i_begin(&h, "r", "k2", 1, "n1", 1000);
    uint8_t *img;
    size_t len;
    assert_int_equal(gw_fsm_snapshot(h.f, &img, &len), 0);
    struct gw_fsm_config cfg;
    gw_fsm_config_default(&cfg);
    cfg.hash_k0 = 99;
    struct gw_fsm *g;
    assert_int_equal(gw_fsm_new(&cfg, &g), 0);
    assert_int_equal(gw_fsm_restore(g, img, len), 0);
    uint8_t *img2;
    size_t len2;
    assert_int_equal(gw_fsm_snapshot(g, &img2, &len2), 0);
    assert_int_equal(len, len2);
    assert_memory_equal(img, img2, len);
    /* every truncation or single-byte change with a fixed CRC is refused or sound */
    for (size_t cut = 0; cut < len; cut += 7)
        assert_int_not_equal(gw_fsm_restore(g, img, cut), 0);
    free(img2);
    /* A version 1 image: the same layout without the two sections. */
    struct h e;
    h_init(&e);
    h_add(&e, "x", 3);
    uint8_t *v2;
    size_t v2len;
    assert_int_equal(gw_fsm_snapshot(e.f, &v2, &v2len), 0);
    /* strip quota_sweep_at (8), quota count (4), record count (4) before the CRC */
    size_t v1len = v2len - 16;
    uint8_t *v1 = malloc(v1len);
    memcpy(v1, v2, v1len - 4);
    v1[4] = 1;
    uint32_t crc = 0xffffffffu;
    for (size_t i = 0; i < v1len - 4; i++) {
        crc ^= v1[i];
        for (int k = 0; k < 8; k++)
            crc = (crc >> 1) ^ (0xedb88320u & (0u - (crc & 1)));
    }
    crc = ~crc;
    for (int i = 0; i < 4; i++)
        v1[v1len - 4 + (size_t)i] = (uint8_t)(crc >> (8 * i));
    assert_int_equal(gw_fsm_restore(g, v1, v1len), 0);
    struct gw_fsm_stats st;
    gw_fsm_stats(g, &st);
    assert_int_equal(st.counters, 1);
    assert_int_equal(st.quotas, 0);
    assert_int_equal(st.gwidem_records, 0);
    free(v1);
    free(v2);
    free(img);
    gw_fsm_free(g);
    h_free(&e);
    h_free(&h);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(token_bucket_grants_from_the_budget_and_takes_back_releases),
        cmocka_unit_test(sliding_window_slots_occupy_their_lease_plus_the_window),
        cmocka_unit_test(long_window_keeps_granting_past_the_live_grant_bound),
        cmocka_unit_test(bad_fields_are_400_and_the_table_bound_is_503),
        cmocka_unit_test(random_grant_spend_release_never_exceeds_the_limit),
        cmocka_unit_test(idempotency_claim_in_flight_mismatch_replay_and_expiry),
        cmocka_unit_test(idempotency_bounds_refuse_claims_and_large_responses),
        cmocka_unit_test(new_state_survives_snapshots_and_version_1_images_restore),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
