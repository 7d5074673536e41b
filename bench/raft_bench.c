/*
 * raft_bench.c - what the Raft core costs on its own, with no disk and no network.
 *
 * 1. Throughput: a 3-voter cluster in one thread on an instant network (a message is stepped
 *    into its destination as soon as its update is taken) and instant persistence. The leader's
 *    uncommitted window is kept full of 64-byte proposals; the figure is entries committed per
 *    second at the leader. A second run sends every message through the codec, as a transport
 *    would. The cores snapshot every 64k entries so memory stays bounded.
 * 2. Latency of one AppendEntries at a follower: raft_step on a message carrying 1 (and 64)
 *    entries, followed by the raft_ready / raft_advance turn that hands out the entries to
 *    persist and the acknowledgement; reported in nanoseconds per message.
 *
 * Each figure is the best of `repeats` runs (other load on the machine only ever adds time).
 * Usage: gw-bench-raft [entries per run, default 2000000] [repeats, default 3]
 */
#include "raft.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define NODES 3
#define PAYLOAD 64
#define WINDOW 1024

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static struct raft *make(uint64_t id)
{
    struct raft_membership boot = {0};
    for (int i = 1; i <= NODES; i++) {
        boot.members[boot.n].id = (uint64_t)i;
        boot.members[boot.n].role = RAFT_VOTER;
        boot.n++;
    }
    struct raft_config c;
    raft_config_default(&c, id);
    c.max_uncommitted_entries = WINDOW * 4;
    c.snapshot_threshold = 65536;
    c.snapshot_trailing = 1024;
    c.max_inflight_msgs = 16;
    c.max_msg_bytes = 256 * 1024;
    c.max_outbox_msgs = 8192;
    struct raft_restore rs = {0};
    rs.bootstrap = &boot;
    struct raft *r;
    if (raft_new(&c, &rs, &r) != 0) {
        fprintf(stderr, "raft_new failed\n");
        exit(1);
    }
    return r;
}

static uint8_t wire[4 << 20];
static struct raft_entry wire_entries[8192];

static void deliver(struct raft **nodes, const struct raft_message *m, bool codec)
{
    struct raft *dst = nodes[m->to];
    if (!codec) {
        raft_step(dst, m);
        return;
    }
    size_t len;
    struct raft_message d;
    if (raft_msg_encode(m, wire, sizeof(wire), &len) != 0 ||
        raft_msg_decode(wire, len, &d, wire_entries, 8192) != 0) {
        fprintf(stderr, "codec failed\n");
        exit(1);
    }
    raft_step(dst, &d);
}

/* One turn of a node: take its update, deliver its messages, apply, advance. Returns the
 * number of normal entries it applied. */
static uint64_t turn(struct raft **nodes, int id, bool codec)
{
    struct raft *r = nodes[id];
    if (!raft_has_ready(r))
        return 0;
    struct raft_update u;
    raft_ready(r, &u);
    for (size_t i = 0; i < u.n_messages; i++)
        deliver(nodes, &u.messages[i], codec);
    uint64_t applied = 0, last = 0;
    for (size_t i = 0; i < u.n_committed; i++) {
        applied += u.committed[i].type == RAFT_ENTRY_NORMAL;
        last = u.committed[i].index;
    }
    bool want = u.snapshot_wanted;
    raft_advance(r, &u);
    if (want && last) {
        uint8_t img = 1;
        raft_snapshot_saved(r, last, &img, 1);
    }
    return applied;
}

static double throughput(uint64_t target, bool codec)
{
    struct raft *nodes[NODES + 1] = {NULL};
    for (int i = 1; i <= NODES; i++)
        nodes[i] = make((uint64_t)i);
    raft_campaign(nodes[1]);
    for (int k = 0; k < 10; k++)
        for (int i = 1; i <= NODES; i++)
            turn(nodes, i, codec);
    struct raft_status st;
    raft_status(nodes[1], &st);
    if (st.role != RAFT_LEADER) {
        fprintf(stderr, "no leader\n");
        exit(1);
    }
    uint8_t payload[PAYLOAD];
    memset(payload, 0x5a, sizeof(payload));
    uint64_t committed = 0, proposed = 0, loops = 0;
    uint64_t t0 = mono_ns();
    while (committed < target) {
        while (proposed - committed < WINDOW && proposed < target) {
            if (raft_propose(nodes[1], payload, PAYLOAD, NULL) != 0)
                break;
            proposed++;
        }
        committed += turn(nodes, 1, codec);
        for (int i = 2; i <= NODES; i++)
            turn(nodes, i, codec);
        if (++loops % 64 == 0)
            for (int i = 1; i <= NODES; i++)
                raft_tick(nodes[i]);
    }
    uint64_t ns = mono_ns() - t0;
    for (int i = 1; i <= NODES; i++)
        raft_free(nodes[i]);
    return (double)committed * 1e9 / (double)ns;
}

static double append_cost(uint64_t messages, uint32_t batch)
{
    struct raft *f = make(2);
    struct raft_entry *ents = calloc(batch, sizeof(*ents));
    uint8_t payload[PAYLOAD];
    memset(payload, 0xa5, sizeof(payload));
    struct raft_message m;
    memset(&m, 0, sizeof(m));
    m.type = RAFT_MSG_APPEND;
    m.from = 1;
    m.to = 2;
    m.term = 1;
    uint64_t prev = 0;
    uint64_t t0 = mono_ns();
    for (uint64_t k = 0; k < messages; k++) {
        for (uint32_t i = 0; i < batch; i++) {
            ents[i].term = 1;
            ents[i].index = prev + 1 + i;
            ents[i].type = RAFT_ENTRY_NORMAL;
            ents[i].len = PAYLOAD;
            ents[i].data = payload;
        }
        m.u.append.prev_index = prev;
        m.u.append.prev_term = prev ? 1 : 0;
        m.u.append.commit = prev;
        m.u.append.entries = ents;
        m.u.append.n_entries = batch;
        raft_step(f, &m);
        struct raft_update u;
        raft_ready(f, &u);
        uint64_t last = u.n_committed ? u.committed[u.n_committed - 1].index : 0;
        bool want = u.snapshot_wanted;
        raft_advance(f, &u);
        if (want && last) {
            uint8_t img = 1;
            raft_snapshot_saved(f, last, &img, 1);
        }
        prev += batch;
    }
    uint64_t ns = mono_ns() - t0;
    free(ents);
    raft_free(f);
    return (double)ns / (double)messages;
}

int main(int argc, char **argv)
{
    uint64_t n = argc > 1 ? strtoull(argv[1], NULL, 10) : 2000000;
    int repeats = argc > 2 ? atoi(argv[2]) : 3;
    if (n == 0 || repeats <= 0) {
        fprintf(stderr, "usage: gw-bench-raft [entries] [repeats]\n");
        return 2;
    }
    double best_tp = 0, best_tp_codec = 0, best_ae1 = 1e18, best_ae64 = 1e18;
    for (int k = 0; k < repeats; k++) {
        double a = throughput(n, false), b = throughput(n, true);
        double c = append_cost(n / 2, 1), d = append_cost(n / 64, 64);
        if (a > best_tp)
            best_tp = a;
        if (b > best_tp_codec)
            best_tp_codec = b;
        if (c < best_ae1)
            best_ae1 = c;
        if (d < best_ae64)
            best_ae64 = d;
    }
    printf("raft core, 3 voters, instant network and disk, %d-byte entries, best of %d:\n", PAYLOAD,
           repeats);
    printf("  committed entries/s (structs passed directly): %.0f\n", best_tp);
    printf("  committed entries/s (every message encoded and decoded): %.0f\n", best_tp_codec);
    printf("  AppendEntries step + ready/advance at a follower, 1 entry:   %.0f ns\n", best_ae1);
    printf("  AppendEntries step + ready/advance at a follower, 64 entries: %.0f ns (%.1f ns/entry)\n",
           best_ae64, best_ae64 / 64);
    return 0;
}
