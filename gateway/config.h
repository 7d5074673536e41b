/*
 * The gateway's configuration: the JSON file of API.md section 2, parsed and validated strictly.
 * Every problem is reported with the path of the offending value
 * ("config error at routes[1].policies.retry.max_attempts: must be an integer from 1 to 10"),
 * every problem in the file is reported (not only the first), and a config that loads is
 * immutable: reloads build a new one and swap it in. A loaded config is reference counted so
 * requests in flight keep the routes they started with.
 */
#ifndef GW_CONFIG_H
#define GW_CONFIG_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "circuit_breaker.h"
#include "degradation.h"
#include "policy.h"
#include "retry.h"
#include "sliding_window.h"
#include "token_bucket.h"

#define GW_CONFIG_MAX_ERRORS 64
#define GW_CONFIG_MAX_ROUTES 4096
#define GW_CONFIG_MAX_TARGETS 64
#define GW_CONFIG_MAX_PEERS 15
#define GW_CONFIG_MAX_FILE_BYTES (16u << 20)

/* A listen or peer address, "host:port" or "[v6]:port". */
struct gw_addr {
  char text[128]; /* as written */
  struct sockaddr_storage ss;
  socklen_t len;
};

enum gw_balance { GW_BALANCE_ROUND_ROBIN, GW_BALANCE_LEAST_OUTSTANDING };
enum gw_key_kind { GW_KEY_ROUTE, GW_KEY_CLIENT_IP, GW_KEY_HEADER };
enum gw_scope { GW_SCOPE_LOCAL, GW_SCOPE_CLUSTER };
enum gw_backend_type { GW_BACKEND_MEMORY, GW_BACKEND_RAFT, GW_BACKEND_REDIS };
struct gw_limit_key {
  enum gw_key_kind kind;
  char header[128]; /* for GW_KEY_HEADER */
};

/* The policies of a route, as the policies/ modules take them, with what the gateway adds. */
struct gw_token_bucket_conf {
  bool enabled;
  struct gw_token_bucket_config c;
  struct gw_limit_key key;
  enum gw_scope scope;
  uint32_t max_keys;
  bool deny_on_store_error; /* on_store_error: "deny" (default "allow": fail open) */
};

struct gw_sliding_window_conf {
  bool enabled;
  struct gw_sliding_window_config c;
  struct gw_limit_key key;
  enum gw_scope scope;
  uint32_t max_keys;
  bool deny_on_store_error;
};

struct gw_breaker_conf {
  bool enabled;
  struct gw_breaker_config c;
};

struct gw_retry_conf {
  bool enabled;
  struct gw_retry_config c;
};

struct gw_header_pair {
  char *name;
  char *value;
};

struct gw_degradation_conf {
  bool enabled;
  struct gw_degrade_config c; /* on (GW_DEGRADE_ON bits), limits, slow and stale settings */
  int fallback_status;
  struct gw_header_pair *fallback_headers; /* owned */
  size_t fallback_header_count;
  char *fallback_body; /* owned; a JSON value serialised, or a string as is */
  size_t fallback_body_len;
};

struct gw_idempotency_conf {
  bool enabled;
  char header[128];
  char **methods; /* owned */
  size_t method_count;
  uint64_t ttl_ms;
  bool required;
  bool allow_on_store_error; /* on_store_error: "allow" (default "deny": 503, fail closed) */
};

struct gw_target {
  char *base;    /* owned: "http://host:port" */
  char *path;    /* owned: a path prefix to prepend, "" for none */
  size_t path_len;
};

struct gw_route {
  char *name;        /* owned */
  char *path_prefix; /* owned */
  size_t prefix_len;
  char **methods; /* owned; NULL when any method matches */
  size_t method_count;
  char *host; /* owned; NULL when any host matches */
  struct gw_target targets[GW_CONFIG_MAX_TARGETS];
  size_t target_count;
  bool strip_prefix;
  enum gw_balance balance;
  uint64_t timeout_ms;
  uint64_t connect_timeout_ms;
  struct gw_token_bucket_conf token_bucket;
  struct gw_sliding_window_conf sliding_window;
  struct gw_breaker_conf breaker;
  struct gw_retry_conf retry;
  struct gw_degradation_conf degradation;
  struct gw_idempotency_conf idempotency;
  char *json;          /* owned: the route object as written, for the admin API */
  char *policies_json; /* owned: its "policies" object as written ("" when none) */
  struct gw_route_rt *rt; /* the live policy state (pipeline.h); set when the config is attached */

  /* Balancing state, shared by the workers while this config is current. */
  atomic_uint_fast64_t rr_next;
  atomic_int *outstanding; /* owned; one counter per target */
};

struct gw_peer {
  char id[64];
  struct gw_addr raft;
  struct gw_addr api;
};

struct gw_config {
  atomic_int refs;
  char node_id[64];
  struct gw_addr listen;
  struct gw_addr api_listen;
  char data_dir[1024];
  uint64_t shutdown_grace_ms;
  uint64_t max_body_bytes;     /* request bodies */
  uint64_t max_response_bytes; /* upstream responses, buffered whole */
  uint64_t connection_memory_bytes; /* per connection: request head and response head */
  uint32_t max_connections;
  uint32_t workers;            /* 0: one per core */
  uint64_t idle_timeout_ms;    /* keep-alive idle connections are closed after this */
  char admin_token[256];

  enum gw_backend_type backend;
  char redis_url[512];
  uint64_t redis_timeout_ms;

  bool has_cluster;
  struct gw_addr raft_listen;
  struct gw_peer peers[GW_CONFIG_MAX_PEERS];
  size_t peer_count;
  uint64_t election_timeout_ms;
  uint64_t heartbeat_ms;
  uint64_t snapshot_every;
  bool join; /* cluster.join: a new member waiting to be added through the admin API */

  struct gw_route *routes; /* owned; in the file's order */
  size_t route_count;
  struct gw_route **match_order; /* owned; routes in matching precedence (router.h) */
  char *doc;                      /* owned: the whole document as loaded, compact JSON */
  uint64_t routes_version;        /* bumped by every route change through the admin API */
};

/* The problems found while loading, one line each ("config error at PATH: WHAT"). */
struct gw_config_errors {
  char lines[GW_CONFIG_MAX_ERRORS][1024];
  size_t count;
  size_t dropped; /* problems beyond GW_CONFIG_MAX_ERRORS */
};

/*
 * Parse and validate a config from text (len bytes, need not be NUL-terminated). On success
 * returns a config with one reference; on failure returns NULL and fills errs (never both).
 */
struct gw_config *gw_config_parse(const char *text, size_t len, struct gw_config_errors *errs);

/* Read FILE and parse it; an unreadable file is reported in errs as well. */
struct gw_config *gw_config_load(const char *path, struct gw_config_errors *errs);

/*
 * A new config: base with route `name` replaced or added (route_json, len bytes: the route
 * object, whose "name" may be omitted) or removed (route_json NULL), validated exactly like a
 * file. Errors about that route name paths inside it ("config error at route.upstream...").
 */
struct gw_config *gw_config_with_route(const struct gw_config *base, const char *name,
                                       const char *route_json, size_t len,
                                       struct gw_config_errors *errs);

/* A new config: base with its routes replaced by routes_json (a JSON array of route objects). */
struct gw_config *gw_config_with_routes(const struct gw_config *base, const char *routes_json,
                                        struct gw_config_errors *errs);

/* Take and drop a reference; the last unref frees the config. */
struct gw_config *gw_config_ref(struct gw_config *c);
void gw_config_unref(struct gw_config *c);

#endif
