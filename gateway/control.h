/*
 * The control plane listener (api_listen): /healthz, /readyz and the /v1 coordination API
 * (API.md section 4); /admin and /metrics hang off the same dispatcher. It runs its own
 * libmicrohttpd thread so a busy data plane never delays a health check, and it never blocks on
 * Raft: /v1 requests are suspended until the node thread (or the leader) answers.
 */
#ifndef GW_CONTROL_H
#define GW_CONTROL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "engine.h"

struct gw_control;

struct gw_node;

/*
 * Listen on addr and serve. node (may be NULL) answers /v1; node_name is this member's name,
 * sent along when a request is forwarded to the leader. With replicated_routes the admin API's
 * route changes are proposed to the node (backend raft); else they apply to this node only.
 * Returns 0, or -1 after logging why.
 */
int gw_control_start(struct gw_control **out, const struct gw_addr *addr, struct gw_engine *eng,
                     struct gw_node *node, const char *node_name, bool replicated_routes);

/*
 * The raft backend's forward hook (backends/raft.h): send an encoded shared-store command to
 * the leader's /internal/v1/fsm; done gets its status (0 when it could not be reached) and body.
 */
int gw_control_forward_fsm(void *ctx, const char *leader_api, const uint8_t *cmd, size_t len,
                           void (*done)(void *arg, int status, const char *body, size_t len),
                           void *arg);

/* Stop forwarding to the leader (pending forwards are answered); the listener keeps serving. */
void gw_control_stop_forwarding(struct gw_control *c);

/* Stop serving and free. The node must be stopped first (it may resume connections). */
void gw_control_stop(struct gw_control *c);

#endif
