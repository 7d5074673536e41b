/*
 * Error codes of the gateway: one X-macro table that yields the negative code, the HTTP status
 * the data or control plane answers with, the snake_case name that travels into the JSON error
 * body ({"error":{"code":NAME,"message":MESSAGE}}) and a one-sentence default message.
 * Functions return 0 or one of these negative codes.
 */
#ifndef GW_ERR_H
#define GW_ERR_H

#define GW_ERRNO_MAP(X)                                                                      \
  X(NOMEM, 503, "overloaded", "the gateway is out of memory for this request")               \
  X(INVALID, 400, "bad_request", "the request is malformed")                                 \
  X(ROUTE_NOT_FOUND, 404, "route_not_found", "no route matches this request")                \
  X(NOT_FOUND, 404, "not_found", "no such endpoint")                                         \
  X(METHOD_NOT_ALLOWED, 405, "method_not_allowed", "this method is not allowed here")        \
  X(BODY_TOO_LARGE, 413, "body_too_large", "the request body exceeds max_body_bytes")        \
  X(UPSTREAM_UNAVAILABLE, 502, "upstream_unavailable", "the upstream could not be reached")  \
  X(UPSTREAM_RESPONSE_TOO_LARGE, 502, "upstream_response_too_large",                         \
    "the upstream response exceeds max_body_bytes")                                          \
  X(UPSTREAM_TIMEOUT, 504, "upstream_timeout", "the upstream did not answer in time")        \
  X(RATE_LIMITED, 429, "rate_limited", "too many requests: the route's rate limit is reached") \
  X(CIRCUIT_OPEN, 503, "circuit_open", "the upstream is failing: the circuit breaker is open")  \
  X(OVERLOADED, 503, "overloaded", "the route has too many requests in flight")               \
  X(IDEMPOTENCY_KEY_MISSING, 400, "idempotency_key_missing",                                  \
    "this route requires an Idempotency-Key header")                                         \
  X(IDEMPOTENCY_KEY_INVALID, 400, "idempotency_key_invalid",                                  \
    "the Idempotency-Key must be 1-255 printable ASCII bytes")                               \
  X(IDEMPOTENCY_IN_FLIGHT, 409, "idempotency_in_flight",                                      \
    "a request with this Idempotency-Key is still in flight")                                \
  X(IDEMPOTENCY_KEY_MISMATCH, 422, "idempotency_key_mismatch",                                \
    "this Idempotency-Key was used with a different method, path or body")                   \
  X(STORE_UNAVAILABLE, 503, "store_unavailable",                                            \
    "the shared state store cannot be reached: retry shortly")                               \
  X(SHUTTING_DOWN, 503, "shutting_down", "the gateway is shutting down")                     \
  X(NOT_READY, 503, "not_ready", "the gateway is not ready")                                 \
  X(INTERNAL, 500, "internal_error", "the gateway failed to handle this request")

enum gw_err {
  GW_OK = 0,
#define GW_ERR_ENUM(name, status, code, msg) GW_E##name,
  GW_E__FIRST = -1000,
  GW_ERRNO_MAP(GW_ERR_ENUM)
#undef GW_ERR_ENUM
  GW_E__LAST
};

/* The HTTP status for err (500 for an unknown code). */
int gw_err_status(int err);
/* The snake_case name for err, e.g. "route_not_found". */
const char *gw_err_name(int err);
/* A one-sentence description of err. */
const char *gw_strerror(int err);

#endif
