/*
 * storage.h - the durable side of a Raft node: a segmented write-ahead log that holds the
 * entries, the hard state (term, vote, commit) and markers, plus snapshot files next to it.
 *
 * It implements step 1 of the core's persist-before-send contract (raft/raft.h): the node
 * appends an update's entries (gw_wal_append), records its hard state (gw_wal_set_hard_state),
 * then calls gw_wal_sync once; only when that returns 0 is anything durable and may the node
 * send the update's messages. One fdatasync covers everything written since the previous sync
 * (group commit), entries and hard state alike, because the hard state is a record in the same
 * log rather than a separate file.
 *
 * Every record carries a CRC32C. Opening a directory replays it: a torn or corrupt tail of the
 * last segment (what a crash in the middle of an unsynced write leaves) is cut off, so a partial
 * record is never handed back; damage anywhere else (a bad record followed by a valid one, a
 * missing segment, a gap in the indexes) makes gw_wal_open refuse with a message naming the file
 * and offset, since starting would silently forget something this node may have promised.
 * The on-disk layout is described in README.md next to this file.
 *
 * Not thread-safe: a log belongs to one thread (the node thread). A directory is locked (flock
 * on data_dir/LOCK) by the process that opened it. Errors: 0 or a negative GW_WAL_ERR_* code;
 * gw_wal_errmsg gives the detail (file, offset, errno text) of the last failure.
 */
#ifndef GW_RAFT_STORAGE_H
#define GW_RAFT_STORAGE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "raft.h"

#define GW_WAL_ERRORS(X)                                                                           \
    X(GW_WAL_ERR_INVALID, -1, "invalid", "invalid argument")                                       \
    X(GW_WAL_ERR_NOMEM, -2, "nomem", "out of memory")                                              \
    X(GW_WAL_ERR_IO, -3, "io", "I/O error")                                                        \
    X(GW_WAL_ERR_DISK_FULL, -4, "disk_full", "disk full (no space or quota left)")               \
    X(GW_WAL_ERR_CORRUPT, -5, "corrupt", "the log is damaged before its tail; refusing to start") \
    X(GW_WAL_ERR_LOCKED, -6, "locked", "the data directory is in use by another process")          \
    X(GW_WAL_ERR_TOO_BIG, -7, "too_big", "larger than the configured bound")                       \
    X(GW_WAL_ERR_BROKEN, -8, "broken", "an fsync failed, durability is unknown: reopen the log")   \
    X(GW_WAL_ERR_VERSION, -9, "bad_version", "unsupported on-disk format version")

enum gw_wal_error {
#define GW_WAL_ERR_ENUM(name, code, id, text) name = code,
    GW_WAL_ERRORS(GW_WAL_ERR_ENUM)
#undef GW_WAL_ERR_ENUM
};

/* Human text for an error code, and its snake_case name. */
const char *gw_wal_strerror(int err);
const char *gw_wal_errname(int err);

#define GW_WAL_FORMAT_VERSION 1
#define GW_WAL_MIN_SEGMENT_BYTES 4096u
#define GW_WAL_MAX_SEGMENT_BYTES (4ull << 30)
#define GW_WAL_MAX_ENTRY_BYTES (1u << 30)       /* hard cap on max_entry_bytes */
#define GW_WAL_MAX_SNAPSHOT_BYTES (1ull << 36) /* hard cap on max_snapshot_bytes */

struct gw_wal_options {
    uint64_t segment_bytes;      /* a new segment starts when the next batch would pass this;
                                    default 64 MiB, GW_WAL_MIN_SEGMENT_BYTES to
                                    GW_WAL_MAX_SEGMENT_BYTES */
    uint32_t max_entry_bytes;    /* largest entry payload; default 16 MiB */
    size_t max_batch_bytes;      /* encoded bytes in one gw_wal_append (the write buffer is
                                    at most this big); default 64 MiB, >= max_entry_bytes + 64 */
    uint64_t max_snapshot_bytes; /* largest snapshot image; default 1 GiB */
    bool sync;                   /* fdatasync/fsync for real; default true. false only for
                                    benchmarks and tests: nothing is then durable */
    bool preallocate;            /* reserve segment_bytes (fallocate) when a segment starts, so
                                    appends do not grow the file, and a full disk mostly shows
                                    up when a segment starts rather than mid-append; default
                                    true */
    /* Optional: one line per thing recovery repaired (a cut tail, a removed temporary file). */
    void (*log)(void *ctx, const char *line);
    void *log_ctx;
};

void gw_wal_options_default(struct gw_wal_options *o);

/* What gw_wal_open read back; hand it to raft_new through gw_wal_recovered_restore. */
struct gw_wal_recovered {
    struct raft_hard_state hard_state; /* zeros if never set */
    bool has_snapshot;
    struct raft_snapshot snapshot; /* the latest valid snapshot; data owned by this struct */
    struct raft_entry *entries;    /* contiguous, starting at or before snapshot.index + 1 and
                                      ending at or after it; data owned by this struct */
    size_t n_entries;
    uint64_t torn_bytes; /* bytes cut from the tail of the last segment; 0 if it was clean */
    char note[256];      /* the last repair made ("" if none), also sent to options.log */
    /* private: the buffers the pointers above point into */
    uint8_t **bufs_;
    size_t n_bufs_;
};

/* Frees what a gw_wal_recovered owns (safe on a zeroed or already freed one). */
void gw_wal_recovered_free(struct gw_wal_recovered *rec);

/* Fills a raft_restore pointing into rec (bootstrap left NULL); rec must outlive its use. */
void gw_wal_recovered_restore(const struct gw_wal_recovered *rec, struct raft_restore *out);

struct gw_wal;

/* Opens (creating dir, one level, if missing) and recovers a log. opt NULL: defaults.
 * On success *out is the log and *rec what it holds (free with gw_wal_recovered_free).
 * On failure nothing is allocated, *rec is zeroed and errbuf (if errlen > 0) says why, naming
 * the file and offset for corruption.
 * Errors: GW_WAL_ERR_INVALID, _NOMEM, _IO, _DISK_FULL (a repair could not be written),
 * _CORRUPT, _LOCKED, _VERSION. */
int gw_wal_open(const char *dir, const struct gw_wal_options *opt, struct gw_wal **out,
                struct gw_wal_recovered *rec, char *errbuf, size_t errlen);

/* Closes without syncing: whatever was not synced may or may not survive. NULL is fine. */
void gw_wal_close(struct gw_wal *w);

/* Appends n contiguous entries (n == 0 is a no-op). If entries[0].index <= the last index, the
 * stored entries from entries[0].index on are discarded first (a leader overwrote a conflicting
 * suffix); a restart never brings them back. Preconditions (else GW_WAL_ERR_INVALID):
 * entries[0].index in (snapshot index, last index + 1] and >= the first index, indexes
 * consecutive, terms non-zero and non-decreasing along the log. Data is copied; nothing is
 * durable until gw_wal_sync. The whole batch is written with one write to one segment (a new
 * segment is started first if it would not fit); on failure that write is cut back off, the log
 * is as before the call and stays usable.
 * Errors: _INVALID, _TOO_BIG (an entry > max_entry_bytes, a batch > max_batch_bytes),
 * _DISK_FULL, _IO, _NOMEM, _BROKEN. */
int gw_wal_append(struct gw_wal *w, const struct raft_entry *entries, size_t n);

/* Records term, vote and commit as one CRC-protected record: after a crash either the whole
 * new state or the previous one is read back, never a mix. Durable after gw_wal_sync. Setting
 * the state already recorded writes nothing.
 * Errors: _INVALID (the term going backwards, or another vote in the same term), _DISK_FULL,
 * _IO, _BROKEN. */
int gw_wal_set_hard_state(struct gw_wal *w, const struct raft_hard_state *hs);

/* Makes everything appended and set since the last sync durable with one fdatasync, and returns
 * only then. *fsync_ns (may be NULL) gets the time spent in it (0 if there was nothing to sync).
 * A failed fsync leaves the durability of the unsynced writes unknown (the kernel may have
 * dropped them), so the log refuses further writes with GW_WAL_ERR_BROKEN: close it and reopen
 * (in practice restart the node), which reads back only what is really on disk.
 * Errors: _DISK_FULL, _IO, _BROKEN. */
int gw_wal_sync(struct gw_wal *w, uint64_t *fsync_ns);

/* Saves a snapshot: image and metadata to a temporary file, fsync, rename, fsync of the
 * directory; then a marker in the log and a sync (so this call also syncs pending appends).
 * If the log holds snap->index with snap->term, entries after it stay and `trailing` entries up
 * to it are kept for slow followers; otherwise (a snapshot received from the leader replacing a
 * log that disagrees or is shorter) every stored entry is discarded and the log continues at
 * snap->index + 1. Then whole segments holding only entries before the kept ones, and older
 * snapshot files, are deleted. A snapshot at the current snapshot index is a no-op.
 * Errors: _INVALID (index 0 or older than the current snapshot), _TOO_BIG, _DISK_FULL, _IO,
 * _NOMEM, _BROKEN. A failure other than _BROKEN leaves the previous snapshot in use (the new
 * file is removed again if its log record could not be written). */
int gw_wal_save_snapshot(struct gw_wal *w, const struct raft_snapshot *snap, uint64_t trailing);

struct gw_wal_stats {
    uint64_t first_index; /* first entry held; last_index + 1 when the log is empty */
    uint64_t last_index;  /* last entry appended (synced or not) */
    uint64_t snapshot_index;
    uint64_t snapshot_term;
    uint64_t bytes;    /* bytes of records in the segment files (preallocated space not counted) */
    uint32_t segments; /* segment files */
    uint64_t syncs;    /* fdatasyncs done by gw_wal_sync */
    uint64_t last_fsync_ns;
};

void gw_wal_stats(const struct gw_wal *w, struct gw_wal_stats *st);

/* The detail of the last error returned by w ("" if none); valid until the next call. */
const char *gw_wal_errmsg(const struct gw_wal *w);

#endif
