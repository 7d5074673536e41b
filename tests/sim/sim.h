/*
 * sim.h - a deterministic simulation of a whole Raft cluster in one process.
 *
 * One seed fixes everything: the fault schedule, message delays, clock rates, client requests and
 * the cores' own random election timeouts. sim_run plays one seed on virtual time and checks the
 * Raft safety properties after every step, client linearizability and liveness at the end, and
 * reports the first violation. Replaying a seed with the same options repeats the run exactly.
 */
#ifndef TESTS_SIM_SIM_H
#define TESTS_SIM_SIM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct sim_opts {
    uint64_t seed;
    int nodes;     /* founding voters: 3, 5 or 7 */
    long steps;    /* events in the fault phase */
    bool verbose;  /* trace every event to stderr */
    bool no_faults; /* instant, reliable network, no crashes (benchmark) */
    long bench_entries; /* no_faults: stop after this many client entries committed */
};

struct sim_result {
    bool failed;
    char why[512];
    long events;
    uint64_t committed_ops; /* client increments committed */
    uint64_t acked_ops;
    uint64_t reads_ok;
    uint64_t elections;     /* distinct leader terms */
    uint64_t snapshots_sent; /* installs completed on followers */
    uint64_t config_changes;
    uint64_t transfers;
    uint64_t crashes;
    uint64_t virtual_us;
};

int sim_run(const struct sim_opts *o, struct sim_result *res);

#endif
