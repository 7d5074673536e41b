/*
 * coord_bench.c - gw-bench-coord: a closed-loop load generator for coordination services, used
 * by bench/cluster.sh to put the gateway's /v1 API next to etcd's v3 JSON gateway and Redis.
 *
 * N clients, each one keep-alive TCP connection with at most one request in flight, run an
 * operation over and over for a fixed time; every completed operation's latency goes into a
 * log-linear histogram (about 1.5% resolution). All connections live in one epoll loop per
 * thread (--threads, default 1) so the generator stays cheap next to the servers it measures on
 * a small machine; --selftest runs the same loop against a trivial in-process HTTP server to
 * show the generator's own ceiling, and every run reports the CPU the generator used.
 *
 * Workloads (one operation each):
 *   gw-counter   POST /v1/counters/{name} {"add":1}                     expect 200
 *   gw-lock      POST /v1/locks/{name} {"owner","ttl_ms":10000,"wait_ms":0}  expect 200 + token,
 *                then DELETE /v1/locks/{name}?token=N                    expect 204
 *   etcd-put     POST /v3/kv/put {"key","value"}  (etcd has no atomic add; a put is the closest
 *                single replicated write)                                expect 200
 *   etcd-lock    POST /v3/lease/grant once per client, then POST /v3/lock/lock {"name","lease"}
 *                + POST /v3/lock/unlock {"key"}                          expect 200, 200
 *   redis-incr   INCR key
 *   redis-lock   SET key val NX PX 10000 (+OK) then DEL key (:1)
 *   http-get     GET / (the trivial server of --selftest, or any HTTP server)
 * Lock names are per client (clients never contend); counters and the etcd key are shared.
 * Client i talks to address i mod (number of --addr entries), so spreading the addresses over
 * a cluster's nodes includes follower forwarding in the figures.
 *
 * --probe mode measures failover instead: requests of a one-request workload (gw-counter or
 * etcd-put) are sent open-loop every --interval-ms to the first address over a pool of up to
 * --pool connections (default 1024: a request that hangs, as writes to a follower do while its
 * leader is gone, does not stop the next one being sent). Once a write has been acknowledged and
 * --kill-after-ms has passed, the program sends SIGKILL to --kill-pid and reports the time from
 * the kill to the first acknowledgement of a request sent after the kill.
 *
 * Output: one human line and one machine line per run:
 *   RESULT workload=... clients=N seconds=S ops=... rps=... p50_ms=... p99_ms=... ...
 *   FAILOVER ack_ms=... first_any_ack_ms=... sent_after_kill=... failed_after_kill=... ...
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_ADDRS 16
#define MAX_CLIENTS 4096
#define MAX_THREADS 16
#define OUT_CAP 2048
#define IN_CAP (64u << 10)
#define PROBE_POOL_MAX 4096
#define ERR_LOG_MAX 5

/* ---- time ---------------------------------------------------------------------------------- */

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static double cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

/* ---- histogram ----------------------------------------------------------------------------- */

/* Log-linear over nanoseconds: values below 128 exactly, then 64 sub-buckets per power of two
 * (relative error under 1/64), up to 2^44 ns (about 4.9 hours). */
#define H_SUB_BITS 6
#define H_SUB (1u << H_SUB_BITS)
#define H_TOP 44
#define H_BUCKETS (2 * H_SUB + (H_TOP - H_SUB_BITS - 1) * H_SUB)

struct hist {
    uint64_t counts[H_BUCKETS];
    uint64_t n, sum_ns, max_ns;
};

static unsigned h_index(uint64_t v)
{
    if (v < 2 * H_SUB)
        return (unsigned)v;
    unsigned msb = 63u - (unsigned)__builtin_clzll(v);
    if (msb >= H_TOP)
        return H_BUCKETS - 1;
    unsigned shift = msb - H_SUB_BITS;
    return 2 * H_SUB + (shift - 1) * H_SUB + (unsigned)((v >> shift) - H_SUB);
}

/* The midpoint of bucket i. */
static double h_value(unsigned i)
{
    if (i < 2 * H_SUB)
        return (double)i;
    unsigned shift = (i - 2 * H_SUB) / H_SUB + 1;
    uint64_t sub = (i - 2 * H_SUB) % H_SUB + H_SUB;
    uint64_t lo = sub << shift;
    return (double)lo + (double)(1ULL << shift) / 2.0;
}

static void h_record(struct hist *h, uint64_t ns)
{
    h->counts[h_index(ns)]++;
    h->n++;
    h->sum_ns += ns;
    if (ns > h->max_ns)
        h->max_ns = ns;
}

static void h_merge(struct hist *dst, const struct hist *src)
{
    for (unsigned i = 0; i < H_BUCKETS; i++)
        dst->counts[i] += src->counts[i];
    dst->n += src->n;
    dst->sum_ns += src->sum_ns;
    if (src->max_ns > dst->max_ns)
        dst->max_ns = src->max_ns;
}

/* Quantile q in milliseconds (NaN when empty). */
static double h_quantile_ms(const struct hist *h, double q)
{
    if (h->n == 0)
        return __builtin_nan("");
    uint64_t rank = (uint64_t)(q * (double)h->n + 0.5);
    if (rank < 1)
        rank = 1;
    uint64_t seen = 0;
    for (unsigned i = 0; i < H_BUCKETS; i++) {
        seen += h->counts[i];
        if (seen >= rank) {
            double v = h_value(i);
            if (v > (double)h->max_ns)
                v = (double)h->max_ns;
            return v / 1e6;
        }
    }
    return (double)h->max_ns / 1e6;
}

/* ---- small helpers ------------------------------------------------------------------------- */

static void b64(const char *src, char *dst, size_t cap)
{
    static const char tbl[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t len = strlen(src), o = 0;
    for (size_t i = 0; i < len && o + 5 < cap; i += 3) {
        uint32_t v = (uint32_t)(unsigned char)src[i] << 16;
        if (i + 1 < len)
            v |= (uint32_t)(unsigned char)src[i + 1] << 8;
        if (i + 2 < len)
            v |= (uint32_t)(unsigned char)src[i + 2];
        dst[o++] = tbl[(v >> 18) & 63];
        dst[o++] = tbl[(v >> 12) & 63];
        dst[o++] = i + 1 < len ? tbl[(v >> 6) & 63] : '=';
        dst[o++] = i + 2 < len ? tbl[v & 63] : '=';
    }
    dst[o] = '\0';
}

/* Finds "field": in a JSON body and copies the value that follows (a string without its
 * quotes, or a bare number) into dst. Enough for the flat answers parsed here. */
static bool json_field(const char *body, size_t len, const char *field, char *dst, size_t cap)
{
    char pat[64];
    int pn = snprintf(pat, sizeof(pat), "\"%s\"", field);
    if (pn <= 0 || (size_t)pn >= sizeof(pat))
        return false;
    const char *end = body + len;
    const char *p = body;
    while (p < end) {
        const char *hit = memmem(p, (size_t)(end - p), pat, (size_t)pn);
        if (!hit)
            return false;
        const char *v = hit + pn;
        while (v < end && (*v == ' ' || *v == '\t' || *v == '\n' || *v == '\r'))
            v++;
        if (v >= end || *v != ':') {
            p = hit + 1;
            continue;
        }
        v++;
        while (v < end && (*v == ' ' || *v == '\t' || *v == '\n' || *v == '\r'))
            v++;
        size_t n = 0;
        if (v < end && *v == '"') {
            v++;
            while (v + n < end && v[n] != '"')
                n++;
        } else {
            while (v + n < end && ((v[n] >= '0' && v[n] <= '9') || v[n] == '-'))
                n++;
        }
        if (n == 0 || n >= cap)
            return false;
        memcpy(dst, v, n);
        dst[n] = '\0';
        return true;
    }
    return false;
}

static bool parse_u64(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end)
        return false;
    *out = v;
    return true;
}

/* ---- workloads ----------------------------------------------------------------------------- */

enum workload {
    W_GW_COUNTER,
    W_GW_LOCK,
    W_ETCD_PUT,
    W_ETCD_LOCK,
    W_REDIS_INCR,
    W_REDIS_LOCK,
    W_HTTP_GET,
};

static const char *const workload_names[] = {"gw-counter", "etcd-put", "redis-incr", "gw-lock",
                                             "etcd-lock",  "redis-lock", "http-get"};
static const enum workload workload_ids[] = {W_GW_COUNTER, W_ETCD_PUT,  W_REDIS_INCR, W_GW_LOCK,
                                             W_ETCD_LOCK,  W_REDIS_LOCK, W_HTTP_GET};

static const char *workload_name(enum workload w)
{
    for (size_t i = 0; i < sizeof(workload_ids) / sizeof(workload_ids[0]); i++)
        if (workload_ids[i] == w)
            return workload_names[i];
    return "?";
}

static bool is_resp(enum workload w) { return w == W_REDIS_INCR || w == W_REDIS_LOCK; }

/* Steps: 0 and 1 are the operation's requests; STEP_SETUP comes once per connection lifetime
 * (the etcd lease). */
#define STEP_SETUP 9

/* ---- configuration and shared state -------------------------------------------------------- */

struct addr {
    char text[64];
    struct sockaddr_in sa;
};

struct opts {
    enum workload wl;
    struct addr addrs[MAX_ADDRS];
    int naddrs;
    int clients;
    int threads;
    double duration_s;
    double warmup_s;
    int timeout_ms;
    char prefix[64];
    bool selftest;
    bool quiet;
    /* probe */
    bool probe;
    int interval_ms;
    pid_t kill_pid;
    int kill_after_ms;
    int max_wait_ms;
    int pool;
};

static struct opts O;

struct stats {
    struct hist op;
    struct hist step[2];
    uint64_t errors, timeouts, reconnects, conn_errors;
    uint64_t status_counts[6]; /* by class: 0 other, 1xx..5xx */
    int logged;
};

enum cstate { CS_CLOSED, CS_CONNECTING, CS_READY, CS_BUSY };

struct conn {
    int fd;
    int id;
    const struct addr *addr;
    enum cstate state;
    bool want_out; /* EPOLLOUT armed */
    bool send_on_connect;
    int step;
    bool setup_done;
    uint64_t op_t0, req_t0, retry_at;
    uint64_t seq;
    char out[OUT_CAP];
    size_t olen, ooff;
    char *in;
    size_t ilen;
    char token[256];
    char lease[40];
    char name[160];
    char name_b64[256];
};

struct loop {
    int epfd;
    struct conn *conns;
    int nconns;
    struct stats st;
    uint64_t t_meas, t_end;
    /* probe */
    uint64_t kill_t, ack_after_kill_ns, any_ack_after_kill_ns, last_ack_before_kill;
    uint64_t acks_before, sent_after_kill, failed_after_kill;
    bool killed, done;
    char fail_note[512];
};

/* ---- request building ---------------------------------------------------------------------- */

static int http_req(struct conn *c, const char *method, const char *path, const char *body)
{
    size_t blen = body ? strlen(body) : 0;
    int n;
    if (body)
        n = snprintf(c->out, OUT_CAP,
                     "%s %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     "Content-Length: %zu\r\n\r\n%s",
                     method, path, c->addr->text, blen, body);
    else
        n = snprintf(c->out, OUT_CAP, "%s %s HTTP/1.1\r\nHost: %s\r\n\r\n", method, path,
                     c->addr->text);
    if (n < 0 || n >= OUT_CAP)
        return -1;
    c->olen = (size_t)n;
    c->ooff = 0;
    return 0;
}

static int resp_cmd(struct conn *c, int argc, const char *const *argv)
{
    size_t o = 0;
    int n = snprintf(c->out, OUT_CAP, "*%d\r\n", argc);
    if (n < 0 || n >= OUT_CAP)
        return -1;
    o = (size_t)n;
    for (int i = 0; i < argc; i++) {
        n = snprintf(c->out + o, OUT_CAP - o, "$%zu\r\n%s\r\n", strlen(argv[i]), argv[i]);
        if (n < 0 || (size_t)n >= OUT_CAP - o)
            return -1;
        o += (size_t)n;
    }
    c->olen = o;
    c->ooff = 0;
    return 0;
}

/* Fills c->out with the request for c->step. */
static int build_request(struct conn *c)
{
    char path[512], body[768];
    switch (O.wl) {
    case W_GW_COUNTER:
        snprintf(path, sizeof(path), "/v1/counters/%s", c->name);
        return http_req(c, "POST", path, "{\"add\":1}");
    case W_GW_LOCK:
        snprintf(path, sizeof(path), "/v1/locks/%s", c->name);
        if (c->step == 0) {
            snprintf(body, sizeof(body),
                     "{\"owner\":\"%s-owner-%d\",\"ttl_ms\":10000,\"wait_ms\":0}", O.prefix, c->id);
            return http_req(c, "POST", path, body);
        }
        snprintf(path, sizeof(path), "/v1/locks/%s?token=%s", c->name, c->token);
        return http_req(c, "DELETE", path, NULL);
    case W_ETCD_PUT: {
        char val[64], vb[96];
        snprintf(val, sizeof(val), "%d-%" PRIu64, c->id, c->seq);
        b64(val, vb, sizeof(vb));
        snprintf(body, sizeof(body), "{\"key\":\"%s\",\"value\":\"%s\"}", c->name_b64, vb);
        return http_req(c, "POST", "/v3/kv/put", body);
    }
    case W_ETCD_LOCK:
        if (c->step == STEP_SETUP)
            return http_req(c, "POST", "/v3/lease/grant", "{\"TTL\":120}");
        if (c->step == 0) {
            snprintf(body, sizeof(body), "{\"name\":\"%s\",\"lease\":\"%s\"}", c->name_b64,
                     c->lease);
            return http_req(c, "POST", "/v3/lock/lock", body);
        }
        snprintf(body, sizeof(body), "{\"key\":\"%s\"}", c->token);
        return http_req(c, "POST", "/v3/lock/unlock", body);
    case W_REDIS_INCR: {
        const char *argv[] = {"INCR", c->name};
        return resp_cmd(c, 2, argv);
    }
    case W_REDIS_LOCK:
        if (c->step == 0) {
            char val[96];
            snprintf(val, sizeof(val), "%s-%d-%" PRIu64, O.prefix, c->id, c->seq);
            const char *argv[] = {"SET", c->name, val, "NX", "PX", "10000"};
            return resp_cmd(c, 6, argv);
        } else {
            const char *argv[] = {"DEL", c->name};
            return resp_cmd(c, 2, argv);
        }
    case W_HTTP_GET:
        return http_req(c, "GET", "/", NULL);
    }
    return -1;
}

/* ---- response parsing ---------------------------------------------------------------------- */

struct reply {
    int status;        /* HTTP status; for RESP: the type byte */
    const char *body;  /* HTTP body (decoded) or RESP payload line */
    size_t body_len;
    bool close;        /* server said Connection: close */
};

/* Decodes a chunked body in place starting at p; returns bytes consumed from p, 0 if
 * incomplete (nothing is changed then), -1 if malformed. The decoded body is at p, *dlen bytes. */
static long dechunk(char *p, size_t avail, size_t *dlen)
{
    for (int pass = 0; pass < 2; pass++) {
        size_t r = 0, w = 0;
        for (;;) {
            char *crlf = memmem(p + r, avail - r, "\r\n", 2);
            if (!crlf)
                return 0;
            char *end;
            unsigned long sz = strtoul(p + r, &end, 16);
            if (end == p + r)
                return -1;
            size_t data = (size_t)(crlf - p) + 2;
            if (sz == 0) {
                size_t q = data; /* trailers end with an empty line */
                for (;;) {
                    char *e = memmem(p + q, avail - q, "\r\n", 2);
                    if (!e)
                        return 0;
                    if (e == p + q)
                        break;
                    q = (size_t)(e - p) + 2;
                }
                if (pass == 1) {
                    *dlen = w;
                    return (long)(q + 2);
                }
                break;
            }
            if (data + sz + 2 > avail)
                return 0;
            if (pass == 1)
                memmove(p + w, p + data, sz); /* w <= data: the rest is not touched */
            w += sz;
            r = data + sz + 2;
        }
    }
    return -1;
}

/* Returns the number of bytes of c->in the reply took, 0 if incomplete, -1 if malformed. */
static long parse_http(struct conn *c, struct reply *rep)
{
    char *buf = c->in;
    size_t len = c->ilen;
    char *hend = memmem(buf, len, "\r\n\r\n", 4);
    if (!hend)
        return len > IN_CAP - 1024 ? -1 : 0;
    size_t hlen = (size_t)(hend - buf) + 4;
    if (len < 12 || memcmp(buf, "HTTP/1.", 7) != 0)
        return -1;
    rep->status = (int)strtol(buf + 9, NULL, 10);
    rep->close = false;
    long clen = -1;
    bool chunked = false;
    for (char *line = memmem(buf, hlen, "\r\n", 2) + 2; line < hend;) {
        char *eol = memmem(line, (size_t)(hend + 2 - line), "\r\n", 2);
        if (!eol)
            break;
        size_t ll = (size_t)(eol - line);
        if (ll > 15 && strncasecmp(line, "content-length:", 15) == 0)
            clen = strtol(line + 15, NULL, 10);
        else if (ll > 18 && strncasecmp(line, "transfer-encoding:", 18) == 0 &&
                 memmem(line, ll, "chunked", 7))
            chunked = true;
        else if (ll > 11 && strncasecmp(line, "connection:", 11) == 0 &&
                 memmem(line, ll, "close", 5))
            rep->close = true;
        line = eol + 2;
    }
    if (rep->status == 204 || rep->status == 304 || (rep->status >= 100 && rep->status < 200)) {
        rep->body = buf + hlen;
        rep->body_len = 0;
        return (long)hlen;
    }
    if (chunked) {
        size_t dlen = 0;
        long used = dechunk(buf + hlen, len - hlen, &dlen);
        if (used <= 0)
            return used;
        rep->body = buf + hlen;
        rep->body_len = dlen;
        return (long)hlen + used;
    }
    if (clen < 0)
        return -1; /* read-until-close bodies are not used by the servers measured here */
    if (hlen + (size_t)clen > len)
        return hlen + (size_t)clen > IN_CAP ? -1 : 0;
    rep->body = buf + hlen;
    rep->body_len = (size_t)clen;
    return (long)(hlen + (size_t)clen);
}

static long parse_resp(struct conn *c, struct reply *rep)
{
    char *buf = c->in;
    size_t len = c->ilen;
    if (len < 3)
        return 0;
    char *eol = memmem(buf, len, "\r\n", 2);
    if (!eol)
        return 0;
    size_t line = (size_t)(eol - buf);
    rep->status = buf[0];
    rep->close = false;
    rep->body = buf + 1;
    rep->body_len = line - 1;
    if (buf[0] == '+' || buf[0] == '-' || buf[0] == ':')
        return (long)(line + 2);
    if (buf[0] == '$') {
        long n = strtol(buf + 1, NULL, 10);
        if (n < 0)
            return (long)(line + 2);
        if (line + 2 + (size_t)n + 2 > len)
            return 0;
        rep->body = eol + 2;
        rep->body_len = (size_t)n;
        return (long)(line + 2 + (size_t)n + 2);
    }
    return -1;
}

/* ---- connections --------------------------------------------------------------------------- */

static void log_error(struct loop *lp, struct conn *c, const char *what, const struct reply *rep)
{
    if (O.quiet || lp->st.logged >= ERR_LOG_MAX)
        return;
    lp->st.logged++;
    if (rep && is_resp(O.wl))
        fprintf(stderr, "gw-bench-coord: client %d step %d: %s: %c%.*s\n", c->id, c->step, what,
                rep->status, (int)(rep->body_len > 200 ? 200 : rep->body_len), rep->body);
    else if (rep)
        fprintf(stderr, "gw-bench-coord: client %d step %d: %s: HTTP %d %.*s\n", c->id, c->step,
                what, rep->status, (int)(rep->body_len > 200 ? 200 : rep->body_len), rep->body);
    else
        fprintf(stderr, "gw-bench-coord: client %d step %d: %s (%s)\n", c->id, c->step, what,
                c->addr->text);
}

static void set_events(struct loop *lp, struct conn *c, bool out)
{
    if (c->want_out == out)
        return;
    struct epoll_event ev = {.events = EPOLLIN | (out ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(lp->epfd, EPOLL_CTL_MOD, c->fd, &ev);
    c->want_out = out;
}

static void conn_close(struct loop *lp, struct conn *c, uint64_t now, uint64_t backoff_ns)
{
    if (c->fd >= 0) {
        epoll_ctl(lp->epfd, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
    }
    c->fd = -1;
    c->state = CS_CLOSED;
    c->ilen = 0;
    c->retry_at = now + backoff_ns;
    c->setup_done = false;
}

static int conn_open(struct loop *lp, struct conn *c)
{
    if (!c->in && !(c->in = malloc(IN_CAP))) {
        fprintf(stderr, "gw-bench-coord: out of memory\n");
        exit(2);
    }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    c->fd = fd;
    c->ilen = 0;
    c->want_out = true;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
    if (epoll_ctl(lp->epfd, EPOLL_CTL_ADD, fd, &ev) != 0) {
        close(fd);
        c->fd = -1;
        return -1;
    }
    if (connect(fd, (const struct sockaddr *)&c->addr->sa, sizeof(c->addr->sa)) != 0 &&
        errno != EINPROGRESS) {
        epoll_ctl(lp->epfd, EPOLL_CTL_DEL, fd, NULL);
        close(fd);
        c->fd = -1;
        return -1;
    }
    c->state = CS_CONNECTING;
    return 0;
}

/* Writes what is pending; returns -1 on a broken connection. */
static int conn_flush(struct loop *lp, struct conn *c)
{
    while (c->ooff < c->olen) {
        ssize_t n = send(c->fd, c->out + c->ooff, c->olen - c->ooff, MSG_NOSIGNAL);
        if (n > 0) {
            c->ooff += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            set_events(lp, c, true);
            return 0;
        }
        return -1;
    }
    set_events(lp, c, false);
    return 0;
}

static void conn_fail(struct loop *lp, struct conn *c, uint64_t now, const char *what);

static void send_step(struct loop *lp, struct conn *c, uint64_t now)
{
    if (build_request(c) != 0) {
        fprintf(stderr, "gw-bench-coord: request too large\n");
        exit(2);
    }
    c->req_t0 = now;
    c->state = CS_BUSY;
    if (conn_flush(lp, c) != 0)
        conn_fail(lp, c, now, "send failed");
}

/* Starts the next operation on a connected, idle connection (closed-loop mode). */
static void start_op(struct loop *lp, struct conn *c, uint64_t now)
{
    if (now >= lp->t_end) {
        c->state = CS_READY;
        return;
    }
    c->seq++;
    if (O.wl == W_ETCD_LOCK && !c->setup_done) {
        c->step = STEP_SETUP;
    } else {
        c->step = 0;
        c->op_t0 = now;
    }
    send_step(lp, c, now);
}

static void conn_fail(struct loop *lp, struct conn *c, uint64_t now, const char *what)
{
    if (lp->t_end && now < lp->t_end)
        lp->st.conn_errors++;
    log_error(lp, c, what, NULL);
    conn_close(lp, c, now, 20000000ULL);
}

/* ---- closed-loop operation logic ----------------------------------------------------------- */

static void op_error(struct loop *lp, struct conn *c, uint64_t now, const struct reply *rep,
                     const char *what)
{
    if (now >= lp->t_meas && now <= lp->t_end)
        lp->st.errors++;
    log_error(lp, c, what, rep);
    if (O.wl == W_ETCD_LOCK)
        c->setup_done = false; /* the lease may be gone: grant a new one */
    if (O.wl == W_REDIS_LOCK && c->step == 0) {
        /* a stale key from a lost release: remove it so the next cycle can run */
        c->step = 1;
        send_step(lp, c, now);
        return;
    }
    start_op(lp, c, now);
}

static void op_step_done(struct loop *lp, struct conn *c, uint64_t now)
{
    if (c->step >= 0 && c->step < 2 && c->req_t0 >= lp->t_meas && now <= lp->t_end)
        h_record(&lp->st.step[c->step], now - c->req_t0);
}

static void op_done(struct loop *lp, struct conn *c, uint64_t now)
{
    op_step_done(lp, c, now);
    if (c->op_t0 >= lp->t_meas && now <= lp->t_end)
        h_record(&lp->st.op, now - c->op_t0);
    start_op(lp, c, now);
}

static void on_reply(struct loop *lp, struct conn *c, const struct reply *rep, uint64_t now)
{
    int s = rep->status;
    if (!is_resp(O.wl) && now >= lp->t_meas && now <= lp->t_end)
        lp->st.status_counts[s >= 100 && s < 600 ? s / 100 : 0]++;
    switch (O.wl) {
    case W_GW_COUNTER:
    case W_ETCD_PUT:
    case W_HTTP_GET:
        if (s != 200) {
            op_error(lp, c, now, rep, "unexpected status");
            return;
        }
        op_done(lp, c, now);
        return;
    case W_GW_LOCK:
        if (c->step == 0) {
            if (s != 200 || !json_field(rep->body, rep->body_len, "token", c->token,
                                        sizeof(c->token))) {
                op_error(lp, c, now, rep, "acquire failed");
                return;
            }
            op_step_done(lp, c, now);
            c->step = 1;
            send_step(lp, c, now);
            return;
        }
        if (s != 204) {
            op_error(lp, c, now, rep, "release failed");
            return;
        }
        op_done(lp, c, now);
        return;
    case W_ETCD_LOCK:
        if (c->step == STEP_SETUP) {
            if (s != 200 || !json_field(rep->body, rep->body_len, "ID", c->lease, sizeof(c->lease))) {
                op_error(lp, c, now, rep, "lease grant failed");
                return;
            }
            c->setup_done = true;
            c->step = 0;
            c->op_t0 = now;
            send_step(lp, c, now);
            return;
        }
        if (c->step == 0) {
            if (s != 200 || !json_field(rep->body, rep->body_len, "key", c->token,
                                        sizeof(c->token))) {
                op_error(lp, c, now, rep, "lock failed");
                return;
            }
            op_step_done(lp, c, now);
            c->step = 1;
            send_step(lp, c, now);
            return;
        }
        if (s != 200) {
            op_error(lp, c, now, rep, "unlock failed");
            return;
        }
        op_done(lp, c, now);
        return;
    case W_REDIS_INCR:
        if (s != ':') {
            op_error(lp, c, now, rep, "INCR failed");
            return;
        }
        op_done(lp, c, now);
        return;
    case W_REDIS_LOCK:
        if (c->step == 0) {
            if (s != '+') {
                op_error(lp, c, now, rep, "SET NX failed");
                return;
            }
            op_step_done(lp, c, now);
            c->step = 1;
            send_step(lp, c, now);
            return;
        }
        if (s != ':' || rep->body_len != 1 || rep->body[0] != '1') {
            if (s == ':') {
                op_error(lp, c, now, rep, "DEL found no key");
                return;
            }
            op_error(lp, c, now, rep, "DEL failed");
            return;
        }
        op_done(lp, c, now);
        return;
    }
}

/* ---- probe logic --------------------------------------------------------------------------- */

static void probe_note(struct loop *lp, const struct reply *rep, const char *what)
{
    size_t used = strlen(lp->fail_note);
    if (used > sizeof(lp->fail_note) - 80)
        return;
    char code[48] = "";
    if (rep && rep->body_len)
        json_field(rep->body, rep->body_len, "code", code, sizeof(code));
    if (rep && !code[0] && rep->body_len)
        json_field(rep->body, rep->body_len, "error", code, sizeof(code));
    for (char *p = code; *p; p++)
        if (*p == ' ')
            *p = '_';
    char item[96];
    if (rep)
        snprintf(item, sizeof(item), "%s%d%s%.32s", used ? "," : "", rep->status, code[0] ? ":" : "",
                 code);
    else
        snprintf(item, sizeof(item), "%s%s", used ? "," : "", what);
    /* collapse a run of the same note */
    const char *last = strrchr(lp->fail_note, ',');
    last = last ? last + 1 : lp->fail_note;
    const char *it = item[0] == ',' ? item + 1 : item;
    if (used && strncmp(last, it, strlen(it)) == 0 &&
        (last[strlen(it)] == '\0' || last[strlen(it)] == 'x'))
        return;
    snprintf(lp->fail_note + used, sizeof(lp->fail_note) - used, "%s", item);
}

static void probe_reply(struct loop *lp, struct conn *c, const struct reply *rep, uint64_t now)
{
    bool ok = rep->status == 200;
    c->state = CS_READY;
    if (!lp->killed) {
        if (ok) {
            lp->acks_before++;
            lp->last_ack_before_kill = now;
        }
        return;
    }
    if (ok) {
        if (!lp->any_ack_after_kill_ns)
            lp->any_ack_after_kill_ns = now - lp->kill_t;
        if (c->req_t0 >= lp->kill_t && !lp->ack_after_kill_ns) {
            lp->ack_after_kill_ns = now - lp->kill_t;
            lp->done = true;
        }
    } else {
        lp->failed_after_kill++;
        probe_note(lp, rep, NULL);
    }
}

/* ---- the event loop ------------------------------------------------------------------------ */

static void handle_io(struct loop *lp, struct conn *c, uint32_t ev, uint64_t now)
{
    if (c->state == CS_CONNECTING) {
        if (!(ev & (EPOLLOUT | EPOLLERR | EPOLLHUP)))
            return;
        int err = 0;
        socklen_t el = sizeof(err);
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
        if (err || (ev & (EPOLLERR | EPOLLHUP))) {
            if (O.probe && lp->killed)
                probe_note(lp, NULL, "connect_refused");
            conn_fail(lp, c, now, "connect failed");
            return;
        }
        c->state = CS_READY;
        set_events(lp, c, false);
        if (O.probe) {
            if (c->send_on_connect) {
                c->send_on_connect = false;
                c->step = 0;
                c->seq++;
                if (lp->killed)
                    lp->sent_after_kill++;
                send_step(lp, c, now);
            }
            return;
        }
        start_op(lp, c, now);
        return;
    }
    if ((ev & EPOLLOUT) && c->state == CS_BUSY && c->ooff < c->olen) {
        if (conn_flush(lp, c) != 0) {
            conn_fail(lp, c, now, "send failed");
            return;
        }
    }
    if (!(ev & (EPOLLIN | EPOLLERR | EPOLLHUP)))
        return;
    for (;;) {
        if (c->ilen >= IN_CAP) {
            conn_fail(lp, c, now, "reply too large");
            return;
        }
        ssize_t n = recv(c->fd, c->in + c->ilen, IN_CAP - c->ilen, 0);
        if (n > 0) {
            c->ilen += (size_t)n;
            if (c->ilen < IN_CAP)
                break;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        if (O.probe && lp->killed && c->state == CS_BUSY)
            probe_note(lp, NULL, n == 0 ? "closed" : "reset");
        conn_fail(lp, c, now, n == 0 ? "closed by server" : "receive failed");
        return;
    }
    while (c->ilen > 0 && c->fd >= 0) {
        if (c->state != CS_BUSY) {
            conn_fail(lp, c, now, "unsolicited data");
            return;
        }
        struct reply rep;
        long used = is_resp(O.wl) ? parse_resp(c, &rep) : parse_http(c, &rep);
        if (used == 0)
            return;
        if (used < 0) {
            conn_fail(lp, c, now, "malformed reply");
            return;
        }
        /* the reply points into c->in: handle it before shifting the buffer */
        bool close_after = rep.close;
        if (O.probe)
            probe_reply(lp, c, &rep, now);
        else
            on_reply(lp, c, &rep, now);
        if (c->fd < 0)
            return;
        memmove(c->in, c->in + used, c->ilen - (size_t)used);
        c->ilen -= (size_t)used;
        if (close_after) {
            conn_close(lp, c, now, 0);
            return;
        }
    }
}

static void check_timers(struct loop *lp, uint64_t now)
{
    uint64_t tmo = (uint64_t)O.timeout_ms * 1000000ULL;
    for (int i = 0; i < lp->nconns; i++) {
        struct conn *c = &lp->conns[i];
        if ((c->state == CS_BUSY || c->state == CS_CONNECTING) && now - c->req_t0 > tmo) {
            if (now < lp->t_end)
                lp->st.timeouts++;
            if (O.probe && lp->killed)
                probe_note(lp, NULL, "timeout");
            log_error(lp, c, "timed out", NULL);
            conn_close(lp, c, now, 0);
        }
        if (!O.probe && c->state == CS_CLOSED && now >= c->retry_at && now < lp->t_end) {
            lp->st.reconnects++;
            c->req_t0 = now;
            if (conn_open(lp, c) != 0)
                conn_fail(lp, c, now, "connect failed");
        }
    }
}

static void conn_init(struct conn *c, int id)
{
    memset(c, 0, sizeof(*c));
    c->fd = -1;
    c->id = id;
    c->addr = &O.addrs[id % O.naddrs];
    switch (O.wl) {
    case W_GW_COUNTER:
        snprintf(c->name, sizeof(c->name), "%s-counter", O.prefix);
        break;
    case W_ETCD_PUT:
        snprintf(c->name, sizeof(c->name), "%s/counter", O.prefix);
        break;
    case W_REDIS_INCR:
        snprintf(c->name, sizeof(c->name), "%s:counter", O.prefix);
        break;
    case W_GW_LOCK:
        snprintf(c->name, sizeof(c->name), "%s-lock-%d", O.prefix, id);
        break;
    case W_ETCD_LOCK:
        snprintf(c->name, sizeof(c->name), "%s/lock/%d", O.prefix, id);
        break;
    case W_REDIS_LOCK:
        snprintf(c->name, sizeof(c->name), "%s:lock:%d", O.prefix, id);
        break;
    case W_HTTP_GET:
        break;
    }
    b64(c->name, c->name_b64, sizeof(c->name_b64));
}

struct worker {
    pthread_t th;
    struct loop lp;
    int first, count;
    uint64_t t_start;
};

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    struct loop *lp = &w->lp;
    lp->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (lp->epfd < 0) {
        perror("epoll_create1");
        exit(2);
    }
    lp->nconns = w->count;
    lp->conns = calloc((size_t)w->count, sizeof(struct conn));
    if (!lp->conns) {
        fprintf(stderr, "gw-bench-coord: out of memory\n");
        exit(2);
    }
    uint64_t now = mono_ns();
    for (int i = 0; i < w->count; i++) {
        struct conn *c = &lp->conns[i];
        conn_init(c, w->first + i);
        c->req_t0 = now;
        if (conn_open(lp, c) != 0)
            conn_fail(lp, c, now, "connect failed");
    }
    struct epoll_event evs[256];
    while ((now = mono_ns()) < lp->t_end) {
        uint64_t left_ms = (lp->t_end - now) / 1000000ULL;
        int n = epoll_wait(lp->epfd, evs, 256, left_ms < 5 ? (int)left_ms + 1 : 5);
        now = mono_ns();
        for (int i = 0; i < n; i++)
            handle_io(lp, evs[i].data.ptr, evs[i].events, now);
        check_timers(lp, now);
    }
    for (int i = 0; i < lp->nconns; i++) {
        if (lp->conns[i].fd >= 0)
            close(lp->conns[i].fd);
        free(lp->conns[i].in);
    }
    free(lp->conns);
    close(lp->epfd);
    return NULL;
}

static void print_result(struct stats *st, double cpu)
{
    double secs = O.duration_s;
    double rps = (double)st->op.n / secs;
    double mean = st->op.n ? (double)st->op.sum_ns / (double)st->op.n / 1e6 : 0.0;
    printf("%-11s clients=%-4d %10.0f ops/s  p50 %7.2f ms  p99 %7.2f ms  max %7.2f ms  errors %" PRIu64
           "  (generator cpu %.2f cores)\n",
           workload_name(O.wl), O.clients, rps, h_quantile_ms(&st->op, 0.50),
           h_quantile_ms(&st->op, 0.99), (double)st->op.max_ns / 1e6,
           st->errors + st->timeouts + st->conn_errors, cpu / (secs + O.warmup_s));
    printf("RESULT workload=%s clients=%d seconds=%.2f ops=%" PRIu64
           " rps=%.1f p50_ms=%.3f p90_ms=%.3f p99_ms=%.3f p999_ms=%.3f max_ms=%.3f mean_ms=%.3f"
           " step0_p50_ms=%.3f step0_p99_ms=%.3f step1_p50_ms=%.3f step1_p99_ms=%.3f"
           " errors=%" PRIu64 " timeouts=%" PRIu64 " conn_errors=%" PRIu64 " reconnects=%" PRIu64
           " http_2xx=%" PRIu64 " http_4xx=%" PRIu64 " http_5xx=%" PRIu64 " gen_cpu_cores=%.3f\n",
           workload_name(O.wl), O.clients, secs, st->op.n, rps, h_quantile_ms(&st->op, 0.50),
           h_quantile_ms(&st->op, 0.90), h_quantile_ms(&st->op, 0.99),
           h_quantile_ms(&st->op, 0.999), (double)st->op.max_ns / 1e6, mean,
           h_quantile_ms(&st->step[0], 0.50), h_quantile_ms(&st->step[0], 0.99),
           h_quantile_ms(&st->step[1], 0.50), h_quantile_ms(&st->step[1], 0.99), st->errors,
           st->timeouts, st->conn_errors, st->reconnects, st->status_counts[2],
           st->status_counts[4], st->status_counts[5], cpu / (secs + O.warmup_s));
    fflush(stdout);
}

static int run_closed_loop(void)
{
    int threads = O.threads < 1 ? 1 : O.threads;
    if (threads > O.clients)
        threads = O.clients;
    struct worker *ws = calloc((size_t)threads, sizeof(*ws));
    if (!ws)
        return 2;
    uint64_t t0 = mono_ns();
    uint64_t t_meas = t0 + (uint64_t)(O.warmup_s * 1e9);
    uint64_t t_end = t_meas + (uint64_t)(O.duration_s * 1e9);
    double cpu0 = cpu_seconds();
    int first = 0;
    for (int i = 0; i < threads; i++) {
        ws[i].first = first;
        ws[i].count = O.clients / threads + (i < O.clients % threads ? 1 : 0);
        first += ws[i].count;
        ws[i].lp.t_meas = t_meas;
        ws[i].lp.t_end = t_end;
        if (pthread_create(&ws[i].th, NULL, worker_main, &ws[i]) != 0) {
            fprintf(stderr, "gw-bench-coord: cannot start a thread\n");
            return 2;
        }
    }
    struct stats *total = calloc(1, sizeof(*total));
    if (!total)
        return 2;
    for (int i = 0; i < threads; i++) {
        pthread_join(ws[i].th, NULL);
        struct stats *s = &ws[i].lp.st;
        h_merge(&total->op, &s->op);
        h_merge(&total->step[0], &s->step[0]);
        h_merge(&total->step[1], &s->step[1]);
        total->errors += s->errors;
        total->timeouts += s->timeouts;
        total->conn_errors += s->conn_errors;
        total->reconnects += s->reconnects;
        for (int k = 0; k < 6; k++)
            total->status_counts[k] += s->status_counts[k];
    }
    print_result(total, cpu_seconds() - cpu0);
    free(total);
    free(ws);
    return 0;
}

/* ---- failover probe ------------------------------------------------------------------------ */

static int run_probe(void)
{
    if (O.wl != W_GW_COUNTER && O.wl != W_ETCD_PUT) {
        fprintf(stderr, "gw-bench-coord: --probe needs gw-counter or etcd-put\n");
        return 2;
    }
    struct loop *lp = calloc(1, sizeof(*lp));
    if (!lp)
        return 2;
    lp->epfd = epoll_create1(EPOLL_CLOEXEC);
    lp->nconns = O.pool;
    lp->conns = calloc((size_t)O.pool, sizeof(struct conn));
    if (lp->epfd < 0 || !lp->conns)
        return 2;
    for (int i = 0; i < O.pool; i++) {
        conn_init(&lp->conns[i], 0);
        lp->conns[i].id = i;
    }
    uint64_t start = mono_ns();
    uint64_t interval = (uint64_t)O.interval_ms * 1000000ULL;
    uint64_t next_send = start;
    uint64_t give_up = start + (uint64_t)(O.kill_after_ms + O.max_wait_ms) * 1000000ULL;
    lp->t_meas = start;
    lp->t_end = UINT64_MAX;
    uint64_t sent = 0, skipped = 0;
    struct epoll_event evs[64];
    for (;;) {
        uint64_t now = mono_ns();
        if (lp->done)
            break;
        if (now >= give_up || (lp->killed && now - lp->kill_t > (uint64_t)O.max_wait_ms * 1000000ULL))
            break;
        if (!lp->killed && now - start >= (uint64_t)O.kill_after_ms * 1000000ULL &&
            lp->acks_before > 0) {
            if (O.kill_pid > 0 && kill(O.kill_pid, SIGKILL) != 0) {
                perror("gw-bench-coord: kill");
                return 2;
            }
            lp->kill_t = mono_ns();
            lp->killed = true;
            next_send = lp->kill_t;
            now = lp->kill_t;
        }
        if (now >= next_send) {
            next_send += interval;
            if (next_send < now)
                next_send = now + interval;
            struct conn *pick = NULL, *closed = NULL;
            for (int i = 0; i < O.pool && !pick; i++) {
                struct conn *c = &lp->conns[i];
                if (c->state == CS_READY)
                    pick = c;
                else if (c->state == CS_CLOSED && !closed && now >= c->retry_at)
                    closed = c;
            }
            if (pick) {
                pick->seq++;
                pick->step = 0;
                if (lp->killed)
                    lp->sent_after_kill++;
                sent++;
                send_step(lp, pick, now);
            } else if (closed) {
                closed->req_t0 = now;
                closed->send_on_connect = true;
                sent++;
                if (conn_open(lp, closed) != 0)
                    conn_close(lp, closed, now, 5000000ULL);
            } else {
                skipped++;
            }
        }
        int wait_ms = (int)((next_send > now ? next_send - now : 0) / 1000000ULL) + 1;
        int n = epoll_wait(lp->epfd, evs, 64, wait_ms);
        now = mono_ns();
        for (int i = 0; i < n; i++)
            handle_io(lp, evs[i].data.ptr, evs[i].events, now);
        check_timers(lp, now);
    }
    if (!lp->killed) {
        printf("FAILOVER ack_ms=none reason=no_ack_before_kill acks_before=%" PRIu64 "\n",
               lp->acks_before);
        return 1;
    }
    char ack[32], any[32];
    if (lp->ack_after_kill_ns)
        snprintf(ack, sizeof(ack), "%.1f", (double)lp->ack_after_kill_ns / 1e6);
    else
        snprintf(ack, sizeof(ack), "timeout");
    if (lp->any_ack_after_kill_ns)
        snprintf(any, sizeof(any), "%.1f", (double)lp->any_ack_after_kill_ns / 1e6);
    else
        snprintf(any, sizeof(any), "none");
    printf("FAILOVER ack_ms=%s first_any_ack_ms=%s last_ack_before_kill_ms=%.1f acks_before=%" PRIu64
           " sent_after_kill=%" PRIu64 " failed_after_kill=%" PRIu64 " skipped_ticks=%" PRIu64
           " failures=%s\n",
           ack, any, (double)(lp->kill_t - lp->last_ack_before_kill) / 1e6, lp->acks_before,
           lp->sent_after_kill, lp->failed_after_kill, skipped,
           lp->fail_note[0] ? lp->fail_note : "none");
    fflush(stdout);
    return lp->ack_after_kill_ns ? 0 : 1;
}

/* ---- the trivial server of --selftest ------------------------------------------------------ */

struct tsrv {
    int lfd, epfd;
    volatile int stop;
};

static void *tsrv_main(void *arg)
{
    struct tsrv *s = arg;
    static const char resp[] = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    struct epoll_event evs[128];
    static char buf[65536];
    while (!s->stop) {
        int n = epoll_wait(s->epfd, evs, 128, 50);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == s->lfd) {
                int cfd;
                while ((cfd = accept4(s->lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
                    int one = 1;
                    setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
                    struct epoll_event ev = {.events = EPOLLIN, .data.fd = cfd};
                    epoll_ctl(s->epfd, EPOLL_CTL_ADD, cfd, &ev);
                }
                continue;
            }
            ssize_t r = recv(fd, buf, sizeof(buf), 0);
            if (r <= 0) {
                if (r < 0 && (errno == EAGAIN || errno == EINTR))
                    continue;
                close(fd);
                continue;
            }
            /* one reply per request head (requests here carry no body) */
            int heads = 0;
            for (ssize_t k = 0; k + 3 < r; k++)
                if (buf[k] == '\r' && buf[k + 1] == '\n' && buf[k + 2] == '\r' && buf[k + 3] == '\n')
                    heads++;
            for (int h = 0; h < heads; h++)
                if (send(fd, resp, sizeof(resp) - 1, MSG_NOSIGNAL) < 0)
                    break;
        }
    }
    return NULL;
}

static int start_tsrv(struct tsrv *s, pthread_t *th)
{
    s->lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof(sa);
    if (s->lfd < 0 || bind(s->lfd, (struct sockaddr *)&sa, sizeof(sa)) != 0 ||
        listen(s->lfd, 1024) != 0 || getsockname(s->lfd, (struct sockaddr *)&sa, &sl) != 0)
        return -1;
    s->epfd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = s->lfd};
    epoll_ctl(s->epfd, EPOLL_CTL_ADD, s->lfd, &ev);
    O.naddrs = 1;
    O.addrs[0].sa = sa;
    snprintf(O.addrs[0].text, sizeof(O.addrs[0].text), "127.0.0.1:%d", ntohs(sa.sin_port));
    return pthread_create(th, NULL, tsrv_main, s);
}

/* ---- command line -------------------------------------------------------------------------- */

static void usage(void)
{
    fprintf(stderr,
            "usage: gw-bench-coord -w WORKLOAD -a HOST:PORT[,HOST:PORT...] [-c CLIENTS] [-d SECONDS]\n"
            "                      [--warmup SECONDS] [--threads N] [--timeout-ms MS] [--prefix P]\n"
            "       gw-bench-coord --selftest [-c CLIENTS] [-d SECONDS] [--threads N]\n"
            "       gw-bench-coord --probe -w gw-counter|etcd-put -a HOST:PORT --kill-pid PID\n"
            "                      [--kill-after-ms MS] [--interval-ms MS] [--max-wait-ms MS] [--pool N]\n"
            "workloads: gw-counter gw-lock etcd-put etcd-lock redis-incr redis-lock http-get\n");
}

static int parse_addrs(const char *list)
{
    char tmp[1024];
    snprintf(tmp, sizeof(tmp), "%s", list);
    char *save = NULL;
    for (char *tok = strtok_r(tmp, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        if (O.naddrs >= MAX_ADDRS)
            return -1;
        struct addr *a = &O.addrs[O.naddrs];
        char *colon = strrchr(tok, ':');
        uint64_t port;
        if (!colon)
            return -1;
        *colon = '\0';
        if (!parse_u64(colon + 1, &port) || port == 0 || port > 65535)
            return -1;
        memset(&a->sa, 0, sizeof(a->sa));
        a->sa.sin_family = AF_INET;
        a->sa.sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, strcmp(tok, "localhost") == 0 ? "127.0.0.1" : tok,
                      &a->sa.sin_addr) != 1)
            return -1;
        snprintf(a->text, sizeof(a->text), "%s:%u", tok, (unsigned)port);
        O.naddrs++;
    }
    return O.naddrs > 0 ? 0 : -1;
}

static bool num_arg(const char *s, double lo, double hi, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || v < lo || v > hi)
        return false;
    *out = v;
    return true;
}

int main(int argc, char **argv)
{
    O.clients = 16;
    O.threads = 1;
    O.duration_s = 6;
    O.warmup_s = 1;
    O.timeout_ms = 10000;
    O.interval_ms = 5;
    O.kill_after_ms = 1000;
    O.max_wait_ms = 15000;
    O.pool = 1024;
    O.wl = W_HTTP_GET;
    snprintf(O.prefix, sizeof(O.prefix), "bench%ld", (long)getpid());
    bool have_wl = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        double d;
        if (strcmp(a, "--selftest") == 0) {
            O.selftest = true;
            continue;
        }
        if (strcmp(a, "--probe") == 0) {
            O.probe = true;
            continue;
        }
        if (strcmp(a, "-q") == 0 || strcmp(a, "--quiet") == 0) {
            O.quiet = true;
            continue;
        }
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage();
            return 0;
        }
        if (!v) {
            usage();
            return 2;
        }
        i++;
        if (strcmp(a, "-w") == 0 || strcmp(a, "--workload") == 0) {
            bool found = false;
            for (size_t k = 0; k < sizeof(workload_ids) / sizeof(workload_ids[0]); k++)
                if (strcmp(v, workload_names[k]) == 0) {
                    O.wl = workload_ids[k];
                    found = true;
                }
            if (!found) {
                fprintf(stderr, "gw-bench-coord: unknown workload %s\n", v);
                return 2;
            }
            have_wl = true;
        } else if (strcmp(a, "-a") == 0 || strcmp(a, "--addr") == 0) {
            if (parse_addrs(v) != 0) {
                fprintf(stderr, "gw-bench-coord: bad address list %s\n", v);
                return 2;
            }
        } else if ((strcmp(a, "-c") == 0 || strcmp(a, "--clients") == 0) &&
                   num_arg(v, 1, MAX_CLIENTS, &d)) {
            O.clients = (int)d;
        } else if ((strcmp(a, "-d") == 0 || strcmp(a, "--duration") == 0) &&
                   num_arg(v, 0.1, 3600, &d)) {
            O.duration_s = d;
        } else if (strcmp(a, "--warmup") == 0 && num_arg(v, 0, 600, &d)) {
            O.warmup_s = d;
        } else if (strcmp(a, "--threads") == 0 && num_arg(v, 1, MAX_THREADS, &d)) {
            O.threads = (int)d;
        } else if (strcmp(a, "--timeout-ms") == 0 && num_arg(v, 1, 600000, &d)) {
            O.timeout_ms = (int)d;
        } else if (strcmp(a, "--prefix") == 0 && strlen(v) < sizeof(O.prefix)) {
            snprintf(O.prefix, sizeof(O.prefix), "%s", v);
        } else if (strcmp(a, "--interval-ms") == 0 && num_arg(v, 1, 10000, &d)) {
            O.interval_ms = (int)d;
        } else if (strcmp(a, "--kill-pid") == 0 && num_arg(v, 1, 1e9, &d)) {
            O.kill_pid = (pid_t)d;
        } else if (strcmp(a, "--kill-after-ms") == 0 && num_arg(v, 0, 600000, &d)) {
            O.kill_after_ms = (int)d;
        } else if (strcmp(a, "--pool") == 0 && num_arg(v, 1, PROBE_POOL_MAX, &d)) {
            O.pool = (int)d;
        } else if (strcmp(a, "--max-wait-ms") == 0 && num_arg(v, 1, 600000, &d)) {
            O.max_wait_ms = (int)d;
        } else {
            fprintf(stderr, "gw-bench-coord: bad option %s %s\n", a, v);
            usage();
            return 2;
        }
    }
    signal(SIGPIPE, SIG_IGN);
    if (O.selftest) {
        static struct tsrv srv;
        pthread_t th;
        O.wl = W_HTTP_GET;
        if (start_tsrv(&srv, &th) != 0) {
            perror("gw-bench-coord: trivial server");
            return 2;
        }
        int rc = run_closed_loop();
        srv.stop = 1;
        pthread_join(th, NULL);
        return rc;
    }
    if (!have_wl || O.naddrs == 0) {
        usage();
        return 2;
    }
    if (O.probe)
        return run_probe();
    return run_closed_loop();
}
