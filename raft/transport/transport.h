/*
 * transport.h - TCP between Raft peers: framed, checksummed, bounded, self-healing.
 *
 * The Raft node thread drives this module from its own event loop and it never blocks. The
 * transport owns one epoll fd (gw_transport_fd); the node adds it to its own epoll and calls
 * gw_transport_run(t, now_ms) whenever that fd is readable or gw_transport_next_timeout_ms says
 * a timer is due. Everything happens inside run: accepting, connecting, handshakes, reading and
 * decoding frames (each decoded message is handed to the on_message callback), writing queued
 * frames and reconnecting. gw_transport_send only queues.
 *
 * One TCP connection per pair of peers carries both directions. The peer with the lower id
 * dials, the higher one accepts; each side first sends a handshake frame naming the cluster and
 * itself, and a connection from an unknown id, from ourselves or from another cluster is closed.
 * Until a peer is connected its messages wait in its queue, which is bounded: beyond
 * max_queue_bytes a message is dropped and counted (Raft tolerates loss as it tolerates a lossy
 * network), so a dead peer costs nothing but its bounded queue. A failed connection is retried
 * with exponential backoff and jitter.
 *
 * Wire format (little-endian, like the core's codec), every frame:
 *
 *     u32 payload length | u8 frame version (GW_TRANSPORT_FRAME_VERSION) | u32 CRC32C(payload)
 *     | payload
 *
 * The first frame each way is the handshake, whose payload is
 *     u32 magic "GWRT" | u64 cluster id | u64 sender id | u64 intended receiver id;
 * every later frame's payload is one message in raft_msg_encode's form (which carries its own
 * RAFT_WIRE_VERSION). A frame longer than max_frame_bytes, with an unknown version, a CRC
 * mismatch, a payload the codec rejects, or a message whose from/to do not match the
 * handshake, closes the connection and is counted; no input can crash the process.
 *
 * Threads: a transport belongs to one thread. Time is an argument (monotonic milliseconds).
 * Errors: 0 or a negative GW_TRANSPORT_ERR_* code.
 */
#ifndef GW_RAFT_TRANSPORT_H
#define GW_RAFT_TRANSPORT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "raft.h"

#define GW_TRANSPORT_ERRORS(X)                                                              \
    X(GW_TRANSPORT_ERR_INVALID, -1, "invalid", "invalid argument")                          \
    X(GW_TRANSPORT_ERR_NOMEM, -2, "nomem", "out of memory")                                 \
    X(GW_TRANSPORT_ERR_IO, -3, "io", "socket or epoll call failed (see errno)")             \
    X(GW_TRANSPORT_ERR_UNKNOWN_PEER, -4, "unknown_peer", "no such peer")                    \
    X(GW_TRANSPORT_ERR_QUEUE_FULL, -5, "queue_full", "the peer's send queue is full")       \
    X(GW_TRANSPORT_ERR_TOO_BIG, -6, "too_big", "frame larger than max_frame_bytes")         \
    X(GW_TRANSPORT_ERR_BAD_VERSION, -7, "bad_version", "unknown frame version")             \
    X(GW_TRANSPORT_ERR_BAD_CRC, -8, "bad_crc", "frame checksum mismatch")                   \
    X(GW_TRANSPORT_ERR_MALFORMED, -9, "malformed", "frame payload could not be decoded")    \
    X(GW_TRANSPORT_ERR_LIMIT, -10, "limit", "too many peers")

enum gw_transport_error {
#define GW_TRANSPORT_ERR_ENUM(name, code, id, text) name = code,
    GW_TRANSPORT_ERRORS(GW_TRANSPORT_ERR_ENUM)
#undef GW_TRANSPORT_ERR_ENUM
};

/* Human text for an error code, and its snake_case name. */
const char *gw_transport_strerror(int err);
const char *gw_transport_errname(int err);

#define GW_TRANSPORT_FRAME_VERSION 1
#define GW_TRANSPORT_FRAME_HEADER 9 /* u32 length, u8 version, u32 crc */
#define GW_TRANSPORT_MAX_PEERS 64

struct gw_transport_options {
    uint64_t cluster_id;           /* both ends must agree; default 0 */
    size_t max_frame_bytes;        /* payload bound, both ways; default 8 MiB, 64 B .. 1 GiB */
    size_t max_queue_bytes;        /* framed bytes waiting per peer; default 64 MiB (a message
                                      framing to more than this is always dropped) */
    uint32_t backoff_min_ms;       /* first retry delay; default 50 */
    uint32_t backoff_max_ms;       /* doubling stops here; default 2000 */
    uint32_t handshake_timeout_ms; /* connect + handshake must finish within; default 5000 */
    uint64_t random_seed;          /* backoff jitter; 0: derived from the node id */
};

void gw_transport_options_default(struct gw_transport_options *o);

/* Called from gw_transport_run for every decoded message. m and everything it points to are
 * valid only during the call (entries point into the receive buffer). The callback may call
 * gw_transport_send, gw_transport_set_peer, gw_transport_remove_peer and the stats functions,
 * but never gw_transport_free or gw_transport_run. */
typedef void (*gw_transport_on_message)(const struct raft_message *m, void *ctx);

struct gw_transport;

/* Creates a transport for node self_id (non-zero) listening on addr (IPv4 or IPv6; port 0 picks
 * an ephemeral port, see gw_transport_local_addr). opts may be NULL for the defaults. On
 * failure nothing is left open and the callback is never called.
 * Errors: GW_TRANSPORT_ERR_INVALID (id 0, no callback, bad address, or options out of range:
 * max_frame_bytes outside 64 B .. 1 GiB, max_queue_bytes under 73, backoff_min_ms 0 or above
 * backoff_max_ms, handshake_timeout_ms 0), GW_TRANSPORT_ERR_NOMEM, GW_TRANSPORT_ERR_IO (bind,
 * listen or epoll failed; errno says why). */
int gw_transport_new(uint64_t self_id, const struct sockaddr_storage *addr, socklen_t addr_len,
                     const struct gw_transport_options *opts, gw_transport_on_message on_message,
                     void *ctx, struct gw_transport **out);

/* Closes every socket and frees everything, queued frames included. NULL is a no-op. */
void gw_transport_free(struct gw_transport *t);

/* The epoll fd to watch for readability (level-triggered). */
int gw_transport_fd(const struct gw_transport *t);

/* The address actually bound (useful after port 0). */
int gw_transport_local_addr(const struct gw_transport *t, struct sockaddr_storage *addr,
                            socklen_t *addr_len);

/* Adds a peer or changes its address (membership changes). A changed address closes the
 * current connection. If id > self_id we dial it at the next run; otherwise we wait for it to
 * dial us. Errors: GW_TRANSPORT_ERR_INVALID (id 0, our own id, bad address),
 * GW_TRANSPORT_ERR_LIMIT (GW_TRANSPORT_MAX_PEERS), GW_TRANSPORT_ERR_NOMEM. */
int gw_transport_set_peer(struct gw_transport *t, uint64_t id, const struct sockaddr_storage *addr,
                          socklen_t addr_len);

/* Forgets a peer: closes its connection and discards its queue.
 * Errors: GW_TRANSPORT_ERR_UNKNOWN_PEER. */
int gw_transport_remove_peer(struct gw_transport *t, uint64_t id);

/* Encodes m and queues it for peer m->to; it leaves in a later gw_transport_run, in the order
 * of the calls. Never blocks. A message that cannot be queued is dropped and counted, and the
 * reason returned: GW_TRANSPORT_ERR_UNKNOWN_PEER, GW_TRANSPORT_ERR_QUEUE_FULL,
 * GW_TRANSPORT_ERR_TOO_BIG (encoded size over max_frame_bytes), GW_TRANSPORT_ERR_INVALID
 * (m->from is not this node, or the codec refused it), GW_TRANSPORT_ERR_NOMEM. Raft treats all
 * of these as a lost message. */
int gw_transport_send(struct gw_transport *t, const struct raft_message *m);

/* Does all pending work without blocking: accepts, connects, handshakes, reads (calling
 * on_message), writes, retries and timeouts. now_ms is a monotonic clock in milliseconds.
 * Errors: GW_TRANSPORT_ERR_IO if epoll_wait itself fails, GW_TRANSPORT_ERR_INVALID if called
 * from inside the callback. */
int gw_transport_run(struct gw_transport *t, uint64_t now_ms);

/* Milliseconds until run has timed work to do (0: now, for example queued frames waiting for a
 * connected peer), or -1 when nothing is scheduled: the epoll_wait timeout for the node loop. */
int gw_transport_next_timeout_ms(const struct gw_transport *t, uint64_t now_ms);

struct gw_transport_peer_stats {
    uint64_t id;
    bool connected;         /* handshake done */
    size_t queued_bytes;    /* framed bytes not yet written to the socket */
    uint64_t queued_frames;
    uint64_t sent_frames;   /* written completely to the socket */
    uint64_t sent_bytes;
    uint64_t recv_frames;   /* decoded and delivered */
    uint64_t recv_bytes;
    uint64_t drops;         /* all messages lost here: queue full, too big, cut by a failure */
    uint64_t drops_queue_full;
    uint64_t drops_too_big;
    uint64_t connects;      /* handshakes completed */
    uint64_t reconnects;    /* handshakes completed after the first */
    uint64_t failures;      /* connection attempts or connections that failed */
    uint64_t rejected_frames; /* bad frames from this peer (each closed the connection) */
};

struct gw_transport_stats {
    unsigned peers;
    unsigned connected;
    uint64_t drops_unknown_peer; /* sends to an id that is not a peer */
    uint64_t accepted;           /* inbound TCP connections */
    uint64_t rejected_conns;     /* refused handshakes: unknown id, ourselves, other cluster,
                                    wrong direction, garbage, timeout, too many pending */
    uint64_t rejected_frames;    /* bad frames, on any connection */
};

void gw_transport_stats(const struct gw_transport *t, struct gw_transport_stats *st);
/* Errors: GW_TRANSPORT_ERR_UNKNOWN_PEER. */
int gw_transport_peer_stats(const struct gw_transport *t, uint64_t id,
                            struct gw_transport_peer_stats *st);

/* The frame reader's first stage, exposed for tests and fuzzing: looks at the start of buf.
 * Returns 0 when more bytes are needed, 1 when a whole valid frame is there (*payload_len set;
 * the payload starts at buf + GW_TRANSPORT_FRAME_HEADER), or GW_TRANSPORT_ERR_TOO_BIG,
 * GW_TRANSPORT_ERR_BAD_VERSION, GW_TRANSPORT_ERR_BAD_CRC as soon as the bytes show it. */
int gw_transport_frame_check(const uint8_t *buf, size_t len, size_t max_frame_bytes,
                             size_t *payload_len);

/* Writes the 9-byte frame header for payload into hdr (for tests and tools). */
void gw_transport_frame_header(uint8_t hdr[GW_TRANSPORT_FRAME_HEADER], const uint8_t *payload,
                               size_t len);

/* CRC32C (Castagnoli) of buf, continuing from crc (start with 0). */
uint32_t gw_transport_crc32c(uint32_t crc, const void *buf, size_t len);

#endif
