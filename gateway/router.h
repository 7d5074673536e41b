/*
 * Route matching (API.md section 2): the longest path_prefix wins, then a route that names the
 * request's method, then one that names its host; among equals the first in the file. A prefix
 * matches at a path-segment boundary: "/api/orders" matches "/api/orders", "/api/orders/7" and
 * "/api/orders?x", not "/api/ordersX" (a prefix ending in "/" matches anything below it).
 */
#ifndef GW_ROUTER_H
#define GW_ROUTER_H

#include <stddef.h>

#include "config.h"

/* Order cfg->routes into cfg->match_order. Called once by the config loader. */
void gw_router_prepare(struct gw_config *cfg);

/*
 * The route for a request, or NULL. path is the request target's path (no query), path_len its
 * length; host is the Host header (may be NULL; a port is ignored, case-insensitive).
 */
struct gw_route *gw_router_match(const struct gw_config *cfg, const char *method,
                                 const char *path, size_t path_len, const char *host);

/* True when prefix matches path at a segment boundary (see above). */
bool gw_router_prefix_matches(const char *prefix, size_t prefix_len, const char *path,
                              size_t path_len);

#endif
