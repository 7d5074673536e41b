/*
 * test_fsm_snapshot.c - snapshots and determinism under random command sequences.
 *
 * A seeded generator plays a leader: it stamps commands with a clock that mostly moves forward
 * (and sometimes goes back, as a new leader's might), grants and revokes leases, takes and
 * releases locks with waiters, adds and sets counters, puts routes, reuses idempotency keys, and
 * proposes LEASE_EXPIRE and LOCK_CANCEL_WAIT from the reference machine's overdue lists, as the
 * node's loops would. Checked: two machines with different hash keys give the same results and
 * snapshot bytes; along the way, every new holder's fencing token is above all earlier ones, every
 * grant's lease is alive, and every parked request gets exactly one answer; a machine restored from a snapshot continues exactly like the original; a
 * snapshot of a restored machine is the same image; a damaged image is refused and changes
 * nothing.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#include "fsm_harness.h"

struct gen {
    uint64_t s;
    uint64_t now;
    uint64_t index;
};

static uint64_t rnd(struct gen *g)
{
    uint64_t z = (g->s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static const char *const names[] = {"a", "b", "c.d", "e:f", "g-h", "i_j"};
static const char *const owners[] = {"w1", "w2", "w3", "w\"4"};
static const char *const keys[] = {"k1", "k2", "k3", "k4", "k5"};

#define PICK(g, arr) (arr[rnd(g) % (sizeof(arr) / sizeof(arr[0]))])

/* The next command, made against the reference machine f (the "leader"). */
static size_t gen_cmd(struct gen *g, const struct gw_fsm *f, uint8_t *buf, size_t cap)
{
    uint64_t r = rnd(g) % 100;
    if (r < 70)
        g->now += rnd(g) % 700;
    else if (r < 73)
        g->now -= rnd(g) % 2000; /* an older stamp */
    uint64_t ids[16];
    struct gw_fsm_waiter_ref refs[4];
    struct gw_fsm_stats st;
    gw_fsm_stats(f, &st);
    uint64_t recent = g->index > 40 ? g->index - 40 + rnd(g) % 41 : 1 + rnd(g) % (g->index + 1);
    struct gw_fsm_cmd c = {.now_ms = g->now};
    switch (rnd(g) % 20) {
    case 0:
        c.kind = GW_FSM_LEASE_GRANT;
        c.ttl_ms = rnd(g) % 20 == 0 ? 500 : 1000 + rnd(g) % 4000;
        break;
    case 1:
        c.kind = GW_FSM_LEASE_KEEPALIVE;
        c.lease_id = recent;
        break;
    case 2:
        c.kind = GW_FSM_LEASE_REVOKE;
        c.lease_id = recent;
        break;
    case 3:
        c.kind = GW_FSM_LEASE_EXPIRE;
        c.n_ids = gw_fsm_overdue_leases(f, g->now + rnd(g) % 300, ids, 15);
        if (rnd(g) % 4 == 0)
            ids[c.n_ids++] = recent; /* maybe alive: must be left alone */
        c.ids = ids;
        break;
    case 4:
    case 5:
    case 6:
    case 7:
        c.kind = GW_FSM_LOCK_ACQUIRE;
        c.name = PICK(g, names);
        c.owner = PICK(g, owners);
        if (rnd(g) % 2)
            c.lease_id = recent;
        else
            c.ttl_ms = 1000 + rnd(g) % 3000;
        c.wait_ms = rnd(g) % 3 == 0 ? 0 : rnd(g) % 4000;
        break;
    case 8:
    case 9:
        c.kind = GW_FSM_LOCK_RELEASE;
        c.name = PICK(g, names);
        c.token = st.last_token > 3 ? st.last_token - rnd(g) % 4 : rnd(g) % 4;
        break;
    case 10: {
        c.kind = GW_FSM_LOCK_CANCEL_WAIT;
        size_t n = gw_fsm_overdue_waiters(f, g->now, refs, 4);
        if (n > 0) {
            size_t k = (size_t)(rnd(g) % n);
            c.name = refs[k].name;
            c.name_len = refs[k].name_len;
            c.waiter_id = refs[k].waiter_id;
        } else {
            c.name = PICK(g, names);
            c.waiter_id = recent;
        }
        break;
    }
    case 11:
    case 12:
        c.kind = GW_FSM_COUNTER_ADD;
        c.name = PICK(g, names);
        c.delta = rnd(g) % 50 == 0 ? INT64_MAX : (int64_t)(rnd(g) % 21) - 10;
        break;
    case 13:
        c.kind = GW_FSM_COUNTER_SET;
        c.name = PICK(g, names);
        c.value = (int64_t)(rnd(g) % 5);
        c.has_expect = rnd(g) % 2;
        c.expect = (int64_t)(rnd(g) % 5);
        break;
    case 14:
        c.kind = GW_FSM_ROUTE_PUT;
        c.name = PICK(g, names);
        c.json = rnd(g) % 2 ? "{\"x\":1}" : "{\"y\":[1,2]}";
        break;
    case 15:
        c.kind = GW_FSM_ROUTE_DELETE;
        c.name = PICK(g, names);
        break;
    case 16:
        c.kind = GW_FSM_QUOTA_ACQUIRE;
        c.name = PICK(g, names);
        c.owner = PICK(g, owners);
        c.quota_kind = (uint8_t)(c.name[0] == 'a' || c.name[0] == 'c' ? GW_FSM_QUOTA_SLIDING_WINDOW
                                                                      : GW_FSM_QUOTA_TOKEN_BUCKET);
        c.quota_a = 5 + rnd(g) % 3;
        c.quota_b = c.quota_kind == GW_FSM_QUOTA_TOKEN_BUCKET ? 3 : 1000 + rnd(g) % 2 * 500;
        c.count = 1 + rnd(g) % 4;
        c.ttl_ms = rnd(g) % 30 == 0 ? 0 : 100 + rnd(g) % 900;
        break;
    case 17:
        c.kind = GW_FSM_QUOTA_RELEASE;
        c.name = PICK(g, names);
        c.owner = PICK(g, owners);
        c.grant_id = recent;
        c.count = 1 + rnd(g) % 3;
        break;
    case 18:
        c.kind = GW_FSM_IDEM_BEGIN;
        c.name = PICK(g, names);
        c.key = PICK(g, keys);
        c.key_len = strlen(c.key);
        c.owner = PICK(g, owners);
        c.fp_hi = rnd(g) % 2;
        c.fp_lo = 7;
        c.ttl_ms = rnd(g) % 2 ? 2000 : 900000;
        break;
    default:
        c.kind = GW_FSM_IDEM_FINISH;
        c.name = PICK(g, names);
        c.key = PICK(g, keys);
        c.key_len = strlen(c.key);
        c.claim_id = recent;
        c.store = rnd(g) % 3 != 0;
        c.status = 200;
        c.headers = "h: 1";
        c.headers_len = 4;
        c.body = rnd(g) % 2 ? "ok" : "";
        c.body_len = strlen(c.body);
        c.ttl_ms = 1000 + rnd(g) % 3000;
        break;
    }
    if (c.name != NULL && c.name_len == 0)
        c.name_len = strlen(c.name);
    if (c.owner != NULL)
        c.owner_len = strlen(c.owner);
    if (c.json != NULL)
        c.json_len = strlen(c.json);
    if (rnd(g) % 4 == 0 && c.kind < GW_FSM_QUOTA_FIRST) {
        c.idem_key = PICK(g, keys);
        c.idem_key_len = strlen(c.idem_key);
    }
    size_t len;
    assert_int_equal(gw_fsm_cmd_encode(&c, buf, cap, &len), 0);
    if (rnd(g) % 200 == 0)
        buf[1] = 51; /* now and then an entry this version cannot apply */
    g->index += 1 + (rnd(g) % 10 == 0); /* sometimes an entry without a command in between */
    return len;
}

static struct gw_fsm *make(uint64_t k0)
{
    struct gw_fsm_config cfg;
    gw_fsm_config_default(&cfg);
    cfg.hash_k0 = k0;
    cfg.hash_k1 = k0 * 31 + 7;
    cfg.max_waiters_per_lock = 3; /* reach the bounds too */
    cfg.max_idem_records = 4;
    cfg.idem_ttl_ms = 20000;
    cfg.max_quotas = 3;         /* sweeps of idle limiters and 503s too */
    cfg.max_gwidem_records = 4; /* and full gateway record stores */
    struct gw_fsm *f;
    assert_int_equal(gw_fsm_new(&cfg, &f), 0);
    return f;
}

static void assert_same_result(const struct gw_fsm_result *a, const struct gw_fsm_result *b)
{
    assert_int_equal(a->status, b->status);
    assert_int_equal(a->queued, b->queued);
    assert_int_equal(a->waiter_id, b->waiter_id);
    assert_int_equal(a->replayed, b->replayed);
    assert_int_equal(a->body_len, b->body_len);
    assert_memory_equal(a->body, b->body, a->body_len);
    assert_int_equal(a->n_wakeups, b->n_wakeups);
    for (size_t i = 0; i < a->n_wakeups; i++) {
        assert_int_equal(a->wakeups[i].waiter_id, b->wakeups[i].waiter_id);
        assert_int_equal(a->wakeups[i].status, b->wakeups[i].status);
        assert_int_equal(a->wakeups[i].body_len, b->wakeups[i].body_len);
        assert_memory_equal(a->wakeups[i].body, b->wakeups[i].body, a->wakeups[i].body_len);
    }
}

static void assert_same_snapshot(const struct gw_fsm *a, const struct gw_fsm *b)
{
    uint8_t *x, *y;
    size_t xl, yl;
    assert_int_equal(gw_fsm_snapshot(a, &x, &xl), 0);
    assert_int_equal(gw_fsm_snapshot(b, &y, &yl), 0);
    assert_int_equal(xl, yl);
    assert_memory_equal(x, y, xl);
    free(x);
    free(y);
}

/* Invariants watched over a whole run of one machine. */
struct track {
    uint64_t max_token;      /* highest fencing token handed out so far */
    uint64_t queued[256];    /* waiters parked and not yet answered */
    size_t n_queued;
    size_t grants, rejections;
};

static bool take_queued(struct track *t, uint64_t id)
{
    for (size_t i = 0; i < t->n_queued; i++) {
        if (t->queued[i] == id) {
            t->queued[i] = t->queued[--t->n_queued];
            return true;
        }
    }
    return false;
}

/* A grant's lease must be alive right after the apply that granted it. */
static void assert_grant_sound(const struct gw_fsm *f, const char *body)
{
    const char *p = strstr(body, "\"lease_id\":\"");
    assert_non_null(p);
    uint64_t lease = strtoull(p + 12, NULL, 10);
    struct gw_fsm_result r;
    gw_fsm_result_init(&r);
    assert_int_equal(gw_fsm_get_lease(f, lease, gw_fsm_time(f), &r), 0);
    assert_int_equal(r.status, 200);
    gw_fsm_result_free(&r);
}

static void check_step(struct track *t, const struct gw_fsm *f, const uint8_t *cmd, size_t len,
                       uint64_t held_token, const struct gw_fsm_result *res)
{
    struct gw_fsm_cmd c;
    bool ok = gw_fsm_cmd_decode(cmd, len, &c) == 0;
    if (res->queued) {
        if (res->replayed) {
            bool found = false;
            for (size_t i = 0; i < t->n_queued; i++)
                found |= t->queued[i] == res->waiter_id;
            assert_true(found);
        } else {
            assert_true(t->n_queued < 256);
            t->queued[t->n_queued++] = res->waiter_id;
        }
    }
    /* Wakeups happen before an acquire's own grant (expiring its holder comes first). */
    for (size_t i = 0; i < res->n_wakeups; i++) {
        const struct gw_fsm_wakeup *w = &res->wakeups[i];
        assert_true(take_queued(t, w->waiter_id)); /* exactly one answer per parked request */
        if (w->status == 200) {
            uint64_t tok = body_token(w->body);
            assert_true(tok > t->max_token);
            t->max_token = tok;
            assert_grant_sound(f, w->body);
            t->grants++;
        } else {
            assert_true(w->status == 409 || w->status == 404 || w->status == 503);
            t->rejections++;
        }
    }
    if (ok && c.kind == GW_FSM_LOCK_ACQUIRE && res->status == 200 && !res->replayed) {
        uint64_t tok = body_token(res->body);
        /* A new holder gets a higher token than any before; the same holder its own token. */
        if (tok <= t->max_token)
            assert_int_equal(tok, held_token);
        else
            t->max_token = tok;
        assert_grant_sound(f, res->body);
        t->grants++;
    }
    struct gw_fsm_stats st;
    gw_fsm_stats(f, &st);
    assert_int_equal(st.waiters, t->n_queued);
}

/* The token of the lock a command names, if it is held (0 otherwise). */
static uint64_t held_token_for(const struct gw_fsm *f, const uint8_t *cmd, size_t len)
{
    struct gw_fsm_cmd c;
    if (gw_fsm_cmd_decode(cmd, len, &c) != 0 || c.kind != GW_FSM_LOCK_ACQUIRE)
        return 0;
    struct gw_fsm_result r;
    gw_fsm_result_init(&r);
    uint64_t tok = 0;
    if (gw_fsm_get_lock(f, c.name, c.name_len, &r) == 0 && r.status == 200)
        tok = body_token(r.body);
    gw_fsm_result_free(&r);
    return tok;
}

/* Feeds the same n generated commands to a and b, comparing every result; t (may be NULL)
 * watches a's invariants and must have followed a from its start. */
static void run_tracked(struct gen *g, struct gw_fsm *a, struct gw_fsm *b, int n, struct track *t)
{
    struct gw_fsm_result ra, rb;
    gw_fsm_result_init(&ra);
    gw_fsm_result_init(&rb);
    static uint8_t buf[4096];
    for (int i = 0; i < n; i++) {
        size_t len = gen_cmd(g, a, buf, sizeof(buf));
        uint64_t held = t ? held_token_for(a, buf, len) : 0;
        int rca = gw_fsm_apply(a, g->index, buf, len, &ra);
        int rcb = gw_fsm_apply(b, g->index, buf, len, &rb);
        assert_int_equal(rca, rcb);
        assert_true(rca == 0 || rca == GW_FSM_ERR_UNSUPPORTED);
        assert_same_result(&ra, &rb);
        if (t)
            check_step(t, a, buf, len, held, &ra);
    }
    gw_fsm_result_free(&ra);
    gw_fsm_result_free(&rb);
}

static void run_both(struct gen *g, struct gw_fsm *a, struct gw_fsm *b, int n, size_t *wakeups)
{
    (void)wakeups;
    run_tracked(g, a, b, n, NULL);
}

static void two_machines_fed_the_same_sequence_have_identical_snapshots(void **state)
{
    for (uint64_t seed = 1; seed <= 20; seed++) {
        struct gen g = {.s = seed, .now = 1000000};
        struct gw_fsm *a = make(seed), *b = make(seed * 977 + 3);
        struct track t = {0};
        for (int round = 0; round < 10; round++) {
            run_tracked(&g, a, b, 300, &t);
            assert_same_snapshot(a, b);
        }
        assert_true(t.grants > 100);
        assert_true(t.rejections > 0);
        gw_fsm_free(a);
        gw_fsm_free(b);
    }
}

static void restored_machine_continues_exactly_like_the_original(void **state)
{
    for (uint64_t seed = 100; seed < 120; seed++) {
        struct gen g = {.s = seed, .now = 5000};
        struct gw_fsm *a = make(seed), *scratch = make(seed + 1);
        run_both(&g, a, scratch, 1000 + (int)(seed % 7) * 100, NULL);
        gw_fsm_free(scratch);
        uint8_t *img;
        size_t len;
        assert_int_equal(gw_fsm_snapshot(a, &img, &len), 0);
        /* b had a life of its own before: restore replaces all of it. */
        struct gw_fsm *b = make(seed * 31);
        struct gen other = {.s = seed ^ 0xabcdef, .now = 1};
        struct gw_fsm *c = make(7);
        run_both(&other, b, c, 200, NULL);
        gw_fsm_free(c);
        assert_int_equal(gw_fsm_restore(b, img, len), 0);
        assert_int_equal(gw_fsm_applied_index(b), gw_fsm_applied_index(a));
        assert_int_equal(gw_fsm_time(b), gw_fsm_time(a));
        uint8_t *img2;
        size_t len2;
        assert_int_equal(gw_fsm_snapshot(b, &img2, &len2), 0);
        assert_int_equal(len2, len);
        assert_memory_equal(img2, img, len);
        free(img2);
        free(img);
        run_both(&g, a, b, 1500, NULL);
        assert_same_snapshot(a, b);
        gw_fsm_free(a);
        gw_fsm_free(b);
    }
}

static void damaged_image_is_refused_and_changes_nothing(void **state)
{
    struct gen g = {.s = 42, .now = 100000};
    struct gw_fsm *a = make(1), *b = make(2);
    run_both(&g, a, b, 2000, NULL);
    uint8_t *img;
    size_t len;
    assert_int_equal(gw_fsm_snapshot(a, &img, &len), 0);
    /* b moves on alone, so its state differs from the image. */
    struct gw_fsm_result rb;
    gw_fsm_result_init(&rb);
    for (int i = 0; i < 100; i++) {
        uint8_t buf[4096];
        size_t n = gen_cmd(&g, b, buf, sizeof(buf));
        (void)gw_fsm_apply(b, g.index, buf, n, &rb);
    }
    gw_fsm_result_free(&rb);
    uint8_t *before;
    size_t before_len;
    assert_int_equal(gw_fsm_snapshot(b, &before, &before_len), 0);
    struct gen m = {.s = 7};
    for (int i = 0; i < 3000; i++) {
        size_t n = len;
        uint8_t *bad = malloc(len + 1);
        memcpy(bad, img, len);
        if (i % 3 == 0)
            n = (size_t)(rnd(&m) % len); /* truncated */
        else
            bad[rnd(&m) % len] ^= (uint8_t)(1u << (rnd(&m) % 8));
        int rc = gw_fsm_restore(b, bad, n);
        assert_true(rc == GW_FSM_ERR_MALFORMED || rc == GW_FSM_ERR_UNSUPPORTED);
        free(bad);
    }
    assert_int_equal(gw_fsm_restore(b, NULL, 0), GW_FSM_ERR_MALFORMED);
    uint8_t *after;
    size_t after_len;
    assert_int_equal(gw_fsm_snapshot(b, &after, &after_len), 0);
    assert_int_equal(after_len, before_len);
    assert_memory_equal(after, before, before_len);
    free(after);
    free(before);
    free(img);
    gw_fsm_free(a);
    gw_fsm_free(b);
}

static void put_crc(uint8_t *p, size_t len)
{
    /* CRC-32 (IEEE), as the image uses, so mutations reach the structural checks. */
    uint32_t crc = 0xffffffffu;
    for (size_t i = 0; i + 4 < len; i++) {
        crc ^= p[i];
        for (int k = 0; k < 8; k++)
            crc = (crc >> 1) ^ (0xedb88320u & (0u - (crc & 1u)));
    }
    crc = ~crc;
    for (int i = 0; i < 4; i++)
        p[len - 4 + (size_t)i] = (uint8_t)(crc >> (8 * i));
}

static void mutated_image_with_a_good_crc_is_refused_or_makes_a_sound_machine(void **state)
{
    struct gen g = {.s = 9, .now = 100000};
    struct gw_fsm *a = make(1), *b = make(2);
    run_both(&g, a, b, 1500, NULL);
    uint8_t *img;
    size_t len;
    assert_int_equal(gw_fsm_snapshot(a, &img, &len), 0);
    struct gen m = {.s = 11};
    int accepted = 0;
    for (int i = 0; i < 3000; i++) {
        uint8_t *bad = malloc(len);
        memcpy(bad, img, len);
        int edits = 1 + (int)(rnd(&m) % 3);
        for (int e = 0; e < edits; e++) {
            size_t at = 5 + (size_t)(rnd(&m) % (len - 9));
            bad[at] = rnd(&m) % 2 ? (uint8_t)rnd(&m) : (uint8_t)(bad[at] ^ 1);
        }
        put_crc(bad, len);
        struct gw_fsm *x = make(5);
        int rc = gw_fsm_restore(x, bad, len);
        if (rc == 0) {
            accepted++;
            /* Whatever was accepted must work: apply commands, snapshot, restore again. */
            struct gw_fsm *y = make(6);
            uint8_t *img2;
            size_t len2;
            assert_int_equal(gw_fsm_snapshot(x, &img2, &len2), 0);
            assert_int_equal(gw_fsm_restore(y, img2, len2), 0);
            free(img2);
            struct gen cont = {.s = (uint64_t)i, .now = gw_fsm_time(x), .index = gw_fsm_applied_index(x)};
            run_both(&cont, x, y, 200, NULL);
            assert_same_snapshot(x, y);
            gw_fsm_free(y);
        } else {
            assert_true(rc == GW_FSM_ERR_MALFORMED || rc == GW_FSM_ERR_UNSUPPORTED);
        }
        gw_fsm_free(x);
        free(bad);
    }
    assert_true(accepted > 0);
    free(img);
    gw_fsm_free(a);
    gw_fsm_free(b);
}

static void empty_machine_snapshot_round_trips(void **state)
{
    struct gw_fsm *a = make(1), *b = make(2);
    uint8_t *img;
    size_t len;
    assert_int_equal(gw_fsm_snapshot(a, &img, &len), 0);
    assert_int_equal(gw_fsm_restore(b, img, len), 0);
    assert_same_snapshot(a, b);
    img[4] = 9;
    assert_int_equal(gw_fsm_restore(b, img, len), GW_FSM_ERR_UNSUPPORTED);
    free(img);
    gw_fsm_free(a);
    gw_fsm_free(b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(two_machines_fed_the_same_sequence_have_identical_snapshots),
        cmocka_unit_test(restored_machine_continues_exactly_like_the_original),
        cmocka_unit_test(damaged_image_is_refused_and_changes_nothing),
        cmocka_unit_test(mutated_image_with_a_good_crc_is_refused_or_makes_a_sound_machine),
        cmocka_unit_test(empty_machine_snapshot_round_trips),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
