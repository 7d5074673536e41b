/* /metrics: the Prometheus text exposition of the gateway's counters (see metrics.c). */
#ifndef GW_METRICS_H
#define GW_METRICS_H

#include "buf.h"
#include "engine.h"
#include "node.h"

/* Append the whole exposition to b. node may be NULL. */
void gw_metrics_render(struct gw_buf *b, struct gw_engine *eng, struct gw_node *node);

#endif
