/*
 * test_storage_faults.c - write and fsync failures injected under the log (the linker routes
 * its pwrite and fdatasync through the wrappers below): a failed or short write is cut back
 * off and leaves the log usable, nothing of it is ever read back; a failed fsync makes the log
 * refuse writes until it is reopened, and the reopened log holds everything acknowledged.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "storage.h"

/* ---- Fault injection --------------------------------------------------------------------- */

static int fail_fsync_errno;    /* the next fdatasync fails with this errno */
static int fail_write_errno;    /* the next pwrite fails with this errno ... */
static size_t fail_write_after; /* ... after writing this many bytes of it (a short write) */

ssize_t __real_pwrite(int fd, const void *buf, size_t n, off_t off);
int __real_fdatasync(int fd);
ssize_t __wrap_pwrite(int fd, const void *buf, size_t n, off_t off);
int __wrap_fdatasync(int fd);

ssize_t __wrap_pwrite(int fd, const void *buf, size_t n, off_t off)
{
    if (fail_write_errno) {
        if (fail_write_after > 0 && n > fail_write_after) {
            ssize_t k = __real_pwrite(fd, buf, fail_write_after, off);
            fail_write_after = 0;
            return k; /* short; the retry of the rest fails below */
        }
        errno = fail_write_errno;
        fail_write_errno = 0;
        return -1;
    }
    return __real_pwrite(fd, buf, n, off);
}

int __wrap_fdatasync(int fd)
{
    if (fail_fsync_errno) {
        errno = fail_fsync_errno;
        fail_fsync_errno = 0;
        return -1;
    }
    return __real_fdatasync(fd);
}

/* ---- Helpers ----------------------------------------------------------------------------- */

static char dir[128];

static int setup(void **state)
{
    (void)state;
    snprintf(dir, sizeof(dir), "/tmp/gw-wal-faults-XXXXXX");
    if (!mkdtemp(dir))
        return -1;
    fail_fsync_errno = fail_write_errno = 0;
    fail_write_after = 0;
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    DIR *d = opendir(dir);
    if (d) {
        struct dirent *de;
        char p[512];
        while ((de = readdir(d)) != NULL) {
            snprintf(p, sizeof(p), "%.127s/%.255s", dir, de->d_name);
            unlink(p);
        }
        closedir(d);
    }
    rmdir(dir);
    return 0;
}

static uint8_t data[64][200];

static int append(struct gw_wal *w, uint64_t from, size_t n, uint64_t term)
{
    struct raft_entry e[64];
    for (size_t i = 0; i < n; i++) {
        memset(data[i], (int)(from + i), sizeof(data[i]));
        e[i].index = from + i;
        e[i].term = term;
        e[i].type = RAFT_ENTRY_NORMAL;
        e[i].len = sizeof(data[i]);
        e[i].data = data[i];
    }
    return gw_wal_append(w, e, n);
}

static struct gw_wal *open_ok(struct gw_wal_recovered *rec, bool prealloc)
{
    struct gw_wal_options o;
    gw_wal_options_default(&o);
    o.segment_bytes = 64 * 1024;
    o.preallocate = prealloc;
    struct gw_wal *w;
    char err[512];
    int rc = gw_wal_open(dir, &o, &w, rec, err, sizeof(err));
    if (rc != 0)
        fail_msg("open: %s", err);
    return w;
}

static void expect_log(const struct gw_wal_recovered *rec, uint64_t last, uint64_t term_from,
                       uint64_t term)
{
    assert_int_equal(rec->n_entries, last);
    for (size_t i = 0; i < rec->n_entries; i++) {
        const struct raft_entry *e = &rec->entries[i];
        assert_int_equal(e->index, i + 1);
        assert_int_equal(e->term, e->index >= term_from ? term : 1);
        for (uint32_t j = 0; j < e->len; j++)
            assert_int_equal(e->data[j], (uint8_t)e->index);
    }
    assert_int_equal(rec->torn_bytes, 0);
}

/* ---- Tests ------------------------------------------------------------------------------- */

static void failed_write_is_cut_back_off_and_the_log_stays_usable(bool prealloc, int err)
{
    struct gw_wal_recovered rec;
    struct gw_wal *w = open_ok(&rec, prealloc);
    gw_wal_recovered_free(&rec);
    assert_int_equal(append(w, 1, 10, 1), 0);
    assert_int_equal(gw_wal_sync(w, NULL), 0);

    fail_write_errno = err;
    fail_write_after = 1000; /* a short write first: some records of the batch do land */
    int rc = append(w, 11, 20, 1);
    assert_int_equal(rc, err == ENOSPC ? GW_WAL_ERR_DISK_FULL : GW_WAL_ERR_IO);
    assert_non_null(strstr(gw_wal_errmsg(w), strerror(err)));
    struct gw_wal_stats st;
    gw_wal_stats(w, &st);
    assert_int_equal(st.last_index, 10);
    assert_int_equal(gw_wal_sync(w, NULL), 0); /* nothing half-written gets synced */

    /* the same log takes the batch once the disk works again, with another term even */
    assert_int_equal(append(w, 11, 5, 2), 0);
    assert_int_equal(gw_wal_sync(w, NULL), 0);
    gw_wal_close(w);
    w = open_ok(&rec, prealloc);
    expect_log(&rec, 15, 11, 2); /* none of the failed batch's records came back */
    gw_wal_recovered_free(&rec);
    gw_wal_close(w);
}

static void short_write_then_disk_full_leaves_no_trace(void **state)
{
    (void)state;
    failed_write_is_cut_back_off_and_the_log_stays_usable(false, ENOSPC);
}

static void short_write_then_io_error_in_a_preallocated_segment_leaves_no_trace(void **state)
{
    (void)state;
    failed_write_is_cut_back_off_and_the_log_stays_usable(true, EIO);
}

static void failed_hard_state_write_keeps_the_previous_one(void **state)
{
    (void)state;
    struct gw_wal_recovered rec;
    struct gw_wal *w = open_ok(&rec, true);
    gw_wal_recovered_free(&rec);
    struct raft_hard_state a = {.term = 3, .vote = 2, .commit = 0};
    struct raft_hard_state b = {.term = 4, .vote = 1, .commit = 0};
    assert_int_equal(gw_wal_set_hard_state(w, &a), 0);
    assert_int_equal(gw_wal_sync(w, NULL), 0);
    fail_write_errno = ENOSPC;
    assert_int_equal(gw_wal_set_hard_state(w, &b), GW_WAL_ERR_DISK_FULL);
    assert_int_equal(gw_wal_sync(w, NULL), 0);
    gw_wal_close(w);
    w = open_ok(&rec, true);
    assert_int_equal(rec.hard_state.term, 3);
    assert_int_equal(rec.hard_state.vote, 2);
    gw_wal_recovered_free(&rec);
    /* and the write goes through later */
    assert_int_equal(gw_wal_set_hard_state(w, &b), 0);
    assert_int_equal(gw_wal_sync(w, NULL), 0);
    gw_wal_close(w);
    w = open_ok(&rec, true);
    assert_int_equal(rec.hard_state.term, 4);
    gw_wal_recovered_free(&rec);
    gw_wal_close(w);
}

static void failed_fsync_refuses_writes_until_reopened_and_keeps_what_was_acknowledged(void **state)
{
    (void)state;
    struct gw_wal_recovered rec;
    struct gw_wal *w = open_ok(&rec, true);
    gw_wal_recovered_free(&rec);
    assert_int_equal(append(w, 1, 10, 1), 0);
    assert_int_equal(gw_wal_sync(w, NULL), 0); /* acknowledged */
    assert_int_equal(append(w, 11, 5, 1), 0);
    fail_fsync_errno = EIO;
    assert_int_equal(gw_wal_sync(w, NULL), GW_WAL_ERR_IO);
    assert_non_null(strstr(gw_wal_errmsg(w), "fdatasync"));
    /* the kernel may have dropped those pages: no retry may claim they are durable */
    assert_int_equal(gw_wal_sync(w, NULL), GW_WAL_ERR_BROKEN);
    assert_int_equal(append(w, 16, 1, 1), GW_WAL_ERR_BROKEN);
    struct raft_hard_state hs = {.term = 2, .vote = 1, .commit = 0};
    assert_int_equal(gw_wal_set_hard_state(w, &hs), GW_WAL_ERR_BROKEN);
    assert_string_equal(gw_wal_errname(GW_WAL_ERR_BROKEN), "broken");
    gw_wal_close(w);

    w = open_ok(&rec, true);
    assert_true(rec.n_entries >= 10); /* 11..15 may or may not be there: never acknowledged */
    for (size_t i = 0; i < 10; i++)
        assert_int_equal(rec.entries[i].index, i + 1);
    gw_wal_recovered_free(&rec);
    gw_wal_close(w);
}

static void disk_full_at_fsync_is_reported_as_disk_full(void **state)
{
    (void)state;
    struct gw_wal_recovered rec;
    struct gw_wal *w = open_ok(&rec, false);
    gw_wal_recovered_free(&rec);
    assert_int_equal(append(w, 1, 3, 1), 0);
    fail_fsync_errno = ENOSPC; /* delayed allocation can fail only at writeback */
    assert_int_equal(gw_wal_sync(w, NULL), GW_WAL_ERR_DISK_FULL);
    assert_int_equal(gw_wal_sync(w, NULL), GW_WAL_ERR_BROKEN);
    gw_wal_close(w);
}

static void failed_fsync_of_a_full_segment_fails_the_append_that_starts_the_next(void **state)
{
    (void)state;
    struct gw_wal_recovered rec;
    struct gw_wal *w = open_ok(&rec, true);
    gw_wal_recovered_free(&rec);
    uint64_t next = 1;
    int rc = 0;
    struct gw_wal_stats st;
    /* fill the first segment without syncing, then make the sync that precedes a new one fail */
    for (;;) {
        gw_wal_stats(w, &st);
        if (st.bytes + 64 * (200 + 32) > 64 * 1024)
            break;
        assert_int_equal(append(w, next, 16, 1), 0);
        next += 16;
    }
    fail_fsync_errno = EIO;
    rc = append(w, next, 64, 1);
    assert_int_equal(rc, GW_WAL_ERR_IO);
    assert_int_equal(append(w, next, 1, 1), GW_WAL_ERR_BROKEN);
    gw_wal_stats(w, &st);
    assert_int_equal(st.segments, 1);
    gw_wal_close(w);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(short_write_then_disk_full_leaves_no_trace, setup, teardown),
        cmocka_unit_test_setup_teardown(short_write_then_io_error_in_a_preallocated_segment_leaves_no_trace, setup, teardown),
        cmocka_unit_test_setup_teardown(failed_hard_state_write_keeps_the_previous_one, setup, teardown),
        cmocka_unit_test_setup_teardown(failed_fsync_refuses_writes_until_reopened_and_keeps_what_was_acknowledged, setup, teardown),
        cmocka_unit_test_setup_teardown(disk_full_at_fsync_is_reported_as_disk_full, setup, teardown),
        cmocka_unit_test_setup_teardown(failed_fsync_of_a_full_segment_fails_the_append_that_starts_the_next, setup, teardown),
    };
    return cmocka_run_group_tests_name("storage_faults", tests, NULL, NULL);
}
