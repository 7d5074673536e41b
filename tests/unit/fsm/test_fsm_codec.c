/*
 * test_fsm_codec.c - the command wire form: every kind round-trips, the decoder refuses
 * truncated, padded, mutated and unknown input with an error (never a crash or an over-read: the
 * sanitizer build checks that), and a command that does not decode is consumed by apply without
 * changing the state. The random and mutation loops are a small deterministic fuzzer.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#include "fsm_harness.h"

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint64_t rnd(void)
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static const uint64_t sample_ids[3] = {5, 6, 0xffffffffffffffffull};

/* One command of every kind, with every optional part somewhere. */
static size_t samples(struct gw_fsm_cmd *out)
{
    size_t n = 0;
    out[n++] = (struct gw_fsm_cmd){.kind = GW_FSM_LEASE_GRANT, .now_ms = 1, .ttl_ms = 10000};
    out[n++] = (struct gw_fsm_cmd){.kind = GW_FSM_LEASE_KEEPALIVE, .now_ms = 2, .lease_id = 7,
                                   .idem_key = "key-1", .idem_key_len = 5};
    out[n++] = (struct gw_fsm_cmd){.kind = GW_FSM_LEASE_REVOKE, .now_ms = 3, .lease_id = 8};
    out[n++] = (struct gw_fsm_cmd){.kind = GW_FSM_LEASE_EXPIRE, .now_ms = 4, .ids = sample_ids, .n_ids = 3};
    out[n++] = (struct gw_fsm_cmd){.kind = GW_FSM_LEASE_EXPIRE, .now_ms = 4};
    out[n++] = (struct gw_fsm_cmd){.kind = GW_FSM_LOCK_ACQUIRE, .now_ms = 5, .name = "lock", .name_len = 4,
                                   .owner = "worker-1", .owner_len = 8, .lease_id = 3, .wait_ms = 100,
                                   .idem_key = "i", .idem_key_len = 1};
    out[n++] = (struct gw_fsm_cmd){.kind = GW_FSM_LOCK_ACQUIRE, .now_ms = 5, .name = "lock", .name_len = 4,
                                   .owner = "w", .owner_len = 1, .ttl_ms = 5000};
    out[n++] = (struct gw_fsm_cmd){.kind = GW_FSM_LOCK_RELEASE, .now_ms = 6, .name = "l", .name_len = 1,
                                   .token = 99};
    out[n++] = (struct gw_fsm_cmd){.kind = GW_FSM_LOCK_CANCEL_WAIT, .now_ms = 7, .name = "l", .name_len = 1,
                                   .waiter_id = 12};
    out[n++] = (struct gw_fsm_cmd){.kind = GW_FSM_COUNTER_ADD, .now_ms = 8, .name = "c", .name_len = 1,
                                   .delta = -42};
    out[n++] = (struct gw_fsm_cmd){.kind = GW_FSM_COUNTER_SET, .now_ms = 9, .name = "c", .name_len = 1,
                                   .value = INT64_MIN, .has_expect = true, .expect = 4};
    out[n++] = (struct gw_fsm_cmd){.kind = GW_FSM_COUNTER_SET, .now_ms = 9, .name = "c", .name_len = 1,
                                   .value = 5};
    out[n++] = (struct gw_fsm_cmd){.kind = GW_FSM_ROUTE_PUT, .now_ms = 10, .name = "r", .name_len = 1,
                                   .json = "{\"a\":1}", .json_len = 7};
    out[n++] = (struct gw_fsm_cmd){.kind = GW_FSM_ROUTE_DELETE, .now_ms = 11, .name = "r", .name_len = 1};
    out[n++] = (struct gw_fsm_cmd){.kind = GW_FSM_QUOTA_ACQUIRE, .now_ms = 12, .name = "r/tb/k", .name_len = 6,
                                   .owner = "n1", .owner_len = 2, .quota_kind = GW_FSM_QUOTA_SLIDING_WINDOW,
                                   .quota_a = 100, .quota_b = 60000, .count = 25, .ttl_ms = 1000};
    out[n++] = (struct gw_fsm_cmd){.kind = GW_FSM_QUOTA_RELEASE, .now_ms = 13, .name = "r/tb/k", .name_len = 6,
                                   .owner = "n1", .owner_len = 2, .grant_id = 12, .count = 3};
    out[n++] = (struct gw_fsm_cmd){.kind = GW_FSM_IDEM_BEGIN, .now_ms = 14, .name = "orders", .name_len = 6,
                                   .key = "k-1", .key_len = 3, .fp_hi = 1, .fp_lo = UINT64_MAX,
                                   .owner = "n2", .owner_len = 2, .ttl_ms = 86400000};
    out[n++] = (struct gw_fsm_cmd){.kind = GW_FSM_IDEM_FINISH, .now_ms = 15, .name = "orders", .name_len = 6,
                                   .key = "k-1", .key_len = 3, .claim_id = 14, .store = true, .status = 201,
                                   .ttl_ms = 1000, .headers = "a: b", .headers_len = 4, .body = "{}",
                                   .body_len = 2};
    out[n++] = (struct gw_fsm_cmd){.kind = GW_FSM_IDEM_FINISH, .now_ms = 16, .name = "orders", .name_len = 6,
                                   .key = "k-1", .key_len = 3, .claim_id = 14};
    return n;
}

/* Encodes a decoded command again (copying LEASE_EXPIRE's ids out of the buffer). */
static size_t reencode(const struct gw_fsm_cmd *d, uint8_t *buf, size_t cap)
{
    static uint64_t ids[GW_FSM_MAX_EXPIRE_IDS];
    struct gw_fsm_cmd c = *d;
    if (c.kind == GW_FSM_LEASE_EXPIRE) {
        for (size_t i = 0; i < c.n_ids; i++)
            ids[i] = gw_fsm_cmd_expire_id(d, i);
        c.ids = ids;
    }
    size_t len = 0;
    assert_int_equal(gw_fsm_cmd_encode(&c, buf, cap, &len), 0);
    return len;
}

static void every_command_kind_round_trips(void **state)
{
    struct gw_fsm_cmd s[32];
    size_t n = samples(s);
    for (size_t i = 0; i < n; i++) {
        uint8_t buf[512], again[512];
        size_t len;
        assert_int_equal(gw_fsm_cmd_encode(&s[i], buf, sizeof(buf), &len), 0);
        assert_int_equal(len, gw_fsm_cmd_encoded_len(&s[i]));
        struct gw_fsm_cmd d;
        assert_int_equal(gw_fsm_cmd_decode(buf, len, &d), 0);
        assert_int_equal(d.kind, s[i].kind);
        assert_int_equal(d.now_ms, s[i].now_ms);
        assert_int_equal(d.idem_key_len, s[i].idem_key_len);
        if (d.idem_key_len)
            assert_memory_equal(d.idem_key, s[i].idem_key, d.idem_key_len);
        assert_int_equal(d.name_len, s[i].name_len);
        if (d.name_len)
            assert_memory_equal(d.name, s[i].name, d.name_len);
        assert_int_equal(d.owner_len, s[i].owner_len);
        assert_int_equal(d.json_len, s[i].json_len);
        assert_int_equal(d.lease_id, s[i].lease_id);
        assert_int_equal(d.ttl_ms, s[i].ttl_ms);
        assert_int_equal(d.wait_ms, s[i].wait_ms);
        assert_int_equal(d.token, s[i].token);
        assert_int_equal(d.waiter_id, s[i].waiter_id);
        assert_int_equal(d.delta, s[i].delta);
        assert_int_equal(d.value, s[i].value);
        assert_int_equal(d.has_expect, s[i].has_expect);
        assert_int_equal(d.expect, s[i].expect);
        assert_int_equal(d.quota_kind, s[i].quota_kind);
        assert_int_equal(d.quota_a, s[i].quota_a);
        assert_int_equal(d.quota_b, s[i].quota_b);
        assert_int_equal(d.count, s[i].count);
        assert_int_equal(d.grant_id, s[i].grant_id);
        assert_int_equal(d.key_len, s[i].key_len);
        if (d.key_len)
            assert_memory_equal(d.key, s[i].key, d.key_len);
        assert_int_equal(d.fp_hi, s[i].fp_hi);
        assert_int_equal(d.fp_lo, s[i].fp_lo);
        assert_int_equal(d.claim_id, s[i].claim_id);
        assert_int_equal(d.store, s[i].store);
        assert_int_equal(d.status, s[i].status);
        assert_int_equal(d.headers_len, s[i].headers_len);
        assert_int_equal(d.body_len, s[i].body_len);
        if (d.body_len)
            assert_memory_equal(d.body, s[i].body, d.body_len);
        assert_int_equal(d.n_ids, s[i].n_ids);
        for (size_t k = 0; k < d.n_ids; k++)
            assert_int_equal(gw_fsm_cmd_expire_id(&d, k), s[i].ids[k]);
        assert_int_equal(reencode(&d, again, sizeof(again)), len);
        assert_memory_equal(again, buf, len);
    }
}

static void decoder_rejects_versions_reserved_kinds_flags_and_padding(void **state)
{
    struct gw_fsm_cmd c = {.kind = GW_FSM_COUNTER_ADD, .name = "c", .name_len = 1, .delta = 1};
    uint8_t buf[64];
    size_t len;
    struct gw_fsm_cmd d;
    assert_int_equal(gw_fsm_cmd_encode(&c, buf, sizeof(buf), &len), 0);
    buf[0] = 2;
    assert_int_equal(gw_fsm_cmd_decode(buf, len, &d), GW_FSM_ERR_UNSUPPORTED);
    buf[0] = GW_FSM_CMD_VERSION;
    const uint8_t reserved[] = {0, 5, 15, 19, 34, GW_FSM_QUOTA_FIRST, 51, GW_FSM_QUOTA_LAST, 66,
                                GW_FSM_IDEM_LAST, 82, 255};
    for (size_t i = 0; i < sizeof(reserved); i++) {
        buf[1] = reserved[i];
        assert_int_equal(gw_fsm_cmd_decode(buf, len, &d), GW_FSM_ERR_UNSUPPORTED);
    }
    buf[1] = GW_FSM_COUNTER_ADD;
    buf[2] = 4; /* unknown flag */
    assert_int_equal(gw_fsm_cmd_decode(buf, len, &d), GW_FSM_ERR_MALFORMED);
    buf[2] = GW_FSM_F_EXPECT; /* only COUNTER_SET has expect */
    assert_int_equal(gw_fsm_cmd_decode(buf, len, &d), GW_FSM_ERR_MALFORMED);
    buf[2] = 0;
    buf[len] = 0;
    assert_int_equal(gw_fsm_cmd_decode(buf, len + 1, &d), GW_FSM_ERR_MALFORMED);
    assert_int_equal(gw_fsm_cmd_decode(buf, len, &d), 0);
    assert_int_equal(gw_fsm_cmd_decode(NULL, 0, &d), GW_FSM_ERR_MALFORMED);
    /* An idempotency flag with a zero-length key. */
    uint8_t k0[] = {GW_FSM_CMD_VERSION, GW_FSM_LEASE_GRANT, GW_FSM_F_IDEM, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                    0xe8, 3, 0, 0, 0, 0, 0, 0};
    assert_int_equal(gw_fsm_cmd_decode(k0, sizeof(k0), &d), GW_FSM_ERR_MALFORMED);
    /* LEASE_EXPIRE with more ids than allowed. */
    uint8_t big[] = {GW_FSM_CMD_VERSION, GW_FSM_LEASE_EXPIRE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x04};
    assert_int_equal(gw_fsm_cmd_decode(big, sizeof(big), &d), GW_FSM_ERR_MALFORMED);
}

static void encoder_refuses_what_cannot_be_encoded(void **state)
{
    static char huge[70000];
    uint8_t buf[128];
    size_t len;
    struct gw_fsm_cmd c = {.kind = GW_FSM_COUNTER_ADD, .name = huge, .name_len = sizeof(huge)};
    assert_int_equal(gw_fsm_cmd_encoded_len(&c), 0);
    assert_int_equal(gw_fsm_cmd_encode(&c, buf, sizeof(buf), &len), GW_FSM_ERR_INVALID);
    c = (struct gw_fsm_cmd){.kind = 48};
    assert_int_equal(gw_fsm_cmd_encode(&c, buf, sizeof(buf), &len), GW_FSM_ERR_INVALID);
    /* the quota and gateway idempotency kinds take no /v1 idempotency key */
    c = (struct gw_fsm_cmd){.kind = GW_FSM_QUOTA_RELEASE, .idem_key = "k", .idem_key_len = 1};
    assert_int_equal(gw_fsm_cmd_encode(&c, buf, sizeof(buf), &len), GW_FSM_ERR_INVALID);
    uint8_t flagged[] = {GW_FSM_CMD_VERSION, GW_FSM_IDEM_BEGIN, GW_FSM_F_IDEM, 0, 0, 0, 0, 0, 0, 0, 0, 1, 'k'};
    struct gw_fsm_cmd d;
    assert_int_equal(gw_fsm_cmd_decode(flagged, sizeof(flagged), &d), GW_FSM_ERR_MALFORMED);
    static uint64_t ids[GW_FSM_MAX_EXPIRE_IDS + 1];
    c = (struct gw_fsm_cmd){.kind = GW_FSM_LEASE_EXPIRE, .ids = ids, .n_ids = GW_FSM_MAX_EXPIRE_IDS + 1};
    assert_int_equal(gw_fsm_cmd_encode(&c, buf, sizeof(buf), &len), GW_FSM_ERR_INVALID);
    c = (struct gw_fsm_cmd){.kind = GW_FSM_LEASE_GRANT, .idem_key = huge, .idem_key_len = 256};
    assert_int_equal(gw_fsm_cmd_encode(&c, buf, sizeof(buf), &len), GW_FSM_ERR_INVALID);
    c = (struct gw_fsm_cmd){.kind = GW_FSM_ROUTE_PUT, .name = "r", .name_len = 1, .json = huge, .json_len = 200};
    assert_int_equal(gw_fsm_cmd_encode(&c, buf, sizeof(buf), &len), GW_FSM_ERR_TOO_BIG);
    assert_string_equal(gw_fsm_errname(GW_FSM_ERR_TOO_BIG), "too_big");
    assert_string_equal(gw_fsm_strerror(GW_FSM_ERR_MALFORMED), "malformed command or snapshot");
}

static void every_truncation_of_a_valid_command_is_refused(void **state)
{
    struct gw_fsm_cmd s[32];
    size_t n = samples(s);
    for (size_t i = 0; i < n; i++) {
        uint8_t buf[512];
        size_t len;
        assert_int_equal(gw_fsm_cmd_encode(&s[i], buf, sizeof(buf), &len), 0);
        for (size_t cut = 0; cut < len; cut++) {
            /* A fresh heap copy of exactly cut bytes, so ASan sees any over-read. */
            uint8_t *p = malloc(cut ? cut : 1);
            memcpy(p, buf, cut);
            struct gw_fsm_cmd d;
            assert_true(gw_fsm_cmd_decode(p, cut, &d) < 0);
            free(p);
        }
    }
}

/* Applies bytes to a machine at the next index; it must not crash, and a refusal changes nothing. */
static void feed(struct h *h, const uint8_t *p, size_t len)
{
    struct gw_fsm_stats before, after;
    gw_fsm_stats(h->f, &before);
    uint64_t t = gw_fsm_time(h->f);
    int rc = gw_fsm_apply(h->f, ++h->index, p, len, &h->res);
    if (rc < 0) {
        assert_true(rc == GW_FSM_ERR_MALFORMED || rc == GW_FSM_ERR_UNSUPPORTED);
        assert_err(h, 400, "invalid_command");
        gw_fsm_stats(h->f, &after);
        assert_memory_equal(&before, &after, sizeof(before));
        assert_int_equal(gw_fsm_time(h->f), t);
        assert_int_equal(gw_fsm_applied_index(h->f), h->index);
    } else {
        assert_int_equal(rc, 0);
    }
}

static void random_bytes_never_crash_the_decoder_or_apply(void **state)
{
    struct h h;
    h_init(&h);
    for (int i = 0; i < 200000; i++) {
        size_t len = (size_t)(rnd() % 48);
        uint8_t *p = malloc(len ? len : 1);
        for (size_t k = 0; k < len; k++)
            p[k] = (uint8_t)rnd();
        if (len > 0 && (i & 1))
            p[0] = GW_FSM_CMD_VERSION; /* get past the first check more often */
        if (len > 2 && (i & 2))
            p[2] &= 3;
        struct gw_fsm_cmd d;
        (void)gw_fsm_cmd_decode(p, len, &d);
        if (i % 8 == 0)
            feed(&h, p, len);
        free(p);
    }
    h_free(&h);
}

static void mutated_commands_decode_canonically_or_are_refused(void **state)
{
    struct gw_fsm_cmd s[32];
    size_t n = samples(s);
    struct h h;
    h_init(&h);
    size_t decoded = 0, refused = 0;
    for (int round = 0; round < 20000; round++) {
        uint8_t buf[600], again[600];
        size_t len;
        assert_int_equal(gw_fsm_cmd_encode(&s[(size_t)round % n], buf, 512, &len), 0);
        int edits = 1 + (int)(rnd() % 3);
        for (int e = 0; e < edits; e++) {
            size_t at = (size_t)(rnd() % len);
            switch (rnd() % 4) {
            case 0:
                buf[at] ^= (uint8_t)(1u << (rnd() % 8));
                break;
            case 1:
                buf[at] = (uint8_t)rnd();
                break;
            case 2: /* delete a byte */
                memmove(buf + at, buf + at + 1, len - at - 1);
                len--;
                break;
            default: /* insert a byte */
                memmove(buf + at + 1, buf + at, len - at);
                buf[at] = (uint8_t)rnd();
                len++;
                break;
            }
            if (len == 0)
                break;
        }
        uint8_t *p = malloc(len ? len : 1);
        memcpy(p, buf, len);
        struct gw_fsm_cmd d;
        if (gw_fsm_cmd_decode(p, len, &d) == 0) {
            decoded++;
            /* Whatever decodes encodes back to exactly the same bytes. */
            assert_int_equal(reencode(&d, again, sizeof(again)), len);
            assert_memory_equal(again, p, len);
        } else {
            refused++;
        }
        feed(&h, p, len);
        free(p);
    }
    assert_true(decoded > 1000);
    assert_true(refused > 1000);
    h_free(&h);
}

static void apply_refuses_an_index_that_does_not_increase(void **state)
{
    struct h h;
    h_init(&h);
    h_add(&h, "c", 1);
    struct gw_fsm_cmd c = {.kind = GW_FSM_COUNTER_ADD, .name = "c", .name_len = 1, .delta = 1};
    uint8_t buf[64];
    size_t len;
    assert_int_equal(gw_fsm_cmd_encode(&c, buf, sizeof(buf), &len), 0);
    assert_int_equal(gw_fsm_apply(h.f, 1, buf, len, &h.res), GW_FSM_ERR_INVALID);
    assert_int_equal(gw_fsm_get_counter(h.f, "c", 1, &h.res), 0);
    assert_res(&h, 200, "{\"name\":\"c\",\"value\":1}");
    /* Gaps are fine: entries that carry no command are skipped by the node. */
    assert_int_equal(gw_fsm_apply(h.f, 10, buf, len, &h.res), 0);
    assert_res(&h, 200, "{\"name\":\"c\",\"value\":2}");
    h_free(&h);
}

static void lease_ids_parse_as_strict_decimal(void **state)
{
    uint64_t id = 0;
    assert_true(gw_fsm_parse_id("123", 3, &id));
    assert_int_equal(id, 123);
    assert_true(gw_fsm_parse_id("18446744073709551615", 20, &id));
    assert_int_equal(id, UINT64_MAX);
    assert_false(gw_fsm_parse_id("18446744073709551616", 20, &id));
    assert_false(gw_fsm_parse_id("0", 1, &id));
    assert_false(gw_fsm_parse_id("012", 3, &id));
    assert_false(gw_fsm_parse_id("-1", 2, &id));
    assert_false(gw_fsm_parse_id("+1", 2, &id));
    assert_false(gw_fsm_parse_id("1x", 2, &id));
    assert_false(gw_fsm_parse_id("", 0, &id));
    assert_false(gw_fsm_parse_id("123456789012345678901", 21, &id));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(every_command_kind_round_trips),
        cmocka_unit_test(decoder_rejects_versions_reserved_kinds_flags_and_padding),
        cmocka_unit_test(encoder_refuses_what_cannot_be_encoded),
        cmocka_unit_test(every_truncation_of_a_valid_command_is_refused),
        cmocka_unit_test(random_bytes_never_crash_the_decoder_or_apply),
        cmocka_unit_test(mutated_commands_decode_canonically_or_are_refused),
        cmocka_unit_test(apply_refuses_an_index_that_does_not_increase),
        cmocka_unit_test(lease_ids_parse_as_strict_decimal),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
