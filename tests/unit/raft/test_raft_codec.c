/*
 * test_raft_codec.c - the binary message form: every type round-trips, and the decoder rejects
 * truncated, mutated and oversized input with an error instead of crashing or over-reading
 * (run under ASan in the sanitizer build). The mutation loop is a small deterministic fuzzer.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#include "harness.h"

static uint8_t payload_a[5] = {1, 2, 3, 4, 5};
static uint8_t payload_b[1] = {9};
static struct raft_entry sample_entries[2] = {
    {3, 11, RAFT_ENTRY_NORMAL, 5, payload_a},
    {4, 12, RAFT_ENTRY_CONFIG, 1, payload_b},
};

static int samples(struct raft_message *out)
{
    int n = 0;
    struct raft_message m;

    m = t_msg(RAFT_MSG_VOTE, 1, 2, 7);
    m.u.vote.last_index = 100;
    m.u.vote.last_term = 6;
    m.u.vote.transfer = true;
    out[n++] = m;
    m = t_msg(RAFT_MSG_PREVOTE, 1, 2, 8);
    m.u.vote.last_index = 5;
    m.u.vote.last_term = 2;
    out[n++] = m;
    m = t_msg(RAFT_MSG_VOTE_RESP, 2, 1, 7);
    m.u.vote_resp.granted = true;
    out[n++] = m;
    m = t_msg(RAFT_MSG_PREVOTE_RESP, 2, 1, 8);
    out[n++] = m;
    m = t_msg(RAFT_MSG_APPEND, 1, 3, 4);
    m.u.append.prev_index = 10;
    m.u.append.prev_term = 3;
    m.u.append.commit = 9;
    m.u.append.read_seq = 77;
    m.u.append.entries = sample_entries;
    m.u.append.n_entries = 2;
    out[n++] = m;
    m = t_msg(RAFT_MSG_APPEND, 1, 3, 4); /* heartbeat */
    m.u.append.commit = 12;
    out[n++] = m;
    m = t_msg(RAFT_MSG_APPEND_RESP, 3, 1, 4);
    m.u.append_resp.reject = true;
    m.u.append_resp.index = 10;
    m.u.append_resp.hint_index = 4;
    m.u.append_resp.hint_term = 2;
    m.u.append_resp.read_seq = 77;
    out[n++] = m;
    m = t_msg(RAFT_MSG_SNAPSHOT, 1, 3, 4);
    m.u.snapshot.index = 50;
    m.u.snapshot.term = 3;
    m.u.snapshot.conf.n = 2;
    m.u.snapshot.conf.members[0].id = 1;
    m.u.snapshot.conf.members[0].role = RAFT_VOTER;
    m.u.snapshot.conf.members[1].id = 3;
    m.u.snapshot.conf.members[1].role = RAFT_LEARNER;
    m.u.snapshot.offset = 5;
    m.u.snapshot.total = 10;
    m.u.snapshot.data = payload_a;
    m.u.snapshot.len = 5;
    m.u.snapshot.done = true;
    out[n++] = m;
    m = t_msg(RAFT_MSG_SNAPSHOT_RESP, 3, 1, 4);
    m.u.snapshot_resp.index = 50;
    m.u.snapshot_resp.next_offset = 10;
    m.u.snapshot_resp.done = true;
    out[n++] = m;
    m = t_msg(RAFT_MSG_TIMEOUT_NOW, 1, 2, 4);
    out[n++] = m;
    return n;
}

static size_t encode(const struct raft_message *m, uint8_t *buf, size_t cap)
{
    size_t len = 0;
    assert_int_equal(raft_msg_encode(m, buf, cap, &len), 0);
    assert_int_equal(len, raft_msg_encoded_len(m));
    return len;
}

static void every_message_type_round_trips(void **state)
{
    struct raft_message ms[16];
    int n = samples(ms);
    for (int i = 0; i < n; i++) {
        uint8_t buf[512];
        size_t len = encode(&ms[i], buf, sizeof(buf));
        struct raft_message d;
        struct raft_entry ents[4];
        assert_int_equal(raft_msg_decode(buf, len, &d, ents, 4), 0);
        assert_int_equal(d.type, ms[i].type);
        assert_int_equal(d.from, ms[i].from);
        assert_int_equal(d.to, ms[i].to);
        assert_int_equal(d.term, ms[i].term);
        uint8_t again[512];
        size_t len2 = encode(&d, again, sizeof(again));
        assert_int_equal(len2, len);
        assert_memory_equal(buf, again, len); /* nothing lost */
        if (d.type == RAFT_MSG_APPEND && d.u.append.n_entries == 2) {
            assert_int_equal(d.u.append.entries[0].index, 11);
            assert_int_equal(d.u.append.entries[1].index, 12);
            assert_memory_equal(d.u.append.entries[0].data, payload_a, 5);
        }
    }
}

static void encode_refuses_a_small_buffer(void **state)
{
    struct raft_message ms[16];
    samples(ms);
    uint8_t buf[16];
    size_t len;
    assert_int_equal(raft_msg_encode(&ms[4], buf, sizeof(buf), &len), RAFT_ERR_BUSY);
}

static void decoder_rejects_every_truncation(void **state)
{
    struct raft_message ms[16];
    int n = samples(ms);
    for (int i = 0; i < n; i++) {
        uint8_t buf[512];
        size_t len = encode(&ms[i], buf, sizeof(buf));
        for (size_t cut = 0; cut < len; cut++) {
            uint8_t *copy = malloc(cut ? cut : 1); /* exact size: ASan sees any over-read */
            memcpy(copy, buf, cut);
            struct raft_message d;
            struct raft_entry ents[4];
            assert_int_equal(raft_msg_decode(copy, cut, &d, ents, 4), RAFT_ERR_MALFORMED);
            free(copy);
        }
    }
}

static void decoder_rejects_trailing_bytes_bad_version_and_type(void **state)
{
    struct raft_message ms[16];
    samples(ms);
    uint8_t buf[512];
    size_t len = encode(&ms[0], buf, sizeof(buf));
    struct raft_message d;
    struct raft_entry ents[4];
    buf[len] = 0;
    assert_int_equal(raft_msg_decode(buf, len + 1, &d, ents, 4), RAFT_ERR_MALFORMED);
    buf[0] = 99;
    assert_int_equal(raft_msg_decode(buf, len, &d, ents, 4), RAFT_ERR_MALFORMED);
    buf[0] = RAFT_WIRE_VERSION;
    buf[1] = 200;
    assert_int_equal(raft_msg_decode(buf, len, &d, ents, 4), RAFT_ERR_MALFORMED);
}

static void decoder_rejects_more_entries_than_the_caller_can_hold(void **state)
{
    struct raft_message ms[16];
    samples(ms);
    uint8_t buf[512];
    size_t len = encode(&ms[4], buf, sizeof(buf));
    struct raft_message d;
    struct raft_entry ents[1];
    assert_int_equal(raft_msg_decode(buf, len, &d, ents, 1), RAFT_ERR_MALFORMED);
    assert_int_equal(raft_msg_decode(buf, len, &d, NULL, 0), RAFT_ERR_MALFORMED);
}

static void decoder_survives_random_mutations(void **state)
{
    struct raft_message ms[16];
    int n = samples(ms);
    uint64_t rng = 12345;
    int accepted = 0, rejected = 0;
    for (int round = 0; round < 200000; round++) {
        const struct raft_message *m = &ms[round % n];
        uint8_t buf[512];
        size_t len = encode(m, buf, sizeof(buf));
        int flips = 1 + (int)((rng = rng * 6364136223846793005ULL + 1442695040888963407ULL) >> 60);
        for (int f = 0; f < flips; f++) {
            rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
            size_t pos = (size_t)(rng >> 33) % len;
            buf[pos] = (uint8_t)(rng >> 8);
        }
        rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
        size_t cut = (rng >> 63) ? len : (size_t)(rng >> 35) % (len + 1);
        uint8_t *copy = malloc(cut ? cut : 1);
        memcpy(copy, buf, cut);
        struct raft_message d;
        struct raft_entry ents[4];
        int rc = raft_msg_decode(copy, cut, &d, ents, 4);
        assert_true(rc == 0 || rc == RAFT_ERR_MALFORMED);
        if (rc == 0) {
            accepted++;
            /* whatever is accepted re-encodes to the same size, and a core survives it */
            assert_int_equal(raft_msg_encoded_len(&d), cut);
        } else {
            rejected++;
        }
        free(copy);
    }
    assert_true(accepted > 0 && rejected > 0);
}

static void core_survives_decoded_garbage(void **state)
{
    struct tknobs k = tk_default();
    struct tcluster t;
    t_init(&t, &k, 3);
    t_elect(&t, 1);
    uint64_t rng = 99;
    struct raft_message ms[16];
    int n = samples(ms);
    for (int round = 0; round < 20000; round++) {
        struct raft_message m = ms[round % n];
        uint8_t buf[512];
        size_t len = encode(&m, buf, sizeof(buf));
        rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
        buf[3 + (rng >> 33) % (len - 3)] ^= (uint8_t)(1u << ((rng >> 20) % 8));
        /* keep it addressed to a real node so the core has to look at it */
        struct raft_message d;
        struct raft_entry ents[4];
        if (raft_msg_decode(buf, len, &d, ents, 4) != 0)
            continue;
        d.to = 1 + (uint64_t)(round % 3);
        d.from = 1 + (uint64_t)((round + 1) % 3);
        raft_step(t.r[d.to], &d);
        t_pump(&t, (int)d.to);
        t_drop_queue(&t);
    }
    t_free(&t);
}

static void membership_round_trips_and_rejects_duplicates(void **state)
{
    struct raft_membership c = {2, {{5, RAFT_VOTER}, {9, RAFT_LEARNER}}};
    uint8_t buf[64];
    size_t len;
    assert_int_equal(raft_membership_encode(&c, buf, sizeof(buf), &len), 0);
    struct raft_membership d;
    assert_int_equal(raft_membership_decode(buf, len, &d), 0);
    assert_int_equal(d.n, 2);
    assert_int_equal(d.members[1].id, 9);
    assert_int_equal(d.members[1].role, RAFT_LEARNER);
    c.members[1].id = 5;
    assert_int_equal(raft_membership_encode(&c, buf, sizeof(buf), &len), 0);
    assert_int_equal(raft_membership_decode(buf, len, &d), RAFT_ERR_MALFORMED);
    assert_int_equal(raft_membership_decode(buf, len - 1, &d), RAFT_ERR_MALFORMED);
}

static void error_codes_have_names(void **state)
{
    assert_string_equal(raft_errname(RAFT_ERR_NOT_LEADER), "not_leader");
    assert_string_equal(raft_errname(0), "ok");
    assert_string_equal(raft_strerror(RAFT_ERR_MALFORMED), "malformed message");
    assert_string_equal(raft_errname(-999), "unknown");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(every_message_type_round_trips),
        cmocka_unit_test(encode_refuses_a_small_buffer),
        cmocka_unit_test(decoder_rejects_every_truncation),
        cmocka_unit_test(decoder_rejects_trailing_bytes_bad_version_and_type),
        cmocka_unit_test(decoder_rejects_more_entries_than_the_caller_can_hold),
        cmocka_unit_test(decoder_survives_random_mutations),
        cmocka_unit_test(core_survives_decoded_garbage),
        cmocka_unit_test(membership_round_trips_and_rejects_duplicates),
        cmocka_unit_test(error_codes_have_names),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
