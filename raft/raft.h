/*
 * raft.h - the Raft consensus core as a pure, deterministic state machine.
 *
 * The core never reads a clock, opens a socket or a file, starts a thread or touches global
 * state. Everything enters through a handful of inputs (raft_tick, raft_step, raft_propose,
 * raft_read_index, raft_persisted / raft_advance, raft_snapshot_saved) and leaves through one
 * output, the update returned by raft_ready, in the style of etcd-io/raft's Ready loop. Given the
 * same configuration (including the random seed) and the same sequence of inputs, the core
 * produces the same outputs, which is what lets tests/sim replay a failing run exactly.
 *
 * The driving loop (see README.md for the full contract):
 *
 *     feed inputs: raft_tick / raft_step / raft_propose / raft_read_index ...
 *     if (raft_has_ready(r)) {
 *         raft_ready(r, &u);
 *         1. persist u.snapshot (if any), then u.hard_state (if changed), then u.entries
 *            (truncating the stored log from u.entries[0].index first), and make them durable;
 *         2. only then send u.messages (they may promise what step 1 wrote: a vote, an entry);
 *         3. restore the state machine from u.snapshot if any, apply u.committed in order,
 *            serve u.reads once applied >= their index; take a snapshot if u.snapshot_wanted;
 *         4. raft_advance(r, &u);
 *     }
 *
 * Pointers inside an update (and returned by the accessors) stay valid only until the next call
 * into the core that is not an accessor. One update may be outstanding at a time; other inputs
 * may be fed between raft_ready and raft_advance.
 *
 * Invariants the core keeps (Raft paper, Figure 3): Election Safety, Leader Append-Only, Log
 * Matching, Leader Completeness, State Machine Safety. tests/sim checks all of them.
 */
#ifndef RAFT_RAFT_H
#define RAFT_RAFT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Error codes: 0 is success, every error is negative. */
#define RAFT_ERRORS(X)                                                                       \
    X(RAFT_ERR_NOMEM, -1, "nomem", "out of memory")                                          \
    X(RAFT_ERR_INVALID, -2, "invalid", "invalid argument")                                   \
    X(RAFT_ERR_NOT_LEADER, -3, "not_leader", "this node is not the leader")                  \
    X(RAFT_ERR_BUSY, -4, "busy", "a bound was reached, retry later")                         \
    X(RAFT_ERR_MALFORMED, -5, "malformed", "malformed message")                              \
    X(RAFT_ERR_TRANSFERRING, -6, "transferring", "leadership transfer in progress")          \
    X(RAFT_ERR_CONFIG_PENDING, -7, "config_pending", "a membership change is not committed") \
    X(RAFT_ERR_NOT_CAUGHT_UP, -8, "not_caught_up", "the learner has not caught up")          \
    X(RAFT_ERR_TOO_BIG, -9, "too_big", "payload larger than the configured maximum")         \
    X(RAFT_ERR_COMPACTED, -10, "compacted", "index no longer in the log")

enum raft_error {
#define RAFT_ERR_ENUM(name, code, id, text) name = code,
    RAFT_ERRORS(RAFT_ERR_ENUM)
#undef RAFT_ERR_ENUM
};

/* Human text for an error code, and its snake_case name for JSON bodies. */
const char *raft_strerror(int err);
const char *raft_errname(int err);

#define RAFT_MAX_MEMBERS 16 /* voters + learners in one configuration */
#define RAFT_MAX_INFLIGHT 64 /* upper bound on max_inflight_msgs */
#define RAFT_WIRE_VERSION 1

enum raft_entry_type {
    RAFT_ENTRY_NORMAL = 1, /* an opaque command for the state machine */
    RAFT_ENTRY_CONFIG = 2, /* a membership (raft_membership_encode), thesis §4.1 */
    RAFT_ENTRY_NOOP = 3,   /* appended by every new leader, paper §8 */
};

/* A log entry. In the core's log the payload is owned by the core. */
struct raft_entry {
    uint64_t term;
    uint64_t index;
    uint8_t type; /* enum raft_entry_type */
    uint32_t len;
    const uint8_t *data;
};

enum raft_member_role {
    RAFT_VOTER = 1,
    RAFT_LEARNER = 2, /* receives the log, never votes nor counts for a quorum (thesis §4.2.1) */
};

struct raft_member {
    uint64_t id; /* non-zero */
    uint8_t role;
};

struct raft_membership {
    uint32_t n;
    struct raft_member members[RAFT_MAX_MEMBERS];
};

/* The persistent state that must be durable before messages depending on it are sent. */
struct raft_hard_state {
    uint64_t term;
    uint64_t vote;   /* 0: none */
    uint64_t commit; /* not needed for safety; lets a restart re-apply without waiting */
};

struct raft_snapshot {
    uint64_t index; /* last index covered */
    uint64_t term;  /* its term */
    struct raft_membership conf;
    const uint8_t *data; /* state machine image, opaque to the core */
    size_t len;
};

enum raft_msg_type {
    RAFT_MSG_VOTE = 1,
    RAFT_MSG_VOTE_RESP = 2,
    RAFT_MSG_PREVOTE = 3,
    RAFT_MSG_PREVOTE_RESP = 4,
    RAFT_MSG_APPEND = 5,
    RAFT_MSG_APPEND_RESP = 6,
    RAFT_MSG_SNAPSHOT = 7,
    RAFT_MSG_SNAPSHOT_RESP = 8,
    RAFT_MSG_TIMEOUT_NOW = 9,
};

/* RequestVote and its PreVote variant (paper §5.2, thesis §9.6). */
struct raft_msg_vote {
    uint64_t last_index;
    uint64_t last_term;
    bool transfer; /* campaign started by TimeoutNow: bypasses leader stickiness (thesis §3.10) */
};

struct raft_msg_vote_resp {
    bool granted;
};

/* AppendEntries (paper §5.3); with no entries it is a heartbeat. */
struct raft_msg_append {
    uint64_t prev_index;
    uint64_t prev_term;
    uint64_t commit;
    uint64_t read_seq; /* ReadIndex round this message confirms (thesis §6.4) */
    const struct raft_entry *entries;
    uint32_t n_entries;
};

struct raft_msg_append_resp {
    bool reject;
    uint64_t index;     /* success: last index known to match; reject: the rejected prev_index */
    uint64_t hint_index; /* reject: first index of hint_term in the follower's log, or its last + 1 */
    uint64_t hint_term;  /* reject: term of the follower's entry at prev_index, 0 if it has none */
    uint64_t read_seq;   /* echo of the request's read_seq */
};

/* InstallSnapshot, one chunk (paper §7, Figure 13). */
struct raft_msg_snapshot {
    uint64_t index;
    uint64_t term;
    struct raft_membership conf;
    uint64_t offset;
    uint64_t total;
    bool done;
    const uint8_t *data;
    uint32_t len;
};

struct raft_msg_snapshot_resp {
    uint64_t index;       /* snapshot index this answers */
    uint64_t next_offset; /* the offset the follower expects next */
    bool done;            /* installed: the follower matches up to index */
};

struct raft_message {
    uint8_t type; /* enum raft_msg_type */
    uint64_t from;
    uint64_t to;
    uint64_t term;
    union {
        struct raft_msg_vote vote;
        struct raft_msg_vote_resp vote_resp;
        struct raft_msg_append append;
        struct raft_msg_append_resp append_resp;
        struct raft_msg_snapshot snapshot;
        struct raft_msg_snapshot_resp snapshot_resp;
    } u;
};

/* A linearizable read is safe once the state machine has applied up to index. */
struct raft_read_state {
    uint64_t ctx;
    uint64_t index;
};

enum raft_role {
    RAFT_FOLLOWER = 1,
    RAFT_PRE_CANDIDATE = 2,
    RAFT_CANDIDATE = 3,
    RAFT_LEADER = 4,
};

struct raft_config {
    uint64_t id;                     /* this node, non-zero */
    unsigned election_timeout_ticks; /* randomized in [t, 2t) (paper §5.2) */
    unsigned heartbeat_ticks;        /* < election_timeout_ticks */
    size_t max_msg_bytes;            /* encoded entry bytes per AppendEntries (at least one entry) */
    unsigned max_inflight_msgs;      /* AppendEntries in flight per follower, <= RAFT_MAX_INFLIGHT */
    uint64_t max_uncommitted_entries; /* proposals refused with RAFT_ERR_BUSY beyond this */
    uint32_t max_entry_bytes;        /* largest payload accepted by raft_propose */
    size_t max_snapshot_bytes;       /* largest snapshot accepted */
    uint32_t snapshot_chunk_bytes;   /* InstallSnapshot chunk size */
    uint64_t snapshot_threshold;     /* ask for a snapshot when this many entries are applied past the last one; 0: never */
    uint64_t snapshot_trailing;      /* entries kept behind a snapshot for slow followers */
    unsigned max_pending_reads;      /* ReadIndex requests waiting for a quorum */
    unsigned max_outbox_msgs;        /* messages queued between two updates; more are dropped and counted */
    bool pre_vote;                   /* thesis §9.6 */
    bool check_quorum;               /* thesis §6.2: step down without a quorum; leader stickiness */
    uint64_t random_seed;            /* seeds the election timeout generator */
};

/* Fills a configuration with the defaults (election 10 ticks, heartbeat 1 tick, ...). */
void raft_config_default(struct raft_config *cfg, uint64_t id);

/* What a restarting node read back from stable storage; all of it may be empty. */
struct raft_restore {
    struct raft_hard_state hard_state;
    const struct raft_snapshot *snapshot; /* NULL: none */
    const struct raft_entry *entries;     /* contiguous, may start at or before snapshot->index + 1 */
    size_t n_entries;
    /* Used only when neither the snapshot nor the log holds a configuration: the founding
     * members pass the same list; a node joining later passes an empty one. */
    const struct raft_membership *bootstrap;
};

/* The output of one turn; see the loop at the top of this file for the order of duties. */
struct raft_update {
    bool hard_state_changed;
    struct raft_hard_state hard_state;
    const struct raft_snapshot *snapshot; /* received from the leader: persist, then restore */
    const struct raft_entry *entries;     /* to persist, after truncating from entries[0].index */
    size_t n_entries;
    const struct raft_message *messages; /* send only after the above is durable */
    size_t n_messages;
    const struct raft_entry *committed; /* apply in order */
    size_t n_committed;
    const struct raft_read_state *reads;
    size_t n_reads;
    bool snapshot_wanted; /* take a snapshot at the applied index and call raft_snapshot_saved */
    /* Scalars read by raft_advance (they stay meaningful after the pointers expire). */
    uint64_t persist_index;
    uint64_t persist_term;
    uint64_t apply_index;
    uint64_t snapshot_index;
    uint64_t snapshot_term;
};

struct raft_status {
    uint64_t id;
    enum raft_role role;
    uint64_t term;
    uint64_t vote;
    uint64_t leader; /* 0: unknown */
    uint64_t commit;
    uint64_t applied;
    uint64_t first_index; /* first index still in the log */
    uint64_t last_index;
    uint64_t stable_index; /* last index known durable */
    uint64_t snapshot_index;
    uint64_t snapshot_term;
    uint64_t transfer_target;
    uint64_t dropped_msgs;
};

struct raft_progress_info {
    uint64_t id;
    uint8_t role;
    uint64_t match;
    uint64_t next;
};

struct raft;

/* Creates a core from its configuration and restored state. The core copies what it keeps.
 * Errors: RAFT_ERR_INVALID (bad config or inconsistent restore), RAFT_ERR_NOMEM. */
int raft_new(const struct raft_config *cfg, const struct raft_restore *restore, struct raft **out);
void raft_free(struct raft *r);

/* One unit of logical time. */
int raft_tick(struct raft *r);

/* Feeds a message received from a peer. The core copies what it keeps; stale or malformed
 * messages are ignored (returns 0) since the network may deliver anything. */
int raft_step(struct raft *r, const struct raft_message *m);

/* Appends a command on the leader. *index_out (may be NULL) gets its index; it is committed when
 * it shows up in an update's committed entries with the same index and term.
 * Errors: RAFT_ERR_NOT_LEADER, RAFT_ERR_TRANSFERRING, RAFT_ERR_BUSY, RAFT_ERR_TOO_BIG. */
int raft_propose(struct raft *r, const uint8_t *data, uint32_t len, uint64_t *index_out);

enum raft_change {
    RAFT_ADD_LEARNER = 1, /* add a non-voting member */
    RAFT_PROMOTE = 2,     /* learner to voter; refused until it has caught up */
    RAFT_REMOVE = 3,      /* remove a member other than the leader (transfer first) */
};

/* Single-server membership change (thesis §4.1). One at a time.
 * Errors: RAFT_ERR_NOT_LEADER, RAFT_ERR_CONFIG_PENDING, RAFT_ERR_NOT_CAUGHT_UP, RAFT_ERR_INVALID. */
int raft_change_membership(struct raft *r, enum raft_change change, uint64_t id, uint64_t *index_out);

/* Hands leadership to a voter (thesis §3.10); proposals are refused until it completes or an
 * election timeout passes. Errors: RAFT_ERR_NOT_LEADER, RAFT_ERR_INVALID. */
int raft_transfer_leadership(struct raft *r, uint64_t to);

/* Starts a linearizable read (thesis §6.4); ctx comes back in an update's reads.
 * Errors: RAFT_ERR_NOT_LEADER, RAFT_ERR_BUSY (queue full, or no entry of this term committed yet).
 * A pending read is dropped if the node loses leadership; the caller times it out. */
int raft_read_index(struct raft *r, uint64_t ctx);

/* Starts an election now (tests, or an operator). Ignored unless a voter. */
int raft_campaign(struct raft *r);

bool raft_has_ready(const struct raft *r);
/* Takes the pending output. Precondition: no update outstanding. */
int raft_ready(struct raft *r, struct raft_update *u);
/* Everything in u is done: persisted, sent, applied. */
int raft_advance(struct raft *r, const struct raft_update *u);

/* Finer inputs, used by raft_advance. */
int raft_persisted(struct raft *r, uint64_t index, uint64_t term);
int raft_snapshot_installed(struct raft *r, uint64_t index, uint64_t term);
int raft_applied(struct raft *r, uint64_t index);

/* The application saved a snapshot of its state at index (<= applied). The core keeps a copy
 * of data to send to slow followers, and compacts its log up to index - snapshot_trailing.
 * Errors: RAFT_ERR_INVALID, RAFT_ERR_TOO_BIG, RAFT_ERR_NOMEM. */
int raft_snapshot_saved(struct raft *r, uint64_t index, const uint8_t *data, size_t len);

/* Accessors (no side effects). */
void raft_status(const struct raft *r, struct raft_status *st);
bool raft_term_at(const struct raft *r, uint64_t index, uint64_t *term);
const struct raft_entry *raft_entry_at(const struct raft *r, uint64_t index);
const struct raft_membership *raft_membership(const struct raft *r);
/* The latest snapshot (index 0 if none); data valid until the next non-accessor call. */
const struct raft_snapshot *raft_last_snapshot(const struct raft *r);
/* Progress of member i (0 <= i < membership n) as seen by a leader; false if not leader. */
bool raft_progress(const struct raft *r, unsigned i, struct raft_progress_info *out);

/* Membership helpers. */
int raft_membership_encode(const struct raft_membership *c, uint8_t *buf, size_t cap, size_t *len);
int raft_membership_decode(const uint8_t *buf, size_t len, struct raft_membership *c);
const struct raft_member *raft_membership_find(const struct raft_membership *c, uint64_t id);

/* Compact binary form for the transport. Little-endian, versioned. Encode fails with
 * RAFT_ERR_BUSY if cap is too small (raft_msg_encoded_len gives the size). Decode never reads
 * past len, rejects malformed input with RAFT_ERR_MALFORMED, and points entry and chunk data
 * into buf (no copy): entries[] must hold max_entries. */
size_t raft_msg_encoded_len(const struct raft_message *m);
int raft_msg_encode(const struct raft_message *m, uint8_t *buf, size_t cap, size_t *len);
int raft_msg_decode(const uint8_t *buf, size_t len, struct raft_message *m,
                    struct raft_entry *entries, size_t max_entries);

#endif
