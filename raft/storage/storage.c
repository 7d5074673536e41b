/*
 * storage.c - the write-ahead log and snapshot files behind storage.h.
 *
 * A log is a directory of segment files, each a header followed by CRC32C-protected records
 * (entries, hard states, "the log continues at index i" markers after a conflicting suffix is
 * overwritten, and snapshot markers), plus snapshot files written to a temporary name and
 * renamed into place. Appends go to the page cache with one pwrite per batch; gw_wal_sync is the
 * one fdatasync that makes a batch durable. Nothing is ever overwritten in place: truncation is
 * a marker replayed on recovery, and space comes back when a snapshot lets whole segments go.
 * This keeps every acknowledged record where it was written, so a crash at any point leaves
 * either the old or the new state, never one of each (etcd's wal package follows the same idea).
 *
 * Recovery reads every segment in order and trusts no length it reads: a record is accepted
 * only if its kind, length, zero padding and CRC all check out. The replay rules are in
 * replay_record() and README.md.
 */
#include "storage.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* ---- On-disk constants (README.md describes the layout) ---------------------------------- */

#define SEG_MAGIC "GWRAFTWL"
#define SNAP_MAGIC "GWRAFTSN"
#define SEG_HDR 32u  /* magic[8] version u32, crc u32, seq u64, first index u64 */
#define SNAP_HDR 48u /* magic[8] version u32, crc u32, index, term, conf_len u32, 0 u32, data_len */
#define REC_HDR 16u  /* crc u32, body_len u32, kind u8, entry type u8, zero[6] */
#define REC_MAX_BODY ((uint64_t)GW_WAL_MAX_ENTRY_BYTES + 16u)
#define CONF_MAX 1024u /* encoded membership bound (RAFT_MAX_MEMBERS members) */

enum rec_kind {
    REC_ENTRY = 1,      /* body: term, index, payload */
    REC_HARD_STATE = 2, /* body: term, vote, commit */
    REC_NEXT = 3,       /* body: index; entries from it on are discarded, the log continues there */
    REC_SNAPSHOT = 4,   /* body: index, term, replaced (0 or 1); see replay_record() */
};

#define HS_REC_SIZE (REC_HDR + 24u)

/* ---- Errors ------------------------------------------------------------------------------ */

const char *gw_wal_strerror(int err)
{
    switch (err) {
    case 0:
        return "success";
#define GW_WAL_ERR_TEXT(name, code, id, text) \
    case code:                                \
        return text;
        GW_WAL_ERRORS(GW_WAL_ERR_TEXT)
#undef GW_WAL_ERR_TEXT
    }
    return "unknown error";
}

const char *gw_wal_errname(int err)
{
    switch (err) {
    case 0:
        return "ok";
#define GW_WAL_ERR_NAME(name, code, id, text) \
    case code:                                \
        return id;
        GW_WAL_ERRORS(GW_WAL_ERR_NAME)
#undef GW_WAL_ERR_NAME
    }
    return "unknown";
}

static int map_errno(int e)
{
    if (e == ENOSPC || e == EDQUOT)
        return GW_WAL_ERR_DISK_FULL;
    if (e == ENOMEM)
        return GW_WAL_ERR_NOMEM;
    return GW_WAL_ERR_IO;
}

/* ---- CRC32C (Castagnoli, reflected 0x82F63B78), the checksum of iSCSI, ext4 and etcd ----- */

static const uint32_t crc_table[256] = {
    0x00000000u, 0xf26b8303u, 0xe13b70f7u, 0x1350f3f4u, 0xc79a971fu, 0x35f1141cu,
    0x26a1e7e8u, 0xd4ca64ebu, 0x8ad958cfu, 0x78b2dbccu, 0x6be22838u, 0x9989ab3bu,
    0x4d43cfd0u, 0xbf284cd3u, 0xac78bf27u, 0x5e133c24u, 0x105ec76fu, 0xe235446cu,
    0xf165b798u, 0x030e349bu, 0xd7c45070u, 0x25afd373u, 0x36ff2087u, 0xc494a384u,
    0x9a879fa0u, 0x68ec1ca3u, 0x7bbcef57u, 0x89d76c54u, 0x5d1d08bfu, 0xaf768bbcu,
    0xbc267848u, 0x4e4dfb4bu, 0x20bd8edeu, 0xd2d60dddu, 0xc186fe29u, 0x33ed7d2au,
    0xe72719c1u, 0x154c9ac2u, 0x061c6936u, 0xf477ea35u, 0xaa64d611u, 0x580f5512u,
    0x4b5fa6e6u, 0xb93425e5u, 0x6dfe410eu, 0x9f95c20du, 0x8cc531f9u, 0x7eaeb2fau,
    0x30e349b1u, 0xc288cab2u, 0xd1d83946u, 0x23b3ba45u, 0xf779deaeu, 0x05125dadu,
    0x1642ae59u, 0xe4292d5au, 0xba3a117eu, 0x4851927du, 0x5b016189u, 0xa96ae28au,
    0x7da08661u, 0x8fcb0562u, 0x9c9bf696u, 0x6ef07595u, 0x417b1dbcu, 0xb3109ebfu,
    0xa0406d4bu, 0x522bee48u, 0x86e18aa3u, 0x748a09a0u, 0x67dafa54u, 0x95b17957u,
    0xcba24573u, 0x39c9c670u, 0x2a993584u, 0xd8f2b687u, 0x0c38d26cu, 0xfe53516fu,
    0xed03a29bu, 0x1f682198u, 0x5125dad3u, 0xa34e59d0u, 0xb01eaa24u, 0x42752927u,
    0x96bf4dccu, 0x64d4cecfu, 0x77843d3bu, 0x85efbe38u, 0xdbfc821cu, 0x2997011fu,
    0x3ac7f2ebu, 0xc8ac71e8u, 0x1c661503u, 0xee0d9600u, 0xfd5d65f4u, 0x0f36e6f7u,
    0x61c69362u, 0x93ad1061u, 0x80fde395u, 0x72966096u, 0xa65c047du, 0x5437877eu,
    0x4767748au, 0xb50cf789u, 0xeb1fcbadu, 0x197448aeu, 0x0a24bb5au, 0xf84f3859u,
    0x2c855cb2u, 0xdeeedfb1u, 0xcdbe2c45u, 0x3fd5af46u, 0x7198540du, 0x83f3d70eu,
    0x90a324fau, 0x62c8a7f9u, 0xb602c312u, 0x44694011u, 0x5739b3e5u, 0xa55230e6u,
    0xfb410cc2u, 0x092a8fc1u, 0x1a7a7c35u, 0xe811ff36u, 0x3cdb9bddu, 0xceb018deu,
    0xdde0eb2au, 0x2f8b6829u, 0x82f63b78u, 0x709db87bu, 0x63cd4b8fu, 0x91a6c88cu,
    0x456cac67u, 0xb7072f64u, 0xa457dc90u, 0x563c5f93u, 0x082f63b7u, 0xfa44e0b4u,
    0xe9141340u, 0x1b7f9043u, 0xcfb5f4a8u, 0x3dde77abu, 0x2e8e845fu, 0xdce5075cu,
    0x92a8fc17u, 0x60c37f14u, 0x73938ce0u, 0x81f80fe3u, 0x55326b08u, 0xa759e80bu,
    0xb4091bffu, 0x466298fcu, 0x1871a4d8u, 0xea1a27dbu, 0xf94ad42fu, 0x0b21572cu,
    0xdfeb33c7u, 0x2d80b0c4u, 0x3ed04330u, 0xccbbc033u, 0xa24bb5a6u, 0x502036a5u,
    0x4370c551u, 0xb11b4652u, 0x65d122b9u, 0x97baa1bau, 0x84ea524eu, 0x7681d14du,
    0x2892ed69u, 0xdaf96e6au, 0xc9a99d9eu, 0x3bc21e9du, 0xef087a76u, 0x1d63f975u,
    0x0e330a81u, 0xfc588982u, 0xb21572c9u, 0x407ef1cau, 0x532e023eu, 0xa145813du,
    0x758fe5d6u, 0x87e466d5u, 0x94b49521u, 0x66df1622u, 0x38cc2a06u, 0xcaa7a905u,
    0xd9f75af1u, 0x2b9cd9f2u, 0xff56bd19u, 0x0d3d3e1au, 0x1e6dcdeeu, 0xec064eedu,
    0xc38d26c4u, 0x31e6a5c7u, 0x22b65633u, 0xd0ddd530u, 0x0417b1dbu, 0xf67c32d8u,
    0xe52cc12cu, 0x1747422fu, 0x49547e0bu, 0xbb3ffd08u, 0xa86f0efcu, 0x5a048dffu,
    0x8ecee914u, 0x7ca56a17u, 0x6ff599e3u, 0x9d9e1ae0u, 0xd3d3e1abu, 0x21b862a8u,
    0x32e8915cu, 0xc083125fu, 0x144976b4u, 0xe622f5b7u, 0xf5720643u, 0x07198540u,
    0x590ab964u, 0xab613a67u, 0xb831c993u, 0x4a5a4a90u, 0x9e902e7bu, 0x6cfbad78u,
    0x7fab5e8cu, 0x8dc0dd8fu, 0xe330a81au, 0x115b2b19u, 0x020bd8edu, 0xf0605beeu,
    0x24aa3f05u, 0xd6c1bc06u, 0xc5914ff2u, 0x37faccf1u, 0x69e9f0d5u, 0x9b8273d6u,
    0x88d28022u, 0x7ab90321u, 0xae7367cau, 0x5c18e4c9u, 0x4f48173du, 0xbd23943eu,
    0xf36e6f75u, 0x0105ec76u, 0x12551f82u, 0xe03e9c81u, 0x34f4f86au, 0xc69f7b69u,
    0xd5cf889du, 0x27a40b9eu, 0x79b737bau, 0x8bdcb4b9u, 0x988c474du, 0x6ae7c44eu,
    0xbe2da0a5u, 0x4c4623a6u, 0x5f16d052u, 0xad7d5351u,
};

#if defined(__x86_64__)
/* SSE4.2's crc32 instruction computes this very CRC, 8 bytes at a time. */
__attribute__((target("sse4.2"))) static uint32_t crc_update_hw(uint32_t c, const uint8_t *p,
                                                                 size_t n)
{
    uint64_t c64 = c;
    for (; n >= 8; n -= 8, p += 8) {
        uint64_t v;
        memcpy(&v, p, 8); /* little-endian: byte order as the table walks it */
        c64 = __builtin_ia32_crc32di(c64, v);
    }
    c = (uint32_t)c64;
    while (n--)
        c = __builtin_ia32_crc32qi(c, *p++);
    return c;
}
#endif

/* c is the running (inverted) state: start with 0xFFFFFFFF, finish with ~c. */
static uint32_t crc_update(uint32_t c, const void *data, size_t n)
{
    const uint8_t *p = data;
#if defined(__x86_64__)
    if (__builtin_cpu_supports("sse4.2"))
        return crc_update_hw(c, p, n);
#endif
    while (n--)
        c = crc_table[(c ^ *p++) & 0xffu] ^ (c >> 8);
    return c;
}

static uint32_t crc32c(const void *data, size_t n)
{
    return ~crc_update(0xffffffffu, data, n);
}

/* ---- Little-endian fields ---------------------------------------------------------------- */

static void put32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void put64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t get32(const uint8_t *p)
{
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static uint64_t get64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static uint64_t align8(uint64_t n)
{
    return (n + 7u) & ~(uint64_t)7u;
}

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ---- Records ----------------------------------------------------------------------------- */

static uint64_t rec_size(uint64_t body_len)
{
    return REC_HDR + align8(body_len);
}

/* Writes the header of a record whose body the caller puts at p + REC_HDR. */
static void rec_begin(uint8_t *p, uint8_t kind, uint8_t etype, uint32_t body_len)
{
    put32(p + 4, body_len);
    p[8] = kind;
    p[9] = etype;
    memset(p + 10, 0, 6);
}

/* Pads and checksums the record at p; returns its size. */
static size_t rec_finish(uint8_t *p)
{
    uint32_t body_len = get32(p + 4);
    uint64_t padded = align8(body_len);
    memset(p + REC_HDR + body_len, 0, (size_t)(padded - body_len));
    put32(p, crc32c(p + 4, REC_HDR - 4 + (size_t)body_len));
    return (size_t)(REC_HDR + padded);
}

static size_t rec_hard_state(uint8_t *p, const struct raft_hard_state *hs)
{
    rec_begin(p, REC_HARD_STATE, 0, 24);
    put64(p + REC_HDR, hs->term);
    put64(p + REC_HDR + 8, hs->vote);
    put64(p + REC_HDR + 16, hs->commit);
    return rec_finish(p);
}

static size_t rec_next(uint8_t *p, uint64_t index)
{
    rec_begin(p, REC_NEXT, 0, 8);
    put64(p + REC_HDR, index);
    return rec_finish(p);
}

#define SNAP_REC_SIZE (REC_HDR + 24u)

/* replaced: whether saving this snapshot discarded the whole log (decided when it was saved,
 * with the full log at hand; a replay may no longer have the entry at index to compare). */
static size_t rec_snapshot(uint8_t *p, uint64_t index, uint64_t term, bool replaced)
{
    rec_begin(p, REC_SNAPSHOT, 0, 24);
    put64(p + REC_HDR, index);
    put64(p + REC_HDR + 8, term);
    put64(p + REC_HDR + 16, replaced ? 1 : 0);
    return rec_finish(p);
}

struct rec {
    uint8_t kind;
    uint8_t etype;
    uint32_t body_len;
    const uint8_t *body;
    size_t size; /* header + padded body */
};

/* Whether a valid record starts at off; never reads outside [0, size). */
static bool rec_parse(const uint8_t *buf, size_t size, size_t off, struct rec *r)
{
    if (off > size || size - off < REC_HDR)
        return false;
    const uint8_t *p = buf + off;
    uint32_t body_len = get32(p + 4);
    uint8_t kind = p[8], etype = p[9];
    for (int i = 10; i < 16; i++)
        if (p[i] != 0)
            return false;
    switch (kind) {
    case REC_ENTRY:
        if (body_len < 16 || body_len > REC_MAX_BODY || etype == 0)
            return false;
        break;
    case REC_HARD_STATE:
        if (body_len != 24 || etype != 0)
            return false;
        break;
    case REC_NEXT:
        if (body_len != 8 || etype != 0)
            return false;
        break;
    case REC_SNAPSHOT:
        if (body_len != 24 || etype != 0)
            return false;
        break;
    default:
        return false;
    }
    uint64_t padded = align8(body_len);
    if (size - off - REC_HDR < padded)
        return false;
    for (uint64_t i = body_len; i < padded; i++)
        if (p[REC_HDR + i] != 0)
            return false;
    if (get32(p) != crc32c(p + 4, REC_HDR - 4 + (size_t)body_len))
        return false;
    if (kind == REC_SNAPSHOT && get64(p + REC_HDR + 16) > 1) /* in bounds: checked above */
        return false;
    r->kind = kind;
    r->etype = etype;
    r->body_len = body_len;
    r->body = p + REC_HDR;
    r->size = (size_t)(REC_HDR + padded);
    return true;
}

/* The first offset after off (8-aligned, records always are) where a valid record starts, or 0. */
static size_t next_valid_record(const uint8_t *buf, size_t size, size_t off)
{
    struct rec r;
    for (size_t o = (size_t)align8(off + 1); o < size && size - o >= REC_HDR; o += 8)
        if (rec_parse(buf, size, o, &r))
            return o;
    return 0;
}

/* ---- Segment and snapshot headers and names ---------------------------------------------- */

static void seg_header(uint8_t *p, uint64_t seq, uint64_t first)
{
    memcpy(p, SEG_MAGIC, 8);
    put32(p + 8, GW_WAL_FORMAT_VERSION);
    put64(p + 16, seq);
    put64(p + 24, first);
    uint32_t c = crc_update(0xffffffffu, p, 12);
    put32(p + 12, ~crc_update(c, p + 16, SEG_HDR - 16));
}

/* 0: valid; 1: not a valid header; GW_WAL_ERR_VERSION: valid header of another version. */
static int seg_header_parse(const uint8_t *p, size_t size, uint64_t *seq, uint64_t *first)
{
    if (size < SEG_HDR || memcmp(p, SEG_MAGIC, 8) != 0)
        return 1;
    uint32_t c = crc_update(0xffffffffu, p, 12);
    if (get32(p + 12) != ~crc_update(c, p + 16, SEG_HDR - 16))
        return 1;
    if (get32(p + 8) != GW_WAL_FORMAT_VERSION)
        return GW_WAL_ERR_VERSION;
    *seq = get64(p + 16);
    *first = get64(p + 24);
    return 0;
}

#define NAME_LEN 48

static void seg_name(char *out, uint64_t seq, uint64_t first)
{
    snprintf(out, NAME_LEN, "%016" PRIx64 "-%016" PRIx64 ".wal", seq, first);
}

static void snap_name(char *out, uint64_t index, uint64_t term, bool tmp)
{
    snprintf(out, NAME_LEN, "%016" PRIx64 "-%016" PRIx64 ".snap%s", index, term, tmp ? ".tmp" : "");
}

static bool parse_hex16(const char *s, uint64_t *v)
{
    uint64_t x = 0;
    for (int i = 0; i < 16; i++) {
        char ch = s[i];
        unsigned d;
        if (ch >= '0' && ch <= '9')
            d = (unsigned)(ch - '0');
        else if (ch >= 'a' && ch <= 'f')
            d = (unsigned)(ch - 'a' + 10);
        else
            return false;
        x = (x << 4) | d;
    }
    *v = x;
    return true;
}

/* "<16 hex>-<16 hex><suffix>" */
static bool parse_name(const char *name, const char *suffix, uint64_t *a, uint64_t *b)
{
    size_t sl = strlen(suffix);
    if (strlen(name) != 33 + sl || name[16] != '-' || strcmp(name + 33, suffix) != 0)
        return false;
    return parse_hex16(name, a) && parse_hex16(name + 17, b);
}

/* ---- I/O helpers ------------------------------------------------------------------------- */

/* 0 or -errno; a short write is retried, so the error is what stopped it. */
static int pwrite_all(int fd, const void *buf, size_t len, uint64_t off)
{
    const uint8_t *p = buf;
    while (len > 0) {
        ssize_t n = pwrite(fd, p, len, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -EIO;
        p += n;
        len -= (size_t)n;
        off += (uint64_t)n;
    }
    return 0;
}

static int pread_all(int fd, void *buf, size_t len, uint64_t off)
{
    uint8_t *p = buf;
    while (len > 0) {
        ssize_t n = pread(fd, p, len, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -EIO; /* shorter than fstat said */
        p += n;
        len -= (size_t)n;
        off += (uint64_t)n;
    }
    return 0;
}

/* ---- The log ----------------------------------------------------------------------------- */

struct seg {
    uint64_t seq;
    uint64_t first; /* index the segment's first entry would have (header) */
    uint64_t bytes; /* file size; for the current segment, see w->off */
};

/* Terms of the live entries, run-length encoded: runs[k] covers [start, runs[k+1].start).
 * Its length is at most the number of distinct terms in the log. */
struct run {
    uint64_t start;
    uint64_t term;
};

struct gw_wal {
    char *dir;
    int dirfd;
    int lockfd;
    int fd; /* current (last) segment, open for writing */
    struct gw_wal_options opt;
    struct seg *segs; /* oldest first; the last one is current */
    size_t n_segs, cap_segs;
    uint64_t off; /* end of the data written to the current segment */
    bool dirty;   /* written since the last sync */
    bool broken;  /* an fsync failed */
    uint64_t first, last;
    struct run *runs;
    size_t n_runs, cap_runs;
    struct raft_hard_state hs;
    uint64_t snap_index, snap_term;
    uint8_t *buf; /* batch encoding buffer, at most max_batch_bytes */
    size_t buf_cap;
    uint64_t syncs, last_fsync_ns;
    char err[512];
};

static void seterr(struct gw_wal *w, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void seterr(struct gw_wal *w, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(w->err, sizeof(w->err), fmt, ap);
    va_end(ap);
}

/* Records an errno failure of an operation on a file and returns the mapped code. */
static int fail_errno(struct gw_wal *w, int neg_errno, const char *what, const char *file)
{
    int e = -neg_errno;
    seterr(w, "raft/storage: %s %s/%s: %s", what, w->dir, file, strerror(e));
    return map_errno(e);
}

static bool term_at(const struct gw_wal *w, uint64_t index, uint64_t *term)
{
    if (index < w->first || index > w->last || w->n_runs == 0)
        return false;
    size_t lo = 0, hi = w->n_runs; /* find the last run with start <= index */
    while (hi - lo > 1) {
        size_t mid = lo + (hi - lo) / 2;
        if (w->runs[mid].start <= index)
            lo = mid;
        else
            hi = mid;
    }
    *term = w->runs[lo].term;
    return true;
}

static int runs_push(struct gw_wal *w, uint64_t index, uint64_t term)
{
    if (w->n_runs > 0 && w->runs[w->n_runs - 1].term == term)
        return 0;
    if (w->n_runs == w->cap_runs) {
        size_t cap = w->cap_runs ? w->cap_runs * 2 : 16;
        struct run *r = realloc(w->runs, cap * sizeof(*r));
        if (!r)
            return GW_WAL_ERR_NOMEM;
        w->runs = r;
        w->cap_runs = cap;
    }
    w->runs[w->n_runs].start = index;
    w->runs[w->n_runs].term = term;
    w->n_runs++;
    return 0;
}

/* Drops the entries from index on (in memory). */
static void runs_truncate(struct gw_wal *w, uint64_t index)
{
    while (w->n_runs > 0 && w->runs[w->n_runs - 1].start >= index)
        w->n_runs--;
    if (index <= w->last)
        w->last = index - 1;
}

/* Drops the entries before first (in memory). */
static void runs_trim_front(struct gw_wal *w, uint64_t first)
{
    size_t k = 0;
    while (k + 1 < w->n_runs && w->runs[k + 1].start <= first)
        k++;
    if (k > 0) {
        memmove(w->runs, w->runs + k, (w->n_runs - k) * sizeof(*w->runs));
        w->n_runs -= k;
    }
    if (w->n_runs > 0 && w->runs[0].start < first)
        w->runs[0].start = first;
    w->first = first;
}

static void runs_reset(struct gw_wal *w, uint64_t next)
{
    w->n_runs = 0;
    w->first = next;
    w->last = next - 1;
}

static int buf_reserve(struct gw_wal *w, size_t n)
{
    if (n <= w->buf_cap)
        return 0;
    size_t cap = w->buf_cap ? w->buf_cap : 4096;
    while (cap < n)
        cap *= 2;
    if (cap > w->opt.max_batch_bytes && n <= w->opt.max_batch_bytes)
        cap = w->opt.max_batch_bytes;
    uint8_t *b = realloc(w->buf, cap);
    if (!b)
        return GW_WAL_ERR_NOMEM;
    w->buf = b;
    w->buf_cap = cap;
    return 0;
}

static bool hs_is_zero(const struct raft_hard_state *hs)
{
    return hs->term == 0 && hs->vote == 0 && hs->commit == 0;
}

static int fsync_dir(struct gw_wal *w)
{
    if (w->opt.sync && fsync(w->dirfd) != 0)
        return fail_errno(w, -errno, "fsync directory", ".");
    return 0;
}

/* Removes everything from off on (what a failed or torn write left there must never be read
 * back, nor mistaken for records later), then preallocates the space again if the segment had
 * it: unwritten space reads as zeros, which recovery takes as the end of the data. */
static int cut_tail(struct gw_wal *w, int fd, uint64_t off)
{
    struct stat st;
    if (fstat(fd, &st) != 0 || ftruncate(fd, (off_t)off) != 0)
        return -errno;
    if (w->opt.preallocate && (uint64_t)st.st_size > off)
        (void)fallocate(fd, 0, (off_t)off, (off_t)((uint64_t)st.st_size - off)); /* best effort */
    return 0;
}

/* Writes data at the end of the current segment; on failure cuts it back off so the segment is
 * exactly as before (a failed cut makes the log broken: its tail is then unknown). */
static int seg_write(struct gw_wal *w, const uint8_t *data, size_t len)
{
    struct seg *s = &w->segs[w->n_segs - 1];
    char name[NAME_LEN];
    int rc = pwrite_all(w->fd, data, len, w->off);
    if (rc == 0) {
        w->off += len;
        s->bytes = w->off;
        w->dirty = true;
        return 0;
    }
    seg_name(name, s->seq, s->first);
    int err = fail_errno(w, rc, "write", name);
    if (cut_tail(w, w->fd, w->off) != 0) {
        w->broken = true;
        seterr(w, "raft/storage: write %s/%s failed (%s) and cutting it back to offset %" PRIu64
                  " failed too (%s): reopen the log",
               w->dir, name, strerror(-rc), w->off, strerror(errno));
    }
    return err;
}

static int segs_push(struct gw_wal *w, uint64_t seq, uint64_t first, uint64_t bytes)
{
    if (w->n_segs == w->cap_segs) {
        size_t cap = w->cap_segs ? w->cap_segs * 2 : 8;
        struct seg *s = realloc(w->segs, cap * sizeof(*s));
        if (!s)
            return GW_WAL_ERR_NOMEM;
        w->segs = s;
        w->cap_segs = cap;
    }
    w->segs[w->n_segs].seq = seq;
    w->segs[w->n_segs].first = first;
    w->segs[w->n_segs].bytes = bytes;
    w->n_segs++;
    return 0;
}

/* Starts segment seq for the entries from w->last + 1: header and current hard state, made
 * durable (file and directory entry) before anything else goes in, so a segment whose header
 * is damaged can only be one a crash interrupted while it was being created. The previous
 * segment is synced first, as nothing will be written to it again. */
static int seg_create(struct gw_wal *w, uint64_t seq)
{
    uint8_t hdr[SEG_HDR + HS_REC_SIZE];
    char name[NAME_LEN];
    uint64_t first = w->last + 1;
    size_t len = SEG_HDR;
    int rc;

    if (w->fd >= 0 && w->dirty && w->opt.sync) {
        struct seg *prev = &w->segs[w->n_segs - 1];
        if (fdatasync(w->fd) != 0) {
            seg_name(name, prev->seq, prev->first);
            w->broken = true;
            return fail_errno(w, -errno, "fdatasync", name);
        }
        w->dirty = false;
    }
    rc = segs_push(w, seq, first, 0); /* reserve the slot before touching the disk */
    if (rc != 0)
        return rc;
    w->n_segs--;

    seg_name(name, seq, first);
    seg_header(hdr, seq, first);
    if (!hs_is_zero(&w->hs))
        len += rec_hard_state(hdr + SEG_HDR, &w->hs);
    int fd = openat(w->dirfd, name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0)
        return fail_errno(w, -errno, "create", name);
    rc = pwrite_all(fd, hdr, len, 0);
    if (rc == 0 && w->opt.preallocate && w->opt.segment_bytes > len &&
        fallocate(fd, 0, 0, (off_t)w->opt.segment_bytes) != 0 && errno != EOPNOTSUPP)
        rc = -errno;
    if (rc == 0 && w->opt.sync && fdatasync(fd) != 0)
        rc = -errno;
    if (rc != 0) {
        int err = fail_errno(w, rc, "write header of", name);
        close(fd);
        unlinkat(w->dirfd, name, 0);
        return err;
    }
    rc = fsync_dir(w);
    if (rc != 0) {
        close(fd);
        unlinkat(w->dirfd, name, 0);
        return rc;
    }
    if (w->fd >= 0)
        close(w->fd);
    w->fd = fd;
    w->off = len;
    w->dirty = false;
    segs_push(w, seq, first, len); /* cannot fail: reserved above */
    return 0;
}

void gw_wal_options_default(struct gw_wal_options *o)
{
    memset(o, 0, sizeof(*o));
    o->segment_bytes = 64ull << 20;
    o->max_entry_bytes = 16u << 20;
    o->max_batch_bytes = (size_t)64 << 20;
    o->max_snapshot_bytes = 1ull << 30;
    o->sync = true;
    o->preallocate = true;
}

static bool options_valid(const struct gw_wal_options *o)
{
    return o->segment_bytes >= GW_WAL_MIN_SEGMENT_BYTES &&
           o->segment_bytes <= GW_WAL_MAX_SEGMENT_BYTES &&
           o->max_entry_bytes <= GW_WAL_MAX_ENTRY_BYTES &&
           o->max_batch_bytes >= (uint64_t)o->max_entry_bytes + 64 &&
           o->max_snapshot_bytes <= GW_WAL_MAX_SNAPSHOT_BYTES;
}

/* ---- Recovery ---------------------------------------------------------------------------- */

/* The log as replayed so far: live entries [first, next), pointing into the segment buffers. */
struct replay {
    struct raft_entry *ents;
    size_t n, cap;
    uint64_t first, next;
    struct raft_hard_state hs;
    uint8_t **bufs; /* every buffer read, handed to gw_wal_recovered */
    size_t n_bufs, cap_bufs;
};

static int replay_keep_buf(struct replay *rp, uint8_t *b)
{
    if (rp->n_bufs == rp->cap_bufs) {
        size_t cap = rp->cap_bufs ? rp->cap_bufs * 2 : 8;
        uint8_t **nb = realloc(rp->bufs, cap * sizeof(*nb));
        if (!nb) {
            free(b);
            return GW_WAL_ERR_NOMEM;
        }
        rp->bufs = nb;
        rp->cap_bufs = cap;
    }
    rp->bufs[rp->n_bufs++] = b;
    return 0;
}

static void replay_free(struct replay *rp)
{
    for (size_t i = 0; i < rp->n_bufs; i++)
        free(rp->bufs[i]);
    free(rp->bufs);
    free(rp->ents);
    memset(rp, 0, sizeof(*rp));
}

static void replay_reset(struct replay *rp, uint64_t next)
{
    rp->n = 0;
    rp->first = rp->next = next;
}

/* A snapshot (index s, term t) decides the fate of the log the way the core's contract says:
 * a log holding s with term t stays (entries up to s are trailing entries, consistent with the
 * snapshot by Log Matching); a log that disagrees at s, or ends before s, is replaced by an
 * empty one continuing at s + 1. Used for a snapshot file whose log record is missing (a crash
 * between the rename and the record): the log then still reaches back to s (compaction comes
 * after the record), and a log starting after s is left alone. Returns whether the log was
 * replaced. */
static bool replay_snapshot(struct replay *rp, uint64_t s, uint64_t t)
{
    if (s < rp->first)
        return false;
    if (s < rp->next && rp->ents[s - rp->first].term == t)
        return false;
    replay_reset(rp, s + 1);
    return true;
}

static int replay_record(struct gw_wal *w, struct replay *rp, const struct rec *r, const char *file,
                         size_t off)
{
    const uint8_t *b = r->body;
    switch (r->kind) {
    case REC_ENTRY: {
        uint64_t term = get64(b), index = get64(b + 8);
        if (index != rp->next) {
            seterr(w, "raft/storage: %s/%s offset %zu: entry %" PRIu64 " where entry %" PRIu64
                      " was expected (a gap or a repeat in the log): refusing to start",
                   w->dir, file, off, index, rp->next);
            return GW_WAL_ERR_CORRUPT;
        }
        if (term == 0 || (rp->n > 0 && term < rp->ents[rp->n - 1].term)) {
            seterr(w, "raft/storage: %s/%s offset %zu: entry %" PRIu64 " has term %" PRIu64
                      ", lower than the entry before it: refusing to start",
                   w->dir, file, off, index, term);
            return GW_WAL_ERR_CORRUPT;
        }
        if (rp->n == rp->cap) {
            size_t cap = rp->cap ? rp->cap * 2 : 256;
            struct raft_entry *ne = realloc(rp->ents, cap * sizeof(*ne));
            if (!ne)
                return GW_WAL_ERR_NOMEM;
            rp->ents = ne;
            rp->cap = cap;
        }
        struct raft_entry *e = &rp->ents[rp->n++];
        e->term = term;
        e->index = index;
        e->type = r->etype;
        e->len = r->body_len - 16;
        e->data = b + 16;
        rp->next++;
        return 0;
    }
    case REC_HARD_STATE:
        rp->hs.term = get64(b);
        rp->hs.vote = get64(b + 8);
        rp->hs.commit = get64(b + 16);
        return 0;
    case REC_NEXT: {
        uint64_t t = get64(b);
        if (t == 0 || t > rp->next) {
            seterr(w, "raft/storage: %s/%s offset %zu: truncation to index %" PRIu64
                      " beyond the end of the log (%" PRIu64 "): refusing to start",
                   w->dir, file, off, t, rp->next - 1);
            return GW_WAL_ERR_CORRUPT;
        }
        if (t < rp->first) /* the segments before were compacted away: nothing below t is kept */
            replay_reset(rp, t);
        else {
            rp->n = (size_t)(t - rp->first);
            rp->next = t;
        }
        return 0;
    }
    case REC_SNAPSHOT:
        if (get64(b + 16) != 0)
            replay_reset(rp, get64(b) + 1);
        return 0;
    }
    return GW_WAL_ERR_CORRUPT; /* rec_parse accepts only the kinds above */
}

static void note(struct gw_wal *w, struct gw_wal_recovered *rec, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void note(struct gw_wal *w, struct gw_wal_recovered *rec, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(rec->note, sizeof(rec->note), fmt, ap);
    va_end(ap);
    if (w->opt.log)
        w->opt.log(w->opt.log_ctx, rec->note);
}

/* Reads a whole file; with to_hole, stops where nothing but holes follow (the unwritten part of
 * a preallocated segment reads as zeros, so this changes nothing but the memory it takes). */
static int read_file(struct gw_wal *w, int fd, const char *name, uint8_t **out, size_t *size,
                     bool to_hole)
{
    struct stat st;
    if (fstat(fd, &st) != 0)
        return fail_errno(w, -errno, "stat", name);
    if ((uint64_t)st.st_size > SIZE_MAX / 2) {
        seterr(w, "raft/storage: %s/%s: file too large", w->dir, name);
        return GW_WAL_ERR_TOO_BIG;
    }
    size_t n = (size_t)st.st_size;
    if (to_hole) {
        off_t hole = lseek(fd, 0, SEEK_HOLE); /* the file size where holes are not reported */
        if (hole >= 0 && hole < st.st_size && lseek(fd, hole, SEEK_DATA) < 0 && errno == ENXIO)
            n = (size_t)hole;
    }
    uint8_t *b = malloc(n ? n : 1);
    if (!b)
        return GW_WAL_ERR_NOMEM;
    int rc = pread_all(fd, b, n, 0);
    if (rc != 0) {
        free(b);
        return fail_errno(w, rc, "read", name);
    }
    *out = b;
    *size = n;
    return 0;
}

/* Replays segment s. On success *fd_out is its descriptor (open for writing) and *end the end of
 * its valid data, or *removed is set if it was the remains of an interrupted segment creation. */
static int load_segment(struct gw_wal *w, struct replay *rp, struct gw_wal_recovered *rec,
                        const struct seg *s, bool is_first, bool is_last, int *fd_out, uint64_t *end,
                        bool *removed)
{
    char name[NAME_LEN];
    uint8_t *buf;
    size_t size;
    uint64_t seq, first;
    struct rec r;
    int rc;

    *removed = false;
    seg_name(name, s->seq, s->first);
    int fd = openat(w->dirfd, name, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return fail_errno(w, -errno, "open", name);
    rc = read_file(w, fd, name, &buf, &size, true);
    if (rc != 0)
        goto close_fd;
    rc = replay_keep_buf(rp, buf);
    if (rc != 0)
        goto close_fd;

    rc = seg_header_parse(buf, size, &seq, &first);
    if (rc == GW_WAL_ERR_VERSION) {
        seterr(w, "raft/storage: %s/%s: format version %" PRIu32 ", this build reads version %d",
               w->dir, name, get32(buf + 8), GW_WAL_FORMAT_VERSION);
        goto close_fd;
    }
    if (rc != 0) {
        size_t v = size > SEG_HDR ? next_valid_record(buf, size, SEG_HDR - 1) : 0;
        if (!is_last || v != 0) {
            seterr(w, "raft/storage: %s/%s: damaged segment header%s: refusing to start", w->dir,
                   name, v ? " followed by valid records" : " in a segment that is not the last");
            rc = GW_WAL_ERR_CORRUPT;
            goto close_fd;
        }
        close(fd);
        if (unlinkat(w->dirfd, name, 0) != 0)
            return fail_errno(w, -errno, "remove", name);
        note(w, rec, "raft/storage: removed %s/%s, a segment whose creation was interrupted", w->dir,
             name);
        *removed = true;
        return 0;
    }
    if (seq != s->seq || first != s->first) {
        seterr(w, "raft/storage: %s/%s: header says segment %" PRIu64 " from index %" PRIu64
                  ", not what its name says: refusing to start",
               w->dir, name, seq, first);
        rc = GW_WAL_ERR_CORRUPT;
        goto close_fd;
    }
    if (is_first)
        replay_reset(rp, first);
    else if (first != rp->next) {
        seterr(w, "raft/storage: %s/%s starts at index %" PRIu64 " but the segment before it ends "
                  "at index %" PRIu64 ": refusing to start",
               w->dir, name, first, rp->next - 1);
        rc = GW_WAL_ERR_CORRUPT;
        goto close_fd;
    }

    size_t off = SEG_HDR;
    while (off < size) {
        if (!rec_parse(buf, size, off, &r)) {
            size_t nz = size; /* one past the last non-zero byte */
            while (nz > off && buf[nz - 1] == 0)
                nz--;
            if (nz == off)
                break; /* zeros: the end of the data (preallocated space) */
            size_t v = next_valid_record(buf, size, off);
            if (!is_last || v != 0) {
                if (v != 0)
                    seterr(w, "raft/storage: %s/%s offset %zu: damaged record followed by a valid "
                              "record at offset %zu: corruption in the middle of the log, refusing "
                              "to start",
                           w->dir, name, off, v);
                else
                    seterr(w, "raft/storage: %s/%s offset %zu: damaged record in a segment that is "
                              "not the last: refusing to start",
                           w->dir, name, off);
                rc = GW_WAL_ERR_CORRUPT;
                goto close_fd;
            }
            /* A torn tail: the remains of a write that was never synced, so never acknowledged. */
            if ((rc = cut_tail(w, fd, off)) != 0 || (w->opt.sync && fdatasync(fd) != 0)) {
                rc = fail_errno(w, rc ? rc : -errno, "cut the torn tail of", name);
                goto close_fd;
            }
            rec->torn_bytes += nz - off;
            note(w, rec, "raft/storage: %s/%s: cut %zu bytes of a torn or damaged tail at offset %zu",
                 w->dir, name, nz - off, off);
            break;
        }
        rc = replay_record(w, rp, &r, name, off);
        if (rc != 0)
            goto close_fd;
        off += r.size;
    }
    *fd_out = fd;
    *end = off < size ? off : size;
    return 0;
close_fd:
    close(fd);
    return rc;
}

/* Reads snapshot file name; 1 if it is damaged (w->err says how), 0 if loaded. */
static int load_snapshot(struct gw_wal *w, struct replay *rp, const char *name, uint64_t index,
                         uint64_t term, struct raft_snapshot *out)
{
    uint8_t *buf;
    size_t size;
    int fd = openat(w->dirfd, name, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return fail_errno(w, -errno, "open", name);
    int rc = read_file(w, fd, name, &buf, &size, false);
    close(fd);
    if (rc != 0)
        return rc;
    rc = replay_keep_buf(rp, buf);
    if (rc != 0)
        return rc;
    if (size < SNAP_HDR || memcmp(buf, SNAP_MAGIC, 8) != 0) {
        seterr(w, "raft/storage: %s/%s: not a snapshot file", w->dir, name);
        return 1;
    }
    if (get32(buf + 8) != GW_WAL_FORMAT_VERSION) {
        seterr(w, "raft/storage: %s/%s: format version %" PRIu32 ", this build reads version %d",
               w->dir, name, get32(buf + 8), GW_WAL_FORMAT_VERSION);
        return GW_WAL_ERR_VERSION;
    }
    uint64_t conf_len = get32(buf + 32), data_len = get64(buf + 40);
    if (conf_len > CONF_MAX || data_len > size || size - SNAP_HDR != conf_len + data_len ||
        get32(buf + 36) != 0) {
        seterr(w, "raft/storage: %s/%s: sizes in the header do not match the file", w->dir, name);
        return 1;
    }
    if (get32(buf + 12) != crc32c(buf + 16, size - 16)) {
        seterr(w, "raft/storage: %s/%s: checksum mismatch", w->dir, name);
        return 1;
    }
    if (get64(buf + 16) != index || get64(buf + 24) != term || index == 0) {
        seterr(w, "raft/storage: %s/%s: header does not match the name", w->dir, name);
        return 1;
    }
    memset(out, 0, sizeof(*out));
    if (raft_membership_decode(buf + SNAP_HDR, (size_t)conf_len, &out->conf) != 0) {
        seterr(w, "raft/storage: %s/%s: undecodable membership", w->dir, name);
        return 1;
    }
    out->index = index;
    out->term = term;
    out->data = buf + SNAP_HDR + conf_len;
    out->len = (size_t)data_len;
    return 0;
}

struct snap_name {
    uint64_t index, term;
};

static int cmp_seg(const void *a, const void *b)
{
    const struct seg *x = a, *y = b;
    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

static int cmp_snap_desc(const void *a, const void *b)
{
    const struct snap_name *x = a, *y = b;
    return x->index > y->index ? -1 : x->index < y->index;
}

/* Lists segments into w->segs (sorted), snapshots into *snaps (newest first), and removes
 * temporary files (a snapshot whose writer crashed before the rename). */
static int list_dir(struct gw_wal *w, struct gw_wal_recovered *rec, struct snap_name **snaps,
                    size_t *n_snaps)
{
    int dfd = dup(w->dirfd);
    if (dfd < 0)
        return fail_errno(w, -errno, "dup", ".");
    DIR *d = fdopendir(dfd);
    if (!d) {
        close(dfd);
        return fail_errno(w, -errno, "list", ".");
    }
    rewinddir(d);
    size_t cap = 0;
    int rc = 0;
    bool removed = false;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        uint64_t a, b;
        if (parse_name(de->d_name, ".wal", &a, &b)) {
            rc = segs_push(w, a, b, 0);
        } else if (parse_name(de->d_name, ".snap", &a, &b)) {
            if (*n_snaps == cap) {
                cap = cap ? cap * 2 : 8;
                struct snap_name *ns = realloc(*snaps, cap * sizeof(*ns));
                if (!ns) {
                    rc = GW_WAL_ERR_NOMEM;
                    break;
                }
                *snaps = ns;
            }
            (*snaps)[*n_snaps].index = a;
            (*snaps)[*n_snaps].term = b;
            (*n_snaps)++;
        } else if (parse_name(de->d_name, ".snap.tmp", &a, &b)) {
            if (unlinkat(w->dirfd, de->d_name, 0) != 0) {
                rc = fail_errno(w, -errno, "remove", de->d_name);
                break;
            }
            note(w, rec, "raft/storage: removed %s/%s, left by a snapshot write that did not finish",
                 w->dir, de->d_name);
            removed = true;
        }
        if (rc != 0)
            break;
    }
    closedir(d);
    if (rc != 0)
        return rc;
    if (removed && (rc = fsync_dir(w)) != 0)
        return rc;
    if (w->n_segs > 0)
        qsort(w->segs, w->n_segs, sizeof(*w->segs), cmp_seg);
    if (*n_snaps > 0)
        qsort(*snaps, *n_snaps, sizeof(**snaps), cmp_snap_desc);
    for (size_t i = 1; i < w->n_segs; i++) {
        if (w->segs[i].seq != w->segs[i - 1].seq + 1) {
            char a[NAME_LEN], b[NAME_LEN];
            seg_name(a, w->segs[i - 1].seq, w->segs[i - 1].first);
            seg_name(b, w->segs[i].seq, w->segs[i].first);
            seterr(w, "raft/storage: %s: segment(s) missing between %s and %s: refusing to start",
                   w->dir, a, b);
            return GW_WAL_ERR_CORRUPT;
        }
    }
    return 0;
}

static int open_dir(struct gw_wal *w, const char *dir)
{
    if (mkdir(dir, 0700) == 0) {
        /* make the new directory's own entry durable */
        size_t n = strlen(dir);
        char *parent = malloc(n + 4);
        if (!parent)
            return GW_WAL_ERR_NOMEM;
        memcpy(parent, dir, n);
        memcpy(parent + n, "/..", 4);
        int pfd = open(parent, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        free(parent);
        if (pfd >= 0) {
            if (w->opt.sync)
                fsync(pfd);
            close(pfd);
        }
    } else if (errno != EEXIST) {
        int e = errno;
        seterr(w, "raft/storage: create directory %s: %s", dir, strerror(e));
        return map_errno(e);
    }
    w->dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (w->dirfd < 0) {
        int e = errno;
        seterr(w, "raft/storage: open directory %s: %s", dir, strerror(e));
        return map_errno(e);
    }
    w->lockfd = openat(w->dirfd, "LOCK", O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (w->lockfd < 0)
        return fail_errno(w, -errno, "open", "LOCK");
    if (flock(w->lockfd, LOCK_EX | LOCK_NB) != 0) {
        if (errno == EWOULDBLOCK) {
            seterr(w, "raft/storage: %s is in use by another process (LOCK is held)", dir);
            return GW_WAL_ERR_LOCKED;
        }
        return fail_errno(w, -errno, "lock", "LOCK");
    }
    return 0;
}

int gw_wal_open(const char *dir, const struct gw_wal_options *opt, struct gw_wal **out,
                struct gw_wal_recovered *rec, char *errbuf, size_t errlen)
{
    struct replay rp = {0};
    struct snap_name *snaps = NULL;
    size_t n_snaps = 0;
    struct gw_wal *w;
    int rc;
    bool has_snap = false, need_marker = false, skipped_snap = false;
    struct raft_snapshot snap;

    if (errlen > 0)
        errbuf[0] = '\0';
    if (!out || !rec) {
        if (errlen > 0)
            snprintf(errbuf, errlen, "raft/storage: gw_wal_open needs out and rec");
        return GW_WAL_ERR_INVALID;
    }
    memset(rec, 0, sizeof(*rec));
    *out = NULL;
    w = calloc(1, sizeof(*w));
    if (!w)
        return GW_WAL_ERR_NOMEM;
    w->fd = w->dirfd = w->lockfd = -1;
    if (opt)
        w->opt = *opt;
    else
        gw_wal_options_default(&w->opt);
    w->dir = dir ? strdup(dir) : NULL;
    if (!dir || !dir[0] || !options_valid(&w->opt)) {
        seterr(w, "raft/storage: invalid directory or options");
        rc = GW_WAL_ERR_INVALID;
        goto fail;
    }
    if (!w->dir) {
        rc = GW_WAL_ERR_NOMEM;
        goto fail;
    }
    rc = open_dir(w, dir);
    if (rc != 0)
        goto fail;
    rc = list_dir(w, rec, &snaps, &n_snaps);
    if (rc != 0)
        goto fail;

    for (size_t i = 0; i < n_snaps && !has_snap; i++) {
        char name[NAME_LEN];
        snap_name(name, snaps[i].index, snaps[i].term, false);
        rc = load_snapshot(w, &rp, name, snaps[i].index, snaps[i].term, &snap);
        if (rc < 0)
            goto fail;
        if (rc == 1) {
            note(w, rec, "%s; trying an older snapshot", w->err);
            skipped_snap = true;
        }
        has_snap = rc == 0;
    }
    rc = 0;

    replay_reset(&rp, 1);
    int cur_fd = -1;
    uint64_t cur_end = 0;
    for (size_t i = 0; i < w->n_segs;) {
        int fd = -1;
        uint64_t end = 0;
        bool removed;
        rc = load_segment(w, &rp, rec, &w->segs[i], i == 0, i + 1 == w->n_segs, &fd, &end, &removed);
        if (rc != 0) {
            if (cur_fd >= 0)
                close(cur_fd);
            goto fail;
        }
        if (removed) {
            w->n_segs--; /* only the last one is ever removed */
            continue;
        }
        if (cur_fd >= 0)
            close(cur_fd);
        cur_fd = fd;
        cur_end = end;
        w->segs[i].bytes = end;
        i++;
    }

    if (w->n_segs == 0 && has_snap) {
        seterr(w, "raft/storage: %s: a snapshot but no log segment (the hard state is lost): "
                  "refusing to start",
               w->dir);
        rc = GW_WAL_ERR_CORRUPT;
        goto fail;
    }
    if (has_snap) {
        if (snap.index + 1 < rp.first) {
            seterr(w, "raft/storage: %s: the log starts at index %" PRIu64 " but the snapshot ends "
                      "at index %" PRIu64 ": entries missing%s, refusing to start",
                   w->dir, rp.first, snap.index,
                   skipped_snap ? " (a newer snapshot file is damaged)" : "");
            rc = GW_WAL_ERR_CORRUPT;
            if (cur_fd >= 0)
                close(cur_fd);
            goto fail;
        }
        /* No marker for this snapshot made it into the log if the crash came right after the
         * rename; apply it now and write the marker below so later appends replay correctly. */
        need_marker = replay_snapshot(&rp, snap.index, snap.term);
    } else if (rp.first != 1) {
        seterr(w, "raft/storage: %s: the log starts at index %" PRIu64 " and there is no valid "
                  "snapshot%s: refusing to start",
               w->dir, rp.first, skipped_snap ? " (every snapshot file is damaged)" : "");
        rc = GW_WAL_ERR_CORRUPT;
        if (cur_fd >= 0)
            close(cur_fd);
        goto fail;
    }

    /* The in-memory state of the log. */
    w->hs = rp.hs;
    if (has_snap) {
        w->snap_index = snap.index;
        w->snap_term = snap.term;
    }
    w->first = rp.first;
    w->last = rp.next - 1;
    for (size_t i = 0; i < rp.n; i++) {
        rc = runs_push(w, rp.ents[i].index, rp.ents[i].term);
        if (rc != 0) {
            if (cur_fd >= 0)
                close(cur_fd);
            goto fail;
        }
    }
    if (w->n_segs == 0) {
        rc = seg_create(w, 1);
        if (rc != 0)
            goto fail;
    } else {
        w->fd = cur_fd;
        w->off = cur_end;
    }
    if (need_marker) {
        uint8_t m[SNAP_REC_SIZE];
        rc = seg_write(w, m, rec_snapshot(m, snap.index, snap.term, true));
        if (rc == 0)
            rc = gw_wal_sync(w, NULL);
        if (rc != 0)
            goto fail;
    }

    rec->hard_state = rp.hs;
    rec->has_snapshot = has_snap;
    if (has_snap)
        rec->snapshot = snap;
    rec->entries = rp.ents;
    rec->n_entries = rp.n;
    rec->bufs_ = rp.bufs;
    rec->n_bufs_ = rp.n_bufs;
    free(snaps);
    w->err[0] = '\0';
    *out = w;
    return 0;

fail:
    if (errlen > 0)
        snprintf(errbuf, errlen, "%s", w->err[0] ? w->err : gw_wal_strerror(rc));
    replay_free(&rp);
    free(snaps);
    gw_wal_close(w);
    memset(rec, 0, sizeof(*rec));
    return rc;
}

void gw_wal_close(struct gw_wal *w)
{
    if (!w)
        return;
    if (w->fd >= 0)
        close(w->fd);
    if (w->lockfd >= 0)
        close(w->lockfd);
    if (w->dirfd >= 0)
        close(w->dirfd);
    free(w->segs);
    free(w->runs);
    free(w->buf);
    free(w->dir);
    free(w);
}

void gw_wal_recovered_free(struct gw_wal_recovered *rec)
{
    if (!rec)
        return;
    for (size_t i = 0; i < rec->n_bufs_; i++)
        free(rec->bufs_[i]);
    free(rec->bufs_);
    free(rec->entries);
    memset(rec, 0, sizeof(*rec));
}

void gw_wal_recovered_restore(const struct gw_wal_recovered *rec, struct raft_restore *out)
{
    memset(out, 0, sizeof(*out));
    out->hard_state = rec->hard_state;
    out->snapshot = rec->has_snapshot ? &rec->snapshot : NULL;
    out->entries = rec->entries;
    out->n_entries = rec->n_entries;
}

/* ---- Writing ----------------------------------------------------------------------------- */

static int check_usable(struct gw_wal *w)
{
    if (w->broken) {
        if (!w->err[0])
            seterr(w, "raft/storage: %s: an earlier fsync failed; reopen the log", w->dir);
        return GW_WAL_ERR_BROKEN;
    }
    w->err[0] = '\0';
    return 0;
}

static int runs_reserve(struct gw_wal *w, size_t extra)
{
    if (w->cap_runs - w->n_runs >= extra)
        return 0;
    size_t cap = w->n_runs + extra;
    struct run *r = realloc(w->runs, cap * sizeof(*r));
    if (!r)
        return GW_WAL_ERR_NOMEM;
    w->runs = r;
    w->cap_runs = cap;
    return 0;
}

int gw_wal_append(struct gw_wal *w, const struct raft_entry *e, size_t n)
{
    if (!w || (n > 0 && !e))
        return GW_WAL_ERR_INVALID;
    int rc = check_usable(w);
    if (rc != 0 || n == 0)
        return rc;

    uint64_t i0 = e[0].index;
    if (i0 == 0 || i0 > w->last + 1 || i0 <= w->snap_index || i0 < w->first) {
        seterr(w, "raft/storage: append at index %" PRIu64 ", but the log holds [%" PRIu64
                  ", %" PRIu64 "] after snapshot %" PRIu64,
               i0, w->first, w->last, w->snap_index);
        return GW_WAL_ERR_INVALID;
    }
    uint64_t prev_term = 0;
    if (!term_at(w, i0 - 1, &prev_term) && i0 - 1 == w->snap_index)
        prev_term = w->snap_term;
    bool truncate = i0 <= w->last;
    uint64_t total = truncate ? rec_size(8) : 0;
    size_t term_changes = 1;
    for (size_t k = 0; k < n; k++) {
        const struct raft_entry *x = &e[k];
        if (x->index != i0 + k || x->term == 0 || x->term < prev_term || x->type == 0 ||
            (x->len > 0 && !x->data)) {
            seterr(w, "raft/storage: append: entry %zu of the batch (index %" PRIu64 ", term %" PRIu64
                      ") is not consecutive, has term 0 or a lower term, type 0, or no data",
                   k, x->index, x->term);
            return GW_WAL_ERR_INVALID;
        }
        if (x->len > w->opt.max_entry_bytes) {
            seterr(w, "raft/storage: append: entry %" PRIu64 " has %" PRIu32 " bytes, more than "
                      "max_entry_bytes (%" PRIu32 ")",
                   x->index, x->len, w->opt.max_entry_bytes);
            return GW_WAL_ERR_TOO_BIG;
        }
        if (x->term != prev_term)
            term_changes++;
        prev_term = x->term;
        total += rec_size(16u + (uint64_t)x->len);
        if (total > w->opt.max_batch_bytes) {
            seterr(w, "raft/storage: append: the batch needs more than max_batch_bytes (%zu)",
                   w->opt.max_batch_bytes);
            return GW_WAL_ERR_TOO_BIG;
        }
    }
    if ((rc = runs_reserve(w, term_changes)) != 0 || (rc = buf_reserve(w, (size_t)total)) != 0)
        return rc;

    if (w->off + total > w->opt.segment_bytes && w->off > SEG_HDR + HS_REC_SIZE) {
        rc = seg_create(w, w->segs[w->n_segs - 1].seq + 1);
        if (rc != 0)
            return rc;
    }

    uint8_t *p = w->buf;
    if (truncate)
        p += rec_next(p, i0);
    for (size_t k = 0; k < n; k++) {
        rec_begin(p, REC_ENTRY, e[k].type, 16u + e[k].len);
        put64(p + REC_HDR, e[k].term);
        put64(p + REC_HDR + 8, e[k].index);
        if (e[k].len > 0)
            memcpy(p + REC_HDR + 16, e[k].data, e[k].len);
        p += rec_finish(p);
    }
    rc = seg_write(w, w->buf, (size_t)total);
    if (rc != 0)
        return rc;

    if (truncate)
        runs_truncate(w, i0);
    for (size_t k = 0; k < n; k++)
        runs_push(w, e[k].index, e[k].term); /* cannot fail: reserved */
    w->last = e[n - 1].index;
    return 0;
}

int gw_wal_set_hard_state(struct gw_wal *w, const struct raft_hard_state *hs)
{
    if (!w || !hs)
        return GW_WAL_ERR_INVALID;
    int rc = check_usable(w);
    if (rc != 0)
        return rc;
    if (hs->term < w->hs.term ||
        (hs->term == w->hs.term && w->hs.vote != 0 && hs->vote != w->hs.vote)) {
        seterr(w, "raft/storage: hard state (term %" PRIu64 ", vote %" PRIu64 ") would take back "
                  "term %" PRIu64 " or its vote for %" PRIu64,
               hs->term, hs->vote, w->hs.term, w->hs.vote);
        return GW_WAL_ERR_INVALID;
    }
    if (hs->term == w->hs.term && hs->vote == w->hs.vote && hs->commit == w->hs.commit)
        return 0;
    if (w->off + HS_REC_SIZE > w->opt.segment_bytes && w->off > SEG_HDR + HS_REC_SIZE &&
        (rc = seg_create(w, w->segs[w->n_segs - 1].seq + 1)) != 0)
        return rc;
    uint8_t r[HS_REC_SIZE];
    rc = seg_write(w, r, rec_hard_state(r, hs));
    if (rc != 0)
        return rc;
    w->hs = *hs;
    return 0;
}

int gw_wal_sync(struct gw_wal *w, uint64_t *fsync_ns)
{
    if (fsync_ns)
        *fsync_ns = 0;
    if (!w)
        return GW_WAL_ERR_INVALID;
    int rc = check_usable(w);
    if (rc != 0 || !w->dirty)
        return rc;
    uint64_t dt = 0;
    if (w->opt.sync) {
        uint64_t t0 = mono_ns();
        if (fdatasync(w->fd) != 0) {
            char name[NAME_LEN];
            const struct seg *s = &w->segs[w->n_segs - 1];
            seg_name(name, s->seq, s->first);
            w->broken = true; /* see the contract in storage.h */
            return fail_errno(w, -errno, "fdatasync", name);
        }
        dt = mono_ns() - t0;
        w->syncs++;
    }
    w->dirty = false;
    w->last_fsync_ns = dt;
    if (fsync_ns)
        *fsync_ns = dt;
    return 0;
}

/* Deletes snapshot files older than index (best effort: a leftover is retried next time). */
static void drop_old_snapshots(struct gw_wal *w, uint64_t index, uint64_t term)
{
    int dfd = dup(w->dirfd);
    if (dfd < 0)
        return;
    DIR *d = fdopendir(dfd);
    if (!d) {
        close(dfd);
        return;
    }
    rewinddir(d);
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        uint64_t a, b;
        if (parse_name(de->d_name, ".snap", &a, &b) && (a < index || (a == index && b != term)))
            unlinkat(w->dirfd, de->d_name, 0);
    }
    closedir(d);
}

int gw_wal_save_snapshot(struct gw_wal *w, const struct raft_snapshot *snap, uint64_t trailing)
{
    if (!w || !snap)
        return GW_WAL_ERR_INVALID;
    int rc = check_usable(w);
    if (rc != 0)
        return rc;
    uint64_t s = snap->index, t = snap->term;
    if (s == 0 || t == 0 || s < w->snap_index || (s == w->snap_index && t != w->snap_term) ||
        (snap->len > 0 && !snap->data)) {
        seterr(w, "raft/storage: snapshot at index %" PRIu64 " term %" PRIu64 " is invalid or "
                  "older than the current one (%" PRIu64 ")",
               s, t, w->snap_index);
        return GW_WAL_ERR_INVALID;
    }
    if (s == w->snap_index)
        return 0;
    if (snap->len > w->opt.max_snapshot_bytes) {
        seterr(w, "raft/storage: snapshot of %zu bytes, more than max_snapshot_bytes", snap->len);
        return GW_WAL_ERR_TOO_BIG;
    }

    /* 1. The file: written under a temporary name, synced, renamed, directory synced. A crash
     * before the rename leaves the previous snapshot in use and a .tmp that recovery removes. */
    uint8_t hdr[SNAP_HDR + CONF_MAX];
    size_t conf_len;
    if (raft_membership_encode(&snap->conf, hdr + SNAP_HDR, CONF_MAX, &conf_len) != 0) {
        seterr(w, "raft/storage: snapshot membership cannot be encoded");
        return GW_WAL_ERR_INVALID;
    }
    memcpy(hdr, SNAP_MAGIC, 8);
    put32(hdr + 8, GW_WAL_FORMAT_VERSION);
    put64(hdr + 16, s);
    put64(hdr + 24, t);
    put32(hdr + 32, (uint32_t)conf_len);
    put32(hdr + 36, 0);
    put64(hdr + 40, snap->len);
    uint32_t c = crc_update(0xffffffffu, hdr + 16, SNAP_HDR - 16 + conf_len);
    if (snap->len > 0)
        c = crc_update(c, snap->data, snap->len);
    put32(hdr + 12, ~c);

    char tmp[NAME_LEN], name[NAME_LEN];
    snap_name(tmp, s, t, true);
    snap_name(name, s, t, false);
    int fd = openat(w->dirfd, tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        return fail_errno(w, -errno, "create", tmp);
    rc = pwrite_all(fd, hdr, SNAP_HDR + conf_len, 0);
    if (rc == 0 && snap->len > 0)
        rc = pwrite_all(fd, snap->data, snap->len, SNAP_HDR + conf_len);
    if (rc == 0 && w->opt.sync && fdatasync(fd) != 0)
        rc = -errno;
    if (rc != 0) {
        rc = fail_errno(w, rc, "write", tmp);
        close(fd);
        unlinkat(w->dirfd, tmp, 0);
        return rc;
    }
    if (close(fd) != 0 || renameat(w->dirfd, tmp, w->dirfd, name) != 0) {
        rc = fail_errno(w, -errno, "rename into place", tmp);
        unlinkat(w->dirfd, tmp, 0);
        return rc;
    }
    if ((rc = fsync_dir(w)) != 0)
        return rc;

    /* 2. The marker, so a replay discards a log the snapshot replaces at the right point. */
    uint64_t have;
    bool keep = term_at(w, s, &have) && have == t;
    uint8_t m[SNAP_REC_SIZE];
    if ((rc = seg_write(w, m, rec_snapshot(m, s, t, !keep))) != 0) {
        /* the record is not in the log: take the file back, so that the previous snapshot
         * stays the one in use, on disk as in memory (best effort: either way recovery copes) */
        unlinkat(w->dirfd, name, 0);
        fsync_dir(w);
        return rc;
    }
    if ((rc = gw_wal_sync(w, NULL)) != 0)
        return rc; /* the log is broken; a reopen reads whichever of the two states is on disk */
    w->snap_index = s;
    w->snap_term = t;
    if (!keep)
        runs_reset(w, s + 1);

    /* 3. Compaction: segment j holds no entry at or after segs[j + 1].first that survives, so it
     * can go once that is <= keep_from. Oldest first, so a crash leaves a contiguous suffix. */
    uint64_t keep_from = !keep ? s + 1 : trailing <= s ? s + 1 - trailing : 1;
    size_t k = 0;
    while (k + 1 < w->n_segs && w->segs[k + 1].first <= keep_from) {
        char old[NAME_LEN];
        seg_name(old, w->segs[k].seq, w->segs[k].first);
        if (unlinkat(w->dirfd, old, 0) != 0 && errno != ENOENT) {
            seterr(w, "raft/storage: remove %s/%s: %s (retried at the next snapshot)", w->dir, old,
                   strerror(errno));
            break;
        }
        k++;
    }
    if (k > 0) {
        memmove(w->segs, w->segs + k, (w->n_segs - k) * sizeof(*w->segs));
        w->n_segs -= k;
        uint64_t nf = w->segs[0].first < keep_from ? w->segs[0].first : keep_from;
        if (nf > w->last)
            runs_reset(w, w->last + 1);
        else if (nf > w->first)
            runs_trim_front(w, nf);
    }
    drop_old_snapshots(w, s, t);
    fsync_dir(w); /* the removals need not be durable: a leftover is removed next time */
    return 0;
}

void gw_wal_stats(const struct gw_wal *w, struct gw_wal_stats *st)
{
    memset(st, 0, sizeof(*st));
    st->first_index = w->first;
    st->last_index = w->last;
    st->snapshot_index = w->snap_index;
    st->snapshot_term = w->snap_term;
    for (size_t i = 0; i < w->n_segs; i++)
        st->bytes += w->segs[i].bytes;
    st->segments = (uint32_t)w->n_segs;
    st->syncs = w->syncs;
    st->last_fsync_ns = w->last_fsync_ns;
}

const char *gw_wal_errmsg(const struct gw_wal *w)
{
    return w ? w->err : "";
}
