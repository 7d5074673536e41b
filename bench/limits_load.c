/*
 * limits_load.c - gw-bench-limits: the load generator of bench/limits.sh, which checks that a
 * rate limit shared by a cluster of gateways never admits more than its budget, how much of the
 * budget it does admit, and what the shared decision adds to each request's latency.
 *
 * N keep-alive HTTP/1.1 connections, each with at most one request in flight, send GET PATH to
 * the gateways given with -a (connection i to address i mod count), all in one epoll loop. Up to
 * four targets (-p PATH, each followed by its own limit) share the schedule, request k going to
 * target k mod count: routes loaded side by side see the same machine at the same instants, which
 * makes the difference of their latencies a paired comparison even on a busy machine. With
 * -r RATE the requests follow a fixed schedule (request k is due at t0 + k/RATE, on connection
 * k mod N; a connection that is still waiting sends as soon as its answer arrives, and one that
 * falls a whole interval behind drops the backlog, counted as "late"); with -r 0 every
 * connection sends again as soon as it is answered (closed loop). Latency is taken from the send
 * of a request to the last byte of its answer, into log-linear histograms kept apart for 2xx,
 * 429 and anything else.
 *
 * Every admitted (2xx) request is kept as the interval [send, receive]. The limiter decided it at
 * some instant inside that interval, which gives a proof of over-admission that no measurement
 * slop can fake: for a sliding window of W ms and limit L, the largest number of admitted
 * intervals that lie wholly inside some [t, t + W) ("strict" count) can only exceed L if the
 * limiter admitted more than L in a trailing window. For a token bucket (capacity C, refill R/s)
 * the same holds for intervals inside any [a, b] against C + R (b - a). The count by receive time
 * alone ("recv" count) is also reported; it can exceed the limit by the spread of proxy times.
 *
 * With --stats HOST:PORT the program also reads the upstream's own count of received requests
 * (gw-upstream's GET /__control/stats, field "received") before the first request, at every
 * window boundary and once after the last answer, so the admitted count per window is seen from
 * the upstream's side too (the sum over the targets when there are several).
 *
 * Output: human lines, then for each target the machine lines
 *   RESULT label=... kind=sw|tb ... admitted=... strict_max=... over=... util=... p50_2xx_us=...
 *   WINDOWS label=... client=a,b,c upstream=a,b,c
 */
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
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

#define MAX_ADDRS 8
#define MAX_TARGETS 4
#define MAX_CONNS 1024
#define MAX_WINDOWS 256
#define IN_CAP (32u << 10)
#define REQ_CAP 512
#define ADMITTED_MAX (4u << 20)
#define REQUEST_TIMEOUT_NS (5ULL * 1000000000ULL)

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

/* ---- histogram: log-linear over nanoseconds, 64 sub-buckets per power of two ------------------ */

#define H_SUB_BITS 6
#define H_SUB (1u << H_SUB_BITS)
#define H_TOP 40
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

static double h_value(unsigned i)
{
    if (i < 2 * H_SUB)
        return (double)i;
    unsigned shift = (i - 2 * H_SUB) / H_SUB + 1;
    uint64_t sub = (i - 2 * H_SUB) % H_SUB + H_SUB;
    return (double)(sub << shift) + (double)(1ULL << shift) / 2.0;
}

static void h_record(struct hist *h, uint64_t ns)
{
    h->counts[h_index(ns)]++;
    h->n++;
    h->sum_ns += ns;
    if (ns > h->max_ns)
        h->max_ns = ns;
}

/* Quantile q in microseconds; NaN when empty. */
static double h_quantile_us(const struct hist *h, double q)
{
    if (h->n == 0)
        return NAN;
    uint64_t rank = (uint64_t)(q * (double)h->n + 0.5);
    if (rank < 1)
        rank = 1;
    uint64_t seen = 0;
    for (unsigned i = 0; i < H_BUCKETS; i++) {
        seen += h->counts[i];
        if (seen >= rank) {
            double v = h_value(i);
            return (v > (double)h->max_ns ? (double)h->max_ns : v) / 1e3;
        }
    }
    return (double)h->max_ns / 1e3;
}

/* ---- options ------------------------------------------------------------------------------ */

struct addr {
    char text[64];
    struct sockaddr_in sa;
};

enum kind { K_SW, K_TB };

struct span {
    uint64_t send_ns, recv_ns;
};

/* One route under load: its request, its limit and everything measured on it. */
struct target {
    char path[256];
    char label[64];
    enum kind kind;
    bool have_limit;
    double limit;  /* sw: limit per window; tb: capacity */
    double refill; /* tb: tokens per second */
    char reqs[MAX_ADDRS][REQ_CAP];
    size_t req_lens[MAX_ADDRS];
    struct hist h2xx, h429, hother;
    uint64_t sent, n2xx, n429, nother, errors, timeouts;
    struct span *adm; /* admitted requests, at most ADMITTED_MAX */
    size_t nadm;
    uint64_t adm_dropped;
    uint64_t win_2xx[MAX_WINDOWS], win_429[MAX_WINDOWS], win_other[MAX_WINDOWS];
};

static struct {
    struct addr addrs[MAX_ADDRS];
    int naddrs;
    struct addr stats;
    bool have_stats;
    struct target *tg[MAX_TARGETS];
    int ntg;
    uint64_t window_ns;
    int conns;
    double rate;
    double duration_s;
} O = {.conns = 48, .duration_s = 6, .window_ns = 1000000000ULL};

static bool parse_addr(const char *s, struct addr *a)
{
    const char *colon = strrchr(s, ':');
    if (!colon || (size_t)(colon - s) >= 40 || strlen(s) >= sizeof(a->text))
        return false;
    char host[48];
    memcpy(host, s, (size_t)(colon - s));
    host[colon - s] = '\0';
    char *end;
    long port = strtol(colon + 1, &end, 10);
    if (*end || port <= 0 || port > 65535)
        return false;
    memset(&a->sa, 0, sizeof(a->sa));
    a->sa.sin_family = AF_INET;
    a->sa.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &a->sa.sin_addr) != 1)
        return false;
    snprintf(a->text, sizeof(a->text), "%s", s);
    return true;
}

static double num_arg(const char *name, const char *v, double lo, double hi)
{
    char *end;
    errno = 0;
    double d = strtod(v, &end);
    if (errno || end == v || *end || !(d >= lo && d <= hi)) {
        fprintf(stderr, "gw-bench-limits: %s must be a number from %g to %g\n", name, lo, hi);
        exit(2);
    }
    return d;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: gw-bench-limits -a HOST:PORT[,HOST:PORT...] [-c CONNS] [-r RATE] [-d SECONDS]\n"
            "         [--window-ms W] [--stats HOST:PORT]\n"
            "         (-p PATH [--label NAME] (--sw LIMIT | --tb CAPACITY --refill PER_SEC))...\n");
    exit(2);
}

static struct target *cur_target(void)
{
    if (O.ntg == 0)
        usage();
    return O.tg[O.ntg - 1];
}

static void parse_args(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v)
            usage();
        i++;
        if (strcmp(a, "-a") == 0) {
            char buf[1024];
            snprintf(buf, sizeof(buf), "%s", v);
            for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok;
                 tok = strtok_r(NULL, ",", &save)) {
                if (O.naddrs >= MAX_ADDRS || !parse_addr(tok, &O.addrs[O.naddrs])) {
                    fprintf(stderr, "gw-bench-limits: bad address %s\n", tok);
                    exit(2);
                }
                O.naddrs++;
            }
        } else if (strcmp(a, "--stats") == 0) {
            if (!parse_addr(v, &O.stats)) {
                fprintf(stderr, "gw-bench-limits: bad address %s\n", v);
                exit(2);
            }
            O.have_stats = true;
        } else if (strcmp(a, "-p") == 0) {
            struct target *t = O.ntg < MAX_TARGETS ? calloc(1, sizeof(*t)) : NULL;
            if (!t || v[0] != '/' || strlen(v) >= sizeof(t->path) || strpbrk(v, " \r\n"))
                usage();
            snprintf(t->path, sizeof(t->path), "%s", v);
            snprintf(t->label, sizeof(t->label), "%.63s", v);
            O.tg[O.ntg++] = t;
        } else if (strcmp(a, "--label") == 0) {
            snprintf(cur_target()->label, sizeof(cur_target()->label), "%.63s", v);
        } else if (strcmp(a, "-c") == 0) {
            O.conns = (int)num_arg("-c", v, 1, MAX_CONNS);
        } else if (strcmp(a, "-r") == 0) {
            O.rate = num_arg("-r", v, 0, 1e7);
        } else if (strcmp(a, "-d") == 0) {
            O.duration_s = num_arg("-d", v, 0.1, 3600);
        } else if (strcmp(a, "--window-ms") == 0) {
            O.window_ns = (uint64_t)(num_arg("--window-ms", v, 1, 3600000) * 1e6);
        } else if (strcmp(a, "--sw") == 0 || strcmp(a, "--tb") == 0) {
            struct target *t = cur_target();
            t->kind = a[2] == 's' ? K_SW : K_TB;
            t->limit = num_arg(a, v, 1, 1e9);
            t->have_limit = true;
        } else if (strcmp(a, "--refill") == 0) {
            cur_target()->refill = num_arg("--refill", v, 0.001, 1e9);
        } else {
            usage();
        }
    }
    if (O.naddrs == 0 || O.ntg == 0)
        usage();
    for (int i = 0; i < O.ntg; i++)
        if (!O.tg[i]->have_limit || (O.tg[i]->kind == K_TB && O.tg[i]->refill <= 0))
            usage();
    if ((double)O.window_ns * 1e-9 * MAX_WINDOWS < O.duration_s) {
        fprintf(stderr, "gw-bench-limits: at most %d windows per run\n", MAX_WINDOWS);
        exit(2);
    }
}

/* ---- connections -------------------------------------------------------------------------- */

enum cstate { CS_CLOSED, CS_CONNECTING, CS_IDLE, CS_BUSY };

struct conn {
    int fd;
    int id;
    const struct addr *addr;
    enum cstate state;
    bool want_out;
    bool is_stats;
    const char *req;
    size_t req_len, ooff;
    struct target *tg; /* the target of the request in flight */
    uint64_t send_ns, due_ns, retry_ns;
    char *in;
    size_t ilen;
};

struct poll_point {
    uint64_t t_ns;
    double received;
    bool ok;
};

static struct {
    int epfd;
    struct conn *conns;
    struct conn stats;
    char stats_req[REQ_CAP];
    uint64_t t0, t_end, interval_ns;
    int nwin;
    uint64_t next_target; /* request k goes to target k mod O.ntg */
    uint64_t late;
    struct poll_point polls[MAX_WINDOWS + 2];
    int npolls_due, npolls_done;
    bool stats_busy;
    int err_logged;
} L;

static void set_out(struct conn *c, bool out)
{
    if (c->want_out == out)
        return;
    struct epoll_event ev = {.events = EPOLLIN | (out ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(L.epfd, EPOLL_CTL_MOD, c->fd, &ev);
    c->want_out = out;
}

static void conn_close(struct conn *c, uint64_t now)
{
    if (c->fd >= 0) {
        epoll_ctl(L.epfd, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
    }
    c->fd = -1;
    c->state = CS_CLOSED;
    c->ilen = 0;
    c->retry_ns = now + 20000000ULL;
}

static int conn_open(struct conn *c)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    c->fd = fd;
    c->ilen = 0;
    c->want_out = true;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
    if (epoll_ctl(L.epfd, EPOLL_CTL_ADD, fd, &ev) != 0 ||
        (connect(fd, (const struct sockaddr *)&c->addr->sa, sizeof(c->addr->sa)) != 0 &&
         errno != EINPROGRESS)) {
        close(fd);
        c->fd = -1;
        return -1;
    }
    c->state = CS_CONNECTING;
    return 0;
}

static void log_err(const struct conn *c, const char *what)
{
    if (L.err_logged++ < 5)
        fprintf(stderr, "gw-bench-limits: %s: %s (%s)\n", c->is_stats ? "stats" : "client", what,
                c->addr->text);
}

static void conn_fail(struct conn *c, uint64_t now, const char *what)
{
    if (!c->is_stats && c->state == CS_BUSY)
        c->tg->errors++;
    if (c->is_stats)
        L.stats_busy = false;
    log_err(c, what);
    conn_close(c, now);
}

static void flush(struct conn *c, uint64_t now)
{
    while (c->ooff < c->req_len) {
        ssize_t n = send(c->fd, c->req + c->ooff, c->req_len - c->ooff, MSG_NOSIGNAL);
        if (n > 0) {
            c->ooff += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            set_out(c, true);
            return;
        }
        conn_fail(c, now, "send failed");
        return;
    }
    set_out(c, false);
}

static void send_req(struct conn *c, uint64_t now)
{
    c->ooff = 0;
    c->send_ns = now;
    c->state = CS_BUSY;
    if (!c->is_stats) {
        int a = (int)(c->addr - O.addrs);
        c->tg = O.tg[L.next_target++ % (uint64_t)O.ntg];
        c->req = c->tg->reqs[a];
        c->req_len = c->tg->req_lens[a];
        c->tg->sent++;
    }
    flush(c, now);
}

/* Parses one HTTP/1.1 answer in c->in: returns its length, 0 when incomplete, -1 when it is not
 * understood. *status gets the status, *body and *blen the body (chunked bodies are refused: the
 * gateway and gw-upstream send Content-Length). */
static long parse_answer(struct conn *c, int *status, const char **body, size_t *blen, bool *close_)
{
    char *hend = memmem(c->in, c->ilen, "\r\n\r\n", 4);
    if (!hend)
        return c->ilen >= IN_CAP ? -1 : 0;
    size_t hlen = (size_t)(hend - c->in) + 4;
    if (c->ilen < 12 || memcmp(c->in, "HTTP/1.", 7) != 0)
        return -1;
    *status = (int)strtol(c->in + 9, NULL, 10);
    *close_ = false;
    long clen = -1;
    for (char *line = memmem(c->in, hlen, "\r\n", 2) + 2; line < hend;) {
        char *eol = memmem(line, (size_t)(hend + 2 - line), "\r\n", 2);
        if (!eol)
            break;
        size_t ll = (size_t)(eol - line);
        if (ll > 15 && strncasecmp(line, "content-length:", 15) == 0)
            clen = strtol(line + 15, NULL, 10);
        else if (ll > 18 && strncasecmp(line, "transfer-encoding:", 18) == 0)
            return -1;
        else if (ll > 11 && strncasecmp(line, "connection:", 11) == 0 && memmem(line, ll, "close", 5))
            *close_ = true;
        line = eol + 2;
    }
    if (*status == 204 || *status == 304)
        clen = 0;
    if (clen < 0)
        return -1;
    if (hlen + (size_t)clen > c->ilen)
        return hlen + (size_t)clen > IN_CAP ? -1 : 0;
    *body = c->in + hlen;
    *blen = (size_t)clen;
    return (long)(hlen + (size_t)clen);
}

static int window_of(uint64_t t)
{
    if (t < L.t0)
        return 0;
    uint64_t k = (t - L.t0) / O.window_ns;
    return k >= (uint64_t)L.nwin ? L.nwin - 1 : (int)k;
}

static void record(struct conn *c, int status, uint64_t now)
{
    struct target *t = c->tg;
    uint64_t lat = now - c->send_ns;
    int w = window_of(now);
    if (status >= 200 && status < 300) {
        t->n2xx++;
        t->win_2xx[w]++;
        h_record(&t->h2xx, lat);
        if (t->nadm < ADMITTED_MAX)
            t->adm[t->nadm++] = (struct span){c->send_ns, now};
        else
            t->adm_dropped++;
    } else if (status == 429) {
        t->n429++;
        t->win_429[w]++;
        h_record(&t->h429, lat);
    } else {
        t->nother++;
        t->win_other[w]++;
        h_record(&t->hother, lat);
        if (L.err_logged++ < 5)
            fprintf(stderr, "gw-bench-limits: HTTP %d from %s\n", status, c->addr->text);
    }
}

static void stats_answer(struct conn *c, int status, const char *body, size_t blen)
{
    struct poll_point *p = &L.polls[L.npolls_done];
    L.stats_busy = false;
    p->t_ns = c->send_ns;
    p->ok = false;
    if (status == 200) {
        const char *hit = memmem(body, blen, "\"received\"", 10);
        if (hit) {
            const char *v = hit + 10;
            while (v < body + blen && (*v == ':' || *v == ' '))
                v++;
            char tmp[32];
            size_t n = 0;
            while (v + n < body + blen && n < sizeof(tmp) - 1 &&
                   ((v[n] >= '0' && v[n] <= '9') || v[n] == '.' || v[n] == 'e' || v[n] == '+'))
                n++;
            memcpy(tmp, v, n);
            tmp[n] = '\0';
            char *end;
            p->received = strtod(tmp, &end);
            p->ok = n > 0 && *end == '\0';
        }
    }
    L.npolls_done++;
}

/* The next send time of an idle connection (paced mode), or 0 to send now. */
static void schedule_next(struct conn *c, uint64_t now)
{
    if (O.rate <= 0) {
        c->due_ns = now;
        return;
    }
    c->due_ns += L.interval_ns;
    if (c->due_ns + L.interval_ns < now) {
        L.late++;
        c->due_ns = now;
    }
}

static void on_readable(struct conn *c, uint64_t now)
{
    for (;;) {
        if (c->ilen >= IN_CAP) {
            conn_fail(c, now, "answer too large");
            return;
        }
        ssize_t n = recv(c->fd, c->in + c->ilen, IN_CAP - c->ilen, 0);
        if (n > 0) {
            c->ilen += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        conn_fail(c, now, n == 0 ? "closed by peer" : "receive failed");
        return;
    }
    while (c->ilen > 0) {
        if (c->state != CS_BUSY) {
            conn_fail(c, now, "unexpected bytes");
            return;
        }
        int status = 0;
        const char *body = NULL;
        size_t blen = 0;
        bool cl = false;
        long used = parse_answer(c, &status, &body, &blen, &cl);
        if (used == 0)
            return;
        if (used < 0) {
            conn_fail(c, now, "answer not understood");
            return;
        }
        if (c->is_stats)
            stats_answer(c, status, body, blen);
        else
            record(c, status, now);
        memmove(c->in, c->in + used, c->ilen - (size_t)used);
        c->ilen -= (size_t)used;
        c->state = CS_IDLE;
        if (cl) {
            conn_close(c, now);
            c->retry_ns = now;
            return;
        }
        if (!c->is_stats)
            schedule_next(c, now);
    }
}

static void on_event(struct conn *c, uint32_t ev, uint64_t now)
{
    if (c->fd < 0)
        return;
    if (c->state == CS_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof(err);
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err || (ev & (EPOLLERR | EPOLLHUP))) {
            conn_fail(c, now, "connect failed");
            return;
        }
        c->state = CS_IDLE;
        set_out(c, false);
        return;
    }
    if (ev & EPOLLIN) {
        on_readable(c, now);
        if (c->fd < 0)
            return;
    }
    if ((ev & EPOLLOUT) && c->state == CS_BUSY)
        flush(c, now);
    if ((ev & (EPOLLERR | EPOLLHUP)) && c->fd >= 0 && !(ev & EPOLLIN))
        conn_fail(c, now, "connection error");
}

/* Sends what is due; returns the next instant something becomes due (UINT64_MAX: nothing). */
static uint64_t service(uint64_t now, bool sending)
{
    uint64_t next = UINT64_MAX;
    for (int i = 0; i < O.conns; i++) {
        struct conn *c = &L.conns[i];
        if (c->state == CS_CLOSED) {
            if (!sending)
                continue;
            if (now >= c->retry_ns) {
                if (conn_open(c) != 0) {
                    log_err(c, "cannot connect");
                    c->retry_ns = now + 20000000ULL;
                }
            }
            if (c->state == CS_CLOSED && c->retry_ns < next)
                next = c->retry_ns;
            continue;
        }
        if (c->state == CS_BUSY && now - c->send_ns > REQUEST_TIMEOUT_NS) {
            c->tg->timeouts++;
            conn_fail(c, now, "request timed out");
            continue;
        }
        if (c->state == CS_BUSY && c->send_ns + REQUEST_TIMEOUT_NS < next)
            next = c->send_ns + REQUEST_TIMEOUT_NS;
        if (c->state != CS_IDLE || !sending)
            continue;
        if (c->due_ns <= now)
            send_req(c, now);
        else if (c->due_ns < next)
            next = c->due_ns;
    }
    /* The upstream's count at every window boundary. */
    if (O.have_stats && sending && L.npolls_due <= L.nwin) {
        uint64_t due = L.t0 + (uint64_t)L.npolls_due * O.window_ns;
        if (now >= due && !L.stats_busy && L.stats.state == CS_IDLE &&
            L.npolls_done == L.npolls_due) {
            L.npolls_due++;
            L.stats_busy = true;
            send_req(&L.stats, now);
        } else if (due > now && due < next) {
            next = due;
        }
    }
    return next;
}

static void loop_until(uint64_t until, bool sending, bool (*done)(void))
{
    struct epoll_event evs[256];
    for (;;) {
        uint64_t now = mono_ns();
        if (now >= until || (done && done()))
            return;
        uint64_t next = service(now, sending && now < L.t_end);
        if (next > until)
            next = until;
        uint64_t wait = next > now ? next - now : 0;
        if (wait > 50000000ULL)
            wait = 50000000ULL;
        struct timespec ts = {(time_t)(wait / 1000000000ULL), (long)(wait % 1000000000ULL)};
        int n = epoll_pwait2(L.epfd, evs, 256, &ts, NULL);
        if (n < 0 && errno != EINTR) {
            perror("epoll_pwait2");
            exit(2);
        }
        now = mono_ns();
        for (int i = 0; i < n; i++)
            on_event(evs[i].data.ptr, evs[i].events, now);
    }
}

static bool all_connected(void)
{
    for (int i = 0; i < O.conns; i++)
        if (L.conns[i].state != CS_IDLE)
            return false;
    return !O.have_stats || L.stats.state == CS_IDLE;
}

static bool none_busy(void)
{
    for (int i = 0; i < O.conns; i++)
        if (L.conns[i].state == CS_BUSY)
            return false;
    return true;
}

static bool stats_idle(void) { return !L.stats_busy; }

/* ---- analysis ----------------------------------------------------------------------------- */

static int by_send(const void *a, const void *b)
{
    const struct span *x = a, *y = b;
    return x->send_ns < y->send_ns ? -1 : x->send_ns > y->send_ns;
}

static int by_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Sliding window: the most admitted intervals wholly inside one [t, t + W). Spans sorted by
 * send time; the best t is some interval's send time. */
static uint64_t strict_max_window(const struct span *s, size_t n, uint64_t w, uint64_t *at)
{
    uint64_t best = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t end = s[i].send_ns + w, cnt = 0;
        for (size_t j = i; j < n && s[j].send_ns < end; j++)
            cnt += s[j].recv_ns < end;
        if (cnt > best) {
            best = cnt;
            *at = s[i].send_ns;
        }
    }
    return best;
}

/* The most points of a sorted array inside one [t, t + W). */
static uint64_t max_points_window(const uint64_t *t, size_t n, uint64_t w)
{
    uint64_t best = 0;
    size_t j = 0;
    for (size_t i = 0; i < n; i++) {
        while (j < n && t[j] < t[i] + w)
            j++;
        if (j - i > best)
            best = j - i;
    }
    return best;
}

/* Token bucket: the largest excess count(a, b) - (C + R (b - a)) over all [a, b], where
 * count(a, b) is the number of admitted intervals wholly inside [a, b]; a in send times (spans
 * sorted by send), b in receive times (recv sorted with their send times). Quadratic: starts are
 * sampled when there are many. */
struct tbpt {
    uint64_t recv_ns, send_ns;
};

static int tb_by_recv(const void *a, const void *b)
{
    const struct tbpt *x = a, *y = b;
    return x->recv_ns < y->recv_ns ? -1 : x->recv_ns > y->recv_ns;
}

static double strict_tb_excess(const struct span *s, size_t n, double cap, double rate,
                               uint64_t *a_at, uint64_t *b_at, uint64_t *cnt_at)
{
    double best = -INFINITY;
    if (n == 0)
        return best;
    struct tbpt *p = malloc(n * sizeof(*p));
    if (!p)
        return NAN;
    for (size_t i = 0; i < n; i++)
        p[i] = (struct tbpt){s[i].recv_ns, s[i].send_ns};
    qsort(p, n, sizeof(*p), tb_by_recv);
    size_t step = n > 30000 ? n / 30000 : 1;
    size_t k0 = 0;
    for (size_t i = 0; i < n; i += step) {
        uint64_t a = s[i].send_ns, cnt = 0;
        while (k0 < n && p[k0].recv_ns < a)
            k0++;
        for (size_t k = k0; k < n; k++) {
            if (p[k].send_ns < a)
                continue;
            cnt++;
            double ex = (double)cnt - cap - rate * (double)(p[k].recv_ns - a) / 1e9;
            if (ex > best) {
                best = ex;
                *a_at = a;
                *b_at = p[k].recv_ns;
                *cnt_at = cnt;
            }
        }
    }
    free(p);
    return best;
}

static void fmt_us(char *dst, size_t cap, double v)
{
    if (isnan(v))
        snprintf(dst, cap, "nan");
    else
        snprintf(dst, cap, "%.0f", v);
}

/* The upstream's received count per window (the sum over all targets), or "" without it. */
static double upstream_windows(char *list, size_t cap)
{
    list[0] = '\0';
    if (!O.have_stats || L.npolls_done < 2 || !L.polls[0].ok || !L.polls[L.npolls_done - 1].ok)
        return NAN;
    size_t o = 0;
    for (int k = 1; k < L.npolls_done; k++) {
        double d = L.polls[k].ok && L.polls[k - 1].ok ? L.polls[k].received - L.polls[k - 1].received
                                                      : NAN;
        int nw = snprintf(list + o, cap - o, "%s%.0f", k > 1 ? "," : "", d);
        if (nw < 0 || (size_t)nw >= cap - o)
            break;
        o += (size_t)nw;
    }
    return L.polls[L.npolls_done - 1].received - L.polls[0].received;
}

static void report(struct target *t, double secs, double cpu)
{
    qsort(t->adm, t->nadm, sizeof(*t->adm), by_send);
    size_t n = t->nadm;
    uint64_t *recv = malloc((n ? n : 1) * sizeof(uint64_t));
    uint64_t *sendt = malloc((n ? n : 1) * sizeof(uint64_t));
    if (!recv || !sendt) {
        fprintf(stderr, "gw-bench-limits: out of memory\n");
        exit(2);
    }
    for (size_t i = 0; i < n; i++) {
        recv[i] = t->adm[i].recv_ns;
        sendt[i] = t->adm[i].send_ns;
    }
    qsort(recv, n, sizeof(uint64_t), by_u64);
    uint64_t recv_max = max_points_window(recv, n, O.window_ns);
    uint64_t send_max = max_points_window(sendt, n, O.window_ns);

    double wsec = (double)O.window_ns / 1e9;
    /* What the limit allows: per window (sw: L; tb: C + R W), over the run, in steady state. */
    double per_window = t->kind == K_SW ? t->limit : t->limit + t->refill * wsec;
    double steady_per_window = t->kind == K_SW ? t->limit : t->refill * wsec;
    uint64_t strict = 0, strict_at = 0, tb_a = 0, tb_b = 0, tb_cnt = 0;
    double over;
    if (t->kind == K_SW) {
        strict = strict_max_window(t->adm, n, O.window_ns, &strict_at);
        over = (double)strict - t->limit;
    } else {
        over = strict_tb_excess(t->adm, n, t->limit, t->refill, &tb_a, &tb_b, &tb_cnt);
        strict = tb_cnt;
    }
    /* Over-admission is a whole number of requests beyond the bound. */
    double over_n = over > 0 ? ceil(over - 1e-9) : 0;

    uint64_t steady = 0;
    double util_min = NAN;
    for (int w = 1; w < L.nwin; w++) {
        steady += t->win_2xx[w];
        double u = (double)t->win_2xx[w] / steady_per_window;
        if (!(u >= util_min))
            util_min = u;
    }
    double util_steady = L.nwin > 1 ? (double)steady / (steady_per_window * (L.nwin - 1)) : NAN;
    double allowed_run = t->kind == K_SW ? t->limit * L.nwin : t->limit + t->refill * wsec * L.nwin;
    double util_all = (double)t->n2xx / allowed_run;

    char up_list[MAX_WINDOWS * 12];
    double up_total = upstream_windows(up_list, sizeof(up_list));
    char cl_list[MAX_WINDOWS * 12] = "";
    size_t o = 0;
    for (int w = 0; w < L.nwin; w++) {
        int nw = snprintf(cl_list + o, sizeof(cl_list) - o, "%s%" PRIu64, w ? "," : "", t->win_2xx[w]);
        if (nw < 0 || (size_t)nw >= sizeof(cl_list) - o)
            break;
        o += (size_t)nw;
    }

    char s50a[16], s99a[16], s50r[16], s99r[16];
    fmt_us(s50a, sizeof(s50a), h_quantile_us(&t->h2xx, 0.5));
    fmt_us(s99a, sizeof(s99a), h_quantile_us(&t->h2xx, 0.99));
    fmt_us(s50r, sizeof(s50r), h_quantile_us(&t->h429, 0.5));
    fmt_us(s99r, sizeof(s99r), h_quantile_us(&t->h429, 0.99));

    printf("%s: %.2f s, %" PRIu64 " requests (%.0f/s offered%s), %" PRIu64 " admitted, %" PRIu64
           " refused (429), %" PRIu64 " other, %" PRIu64 " errors, %" PRIu64 " timeouts\n",
           t->label, secs, t->sent, (double)t->sent / secs, O.rate > 0 ? "" : ", closed loop",
           t->n2xx, t->n429, t->nother, t->errors, t->timeouts);
    printf("  admitted per %.0f ms window (client): %s\n", wsec * 1e3, cl_list);
    if (O.have_stats)
        printf("  received per window (upstream%s): %s (total %.0f)\n",
               O.ntg > 1 ? ", all targets" : "", up_list, up_total);
    if (t->kind == K_SW)
        printf("  limit %.0f per window: strict max in any trailing window %" PRIu64
               " (by receive time %" PRIu64 ", by send time %" PRIu64 "), over-admission %.0f\n",
               t->limit, strict, recv_max, send_max, over_n);
    else
        printf("  bucket %.0f + %.0f/s: largest strict excess %.2f (count %" PRIu64
               " in %.3f s); max per window by receive time %" PRIu64 " (bound %.0f), "
               "over-admission %.0f\n",
               t->limit, t->refill, over, tb_cnt, (double)(tb_b - tb_a) / 1e9, recv_max,
               per_window, over_n);
    printf("  utilization: %.1f%% over windows 2..%d (lowest window %.1f%%), %.1f%% over the run\n",
           util_steady * 100, L.nwin, util_min * 100, util_all * 100);
    printf("  latency us: 2xx p50 %s p99 %s | 429 p50 %s p99 %s | generator cpu %.0f%%\n", s50a,
           s99a, s50r, s99r, cpu / secs * 100);
    if (over_n > 0 && t->kind == K_SW)
        printf("  OVER-ADMISSION: %" PRIu64 " admitted requests lie wholly inside [%.6f s, %.6f s) "
               "after the start; the limit is %.0f\n",
               strict, (double)(strict_at - L.t0) / 1e9,
               (double)(strict_at - L.t0 + O.window_ns) / 1e9, t->limit);
    if (over_n > 0 && t->kind == K_TB)
        printf("  OVER-ADMISSION: %" PRIu64 " admitted requests lie wholly inside [%.6f s, %.6f s] "
               "after the start; the bucket allows %.2f there\n",
               tb_cnt, (double)(tb_a - L.t0) / 1e9, (double)(tb_b - L.t0) / 1e9,
               t->limit + t->refill * (double)(tb_b - tb_a) / 1e9);
    if (t->adm_dropped)
        printf("  note: %" PRIu64 " admitted requests beyond the record bound were not analysed\n",
               t->adm_dropped);

    printf("RESULT label=%s kind=%s limit=%.0f refill=%.0f window_ms=%.0f windows=%d seconds=%.3f "
           "sent=%" PRIu64 " rps=%.0f admitted=%" PRIu64 " refused=%" PRIu64 " other=%" PRIu64
           " errors=%" PRIu64 " timeouts=%" PRIu64 " late=%" PRIu64 " targets=%d upstream=%.0f "
           "strict_max=%" PRIu64 " recv_max=%" PRIu64 " send_max=%" PRIu64 " over=%.0f "
           "excess=%.3f util=%.4f util_min=%.4f util_run=%.4f p50_2xx_us=%s p99_2xx_us=%s "
           "p50_429_us=%s p99_429_us=%s cpu=%.2f\n",
           t->label, t->kind == K_SW ? "sw" : "tb", t->limit, t->refill, wsec * 1e3, L.nwin, secs,
           t->sent, (double)t->sent / secs, t->n2xx, t->n429, t->nother, t->errors, t->timeouts,
           L.late, O.ntg, up_total, strict, recv_max, send_max, over_n, over, util_steady,
           util_min, util_all, s50a, s99a, s50r, s99r, cpu / secs);
    printf("WINDOWS label=%s client=%s upstream=%s\n", t->label, cl_list,
           up_list[0] ? up_list : "-");
    free(recv);
    free(sendt);
}

int main(int argc, char **argv)
{
    parse_args(argc, argv);
    signal(SIGPIPE, SIG_IGN);
    L.epfd = epoll_create1(EPOLL_CLOEXEC);
    L.conns = calloc((size_t)O.conns, sizeof(*L.conns));
    if (L.epfd < 0 || !L.conns) {
        fprintf(stderr, "gw-bench-limits: cannot set up\n");
        return 2;
    }
    for (int k = 0; k < O.ntg; k++) {
        struct target *t = O.tg[k];
        t->adm = malloc(ADMITTED_MAX * sizeof(*t->adm));
        if (!t->adm) {
            fprintf(stderr, "gw-bench-limits: out of memory\n");
            return 2;
        }
        for (int a = 0; a < O.naddrs; a++) {
            int n = snprintf(t->reqs[a], REQ_CAP, "GET %s HTTP/1.1\r\nHost: %s\r\n\r\n", t->path,
                             O.addrs[a].text);
            if (n < 0 || n >= REQ_CAP)
                usage();
            t->req_lens[a] = (size_t)n;
        }
    }
    L.nwin = (int)ceil(O.duration_s / ((double)O.window_ns / 1e9) - 1e-9);
    for (int i = 0; i < O.conns; i++) {
        struct conn *c = &L.conns[i];
        c->fd = -1;
        c->id = i;
        c->addr = &O.addrs[i % O.naddrs];
        c->tg = O.tg[0];
        c->in = malloc(IN_CAP);
        if (!c->in || conn_open(c) != 0) {
            fprintf(stderr, "gw-bench-limits: cannot connect to %s\n", c->addr->text);
            return 2;
        }
    }
    if (O.have_stats) {
        struct conn *c = &L.stats;
        c->fd = -1;
        c->id = -1;
        c->is_stats = true;
        c->addr = &O.stats;
        int n = snprintf(L.stats_req, REQ_CAP,
                         "GET /__control/stats HTTP/1.1\r\nHost: %s\r\n\r\n", O.stats.text);
        c->req = L.stats_req;
        c->req_len = (size_t)n;
        c->in = malloc(IN_CAP);
        if (!c->in || conn_open(c) != 0) {
            fprintf(stderr, "gw-bench-limits: cannot connect to %s\n", O.stats.text);
            return 2;
        }
    }
    /* Connect everything first, so that the schedule starts on open connections. */
    L.t_end = UINT64_MAX;
    loop_until(mono_ns() + 2000000000ULL, false, all_connected);
    if (!all_connected()) {
        fprintf(stderr, "gw-bench-limits: not every connection could be opened\n");
        return 2;
    }
    /* The upstream's count before the first request (a poll sent with the first burst would be
     * answered after some of it). */
    if (O.have_stats) {
        L.stats_busy = true;
        L.npolls_due = 1;
        send_req(&L.stats, mono_ns());
        loop_until(mono_ns() + 2000000000ULL, false, stats_idle);
    }
    double cpu0 = cpu_seconds();
    L.t0 = mono_ns();
    L.t_end = L.t0 + (uint64_t)(O.duration_s * 1e9);
    L.interval_ns = O.rate > 0 ? (uint64_t)((double)O.conns * 1e9 / O.rate) : 0;
    for (int i = 0; i < O.conns; i++)
        L.conns[i].due_ns = O.rate > 0 ? L.t0 + (uint64_t)((double)i * 1e9 / O.rate) : L.t0;
    loop_until(L.t_end, true, NULL);
    /* Let the answers in flight arrive, then read the upstream's final count. */
    loop_until(mono_ns() + REQUEST_TIMEOUT_NS + 500000000ULL, false, none_busy);
    uint64_t t_last = mono_ns();
    for (int i = 0; i < O.conns; i++)
        if (L.conns[i].state == CS_BUSY) {
            L.conns[i].tg->timeouts++;
            L.conns[i].tg->errors++;
        }
    if (O.have_stats) {
        loop_until(mono_ns() + 2000000000ULL, false, stats_idle);
        if (!L.stats_busy && L.stats.state == CS_IDLE) {
            L.stats_busy = true;
            send_req(&L.stats, mono_ns());
            loop_until(mono_ns() + 2000000000ULL, false, stats_idle);
        }
    }
    double cpu = cpu_seconds() - cpu0;
    if (L.late)
        printf("schedule: %" PRIu64 " sends fell a whole interval behind (backlog dropped)\n",
               L.late);
    for (int k = 0; k < O.ntg; k++) {
        report(O.tg[k], (double)(t_last - L.t0) / 1e9, cpu);
        free(O.tg[k]->adm);
        free(O.tg[k]);
    }
    for (int i = 0; i < O.conns; i++) {
        if (L.conns[i].fd >= 0)
            close(L.conns[i].fd);
        free(L.conns[i].in);
    }
    if (L.stats.fd >= 0)
        close(L.stats.fd);
    free(L.stats.in);
    free(L.conns);
    return 0;
}
