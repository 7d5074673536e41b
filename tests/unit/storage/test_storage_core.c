/*
 * test_storage_core.c - the log driven by the real Raft core, as the node thread will drive it:
 * every update persisted (snapshot, entries, hard state, one sync) before it is advanced,
 * snapshots saved when the core asks, then the process "restarts" from what the log recovers.
 * A single-voter cluster keeps it deterministic; the state machine is a sum of the proposed
 * values, and the sum must come back exactly after every restart, with the term and vote kept.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "storage.h"

struct node {
    struct raft *r;
    struct gw_wal *w;
    struct raft_config cfg;
    uint64_t sum;      /* the state machine */
    uint64_t applied;  /* its applied index */
    uint8_t image[8];  /* its last snapshot */
    char dir[96];
};

static void put64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t get64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static void check(struct node *n, int rc, const char *what)
{
    if (rc != 0)
        fail_msg("%s: %s: %s", what, gw_wal_errname(rc), gw_wal_errmsg(n->w));
}

/* One pass of the node loop; `sync` false stops after the writes (a crash before the fsync). */
static bool turn(struct node *n, bool sync)
{
    if (!raft_has_ready(n->r))
        return false;
    struct raft_update u;
    assert_int_equal(raft_ready(n->r, &u), 0);
    if (u.snapshot)
        check(n, gw_wal_save_snapshot(n->w, u.snapshot, 0), "save received snapshot");
    if (u.n_entries)
        check(n, gw_wal_append(n->w, u.entries, u.n_entries), "append");
    if (u.hard_state_changed)
        check(n, gw_wal_set_hard_state(n->w, &u.hard_state), "hard state");
    if (!sync)
        return false;
    check(n, gw_wal_sync(n->w, NULL), "sync");
    for (size_t i = 0; i < u.n_committed; i++) {
        const struct raft_entry *e = &u.committed[i];
        if (e->type == RAFT_ENTRY_NORMAL && e->len == 8)
            n->sum += get64(e->data);
        n->applied = e->index;
    }
    assert_int_equal(raft_advance(n->r, &u), 0);
    if (u.snapshot_wanted) {
        put64(n->image, n->sum);
        assert_int_equal(raft_snapshot_saved(n->r, n->applied, n->image, 8), 0);
        check(n, gw_wal_save_snapshot(n->w, raft_last_snapshot(n->r), n->cfg.snapshot_trailing),
              "save snapshot");
    }
    return true;
}

static void settle(struct node *n)
{
    for (int i = 0; i < 1000 && turn(n, true); i++)
        ;
}

/* Opens the log and builds the core from what it holds, as a starting node does. */
static void start(struct node *n)
{
    struct gw_wal_options o;
    gw_wal_options_default(&o);
    o.segment_bytes = 16 * 1024;
    o.sync = false; /* the files are real; durability is the fsync's business, tested elsewhere */
    struct gw_wal_recovered rec;
    char err[512];
    int rc = gw_wal_open(n->dir, &o, &n->w, &rec, err, sizeof(err));
    if (rc != 0)
        fail_msg("open: %s", err);
    struct raft_membership boot = {.n = 1};
    boot.members[0].id = 1;
    boot.members[0].role = RAFT_VOTER;
    struct raft_restore rs;
    gw_wal_recovered_restore(&rec, &rs);
    rs.bootstrap = &boot;
    raft_config_default(&n->cfg, 1);
    n->cfg.snapshot_threshold = 64;
    n->cfg.snapshot_trailing = 16;
    assert_int_equal(raft_new(&n->cfg, &rs, &n->r), 0);
    n->sum = 0;
    n->applied = 0;
    if (rec.has_snapshot) {
        assert_int_equal(rec.snapshot.len, 8);
        n->sum = get64(rec.snapshot.data);
        n->applied = rec.snapshot.index;
    }
    gw_wal_recovered_free(&rec);
    assert_int_equal(raft_campaign(n->r), 0);
    settle(n);
    struct raft_status st;
    raft_status(n->r, &st);
    assert_int_equal(st.role, RAFT_LEADER);
}

static void stop(struct node *n)
{
    raft_free(n->r);
    gw_wal_close(n->w);
    n->r = NULL;
    n->w = NULL;
}

static uint64_t propose(struct node *n, uint64_t from, int count)
{
    uint64_t total = 0;
    for (int i = 0; i < count; i++) {
        uint8_t b[8];
        uint64_t v = from + (uint64_t)i;
        put64(b, v);
        assert_int_equal(raft_propose(n->r, b, 8, NULL), 0);
        total += v;
        if (i % 7 == 6)
            settle(n);
    }
    settle(n);
    return total;
}

static void rm_flat(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return;
    struct dirent *de;
    char p[512];
    while ((de = readdir(d)) != NULL) {
        if (strcmp(de->d_name, ".") != 0 && strcmp(de->d_name, "..") != 0) {
            snprintf(p, sizeof(p), "%.200s/%.200s", dir, de->d_name);
            unlink(p);
        }
    }
    closedir(d);
    rmdir(dir);
}

static void core_state_survives_restarts_with_snapshots_and_compaction(void **state)
{
    (void)state;
    struct node n;
    memset(&n, 0, sizeof(n));
    char root[64] = "/tmp/gw-wal-core-XXXXXX";
    assert_non_null(mkdtemp(root));
    snprintf(n.dir, sizeof(n.dir), "%s/data", root);

    start(&n);
    uint64_t expect = propose(&n, 1, 300);
    assert_int_equal(n.sum, expect);
    struct raft_status before;
    raft_status(n.r, &before);
    struct gw_wal_stats ws;
    gw_wal_stats(n.w, &ws);
    assert_true(ws.snapshot_index > 0); /* the core asked, the log saved */
    stop(&n);

    for (int round = 0; round < 3; round++) {
        start(&n);
        settle(&n);
        struct raft_status st;
        raft_status(n.r, &st);
        assert_true(st.term > before.term); /* a new election, never an old term again */
        assert_int_equal(st.vote, 1);
        assert_int_equal(n.sum, expect); /* snapshot + replayed entries = everything committed */
        expect += propose(&n, 1000 * (uint64_t)(round + 1), 100);
        assert_int_equal(n.sum, expect);
        raft_status(n.r, &before);
        stop(&n);
    }

    /* a crash after the writes of a turn but before its fsync: the proposal was never
     * acknowledged, so after the restart it is either there (the writes reached the file) or
     * not; here they did, and the new leader commits them */
    start(&n);
    uint8_t b[8];
    put64(b, 77);
    assert_int_equal(raft_propose(n.r, b, 8, NULL), 0);
    turn(&n, false);
    stop(&n);
    start(&n);
    settle(&n);
    assert_true(n.sum == expect || n.sum == expect + 77);
    stop(&n);
    rm_flat(n.dir);
    rmdir(root);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(core_state_survives_restarts_with_snapshots_and_compaction),
    };
    return cmocka_run_group_tests_name("storage_core", tests, NULL, NULL);
}
