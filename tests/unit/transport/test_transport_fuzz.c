/*
 * test_transport_fuzz.c - a small deterministic fuzzer for the frame reader. First the pure
 * frame check on random streams cut at random points (valid frames must come back exactly, any
 * mutation must be refused or yield only frames whose CRC holds); then the whole receive path
 * of a live transport, fed random bytes, random payloads with valid CRCs and mutated valid
 * messages over real sockets. Under the sanitizer build any over-read or leak fails the test;
 * the transport must survive every stream and still serve a real peer afterwards.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#include "harness.h"

/* Longer runs: build with -DFUZZ_STREAMS=... -DFUZZ_CONNS=... and set GW_FUZZ_SEED. */
#ifndef FUZZ_STREAMS
#define FUZZ_STREAMS 3000
#endif
#ifndef FUZZ_CONNS
#define FUZZ_CONNS 300
#endif

static uint64_t seed_or(uint64_t dflt)
{
    const char *s = getenv("GW_FUZZ_SEED");
    return s != NULL ? strtoull(s, NULL, 10) : dflt;
}

static uint64_t rng_state;

static uint64_t rnd(void)
{
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t below(uint64_t n) { return rnd() % n; }

/* Appends a frame with a random payload of up to max_payload bytes; returns its payload length. */
static size_t add_frame(uint8_t *buf, size_t *len, size_t max_payload)
{
    size_t n = (size_t)below(max_payload + 1);
    uint8_t *p = buf + *len + GW_TRANSPORT_FRAME_HEADER;
    for (size_t i = 0; i < n; i++)
        p[i] = (uint8_t)rnd();
    gw_transport_frame_header(buf + *len, p, n);
    *len += GW_TRANSPORT_FRAME_HEADER + n;
    return n;
}

/* Reads stream as the transport does, in random pieces, each piece in an exact-size copy so
 * ASan catches a read past what has arrived. Returns the frames found before an error (or the
 * end), and whether an error stopped it. */
static size_t read_stream(const uint8_t *stream, size_t len, size_t max, size_t *lens,
                          size_t max_frames, bool *error)
{
    size_t have = 0, consumed = 0, n = 0;
    *error = false;
    while (have < len) {
        size_t piece = 1 + (size_t)below(len - have < 700 ? len - have : 700);
        have += piece;
        for (;;) {
            size_t avail = have - consumed;
            uint8_t *copy = malloc(avail ? avail : 1);
            memcpy(copy, stream + consumed, avail);
            size_t plen = 0;
            int rc = gw_transport_frame_check(copy, avail, max, &plen);
            free(copy);
            if (rc < 0) {
                *error = true;
                return n;
            }
            if (rc == 0)
                break;
            assert_true(n < max_frames);
            lens[n++] = plen;
            consumed += GW_TRANSPORT_FRAME_HEADER + plen;
        }
    }
    return n;
}

static void frame_reader_recovers_valid_streams_and_refuses_mutations(void **state)
{
    rng_state = seed_or(12345);
    enum { MAXF = 64, MAXP = 600 };
    static uint8_t stream[MAXF * (MAXP + GW_TRANSPORT_FRAME_HEADER)];
    size_t want[MAXF], got[MAXF];
    for (int iter = 0; iter < FUZZ_STREAMS; iter++) {
        size_t len = 0;
        int nf = 1 + (int)below(MAXF - 1);
        for (int i = 0; i < nf; i++)
            want[i] = add_frame(stream, &len, MAXP);
        bool err;
        size_t n = read_stream(stream, len, MAXP, got, MAXF, &err);
        assert_false(err);
        assert_int_equal(n, nf);
        for (int i = 0; i < nf; i++)
            assert_int_equal(got[i], want[i]);

        /* Flip a few bits: the reader stops with an error, or every frame it returns is
         * one whose CRC holds (a flipped length can make the tail look incomplete). */
        int flips = 1 + (int)below(4);
        for (int f = 0; f < flips; f++)
            stream[below(len)] ^= (uint8_t)(1u << below(8));
        n = read_stream(stream, len, MAXP, got, MAXF, &err);
        assert_true(n <= (size_t)nf);

        /* Pure noise never crashes it either. */
        for (size_t i = 0; i < len; i++)
            stream[i] = (uint8_t)rnd();
        n = read_stream(stream, len, MAXP, got, MAXF, &err);
        assert_true(n <= len / GW_TRANSPORT_FRAME_HEADER);
    }
}

static bool delivered_sane(const struct rec *r)
{
    for (size_t i = 0; i < r->n; i++)
        if (r->v[i].from != 1 || r->v[i].to != 2)
            return false;
    return true;
}

/* A valid message of a random type, as raft_msg_encode writes it. */
static size_t random_message(uint8_t *buf, size_t cap)
{
    static uint8_t data[512];
    static struct raft_entry ents[8];
    for (size_t i = 0; i < sizeof(data); i++)
        data[i] = (uint8_t)rnd();
    struct raft_message m = h_msg((uint8_t)(1 + below(9)), 1, 2, 5 + below(3));
    if (m.type == RAFT_MSG_APPEND) {
        m.u.append.prev_index = below(100);
        uint32_t n = (uint32_t)below(8);
        for (uint32_t i = 0; i < n; i++) {
            ents[i].term = 1 + below(m.term);
            if (i > 0 && ents[i].term < ents[i - 1].term)
                ents[i].term = ents[i - 1].term;
            ents[i].type = RAFT_ENTRY_NORMAL;
            ents[i].len = (uint32_t)below(64);
            ents[i].data = data;
        }
        m.u.append.entries = ents;
        m.u.append.n_entries = n;
    } else if (m.type == RAFT_MSG_SNAPSHOT) {
        m.u.snapshot.total = 300;
        m.u.snapshot.offset = below(100);
        m.u.snapshot.len = (uint32_t)below(100);
        m.u.snapshot.data = data;
    }
    size_t len = 0;
    assert_int_equal(raft_msg_encode(&m, buf, cap, &len), 0);
    return len;
}

static void live_transport_survives_hostile_streams(void **state)
{
    rng_state = seed_or(777);
    struct gw_transport_options o;
    gw_transport_options_default(&o);
    o.max_frame_bytes = 4096;
    o.handshake_timeout_ms = 200;
    struct node a, b;
    node_start(&a, 1, 0, &o);
    node_start(&b, 2, 0, &o);
    node_link(&a, &b);
    struct node *ns[] = {&a, &b};
    static uint8_t buf[16384];
    for (int iter = 0; iter < FUZZ_CONNS; iter++) {
        int fd = raw_connect(&b);
        int kind = (int)below(4);
        if (kind != 0 || below(4) != 0)
            raw_handshake(fd, 0, 1, 2);
        int frames = 1 + (int)below(6);
        for (int f = 0; f < frames; f++) {
            size_t len;
            switch (kind) {
            case 0: /* noise */
                len = (size_t)below(sizeof(buf));
                for (size_t i = 0; i < len; i++)
                    buf[i] = (uint8_t)rnd();
                raw_write(fd, buf, len);
                break;
            case 1: /* random payload, valid frame */
                len = (size_t)below(5000);
                for (size_t i = 0; i < len; i++)
                    buf[i] = (uint8_t)rnd();
                if (len > 2 && below(2) == 0)
                    buf[0] = RAFT_WIRE_VERSION, buf[1] = (uint8_t)(1 + below(9));
                raw_frame(fd, buf, len);
                break;
            default: /* a valid message, maybe mutated, in a valid frame */
                len = random_message(buf, sizeof(buf));
                if (kind == 3) {
                    int flips = 1 + (int)below(3);
                    for (int k = 0; k < flips; k++)
                        buf[below(len)] ^= (uint8_t)(1u << below(8));
                    if (below(4) == 0)
                        len = (size_t)below(len + 1);
                }
                raw_frame(fd, buf, len);
                break;
            }
        }
        if (below(2) == 0)
            shutdown(fd, SHUT_WR);
        pump(ns, 2, raw_closed, &fd, 30);
        close(fd);
        assert_true(delivered_sane(&b.rec));
    }
    pump(ns, 2, NULL, NULL, 300);
    struct gw_transport_stats st;
    gw_transport_stats(b.t, &st);
    assert_true(st.rejected_frames > 0);
    assert_true(st.accepted >= FUZZ_CONNS);

    /* Still serving the real node 1. */
    size_t before = b.rec.n;
    struct raft_message hb = h_heartbeat(1, 2, 4242);
    assert_int_equal(gw_transport_send(a.t, &hb), 0);
    struct count_cond c = {&b.rec, before + 1};
    assert_true(pump(ns, 2, h_got_n, &c, 5000));
    assert_int_equal(b.rec.v[b.rec.n - 1].seq, 4242);
    node_stop(&a);
    node_stop(&b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(frame_reader_recovers_valid_streams_and_refuses_mutations),
        cmocka_unit_test(live_transport_survives_hostile_streams),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
