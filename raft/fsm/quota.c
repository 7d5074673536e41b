/*
 * quota.c - the cluster limiter's quota leasing and the gateway's replicated idempotency records.
 *
 * Quotas (after Google's Doorman): a node asks QUOTA_ACQUIRE for n tokens (token bucket) or
 * window slots (sliding window) of one limiter, gets g <= n, spends them locally before the
 * grant's deadline (t + lease_ms) and hands back what it did not spend with QUOTA_RELEASE. The
 * machine keeps, per limiter, the unallotted budget and the live grants, and accounts every
 * granted unit as spent at the worst moment it could be, so the cluster never admits more than
 * the limit whatever the nodes do with their grants (README.md "Quota leasing" has the proofs).
 *
 * Gateway idempotency: IDEM_BEGIN claims (route, key) linearizably (claim id = its index) or
 * answers in flight / mismatch / replay; IDEM_FINISH stores the response or releases the claim.
 * Completed records expire ttl_ms after completion; an in-flight claim after max(ttl_ms, 10 min)
 * so a claim whose node died cannot hold its key forever. Expiry is lazy (a record met expired is
 * dropped) plus a bounded sweep: each IDEM command examines a few records at the head of a ring
 * and drops or rotates them, so every record is examined again and again at a bounded cost.
 *
 * Everything depends only on the entry (t, index, fields), never on table layout.
 */
#include "fsm_int.h"

#include <stdlib.h>
#include <string.h>

#include "sliding_window.h"
#include "token_bucket.h"

#define NANO UINT64_C(1000000000)
#define SWEEP_EVERY_MS 1000 /* a full sweep of idle quotas, when the table is full, at most this often */
#define GWIDEM_SWEEP_STEP 4 /* records examined per IDEM command */
#define GWIDEM_TTL_MAX_MS (30ull * 24 * 3600 * 1000)
#define PAST_MAX 256 /* sliding window: ended grants kept as (until, count), coalesced */

static uint64_t add_sat(uint64_t a, uint64_t b)
{
    return a > UINT64_MAX - b ? UINT64_MAX : a + b;
}

static uint64_t ms_to_ns(uint64_t ms)
{
    return ms > UINT64_MAX / 1000000 ? UINT64_MAX : ms * 1000000;
}

bool fsm_printable(const char *s, size_t len, size_t max)
{
    if (s == NULL || len == 0 || len > max)
        return false;
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)s[i] < 0x20 || (unsigned char)s[i] > 0x7e)
            return false;
    return true;
}

/* ---- Tables -------------------------------------------------------------------------------- */

uint64_t fsm_quota_hash(const struct gw_fsm *f, const char *id, size_t len)
{
    return gw_siphash(&f->hkey, 1, 3, id, len) ^ 0x51u;
}

struct fsm_quota *fsm_quota_find(const struct gw_fsm *f, const char *id, size_t len)
{
    const struct htab *t = &f->quotas;
    if (t->cap == 0 || len > GW_FSM_MAX_QUOTA_ID)
        return NULL;
    uint64_t h = fsm_quota_hash(f, id, len);
    for (uint32_t i = (uint32_t)h & (t->cap - 1); t->slots[i].p != NULL; i = (i + 1) & (t->cap - 1)) {
        struct fsm_quota *q = t->slots[i].p;
        if (t->slots[i].h == h && q->id_len == len && memcmp(q->id, id, len) == 0)
            return q;
    }
    return NULL;
}

int fsm_cmp_quota(const void *a, const void *b)
{
    const struct fsm_quota *x = *(const struct fsm_quota *const *)a, *y = *(const struct fsm_quota *const *)b;
    size_t n = x->id_len < y->id_len ? x->id_len : y->id_len;
    int c = memcmp(x->id, y->id, n);
    if (c != 0)
        return c;
    return x->id_len < y->id_len ? -1 : x->id_len > y->id_len;
}

uint64_t fsm_gwidem_hash(const struct gw_fsm *f, const char *route, size_t rl, const char *key, size_t kl)
{
    char buf[1 + 255 + 255];
    size_t n = 0;
    buf[n++] = (char)rl;
    memcpy(buf + n, route, rl);
    n += rl;
    memcpy(buf + n, key, kl);
    n += kl;
    return gw_siphash(&f->hkey, 1, 3, buf, n) ^ 0x64u;
}

struct fsm_gwidem *fsm_gwidem_find(const struct gw_fsm *f, const char *route, size_t rl, const char *key,
                                   size_t kl)
{
    const struct htab *t = &f->gwidems;
    if (t->cap == 0 || rl > 255 || kl > 255)
        return NULL;
    uint64_t h = fsm_gwidem_hash(f, route, rl, key, kl);
    for (uint32_t i = (uint32_t)h & (t->cap - 1); t->slots[i].p != NULL; i = (i + 1) & (t->cap - 1)) {
        struct fsm_gwidem *r = t->slots[i].p;
        if (t->slots[i].h == h && r->route_len == rl && r->key_len == kl && memcmp(r->name, route, rl) == 0 &&
            memcmp(r->name + rl, key, kl) == 0)
            return r;
    }
    return NULL;
}

void fsm_gwidem_link_tail(struct gw_fsm *f, struct fsm_gwidem *r)
{
    r->next = NULL;
    r->prev = f->gw_tail;
    if (f->gw_tail != NULL)
        f->gw_tail->next = r;
    else
        f->gw_head = r;
    f->gw_tail = r;
}

static void gwidem_unlink(struct gw_fsm *f, struct fsm_gwidem *r)
{
    if (r->prev != NULL)
        r->prev->next = r->next;
    else
        f->gw_head = r->next;
    if (r->next != NULL)
        r->next->prev = r->prev;
    else
        f->gw_tail = r->prev;
    r->prev = r->next = NULL;
}

static void gwidem_drop(struct gw_fsm *f, struct fsm_gwidem *r)
{
    htab_remove(&f->gwidems, fsm_gwidem_hash(f, r->name, r->route_len, r->name + r->route_len, r->key_len), r);
    gwidem_unlink(f, r);
    f->gw_bytes -= r->bytes;
    free(r->resp);
    free(r);
}

static void quota_drop(struct gw_fsm *f, struct fsm_quota *q)
{
    htab_remove(&f->quotas, fsm_quota_hash(f, q->id, q->id_len), q);
    free(q->grants);
    free(q->past);
    free(q);
}

void fsm_ext_clear(struct gw_fsm *f)
{
    for (uint32_t i = 0; i < f->quotas.cap; i++) {
        struct fsm_quota *q = f->quotas.slots[i].p;
        if (q != NULL) {
            free(q->grants);
            free(q->past);
            free(q);
        }
    }
    htab_free(&f->quotas);
    for (struct fsm_gwidem *r = f->gw_head, *next; r != NULL; r = next) {
        next = r->next;
        free(r->resp);
        free(r);
    }
    htab_free(&f->gwidems);
    f->gw_head = f->gw_tail = NULL;
    f->gw_bytes = 0;
    f->quota_sweep_at = 0;
}

/* ---- Quota state ------------------------------------------------------------------------------ */

static void grant_remove(struct fsm_quota *q, uint32_t i)
{
    q->outstanding -= q->grants[i].count;
    memmove(&q->grants[i], &q->grants[i + 1], (q->n_grants - i - 1) * sizeof(q->grants[0]));
    q->n_grants--;
}

/* The bucket's ceiling while grants are out: B + outstanding never exceeds capacity. */
static void tb_refill_to(struct fsm_quota *q, uint64_t ns)
{
    uint64_t cap = q->a > q->outstanding ? q->a - q->outstanding : 0;
    if (cap == 0) {
        q->nanotokens = 0;
        if (ns > q->updated_ns)
            q->updated_ns = ns;
        return;
    }
    struct gw_token_bucket b = {q->nanotokens, q->updated_ns};
    struct gw_token_bucket_config cfg = {cap, q->b};
    if (b.nanotokens > cap * NANO)
        b.nanotokens = cap * NANO;
    (void)gw_token_bucket_available(&b, &cfg, ns);
    q->nanotokens = b.nanotokens;
    if (b.updated_ns > q->updated_ns)
        q->updated_ns = b.updated_ns;
}

/*
 * Keeps count slots of an ended grant in the window until `until` (rounded up to 1/200 of the
 * window so entries coalesce: at most 0.5 % of the window later than exact). When the table is full the slots join an entry that ends later
 * (or the last one is extended): holding slots longer is always safe.
 */
static int past_add(struct fsm_quota *q, uint64_t until, uint64_t count)
{
    uint64_t gran = q->b / 200 ? q->b / 200 : 1;
    if (until % gran != 0)
        until = add_sat(until, gran - until % gran);
    uint32_t i = 0;
    while (i < q->n_past && q->past[i].until < until)
        i++;
    q->past_total += count;
    if (i < q->n_past && q->past[i].until == until) {
        q->past[i].count += count;
        return 0;
    }
    if (q->n_past >= PAST_MAX) {
        if (i < q->n_past) {
            q->past[i].count += count;
        } else {
            q->past[q->n_past - 1].until = until;
            q->past[q->n_past - 1].count += count;
        }
        return 0;
    }
    if (q->n_past == q->cap_past) {
        uint32_t ncap = q->cap_past ? q->cap_past * 2 : 8;
        struct fsm_past *np = realloc(q->past, ncap * sizeof(*np));
        if (np == NULL)
            return GW_FSM_ERR_NOMEM;
        q->past = np;
        q->cap_past = ncap;
    }
    memmove(&q->past[i + 1], &q->past[i], (q->n_past - i) * sizeof(q->past[0]));
    q->past[i].until = until;
    q->past[i].count = count;
    q->n_past++;
    return 0;
}

/*
 * Brings the limiter to fsm time t. Token bucket: refills piecewise, each grant's units coming
 * back under the ceiling only from its deadline on (so the refill never outruns what a single
 * bucket would have had). Sliding window: a grant whose lease ended keeps its slots (as a past
 * entry) until deadline + window; past entries leave when that passes.
 */
static int quota_advance(struct fsm_quota *q, uint64_t t)
{
    if (q->kind == GW_FSM_QUOTA_TOKEN_BUCKET) {
        /* Grants are kept in deadline order: the first ones end first. */
        while (q->n_grants > 0 && q->grants[0].deadline <= t) {
            tb_refill_to(q, ms_to_ns(q->grants[0].deadline));
            grant_remove(q, 0);
        }
        tb_refill_to(q, ms_to_ns(t));
        return 0;
    }
    while (q->n_grants > 0 && q->grants[0].deadline <= t) {
        if (past_add(q, add_sat(q->grants[0].deadline, q->b), q->grants[0].count) < 0)
            return GW_FSM_ERR_NOMEM;
        grant_remove(q, 0);
    }
    uint32_t k = 0;
    while (k < q->n_past && q->past[k].until <= t)
        q->past_total -= q->past[k++].count;
    if (k > 0) {
        memmove(&q->past[0], &q->past[k], (q->n_past - k) * sizeof(q->past[0]));
        q->n_past -= k;
    }
    return 0;
}

/* Sliding window: slots counted in the window (live grants and ended ones). */
static uint64_t sw_occupied(const struct fsm_quota *q)
{
    return q->outstanding + q->past_total;
}

/* Equivalent to a limiter never used (so it may be forgotten): no grants, bucket full. */
static bool quota_fresh(const struct fsm_quota *q)
{
    if (q->n_grants != 0 || q->n_past != 0)
        return false;
    return q->kind == GW_FSM_QUOTA_SLIDING_WINDOW || q->nanotokens == q->a * NANO;
}

/* Units still spendable by nodes at t (grants whose deadline has not passed). */
static uint64_t quota_live(const struct fsm_quota *q, uint64_t t)
{
    uint64_t n = 0;
    for (uint32_t i = 0; i < q->n_grants; i++)
        if (q->grants[i].deadline > t)
            n += q->grants[i].count;
    return n;
}

/* The cluster-wide remaining: unallotted budget plus what nodes hold and may still spend. */
static uint64_t quota_remaining(const struct fsm_quota *q, uint64_t t)
{
    if (q->kind == GW_FSM_QUOTA_TOKEN_BUCKET)
        return q->nanotokens / NANO + quota_live(q, t);
    uint64_t occ = sw_occupied(q);
    uint64_t free_slots = q->a > occ ? q->a - occ : 0;
    return free_slots + quota_live(q, t);
}

static uint64_t ns_to_ms_ceil(uint64_t ns)
{
    return ns / 1000000 + (ns % 1000000 != 0);
}

/* next_ms: until one more unit can be granted; reset_ms: until the budget is whole again. */
static void quota_times(const struct fsm_quota *q, uint64_t t, uint64_t *next_ms, uint64_t *reset_ms)
{
    if (q->kind == GW_FSM_QUOTA_TOKEN_BUCKET) {
        uint64_t full = q->a * NANO;
        uint64_t have = q->nanotokens + q->outstanding * NANO;
        uint64_t miss = have < full ? full - have : 0;
        *reset_ms = ns_to_ms_ceil(miss / q->b + (miss % q->b != 0));
        if (q->nanotokens >= NANO) {
            *next_ms = 0;
        } else if (q->a > q->outstanding) {
            uint64_t m = NANO - q->nanotokens;
            *next_ms = ns_to_ms_ceil(m / q->b + (m % q->b != 0));
        } else {
            uint64_t first = q->n_grants ? q->grants[0].deadline : t;
            *next_ms = (first > t ? first - t : 0) + (1000 + q->b - 1) / q->b;
        }
        return;
    }
    uint64_t first = UINT64_MAX, last = t;
    for (uint32_t i = 0; i < q->n_grants; i++) {
        uint64_t until = add_sat(q->grants[i].deadline, q->b);
        if (until < first)
            first = until;
        if (until > last)
            last = until;
    }
    if (q->n_past > 0) {
        if (q->past[0].until < first)
            first = q->past[0].until;
        if (q->past[q->n_past - 1].until > last)
            last = q->past[q->n_past - 1].until;
    }
    *next_ms = sw_occupied(q) < q->a ? 0 : (first == UINT64_MAX || first < t ? 0 : first - t);
    *reset_ms = last - t;
}

static void put_quota_body(struct gw_fsm_result *res, const struct fsm_quota *q, uint64_t t)
{
    uint64_t next_ms, reset_ms;
    quota_times(q, t, &next_ms, &reset_ms);
    if (q->n_grants >= GW_FSM_QUOTA_GRANTS_MAX && q->grants[0].deadline > t &&
        q->grants[0].deadline - t > next_ms)
        next_ms = q->grants[0].deadline - t; /* no grant before the first live one ends */
    fsm_out_str(res, ",");
    fsm_out_key(res, "remaining");
    fsm_out_u64(res, quota_remaining(q, t));
    fsm_out_str(res, ",");
    fsm_out_key(res, "next_ms");
    fsm_out_u64(res, next_ms);
    fsm_out_str(res, ",");
    fsm_out_key(res, "reset_ms");
    fsm_out_u64(res, reset_ms);
    fsm_out_str(res, "}");
}

/* Forgets every idle limiter (same state as a new one) when the table is full; deterministic
 * because the set removed does not depend on the walk order. */
static int quota_sweep(struct gw_fsm *f, uint64_t t)
{
    if (f->quotas.n < f->cfg.max_quotas || (f->quota_sweep_at != 0 && t - f->quota_sweep_at < SWEEP_EVERY_MS))
        return 0;
    f->quota_sweep_at = t;
    for (uint32_t i = 0; i < f->quotas.cap;) {
        struct fsm_quota *q = f->quotas.slots[i].p;
        if (q != NULL) {
            if (quota_advance(q, t) < 0)
                return GW_FSM_ERR_NOMEM;
            if (quota_fresh(q)) {
                quota_drop(f, q); /* backward shift may move another entry into slot i */
                continue;
            }
        }
        i++;
    }
    return 0;
}

static bool quota_config_ok(uint8_t kind, uint64_t a, uint64_t b)
{
    if (kind == GW_FSM_QUOTA_TOKEN_BUCKET) {
        struct gw_token_bucket_config c = {a, b};
        return gw_token_bucket_config_check(&c) == 0;
    }
    if (kind == GW_FSM_QUOTA_SLIDING_WINDOW) {
        struct gw_sliding_window_config c = {a, b, 0};
        return gw_sliding_window_config_check(&c) == 0;
    }
    return false;
}

static int do_quota_acquire(struct gw_fsm *f, const struct gw_fsm_cmd *c, uint64_t index, uint64_t t,
                            struct gw_fsm_result *res)
{
    if (!fsm_printable(c->name, c->name_len, GW_FSM_MAX_QUOTA_ID)) {
        fsm_out_fail(res, 400, FSM_OUT_INVALID_NAME, "limiter ids are 1 to 255 printable characters");
        return 0;
    }
    if (!fsm_printable(c->owner, c->owner_len, GW_FSM_MAX_NODE)) {
        fsm_out_fail_field(res, "node", "node names are 1 to 63 printable characters");
        return 0;
    }
    if (!quota_config_ok(c->quota_kind, c->quota_a, c->quota_b)) {
        fsm_out_fail_field(res, "config", "not a valid token bucket or sliding window configuration");
        return 0;
    }
    if (c->count == 0 || c->count > GW_FSM_QUOTA_COUNT_MAX) {
        fsm_out_fail_field(res, "count", "count must be an integer from 1 to 1000000");
        return 0;
    }
    if (c->ttl_ms == 0 || c->ttl_ms > GW_FSM_QUOTA_LEASE_MAX_MS) {
        fsm_out_fail_field(res, "lease_ms", "lease_ms must be an integer from 1 to 60000");
        return 0;
    }
    struct fsm_quota *q = fsm_quota_find(f, c->name, c->name_len);
    if (q == NULL) {
        if (quota_sweep(f, t) < 0)
            return GW_FSM_ERR_NOMEM;
        if (f->quotas.n >= f->cfg.max_quotas) {
            fsm_out_fail(res, 503, FSM_OUT_TOO_MANY_QUOTAS, "the cluster limiter table is full");
            return 0;
        }
        q = calloc(1, sizeof(*q));
        if (q == NULL)
            return GW_FSM_ERR_NOMEM;
        q->kind = c->quota_kind;
        q->a = c->quota_a;
        q->b = c->quota_b;
        q->nanotokens = q->kind == GW_FSM_QUOTA_TOKEN_BUCKET ? q->a * NANO : 0;
        q->updated_ns = ms_to_ns(t);
        q->id_len = (uint8_t)c->name_len;
        memcpy(q->id, c->name, c->name_len);
        if (htab_insert(&f->quotas, fsm_quota_hash(f, q->id, q->id_len), q) < 0) {
            free(q);
            return GW_FSM_ERR_NOMEM;
        }
    } else if (q->kind != c->quota_kind || q->a != c->quota_a || q->b != c->quota_b) {
        /* A changed policy: bring the old state up to t, then adopt the new configuration,
         * keeping the grants (they were made under the old limit and are still counted). */
        if (quota_advance(q, t) < 0)
            return GW_FSM_ERR_NOMEM;
        if (q->kind != c->quota_kind) {
            q->kind = c->quota_kind;
            q->nanotokens = 0; /* the new limiter starts empty, its grants still out */
            q->n_past = 0;
            q->past_total = 0;
        }
        q->a = c->quota_a;
        q->b = c->quota_b;
        if (q->kind == GW_FSM_QUOTA_TOKEN_BUCKET) {
            uint64_t cap = q->a > q->outstanding ? q->a - q->outstanding : 0;
            if (q->nanotokens > cap * NANO)
                q->nanotokens = cap * NANO;
        }
    }
    if (quota_advance(q, t) < 0)
        return GW_FSM_ERR_NOMEM;
    uint64_t g;
    if (q->kind == GW_FSM_QUOTA_TOKEN_BUCKET)
        g = q->nanotokens / NANO;
    else
        g = q->a > sw_occupied(q) ? q->a - sw_occupied(q) : 0;
    if (g > c->count)
        g = c->count;
    if (q->n_grants >= GW_FSM_QUOTA_GRANTS_MAX)
        g = 0;
    if (g > 0) {
        if (q->n_grants == q->cap_grants) {
            uint32_t ncap = q->cap_grants ? q->cap_grants * 2 : 4;
            struct fsm_grant *ng = realloc(q->grants, ncap * sizeof(*ng));
            if (ng == NULL)
                return GW_FSM_ERR_NOMEM;
            q->grants = ng;
            q->cap_grants = ncap;
        }
        /* Keep deadline order (a later command may carry a shorter lease). */
        uint64_t deadline = add_sat(t, c->ttl_ms);
        uint32_t pos = q->n_grants;
        while (pos > 0 && q->grants[pos - 1].deadline > deadline)
            pos--;
        memmove(&q->grants[pos + 1], &q->grants[pos], (q->n_grants - pos) * sizeof(q->grants[0]));
        q->n_grants++;
        struct fsm_grant *gr = &q->grants[pos];
        memset(gr, 0, sizeof(*gr));
        gr->id = index;
        gr->count = g;
        gr->deadline = deadline;
        gr->node_len = (uint8_t)c->owner_len;
        memcpy(gr->node, c->owner, c->owner_len);
        q->outstanding += g;
        if (q->kind == GW_FSM_QUOTA_TOKEN_BUCKET)
            q->nanotokens -= g * NANO;
    }
    fsm_out_begin(res, 200);
    fsm_out_str(res, "{");
    fsm_out_key(res, "granted");
    fsm_out_u64(res, g);
    fsm_out_str(res, ",");
    fsm_out_key(res, "grant");
    fsm_out_str(res, "\"");
    fsm_out_u64(res, g > 0 ? index : 0);
    fsm_out_str(res, "\",");
    fsm_out_key(res, "lease_ms");
    fsm_out_u64(res, c->ttl_ms);
    put_quota_body(res, q, t);
    fsm_out_end(res);
    return 0;
}

static int do_quota_release(struct gw_fsm *f, const struct gw_fsm_cmd *c, uint64_t t, struct gw_fsm_result *res)
{
    if (!fsm_printable(c->name, c->name_len, GW_FSM_MAX_QUOTA_ID)) {
        fsm_out_fail(res, 400, FSM_OUT_INVALID_NAME, "limiter ids are 1 to 255 printable characters");
        return 0;
    }
    struct fsm_quota *q = fsm_quota_find(f, c->name, c->name_len);
    uint64_t k = 0;
    if (q != NULL) {
        if (quota_advance(q, t) < 0)
            return GW_FSM_ERR_NOMEM;
        for (uint32_t i = 0; i < q->n_grants; i++) {
            struct fsm_grant *gr = &q->grants[i];
            if (gr->id != c->grant_id)
                continue;
            /* Only the holder returns units, and only while it could still have spent them. */
            if (gr->node_len != c->owner_len || memcmp(gr->node, c->owner, c->owner_len) != 0 ||
                gr->deadline <= t)
                break;
            k = c->count < gr->count ? c->count : gr->count;
            gr->count -= k;
            q->outstanding -= k;
            if (q->kind == GW_FSM_QUOTA_TOKEN_BUCKET)
                q->nanotokens += k * NANO; /* B + outstanding is unchanged: still <= capacity */
            if (gr->count == 0)
                grant_remove(q, i);
            break;
        }
    }
    fsm_out_begin(res, 200);
    fsm_out_str(res, "{");
    fsm_out_key(res, "released");
    fsm_out_u64(res, k);
    if (q != NULL) {
        put_quota_body(res, q, t);
        if (quota_fresh(q))
            quota_drop(f, q);
    } else {
        fsm_out_str(res, "}");
    }
    fsm_out_end(res);
    return 0;
}

int fsm_quota_apply(struct gw_fsm *f, const struct gw_fsm_cmd *c, uint64_t index, uint64_t t,
                    struct gw_fsm_result *res)
{
    if (c->kind == GW_FSM_QUOTA_ACQUIRE)
        return do_quota_acquire(f, c, index, t, res);
    return do_quota_release(f, c, t, res);
}

/* ---- Gateway idempotency records ------------------------------------------------------------- */

static void put_b64(struct gw_fsm_result *res, const uint8_t *p, size_t n)
{
    static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    char out[4];
    fsm_out_str(res, "\"");
    size_t i = 0;
    for (; i + 3 <= n; i += 3) {
        uint32_t v = (uint32_t)p[i] << 16 | (uint32_t)p[i + 1] << 8 | p[i + 2];
        out[0] = tab[v >> 18];
        out[1] = tab[(v >> 12) & 63];
        out[2] = tab[(v >> 6) & 63];
        out[3] = tab[v & 63];
        fsm_out_put(res, out, 4);
    }
    if (n - i == 1) {
        uint32_t v = (uint32_t)p[i] << 16;
        out[0] = tab[v >> 18];
        out[1] = tab[(v >> 12) & 63];
        out[2] = out[3] = '=';
        fsm_out_put(res, out, 4);
    } else if (n - i == 2) {
        uint32_t v = (uint32_t)p[i] << 16 | (uint32_t)p[i + 1] << 8;
        out[0] = tab[v >> 18];
        out[1] = tab[(v >> 12) & 63];
        out[2] = tab[(v >> 6) & 63];
        out[3] = '=';
        fsm_out_put(res, out, 4);
    }
    fsm_out_str(res, "\"");
}

static void gwidem_sweep(struct gw_fsm *f, uint64_t t)
{
    for (int i = 0; i < GWIDEM_SWEEP_STEP && f->gw_head != NULL; i++) {
        struct fsm_gwidem *r = f->gw_head;
        if (r->deadline <= t) {
            gwidem_drop(f, r);
        } else if (r != f->gw_tail) {
            gwidem_unlink(f, r);
            fsm_gwidem_link_tail(f, r);
        }
    }
}

static void decision(struct gw_fsm_result *res, const char *d)
{
    fsm_out_begin(res, 200);
    fsm_out_str(res, "{\"decision\":\"");
    fsm_out_str(res, d);
    fsm_out_str(res, "\"}");
    fsm_out_end(res);
}

static bool gwidem_names_ok(const struct gw_fsm_cmd *c, struct gw_fsm_result *res)
{
    if (!fsm_printable(c->name, c->name_len, GW_FSM_GWIDEM_MAX_ROUTE)) {
        fsm_out_fail_field(res, "route", "routes are 1 to 200 printable characters");
        return false;
    }
    if (!gw_fsm_idem_key_valid(c->key, c->key_len)) {
        fsm_out_fail_field(res, "key", "idempotency keys are 1 to 255 printable characters");
        return false;
    }
    return true;
}

static int do_idem_begin(struct gw_fsm *f, const struct gw_fsm_cmd *c, uint64_t index, uint64_t t,
                         struct gw_fsm_result *res)
{
    if (!gwidem_names_ok(c, res))
        return 0;
    if (!fsm_printable(c->owner, c->owner_len, GW_FSM_MAX_NODE)) {
        fsm_out_fail_field(res, "node", "node names are 1 to 63 printable characters");
        return 0;
    }
    if (c->ttl_ms == 0 || c->ttl_ms > GWIDEM_TTL_MAX_MS) {
        fsm_out_fail_field(res, "ttl_ms", "ttl_ms must be an integer from 1 to 2592000000");
        return 0;
    }
    struct fsm_gwidem *r = fsm_gwidem_find(f, c->name, c->name_len, c->key, c->key_len);
    if (r != NULL && r->deadline <= t) {
        gwidem_drop(f, r);
        r = NULL;
    }
    gwidem_sweep(f, t);
    if (r != NULL) {
        if (r->fp[0] != c->fp_hi || r->fp[1] != c->fp_lo) {
            decision(res, "mismatch");
        } else if (!r->completed) {
            decision(res, "in_flight");
        } else {
            fsm_out_begin(res, 200);
            fsm_out_str(res, "{\"decision\":\"replay\",\"status\":");
            fsm_out_u64(res, r->status);
            fsm_out_str(res, ",\"headers\":");
            put_b64(res, r->resp, r->headers_len);
            fsm_out_str(res, ",\"body\":");
            put_b64(res, r->resp + r->headers_len, r->body_len);
            fsm_out_str(res, "}");
            fsm_out_end(res);
        }
        return 0;
    }
    uint64_t bytes = FSM_GWIDEM_OVERHEAD + c->name_len + c->key_len;
    if (f->gwidems.n >= f->cfg.max_gwidem_records || f->gw_bytes + bytes > f->cfg.max_gwidem_bytes) {
        fsm_out_fail(res, 503, FSM_OUT_TOO_MANY_RECORDS, "the idempotency record store is full");
        return 0;
    }
    r = calloc(1, sizeof(*r) + c->name_len + c->key_len);
    if (r == NULL)
        return GW_FSM_ERR_NOMEM;
    r->route_len = (uint8_t)c->name_len;
    r->key_len = (uint8_t)c->key_len;
    memcpy(r->name, c->name, c->name_len);
    memcpy(r->name + c->name_len, c->key, c->key_len);
    r->node_len = (uint8_t)c->owner_len;
    memcpy(r->node, c->owner, c->owner_len);
    r->claim = index;
    r->fp[0] = c->fp_hi;
    r->fp[1] = c->fp_lo;
    r->deadline = add_sat(t, c->ttl_ms > GW_FSM_GWIDEM_SAFETY_MS ? c->ttl_ms : GW_FSM_GWIDEM_SAFETY_MS);
    r->bytes = bytes;
    if (htab_insert(&f->gwidems, fsm_gwidem_hash(f, c->name, c->name_len, c->key, c->key_len), r) < 0) {
        free(r);
        return GW_FSM_ERR_NOMEM;
    }
    fsm_gwidem_link_tail(f, r);
    f->gw_bytes += bytes;
    fsm_out_begin(res, 200);
    fsm_out_str(res, "{\"decision\":\"execute\",\"claim\":\"");
    fsm_out_u64(res, index);
    fsm_out_str(res, "\"}");
    fsm_out_end(res);
    return 0;
}

static void finish_result(struct gw_fsm_result *res, const char *what)
{
    fsm_out_begin(res, 200);
    fsm_out_str(res, "{\"result\":\"");
    fsm_out_str(res, what);
    fsm_out_str(res, "\"}");
    fsm_out_end(res);
}

static int do_idem_finish(struct gw_fsm *f, const struct gw_fsm_cmd *c, uint64_t t, struct gw_fsm_result *res)
{
    if (!gwidem_names_ok(c, res))
        return 0;
    gwidem_sweep(f, t);
    struct fsm_gwidem *r = fsm_gwidem_find(f, c->name, c->name_len, c->key, c->key_len);
    if (r == NULL || r->completed || r->claim != c->claim_id || r->deadline <= t) {
        if (r != NULL && r->deadline <= t)
            gwidem_drop(f, r);
        finish_result(res, "stale");
        return 0;
    }
    if (!c->store) {
        gwidem_drop(f, r);
        finish_result(res, "released");
        return 0;
    }
    uint64_t more = (uint64_t)c->headers_len + c->body_len;
    if (c->ttl_ms == 0 || c->ttl_ms > GWIDEM_TTL_MAX_MS || more > f->cfg.max_gwidem_response ||
        f->gw_bytes + more > f->cfg.max_gwidem_bytes) {
        gwidem_drop(f, r);
        finish_result(res, "too_large");
        return 0;
    }
    uint8_t *p = malloc(more ? more : 1);
    if (p == NULL)
        return GW_FSM_ERR_NOMEM;
    if (c->headers_len)
        memcpy(p, c->headers, c->headers_len);
    if (c->body_len)
        memcpy(p + c->headers_len, c->body, c->body_len);
    r->resp = p;
    r->headers_len = (uint32_t)c->headers_len;
    r->body_len = (uint32_t)c->body_len;
    r->status = c->status;
    r->completed = true;
    r->deadline = add_sat(t, c->ttl_ms);
    r->bytes += more;
    f->gw_bytes += more;
    gwidem_unlink(f, r);
    fsm_gwidem_link_tail(f, r);
    finish_result(res, "stored");
    return 0;
}

int fsm_gwidem_apply(struct gw_fsm *f, const struct gw_fsm_cmd *c, uint64_t index, uint64_t t,
                     struct gw_fsm_result *res)
{
    if (c->kind == GW_FSM_IDEM_BEGIN)
        return do_idem_begin(f, c, index, t, res);
    return do_idem_finish(f, c, t, res);
}
