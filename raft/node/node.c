/*
 * The Raft node thread: core + log + transport + state machine, and the queue that connects it
 * to the HTTP threads (see node.h).
 *
 * One loop turn: take submitted requests, tick the core when a tick is due, run the transport
 * (received messages are stepped into the core), do the leader's duties (lease expiries, waiter
 * timeouts), then drain the core's updates in the order raft.h prescribes: persist and sync
 * (one fsync for the whole update: group commit), only then send, then apply, answer reads,
 * snapshot, advance. Requests wait in a few short lists keyed by what they wait for: a leader,
 * their log index, a ReadIndex, or a lock.
 */

#include "node.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "storage.h"
#include "transport.h"

enum req_state {
  RS_QUEUED = 0,
  RS_WAIT_LEADER, /* no leader yet, or this leader is not ready */
  RS_PROPOSED,    /* waiting for its index to be applied */
  RS_LOCK_WAIT,   /* queued behind a lock holder: waiting for a wakeup */
  RS_READ_SENT,   /* ReadIndex asked, waiting for its index */
  RS_READ_READY,  /* index known, waiting for apply to reach it */
  RS_MEMBER,      /* a membership operation in progress (see member_step) */
};

/* Steps of a membership operation. */
enum member_step {
  MS_START = 0,
  MS_ADDR_PROPOSED, /* the member's address entry is on its way (index_) */
  MS_LEARNER,       /* added as a learner: promote once caught up */
  MS_PROMOTED,      /* promotion proposed: wait until it is a voter */
  MS_REMOVING,      /* removal proposed: wait until it is gone */
  MS_TRANSFERRING,  /* wait until the target leads */
};

/* A node-level log entry carrying a member's addresses (not a state machine command: the first
 * byte differs from every command version). Payload: MEMBER_MAGIC, then "name\0raft\0api\0". */
#define MEMBER_MAGIC 0xA5
/* The snapshot image: "GWNS", u32 member count, then per member name\0raft\0api\0, then the
 * state machine's own image. */
#define SNAP_MAGIC "GWNS"

#define DUTY_INTERVAL_MS 50
#define DISK_RETRY_MS 200
#define EXPIRE_BATCH 256
#define CANCEL_BATCH 64

struct gw_node {
  struct gw_node_config cfg;
  uint64_t self;
  pthread_t thread;
  atomic_bool stop;
  int epfd, evfd;

  bool ctr_dirty; /* ctr moved since it was last published */

  pthread_mutex_t qmu; /* guards the submission queue */
  struct gw_node_req *q_head, *q_tail;
  size_t q_len;

  struct raft *raft;
  struct gw_wal *wal;
  struct gw_transport *tp;
  struct gw_fsm *fsm;
  struct gw_fsm_result res;
  uint8_t *scratch; /* command encoding buffer */
  size_t scratch_cap;

  /* Requests by what they wait for (node thread only). */
  struct gw_node_req *waiting; /* RS_WAIT_LEADER */
  struct gw_node_req *proposed;
  struct gw_node_req *lock_waits;
  struct gw_node_req *reads;
  struct gw_node_req *member_ops; /* RS_MEMBER */
  uint64_t read_seq;
  struct raft_membership known_members; /* last membership the transport was set up for */

  /* Leadership. */
  bool was_leader;
  bool leader_ready;      /* this term's first entry is applied: the clock offset is fixed */
  uint64_t leader_term;
  uint64_t term_first_index;
  int64_t clock_offset_ms;
  uint64_t duty_index; /* a duty proposal in flight until applied >= this */
  uint64_t next_duty_ms;

  /* The writes of an update that could not be persisted (disk full), copied, retried until
   * they are durable; only then is the update advanced. Its messages were dropped. */
  bool stuck;
  struct raft_update stuck_u; /* scalars, and pointers into the copies below */
  struct raft_entry *stuck_entries;
  uint8_t *stuck_data;
  struct raft_snapshot stuck_snap;
  uint8_t *stuck_snap_data;
  uint64_t next_disk_retry_ms;
  uint64_t applied; /* last index passed to apply (any entry type) */
  /* The state machine's clock when this node last applied a command, and this node's monotonic
   * clock at that moment: a new leader continues the clock from them (see watch_leadership). */
  uint64_t last_apply_fsm_ms, last_apply_mono_ms;

  uint64_t next_tick_ms;
  uint64_t tick_ms;
  uint64_t routes_version; /* last route table version handed to on_routes */
  atomic_bool routes_resync;
  uint64_t snapshot_trailing;
  bool seeded;             /* seed routes proposed in this leadership */

  struct gw_node_status ctr; /* counters, node thread only */
  pthread_mutex_t smu;       /* guards st */
  struct gw_node_status st;  /* what other threads read: ctr and the core's view, published */
};

uint64_t gw_node_id_from_name(const char *name)
{
  uint64_t h = 0xcbf29ce484222325ull;
  for (const unsigned char *p = (const unsigned char *)name; *p; p++) {
    h ^= *p;
    h *= 0x100000001b3ull;
  }
  return h ? h : 1;
}

const uint64_t gw_node_latency_bounds_us[GW_NODE_LAT_BUCKETS] = {
    100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000, 500000, 1000000,
    UINT64_MAX};

static void observe(uint64_t *buckets, uint64_t us)
{
  for (int i = 0; i < GW_NODE_LAT_BUCKETS; i++)
    if (us <= gw_node_latency_bounds_us[i]) {
      buckets[i]++;
      return;
    }
}

static uint64_t mono_us(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000 + (uint64_t)ts.tv_nsec / 1000;
}

static uint64_t mono_ms(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* One JSON log line on stderr, in the gateway's shape ("ts", "level", "msg"), written whole. */
static void node_log(const char *level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void node_log(const char *level, const char *fmt, ...)
{
  char msg[512], line[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);
  struct timespec ts;
  struct tm tm;
  clock_gettime(CLOCK_REALTIME, &ts);
  gmtime_r(&ts.tv_sec, &tm);
  char when[32];
  strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%S", &tm);
  /* msg holds no quotes or backslashes from outside: names and error texts of this code. */
  for (char *c = msg; *c; c++)
    if (*c == '"' || *c == '\\' || (unsigned char)*c < 0x20)
      *c = '\'';
  int n = snprintf(line, sizeof(line), "{\"ts\":\"%s.%03ldZ\",\"level\":\"%s\",\"msg\":\"%s\"}\n",
                   when, ts.tv_nsec / 1000000, level, msg);
  if (n > 0 && write(STDERR_FILENO, line, (size_t)n < sizeof(line) ? (size_t)n : sizeof(line) - 1) < 0) {
    /* nowhere else to report */
  }
}

/* ---- members ---- */

static bool parse_hostport(const char *text, struct sockaddr_storage *ss, socklen_t *len)
{
  char host[128];
  const char *colon = strrchr(text, ':');
  if (!colon || colon == text || (size_t)(colon - text) >= sizeof(host))
    return false;
  size_t hl = (size_t)(colon - text);
  memcpy(host, text, hl);
  host[hl] = '\0';
  char *h = host;
  if (h[0] == '[' && hl > 2 && h[hl - 1] == ']') {
    h[hl - 1] = '\0';
    h++;
  }
  char *end;
  long port = strtol(colon + 1, &end, 10);
  if (*end || port <= 0 || port > 65535)
    return false;
  memset(ss, 0, sizeof(*ss));
  struct sockaddr_in *a4 = (struct sockaddr_in *)ss;
  struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ss;
  if (inet_pton(AF_INET, h, &a4->sin_addr) == 1) {
    a4->sin_family = AF_INET;
    a4->sin_port = htons((uint16_t)port);
    *len = sizeof(*a4);
    return true;
  }
  if (inet_pton(AF_INET6, h, &a6->sin6_addr) == 1) {
    a6->sin6_family = AF_INET6;
    a6->sin6_port = htons((uint16_t)port);
    *len = sizeof(*a6);
    return true;
  }
  return false;
}

static struct gw_node_peer *find_peer(struct gw_node *n, uint64_t id)
{
  for (size_t i = 0; i < n->cfg.peer_count; i++)
    if (n->cfg.peers[i].id == id)
      return &n->cfg.peers[i];
  return NULL;
}

/* Add or update a member's addresses (applied from the log or a snapshot). */
static void upsert_peer(struct gw_node *n, const char *name, const char *raft, const char *api)
{
  uint64_t id = gw_node_id_from_name(name);
  struct gw_node_peer *p = find_peer(n, id);
  if (!p) {
    if (n->cfg.peer_count >= GW_NODE_MAX_PEERS)
      return;
    p = &n->cfg.peers[n->cfg.peer_count++];
    memset(p, 0, sizeof(*p));
  }
  p->id = id;
  snprintf(p->name, sizeof(p->name), "%s", name);
  snprintf(p->api, sizeof(p->api), "%s", api);
  struct sockaddr_storage ss;
  socklen_t len;
  if (parse_hostport(raft, &ss, &len)) {
    p->raft = ss;
    p->raft_len = len;
    if (n->tp && id != n->self)
      gw_transport_set_peer(n->tp, id, &p->raft, p->raft_len);
  }
}

/* Keep the transport's peers in step with the membership (members may come and go). */
static void reconcile_transport(struct gw_node *n)
{
  const struct raft_membership *mb = raft_membership(n->raft);
  if (!mb || !n->tp || memcmp(mb, &n->known_members, sizeof(*mb)) == 0)
    return;
  for (uint32_t i = 0; i < n->known_members.n; i++) {
    uint64_t id = n->known_members.members[i].id;
    if (id != n->self && !raft_membership_find(mb, id))
      gw_transport_remove_peer(n->tp, id);
  }
  for (uint32_t i = 0; i < mb->n; i++) {
    struct gw_node_peer *p = find_peer(n, mb->members[i].id);
    if (p && p->id != n->self && p->raft_len)
      gw_transport_set_peer(n->tp, p->id, &p->raft, p->raft_len);
  }
  n->known_members = *mb;
}

static int restore_snapshot(struct gw_node *n, const uint8_t *buf, size_t len);
static void serve_ready_reads(struct gw_node *n);

/* ---- answering ---- */

/* The counters, histograms, term, commit and applied index as they are now, so that a client
 * that got its answer and then reads /metrics sees its own write counted (the full status is
 * published once per turn of the loop, after the answers). */
static void publish_counters(struct gw_node *n)
{
  const size_t from = offsetof(struct gw_node_status, proposals);
  struct raft_status rs;
  raft_status(n->raft, &rs);
  pthread_mutex_lock(&n->smu);
  memcpy((char *)&n->st + from, (const char *)&n->ctr + from, sizeof(n->st) - from);
  n->st.term = rs.term;
  n->st.commit_index = rs.commit;
  n->st.applied_index = n->applied;
  pthread_mutex_unlock(&n->smu);
  n->ctr_dirty = false;
}

static void answer(struct gw_node *n, struct gw_node_req *r, enum gw_node_outcome outcome,
                   int status, const char *body, size_t len)
{
  if (n->ctr_dirty)
    publish_counters(n);
  r->outcome = outcome;
  r->status = status;
  r->applied_index = n->applied;
  r->body = NULL;
  r->body_len = 0;
  if (body && len) {
    r->body = malloc(len + 1);
    if (r->body) {
      memcpy(r->body, body, len);
      r->body[len] = '\0';
      r->body_len = len;
    } else {
      r->outcome = GW_NODE_BUSY;
    }
  }
  struct raft_status rs;
  raft_status(n->raft, &rs);
  r->leader_id = rs.leader;
  r->leader_api[0] = '\0';
  for (size_t i = 0; i < n->cfg.peer_count; i++)
    if (n->cfg.peers[i].id == rs.leader)
      snprintf(r->leader_api, sizeof(r->leader_api), "%s", n->cfg.peers[i].api);
  r->done(r);
}

static void answer_result(struct gw_node *n, struct gw_node_req *r, const struct gw_fsm_result *res)
{
  answer(n, r, GW_NODE_OK, res->status, res->body, res->body_len);
}

/* Unlink r from the list at *head (r must be on it). */
static void list_remove(struct gw_node_req **head, struct gw_node_req *r)
{
  for (struct gw_node_req **p = head; *p; p = &(*p)->next_)
    if (*p == r) {
      *p = r->next_;
      r->next_ = NULL;
      return;
    }
}

static void list_push(struct gw_node_req **head, struct gw_node_req *r)
{
  r->next_ = *head;
  *head = r;
}

/* Answer every request of a list with the same outcome. */
static void answer_all(struct gw_node *n, struct gw_node_req **head, enum gw_node_outcome o)
{
  while (*head) {
    struct gw_node_req *r = *head;
    *head = r->next_;
    r->next_ = NULL;
    answer(n, r, o, 0, NULL, 0);
  }
}

/* ---- the clock the leader stamps commands with ---- */

static uint64_t fsm_now(struct gw_node *n)
{
  uint64_t t = gw_fsm_time(n->fsm);
  int64_t mine = (int64_t)mono_ms() + n->clock_offset_ms;
  return mine > (int64_t)t ? (uint64_t)mine : t;
}

/* ---- proposing ---- */

static int propose_cmd(struct gw_node *n, struct gw_fsm_cmd *c, uint64_t *index)
{
  size_t need = gw_fsm_cmd_encoded_len(c);
  if (need == 0)
    return RAFT_ERR_INVALID;
  if (need > n->scratch_cap) {
    uint8_t *p = realloc(n->scratch, need);
    if (!p)
      return RAFT_ERR_NOMEM;
    n->scratch = p;
    n->scratch_cap = need;
  }
  size_t len;
  if (gw_fsm_cmd_encode(c, n->scratch, n->scratch_cap, &len) != 0)
    return RAFT_ERR_INVALID;
  return raft_propose(n->raft, n->scratch, (uint32_t)len, index);
}

static bool is_leader(struct gw_node *n, struct raft_status *rs)
{
  raft_status(n->raft, rs);
  return rs->role == RAFT_LEADER;
}

static void answer_read(struct gw_node *n, struct gw_node_req *r)
{
  int rc = 0;
  if (r->op == GW_NODE_WAIT_APPLIED) {
    answer(n, r, GW_NODE_OK, 0, NULL, 0);
    return;
  }
  switch (r->op) {
  case GW_NODE_READ_LEASE:
    rc = gw_fsm_get_lease(n->fsm, r->id, r->stale ? gw_fsm_time(n->fsm) : fsm_now(n), &n->res);
    break;
  case GW_NODE_READ_LOCK:
    rc = gw_fsm_get_lock(n->fsm, r->name, r->name_len, &n->res);
    break;
  case GW_NODE_READ_COUNTER:
    rc = gw_fsm_get_counter(n->fsm, r->name, r->name_len, &n->res);
    break;
  case GW_NODE_READ_ROUTE:
    rc = gw_fsm_get_route(n->fsm, r->name, r->name_len, &n->res);
    break;
  default:
    rc = GW_FSM_ERR_INVALID;
    break;
  }
  if (rc != 0)
    answer(n, r, GW_NODE_BUSY, 0, NULL, 0);
  else
    answer_result(n, r, &n->res);
}

/* Take one request forward as far as it can go now. */
static void dispatch(struct gw_node *n, struct gw_node_req *r, uint64_t now)
{
  struct raft_status rs;
  if (r->op == GW_NODE_WAIT_APPLIED) {
    /* Answered once this node has applied up to r->id (or at the deadline). */
    r->read_index_ = r->id;
    r->read_seq_ = 0;
    r->state_ = RS_READ_READY;
    if (!r->deadline_ms_)
      r->deadline_ms_ = now + 2000;
    list_push(&n->reads, r);
    serve_ready_reads(n);
    return;
  }
  if (r->op != GW_NODE_WRITE && r->stale) {
    answer_read(n, r);
    return;
  }
  if (r->op == GW_NODE_WRITE && n->stuck) {
    answer(n, r, GW_NODE_DISK_FULL, 0, NULL, 0);
    return;
  }
  if (!is_leader(n, &rs)) {
    if (rs.leader && rs.leader != n->self && rs.leader != r->avoid_leader) {
      answer(n, r, GW_NODE_NOT_LEADER, 0, NULL, 0);
      return;
    }
    if (!r->deadline_ms_)
      r->deadline_ms_ = r->first_ms_ + GW_NODE_NO_LEADER_MS;
    r->state_ = RS_WAIT_LEADER;
    list_push(&n->waiting, r);
    return;
  }
  if (!n->leader_ready) {
    if (!r->deadline_ms_)
      r->deadline_ms_ = r->first_ms_ + GW_NODE_NO_LEADER_MS;
    r->state_ = RS_WAIT_LEADER;
    list_push(&n->waiting, r);
    return;
  }
  if (r->op == GW_NODE_ADD_MEMBER || r->op == GW_NODE_REMOVE_MEMBER || r->op == GW_NODE_TRANSFER) {
    r->state_ = RS_MEMBER;
    r->index_ = MS_START; /* the step, for member ops */
    r->deadline_ms_ = now + (r->op == GW_NODE_ADD_MEMBER ? 60000 : 10000);
    list_push(&n->member_ops, r);
    return;
  }
  if (r->op == GW_NODE_WRITE) {
    r->cmd.now_ms = fsm_now(n);
    uint64_t index = 0;
    int rc = propose_cmd(n, &r->cmd, &index);
    if (rc == RAFT_ERR_NOT_LEADER || rc == RAFT_ERR_TRANSFERRING) {
      r->deadline_ms_ = now + GW_NODE_NO_LEADER_MS;
      r->state_ = RS_WAIT_LEADER;
      list_push(&n->waiting, r);
      return;
    }
    if (rc != 0) {
      n->ctr.proposals_failed++;
      answer(n, r, GW_NODE_BUSY, 0, NULL, 0);
      return;
    }
    n->ctr.proposals++;
    r->proposed_us_ = mono_us();
    r->index_ = index;
    r->term_ = rs.term;
    r->deadline_ms_ = now + GW_NODE_WRITE_TIMEOUT_MS;
    r->state_ = RS_PROPOSED;
    list_push(&n->proposed, r);
    return;
  }
  /* A linearizable read (thesis section 6.4). */
  r->read_seq_ = ++n->read_seq;
  int rc = raft_read_index(n->raft, r->read_seq_);
  if (rc != 0 && rc != RAFT_ERR_BUSY) {
    answer(n, r, GW_NODE_NOT_LEADER, 0, NULL, 0);
    return;
  }
  n->ctr.reads++;
  if (!r->deadline_ms_)
    r->deadline_ms_ = now + GW_NODE_NO_LEADER_MS;
  r->state_ = rc == 0 ? RS_READ_SENT : RS_QUEUED; /* BUSY: asked again next turn */
  list_push(&n->reads, r);
}

static void take_submissions(struct gw_node *n, uint64_t now)
{
  pthread_mutex_lock(&n->qmu);
  struct gw_node_req *head = n->q_head;
  n->q_head = n->q_tail = NULL;
  n->q_len = 0;
  pthread_mutex_unlock(&n->qmu);
  while (head) {
    struct gw_node_req *r = head;
    head = r->next_;
    r->next_ = NULL;
    dispatch(n, r, now);
  }
}

/* Requests waiting for a leader, for readiness, or for a ReadIndex slot. */
static void retry_waiting(struct gw_node *n, uint64_t now)
{
  struct gw_node_req *list = n->waiting;
  n->waiting = NULL;
  struct raft_status rs;
  bool leader = is_leader(n, &rs);
  while (list) {
    struct gw_node_req *r = list;
    list = r->next_;
    r->next_ = NULL;
    if ((leader && n->leader_ready) ||
        (rs.leader && rs.leader != n->self && rs.leader != r->avoid_leader)) {
      dispatch(n, r, now);
    } else if (now >= r->deadline_ms_) {
      answer(n, r, GW_NODE_NO_LEADER, 0, NULL, 0);
    } else {
      list_push(&n->waiting, r);
    }
  }
  /* Reads refused for a moment (no entry of this term committed yet) ask again. */
  for (struct gw_node_req **p = &n->reads; *p;) {
    struct gw_node_req *r = *p;
    if (r->state_ == RS_QUEUED && leader) {
      if (raft_read_index(n->raft, r->read_seq_) == 0)
        r->state_ = RS_READ_SENT;
    }
    if (r->op == GW_NODE_WAIT_APPLIED && now >= r->deadline_ms_) {
      *p = r->next_;
      r->next_ = NULL;
      answer(n, r, GW_NODE_OK, 0, NULL, 0); /* waited long enough: answer as it stands */
      continue;
    }
    if (r->state_ != RS_READ_READY && now >= r->deadline_ms_) {
      *p = r->next_;
      r->next_ = NULL;
      answer(n, r, leader ? GW_NODE_UNKNOWN : GW_NODE_NO_LEADER, 0, NULL, 0);
      continue;
    }
    p = &r->next_;
  }
  /* Writes whose commit cannot be confirmed in time. */
  for (struct gw_node_req **p = &n->proposed; *p;) {
    struct gw_node_req *r = *p;
    if (now >= r->deadline_ms_) {
      *p = r->next_;
      r->next_ = NULL;
      answer(n, r, GW_NODE_UNKNOWN, 0, NULL, 0);
      continue;
    }
    p = &r->next_;
  }
}

/* ---- membership operations (leader) ---- */

static void answer_json(struct gw_node *n, struct gw_node_req *r, int status, const char *fmt,
                        const char *a, const char *b)
{
  char body[512];
  int len = snprintf(body, sizeof(body), fmt, a, b);
  answer(n, r, GW_NODE_OK, status, body, len > 0 ? (size_t)len : 0);
}

static bool is_voter(const struct raft_membership *mb, uint64_t id)
{
  const struct raft_member *m = raft_membership_find(mb, id);
  return m && m->role == RAFT_VOTER;
}

/* Propose the node-level entry carrying a member's addresses. */
static int propose_member_addr(struct gw_node *n, const struct gw_node_req *r, uint64_t *index)
{
  uint8_t buf[1 + 64 + 128 + 128];
  size_t o = 0;
  buf[o++] = MEMBER_MAGIC;
  const char *f[3] = {r->member.name, r->member.raft, r->member.api};
  for (int i = 0; i < 3; i++) {
    size_t l = strnlen(f[i], 127);
    memcpy(buf + o, f[i], l);
    o += l;
    buf[o++] = '\0';
  }
  return raft_propose(n->raft, buf, (uint32_t)o, index);
}

/* Advance one membership operation; true when it is finished (answered). */
static bool member_step(struct gw_node *n, struct gw_node_req *r, uint64_t now)
{
  struct raft_status rs;
  raft_status(n->raft, &rs);
  const struct raft_membership *mb = raft_membership(n->raft);
  uint64_t id = gw_node_id_from_name(r->member.name);
  if (r->index_ != MS_TRANSFERRING && rs.role != RAFT_LEADER) {
    /* Leadership moved: the new leader (reached through the HTTP layer) carries on. */
    r->deadline_ms_ = 0;
    dispatch(n, r, now);
    return true;
  }
  if (now >= r->deadline_ms_) {
    answer_json(n, r, 504, "{\"error\":{\"code\":\"member_timeout\",\"message\":\"the "
                           "membership change did not complete in time: is member %s running and "
                           "reachable?%s\"}}",
                r->member.name, "");
    return true;
  }
  int rc;
  uint64_t index;
  switch (r->op) {
  case GW_NODE_ADD_MEMBER:
    switch (r->index_) {
    case MS_START: {
      struct sockaddr_storage ss;
      socklen_t len;
      if (!parse_hostport(r->member.raft, &ss, &len)) {
        answer_json(n, r, 400, "{\"error\":{\"code\":\"invalid_field\",\"message\":\"raft must be "
                               "host:port\",\"field\":\"raft\"}}%s%s", "", "");
        return true;
      }
      if (is_voter(mb, id)) {
        answer_json(n, r, 200, "{\"id\":\"%s\",\"role\":\"voter\"%s}", r->member.name, "");
        return true;
      }
      if (propose_member_addr(n, r, &index) != 0)
        return false; /* busy: try again next turn */
      r->term_ = index;
      r->index_ = MS_ADDR_PROPOSED;
      return false;
    }
    case MS_ADDR_PROPOSED:
      if (n->applied < r->term_)
        return false;
      rc = raft_membership_find(mb, id) ? 0 : raft_change_membership(n->raft, RAFT_ADD_LEARNER, id, &index);
      if (rc == RAFT_ERR_CONFIG_PENDING)
        return false;
      if (rc != 0) {
        answer(n, r, GW_NODE_BUSY, 0, NULL, 0);
        return true;
      }
      r->index_ = MS_LEARNER;
      return false;
    case MS_LEARNER:
      rc = raft_change_membership(n->raft, RAFT_PROMOTE, id, &index);
      if (rc == 0)
        r->index_ = MS_PROMOTED;
      return false; /* not caught up or a change pending: again next turn */
    case MS_PROMOTED:
      if (!is_voter(mb, id) || rs.commit < rs.last_index)
        return false;
      answer_json(n, r, 200, "{\"id\":\"%s\",\"role\":\"voter\"%s}", r->member.name, "");
      return true;
    }
    return false;
  case GW_NODE_REMOVE_MEMBER:
    if (r->index_ == MS_START) {
      if (!raft_membership_find(mb, id)) {
        answer_json(n, r, 404, "{\"error\":{\"code\":\"member_not_found\",\"message\":\"no "
                               "member %s\"}}%s", r->member.name, "");
        return true;
      }
      if (id == n->self) {
        /* The leader hands over first (thesis section 3.10); the next leader removes it. */
        uint64_t best = 0, best_match = 0;
        for (unsigned i = 0; i < mb->n; i++) {
          struct raft_progress_info pi;
          if (mb->members[i].id != n->self && mb->members[i].role == RAFT_VOTER &&
              raft_progress(n->raft, i, &pi) && (best == 0 || pi.match > best_match)) {
            best = mb->members[i].id;
            best_match = pi.match;
          }
        }
        if (!best) {
          answer_json(n, r, 409, "{\"error\":{\"code\":\"last_voter\",\"message\":\"the last "
                                 "voter cannot be removed\"}}%s%s", "", "");
          return true;
        }
        raft_transfer_leadership(n->raft, best);
        r->index_ = MS_TRANSFERRING;
        return false;
      }
      rc = raft_change_membership(n->raft, RAFT_REMOVE, id, &index);
      if (rc == RAFT_ERR_CONFIG_PENDING)
        return false;
      if (rc != 0) {
        answer(n, r, GW_NODE_BUSY, 0, NULL, 0);
        return true;
      }
      r->index_ = MS_REMOVING;
      return false;
    }
    if (r->index_ == MS_TRANSFERRING) {
      if (rs.role == RAFT_LEADER)
        return false;
      r->deadline_ms_ = 0;
      dispatch(n, r, now); /* no longer leader: forwarded to the new one */
      return true;
    }
    if (raft_membership_find(mb, id) || rs.commit < rs.last_index)
      return false;
    answer(n, r, GW_NODE_OK, 204, NULL, 0);
    return true;
  case GW_NODE_TRANSFER:
    if (r->index_ == MS_START) {
      if (!is_voter(mb, id)) {
        answer_json(n, r, 404, "{\"error\":{\"code\":\"member_not_found\",\"message\":\"no "
                               "voting member %s\"}}%s", r->member.name, "");
        return true;
      }
      if (id == n->self) {
        answer_json(n, r, 200, "{\"leader\":\"%s\"%s}", r->member.name, "");
        return true;
      }
      if (raft_transfer_leadership(n->raft, id) != 0) {
        answer(n, r, GW_NODE_BUSY, 0, NULL, 0);
        return true;
      }
      r->index_ = MS_TRANSFERRING;
      return false;
    }
    if (rs.leader == id) {
      answer_json(n, r, 200, "{\"leader\":\"%s\"%s}", r->member.name, "");
      return true;
    }
    return false;
  default:
    answer(n, r, GW_NODE_BUSY, 0, NULL, 0);
    return true;
  }
}

static void run_member_ops(struct gw_node *n, uint64_t now)
{
  struct gw_node_req *list = n->member_ops;
  n->member_ops = NULL;
  while (list) {
    struct gw_node_req *r = list;
    list = r->next_;
    r->next_ = NULL;
    if (!member_step(n, r, now))
      list_push(&n->member_ops, r);
  }
}

/* ---- leadership changes and the leader's duties ---- */

static void watch_leadership(struct gw_node *n, uint64_t now)
{
  struct raft_status rs;
  bool leader = is_leader(n, &rs);
  if (leader && (!n->was_leader || rs.term != n->leader_term)) {
    n->leader_term = rs.term;
    n->leader_ready = false;
    n->seeded = false;
    n->term_first_index = 0;
    n->duty_index = 0;
    /* The term's first entry is the leader's no-op: the last index now (paper section 8). */
    n->term_first_index = rs.last_index;
  }
  if (!leader && n->was_leader) {
    n->leader_ready = false;
    /* Proposals may still commit under the next leader: give them an election's time. */
    uint64_t cut = now + 2 * n->cfg.election_timeout_ms;
    for (struct gw_node_req *r = n->proposed; r; r = r->next_)
      if (r->deadline_ms_ > cut)
        r->deadline_ms_ = cut;
    /* ReadIndex requests die with the leadership: the HTTP layer forwards them. */
    for (struct gw_node_req **p = &n->reads; *p;) {
      struct gw_node_req *r = *p;
      if (r->state_ != RS_READ_READY) {
        *p = r->next_;
        r->next_ = NULL;
        r->deadline_ms_ = 0;
        dispatch(n, r, now);
        continue;
      }
      p = &r->next_;
    }
  }
  n->was_leader = leader;
  if (leader && !n->leader_ready && n->term_first_index && n->applied >= n->term_first_index) {
    /* Continue the state machine's clock: from the last command this node applied, plus the
     * time that passed here since (never more than really passed since the old leader stamped
     * it, since it was applied after that: so a lease never expires early, and the clock does
     * not stand still while the cluster was idle and then lost its leader). */
    if (n->last_apply_mono_ms)
      n->clock_offset_ms = (int64_t)n->last_apply_fsm_ms - (int64_t)n->last_apply_mono_ms;
    else
      n->clock_offset_ms = (int64_t)gw_fsm_time(n->fsm) - (int64_t)mono_ms();
    n->leader_ready = true;
  }
}

/* An empty, never written route table starts from the leader's config file. */
static void seed_routes(struct gw_node *n, uint64_t t)
{
  if (n->seeded || gw_fsm_routes_version(n->fsm) != 0)
    return;
  n->seeded = true;
  for (size_t i = 0; i < n->cfg.seed_count; i++) {
    struct gw_fsm_cmd c;
    memset(&c, 0, sizeof(c));
    c.kind = GW_FSM_ROUTE_PUT;
    c.now_ms = t;
    c.name = n->cfg.seed_names[i];
    c.name_len = strlen(c.name);
    c.json = n->cfg.seed_jsons[i];
    c.json_len = strlen(c.json);
    uint64_t index;
    propose_cmd(n, &c, &index);
  }
}

static void leader_duties(struct gw_node *n, uint64_t now)
{
  if (!n->leader_ready || n->stuck || now < n->next_duty_ms)
    return;
  n->next_duty_ms = now + DUTY_INTERVAL_MS;
  seed_routes(n, fsm_now(n));
  if (n->duty_index && n->applied < n->duty_index)
    return; /* the last round is not applied yet */
  uint64_t t = fsm_now(n);
  uint64_t ids[EXPIRE_BATCH];
  size_t k = gw_fsm_overdue_leases(n->fsm, t, ids, EXPIRE_BATCH);
  uint64_t index = 0;
  if (k) {
    struct gw_fsm_cmd c;
    memset(&c, 0, sizeof(c));
    c.kind = GW_FSM_LEASE_EXPIRE;
    c.now_ms = t;
    c.ids = ids;
    c.n_ids = k;
    if (propose_cmd(n, &c, &index) == 0)
      n->duty_index = index;
  }
  struct gw_fsm_waiter_ref w[CANCEL_BATCH];
  size_t m = gw_fsm_overdue_waiters(n->fsm, t, w, CANCEL_BATCH);
  for (size_t i = 0; i < m; i++) {
    struct gw_fsm_cmd c;
    memset(&c, 0, sizeof(c));
    c.kind = GW_FSM_LOCK_CANCEL_WAIT;
    c.now_ms = t;
    c.name = w[i].name;
    c.name_len = w[i].name_len;
    c.waiter_id = w[i].waiter_id;
    if (propose_cmd(n, &c, &index) == 0)
      n->duty_index = index;
  }
}

/* ---- applying ---- */

static void deliver_wakeups(struct gw_node *n, const struct gw_fsm_result *res)
{
  for (size_t i = 0; i < res->n_wakeups; i++) {
    const struct gw_fsm_wakeup *wk = &res->wakeups[i];
    /* Every request parked under the waiter: an idempotent retry of a waiting acquire parks
     * under the same id as the first. */
    for (struct gw_node_req **p = &n->lock_waits; *p;) {
      struct gw_node_req *r = *p;
      if (r->index_ == wk->waiter_id) {
        *p = r->next_;
        r->next_ = NULL;
        answer(n, r, GW_NODE_OK, wk->status, wk->body, wk->body_len);
        continue;
      }
      p = &r->next_;
    }
  }
}

static void apply_entry(struct gw_node *n, const struct raft_entry *e)
{
  struct gw_node_req *mine = NULL;
  for (struct gw_node_req *r = n->proposed; r; r = r->next_)
    if (r->index_ == e->index) {
      mine = r;
      break;
    }
  if (mine)
    list_remove(&n->proposed, mine);
  if (e->index > n->applied)
    n->applied = e->index;
  if (e->type != RAFT_ENTRY_NORMAL) {
    if (mine)
      answer(n, mine, GW_NODE_UNKNOWN, 0, NULL, 0);
    return;
  }
  if (e->len > 1 && e->data[0] == MEMBER_MAGIC) {
    /* name\0raft\0api\0 */
    const char *f[3] = {NULL, NULL, NULL};
    size_t k = 0, at = 1;
    while (k < 3 && at < e->len) {
      const char *start = (const char *)e->data + at;
      const void *z = memchr(start, '\0', e->len - at);
      if (!z)
        break;
      f[k++] = start;
      at += (size_t)((const char *)z - start) + 1;
    }
    if (k == 3)
      upsert_peer(n, f[0], f[1], f[2]);
    if (mine)
      answer(n, mine, GW_NODE_UNKNOWN, 0, NULL, 0);
    return;
  }
  if (gw_fsm_apply(n->fsm, e->index, e->data, e->len, &n->res) == GW_FSM_ERR_NOMEM) {
    /* The machine may be half-applied: going on would let this replica diverge. A restart
     * rebuilds it from the snapshot and the log. */
    node_log("error", "raft: out of memory applying entry %llu: stopping",
             (unsigned long long)e->index);
    abort();
  }
  n->last_apply_fsm_ms = gw_fsm_time(n->fsm);
  n->last_apply_mono_ms = mono_ms();
  if (mine && mine->proposed_us_) {
    uint64_t us = mono_us() - mine->proposed_us_;
    observe(n->ctr.commit_bucket, us);
    n->ctr.commit_us_total += us;
    n->ctr.commit_count++;
    n->ctr_dirty = true;
  }
  if (mine) {
    if (mine->term_ != e->term) {
      answer(n, mine, GW_NODE_UNKNOWN, 0, NULL, 0); /* another leader's entry took the index */
    } else if (n->res.queued) {
      mine->index_ = n->res.waiter_id;
      mine->state_ = RS_LOCK_WAIT;
      list_push(&n->lock_waits, mine);
    } else {
      answer_result(n, mine, &n->res);
    }
  }
  deliver_wakeups(n, &n->res);
}

/* Tell the gateway when the replicated route table changed. */
void gw_node_resync_routes(struct gw_node *n)
{
  atomic_store(&n->routes_resync, true);
  uint64_t one = 1;
  if (write(n->evfd, &one, sizeof(one)) < 0) {
    /* picked up at the next tick */
  }
}

static void check_routes(struct gw_node *n)
{
  if (atomic_exchange(&n->routes_resync, false))
    n->routes_version = UINT64_MAX;
  uint64_t v = gw_fsm_routes_version(n->fsm);
  if (v != n->routes_version && n->cfg.on_routes) {
    n->routes_version = v;
    n->cfg.on_routes(n->cfg.routes_ctx, n->fsm);
  }
}

static void serve_ready_reads(struct gw_node *n)
{
  uint64_t applied = n->applied;
  for (struct gw_node_req **p = &n->reads; *p;) {
    struct gw_node_req *r = *p;
    if (r->state_ == RS_READ_READY && applied >= r->read_index_) {
      *p = r->next_;
      r->next_ = NULL;
      answer_read(n, r);
      continue;
    }
    p = &r->next_;
  }
}

/* Persist an update: snapshot, hard state, entries, then one sync. 0 or a GW_WAL_ERR_*. */
static int persist(struct gw_node *n, const struct raft_update *u)
{
  int rc = 0;
  if (u->snapshot)
    rc = gw_wal_save_snapshot(n->wal, u->snapshot, 0);
  /* Entries before the hard state, so a commit index is never durable ahead of its entries. */
  if (!rc && u->n_entries)
    rc = gw_wal_append(n->wal, u->entries, u->n_entries);
  if (!rc && u->hard_state_changed)
    rc = gw_wal_set_hard_state(n->wal, &u->hard_state);
  if (!rc && (u->snapshot || u->hard_state_changed || u->n_entries)) {
    uint64_t ns = 0;
    rc = gw_wal_sync(n->wal, &ns);
    if (!rc) {
      n->ctr.fsyncs++;
      n->ctr.fsync_ns_total += ns;
      observe(n->ctr.fsync_bucket, ns / 1000);
      if (ns > n->ctr.fsync_ns_max)
        n->ctr.fsync_ns_max = ns;
      n->ctr_dirty = true;
    }
  }
  return rc;
}

/* Everything of an update after its writes: restore, apply, reads (not snapshot, advance). */
static void apply_update(struct gw_node *n, const struct raft_update *u)
{
  if (u->snapshot) {
    n->last_apply_mono_ms = 0; /* the clock restarts from the snapshot's */
    if (restore_snapshot(n, u->snapshot->data, u->snapshot->len) != 0)
      node_log("error", "raft: a snapshot from the leader does not restore");
    if (u->snapshot->index > n->applied)
      n->applied = u->snapshot->index;
    /* Proposals the snapshot jumped over cannot be confirmed. */
    for (struct gw_node_req **p = &n->proposed; *p;) {
      struct gw_node_req *r = *p;
      if (r->index_ <= u->snapshot->index) {
        *p = r->next_;
        r->next_ = NULL;
        answer(n, r, GW_NODE_UNKNOWN, 0, NULL, 0);
        continue;
      }
      p = &r->next_;
    }
  }
  for (size_t i = 0; i < u->n_committed; i++)
    apply_entry(n, &u->committed[i]);
  for (size_t i = 0; i < u->n_reads; i++)
    for (struct gw_node_req *r = n->reads; r; r = r->next_)
      if (r->read_seq_ == u->reads[i].ctx && r->state_ != RS_READ_READY) {
        r->read_index_ = u->reads[i].index;
        r->state_ = RS_READ_READY;
      }
}

/* The snapshot image: the member address table, then the state machine's image. */
static uint8_t *wrap_snapshot(struct gw_node *n, const uint8_t *img, size_t len, size_t *out_len)
{
  size_t need = 8 + len;
  for (size_t i = 0; i < n->cfg.peer_count; i++)
    need += strlen(n->cfg.peers[i].name) + 130 + strlen(n->cfg.peers[i].api) + 1;
  uint8_t *buf = malloc(need);
  if (!buf)
    return NULL;
  size_t o = 0;
  memcpy(buf, SNAP_MAGIC, 4);
  o = 8;
  uint32_t count = 0;
  for (size_t i = 0; i < n->cfg.peer_count; i++) {
    const struct gw_node_peer *p = &n->cfg.peers[i];
    char raft[128] = "";
    char host[INET6_ADDRSTRLEN] = "";
    if (p->raft.ss_family == AF_INET) {
      const struct sockaddr_in *a = (const struct sockaddr_in *)&p->raft;
      inet_ntop(AF_INET, &a->sin_addr, host, sizeof(host));
      snprintf(raft, sizeof(raft), "%s:%u", host, ntohs(a->sin_port));
    } else if (p->raft.ss_family == AF_INET6) {
      const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)&p->raft;
      inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof(host));
      snprintf(raft, sizeof(raft), "[%s]:%u", host, ntohs(a->sin6_port));
    }
    const char *f[3] = {p->name, raft, p->api};
    for (int k = 0; k < 3; k++) {
      size_t l = strlen(f[k]);
      memcpy(buf + o, f[k], l + 1);
      o += l + 1;
    }
    count++;
  }
  memcpy(buf + 4, &count, 4);
  memcpy(buf + o, img, len);
  *out_len = o + len;
  return buf;
}

/* Restore both parts of a snapshot image; an image without the member table is the state
 * machine's alone. 0 or -1. */
static int restore_snapshot(struct gw_node *n, const uint8_t *buf, size_t len)
{
  size_t o = 0;
  if (len >= 8 && memcmp(buf, SNAP_MAGIC, 4) == 0) {
    uint32_t count;
    memcpy(&count, buf + 4, 4);
    o = 8;
    for (uint32_t i = 0; i < count; i++) {
      const char *f[3];
      for (int k = 0; k < 3; k++) {
        const void *z = o < len ? memchr(buf + o, '\0', len - o) : NULL;
        if (!z)
          return -1;
        f[k] = (const char *)buf + o;
        o = (size_t)((const uint8_t *)z - buf) + 1;
      }
      if (f[0][0] && strlen(f[0]) < 64 && strlen(f[1]) < 128 && strlen(f[2]) < 128)
        upsert_peer(n, f[0], f[1], f[2]);
    }
  }
  return gw_fsm_restore(n->fsm, buf + o, len - o) == 0 ? 0 : -1;
}

static void take_snapshot(struct gw_node *n)
{
  uint8_t *fimg = NULL, *img = NULL;
  size_t flen = 0, len = 0;
  uint64_t at = gw_fsm_applied_index(n->fsm);
  if (n->applied > at)
    at = n->applied;
  if (gw_fsm_snapshot(n->fsm, &fimg, &flen) != 0)
    return;
  img = wrap_snapshot(n, fimg, flen, &len);
  free(fimg);
  if (!img)
    return;
  int rc = raft_snapshot_saved(n->raft, at, img, len);
  if (rc == 0) {
    const struct raft_snapshot *s = raft_last_snapshot(n->raft);
    int wrc = s && s->index == at ? gw_wal_save_snapshot(n->wal, s, n->snapshot_trailing) : 0;
    if (wrc == 0)
      n->ctr.snapshots++;
    else
      node_log("error", "raft: the snapshot at %llu could not be written (%s): the log keeps "
                        "growing until one can",
               (unsigned long long)at, gw_wal_strerror(wrc));
  } else {
    node_log("error", "raft: the core refused the snapshot at %llu (%s)", (unsigned long long)at,
             raft_strerror(rc));
  }
  free(img);
}

static void free_stuck(struct gw_node *n)
{
  free(n->stuck_entries);
  free(n->stuck_data);
  free(n->stuck_snap_data);
  n->stuck_entries = NULL;
  n->stuck_data = NULL;
  n->stuck_snap_data = NULL;
}

/* Copy what persist() needs of u, since u's pointers die with the next input to the core. */
static bool copy_stuck(struct gw_node *n, const struct raft_update *u)
{
  free_stuck(n);
  n->stuck_u = *u;
  n->stuck_u.messages = NULL;
  n->stuck_u.n_messages = 0;
  n->stuck_u.committed = NULL;
  n->stuck_u.n_committed = 0;
  n->stuck_u.reads = NULL;
  n->stuck_u.n_reads = 0;
  n->stuck_u.snapshot_wanted = false;
  n->stuck_u.entries = NULL;
  n->stuck_u.snapshot = NULL;
  size_t bytes = 0;
  for (size_t i = 0; i < u->n_entries; i++)
    bytes += u->entries[i].len;
  if (u->n_entries) {
    n->stuck_entries = malloc(u->n_entries * sizeof(*n->stuck_entries));
    n->stuck_data = malloc(bytes ? bytes : 1);
    if (!n->stuck_entries || !n->stuck_data)
      return false;
    uint8_t *d = n->stuck_data;
    for (size_t i = 0; i < u->n_entries; i++) {
      n->stuck_entries[i] = u->entries[i];
      if (u->entries[i].len)
        memcpy(d, u->entries[i].data, u->entries[i].len);
      n->stuck_entries[i].data = d;
      d += u->entries[i].len;
    }
    n->stuck_u.entries = n->stuck_entries;
  }
  if (u->snapshot) {
    n->stuck_snap = *u->snapshot;
    n->stuck_snap_data = malloc(u->snapshot->len ? u->snapshot->len : 1);
    if (!n->stuck_snap_data)
      return false;
    memcpy(n->stuck_snap_data, u->snapshot->data, u->snapshot->len);
    n->stuck_snap.data = n->stuck_snap_data;
    n->stuck_u.snapshot = &n->stuck_snap;
  }
  return true;
}

static void drain_updates(struct gw_node *n, uint64_t now)
{
  if (n->stuck) {
    if (now < n->next_disk_retry_ms)
      return;
    if (persist(n, &n->stuck_u) != 0) {
      n->next_disk_retry_ms = now + DISK_RETRY_MS;
      return;
    }
    n->stuck = false;
    n->ctr.disk_full = false;
    raft_advance(n->raft, &n->stuck_u);
    free_stuck(n);
    serve_ready_reads(n);
  }
  while (raft_has_ready(n->raft)) {
    struct raft_update u;
    if (raft_ready(n->raft, &u) != 0)
      return;
    int rc = persist(n, &u);
    if (rc == GW_WAL_ERR_BROKEN) {
      /* An fsync failed: what the kernel holds is unknown, and retrying could report success
       * for data it dropped. Only a restart, which reads the log back, is safe. */
      node_log("error", "raft: an fsync of the log failed: stopping so a restart can recover "
                        "from what is on disk");
      abort();
    }
    if (rc != 0) {
      /* Nothing of u may be sent or acknowledged before it is durable: its messages are
       * dropped (Raft resends), its writes kept and retried; what was committed is applied
       * now, since commitment never rests on this node's unwritten entries. */
      node_log("error", "raft: the log cannot be written (%s): refusing writes until it can",
               gw_wal_strerror(rc));
      if (!copy_stuck(n, &u)) {
        node_log("error", "raft: out of memory holding an unwritten update");
        abort(); /* going on could acknowledge what is not durable */
      }
      n->stuck = true;
      n->ctr.disk_full = true;
      n->next_disk_retry_ms = now + DISK_RETRY_MS;
      apply_update(n, &u);
      answer_all(n, &n->waiting, GW_NODE_DISK_FULL);
      return;
    }
    for (size_t i = 0; i < u.n_messages; i++)
      if (n->tp)
        gw_transport_send(n->tp, &u.messages[i]);
    apply_update(n, &u);
    if (u.snapshot_wanted)
      take_snapshot(n);
    raft_advance(n->raft, &u);
    check_routes(n);
    serve_ready_reads(n);
  }
}

/* ---- status for other threads ---- */

static const char *role_name(int role)
{
  switch (role) {
  case RAFT_LEADER:
    return "leader";
  case RAFT_CANDIDATE:
  case RAFT_PRE_CANDIDATE:
    return "candidate";
  default:
    return "follower";
  }
}

static void publish_status(struct gw_node *n)
{
  struct raft_status rs;
  raft_status(n->raft, &rs);
  const struct raft_membership *mb = raft_membership(n->raft);
  pthread_mutex_lock(&n->smu);
  struct gw_node_status *st = &n->st;
  *st = n->ctr;
  n->ctr_dirty = false;
  snprintf(st->name, sizeof(st->name), "%s", n->cfg.name);
  st->leader_id = rs.leader;
  st->leader[0] = '\0';
  st->role = role_name(rs.role);
  st->term = rs.term;
  st->commit_index = rs.commit;
  st->applied_index = n->applied;
  st->member_count = 0;
  for (uint32_t i = 0; mb && i < mb->n && i < GW_NODE_MAX_PEERS; i++) {
    struct gw_node_member *m = &st->members[st->member_count++];
    memset(m, 0, sizeof(*m));
    m->id = mb->members[i].id;
    for (size_t j = 0; j < n->cfg.peer_count; j++) {
      const struct gw_node_peer *p = &n->cfg.peers[j];
      if (p->id != m->id)
        continue;
      snprintf(m->name, sizeof(m->name), "%s", p->name);
      snprintf(m->api, sizeof(m->api), "%s", p->api);
      char host[INET6_ADDRSTRLEN] = "";
      uint16_t port = 0;
      if (p->raft.ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)&p->raft;
        inet_ntop(AF_INET, &a->sin_addr, host, sizeof(host));
        port = ntohs(a->sin_port);
      } else if (p->raft.ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)&p->raft;
        inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof(host));
        port = ntohs(a->sin6_port);
      }
      if (host[0])
        snprintf(m->raft, sizeof(m->raft), "%s:%u", host, port);
    }
    if (m->id == rs.leader)
      snprintf(st->leader, sizeof(st->leader), "%s", m->name);
    m->role = mb->members[i].role == RAFT_LEARNER ? "learner"
              : m->id == rs.leader               ? "leader"
                                                 : "follower";
    if (m->id == n->self && rs.role != RAFT_LEADER && rs.role != RAFT_FOLLOWER)
      m->role = "candidate";
    struct raft_progress_info pi;
    m->match_index = (m->id == n->self) ? rs.last_index
                     : raft_progress(n->raft, i, &pi) ? pi.match
                                                      : 0;
  }
  pthread_mutex_unlock(&n->smu);
}

void gw_node_status(struct gw_node *n, struct gw_node_status *out)
{
  pthread_mutex_lock(&n->smu);
  *out = n->st;
  pthread_mutex_unlock(&n->smu);
}

/* ---- the thread ---- */

static void on_message(const struct raft_message *m, void *ctx)
{
  struct gw_node *n = ctx;
  raft_step(n->raft, m);
}

static void *node_main(void *arg)
{
  struct gw_node *n = arg;
  struct epoll_event evs[8];
  n->next_tick_ms = mono_ms() + n->tick_ms;
  while (!atomic_load(&n->stop)) {
    uint64_t now = mono_ms();
    int timeout = n->next_tick_ms > now ? (int)(n->next_tick_ms - now) : 0;
    if (n->tp) {
      int t = gw_transport_next_timeout_ms(n->tp, now);
      if (t >= 0 && t < timeout)
        timeout = t;
    }
    if (n->leader_ready && timeout > DUTY_INTERVAL_MS)
      timeout = DUTY_INTERVAL_MS;
    if (n->stuck && timeout > DISK_RETRY_MS)
      timeout = DISK_RETRY_MS;
    int k = epoll_wait(n->epfd, evs, 8, timeout);
    for (int i = 0; i < k; i++)
      if (evs[i].data.u32 == 1) {
        uint64_t v;
        if (read(n->evfd, &v, sizeof(v)) < 0) {
          /* the counter resets either way */
        }
      }
    now = mono_ms();
    if (n->tp)
      gw_transport_run(n->tp, now);
    while (now >= n->next_tick_ms) {
      raft_tick(n->raft);
      n->next_tick_ms += n->tick_ms;
    }
    take_submissions(n, now);
    drain_updates(n, now);
    watch_leadership(n, now);
    retry_waiting(n, now);
    run_member_ops(n, now);
    leader_duties(n, now);
    drain_updates(n, now);
    watch_leadership(n, now);
    if (n->tp)
      gw_transport_run(n->tp, mono_ms()); /* send what the updates queued */
    reconcile_transport(n);
    check_routes(n);
    publish_status(n);
  }
  /* Answer everything still waiting. */
  take_submissions(n, mono_ms()); /* they are dispatched... */
  answer_all(n, &n->waiting, GW_NODE_STOPPING);
  answer_all(n, &n->proposed, GW_NODE_STOPPING);
  answer_all(n, &n->reads, GW_NODE_STOPPING);
  answer_all(n, &n->lock_waits, GW_NODE_STOPPING);
  answer_all(n, &n->member_ops, GW_NODE_STOPPING);
  return NULL;
}

int gw_node_submit(struct gw_node *n, struct gw_node_req *req)
{
  req->next_ = NULL;
  req->state_ = RS_QUEUED;
  req->deadline_ms_ = 0;
  if (!req->first_ms_)
    req->first_ms_ = mono_ms();
  req->body = NULL;
  req->body_len = 0;
  pthread_mutex_lock(&n->qmu);
  if (n->q_len >= GW_NODE_QUEUE_MAX || atomic_load(&n->stop)) {
    pthread_mutex_unlock(&n->qmu);
    return -1;
  }
  if (n->q_tail)
    n->q_tail->next_ = req;
  else
    n->q_head = req;
  n->q_tail = req;
  n->q_len++;
  pthread_mutex_unlock(&n->qmu);
  uint64_t one = 1;
  if (write(n->evfd, &one, sizeof(one)) < 0) {
    /* the node wakes at its next tick anyway */
  }
  return 0;
}

static void wal_log(void *ctx, const char *line)
{
  (void)ctx;
  node_log("warn", "raft log: %s", line);
}

static void node_free(struct gw_node *n)
{
  if (n->tp)
    gw_transport_free(n->tp);
  if (n->raft)
    raft_free(n->raft);
  if (n->wal)
    gw_wal_close(n->wal);
  if (n->fsm)
    gw_fsm_free(n->fsm);
  gw_fsm_result_free(&n->res);
  free(n->scratch);
  free_stuck(n);
  if (n->epfd >= 0)
    close(n->epfd);
  if (n->evfd >= 0)
    close(n->evfd);
  pthread_mutex_destroy(&n->qmu);
  pthread_mutex_destroy(&n->smu);
  free(n);
}

int gw_node_start(const struct gw_node_config *cfg, struct gw_node **out, char *errbuf,
                  size_t errlen)
{
  struct gw_node *n = calloc(1, sizeof(*n));
  if (!n) {
    snprintf(errbuf, errlen, "out of memory");
    return -1;
  }
  n->cfg = *cfg;
  n->self = gw_node_id_from_name(cfg->name);
  n->epfd = n->evfd = -1;
  pthread_mutex_init(&n->qmu, NULL);
  pthread_mutex_init(&n->smu, NULL);
  gw_fsm_result_init(&n->res);
  n->tick_ms = cfg->heartbeat_ms ? cfg->heartbeat_ms : 100;

  struct gw_fsm_config fc;
  gw_fsm_config_default(&fc);
  if (getrandom(&fc.hash_k0, sizeof(fc.hash_k0), 0) < 0 ||
      getrandom(&fc.hash_k1, sizeof(fc.hash_k1), 0) < 0) {
    fc.hash_k0 = (uint64_t)mono_ms();
  }
  if (gw_fsm_new(&fc, &n->fsm) != 0) {
    snprintf(errbuf, errlen, "cannot create the state machine");
    node_free(n);
    return -1;
  }

  struct gw_wal_options wo;
  gw_wal_options_default(&wo);
  wo.sync = cfg->sync;
  wo.log = wal_log;
  struct gw_wal_recovered rec;
  memset(&rec, 0, sizeof(rec));
  char werr[512] = "";
  int rc = gw_wal_open(cfg->data_dir, &wo, &n->wal, &rec, werr, sizeof(werr));
  if (rc != 0) {
    snprintf(errbuf, errlen, "cannot open the raft log in %s: %s", cfg->data_dir,
             werr[0] ? werr : gw_wal_strerror(rc));
    node_free(n);
    return -1;
  }
  if (rec.has_snapshot && restore_snapshot(n, rec.snapshot.data, rec.snapshot.len) != 0) {
    snprintf(errbuf, errlen, "the snapshot in %s does not restore", cfg->data_dir);
    gw_wal_recovered_free(&rec);
    node_free(n);
    return -1;
  }

  struct raft_config rc_cfg;
  raft_config_default(&rc_cfg, n->self);
  unsigned et = (unsigned)(cfg->election_timeout_ms / n->tick_ms);
  rc_cfg.heartbeat_ticks = 1;
  rc_cfg.election_timeout_ticks = et < 3 ? 3 : et;
  rc_cfg.snapshot_threshold = cfg->snapshot_every;
  rc_cfg.snapshot_trailing = cfg->snapshot_every / 10 + 16;
  n->snapshot_trailing = rc_cfg.snapshot_trailing;
  rc_cfg.pre_vote = true;
  rc_cfg.check_quorum = cfg->peer_count > 1;
  if (getrandom(&rc_cfg.random_seed, sizeof(rc_cfg.random_seed), 0) < 0)
    rc_cfg.random_seed = n->self ^ mono_ms();
  struct raft_membership boot;
  memset(&boot, 0, sizeof(boot));
  for (size_t i = 0; i < cfg->peer_count && i < RAFT_MAX_MEMBERS; i++) {
    boot.members[boot.n].id = cfg->peers[i].id;
    boot.members[boot.n].role = RAFT_VOTER;
    boot.n++;
  }
  if (boot.n == 0 && !cfg->join) {
    boot.members[0].id = n->self;
    boot.members[0].role = RAFT_VOTER;
    boot.n = 1;
  }
  if (cfg->join)
    boot.n = 0; /* the cluster adds this node; its log brings the membership */
  struct raft_restore restore;
  gw_wal_recovered_restore(&rec, &restore);
  restore.bootstrap = &boot;
  rc = raft_new(&rc_cfg, &restore, &n->raft);
  if (rc == 0) {
    /* Re-apply what is committed and durable past the snapshot, so reads after a restart see
     * the state the log holds (the core hands these out again only when commit is re-learnt). */
    uint64_t commit = rec.hard_state.commit;
    for (size_t i = 0; i < rec.n_entries; i++) {
      const struct raft_entry *e = &rec.entries[i];
      if (e->index <= gw_fsm_applied_index(n->fsm) || e->index > commit)
        continue;
      if (e->type == RAFT_ENTRY_NORMAL)
        gw_fsm_apply(n->fsm, e->index, e->data, e->len, &n->res);
    }
  }
  gw_wal_recovered_free(&rec);
  if (rc != 0) {
    snprintf(errbuf, errlen, "cannot start the raft core: %s", raft_strerror(rc));
    node_free(n);
    return -1;
  }

  n->epfd = epoll_create1(EPOLL_CLOEXEC);
  n->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (n->epfd < 0 || n->evfd < 0) {
    snprintf(errbuf, errlen, "epoll: %s", strerror(errno));
    node_free(n);
    return -1;
  }
  struct epoll_event ev = {.events = EPOLLIN, .data.u32 = 1};
  epoll_ctl(n->epfd, EPOLL_CTL_ADD, n->evfd, &ev);
  if (cfg->raft_listen_len) {
    struct gw_transport_options to;
    gw_transport_options_default(&to);
    to.cluster_id = cfg->cluster_id;
    rc = gw_transport_new(n->self, &cfg->raft_listen, cfg->raft_listen_len, &to, on_message, n,
                          &n->tp);
    if (rc != 0) {
      snprintf(errbuf, errlen, "cannot listen for peers: %s (%s)", gw_transport_strerror(rc),
               strerror(errno));
      node_free(n);
      return -1;
    }
    for (size_t i = 0; i < cfg->peer_count; i++)
      if (cfg->peers[i].id != n->self)
        gw_transport_set_peer(n->tp, cfg->peers[i].id, &cfg->peers[i].raft,
                              cfg->peers[i].raft_len);
    struct epoll_event tev = {.events = EPOLLIN, .data.u32 = 2};
    epoll_ctl(n->epfd, EPOLL_CTL_ADD, gw_transport_fd(n->tp), &tev);
  }
  n->applied = gw_fsm_applied_index(n->fsm);
  check_routes(n);
  if (boot.n == 1 && boot.members[0].id == n->self)
    raft_campaign(n->raft); /* a group of one need not wait out an election timeout */
  publish_status(n);
  if (pthread_create(&n->thread, NULL, node_main, n) != 0) {
    snprintf(errbuf, errlen, "cannot start the node thread");
    node_free(n);
    return -1;
  }
  *out = n;
  return 0;
}

void gw_node_stop(struct gw_node *n)
{
  if (!n)
    return;
  pthread_mutex_lock(&n->qmu);
  atomic_store(&n->stop, true);
  pthread_mutex_unlock(&n->qmu);
  uint64_t one = 1;
  if (write(n->evfd, &one, sizeof(one)) < 0) {
    /* the loop wakes within one tick */
  }
  pthread_join(n->thread, NULL);
  node_free(n);
}
