/*
 * fsm_int.h - the state machine's internal types, shared by fsm.c (apply and reads) and
 * snapshot.c (image and restore). Not part of the public API.
 *
 * Objects live in open-addressing hash tables keyed by a SipHash of their name (or a mix of their
 * id); the table layout depends on the node-local hash key, so nothing observable may depend on
 * table order: every walk whose order matters (snapshots, releasing the locks of a dying lease,
 * dropping its waiters) sorts first.
 *
 * Links: a lock's holder lease keeps the lock in its `held` list; a waiter queued under an
 * explicit lease sits in that lease's `waiting` list and in its lock's FIFO queue. A lock exists
 * only while it has a holder; waiters imply a holder.
 */
#ifndef GW_RAFT_FSM_INT_H
#define GW_RAFT_FSM_INT_H

#include "fsm.h"
#include "hash.h"

struct fsm_lock;
struct fsm_waiter;
struct fsm_idem;

struct fsm_lease {
    uint64_t id;
    uint64_t ttl_ms;
    uint64_t expires_at; /* fsm time; overdue when t >= expires_at */
    struct fsm_lock *held;      /* locks held under this lease (lease_prev/lease_next) */
    struct fsm_waiter *waiting; /* waiters queued under this lease (lease_prev/lease_next) */
    bool dying;                 /* on the kill list of the current apply */
};

struct fsm_waiter {
    uint64_t id;       /* log index of the acquire */
    uint64_t lease_id; /* 0: a lease of ttl_ms is created at grant, with id = this waiter's id */
    uint64_t ttl_ms;
    uint64_t deadline; /* arrival t + wait_ms */
    struct fsm_lock *lock;
    struct fsm_waiter *q_prev, *q_next;         /* the lock's FIFO */
    struct fsm_waiter *lease_prev, *lease_next; /* the lease's waiting list */
    struct fsm_idem *idem;                      /* the record to complete, if any */
    uint8_t owner_len;
    char owner[GW_FSM_MAX_OWNER + 1];
};

struct fsm_lock {
    struct fsm_lease *lease; /* the holder's lease */
    uint64_t token;
    struct fsm_lock *lease_prev, *lease_next;
    struct fsm_waiter *q_head, *q_tail;
    uint32_t n_waiters;
    uint8_t owner_len;
    char owner[GW_FSM_MAX_OWNER + 1];
    uint8_t name_len;
    char name[GW_FSM_MAX_NAME + 1];
};

struct fsm_counter {
    int64_t value;
    uint8_t name_len;
    char name[];
};

struct fsm_route {
    uint64_t version;
    char *json; /* owned */
    uint32_t json_len;
    uint8_t name_len;
    char name[];
};

/* The stored outcome of a write with an idempotency key, per (kind, key). */
struct fsm_idem {
    struct fsm_idem *prev, *next; /* creation order: the head is the oldest */
    uint64_t created_at;
    uint64_t fp[2]; /* fingerprint of the command's arguments */
    uint64_t waiter_id;
    struct fsm_waiter *waiter; /* queued: the waiter whose outcome completes this record */
    char *body;                /* owned, NUL-terminated */
    uint32_t body_len;
    uint16_t status;
    bool queued;
    uint8_t code; /* index of the error code of the body (0: none) */
    uint8_t kind;
    uint8_t key_len;
    char key[];
};

/* A quota grant: tokens or window slots a node may spend before deadline (fsm ms). */
struct fsm_grant {
    uint64_t id;       /* the index of its QUOTA_ACQUIRE */
    uint64_t count;    /* still counted (granted minus released) */
    uint64_t deadline; /* spendable while t < deadline */
    uint8_t node_len;
    char node[GW_FSM_MAX_NODE + 1];
};

/* Sliding window: slots of grants whose lease ended, occupying the window until `until`. */
struct fsm_past {
    uint64_t until, count;
};

/* One cluster limiter (quota.c): a token bucket or a sliding window and its live grants. */
struct fsm_quota {
    uint8_t kind;             /* enum gw_fsm_quota_kind */
    uint64_t a, b;            /* capacity, refill_per_sec / limit, window_ms */
    uint64_t nanotokens;      /* token bucket: the unallotted budget B (nano-tokens) */
    uint64_t updated_ns;      /* token bucket: fsm time of the last refill, ns */
    uint64_t outstanding;     /* sum of the grants' counts */
    struct fsm_grant *grants; /* owned; n_grants by (deadline, id) */
    uint32_t n_grants, cap_grants;
    struct fsm_past *past;    /* owned; sliding window only: n_past by increasing until */
    uint32_t n_past, cap_past;
    uint64_t past_total;      /* sum of the past entries' counts */
    uint8_t id_len;
    char id[GW_FSM_MAX_QUOTA_ID + 1];
};

/* Bytes a gateway record counts besides its route, key and response: a fixed figure, not a
 * sizeof, so the bound decides the same on every replica whatever the build. */
#define FSM_GWIDEM_OVERHEAD 160

/* One gateway idempotency record (quota.c): in flight under a claim, or completed. */
struct fsm_gwidem {
    struct fsm_gwidem *prev, *next; /* the sweep ring's order (head examined first) */
    uint64_t claim;                 /* the index of its IDEM_BEGIN */
    uint64_t fp[2];
    uint64_t deadline; /* in flight: safety expiry; completed: expiry (fsm ms) */
    uint64_t bytes;    /* counted against max_gwidem_bytes */
    uint8_t *resp;     /* owned: headers_len bytes of headers, then body_len of body */
    uint32_t headers_len, body_len;
    uint16_t status;
    bool completed;
    uint8_t node_len, route_len, key_len;
    char node[GW_FSM_MAX_NODE + 1];
    char name[]; /* route bytes, then key bytes */
};

/* Open addressing with linear probing and backward-shift deletion; load at most 1/2. */
struct htab_slot {
    uint64_t h;
    void *p; /* NULL: empty */
};

struct htab {
    struct htab_slot *slots;
    uint32_t cap; /* power of two, or 0 */
    uint32_t n;
};

struct gw_fsm {
    struct gw_fsm_config cfg;
    struct gw_hash_key hkey;
    uint64_t last_index;
    uint64_t time;
    uint64_t last_token;
    uint64_t route_version;
    struct htab leases, locks, counters, routes, idems;
    uint64_t n_waiters;
    struct fsm_idem *idem_head, *idem_tail;
    uint64_t idem_evicted;
    /* Quotas and gateway idempotency records (quota.c). */
    struct htab quotas, gwidems;
    uint64_t quota_sweep_at; /* fsm time of the last full sweep of idle quotas */
    struct fsm_gwidem *gw_head, *gw_tail;
    uint64_t gw_bytes;
    /* Scratch of one apply: leases to expire. */
    struct fsm_lease **kill;
    size_t n_kill, kill_cap;
};

/* Table helpers (fsm.c). */
uint64_t fsm_hash_name(const struct gw_fsm *f, const char *name, size_t len);
uint64_t fsm_hash_id(uint64_t id);
uint64_t fsm_hash_idem(const struct gw_fsm *f, uint8_t kind, const char *key, size_t len);
int htab_insert(struct htab *t, uint64_t h, void *p);
void htab_remove(struct htab *t, uint64_t h, const void *p);
void htab_free(struct htab *t);

struct fsm_lease *fsm_lease_find(const struct gw_fsm *f, uint64_t id);
struct fsm_lock *fsm_lock_find(const struct gw_fsm *f, const char *name, size_t len);
struct fsm_counter *fsm_counter_find(const struct gw_fsm *f, const char *name, size_t len);
struct fsm_route *fsm_route_find(const struct gw_fsm *f, const char *name, size_t len);
struct fsm_idem *fsm_idem_find(const struct gw_fsm *f, uint8_t kind, const char *key, size_t len);

/* Frees every object and table of f's state (not the config, not f itself), leaving it empty. */
void fsm_clear(struct gw_fsm *f);

/* Sorted views for canonical walks; *out is malloc'd (NULL when empty). */
int fsm_sorted(const struct htab *t, int (*cmp)(const void *, const void *), void ***out);
int fsm_cmp_lease(const void *a, const void *b);
int fsm_cmp_lock(const void *a, const void *b);
int fsm_cmp_counter(const void *a, const void *b);
int fsm_cmp_route(const void *a, const void *b);

/* How many result error codes there are (stored records keep an index below this). */
uint8_t fsm_code_count(void);

uint32_t fsm_crc32(const uint8_t *p, size_t n);

/* Result building for quota.c (fsm.c keeps the error code table). */
enum fsm_out_code { FSM_OUT_INVALID_NAME, FSM_OUT_TOO_MANY_QUOTAS, FSM_OUT_TOO_MANY_RECORDS };
void fsm_out_begin(struct gw_fsm_result *res, int status);
void fsm_out_put(struct gw_fsm_result *res, const void *s, size_t n);
void fsm_out_str(struct gw_fsm_result *res, const char *s);
void fsm_out_u64(struct gw_fsm_result *res, uint64_t v);
void fsm_out_key(struct gw_fsm_result *res, const char *key); /* "key": */
void fsm_out_end(struct gw_fsm_result *res);
void fsm_out_fail(struct gw_fsm_result *res, int status, enum fsm_out_code code, const char *message);
void fsm_out_fail_field(struct gw_fsm_result *res, const char *field, const char *message);

/* quota.c: apply of the quota and gateway idempotency kinds at fsm time t; returns 0 or
 * GW_FSM_ERR_NOMEM. Lookups, frees and the snapshot's helpers. */
int fsm_quota_apply(struct gw_fsm *f, const struct gw_fsm_cmd *c, uint64_t index, uint64_t t,
                    struct gw_fsm_result *res);
int fsm_gwidem_apply(struct gw_fsm *f, const struct gw_fsm_cmd *c, uint64_t index, uint64_t t,
                     struct gw_fsm_result *res);
struct fsm_quota *fsm_quota_find(const struct gw_fsm *f, const char *id, size_t len);
uint64_t fsm_quota_hash(const struct gw_fsm *f, const char *id, size_t len);
struct fsm_gwidem *fsm_gwidem_find(const struct gw_fsm *f, const char *route, size_t rl, const char *key,
                                   size_t kl);
uint64_t fsm_gwidem_hash(const struct gw_fsm *f, const char *route, size_t rl, const char *key, size_t kl);
void fsm_gwidem_link_tail(struct gw_fsm *f, struct fsm_gwidem *r);
int fsm_cmp_quota(const void *a, const void *b);
bool fsm_printable(const char *s, size_t len, size_t max);
void fsm_ext_clear(struct gw_fsm *f);

#endif
