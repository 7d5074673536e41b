/*
 * codec.c - the compact binary form of Raft messages and memberships, and the error table.
 *
 * The transport frames these bytes; the simulator sends every message through them too, so the
 * codec is exercised on every step of every seed. The decoder treats its input as hostile: every
 * length is checked against what remains before it is used, counts are bounded by the caller's
 * array, unknown types and versions and trailing bytes are rejected with RAFT_ERR_MALFORMED.
 * Payloads are not copied: decoded entries point into the input buffer.
 *
 * Layout (little-endian): version u8, type u8, flags u8, from u64, to u64, term u64, then the
 * fields of the type in the order of struct raft_msg_* in raft.h. An entry is term u64, type u8,
 * len u32, data; its index is implied (prev_index + 1 + position).
 */
#include "raft.h"

#include <string.h>

const char *raft_strerror(int err)
{
    switch (err) {
    case 0:
        return "success";
#define RAFT_ERR_TEXT(name, code, id, text) \
    case code:                              \
        return text;
        RAFT_ERRORS(RAFT_ERR_TEXT)
#undef RAFT_ERR_TEXT
    }
    return "unknown error";
}

const char *raft_errname(int err)
{
    switch (err) {
    case 0:
        return "ok";
#define RAFT_ERR_ID(name, code, id, text) \
    case code:                            \
        return id;
        RAFT_ERRORS(RAFT_ERR_ID)
#undef RAFT_ERR_ID
    }
    return "unknown";
}

enum { FLAG_A = 1, FLAG_DONE = 2 };

struct wbuf {
    uint8_t *p;
    size_t cap, len;
    bool overflow;
};

static void put_bytes(struct wbuf *w, const void *src, size_t n)
{
    if (w->overflow || w->cap - w->len < n) {
        w->overflow = true;
        return;
    }
    if (n > 0)
        memcpy(w->p + w->len, src, n);
    w->len += n;
}

static void put_u8(struct wbuf *w, uint8_t v) { put_bytes(w, &v, 1); }

static void put_u32(struct wbuf *w, uint32_t v)
{
    uint8_t b[4];
    for (int i = 0; i < 4; i++)
        b[i] = (uint8_t)(v >> (8 * i));
    put_bytes(w, b, 4);
}

static void put_u64(struct wbuf *w, uint64_t v)
{
    uint8_t b[8];
    for (int i = 0; i < 8; i++)
        b[i] = (uint8_t)(v >> (8 * i));
    put_bytes(w, b, 8);
}

struct rbuf {
    const uint8_t *p;
    size_t len, off;
    bool bad;
};

static const uint8_t *get_bytes(struct rbuf *r, size_t n)
{
    if (r->bad || r->len - r->off < n) {
        r->bad = true;
        return NULL;
    }
    const uint8_t *p = r->p + r->off;
    r->off += n;
    return p;
}

static uint8_t get_u8(struct rbuf *r)
{
    const uint8_t *p = get_bytes(r, 1);
    return p ? p[0] : 0;
}

static uint32_t get_u32(struct rbuf *r)
{
    const uint8_t *p = get_bytes(r, 4);
    uint32_t v = 0;
    if (p)
        for (int i = 0; i < 4; i++)
            v |= (uint32_t)p[i] << (8 * i);
    return v;
}

static uint64_t get_u64(struct rbuf *r)
{
    const uint8_t *p = get_bytes(r, 8);
    uint64_t v = 0;
    if (p)
        for (int i = 0; i < 8; i++)
            v |= (uint64_t)p[i] << (8 * i);
    return v;
}

static void put_conf(struct wbuf *w, const struct raft_membership *c)
{
    put_u8(w, (uint8_t)c->n);
    for (uint32_t i = 0; i < c->n && i < RAFT_MAX_MEMBERS; i++) {
        put_u64(w, c->members[i].id);
        put_u8(w, c->members[i].role);
    }
}

static void get_conf(struct rbuf *r, struct raft_membership *c)
{
    memset(c, 0, sizeof(*c));
    uint8_t n = get_u8(r);
    if (n > RAFT_MAX_MEMBERS) {
        r->bad = true;
        return;
    }
    c->n = n;
    for (uint32_t i = 0; i < n; i++) {
        c->members[i].id = get_u64(r);
        c->members[i].role = get_u8(r);
        if (c->members[i].id == 0 ||
            (c->members[i].role != RAFT_VOTER && c->members[i].role != RAFT_LEARNER))
            r->bad = true;
        for (uint32_t j = 0; j < i; j++)
            if (c->members[j].id == c->members[i].id)
                r->bad = true;
    }
}

int raft_membership_encode(const struct raft_membership *c, uint8_t *buf, size_t cap, size_t *len)
{
    if (c->n > RAFT_MAX_MEMBERS)
        return RAFT_ERR_INVALID;
    struct wbuf w = {buf, cap, 0, false};
    put_conf(&w, c);
    if (w.overflow)
        return RAFT_ERR_BUSY;
    *len = w.len;
    return 0;
}

int raft_membership_decode(const uint8_t *buf, size_t len, struct raft_membership *c)
{
    struct rbuf r = {buf, len, 0, false};
    get_conf(&r, c);
    if (r.bad || r.off != len)
        return RAFT_ERR_MALFORMED;
    return 0;
}

const struct raft_member *raft_membership_find(const struct raft_membership *c, uint64_t id)
{
    for (uint32_t i = 0; i < c->n; i++)
        if (c->members[i].id == id)
            return &c->members[i];
    return NULL;
}

static void encode(const struct raft_message *m, struct wbuf *w)
{
    uint8_t flags = 0;
    switch (m->type) {
    case RAFT_MSG_VOTE:
    case RAFT_MSG_PREVOTE:
        flags = m->u.vote.transfer ? FLAG_A : 0;
        break;
    case RAFT_MSG_VOTE_RESP:
    case RAFT_MSG_PREVOTE_RESP:
        flags = m->u.vote_resp.granted ? FLAG_A : 0;
        break;
    case RAFT_MSG_APPEND_RESP:
        flags = m->u.append_resp.reject ? FLAG_A : 0;
        break;
    case RAFT_MSG_SNAPSHOT:
        flags = m->u.snapshot.done ? FLAG_DONE : 0;
        break;
    case RAFT_MSG_SNAPSHOT_RESP:
        flags = m->u.snapshot_resp.done ? FLAG_DONE : 0;
        break;
    default:
        break;
    }
    put_u8(w, RAFT_WIRE_VERSION);
    put_u8(w, m->type);
    put_u8(w, flags);
    put_u64(w, m->from);
    put_u64(w, m->to);
    put_u64(w, m->term);
    switch (m->type) {
    case RAFT_MSG_VOTE:
    case RAFT_MSG_PREVOTE:
        put_u64(w, m->u.vote.last_index);
        put_u64(w, m->u.vote.last_term);
        break;
    case RAFT_MSG_APPEND: {
        const struct raft_msg_append *a = &m->u.append;
        put_u64(w, a->prev_index);
        put_u64(w, a->prev_term);
        put_u64(w, a->commit);
        put_u64(w, a->read_seq);
        put_u32(w, a->n_entries);
        for (uint32_t i = 0; i < a->n_entries; i++) {
            put_u64(w, a->entries[i].term);
            put_u8(w, a->entries[i].type);
            put_u32(w, a->entries[i].len);
            put_bytes(w, a->entries[i].data, a->entries[i].len);
        }
        break;
    }
    case RAFT_MSG_APPEND_RESP:
        put_u64(w, m->u.append_resp.index);
        put_u64(w, m->u.append_resp.hint_index);
        put_u64(w, m->u.append_resp.hint_term);
        put_u64(w, m->u.append_resp.read_seq);
        break;
    case RAFT_MSG_SNAPSHOT: {
        const struct raft_msg_snapshot *s = &m->u.snapshot;
        put_u64(w, s->index);
        put_u64(w, s->term);
        put_u64(w, s->offset);
        put_u64(w, s->total);
        put_conf(w, &s->conf);
        put_u32(w, s->len);
        put_bytes(w, s->data, s->len);
        break;
    }
    case RAFT_MSG_SNAPSHOT_RESP:
        put_u64(w, m->u.snapshot_resp.index);
        put_u64(w, m->u.snapshot_resp.next_offset);
        break;
    default:
        break;
    }
}

size_t raft_msg_encoded_len(const struct raft_message *m)
{
    size_t n = 3 + 24; /* version, type, flags, from, to, term */
    switch (m->type) {
    case RAFT_MSG_VOTE:
    case RAFT_MSG_PREVOTE:
        n += 16;
        break;
    case RAFT_MSG_APPEND:
        n += 36;
        for (uint32_t i = 0; i < m->u.append.n_entries; i++)
            n += 13 + m->u.append.entries[i].len;
        break;
    case RAFT_MSG_APPEND_RESP:
        n += 32;
        break;
    case RAFT_MSG_SNAPSHOT:
        n += 32 + 1 + 9 * (size_t)m->u.snapshot.conf.n + 4 + m->u.snapshot.len;
        break;
    case RAFT_MSG_SNAPSHOT_RESP:
        n += 16;
        break;
    default:
        break;
    }
    return n;
}

int raft_msg_encode(const struct raft_message *m, uint8_t *buf, size_t cap, size_t *len)
{
    if (m->type < RAFT_MSG_VOTE || m->type > RAFT_MSG_TIMEOUT_NOW)
        return RAFT_ERR_INVALID;
    if (m->type == RAFT_MSG_SNAPSHOT && m->u.snapshot.conf.n > RAFT_MAX_MEMBERS)
        return RAFT_ERR_INVALID;
    struct wbuf w = {buf, cap, 0, false};
    encode(m, &w);
    if (w.overflow)
        return RAFT_ERR_BUSY;
    *len = w.len;
    return 0;
}

int raft_msg_decode(const uint8_t *buf, size_t len, struct raft_message *m,
                    struct raft_entry *entries, size_t max_entries)
{
    struct rbuf r = {buf, len, 0, false};
    memset(m, 0, sizeof(*m));
    if (get_u8(&r) != RAFT_WIRE_VERSION)
        return RAFT_ERR_MALFORMED;
    m->type = get_u8(&r);
    uint8_t flags = get_u8(&r);
    m->from = get_u64(&r);
    m->to = get_u64(&r);
    m->term = get_u64(&r);
    if (r.bad || (flags & ~(FLAG_A | FLAG_DONE)) != 0)
        return RAFT_ERR_MALFORMED;
    switch (m->type) {
    case RAFT_MSG_VOTE:
    case RAFT_MSG_PREVOTE:
        m->u.vote.transfer = flags & FLAG_A;
        m->u.vote.last_index = get_u64(&r);
        m->u.vote.last_term = get_u64(&r);
        break;
    case RAFT_MSG_VOTE_RESP:
    case RAFT_MSG_PREVOTE_RESP:
        m->u.vote_resp.granted = flags & FLAG_A;
        break;
    case RAFT_MSG_APPEND: {
        struct raft_msg_append *a = &m->u.append;
        a->prev_index = get_u64(&r);
        a->prev_term = get_u64(&r);
        a->commit = get_u64(&r);
        a->read_seq = get_u64(&r);
        uint32_t n = get_u32(&r);
        if (r.bad || n > max_entries || (n > 0 && entries == NULL))
            return RAFT_ERR_MALFORMED;
        if (a->prev_index > UINT64_MAX - n)
            return RAFT_ERR_MALFORMED;
        for (uint32_t i = 0; i < n; i++) {
            struct raft_entry *e = &entries[i];
            e->index = a->prev_index + 1 + i;
            e->term = get_u64(&r);
            e->type = get_u8(&r);
            e->len = get_u32(&r);
            e->data = get_bytes(&r, e->len);
            if (r.bad)
                return RAFT_ERR_MALFORMED;
            if (e->type < RAFT_ENTRY_NORMAL || e->type > RAFT_ENTRY_NOOP)
                return RAFT_ERR_MALFORMED;
            if (e->term == 0 || e->term > m->term)
                return RAFT_ERR_MALFORMED;
            if (i > 0 && e->term < entries[i - 1].term)
                return RAFT_ERR_MALFORMED;
        }
        a->entries = n > 0 ? entries : NULL;
        a->n_entries = n;
        break;
    }
    case RAFT_MSG_APPEND_RESP:
        m->u.append_resp.reject = flags & FLAG_A;
        m->u.append_resp.index = get_u64(&r);
        m->u.append_resp.hint_index = get_u64(&r);
        m->u.append_resp.hint_term = get_u64(&r);
        m->u.append_resp.read_seq = get_u64(&r);
        break;
    case RAFT_MSG_SNAPSHOT: {
        struct raft_msg_snapshot *s = &m->u.snapshot;
        s->done = flags & FLAG_DONE;
        s->index = get_u64(&r);
        s->term = get_u64(&r);
        s->offset = get_u64(&r);
        s->total = get_u64(&r);
        get_conf(&r, &s->conf);
        s->len = get_u32(&r);
        s->data = get_bytes(&r, s->len);
        if (r.bad || s->offset > s->total || s->total - s->offset < s->len)
            return RAFT_ERR_MALFORMED;
        if (s->done && s->offset + s->len != s->total)
            return RAFT_ERR_MALFORMED;
        break;
    }
    case RAFT_MSG_SNAPSHOT_RESP:
        m->u.snapshot_resp.done = flags & FLAG_DONE;
        m->u.snapshot_resp.index = get_u64(&r);
        m->u.snapshot_resp.next_offset = get_u64(&r);
        break;
    case RAFT_MSG_TIMEOUT_NOW:
        break;
    default:
        return RAFT_ERR_MALFORMED;
    }
    if (r.bad || r.off != len)
        return RAFT_ERR_MALFORMED;
    return 0;
}
