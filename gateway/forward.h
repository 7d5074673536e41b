/*
 * Forwarding control-plane requests to the Raft leader (API.md section 4: any node accepts any
 * request; followers forward to the leader). One thread runs a libcurl multi handle; jobs arrive
 * through a mutex-guarded list and curl_multi_wakeup, and each job's done callback runs on that
 * thread when the leader has answered (or could not be reached). No HTTP thread waits on it.
 */
#ifndef GW_FORWARD_H
#define GW_FORWARD_H

#include <stddef.h>

#include "buf.h"

struct gw_forward_job {
  /* inputs, owned by the caller until done */
  char url[1024]; /* "http://leader-api/v1/..." */
  const char *method;
  const char *body; /* may be NULL */
  size_t body_len;
  const char *idem_key; /* Idempotency-Key to pass on, or NULL */
  const char *authorization; /* Authorization to pass on (admin calls), or NULL */
  const char *content_type;
  const char *forwarded_by; /* this node's name, sent as Gateway-Forwarded-By */
  long timeout_ms;
  void (*done)(struct gw_forward_job *job);
  void *ctx;

  /* outputs, valid in done */
  int failed;     /* the leader could not be reached or did not answer in time */
  int not_sent;   /* failed before the request could reach the leader (connect failure) */
  int status;
  struct gw_buf resp_body; /* owned by the job: gw_buf_free after done */
  char raft_index[32];
  char retry_after[32];

  /* private */
  struct gw_forward_job *next_;
  void *easy_;
  void *headers_;
};

struct gw_forwarder;

int gw_forwarder_start(struct gw_forwarder **out);
/* Queue a job (thread-safe). 0, or -1 when stopping or out of memory (done not called). */
int gw_forwarder_submit(struct gw_forwarder *f, struct gw_forward_job *job);
/* Fails what is left (done called with failed set) and stops the thread. */
void gw_forwarder_stop(struct gw_forwarder *f);

#endif
