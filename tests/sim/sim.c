/*
 * sim.c - the deterministic cluster simulator behind raft-sim.
 *
 * Each node is a Raft core plus a simulated disk (hard state, snapshot, log) and a counter state
 * machine. The driving loop follows the core's contract: an update is copied when taken, its
 * writes reach the disk after a random disk delay, and only then are its messages put on the
 * network and its committed entries applied. A crash throws away the core, the state machine and
 * every write still in flight; a restart rebuilds the core from the disk alone.
 *
 * The network carries encoded bytes (so the codec runs on every message) and loses, duplicates,
 * delays and reorders them, and honours symmetric and one-way partitions. Each node ticks at its
 * own rate. Clients propose increments and read the counter through ReadIndex. In the middle of
 * all this the simulator adds and promotes learners, removes members and transfers leadership.
 *
 * After every event the touched node is checked against the properties of the paper's Figure 3:
 * Election Safety, Leader Append-Only, Log Matching, Leader Completeness, State Machine Safety,
 * plus commit-index monotonicity. Client history: every read must see at least every increment
 * acknowledged before it began and at most those proposed before it ended; no increment may be
 * committed twice. At the end the faults heal and a leader must commit a proposal in bounded time.
 */
#include "sim.h"

#include "raft.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_NODES 8
#define N_CLIENTS 4
#define CLIENT_TIMEOUT_US (25 * TICK_US) /* a client gives up and moves on */
#define TICK_US 1000
/* After healing, a leader must commit a proposal within this much virtual time. It covers the
 * slowest configuration drawn (one entry per message, one message in flight, 4 ms links)
 * draining the largest backlog a leader may hold (max_uncommitted_entries). */
#define LIVENESS_BOUND_US (2000 * TICK_US)
#define SNAP_LEN 64
#define MAX_DECODE_ENTRIES 1024
#define NONE UINT64_MAX

/* ---------------------------------------------------------------- small tools */

static uint64_t splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static uint64_t fnv(const uint8_t *p, size_t n, uint64_t h)
{
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 0x100000001b3ULL;
    return h;
}

static uint64_t entry_hash(uint8_t type, const uint8_t *data, uint32_t len)
{
    uint64_t h = fnv(&type, 1, 0xcbf29ce484222325ULL);
    return fnv(data, len, h);
}

static void put64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t get64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

static void *xcalloc(size_t n, size_t sz)
{
    void *p = calloc(n ? n : 1, sz ? sz : 1);
    if (!p) {
        fprintf(stderr, "raft-sim: out of memory\n");
        exit(2);
    }
    return p;
}

static void *xrealloc(void *p, size_t sz)
{
    p = realloc(p, sz ? sz : 1);
    if (!p) {
        fprintf(stderr, "raft-sim: out of memory\n");
        exit(2);
    }
    return p;
}

static uint8_t *dupbytes(const uint8_t *p, size_t n)
{
    uint8_t *d = xcalloc(n ? n : 1, 1);
    if (n)
        memcpy(d, p, n);
    return d;
}

/* ---------------------------------------------------------------- model */

struct dentry {
    uint64_t term, index;
    uint8_t type;
    uint32_t len;
    uint8_t *data;
};

struct dsnap {
    uint64_t index, term;
    struct raft_membership conf;
    uint8_t data[SNAP_LEN];
    size_t len;
};

struct disk {
    struct raft_hard_state hs;
    struct dsnap snap;
    struct dentry *ents;
    size_t n, cap;
};

struct pending_io {
    bool active;
    bool has_hs;
    struct raft_hard_state hs;
    bool has_snap;
    struct dsnap snap;
    struct dentry *ents;
    size_t n_ents;
    struct {
        uint8_t *buf;
        size_t len;
        uint64_t to;
    } *msgs;
    size_t n_msgs;
    struct dentry *committed;
    size_t n_committed;
    struct raft_read_state *reads;
    size_t n_reads;
    bool snapshot_wanted;
    struct raft_update scalars;
};

struct node_read {
    uint64_t ctx, index;
};

struct node {
    uint64_t id;
    bool up;
    uint64_t incarnation;
    struct raft *r;
    struct disk disk;
    struct pending_io io;
    /* state machine: a counter, with a chain hash of what it applied */
    uint64_t counter, chain, fsm_index;
    struct node_read *reads;
    size_t n_reads, cap_reads;
    uint64_t tick_us; /* its clock rate */
    /* checker state */
    uint64_t last_commit;
    uint64_t lead_term, lead_last, lead_last_term;
    uint64_t lm_index, lm_term, lm_snap;
    uint64_t commit_term; /* term in which it last advanced commit as leader */
};

enum ev_type { EV_TICK, EV_DELIVER, EV_IO, EV_CLIENT, EV_FAULT, EV_RESTART, EV_HEAL, EV_LIVE, EV_DEPOSE };

struct event {
    uint64_t time, seq;
    uint8_t type;
    int node;
    uint64_t inc; /* node incarnation the event belongs to */
    uint8_t *buf;
    size_t len;
    uint64_t from;
};

struct lm_slot { /* Log Matching table: (index, term) -> content */
    uint64_t index, term, hash, prev_term;
};

struct committed_rec {
    uint64_t term, hash, op, known_term;
    bool set;
};

struct applied_rec {
    uint64_t term, hash, counter, chain;
    bool set;
};

enum op_state { OP_IDLE, OP_INC, OP_READ };

struct client {
    uint8_t state;
    uint64_t op;  /* op id (increment) or ctx (read) */
    int node;
    uint64_t inc;
    uint64_t index, term;
    uint64_t deadline;
    uint64_t lower; /* reads: acknowledged increments when the read began */
    int target;
};

struct sim {
    struct sim_opts o;
    struct sim_result *res;
    uint64_t rng;
    uint64_t now;
    uint64_t seq;
    long steps_done;
    int n; /* nodes in the pool: founding voters + one spare */
    struct node nodes[MAX_NODES];
    struct raft_membership bootstrap;

    struct event *heap;
    size_t heap_n, heap_cap;

    /* network */
    bool blocked[MAX_NODES][MAX_NODES];
    double loss, dup;
    uint64_t delay_min_us, delay_max_us;
    bool faults_on;

    /* checker */
    uint64_t *leader_of_term;
    size_t leader_of_term_n;
    struct lm_slot *lm;
    size_t lm_cap, lm_n;
    struct committed_rec *committed;
    struct applied_rec *applied;
    size_t rec_cap;
    uint64_t max_committed;
    uint64_t *op_index; /* op id -> committed index */
    size_t op_cap;

    /* clients */
    struct client clients[N_CLIENTS];
    uint64_t next_op;
    uint64_t invoked_incs, acked_incs;
    uint64_t probe_op;
    int probe_node;
    uint64_t probe_inc, probe_index, probe_deadline;
    bool live_ok;
    uint64_t live_index; /* where the liveness probe committed */
    struct {
        uint64_t op, index;
    } *acked; /* acknowledged increments */
    size_t n_acked, cap_acked;
    uint64_t heal_time;
    uint64_t bench_committed;

    /* core configuration, drawn per seed */
    size_t max_msg_bytes;
    unsigned max_inflight, heartbeat_ticks;
    bool pre_vote, check_quorum;
    uint64_t client_gap_us;
    uint64_t fault_gap_ticks;
    unsigned depose_pct; /* chance that a new leader is crashed or cut off right away */
};

static void fail(struct sim *s, const char *fmt, ...)
{
    if (s->res->failed)
        return;
    s->res->failed = true;
    va_list ap;
    va_start(ap, fmt);
    int k = snprintf(s->res->why, sizeof(s->res->why), "t=%" PRIu64 "us step=%ld: ", s->now,
                     s->steps_done);
    if (k > 0 && (size_t)k < sizeof(s->res->why))
        vsnprintf(s->res->why + k, sizeof(s->res->why) - (size_t)k, fmt, ap);
    va_end(ap);
}

static uint64_t rnd(struct sim *s, uint64_t n) { return n ? splitmix(&s->rng) % n : 0; }
static double rndf(struct sim *s) { return (double)(splitmix(&s->rng) >> 11) / 9007199254740992.0; }

#define TRACE(s, ...)                               \
    do {                                            \
        if ((s)->o.verbose) {                       \
            fprintf(stderr, "%8" PRIu64 " ", (s)->now); \
            fprintf(stderr, __VA_ARGS__);           \
            fputc('\n', stderr);                    \
        }                                           \
    } while (0)

/* ---------------------------------------------------------------- events */

static bool ev_before(const struct event *a, const struct event *b)
{
    return a->time < b->time || (a->time == b->time && a->seq < b->seq);
}

static void push(struct sim *s, struct event e)
{
    if (s->heap_n == s->heap_cap) {
        s->heap_cap = s->heap_cap ? s->heap_cap * 2 : 1024;
        s->heap = xrealloc(s->heap, s->heap_cap * sizeof(*s->heap));
    }
    e.seq = s->seq++;
    size_t i = s->heap_n++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!ev_before(&e, &s->heap[p]))
            break;
        s->heap[i] = s->heap[p];
        i = p;
    }
    s->heap[i] = e;
}

static struct event pop(struct sim *s)
{
    struct event top = s->heap[0];
    struct event last = s->heap[--s->heap_n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= s->heap_n)
            break;
        if (c + 1 < s->heap_n && ev_before(&s->heap[c + 1], &s->heap[c]))
            c++;
        if (!ev_before(&s->heap[c], &last))
            break;
        s->heap[i] = s->heap[c];
        i = c;
    }
    if (s->heap_n > 0)
        s->heap[i] = last;
    return top;
}

static void schedule(struct sim *s, uint64_t delay, uint8_t type, int node)
{
    struct event e = {0};
    e.time = s->now + delay;
    e.type = type;
    e.node = node;
    e.inc = node >= 0 ? s->nodes[node].incarnation : 0;
    push(s, e);
}

/* ---------------------------------------------------------------- checker tables */

static void rec_grow(struct sim *s, uint64_t index)
{
    if (index < s->rec_cap)
        return;
    size_t cap = s->rec_cap ? s->rec_cap : 1024;
    while (cap <= index)
        cap *= 2;
    s->committed = xrealloc(s->committed, cap * sizeof(*s->committed));
    s->applied = xrealloc(s->applied, cap * sizeof(*s->applied));
    memset(s->committed + s->rec_cap, 0, (cap - s->rec_cap) * sizeof(*s->committed));
    memset(s->applied + s->rec_cap, 0, (cap - s->rec_cap) * sizeof(*s->applied));
    s->rec_cap = cap;
}

static struct lm_slot *lm_find(struct sim *s, uint64_t index, uint64_t term, bool insert)
{
    if (insert && (s->lm_n + 1) * 2 > s->lm_cap) {
        size_t cap = s->lm_cap ? s->lm_cap * 2 : 4096;
        struct lm_slot *t = xcalloc(cap, sizeof(*t));
        for (size_t i = 0; i < s->lm_cap; i++) {
            if (s->lm[i].index == 0)
                continue;
            size_t h = (size_t)((s->lm[i].index * 0x9e3779b97f4a7c15ULL) ^ s->lm[i].term) & (cap - 1);
            while (t[h].index != 0)
                h = (h + 1) & (cap - 1);
            t[h] = s->lm[i];
        }
        free(s->lm);
        s->lm = t;
        s->lm_cap = cap;
    }
    if (s->lm_cap == 0)
        return NULL;
    size_t h = (size_t)((index * 0x9e3779b97f4a7c15ULL) ^ term) & (s->lm_cap - 1);
    while (s->lm[h].index != 0) {
        if (s->lm[h].index == index && s->lm[h].term == term)
            return &s->lm[h];
        h = (h + 1) & (s->lm_cap - 1);
    }
    if (!insert)
        return NULL;
    s->lm[h].index = index;
    s->lm[h].term = term;
    s->lm[h].hash = NONE;
    s->lm[h].prev_term = NONE;
    s->lm_n++;
    return &s->lm[h];
}

/* ---------------------------------------------------------------- safety checks */

static void check_log_matching(struct sim *s, struct node *nd, const struct raft_status *st)
{
    /* Log Matching, in a form that can be checked one log at a time: every (index, term) in any
     * log names one entry content and one predecessor term. By induction two logs sharing an
     * (index, term) then share the whole prefix. */
    uint64_t from = st->first_index;
    uint64_t t;
    /* Incremental: only what follows the last entry checked, unless that entry changed or the
     * log's start moved (a snapshot can replace the prefix under an unchanged tail). */
    if (nd->lm_index >= from && nd->lm_index <= st->last_index && nd->lm_snap == st->snapshot_index &&
        raft_term_at(nd->r, nd->lm_index, &t) && t == nd->lm_term)
        from = nd->lm_index + 1;
    for (uint64_t i = from; i <= st->last_index; i++) {
        const struct raft_entry *e = raft_entry_at(nd->r, i);
        uint64_t prev_term = NONE;
        raft_term_at(nd->r, i - 1, &prev_term);
        uint64_t h = entry_hash(e->type, e->data, e->len);
        struct lm_slot *slot = lm_find(s, i, e->term, true);
        if (slot->hash == NONE) {
            slot->hash = h;
        } else if (slot->hash != h) {
            fail(s, "Log Matching: node %" PRIu64 " has a different entry at index %" PRIu64
                    " term %" PRIu64, nd->id, i, e->term);
            return;
        }
        if (prev_term != NONE) {
            if (slot->prev_term == NONE)
                slot->prev_term = prev_term;
            else if (slot->prev_term != prev_term) {
                fail(s, "Log Matching: node %" PRIu64 " index %" PRIu64 " term %" PRIu64
                        " follows term %" PRIu64 ", elsewhere %" PRIu64,
                     nd->id, i, e->term, prev_term, slot->prev_term);
                return;
            }
        }
    }
    nd->lm_index = st->last_index;
    nd->lm_snap = st->snapshot_index;
    nd->lm_term = 0;
    raft_term_at(nd->r, st->last_index, &nd->lm_term);
}

static void check_leader_completeness(struct sim *s, struct node *nd, const struct raft_status *st)
{
    /* Every entry committed in an earlier term is in the new leader's log (paper §5.4). */
    for (uint64_t i = 1; i <= s->max_committed; i++) {
        const struct committed_rec *c = &s->committed[i];
        if (!c->set || c->known_term >= st->term)
            continue;
        if (i > st->last_index) {
            fail(s, "Leader Completeness: leader %" PRIu64 " of term %" PRIu64
                    " lacks committed index %" PRIu64 " (last %" PRIu64 ")",
                 nd->id, st->term, i, st->last_index);
            return;
        }
        uint64_t t;
        if (i < st->first_index - 1 || !raft_term_at(nd->r, i, &t))
            continue; /* inside its snapshot */
        if (t != c->term) {
            fail(s, "Leader Completeness: leader %" PRIu64 " of term %" PRIu64 " has term %" PRIu64
                    " at committed index %" PRIu64 " (committed term %" PRIu64 ")",
                 nd->id, st->term, t, i, c->term);
            return;
        }
    }
}

static void record_commit(struct sim *s, struct node *nd, const struct raft_status *st)
{
    if (st->commit < nd->last_commit) {
        fail(s, "commit index of node %" PRIu64 " went back from %" PRIu64 " to %" PRIu64, nd->id,
             nd->last_commit, st->commit);
        return;
    }
    if (st->commit > st->last_index) {
        fail(s, "node %" PRIu64 " commit %" PRIu64 " beyond its last index %" PRIu64, nd->id,
             st->commit, st->last_index);
        return;
    }
    rec_grow(s, st->commit + 1);
    for (uint64_t i = nd->last_commit + 1; i <= st->commit; i++) {
        const struct raft_entry *e = raft_entry_at(nd->r, i);
        if (!e)
            continue; /* arrived inside a snapshot */
        struct committed_rec *c = &s->committed[i];
        uint64_t h = entry_hash(e->type, e->data, e->len);
        if (!c->set) {
            c->set = true;
            c->term = e->term;
            c->hash = h;
            c->known_term = st->term;
            c->op = (e->type == RAFT_ENTRY_NORMAL && e->len == 8) ? get64(e->data) : 0;
            if (i > s->max_committed)
                s->max_committed = i;
            if (c->op) {
                if (c->op >= s->op_cap) {
                    size_t cap = s->op_cap ? s->op_cap : 1024;
                    while (cap <= c->op)
                        cap *= 2;
                    s->op_index = xrealloc(s->op_index, cap * sizeof(*s->op_index));
                    memset(s->op_index + s->op_cap, 0, (cap - s->op_cap) * sizeof(*s->op_index));
                    s->op_cap = cap;
                }
                if (s->op_index[c->op] != 0 && s->op_index[c->op] != i) {
                    fail(s, "duplicated increment: op %" PRIu64 " committed at %" PRIu64
                            " and %" PRIu64, c->op, s->op_index[c->op], i);
                    return;
                }
                s->op_index[c->op] = i;
                s->res->committed_ops++;
            }
        } else {
            if (c->term != e->term || c->hash != h) {
                fail(s, "State Machine Safety: node %" PRIu64 " commits term %" PRIu64
                        " at index %" PRIu64 ", committed elsewhere with term %" PRIu64,
                     nd->id, e->term, i, c->term);
                return;
            }
            if (st->term < c->known_term)
                c->known_term = st->term;
        }
    }
    nd->last_commit = st->commit;
}

/* Short reigns leave logs diverging across terms (the paper's Figure 8): with a per-seed
 * chance, a leader is crashed or cut off soon after it is elected or first commits. */
static void maybe_depose(struct sim *s, struct node *nd, uint64_t term, uint64_t within_us)
{
    if (!s->faults_on || rnd(s, 100) >= s->depose_pct)
        return;
    struct event ev = {0};
    ev.time = s->now + 50 + rnd(s, within_us);
    ev.type = EV_DEPOSE;
    ev.node = (int)(nd - s->nodes);
    ev.inc = nd->incarnation;
    ev.from = term;
    push(s, ev);
}

static void check_node(struct sim *s, struct node *nd)
{
    if (!nd->up || s->res->failed)
        return;
    struct raft_status st;
    raft_status(nd->r, &st);
    if (st.role == RAFT_LEADER) {
        if (st.term >= s->leader_of_term_n) {
            size_t n = s->leader_of_term_n ? s->leader_of_term_n : 64;
            while (n <= st.term)
                n *= 2;
            s->leader_of_term = xrealloc(s->leader_of_term, n * sizeof(uint64_t));
            memset(s->leader_of_term + s->leader_of_term_n, 0,
                   (n - s->leader_of_term_n) * sizeof(uint64_t));
            s->leader_of_term_n = n;
        }
        uint64_t *l = &s->leader_of_term[st.term];
        if (*l == 0) {
            *l = nd->id;
            s->res->elections++;
            maybe_depose(s, nd, st.term, 8 * TICK_US);
        } else if (*l != nd->id) {
            fail(s, "Election Safety: nodes %" PRIu64 " and %" PRIu64 " both leaders of term %" PRIu64,
                 *l, nd->id, st.term);
            return;
        }
    }
    check_log_matching(s, nd, &st);
    if (s->res->failed)
        return;
    uint64_t commit_before = nd->last_commit;
    record_commit(s, nd, &st);
    if (s->res->failed)
        return;
    if (st.role == RAFT_LEADER && st.commit > commit_before && nd->commit_term != st.term) {
        nd->commit_term = st.term;
        maybe_depose(s, nd, st.term, 2 * TICK_US);
    }
    if (st.role == RAFT_LEADER) {
        uint64_t t;
        if (nd->lead_term != st.term) {
            check_leader_completeness(s, nd, &st);
        } else if (st.last_index < nd->lead_last ||
                   (raft_term_at(nd->r, nd->lead_last, &t) && t != nd->lead_last_term)) {
            fail(s, "Leader Append-Only: leader %" PRIu64 " of term %" PRIu64
                    " lost or rewrote entry %" PRIu64, nd->id, st.term, nd->lead_last);
            return;
        }
        nd->lead_term = st.term;
        nd->lead_last = st.last_index;
        nd->lead_last_term = 0;
        raft_term_at(nd->r, st.last_index, &nd->lead_last_term);
    } else {
        nd->lead_term = 0;
    }
}

/* ---------------------------------------------------------------- state machine */

static void fsm_snapshot(const struct node *nd, uint8_t *buf)
{
    memset(buf, 0xa5, SNAP_LEN);
    put64(buf, nd->counter);
    put64(buf + 8, nd->chain);
    put64(buf + 16, nd->fsm_index);
}

static void fsm_restore(struct sim *s, struct node *nd, const struct dsnap *sn)
{
    if (sn->index == 0) {
        nd->counter = nd->chain = nd->fsm_index = 0;
        return;
    }
    if (sn->len != SNAP_LEN || get64(sn->data + 16) != sn->index) {
        fail(s, "node %" PRIu64 ": corrupt snapshot at %" PRIu64, nd->id, sn->index);
        return;
    }
    nd->counter = get64(sn->data);
    nd->chain = get64(sn->data + 8);
    nd->fsm_index = sn->index;
    if (sn->index < s->rec_cap && s->applied[sn->index].set) {
        const struct applied_rec *a = &s->applied[sn->index];
        if (a->counter != nd->counter || a->chain != nd->chain)
            fail(s, "State Machine Safety: node %" PRIu64 " restored a snapshot at %" PRIu64
                    " whose state differs from what was applied there", nd->id, sn->index);
    }
}

static void client_applied(struct sim *s, struct node *nd, const struct dentry *e);

static void fsm_apply(struct sim *s, struct node *nd, const struct dentry *e)
{
    if (e->index != nd->fsm_index + 1) {
        fail(s, "node %" PRIu64 " asked to apply %" PRIu64 " after %" PRIu64, nd->id, e->index,
             nd->fsm_index);
        return;
    }
    uint64_t h = entry_hash(e->type, e->data, e->len);
    if (e->type == RAFT_ENTRY_NORMAL)
        nd->counter++;
    nd->chain = fnv((const uint8_t *)&h, sizeof(h), nd->chain ^ e->term);
    nd->fsm_index = e->index;
    rec_grow(s, e->index + 1);
    struct applied_rec *a = &s->applied[e->index];
    if (!a->set) {
        a->set = true;
        a->term = e->term;
        a->hash = h;
        a->counter = nd->counter;
        a->chain = nd->chain;
    } else if (a->term != e->term || a->hash != h || a->counter != nd->counter) {
        fail(s, "State Machine Safety: node %" PRIu64 " applied a different entry at %" PRIu64
                " (term %" PRIu64 " vs %" PRIu64 ")",
             nd->id, e->index, e->term, a->term);
        return;
    }
    client_applied(s, nd, e);
}

/* ---------------------------------------------------------------- disk */

static void disk_truncate_from(struct disk *d, uint64_t index)
{
    while (d->n > 0 && d->ents[d->n - 1].index >= index)
        free(d->ents[--d->n].data);
}

static void disk_compact_to(struct disk *d, uint64_t index)
{
    size_t k = 0;
    while (k < d->n && d->ents[k].index <= index)
        free(d->ents[k++].data);
    memmove(d->ents, d->ents + k, (d->n - k) * sizeof(*d->ents));
    d->n -= k;
}

static bool disk_term_at(const struct disk *d, uint64_t index, uint64_t *term)
{
    if (d->n > 0 && index >= d->ents[0].index && index <= d->ents[d->n - 1].index) {
        *term = d->ents[index - d->ents[0].index].term;
        return true;
    }
    return false;
}

static void disk_append(struct sim *s, struct node *nd, const struct dentry *e)
{
    struct disk *d = &nd->disk;
    uint64_t expect = d->n ? d->ents[d->n - 1].index + 1 : d->snap.index + 1;
    if (e->index != expect && !(d->n == 0 && e->index < expect)) {
        fail(s, "node %" PRIu64 " asked to persist index %" PRIu64 " but disk ends at %" PRIu64,
             nd->id, e->index, expect - 1);
        return;
    }
    if (d->n == d->cap) {
        d->cap = d->cap ? d->cap * 2 : 64;
        d->ents = xrealloc(d->ents, d->cap * sizeof(*d->ents));
    }
    d->ents[d->n] = *e;
    d->ents[d->n].data = dupbytes(e->data, e->len);
    d->n++;
}

/* ---------------------------------------------------------------- network */

static void net_send(struct sim *s, uint64_t from, uint64_t to, uint8_t *buf, size_t len)
{
    int f = (int)from - 1, t = (int)to - 1;
    if (t < 0 || t >= s->n || s->blocked[f][t] || (s->faults_on && rndf(s) < s->loss)) {
        free(buf);
        return;
    }
    int copies = (s->faults_on && rndf(s) < s->dup) ? 2 : 1;
    for (int c = 0; c < copies; c++) {
        struct event e = {0};
        uint64_t d = s->delay_min_us + rnd(s, s->delay_max_us - s->delay_min_us + 1);
        if (s->faults_on && rndf(s) < 0.02)
            d += rnd(s, 20 * TICK_US); /* a straggler */
        e.time = s->now + d;
        e.type = EV_DELIVER;
        e.node = t;
        e.from = from;
        e.buf = c == 0 ? buf : dupbytes(buf, len);
        e.len = len;
        push(s, e);
    }
}

/* ---------------------------------------------------------------- driving a node */

static void io_clear(struct pending_io *p)
{
    for (size_t i = 0; i < p->n_ents; i++)
        free(p->ents[i].data);
    for (size_t i = 0; i < p->n_committed; i++)
        free(p->committed[i].data);
    for (size_t i = 0; i < p->n_msgs; i++)
        free(p->msgs[i].buf);
    free(p->ents);
    free(p->committed);
    free(p->msgs);
    free(p->reads);
    memset(p, 0, sizeof(*p));
}

static void copy_entries(const struct raft_entry *src, size_t n, struct dentry **dst, size_t *dn)
{
    *dn = n;
    *dst = n ? xcalloc(n, sizeof(**dst)) : NULL;
    for (size_t i = 0; i < n; i++) {
        (*dst)[i].term = src[i].term;
        (*dst)[i].index = src[i].index;
        (*dst)[i].type = src[i].type;
        (*dst)[i].len = src[i].len;
        (*dst)[i].data = dupbytes(src[i].data, src[i].len);
    }
}

/* Takes an update if there is one and schedules its disk write. */
static void pump(struct sim *s, int k)
{
    struct node *nd = &s->nodes[k];
    if (!nd->up || nd->io.active || !raft_has_ready(nd->r))
        return;
    struct raft_update u;
    raft_ready(nd->r, &u);
    struct pending_io *p = &nd->io;
    p->active = true;
    p->has_hs = u.hard_state_changed;
    p->hs = u.hard_state;
    if (u.snapshot) {
        p->has_snap = true;
        p->snap.index = u.snapshot->index;
        p->snap.term = u.snapshot->term;
        p->snap.conf = u.snapshot->conf;
        p->snap.len = u.snapshot->len <= SNAP_LEN ? u.snapshot->len : SNAP_LEN;
        memcpy(p->snap.data, u.snapshot->data, p->snap.len);
        if (u.snapshot->len != SNAP_LEN)
            fail(s, "node %" PRIu64 " received a snapshot of %zu bytes", nd->id, u.snapshot->len);
    }
    copy_entries(u.entries, u.n_entries, &p->ents, &p->n_ents);
    copy_entries(u.committed, u.n_committed, &p->committed, &p->n_committed);
    p->n_msgs = u.n_messages;
    p->msgs = u.n_messages ? xcalloc(u.n_messages, sizeof(*p->msgs)) : NULL;
    for (size_t i = 0; i < u.n_messages; i++) {
        size_t len = raft_msg_encoded_len(&u.messages[i]);
        p->msgs[i].buf = xcalloc(len, 1);
        size_t got = 0;
        int rc = raft_msg_encode(&u.messages[i], p->msgs[i].buf, len, &got);
        if (rc != 0 || got != len)
            fail(s, "encode failed (%d) or size mismatch %zu != %zu", rc, got, len);
        p->msgs[i].len = got;
        p->msgs[i].to = u.messages[i].to;
    }
    p->n_reads = u.n_reads;
    p->reads = u.n_reads ? xcalloc(u.n_reads, sizeof(*p->reads)) : NULL;
    if (u.n_reads)
        memcpy(p->reads, u.reads, u.n_reads * sizeof(*p->reads));
    p->snapshot_wanted = u.snapshot_wanted;
    p->scalars = u;
    p->scalars.entries = NULL;
    p->scalars.messages = NULL;
    p->scalars.committed = NULL;
    p->scalars.reads = NULL;
    p->scalars.snapshot = NULL;
    uint64_t delay = s->o.no_faults ? 0 : 20 + rnd(s, 400);
    schedule(s, delay, EV_IO, k);
}

static void serve_reads(struct sim *s, struct node *nd);
static void client_skipped(struct sim *s, int k, uint64_t index);

static void io_done(struct sim *s, int k)
{
    struct node *nd = &s->nodes[k];
    struct pending_io *p = &nd->io;
    struct disk *d = &nd->disk;
    /* 1. make the writes durable: snapshot, entries, hard state */
    if (p->has_snap) {
        uint64_t t;
        bool keep = disk_term_at(d, p->snap.index, &t) && t == p->snap.term;
        d->snap = p->snap;
        if (keep)
            disk_compact_to(d, p->snap.index);
        else
            disk_truncate_from(d, 0);
    }
    if (p->n_ents > 0) {
        disk_truncate_from(d, p->ents[0].index);
        for (size_t i = 0; i < p->n_ents && !s->res->failed; i++)
            disk_append(s, nd, &p->ents[i]);
    }
    if (p->has_hs)
        d->hs = p->hs;
    /* 2. only now send what depends on them */
    for (size_t i = 0; i < p->n_msgs; i++) {
        net_send(s, nd->id, p->msgs[i].to, p->msgs[i].buf, p->msgs[i].len);
        p->msgs[i].buf = NULL;
    }
    /* 3. apply */
    if (p->has_snap) {
        fsm_restore(s, nd, &p->snap);
        s->res->snapshots_sent++;
        client_skipped(s, k, p->snap.index);
    }
    for (size_t i = 0; i < p->n_committed && !s->res->failed; i++)
        if (p->committed[i].index > nd->fsm_index)
            fsm_apply(s, nd, &p->committed[i]);
    for (size_t i = 0; i < p->n_reads; i++) {
        if (nd->n_reads == nd->cap_reads) {
            nd->cap_reads = nd->cap_reads ? nd->cap_reads * 2 : 16;
            nd->reads = xrealloc(nd->reads, nd->cap_reads * sizeof(*nd->reads));
        }
        nd->reads[nd->n_reads].ctx = p->reads[i].ctx;
        nd->reads[nd->n_reads].index = p->reads[i].index;
        nd->n_reads++;
    }
    serve_reads(s, nd);
    bool want = p->snapshot_wanted;
    struct raft_update sc = p->scalars;
    io_clear(p);
    raft_advance(nd->r, &sc);
    /* 4. a snapshot when asked: write it, then let the core compact */
    /* (A snapshot received meanwhile may already cover what was applied.) */
    if (want && nd->fsm_index > d->snap.index && nd->fsm_index > raft_last_snapshot(nd->r)->index) {
        uint8_t buf[SNAP_LEN];
        fsm_snapshot(nd, buf);
        uint64_t t = 0;
        if (!raft_term_at(nd->r, nd->fsm_index, &t)) {
            fail(s, "node %" PRIu64 " cannot name the term of applied index %" PRIu64, nd->id,
                 nd->fsm_index);
            return;
        }
        int rc = raft_snapshot_saved(nd->r, nd->fsm_index, buf, SNAP_LEN);
        if (rc != 0) {
            fail(s, "raft_snapshot_saved: %s", raft_strerror(rc));
            return;
        }
        struct raft_status st;
        raft_status(nd->r, &st);
        d->snap.index = nd->fsm_index;
        d->snap.term = t;
        d->snap.conf = raft_last_snapshot(nd->r)->conf; /* the membership at its index */
        d->snap.len = SNAP_LEN;
        memcpy(d->snap.data, buf, SNAP_LEN);
        disk_compact_to(d, st.first_index - 1);
    }
}

/* ---------------------------------------------------------------- nodes up and down */

static void node_config(struct sim *s, struct node *nd, struct raft_config *cfg)
{
    raft_config_default(cfg, nd->id);
    cfg->election_timeout_ticks = 10;
    cfg->heartbeat_ticks = s->heartbeat_ticks;
    cfg->max_msg_bytes = s->max_msg_bytes; /* a few entries per message, to exercise batching */
    cfg->max_inflight_msgs = s->max_inflight;
    cfg->pre_vote = s->pre_vote;
    cfg->check_quorum = s->check_quorum;
    cfg->max_uncommitted_entries = 256;
    cfg->snapshot_threshold = s->o.no_faults ? 100000 : 40;
    cfg->snapshot_trailing = 8;
    cfg->snapshot_chunk_bytes = 24; /* three chunks per snapshot */
    cfg->max_snapshot_bytes = 1024;
    cfg->max_pending_reads = 64;
    cfg->max_outbox_msgs = 1024;
    cfg->random_seed = s->o.seed * 1000003ULL + nd->id * 7919ULL + nd->incarnation;
}

static void node_start(struct sim *s, int k)
{
    struct node *nd = &s->nodes[k];
    struct raft_config cfg;
    node_config(s, nd, &cfg);
    struct raft_snapshot snap = {0};
    struct raft_restore rs = {0};
    rs.hard_state = nd->disk.hs;
    if (nd->disk.snap.index > 0) {
        snap.index = nd->disk.snap.index;
        snap.term = nd->disk.snap.term;
        snap.conf = nd->disk.snap.conf;
        snap.data = nd->disk.snap.data;
        snap.len = nd->disk.snap.len;
        rs.snapshot = &snap;
    }
    struct raft_entry *ents = nd->disk.n ? xcalloc(nd->disk.n, sizeof(*ents)) : NULL;
    for (size_t i = 0; i < nd->disk.n; i++) {
        ents[i].term = nd->disk.ents[i].term;
        ents[i].index = nd->disk.ents[i].index;
        ents[i].type = nd->disk.ents[i].type;
        ents[i].len = nd->disk.ents[i].len;
        ents[i].data = nd->disk.ents[i].data;
    }
    rs.entries = ents;
    rs.n_entries = nd->disk.n;
    struct raft_membership empty = {0};
    rs.bootstrap = (int)k < s->o.nodes ? &s->bootstrap : &empty;
    int rc = raft_new(&cfg, &rs, &nd->r);
    free(ents);
    if (rc != 0) {
        fail(s, "node %" PRIu64 " failed to restart from its disk: %s", nd->id, raft_strerror(rc));
        nd->up = false;
        return;
    }
    nd->up = true;
    fsm_restore(s, nd, &nd->disk.snap);
    struct raft_status st;
    raft_status(nd->r, &st);
    nd->last_commit = st.commit;
    nd->lead_term = 0;
    nd->lm_index = 0;
    nd->n_reads = 0;
    schedule(s, nd->tick_us, EV_TICK, k);
}

static void client_node_lost(struct sim *s, int k);

static void node_crash(struct sim *s, int k)
{
    struct node *nd = &s->nodes[k];
    if (!nd->up)
        return;
    TRACE(s, "crash n%" PRIu64, nd->id);
    raft_free(nd->r);
    nd->r = NULL;
    nd->up = false;
    nd->incarnation++;
    io_clear(&nd->io); /* unsynced writes are lost */
    nd->n_reads = 0;
    nd->counter = nd->chain = nd->fsm_index = 0;
    client_node_lost(s, k);
    s->res->crashes++;
}

/* ---------------------------------------------------------------- clients */

static int find_leader(struct sim *s)
{
    int best = -1;
    uint64_t best_term = 0;
    for (int k = 0; k < s->n; k++) {
        struct node *nd = &s->nodes[k];
        if (!nd->up)
            continue;
        struct raft_status st;
        raft_status(nd->r, &st);
        if (st.role == RAFT_LEADER && st.term >= best_term) {
            best = k;
            best_term = st.term;
        }
    }
    return best;
}

static void client_finish(struct sim *s, struct client *c)
{
    c->state = OP_IDLE;
    if (s->o.no_faults) /* the benchmark client goes again at once */
        schedule(s, 0, EV_CLIENT, -1 - (int)(c - s->clients));
}

static void client_applied(struct sim *s, struct node *nd, const struct dentry *e)
{
    int k = (int)(nd - s->nodes);
    for (int i = 0; i < N_CLIENTS; i++) {
        struct client *c = &s->clients[i];
        if (c->state != OP_INC || c->node != k || c->inc != nd->incarnation || c->index != e->index)
            continue;
        if (e->len == 8 && get64(e->data) == c->op && e->term == c->term) {
            s->acked_incs++;
            s->res->acked_ops++;
            if (s->n_acked == s->cap_acked) {
                s->cap_acked = s->cap_acked ? s->cap_acked * 2 : 256;
                s->acked = xrealloc(s->acked, s->cap_acked * sizeof(*s->acked));
            }
            s->acked[s->n_acked].op = c->op;
            s->acked[s->n_acked].index = e->index;
            s->n_acked++;
        }
        client_finish(s, c);
    }
    if (s->probe_op && s->probe_node == k && s->probe_inc == nd->incarnation &&
        e->index == s->probe_index) {
        if (e->len == 8 && get64(e->data) == s->probe_op) {
            s->live_ok = true;
            s->live_index = e->index;
        }
        s->probe_op = 0;
    }
    if (s->o.no_faults && e->type == RAFT_ENTRY_NORMAL) {
        struct raft_status st;
        raft_status(nd->r, &st);
        if (st.role == RAFT_LEADER)
            s->bench_committed++;
    }
}

static void serve_reads(struct sim *s, struct node *nd)
{
    int k = (int)(nd - s->nodes);
    size_t j = 0;
    for (size_t i = 0; i < nd->n_reads; i++) {
        struct node_read *rd = &nd->reads[i];
        if (rd->index > nd->fsm_index) {
            nd->reads[j++] = *rd;
            continue;
        }
        for (int ci = 0; ci < N_CLIENTS; ci++) {
            struct client *c = &s->clients[ci];
            if (c->state != OP_READ || c->op != rd->ctx || c->node != k || c->inc != nd->incarnation)
                continue;
            uint64_t v = nd->counter;
            /* Linearizable read of a counter of unique increments: at least everything
             * acknowledged before the read began, at most everything proposed before it ends. */
            if (v < c->lower) {
                fail(s, "stale read: node %" PRIu64 " returned %" PRIu64 " but %" PRIu64
                        " increments were acknowledged before the read began",
                     nd->id, v, c->lower);
                return;
            }
            if (v > s->invoked_incs) {
                fail(s, "read from the future: %" PRIu64 " > %" PRIu64 " increments proposed", v,
                     s->invoked_incs);
                return;
            }
            s->res->reads_ok++;
            client_finish(s, c);
        }
    }
    nd->n_reads = j;
}

/* A node jumped over entries by installing a snapshot: requests waiting to see their entry
 * applied there will never see it; their outcome is unknown. */
static void client_skipped(struct sim *s, int k, uint64_t index)
{
    for (int i = 0; i < N_CLIENTS; i++) {
        struct client *c = &s->clients[i];
        if (c->state == OP_INC && c->node == k && c->index <= index)
            client_finish(s, c);
    }
    if (s->probe_op && s->probe_node == k && s->probe_index <= index)
        s->probe_op = 0;
}

static void client_node_lost(struct sim *s, int k)
{
    for (int i = 0; i < N_CLIENTS; i++)
        if (s->clients[i].state != OP_IDLE && s->clients[i].node == k)
            client_finish(s, &s->clients[i]);
    if (s->probe_op && s->probe_node == k)
        s->probe_op = 0;
}

static void client_step(struct sim *s, int ci)
{
    struct client *c = &s->clients[ci];
    uint64_t next = s->o.no_faults ? 100 : 50 + rnd(s, s->client_gap_us);
    if (c->state != OP_IDLE && s->o.no_faults)
        return;
    if (c->state != OP_IDLE) {
        if (s->now >= c->deadline) {
            client_finish(s, c); /* gives up: the outcome is unknown */
            c->target = -1;      /* and tries elsewhere, as a real client would */
        }
        else {
            schedule(s, next + 1000, EV_CLIENT, -1 - ci);
            return;
        }
    }
    int k = c->target;
    if (k < 0 || k >= s->n || !s->nodes[k].up || rnd(s, 100) < 25)
        k = (int)rnd(s, (uint64_t)s->n);
    struct node *nd = &s->nodes[k];
    if (nd->up) {
        struct raft_status st;
        raft_status(nd->r, &st);
        if (st.role != RAFT_LEADER) {
            c->target = st.leader ? (int)st.leader - 1 : (int)rnd(s, (uint64_t)s->n);
        } else if (s->o.no_faults || rnd(s, 100) < 50) {
            uint8_t buf[8];
            uint64_t op = ++s->next_op;
            put64(buf, op);
            uint64_t index;
            if (raft_propose(nd->r, buf, 8, &index) == 0) {
                s->invoked_incs++;
                c->state = OP_INC;
                c->op = op;
                c->node = k;
                c->inc = nd->incarnation;
                c->index = index;
                c->term = st.term;
                c->deadline = s->now + CLIENT_TIMEOUT_US;
                TRACE(s, "client %d inc op %" PRIu64 " at n%" PRIu64 " index %" PRIu64, ci, op,
                      nd->id, index);
                pump(s, k);
            }
        } else {
            uint64_t ctx = ++s->next_op;
            if (raft_read_index(nd->r, ctx) == 0) {
                c->state = OP_READ;
                c->op = ctx;
                c->node = k;
                c->inc = nd->incarnation;
                c->lower = s->acked_incs;
                c->deadline = s->now + CLIENT_TIMEOUT_US;
                TRACE(s, "client %d read %" PRIu64 " at n%" PRIu64 " (>= %" PRIu64 ")", ci, ctx,
                      nd->id, c->lower);
                pump(s, k);
            }
        }
        check_node(s, nd);
    }
    if (!s->o.no_faults || c->state == OP_IDLE)
        schedule(s, next, EV_CLIENT, -1 - ci);
}

/* ---------------------------------------------------------------- faults */

static void fault(struct sim *s)
{
    int kind = (int)rnd(s, 100);
    int k = (int)rnd(s, (uint64_t)s->n);
    int leader = find_leader(s);
    if (kind < 18) {
        /* symmetric partition: a random side against the rest */
        bool side[MAX_NODES];
        for (int i = 0; i < s->n; i++)
            side[i] = rnd(s, 2);
        for (int i = 0; i < s->n; i++)
            for (int j = 0; j < s->n; j++)
                if (side[i] != side[j])
                    s->blocked[i][j] = true;
        TRACE(s, "partition");
        schedule(s, (5 + rnd(s, 60)) * TICK_US, EV_HEAL, -1);
    } else if (kind < 28) {
        /* one-way links */
        for (int c = 0; c < 3; c++) {
            int a = (int)rnd(s, (uint64_t)s->n), b = (int)rnd(s, (uint64_t)s->n);
            if (a != b)
                s->blocked[a][b] = true;
        }
        TRACE(s, "asymmetric partition");
        schedule(s, (5 + rnd(s, 60)) * TICK_US, EV_HEAL, -1);
    } else if (kind < 33 && leader >= 0) {
        /* isolate the leader */
        for (int i = 0; i < s->n; i++)
            if (i != leader)
                s->blocked[i][leader] = s->blocked[leader][i] = true;
        TRACE(s, "isolate leader n%d", leader + 1);
        schedule(s, (5 + rnd(s, 80)) * TICK_US, EV_HEAL, -1);
    } else if (kind < 48) {
        if (leader >= 0 && rnd(s, 2))
            k = leader; /* leaders are the interesting ones to lose */
        if (s->nodes[k].up) {
            node_crash(s, k);
            schedule(s, (1 + rnd(s, 40)) * TICK_US, EV_RESTART, k);
        }
    } else if (kind < 68 && leader >= 0) {
        /* membership: keep between nodes-1 and nodes+1 voters */
        struct raft *r = s->nodes[leader].r;
        const struct raft_membership *c = raft_membership(r);
        int voters = 0;
        uint64_t learner = 0;
        for (uint32_t i = 0; i < c->n; i++) {
            if (c->members[i].role == RAFT_VOTER)
                voters++;
            else
                learner = c->members[i].id;
        }
        int rc;
        uint64_t target;
        if (learner) {
            target = learner;
            rc = raft_change_membership(r, RAFT_PROMOTE, learner, NULL);
            TRACE(s, "promote n%" PRIu64 ": %s", learner, raft_errname(rc));
        } else {
            uint64_t absent = 0;
            for (int i = 0; i < s->n; i++)
                if (!raft_membership_find(c, s->nodes[i].id))
                    absent = s->nodes[i].id;
            if (absent && (voters <= s->o.nodes || rnd(s, 2))) {
                target = absent;
                rc = raft_change_membership(r, RAFT_ADD_LEARNER, absent, NULL);
                TRACE(s, "add learner n%" PRIu64 ": %s", absent, raft_errname(rc));
            } else if (voters >= s->o.nodes) {
                const struct raft_member *m = &c->members[rnd(s, c->n)];
                target = m->id;
                rc = raft_change_membership(r, RAFT_REMOVE, m->id, NULL);
                TRACE(s, "remove n%" PRIu64 ": %s", m->id, raft_errname(rc));
            } else {
                rc = -1;
                target = 0;
            }
        }
        (void)target;
        if (rc == 0)
            s->res->config_changes++;
        pump(s, leader);
        check_node(s, &s->nodes[leader]);
    } else if (kind < 80 && leader >= 0) {
        const struct raft_membership *c = raft_membership(s->nodes[leader].r);
        const struct raft_member *m = &c->members[rnd(s, c->n)];
        int rc = raft_transfer_leadership(s->nodes[leader].r, m->id);
        TRACE(s, "transfer n%d -> n%" PRIu64 ": %s", leader + 1, m->id, raft_errname(rc));
        if (rc == 0)
            s->res->transfers++;
        pump(s, leader);
    } else {
        memset(s->blocked, 0, sizeof(s->blocked));
        TRACE(s, "heal all links");
    }
    schedule(s, (1 + rnd(s, s->fault_gap_ticks)) * TICK_US, EV_FAULT, -1);
}

static void heal_everything(struct sim *s)
{
    s->faults_on = false;
    memset(s->blocked, 0, sizeof(s->blocked));
    for (int k = 0; k < s->n; k++)
        if (!s->nodes[k].up) {
            node_start(s, k);
            check_node(s, &s->nodes[k]);
        }
    s->heal_time = s->now;
    TRACE(s, "heal everything");
    schedule(s, TICK_US, EV_LIVE, -1);
}

static void liveness_probe(struct sim *s)
{
    if (s->probe_op && s->now > s->probe_deadline)
        s->probe_op = 0; /* its node never saw it applied: propose another */
    if (s->live_ok || s->probe_op)
        return;
    int k = find_leader(s);
    if (k < 0)
        return;
    struct node *nd = &s->nodes[k];
    uint8_t buf[8];
    uint64_t op = ++s->next_op;
    put64(buf, op);
    uint64_t index;
    if (raft_propose(nd->r, buf, 8, &index) == 0) {
        s->invoked_incs++;
        s->probe_op = op;
        s->probe_node = k;
        s->probe_inc = nd->incarnation;
        s->probe_index = index;
        s->probe_deadline = s->now + 50 * TICK_US;
        pump(s, k);
    }
}

/* ---------------------------------------------------------------- main loop */

static void handle(struct sim *s, struct event *e)
{
    struct node *nd = e->node >= 0 ? &s->nodes[e->node] : NULL;
    switch (e->type) {
    case EV_TICK:
        if (!nd->up || e->inc != nd->incarnation)
            break;
        raft_tick(nd->r);
        pump(s, e->node);
        check_node(s, nd);
        schedule(s, nd->tick_us, EV_TICK, e->node);
        break;
    case EV_DELIVER: {
        if (!nd->up || s->blocked[e->from - 1][e->node]) {
            free(e->buf);
            break;
        }
        static struct raft_entry ents[MAX_DECODE_ENTRIES];
        struct raft_message m;
        int rc = raft_msg_decode(e->buf, e->len, &m, ents, MAX_DECODE_ENTRIES);
        if (rc != 0) {
            fail(s, "decode of a message the core encoded failed: %s", raft_strerror(rc));
            free(e->buf);
            break;
        }
        TRACE(s, "deliver n%" PRIu64 "->n%" PRIu64 " type %d term %" PRIu64, m.from, m.to, m.type,
              m.term);
        raft_step(nd->r, &m);
        free(e->buf);
        pump(s, e->node);
        check_node(s, nd);
        break;
    }
    case EV_IO:
        if (!nd->up || e->inc != nd->incarnation || !nd->io.active)
            break;
        io_done(s, e->node);
        pump(s, e->node);
        check_node(s, nd);
        break;
    case EV_CLIENT:
        client_step(s, -1 - e->node);
        break;
    case EV_FAULT:
        if (s->faults_on)
            fault(s);
        break;
    case EV_RESTART:
        if (!s->nodes[e->node].up && s->faults_on) {
            TRACE(s, "restart n%d", e->node + 1);
            node_start(s, e->node);
            check_node(s, &s->nodes[e->node]);
        }
        break;
    case EV_HEAL:
        if (s->faults_on) {
            memset(s->blocked, 0, sizeof(s->blocked));
            TRACE(s, "heal links");
        }
        break;
    case EV_DEPOSE:
        if (s->faults_on && nd->up && e->inc == nd->incarnation) {
            struct raft_status st;
            raft_status(nd->r, &st);
            if (st.role != RAFT_LEADER || st.term != e->from)
                break;
            if (rnd(s, 2)) {
                node_crash(s, e->node);
                schedule(s, (1 + rnd(s, 20)) * TICK_US, EV_RESTART, e->node);
            } else {
                TRACE(s, "cut off leader n%d", e->node + 1);
                for (int i = 0; i < s->n; i++)
                    if (i != e->node)
                        s->blocked[i][e->node] = s->blocked[e->node][i] = true;
                schedule(s, (2 + rnd(s, 60)) * TICK_US, EV_HEAL, -1);
            }
        }
        break;
    case EV_LIVE:
        liveness_probe(s);
        schedule(s, TICK_US, EV_LIVE, -1);
        break;
    }
}

/* The state of every node, printed after a failure in verbose mode. */
static void dump_nodes(struct sim *s)
{
    for (int k = 0; k < s->n; k++) {
        struct node *nd = &s->nodes[k];
        if (!nd->up) {
            fprintf(stderr, "n%" PRIu64 ": down\n", nd->id);
            continue;
        }
        struct raft_status st;
        raft_status(nd->r, &st);
        fprintf(stderr,
                "n%" PRIu64 ": role %d term %" PRIu64 " vote %" PRIu64 " leader %" PRIu64
                " commit %" PRIu64 " applied %" PRIu64 " log %" PRIu64 "..%" PRIu64 " stable %" PRIu64
                " snapshot %" PRIu64 " fsm %" PRIu64 " io %d\n",
                nd->id, (int)st.role, st.term, st.vote, st.leader, st.commit, st.applied,
                st.first_index, st.last_index, st.stable_index, st.snapshot_index, nd->fsm_index,
                (int)nd->io.active);
        const struct raft_membership *c = raft_membership(nd->r);
        for (uint32_t i = 0; i < c->n; i++) {
            struct raft_progress_info pi;
            if (raft_progress(nd->r, i, &pi))
                fprintf(stderr, "    member n%" PRIu64 " role %d match %" PRIu64 " next %" PRIu64 "\n",
                        pi.id, pi.role, pi.match, pi.next);
            else
                fprintf(stderr, "    member n%" PRIu64 " role %d\n", c->members[i].id,
                        c->members[i].role);
        }
    }
}

/* After healing, every member of the leader's configuration applies the liveness probe. */
static bool converged(struct sim *s)
{
    int l = find_leader(s);
    if (l < 0)
        return false;
    const struct raft_membership *c = raft_membership(s->nodes[l].r);
    for (uint32_t i = 0; i < c->n; i++) {
        const struct node *nd = &s->nodes[c->members[i].id - 1];
        if (!nd->up || nd->fsm_index < s->live_index)
            return false;
    }
    return true;
}

/* The end of the client history: the counter holds exactly the committed increments, and every
 * acknowledged increment is among them, once, where it was acknowledged. */
static void final_check(struct sim *s)
{
    int l = find_leader(s);
    if (l < 0)
        return;
    const struct node *nd = &s->nodes[l];
    uint64_t incs = 0;
    for (uint64_t i = 1; i <= nd->fsm_index && i < s->rec_cap; i++) {
        if (!s->committed[i].set) {
            fail(s, "index %" PRIu64 " applied by the leader was never seen committed", i);
            return;
        }
        incs += s->committed[i].op != 0;
    }
    if (nd->counter != incs) {
        fail(s, "counter %" PRIu64 " but %" PRIu64 " increments committed", nd->counter, incs);
        return;
    }
    for (size_t k = 0; k < s->n_acked; k++) {
        uint64_t op = s->acked[k].op;
        if (op >= s->op_cap || s->op_index[op] != s->acked[k].index) {
            fail(s, "lost increment: op %" PRIu64 " acknowledged at index %" PRIu64
                    " is not committed there", op, s->acked[k].index);
            return;
        }
    }
}

static void sim_free(struct sim *s)
{
    free(s->acked);
    for (int k = 0; k < s->n; k++) {
        struct node *nd = &s->nodes[k];
        raft_free(nd->r);
        io_clear(&nd->io);
        disk_truncate_from(&nd->disk, 0);
        free(nd->disk.ents);
        free(nd->reads);
    }
    for (size_t i = 0; i < s->heap_n; i++)
        free(s->heap[i].buf);
    free(s->heap);
    free(s->leader_of_term);
    free(s->lm);
    free(s->committed);
    free(s->applied);
    free(s->op_index);
}

int sim_run(const struct sim_opts *o, struct sim_result *res)
{
    struct sim *s = xcalloc(1, sizeof(*s));
    memset(res, 0, sizeof(*res));
    s->o = *o;
    s->res = res;
    s->rng = o->seed * 0x9e3779b97f4a7c15ULL + 12345;
    s->n = o->nodes + (o->no_faults ? 0 : 1);
    if (o->nodes < 1 || s->n > MAX_NODES) {
        snprintf(res->why, sizeof(res->why), "unsupported cluster size %d", o->nodes);
        res->failed = true;
        free(s);
        return 1;
    }
    s->bootstrap.n = (uint32_t)o->nodes;
    for (int i = 0; i < o->nodes; i++) {
        s->bootstrap.members[i].id = (uint64_t)i + 1;
        s->bootstrap.members[i].role = RAFT_VOTER;
    }
    s->faults_on = !o->no_faults;
    s->max_msg_bytes = (size_t[]){21, 48, 128, 4096}[rnd(s, 4)];
    s->max_inflight = (unsigned[]){1, 2, 4, 8}[rnd(s, 4)];
    s->heartbeat_ticks = 1 + (unsigned)rnd(s, 3);
    s->pre_vote = rnd(s, 4) != 0;
    s->check_quorum = rnd(s, 2) != 0;
    s->client_gap_us = 100 + rnd(s, 3000);
    s->fault_gap_ticks = 5 + rnd(s, 40);
    s->depose_pct = (unsigned[]){10, 40, 70, 90}[rnd(s, 4)];
    if (o->no_faults) {
        s->max_msg_bytes = 64 * 1024;
        s->max_inflight = 8;
        s->heartbeat_ticks = 2;
        s->pre_vote = s->check_quorum = true;
        s->delay_min_us = s->delay_max_us = 0;
    } else {
        s->loss = rndf(s) * 0.15;
        s->dup = rndf(s) * 0.08;
        s->delay_min_us = 50 + rnd(s, 300);
        s->delay_max_us = s->delay_min_us + rnd(s, 4 * TICK_US);
    }
    for (int k = 0; k < s->n; k++) {
        struct node *nd = &s->nodes[k];
        nd->id = (uint64_t)k + 1;
        /* each clock runs at its own rate, within 25% of nominal */
        nd->tick_us = o->no_faults ? TICK_US : TICK_US * 3 / 4 + rnd(s, TICK_US / 2);
        node_start(s, k);
    }
    for (int i = 0; i < N_CLIENTS; i++) {
        s->clients[i].target = -1;
        schedule(s, 10 * TICK_US + rnd(s, TICK_US), EV_CLIENT, -1 - i);
    }
    if (!o->no_faults)
        schedule(s, (20 + rnd(s, 30)) * TICK_US, EV_FAULT, -1);

    while (s->heap_n > 0 && !res->failed) {
        struct event e = pop(s);
        s->now = e.time;
        handle(s, &e);
        s->steps_done++;
        if (o->no_faults) {
            if (s->bench_committed >= (uint64_t)o->bench_entries)
                break;
            continue;
        }
        if (s->faults_on && s->steps_done >= o->steps)
            heal_everything(s);
        if (!s->faults_on && s->live_ok && converged(s)) {
            final_check(s);
            break;
        }
        if (!s->faults_on && s->now - s->heal_time > LIVENESS_BOUND_US) {
            int l = find_leader(s);
            fail(s, "liveness: %s %" PRIu64 " ms after faults healed",
                 l < 0 ? "no leader" : !s->live_ok ? "no proposal committed" : "members not caught up",
                 (s->now - s->heal_time) / 1000);
        }
    }
    if (res->failed && o->verbose)
        dump_nodes(s);
    res->events = s->steps_done;
    res->virtual_us = s->now;
    sim_free(s);
    free(s);
    return res->failed ? 1 : 0;
}
