/*
 * test_transport.c - the Raft transport over real sockets on 127.0.0.1: every message type
 * arrives intact in both directions between two and three nodes, per-peer order holds, frames
 * over the bound are refused and counted, hostile bytes from a raw socket close only that
 * connection, a down peer's queue is bounded and drains once it comes up, restarts reconnect
 * with backoff, and removing a peer closes its connection.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#include <sys/epoll.h>
#include <sys/resource.h>

#include "harness.h"

#define WAIT_MS 5000

static uint8_t small_payload[5] = {1, 2, 3, 4, 5};
static uint8_t big_payload[100 * 1024];
static struct raft_entry sample_entries[3] = {
    {3, 11, RAFT_ENTRY_NORMAL, 5, small_payload},
    {4, 12, RAFT_ENTRY_CONFIG, 1, small_payload},
    {4, 13, RAFT_ENTRY_NORMAL, sizeof(big_payload), big_payload},
};

/* One of every message type from `from` to `to`, with an AppendEntries carrying entries
 * (one of 100 KiB) and a snapshot chunk of 100 KiB. */
static int samples(uint64_t from, uint64_t to, struct raft_message *out)
{
    for (size_t i = 0; i < sizeof(big_payload); i++)
        big_payload[i] = (uint8_t)(i * 31 + 7);
    int n = 0;
    struct raft_message m;
    m = h_msg(RAFT_MSG_VOTE, from, to, 7);
    m.u.vote.last_index = 100;
    m.u.vote.last_term = 6;
    m.u.vote.transfer = true;
    out[n++] = m;
    m = h_msg(RAFT_MSG_PREVOTE, from, to, 8);
    m.u.vote.last_index = 5;
    m.u.vote.last_term = 2;
    out[n++] = m;
    m = h_msg(RAFT_MSG_VOTE_RESP, from, to, 7);
    m.u.vote_resp.granted = true;
    out[n++] = m;
    m = h_msg(RAFT_MSG_PREVOTE_RESP, from, to, 8);
    out[n++] = m;
    m = h_msg(RAFT_MSG_APPEND, from, to, 4);
    m.u.append.prev_index = 10;
    m.u.append.prev_term = 3;
    m.u.append.commit = 9;
    m.u.append.read_seq = 77;
    m.u.append.entries = sample_entries;
    m.u.append.n_entries = 3;
    out[n++] = m;
    m = h_msg(RAFT_MSG_APPEND, from, to, 4);
    m.u.append.commit = 12;
    out[n++] = m;
    m = h_msg(RAFT_MSG_APPEND_RESP, from, to, 4);
    m.u.append_resp.reject = true;
    m.u.append_resp.index = 10;
    m.u.append_resp.hint_index = 4;
    m.u.append_resp.hint_term = 2;
    m.u.append_resp.read_seq = 77;
    out[n++] = m;
    m = h_msg(RAFT_MSG_SNAPSHOT, from, to, 4);
    m.u.snapshot.index = 50;
    m.u.snapshot.term = 3;
    m.u.snapshot.conf.n = 2;
    m.u.snapshot.conf.members[0].id = 1;
    m.u.snapshot.conf.members[0].role = RAFT_VOTER;
    m.u.snapshot.conf.members[1].id = 3;
    m.u.snapshot.conf.members[1].role = RAFT_LEARNER;
    m.u.snapshot.offset = 4096;
    m.u.snapshot.total = 4096 + sizeof(big_payload);
    m.u.snapshot.data = big_payload;
    m.u.snapshot.len = sizeof(big_payload);
    m.u.snapshot.done = true;
    out[n++] = m;
    m = h_msg(RAFT_MSG_SNAPSHOT_RESP, from, to, 4);
    m.u.snapshot_resp.index = 50;
    m.u.snapshot_resp.next_offset = 10;
    m.u.snapshot_resp.done = true;
    out[n++] = m;
    m = h_msg(RAFT_MSG_TIMEOUT_NOW, from, to, 4);
    out[n++] = m;
    return n;
}

/* The messages r received from `from`, in order, equal ms[0..n) byte for byte. */
static void assert_received(const struct rec *r, uint64_t from, const struct raft_message *ms,
                            int n)
{
    int k = 0;
    for (size_t i = 0; i < r->n; i++) {
        if (r->v[i].from != from)
            continue;
        assert_true(k < n);
        uint8_t *want;
        size_t len = h_encode(&ms[k], &want);
        assert_int_equal(r->v[i].len, len);
        assert_memory_equal(r->v[i].enc, want, len);
        free(want);
        k++;
    }
    assert_int_equal(k, n);
}

static void every_message_type_delivered_intact_both_ways(void **state)
{
    struct node a, b;
    node_start(&a, 1, 0, NULL);
    node_start(&b, 2, 0, NULL);
    node_link(&a, &b);
    struct raft_message ab[16], ba[16];
    int n = samples(1, 2, ab);
    samples(2, 1, ba);
    for (int i = 0; i < n; i++) {
        assert_int_equal(gw_transport_send(a.t, &ab[i]), 0);
        assert_int_equal(gw_transport_send(b.t, &ba[i]), 0);
    }
    struct node *ns[] = {&a, &b};
    struct count_cond ca = {&a.rec, (size_t)n}, cb = {&b.rec, (size_t)n};
    assert_true(pump(ns, 2, h_got_n, &ca, WAIT_MS));
    assert_true(pump(ns, 2, h_got_n, &cb, WAIT_MS));
    assert_received(&b.rec, 1, ab, n);
    assert_received(&a.rec, 2, ba, n);

    struct gw_transport_peer_stats st = peer_stats(&a, 2);
    assert_true(st.connected);
    assert_int_equal(st.sent_frames, n);
    assert_int_equal(st.recv_frames, n);
    assert_int_equal(st.queued_bytes, 0);
    assert_int_equal(st.queued_frames, 0);
    assert_int_equal(st.drops, 0);
    assert_int_equal(st.connects, 1);
    node_stop(&a);
    node_stop(&b);
}

static void three_nodes_exchange_every_type_in_every_direction(void **state)
{
    struct node nd[3];
    for (int i = 0; i < 3; i++)
        node_start(&nd[i], (uint64_t)(i + 1), 0, NULL);
    node_link(&nd[0], &nd[1]);
    node_link(&nd[0], &nd[2]);
    node_link(&nd[1], &nd[2]);
    struct raft_message ms[3][3][16];
    int n = 0;
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 3; j++) {
            if (i == j)
                continue;
            n = samples(nd[i].id, nd[j].id, ms[i][j]);
            for (int k = 0; k < n; k++)
                assert_int_equal(gw_transport_send(nd[i].t, &ms[i][j][k]), 0);
        }
    struct node *ns[] = {&nd[0], &nd[1], &nd[2]};
    for (int j = 0; j < 3; j++) {
        struct count_cond c = {&nd[j].rec, (size_t)(2 * n)};
        assert_true(pump(ns, 3, h_got_n, &c, WAIT_MS));
    }
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 3; j++)
            if (i != j)
                assert_received(&nd[j].rec, nd[i].id, ms[i][j], n);
    for (int i = 0; i < 3; i++) {
        struct gw_transport_stats st;
        gw_transport_stats(nd[i].t, &st);
        assert_int_equal(st.peers, 2);
        assert_int_equal(st.connected, 2);
        assert_int_equal(st.rejected_conns, 0);
        node_stop(&nd[i]);
    }
}

static void order_per_peer_is_preserved_under_load(void **state)
{
    struct node a, b;
    node_start(&a, 1, 0, NULL);
    node_start(&b, 2, 0, NULL);
    node_link(&a, &b);
    struct node *ns[] = {&a, &b};
    enum { N = 50000 };
    uint8_t data[300];
    memset(data, 0xab, sizeof(data));
    struct raft_entry e = {1, 1, RAFT_ENTRY_NORMAL, sizeof(data), data};
    /* Sent in bursts from both sides while pumping, so writes are partial and interleave. */
    for (uint64_t seq = 1; seq <= N; seq++) {
        struct raft_message m = h_heartbeat(1, 2, seq);
        if (seq % 3 == 0) {
            m.u.append.entries = &e;
            m.u.append.n_entries = 1;
        }
        assert_int_equal(gw_transport_send(a.t, &m), 0);
        struct raft_message r = h_heartbeat(2, 1, seq);
        assert_int_equal(gw_transport_send(b.t, &r), 0);
        if (seq % 5000 == 0)
            pump(ns, 2, NULL, NULL, 1);
    }
    struct count_cond ca = {&a.rec, N}, cb = {&b.rec, N};
    assert_true(pump(ns, 2, h_got_n, &cb, WAIT_MS));
    assert_true(pump(ns, 2, h_got_n, &ca, WAIT_MS));
    for (size_t i = 0; i < N; i++) {
        assert_int_equal(b.rec.v[i].seq, i + 1);
        assert_int_equal(a.rec.v[i].seq, i + 1);
    }
    node_stop(&a);
    node_stop(&b);
}

static void frame_over_max_is_not_sent_and_counted(void **state)
{
    struct gw_transport_options o;
    gw_transport_options_default(&o);
    o.max_frame_bytes = 4096;
    struct node a, b;
    node_start(&a, 1, 0, &o);
    node_start(&b, 2, 0, &o);
    node_link(&a, &b);
    static uint8_t data[8192];
    struct raft_entry e = {1, 1, RAFT_ENTRY_NORMAL, sizeof(data), data};
    struct raft_message big = h_heartbeat(1, 2, 1);
    big.u.append.entries = &e;
    big.u.append.n_entries = 1;
    assert_int_equal(gw_transport_send(a.t, &big), GW_TRANSPORT_ERR_TOO_BIG);
    struct raft_message hb = h_heartbeat(1, 2, 2);
    assert_int_equal(gw_transport_send(a.t, &hb), 0);
    struct node *ns[] = {&a, &b};
    struct count_cond c = {&b.rec, 1};
    assert_true(pump(ns, 2, h_got_n, &c, WAIT_MS));
    assert_int_equal(b.rec.n, 1);
    assert_int_equal(b.rec.v[0].seq, 2);
    struct gw_transport_peer_stats st = peer_stats(&a, 2);
    assert_int_equal(st.drops_too_big, 1);
    assert_int_equal(st.drops, 1);
    assert_int_equal(st.sent_frames, 1);
    node_stop(&a);
    node_stop(&b);
}

/* Bytes from a raw socket that says it is node 1: must close that connection, be counted, and
 * leave the transport serving the real node 1. */
struct hostile {
    const char *what;
    bool handshake;          /* send a valid handshake first */
    uint64_t hs_from, hs_to; /* when handshake */
    uint64_t hs_cluster;
    bool counts_frame;       /* a rejected frame, rather than a refused handshake */
};

static void send_hostile(int fd, const char *what)
{
    uint8_t *enc;
    struct raft_message hb = h_heartbeat(1, 2, 99);
    size_t len = h_encode(&hb, &enc);
    uint8_t hdr[GW_TRANSPORT_FRAME_HEADER];
    gw_transport_frame_header(hdr, enc, len);
    if (strcmp(what, "bad_crc") == 0) {
        hdr[5] ^= 0x40;
        raw_write(fd, hdr, sizeof(hdr));
        raw_write(fd, enc, len);
    } else if (strcmp(what, "bad_version") == 0) {
        hdr[4] = 77;
        raw_write(fd, hdr, sizeof(hdr));
        raw_write(fd, enc, len);
    } else if (strcmp(what, "too_big") == 0) {
        hdr[0] = hdr[1] = hdr[2] = 0xff;
        hdr[3] = 0x7f;
        raw_write(fd, hdr, sizeof(hdr));
    } else if (strcmp(what, "undecodable") == 0) {
        enc[1] = 200; /* unknown message type, valid CRC over it */
        raw_frame(fd, enc, len);
    } else if (strcmp(what, "wrong_from") == 0) {
        struct raft_message m = h_heartbeat(3, 2, 1);
        free(enc);
        len = h_encode(&m, &enc);
        raw_frame(fd, enc, len);
    } else if (strcmp(what, "garbage") == 0) {
        uint8_t junk[256];
        for (size_t i = 0; i < sizeof(junk); i++)
            junk[i] = (uint8_t)(i * 151 + 13);
        raw_write(fd, junk, sizeof(junk));
    }
    free(enc);
}

static void check_hostile(const struct hostile *h)
{
    struct node a, b;
    node_start(&a, 1, 0, NULL);
    node_start(&b, 2, 0, NULL);
    node_link(&a, &b);
    struct node *ns[] = {&a, &b};
    struct conn_cond cc = {&a, 2};
    assert_true(pump(ns, 2, h_connected, &cc, WAIT_MS));

    int fd = raw_connect(&b);
    if (h->handshake)
        raw_handshake(fd, h->hs_cluster, h->hs_from, h->hs_to);
    send_hostile(fd, h->what);
    assert_true(pump(ns, 2, raw_closed, &fd, WAIT_MS));
    close(fd);

    struct gw_transport_stats st;
    gw_transport_stats(b.t, &st);
    if (h->counts_frame)
        assert_int_equal(st.rejected_frames, 1);
    else
        assert_int_equal(st.rejected_conns, 1);
    assert_int_equal(b.rec.n, 0); /* nothing hostile was delivered */

    /* Node 1 (perhaps displaced by the impostor's handshake) reconnects and is served. */
    struct raft_message hb = h_heartbeat(1, 2, 5);
    assert_int_equal(gw_transport_send(a.t, &hb), 0);
    struct raft_message back = h_heartbeat(2, 1, 6);
    assert_int_equal(gw_transport_send(b.t, &back), 0);
    struct count_cond c1 = {&b.rec, 1}, c2 = {&a.rec, 1};
    assert_true(pump(ns, 2, h_got_n, &c1, WAIT_MS));
    assert_true(pump(ns, 2, h_got_n, &c2, WAIT_MS));
    assert_int_equal(b.rec.v[0].seq, 5);
    assert_int_equal(a.rec.v[0].seq, 6);
    node_stop(&a);
    node_stop(&b);
}

static void corrupt_crc_closes_connection_and_transport_keeps_working(void **state)
{
    struct hostile h = {"bad_crc", true, 1, 2, 0, true};
    check_hostile(&h);
}

static void bad_version_closes_connection_and_transport_keeps_working(void **state)
{
    struct hostile h = {"bad_version", true, 1, 2, 0, true};
    check_hostile(&h);
}

static void length_over_max_from_socket_closes_connection(void **state)
{
    struct hostile h = {"too_big", true, 1, 2, 0, true};
    check_hostile(&h);
}

static void undecodable_payload_closes_connection(void **state)
{
    struct hostile h = {"undecodable", true, 1, 2, 0, true};
    check_hostile(&h);
}

static void message_from_another_id_than_the_handshake_closes_connection(void **state)
{
    struct hostile h = {"wrong_from", true, 1, 2, 0, true};
    check_hostile(&h);
}

static void garbage_instead_of_handshake_is_refused(void **state)
{
    struct hostile h = {"garbage", false, 0, 0, 0, false};
    check_hostile(&h);
}

static void handshake_from_unknown_id_is_refused(void **state)
{
    struct hostile h = {"none", true, 9, 2, 0, false};
    check_hostile(&h);
}

static void handshake_claiming_to_be_ourselves_is_refused(void **state)
{
    struct hostile h = {"none", true, 2, 2, 0, false};
    check_hostile(&h);
}

static void handshake_from_another_cluster_is_refused(void **state)
{
    struct hostile h = {"none", true, 1, 2, 42, false};
    check_hostile(&h);
}

static void handshake_meant_for_another_node_is_refused(void **state)
{
    struct hostile h = {"none", true, 1, 3, 0, false};
    check_hostile(&h);
}

static void silent_connection_is_closed_after_handshake_timeout(void **state)
{
    struct gw_transport_options o;
    gw_transport_options_default(&o);
    o.handshake_timeout_ms = 100;
    struct node b;
    node_start(&b, 2, 0, &o);
    struct node *ns[] = {&b};
    int fd = raw_connect(&b);
    uint64_t t0 = h_now_ms();
    assert_true(pump(ns, 1, raw_closed, &fd, WAIT_MS));
    assert_true(h_now_ms() - t0 >= 90);
    close(fd);
    struct gw_transport_stats st;
    gw_transport_stats(b.t, &st);
    assert_int_equal(st.rejected_conns, 1);
    assert_int_equal(gw_transport_next_timeout_ms(b.t, h_now_ms()), -1);
    node_stop(&b);
}

/* A port nothing listens on (bound and released; good enough on a quiet loopback). */
static uint16_t free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    socklen_t len;
    struct sockaddr_storage a = h_loopback(0, &len);
    assert_int_equal(bind(fd, (struct sockaddr *)&a, len), 0);
    len = sizeof(a);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    close(fd);
    return ntohs(((struct sockaddr_in *)&a)->sin_port);
}

static void down_peer_queue_is_bounded_then_drains_when_it_comes_up(void **state)
{
    struct gw_transport_options o;
    gw_transport_options_default(&o);
    o.max_queue_bytes = 64 * 1024;
    struct node a, b;
    node_start(&a, 1, 0, &o);
    uint16_t port = free_port();
    socklen_t len;
    struct sockaddr_storage baddr = h_loopback(port, &len);
    assert_int_equal(gw_transport_set_peer(a.t, 2, &baddr, len), 0);

    uint64_t queued = 0, dropped = 0;
    for (uint64_t seq = 1; seq <= 5000; seq++) {
        struct raft_message hb = h_heartbeat(1, 2, seq);
        int rc = gw_transport_send(a.t, &hb);
        if (rc == 0)
            queued++;
        else {
            assert_int_equal(rc, GW_TRANSPORT_ERR_QUEUE_FULL);
            dropped++;
        }
    }
    assert_true(queued > 100 && dropped > 0);
    struct gw_transport_peer_stats st = peer_stats(&a, 2);
    assert_int_equal(st.queued_frames, queued);
    assert_true(st.queued_bytes <= o.max_queue_bytes);
    assert_int_equal(st.drops_queue_full, dropped);

    struct node *ns[] = {&a, NULL};
    pump(ns, 1, NULL, NULL, 300); /* dials fail meanwhile */
    st = peer_stats(&a, 2);
    assert_false(st.connected);
    assert_true(st.failures >= 2);
    assert_int_equal(st.queued_frames, queued);

    node_start(&b, 2, port, &o);
    assert_int_equal(gw_transport_set_peer(b.t, 1, &a.addr, a.addr_len), 0);
    ns[1] = &b;
    struct count_cond c = {&b.rec, queued};
    assert_true(pump(ns, 2, h_got_n, &c, WAIT_MS));
    for (size_t i = 0; i < queued; i++)
        assert_int_equal(b.rec.v[i].seq, i + 1); /* the first ones were kept, in order */
    st = peer_stats(&a, 2);
    assert_true(st.connected);
    assert_int_equal(st.queued_bytes, 0);
    assert_int_equal(st.sent_frames, queued);
    node_stop(&a);
    node_stop(&b);
}

static void dead_peer_is_retried_with_backoff_not_in_a_tight_loop(void **state)
{
    struct node a;
    node_start(&a, 1, 0, NULL); /* 50 ms doubling to 2 s, jittered */
    socklen_t len;
    struct sockaddr_storage dead = h_loopback(free_port(), &len);
    assert_int_equal(gw_transport_set_peer(a.t, 2, &dead, len), 0);
    assert_int_equal(gw_transport_next_timeout_ms(a.t, h_now_ms()), 0);
    struct node *ns[] = {&a};
    pump(ns, 1, NULL, NULL, 600);
    struct gw_transport_peer_stats st = peer_stats(&a, 2);
    /* Attempts at about 0, 25-50, 75-150, 175-350, 375-750 ms. */
    assert_true(st.failures >= 3);
    assert_true(st.failures <= 6);
    int wait = gw_transport_next_timeout_ms(a.t, h_now_ms());
    assert_true(wait >= 0 && wait <= 2000);
    node_stop(&a);
}

static void restarted_acceptor_on_same_port_is_reconnected(void **state)
{
    struct node a, b;
    node_start(&a, 1, 0, NULL);
    node_start(&b, 2, 0, NULL);
    node_link(&a, &b);
    struct node *ns[] = {&a, &b};
    struct raft_message hb = h_heartbeat(1, 2, 1);
    assert_int_equal(gw_transport_send(a.t, &hb), 0);
    struct count_cond c = {&b.rec, 1};
    assert_true(pump(ns, 2, h_got_n, &c, WAIT_MS));

    uint16_t port = h_port(&b);
    node_stop(&b);
    pump(ns, 1, NULL, NULL, 50);
    node_start(&b, 2, port, NULL);
    assert_int_equal(gw_transport_set_peer(b.t, 1, &a.addr, a.addr_len), 0);
    hb = h_heartbeat(1, 2, 2);
    assert_int_equal(gw_transport_send(a.t, &hb), 0);
    struct raft_message back = h_heartbeat(2, 1, 3);
    assert_int_equal(gw_transport_send(b.t, &back), 0);
    struct count_cond c1 = {&b.rec, 1}, c2 = {&a.rec, 1};
    assert_true(pump(ns, 2, h_got_n, &c1, WAIT_MS));
    assert_true(pump(ns, 2, h_got_n, &c2, WAIT_MS));
    assert_int_equal(b.rec.v[0].seq, 2);
    assert_int_equal(a.rec.v[0].seq, 3);
    struct gw_transport_peer_stats st = peer_stats(&a, 2);
    assert_int_equal(st.reconnects, 1);
    node_stop(&a);
    node_stop(&b);
}

static void restarted_dialer_on_same_port_replaces_its_old_connection(void **state)
{
    struct node a, b;
    node_start(&a, 1, 0, NULL);
    node_start(&b, 2, 0, NULL);
    node_link(&a, &b);
    struct node *ns[] = {&a, &b};
    struct conn_cond cc = {&b, 1};
    assert_true(pump(ns, 2, h_connected, &cc, WAIT_MS));

    uint16_t port = h_port(&a);
    node_stop(&a);
    node_start(&a, 1, port, NULL);
    assert_int_equal(gw_transport_set_peer(a.t, 2, &b.addr, b.addr_len), 0);
    struct raft_message back = h_heartbeat(2, 1, 7);
    assert_int_equal(gw_transport_send(b.t, &back), 0);
    struct count_cond c = {&a.rec, 1};
    assert_true(pump(ns, 2, h_got_n, &c, WAIT_MS));
    assert_int_equal(a.rec.v[0].seq, 7);
    struct gw_transport_peer_stats st = peer_stats(&b, 1);
    assert_true(st.connected);
    assert_int_equal(st.reconnects, 1);
    node_stop(&a);
    node_stop(&b);
}

static void remove_peer_closes_its_connection_and_drops_later_sends(void **state)
{
    struct node a, b;
    node_start(&a, 1, 0, NULL);
    node_start(&b, 2, 0, NULL);
    node_link(&a, &b);
    struct node *ns[] = {&a, &b};
    struct conn_cond cc = {&b, 1};
    assert_true(pump(ns, 2, h_connected, &cc, WAIT_MS));

    assert_int_equal(gw_transport_remove_peer(b.t, 1), 0);
    assert_int_equal(gw_transport_remove_peer(b.t, 1), GW_TRANSPORT_ERR_UNKNOWN_PEER);
    struct raft_message back = h_heartbeat(2, 1, 1);
    assert_int_equal(gw_transport_send(b.t, &back), GW_TRANSPORT_ERR_UNKNOWN_PEER);
    struct gw_transport_stats st;
    gw_transport_stats(b.t, &st);
    assert_int_equal(st.drops_unknown_peer, 1);
    assert_int_equal(st.peers, 0);

    /* Node 1 sees the close; its redials are refused since node 2 no longer knows it. */
    pump(ns, 2, NULL, NULL, 300);
    struct gw_transport_peer_stats ps = peer_stats(&a, 2);
    assert_false(ps.connected);
    assert_true(ps.failures >= 1);
    gw_transport_stats(b.t, &st);
    assert_true(st.rejected_conns >= 1);
    node_stop(&a);
    node_stop(&b);
}

/* Removing the sender from inside the callback that delivers its message is safe. */
static struct gw_transport *removing_t;
static int removed_calls;

static void remove_sender(const struct raft_message *m, void *ctx)
{
    removed_calls++;
    assert_int_equal(gw_transport_remove_peer(removing_t, m->from), 0);
}

static void remove_peer_from_inside_the_callback_is_safe(void **state)
{
    struct node a;
    node_start(&a, 1, 0, NULL);
    struct gw_transport *b;
    socklen_t len;
    struct sockaddr_storage any = h_loopback(0, &len);
    assert_int_equal(gw_transport_new(2, &any, len, NULL, remove_sender, NULL, &b), 0);
    removing_t = b;
    removed_calls = 0;
    struct sockaddr_storage baddr;
    assert_int_equal(gw_transport_local_addr(b, &baddr, &len), 0);
    assert_int_equal(gw_transport_set_peer(a.t, 2, &baddr, len), 0);
    assert_int_equal(gw_transport_set_peer(b, 1, &a.addr, a.addr_len), 0);
    for (uint64_t i = 1; i <= 100; i++) {
        struct raft_message hb = h_heartbeat(1, 2, i);
        assert_int_equal(gw_transport_send(a.t, &hb), 0);
    }
    struct node bn = {.id = 2, .t = b};
    struct node *ns[] = {&a, &bn};
    pump(ns, 2, NULL, NULL, 200);
    assert_int_equal(removed_calls, 1); /* the rest of the buffer was not delivered */
    gw_transport_free(b);
    node_stop(&a);
}

static void changing_a_peer_address_moves_the_connection(void **state)
{
    struct node a, b, c;
    node_start(&a, 1, 0, NULL);
    node_start(&b, 2, 0, NULL);
    node_start(&c, 2, 0, NULL); /* node 2 moved to another address */
    node_link(&a, &b);
    assert_int_equal(gw_transport_set_peer(c.t, 1, &a.addr, a.addr_len), 0);
    struct node *ns[] = {&a, &b, &c};
    struct conn_cond cc = {&a, 2};
    assert_true(pump(ns, 3, h_connected, &cc, WAIT_MS));
    assert_int_equal(gw_transport_set_peer(a.t, 2, &c.addr, c.addr_len), 0);
    struct raft_message hb = h_heartbeat(1, 2, 3);
    assert_int_equal(gw_transport_send(a.t, &hb), 0);
    struct count_cond got = {&c.rec, 1};
    assert_true(pump(ns, 3, h_got_n, &got, WAIT_MS));
    assert_int_equal(b.rec.n, 0);
    node_stop(&a);
    node_stop(&b);
    node_stop(&c);
}

static void crc32c_matches_the_standard_check_value(void **state)
{
    assert_int_equal(gw_transport_crc32c(0, "123456789", 9), 0xE3069283u);
    /* Every length and alignment agrees with a bit-at-a-time reference. */
    uint8_t buf[300];
    for (size_t i = 0; i < sizeof(buf); i++)
        buf[i] = (uint8_t)(i * 7 + 3);
    for (size_t off = 0; off < 8; off++)
        for (size_t len = 0; len + off <= sizeof(buf); len += 13) {
            uint32_t c = 0xffffffffu;
            for (size_t i = 0; i < len; i++) {
                c ^= buf[off + i];
                for (int k = 0; k < 8; k++)
                    c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
            }
            assert_int_equal(gw_transport_crc32c(0, buf + off, len), ~c);
        }
    /* Continuing a CRC equals computing it in one go. */
    uint32_t part = gw_transport_crc32c(0, buf, 100);
    assert_int_equal(gw_transport_crc32c(part, buf + 100, 200), gw_transport_crc32c(0, buf, 300));
}

static void bad_arguments_are_refused(void **state)
{
    socklen_t len;
    struct sockaddr_storage a = h_loopback(0, &len);
    struct gw_transport *t = NULL;
    struct rec r = {0};
    assert_int_equal(gw_transport_new(0, &a, len, NULL, h_on_message, &r, &t),
                     GW_TRANSPORT_ERR_INVALID);
    struct gw_transport_options o;
    gw_transport_options_default(&o);
    o.max_frame_bytes = 8;
    assert_int_equal(gw_transport_new(1, &a, len, &o, h_on_message, &r, &t),
                     GW_TRANSPORT_ERR_INVALID);
    assert_null(t);
    assert_int_equal(gw_transport_new(1, &a, len, NULL, h_on_message, &r, &t), 0);
    assert_int_equal(gw_transport_set_peer(t, 1, &a, len), GW_TRANSPORT_ERR_INVALID);
    assert_int_equal(gw_transport_set_peer(t, 0, &a, len), GW_TRANSPORT_ERR_INVALID);
    assert_int_equal(gw_transport_set_peer(t, 2, &a, 3), GW_TRANSPORT_ERR_INVALID);
    assert_int_equal(gw_transport_set_peer(t, 2, &a, len), 0);
    struct raft_message forged = h_heartbeat(3, 2, 1); /* not from this node */
    assert_int_equal(gw_transport_send(t, &forged), GW_TRANSPORT_ERR_INVALID);
    struct raft_message bad_type = h_msg(99, 1, 2, 1);
    assert_int_equal(gw_transport_send(t, &bad_type), GW_TRANSPORT_ERR_INVALID);
    struct gw_transport_peer_stats ps;
    assert_int_equal(gw_transport_peer_stats(t, 2, &ps), 0);
    assert_int_equal(ps.queued_frames, 0);
    assert_int_equal(ps.drops, 1);
    assert_int_equal(gw_transport_peer_stats(t, 3, &ps), GW_TRANSPORT_ERR_UNKNOWN_PEER);
    assert_string_equal(gw_transport_errname(GW_TRANSPORT_ERR_QUEUE_FULL), "queue_full");
    assert_string_equal(gw_transport_strerror(GW_TRANSPORT_ERR_BAD_CRC), "frame checksum mismatch");
    gw_transport_free(t);
}

static void ipv6_loopback_works(void **state)
{
    struct sockaddr_storage a6;
    memset(&a6, 0, sizeof(a6));
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&a6;
    in6->sin6_family = AF_INET6;
    in6->sin6_addr = in6addr_loopback;
    struct node a, b;
    memset(&a, 0, sizeof(a));
    memset(&b, 0, sizeof(b));
    a.id = 1;
    b.id = 2;
    if (gw_transport_new(1, &a6, sizeof(*in6), NULL, h_on_message, &a.rec, &a.t) != 0)
        skip(); /* no IPv6 here */
    assert_int_equal(gw_transport_new(2, &a6, sizeof(*in6), NULL, h_on_message, &b.rec, &b.t), 0);
    assert_int_equal(gw_transport_local_addr(a.t, &a.addr, &a.addr_len), 0);
    assert_int_equal(gw_transport_local_addr(b.t, &b.addr, &b.addr_len), 0);
    node_link(&a, &b);
    struct raft_message hb = h_heartbeat(1, 2, 9);
    assert_int_equal(gw_transport_send(a.t, &hb), 0);
    struct node *ns[] = {&a, &b};
    struct count_cond c = {&b.rec, 1};
    assert_true(pump(ns, 2, h_got_n, &c, WAIT_MS));
    assert_int_equal(b.rec.v[0].seq, 9);
    node_stop(&a);
    node_stop(&b);
}

static struct gw_transport *nested_t;
static int nested_rc = 1;

static void run_again(const struct raft_message *m, void *ctx)
{
    nested_rc = gw_transport_run(nested_t, h_now_ms());
}

static void run_from_inside_the_callback_is_refused(void **state)
{
    struct node a;
    node_start(&a, 1, 0, NULL);
    socklen_t len;
    struct sockaddr_storage any = h_loopback(0, &len);
    assert_int_equal(gw_transport_new(2, &any, len, NULL, run_again, NULL, &nested_t), 0);
    struct node bn;
    memset(&bn, 0, sizeof(bn));
    bn.id = 2;
    bn.t = nested_t;
    assert_int_equal(gw_transport_local_addr(nested_t, &bn.addr, &bn.addr_len), 0);
    node_link(&a, &bn);
    struct raft_message hb = h_heartbeat(1, 2, 1);
    assert_int_equal(gw_transport_send(a.t, &hb), 0);
    struct node *ns[] = {&a, &bn};
    struct conn_cond cc = {&bn, 1};
    assert_true(pump(ns, 2, h_connected, &cc, WAIT_MS));
    pump(ns, 2, NULL, NULL, 50);
    assert_int_equal(nested_rc, GW_TRANSPORT_ERR_INVALID);
    gw_transport_free(nested_t);
    node_stop(&a);
}

static void listener_pauses_when_out_of_descriptors_instead_of_spinning(void **state)
{
    struct node a, b;
    node_start(&a, 1, 0, NULL);
    node_start(&b, 2, 0, NULL);
    int fd = raw_connect(&b); /* completes in the kernel's backlog, not yet accepted */
    struct rlimit old;
    assert_int_equal(getrlimit(RLIMIT_NOFILE, &old), 0);
    int lowest = dup(0);
    assert_true(lowest >= 0);
    close(lowest);
    struct rlimit tight = old;
    tight.rlim_cur = (rlim_t)lowest; /* no new descriptor can be made */
    assert_int_equal(setrlimit(RLIMIT_NOFILE, &tight), 0);
    assert_int_equal(gw_transport_run(b.t, h_now_ms()), 0);
    int wait = gw_transport_next_timeout_ms(b.t, h_now_ms());
    struct pollfd pfd = {.fd = gw_transport_fd(b.t), .events = POLLIN};
    int ready = poll(&pfd, 1, 20);
    assert_int_equal(setrlimit(RLIMIT_NOFILE, &old), 0);
    assert_true(wait > 0 && wait <= 100); /* a timer to retry, */
    assert_int_equal(ready, 0);           /* and no busy wake-ups meanwhile */

    /* With descriptors back the connection is accepted and served. */
    raw_handshake(fd, 0, 1, 2);
    assert_int_equal(gw_transport_set_peer(b.t, 1, &a.addr, a.addr_len), 0);
    struct node *ns[] = {&b};
    struct conn_cond cc = {&b, 1};
    assert_true(pump(ns, 1, h_connected, &cc, WAIT_MS));
    close(fd);
    node_stop(&a);
    node_stop(&b);
}

static void frame_cut_by_a_broken_connection_is_dropped_and_the_rest_follow_whole(void **state)
{
    struct gw_transport_options o;
    gw_transport_options_default(&o);
    o.max_frame_bytes = 48u << 20;
    o.max_queue_bytes = 64u << 20;
    struct node a, b;
    node_start(&a, 1, 0, &o);
    node_start(&b, 2, 0, &o);
    node_link(&a, &b);
    struct node *ns[] = {&a, &b};
    struct conn_cond cc = {&a, 2};
    assert_true(pump(ns, 2, h_connected, &cc, WAIT_MS));

    /* A 40 MiB snapshot chunk, then three heartbeats; node 2 does not read, so the kernel
     * buffers fill with part of the chunk. */
    size_t big = 40u << 20;
    uint8_t *data = calloc(1, big);
    assert_non_null(data);
    struct raft_message snap = h_msg(RAFT_MSG_SNAPSHOT, 1, 2, 3);
    snap.u.snapshot.index = 10;
    snap.u.snapshot.term = 2;
    snap.u.snapshot.total = big;
    snap.u.snapshot.len = (uint32_t)big;
    snap.u.snapshot.data = data;
    assert_int_equal(gw_transport_send(a.t, &snap), 0);
    free(data);
    for (uint64_t seq = 1; seq <= 3; seq++) {
        struct raft_message hb = h_heartbeat(1, 2, seq);
        assert_int_equal(gw_transport_send(a.t, &hb), 0);
    }
    pump(ns, 1, NULL, NULL, 100);
    struct gw_transport_peer_stats st = peer_stats(&a, 2);
    assert_int_equal(st.sent_frames, 0);
    assert_int_equal(st.queued_frames, 4);
    assert_true(st.sent_bytes > 0); /* the chunk is half written */

    uint16_t port = h_port(&b);
    node_stop(&b);
    node_start(&b, 2, port, &o);
    assert_int_equal(gw_transport_set_peer(b.t, 1, &a.addr, a.addr_len), 0);
    struct count_cond c = {&b.rec, 3};
    assert_true(pump(ns, 2, h_got_n, &c, WAIT_MS));
    pump(ns, 2, NULL, NULL, 50);
    assert_int_equal(b.rec.n, 3);
    for (size_t i = 0; i < 3; i++) {
        assert_int_equal(b.rec.v[i].type, RAFT_MSG_APPEND);
        assert_int_equal(b.rec.v[i].seq, i + 1);
    }
    st = peer_stats(&a, 2);
    assert_int_equal(st.drops, 1);
    assert_int_equal(st.sent_frames, 3);
    assert_int_equal(st.queued_bytes, 0);
    struct gw_transport_stats bs;
    gw_transport_stats(b.t, &bs);
    assert_int_equal(bs.rejected_frames, 0);
    node_stop(&a);
    node_stop(&b);
}

/* A raw listener standing in for node 2, to see node 1's side of the wire from outside. */
struct raw_listener {
    int lfd, fd;
    uint8_t buf[4096];
    size_t len;
    struct sockaddr_storage addr;
    socklen_t addr_len;
};

static void raw_listen(struct raw_listener *l)
{
    memset(l, 0, sizeof(*l));
    l->fd = -1;
    l->lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    assert_true(l->lfd >= 0);
    struct sockaddr_storage a = h_loopback(0, &l->addr_len);
    assert_int_equal(bind(l->lfd, (struct sockaddr *)&a, l->addr_len), 0);
    assert_int_equal(listen(l->lfd, 4), 0);
    l->addr_len = sizeof(l->addr);
    assert_int_equal(getsockname(l->lfd, (struct sockaddr *)&l->addr, &l->addr_len), 0);
}

/* Accepts (once) and reads until `want` bytes are buffered. */
static size_t raw_want;

static bool raw_has_bytes(void *arg)
{
    struct raw_listener *l = arg;
    if (l->fd < 0) {
        l->fd = accept4(l->lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (l->fd < 0)
            return false;
    }
    ssize_t r = recv(l->fd, l->buf + l->len, sizeof(l->buf) - l->len, 0);
    if (r > 0)
        l->len += (size_t)r;
    return l->len >= raw_want;
}

static uint64_t get64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

static void dialer_speaks_the_documented_wire_format(void **state)
{
    struct gw_transport_options o;
    gw_transport_options_default(&o);
    o.cluster_id = 0xC1;
    struct node a;
    node_start(&a, 1, 0, &o);
    struct raw_listener l;
    raw_listen(&l);
    assert_int_equal(gw_transport_set_peer(a.t, 2, &l.addr, l.addr_len), 0);
    struct raft_message hb = h_heartbeat(1, 2, 31);
    assert_int_equal(gw_transport_send(a.t, &hb), 0);

    /* u32 length 28 | u8 version 1 | u32 crc32c | "GWRT" cluster from to */
    struct node *ns[] = {&a};
    raw_want = GW_TRANSPORT_FRAME_HEADER + 28;
    assert_true(pump(ns, 1, raw_has_bytes, &l, WAIT_MS));
    assert_int_equal(l.len, raw_want); /* nothing else before our answer */
    assert_int_equal(l.buf[0] | l.buf[1] << 8 | l.buf[2] << 16 | l.buf[3] << 24, 28);
    assert_int_equal(l.buf[4], 1);
    size_t plen = 0;
    assert_int_equal(gw_transport_frame_check(l.buf, l.len, 28, &plen), 1);
    const uint8_t *hs = l.buf + GW_TRANSPORT_FRAME_HEADER;
    assert_memory_equal(hs, "GWRT", 4);
    assert_int_equal(get64(hs + 4), 0xC1);
    assert_int_equal(get64(hs + 12), 1);
    assert_int_equal(get64(hs + 20), 2);
    assert_false(peer_stats(&a, 2).connected);

    raw_handshake(l.fd, 0xC1, 2, 1);
    uint8_t *enc;
    size_t elen = h_encode(&hb, &enc);
    l.len = 0;
    raw_want = GW_TRANSPORT_FRAME_HEADER + elen;
    assert_true(pump(ns, 1, raw_has_bytes, &l, WAIT_MS));
    assert_int_equal(gw_transport_frame_check(l.buf, l.len, 1 << 20, &plen), 1);
    assert_int_equal(plen, elen);
    assert_memory_equal(l.buf + GW_TRANSPORT_FRAME_HEADER, enc, elen);
    free(enc);
    assert_true(peer_stats(&a, 2).connected);
    close(l.fd);
    close(l.lfd);
    node_stop(&a);
}

static void dialer_refuses_an_answer_from_the_wrong_node(void **state)
{
    struct node a;
    node_start(&a, 1, 0, NULL);
    struct raw_listener l;
    raw_listen(&l);
    assert_int_equal(gw_transport_set_peer(a.t, 2, &l.addr, l.addr_len), 0);
    struct node *ns[] = {&a};
    raw_want = GW_TRANSPORT_FRAME_HEADER + 28;
    assert_true(pump(ns, 1, raw_has_bytes, &l, WAIT_MS));
    raw_handshake(l.fd, 0, 7, 1); /* someone else lives at that address */
    assert_true(pump(ns, 1, raw_closed, &l.fd, WAIT_MS));
    struct gw_transport_peer_stats st = peer_stats(&a, 2);
    assert_false(st.connected);
    assert_int_equal(st.connects, 0);
    assert_int_equal(st.failures, 1);
    struct gw_transport_stats ts;
    gw_transport_stats(a.t, &ts);
    assert_int_equal(ts.rejected_conns, 1);
    assert_true(gw_transport_next_timeout_ms(a.t, h_now_ms()) > 0); /* backing off */
    close(l.fd);
    close(l.lfd);
    node_stop(&a);
}

static void dialer_gives_up_on_a_silent_acceptor_after_the_handshake_timeout(void **state)
{
    struct gw_transport_options o;
    gw_transport_options_default(&o);
    o.handshake_timeout_ms = 100;
    struct node a;
    node_start(&a, 1, 0, &o);
    struct raw_listener l;
    raw_listen(&l);
    assert_int_equal(gw_transport_set_peer(a.t, 2, &l.addr, l.addr_len), 0);
    struct node *ns[] = {&a};
    raw_want = GW_TRANSPORT_FRAME_HEADER + 28;
    assert_true(pump(ns, 1, raw_has_bytes, &l, WAIT_MS));
    assert_true(pump(ns, 1, raw_closed, &l.fd, WAIT_MS));
    assert_int_equal(peer_stats(&a, 2).failures, 1);
    close(l.fd);
    close(l.lfd);
    node_stop(&a);
}

static void stalled_peer_fills_its_queue_to_the_bound_then_drops_and_recovers(void **state)
{
    struct gw_transport_options o;
    gw_transport_options_default(&o);
    o.max_queue_bytes = 1u << 20;
    struct node a, b;
    node_start(&a, 1, 0, &o);
    node_start(&b, 2, 0, &o);
    node_link(&a, &b);
    struct node *ns[] = {&a, &b};
    struct conn_cond cc = {&a, 2};
    assert_true(pump(ns, 2, h_connected, &cc, WAIT_MS));

    /* Node 2 stops reading; node 1 keeps sending 4 KiB entries while running. */
    static uint8_t data[4096];
    struct raft_entry e = {1, 1, RAFT_ENTRY_NORMAL, sizeof(data), data};
    uint64_t accepted = 0, full = 0;
    for (uint64_t seq = 1; full < 100 && seq < 1000000; seq++) {
        struct raft_message m = h_heartbeat(1, 2, seq);
        m.u.append.entries = &e;
        m.u.append.n_entries = 1;
        int rc = gw_transport_send(a.t, &m);
        if (rc == 0)
            accepted++;
        else {
            assert_int_equal(rc, GW_TRANSPORT_ERR_QUEUE_FULL);
            full++;
        }
        if (seq % 64 == 0)
            assert_int_equal(gw_transport_run(a.t, h_now_ms()), 0);
        assert_true(peer_stats(&a, 2).queued_bytes <= o.max_queue_bytes);
    }
    assert_int_equal(full, 100);
    struct gw_transport_peer_stats st = peer_stats(&a, 2);
    assert_true(st.connected); /* a slow peer is not a dead one */
    assert_int_equal(st.drops_queue_full, 100);

    /* Node 2 reads again: everything accepted arrives. */
    struct count_cond c = {&b.rec, accepted};
    assert_true(pump(ns, 2, h_got_n, &c, WAIT_MS));
    assert_int_equal(b.rec.n, accepted);
    assert_int_equal(peer_stats(&a, 2).queued_bytes, 0);
    node_stop(&a);
    node_stop(&b);
}

/* The node thread adds the transport's fd to its own epoll and runs it when that fires. */
static void transport_fd_wakes_the_node_threads_own_epoll(void **state)
{
    struct node a, b;
    node_start(&a, 1, 0, NULL);
    node_start(&b, 2, 0, NULL);
    node_link(&a, &b);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    assert_true(ep >= 0);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 2};
    assert_int_equal(epoll_ctl(ep, EPOLL_CTL_ADD, gw_transport_fd(b.t), &ev), 0);
    struct raft_message hb = h_heartbeat(1, 2, 11);
    assert_int_equal(gw_transport_send(a.t, &hb), 0);
    uint64_t end = h_now_ms() + WAIT_MS;
    while (b.rec.n == 0 && h_now_ms() < end) {
        assert_int_equal(gw_transport_run(a.t, h_now_ms()), 0);
        int wait = gw_transport_next_timeout_ms(b.t, h_now_ms());
        struct epoll_event got;
        int n = epoll_wait(ep, &got, 1, wait < 0 || wait > 5 ? 5 : wait);
        if (n == 1)
            assert_int_equal(got.data.u64, 2);
        assert_int_equal(gw_transport_run(b.t, h_now_ms()), 0);
    }
    assert_int_equal(b.rec.n, 1);
    assert_int_equal(b.rec.v[0].seq, 11);
    /* Nothing left to do: the fd is quiet and no timer is due. */
    assert_int_equal(gw_transport_run(b.t, h_now_ms()), 0);
    struct epoll_event got;
    assert_int_equal(epoll_wait(ep, &got, 1, 20), 0);
    assert_int_equal(gw_transport_next_timeout_ms(b.t, h_now_ms()), -1);
    close(ep);
    node_stop(&a);
    node_stop(&b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(crc32c_matches_the_standard_check_value),
        cmocka_unit_test(bad_arguments_are_refused),
        cmocka_unit_test(every_message_type_delivered_intact_both_ways),
        cmocka_unit_test(three_nodes_exchange_every_type_in_every_direction),
        cmocka_unit_test(order_per_peer_is_preserved_under_load),
        cmocka_unit_test(frame_over_max_is_not_sent_and_counted),
        cmocka_unit_test(corrupt_crc_closes_connection_and_transport_keeps_working),
        cmocka_unit_test(bad_version_closes_connection_and_transport_keeps_working),
        cmocka_unit_test(length_over_max_from_socket_closes_connection),
        cmocka_unit_test(undecodable_payload_closes_connection),
        cmocka_unit_test(message_from_another_id_than_the_handshake_closes_connection),
        cmocka_unit_test(garbage_instead_of_handshake_is_refused),
        cmocka_unit_test(handshake_from_unknown_id_is_refused),
        cmocka_unit_test(handshake_claiming_to_be_ourselves_is_refused),
        cmocka_unit_test(handshake_from_another_cluster_is_refused),
        cmocka_unit_test(handshake_meant_for_another_node_is_refused),
        cmocka_unit_test(silent_connection_is_closed_after_handshake_timeout),
        cmocka_unit_test(down_peer_queue_is_bounded_then_drains_when_it_comes_up),
        cmocka_unit_test(dead_peer_is_retried_with_backoff_not_in_a_tight_loop),
        cmocka_unit_test(stalled_peer_fills_its_queue_to_the_bound_then_drops_and_recovers),
        cmocka_unit_test(restarted_acceptor_on_same_port_is_reconnected),
        cmocka_unit_test(restarted_dialer_on_same_port_replaces_its_old_connection),
        cmocka_unit_test(remove_peer_closes_its_connection_and_drops_later_sends),
        cmocka_unit_test(remove_peer_from_inside_the_callback_is_safe),
        cmocka_unit_test(changing_a_peer_address_moves_the_connection),
        cmocka_unit_test(frame_cut_by_a_broken_connection_is_dropped_and_the_rest_follow_whole),
        cmocka_unit_test(ipv6_loopback_works),
        cmocka_unit_test(transport_fd_wakes_the_node_threads_own_epoll),
        cmocka_unit_test(dialer_speaks_the_documented_wire_format),
        cmocka_unit_test(dialer_refuses_an_answer_from_the_wrong_node),
        cmocka_unit_test(dialer_gives_up_on_a_silent_acceptor_after_the_handshake_timeout),
        cmocka_unit_test(run_from_inside_the_callback_is_refused),
        cmocka_unit_test(listener_pauses_when_out_of_descriptors_instead_of_spinning),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
