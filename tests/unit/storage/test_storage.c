/*
 * test_storage.c - the write-ahead log on real files in a fresh temporary directory per test:
 * what is synced comes back after a reopen, a torn or damaged tail is cut off and never handed
 * back, damage before the tail refuses to start with a message naming the file and offset,
 * snapshots replace the log safely, and a full disk refuses writes without losing anything
 * (on a small tmpfs; skipped with a message when mounting is not allowed). A small mutation
 * loop checks that recovery never trusts a damaged length (run it under ASan).
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
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include "storage.h"

#define PAYLOAD_MAX 4096

/* ---- Fixture: a temporary directory, removed afterwards ----------------------------------- */

struct fx {
    char root[64]; /* mkdtemp dir */
    char dir[192]; /* root/data, the log's directory */
};

static int setup(void **state)
{
    struct fx *f = calloc(1, sizeof(*f));
    snprintf(f->root, sizeof(f->root), "/tmp/gw-wal-XXXXXX");
    if (!mkdtemp(f->root))
        return -1;
    snprintf(f->dir, sizeof(f->dir), "%s/data", f->root);
    *state = f;
    return 0;
}

static void rm_flat(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return;
    struct dirent *de;
    char p[512];
    while ((de = readdir(d)) != NULL) {
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
            continue;
        snprintf(p, sizeof(p), "%s/%s", dir, de->d_name);
        if (unlink(p) != 0 && errno == EISDIR)
            rm_flat(p);
    }
    closedir(d);
    rmdir(dir);
}

static int teardown(void **state)
{
    struct fx *f = *state;
    char mnt[128];
    snprintf(mnt, sizeof(mnt), "%s/tmpfs", f->root);
    rm_flat(f->dir);
    umount2(mnt, MNT_DETACH); /* if a full-disk test stopped half-way */
    rm_flat(f->root);
    free(f);
    return 0;
}

/* ---- Helpers ----------------------------------------------------------------------------- */

static struct gw_wal_options opts(uint64_t segment_bytes, bool sync)
{
    struct gw_wal_options o;
    gw_wal_options_default(&o);
    o.segment_bytes = segment_bytes;
    o.max_entry_bytes = 1u << 20;
    o.max_batch_bytes = 4u << 20;
    o.sync = sync;
    o.preallocate = false; /* byte-exact files; tests that want it turn it on */
    return o;
}

static struct gw_wal_options opts_prealloc(uint64_t segment_bytes, bool sync)
{
    struct gw_wal_options o = opts(segment_bytes, sync);
    o.preallocate = true;
    return o;
}

static struct gw_wal *open_ok(const char *dir, const struct gw_wal_options *o,
                              struct gw_wal_recovered *rec)
{
    struct gw_wal *w = NULL;
    char err[512];
    int rc = gw_wal_open(dir, o, &w, rec, err, sizeof(err));
    if (rc != 0)
        fail_msg("gw_wal_open: %s (%s)", err, gw_wal_errname(rc));
    return w;
}

static uint8_t payload_byte(uint64_t index, uint64_t term, uint32_t j)
{
    return (uint8_t)(index * 31u + term * 7u + j);
}

static uint8_t payloads[256][PAYLOAD_MAX];

/* n entries from index `from` with term `term` and `len` bytes each (n <= 256). */
static void make(struct raft_entry *e, uint64_t from, size_t n, uint64_t term, uint32_t len)
{
    assert_true(n <= 256 && len <= PAYLOAD_MAX);
    for (size_t i = 0; i < n; i++) {
        e[i].index = from + i;
        e[i].term = term;
        e[i].type = RAFT_ENTRY_NORMAL;
        e[i].len = len;
        for (uint32_t j = 0; j < len; j++)
            payloads[i][j] = payload_byte(from + i, term, j);
        e[i].data = payloads[i];
    }
}

static void append(struct gw_wal *w, uint64_t from, size_t n, uint64_t term, uint32_t len)
{
    struct raft_entry e[256];
    make(e, from, n, term, len);
    int rc = gw_wal_append(w, e, n);
    if (rc != 0)
        fail_msg("append %llu..: %s: %s", (unsigned long long)from, gw_wal_errname(rc),
                 gw_wal_errmsg(w));
}

static void sync_ok(struct gw_wal *w)
{
    int rc = gw_wal_sync(w, NULL);
    if (rc != 0)
        fail_msg("sync: %s: %s", gw_wal_errname(rc), gw_wal_errmsg(w));
}

/* The recovered entries include [from, to] with the given term (0: any) and intact data. */
static void expect_span(const struct gw_wal_recovered *rec, uint64_t from, uint64_t to,
                        uint64_t term)
{
    assert_true(rec->n_entries > 0);
    assert_true(from >= rec->entries[0].index);
    assert_true(to < rec->entries[0].index + rec->n_entries);
    for (size_t i = (size_t)(from - rec->entries[0].index); i <= to - rec->entries[0].index; i++) {
        const struct raft_entry *e = &rec->entries[i];
        assert_int_equal(e->index, rec->entries[0].index + i);
        if (term)
            assert_int_equal(e->term, term);
        assert_int_equal(e->type, RAFT_ENTRY_NORMAL);
        for (uint32_t j = 0; j < e->len; j++)
            if (e->data[j] != payload_byte(e->index, e->term, j))
                fail_msg("entry %llu byte %u differs", (unsigned long long)e->index, j);
    }
}

/* The recovered entries are exactly [from, to], as expect_span. */
static void expect_entries(const struct gw_wal_recovered *rec, uint64_t from, uint64_t to,
                           uint64_t term)
{
    assert_int_equal(rec->n_entries, to + 1 - from);
    if (rec->n_entries > 0) {
        assert_int_equal(rec->entries[0].index, from);
        expect_span(rec, from, to, term);
    }
}

/* Names of files ending in suffix, sorted; returns how many (at most max). */
static int list(const char *dir, const char *suffix, char names[][64], int max)
{
    DIR *d = opendir(dir);
    assert_non_null(d);
    int n = 0;
    struct dirent *de;
    size_t sl = strlen(suffix);
    while ((de = readdir(d)) != NULL) {
        size_t l = strlen(de->d_name);
        if (l > sl && strcmp(de->d_name + l - sl, suffix) == 0 && n < max)
            snprintf(names[n++], 64, "%.63s", de->d_name);
    }
    closedir(d);
    for (int i = 1; i < n; i++)
        for (int j = i; j > 0 && strcmp(names[j - 1], names[j]) > 0; j--) {
            char t[64];
            memcpy(t, names[j], 64);
            memcpy(names[j], names[j - 1], 64);
            memcpy(names[j - 1], t, 64);
        }
    return n;
}

static uint8_t *slurp(const char *path, size_t *len)
{
    FILE *fp = fopen(path, "rb");
    assert_non_null(fp);
    fseek(fp, 0, SEEK_END);
    long n = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    uint8_t *b = malloc((size_t)n + 1);
    assert_int_equal(fread(b, 1, (size_t)n, fp), (size_t)n);
    fclose(fp);
    *len = (size_t)n;
    return b;
}

static void spit(const char *path, const uint8_t *b, size_t len)
{
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    assert_int_equal(fwrite(b, 1, len, fp), len);
    fclose(fp);
}

static off_t file_size(const char *path)
{
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    return st.st_size;
}

static void only_segment(const char *dir, char *path, size_t cap)
{
    char names[8][64];
    assert_int_equal(list(dir, ".wal", names, 8), 1);
    snprintf(path, cap, "%.191s/%.63s", dir, names[0]);
}

static struct raft_snapshot snapshot_at(uint64_t index, uint64_t term, const uint8_t *data, size_t len)
{
    struct raft_snapshot s;
    memset(&s, 0, sizeof(s));
    s.index = index;
    s.term = term;
    s.conf.n = 1;
    s.conf.members[0].id = 1;
    s.conf.members[0].role = RAFT_VOTER;
    s.data = data;
    s.len = len;
    return s;
}

#define REC(len) (16u + (((16u + (len)) + 7u) & ~7u)) /* on-disk size of an entry record */

/* ---- Round trips ------------------------------------------------------------------------- */

static void invalid_options_and_arguments_are_refused(void **state)
{
    struct fx *f = *state;
    struct gw_wal *w = NULL;
    struct gw_wal_recovered rec;
    char err[256];
    struct gw_wal_options o = opts(GW_WAL_MIN_SEGMENT_BYTES - 1, false);
    assert_int_equal(gw_wal_open(f->dir, &o, &w, &rec, err, sizeof(err)), GW_WAL_ERR_INVALID);
    assert_non_null(strstr(err, "invalid"));
    o = opts(GW_WAL_MAX_SEGMENT_BYTES + 1, false);
    assert_int_equal(gw_wal_open(f->dir, &o, &w, &rec, err, sizeof(err)), GW_WAL_ERR_INVALID);
    o = opts(1 << 20, false);
    o.max_batch_bytes = o.max_entry_bytes; /* no room for one entry's record */
    assert_int_equal(gw_wal_open(f->dir, &o, &w, &rec, err, sizeof(err)), GW_WAL_ERR_INVALID);
    assert_int_equal(gw_wal_open("", NULL, &w, &rec, err, sizeof(err)), GW_WAL_ERR_INVALID);
    assert_int_equal(gw_wal_open(f->dir, NULL, NULL, &rec, err, sizeof(err)), GW_WAL_ERR_INVALID);
    assert_null(w);
    /* a path that is a file, not a directory */
    char file[512];
    snprintf(file, sizeof(file), "%.191s/plain", f->root);
    spit(file, (const uint8_t *)"x", 1);
    assert_int_equal(gw_wal_open(file, NULL, &w, &rec, err, sizeof(err)), GW_WAL_ERR_IO);
    assert_non_null(strstr(err, "Not a directory"));
    unlink(file);
    /* the names of the codes */
    assert_string_equal(gw_wal_errname(GW_WAL_ERR_CORRUPT), "corrupt");
    assert_string_equal(gw_wal_errname(GW_WAL_ERR_DISK_FULL), "disk_full");
    assert_non_null(strstr(gw_wal_strerror(GW_WAL_ERR_DISK_FULL), "disk full"));
    assert_string_equal(gw_wal_errname(0), "ok");
    assert_string_equal(gw_wal_errname(-999), "unknown");
}

static void fresh_directory_is_created_and_recovers_empty(void **state)
{
    struct fx *f = *state;
    struct gw_wal_options o = opts(1 << 20, true);
    struct gw_wal_recovered rec;
    struct gw_wal *w = open_ok(f->dir, &o, &rec);
    assert_int_equal(rec.n_entries, 0);
    assert_false(rec.has_snapshot);
    assert_int_equal(rec.hard_state.term, 0);
    struct gw_wal_stats st;
    gw_wal_stats(w, &st);
    assert_int_equal(st.first_index, 1);
    assert_int_equal(st.last_index, 0);
    assert_int_equal(st.segments, 1);
    gw_wal_recovered_free(&rec);
    gw_wal_close(w);
}

static void entries_hard_state_and_snapshot_survive_reopen(void **state)
{
    struct fx *f = *state;
    struct gw_wal_options o = opts_prealloc(1 << 20, true);
    struct gw_wal_recovered rec;
    struct gw_wal *w = open_ok(f->dir, &o, &rec);
    gw_wal_recovered_free(&rec);

    append(w, 1, 10, 1, 100);
    struct raft_hard_state hs = {.term = 2, .vote = 3, .commit = 7};
    assert_int_equal(gw_wal_set_hard_state(w, &hs), 0);
    append(w, 11, 5, 2, 0); /* empty payloads too */
    uint64_t ns = 1;
    assert_int_equal(gw_wal_sync(w, &ns), 0);
    uint8_t image[300];
    for (int i = 0; i < 300; i++)
        image[i] = (uint8_t)(i * 13);
    struct raft_snapshot snap = {.index = 5, .term = 1, .data = image, .len = sizeof(image)};
    snap.conf.n = 2;
    snap.conf.members[0].id = 1;
    snap.conf.members[0].role = RAFT_VOTER;
    snap.conf.members[1].id = 9;
    snap.conf.members[1].role = RAFT_LEARNER;
    assert_int_equal(gw_wal_save_snapshot(w, &snap, 3), 0);
    gw_wal_close(w);

    w = open_ok(f->dir, &o, &rec);
    assert_int_equal(rec.hard_state.term, 2);
    assert_int_equal(rec.hard_state.vote, 3);
    assert_int_equal(rec.hard_state.commit, 7);
    assert_true(rec.has_snapshot);
    assert_int_equal(rec.snapshot.index, 5);
    assert_int_equal(rec.snapshot.term, 1);
    assert_int_equal(rec.snapshot.len, sizeof(image));
    assert_memory_equal(rec.snapshot.data, image, sizeof(image));
    assert_int_equal(rec.snapshot.conf.n, 2);
    assert_int_equal(rec.snapshot.conf.members[1].id, 9);
    assert_int_equal(rec.snapshot.conf.members[1].role, RAFT_LEARNER);
    expect_entries(&rec, 1, 15, 0); /* one segment: nothing compacted */
    expect_span(&rec, 1, 10, 1);
    expect_span(&rec, 11, 15, 2);
    assert_int_equal(rec.entries[10].len, 0);
    assert_int_equal(rec.entries[14].index, 15);

    /* What was read back is accepted by the core as is. */
    struct raft_restore rs;
    gw_wal_recovered_restore(&rec, &rs);
    struct raft_config cfg;
    raft_config_default(&cfg, 3);
    struct raft *r = NULL;
    assert_int_equal(raft_new(&cfg, &rs, &r), 0);
    struct raft_status st;
    raft_status(r, &st);
    assert_int_equal(st.last_index, 15);
    assert_int_equal(st.term, 2);
    assert_int_equal(st.snapshot_index, 5);
    raft_free(r);
    gw_wal_recovered_free(&rec);
    gw_wal_close(w);
}

static void latest_hard_state_wins_and_backward_terms_are_refused(void **state)
{
    struct fx *f = *state;
    struct gw_wal_options o = opts(1 << 20, true);
    struct gw_wal_recovered rec;
    struct gw_wal *w = open_ok(f->dir, &o, &rec);
    for (uint64_t t = 1; t <= 20; t++) {
        struct raft_hard_state hs = {.term = t, .vote = t % 3 + 1, .commit = 0};
        assert_int_equal(gw_wal_set_hard_state(w, &hs), 0);
    }
    sync_ok(w);
    struct raft_hard_state back = {.term = 19, .vote = 1};
    assert_int_equal(gw_wal_set_hard_state(w, &back), GW_WAL_ERR_INVALID);
    struct raft_hard_state revote = {.term = 20, .vote = 9};
    assert_int_equal(gw_wal_set_hard_state(w, &revote), GW_WAL_ERR_INVALID);
    assert_non_null(strstr(gw_wal_errmsg(w), "take back"));
    gw_wal_close(w);
    gw_wal_recovered_free(&rec);
    w = open_ok(f->dir, &o, &rec);
    assert_int_equal(rec.hard_state.term, 20);
    assert_int_equal(rec.hard_state.vote, 20 % 3 + 1);
    gw_wal_recovered_free(&rec);
    gw_wal_close(w);
}

static void a_torn_hard_state_falls_back_to_the_previous_one(void **state)
{
    struct fx *f = *state;
    struct gw_wal_options o = opts(1 << 20, false);
    struct gw_wal_recovered rec;
    struct gw_wal *w = open_ok(f->dir, &o, &rec);
    gw_wal_recovered_free(&rec);
    struct raft_hard_state a = {.term = 4, .vote = 2, .commit = 0};
    struct raft_hard_state b = {.term = 5, .vote = 3, .commit = 0};
    assert_int_equal(gw_wal_set_hard_state(w, &a), 0);
    assert_int_equal(gw_wal_set_hard_state(w, &b), 0);
    sync_ok(w);
    gw_wal_close(w);
    char path[512];
    only_segment(f->dir, path, sizeof(path));
    off_t size = file_size(path);
    for (off_t cut = size - 40; cut < size; cut++) {
        assert_int_equal(truncate(path, cut), 0);
        w = open_ok(f->dir, &o, &rec);
        assert_int_equal(rec.hard_state.term, 4); /* never term 5 with vote 2, nor any mix */
        assert_int_equal(rec.hard_state.vote, 2);
        gw_wal_recovered_free(&rec);
        gw_wal_close(w);
    }
}

static void segments_roll_when_full_and_replay_in_order(void **state)
{
    struct fx *f = *state;
    struct gw_wal_options o = opts_prealloc(8192, true);
    struct gw_wal_recovered rec;
    struct gw_wal *w = open_ok(f->dir, &o, &rec);
    gw_wal_recovered_free(&rec);
    struct raft_hard_state hs = {.term = 3, .vote = 1, .commit = 0};
    assert_int_equal(gw_wal_set_hard_state(w, &hs), 0);
    for (uint64_t i = 1; i <= 200; i += 4)
        append(w, i, 4, 3, 500); /* ~2 KiB per batch, 3 batches per segment */
    sync_ok(w);
    struct gw_wal_stats st;
    gw_wal_stats(w, &st);
    assert_int_equal(st.last_index, 200);
    assert_true(st.segments >= 10);
    char names[64][64];
    int n = list(f->dir, ".wal", names, 64);
    assert_int_equal(n, (int)st.segments);
    for (int i = 0; i < n; i++) {
        char p[512];
        snprintf(p, sizeof(p), "%.191s/%.63s", f->dir, names[i]);
        assert_true(file_size(p) <= 8192); /* batches never straddle, and fit */
    }
    gw_wal_close(w);
    w = open_ok(f->dir, &o, &rec);
    expect_entries(&rec, 1, 200, 3);
    assert_int_equal(rec.hard_state.term, 3);
    gw_wal_recovered_free(&rec);
    gw_wal_close(w);
}

/* ---- Conflicting suffixes ---------------------------------------------------------------- */

static void conflicting_append_discards_the_suffix_across_restarts(void **state)
{
    struct fx *f = *state;
    struct gw_wal_options o = opts_prealloc(8192, true);
    struct gw_wal_recovered rec;
    struct gw_wal *w = open_ok(f->dir, &o, &rec);
    gw_wal_recovered_free(&rec);
    for (uint64_t i = 1; i <= 60; i += 6)
        append(w, i, 6, 1, 300); /* several segments of term 1 */
    sync_ok(w);
    append(w, 21, 3, 2, 50); /* a new leader rewrites from 21, reaching back into old segments */
    sync_ok(w);
    struct gw_wal_stats st;
    gw_wal_stats(w, &st);
    assert_int_equal(st.last_index, 23);
    gw_wal_close(w);

    w = open_ok(f->dir, &o, &rec);
    expect_entries(&rec, 1, 23, 0);
    expect_span(&rec, 1, 20, 1);
    expect_span(&rec, 21, 23, 2);
    assert_int_equal(rec.entries[19].term, 1);
    assert_int_equal(rec.entries[20].term, 2);
    assert_int_equal(rec.entries[22].term, 2);
    expect_entries(&rec, 1, 23, 0);
    gw_wal_recovered_free(&rec);
    /* and again, from the end of the new suffix, surviving one more restart */
    append(w, 23, 2, 3, 10);
    sync_ok(w);
    gw_wal_close(w);
    w = open_ok(f->dir, &o, &rec);
    expect_entries(&rec, 1, 24, 0);
    assert_int_equal(rec.entries[22].term, 3);
    gw_wal_recovered_free(&rec);
    gw_wal_close(w);
}

static void appends_that_break_the_log_rules_are_refused(void **state)
{
    struct fx *f = *state;
    struct gw_wal_options o = opts(1 << 20, false);
    struct gw_wal_recovered rec;
    struct gw_wal *w = open_ok(f->dir, &o, &rec);
    gw_wal_recovered_free(&rec);
    append(w, 1, 5, 2, 10);
    struct raft_entry e[4];
    make(e, 7, 1, 2, 10); /* gap */
    assert_int_equal(gw_wal_append(w, e, 1), GW_WAL_ERR_INVALID);
    make(e, 6, 1, 1, 10); /* term going down */
    assert_int_equal(gw_wal_append(w, e, 1), GW_WAL_ERR_INVALID);
    make(e, 6, 2, 2, 10);
    e[1].index = 8; /* not consecutive */
    assert_int_equal(gw_wal_append(w, e, 2), GW_WAL_ERR_INVALID);
    make(e, 6, 1, 2, 10);
    e[0].term = 0;
    assert_int_equal(gw_wal_append(w, e, 1), GW_WAL_ERR_INVALID);
    make(e, 6, 1, 2, 10);
    e[0].len = (1u << 20) + 1; /* > max_entry_bytes */
    assert_int_equal(gw_wal_append(w, e, 1), GW_WAL_ERR_TOO_BIG);
    struct gw_wal_stats st;
    gw_wal_stats(w, &st);
    assert_int_equal(st.last_index, 5);
    gw_wal_close(w);
}

/* ---- Torn and damaged tails, damage in the middle ---------------------------------------- */

static void torn_last_record_recovers_to_the_previous_record_at_every_cut(void **state)
{
    struct fx *f = *state;
    struct gw_wal_options o = opts(1 << 20, false);
    struct gw_wal_recovered rec;
    struct gw_wal *w = open_ok(f->dir, &o, &rec);
    gw_wal_recovered_free(&rec);
    append(w, 1, 5, 1, 100);
    sync_ok(w);
    gw_wal_close(w);
    char path[512];
    only_segment(f->dir, path, sizeof(path));
    size_t len;
    uint8_t *orig = slurp(path, &len);
    size_t last = len - REC(100);
    for (size_t cut = last; cut < len; cut++) {
        spit(path, orig, cut);
        w = open_ok(f->dir, &o, &rec);
        expect_entries(&rec, 1, 4, 1);
        assert_true(rec.torn_bytes <= cut - last); /* trailing zeros of the piece are not counted */
        assert_true(cut == last || rec.torn_bytes > 0);
        if (cut > last)
            assert_non_null(strstr(rec.note, "torn"));
        assert_int_equal(file_size(path), (off_t)last);
        gw_wal_recovered_free(&rec);
        if (cut % 16 == 0) { /* the log goes on from the cut */
            append(w, 5, 2, 2, 30);
            sync_ok(w);
            gw_wal_close(w);
            w = open_ok(f->dir, &o, &rec);
            expect_entries(&rec, 1, 6, 0);
            assert_int_equal(rec.entries[4].term, 2);
            gw_wal_recovered_free(&rec);
        }
        gw_wal_close(w);
    }
    free(orig);
}

static void torn_tail_in_a_preallocated_segment_recovers_and_keeps_the_space(void **state)
{
    struct fx *f = *state;
    struct gw_wal_options o = opts_prealloc(1 << 20, false);
    struct gw_wal_recovered rec;
    struct gw_wal *w = open_ok(f->dir, &o, &rec);
    gw_wal_recovered_free(&rec);
    append(w, 1, 5, 1, 100);
    sync_ok(w);
    gw_wal_close(w);
    char path[512];
    only_segment(f->dir, path, sizeof(path));
    size_t len;
    uint8_t *orig = slurp(path, &len);
    assert_int_equal(len, 1 << 20);
    size_t end = 32 + 5 * REC(100), last = end - REC(100);
    for (size_t k = last + 1; k < end; k += 5) {
        /* the pages of the last record from k on never reached the disk: zeros */
        uint8_t *b = malloc(len);
        memcpy(b, orig, len);
        memset(b + k, 0, end - k);
        spit(path, b, len);
        free(b);
        w = open_ok(f->dir, &o, &rec);
        expect_entries(&rec, 1, 4, 1);
        assert_true(rec.torn_bytes > 0 && rec.torn_bytes <= k - last);
        gw_wal_recovered_free(&rec);
        assert_int_equal(file_size(path), (off_t)len); /* still preallocated */
        append(w, 5, 1, 2, 3); /* a shorter record where the torn one was */
        sync_ok(w);
        gw_wal_close(w);
        w = open_ok(f->dir, &o, &rec);
        expect_entries(&rec, 1, 5, 0);
        assert_int_equal(rec.entries[4].term, 2);
        assert_int_equal(rec.torn_bytes, 0); /* nothing of the torn record was left behind */
        gw_wal_recovered_free(&rec);
        gw_wal_close(w);
    }
    free(orig);
}

static void every_cut_of_a_segment_with_every_record_kind_recovers_a_prefix(void **state)
{
    struct fx *f = *state;
    struct gw_wal_options o = opts(1 << 20, false);
    struct gw_wal_recovered rec;
    struct gw_wal *w = open_ok(f->dir, &o, &rec);
    gw_wal_recovered_free(&rec);
    struct raft_hard_state hs = {.term = 1, .vote = 1, .commit = 0};
    assert_int_equal(gw_wal_set_hard_state(w, &hs), 0);
    append(w, 1, 6, 1, 20);
    append(w, 4, 2, 2, 9); /* next-index record */
    struct raft_snapshot s = snapshot_at(3, 1, NULL, 0);
    assert_int_equal(gw_wal_save_snapshot(w, &s, 100), 0); /* snapshot record, nothing dropped */
    hs.term = 2;
    hs.commit = 5;
    assert_int_equal(gw_wal_set_hard_state(w, &hs), 0);
    append(w, 6, 1, 2, 3);
    sync_ok(w);
    gw_wal_close(w);
    char path[512];
    only_segment(f->dir, path, sizeof(path));
    size_t len;
    uint8_t *orig = slurp(path, &len);
    for (size_t cut = 32; cut <= len; cut++) {
        spit(path, orig, cut);
        w = open_ok(f->dir, &o, &rec);
        assert_true(rec.has_snapshot); /* the file; a log cut before index 3 is dropped */
        for (size_t i = 0; i < rec.n_entries; i++) {
            const struct raft_entry *e = &rec.entries[i];
            assert_int_equal(e->index, rec.entries[0].index + i);
            assert_true(e->term == 1 || (e->index >= 4 && e->term == 2));
            if (i > 0)
                assert_true(e->term >= rec.entries[i - 1].term);
            for (uint32_t j = 0; j < e->len; j++)
                assert_int_equal(e->data[j], payload_byte(e->index, e->term, j));
        }
        if (cut == len) {
            expect_entries(&rec, 1, 6, 0);
            assert_int_equal(rec.hard_state.term, 2);
        }
        gw_wal_recovered_free(&rec);
        gw_wal_close(w);
    }
    free(orig);
}

static void flipped_byte_in_the_last_record_is_cut_off(void **state)
{
    struct fx *f = *state;
    struct gw_wal_options o = opts(1 << 20, false);
    struct gw_wal_recovered rec;
    struct gw_wal *w = open_ok(f->dir, &o, &rec);
    gw_wal_recovered_free(&rec);
    append(w, 1, 5, 1, 100);
    sync_ok(w);
    gw_wal_close(w);
    char path[512];
    only_segment(f->dir, path, sizeof(path));
    size_t len;
    uint8_t *orig = slurp(path, &len);
    size_t last = len - REC(100);
    for (size_t at = last; at < len; at += 7) {
        orig[at] ^= 0x20;
        spit(path, orig, len);
        orig[at] ^= 0x20;
        w = open_ok(f->dir, &o, &rec);
        expect_entries(&rec, 1, 4, 1);
        assert_true(rec.torn_bytes > REC(100) - 8 && rec.torn_bytes <= REC(100)); /* padding is zeros */
        gw_wal_recovered_free(&rec);
        gw_wal_close(w);
    }
    free(orig);
}

static void flipped_byte_in_a_middle_record_refuses_to_open_naming_file_and_offset(void **state)
{
    struct fx *f = *state;
    struct gw_wal_options o = opts(1 << 20, false);
    struct gw_wal_recovered rec;
    struct gw_wal *w = open_ok(f->dir, &o, &rec);
    gw_wal_recovered_free(&rec);
    append(w, 1, 5, 1, 100);
    sync_ok(w);
    gw_wal_close(w);
    char path[512];
    only_segment(f->dir, path, sizeof(path));
    size_t len;
    uint8_t *b = slurp(path, &len);
    size_t third = 32 + 2 * REC(100); /* segment header, two records */
    b[third + 40] ^= 1;
    spit(path, b, len);
    char err[512];
    w = (struct gw_wal *)1;
    int rc = gw_wal_open(f->dir, &o, &w, &rec, err, sizeof(err));
    assert_int_equal(rc, GW_WAL_ERR_CORRUPT);
    assert_null(w);
    assert_int_equal(rec.n_entries, 0);
    char off[32];
    snprintf(off, sizeof(off), "offset %zu", third);
    assert_non_null(strstr(err, off));
    assert_non_null(strstr(err, strrchr(path, '/') + 1));
    assert_non_null(strstr(err, "refusing to start"));
    /* nothing was cut: the operator still has the evidence */
    assert_int_equal(file_size(path), (off_t)len);
    free(b);
}

static void damage_in_a_segment_that_is_not_the_last_refuses_to_open(void **state)
{
    struct fx *f = *state;
    struct gw_wal_options o = opts(4096, false);
    struct gw_wal_recovered rec;
    struct gw_wal *w = open_ok(f->dir, &o, &rec);
    gw_wal_recovered_free(&rec);
    for (uint64_t i = 1; i <= 40; i += 4)
        append(w, i, 4, 1, 300);
    sync_ok(w);
    gw_wal_close(w);
    char names[32][64];
    int n = list(f->dir, ".wal", names, 32);
    assert_true(n >= 3);
    char path[512];
    snprintf(path, sizeof(path), "%.191s/%.63s", f->dir, names[0]);
    size_t len;
    uint8_t *b = slurp(path, &len);
    /* damage the tail of the first segment: not a torn tail, since segments after it exist */
    b[len - 5] ^= 0xff;
    spit(path, b, len);
    char err[512];
    assert_int_equal(gw_wal_open(f->dir, &o, &w, &rec, err, sizeof(err)), GW_WAL_ERR_CORRUPT);
    assert_non_null(strstr(err, names[0]));
    assert_non_null(strstr(err, "not the last"));
    free(b);
}

static void missing_middle_segment_refuses_to_open(void **state)
{
    struct fx *f = *state;
    struct gw_wal_options o = opts(4096, false);
    struct gw_wal_recovered rec;
    struct gw_wal *w = open_ok(f->dir, &o, &rec);
    gw_wal_recovered_free(&rec);
    for (uint64_t i = 1; i <= 40; i += 4)
        append(w, i, 4, 1, 300);
    sync_ok(w);
    gw_wal_close(w);
    char names[32][64];
    int n = list(f->dir, ".wal", names, 32);
    assert_true(n >= 3);
    char path[512];
    snprintf(path, sizeof(path), "%.191s/%.63s", f->dir, names[1]);
    assert_int_equal(unlink(path), 0);
    char err[512];
    assert_int_equal(gw_wal_open(f->dir, &o, &w, &rec, err, sizeof(err)), GW_WAL_ERR_CORRUPT);
    assert_non_null(strstr(err, "missing"));
    assert_non_null(strstr(err, names[0]));
    assert_non_null(strstr(err, names[2]));
}

static void missing_first_segment_without_snapshot_refuses_to_open(void **state)
{
    struct fx *f = *state;
    struct gw_wal_options o = opts(4096, false);
    struct gw_wal_recovered rec;
    struct gw_wal *w = open_ok(f->dir, &o, &rec);
    gw_wal_recovered_free(&rec);
    for (uint64_t i = 1; i <= 40; i += 4)
        append(w, i, 4, 1, 300);
    sync_ok(w);
    gw_wal_close(w);
    char names[32][64];
    list(f->dir, ".wal", names, 32);
    char path[512];
    snprintf(path, sizeof(path), "%.191s/%.63s", f->dir, names[0]);
    assert_int_equal(unlink(path), 0);
    char err[512];
    assert_int_equal(gw_wal_open(f->dir, &o, &w, &rec, err, sizeof(err)), GW_WAL_ERR_CORRUPT);
    assert_non_null(strstr(err, "no valid snapshot"));
}

static void interrupted_segment_creation_is_removed(void **state)
{
    struct fx *f = *state;
    struct gw_wal_options o = opts(4096, false);
    struct gw_wal_recovered rec;
    struct gw_wal *w = open_ok(f->dir, &o, &rec);
    gw_wal_recovered_free(&rec);
    append(w, 1, 3, 1, 100);
    sync_ok(w);
    gw_wal_close(w);
    char names[8][64], path[512];
    assert_int_equal(list(f->dir, ".wal", names, 8), 1);
    /* the next segment as a crash during its creation may leave it: a few bytes of header */
    snprintf(path, sizeof(path), "%s/0000000000000002-0000000000000004.wal", f->dir);
    spit(path, (const uint8_t *)"GWRAF", 5);
    w = open_ok(f->dir, &o, &rec);
    expect_entries(&rec, 1, 3, 1);
    assert_non_null(strstr(rec.note, "interrupted"));
    gw_wal_recovered_free(&rec);
    append(w, 4, 1, 1, 100);
    sync_ok(w);
    gw_wal_close(w);
    w = open_ok(f->dir, &o, &rec);
    expect_entries(&rec, 1, 4, 1);
    gw_wal_recovered_free(&rec);
    gw_wal_close(w);
}

static void second_open_of_a_directory_in_use_is_refused(void **state)
{
    struct fx *f = *state;
    struct gw_wal_options o = opts(1 << 20, false);
    struct gw_wal_recovered rec, rec2;
    struct gw_wal *w = open_ok(f->dir, &o, &rec), *w2 = NULL;
    char err[256];
    assert_int_equal(gw_wal_open(f->dir, &o, &w2, &rec2, err, sizeof(err)), GW_WAL_ERR_LOCKED);
    assert_non_null(strstr(err, "in use"));
    gw_wal_recovered_free(&rec);
    gw_wal_close(w);
    w2 = open_ok(f->dir, &o, &rec2);
    gw_wal_recovered_free(&rec2);
    gw_wal_close(w2);
}

/* ---- Snapshots --------------------------------------------------------------------------- */


static void snapshot_compacts_old_segments_and_recovery_starts_after_it(void **state)
{
    struct fx *f = *state;
    struct gw_wal_options o = opts_prealloc(4096, true);
    struct gw_wal_recovered rec;
    struct gw_wal *w = open_ok(f->dir, &o, &rec);
    gw_wal_recovered_free(&rec);
    struct raft_hard_state hs = {.term = 1, .vote = 1, .commit = 0};
    assert_int_equal(gw_wal_set_hard_state(w, &hs), 0);
    for (uint64_t i = 1; i <= 100; i += 4)
        append(w, i, 4, 1, 300);
    hs.commit = 100;
    assert_int_equal(gw_wal_set_hard_state(w, &hs), 0);
    sync_ok(w);
    struct gw_wal_stats before, after;
    gw_wal_stats(w, &before);
    uint8_t img[64] = {1, 2, 3};
    struct raft_snapshot s1 = snapshot_at(40, 1, img, sizeof(img));
    assert_int_equal(gw_wal_save_snapshot(w, &s1, 0), 0);
    struct raft_snapshot s2 = snapshot_at(80, 1, img, sizeof(img));
    assert_int_equal(gw_wal_save_snapshot(w, &s2, 0), 0);
    gw_wal_stats(w, &after);
    assert_true(after.segments < before.segments);
    assert_true(after.bytes < before.bytes);
    assert_true(after.first_index > 1 && after.first_index <= 81);
    assert_int_equal(after.snapshot_index, 80);
    char names[64][64];
    assert_int_equal(list(f->dir, ".snap", names, 64), 1); /* the older snapshot is gone */
    assert_non_null(strstr(names[0], "0000000000000050-0000000000000001.snap"));
    assert_int_equal(list(f->dir, ".wal", names, 64), (int)after.segments);
    gw_wal_close(w);

    w = open_ok(f->dir, &o, &rec);
    assert_true(rec.has_snapshot);
    assert_int_equal(rec.snapshot.index, 80);
    assert_true(rec.entries[0].index <= 81);
    expect_entries(&rec, rec.entries[0].index, 100, 1);
    assert_int_equal(rec.hard_state.commit, 100); /* survived the removal of old segments */
    assert_int_equal(rec.hard_state.vote, 1);
    gw_wal_recovered_free(&rec);
    append(w, 101, 1, 1, 10);
    sync_ok(w);
    gw_wal_close(w);
    w = open_ok(f->dir, &o, &rec);
    assert_int_equal(rec.entries[rec.n_entries - 1].index, 101);
    gw_wal_recovered_free(&rec);
    gw_wal_close(w);
}

static void snapshot_keeps_trailing_entries_the_caller_asks_for(void **state)
{
    struct fx *f = *state;
    struct gw_wal_options o = opts(4096, false);
    struct gw_wal_recovered rec;
    struct gw_wal *w = open_ok(f->dir, &o, &rec);
    gw_wal_recovered_free(&rec);
    for (uint64_t i = 1; i <= 100; i += 4)
        append(w, i, 4, 1, 300);
    sync_ok(w);
    struct raft_snapshot s = snapshot_at(90, 1, NULL, 0);
    assert_int_equal(gw_wal_save_snapshot(w, &s, 30), 0);
    gw_wal_close(w);
    w = open_ok(f->dir, &o, &rec);
    assert_true(rec.n_entries > 0);
    assert_true(rec.entries[0].index <= 61);
    assert_true(rec.entries[0].index > 1); /* something was compacted */
    expect_entries(&rec, rec.entries[0].index, 100, 1);
    gw_wal_recovered_free(&rec);
    /* more trailing entries than there are: nothing goes */
    struct raft_snapshot s2 = snapshot_at(95, 1, NULL, 0);
    assert_int_equal(gw_wal_save_snapshot(w, &s2, 1000), 0);
    struct gw_wal_stats st;
    gw_wal_stats(w, &st);
    gw_wal_close(w);
    w = open_ok(f->dir, &o, &rec);
    assert_int_equal(rec.entries[0].index, st.first_index);
    assert_true(st.first_index <= 61);
    expect_entries(&rec, st.first_index, 100, 1);
    gw_wal_recovered_free(&rec);
    gw_wal_close(w);
}

static void snapshot_from_the_leader_replaces_a_disagreeing_log(void **state)
{
    struct fx *f = *state;
    struct gw_wal_options o = opts(4096, true);
    struct gw_wal_recovered rec;
    struct gw_wal *w = open_ok(f->dir, &o, &rec);
    gw_wal_recovered_free(&rec);
    for (uint64_t i = 1; i <= 60; i += 4)
        append(w, i, 4, 1, 300); /* entries of term 1 up to 60 */
    sync_ok(w);
    /* the leader's snapshot says index 50 has term 2: everything stored goes */
    struct raft_snapshot s = snapshot_at(50, 2, (const uint8_t *)"img", 3);
    assert_int_equal(gw_wal_save_snapshot(w, &s, 10), 0);
    struct gw_wal_stats st;
    gw_wal_stats(w, &st);
    assert_int_equal(st.first_index, 51);
    assert_int_equal(st.last_index, 50);
    append(w, 51, 3, 2, 20);
    sync_ok(w);
    gw_wal_close(w);
    w = open_ok(f->dir, &o, &rec);
    assert_int_equal(rec.snapshot.index, 50);
    expect_entries(&rec, 51, 53, 2);
    gw_wal_recovered_free(&rec);
    gw_wal_close(w);

    /* a snapshot beyond the end of the log empties it too */
    w = open_ok(f->dir, &o, &rec);
    gw_wal_recovered_free(&rec);
    struct raft_snapshot far = snapshot_at(500, 3, NULL, 0);
    assert_int_equal(gw_wal_save_snapshot(w, &far, 10), 0);
    gw_wal_close(w);
    w = open_ok(f->dir, &o, &rec);
    assert_int_equal(rec.n_entries, 0);
    assert_int_equal(rec.snapshot.index, 500);
    gw_wal_recovered_free(&rec);
    append(w, 501, 1, 3, 5);
    sync_ok(w);
    gw_wal_close(w);
    w = open_ok(f->dir, &o, &rec);
    expect_entries(&rec, 501, 501, 3);
    gw_wal_recovered_free(&rec);
    gw_wal_close(w);
}

static void crash_between_temporary_snapshot_write_and_rename_keeps_the_old_snapshot(void **state)
{
    struct fx *f = *state;
    struct gw_wal_options o = opts(1 << 20, true);
    struct gw_wal_recovered rec;
    struct gw_wal *w = open_ok(f->dir, &o, &rec);
    gw_wal_recovered_free(&rec);
    append(w, 1, 50, 1, 10);
    sync_ok(w);
    uint8_t old_img[16] = "old image";
    struct raft_snapshot s = snapshot_at(20, 1, old_img, sizeof(old_img));
    assert_int_equal(gw_wal_save_snapshot(w, &s, 0), 0);
    gw_wal_close(w);
    /* what a writer killed before its rename leaves: a (possibly partial) temporary file */
    char path[512];
    snprintf(path, sizeof(path), "%s/0000000000000028-0000000000000001.snap.tmp", f->dir);
    spit(path, (const uint8_t *)"GWRAFTSN partial", 16);

    w = open_ok(f->dir, &o, &rec);
    assert_true(rec.has_snapshot);
    assert_int_equal(rec.snapshot.index, 20);
    assert_memory_equal(rec.snapshot.data, old_img, sizeof(old_img));
    expect_entries(&rec, rec.entries[0].index, 50, 1);
    assert_non_null(strstr(rec.note, ".snap.tmp"));
    assert_int_equal(access(path, F_OK), -1); /* removed */
    gw_wal_recovered_free(&rec);
    gw_wal_close(w);
}

static void crash_after_the_snapshot_rename_but_before_its_log_marker_recovers(void **state)
{
    struct fx *f = *state;
    struct gw_wal_options o = opts(1 << 20, false);
    struct gw_wal_recovered rec;
    struct gw_wal *w = open_ok(f->dir, &o, &rec);
    gw_wal_recovered_free(&rec);
    append(w, 1, 60, 1, 10);
    sync_ok(w);
    gw_wal_close(w);
    char seg[512];
    only_segment(f->dir, seg, sizeof(seg));
    size_t len;
    uint8_t *before = slurp(seg, &len); /* the log as it was before the snapshot */

    /* a snapshot from a leader that disagrees at index 50 (term 2) */
    w = open_ok(f->dir, &o, &rec);
    gw_wal_recovered_free(&rec);
    struct raft_snapshot s = snapshot_at(50, 2, (const uint8_t *)"leader", 6);
    assert_int_equal(gw_wal_save_snapshot(w, &s, 0), 0);
    gw_wal_close(w);
    spit(seg, before, len); /* the crash lost the marker: the log is the old one */
    free(before);

    w = open_ok(f->dir, &o, &rec);
    assert_int_equal(rec.snapshot.index, 50);
    assert_int_equal(rec.n_entries, 0); /* the disagreeing log is not handed back */
    gw_wal_recovered_free(&rec);
    append(w, 51, 2, 2, 10);
    sync_ok(w);
    gw_wal_close(w);
    w = open_ok(f->dir, &o, &rec);
    expect_entries(&rec, 51, 52, 2);
    gw_wal_recovered_free(&rec);
    gw_wal_close(w);
}

static void damaged_latest_snapshot_falls_back_to_an_older_one_when_the_log_allows(void **state)
{
    struct fx *f = *state;
    struct gw_wal_options o = opts(1 << 20, false);
    struct gw_wal_recovered rec;
    struct gw_wal *w = open_ok(f->dir, &o, &rec);
    gw_wal_recovered_free(&rec);
    append(w, 1, 50, 1, 10);
    sync_ok(w);
    struct raft_snapshot s = snapshot_at(20, 1, (const uint8_t *)"twenty", 6);
    assert_int_equal(gw_wal_save_snapshot(w, &s, 0), 0);
    gw_wal_close(w);
    /* a newer snapshot file whose contents rotted (its log segments are all still there) */
    char path[512];
    snprintf(path, sizeof(path), "%s/0000000000000028-0000000000000001.snap", f->dir);
    spit(path, (const uint8_t *)"GWRAFTSN\1\0\0\0garbage garbage garbage garbage garbage!", 52);
    w = open_ok(f->dir, &o, &rec);
    assert_int_equal(rec.snapshot.index, 20);
    expect_entries(&rec, 1, 50, 1);
    gw_wal_recovered_free(&rec);
    gw_wal_close(w);
}

/* ---- Full disk --------------------------------------------------------------------------- */

static void full_disk_refuses_writes_with_a_clear_error_and_loses_nothing(void **state)
{
    struct fx *f = *state;
    char mnt[128], filler[160];
    snprintf(mnt, sizeof(mnt), "%s/tmpfs", f->root);
    assert_int_equal(mkdir(mnt, 0700), 0);
    if (mount("tmpfs", mnt, "tmpfs", 0, "size=1m") != 0) {
        fprintf(stderr, "[  SKIP    ] full disk: cannot mount a 1 MiB tmpfs here (%s)\n",
                strerror(errno));
        rmdir(mnt);
        skip();
    }
    snprintf(f->dir, sizeof(f->dir), "%s/data", mnt);
    snprintf(filler, sizeof(filler), "%s/filler", mnt);
    struct gw_wal_options o = opts_prealloc(64 * 1024, true);
    struct gw_wal_recovered rec;
    struct gw_wal *w = open_ok(f->dir, &o, &rec);
    gw_wal_recovered_free(&rec);
    struct raft_hard_state hs = {.term = 2, .vote = 1, .commit = 0};
    assert_int_equal(gw_wal_set_hard_state(w, &hs), 0);
    append(w, 1, 20, 2, 1000);
    sync_ok(w); /* acknowledged */

    /* fill the disk */
    int fd = open(filler, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    assert_true(fd >= 0);
    static uint8_t chunk[4096];
    while (write(fd, chunk, sizeof(chunk)) > 0)
        ;
    assert_int_equal(errno, ENOSPC);

    uint64_t last = 20;
    int rc = 0;
    for (int i = 0; i < 64 && rc == 0; i++) {
        struct raft_entry e[4];
        make(e, last + 1, 4, 2, 1000);
        rc = gw_wal_append(w, e, 4);
        if (rc == 0)
            last += 4;
    }
    assert_int_equal(rc, GW_WAL_ERR_DISK_FULL);
    assert_string_equal(gw_wal_errname(rc), "disk_full");
    assert_non_null(strstr(gw_wal_errmsg(w), "No space left"));
    struct raft_hard_state hs2 = {.term = 3, .vote = 2, .commit = 0};
    rc = gw_wal_set_hard_state(w, &hs2);
    assert_true(rc == 0 || rc == GW_WAL_ERR_DISK_FULL); /* a record may still fit in a page */
    if (rc == 0)
        hs = hs2;
    uint8_t big[200 * 1024] = {0};
    struct raft_snapshot s = snapshot_at(10, 2, big, sizeof(big));
    assert_int_equal(gw_wal_save_snapshot(w, &s, 0), GW_WAL_ERR_DISK_FULL);
    char names[8][64];
    assert_int_equal(list(f->dir, ".tmp", names, 8), 0);
    assert_int_equal(list(f->dir, ".snap", names, 8), 0);
    sync_ok(w); /* what did get written is synced: acknowledged */
    struct gw_wal_stats st;
    gw_wal_stats(w, &st);
    assert_int_equal(st.last_index, last);
    gw_wal_close(w);

    /* nothing acknowledged is lost, even reopening on the full disk */
    w = open_ok(f->dir, &o, &rec);
    expect_entries(&rec, 1, last, 2);
    assert_int_equal(rec.hard_state.term, hs.term);
    assert_int_equal(rec.hard_state.vote, hs.vote);
    assert_int_equal(rec.torn_bytes, 0);
    gw_wal_recovered_free(&rec);

    /* space comes back: the same log takes writes again */
    close(fd);
    assert_int_equal(unlink(filler), 0);
    append(w, last + 1, 8, 2, 1000);
    sync_ok(w);
    assert_int_equal(gw_wal_save_snapshot(w, &s, 0), 0);
    gw_wal_close(w);
    w = open_ok(f->dir, &o, &rec);
    expect_entries(&rec, rec.entries[0].index, last + 8, 2);
    assert_int_equal(rec.snapshot.index, 10);
    gw_wal_recovered_free(&rec);
    gw_wal_close(w);

    rm_flat(f->dir);
    umount(mnt);
    rmdir(mnt);
}

/* ---- Never trust a length ---------------------------------------------------------------- */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint64_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static void mutated_segments_never_crash_recovery_nor_return_damaged_entries(void **state)
{
    struct fx *f = *state;
    struct gw_wal_options o = opts(1 << 20, false);
    struct gw_wal_recovered rec;
    struct gw_wal *w = open_ok(f->dir, &o, &rec);
    gw_wal_recovered_free(&rec);
    struct raft_hard_state hs = {.term = 1, .vote = 1, .commit = 0};
    assert_int_equal(gw_wal_set_hard_state(w, &hs), 0);
    for (uint64_t i = 1; i <= 40; i += 8)
        append(w, i, 8, 1, (uint32_t)(i * 3));
    append(w, 30, 3, 2, 7);
    struct raft_snapshot s = snapshot_at(10, 1, NULL, 0);
    assert_int_equal(gw_wal_save_snapshot(w, &s, 100), 0); /* a snapshot record, no compaction */
    sync_ok(w);
    gw_wal_close(w);
    char path[512];
    only_segment(f->dir, path, sizeof(path));
    size_t len;
    uint8_t *orig = slurp(path, &len);
    uint8_t *b = malloc(len);
    for (int iter = 0; iter < 400; iter++) {
        memcpy(b, orig, len);
        size_t n = len;
        int muts = 1 + (int)(rnd() % 4);
        for (int m = 0; m < muts; m++) {
            size_t at = (size_t)(rnd() % len);
            switch (rnd() % 3) {
            case 0:
                b[at] ^= (uint8_t)(1u << (rnd() % 8));
                break;
            case 1: /* a plausible but wrong length */
                if (at + 8 < len)
                    b[at + 4] = (uint8_t)rnd();
                break;
            default:
                b[at] = 0xff;
            }
        }
        if (rnd() % 4 == 0)
            n = (size_t)(rnd() % len);
        spit(path, b, n);
        char err[512];
        int rc = gw_wal_open(f->dir, &o, &w, &rec, err, sizeof(err));
        assert_true(rc == 0 || rc == GW_WAL_ERR_CORRUPT || rc == GW_WAL_ERR_VERSION);
        if (rc == 0) {
            expect_entries(&rec, 1, rec.n_entries, 0); /* a prefix, bytes intact */
            /* either side of the overwrite of 30.., never a mix */
            for (size_t i = 0; i < rec.n_entries; i++)
                if (rec.entries[i].term == 2)
                    assert_true(rec.entries[i].index >= 30 && rec.entries[i].index <= 32);
            if (rec.n_entries > 32)
                assert_int_equal(rec.entries[29].term, 1); /* old 33.. only with old 30.. */
            gw_wal_recovered_free(&rec);
            gw_wal_close(w);
        }
    }
    free(b);
    free(orig);
}

static void mutated_snapshot_files_never_crash_recovery_nor_return_a_damaged_image(void **state)
{
    struct fx *f = *state;
    struct gw_wal_options o = opts(4096, false);
    struct gw_wal_recovered rec;
    struct gw_wal *w = open_ok(f->dir, &o, &rec);
    gw_wal_recovered_free(&rec);
    for (uint64_t i = 1; i <= 40; i += 4)
        append(w, i, 4, 1, 300);
    sync_ok(w);
    uint8_t img[200];
    for (int i = 0; i < 200; i++)
        img[i] = (uint8_t)(i * 7 + 1);
    struct raft_snapshot s = snapshot_at(30, 1, img, sizeof(img));
    assert_int_equal(gw_wal_save_snapshot(w, &s, 0), 0);
    gw_wal_close(w);
    char names[4][64], path[512];
    assert_int_equal(list(f->dir, ".snap", names, 4), 1);
    snprintf(path, sizeof(path), "%.191s/%.63s", f->dir, names[0]);
    size_t len;
    uint8_t *orig = slurp(path, &len);
    uint8_t *b = malloc(len);
    int refused = 0;
    for (int iter = 0; iter < 300; iter++) {
        memcpy(b, orig, len);
        size_t at = (size_t)(rnd() % len);
        b[at] ^= (uint8_t)(1u + rnd() % 255);
        size_t n = rnd() % 5 == 0 ? (size_t)(rnd() % len) : len;
        spit(path, b, n);
        char err[512];
        int rc = gw_wal_open(f->dir, &o, &w, &rec, err, sizeof(err));
        if (rc != 0) {
            /* the segments before 30 are gone: without this snapshot the log has a hole */
            assert_true(rc == GW_WAL_ERR_CORRUPT || rc == GW_WAL_ERR_VERSION);
            if (rc == GW_WAL_ERR_CORRUPT)
                assert_non_null(strstr(err, "snapshot file is damaged"));
            refused++;
            continue;
        }
        assert_true(rec.has_snapshot);
        assert_int_equal(rec.snapshot.len, sizeof(img));
        assert_memory_equal(rec.snapshot.data, img, sizeof(img));
        gw_wal_recovered_free(&rec);
        gw_wal_close(w);
    }
    assert_int_equal(refused, 300); /* every byte of the file is checked */
    free(b);
    free(orig);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(invalid_options_and_arguments_are_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(fresh_directory_is_created_and_recovers_empty, setup, teardown),
        cmocka_unit_test_setup_teardown(entries_hard_state_and_snapshot_survive_reopen, setup, teardown),
        cmocka_unit_test_setup_teardown(latest_hard_state_wins_and_backward_terms_are_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(a_torn_hard_state_falls_back_to_the_previous_one, setup, teardown),
        cmocka_unit_test_setup_teardown(segments_roll_when_full_and_replay_in_order, setup, teardown),
        cmocka_unit_test_setup_teardown(conflicting_append_discards_the_suffix_across_restarts, setup, teardown),
        cmocka_unit_test_setup_teardown(appends_that_break_the_log_rules_are_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(torn_last_record_recovers_to_the_previous_record_at_every_cut, setup, teardown),
        cmocka_unit_test_setup_teardown(torn_tail_in_a_preallocated_segment_recovers_and_keeps_the_space, setup, teardown),
        cmocka_unit_test_setup_teardown(every_cut_of_a_segment_with_every_record_kind_recovers_a_prefix, setup, teardown),
        cmocka_unit_test_setup_teardown(flipped_byte_in_the_last_record_is_cut_off, setup, teardown),
        cmocka_unit_test_setup_teardown(flipped_byte_in_a_middle_record_refuses_to_open_naming_file_and_offset, setup, teardown),
        cmocka_unit_test_setup_teardown(damage_in_a_segment_that_is_not_the_last_refuses_to_open, setup, teardown),
        cmocka_unit_test_setup_teardown(missing_middle_segment_refuses_to_open, setup, teardown),
        cmocka_unit_test_setup_teardown(missing_first_segment_without_snapshot_refuses_to_open, setup, teardown),
        cmocka_unit_test_setup_teardown(interrupted_segment_creation_is_removed, setup, teardown),
        cmocka_unit_test_setup_teardown(second_open_of_a_directory_in_use_is_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(snapshot_compacts_old_segments_and_recovery_starts_after_it, setup, teardown),
        cmocka_unit_test_setup_teardown(snapshot_keeps_trailing_entries_the_caller_asks_for, setup, teardown),
        cmocka_unit_test_setup_teardown(snapshot_from_the_leader_replaces_a_disagreeing_log, setup, teardown),
        cmocka_unit_test_setup_teardown(crash_between_temporary_snapshot_write_and_rename_keeps_the_old_snapshot, setup, teardown),
        cmocka_unit_test_setup_teardown(crash_after_the_snapshot_rename_but_before_its_log_marker_recovers, setup, teardown),
        cmocka_unit_test_setup_teardown(damaged_latest_snapshot_falls_back_to_an_older_one_when_the_log_allows, setup, teardown),
        cmocka_unit_test_setup_teardown(full_disk_refuses_writes_with_a_clear_error_and_loses_nothing, setup, teardown),
        cmocka_unit_test_setup_teardown(mutated_segments_never_crash_recovery_nor_return_damaged_entries, setup, teardown),
        cmocka_unit_test_setup_teardown(mutated_snapshot_files_never_crash_recovery_nor_return_a_damaged_image, setup, teardown),
    };
    return cmocka_run_group_tests_name("storage", tests, NULL, NULL);
}
