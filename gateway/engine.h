/*
 * The data plane engine: share-nothing worker threads, each running one event loop (epoll) that
 * owns a libmicrohttpd daemon in external-epoll mode on its own SO_REUSEPORT listen socket and a
 * libcurl multi handle driven by curl_multi_socket_action on the same epoll. A request lives in
 * one worker from its first byte to its last: the client connection is suspended while the
 * upstream transfer runs and resumed when it completes. No worker ever blocks on an upstream,
 * a socket or a timer.
 *
 * The current configuration is swapped atomically (SIGHUP, admin API); each request keeps a
 * reference to the configuration it started with.
 */
#ifndef GW_ENGINE_H
#define GW_ENGINE_H

#include <stdbool.h>
#include <stdint.h>

#include "config.h"

struct gw_engine;

/*
 * Bind the listen sockets and start the workers. cfg is referenced (the caller keeps its own
 * reference). Returns 0, or -1 after logging why (e.g. the address is in use).
 */
int gw_engine_start(struct gw_engine **out, struct gw_config *cfg);

/* Make cfg current for new requests. Listen addresses and worker count need a restart. */
void gw_engine_set_config(struct gw_engine *e, struct gw_config *cfg);

/* The current config with a new reference (release with gw_config_unref). */
struct gw_config *gw_engine_config(struct gw_engine *e);

/*
 * Stop accepting connections, let in-flight requests finish for at most grace_ms, then answer
 * what is left with 503 shutting_down, close every connection and join the workers.
 */
void gw_engine_drain(struct gw_engine *e, uint64_t grace_ms);

/* Free everything; the engine must have been drained. */
void gw_engine_free(struct gw_engine *e);

struct gw_engine_stats {
  int connections;
  uint64_t refused;
  uint64_t unrouted[6]; /* answers given before a route was known, by status class */
  unsigned workers;
};
void gw_engine_stats(struct gw_engine *e, struct gw_engine_stats *out);

/* True while not draining. */
bool gw_engine_accepting(const struct gw_engine *e);

#endif
