/*
 * node.h - one Raft node: the thread that drives the pure core (raft.h) with the write-ahead log
 * (storage/), the peer transport (transport/) and the replicated state machine (fsm/).
 *
 * HTTP threads never block on it. They fill a struct gw_node_req and hand it over with
 * gw_node_submit (a bounded queue, woken through an eventfd); the node thread proposes it (a
 * write) or confirms it with a ReadIndex (a linearizable read), and when the answer is known it
 * fills the request's outputs and calls req->done from the node thread. The caller then resumes
 * its client's connection.
 *
 * Answers: the state machine's result (an HTTP status and a JSON body in API.md's shape), or one
 * of the node's own outcomes: not the leader (with the leader's id, so the HTTP layer forwards the
 * request), no leader within GW_NODE_NO_LEADER_MS (503 no_leader), outcome unknown (a write was
 * proposed but its commit could not be confirmed: leadership changed or the wait timed out),
 * busy (a queue bound), or disk full (the log refused the write: nothing was acknowledged).
 *
 * Time: the leader stamps each command with the state machine's clock, continuous across leader
 * changes: when a node becomes leader and has applied its own term's first entry, it fixes
 * offset = fsm_time - monotonic_now and from then on stamps max(fsm_time, monotonic_now + offset).
 * A lease therefore never expires early, and an election extends it by at most the gap.
 */
#ifndef GW_RAFT_NODE_H
#define GW_RAFT_NODE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "fsm.h"
#include "raft.h"

#define GW_NODE_MAX_PEERS 15
#define GW_NODE_NO_LEADER_MS 5000 /* API.md section 4: no leader within 5 s is 503 no_leader */
#define GW_NODE_WRITE_TIMEOUT_MS 10000
#define GW_NODE_QUEUE_MAX 65536

struct gw_node_peer {
  uint64_t id;   /* the Raft id: gw_node_id_from_name(name) */
  char name[64]; /* as configured ("n1") */
  struct sockaddr_storage raft;
  socklen_t raft_len;
  char api[128]; /* "host:port" of its control plane, for forwarding */
};

struct gw_node_config {
  char name[64];
  char data_dir[1024];
  bool sync; /* fsync the log (false only for backend memory and benchmarks) */
  struct sockaddr_storage raft_listen;
  socklen_t raft_listen_len; /* 0: no transport (a single-node group) */
  struct gw_node_peer peers[GW_NODE_MAX_PEERS]; /* the founding members, this node included */
  size_t peer_count;
  uint64_t election_timeout_ms;
  uint64_t heartbeat_ms;
  uint64_t snapshot_every; /* entries applied between snapshots */
  uint64_t cluster_id;
  bool join; /* a new member: start with no membership and wait to be added by the cluster */

  /* The replicated route table. on_routes runs on the node thread whenever the state machine's
   * route table changed (an applied put or delete, a restored snapshot, and once at start when
   * the log holds routes); it may read fsm only during the call. When the table has never been
   * written, the first leader proposes the seed routes (its config file's) so the table starts
   * from them. */
  void (*on_routes)(void *ctx, const struct gw_fsm *fsm);
  void *routes_ctx;
  const char *const *seed_names; /* the caller keeps these alive while the node runs */
  const char *const *seed_jsons;
  size_t seed_count;
};

/* A stable non-zero Raft id for a member's configured name (FNV-1a 64). */
uint64_t gw_node_id_from_name(const char *name);

enum gw_node_op {
  GW_NODE_WRITE = 1,    /* cmd is proposed; the result is the state machine's */
  GW_NODE_READ_LEASE,   /* id */
  GW_NODE_READ_LOCK,    /* name */
  GW_NODE_READ_COUNTER, /* name */
  GW_NODE_READ_ROUTE,   /* name */
  GW_NODE_READ_ROUTES,  /* the whole route table as {"version":v,"routes":[...]} */
  GW_NODE_ADD_MEMBER,    /* member: its address is replicated, it joins as a learner, catches
                            up, then is promoted to voter (thesis section 4.2.1) */
  GW_NODE_REMOVE_MEMBER, /* member.name (the leader hands leadership over first) */
  GW_NODE_TRANSFER,      /* member.name: leadership transfer (thesis section 3.10) */
  GW_NODE_WAIT_APPLIED,  /* answered (status 0) once this node has applied index id, or after
                            2 s: read-your-writes for a write another node answered */
};

enum gw_node_outcome {
  GW_NODE_OK = 0,         /* status and body are the answer */
  GW_NODE_NOT_LEADER,     /* leader_id / leader_api say where to forward */
  GW_NODE_NO_LEADER,      /* 503 no_leader */
  GW_NODE_UNKNOWN,        /* 503 outcome_unknown */
  GW_NODE_BUSY,           /* 503: a queue bound was reached */
  GW_NODE_DISK_FULL,      /* 507: the log could not be written */
  GW_NODE_STOPPING,       /* 503: the node is shutting down */
};

/* One request. The caller owns it and everything it points to until done is called. */
struct gw_node_req {
  /* inputs */
  enum gw_node_op op;
  struct gw_fsm_cmd cmd; /* GW_NODE_WRITE: now_ms is stamped by the leader */
  uint64_t id;           /* reads of a lease */
  const char *name;      /* reads of a lock, counter or route */
  size_t name_len;
  struct {
    char name[64];
    char raft[128]; /* "host:port" */
    char api[128];
  } member; /* the membership operations */
  bool stale; /* ?consistency=stale: answer from this node's state without a ReadIndex */
  uint64_t avoid_leader; /* a leader found unreachable: wait for another (0: none) */
  void (*done)(struct gw_node_req *req);
  void *ctx;

  /* outputs, valid in done */
  enum gw_node_outcome outcome;
  int status;
  char *body; /* owned by the request: free() after done */
  size_t body_len;
  uint64_t applied_index; /* for the Raft-Index header */
  uint64_t leader_id;
  char leader_api[128]; /* "" when unknown */

  /* private to the node */
  struct gw_node_req *next_;
  uint64_t index_, term_, read_seq_, deadline_ms_, read_index_;
  uint64_t first_ms_; /* first submission (resubmissions keep it): bounds the wait for a leader */
  uint64_t proposed_us_;
  int state_;
};

struct gw_node;

/* Opens the log (recovering it), restores the state machine, binds the transport and starts
 * the thread. On failure nothing runs and errbuf says why (e.g. a damaged log). */
int gw_node_start(const struct gw_node_config *cfg, struct gw_node **out, char *errbuf,
                  size_t errlen);

/* Hand the route table to on_routes again at the next turn (thread-safe): for a caller that
 * could not take it when the node started. */
void gw_node_resync_routes(struct gw_node *n);

/* Stops the thread: pending requests are answered GW_NODE_STOPPING. Frees everything. */
void gw_node_stop(struct gw_node *n);

/* Queues req (thread-safe). Returns 0, or -1 when the queue is full (req untouched, done not
 * called: answer 503 yourself). A request may be submitted again after done (for instance with
 * avoid_leader set when forwarding to the leader failed); zero first_ms_ before the first
 * submission of a new request (memset does). */
int gw_node_submit(struct gw_node *n, struct gw_node_req *req);

#define GW_NODE_LAT_BUCKETS 14
extern const uint64_t gw_node_latency_bounds_us[GW_NODE_LAT_BUCKETS]; /* last: UINT64_MAX */

struct gw_node_member {
  char name[64];
  uint64_t id;
  char raft[128];
  char api[128];
  const char *role; /* "leader", "follower", "learner", "candidate" */
  uint64_t match_index;
};

/* A copy of the node's view, thread-safe (for /admin/cluster, /readyz and /metrics). */
struct gw_node_status {
  char name[64];
  char leader[64]; /* "" when unknown */
  uint64_t leader_id;
  const char *role;
  uint64_t term, commit_index, applied_index;
  size_t member_count;
  struct gw_node_member members[GW_NODE_MAX_PEERS];
  uint64_t proposals, proposals_failed, reads, fsyncs, snapshots;
  uint64_t fsync_ns_total, fsync_ns_max;
  bool disk_full;
  /* Latency histograms (counts per bucket of gw_node_latency_bounds_us, not cumulative). */
  uint64_t fsync_bucket[GW_NODE_LAT_BUCKETS];
  uint64_t commit_bucket[GW_NODE_LAT_BUCKETS]; /* proposal to commit, this node's proposals */
  uint64_t commit_us_total, commit_count;
};
void gw_node_status(struct gw_node *n, struct gw_node_status *out);

#endif
