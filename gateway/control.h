/*
 * The control plane listener (api_listen): /healthz and /readyz today; the /v1 coordination API,
 * /admin and /metrics hang off the same dispatcher. It runs its own libmicrohttpd thread so a
 * busy data plane never delays a health check.
 */
#ifndef GW_CONTROL_H
#define GW_CONTROL_H

#include "config.h"
#include "engine.h"

struct gw_control;

/* Listen on addr and serve. Returns 0, or -1 after logging why. */
int gw_control_start(struct gw_control **out, const struct gw_addr *addr, struct gw_engine *eng);

/* Stop serving and free. */
void gw_control_stop(struct gw_control *c);

#endif
