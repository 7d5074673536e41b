/*
 * storage_bench.c - what the write-ahead log costs: entries appended per second and the latency
 * of the one fdatasync per batch (group commit), for batches of 1, 16 and 256 entries of 100
 * bytes. Each turn does what a node does per Raft update: append the batch, record the hard
 * state (the commit index moves), sync. The figures for sync off show the CPU cost of encoding,
 * checksumming and writing alone (nothing durable); the rows with preallocation off show what
 * growing the file on every append costs a sync (the file system must journal the new size and
 * blocks). fsync latency is reported as p50 / p99 / max over every turn of the run.
 *
 * Each case runs `rounds` times, the cases taking turns, and keeps its best run: on a shared
 * machine other load only ever slows a run down.
 *
 * Usage: gw-bench-storage [directory, default a new one under /tmp] [seconds per run, default 1]
 *                         [rounds, default 3]
 * The directory's file system is what is being measured; it is removed afterwards.
 */
#include "storage.h"

#include <dirent.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PAYLOAD 100
#define MAX_BATCH 256
#define MAX_TURNS 2000000

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void rm_flat(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return;
    struct dirent *de;
    char p[4096 + 512];
    while ((de = readdir(d)) != NULL) {
        if (strcmp(de->d_name, ".") != 0 && strcmp(de->d_name, "..") != 0) {
            snprintf(p, sizeof(p), "%s/%s", dir, de->d_name);
            unlink(p);
        }
    }
    closedir(d);
    rmdir(dir);
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static uint64_t lat[MAX_TURNS];

struct result {
    double entries_per_s, batches_per_s;
    double p50_us, p99_us, max_us;
    uint64_t turns;
    uint32_t segments;
};

static int run(const char *dir, unsigned batch, bool sync, bool prealloc, double seconds,
               struct result *res)
{
    struct gw_wal_options o;
    gw_wal_options_default(&o);
    o.sync = sync;
    o.preallocate = prealloc;
    struct gw_wal *w;
    struct gw_wal_recovered rec;
    char err[512];
    int rc = gw_wal_open(dir, &o, &w, &rec, err, sizeof(err));
    if (rc != 0) {
        fprintf(stderr, "open: %s\n", err);
        return rc;
    }
    gw_wal_recovered_free(&rec);

    static uint8_t data[MAX_BATCH][PAYLOAD];
    struct raft_entry e[MAX_BATCH];
    for (unsigned i = 0; i < batch; i++) {
        memset(data[i], (int)i, PAYLOAD);
        e[i].term = 1;
        e[i].type = RAFT_ENTRY_NORMAL;
        e[i].len = PAYLOAD;
        e[i].data = data[i];
    }
    struct raft_hard_state hs = {.term = 1, .vote = 1, .commit = 0};
    uint64_t next = 1, turns = 0;
    uint64_t t0 = mono_ns(), deadline = t0 + (uint64_t)(seconds * 1e9);
    uint64_t now = t0;
    while (now < deadline && turns < MAX_TURNS) {
        for (unsigned i = 0; i < batch; i++)
            e[i].index = next + i;
        hs.commit = next - 1;
        uint64_t ns = 0;
        if ((rc = gw_wal_append(w, e, batch)) != 0 || (rc = gw_wal_set_hard_state(w, &hs)) != 0 ||
            (rc = gw_wal_sync(w, &ns)) != 0) {
            fprintf(stderr, "write: %s: %s\n", gw_wal_errname(rc), gw_wal_errmsg(w));
            gw_wal_close(w);
            return rc;
        }
        lat[turns++] = ns;
        next += batch;
        now = mono_ns();
    }
    double secs = (double)(now - t0) / 1e9;
    struct gw_wal_stats st;
    gw_wal_stats(w, &st);
    gw_wal_close(w);
    rm_flat(dir);
    qsort(lat, turns, sizeof(lat[0]), cmp_u64);
    struct result r = {
        .entries_per_s = (double)(next - 1) / secs,
        .batches_per_s = (double)turns / secs,
        .p50_us = (double)lat[turns / 2] / 1e3,
        .p99_us = (double)lat[turns * 99 / 100] / 1e3,
        .max_us = (double)lat[turns - 1] / 1e3,
        .turns = turns,
        .segments = st.segments,
    };
    if (r.entries_per_s > res->entries_per_s)
        *res = r;
    return 0;
}

int main(int argc, char **argv)
{
    char base[4096];
    char dir[4096 + 16];
    bool made = false;
    if (argc > 1 && argv[1][0]) {
        snprintf(base, sizeof(base), "%s", argv[1]);
    } else {
        snprintf(base, sizeof(base), "/tmp/gw-bench-storage-XXXXXX");
        if (!mkdtemp(base)) {
            perror("mkdtemp");
            return 1;
        }
        made = true;
    }
    double seconds = argc > 2 ? strtod(argv[2], NULL) : 1.0;
    if (seconds <= 0)
        seconds = 1.0;
    int rounds = argc > 3 ? (int)strtol(argv[3], NULL, 10) : 3;
    if (rounds < 1)
        rounds = 1;
    snprintf(dir, sizeof(dir), "%s/wal", base);
    printf("write-ahead log in %s, entries of %d bytes, %.1f s per case, best of %d rounds\n", base,
           PAYLOAD, seconds, rounds);
    const unsigned batches[] = {1, 16, 256};
    /* sync on with segments preallocated (the default), then without, then sync off; the cases
     * take turns, `rounds` times, and each keeps its best run (other load only ever slows) */
    struct result best[3][3];
    memset(best, 0, sizeof(best));
    for (int round = 0; round < rounds; round++)
        for (int mode = 0; mode < 3; mode++)
            for (int i = 0; i < 3; i++)
                if (run(dir, batches[i], mode < 2, mode != 1, seconds, &best[mode][i]) != 0)
                    return 1;
    for (int mode = 0; mode < 3; mode++)
        for (int i = 0; i < 3; i++) {
            const struct result *r = &best[mode][i];
            printf("batch %3u  sync %-3s prealloc %-3s %10.0f entries/s %8.0f batches/s"
                   "  fsync p50 %7.1f us  p99 %7.1f us  max %8.1f us  (%" PRIu64 " batches)\n",
                   batches[i], mode < 2 ? "on" : "off", mode != 1 ? "on" : "off",
                   r->entries_per_s, r->batches_per_s, r->p50_us, r->p99_us, r->max_us, r->turns);
        }
    if (made)
        rmdir(base);
    return 0;
}
