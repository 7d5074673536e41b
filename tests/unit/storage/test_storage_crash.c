/*
 * test_storage_crash.c - crash states checked against a model. A seeded random workload appends
 * batches (some overwriting a suffix under a new term), records hard states, syncs, saves
 * snapshots (some consistent with the log, some from a "leader" that disagrees with it) and
 * starts segments; for a third of the seeds, writes fail now and then (ENOSPC or EIO, some after
 * a short write), which must change nothing. At random points the data directory is copied as a
 * crash would leave it:
 * everything written reached the disk, or the tail written since the last sync was torn at a
 * random byte. Recovering the copy must succeed and give exactly one of the states the model
 * went through since the last sync (record by record): nothing synced lost, nothing
 * half-written or overwritten brought back. A failing seed is printed and replays exactly:
 * GW_STORAGE_CRASH_SEED=<seed> [GW_STORAGE_CRASH_VERBOSE=1] test_storage_crash.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "storage.h"

#define MAXI 6000      /* highest index a run reaches */
#define MAXCAND 256    /* model states kept since the last sync */

struct mstate {
    uint64_t first, last; /* entries [first, last] */
    struct raft_hard_state hs;
    uint64_t snap_index, snap_term;
    uint32_t terms[MAXI + 1];
};

static struct mstate model;
static struct mstate cands[MAXCAND];
static int n_cands;
static uint64_t rng;
static bool verbose; /* GW_STORAGE_CRASH_VERBOSE: print every operation */
static int total_crashes, total_torn, total_failed;

static uint64_t rnd(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static uint64_t below(uint64_t n)
{
    return n ? rnd() % n : 0;
}

static void remember(void)
{
    if (n_cands < MAXCAND)
        cands[n_cands++] = model;
}

static uint32_t payload_len(uint64_t index, uint64_t term)
{
    return (uint32_t)((index * 7 + term) % 50);
}

static uint8_t payload_byte(uint64_t index, uint64_t term, uint32_t j)
{
    return (uint8_t)(index * 131 + term * 17 + j);
}

/* ---- Write failures: the log's pwrite goes through here (linked with --wrap=pwrite) -------- */

static unsigned fail_permille; /* chance that a pwrite fails, after a short write or not */

ssize_t __real_pwrite(int fd, const void *buf, size_t n, off_t off);
ssize_t __wrap_pwrite(int fd, const void *buf, size_t n, off_t off);

ssize_t __wrap_pwrite(int fd, const void *buf, size_t n, off_t off)
{
    if (fail_permille && below(1000) < fail_permille) {
        if (n > 1 && below(2) == 0)
            return __real_pwrite(fd, buf, 1 + below(n - 1), off); /* short; the rest fails */
        errno = below(2) ? ENOSPC : EIO;
        return -1;
    }
    return __real_pwrite(fd, buf, n, off);
}

/* ---- Files ------------------------------------------------------------------------------- */

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

/* Copies every file of src into a fresh dst; returns the name of the last segment in *last. */
static void copy_dir(const char *src, const char *dst, char *last, size_t cap)
{
    rm_flat(dst);
    assert_int_equal(mkdir(dst, 0700), 0);
    DIR *d = opendir(src);
    assert_non_null(d);
    struct dirent *de;
    last[0] = '\0';
    static uint8_t buf[1 << 16];
    while ((de = readdir(d)) != NULL) {
        if (de->d_name[0] == '.' || strcmp(de->d_name, "LOCK") == 0)
            continue;
        char a[512], b[512];
        snprintf(a, sizeof(a), "%.200s/%.200s", src, de->d_name);
        snprintf(b, sizeof(b), "%.200s/%.200s", dst, de->d_name);
        int in = open(a, O_RDONLY), out = open(b, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        assert_true(in >= 0 && out >= 0);
        ssize_t n;
        while ((n = read(in, buf, sizeof(buf))) > 0)
            assert_int_equal(write(out, buf, (size_t)n), n);
        close(in);
        close(out);
        size_t l = strlen(de->d_name);
        if (l > 4 && strcmp(de->d_name + l - 4, ".wal") == 0 && strcmp(de->d_name, last) > 0)
            snprintf(last, cap, "%s", de->d_name);
    }
    closedir(d);
}

static off_t file_size(const char *dir, const char *name)
{
    char p[512];
    struct stat st;
    snprintf(p, sizeof(p), "%.200s/%.200s", dir, name);
    return stat(p, &st) == 0 ? st.st_size : -1;
}

/* ---- Checking a recovered copy against the candidates ----------------------------------- */

static bool matches(const struct gw_wal_recovered *rec, const struct mstate *c)
{
    if (memcmp(&rec->hard_state, &c->hs, sizeof(c->hs)) != 0)
        return false;
    if (rec->has_snapshot != (c->snap_index > 0))
        return false;
    if (c->snap_index > 0 &&
        (rec->snapshot.index != c->snap_index || rec->snapshot.term != c->snap_term))
        return false;
    if (c->last < c->first)
        return rec->n_entries == 0;
    if (rec->n_entries == 0) /* all of it compacted away: only if the snapshot covers it all */
        return c->snap_index >= c->last;
    uint64_t f = rec->entries[0].index, l = f + rec->n_entries - 1;
    if (l != c->last || f < c->first || f > (c->snap_index + 1 > c->first ? c->snap_index + 1 : c->first))
        return false;
    for (size_t i = 0; i < rec->n_entries; i++) {
        const struct raft_entry *e = &rec->entries[i];
        if (e->index != f + i || e->term != c->terms[e->index] ||
            e->len != payload_len(e->index, e->term))
            return false;
        for (uint32_t j = 0; j < e->len; j++)
            if (e->data[j] != payload_byte(e->index, e->term, j))
                return false;
    }
    return true;
}

/* ---- The workload ------------------------------------------------------------------------ */

struct run {
    char dir[128], crash[160];
    struct gw_wal *w;
    struct gw_wal_options o;
    uint64_t cur_term;
    char synced_seg[64];  /* last segment at the last sync ... */
    off_t synced_size;    /* ... and its size then */
    int crashes, torn;
};

static void after_sync(struct run *r)
{
    n_cands = 0;
    remember();
    char last[64];
    /* find the last segment now: list the live directory */
    DIR *d = opendir(r->dir);
    struct dirent *de;
    last[0] = '\0';
    while ((de = readdir(d)) != NULL) {
        size_t l = strlen(de->d_name);
        if (l > 4 && strcmp(de->d_name + l - 4, ".wal") == 0 && strcmp(de->d_name, last) > 0)
            snprintf(last, sizeof(last), "%.63s", de->d_name);
    }
    closedir(d);
    snprintf(r->synced_seg, sizeof(r->synced_seg), "%s", last);
    r->synced_size = file_size(r->dir, last);
}

static void op_append(struct run *r, uint64_t seed)
{
    static struct raft_entry e[16];
    static uint8_t data[16][64];
    size_t n = 1 + below(16);
    uint64_t lo = model.snap_index + 1 > model.first ? model.snap_index + 1 : model.first;
    uint64_t i0 = model.last + 1;
    if (model.last >= lo && below(5) == 0) { /* a new leader overwrites a suffix */
        i0 = lo + below(model.last - lo + 1);
        r->cur_term++;
    }
    if (i0 + n > MAXI)
        return;
    for (size_t k = 0; k < n; k++) {
        uint64_t idx = i0 + k;
        e[k].index = idx;
        e[k].term = r->cur_term;
        e[k].type = RAFT_ENTRY_NORMAL;
        e[k].len = payload_len(idx, r->cur_term);
        for (uint32_t j = 0; j < e[k].len; j++)
            data[k][j] = payload_byte(idx, r->cur_term, j);
        e[k].data = data[k];
    }
    if (verbose)
        printf("append %llu..%llu term %llu (last %llu)\n", (unsigned long long)i0,
               (unsigned long long)(i0 + n - 1), (unsigned long long)r->cur_term,
               (unsigned long long)model.last);
    int rc = gw_wal_append(r->w, e, n);
    if (rc == GW_WAL_ERR_DISK_FULL || rc == GW_WAL_ERR_IO) {
        if (verbose)
            printf("  failed: %s\n", gw_wal_errmsg(r->w));
        total_failed++;
        return; /* injected: nothing changed */
    }
    if (rc != 0)
        fail_msg("seed %llu: append: %s", (unsigned long long)seed, gw_wal_errmsg(r->w));
    if (i0 <= model.last) {
        model.last = i0 - 1;
        remember(); /* the next-index record alone */
    }
    for (size_t k = 0; k < n; k++) {
        model.terms[i0 + k] = (uint32_t)r->cur_term;
        model.last = i0 + k;
        remember();
    }
}

static void op_hard_state(struct run *r)
{
    struct raft_hard_state hs = {.term = r->cur_term, .vote = r->cur_term % 3 + 1,
                                 .commit = below(model.last + 1)};
    int rc = gw_wal_set_hard_state(r->w, &hs);
    if (rc == GW_WAL_ERR_DISK_FULL || rc == GW_WAL_ERR_IO) {
        total_failed++;
        return;
    }
    assert_int_equal(rc, 0);
    model.hs = hs;
    remember();
}

static void op_sync(struct run *r)
{
    assert_int_equal(gw_wal_sync(r->w, NULL), 0);
    after_sync(r);
}

static void op_snapshot(struct run *r, bool from_leader, uint64_t seed)
{
    struct raft_snapshot s;
    memset(&s, 0, sizeof(s));
    s.conf.n = 1;
    s.conf.members[0].id = 1;
    s.conf.members[0].role = RAFT_VOTER;
    uint64_t trailing = below(3) == 0 ? 0 : below(40);
    if (from_leader) {
        s.index = model.snap_index + 1 + below(model.last + 6 - model.snap_index);
        if (s.index + 20 > MAXI)
            return;
        s.term = ++r->cur_term; /* newer than anything stored: the log disagrees */
        trailing = 0;
    } else {
        uint64_t lo = model.snap_index + 1 > model.first ? model.snap_index + 1 : model.first;
        if (model.last < lo)
            return;
        s.index = lo + below(model.last - lo + 1);
        s.term = model.terms[s.index];
    }
    if (verbose)
        printf("snapshot %llu term %llu trailing %llu%s\n", (unsigned long long)s.index,
               (unsigned long long)s.term, (unsigned long long)trailing,
               from_leader ? " from the leader" : "");
    int rc = gw_wal_save_snapshot(r->w, &s, trailing);
    if (rc == GW_WAL_ERR_DISK_FULL || rc == GW_WAL_ERR_IO) {
        if (verbose)
            printf("  failed: %s\n", gw_wal_errmsg(r->w));
        if (from_leader)
            r->cur_term--;
        total_failed++;
        return;
    }
    if (rc != 0)
        fail_msg("seed %llu: snapshot: %s", (unsigned long long)seed, gw_wal_errmsg(r->w));
    model.snap_index = s.index;
    model.snap_term = s.term;
    if (from_leader) {
        model.first = s.index + 1;
        model.last = s.index;
    }
    after_sync(r); /* saving a snapshot syncs */
}

static void crash_and_check(struct run *r, uint64_t seed, int step)
{
    char last[64];
    copy_dir(r->dir, r->crash, last, sizeof(last));
    bool tear = !r->o.preallocate && last[0] && below(2) == 0;
    if (tear) {
        off_t size = file_size(r->crash, last);
        off_t from = strcmp(last, r->synced_seg) == 0 ? r->synced_size : 32;
        if (size > from) {
            off_t cut = from + (off_t)below((uint64_t)(size - from));
            char p[512];
            snprintf(p, sizeof(p), "%.200s/%.63s", r->crash, last);
            assert_int_equal(truncate(p, cut), 0);
            if (verbose)
                printf("crash: %s torn at %lld (synced up to %lld)\n", last, (long long)cut,
                       (long long)from);
            r->torn++;
        }
    }
    struct gw_wal *w;
    struct gw_wal_recovered rec;
    char err[512];
    unsigned saved = fail_permille;
    fail_permille = 0; /* recovery of the copy may write (a cut tail, a marker) */
    int rc = gw_wal_open(r->crash, &r->o, &w, &rec, err, sizeof(err));
    fail_permille = saved;
    if (rc != 0)
        fail_msg("seed %llu step %d: recovery refused a crash state: %s", (unsigned long long)seed,
                 step, err);
    bool ok = false;
    for (int i = n_cands - 1; i >= 0 && !ok; i--)
        ok = matches(&rec, &cands[i]);
    if (!ok)
        fail_msg("seed %llu step %d: recovered state (%zu entries from %llu, term %llu) is none of "
                 "the %d states since the last sync",
                 (unsigned long long)seed, step, rec.n_entries,
                 (unsigned long long)(rec.n_entries ? rec.entries[0].index : 0),
                 (unsigned long long)rec.hard_state.term, n_cands);
    gw_wal_recovered_free(&rec);
    gw_wal_close(w);
    r->crashes++;
}

/* A clean restart of the live log: it must hold exactly the current state and go on from it. */
static void op_restart(struct run *r, uint64_t seed)
{
    gw_wal_close(r->w);
    struct gw_wal_recovered rec;
    char err[512];
    unsigned saved = fail_permille;
    fail_permille = 0;
    int rc = gw_wal_open(r->dir, &r->o, &r->w, &rec, err, sizeof(err));
    fail_permille = saved;
    if (rc != 0)
        fail_msg("seed %llu: reopen: %s", (unsigned long long)seed, err);
    if (!matches(&rec, &model))
        fail_msg("seed %llu: reopened log differs from what was written", (unsigned long long)seed);
    if (verbose)
        printf("restart: %zu entries\n", rec.n_entries);
    gw_wal_recovered_free(&rec);
    after_sync(r);
}

static void one_seed(uint64_t seed, const char *root)
{
    struct run r;
    memset(&r, 0, sizeof(r));
    rng = seed * 0x9e3779b97f4a7c15ull + 1;
    snprintf(r.dir, sizeof(r.dir), "%s/live", root);
    snprintf(r.crash, sizeof(r.crash), "%s/crash", root);
    rm_flat(r.dir);
    gw_wal_options_default(&r.o);
    r.o.sync = false; /* a copy of the directory is the crash: what a sync would flush is there */
    r.o.preallocate = below(2) == 0;
    r.o.segment_bytes = 4096 + below(4) * 4096;
    fail_permille = 0;
    unsigned faults = below(3) == 0 ? 30 : 0; /* a third of the seeds see write failures */
    struct gw_wal_recovered rec;
    char err[512];
    assert_int_equal(gw_wal_open(r.dir, &r.o, &r.w, &rec, err, sizeof(err)), 0);
    gw_wal_recovered_free(&rec);
    fail_permille = faults;
    memset(&model, 0, sizeof(model));
    model.first = 1;
    r.cur_term = 1;
    after_sync(&r);

    for (int step = 0; step < 400; step++) {
        uint64_t x = below(100);
        if (x < 45)
            op_append(&r, seed);
        else if (x < 60)
            op_hard_state(&r);
        else if (x < 80)
            op_sync(&r);
        else if (x < 86)
            op_snapshot(&r, false, seed);
        else if (x < 88)
            op_snapshot(&r, true, seed);
        else if (x < 90)
            op_restart(&r, seed);
        else
            crash_and_check(&r, seed, step);
        if (n_cands >= MAXCAND - 20)
            op_sync(&r);
    }
    fail_permille = 0;
    gw_wal_close(r.w);
    rm_flat(r.dir);
    rm_flat(r.crash);
    total_crashes += r.crashes;
    total_torn += r.torn;
}

static void every_crash_state_recovers_to_a_state_the_log_went_through(void **state)
{
    (void)state;
    char root[64] = "/tmp/gw-wal-crash-XXXXXX";
    assert_non_null(mkdtemp(root));
    const char *env = getenv("GW_STORAGE_CRASH_SEEDS");
    const char *one = getenv("GW_STORAGE_CRASH_SEED");
    verbose = getenv("GW_STORAGE_CRASH_VERBOSE") != NULL;
    uint64_t seeds = env ? strtoull(env, NULL, 10) : 40;
    uint64_t start = one ? strtoull(one, NULL, 10) : 1;
    if (one)
        seeds = start;
    for (uint64_t seed = start; seed <= seeds; seed++)
        one_seed(seed, root);
    rmdir(root);
    printf("%d crash states recovered and matched, %d of them with a torn tail; %d writes failed "
           "on purpose\n",
           total_crashes, total_torn, total_failed);
    if (!one) /* the default seeds must exercise every kind of crash */
        assert_true(total_torn > 0 && total_crashes > total_torn && total_failed > 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(every_crash_state_recovers_to_a_state_the_log_went_through),
    };
    return cmocka_run_group_tests_name("storage_crash", tests, NULL, NULL);
}
