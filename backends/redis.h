/*
 * The Redis store: limiter state and idempotency records in one Redis server shared by every
 * gateway node, so a `scope: cluster` limit is one budget for the cluster and a stored response
 * replays on any node. Each decision is one atomic Lua script run inside Redis (EVALSHA, with
 * EVAL when the server has lost the script), timed by Redis's own clock so all nodes share it.
 *
 * An instance owns one I/O thread and one pipelined connection. Workers never block on Redis:
 * the _async operations of gw_store_redis queue a request and return; the I/O thread completes
 * it (op->done) when the reply arrives, when timeout_ms has passed since it was queued, or at
 * once with an error while the connection is down (it reconnects with backoff). A late reply to
 * a timed-out operation is ignored.
 *
 * Failure behaviour is the caller's choice per route (on_store_error); the gateway's defaults
 * are: limiters fail open (admit), idempotency fails closed (503). op->err is one of the
 * GW_STORE_REDIS_E* codes below, or a GW_POLICY_E* code for a policy outcome (stale claim,
 * response too large).
 *
 * Key layout (route names cannot hold braces, so `{route}` is unambiguous and is also a Redis
 * Cluster hash tag):
 *   gw:{route}:tb:<key>     token bucket: hash n = micro-tokens, t = Redis time in microseconds
 *   gw:{route}:sw:<key>     sliding window: sorted set of admission times (microseconds)
 *   gw:{route}:idem:<key>   idempotency record (see redis.c for the encoding)
 * A limiter key longer than 64 bytes is replaced by `#` and 32 hex digits of its SipHash, e.g.
 * gw:{route}:tb#0f3a...; the route's single shared key (length 0) is gw:{route}:tb: .
 */
#ifndef GW_STORE_REDIS_H
#define GW_STORE_REDIS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "store.h"

/* Errors (negative, outside the policy and gateway ranges). */
#define GW_STORE_REDIS_EDOWN (-2101)     /* not connected to Redis: failed at once */
#define GW_STORE_REDIS_ETIMEDOUT (-2102) /* no reply within timeout_ms */
#define GW_STORE_REDIS_EBUSY (-2103)     /* too many operations outstanding */
#define GW_STORE_REDIS_EREPLY (-2104)    /* Redis answered with an error or an unexpected reply */
#define GW_STORE_REDIS_EURL (-2105)      /* the URL cannot be parsed */
#define GW_STORE_REDIS_ESYS (-2106)      /* a thread, epoll or eventfd could not be created */

/* At most this many operations queued or awaiting a reply per instance. */
#define GW_STORE_REDIS_MAX_OUTSTANDING 65536

/*
 * Starts an instance for url, `redis://[[user:]password@]host[:port][/db]` (port 6379, db 0 by
 * default), with timeout_ms (1..3600000) for every operation; a connection attempt may take
 * max(timeout_ms, 500 ms). Waits up to timeout_ms for the first connection, but succeeds even if
 * Redis is down then (the instance keeps reconnecting; gw_store_redis_connected tells). *impl
 * owns the instance.
 * Errors: GW_STORE_REDIS_EURL, GW_STORE_REDIS_ESYS, GW_POLICY_ENOMEM, GW_POLICY_EINVALID_CONFIG;
 * errbuf (may be NULL) gets one sentence.
 */
int gw_store_redis_open(const char *url, uint64_t timeout_ms, void **impl, char *errbuf,
                        size_t errlen);

/*
 * Stops the I/O thread and frees the instance. Destroy every limiter and idempotency store made
 * on it first. Operations still outstanding complete with GW_STORE_REDIS_EDOWN before it returns.
 */
void gw_store_redis_close(void *impl);

/* Whether the connection is up now (operations are being sent). */
bool gw_store_redis_connected(void *impl);

/* The last connection error as one sentence ("" if none yet). */
void gw_store_redis_last_error(void *impl, char *buf, size_t len);

struct gw_store_redis_stats {
  bool connected;
  uint64_t ops;        /* operations queued */
  uint64_t failed;     /* completed with an error (including the two below) */
  uint64_t timeouts;   /* completed with GW_STORE_REDIS_ETIMEDOUT */
  uint64_t refused;    /* refused at once (down, busy) */
  uint64_t connects;   /* connections established */
  uint64_t releases;   /* claims released after a failed begin or finish (see redis.c) */
  uint32_t outstanding;
};
void gw_store_redis_stats(void *impl, struct gw_store_redis_stats *out);

/* One sentence for a GW_STORE_REDIS_E* code (NULL for any other code). */
const char *gw_store_redis_strerror(int err);

/*
 * What limiter_create takes as impl: the instance and the route whose keys the limiter uses
 * (copied). idem_create takes either this or the bare instance (the route comes with each call).
 */
struct gw_store_redis_scope {
  uint32_t magic; /* set by gw_store_redis_scope() */
  void *redis;
  const char *route;
};
struct gw_store_redis_scope gw_store_redis_scope(void *impl, const char *route);

/*
 * The ops table. Limiters and idempotency stores set only the _async forms of admit, begin and
 * finish; limiter_peek is synchronous and waits for Redis (at most timeout_ms: for the admin
 * API, never a worker). limiter_stats counts this node's decisions (keys: 0, Redis holds them);
 * idem_stats counts this node's claims in flight and replays.
 */
extern const struct gw_store_ops gw_store_redis;

#endif
