/*
 * transport.c - TCP between Raft peers for the node thread's event loop (see transport.h).
 *
 * Each peer has a send queue of framed bytes held in a short list of chunks: small frames are
 * encoded straight into the tail chunk, so a burst of heartbeats is a few contiguous buffers and
 * one sendmsg writes many frames (the same idea as curl's bufq). Frames never span chunks,
 * which lets the queue find frame boundaries from the length prefixes alone: that is how it
 * counts frames as they finish, and how it discards the unsent rest of a half-written frame
 * when a connection breaks, so a new connection always starts on a frame boundary.
 *
 * Receiving is buffered per connection: read as much as the socket has (up to a budget per run,
 * so one busy peer cannot starve the others), then check and decode every complete frame. A
 * connection that has not finished its handshake may only send a handshake-sized frame, so an
 * unauthenticated socket cannot make us allocate a max-sized buffer.
 *
 * Sockets are never freed while an epoll batch or a callback may still hold them: closing marks
 * a connection dead and removes it from epoll, and the dead are swept at the end of run.
 */
#include "transport.h"

#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/uio.h>
#include <unistd.h>

#define HDR GW_TRANSPORT_FRAME_HEADER
#define CHUNK_BYTES (64 * 1024)
#define RBUF_MIN (64 * 1024)
#define RBUF_KEEP (1024 * 1024) /* a larger idle receive buffer is released */
#define MAX_IOV 64
#define MAX_PENDING_INBOUND 16
#define READ_BUDGET (4 * 1024 * 1024)
#define WRITE_BUDGET (4 * 1024 * 1024)
#define EPOLL_BATCH 64
#define LISTEN_PAUSE_MS 100 /* after accept fails for want of descriptors or memory */
#define HS_PAYLOAD 28 /* "GWRT", cluster id, sender, receiver */
#define HS_FRAME (HDR + HS_PAYLOAD)
/* Offsets into raft_msg_encode's form, used only to size the entry array before decoding:
 * version, type, flags, from, to, term, then prev_index, prev_term, commit, read_seq, count. */
#define MSG_TYPE_OFF 1
#define APPEND_COUNT_OFF 59
#define APPEND_FIXED 63
#define ENTRY_MIN 13
#define ENTS_KEEP 4096 /* a larger decode scratch array is released after use */

const char *gw_transport_strerror(int err)
{
    switch (err) {
    case 0:
        return "success";
#define GW_TRANSPORT_ERR_TEXT(name, code, id, text) \
    case code:                                      \
        return text;
        GW_TRANSPORT_ERRORS(GW_TRANSPORT_ERR_TEXT)
#undef GW_TRANSPORT_ERR_TEXT
    }
    return "unknown error";
}

const char *gw_transport_errname(int err)
{
    switch (err) {
    case 0:
        return "ok";
#define GW_TRANSPORT_ERR_ID(name, code, id, text) \
    case code:                                    \
        return id;
        GW_TRANSPORT_ERRORS(GW_TRANSPORT_ERR_ID)
#undef GW_TRANSPORT_ERR_ID
    }
    return "unknown";
}

/* ---- little-endian helpers ---- */

static uint32_t rd32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t rd64(const uint8_t *p) { return (uint64_t)rd32(p) | (uint64_t)rd32(p + 4) << 32; }

static void wr32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void wr64(uint8_t *p, uint64_t v)
{
    wr32(p, (uint32_t)v);
    wr32(p + 4, (uint32_t)(v >> 32));
}

/* ---- CRC32C (Castagnoli, reflected polynomial 0x82F63B78) ----
 * CRC32C rather than zlib's CRC32: better error detection for short messages and an x86
 * instruction for it (SSE4.2), used when the CPU has it; otherwise slicing-by-8 tables. */

static uint32_t crc_table[8][256];
static bool crc_hw;
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int k = 1; k < 8; k++)
            crc_table[k][i] = (crc_table[k - 1][i] >> 8) ^ crc_table[0][crc_table[k - 1][i] & 0xff];
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    crc_hw = __builtin_cpu_supports("sse4.2");
#endif
}

static uint32_t crc_soft(uint32_t crc, const uint8_t *p, size_t n)
{
    while (n > 0 && ((uintptr_t)p & 7) != 0) {
        crc = (crc >> 8) ^ crc_table[0][(crc ^ *p++) & 0xff];
        n--;
    }
    while (n >= 8) {
        uint32_t lo = rd32(p) ^ crc, hi = rd32(p + 4);
        crc = crc_table[7][lo & 0xff] ^ crc_table[6][(lo >> 8) & 0xff] ^
              crc_table[5][(lo >> 16) & 0xff] ^ crc_table[4][lo >> 24] ^
              crc_table[3][hi & 0xff] ^ crc_table[2][(hi >> 8) & 0xff] ^
              crc_table[1][(hi >> 16) & 0xff] ^ crc_table[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n-- > 0)
        crc = (crc >> 8) ^ crc_table[0][(crc ^ *p++) & 0xff];
    return crc;
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("sse4.2"))) static uint32_t crc_sse42(uint32_t crc, const uint8_t *p,
                                                             size_t n)
{
    while (n > 0 && ((uintptr_t)p & 7) != 0) {
        crc = __builtin_ia32_crc32qi(crc, *p++);
        n--;
    }
    uint64_t c64 = crc;
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c64 = __builtin_ia32_crc32di(c64, w);
        p += 8;
        n -= 8;
    }
    crc = (uint32_t)c64;
    while (n-- > 0)
        crc = __builtin_ia32_crc32qi(crc, *p++);
    return crc;
}
#endif

uint32_t gw_transport_crc32c(uint32_t crc, const void *buf, size_t len)
{
    pthread_once(&crc_once, crc_init);
    const uint8_t *p = buf;
    crc = ~crc;
#if defined(__x86_64__) && defined(__GNUC__)
    if (crc_hw)
        return ~crc_sse42(crc, p, len);
#endif
    return ~crc_soft(crc, p, len);
}

/* ---- frames ---- */

void gw_transport_frame_header(uint8_t hdr[GW_TRANSPORT_FRAME_HEADER], const uint8_t *payload,
                               size_t len)
{
    wr32(hdr, (uint32_t)len);
    hdr[4] = GW_TRANSPORT_FRAME_VERSION;
    wr32(hdr + 5, gw_transport_crc32c(0, payload, len));
}

int gw_transport_frame_check(const uint8_t *buf, size_t len, size_t max_frame_bytes,
                             size_t *payload_len)
{
    if (len < 4)
        return 0;
    size_t n = rd32(buf);
    if (n > max_frame_bytes)
        return GW_TRANSPORT_ERR_TOO_BIG;
    if (len < 5)
        return 0;
    if (buf[4] != GW_TRANSPORT_FRAME_VERSION)
        return GW_TRANSPORT_ERR_BAD_VERSION;
    if (len < HDR || len - HDR < n)
        return 0;
    if (gw_transport_crc32c(0, buf + HDR, n) != rd32(buf + 5))
        return GW_TRANSPORT_ERR_BAD_CRC;
    *payload_len = n;
    return 1;
}

/* ---- types ---- */

/* A piece of a send queue: frames occupy [0, len); [start, len) is not written yet. */
struct chunk {
    struct chunk *next;
    size_t cap, start, len;
    uint8_t data[];
};

struct queue {
    struct chunk *head, *tail;
    struct chunk *spare; /* one standard chunk kept to avoid malloc churn */
    size_t bytes;        /* not yet written */
    uint64_t frames;     /* not completely written */
    size_t frame_start;  /* offset in head of the first frame not completely written */
};

enum conn_state { CONN_CONNECTING, CONN_HANDSHAKE, CONN_READY };

struct peer;

/* One TCP connection. Owned by the transport's list; a peer points at its current one. */
struct conn {
    struct conn *next;
    struct peer *peer; /* NULL for an inbound connection until its handshake names it */
    int fd;
    enum conn_state state;
    bool outbound;
    bool pending; /* inbound, handshake not yet received: counts against MAX_PENDING_INBOUND */
    bool dead;    /* closed; freed by sweep() */
    bool out_armed;
    uint64_t deadline_ms; /* connect and handshake must finish by then */
    uint8_t hs[HS_FRAME];
    size_t hs_len, hs_off;
    uint8_t *rbuf; /* owned */
    size_t rcap, rlen;
};

struct peer {
    uint64_t id;
    struct sockaddr_storage addr;
    socklen_t addr_len;
    bool dial; /* our id is lower: we connect */
    struct conn *conn;
    struct queue q;
    uint64_t next_dial_ms;
    uint32_t backoff_ms;
    struct gw_transport_peer_stats st;
    struct peer *next_dead;
};

struct gw_transport {
    uint64_t self;
    struct gw_transport_options o;
    gw_transport_on_message on_message;
    void *ctx;
    int epfd, lfd;
    bool listen_paused;
    uint64_t listen_resume_ms;
    struct sockaddr_storage laddr;
    socklen_t laddr_len;
    uint64_t now_ms;
    uint64_t rng;
    struct peer *peers[GW_TRANSPORT_MAX_PEERS];
    unsigned n_peers;
    struct peer *dead_peers; /* removed, freed by sweep() */
    struct conn *conns;
    unsigned n_pending;
    struct raft_entry *ents; /* decode scratch, owned */
    size_t ents_cap;
    bool in_run;
    struct gw_transport_stats st;
};

void gw_transport_options_default(struct gw_transport_options *o)
{
    memset(o, 0, sizeof(*o));
    o->max_frame_bytes = 8u << 20;
    o->max_queue_bytes = 64u << 20;
    o->backoff_min_ms = 50;
    o->backoff_max_ms = 2000;
    o->handshake_timeout_ms = 5000;
}

static uint64_t rng_next(struct gw_transport *t)
{
    /* splitmix64 */
    uint64_t z = (t->rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* ---- send queues ---- */

static void chunk_release(struct queue *q, struct chunk *c)
{
    if (c->cap == CHUNK_BYTES && q->spare == NULL) {
        q->spare = c;
        return;
    }
    free(c);
}

static void queue_pop(struct queue *q)
{
    struct chunk *c = q->head;
    q->head = c->next;
    if (q->head == NULL)
        q->tail = NULL;
    q->frame_start = 0;
    chunk_release(q, c);
}

static void queue_clear(struct queue *q)
{
    while (q->head != NULL)
        queue_pop(q);
    free(q->spare);
    memset(q, 0, sizeof(*q));
}

static int queue_push(struct gw_transport *t, struct peer *p, const struct raft_message *m)
{
    struct queue *q = &p->q;
    size_t plen = raft_msg_encoded_len(m);
    if (plen > t->o.max_frame_bytes) {
        p->st.drops++;
        p->st.drops_too_big++;
        return GW_TRANSPORT_ERR_TOO_BIG;
    }
    size_t fsz = HDR + plen;
    if (q->bytes + fsz > t->o.max_queue_bytes) {
        p->st.drops++;
        p->st.drops_queue_full++;
        return GW_TRANSPORT_ERR_QUEUE_FULL;
    }
    struct chunk *c = q->tail;
    bool fresh = false;
    if (c == NULL || c->cap - c->len < fsz) {
        size_t cap = fsz > CHUNK_BYTES ? fsz : CHUNK_BYTES;
        if (cap == CHUNK_BYTES && q->spare != NULL) {
            c = q->spare;
            q->spare = NULL;
        } else if ((c = malloc(sizeof(*c) + cap)) == NULL) {
            p->st.drops++;
            return GW_TRANSPORT_ERR_NOMEM;
        }
        c->cap = cap;
        c->start = c->len = 0;
        c->next = NULL;
        fresh = true;
    }
    uint8_t *f = c->data + c->len;
    size_t got = 0;
    if (raft_msg_encode(m, f + HDR, plen, &got) != 0 || got != plen) {
        if (fresh)
            chunk_release(q, c);
        p->st.drops++;
        return GW_TRANSPORT_ERR_INVALID;
    }
    gw_transport_frame_header(f, f + HDR, plen);
    if (fresh) {
        if (q->tail != NULL)
            q->tail->next = c;
        else
            q->head = c;
        q->tail = c;
    }
    c->len += fsz;
    q->bytes += fsz;
    q->frames++;
    return 0;
}

/* n bytes of the queue were written: advance, counting the frames that are now complete. */
static void queue_consume(struct peer *p, size_t n)
{
    struct queue *q = &p->q;
    p->st.sent_bytes += n;
    while (n > 0 && q->head != NULL) {
        struct chunk *c = q->head;
        size_t take = c->len - c->start < n ? c->len - c->start : n;
        c->start += take;
        n -= take;
        q->bytes -= take;
        while (q->frame_start < c->start) {
            size_t fsz = HDR + rd32(c->data + q->frame_start);
            if (q->frame_start + fsz > c->start)
                break;
            q->frame_start += fsz;
            q->frames--;
            p->st.sent_frames++;
        }
        if (c->start == c->len)
            queue_pop(q);
    }
}

/* The connection broke: the rest of a half-written frame can never be completed. */
static void queue_cut_partial(struct peer *p)
{
    struct queue *q = &p->q;
    struct chunk *c = q->head;
    if (c == NULL || c->start == q->frame_start)
        return;
    size_t fsz = HDR + rd32(c->data + q->frame_start);
    size_t rest = q->frame_start + fsz - c->start;
    c->start += rest;
    q->bytes -= rest;
    q->frames--;
    q->frame_start += fsz;
    p->st.drops++;
    if (c->start == c->len)
        queue_pop(q);
}

/* ---- connections ---- */

static void set_sockopts(int fd)
{
    int one = 1;
    /* Raft messages are latency-sensitive and already batched by the queue. */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    /* Notice a silently vanished peer: keepalive for an idle link, a user timeout for a link
     * with unacknowledged data. */
    int idle = 5, intvl = 2, cnt = 3;
    unsigned user_timeout_ms = 15000;
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof(intvl));
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof(cnt));
    setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &user_timeout_ms, sizeof(user_timeout_ms));
}

static struct conn *conn_new(struct gw_transport *t, int fd, uint32_t events)
{
    struct conn *c = calloc(1, sizeof(*c));
    if (c == NULL)
        return NULL;
    c->fd = fd;
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(t->epfd, EPOLL_CTL_ADD, fd, &ev) != 0) {
        free(c);
        return NULL;
    }
    c->out_armed = (events & EPOLLOUT) != 0;
    c->next = t->conns;
    t->conns = c;
    return c;
}

static void set_out(struct gw_transport *t, struct conn *c, bool on)
{
    if (c->out_armed == on || c->dead)
        return;
    struct epoll_event ev = {.events = EPOLLIN | (on ? EPOLLOUT : 0), .data.ptr = c};
    if (epoll_ctl(t->epfd, EPOLL_CTL_MOD, c->fd, &ev) == 0)
        c->out_armed = on;
}

static void schedule_dial(struct gw_transport *t, struct peer *p)
{
    /* Exponential backoff with "equal jitter": half the delay fixed, half random, so peers
     * that failed together do not retry in lockstep. */
    uint32_t d = p->backoff_ms;
    p->next_dial_ms = t->now_ms + d / 2 + rng_next(t) % (d / 2 + 1);
    p->backoff_ms = d > t->o.backoff_max_ms / 2 ? t->o.backoff_max_ms : d * 2;
}

/* Closes c. failure: it broke (count it, back off before dialing again); otherwise it was
 * closed on purpose (address change, replacement, removal). */
static void conn_close(struct gw_transport *t, struct conn *c, bool failure)
{
    if (c->dead)
        return;
    epoll_ctl(t->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    c->dead = true;
    if (c->pending) {
        c->pending = false;
        t->n_pending--;
    }
    struct peer *p = c->peer;
    if (p == NULL || p->conn != c)
        return;
    p->conn = NULL;
    queue_cut_partial(p);
    if (failure)
        p->st.failures++;
    if (p->dial) {
        if (failure)
            schedule_dial(t, p);
        else
            p->next_dial_ms = t->now_ms;
    }
}

static void conn_reject(struct gw_transport *t, struct conn *c, bool bad_frame)
{
    if (bad_frame) {
        t->st.rejected_frames++;
        if (c->peer != NULL)
            c->peer->st.rejected_frames++;
    }
    if (c->state != CONN_READY)
        t->st.rejected_conns++;
    conn_close(t, c, true);
}

static void hs_build(struct gw_transport *t, struct conn *c, uint64_t to)
{
    uint8_t *p = c->hs + HDR;
    memcpy(p, "GWRT", 4);
    wr64(p + 4, t->o.cluster_id);
    wr64(p + 12, t->self);
    wr64(p + 20, to);
    gw_transport_frame_header(c->hs, p, HS_PAYLOAD);
    c->hs_len = HS_FRAME;
    c->hs_off = 0;
}

/* Writes the handshake (if unsent) and, once ready, as much of the queue as the socket takes,
 * up to a budget per call so that one fast peer cannot hold the node thread for long; what is
 * left makes gw_transport_next_timeout_ms return 0. */
static void conn_flush(struct gw_transport *t, struct conn *c)
{
    size_t budget = WRITE_BUDGET;
    while (!c->dead && c->state != CONN_CONNECTING) {
        struct iovec iov[MAX_IOV];
        int n = 0;
        size_t total = 0;
        if (c->hs_off < c->hs_len) {
            iov[n].iov_base = c->hs + c->hs_off;
            iov[n].iov_len = c->hs_len - c->hs_off;
            total += iov[n++].iov_len;
        }
        if (c->state == CONN_READY) {
            for (struct chunk *k = c->peer->q.head; k != NULL && n < MAX_IOV; k = k->next) {
                if (k->len == k->start)
                    continue;
                iov[n].iov_base = k->data + k->start;
                iov[n].iov_len = k->len - k->start;
                total += iov[n++].iov_len;
            }
        }
        if (n == 0) {
            set_out(t, c, false);
            return;
        }
        struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t)n};
        ssize_t w = sendmsg(c->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                set_out(t, c, true);
            else
                conn_close(t, c, true);
            return;
        }
        size_t left = (size_t)w;
        if (c->hs_off < c->hs_len) {
            size_t take = c->hs_len - c->hs_off < left ? c->hs_len - c->hs_off : left;
            c->hs_off += take;
            left -= take;
        }
        if (left > 0)
            queue_consume(c->peer, left);
        if ((size_t)w < total) {
            set_out(t, c, true);
            return;
        }
        if ((size_t)w >= budget)
            return;
        budget -= (size_t)w;
    }
}

static void conn_ready(struct gw_transport *t, struct conn *c)
{
    struct peer *p = c->peer;
    c->state = CONN_READY;
    p->st.connects++;
    if (p->st.connects > 1)
        p->st.reconnects++;
    p->backoff_ms = t->o.backoff_min_ms;
    conn_flush(t, c);
}

static struct peer *peer_find(const struct gw_transport *t, uint64_t id)
{
    for (unsigned i = 0; i < t->n_peers; i++)
        if (t->peers[i]->id == id)
            return t->peers[i];
    return NULL;
}

/* The first frame on a connection: who is speaking, to whom, in which cluster. */
static void handshake_in(struct gw_transport *t, struct conn *c, const uint8_t *b, size_t len)
{
    if (len != HS_PAYLOAD || memcmp(b, "GWRT", 4) != 0 || rd64(b + 4) != t->o.cluster_id ||
        rd64(b + 20) != t->self) {
        conn_reject(t, c, false);
        return;
    }
    uint64_t from = rd64(b + 12);
    if (c->outbound) {
        if (from != c->peer->id) {
            conn_reject(t, c, false);
            return;
        }
        conn_ready(t, c);
        return;
    }
    /* Only a lower id dials us; that also refuses ourselves. */
    struct peer *p = peer_find(t, from);
    if (from >= t->self || p == NULL) {
        conn_reject(t, c, false);
        return;
    }
    if (p->conn != NULL) /* the dialer reconnected: its old connection is dead to it */
        conn_close(t, p->conn, true);
    c->pending = false;
    t->n_pending--;
    c->peer = p;
    p->conn = c;
    hs_build(t, c, from);
    conn_ready(t, c);
}

/* A message frame on a ready connection. Returns 0, or an error if it must be rejected. */
static int deliver(struct gw_transport *t, struct conn *c, const uint8_t *b, size_t len)
{
    size_t need = 0;
    if (len >= APPEND_FIXED && b[MSG_TYPE_OFF] == RAFT_MSG_APPEND) {
        need = rd32(b + APPEND_COUNT_OFF);
        if (need > (len - APPEND_FIXED) / ENTRY_MIN)
            return GW_TRANSPORT_ERR_MALFORMED;
    }
    if (need > t->ents_cap) {
        size_t cap = t->ents_cap * 2 > need ? t->ents_cap * 2 : need;
        struct raft_entry *e = realloc(t->ents, cap * sizeof(*e));
        if (e == NULL)
            return GW_TRANSPORT_ERR_NOMEM;
        t->ents = e;
        t->ents_cap = cap;
    }
    struct raft_message m;
    if (raft_msg_decode(b, len, &m, t->ents, t->ents_cap) != 0)
        return GW_TRANSPORT_ERR_MALFORMED;
    struct peer *p = c->peer;
    if (m.from != p->id || m.to != t->self)
        return GW_TRANSPORT_ERR_MALFORMED;
    p->st.recv_frames++;
    p->st.recv_bytes += HDR + len;
    t->on_message(&m, t->ctx);
    if (t->ents_cap > ENTS_KEEP) {
        free(t->ents);
        t->ents = NULL;
        t->ents_cap = 0;
    }
    return 0;
}

/* Checks and hands out every complete frame in the receive buffer. */
static void conn_parse(struct gw_transport *t, struct conn *c)
{
    size_t off = 0;
    while (!c->dead) {
        size_t max = c->state == CONN_READY ? t->o.max_frame_bytes : HS_PAYLOAD;
        size_t plen = 0;
        int rc = gw_transport_frame_check(c->rbuf + off, c->rlen - off, max, &plen);
        if (rc == 0)
            break;
        if (rc < 0) {
            conn_reject(t, c, true);
            return;
        }
        const uint8_t *payload = c->rbuf + off + HDR;
        off += HDR + plen;
        if (c->state != CONN_READY)
            handshake_in(t, c, payload, plen);
        else if (deliver(t, c, payload, plen) != 0 && !c->dead)
            conn_reject(t, c, true);
    }
    if (c->dead)
        return;
    if (off > 0) {
        memmove(c->rbuf, c->rbuf + off, c->rlen - off);
        c->rlen -= off;
    }
    if (c->rlen == 0 && c->rcap > RBUF_KEEP) {
        free(c->rbuf);
        c->rbuf = NULL;
        c->rcap = 0;
    }
}

/* Room for the next read: at least the whole frame whose header is already in. */
static bool conn_reserve(struct conn *c)
{
    size_t need = RBUF_MIN;
    if (c->rlen >= 4 && HDR + (size_t)rd32(c->rbuf) > need)
        need = HDR + (size_t)rd32(c->rbuf); /* already checked against the bound */
    if (need <= c->rcap && c->rlen < c->rcap)
        return true;
    if (need <= c->rcap)
        return false; /* cannot happen: a full buffer holds a complete frame */
    uint8_t *b = realloc(c->rbuf, need);
    if (b == NULL)
        return false;
    c->rbuf = b;
    c->rcap = need;
    return true;
}

static void conn_read(struct gw_transport *t, struct conn *c)
{
    size_t budget = READ_BUDGET;
    while (!c->dead) {
        if (!conn_reserve(c)) {
            conn_close(t, c, true);
            return;
        }
        size_t room = c->rcap - c->rlen;
        ssize_t r = read(c->fd, c->rbuf + c->rlen, room);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        if (r <= 0) {
            if (c->state != CONN_READY && !c->outbound)
                t->st.rejected_conns++;
            conn_close(t, c, true);
            return;
        }
        c->rlen += (size_t)r;
        conn_parse(t, c);
        /* A short read almost always means the socket is drained: skip the read that would
         * only say EAGAIN; level-triggered epoll brings us back if it was not. */
        if ((size_t)r < room || (size_t)r >= budget)
            return;
        budget -= (size_t)r;
    }
}

static void dial(struct gw_transport *t, struct peer *p)
{
    int fd = socket(p->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        goto fail;
    set_sockopts(fd);
    struct conn *c = conn_new(t, fd, EPOLLIN | EPOLLOUT);
    if (c == NULL) {
        close(fd);
        goto fail;
    }
    c->outbound = true;
    c->peer = p;
    c->deadline_ms = t->now_ms + t->o.handshake_timeout_ms;
    p->conn = c;
    if (connect(fd, (const struct sockaddr *)&p->addr, p->addr_len) == 0) {
        c->state = CONN_HANDSHAKE;
        hs_build(t, c, p->id);
        conn_flush(t, c);
    } else if (errno == EINPROGRESS) {
        c->state = CONN_CONNECTING;
    } else {
        conn_close(t, c, true);
    }
    return;
fail:
    p->st.failures++;
    schedule_dial(t, p);
}

static void connect_done(struct gw_transport *t, struct conn *c)
{
    int err = 0;
    socklen_t len = sizeof(err);
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err != 0) {
        conn_close(t, c, true);
        return;
    }
    c->state = CONN_HANDSHAKE;
    hs_build(t, c, c->peer->id);
    conn_flush(t, c);
}

static void accept_all(struct gw_transport *t)
{
    for (;;) {
        int fd = accept4(t->lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                /* Out of descriptors or memory: the pending connection stays in the backlog
                 * and the level-triggered listener would wake the loop at once, forever.
                 * Stop watching it for a while instead. */
                if (epoll_ctl(t->epfd, EPOLL_CTL_DEL, t->lfd, NULL) == 0) {
                    t->listen_paused = true;
                    t->listen_resume_ms = t->now_ms + LISTEN_PAUSE_MS;
                }
            }
            return;
        }
        t->st.accepted++;
        if (t->n_pending >= MAX_PENDING_INBOUND) {
            t->st.rejected_conns++;
            close(fd);
            continue;
        }
        set_sockopts(fd);
        struct conn *c = conn_new(t, fd, EPOLLIN);
        if (c == NULL) {
            close(fd);
            continue;
        }
        c->state = CONN_HANDSHAKE;
        c->pending = true;
        c->deadline_ms = t->now_ms + t->o.handshake_timeout_ms;
        t->n_pending++;
    }
}

static void free_conn(struct conn *c)
{
    if (c->fd >= 0)
        close(c->fd);
    free(c->rbuf);
    free(c);
}

static void free_peer(struct peer *p)
{
    queue_clear(&p->q);
    free(p);
}

static void sweep(struct gw_transport *t)
{
    for (struct conn **pp = &t->conns; *pp != NULL;) {
        struct conn *c = *pp;
        if (c->dead) {
            *pp = c->next;
            free_conn(c);
        } else {
            pp = &c->next;
        }
    }
    while (t->dead_peers != NULL) {
        struct peer *p = t->dead_peers;
        t->dead_peers = p->next_dead;
        free_peer(p);
    }
}

/* ---- public ---- */

static bool addr_ok(const struct sockaddr_storage *a, socklen_t len)
{
    if (a == NULL)
        return false;
    if (a->ss_family == AF_INET)
        return len >= (socklen_t)sizeof(struct sockaddr_in) && len <= (socklen_t)sizeof(*a);
    if (a->ss_family == AF_INET6)
        return len >= (socklen_t)sizeof(struct sockaddr_in6) && len <= (socklen_t)sizeof(*a);
    return false;
}

int gw_transport_new(uint64_t self_id, const struct sockaddr_storage *addr, socklen_t addr_len,
                     const struct gw_transport_options *opts, gw_transport_on_message on_message,
                     void *ctx, struct gw_transport **out)
{
    struct gw_transport_options o;
    if (opts != NULL)
        o = *opts;
    else
        gw_transport_options_default(&o);
    if (self_id == 0 || on_message == NULL || out == NULL || !addr_ok(addr, addr_len) ||
        o.max_frame_bytes < 64 || o.max_frame_bytes > (1u << 30) ||
        o.max_queue_bytes < HDR + 64 || o.backoff_min_ms == 0 ||
        o.backoff_max_ms < o.backoff_min_ms || o.handshake_timeout_ms == 0)
        return GW_TRANSPORT_ERR_INVALID;
    pthread_once(&crc_once, crc_init);

    struct gw_transport *t = calloc(1, sizeof(*t));
    if (t == NULL)
        return GW_TRANSPORT_ERR_NOMEM;
    t->self = self_id;
    t->o = o;
    t->on_message = on_message;
    t->ctx = ctx;
    t->rng = o.random_seed != 0 ? o.random_seed : self_id * 0x2545F4914F6CDD1Dull;
    t->lfd = -1;
    int err;
    t->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (t->epfd < 0)
        goto undo_alloc;
    t->lfd = socket(addr->ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (t->lfd < 0)
        goto undo_epoll;
    int one = 1;
    /* A restarted node must be able to bind while its old connections sit in TIME_WAIT. */
    setsockopt(t->lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(t->lfd, (const struct sockaddr *)addr, addr_len) != 0 || listen(t->lfd, 64) != 0)
        goto undo_listen;
    t->laddr_len = sizeof(t->laddr);
    if (getsockname(t->lfd, (struct sockaddr *)&t->laddr, &t->laddr_len) != 0)
        goto undo_listen;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    if (epoll_ctl(t->epfd, EPOLL_CTL_ADD, t->lfd, &ev) != 0)
        goto undo_listen;
    *out = t;
    return 0;

undo_listen:
    err = errno;
    close(t->lfd);
    errno = err;
undo_epoll:
    err = errno;
    close(t->epfd);
    errno = err;
undo_alloc:
    free(t);
    return GW_TRANSPORT_ERR_IO;
}

void gw_transport_free(struct gw_transport *t)
{
    if (t == NULL)
        return;
    for (struct conn *c = t->conns; c != NULL; c = c->next)
        c->dead = true;
    sweep(t);
    for (unsigned i = 0; i < t->n_peers; i++)
        free_peer(t->peers[i]);
    close(t->lfd);
    close(t->epfd);
    free(t->ents);
    free(t);
}

int gw_transport_fd(const struct gw_transport *t) { return t->epfd; }

int gw_transport_local_addr(const struct gw_transport *t, struct sockaddr_storage *addr,
                            socklen_t *addr_len)
{
    if (addr == NULL || addr_len == NULL)
        return GW_TRANSPORT_ERR_INVALID;
    *addr = t->laddr;
    *addr_len = t->laddr_len;
    return 0;
}

int gw_transport_set_peer(struct gw_transport *t, uint64_t id, const struct sockaddr_storage *addr,
                          socklen_t addr_len)
{
    if (id == 0 || id == t->self || !addr_ok(addr, addr_len))
        return GW_TRANSPORT_ERR_INVALID;
    struct peer *p = peer_find(t, id);
    if (p != NULL) {
        if (p->addr_len == addr_len && memcmp(&p->addr, addr, addr_len) == 0)
            return 0;
        memset(&p->addr, 0, sizeof(p->addr));
        memcpy(&p->addr, addr, addr_len);
        p->addr_len = addr_len;
        if (p->dial && p->conn != NULL)
            conn_close(t, p->conn, false);
        p->backoff_ms = t->o.backoff_min_ms;
        p->next_dial_ms = t->now_ms;
        return 0;
    }
    if (t->n_peers == GW_TRANSPORT_MAX_PEERS)
        return GW_TRANSPORT_ERR_LIMIT;
    p = calloc(1, sizeof(*p));
    if (p == NULL)
        return GW_TRANSPORT_ERR_NOMEM;
    p->id = id;
    memcpy(&p->addr, addr, addr_len);
    p->addr_len = addr_len;
    p->dial = t->self < id;
    p->backoff_ms = t->o.backoff_min_ms;
    p->next_dial_ms = t->now_ms;
    t->peers[t->n_peers++] = p;
    return 0;
}

int gw_transport_remove_peer(struct gw_transport *t, uint64_t id)
{
    for (unsigned i = 0; i < t->n_peers; i++) {
        struct peer *p = t->peers[i];
        if (p->id != id)
            continue;
        if (p->conn != NULL)
            conn_close(t, p->conn, false);
        t->peers[i] = t->peers[--t->n_peers];
        p->next_dead = t->dead_peers;
        t->dead_peers = p;
        if (!t->in_run)
            sweep(t);
        return 0;
    }
    return GW_TRANSPORT_ERR_UNKNOWN_PEER;
}

int gw_transport_send(struct gw_transport *t, const struct raft_message *m)
{
    if (m == NULL || m->from != t->self)
        return GW_TRANSPORT_ERR_INVALID; /* the receiver would close the connection over it */
    struct peer *p = peer_find(t, m->to);
    if (p == NULL) {
        t->st.drops_unknown_peer++;
        return GW_TRANSPORT_ERR_UNKNOWN_PEER;
    }
    return queue_push(t, p, m);
}

int gw_transport_run(struct gw_transport *t, uint64_t now_ms)
{
    if (t->in_run)
        return GW_TRANSPORT_ERR_INVALID; /* called from the callback */
    int rc = 0;
    t->in_run = true;
    t->now_ms = now_ms;
    if (t->listen_paused && now_ms >= t->listen_resume_ms) {
        struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
        if (epoll_ctl(t->epfd, EPOLL_CTL_ADD, t->lfd, &lev) == 0)
            t->listen_paused = false;
        else
            t->listen_resume_ms = now_ms + LISTEN_PAUSE_MS;
    }
    struct epoll_event ev[EPOLL_BATCH];
    for (int round = 0; round < 4; round++) {
        int n = epoll_wait(t->epfd, ev, EPOLL_BATCH, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            rc = GW_TRANSPORT_ERR_IO;
            break;
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = ev[i].data.ptr;
            uint32_t e = ev[i].events;
            if (c == NULL) {
                accept_all(t);
                continue;
            }
            if (c->dead)
                continue;
            if (c->state == CONN_CONNECTING) {
                if (e & (EPOLLOUT | EPOLLERR | EPOLLHUP))
                    connect_done(t, c);
                continue;
            }
            if (e & (EPOLLIN | EPOLLERR | EPOLLHUP))
                conn_read(t, c);
            if (!c->dead && (e & EPOLLOUT))
                conn_flush(t, c);
        }
        if (n < EPOLL_BATCH)
            break;
    }
    for (struct conn *c = t->conns; c != NULL; c = c->next) {
        if (!c->dead && c->state != CONN_READY && now_ms >= c->deadline_ms) {
            if (c->pending)
                t->st.rejected_conns++;
            conn_close(t, c, true);
        }
    }
    for (unsigned i = 0; i < t->n_peers; i++) {
        struct peer *p = t->peers[i];
        if (p->dial && p->conn == NULL && now_ms >= p->next_dial_ms)
            dial(t, p);
        struct conn *c = p->conn;
        if (c != NULL && c->state == CONN_READY && p->q.bytes > 0 && !c->out_armed)
            conn_flush(t, c);
    }
    sweep(t);
    t->in_run = false;
    return rc;
}

int gw_transport_next_timeout_ms(const struct gw_transport *t, uint64_t now_ms)
{
    bool any = t->listen_paused;
    uint64_t due = t->listen_resume_ms;
    for (unsigned i = 0; i < t->n_peers; i++) {
        const struct peer *p = t->peers[i];
        const struct conn *c = p->conn;
        if (c != NULL && c->state == CONN_READY && p->q.bytes > 0 && !c->out_armed)
            return 0;
        if (p->dial && c == NULL && (!any || p->next_dial_ms < due)) {
            due = p->next_dial_ms;
            any = true;
        }
    }
    for (const struct conn *c = t->conns; c != NULL; c = c->next) {
        if (!c->dead && c->state != CONN_READY && (!any || c->deadline_ms < due)) {
            due = c->deadline_ms;
            any = true;
        }
    }
    if (!any)
        return -1;
    if (due <= now_ms)
        return 0;
    return due - now_ms > INT_MAX ? INT_MAX : (int)(due - now_ms);
}

void gw_transport_stats(const struct gw_transport *t, struct gw_transport_stats *st)
{
    *st = t->st;
    st->peers = t->n_peers;
    st->connected = 0;
    for (unsigned i = 0; i < t->n_peers; i++) {
        const struct conn *c = t->peers[i]->conn;
        if (c != NULL && c->state == CONN_READY)
            st->connected++;
    }
}

int gw_transport_peer_stats(const struct gw_transport *t, uint64_t id,
                            struct gw_transport_peer_stats *st)
{
    const struct peer *p = peer_find(t, id);
    if (p == NULL)
        return GW_TRANSPORT_ERR_UNKNOWN_PEER;
    *st = p->st;
    st->id = p->id;
    st->connected = p->conn != NULL && p->conn->state == CONN_READY;
    st->queued_bytes = p->q.bytes;
    st->queued_frames = p->q.frames;
    return 0;
}
