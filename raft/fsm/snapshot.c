/*
 * snapshot.c - the whole state machine as one image, and back.
 *
 * The image is canonical: tables are written sorted (leases by id; locks, counters and routes by
 * name), waiters in queue order and idempotency records oldest first, so two replicas in the same
 * state write the same bytes (a cheap divergence check, and what the determinism tests compare).
 * Restore treats the image as hostile (it arrives from the network through InstallSnapshot or
 * from disk): the CRC is checked first, every length against what remains, every name and
 * reference validated; the new state is built aside and swapped in only when all of it is good,
 * so a bad image leaves the machine untouched.
 *
 * Layout (little-endian): magic "GWFS", version u8, last_index, time, last_token, route_version
 * (u64 each); leases: n u32, then id, ttl_ms, expires_at; locks: n u32, then name (u8 length +
 * bytes), owner, lease_id, token, n_waiters u32, then per waiter id, lease_id, ttl_ms, deadline,
 * owner; counters: n u32, then name, value; routes: n u32, then name, version, json (u32 length);
 * idempotency records: n u32, then kind u8, key, created_at, fp0, fp1, status u16, code u8,
 * queued u8, waiter_id, body (u32 length); then (version 2) the quotas: quota_sweep_at, n u32,
 * then by id: id (u8 length), kind u8, a, b, nanotokens, updated_ns, n_grants u32, per grant id,
 * count, deadline, node; n_past u32, per ended window grant until, count; the gateway idempotency records in sweep order: n u32, then route, key,
 * completed u8, claim, fp0, fp1, deadline, status u16, node, headers and body (u32 length each);
 * finally a CRC-32 (IEEE) of everything before it. A version 1 image restores with no quotas
 * and no gateway records.
 */
#include "fsm_int.h"

#include <stdlib.h>
#include <string.h>

#include "sliding_window.h"
#include "token_bucket.h"

static const uint8_t magic[4] = {'G', 'W', 'F', 'S'};

/* CRC-32 (IEEE 802.3, reflected 0xedb88320), a nibble at a time from a 16-entry table. */
uint32_t fsm_crc32(const uint8_t *p, size_t n)
{
    static const uint32_t nib[16] = {
        0x00000000u, 0x1db71064u, 0x3b6e20c8u, 0x26d930acu, 0x76dc4190u, 0x6b6b51f4u,
        0x4db26158u, 0x5005713cu, 0xedb88320u, 0xf00f9344u, 0xd6d6a3e8u, 0xcb61b38cu,
        0x9b64c2b0u, 0x86d3d2d4u, 0xa00ae278u, 0xbdbdf21cu,
    };
    uint32_t crc = 0xffffffffu;
    for (size_t i = 0; i < n; i++) {
        crc ^= p[i];
        crc = (crc >> 4) ^ nib[crc & 15];
        crc = (crc >> 4) ^ nib[crc & 15];
    }
    return ~crc;
}

/* ---- Writing ------------------------------------------------------------------------------ */

struct wb {
    uint8_t *p;
    size_t len, cap;
    bool oom;
};

static void w_bytes(struct wb *w, const void *src, size_t n)
{
    if (w->oom)
        return;
    if (w->cap - w->len < n) {
        size_t ncap = w->cap ? w->cap : 4096;
        while (ncap - w->len < n)
            ncap *= 2;
        uint8_t *np = realloc(w->p, ncap);
        if (np == NULL) {
            w->oom = true;
            return;
        }
        w->p = np;
        w->cap = ncap;
    }
    if (n > 0)
        memcpy(w->p + w->len, src, n);
    w->len += n;
}

static void w_le(struct wb *w, uint64_t v, size_t n)
{
    uint8_t b[8];
    for (size_t i = 0; i < n; i++)
        b[i] = (uint8_t)(v >> (8 * i));
    w_bytes(w, b, n);
}

static void w_str8(struct wb *w, const char *s, size_t n)
{
    w_le(w, n, 1);
    w_bytes(w, s, n);
}

int gw_fsm_snapshot(const struct gw_fsm *f, uint8_t **buf, size_t *len)
{
    struct wb w = {0};
    void **v = NULL;
    int rc;
    w_bytes(&w, magic, 4);
    w_le(&w, GW_FSM_SNAPSHOT_VERSION, 1);
    w_le(&w, f->last_index, 8);
    w_le(&w, f->time, 8);
    w_le(&w, f->last_token, 8);
    w_le(&w, f->route_version, 8);

    if ((rc = fsm_sorted(&f->leases, fsm_cmp_lease, &v)) < 0)
        goto fail;
    w_le(&w, f->leases.n, 4);
    for (uint32_t i = 0; i < f->leases.n; i++) {
        const struct fsm_lease *l = v[i];
        w_le(&w, l->id, 8);
        w_le(&w, l->ttl_ms, 8);
        w_le(&w, l->expires_at, 8);
    }
    free(v);

    if ((rc = fsm_sorted(&f->locks, fsm_cmp_lock, &v)) < 0)
        goto fail;
    w_le(&w, f->locks.n, 4);
    for (uint32_t i = 0; i < f->locks.n; i++) {
        const struct fsm_lock *lk = v[i];
        w_str8(&w, lk->name, lk->name_len);
        w_str8(&w, lk->owner, lk->owner_len);
        w_le(&w, lk->lease->id, 8);
        w_le(&w, lk->token, 8);
        w_le(&w, lk->n_waiters, 4);
        for (const struct fsm_waiter *q = lk->q_head; q != NULL; q = q->q_next) {
            w_le(&w, q->id, 8);
            w_le(&w, q->lease_id, 8);
            w_le(&w, q->ttl_ms, 8);
            w_le(&w, q->deadline, 8);
            w_str8(&w, q->owner, q->owner_len);
        }
    }
    free(v);

    if ((rc = fsm_sorted(&f->counters, fsm_cmp_counter, &v)) < 0)
        goto fail;
    w_le(&w, f->counters.n, 4);
    for (uint32_t i = 0; i < f->counters.n; i++) {
        const struct fsm_counter *c = v[i];
        w_str8(&w, c->name, c->name_len);
        w_le(&w, (uint64_t)c->value, 8);
    }
    free(v);

    if ((rc = fsm_sorted(&f->routes, fsm_cmp_route, &v)) < 0)
        goto fail;
    w_le(&w, f->routes.n, 4);
    for (uint32_t i = 0; i < f->routes.n; i++) {
        const struct fsm_route *r = v[i];
        w_str8(&w, r->name, r->name_len);
        w_le(&w, r->version, 8);
        w_le(&w, r->json_len, 4);
        w_bytes(&w, r->json, r->json_len);
    }
    free(v);

    w_le(&w, f->idems.n, 4);
    for (const struct fsm_idem *r = f->idem_head; r != NULL; r = r->next) {
        w_le(&w, r->kind, 1);
        w_str8(&w, r->key, r->key_len);
        w_le(&w, r->created_at, 8);
        w_le(&w, r->fp[0], 8);
        w_le(&w, r->fp[1], 8);
        w_le(&w, r->status, 2);
        w_le(&w, r->code, 1);
        w_le(&w, r->queued, 1);
        w_le(&w, r->waiter_id, 8);
        w_le(&w, r->body_len, 4);
        w_bytes(&w, r->body, r->body_len);
    }

    w_le(&w, f->quota_sweep_at, 8);
    if ((rc = fsm_sorted(&f->quotas, fsm_cmp_quota, &v)) < 0)
        goto fail;
    w_le(&w, f->quotas.n, 4);
    for (uint32_t i = 0; i < f->quotas.n; i++) {
        const struct fsm_quota *q = v[i];
        w_str8(&w, q->id, q->id_len);
        w_le(&w, q->kind, 1);
        w_le(&w, q->a, 8);
        w_le(&w, q->b, 8);
        w_le(&w, q->nanotokens, 8);
        w_le(&w, q->updated_ns, 8);
        w_le(&w, q->n_grants, 4);
        for (uint32_t k = 0; k < q->n_grants; k++) {
            w_le(&w, q->grants[k].id, 8);
            w_le(&w, q->grants[k].count, 8);
            w_le(&w, q->grants[k].deadline, 8);
            w_str8(&w, q->grants[k].node, q->grants[k].node_len);
        }
        w_le(&w, q->n_past, 4);
        for (uint32_t k = 0; k < q->n_past; k++) {
            w_le(&w, q->past[k].until, 8);
            w_le(&w, q->past[k].count, 8);
        }
    }
    free(v);
    v = NULL;
    w_le(&w, f->gwidems.n, 4);
    for (const struct fsm_gwidem *r = f->gw_head; r != NULL; r = r->next) {
        w_str8(&w, r->name, r->route_len);
        w_str8(&w, r->name + r->route_len, r->key_len);
        w_le(&w, r->completed, 1);
        w_le(&w, r->claim, 8);
        w_le(&w, r->fp[0], 8);
        w_le(&w, r->fp[1], 8);
        w_le(&w, r->deadline, 8);
        w_le(&w, r->status, 2);
        w_str8(&w, r->node, r->node_len);
        w_le(&w, r->headers_len, 4);
        w_bytes(&w, r->resp, r->headers_len);
        w_le(&w, r->body_len, 4);
        w_bytes(&w, r->resp + r->headers_len, r->body_len);
    }
    if (!w.oom)
        w_le(&w, fsm_crc32(w.p, w.len), 4);
    if (w.oom) {
        rc = GW_FSM_ERR_NOMEM;
        goto fail_buf;
    }
    *buf = w.p;
    *len = w.len;
    return 0;
fail:
    free(v);
fail_buf:
    free(w.p);
    return rc;
}

/* ---- Reading ------------------------------------------------------------------------------ */

struct rd {
    const uint8_t *p;
    size_t left;
    bool bad;
};

static uint64_t r_le(struct rd *r, size_t n)
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

static const char *r_bytes(struct rd *r, size_t n)
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

static const char *r_str8(struct rd *r, size_t *n)
{
    *n = (size_t)r_le(r, 1);
    return r_bytes(r, *n);
}

static int cmp_lock_token(const void *a, const void *b)
{
    uint64_t x = (*(struct fsm_lock *const *)a)->token, y = (*(struct fsm_lock *const *)b)->token;
    return x < y ? -1 : x > y;
}

static int cmp_waiter_id(const void *a, const void *b)
{
    uint64_t x = (*(struct fsm_waiter *const *)a)->id, y = (*(struct fsm_waiter *const *)b)->id;
    return x < y ? -1 : x > y;
}

static struct fsm_waiter *waiter_by_id(struct fsm_waiter **v, size_t n, uint64_t id)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (v[mid]->id < id)
            lo = mid + 1;
        else if (v[mid]->id > id)
            hi = mid;
        else
            return v[mid];
    }
    return NULL;
}

#define NANO UINT64_C(1000000000)

/* The version 2 sections: quotas and gateway idempotency records. */
static int load_ext(struct gw_fsm *g, struct rd *r)
{
    const char *s;
    size_t n;
    g->quota_sweep_at = r_le(r, 8);
    if (g->quota_sweep_at > g->time)
        return GW_FSM_ERR_MALFORMED;
    uint32_t count = (uint32_t)r_le(r, 4);
    const char *prev = NULL;
    size_t prev_len = 0;
    for (uint32_t i = 0; i < count && !r->bad; i++) {
        s = r_str8(r, &n);
        uint8_t kind = (uint8_t)r_le(r, 1);
        uint64_t a = r_le(r, 8), b = r_le(r, 8), nt = r_le(r, 8), upd = r_le(r, 8);
        uint32_t ng = (uint32_t)r_le(r, 4);
        if (r->bad || !fsm_printable(s, n, GW_FSM_MAX_QUOTA_ID) || ng > GW_FSM_QUOTA_GRANTS_MAX || kind > 1)
            return GW_FSM_ERR_MALFORMED;
        /* Strictly increasing ids: canonical and unique. */
        if (prev != NULL) {
            size_t m = prev_len < n ? prev_len : n;
            int c = memcmp(prev, s, m);
            if (c > 0 || (c == 0 && prev_len >= n))
                return GW_FSM_ERR_MALFORMED;
        }
        prev = s;
        prev_len = n;
        if (kind == GW_FSM_QUOTA_TOKEN_BUCKET) {
            struct gw_token_bucket_config tc = {a, b};
            if (gw_token_bucket_config_check(&tc) != 0)
                return GW_FSM_ERR_MALFORMED;
        } else {
            struct gw_sliding_window_config sc = {a, b, 0};
            if (gw_sliding_window_config_check(&sc) != 0 || nt != 0)
                return GW_FSM_ERR_MALFORMED;
        }
        struct fsm_quota *q = calloc(1, sizeof(*q));
        struct fsm_grant *gr = ng ? calloc(ng, sizeof(*gr)) : NULL;
        if (q == NULL || (ng && gr == NULL) || htab_insert(&g->quotas, fsm_quota_hash(g, s, n), q) < 0) {
            free(q);
            free(gr);
            return GW_FSM_ERR_NOMEM;
        }
        q->id_len = (uint8_t)n;
        memcpy(q->id, s, n);
        q->kind = kind;
        q->a = a;
        q->b = b;
        q->nanotokens = nt;
        q->updated_ns = upd;
        q->grants = gr;
        q->cap_grants = q->n_grants = ng;
        uint64_t out = 0, last_id = 0, last_deadline = 0;
        for (uint32_t k = 0; k < ng; k++) {
            gr[k].id = r_le(r, 8);
            gr[k].count = r_le(r, 8);
            gr[k].deadline = r_le(r, 8);
            s = r_str8(r, &n);
            /* (deadline, id) strictly increasing: the order apply keeps */
            bool ordered = k == 0 || gr[k].deadline > last_deadline ||
                           (gr[k].deadline == last_deadline && gr[k].id > last_id);
            if (r->bad || !ordered || gr[k].id == 0 || gr[k].id > g->last_index || gr[k].count == 0 ||
                gr[k].count > GW_FSM_QUOTA_COUNT_MAX || !fsm_printable(s, n, GW_FSM_MAX_NODE))
                return GW_FSM_ERR_MALFORMED;
            last_id = gr[k].id;
            last_deadline = gr[k].deadline;
            gr[k].node_len = (uint8_t)n;
            memcpy(gr[k].node, s, n);
            out += gr[k].count;
        }
        q->outstanding = out;
        if (kind == GW_FSM_QUOTA_TOKEN_BUCKET && nt > (a > out ? a - out : 0) * NANO)
            return GW_FSM_ERR_MALFORMED;
        uint32_t np = (uint32_t)r_le(r, 4);
        if (r->bad || np > 256 || (np > 0 && kind == GW_FSM_QUOTA_TOKEN_BUCKET))
            return GW_FSM_ERR_MALFORMED;
        if (np > 0) {
            q->past = calloc(np, sizeof(*q->past));
            if (q->past == NULL)
                return GW_FSM_ERR_NOMEM;
            q->cap_past = np;
        }
        uint64_t last_until = 0, total = 0;
        for (uint32_t k = 0; k < np; k++) {
            q->past[k].until = r_le(r, 8);
            q->past[k].count = r_le(r, 8);
            if (r->bad || q->past[k].until <= last_until ||
                q->past[k].count == 0 || q->past[k].count > UINT64_MAX / 2 - total)
                return GW_FSM_ERR_MALFORMED;
            last_until = q->past[k].until;
            total += q->past[k].count;
            q->n_past = k + 1;
        }
        q->past_total = total;
    }
    count = (uint32_t)r_le(r, 4);
    for (uint32_t i = 0; i < count && !r->bad; i++) {
        size_t rl, kl, nl;
        const char *route = r_str8(r, &rl);
        const char *key = r_str8(r, &kl);
        uint8_t completed = (uint8_t)r_le(r, 1);
        uint64_t claim = r_le(r, 8), fp0 = r_le(r, 8), fp1 = r_le(r, 8), deadline = r_le(r, 8);
        uint16_t status = (uint16_t)r_le(r, 2);
        const char *node = r_str8(r, &nl);
        size_t hl = (size_t)r_le(r, 4);
        const char *hs = r_bytes(r, hl);
        size_t bl = (size_t)r_le(r, 4);
        const char *bs = r_bytes(r, bl);
        if (r->bad || !fsm_printable(route, rl, GW_FSM_GWIDEM_MAX_ROUTE) || !gw_fsm_idem_key_valid(key, kl) ||
            !fsm_printable(node, nl, GW_FSM_MAX_NODE) || completed > 1 || claim == 0 ||
            claim > g->last_index || (!completed && (hl || bl || status)) ||
            fsm_gwidem_find(g, route, rl, key, kl) != NULL)
            return GW_FSM_ERR_MALFORMED;
        struct fsm_gwidem *rec = calloc(1, sizeof(*rec) + rl + kl);
        uint8_t *resp = completed ? malloc(hl + bl ? hl + bl : 1) : NULL;
        if (rec == NULL || (completed && resp == NULL) ||
            htab_insert(&g->gwidems, fsm_gwidem_hash(g, route, rl, key, kl), rec) < 0) {
            free(rec);
            free(resp);
            return GW_FSM_ERR_NOMEM;
        }
        memcpy(rec->name, route, rl);
        memcpy(rec->name + rl, key, kl);
        rec->route_len = (uint8_t)rl;
        rec->key_len = (uint8_t)kl;
        memcpy(rec->node, node, nl);
        rec->node_len = (uint8_t)nl;
        rec->completed = completed != 0;
        rec->claim = claim;
        rec->fp[0] = fp0;
        rec->fp[1] = fp1;
        rec->deadline = deadline;
        rec->status = status;
        if (resp != NULL) {
            if (hl)
                memcpy(resp, hs, hl);
            if (bl)
                memcpy(resp + hl, bs, bl);
        }
        rec->resp = resp;
        rec->headers_len = (uint32_t)hl;
        rec->body_len = (uint32_t)bl;
        rec->bytes = FSM_GWIDEM_OVERHEAD + rl + kl + hl + bl;
        g->gw_bytes += rec->bytes;
        fsm_gwidem_link_tail(g, rec);
    }
    return r->bad ? GW_FSM_ERR_MALFORMED : 0;
}

/* Reads the image into g (an empty machine with f's config); leaves partial state on error. */
static int load(struct gw_fsm *g, const uint8_t *buf, size_t len)
{
    struct rd r = {buf, len - 4, false};
    struct fsm_waiter **all = NULL;
    void **v = NULL;
    size_t n_all = 0;
    int rc = GW_FSM_ERR_MALFORMED;
    const char *s;
    size_t n;

    r_bytes(&r, 4);
    uint8_t img_version = (uint8_t)r_le(&r, 1);
    g->last_index = r_le(&r, 8);
    g->time = r_le(&r, 8);
    g->last_token = r_le(&r, 8);
    g->route_version = r_le(&r, 8);

    uint32_t count = (uint32_t)r_le(&r, 4);
    for (uint32_t i = 0; i < count && !r.bad; i++) {
        uint64_t id = r_le(&r, 8), ttl = r_le(&r, 8), exp = r_le(&r, 8);
        if (r.bad || id == 0 || fsm_lease_find(g, id) != NULL || ttl < GW_FSM_TTL_MIN_MS ||
            ttl > GW_FSM_TTL_MAX_MS)
            goto out;
        struct fsm_lease *l = calloc(1, sizeof(*l));
        if (l == NULL || htab_insert(&g->leases, fsm_hash_id(id), l) < 0) {
            free(l);
            rc = GW_FSM_ERR_NOMEM;
            goto out;
        }
        l->id = id;
        l->ttl_ms = ttl;
        l->expires_at = exp;
    }

    count = (uint32_t)r_le(&r, 4);
    for (uint32_t i = 0; i < count && !r.bad; i++) {
        s = r_str8(&r, &n);
        if (r.bad || !gw_fsm_name_valid(s, n) || fsm_lock_find(g, s, n) != NULL)
            goto out;
        struct fsm_lock *lk = calloc(1, sizeof(*lk));
        if (lk == NULL || htab_insert(&g->locks, fsm_hash_name(g, s, n), lk) < 0) {
            free(lk);
            rc = GW_FSM_ERR_NOMEM;
            goto out;
        }
        lk->name_len = (uint8_t)n;
        memcpy(lk->name, s, n);
        s = r_str8(&r, &n);
        if (r.bad || !gw_fsm_owner_valid(s, n))
            goto out;
        lk->owner_len = (uint8_t)n;
        memcpy(lk->owner, s, n);
        lk->lease = fsm_lease_find(g, r_le(&r, 8));
        lk->token = r_le(&r, 8);
        if (r.bad || lk->lease == NULL || lk->token == 0 || lk->token > g->last_token)
            goto out;
        uint32_t nw = (uint32_t)r_le(&r, 4);
        for (uint32_t k = 0; k < nw && !r.bad; k++) {
            struct fsm_waiter *w = calloc(1, sizeof(*w));
            if (w == NULL) {
                rc = GW_FSM_ERR_NOMEM;
                goto out;
            }
            w->lock = lk;
            w->q_prev = lk->q_tail;
            if (lk->q_tail != NULL)
                lk->q_tail->q_next = w;
            else
                lk->q_head = w;
            lk->q_tail = w;
            lk->n_waiters++;
            g->n_waiters++;
            w->id = r_le(&r, 8);
            w->lease_id = r_le(&r, 8);
            w->ttl_ms = r_le(&r, 8);
            w->deadline = r_le(&r, 8);
            s = r_str8(&r, &n);
            if (r.bad || !gw_fsm_owner_valid(s, n) || w->id == 0)
                goto out;
            /* A waiter with its own ttl becomes lease w->id when granted: that id must be free. */
            if (w->lease_id != 0 ? fsm_lease_find(g, w->lease_id) == NULL
                                 : (w->ttl_ms < GW_FSM_TTL_MIN_MS || w->ttl_ms > GW_FSM_TTL_MAX_MS ||
                                    fsm_lease_find(g, w->id) != NULL))
                goto out;
            w->owner_len = (uint8_t)n;
            memcpy(w->owner, s, n);
        }
    }
    if (r.bad)
        goto out;

    /* Rebuild the per-lease lists in the order apply keeps them: held by token, waiting by id. */
    if ((rc = fsm_sorted(&g->locks, cmp_lock_token, &v)) < 0)
        goto out;
    rc = GW_FSM_ERR_MALFORMED;
    for (uint32_t i = 0; i < g->locks.n; i++) {
        struct fsm_lock *lk = v[i];
        struct fsm_lease *l = lk->lease;
        if (i > 0 && ((struct fsm_lock *)v[i - 1])->token == lk->token)
            goto out; /* tokens are unique */
        lk->lease_next = NULL;
        if (l->held == NULL) {
            l->held = lk;
            lk->lease_prev = lk;
        } else {
            struct fsm_lock *tail = l->held->lease_prev;
            tail->lease_next = lk;
            lk->lease_prev = tail;
            l->held->lease_prev = lk;
        }
    }
    if (g->n_waiters > 0) {
        all = malloc(g->n_waiters * sizeof(*all));
        if (all == NULL) {
            rc = GW_FSM_ERR_NOMEM;
            goto out;
        }
        for (uint32_t i = 0; i < g->locks.n; i++)
            for (struct fsm_waiter *w = ((struct fsm_lock *)v[i])->q_head; w != NULL; w = w->q_next)
                all[n_all++] = w;
        qsort(all, n_all, sizeof(*all), cmp_waiter_id);
        for (size_t i = 0; i < n_all; i++) {
            struct fsm_waiter *w = all[i];
            if (i > 0 && all[i - 1]->id == w->id)
                goto out;
            if (w->lease_id == 0)
                continue;
            struct fsm_lease *l = fsm_lease_find(g, w->lease_id);
            w->lease_next = NULL;
            if (l->waiting == NULL) {
                l->waiting = w;
                w->lease_prev = w;
            } else {
                struct fsm_waiter *tail = l->waiting->lease_prev;
                tail->lease_next = w;
                w->lease_prev = tail;
                l->waiting->lease_prev = w;
            }
        }
    }

    count = (uint32_t)r_le(&r, 4);
    for (uint32_t i = 0; i < count && !r.bad; i++) {
        s = r_str8(&r, &n);
        int64_t value = (int64_t)r_le(&r, 8);
        if (r.bad || !gw_fsm_name_valid(s, n) || fsm_counter_find(g, s, n) != NULL)
            goto out;
        struct fsm_counter *c = malloc(sizeof(*c) + n + 1);
        if (c == NULL || htab_insert(&g->counters, fsm_hash_name(g, s, n), c) < 0) {
            free(c);
            rc = GW_FSM_ERR_NOMEM;
            goto out;
        }
        c->value = value;
        c->name_len = (uint8_t)n;
        memcpy(c->name, s, n);
        c->name[n] = '\0';
    }

    count = (uint32_t)r_le(&r, 4);
    for (uint32_t i = 0; i < count && !r.bad; i++) {
        s = r_str8(&r, &n);
        uint64_t version = r_le(&r, 8);
        size_t jl = (size_t)r_le(&r, 4);
        const char *js = r_bytes(&r, jl);
        if (r.bad || !gw_fsm_name_valid(s, n) || fsm_route_find(g, s, n) != NULL || jl == 0 ||
            version == 0 || version > g->route_version)
            goto out;
        struct fsm_route *rt = calloc(1, sizeof(*rt) + n + 1);
        char *json = malloc(jl + 1);
        if (rt == NULL || json == NULL || htab_insert(&g->routes, fsm_hash_name(g, s, n), rt) < 0) {
            free(rt);
            free(json);
            rc = GW_FSM_ERR_NOMEM;
            goto out;
        }
        memcpy(json, js, jl);
        json[jl] = '\0';
        rt->json = json;
        rt->json_len = (uint32_t)jl;
        rt->version = version;
        rt->name_len = (uint8_t)n;
        memcpy(rt->name, s, n);
    }

    count = (uint32_t)r_le(&r, 4);
    uint64_t prev_created = 0;
    for (uint32_t i = 0; i < count && !r.bad; i++) {
        uint8_t kind = (uint8_t)r_le(&r, 1);
        s = r_str8(&r, &n);
        uint64_t created = r_le(&r, 8), fp0 = r_le(&r, 8), fp1 = r_le(&r, 8);
        uint16_t status = (uint16_t)r_le(&r, 2);
        uint8_t code = (uint8_t)r_le(&r, 1), queued = (uint8_t)r_le(&r, 1);
        uint64_t waiter_id = r_le(&r, 8);
        size_t bl = (size_t)r_le(&r, 4);
        const char *body = r_bytes(&r, bl);
        if (r.bad || !gw_fsm_idem_key_valid(s, n) || fsm_idem_find(g, kind, s, n) != NULL ||
            code >= fsm_code_count() || queued > 1 || created < prev_created || created > g->time)
            goto out;
        prev_created = created;
        struct fsm_waiter *w = NULL;
        if (queued) {
            w = waiter_by_id(all, n_all, waiter_id);
            if (w == NULL || w->idem != NULL)
                goto out;
        }
        struct fsm_idem *rec = calloc(1, sizeof(*rec) + n + 1);
        char *b = malloc(bl + 1);
        if (rec == NULL || b == NULL || htab_insert(&g->idems, fsm_hash_idem(g, kind, s, n), rec) < 0) {
            free(rec);
            free(b);
            rc = GW_FSM_ERR_NOMEM;
            goto out;
        }
        rec->kind = kind;
        rec->key_len = (uint8_t)n;
        memcpy(rec->key, s, n);
        if (bl > 0)
            memcpy(b, body, bl);
        b[bl] = '\0';
        rec->body = b;
        rec->body_len = (uint32_t)bl;
        rec->created_at = created;
        rec->fp[0] = fp0;
        rec->fp[1] = fp1;
        rec->status = status;
        rec->code = code;
        rec->queued = queued != 0;
        rec->waiter_id = waiter_id;
        rec->waiter = w;
        if (w != NULL)
            w->idem = rec;
        rec->prev = g->idem_tail;
        if (g->idem_tail != NULL)
            g->idem_tail->next = rec;
        else
            g->idem_head = rec;
        g->idem_tail = rec;
    }
    if (img_version >= 2 && !r.bad) {
        rc = load_ext(g, &r);
        if (rc < 0)
            goto out;
        rc = GW_FSM_ERR_MALFORMED;
    }
    rc = (r.bad || r.left != 0) ? GW_FSM_ERR_MALFORMED : 0;
out:
    free(v);
    free(all);
    return rc;
}

int gw_fsm_restore(struct gw_fsm *f, const uint8_t *buf, size_t len)
{
    if (buf == NULL || len < 4 + 1 + 4 * 8 + 5 * 4 + 4)
        return GW_FSM_ERR_MALFORMED;
    if (memcmp(buf, magic, 4) != 0)
        return GW_FSM_ERR_MALFORMED;
    if (buf[4] != 1 && buf[4] != GW_FSM_SNAPSHOT_VERSION)
        return GW_FSM_ERR_UNSUPPORTED;
    uint32_t want = (uint32_t)buf[len - 4] | (uint32_t)buf[len - 3] << 8 | (uint32_t)buf[len - 2] << 16 |
                    (uint32_t)buf[len - 1] << 24;
    if (fsm_crc32(buf, len - 4) != want)
        return GW_FSM_ERR_MALFORMED;

    struct gw_fsm *g;
    int rc = gw_fsm_new(&f->cfg, &g);
    if (rc < 0)
        return rc;
    rc = load(g, buf, len);
    if (rc == 0 && g->leases.n > g->kill_cap) {
        /* An image from a machine with a larger lease bound: the kill list must hold them all. */
        struct fsm_lease **k = calloc(g->leases.n, sizeof(*k));
        if (k == NULL) {
            rc = GW_FSM_ERR_NOMEM;
        } else {
            free(g->kill);
            g->kill = k;
            g->kill_cap = g->leases.n;
        }
    }
    if (rc < 0) {
        gw_fsm_free(g);
        return rc;
    }
    /* Swap the new state in; the old one goes with g. */
    struct gw_fsm tmp = *f;
    *f = *g;
    *g = tmp;
    /* Local counters stay with the process. */
    f->idem_evicted = g->idem_evicted;
    gw_fsm_free(g);
    return 0;
}
