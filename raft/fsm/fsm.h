/*
 * fsm.h - the replicated state machine behind the /v1 coordination API (API.md section 4):
 * leases, locks with fencing tokens and FIFO waiters, counters, a versioned route table, and
 * idempotency records for every write; quota leasing for the cluster limiters and the gateway's
 * replicated idempotency records (quota.c, README.md "Quota leasing").
 *
 * The machine is pure: no clock, I/O, thread or global state. Every committed Raft entry carries
 * one command (encoded by gw_fsm_cmd_encode) and is fed to gw_fsm_apply in log order on every
 * replica; given the same sequence of (index, command) the machine produces the same results and
 * the same snapshot bytes. Time enters only as the leader's timestamp in each command (now_ms):
 * apply uses t = max(fsm time, now_ms) and stores t as the new fsm time, so time never goes
 * backwards. The node keeps that clock continuous across leader changes (a new leader continues
 * from the applied fsm time), which is what makes a lease never expire early and be extended by at
 * most one election gap.
 *
 * Leases expire when the leader proposes LEASE_EXPIRE for leases overdue at its fsm time; apply
 * re-checks each one at t and expires only those really overdue. Any command that touches an
 * overdue lease (keepalive, revoke, an acquire under it or against a lock it holds, a release by
 * its holder, a waiter about to be granted under it) expires it on the spot too: deterministic,
 * since t is part of the entry.
 *
 * Results are what the HTTP layer sends as-is: a status and a JSON body in API.md's shape. A lock
 * acquire that has to wait is "queued" (waiter id = its log index, no body yet); later applies
 * report the outcome of waiters in res->wakeups, so the node can answer the waiting request.
 *
 * Not thread-safe: one owner (the node thread). Allocation: the machine owns all its state;
 * a result owns its buffers (gw_fsm_result_free); a snapshot buffer belongs to the caller (free()).
 */
#ifndef GW_RAFT_FSM_H
#define GW_RAFT_FSM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Return codes of the library (not HTTP errors, which travel in results): 0 or negative. */
#define GW_FSM_ERRORS(X)                                                                     \
    X(GW_FSM_ERR_NOMEM, -1, "nomem", "out of memory")                                        \
    X(GW_FSM_ERR_INVALID, -2, "invalid", "invalid argument")                                 \
    X(GW_FSM_ERR_MALFORMED, -3, "malformed", "malformed command or snapshot")               \
    X(GW_FSM_ERR_UNSUPPORTED, -4, "unsupported", "unknown version or reserved command kind") \
    X(GW_FSM_ERR_TOO_BIG, -5, "too_big", "buffer too small or field too long")

enum gw_fsm_error {
#define GW_FSM_ERR_ENUM(name, code, id, text) name = code,
    GW_FSM_ERRORS(GW_FSM_ERR_ENUM)
#undef GW_FSM_ERR_ENUM
};

const char *gw_fsm_strerror(int err);
const char *gw_fsm_errname(int err);

/* ---- Limits ------------------------------------------------------------------------------ */

#define GW_FSM_CMD_VERSION 1
#define GW_FSM_SNAPSHOT_VERSION 2 /* 2 adds quotas and gateway idempotency records; 1 restores */
#define GW_FSM_MAX_NAME 200      /* lock, counter and route names: 1..200 of [A-Za-z0-9._:-] */
#define GW_FSM_MAX_OWNER 200     /* lock owners: 1..200 printable ASCII bytes */
#define GW_FSM_MAX_IDEM_KEY 255  /* idempotency keys: 1..255 printable ASCII bytes */
#define GW_FSM_MAX_EXPIRE_IDS 1024 /* lease ids in one LEASE_EXPIRE */
#define GW_FSM_TTL_MIN_MS 1000
#define GW_FSM_TTL_MAX_MS 3600000
#define GW_FSM_WAIT_MAX_MS 60000
#define GW_FSM_MAX_QUOTA_ID 255     /* limiter ids: 1..255 printable ASCII bytes */
#define GW_FSM_MAX_NODE 63          /* node names in quota grants and claims: 1..63 printable */
#define GW_FSM_QUOTA_LEASE_MAX_MS 60000 /* lease_ms of a quota grant: 1..60000 */
#define GW_FSM_QUOTA_COUNT_MAX 1000000  /* n in one QUOTA_ACQUIRE or QUOTA_RELEASE */
#define GW_FSM_QUOTA_GRANTS_MAX 1024    /* live grants per limiter; beyond, nothing is granted */
#define GW_FSM_GWIDEM_MAX_ROUTE 200     /* gateway idempotency: route 1..200 printable bytes */
#define GW_FSM_GWIDEM_SAFETY_MS 600000  /* an in-flight claim lasts at least this (10 min) */

/*
 * Bounds of the machine. Every replica must use the same values (they decide results); the
 * hash key only decides the layout of internal tables, never a result or a snapshot byte, and
 * should be random per process so a flood of chosen names cannot be aimed at one chain.
 */
struct gw_fsm_config {
    uint32_t max_leases;           /* 503 too_many_leases beyond */
    uint32_t max_locks;            /* 503 too_many_locks beyond (held locks) */
    uint32_t max_waiters_per_lock; /* 503 too_many_waiters beyond */
    uint32_t max_waiters;          /* all locks together; 503 too_many_waiters beyond */
    uint32_t max_counters;         /* 503 too_many_counters beyond */
    uint32_t max_routes;           /* 503 too_many_routes beyond */
    uint32_t max_route_bytes;      /* one route's JSON; 400 invalid_field beyond */
    uint32_t max_idem_records;     /* the oldest record is evicted beyond */
    uint64_t idem_ttl_ms;          /* fsm time a record is kept */
    uint32_t max_quotas;           /* cluster limiter states; 503 too_many_quotas beyond */
    uint32_t max_gwidem_records;   /* gateway idempotency records; 503 too_many_records beyond */
    uint64_t max_gwidem_bytes;     /* their bytes (keys, headers, bodies); same answer beyond */
    uint32_t max_gwidem_response;  /* headers + body of one stored response; released beyond */
    uint64_t hash_k0, hash_k1;     /* secret for table hashing (see above) */
};

/* Defaults: 65536 leases, locks, counters and idempotency records, 1024 waiters per lock and
 * 65536 in all, 1024 routes of at most 64 KiB, idempotency records kept 24 h; 65536 quotas,
 * 65536 gateway idempotency records of at most 256 MiB together and 1 MiB each. Hash key zero. */
void gw_fsm_config_default(struct gw_fsm_config *cfg);

/* ---- Commands -------------------------------------------------------------------------------
 *
 * Wire form (little-endian): version u8 (GW_FSM_CMD_VERSION), kind u8, flags u8, now_ms u64,
 * [idempotency key: len u8 (1..255), bytes] when flags has GW_FSM_F_IDEM, then the kind's
 * fields in the order listed below. A string is len u16 + bytes; json is len u32 + bytes.
 * Unknown flag bits, trailing bytes, short input and reserved kinds are rejected by the decoder.
 * The decoder checks only the structure; value rules (name charset, ttl range ...) are apply's,
 * which answers them with 400 results, so a bad client value never becomes a malformed entry.
 */
enum gw_fsm_kind {
    GW_FSM_LEASE_GRANT = 1,      /* ttl_ms */
    GW_FSM_LEASE_KEEPALIVE = 2,  /* lease_id */
    GW_FSM_LEASE_REVOKE = 3,     /* lease_id */
    GW_FSM_LEASE_EXPIRE = 4,     /* n_ids u16 (<= GW_FSM_MAX_EXPIRE_IDS), ids u64 each */
    GW_FSM_LOCK_ACQUIRE = 16,    /* name, owner, lease_id u64 (0: none), ttl_ms u64, wait_ms u64 */
    GW_FSM_LOCK_RELEASE = 17,    /* name, token u64 */
    GW_FSM_LOCK_CANCEL_WAIT = 18, /* name, waiter_id u64 */
    GW_FSM_COUNTER_ADD = 32,     /* name, delta i64 */
    GW_FSM_COUNTER_SET = 33,     /* name, value i64, expect i64 when flags has GW_FSM_F_EXPECT */
    /* 48..63: the cluster limiter's quota leasing (DESIGN.md, after Doorman); 48, 51.. reserved. */
    GW_FSM_QUOTA_FIRST = 48,
    GW_FSM_QUOTA_ACQUIRE = 49, /* name = limiter id, owner = node, quota_kind u8, quota_a u64,
                                  quota_b u64, count u64 (wanted), ttl_ms u64 (lease_ms) */
    GW_FSM_QUOTA_RELEASE = 50, /* name = limiter id, owner = node, grant_id u64, count u64 */
    GW_FSM_QUOTA_LAST = 63,
    /* 64..79: the gateway's replicated idempotency records (API.md section 3); 66.. reserved. */
    GW_FSM_IDEM_FIRST = 64,
    GW_FSM_IDEM_BEGIN = 64,  /* name = route, key, fp_hi u64, fp_lo u64, owner = node, ttl_ms u64 */
    GW_FSM_IDEM_FINISH = 65, /* name = route, key, claim_id u64, store u8, status u16, ttl_ms u64,
                                headers (u32 length), body (u32 length) */
    GW_FSM_IDEM_LAST = 79,
    GW_FSM_ROUTE_PUT = 80,       /* name, json (u32 length) */
    GW_FSM_ROUTE_DELETE = 81,    /* name */
};

enum gw_fsm_quota_kind { GW_FSM_QUOTA_TOKEN_BUCKET = 0, GW_FSM_QUOTA_SLIDING_WINDOW = 1 };

enum gw_fsm_cmd_flags {
    GW_FSM_F_IDEM = 1,   /* an idempotency key follows now_ms */
    GW_FSM_F_EXPECT = 2, /* COUNTER_SET carries expect */
};

/* A decoded command. Pointers point into the decoded buffer (no copy). */
struct gw_fsm_cmd {
    uint8_t kind;  /* enum gw_fsm_kind */
    uint8_t flags; /* enum gw_fsm_cmd_flags; set by the decoder, derived by the encoder */
    uint64_t now_ms;
    const char *idem_key; /* NULL or idem_key_len 0: none */
    size_t idem_key_len;
    const char *name;
    size_t name_len;
    const char *owner; /* LOCK_ACQUIRE */
    size_t owner_len;
    const char *json; /* ROUTE_PUT */
    size_t json_len;
    uint64_t lease_id;  /* LEASE_KEEPALIVE, LEASE_REVOKE, LOCK_ACQUIRE (0: use ttl_ms) */
    uint64_t ttl_ms;    /* LEASE_GRANT, LOCK_ACQUIRE without lease_id */
    uint64_t wait_ms;   /* LOCK_ACQUIRE */
    uint64_t token;     /* LOCK_RELEASE */
    uint64_t waiter_id; /* LOCK_CANCEL_WAIT */
    int64_t delta;      /* COUNTER_ADD */
    int64_t value;      /* COUNTER_SET */
    bool has_expect;    /* COUNTER_SET */
    int64_t expect;
    const uint64_t *ids; /* LEASE_EXPIRE, encode side only (decode: use gw_fsm_cmd_expire_id) */
    /* Quotas: name = limiter id, owner = node name. quota_kind GW_FSM_QUOTA_TOKEN_BUCKET with
     * quota_a = capacity, quota_b = refill_per_sec; GW_FSM_QUOTA_SLIDING_WINDOW with
     * quota_a = limit, quota_b = window_ms. ttl_ms = lease_ms. */
    uint8_t quota_kind;
    uint64_t quota_a, quota_b;
    uint64_t count;    /* QUOTA_ACQUIRE: wanted; QUOTA_RELEASE: unused, returned */
    uint64_t grant_id; /* QUOTA_RELEASE: the grant (its ACQUIRE's index) */
    /* Gateway idempotency: name = route, owner = node, ttl_ms = the record's ttl. */
    const char *key;
    size_t key_len;
    uint64_t fp_hi, fp_lo; /* IDEM_BEGIN */
    uint64_t claim_id;     /* IDEM_FINISH: the claim (its BEGIN's index) */
    bool store;            /* IDEM_FINISH: keep the response (else release the claim) */
    uint16_t status;       /* IDEM_FINISH */
    const void *headers, *body; /* IDEM_FINISH: opaque bytes */
    size_t headers_len, body_len;
    size_t n_ids;
    /* Decode side: the bytes after the idempotency key (what a replay must match). */
    const uint8_t *args;
    size_t args_len;
};

/* Bytes gw_fsm_cmd_encode needs for c, or 0 if c cannot be encoded (a string too long for its
 * length field, too many ids, unknown kind). */
size_t gw_fsm_cmd_encoded_len(const struct gw_fsm_cmd *c);
/* Encodes c into buf. Errors: GW_FSM_ERR_INVALID (as above), GW_FSM_ERR_TOO_BIG (cap). */
int gw_fsm_cmd_encode(const struct gw_fsm_cmd *c, uint8_t *buf, size_t cap, size_t *len);
/* Decodes buf; never reads past len. Errors: GW_FSM_ERR_MALFORMED, GW_FSM_ERR_UNSUPPORTED
 * (other version, reserved or unknown kind). */
int gw_fsm_cmd_decode(const uint8_t *buf, size_t len, struct gw_fsm_cmd *c);
/* The i-th lease id of a decoded LEASE_EXPIRE (the ids stay unaligned in the buffer). */
uint64_t gw_fsm_cmd_expire_id(const struct gw_fsm_cmd *c, size_t i);

/* Validation the HTTP layer can run before proposing (apply checks again). */
bool gw_fsm_name_valid(const char *name, size_t len);     /* 1..200 of [A-Za-z0-9._:-] */
bool gw_fsm_owner_valid(const char *owner, size_t len);   /* 1..200 bytes 0x20..0x7e */
bool gw_fsm_idem_key_valid(const char *key, size_t len);  /* 1..255 bytes 0x20..0x7e */
/* Lease ids travel as decimal strings ("id": "123"): 1..20 digits, no sign, no leading zero,
 * non-zero, at most UINT64_MAX. False for anything else (then 400 invalid_field / 404). */
bool gw_fsm_parse_id(const char *s, size_t len, uint64_t *id);

/* ---- Results ----------------------------------------------------------------------------- */

/* A waiter that got its answer during some apply: the HTTP request queued as waiter_id gets
 * status and body (200 the lock; 409 lock_held on timeout; 404 lease_not_found when its lease
 * died while it waited; 503 too_many_leases if its own lease could not be created). More than
 * one request may be parked under one waiter id (a retry with the same idempotency key while the
 * first waits is answered "queued" with the same id): every one of them gets this answer. */
struct gw_fsm_wakeup {
    uint64_t waiter_id;
    int status;
    const char *body; /* JSON, NUL-terminated, body_len bytes */
    size_t body_len;
};

/*
 * What an apply or a read produced. status is the HTTP status (0 when queued); body is the JSON
 * to send (empty for 204 and queued); code is the error code of an error body, else NULL.
 * replayed: an idempotent replay of an earlier result (body byte-for-byte the same).
 * Pointers stay valid until the result is reused or freed. Initialise with gw_fsm_result_init.
 */
struct gw_fsm_result {
    int status;
    const char *code;
    const char *body;
    size_t body_len;
    bool queued;
    uint64_t waiter_id;
    bool replayed;
    const struct gw_fsm_wakeup *wakeups;
    size_t n_wakeups;
    /* Private: storage reused from call to call. */
    char *buf_;
    size_t buf_len_, buf_cap_, body_off_;
    struct gw_fsm_wakeup *wk_;
    size_t *wk_off_;
    size_t wk_cap_;
    bool oom_;
};

void gw_fsm_result_init(struct gw_fsm_result *res);
void gw_fsm_result_free(struct gw_fsm_result *res);

/* ---- The machine --------------------------------------------------------------------------- */

struct gw_fsm;

/* Errors: GW_FSM_ERR_INVALID (a zero bound), GW_FSM_ERR_NOMEM. */
int gw_fsm_new(const struct gw_fsm_config *cfg, struct gw_fsm **out);
void gw_fsm_free(struct gw_fsm *f);

/*
 * Applies the command committed at index (indexes must strictly increase; entries that carry no
 * command may be skipped). Results and their codes:
 *
 * LEASE_GRANT      201 {"id":"<index>","ttl_ms":n}; 400 invalid_field (ttl_ms); 503 too_many_leases
 * LEASE_KEEPALIVE  200 {"id","ttl_ms"}; 404 lease_not_found (unknown or overdue)
 * LEASE_REVOKE     204; releases its locks (waking their next waiters) and drops its waiters
 *                  (wakeups 404 lease_not_found); 404 lease_not_found (unknown or overdue)
 * LEASE_EXPIRE     200 {"expired":n} (leases really overdue at t; others untouched)
 * LOCK_ACQUIRE     200 {"name","owner","token","lease_id","ttl_ms"} (new holder, or the same
 *                  owner and lease again: same token); without lease_id a lease of ttl_ms is
 *                  created with id = index (for a waiter: at grant, id = its waiter id; with a
 *                  lease_id, ttl_ms is ignored); 409 lock_held {"holder","token"} when wait_ms is 0; else
 *                  queued (waiter_id = index); 400 invalid_name / invalid_field (owner, ttl_ms,
 *                  wait_ms); 404 lease_not_found; 503 too_many_waiters / too_many_locks /
 *                  too_many_leases
 * LOCK_RELEASE     204 (the next live waiter is granted: a wakeup); 409 lock_not_held (another
 *                  token); 404 lock_not_found
 * LOCK_CANCEL_WAIT 204 and a wakeup 409 lock_held for the waiter; 404 waiter_not_found
 * COUNTER_ADD      200 {"name","value"}; 400 invalid_field "add" on i64 overflow;
 *                  503 too_many_counters
 * COUNTER_SET      200 {"name","value"}; 409 cas_failed {"value": current}
 * ROUTE_PUT        200 {"name","version"}; ROUTE_DELETE 204 / 404 route_not_found
 * QUOTA_ACQUIRE    200 {"granted":g,"grant":"<index>","lease_ms","remaining","next_ms","reset_ms"}
 *                  (g <= count; 0 when the budget is spent); 400 invalid_name / invalid_field;
 *                  503 too_many_quotas. See README.md "Quota leasing".
 * QUOTA_RELEASE    200 {"released":k,"remaining"}
 * IDEM_BEGIN       200 {"decision":"execute","claim":"<index>"} | {"decision":"in_flight"} |
 *                  {"decision":"mismatch"} | {"decision":"replay","status":s,"headers":"<base64>",
 *                  "body":"<base64>"}; 400 invalid_field; 503 too_many_records
 * IDEM_FINISH      200 {"result":"stored"|"released"|"stale"|"too_large"}
 * The quota and IDEM_ kinds take no /v1 idempotency key (the decoder refuses the flag).
 * With an idempotency key: 400 idempotency_key_invalid; 422 idempotency_key_mismatch when the
 * key (per kind) was used with other arguments; a replay returns the stored result.
 *
 * Returns 0 (whatever the HTTP status). A command that does not decode is still consumed: the
 * index is recorded, nothing else changes, res is 400 invalid_command, and the decoder's error
 * is returned. GW_FSM_ERR_INVALID: index not above the last applied (nothing changes).
 * GW_FSM_ERR_NOMEM: the machine may be partly applied; the node must stop and rebuild from a
 * snapshot and the log (replicas must not diverge).
 */
int gw_fsm_apply(struct gw_fsm *f, uint64_t index, const uint8_t *cmd, size_t len,
                 struct gw_fsm_result *res);

/* Reads, called once a ReadIndex has been applied. They change nothing. Return 0, or
 * GW_FSM_ERR_NOMEM when the result could not be built. */

/* 200 {"id","ttl_ms","remaining_ms","locks":[names sorted]} at max(now_ms, fsm time);
 * 404 lease_not_found when unknown or overdue. */
int gw_fsm_get_lease(const struct gw_fsm *f, uint64_t id, uint64_t now_ms, struct gw_fsm_result *res);
/* 200 {"name","owner","token","lease_id","waiters":n}; 404 lock_not_found when free or when the
 * holder's lease is overdue at fsm time; 400 invalid_name. */
int gw_fsm_get_lock(const struct gw_fsm *f, const char *name, size_t len, struct gw_fsm_result *res);
/* 200 {"name","value"} (0 if never written); 400 invalid_name. */
int gw_fsm_get_counter(const struct gw_fsm *f, const char *name, size_t len,
                       struct gw_fsm_result *res);
/* 200 with the stored route JSON as the body; 404 route_not_found; 400 invalid_name. */
int gw_fsm_get_route(const struct gw_fsm *f, const char *name, size_t len, struct gw_fsm_result *res);

/* Calls fn for every route in name order; stops early and returns fn's value if non-zero. */
typedef int (*gw_fsm_route_fn)(void *ctx, const char *name, size_t name_len, const char *json,
                               size_t json_len, uint64_t version);
int gw_fsm_routes_foreach(const struct gw_fsm *f, gw_fsm_route_fn fn, void *ctx);
/* Bumped by every ROUTE_PUT and ROUTE_DELETE that changed the table. */
uint64_t gw_fsm_routes_version(const struct gw_fsm *f);

uint64_t gw_fsm_time(const struct gw_fsm *f);          /* the fsm clock, ms */
uint64_t gw_fsm_applied_index(const struct gw_fsm *f); /* last index given to apply or restore */

/* For the leader's expiry loop: ids of leases overdue at max(now_ms, fsm time), at most max of
 * them (any max when more are overdue; the rest come next round), sorted. Returns how many were
 * written; propose them in LEASE_EXPIRE (max <= GW_FSM_MAX_EXPIRE_IDS). */
size_t gw_fsm_overdue_leases(const struct gw_fsm *f, uint64_t now_ms, uint64_t *ids, size_t max);

/* A waiter whose wait_ms has passed: propose LOCK_CANCEL_WAIT{name, waiter_id}. name points into
 * the machine and is valid until the next apply or restore. */
struct gw_fsm_waiter_ref {
    uint64_t waiter_id;
    const char *name;
    size_t name_len;
};
/* Waiters whose deadline (arrival t + wait_ms) is <= max(now_ms, fsm time), at most max of them,
 * sorted by waiter id. Returns how many were written. */
size_t gw_fsm_overdue_waiters(const struct gw_fsm *f, uint64_t now_ms, struct gw_fsm_waiter_ref *out,
                              size_t max);

/* The earliest fsm time at which a lease becomes overdue or a waiter's wait ends (UINT64_MAX:
 * none), so the leader can sleep until then instead of polling. */
uint64_t gw_fsm_next_deadline(const struct gw_fsm *f);

struct gw_fsm_stats {
    uint64_t leases, locks, waiters, counters, routes, idem_records;
    uint64_t last_token;       /* the fencing token counter */
    uint64_t idem_evicted;     /* records dropped by the count bound before their TTL (local) */
    uint64_t quotas, quota_grants, gwidem_records, gwidem_bytes;
};
void gw_fsm_stats(const struct gw_fsm *f, struct gw_fsm_stats *st);

/* ---- Snapshots ---------------------------------------------------------------------------- */

/* The whole state in a versioned, CRC-protected image; canonical (two machines with the same
 * state produce the same bytes). *buf is malloc'd, the caller frees it. Errors: GW_FSM_ERR_NOMEM. */
int gw_fsm_snapshot(const struct gw_fsm *f, uint8_t **buf, size_t *len);
/* Replaces the whole state with an image. Never reads past len; on any error the machine is
 * unchanged. Errors: GW_FSM_ERR_MALFORMED (bad CRC, structure or references),
 * GW_FSM_ERR_UNSUPPORTED (other version), GW_FSM_ERR_NOMEM. */
int gw_fsm_restore(struct gw_fsm *f, const uint8_t *buf, size_t len);

#endif
