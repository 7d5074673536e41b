/*
 * What control.c shares with the admin API (admin.c): the listener's state and one request's
 * context. Private to gateway/.
 */
#ifndef GW_CONTROL_INT_H
#define GW_CONTROL_INT_H

#include <microhttpd.h>
#include <pthread.h>
#include <stdbool.h>

#include "buf.h"
#include "engine.h"
#include "forward.h"
#include "node.h"


struct gw_control {
  struct MHD_Daemon *mhd;
  struct gw_engine *eng;
  struct gw_node *node;
  struct gw_forwarder *fwd;
  char node_name[64];
  bool replicated_routes; /* backend raft: route changes go through the node */
  pthread_mutex_t admin_mu; /* serialises local route changes */
  char internal_auth[300];  /* "Bearer <admin token>" for calls to other nodes, or "" */
  uint64_t seed_routes;     /* routes of the file the cluster's table starts from */
};

enum cstate { C_BODY = 0, C_WAIT, C_DONE };

/* One control-plane request. Owned by its connection (freed when the request completes). */
struct creq {
  struct gw_control *c;
  struct MHD_Connection *conn;
  char *uri; /* owned: the raw request target */
  const char *method;
  struct gw_buf body;
  bool too_large;
  enum cstate state;
  bool forwarded_in; /* came from another node: never forwarded again */

  int status;
  struct gw_buf out;
  const char *content_type; /* NULL: application/json */
  const char *www_authenticate; /* for a 401 */
  char allow[64];               /* for a 405 */
  char raft_index[32];
  char retry_after[32];

  struct gw_node_req nr;
  char name[256];
  char owner[256];
  char idem[256];
  struct gw_forward_job fj;
};


/* Answer helpers. */
void gw_control_set_error(struct creq *q, int status, const char *code, const char *message,
                          const char *field);
void gw_control_set_gw_error(struct creq *q, int err);
/* Hand q to the node (its nr prepared); false when the queue is full (q then answered 503). */
bool gw_control_submit(struct creq *q);

/* The admin paths and /metrics: true when q's answer is ready, false when q waits on the node. */
bool gw_admin_handle(struct creq *q, const char *path);

#endif
