/*
 * cmd.c - the binary form of state machine commands, the value checks shared with the HTTP
 * layer, and the error table.
 *
 * Commands become Raft log entries, so the decoder treats its input as hostile even though only
 * the leader writes it: a bug, a version skew or a corrupt log must produce an error, never a
 * crash or an over-read. Every length is checked against what remains before use, unknown flag
 * bits and trailing bytes are rejected, and reserved kinds are refused as unsupported. Decoded
 * strings point into the input (no copy).
 */
#include "fsm.h"

#include <string.h>

const char *gw_fsm_strerror(int err)
{
    switch (err) {
    case 0:
        return "success";
#define GW_FSM_ERR_TEXT(name, code, id, text) \
    case code:                                \
        return text;
        GW_FSM_ERRORS(GW_FSM_ERR_TEXT)
#undef GW_FSM_ERR_TEXT
    }
    return "unknown error";
}

const char *gw_fsm_errname(int err)
{
    switch (err) {
    case 0:
        return "ok";
#define GW_FSM_ERR_ID(name, code, id, text) \
    case code:                              \
        return id;
        GW_FSM_ERRORS(GW_FSM_ERR_ID)
#undef GW_FSM_ERR_ID
    }
    return "unknown";
}

bool gw_fsm_name_valid(const char *name, size_t len)
{
    if (name == NULL || len == 0 || len > GW_FSM_MAX_NAME)
        return false;
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)name[i];
        bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
                  ch == '.' || ch == '_' || ch == ':' || ch == '-';
        if (!ok)
            return false;
    }
    return true;
}

static bool printable(const char *s, size_t len, size_t max)
{
    if (s == NULL || len == 0 || len > max)
        return false;
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch < 0x20 || ch > 0x7e)
            return false;
    }
    return true;
}

bool gw_fsm_owner_valid(const char *owner, size_t len)
{
    return printable(owner, len, GW_FSM_MAX_OWNER);
}

bool gw_fsm_idem_key_valid(const char *key, size_t len)
{
    return printable(key, len, GW_FSM_MAX_IDEM_KEY);
}

bool gw_fsm_parse_id(const char *s, size_t len, uint64_t *id)
{
    if (s == NULL || len == 0 || len > 20 || s[0] == '0')
        return false;
    uint64_t v = 0;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return false;
        unsigned d = (unsigned)(s[i] - '0');
        if (v > (UINT64_MAX - d) / 10)
            return false;
        v = v * 10 + d;
    }
    *id = v;
    return true;
}

/* ---- Encoding ---------------------------------------------------------------------------- */

#define HEADER_LEN 11 /* version, kind, flags, now_ms */

static bool kind_known(uint8_t kind)
{
    switch (kind) {
    case GW_FSM_LEASE_GRANT:
    case GW_FSM_LEASE_KEEPALIVE:
    case GW_FSM_LEASE_REVOKE:
    case GW_FSM_LEASE_EXPIRE:
    case GW_FSM_LOCK_ACQUIRE:
    case GW_FSM_LOCK_RELEASE:
    case GW_FSM_LOCK_CANCEL_WAIT:
    case GW_FSM_COUNTER_ADD:
    case GW_FSM_COUNTER_SET:
    case GW_FSM_ROUTE_PUT:
    case GW_FSM_ROUTE_DELETE:
    case GW_FSM_QUOTA_ACQUIRE:
    case GW_FSM_QUOTA_RELEASE:
    case GW_FSM_IDEM_BEGIN:
    case GW_FSM_IDEM_FINISH:
        return true;
    }
    return false;
}

/* The quota and gateway idempotency kinds carry their own identity: no /v1 idempotency key. */
static bool kind_takes_idem(uint8_t kind)
{
    return !(kind == GW_FSM_QUOTA_ACQUIRE || kind == GW_FSM_QUOTA_RELEASE || kind == GW_FSM_IDEM_BEGIN ||
             kind == GW_FSM_IDEM_FINISH);
}

size_t gw_fsm_cmd_encoded_len(const struct gw_fsm_cmd *c)
{
    size_t n = HEADER_LEN;
    if (!kind_known(c->kind))
        return 0;
    if (c->idem_key_len > 0) {
        if (c->idem_key_len > GW_FSM_MAX_IDEM_KEY || c->idem_key == NULL || !kind_takes_idem(c->kind))
            return 0;
        n += 1 + c->idem_key_len;
    }
    if (c->name_len > UINT16_MAX || c->owner_len > UINT16_MAX || c->json_len > UINT32_MAX ||
        c->key_len > UINT16_MAX || c->headers_len > UINT32_MAX || c->body_len > UINT32_MAX)
        return 0;
    switch (c->kind) {
    case GW_FSM_LEASE_GRANT:
    case GW_FSM_LEASE_KEEPALIVE:
    case GW_FSM_LEASE_REVOKE:
        return n + 8;
    case GW_FSM_LEASE_EXPIRE:
        if (c->n_ids > GW_FSM_MAX_EXPIRE_IDS || (c->n_ids > 0 && c->ids == NULL))
            return 0;
        return n + 2 + 8 * c->n_ids;
    case GW_FSM_LOCK_ACQUIRE:
        return n + 2 + c->name_len + 2 + c->owner_len + 24;
    case GW_FSM_LOCK_RELEASE:
    case GW_FSM_LOCK_CANCEL_WAIT:
    case GW_FSM_COUNTER_ADD:
        return n + 2 + c->name_len + 8;
    case GW_FSM_COUNTER_SET:
        return n + 2 + c->name_len + 8 + (c->has_expect ? 8 : 0);
    case GW_FSM_ROUTE_PUT:
        return n + 2 + c->name_len + 4 + c->json_len;
    case GW_FSM_ROUTE_DELETE:
        return n + 2 + c->name_len;
    case GW_FSM_QUOTA_ACQUIRE:
        return n + 2 + c->name_len + 2 + c->owner_len + 1 + 32;
    case GW_FSM_QUOTA_RELEASE:
        return n + 2 + c->name_len + 2 + c->owner_len + 16;
    case GW_FSM_IDEM_BEGIN:
        return n + 2 + c->name_len + 2 + c->key_len + 16 + 2 + c->owner_len + 8;
    case GW_FSM_IDEM_FINISH:
        return n + 2 + c->name_len + 2 + c->key_len + 8 + 1 + 2 + 8 + 4 + c->headers_len + 4 +
               c->body_len;
    }
    return 0;
}

static uint8_t *put_u8(uint8_t *p, uint8_t v)
{
    *p = v;
    return p + 1;
}

static uint8_t *put_u16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    return p + 2;
}

static uint8_t *put_u32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
    return p + 4;
}

static uint8_t *put_u64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
    return p + 8;
}

static uint8_t *put_mem(uint8_t *p, const void *src, size_t n)
{
    if (n > 0)
        memcpy(p, src, n);
    return p + n;
}

static uint8_t *put_str16(uint8_t *p, const char *s, size_t n)
{
    p = put_u16(p, (uint16_t)n);
    return put_mem(p, s, n);
}

int gw_fsm_cmd_encode(const struct gw_fsm_cmd *c, uint8_t *buf, size_t cap, size_t *len)
{
    size_t need = gw_fsm_cmd_encoded_len(c);
    if (need == 0)
        return GW_FSM_ERR_INVALID;
    if ((c->name_len > 0 && c->name == NULL) || (c->owner_len > 0 && c->owner == NULL) ||
        (c->json_len > 0 && c->json == NULL) || (c->key_len > 0 && c->key == NULL) ||
        (c->headers_len > 0 && c->headers == NULL) || (c->body_len > 0 && c->body == NULL))
        return GW_FSM_ERR_INVALID;
    if (need > cap)
        return GW_FSM_ERR_TOO_BIG;
    uint8_t flags = 0;
    if (c->idem_key_len > 0)
        flags |= GW_FSM_F_IDEM;
    if (c->kind == GW_FSM_COUNTER_SET && c->has_expect)
        flags |= GW_FSM_F_EXPECT;
    uint8_t *p = buf;
    p = put_u8(p, GW_FSM_CMD_VERSION);
    p = put_u8(p, c->kind);
    p = put_u8(p, flags);
    p = put_u64(p, c->now_ms);
    if (flags & GW_FSM_F_IDEM) {
        p = put_u8(p, (uint8_t)c->idem_key_len);
        p = put_mem(p, c->idem_key, c->idem_key_len);
    }
    switch (c->kind) {
    case GW_FSM_LEASE_GRANT:
        p = put_u64(p, c->ttl_ms);
        break;
    case GW_FSM_LEASE_KEEPALIVE:
    case GW_FSM_LEASE_REVOKE:
        p = put_u64(p, c->lease_id);
        break;
    case GW_FSM_LEASE_EXPIRE:
        p = put_u16(p, (uint16_t)c->n_ids);
        for (size_t i = 0; i < c->n_ids; i++)
            p = put_u64(p, c->ids[i]);
        break;
    case GW_FSM_LOCK_ACQUIRE:
        p = put_str16(p, c->name, c->name_len);
        p = put_str16(p, c->owner, c->owner_len);
        p = put_u64(p, c->lease_id);
        p = put_u64(p, c->ttl_ms);
        p = put_u64(p, c->wait_ms);
        break;
    case GW_FSM_LOCK_RELEASE:
        p = put_str16(p, c->name, c->name_len);
        p = put_u64(p, c->token);
        break;
    case GW_FSM_LOCK_CANCEL_WAIT:
        p = put_str16(p, c->name, c->name_len);
        p = put_u64(p, c->waiter_id);
        break;
    case GW_FSM_COUNTER_ADD:
        p = put_str16(p, c->name, c->name_len);
        p = put_u64(p, (uint64_t)c->delta);
        break;
    case GW_FSM_COUNTER_SET:
        p = put_str16(p, c->name, c->name_len);
        p = put_u64(p, (uint64_t)c->value);
        if (c->has_expect)
            p = put_u64(p, (uint64_t)c->expect);
        break;
    case GW_FSM_ROUTE_PUT:
        p = put_str16(p, c->name, c->name_len);
        p = put_u32(p, (uint32_t)c->json_len);
        p = put_mem(p, c->json, c->json_len);
        break;
    case GW_FSM_ROUTE_DELETE:
        p = put_str16(p, c->name, c->name_len);
        break;
    case GW_FSM_QUOTA_ACQUIRE:
        p = put_str16(p, c->name, c->name_len);
        p = put_str16(p, c->owner, c->owner_len);
        p = put_u8(p, c->quota_kind);
        p = put_u64(p, c->quota_a);
        p = put_u64(p, c->quota_b);
        p = put_u64(p, c->count);
        p = put_u64(p, c->ttl_ms);
        break;
    case GW_FSM_QUOTA_RELEASE:
        p = put_str16(p, c->name, c->name_len);
        p = put_str16(p, c->owner, c->owner_len);
        p = put_u64(p, c->grant_id);
        p = put_u64(p, c->count);
        break;
    case GW_FSM_IDEM_BEGIN:
        p = put_str16(p, c->name, c->name_len);
        p = put_str16(p, c->key, c->key_len);
        p = put_u64(p, c->fp_hi);
        p = put_u64(p, c->fp_lo);
        p = put_str16(p, c->owner, c->owner_len);
        p = put_u64(p, c->ttl_ms);
        break;
    case GW_FSM_IDEM_FINISH:
        p = put_str16(p, c->name, c->name_len);
        p = put_str16(p, c->key, c->key_len);
        p = put_u64(p, c->claim_id);
        p = put_u8(p, c->store ? 1 : 0);
        p = put_u16(p, c->status);
        p = put_u64(p, c->ttl_ms);
        p = put_u32(p, (uint32_t)c->headers_len);
        p = put_mem(p, c->headers, c->headers_len);
        p = put_u32(p, (uint32_t)c->body_len);
        p = put_mem(p, c->body, c->body_len);
        break;
    }
    *len = (size_t)(p - buf);
    return 0;
}

/* ---- Decoding ---------------------------------------------------------------------------- */

struct rd {
    const uint8_t *p;
    size_t left;
    bool bad;
};

static uint64_t get_le(struct rd *r, size_t n)
{
    uint64_t v = 0;
    if (r->bad || r->left < n) {
        r->bad = true;
        return 0;
    }
    for (size_t i = 0; i < n; i++)
        v |= (uint64_t)r->p[i] << (8 * i);
    r->p += n;
    r->left -= n;
    return v;
}

static const char *get_bytes(struct rd *r, size_t n)
{
    if (r->bad || r->left < n) {
        r->bad = true;
        return NULL;
    }
    const char *s = (const char *)r->p;
    r->p += n;
    r->left -= n;
    return s;
}

static void get_str16(struct rd *r, const char **s, size_t *n)
{
    *n = (size_t)get_le(r, 2);
    *s = get_bytes(r, *n);
}

uint64_t gw_fsm_cmd_expire_id(const struct gw_fsm_cmd *c, size_t i)
{
    /* The ids follow the u16 count at the start of args. */
    const uint8_t *p = c->args + 2 + 8 * i;
    uint64_t v = 0;
    for (int k = 0; k < 8; k++)
        v |= (uint64_t)p[k] << (8 * k);
    return v;
}

int gw_fsm_cmd_decode(const uint8_t *buf, size_t len, struct gw_fsm_cmd *c)
{
    struct rd r = {buf, len, false};
    memset(c, 0, sizeof(*c));
    if (buf == NULL || len < HEADER_LEN)
        return GW_FSM_ERR_MALFORMED;
    uint8_t version = (uint8_t)get_le(&r, 1);
    if (version != GW_FSM_CMD_VERSION)
        return GW_FSM_ERR_UNSUPPORTED;
    c->kind = (uint8_t)get_le(&r, 1);
    if (!kind_known(c->kind))
        return GW_FSM_ERR_UNSUPPORTED;
    c->flags = (uint8_t)get_le(&r, 1);
    uint8_t allowed = (kind_takes_idem(c->kind) ? GW_FSM_F_IDEM : 0) |
                      (c->kind == GW_FSM_COUNTER_SET ? GW_FSM_F_EXPECT : 0);
    if (c->flags & ~allowed)
        return GW_FSM_ERR_MALFORMED;
    c->now_ms = get_le(&r, 8);
    if (c->flags & GW_FSM_F_IDEM) {
        c->idem_key_len = (size_t)get_le(&r, 1);
        if (c->idem_key_len == 0)
            return GW_FSM_ERR_MALFORMED;
        c->idem_key = get_bytes(&r, c->idem_key_len);
    }
    c->args = r.p;
    c->args_len = r.left;
    switch (c->kind) {
    case GW_FSM_LEASE_GRANT:
        c->ttl_ms = get_le(&r, 8);
        break;
    case GW_FSM_LEASE_KEEPALIVE:
    case GW_FSM_LEASE_REVOKE:
        c->lease_id = get_le(&r, 8);
        break;
    case GW_FSM_LEASE_EXPIRE:
        c->n_ids = (size_t)get_le(&r, 2);
        if (c->n_ids > GW_FSM_MAX_EXPIRE_IDS)
            return GW_FSM_ERR_MALFORMED;
        (void)get_bytes(&r, 8 * c->n_ids);
        break;
    case GW_FSM_LOCK_ACQUIRE:
        get_str16(&r, &c->name, &c->name_len);
        get_str16(&r, &c->owner, &c->owner_len);
        c->lease_id = get_le(&r, 8);
        c->ttl_ms = get_le(&r, 8);
        c->wait_ms = get_le(&r, 8);
        break;
    case GW_FSM_LOCK_RELEASE:
        get_str16(&r, &c->name, &c->name_len);
        c->token = get_le(&r, 8);
        break;
    case GW_FSM_LOCK_CANCEL_WAIT:
        get_str16(&r, &c->name, &c->name_len);
        c->waiter_id = get_le(&r, 8);
        break;
    case GW_FSM_COUNTER_ADD:
        get_str16(&r, &c->name, &c->name_len);
        c->delta = (int64_t)get_le(&r, 8);
        break;
    case GW_FSM_COUNTER_SET:
        get_str16(&r, &c->name, &c->name_len);
        c->value = (int64_t)get_le(&r, 8);
        if (c->flags & GW_FSM_F_EXPECT) {
            c->has_expect = true;
            c->expect = (int64_t)get_le(&r, 8);
        }
        break;
    case GW_FSM_ROUTE_PUT:
        get_str16(&r, &c->name, &c->name_len);
        c->json_len = (size_t)get_le(&r, 4);
        c->json = get_bytes(&r, c->json_len);
        break;
    case GW_FSM_ROUTE_DELETE:
        get_str16(&r, &c->name, &c->name_len);
        break;
    case GW_FSM_QUOTA_ACQUIRE:
        get_str16(&r, &c->name, &c->name_len);
        get_str16(&r, &c->owner, &c->owner_len);
        c->quota_kind = (uint8_t)get_le(&r, 1);
        c->quota_a = get_le(&r, 8);
        c->quota_b = get_le(&r, 8);
        c->count = get_le(&r, 8);
        c->ttl_ms = get_le(&r, 8);
        break;
    case GW_FSM_QUOTA_RELEASE:
        get_str16(&r, &c->name, &c->name_len);
        get_str16(&r, &c->owner, &c->owner_len);
        c->grant_id = get_le(&r, 8);
        c->count = get_le(&r, 8);
        break;
    case GW_FSM_IDEM_BEGIN:
        get_str16(&r, &c->name, &c->name_len);
        get_str16(&r, &c->key, &c->key_len);
        c->fp_hi = get_le(&r, 8);
        c->fp_lo = get_le(&r, 8);
        get_str16(&r, &c->owner, &c->owner_len);
        c->ttl_ms = get_le(&r, 8);
        break;
    case GW_FSM_IDEM_FINISH: {
        get_str16(&r, &c->name, &c->name_len);
        get_str16(&r, &c->key, &c->key_len);
        c->claim_id = get_le(&r, 8);
        uint64_t st = get_le(&r, 1);
        if (st > 1)
            r.bad = true;
        c->store = st == 1;
        c->status = (uint16_t)get_le(&r, 2);
        c->ttl_ms = get_le(&r, 8);
        c->headers_len = (size_t)get_le(&r, 4);
        c->headers = get_bytes(&r, c->headers_len);
        c->body_len = (size_t)get_le(&r, 4);
        c->body = get_bytes(&r, c->body_len);
        break;
    }
    }
    if (r.bad || r.left != 0) {
        struct gw_fsm_cmd zero = {0};
        *c = zero;
        return GW_FSM_ERR_MALFORMED;
    }
    return 0;
}
