/*
 * harness.h - a tiny in-memory cluster for the Raft unit tests.
 *
 * Unlike tests/sim it has no randomness and no faults of its own: a test drives exactly the
 * inputs a scenario needs (ticks, messages, cuts between nodes) and looks at the outputs. Every
 * message goes through the codec, as it would on the wire. Persistence is instant: an update is
 * advanced as soon as it is taken, after its messages are queued.
 */
#ifndef TESTS_UNIT_RAFT_HARNESS_H
#define TESTS_UNIT_RAFT_HARNESS_H

#include "raft.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define T_MAXN 8
#define T_MAXQ 8192

struct tmsg {
    uint8_t *buf;
    size_t len;
    uint64_t from, to;
};

struct tcluster {
    struct raft *r[T_MAXN + 1]; /* by id, 1-based */
    int n;
    bool cut[T_MAXN + 1][T_MAXN + 1];
    struct tmsg q[T_MAXQ];
    int nq;
    uint64_t applied[T_MAXN + 1];   /* last index applied per node */
    uint64_t n_applied_normal[T_MAXN + 1];
    uint64_t snapshot_wanted[T_MAXN + 1];
    struct raft_read_state reads[T_MAXN + 1][64];
    int n_reads[T_MAXN + 1];
    bool hold[T_MAXN + 1]; /* do not take updates from this node */
};

/* Knobs applied to every node created afterwards. */
struct tknobs {
    bool pre_vote, check_quorum;
    unsigned election_timeout_ticks, heartbeat_ticks;
    size_t max_msg_bytes;
    unsigned max_inflight_msgs;
    uint64_t snapshot_threshold, snapshot_trailing, max_uncommitted;
    uint32_t snapshot_chunk_bytes;
};

static inline struct tknobs tk_default(void)
{
    struct tknobs k = {0};
    k.election_timeout_ticks = 10;
    k.heartbeat_ticks = 1;
    k.max_msg_bytes = 64 * 1024;
    k.max_inflight_msgs = 8;
    k.max_uncommitted = 1000;
    k.snapshot_chunk_bytes = 1024;
    return k;
}

static inline void t_cfg(const struct tknobs *k, uint64_t id, struct raft_config *c)
{
    raft_config_default(c, id);
    c->pre_vote = k->pre_vote;
    c->check_quorum = k->check_quorum;
    c->election_timeout_ticks = k->election_timeout_ticks;
    c->heartbeat_ticks = k->heartbeat_ticks;
    c->max_msg_bytes = k->max_msg_bytes;
    c->max_inflight_msgs = k->max_inflight_msgs;
    c->snapshot_threshold = k->snapshot_threshold;
    c->snapshot_trailing = k->snapshot_trailing;
    c->max_uncommitted_entries = k->max_uncommitted;
    c->snapshot_chunk_bytes = k->snapshot_chunk_bytes;
    c->random_seed = 42;
}

static inline struct raft *t_node(const struct tknobs *k, uint64_t id, int voters)
{
    struct raft_membership boot = {0};
    for (int i = 1; i <= voters; i++) {
        boot.members[boot.n].id = (uint64_t)i;
        boot.members[boot.n].role = RAFT_VOTER;
        boot.n++;
    }
    struct raft_config c;
    t_cfg(k, id, &c);
    struct raft_restore rs = {0};
    rs.bootstrap = &boot;
    struct raft *r = NULL;
    if (raft_new(&c, &rs, &r) != 0)
        abort();
    return r;
}

static inline void t_init(struct tcluster *t, const struct tknobs *k, int n)
{
    memset(t, 0, sizeof(*t));
    t->n = n;
    for (int i = 1; i <= n; i++)
        t->r[i] = t_node(k, (uint64_t)i, n);
}

static inline void t_free(struct tcluster *t)
{
    for (int i = 1; i <= T_MAXN; i++)
        raft_free(t->r[i]);
    for (int i = 0; i < t->nq; i++)
        free(t->q[i].buf);
    t->nq = 0;
}

static inline void t_queue(struct tcluster *t, const struct raft_message *m)
{
    if (t->cut[m->from][m->to] || t->nq >= T_MAXQ)
        return;
    size_t len = raft_msg_encoded_len(m);
    uint8_t *buf = malloc(len);
    size_t got;
    if (!buf || raft_msg_encode(m, buf, len, &got) != 0)
        abort();
    t->q[t->nq].buf = buf;
    t->q[t->nq].len = got;
    t->q[t->nq].from = m->from;
    t->q[t->nq].to = m->to;
    t->nq++;
}

/* Takes and completes every update of node id. */
static inline void t_pump(struct tcluster *t, int id)
{
    struct raft *r = t->r[id];
    if (!r || t->hold[id])
        return;
    for (int guard = 0; guard < 100 && raft_has_ready(r); guard++) {
        struct raft_update u;
        raft_ready(r, &u);
        for (size_t i = 0; i < u.n_messages; i++)
            t_queue(t, &u.messages[i]);
        for (size_t i = 0; i < u.n_committed; i++) {
            t->applied[id] = u.committed[i].index;
            if (u.committed[i].type == RAFT_ENTRY_NORMAL)
                t->n_applied_normal[id]++;
        }
        if (u.snapshot)
            t->applied[id] = u.snapshot->index;
        for (size_t i = 0; i < u.n_reads && t->n_reads[id] < 64; i++)
            t->reads[id][t->n_reads[id]++] = u.reads[i];
        if (u.snapshot_wanted)
            t->snapshot_wanted[id]++;
        raft_advance(r, &u);
    }
}

static inline void t_pump_all(struct tcluster *t)
{
    for (int i = 1; i <= T_MAXN; i++)
        t_pump(t, i);
}

/* Delivers what is queued now (not what it provokes). Returns how many were delivered. */
static inline int t_deliver_once(struct tcluster *t)
{
    int n = t->nq;
    struct tmsg batch[T_MAXQ];
    memcpy(batch, t->q, (size_t)n * sizeof(batch[0]));
    t->nq = 0;
    static struct raft_entry ents[4096];
    int delivered = 0;
    for (int i = 0; i < n; i++) {
        struct raft_message m;
        if (!t->cut[batch[i].from][batch[i].to] && t->r[batch[i].to] &&
            raft_msg_decode(batch[i].buf, batch[i].len, &m, ents, 4096) == 0) {
            raft_step(t->r[batch[i].to], &m);
            delivered++;
        }
        free(batch[i].buf);
        t_pump(t, (int)batch[i].to);
    }
    return delivered;
}

/* Runs until no message is left. */
static inline void t_settle(struct tcluster *t)
{
    t_pump_all(t);
    for (int guard = 0; guard < 1000 && t->nq > 0; guard++) {
        t_deliver_once(t);
        t_pump_all(t);
    }
}

static inline void t_drop_queue(struct tcluster *t)
{
    for (int i = 0; i < t->nq; i++)
        free(t->q[i].buf);
    t->nq = 0;
}

static inline void t_tick(struct tcluster *t, int id, int times)
{
    for (int i = 0; i < times; i++) {
        raft_tick(t->r[id]);
        t_pump(t, id);
    }
}

static inline void t_tick_all(struct tcluster *t, int times)
{
    for (int k = 0; k < times; k++) {
        for (int i = 1; i <= T_MAXN; i++)
            if (t->r[i])
                t_tick(t, i, 1);
        t_settle(t);
    }
}

static inline struct raft_status t_st(struct tcluster *t, int id)
{
    struct raft_status st;
    raft_status(t->r[id], &st);
    return st;
}

static inline void t_isolate(struct tcluster *t, int id, bool on)
{
    for (int i = 1; i <= T_MAXN; i++)
        if (i != id)
            t->cut[i][id] = t->cut[id][i] = on;
}

/* Makes id the leader through a real election and settles the cluster. */
static inline void t_elect(struct tcluster *t, int id)
{
    raft_campaign(t->r[id]);
    t_settle(t);
}

static inline int t_propose(struct tcluster *t, int id, uint64_t v)
{
    uint8_t b[8];
    memcpy(b, &v, 8);
    return raft_propose(t->r[id], b, 8, NULL);
}

/* The single-node message builder used by fine-grained scenarios. */
static inline struct raft_message t_msg(uint8_t type, uint64_t from, uint64_t to, uint64_t term)
{
    struct raft_message m;
    memset(&m, 0, sizeof(m));
    m.type = type;
    m.from = from;
    m.to = to;
    m.term = term;
    return m;
}

/* Takes one update and returns a copy of its messages of a type (up to max). */
static inline int t_take(struct raft *r, uint8_t type, struct raft_message *out, int max,
                         struct raft_update *u_out)
{
    int n = 0;
    if (u_out)
        memset(u_out, 0, sizeof(*u_out));
    if (!raft_has_ready(r))
        return 0;
    struct raft_update u;
    raft_ready(r, &u);
    for (size_t i = 0; i < u.n_messages; i++)
        if ((type == 0 || u.messages[i].type == type) && n < max)
            out[n++] = u.messages[i];
    if (u_out)
        *u_out = u;
    raft_advance(r, &u);
    return n;
}

#endif
