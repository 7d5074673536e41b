/*
 * core.c - the Raft algorithm as a deterministic state machine (see raft.h for the contract).
 *
 * The core keeps the log in memory (bounded by snapshots and compaction), the persistent state
 * (term, vote) and all volatile state of the paper's Figure 2, plus the leader's per-follower
 * progress used for flow control. It never performs I/O: what must be written, sent and applied
 * is queued and handed out by raft_ready, and the caller reports back through raft_advance.
 * Because messages leave only through an update whose writes the caller makes durable first, a
 * vote or an acknowledgement is never sent before what it promises is on disk (paper §5.1 and
 * thesis §3.8, "persist before responding").
 *
 * References: "In Search of an Understandable Consensus Algorithm" (the paper, Figure 2 and
 * sections 5-8) and Ongaro's dissertation "Consensus: Bridging Theory and Practice" (the thesis),
 * for membership (§4), leadership transfer (§3.10), ReadIndex (§6.4), CheckQuorum (§6.2),
 * PreVote (§9.6) and the leader's own disk write (§10.2.1).
 */
#include "raft.h"

#include <assert.h>
#include <stdlib.h>
#include <string.h>

enum pr_state { PR_PROBE, PR_REPLICATE, PR_SNAPSHOT };

#define ENTRY_WIRE_OVERHEAD 13 /* term, type, length: see codec.c */

/* What the leader knows of one member (paper Figure 2: nextIndex, matchIndex), plus the flow
 * control state: PROBE sends one AppendEntries at a time until the follower's log position is
 * found; REPLICATE pipelines up to max_inflight_msgs; SNAPSHOT sends InstallSnapshot chunks. */
struct progress {
    uint64_t match;
    uint64_t next;
    uint8_t state;
    bool probe_sent;
    bool recent_active; /* heard from since the last CheckQuorum round */
    unsigned stall_heartbeats;
    uint64_t match_at_heartbeat;
    uint64_t inflight[RAFT_MAX_INFLIGHT]; /* last index of each AppendEntries in flight, a ring */
    unsigned in_start, in_count;
    uint64_t read_ack; /* highest ReadIndex round the member answered in this term */
    uint64_t snap_index;
    uint64_t snap_offset;
};

/* A queued message. Entry and chunk payloads are borrowed from the log and the snapshot and
 * resolved when the update is built, since the log may move in between. */
struct outmsg {
    struct raft_message m;
    uint64_t last_term;  /* APPEND with entries: term of its last entry when queued */
    uint64_t snap_index; /* SNAPSHOT: which snapshot the chunk is from */
};

struct read_req {
    uint64_t ctx;
    uint64_t index;
    uint64_t seq;
};

struct raft {
    struct raft_config cfg;
    uint64_t id;
    uint64_t rng;

    /* Persistent state (Figure 2). */
    uint64_t term;
    uint64_t vote;

    /* The log: log[0] holds index log_first; the entries and their payloads are owned here. */
    struct raft_entry *log;
    size_t log_n, log_cap;
    uint64_t log_first;
    struct raft_snapshot snap; /* snap.data == snap_data, owned */
    uint8_t *snap_data;

    struct raft_membership bootstrap;
    struct raft_membership conf; /* the latest configuration in the log, committed or not */
    uint64_t conf_index;         /* its index, 0 if from the snapshot or bootstrap */

    uint64_t commit;
    uint64_t stable;        /* last index known durable */
    uint64_t unstable_from; /* first index not yet handed out for persistence */
    uint64_t apply_handed;  /* last index handed out to apply */
    uint64_t applied;       /* last index the caller reported applied */
    struct raft_hard_state hs_handed;

    enum raft_role role;
    uint64_t leader;
    unsigned election_elapsed, heartbeat_elapsed, randomized_timeout;

    /* Votes received in the current (pre-)campaign. */
    uint64_t votes_for[RAFT_MAX_MEMBERS], votes_against[RAFT_MAX_MEMBERS];
    unsigned n_for, n_against;

    /* Leader state: prs[i] belongs to conf.members[i]. */
    struct progress prs[RAFT_MAX_MEMBERS];
    bool need_broadcast;
    bool need_heartbeat;
    uint64_t transfer_target;
    unsigned transfer_elapsed;

    struct read_req *reads; /* pending ReadIndex requests, max_pending_reads */
    unsigned n_reads;
    uint64_t read_seq;
    struct raft_read_state *reads_ready, *reads_handed;
    unsigned n_reads_ready;

    struct outmsg *outbox; /* max_outbox_msgs */
    unsigned n_out;
    struct raft_message *handed_msgs;

    /* A snapshot being received in chunks. */
    uint8_t *rcv_buf;
    size_t rcv_len, rcv_total;
    bool rcv_active;
    uint64_t rcv_index, rcv_term;
    struct raft_membership rcv_conf;
    bool snap_pending; /* an installed snapshot not yet handed out */

    bool outstanding; /* an update is out and not advanced */
    uint64_t dropped;
};

/* ---------------------------------------------------------------- helpers */

static uint64_t rng_next(struct raft *r)
{
    /* splitmix64: small, fast, and good enough to spread election timeouts. */
    uint64_t z = (r->rng += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static void reset_randomized_timeout(struct raft *r)
{
    /* Paper §5.2: randomized election timeouts make split votes rare. */
    unsigned et = r->cfg.election_timeout_ticks;
    r->randomized_timeout = et + (unsigned)(rng_next(r) % et);
}

static uint64_t last_index(const struct raft *r) { return r->log_first + r->log_n - 1; }

static struct raft_entry *entry_ptr(const struct raft *r, uint64_t index)
{
    if (index < r->log_first || index > last_index(r))
        return NULL;
    return &r->log[index - r->log_first];
}

static bool term_at(const struct raft *r, uint64_t index, uint64_t *term)
{
    if (index == 0) {
        *term = 0;
        return true;
    }
    const struct raft_entry *e = entry_ptr(r, index);
    if (e) {
        *term = e->term;
        return true;
    }
    if (index == r->snap.index) {
        *term = r->snap.term;
        return true;
    }
    return false;
}

static uint64_t last_term(const struct raft *r)
{
    uint64_t t = 0;
    bool ok = term_at(r, last_index(r), &t);
    assert(ok);
    (void)ok;
    return t;
}

static bool term_matches(const struct raft *r, uint64_t index, uint64_t term)
{
    uint64_t t;
    return term_at(r, index, &t) && t == term;
}

static void entry_free(struct raft_entry *e) { free((void *)e->data); }

static int log_append(struct raft *r, uint64_t term, uint8_t type, const uint8_t *data, uint32_t len)
{
    if (r->log_n == r->log_cap) {
        size_t cap = r->log_cap ? r->log_cap * 2 : 64;
        struct raft_entry *n = realloc(r->log, cap * sizeof(*n));
        if (!n)
            return RAFT_ERR_NOMEM;
        r->log = n;
        r->log_cap = cap;
    }
    uint8_t *copy = NULL;
    if (len > 0) {
        copy = malloc(len);
        if (!copy)
            return RAFT_ERR_NOMEM;
        memcpy(copy, data, len);
    }
    struct raft_entry *e = &r->log[r->log_n++];
    e->term = term;
    e->index = r->log_first + r->log_n - 1;
    e->type = type;
    e->len = len;
    e->data = copy;
    return 0;
}

/* Drops entries from index on (a conflict, paper §5.3). Committed entries are never dropped. */
static void log_truncate(struct raft *r, uint64_t index)
{
    assert(index > r->commit);
    while (r->log_n > 0 && last_index(r) >= index)
        entry_free(&r->log[--r->log_n]);
    if (r->unstable_from > index)
        r->unstable_from = index;
    if (r->stable >= index)
        r->stable = index - 1;
}

/* Drops entries up to and including index (compaction, paper §7). */
static void log_compact(struct raft *r, uint64_t index)
{
    if (index < r->log_first)
        return;
    size_t k = (size_t)(index - r->log_first + 1);
    if (k > r->log_n)
        k = r->log_n;
    for (size_t i = 0; i < k; i++)
        entry_free(&r->log[i]);
    memmove(r->log, r->log + k, (r->log_n - k) * sizeof(*r->log));
    r->log_n -= k;
    r->log_first += k;
}

static bool is_voter_in(const struct raft_membership *c, uint64_t id)
{
    const struct raft_member *m = raft_membership_find(c, id);
    return m && m->role == RAFT_VOTER;
}

static unsigned n_voters(const struct raft *r)
{
    unsigned n = 0;
    for (uint32_t i = 0; i < r->conf.n; i++)
        n += r->conf.members[i].role == RAFT_VOTER;
    return n;
}

static unsigned quorum(const struct raft *r) { return n_voters(r) / 2 + 1; }

static int member_slot(const struct raft *r, uint64_t id)
{
    for (uint32_t i = 0; i < r->conf.n; i++)
        if (r->conf.members[i].id == id)
            return (int)i;
    return -1;
}

static struct progress *progress_of(struct raft *r, uint64_t id)
{
    int i = member_slot(r, id);
    return i < 0 ? NULL : &r->prs[i];
}

static void progress_reset(struct raft *r, struct progress *pr)
{
    memset(pr, 0, sizeof(*pr));
    pr->next = last_index(r) + 1;
    pr->state = PR_PROBE;
    pr->recent_active = true;
}

/* The configuration in effect at index: the latest config entry at or before it (thesis §4.1:
 * a server uses the latest configuration in its log, committed or not). */
static bool conf_at(const struct raft *r, uint64_t index, struct raft_membership *out, uint64_t *at)
{
    uint64_t i = index < last_index(r) ? index : last_index(r);
    for (; i >= r->log_first && i > 0; i--) {
        const struct raft_entry *e = entry_ptr(r, i);
        if (e->type == RAFT_ENTRY_CONFIG && raft_membership_decode(e->data, e->len, out) == 0) {
            *at = i;
            return true;
        }
    }
    *at = 0;
    *out = r->snap.index > 0 ? r->snap.conf : r->bootstrap;
    return true;
}

/* Recomputes the configuration after the log changed; a leader keeps progress by member id. */
static void conf_refresh(struct raft *r)
{
    struct raft_membership c;
    uint64_t at;
    conf_at(r, last_index(r), &c, &at);
    if (at == r->conf_index && memcmp(&c, &r->conf, sizeof(c)) == 0)
        return;
    struct progress old[RAFT_MAX_MEMBERS];
    struct raft_membership oldc = r->conf;
    memcpy(old, r->prs, sizeof(old));
    r->conf = c;
    r->conf_index = at;
    for (uint32_t i = 0; i < c.n; i++) {
        int j = -1;
        for (uint32_t k = 0; k < oldc.n; k++)
            if (oldc.members[k].id == c.members[i].id)
                j = (int)k;
        if (j >= 0)
            r->prs[i] = old[j];
        else
            progress_reset(r, &r->prs[i]);
    }
}

/* ---------------------------------------------------------------- outbox */

static struct outmsg *out_new(struct raft *r, uint8_t type, uint64_t to, uint64_t term)
{
    if (r->n_out >= r->cfg.max_outbox_msgs) {
        r->dropped++; /* the network may lose messages anyway; Raft retries */
        return NULL;
    }
    struct outmsg *o = &r->outbox[r->n_out++];
    memset(o, 0, sizeof(*o));
    o->m.type = type;
    o->m.from = r->id;
    o->m.to = to;
    o->m.term = term;
    return o;
}

static void send_append_resp(struct raft *r, uint64_t to, bool reject, uint64_t index,
                             uint64_t hint_index, uint64_t hint_term, uint64_t read_seq)
{
    struct outmsg *o = out_new(r, RAFT_MSG_APPEND_RESP, to, r->term);
    if (!o)
        return;
    o->m.u.append_resp.reject = reject;
    o->m.u.append_resp.index = index;
    o->m.u.append_resp.hint_index = hint_index;
    o->m.u.append_resp.hint_term = hint_term;
    o->m.u.append_resp.read_seq = read_seq;
}

/* ---------------------------------------------------------------- roles */

static void reads_drop(struct raft *r) { r->n_reads = 0; }

static void become_follower(struct raft *r, uint64_t term, uint64_t leader)
{
    if (term > r->term) {
        r->term = term;
        r->vote = 0;
    }
    r->role = RAFT_FOLLOWER;
    r->leader = leader;
    r->election_elapsed = 0;
    r->transfer_target = 0;
    r->need_broadcast = false;
    r->need_heartbeat = false;
    reads_drop(r);
    reset_randomized_timeout(r);
}

static void send_append(struct raft *r, int slot, bool allow_empty, bool *sent);
static void broadcast_heartbeat(struct raft *r);

static void become_leader(struct raft *r)
{
    r->role = RAFT_LEADER;
    r->leader = r->id;
    r->transfer_target = 0;
    r->heartbeat_elapsed = 0;
    r->election_elapsed = 0;
    reads_drop(r);
    for (uint32_t i = 0; i < r->conf.n; i++)
        progress_reset(r, &r->prs[i]);
    /* Paper §8 / thesis §6.4: a no-op of the new term lets the leader learn what is committed
     * and is the entry that commits everything before it (§5.4.2). */
    if (log_append(r, r->term, RAFT_ENTRY_NOOP, NULL, 0) != 0) {
        become_follower(r, r->term, 0);
        return;
    }
    for (uint32_t i = 0; i < r->conf.n; i++)
        if (r->conf.members[i].id != r->id)
            send_append(r, (int)i, true, NULL);
}

static void send_vote_requests(struct raft *r, bool pre, bool transfer)
{
    for (uint32_t i = 0; i < r->conf.n; i++) {
        const struct raft_member *mb = &r->conf.members[i];
        if (mb->id == r->id || mb->role != RAFT_VOTER)
            continue;
        struct outmsg *o = out_new(r, pre ? RAFT_MSG_PREVOTE : RAFT_MSG_VOTE, mb->id,
                                   pre ? r->term + 1 : r->term);
        if (!o)
            continue;
        o->m.u.vote.last_index = last_index(r);
        o->m.u.vote.last_term = last_term(r);
        o->m.u.vote.transfer = transfer;
    }
}

static void campaign(struct raft *r, bool pre, bool transfer)
{
    if (!is_voter_in(&r->conf, r->id))
        return;
    if (pre) {
        /* Thesis §9.6: ask first whether we could win, without disturbing anyone's term. */
        r->role = RAFT_PRE_CANDIDATE;
    } else {
        r->term++;
        r->vote = r->id;
        r->role = RAFT_CANDIDATE;
    }
    r->leader = 0;
    r->election_elapsed = 0;
    r->transfer_target = 0;
    reads_drop(r);
    reset_randomized_timeout(r);
    r->n_for = r->n_against = 0;
    r->votes_for[r->n_for++] = r->id;
    if (r->n_for >= quorum(r)) {
        if (pre)
            campaign(r, false, transfer);
        else
            become_leader(r);
        return;
    }
    send_vote_requests(r, pre, transfer);
}

/* ---------------------------------------------------------------- replication (leader) */

static void send_snapshot_chunk(struct raft *r, int slot)
{
    struct progress *pr = &r->prs[slot];
    uint64_t total = r->snap.len;
    uint64_t off = pr->snap_offset <= total ? pr->snap_offset : 0;
    uint64_t n = total - off;
    if (n > r->cfg.snapshot_chunk_bytes)
        n = r->cfg.snapshot_chunk_bytes;
    struct outmsg *o = out_new(r, RAFT_MSG_SNAPSHOT, r->conf.members[slot].id, r->term);
    if (!o)
        return;
    struct raft_msg_snapshot *s = &o->m.u.snapshot;
    s->index = r->snap.index;
    s->term = r->snap.term;
    s->conf = r->snap.conf;
    s->offset = off;
    s->total = total;
    s->len = (uint32_t)n;
    s->done = off + n == total;
    o->snap_index = r->snap.index;
}

static void start_snapshot(struct raft *r, int slot)
{
    /* Paper §7: the entries this follower needs were compacted; send the snapshot instead. */
    struct progress *pr = &r->prs[slot];
    pr->state = PR_SNAPSHOT;
    pr->snap_index = r->snap.index;
    pr->snap_offset = 0;
    pr->in_count = 0;
    send_snapshot_chunk(r, slot);
}

/* Sends the next AppendEntries to a member, within the flow control bounds. */
static void send_append(struct raft *r, int slot, bool allow_empty, bool *sent)
{
    struct progress *pr = &r->prs[slot];
    if (sent)
        *sent = false;
    if (pr->state == PR_SNAPSHOT)
        return;
    if (pr->state == PR_PROBE && pr->probe_sent)
        return;
    if (pr->state == PR_REPLICATE && pr->in_count >= r->cfg.max_inflight_msgs)
        return;
    uint64_t prev = pr->next - 1, prev_term;
    uint64_t last = last_index(r);
    if (!term_at(r, prev, &prev_term) || (pr->next <= last && pr->next < r->log_first)) {
        start_snapshot(r, slot);
        if (sent)
            *sent = true;
        return;
    }
    uint32_t n = 0;
    size_t bytes = 0;
    while (pr->next + n <= last) {
        /* Count each entry as encoded (header + payload), so the bound is on the wire size. */
        const struct raft_entry *e = entry_ptr(r, pr->next + n);
        size_t sz = ENTRY_WIRE_OVERHEAD + e->len;
        if (n > 0 && bytes + sz > r->cfg.max_msg_bytes)
            break;
        bytes += sz;
        n++;
    }
    if (n == 0 && !allow_empty)
        return;
    struct outmsg *o = out_new(r, RAFT_MSG_APPEND, r->conf.members[slot].id, r->term);
    if (!o)
        return;
    struct raft_msg_append *a = &o->m.u.append;
    a->prev_index = prev;
    a->prev_term = prev_term;
    a->commit = r->commit;
    a->read_seq = r->read_seq;
    a->n_entries = n;
    if (n > 0)
        o->last_term = entry_ptr(r, prev + n)->term;
    if (pr->state == PR_REPLICATE && n > 0) {
        /* Pipelining: assume success, move next on, remember the message as in flight. */
        pr->inflight[(pr->in_start + pr->in_count) % RAFT_MAX_INFLIGHT] = prev + n;
        pr->in_count++;
        pr->next = prev + n + 1;
    } else if (pr->state == PR_PROBE) {
        pr->probe_sent = true;
    }
    if (sent)
        *sent = true;
}

static void send_heartbeat(struct raft *r, int slot)
{
    /* An empty AppendEntries anchored at what the follower is known to hold, so it never
     * fails on a correct follower; it carries the commit index and the ReadIndex round. */
    struct progress *pr = &r->prs[slot];
    uint64_t prev = pr->match, prev_term;
    if (!term_at(r, prev, &prev_term)) {
        prev = 0;
        prev_term = 0;
    }
    struct outmsg *o = out_new(r, RAFT_MSG_APPEND, r->conf.members[slot].id, r->term);
    if (!o)
        return;
    o->m.u.append.prev_index = prev;
    o->m.u.append.prev_term = prev_term;
    o->m.u.append.commit = r->commit;
    o->m.u.append.read_seq = r->read_seq;
}

static void broadcast_heartbeat(struct raft *r)
{
    for (uint32_t i = 0; i < r->conf.n; i++) {
        if (r->conf.members[i].id == r->id)
            continue;
        struct progress *pr = &r->prs[i];
        switch (pr->state) {
        case PR_PROBE:
            pr->probe_sent = false;
            send_append(r, (int)i, true, NULL);
            break;
        case PR_REPLICATE:
            if (pr->match == pr->match_at_heartbeat && pr->match < last_index(r)) {
                if (++pr->stall_heartbeats >= 3) {
                    /* Nothing acknowledged for a while: messages were lost. Probe again. */
                    pr->state = PR_PROBE;
                    pr->next = pr->match + 1;
                    pr->in_count = 0;
                    pr->probe_sent = false;
                    pr->stall_heartbeats = 0;
                    send_append(r, (int)i, true, NULL);
                    break;
                }
            } else {
                pr->stall_heartbeats = 0;
            }
            pr->match_at_heartbeat = pr->match;
            send_heartbeat(r, (int)i);
            break;
        case PR_SNAPSHOT:
            send_heartbeat(r, (int)i);
            if (pr->snap_index != r->snap.index)
                start_snapshot(r, (int)i);
            else
                send_snapshot_chunk(r, (int)i);
            break;
        }
    }
}

static void fill_pipeline(struct raft *r, int slot)
{
    bool sent = true;
    for (unsigned k = 0; sent && k <= RAFT_MAX_INFLIGHT; k++)
        send_append(r, slot, false, &sent);
}

static void broadcast_append(struct raft *r)
{
    for (uint32_t i = 0; i < r->conf.n; i++)
        if (r->conf.members[i].id != r->id)
            fill_pipeline(r, (int)i);
}

static int cmp_desc(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? 1 : x > y ? -1 : 0;
}

/* The quorum-th highest value among voters; self counts with self_value. */
static uint64_t quorum_value(struct raft *r, uint64_t self_value, bool use_read_ack)
{
    uint64_t v[RAFT_MAX_MEMBERS];
    unsigned n = 0;
    for (uint32_t i = 0; i < r->conf.n; i++) {
        if (r->conf.members[i].role != RAFT_VOTER)
            continue;
        if (r->conf.members[i].id == r->id)
            v[n++] = self_value;
        else
            v[n++] = use_read_ack ? r->prs[i].read_ack : r->prs[i].match;
    }
    if (n == 0)
        return 0;
    qsort(v, n, sizeof(v[0]), cmp_desc);
    return v[quorum(r) - 1];
}

static void maybe_commit(struct raft *r)
{
    if (r->role != RAFT_LEADER || !is_voter_in(&r->conf, r->id))
        return;
    /* The leader counts its own entries only once durable (thesis §10.2.1). */
    uint64_t n = quorum_value(r, r->stable, false);
    /* Paper §5.4.2: only an entry of the current term is committed by counting replicas. */
    if (n > r->commit && term_matches(r, n, r->term)) {
        r->commit = n;
        r->need_heartbeat = true;
    }
}

static void release_reads(struct raft *r)
{
    if (r->n_reads == 0)
        return;
    uint64_t q = quorum_value(r, UINT64_MAX, true);
    unsigned k = 0;
    while (k < r->n_reads && r->reads[k].seq <= q) {
        struct raft_read_state *rs = &r->reads_ready[r->n_reads_ready++];
        rs->ctx = r->reads[k].ctx;
        rs->index = r->reads[k].index;
        k++;
    }
    memmove(r->reads, r->reads + k, (r->n_reads - k) * sizeof(*r->reads));
    r->n_reads -= k;
}

static void maybe_send_timeout_now(struct raft *r, uint64_t to)
{
    struct progress *pr = progress_of(r, to);
    if (pr && pr->match == last_index(r))
        out_new(r, RAFT_MSG_TIMEOUT_NOW, to, r->term);
}

/* ---------------------------------------------------------------- message handlers */

static void handle_vote_request(struct raft *r, const struct raft_message *m)
{
    bool pre = m->type == RAFT_MSG_PREVOTE;
    const struct raft_msg_vote *v = &m->u.vote;
    /* Figure 2, RequestVote receiver: grant if not voted for another in this term, and the
     * candidate's log is at least as up to date (§5.4.1). A PreVote for a higher term is
     * granted on the log rule alone and changes nothing here. */
    bool can_vote = r->vote == m->from || (r->vote == 0 && r->leader == 0) ||
                    (pre && m->term > r->term);
    uint64_t lt = last_term(r);
    bool up_to_date = v->last_term > lt || (v->last_term == lt && v->last_index >= last_index(r));
    struct outmsg *o;
    if (can_vote && up_to_date) {
        o = out_new(r, pre ? RAFT_MSG_PREVOTE_RESP : RAFT_MSG_VOTE_RESP, m->from, m->term);
        if (!pre) {
            r->vote = m->from;
            r->election_elapsed = 0;
        }
        if (o)
            o->m.u.vote_resp.granted = true;
    } else {
        out_new(r, pre ? RAFT_MSG_PREVOTE_RESP : RAFT_MSG_VOTE_RESP, m->from, r->term);
    }
}

static bool seen(const uint64_t *ids, unsigned n, uint64_t id)
{
    for (unsigned i = 0; i < n; i++)
        if (ids[i] == id)
            return true;
    return false;
}

static void handle_vote_resp(struct raft *r, const struct raft_message *m)
{
    bool pre = m->type == RAFT_MSG_PREVOTE_RESP;
    if (pre ? r->role != RAFT_PRE_CANDIDATE : r->role != RAFT_CANDIDATE)
        return;
    if (pre && m->u.vote_resp.granted && m->term != r->term + 1)
        return;
    if (!is_voter_in(&r->conf, m->from) || seen(r->votes_for, r->n_for, m->from) ||
        seen(r->votes_against, r->n_against, m->from))
        return;
    if (m->u.vote_resp.granted)
        r->votes_for[r->n_for++] = m->from;
    else
        r->votes_against[r->n_against++] = m->from;
    if (r->n_for >= quorum(r)) {
        if (pre)
            campaign(r, false, false);
        else
            become_leader(r);
    } else if (n_voters(r) - r->n_against < quorum(r)) {
        become_follower(r, r->term, 0);
    }
}

static void handle_append(struct raft *r, const struct raft_message *m)
{
    const struct raft_msg_append *a = &m->u.append;
    uint64_t prev = a->prev_index;
    if (prev < r->commit) {
        /* Everything up to commit is known to match the leader. */
        send_append_resp(r, m->from, false, r->commit, 0, 0, a->read_seq);
        return;
    }
    uint64_t t;
    if (!term_at(r, prev, &t) || t != a->prev_term) {
        /* Figure 2 rule 2, with the fast back-off of §5.3: report the conflicting term and
         * where it starts, so the leader skips a whole term per round trip. */
        uint64_t hint_index, hint_term = 0;
        if (prev > last_index(r)) {
            hint_index = last_index(r) + 1;
        } else {
            hint_term = t;
            hint_index = prev;
            uint64_t pt;
            while (hint_index - 1 > r->commit && term_at(r, hint_index - 1, &pt) && pt == t)
                hint_index--;
        }
        send_append_resp(r, m->from, true, prev, hint_index, hint_term, a->read_seq);
        return;
    }
    /* Validate the batch before touching the log: indexes contiguous, terms non-decreasing
     * and not above the leader's. */
    uint64_t pterm = a->prev_term;
    for (uint32_t i = 0; i < a->n_entries; i++) {
        const struct raft_entry *e = &a->entries[i];
        if (e->index != prev + 1 + i || e->term < pterm || e->term > m->term)
            return;
        pterm = e->term;
    }
    /* Every entry here is past prev >= commit, so a truncation never touches a committed one. */
    bool conf_changed = false;
    for (uint32_t i = 0; i < a->n_entries; i++) {
        const struct raft_entry *e = &a->entries[i];
        if (e->index <= last_index(r)) {
            if (term_matches(r, e->index, e->term))
                continue;
            /* Rule 3: a conflicting entry and all that follow it are deleted. */
            if (r->conf_index >= e->index)
                conf_changed = true;
            log_truncate(r, e->index);
        }
        if (log_append(r, e->term, e->type, e->data, e->len) != 0)
            return; /* out of memory: answer nothing, the leader retries */
        if (e->type == RAFT_ENTRY_CONFIG)
            conf_changed = true;
    }
    if (conf_changed)
        conf_refresh(r);
    uint64_t new_last = prev + a->n_entries;
    /* Rule 5: commitIndex = min(leaderCommit, index of last new entry). */
    uint64_t c = a->commit < new_last ? a->commit : new_last;
    if (c > r->commit)
        r->commit = c;
    send_append_resp(r, m->from, false, new_last, 0, 0, a->read_seq);
}

static void handle_append_resp(struct raft *r, const struct raft_message *m)
{
    int slot = member_slot(r, m->from);
    if (slot < 0)
        return;
    struct progress *pr = &r->prs[slot];
    const struct raft_msg_append_resp *a = &m->u.append_resp;
    pr->recent_active = true;
    if (a->read_seq > pr->read_ack) {
        pr->read_ack = a->read_seq;
        release_reads(r);
    }
    if (a->reject) {
        if (pr->state == PR_SNAPSHOT)
            return;
        if (pr->state == PR_REPLICATE && a->index <= pr->match)
            return; /* stale */
        if (pr->state == PR_PROBE && a->index != pr->next - 1)
            return; /* answer to an older probe */
        uint64_t next = a->hint_index;
        if (a->hint_term > 0) {
            /* If we have entries of the follower's term, resume after our last one of it. */
            uint64_t k = a->index < last_index(r) ? a->index : last_index(r);
            uint64_t t;
            while (k >= r->log_first && k > 0 && term_at(r, k, &t) && t > a->hint_term)
                k--;
            if (k >= r->log_first && k > 0 && term_at(r, k, &t) && t == a->hint_term)
                next = k + 1;
        }
        if (next > a->index)
            next = a->index;
        if (next < pr->match + 1)
            next = pr->match + 1;
        pr->state = PR_PROBE;
        pr->next = next;
        pr->in_count = 0;
        pr->probe_sent = false;
        send_append(r, slot, true, NULL);
        return;
    }
    if (a->index > last_index(r))
        return; /* cannot match what we do not have: not from a correct follower */
    bool progressed = false;
    if (a->index > pr->match) {
        pr->match = a->index;
        progressed = true;
    }
    if (pr->next < a->index + 1)
        pr->next = a->index + 1;
    switch (pr->state) {
    case PR_PROBE:
        pr->state = PR_REPLICATE;
        pr->next = pr->match + 1;
        pr->in_count = 0;
        pr->stall_heartbeats = 0;
        pr->match_at_heartbeat = pr->match;
        break;
    case PR_REPLICATE:
        while (pr->in_count > 0 && pr->inflight[pr->in_start] <= a->index) {
            pr->in_start = (pr->in_start + 1) % RAFT_MAX_INFLIGHT;
            pr->in_count--;
        }
        break;
    case PR_SNAPSHOT:
        if (pr->match >= pr->snap_index) {
            pr->state = PR_PROBE;
            pr->probe_sent = false;
            pr->next = pr->match + 1;
        }
        break;
    }
    pr->probe_sent = false;
    if (progressed)
        maybe_commit(r);
    if (r->transfer_target == m->from)
        maybe_send_timeout_now(r, m->from);
    if (pr->state == PR_PROBE)
        send_append(r, slot, false, NULL);
    else
        fill_pipeline(r, slot);
}

static void handle_snapshot(struct raft *r, const struct raft_message *m)
{
    const struct raft_msg_snapshot *s = &m->u.snapshot;
    struct outmsg *o;
    if (s->index <= r->commit) {
        /* Already have all of it, committed. */
        o = out_new(r, RAFT_MSG_SNAPSHOT_RESP, m->from, r->term);
        if (o) {
            o->m.u.snapshot_resp.index = s->index;
            o->m.u.snapshot_resp.next_offset = s->total;
            o->m.u.snapshot_resp.done = true;
        }
        return;
    }
    if (s->total > r->cfg.max_snapshot_bytes || s->offset > s->total || s->len > s->total - s->offset)
        return;
    if (s->offset == 0) {
        free(r->rcv_buf);
        r->rcv_buf = malloc(s->total ? s->total : 1);
        r->rcv_active = r->rcv_buf != NULL;
        r->rcv_len = 0;
        r->rcv_total = s->total;
        r->rcv_index = s->index;
        r->rcv_term = s->term;
        r->rcv_conf = s->conf;
    }
    bool same = r->rcv_active && r->rcv_index == s->index && r->rcv_term == s->term &&
                r->rcv_total == s->total;
    if (!same || s->offset != r->rcv_len) {
        o = out_new(r, RAFT_MSG_SNAPSHOT_RESP, m->from, r->term);
        if (o) {
            o->m.u.snapshot_resp.index = s->index;
            o->m.u.snapshot_resp.next_offset = same ? r->rcv_len : 0;
        }
        return;
    }
    if (s->len > 0)
        memcpy(r->rcv_buf + r->rcv_len, s->data, s->len);
    r->rcv_len += s->len;
    if (!s->done) {
        o = out_new(r, RAFT_MSG_SNAPSHOT_RESP, m->from, r->term);
        if (o) {
            o->m.u.snapshot_resp.index = s->index;
            o->m.u.snapshot_resp.next_offset = r->rcv_len;
        }
        return;
    }
    if (r->rcv_len != r->rcv_total) {
        r->rcv_active = false;
        return;
    }
    /* Figure 13 steps 5-8: if the log holds the snapshot's last entry, keep what follows it;
     * otherwise discard the whole log. Then the state machine is reset from the snapshot. */
    if (term_matches(r, s->index, s->term)) {
        log_compact(r, s->index);
    } else {
        for (size_t i = 0; i < r->log_n; i++)
            entry_free(&r->log[i]);
        r->log_n = 0;
        r->log_first = s->index + 1;
        if (r->stable > s->index)
            r->stable = s->index;
        r->unstable_from = s->index + 1; /* whatever follows will be new */
    }
    if (r->log_n == 0)
        r->log_first = s->index + 1;
    free(r->snap_data);
    r->snap_data = r->rcv_buf;
    r->rcv_buf = NULL;
    r->rcv_active = false;
    r->snap.index = s->index;
    r->snap.term = s->term;
    r->snap.conf = r->rcv_conf;
    r->snap.data = r->snap_data;
    r->snap.len = r->rcv_len;
    r->commit = s->index;
    if (r->apply_handed < s->index)
        r->apply_handed = s->index;
    if (r->unstable_from < s->index + 1)
        r->unstable_from = s->index + 1;
    r->snap_pending = true;
    conf_refresh(r);
    o = out_new(r, RAFT_MSG_SNAPSHOT_RESP, m->from, r->term);
    if (o) {
        o->m.u.snapshot_resp.index = s->index;
        o->m.u.snapshot_resp.next_offset = s->total;
        o->m.u.snapshot_resp.done = true;
    }
}

static void handle_snapshot_resp(struct raft *r, const struct raft_message *m)
{
    int slot = member_slot(r, m->from);
    if (slot < 0)
        return;
    struct progress *pr = &r->prs[slot];
    const struct raft_msg_snapshot_resp *s = &m->u.snapshot_resp;
    pr->recent_active = true;
    if (pr->state != PR_SNAPSHOT || s->index != pr->snap_index)
        return;
    if (s->done) {
        if (s->index > pr->match)
            pr->match = s->index;
        pr->next = pr->match + 1;
        pr->state = PR_PROBE;
        pr->probe_sent = false;
        maybe_commit(r);
        send_append(r, slot, true, NULL);
        return;
    }
    if (pr->snap_index != r->snap.index) {
        start_snapshot(r, slot);
        return;
    }
    pr->snap_offset = s->next_offset <= r->snap.len ? s->next_offset : 0;
    send_snapshot_chunk(r, slot);
}

/* Indexes and terms far beyond anything reachable come only from a broken peer; refusing them
 * keeps the arithmetic below free of overflow. */
#define INDEX_SANE_MAX (UINT64_C(1) << 62)

static bool indexes_sane(const struct raft_message *m)
{
    if (m->term >= INDEX_SANE_MAX)
        return false;
    switch (m->type) {
    case RAFT_MSG_VOTE:
    case RAFT_MSG_PREVOTE:
        return m->u.vote.last_index < INDEX_SANE_MAX && m->u.vote.last_term < INDEX_SANE_MAX;
    case RAFT_MSG_APPEND:
        return m->u.append.prev_index < INDEX_SANE_MAX &&
               (m->u.append.n_entries == 0 || m->u.append.entries != NULL);
    case RAFT_MSG_APPEND_RESP:
        return m->u.append_resp.index < INDEX_SANE_MAX && m->u.append_resp.hint_index < INDEX_SANE_MAX;
    case RAFT_MSG_SNAPSHOT:
        return m->u.snapshot.index < INDEX_SANE_MAX && m->u.snapshot.index > 0 &&
               m->u.snapshot.conf.n <= RAFT_MAX_MEMBERS && (m->u.snapshot.len == 0 || m->u.snapshot.data);
    case RAFT_MSG_SNAPSHOT_RESP:
        return m->u.snapshot_resp.index < INDEX_SANE_MAX;
    default:
        return true;
    }
}

int raft_step(struct raft *r, const struct raft_message *m)
{
    if (m->to != r->id || m->from == 0 || m->from == r->id)
        return 0;
    if (m->type < RAFT_MSG_VOTE || m->type > RAFT_MSG_TIMEOUT_NOW)
        return 0;
    if (!indexes_sane(m))
        return 0;
    bool vote_req = m->type == RAFT_MSG_VOTE || m->type == RAFT_MSG_PREVOTE;
    bool from_leader = m->type == RAFT_MSG_APPEND || m->type == RAFT_MSG_SNAPSHOT ||
                       m->type == RAFT_MSG_TIMEOUT_NOW;
    if (m->term > r->term) {
        if (vote_req && !m->u.vote.transfer && r->cfg.check_quorum && r->leader != 0 &&
            r->election_elapsed < r->cfg.election_timeout_ticks) {
            /* Thesis §4.2.3 / §6.2: while we hear from a leader, a vote request is ignored
             * entirely, so a removed or partitioned server cannot depose a healthy leader. */
            return 0;
        }
        if (m->type == RAFT_MSG_PREVOTE ||
            (m->type == RAFT_MSG_PREVOTE_RESP && m->u.vote_resp.granted)) {
            /* A PreVote carries a term nobody has adopted yet (thesis §9.6). */
        } else {
            become_follower(r, m->term, from_leader ? m->from : 0);
        }
    } else if (m->term < r->term) {
        /* Stale term: ignored (Figure 2, "all servers"), but tell an old leader or a
         * pre-candidate about the newer term so it steps down instead of retrying forever. */
        if ((m->type == RAFT_MSG_APPEND || m->type == RAFT_MSG_SNAPSHOT) &&
            (r->cfg.check_quorum || r->cfg.pre_vote))
            send_append_resp(r, m->from, true, 0, 0, 0, 0);
        else if (m->type == RAFT_MSG_PREVOTE)
            out_new(r, RAFT_MSG_PREVOTE_RESP, m->from, r->term);
        return 0;
    }

    switch (m->type) {
    case RAFT_MSG_VOTE:
    case RAFT_MSG_PREVOTE:
        handle_vote_request(r, m);
        break;
    case RAFT_MSG_VOTE_RESP:
    case RAFT_MSG_PREVOTE_RESP:
        handle_vote_resp(r, m);
        break;
    case RAFT_MSG_APPEND:
    case RAFT_MSG_SNAPSHOT:
        if (r->role == RAFT_LEADER)
            return 0; /* two leaders in one term cannot happen (Election Safety) */
        if (r->role != RAFT_FOLLOWER)
            become_follower(r, r->term, m->from);
        r->leader = m->from;
        r->election_elapsed = 0;
        if (m->type == RAFT_MSG_APPEND)
            handle_append(r, m);
        else
            handle_snapshot(r, m);
        break;
    case RAFT_MSG_APPEND_RESP:
        if (r->role == RAFT_LEADER)
            handle_append_resp(r, m);
        break;
    case RAFT_MSG_SNAPSHOT_RESP:
        if (r->role == RAFT_LEADER)
            handle_snapshot_resp(r, m);
        break;
    case RAFT_MSG_TIMEOUT_NOW:
        /* Thesis §3.10: the leader has brought us up to date; start an election now. */
        if (r->role == RAFT_FOLLOWER && m->from == r->leader)
            campaign(r, false, true);
        break;
    }
    return 0;
}

/* ---------------------------------------------------------------- other inputs */

int raft_tick(struct raft *r)
{
    if (r->role != RAFT_LEADER) {
        r->election_elapsed++;
        if (is_voter_in(&r->conf, r->id) && r->election_elapsed >= r->randomized_timeout)
            campaign(r, r->cfg.pre_vote, false);
        return 0;
    }
    r->heartbeat_elapsed++;
    r->election_elapsed++;
    if (r->transfer_target != 0 && ++r->transfer_elapsed >= r->cfg.election_timeout_ticks)
        r->transfer_target = 0; /* thesis §3.10: abort a transfer that does not complete */
    if (r->election_elapsed >= r->cfg.election_timeout_ticks) {
        r->election_elapsed = 0;
        if (r->cfg.check_quorum) {
            /* Thesis §6.2: a leader that has not heard from a quorum in an election timeout
             * steps down, so clients go find the real leader. */
            unsigned active = 0;
            for (uint32_t i = 0; i < r->conf.n; i++) {
                if (r->conf.members[i].role != RAFT_VOTER)
                    continue;
                if (r->conf.members[i].id == r->id || r->prs[i].recent_active)
                    active++;
                r->prs[i].recent_active = false;
            }
            if (active < quorum(r)) {
                become_follower(r, r->term, 0);
                return 0;
            }
        }
    }
    if (r->heartbeat_elapsed >= r->cfg.heartbeat_ticks) {
        r->heartbeat_elapsed = 0;
        r->need_heartbeat = false;
        broadcast_heartbeat(r);
    }
    return 0;
}

static int propose_entry(struct raft *r, uint8_t type, const uint8_t *data, uint32_t len,
                         uint64_t *index_out)
{
    if (r->role != RAFT_LEADER)
        return RAFT_ERR_NOT_LEADER;
    if (r->transfer_target != 0)
        return RAFT_ERR_TRANSFERRING;
    if (len > r->cfg.max_entry_bytes)
        return RAFT_ERR_TOO_BIG;
    if (last_index(r) - r->commit >= r->cfg.max_uncommitted_entries)
        return RAFT_ERR_BUSY;
    int rc = log_append(r, r->term, type, data, len);
    if (rc != 0)
        return rc;
    if (type == RAFT_ENTRY_CONFIG)
        conf_refresh(r);
    r->need_broadcast = true; /* sent at raft_ready, batching proposals of one turn */
    if (index_out)
        *index_out = last_index(r);
    return 0;
}

int raft_propose(struct raft *r, const uint8_t *data, uint32_t len, uint64_t *index_out)
{
    if (len > 0 && data == NULL)
        return RAFT_ERR_INVALID;
    return propose_entry(r, RAFT_ENTRY_NORMAL, data, len, index_out);
}

int raft_change_membership(struct raft *r, enum raft_change change, uint64_t id, uint64_t *index_out)
{
    if (r->role != RAFT_LEADER)
        return RAFT_ERR_NOT_LEADER;
    if (id == 0)
        return RAFT_ERR_INVALID;
    /* Thesis §4.1: one change at a time, and (the single-server fix) only after an entry of
     * this term is committed, so no two leaders can act on diverging configurations. */
    if (r->conf_index > r->commit || !term_matches(r, r->commit, r->term))
        return RAFT_ERR_CONFIG_PENDING;
    struct raft_membership c = r->conf;
    int slot = member_slot(r, id);
    switch (change) {
    case RAFT_ADD_LEARNER:
        if (slot >= 0 || c.n >= RAFT_MAX_MEMBERS)
            return RAFT_ERR_INVALID;
        c.members[c.n].id = id;
        c.members[c.n].role = RAFT_LEARNER;
        c.n++;
        break;
    case RAFT_PROMOTE:
        if (slot < 0 || c.members[slot].role != RAFT_LEARNER)
            return RAFT_ERR_INVALID;
        /* Thesis §4.2.1: a new server joins as a non-voter until it has caught up, so it
         * does not stall commitment while it copies the log. */
        if (r->prs[slot].match < r->commit)
            return RAFT_ERR_NOT_CAUGHT_UP;
        c.members[slot].role = RAFT_VOTER;
        break;
    case RAFT_REMOVE:
        if (slot < 0 || id == r->id)
            return RAFT_ERR_INVALID;
        c.members[slot] = c.members[c.n - 1];
        c.n--;
        break;
    default:
        return RAFT_ERR_INVALID;
    }
    uint8_t buf[1 + RAFT_MAX_MEMBERS * 9];
    size_t len;
    int rc = raft_membership_encode(&c, buf, sizeof(buf), &len);
    if (rc != 0)
        return rc;
    return propose_entry(r, RAFT_ENTRY_CONFIG, buf, (uint32_t)len, index_out);
}

int raft_transfer_leadership(struct raft *r, uint64_t to)
{
    if (r->role != RAFT_LEADER)
        return RAFT_ERR_NOT_LEADER;
    if (to == r->id || !is_voter_in(&r->conf, to))
        return RAFT_ERR_INVALID;
    r->transfer_target = to;
    r->transfer_elapsed = 0;
    int slot = member_slot(r, to);
    maybe_send_timeout_now(r, to);
    if (r->prs[slot].match < last_index(r))
        fill_pipeline(r, slot);
    return 0;
}

int raft_read_index(struct raft *r, uint64_t ctx)
{
    if (r->role != RAFT_LEADER)
        return RAFT_ERR_NOT_LEADER;
    /* Thesis §6.4 step 1: until an entry of its term is committed, a new leader does not
     * know the commit index. */
    if (!term_matches(r, r->commit, r->term))
        return RAFT_ERR_BUSY;
    if (r->n_reads + r->n_reads_ready >= r->cfg.max_pending_reads)
        return RAFT_ERR_BUSY;
    r->read_seq++;
    struct read_req *q = &r->reads[r->n_reads++];
    q->ctx = ctx;
    q->index = r->commit;
    q->seq = r->read_seq;
    /* Steps 2-3: confirm leadership with a round of heartbeats answered by a quorum. */
    r->need_heartbeat = true;
    release_reads(r); /* a single voter is its own quorum */
    return 0;
}

int raft_campaign(struct raft *r)
{
    if (r->role == RAFT_LEADER)
        return 0;
    campaign(r, r->cfg.pre_vote, false);
    return 0;
}

/* ---------------------------------------------------------------- the update */

bool raft_has_ready(const struct raft *r)
{
    if (r->outstanding)
        return false;
    uint64_t last = last_index(r);
    uint64_t c = r->commit < last ? r->commit : last;
    return r->hs_handed.term != r->term || r->hs_handed.vote != r->vote ||
           r->hs_handed.commit != r->commit || r->unstable_from <= last || r->n_out > 0 ||
           r->need_broadcast || r->need_heartbeat || r->apply_handed < c ||
           r->n_reads_ready > 0 || r->snap_pending;
}

int raft_ready(struct raft *r, struct raft_update *u)
{
    assert(!r->outstanding);
    memset(u, 0, sizeof(*u));
    if (r->role == RAFT_LEADER) {
        if (r->need_broadcast)
            broadcast_append(r);
        if (r->need_heartbeat) {
            for (uint32_t i = 0; i < r->conf.n; i++)
                if (r->conf.members[i].id != r->id)
                    send_heartbeat(r, (int)i);
        }
    }
    r->need_broadcast = false;
    r->need_heartbeat = false;

    if (r->hs_handed.term != r->term || r->hs_handed.vote != r->vote ||
        r->hs_handed.commit != r->commit) {
        u->hard_state_changed = true;
        r->hs_handed.term = r->term;
        r->hs_handed.vote = r->vote;
        r->hs_handed.commit = r->commit;
        u->hard_state = r->hs_handed;
    }
    if (r->snap_pending) {
        u->snapshot = &r->snap;
        u->snapshot_index = r->snap.index;
        u->snapshot_term = r->snap.term;
        r->snap_pending = false;
    }
    uint64_t last = last_index(r);
    if (r->unstable_from <= last) {
        assert(r->unstable_from >= r->log_first);
        u->entries = entry_ptr(r, r->unstable_from);
        u->n_entries = (size_t)(last - r->unstable_from + 1);
        u->persist_index = last;
        u->persist_term = last_term(r);
        r->unstable_from = last + 1;
    }
    unsigned n = 0;
    for (unsigned i = 0; i < r->n_out; i++) {
        struct outmsg *o = &r->outbox[i];
        struct raft_message *m = &o->m;
        if (m->type == RAFT_MSG_APPEND && m->u.append.n_entries > 0) {
            uint64_t first = m->u.append.prev_index + 1;
            uint64_t end = m->u.append.prev_index + m->u.append.n_entries;
            if (first < r->log_first || end > last || !term_matches(r, end, o->last_term))
                continue; /* the log moved on; the leader will resend */
            m->u.append.entries = entry_ptr(r, first);
        } else if (m->type == RAFT_MSG_SNAPSHOT) {
            if (r->snap.index != o->snap_index)
                continue;
            m->u.snapshot.data = r->snap_data ? r->snap_data + m->u.snapshot.offset : NULL;
        }
        r->handed_msgs[n++] = *m;
    }
    r->n_out = 0;
    u->messages = r->handed_msgs;
    u->n_messages = n;

    uint64_t c = r->commit < last ? r->commit : last;
    if (r->apply_handed < c) {
        assert(r->apply_handed + 1 >= r->log_first);
        u->committed = entry_ptr(r, r->apply_handed + 1);
        u->n_committed = (size_t)(c - r->apply_handed);
        r->apply_handed = c;
    }
    if (r->n_reads_ready > 0) {
        memcpy(r->reads_handed, r->reads_ready, r->n_reads_ready * sizeof(*r->reads_ready));
        u->reads = r->reads_handed;
        u->n_reads = r->n_reads_ready;
        r->n_reads_ready = 0;
    }
    u->apply_index = r->apply_handed;
    u->snapshot_wanted = r->cfg.snapshot_threshold > 0 &&
                         r->apply_handed >= r->snap.index + r->cfg.snapshot_threshold;
    r->outstanding = true;
    return 0;
}

int raft_persisted(struct raft *r, uint64_t index, uint64_t term)
{
    if (index <= r->stable || index >= r->unstable_from || !term_matches(r, index, term))
        return 0; /* superseded by a truncation; the new entries come in a later update */
    r->stable = index;
    maybe_commit(r);
    return 0;
}

int raft_snapshot_installed(struct raft *r, uint64_t index, uint64_t term)
{
    if (r->snap.index != index || r->snap.term != term)
        return 0;
    if (r->stable < index)
        r->stable = index;
    if (r->applied < index)
        r->applied = index;
    return 0;
}

int raft_applied(struct raft *r, uint64_t index)
{
    if (index > r->apply_handed)
        return RAFT_ERR_INVALID;
    if (index > r->applied)
        r->applied = index;
    return 0;
}

int raft_advance(struct raft *r, const struct raft_update *u)
{
    r->outstanding = false;
    if (u->snapshot_index)
        raft_snapshot_installed(r, u->snapshot_index, u->snapshot_term);
    if (u->persist_index)
        raft_persisted(r, u->persist_index, u->persist_term);
    return raft_applied(r, u->apply_index);
}

int raft_snapshot_saved(struct raft *r, uint64_t index, const uint8_t *data, size_t len)
{
    uint64_t t;
    if (index <= r->snap.index || index > r->applied || (len > 0 && data == NULL))
        return RAFT_ERR_INVALID;
    if (!term_at(r, index, &t))
        return RAFT_ERR_COMPACTED;
    if (len > r->cfg.max_snapshot_bytes)
        return RAFT_ERR_TOO_BIG;
    uint8_t *copy = malloc(len ? len : 1);
    if (!copy)
        return RAFT_ERR_NOMEM;
    if (len)
        memcpy(copy, data, len);
    struct raft_membership c;
    uint64_t at;
    conf_at(r, index, &c, &at);
    free(r->snap_data);
    r->snap_data = copy;
    r->snap.index = index;
    r->snap.term = t;
    r->snap.conf = c;
    r->snap.data = copy;
    r->snap.len = len;
    /* Keep a tail so a follower slightly behind catches up from the log, not a snapshot. */
    if (index > r->cfg.snapshot_trailing)
        log_compact(r, index - r->cfg.snapshot_trailing);
    return 0;
}

/* ---------------------------------------------------------------- life cycle, accessors */

void raft_config_default(struct raft_config *cfg, uint64_t id)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->id = id;
    cfg->election_timeout_ticks = 10;
    cfg->heartbeat_ticks = 1;
    cfg->max_msg_bytes = 64 * 1024;
    cfg->max_inflight_msgs = 8;
    cfg->max_uncommitted_entries = 4096;
    cfg->max_entry_bytes = 1024 * 1024;
    cfg->max_snapshot_bytes = 64 * 1024 * 1024;
    cfg->snapshot_chunk_bytes = 256 * 1024;
    cfg->snapshot_threshold = 10000;
    cfg->snapshot_trailing = 1000;
    cfg->max_pending_reads = 1024;
    cfg->max_outbox_msgs = 4096;
    cfg->pre_vote = true;
    cfg->check_quorum = true;
    cfg->random_seed = id;
}

static bool config_valid(const struct raft_config *c)
{
    return c->id != 0 && c->election_timeout_ticks >= 2 && c->heartbeat_ticks >= 1 &&
           c->heartbeat_ticks < c->election_timeout_ticks && c->max_inflight_msgs >= 1 &&
           c->max_inflight_msgs <= RAFT_MAX_INFLIGHT && c->max_outbox_msgs >= 1 &&
           c->max_pending_reads >= 1 && c->snapshot_chunk_bytes >= 1 && c->max_msg_bytes >= 1 &&
           c->max_uncommitted_entries >= 1;
}

void raft_free(struct raft *r)
{
    if (!r)
        return;
    for (size_t i = 0; i < r->log_n; i++)
        entry_free(&r->log[i]);
    free(r->log);
    free(r->snap_data);
    free(r->rcv_buf);
    free(r->reads);
    free(r->reads_ready);
    free(r->reads_handed);
    free(r->outbox);
    free(r->handed_msgs);
    free(r);
}

int raft_new(const struct raft_config *cfg, const struct raft_restore *rs, struct raft **out)
{
    if (!config_valid(cfg))
        return RAFT_ERR_INVALID;
    struct raft *r = calloc(1, sizeof(*r));
    if (!r)
        return RAFT_ERR_NOMEM;
    r->cfg = *cfg;
    r->id = cfg->id;
    r->rng = cfg->random_seed ^ (cfg->id * 0x2545f4914f6cdd1dULL);
    r->reads = calloc(cfg->max_pending_reads, sizeof(*r->reads));
    r->reads_ready = calloc(cfg->max_pending_reads, sizeof(*r->reads_ready));
    r->reads_handed = calloc(cfg->max_pending_reads, sizeof(*r->reads_handed));
    r->outbox = calloc(cfg->max_outbox_msgs, sizeof(*r->outbox));
    r->handed_msgs = calloc(cfg->max_outbox_msgs, sizeof(*r->handed_msgs));
    if (!r->reads || !r->reads_ready || !r->reads_handed || !r->outbox || !r->handed_msgs)
        goto nomem;
    r->log_first = 1;
    if (rs) {
        if (rs->bootstrap)
            r->bootstrap = *rs->bootstrap;
        if (rs->snapshot && rs->snapshot->index > 0) {
            const struct raft_snapshot *s = rs->snapshot;
            r->snap_data = malloc(s->len ? s->len : 1);
            if (!r->snap_data)
                goto nomem;
            if (s->len)
                memcpy(r->snap_data, s->data, s->len);
            r->snap = *s;
            r->snap.data = r->snap_data;
            r->log_first = s->index + 1;
        }
        if (rs->n_entries > 0) {
            uint64_t first = rs->entries[0].index;
            if (first == 0 || first > r->snap.index + 1)
                goto invalid;
            r->log_first = first;
            for (size_t i = 0; i < rs->n_entries; i++) {
                const struct raft_entry *e = &rs->entries[i];
                if (e->index != first + i || e->term == 0 ||
                    (i > 0 && e->term < rs->entries[i - 1].term))
                    goto invalid;
                if (log_append(r, e->term, e->type, e->data, e->len) != 0)
                    goto nomem;
            }
            uint64_t t;
            if (r->snap.index > 0 && term_at(r, r->snap.index, &t) && t != r->snap.term)
                goto invalid;
            if (last_index(r) < r->snap.index)
                goto invalid;
        }
        r->term = rs->hard_state.term;
        r->vote = rs->hard_state.vote;
        r->commit = rs->hard_state.commit;
    }
    if (r->commit > last_index(r))
        r->commit = last_index(r);
    if (r->commit < r->snap.index)
        r->commit = r->snap.index;
    r->stable = last_index(r);
    r->unstable_from = last_index(r) + 1;
    r->apply_handed = r->applied = r->snap.index;
    r->hs_handed.term = r->term;
    r->hs_handed.vote = r->vote;
    r->hs_handed.commit = r->commit;
    r->conf = r->bootstrap;
    r->conf_index = 0;
    struct raft_membership c;
    uint64_t at;
    conf_at(r, last_index(r), &c, &at);
    r->conf = c;
    r->conf_index = at;
    r->role = RAFT_FOLLOWER;
    reset_randomized_timeout(r);
    *out = r;
    return 0;
invalid:
    raft_free(r);
    return RAFT_ERR_INVALID;
nomem:
    raft_free(r);
    return RAFT_ERR_NOMEM;
}

void raft_status(const struct raft *r, struct raft_status *st)
{
    memset(st, 0, sizeof(*st));
    st->id = r->id;
    st->role = r->role;
    st->term = r->term;
    st->vote = r->vote;
    st->leader = r->leader;
    st->commit = r->commit;
    st->applied = r->applied;
    st->first_index = r->log_first;
    st->last_index = last_index(r);
    st->stable_index = r->stable;
    st->snapshot_index = r->snap.index;
    st->snapshot_term = r->snap.term;
    st->transfer_target = r->transfer_target;
    st->dropped_msgs = r->dropped;
}

bool raft_term_at(const struct raft *r, uint64_t index, uint64_t *term)
{
    return term_at(r, index, term);
}

const struct raft_entry *raft_entry_at(const struct raft *r, uint64_t index)
{
    return entry_ptr(r, index);
}

const struct raft_membership *raft_membership(const struct raft *r) { return &r->conf; }

const struct raft_snapshot *raft_last_snapshot(const struct raft *r) { return &r->snap; }

bool raft_progress(const struct raft *r, unsigned i, struct raft_progress_info *out)
{
    if (r->role != RAFT_LEADER || i >= r->conf.n)
        return false;
    out->id = r->conf.members[i].id;
    out->role = r->conf.members[i].role;
    out->match = r->conf.members[i].id == r->id ? r->stable : r->prs[i].match;
    out->next = r->conf.members[i].id == r->id ? last_index(r) + 1 : r->prs[i].next;
    return true;
}
