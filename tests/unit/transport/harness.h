/*
 * harness.h - helpers for the transport tests: transports on 127.0.0.1 ephemeral ports driven
 * in-process by polling them in a loop with a bounded deadline, a recorder that keeps a copy of
 * every delivered message (re-encoded, so a comparison covers every field), and a raw socket
 * client that speaks (or mangles) the wire format by hand.
 */
#ifndef TEST_TRANSPORT_HARNESS_H
#define TEST_TRANSPORT_HARNESS_H

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "transport.h"

static inline uint64_t h_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

struct got {
    uint8_t *enc; /* raft_msg_encode of what arrived */
    size_t len;
    uint8_t type;
    uint64_t from, to, term, seq; /* seq: append.commit, used for ordering checks */
};

struct rec {
    struct got *v;
    size_t n, cap;
};

static inline void h_on_message(const struct raft_message *m, void *ctx)
{
    struct rec *r = ctx;
    if (r->n == r->cap) {
        r->cap = r->cap ? r->cap * 2 : 64;
        r->v = realloc(r->v, r->cap * sizeof(*r->v));
        assert_non_null(r->v);
    }
    struct got *g = &r->v[r->n++];
    g->len = raft_msg_encoded_len(m);
    g->enc = malloc(g->len);
    assert_non_null(g->enc);
    size_t len = 0;
    assert_int_equal(raft_msg_encode(m, g->enc, g->len, &len), 0);
    g->type = m->type;
    g->from = m->from;
    g->to = m->to;
    g->term = m->term;
    g->seq = m->type == RAFT_MSG_APPEND ? m->u.append.commit : 0;
}

static inline void rec_clear(struct rec *r)
{
    for (size_t i = 0; i < r->n; i++)
        free(r->v[i].enc);
    free(r->v);
    memset(r, 0, sizeof(*r));
}

struct node {
    uint64_t id;
    struct gw_transport *t;
    struct rec rec;
    struct sockaddr_storage addr;
    socklen_t addr_len;
};

static inline struct sockaddr_storage h_loopback(uint16_t port, socklen_t *len)
{
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof(ss));
    struct sockaddr_in *in = (struct sockaddr_in *)&ss;
    in->sin_family = AF_INET;
    in->sin_port = htons(port);
    in->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    *len = sizeof(*in);
    return ss;
}

static inline uint16_t h_port(const struct node *n)
{
    return ntohs(((const struct sockaddr_in *)&n->addr)->sin_port);
}

static inline void node_start(struct node *n, uint64_t id, uint16_t port,
                              const struct gw_transport_options *o)
{
    memset(n, 0, sizeof(*n));
    n->id = id;
    socklen_t len;
    struct sockaddr_storage a = h_loopback(port, &len);
    assert_int_equal(gw_transport_new(id, &a, len, o, h_on_message, &n->rec, &n->t), 0);
    assert_int_equal(gw_transport_local_addr(n->t, &n->addr, &n->addr_len), 0);
}

static inline void node_stop(struct node *n)
{
    gw_transport_free(n->t);
    n->t = NULL;
    rec_clear(&n->rec);
}

static inline void node_link(struct node *a, struct node *b)
{
    assert_int_equal(gw_transport_set_peer(a->t, b->id, &b->addr, b->addr_len), 0);
    assert_int_equal(gw_transport_set_peer(b->t, a->id, &a->addr, a->addr_len), 0);
}

/* Runs every transport until cond(arg) holds or timeout_ms passes; returns whether it held.
 * With cond NULL it simply runs them for timeout_ms. */
static inline bool pump(struct node **ns, int n, bool (*cond)(void *), void *arg, int timeout_ms)
{
    uint64_t end = h_now_ms() + (uint64_t)timeout_ms;
    for (;;) {
        for (int i = 0; i < n; i++)
            if (ns[i] != NULL && ns[i]->t != NULL)
                assert_int_equal(gw_transport_run(ns[i]->t, h_now_ms()), 0);
        if (cond != NULL && cond(arg))
            return true;
        if (h_now_ms() >= end)
            return false;
        struct pollfd pfd[8];
        int k = 0, wait_ms = 5;
        for (int i = 0; i < n && k < 8; i++) {
            if (ns[i] == NULL || ns[i]->t == NULL)
                continue;
            pfd[k].fd = gw_transport_fd(ns[i]->t);
            pfd[k++].events = POLLIN;
            int w = gw_transport_next_timeout_ms(ns[i]->t, h_now_ms());
            if (w >= 0 && w < wait_ms)
                wait_ms = w;
        }
        poll(pfd, (nfds_t)k, wait_ms);
    }
}

static inline struct gw_transport_peer_stats peer_stats(const struct node *n, uint64_t id)
{
    struct gw_transport_peer_stats st;
    assert_int_equal(gw_transport_peer_stats(n->t, id, &st), 0);
    return st;
}

struct conn_cond {
    struct node *a;
    uint64_t id;
};

static inline bool h_connected(void *arg)
{
    struct conn_cond *c = arg;
    struct gw_transport_peer_stats st;
    return gw_transport_peer_stats(c->a->t, c->id, &st) == 0 && st.connected;
}

struct count_cond {
    struct rec *r;
    size_t n;
};

static inline bool h_got_n(void *arg)
{
    struct count_cond *c = arg;
    return c->r->n >= c->n;
}

/* ---- the raw client ---- */

static inline int raw_connect(const struct node *to)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(fd >= 0);
    assert_int_equal(connect(fd, (const struct sockaddr *)&to->addr, to->addr_len), 0);
    return fd;
}

static inline void raw_write(int fd, const void *buf, size_t len)
{
    const uint8_t *p = buf;
    while (len > 0) {
        ssize_t w = send(fd, p, len, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return; /* the far end may already have closed: that is what some tests expect */
        p += w;
        len -= (size_t)w;
    }
}

static inline void raw_frame(int fd, const uint8_t *payload, size_t len)
{
    uint8_t hdr[GW_TRANSPORT_FRAME_HEADER];
    gw_transport_frame_header(hdr, payload, len);
    raw_write(fd, hdr, sizeof(hdr));
    raw_write(fd, payload, len);
}

static inline void put64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static inline void raw_handshake(int fd, uint64_t cluster, uint64_t from, uint64_t to)
{
    uint8_t hs[28];
    memcpy(hs, "GWRT", 4);
    put64(hs + 4, cluster);
    put64(hs + 12, from);
    put64(hs + 20, to);
    raw_frame(fd, hs, sizeof(hs));
}

/* True once the far end has closed the raw socket (whatever it sent first is drained). */
static inline bool raw_closed(void *arg)
{
    int fd = *(int *)arg;
    uint8_t buf[4096];
    for (;;) {
        ssize_t r = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
        if (r > 0)
            continue;
        if (r == 0)
            return true;
        return errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR;
    }
}

static inline struct raft_message h_msg(uint8_t type, uint64_t from, uint64_t to, uint64_t term)
{
    struct raft_message m;
    memset(&m, 0, sizeof(m));
    m.type = type;
    m.from = from;
    m.to = to;
    m.term = term;
    return m;
}

static inline struct raft_message h_heartbeat(uint64_t from, uint64_t to, uint64_t seq)
{
    struct raft_message m = h_msg(RAFT_MSG_APPEND, from, to, 1);
    m.u.append.commit = seq;
    return m;
}

static inline size_t h_encode(const struct raft_message *m, uint8_t **out)
{
    size_t len = raft_msg_encoded_len(m), got = 0;
    *out = malloc(len);
    assert_non_null(*out);
    assert_int_equal(raft_msg_encode(m, *out, len, &got), 0);
    return got;
}

#endif
