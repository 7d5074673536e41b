/*
 * test_transport_raft.c - three real Raft cores talking through three transports over TCP on
 * 127.0.0.1, each driven the way the node thread will drive it (run the transport, tick every
 * 10 ms, take the update, send its messages, apply, advance; persistence is instant and in
 * memory). A leader is elected and commits batches; the leader is then cut off (its transport
 * closed while its core keeps running), the other two elect a new leader and commit more, and
 * when the cut-off node's transport comes back on the same port it catches up. Every node must
 * apply the same entries in the same order.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#include "harness.h"

#define N 3
#define TICK_MS 10
#define ENTRY_BYTES 1024
#define MAX_APPLIED 1024

struct rnode {
    uint64_t id;
    struct raft *r;
    struct gw_transport *t;
    uint16_t port;
    uint32_t applied[MAX_APPLIED]; /* CRC of each applied normal entry, in order */
    size_t n_applied;
};

static struct rnode nodes[N];

static void on_message(const struct raft_message *m, void *ctx)
{
    struct rnode *n = ctx;
    raft_step(n->r, m);
}

static void start_transport(struct rnode *n)
{
    socklen_t len;
    struct sockaddr_storage a = h_loopback(n->port, &len);
    assert_int_equal(gw_transport_new(n->id, &a, len, NULL, on_message, n, &n->t), 0);
    struct sockaddr_storage got;
    assert_int_equal(gw_transport_local_addr(n->t, &got, &len), 0);
    n->port = ntohs(((struct sockaddr_in *)&got)->sin_port);
}

static void link_all(void)
{
    for (int i = 0; i < N; i++)
        for (int j = 0; j < N; j++) {
            if (i == j || nodes[i].t == NULL)
                continue;
            socklen_t len;
            struct sockaddr_storage a = h_loopback(nodes[j].port, &len);
            assert_int_equal(gw_transport_set_peer(nodes[i].t, nodes[j].id, &a, len), 0);
        }
}

static void process(struct rnode *n)
{
    while (raft_has_ready(n->r)) {
        struct raft_update u;
        assert_int_equal(raft_ready(n->r, &u), 0);
        for (size_t i = 0; i < u.n_messages; i++)
            if (n->t != NULL)
                gw_transport_send(n->t, &u.messages[i]);
        for (size_t i = 0; i < u.n_committed; i++) {
            const struct raft_entry *e = &u.committed[i];
            if (e->type != RAFT_ENTRY_NORMAL)
                continue;
            assert_true(n->n_applied < MAX_APPLIED);
            n->applied[n->n_applied++] = gw_transport_crc32c(0, e->data, e->len);
        }
        assert_int_equal(raft_advance(n->r, &u), 0);
    }
}

static uint64_t next_tick_ms;

/* One loop turn for every node; ticks every TICK_MS. */
static void step_all(void)
{
    uint64_t now = h_now_ms();
    bool tick = now >= next_tick_ms;
    if (tick)
        next_tick_ms = now + TICK_MS;
    struct pollfd pfd[N];
    int k = 0;
    for (int i = 0; i < N; i++) {
        struct rnode *n = &nodes[i];
        if (n->t != NULL)
            assert_int_equal(gw_transport_run(n->t, now), 0);
        if (tick)
            raft_tick(n->r);
        process(n);
        if (n->t != NULL) {
            pfd[k].fd = gw_transport_fd(n->t);
            pfd[k++].events = POLLIN;
        }
    }
    for (int i = 0; i < N; i++)
        if (nodes[i].t != NULL)
            gw_transport_run(nodes[i].t, h_now_ms()); /* flush what the updates queued */
    poll(pfd, (nfds_t)k, 1);
}

static int leader(int except)
{
    for (int i = 0; i < N; i++) {
        if (i == except)
            continue;
        struct raft_status st;
        raft_status(nodes[i].r, &st);
        if (st.role == RAFT_LEADER)
            return i;
    }
    return -1;
}

/* Runs until some node other than `except` leads and has committed an entry of its term. */
static int wait_leader(int except)
{
    uint64_t end = h_now_ms() + 10000;
    while (h_now_ms() < end) {
        step_all();
        int l = leader(except);
        if (l >= 0) {
            struct raft_status st;
            raft_status(nodes[l].r, &st);
            uint64_t term = 0;
            if (raft_term_at(nodes[l].r, st.commit, &term) && term == st.term)
                return l;
        }
    }
    fail_msg("no leader within 10 s");
    return -1;
}

static uint64_t proposed;

static void propose(int l, int count)
{
    uint8_t data[ENTRY_BYTES];
    for (int i = 0; i < count; i++) {
        proposed++;
        for (size_t b = 0; b < sizeof(data); b++)
            data[b] = (uint8_t)(proposed * 7 + b);
        assert_int_equal(raft_propose(nodes[l].r, data, sizeof(data), NULL), 0);
    }
}

static bool all_applied(const int *which, int n, size_t count)
{
    for (int i = 0; i < n; i++)
        if (nodes[which[i]].n_applied < count)
            return false;
    return true;
}

static void wait_applied(const int *which, int n, size_t count)
{
    uint64_t end = h_now_ms() + 10000;
    while (!all_applied(which, n, count)) {
        if (h_now_ms() >= end)
            fail_msg("entries not applied within 10 s");
        step_all();
    }
}

static void three_raft_cores_elect_replicate_fail_over_and_catch_up_over_tcp(void **state)
{
    struct raft_membership boot = {0};
    for (int i = 0; i < N; i++) {
        boot.members[boot.n].id = (uint64_t)(i + 1);
        boot.members[boot.n++].role = RAFT_VOTER;
    }
    for (int i = 0; i < N; i++) {
        memset(&nodes[i], 0, sizeof(nodes[i]));
        nodes[i].id = (uint64_t)(i + 1);
        struct raft_config c;
        raft_config_default(&c, nodes[i].id);
        c.random_seed = 1000 + (uint64_t)i;
        struct raft_restore rs = {0};
        rs.bootstrap = &boot;
        assert_int_equal(raft_new(&c, &rs, &nodes[i].r), 0);
        start_transport(&nodes[i]);
    }
    link_all();

    int l = wait_leader(-1);
    propose(l, 200);
    int all[] = {0, 1, 2};
    wait_applied(all, 3, 200);

    /* Cut the leader off: its transport closes, its core keeps running alone. */
    gw_transport_free(nodes[l].t);
    nodes[l].t = NULL;
    int l2 = wait_leader(l);
    assert_true(l2 != l);
    propose(l2, 100);
    int rest[2], k = 0;
    for (int i = 0; i < N; i++)
        if (i != l)
            rest[k++] = i;
    wait_applied(rest, 2, 300);

    /* Back on the same port: it reconnects and catches up. */
    start_transport(&nodes[l]);
    link_all();
    wait_applied(all, 3, 300);

    for (int i = 1; i < N; i++) {
        assert_int_equal(nodes[i].n_applied, nodes[0].n_applied);
        assert_memory_equal(nodes[i].applied, nodes[0].applied,
                            nodes[0].n_applied * sizeof(uint32_t));
    }
    for (int i = 0; i < N; i++) {
        if (i == l)
            continue;
        struct gw_transport_peer_stats ps;
        assert_int_equal(gw_transport_peer_stats(nodes[i].t, nodes[l].id, &ps), 0);
        assert_true(ps.connected);
        assert_int_equal(ps.reconnects, 1);
    }
    for (int i = 0; i < N; i++) {
        struct gw_transport_stats st;
        gw_transport_stats(nodes[i].t, &st);
        assert_int_equal(st.rejected_frames, 0);
        gw_transport_free(nodes[i].t);
        raft_free(nodes[i].r);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(three_raft_cores_elect_replicate_fail_over_and_catch_up_over_tcp),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
