/*
 * Idempotency records (API.md §3; draft-ietf-httpapi-idempotency-key-header): a request with an
 * Idempotency-Key is executed once per (route, key). The store keeps one record per (route, key):
 *
 *   absent --begin--> IN_FLIGHT --complete--> COMPLETED (status, headers, body stored)
 *                         \--release--> absent (the upstream never saw the request)
 *   a COMPLETED record --ttl_ms after its completion--> absent
 *   (an IN_FLIGHT record never expires: it lasts as long as its request)
 *
 * gw_idem_begin decides for a request: EXECUTE (this request now holds the claim), IN_FLIGHT
 * (409 idempotency_in_flight), MISMATCH (422 idempotency_key_mismatch: same key, different
 * method, path or body) or REPLAY (answer with the stored response and Idempotent-Replayed: true).
 *
 * Fingerprint: 128 bits, two SipHash-2-4 runs with distinct fixed keys over the length-prefixed
 * method, path and body. Only requests that reuse one key are ever compared, so an accidental
 * match needs a 128-bit collision between two bodies a client sent under the same key
 * (probability about 2^-128 per comparison); the fingerprint is not meant to resist a client
 * that attacks its own key.
 *
 * What is stored (gw_idem_should_store): every response that came from the upstream, whatever its
 * status, and a 504 upstream_timeout (the upstream may have acted). Rejections made before the
 * upstream could see the request (400, 413, 429, 503 circuit_open / overloaded, 502 on a failed
 * connect) are not stored: the claim is released so the client may retry. When some earlier try
 * of a retried request did reach the upstream, the outcome counts as from the upstream.
 *
 * Bounds: at most max_records records and max_bytes bytes (record headers, route and key bytes,
 * stored headers and bodies). A claim that does not fit after expired records are reclaimed fails
 * with GW_POLICY_EFULL; a response that does not fit fails with GW_POLICY_EFULL or
 * GW_POLICY_ETOO_LARGE and the claim is released (the caller logs that the response was not kept).
 * Records are never evicted before their TTL, since that would silently allow a second execution.
 *
 * One TTL per store (completed records expire in completion order, so reclaiming is O(1) per
 * record); the gateway keeps one store per route or per TTL. An in-flight record never expires,
 * so every claim must end in gw_idem_finish (or complete / release): a claim that is never ended
 * holds its key, and a record slot, for the life of the store. Not thread-safe: one lock around
 * each call.
 * Allocation: one block per record (plus one per stored response), owned by the store.
 */
#ifndef GW_IDEMPOTENCY_H
#define GW_IDEMPOTENCY_H

#include "hash.h"
#include "policy.h"

#define GW_IDEM_KEY_MAX 255

struct gw_idem_config {
  uint32_t max_records;    /* 1..2^24 */
  uint64_t max_bytes;      /* >= 4096 */
  uint64_t ttl_ms;         /* >= 1 */
  struct gw_hash_key seed; /* secret for the table hash */
};

struct gw_idem_fingerprint {
  uint64_t hi, lo;
};

enum gw_idem_key_status {
  GW_IDEM_KEY_VALID = 0,   /* use it */
  GW_IDEM_KEY_ABSENT = 1,  /* no header and not required: proceed without idempotency */
  GW_IDEM_KEY_MISSING = 2, /* no header, required: 400 idempotency_key_missing */
  GW_IDEM_KEY_INVALID = 3, /* empty, over 255 bytes or non-printable: 400 idempotency_key_invalid */
};

enum gw_idem_decision {
  GW_IDEM_EXECUTE = 0,   /* claimed: send the request, then gw_idem_finish */
  GW_IDEM_IN_FLIGHT = 1, /* 409 idempotency_in_flight */
  GW_IDEM_MISMATCH = 2,  /* 422 idempotency_key_mismatch */
  GW_IDEM_REPLAY = 3,    /* answer with the stored response */
};

/* Where the final answer to a claimed request came from. */
enum gw_idem_origin {
  GW_IDEM_FROM_UPSTREAM = 0,    /* an upstream response, any status: stored */
  GW_IDEM_UPSTREAM_TIMEOUT = 1, /* 504 upstream_timeout after sending: stored */
  GW_IDEM_NOT_SENT = 2,         /* rejected before the upstream saw it: released, not stored */
};

/* Proof of a claim: pass it to gw_idem_finish / complete / release. */
struct gw_idem_claim {
  uint64_t id;
  uint64_t hash;
};

/* A response as opaque bytes (the gateway chooses the header encoding). */
struct gw_idem_response {
  int status;
  const void *headers;
  size_t headers_len;
  const void *body;
  size_t body_len;
};

struct gw_idem_stats {
  uint32_t records;
  uint32_t in_flight;
  uint64_t bytes;
  uint64_t expired; /* records removed by TTL since creation */
  uint64_t full;    /* claims or stores refused because a bound was reached */
  uint64_t replays;
};

struct gw_idem_store;

/* 0 if cfg is usable, else GW_POLICY_EINVALID_CONFIG. */
int gw_idem_config_check(const struct gw_idem_config *cfg);

/* Creates an empty store; *out owns it. Errors: GW_POLICY_EINVALID_CONFIG, GW_POLICY_ENOMEM. */
int gw_idem_create(const struct gw_idem_config *cfg, struct gw_idem_store **out);

/* Frees the store and every record; st may be NULL. */
void gw_idem_destroy(struct gw_idem_store *st);

/*
 * Validates the Idempotency-Key field value: key is NULL when the request has no such header.
 * Valid keys are 1..255 bytes of printable ASCII (0x20..0x7e).
 */
enum gw_idem_key_status gw_idem_key_check(const char *key, size_t len, bool required);

/* The request fingerprint over method, path (with query) and body. */
void gw_idem_fingerprint(const char *method, size_t method_len, const char *path, size_t path_len,
                         const void *body, size_t body_len, struct gw_idem_fingerprint *out);

/*
 * Looks up (route, key) at now_ns and decides (see above). On GW_IDEM_EXECUTE *claim is set and
 * the caller must later call gw_idem_finish (or complete / release). On GW_IDEM_REPLAY *replay
 * points at the stored response, valid until the next call that changes the store (copy it
 * before dropping the lock). key must have passed gw_idem_key_check.
 * Returns 0, or GW_POLICY_EFULL when a new record does not fit (answer 503 and do not execute).
 */
int gw_idem_begin(struct gw_idem_store *st, const char *route, size_t route_len, const char *key,
                  size_t key_len, const struct gw_idem_fingerprint *fp, uint64_t now_ns,
                  enum gw_idem_decision *decision, struct gw_idem_claim *claim,
                  struct gw_idem_response *replay);

/* Whether an answer of this origin is stored (API.md §3; see above). */
bool gw_idem_should_store(enum gw_idem_origin origin);

/*
 * Ends a claim: stores resp (copied) when gw_idem_should_store(origin), else releases the claim.
 * Returns 0; GW_POLICY_ESTALE if the claim no longer owns its record (it expired and another
 * request claimed the key, or it was already finished); GW_POLICY_EFULL / GW_POLICY_ETOO_LARGE if
 * the response could not be kept, in which case the claim has been released.
 */
int gw_idem_finish(struct gw_idem_store *st, const struct gw_idem_claim *claim,
                   enum gw_idem_origin origin, const struct gw_idem_response *resp,
                   uint64_t now_ns);

/* Stores resp for the claim (gw_idem_finish with an upstream origin). Same returns. */
int gw_idem_complete(struct gw_idem_store *st, const struct gw_idem_claim *claim,
                     const struct gw_idem_response *resp, uint64_t now_ns);

/* Drops the claim's in-flight record. Returns 0 or GW_POLICY_ESTALE. */
int gw_idem_release(struct gw_idem_store *st, const struct gw_idem_claim *claim);

/* Removes up to max expired records at now_ns; returns how many were removed. */
size_t gw_idem_expire(struct gw_idem_store *st, uint64_t now_ns, size_t max);

void gw_idem_stats(const struct gw_idem_store *st, struct gw_idem_stats *out);

#endif
