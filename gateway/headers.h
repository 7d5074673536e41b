/*
 * Header rules of the proxy (API.md section 3, RFC 9110 section 7.6.1): which headers are
 * hop-by-hop and never forwarded, how X-Forwarded-For grows, and what a usable X-Request-Id is.
 * Pure functions over strings, so they are unit-tested without a server.
 */
#ifndef GW_HEADERS_H
#define GW_HEADERS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* The Connection header's tokens that name further hop-by-hop headers, at most this many. */
#define GW_CONN_TOKENS_MAX 16

struct gw_conn_tokens {
  char names[GW_CONN_TOKENS_MAX][64];
  size_t count;
};

/* Add the comma-separated tokens of one Connection header value to t (extra ones dropped). */
void gw_conn_tokens_add(struct gw_conn_tokens *t, const char *value);

/*
 * True when a header must not be forwarded: Connection, Keep-Alive, TE, Trailer,
 * Transfer-Encoding, Upgrade, Proxy-Authorization, Proxy-Authenticate, Proxy-Connection, and
 * any header named by Connection (t may be NULL). Case-insensitive.
 */
bool gw_header_is_hop_by_hop(const char *name, const struct gw_conn_tokens *t);

/*
 * Write "X-Forwarded-For" value: the incoming value (may be NULL) with client_ip appended,
 * as "a, b, client". Returns the length written, or -1 if out is too small.
 */
int gw_xff_append(char *out, size_t cap, const char *incoming, const char *client_ip);

/* An incoming X-Request-Id is kept when it is 1-200 bytes of visible ASCII. */
bool gw_request_id_is_valid(const char *id);

/* A new id: 32 lowercase hex digits from two 64-bit random words. out needs 33 bytes. */
void gw_request_id_format(char out[33], uint64_t hi, uint64_t lo);

#endif
