/*
 * The raft store: `scope: cluster` limiters and idempotency records kept by the embedded Raft
 * group's replicated state machine (raft/fsm), so a limit is one budget for the whole cluster and
 * a stored response replays on every node.
 *
 * Limiters never wait for Raft. Each node spends a local allotment of the cluster budget (quota
 * leasing, as in Google's Doorman): limiter_admit is synchronous and only looks at this node's
 * allotment; when it runs low the store asks the state machine for more (QUOTA_ACQUIRE) in the
 * background, and hands back what a key does not use once it goes idle (QUOTA_RELEASE). Every
 * granted unit can only be spent before its lease ends, and the state machine counts it as
 * spent at the worst moment it could be, so the cluster never admits more than the limit, even
 * while nodes are cut off (they spend only what they hold). See backends/README.md.
 *
 * Idempotency records are claimed, completed and released with linearizable writes (IDEM_BEGIN /
 * IDEM_FINISH): only the _async forms are set.
 *
 * Proposals go to this node's gw_node. A follower answers "not the leader": the store then sends
 * the encoded command through the forward hook (the gateway posts it to the leader's control
 * plane, POST /internal/v1/fsm); without a hook the operation fails (the route's on_store_error
 * applies to idempotency; a limiter refill is retried after a pause).
 */
#ifndef GW_STORE_RAFT_H
#define GW_STORE_RAFT_H

#include <stddef.h>
#include <stdint.h>

#include "store.h"

struct gw_node;

/* Error codes of the raft store (outside the policy and redis ranges). */
#define GW_STORE_RAFT_ENO_LEADER (-2201)  /* no leader within the node's wait */
#define GW_STORE_RAFT_EUNKNOWN (-2202)    /* proposed, commit not confirmed */
#define GW_STORE_RAFT_EBUSY (-2203)       /* a queue bound (node or store) */
#define GW_STORE_RAFT_EDISK_FULL (-2204)  /* the log refused the write */
#define GW_STORE_RAFT_ENOT_LEADER (-2205) /* a follower, and no forward hook */
#define GW_STORE_RAFT_EFULL (-2206)       /* the state machine's record bound */
#define GW_STORE_RAFT_EPROTO (-2207)      /* an answer the store did not understand */
#define GW_STORE_RAFT_ESTOPPING (-2208)   /* the node is shutting down */

const char *gw_store_raft_strerror(int err);

/* Starts an instance on a running node; node_name is this member's configured name (1..63
 * printable bytes, recorded with its grants and claims). One housekeeping thread per instance
 * gives idle allotments back. *impl owns the instance. Errors: GW_POLICY_EINVALID_CONFIG,
 * GW_POLICY_ENOMEM. */
int gw_store_raft_open(struct gw_node *node, const char *node_name, void **impl);

/* Stops the housekeeping thread and waits until every request the store submitted has been
 * answered (the node must still be running, or already stopped: it answers everything then).
 * Destroy the limiters and idempotency stores first. */
void gw_store_raft_close(void *impl);

/*
 * Forwarding from a follower. send must deliver cmd (an encoded struct gw_fsm_cmd, len bytes) to
 * the leader at leader_api ("host:port" of its control plane) and later call done(arg, status,
 * body, body_len) exactly once from any thread: status and body are the leader's answer (the
 * state machine's result, or 503/507 with an error body), status 0 when it could not be
 * delivered. cmd is valid only during the call: copy it. Returns 0, or non-zero when it could
 * not start (done is then not called). The leader's endpoint decodes the command
 * (gw_fsm_cmd_decode), accepts only the quota and IDEM_ kinds, submits it as a GW_NODE_WRITE
 * (the leader stamps now_ms) and answers the result's status and body; it never forwards again.
 */
struct gw_store_raft_forward {
  int (*send)(void *ctx, const char *leader_api, const uint8_t *cmd, size_t len,
              void (*done)(void *arg, int status, const char *body, size_t body_len), void *arg);
  void *ctx;
};
void gw_store_raft_set_forward(void *impl, const struct gw_store_raft_forward *fwd);

/*
 * What limiter_create takes as impl: the instance and the route (copied), which names the
 * limiter in the cluster (limiter id = route + "/tb" or "/sw" + "/" + key). idem_create takes
 * the bare instance (the route comes with each call).
 */
struct gw_store_raft_scope {
  uint32_t magic; /* set by gw_store_raft_scope() */
  void *raft;
  const char *route;
};
struct gw_store_raft_scope gw_store_raft_scope(void *impl, const char *route);

/*
 * Tunables of the allotment (per instance, before limiters are created). Defaults: lease 1000 ms
 * for token buckets and min(1000, max(50, window/20)) ms for windows; a batch covers the key's
 * rate over the last 100-200 ms for horizon_ms (200) ahead, at most max(1, limit / 8); a refill
 * starts when the allotment falls to half a batch; an allotment unused for idle_ms (300) goes
 * back.
 */
struct gw_store_raft_tuning {
  uint64_t tb_lease_ms;
  uint64_t horizon_ms;
  uint64_t idle_ms;
  uint32_t batch_div; /* max batch = limit / batch_div */
  uint64_t wait_ms;   /* the longest a request waits for a key's grant (1000) */
};
void gw_store_raft_tune(void *impl, const struct gw_store_raft_tuning *t);

struct gw_store_raft_stats {
  uint64_t refills, refill_units, refill_failures, releases, release_units, forwarded;
  uint64_t claims, replays;
};
void gw_store_raft_stats(void *impl, struct gw_store_raft_stats *out);

/* The ops table: limiter_admit (synchronous, local), limiter_peek (local view), and the _async
 * forms of idem_begin and idem_finish. now_ns must be CLOCK_MONOTONIC. */
extern const struct gw_store_ops gw_store_raft;

#endif
