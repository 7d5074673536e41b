/*
 * main.c - raft-sim, the command-line runner of the deterministic cluster simulator.
 *
 *   raft-sim --seeds N --start S [--nodes K] [--steps M] [--verbose]
 *
 * Runs seeds S .. S+N-1. Without --nodes, seed s runs a cluster of 3, 5 or 7 voters (s mod 3).
 * Each failing seed prints one line with the violation and the command that replays it exactly;
 * the exit status is 1 if any seed failed. --bench N runs one fault-free cluster on an instant
 * network until N increments are committed and prints the rate.
 */
#include "sim.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static void usage(void)
{
    fprintf(stderr, "usage: raft-sim --seeds N --start S [--nodes 3|5|7] [--steps M] [--verbose] [--quiet]\n"
                    "       raft-sim --bench ENTRIES [--nodes K]\n");
    exit(2);
}

static uint64_t parse_u64(const char *s)
{
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    if (*s == '\0' || *end != '\0')
        usage();
    return (uint64_t)v;
}

int main(int argc, char **argv)
{
    uint64_t seeds = 100, start = 1;
    int nodes = 0;
    long steps = 10000;
    bool verbose = false, quiet = false;
    long bench = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--seeds") == 0 && v) {
            seeds = parse_u64(v);
            i++;
        } else if (strcmp(a, "--start") == 0 && v) {
            start = parse_u64(v);
            i++;
        } else if (strcmp(a, "--nodes") == 0 && v) {
            nodes = (int)parse_u64(v);
            i++;
        } else if (strcmp(a, "--steps") == 0 && v) {
            steps = (long)parse_u64(v);
            i++;
        } else if (strcmp(a, "--bench") == 0 && v) {
            bench = (long)parse_u64(v);
            i++;
        } else if (strcmp(a, "--verbose") == 0) {
            verbose = true;
        } else if (strcmp(a, "--quiet") == 0) {
            quiet = true;
        } else {
            usage();
        }
    }
    if (nodes != 0 && nodes != 3 && nodes != 5 && nodes != 7)
        usage();
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    if (bench > 0) {
        /* No faults, zero delays: how fast the whole simulator (cores, codec, checks) commits. */
        struct sim_opts o = {0};
        o.seed = start;
        o.nodes = nodes ? nodes : 3;
        o.no_faults = true;
        o.bench_entries = bench;
        struct sim_result r;
        int rc = sim_run(&o, &r);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
        printf("raft-sim bench: %d nodes, %" PRIu64 " increments committed in %.2fs: %.0f/s%s%s\n",
               o.nodes, r.committed_ops, secs, (double)r.committed_ops / secs, rc ? ", FAILED: " : "",
               rc ? r.why : "");
        return rc;
    }
    uint64_t failed = 0;
    struct sim_result total = {0};
    for (uint64_t k = 0; k < seeds; k++) {
        uint64_t seed = start + k;
        struct sim_opts o = {0};
        o.seed = seed;
        o.nodes = nodes ? nodes : (int[]){3, 5, 7}[seed % 3];
        o.steps = steps;
        o.verbose = verbose;
        struct sim_result r;
        if (sim_run(&o, &r) != 0) {
            failed++;
            printf("FAIL seed %" PRIu64 " (%d nodes): %s | replay: raft-sim --seeds 1 --start %" PRIu64
                   " --nodes %d --steps %ld\n",
                   seed, o.nodes, r.why, seed, o.nodes, steps);
            fflush(stdout);
        }
        total.events += r.events;
        total.committed_ops += r.committed_ops;
        total.acked_ops += r.acked_ops;
        total.reads_ok += r.reads_ok;
        total.elections += r.elections;
        total.snapshots_sent += r.snapshots_sent;
        total.config_changes += r.config_changes;
        total.transfers += r.transfers;
        total.crashes += r.crashes;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    if (!quiet || failed)
        printf("raft-sim: %" PRIu64 " seeds from %" PRIu64 ", %" PRIu64 " failed, %.1fs; events %ld, "
               "increments committed %" PRIu64 " (acked %" PRIu64 "), reads %" PRIu64
               ", leader terms %" PRIu64 ", snapshot installs %" PRIu64 ", membership changes %" PRIu64
               ", transfers %" PRIu64 ", crashes %" PRIu64 "\n",
               seeds, start, failed, secs, total.events, total.committed_ops, total.acked_ops,
               total.reads_ok, total.elections, total.snapshots_sent, total.config_changes,
               total.transfers, total.crashes);
    return failed ? 1 : 0;
}
