/*
 * transport_bench.c - what the Raft transport moves between two nodes on loopback.
 *
 * Two transports (ids 1 and 2), each driven by its own thread as a node thread would drive it:
 * wait on the transport's epoll fd (with gw_transport_next_timeout_ms as the timeout), then
 * gw_transport_run. Node 1 sends as fast as its queue allows, keeping at most WINDOW bytes
 * queued (a sender that outruns the network only collects drops), and node 2 counts what its
 * callback receives; the clock runs from the first send to the last delivery.
 *
 * 1. Heartbeats: AppendEntries without entries (63-byte payload, 72-byte frame).
 * 2. 64 KiB batches: AppendEntries carrying 64 entries of 1 KiB.
 * 3. Round trip: one heartbeat out, one AppendEntries response back, one at a time.
 *
 * MB/s counts frame bytes (header included), 10^6 bytes. Each figure is the best of `repeats`
 * runs. Usage: gw-bench-transport [heartbeats per run, default 2000000] [repeats, default 3]
 */
#include "transport.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define WINDOW (8u << 20)

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static uint64_t mono_ms(void) { return mono_ns() / 1000000u; }

struct side {
    struct gw_transport *t;
    uint64_t id;
    atomic_uint_fast64_t received;
    atomic_uint_fast64_t last_ns;
    bool echo;   /* answer every AppendEntries with a response */
    atomic_bool stop;
};

static void on_message(const struct raft_message *m, void *ctx)
{
    struct side *s = ctx;
    if (s->echo && m->type == RAFT_MSG_APPEND) {
        struct raft_message r;
        memset(&r, 0, sizeof(r));
        r.type = RAFT_MSG_APPEND_RESP;
        r.from = s->id;
        r.to = m->from;
        r.term = m->term;
        r.u.append_resp.index = m->u.append.commit;
        gw_transport_send(s->t, &r);
    }
    atomic_store_explicit(&s->received, atomic_load_explicit(&s->received, memory_order_relaxed) + 1,
                          memory_order_relaxed);
    atomic_store_explicit(&s->last_ns, mono_ns(), memory_order_release);
}

/* One turn of a node loop: wait for the transport (at most max_ms), then run it. */
static void turn(struct gw_transport *t, int max_ms)
{
    int wait_ms = gw_transport_next_timeout_ms(t, mono_ms());
    if (wait_ms < 0 || wait_ms > max_ms)
        wait_ms = max_ms;
    struct pollfd pfd = {.fd = gw_transport_fd(t), .events = POLLIN};
    poll(&pfd, 1, wait_ms);
    gw_transport_run(t, mono_ms());
}

static void *receiver(void *arg)
{
    struct side *s = arg;
    while (!atomic_load(&s->stop))
        turn(s->t, 5);
    return NULL;
}

static void make(struct side *s, uint64_t id)
{
    memset(s, 0, sizeof(*s));
    s->id = id;
    struct sockaddr_storage a;
    memset(&a, 0, sizeof(a));
    struct sockaddr_in *in = (struct sockaddr_in *)&a;
    in->sin_family = AF_INET;
    in->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    struct gw_transport_options o;
    gw_transport_options_default(&o);
    if (gw_transport_new(id, &a, sizeof(*in), &o, on_message, s, &s->t) != 0) {
        perror("gw_transport_new");
        exit(1);
    }
}

static void connect_pair(struct side *a, struct side *b)
{
    struct sockaddr_storage addr;
    socklen_t len;
    gw_transport_local_addr(b->t, &addr, &len);
    gw_transport_set_peer(a->t, b->id, &addr, len);
    gw_transport_local_addr(a->t, &addr, &len);
    gw_transport_set_peer(b->t, a->id, &addr, len);
    struct gw_transport_peer_stats st = {0};
    uint64_t end = mono_ms() + 5000;
    while (!st.connected && mono_ms() < end) {
        gw_transport_run(a->t, mono_ms());
        gw_transport_run(b->t, mono_ms());
        gw_transport_peer_stats(a->t, b->id, &st);
    }
    if (!st.connected) {
        fprintf(stderr, "could not connect\n");
        exit(1);
    }
}

struct result {
    double msgs_per_s, mb_per_s;
};

/* Streams n copies of m from node 1 to node 2. */
static struct result stream(const struct raft_message *m, uint64_t n)
{
    struct side a, b;
    make(&a, 1);
    make(&b, 2);
    connect_pair(&a, &b);
    pthread_t th;
    pthread_create(&th, NULL, receiver, &b);

    uint64_t t0 = mono_ns();
    for (uint64_t i = 0; i < n; i++) {
        for (;;) {
            struct gw_transport_peer_stats st;
            gw_transport_peer_stats(a.t, 2, &st);
            if (st.queued_bytes + raft_msg_encoded_len(m) + GW_TRANSPORT_FRAME_HEADER <= WINDOW)
                break;
            turn(a.t, 5);
        }
        if (gw_transport_send(a.t, m) != 0) {
            fprintf(stderr, "send refused\n");
            exit(1);
        }
    }
    while (atomic_load(&b.received) < n)
        turn(a.t, 1);
    uint64_t t1 = atomic_load_explicit(&b.last_ns, memory_order_acquire);
    atomic_store(&b.stop, true);
    pthread_join(th, NULL);

    struct gw_transport_peer_stats st;
    gw_transport_peer_stats(b.t, 1, &st);
    double secs = (double)(t1 - t0) / 1e9;
    struct result r = {(double)n / secs, (double)st.recv_bytes / secs / 1e6};
    gw_transport_free(a.t);
    gw_transport_free(b.t);
    return r;
}

/* n sequential round trips; returns microseconds per round trip. */
static double round_trips(uint64_t n)
{
    struct side a, b;
    make(&a, 1);
    make(&b, 2);
    b.echo = true;
    connect_pair(&a, &b);
    pthread_t th;
    pthread_create(&th, NULL, receiver, &b);
    struct raft_message hb;
    memset(&hb, 0, sizeof(hb));
    hb.type = RAFT_MSG_APPEND;
    hb.from = 1;
    hb.to = 2;
    hb.term = 1;
    uint64_t t0 = mono_ns();
    for (uint64_t i = 0; i < n; i++) {
        hb.u.append.commit = i;
        gw_transport_send(a.t, &hb);
        while (atomic_load(&a.received) <= i)
            turn(a.t, 5);
    }
    uint64_t t1 = mono_ns();
    atomic_store(&b.stop, true);
    pthread_join(th, NULL);
    gw_transport_free(a.t);
    gw_transport_free(b.t);
    return (double)(t1 - t0) / 1e3 / (double)n;
}

int main(int argc, char **argv)
{
    uint64_t n = argc > 1 ? strtoull(argv[1], NULL, 10) : 2000000;
    int repeats = argc > 2 ? (int)strtol(argv[2], NULL, 10) : 3;
    if (n == 0 || repeats <= 0) {
        fprintf(stderr, "usage: gw-bench-transport [heartbeats per run] [repeats]\n");
        return 2;
    }

    struct raft_message hb;
    memset(&hb, 0, sizeof(hb));
    hb.type = RAFT_MSG_APPEND;
    hb.from = 1;
    hb.to = 2;
    hb.term = 3;
    hb.u.append.commit = 1000;

    static uint8_t payload[1024];
    for (size_t i = 0; i < sizeof(payload); i++)
        payload[i] = (uint8_t)(i * 13);
    static struct raft_entry ents[64];
    for (int i = 0; i < 64; i++)
        ents[i] = (struct raft_entry){3, (uint64_t)(1001 + i), RAFT_ENTRY_NORMAL, sizeof(payload),
                                      payload};
    struct raft_message batch = hb;
    batch.u.append.prev_index = 1000;
    batch.u.append.prev_term = 3;
    batch.u.append.entries = ents;
    batch.u.append.n_entries = 64;
    uint64_t n_batches = n / 200 > 1000 ? n / 200 : 1000;

    struct result best_hb = {0}, best_batch = {0};
    double best_rtt = 1e9;
    for (int r = 0; r < repeats; r++) {
        struct result x = stream(&hb, n);
        if (x.msgs_per_s > best_hb.msgs_per_s)
            best_hb = x;
        x = stream(&batch, n_batches);
        if (x.msgs_per_s > best_batch.msgs_per_s)
            best_batch = x;
        double rtt = round_trips(20000);
        if (rtt < best_rtt)
            best_rtt = rtt;
    }
    printf("heartbeats (%zu-byte frames): %.0f msgs/s, %.1f MB/s (%llu per run)\n",
           raft_msg_encoded_len(&hb) + GW_TRANSPORT_FRAME_HEADER, best_hb.msgs_per_s,
           best_hb.mb_per_s, (unsigned long long)n);
    printf("AppendEntries, 64 x 1 KiB entries (%zu-byte frames): %.0f msgs/s, %.1f MB/s "
           "(%llu per run)\n",
           raft_msg_encoded_len(&batch) + GW_TRANSPORT_FRAME_HEADER, best_batch.msgs_per_s,
           best_batch.mb_per_s, (unsigned long long)n_batches);
    printf("round trip, heartbeat and response: %.1f us\n", best_rtt);
    return 0;
}
