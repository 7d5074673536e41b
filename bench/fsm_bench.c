/*
 * fsm_bench.c - what applying a command to the coordination state machine costs, with no Raft,
 * disk or network around it: the ceiling the node thread's apply loop can reach.
 *
 * 1. COUNTER_ADD on 64 names (decode + apply + JSON result).
 * 2. COUNTER_ADD, each with a fresh idempotency key (the record table full and evicting).
 * 3. LOCK_ACQUIRE with ttl_ms (creating a lease) followed by LOCK_RELEASE, on 64 names; the
 *    leases are left to expire, so a LEASE_EXPIRE of up to 1024 ids is applied every 1024 pairs.
 * 4. LOCK_ACQUIRE under one long lease + LOCK_RELEASE (no lease churn).
 * 5. Snapshot and restore of a machine with 65536 counters, 16384 locks and 16384 leases.
 *
 * Commands are encoded beforehand; each figure is the best of `repeats` runs (other load on the
 * machine only ever adds time). Usage: gw-bench-fsm [applies per run, default 1000000] [repeats, default 3]
 */
#include "fsm.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static struct gw_fsm *make(void)
{
    struct gw_fsm_config cfg;
    gw_fsm_config_default(&cfg);
    cfg.hash_k0 = 0x0123456789abcdefULL;
    cfg.hash_k1 = 0xfedcba9876543210ULL;
    struct gw_fsm *f;
    if (gw_fsm_new(&cfg, &f) != 0) {
        fprintf(stderr, "gw_fsm_new failed\n");
        exit(1);
    }
    return f;
}

static size_t enc(const struct gw_fsm_cmd *c, uint8_t *buf, size_t cap)
{
    size_t len;
    if (gw_fsm_cmd_encode(c, buf, cap, &len) != 0) {
        fprintf(stderr, "encode failed\n");
        exit(1);
    }
    return len;
}

static void apply(struct gw_fsm *f, uint64_t *index, const uint8_t *buf, size_t len, struct gw_fsm_result *res)
{
    int rc = gw_fsm_apply(f, ++*index, buf, len, res);
    if (rc != 0 || res->status >= 500) {
        fprintf(stderr, "apply failed: %d status %d %s\n", rc, res->status, res->body);
        exit(1);
    }
}

static char names[64][16];

static double bench_counter(uint64_t n, bool idem)
{
    struct gw_fsm *f = make();
    struct gw_fsm_result res;
    gw_fsm_result_init(&res);
    uint8_t cmds[64][64];
    size_t lens[64];
    for (int i = 0; i < 64; i++) {
        struct gw_fsm_cmd c = {.kind = GW_FSM_COUNTER_ADD, .now_ms = 1000, .name = names[i],
                               .name_len = strlen(names[i]), .delta = 1};
        lens[i] = enc(&c, cmds[i], sizeof(cmds[i]));
    }
    uint64_t index = 0;
    char key[32];
    uint8_t buf[128];
    uint64_t t0 = mono_ns();
    for (uint64_t i = 0; i < n; i++) {
        if (!idem) {
            apply(f, &index, cmds[i & 63], lens[i & 63], &res);
            continue;
        }
        int kl = snprintf(key, sizeof(key), "key-%" PRIu64, i);
        struct gw_fsm_cmd c = {.kind = GW_FSM_COUNTER_ADD, .now_ms = 1000 + i / 1000, .name = names[i & 63],
                               .name_len = strlen(names[i & 63]), .delta = 1, .idem_key = key,
                               .idem_key_len = (size_t)kl};
        apply(f, &index, buf, enc(&c, buf, sizeof(buf)), &res);
    }
    uint64_t dt = mono_ns() - t0;
    gw_fsm_result_free(&res);
    gw_fsm_free(f);
    return (double)n * 1e9 / (double)dt;
}

/* Acquire + release pairs; with_ttl: each acquire creates a lease that later expires. */
static double bench_lock(uint64_t pairs, bool with_ttl)
{
    struct gw_fsm *f = make();
    struct gw_fsm_result res;
    gw_fsm_result_init(&res);
    uint64_t index = 0, now = 1000000;
    uint8_t buf[512];
    uint64_t lease = 0;
    if (!with_ttl) {
        struct gw_fsm_cmd g = {.kind = GW_FSM_LEASE_GRANT, .now_ms = now, .ttl_ms = 3600000};
        apply(f, &index, buf, enc(&g, buf, sizeof(buf)), &res);
        lease = index;
    }
    uint8_t acq[64][128], rel[128];
    size_t acq_len[64];
    for (int i = 0; i < 64; i++) {
        struct gw_fsm_cmd c = {.kind = GW_FSM_LOCK_ACQUIRE, .now_ms = now, .name = names[i],
                               .name_len = strlen(names[i]), .owner = "worker-1", .owner_len = 8,
                               .lease_id = lease, .ttl_ms = with_ttl ? 1000 : 0};
        acq_len[i] = enc(&c, acq[i], sizeof(acq[i]));
    }
    uint64_t ids[GW_FSM_MAX_EXPIRE_IDS];
    uint64_t t0 = mono_ns();
    for (uint64_t i = 0; i < pairs; i++) {
        apply(f, &index, acq[i & 63], acq_len[i & 63], &res);
        const char *p = strstr(res.body, "\"token\":");
        uint64_t token = p ? strtoull(p + 8, NULL, 10) : 0;
        struct gw_fsm_cmd r = {.kind = GW_FSM_LOCK_RELEASE, .now_ms = now, .name = names[i & 63],
                               .name_len = strlen(names[i & 63]), .token = token};
        apply(f, &index, rel, enc(&r, rel, sizeof(rel)), &res);
        if (with_ttl && (i & 1023) == 1023) {
            now += 1000; /* every lease so far is overdue: the leader's expiry loop */
            size_t n = gw_fsm_overdue_leases(f, now, ids, GW_FSM_MAX_EXPIRE_IDS);
            struct gw_fsm_cmd e = {.kind = GW_FSM_LEASE_EXPIRE, .now_ms = now, .ids = ids, .n_ids = n};
            uint8_t big[16 + 8 * GW_FSM_MAX_EXPIRE_IDS];
            apply(f, &index, big, enc(&e, big, sizeof(big)), &res);
            for (int k = 0; k < 64; k++) { /* re-stamp the prepared acquires */
                struct gw_fsm_cmd c = {.kind = GW_FSM_LOCK_ACQUIRE, .now_ms = now, .name = names[k],
                                       .name_len = strlen(names[k]), .owner = "worker-1", .owner_len = 8,
                                       .ttl_ms = 1000};
                acq_len[k] = enc(&c, acq[k], sizeof(acq[k]));
            }
        }
    }
    uint64_t dt = mono_ns() - t0;
    gw_fsm_result_free(&res);
    gw_fsm_free(f);
    return (double)pairs * 1e9 / (double)dt;
}

static void bench_snapshot(double *snap_ms, double *restore_ms, size_t *bytes)
{
    struct gw_fsm *f = make(), *g = make();
    struct gw_fsm_result res;
    gw_fsm_result_init(&res);
    uint64_t index = 0;
    uint8_t buf[256];
    char name[32];
    for (int i = 0; i < 65536; i++) {
        snprintf(name, sizeof(name), "counter-%d", i);
        struct gw_fsm_cmd c = {.kind = GW_FSM_COUNTER_ADD, .now_ms = 1000, .name = name,
                               .name_len = strlen(name), .delta = i};
        apply(f, &index, buf, enc(&c, buf, sizeof(buf)), &res);
    }
    for (int i = 0; i < 16384; i++) {
        snprintf(name, sizeof(name), "lock-%d", i);
        struct gw_fsm_cmd c = {.kind = GW_FSM_LOCK_ACQUIRE, .now_ms = 1000, .name = name,
                               .name_len = strlen(name), .owner = "worker-1", .owner_len = 8, .ttl_ms = 60000};
        apply(f, &index, buf, enc(&c, buf, sizeof(buf)), &res);
    }
    uint8_t *img;
    size_t len;
    uint64_t t0 = mono_ns();
    if (gw_fsm_snapshot(f, &img, &len) != 0)
        exit(1);
    uint64_t t1 = mono_ns();
    if (gw_fsm_restore(g, img, len) != 0)
        exit(1);
    uint64_t t2 = mono_ns();
    *snap_ms = (double)(t1 - t0) / 1e6;
    *restore_ms = (double)(t2 - t1) / 1e6;
    *bytes = len;
    free(img);
    gw_fsm_result_free(&res);
    gw_fsm_free(f);
    gw_fsm_free(g);
}

static double best(double a, double b)
{
    return a > b ? a : b;
}

int main(int argc, char **argv)
{
    uint64_t n = argc > 1 ? strtoull(argv[1], NULL, 10) : 1000000;
    int repeats = argc > 2 ? atoi(argv[2]) : 3;
    if (n == 0 || repeats <= 0) {
        fprintf(stderr, "usage: %s [applies per run] [repeats]\n", argv[0]);
        return 2;
    }
    for (int i = 0; i < 64; i++)
        snprintf(names[i], sizeof(names[i]), "name-%d", i);
    double add = 0, add_idem = 0, lock_ttl = 0, lock_lease = 0;
    double snap = 1e18, restore = 1e18;
    size_t bytes = 0;
    for (int r = 0; r < repeats; r++) {
        add = best(add, bench_counter(n, false));
        add_idem = best(add_idem, bench_counter(n, true));
        lock_ttl = best(lock_ttl, bench_lock(n / 2, true));
        lock_lease = best(lock_lease, bench_lock(n / 2, false));
        double s, rs;
        bench_snapshot(&s, &rs, &bytes);
        snap = s < snap ? s : snap;
        restore = rs < restore ? rs : restore;
    }
    printf("counter add:                       %10.0f applies/s\n", add);
    printf("counter add, fresh idempotency key: %9.0f applies/s\n", add_idem);
    printf("lock acquire(ttl)+release:         %10.0f pairs/s (%.0f applies/s, leases expired in batches)\n",
           lock_ttl, lock_ttl * 2);
    printf("lock acquire(lease)+release:       %10.0f pairs/s (%.0f applies/s)\n", lock_lease, lock_lease * 2);
    printf("snapshot of 65536 counters + 16384 locks/leases: %zu bytes, %.1f ms; restore %.1f ms\n", bytes,
           snap, restore);
    return 0;
}
