/*
 * fsm.c - applying commands and answering reads for the coordination state machine.
 *
 * Determinism is the whole point: every replica applies the same entries and must reach the same
 * state and the same results. So apply reads time only from the entry (t = max(fsm time, now_ms)),
 * takes ids from the log index, never walks a hash table where order could show (table layout
 * depends on the node-local hash key), and keeps the two lists whose order matters sorted by
 * construction: a lease's held locks in token order (granted in that order; restore sorts) and its
 * waiters in id order (ids are increasing log indexes).
 *
 * Expiry is lazy as well as proposed: whenever a command meets a lease that is overdue at t it
 * expires it first, exactly as a committed LEASE_EXPIRE at that point would. Expiring a lease
 * drops its waiters (their requests get 404 lease_not_found), releases its locks in token order
 * and grants each to the first waiter whose lease is still alive at t; a waiter met with an
 * overdue lease is dropped and that lease joins the kill list, which is drained iteratively (no
 * recursion however long the chain).
 */
#include "fsm_int.h"

#include <stdlib.h>
#include <string.h>

/* ---- Error codes of result bodies ---------------------------------------------------------- */

enum {
    C_NONE,
    C_INVALID_COMMAND,
    C_INVALID_FIELD,
    C_INVALID_NAME,
    C_LEASE_NOT_FOUND,
    C_LOCK_HELD,
    C_LOCK_NOT_HELD,
    C_LOCK_NOT_FOUND,
    C_WAITER_NOT_FOUND,
    C_CAS_FAILED,
    C_ROUTE_NOT_FOUND,
    C_TOO_MANY_LEASES,
    C_TOO_MANY_LOCKS,
    C_TOO_MANY_WAITERS,
    C_TOO_MANY_COUNTERS,
    C_TOO_MANY_ROUTES,
    C_IDEM_INVALID,
    C_IDEM_MISMATCH,
    C_TOO_MANY_QUOTAS,
    C_TOO_MANY_RECORDS,
    C_COUNT
};

static const char *const code_names[C_COUNT] = {
    NULL,
    "invalid_command",
    "invalid_field",
    "invalid_name",
    "lease_not_found",
    "lock_held",
    "lock_not_held",
    "lock_not_found",
    "waiter_not_found",
    "cas_failed",
    "route_not_found",
    "too_many_leases",
    "too_many_locks",
    "too_many_waiters",
    "too_many_counters",
    "too_many_routes",
    "idempotency_key_invalid",
    "idempotency_key_mismatch",
    "too_many_quotas",
    "too_many_records",
};

uint8_t fsm_code_count(void)
{
    return C_COUNT;
}

/* ---- Configuration, lifetime --------------------------------------------------------------- */

void gw_fsm_config_default(struct gw_fsm_config *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->max_leases = 65536;
    cfg->max_locks = 65536;
    cfg->max_waiters_per_lock = 1024;
    cfg->max_waiters = 65536;
    cfg->max_counters = 65536;
    cfg->max_routes = 1024;
    cfg->max_route_bytes = 65536;
    cfg->max_idem_records = 65536;
    cfg->idem_ttl_ms = 24ull * 3600 * 1000;
    cfg->max_quotas = 65536;
    cfg->max_gwidem_records = 65536;
    cfg->max_gwidem_bytes = 256ull << 20;
    cfg->max_gwidem_response = 1u << 20;
}

int gw_fsm_new(const struct gw_fsm_config *cfg, struct gw_fsm **out)
{
    if (cfg == NULL || out == NULL || cfg->max_leases == 0 || cfg->max_locks == 0 ||
        cfg->max_waiters_per_lock == 0 || cfg->max_waiters == 0 || cfg->max_counters == 0 ||
        cfg->max_routes == 0 || cfg->max_route_bytes == 0 || cfg->max_idem_records == 0 ||
        cfg->idem_ttl_ms == 0 || cfg->max_leases > (1u << 28) || cfg->max_quotas == 0 ||
        cfg->max_quotas > (1u << 28) || cfg->max_gwidem_records == 0 ||
        cfg->max_gwidem_records > (1u << 28) || cfg->max_gwidem_bytes == 0)
        return GW_FSM_ERR_INVALID;
    struct gw_fsm *f = calloc(1, sizeof(*f));
    if (f == NULL)
        return GW_FSM_ERR_NOMEM;
    f->cfg = *cfg;
    f->hkey.k0 = cfg->hash_k0;
    f->hkey.k1 = cfg->hash_k1;
    /* The kill list can hold every lease at once, so draining it never allocates. */
    f->kill_cap = cfg->max_leases;
    f->kill = calloc(f->kill_cap, sizeof(*f->kill));
    if (f->kill == NULL) {
        free(f);
        return GW_FSM_ERR_NOMEM;
    }
    *out = f;
    return 0;
}

void gw_fsm_free(struct gw_fsm *f)
{
    if (f == NULL)
        return;
    fsm_clear(f);
    free(f->kill);
    free(f);
}

/* ---- Hash tables ------------------------------------------------------------------------- */

uint64_t fsm_hash_name(const struct gw_fsm *f, const char *name, size_t len)
{
    return gw_siphash(&f->hkey, 1, 3, name, len);
}

uint64_t fsm_hash_id(uint64_t id)
{
    /* splitmix64's finaliser: ids are log indexes, not chosen by clients. */
    uint64_t z = id + 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

uint64_t fsm_hash_idem(const struct gw_fsm *f, uint8_t kind, const char *key, size_t len)
{
    return gw_siphash(&f->hkey, 1, 3, key, len) ^ fsm_hash_id(kind);
}

static int htab_grow(struct htab *t)
{
    uint32_t ncap = t->cap ? t->cap * 2 : 16;
    struct htab_slot *ns = calloc(ncap, sizeof(*ns));
    if (ns == NULL)
        return GW_FSM_ERR_NOMEM;
    for (uint32_t i = 0; i < t->cap; i++) {
        if (t->slots[i].p == NULL)
            continue;
        uint32_t j = (uint32_t)t->slots[i].h & (ncap - 1);
        while (ns[j].p != NULL)
            j = (j + 1) & (ncap - 1);
        ns[j] = t->slots[i];
    }
    free(t->slots);
    t->slots = ns;
    t->cap = ncap;
    return 0;
}

int htab_insert(struct htab *t, uint64_t h, void *p)
{
    if ((t->n + 1) * 2 > t->cap) {
        int rc = htab_grow(t);
        if (rc < 0)
            return rc;
    }
    uint32_t mask = t->cap - 1;
    uint32_t i = (uint32_t)h & mask;
    while (t->slots[i].p != NULL)
        i = (i + 1) & mask;
    t->slots[i].h = h;
    t->slots[i].p = p;
    t->n++;
    return 0;
}

/* Removes the slot holding p (backward-shift deletion keeps probe chains unbroken). */
void htab_remove(struct htab *t, uint64_t h, const void *p)
{
    if (t->cap == 0)
        return;
    uint32_t mask = t->cap - 1;
    uint32_t i = (uint32_t)h & mask;
    while (t->slots[i].p != p) {
        if (t->slots[i].p == NULL)
            return;
        i = (i + 1) & mask;
    }
    t->slots[i].p = NULL;
    t->n--;
    uint32_t j = i;
    for (;;) {
        j = (j + 1) & mask;
        if (t->slots[j].p == NULL)
            return;
        uint32_t k = (uint32_t)t->slots[j].h & mask;
        bool stays = i <= j ? (i < k && k <= j) : (i < k || k <= j);
        if (stays)
            continue;
        t->slots[i] = t->slots[j];
        t->slots[j].p = NULL;
        i = j;
    }
}

void htab_free(struct htab *t)
{
    free(t->slots);
    t->slots = NULL;
    t->cap = t->n = 0;
}

#define HTAB_FOR(t, i) for (uint32_t i = 0; i < (t)->cap; i++) if ((t)->slots[i].p != NULL)

struct fsm_lease *fsm_lease_find(const struct gw_fsm *f, uint64_t id)
{
    const struct htab *t = &f->leases;
    if (t->cap == 0)
        return NULL;
    uint64_t h = fsm_hash_id(id);
    for (uint32_t i = (uint32_t)h & (t->cap - 1); t->slots[i].p != NULL; i = (i + 1) & (t->cap - 1)) {
        struct fsm_lease *l = t->slots[i].p;
        if (t->slots[i].h == h && l->id == id)
            return l;
    }
    return NULL;
}

/* Finds in a name-keyed table; off is where the name's length byte and bytes sit in the object. */
static void *find_named(const struct gw_fsm *f, const struct htab *t, size_t len_off, size_t name_off,
                        const char *name, size_t len)
{
    if (t->cap == 0 || len > GW_FSM_MAX_NAME)
        return NULL;
    uint64_t h = fsm_hash_name(f, name, len);
    for (uint32_t i = (uint32_t)h & (t->cap - 1); t->slots[i].p != NULL; i = (i + 1) & (t->cap - 1)) {
        const char *o = t->slots[i].p;
        if (t->slots[i].h == h && (uint8_t)o[len_off] == len && memcmp(o + name_off, name, len) == 0)
            return t->slots[i].p;
    }
    return NULL;
}

struct fsm_lock *fsm_lock_find(const struct gw_fsm *f, const char *name, size_t len)
{
    return find_named(f, &f->locks, offsetof(struct fsm_lock, name_len), offsetof(struct fsm_lock, name),
                      name, len);
}

struct fsm_counter *fsm_counter_find(const struct gw_fsm *f, const char *name, size_t len)
{
    return find_named(f, &f->counters, offsetof(struct fsm_counter, name_len),
                      offsetof(struct fsm_counter, name), name, len);
}

struct fsm_route *fsm_route_find(const struct gw_fsm *f, const char *name, size_t len)
{
    return find_named(f, &f->routes, offsetof(struct fsm_route, name_len), offsetof(struct fsm_route, name),
                      name, len);
}

struct fsm_idem *fsm_idem_find(const struct gw_fsm *f, uint8_t kind, const char *key, size_t len)
{
    const struct htab *t = &f->idems;
    if (t->cap == 0)
        return NULL;
    uint64_t h = fsm_hash_idem(f, kind, key, len);
    for (uint32_t i = (uint32_t)h & (t->cap - 1); t->slots[i].p != NULL; i = (i + 1) & (t->cap - 1)) {
        struct fsm_idem *r = t->slots[i].p;
        if (t->slots[i].h == h && r->kind == kind && r->key_len == len && memcmp(r->key, key, len) == 0)
            return r;
    }
    return NULL;
}

void fsm_clear(struct gw_fsm *f)
{
    HTAB_FOR(&f->locks, i)
    {
        struct fsm_lock *lk = f->locks.slots[i].p;
        struct fsm_waiter *w = lk->q_head;
        while (w != NULL) {
            struct fsm_waiter *next = w->q_next;
            free(w);
            w = next;
        }
        free(lk);
    }
    HTAB_FOR(&f->leases, i) free(f->leases.slots[i].p);
    HTAB_FOR(&f->counters, i) free(f->counters.slots[i].p);
    HTAB_FOR(&f->routes, i)
    {
        struct fsm_route *r = f->routes.slots[i].p;
        free(r->json);
        free(r);
    }
    for (struct fsm_idem *r = f->idem_head, *next; r != NULL; r = next) {
        next = r->next;
        free(r->body);
        free(r);
    }
    htab_free(&f->leases);
    htab_free(&f->locks);
    htab_free(&f->counters);
    htab_free(&f->routes);
    htab_free(&f->idems);
    f->idem_head = f->idem_tail = NULL;
    fsm_ext_clear(f);
    f->n_waiters = 0;
    f->n_kill = 0;
    f->last_index = f->time = f->last_token = f->route_version = 0;
}

int fsm_sorted(const struct htab *t, int (*cmp)(const void *, const void *), void ***out)
{
    *out = NULL;
    if (t->n == 0)
        return 0;
    void **v = malloc(sizeof(*v) * t->n);
    if (v == NULL)
        return GW_FSM_ERR_NOMEM;
    size_t n = 0;
    HTAB_FOR(t, i) v[n++] = t->slots[i].p;
    qsort(v, n, sizeof(*v), cmp);
    *out = v;
    return 0;
}

static int cmp_name(const char *a, size_t al, const char *b, size_t bl)
{
    int c = memcmp(a, b, al < bl ? al : bl);
    if (c != 0)
        return c;
    return al < bl ? -1 : al > bl;
}

static int cmp_u64(uint64_t a, uint64_t b)
{
    return a < b ? -1 : a > b;
}

int fsm_cmp_lease(const void *a, const void *b)
{
    return cmp_u64((*(struct fsm_lease *const *)a)->id, (*(struct fsm_lease *const *)b)->id);
}

int fsm_cmp_lock(const void *a, const void *b)
{
    const struct fsm_lock *x = *(struct fsm_lock *const *)a, *y = *(struct fsm_lock *const *)b;
    return cmp_name(x->name, x->name_len, y->name, y->name_len);
}

int fsm_cmp_counter(const void *a, const void *b)
{
    const struct fsm_counter *x = *(struct fsm_counter *const *)a, *y = *(struct fsm_counter *const *)b;
    return cmp_name(x->name, x->name_len, y->name, y->name_len);
}

int fsm_cmp_route(const void *a, const void *b)
{
    const struct fsm_route *x = *(struct fsm_route *const *)a, *y = *(struct fsm_route *const *)b;
    return cmp_name(x->name, x->name_len, y->name, y->name_len);
}

/* ---- Results and JSON ---------------------------------------------------------------------- */

void gw_fsm_result_init(struct gw_fsm_result *res)
{
    memset(res, 0, sizeof(*res));
    res->body = "";
}

void gw_fsm_result_free(struct gw_fsm_result *res)
{
    free(res->buf_);
    free(res->wk_);
    free(res->wk_off_);
    gw_fsm_result_init(res);
}

static void res_reset(struct gw_fsm_result *res)
{
    res->status = 0;
    res->code = NULL;
    res->body = "";
    res->body_len = 0;
    res->queued = false;
    res->waiter_id = 0;
    res->replayed = false;
    res->wakeups = NULL;
    res->n_wakeups = 0;
    res->buf_len_ = 0;
    res->body_off_ = SIZE_MAX;
    res->oom_ = false;
}

static void put(struct gw_fsm_result *res, const void *s, size_t n)
{
    if (res->oom_)
        return;
    if (res->buf_cap_ - res->buf_len_ < n) {
        size_t ncap = res->buf_cap_ ? res->buf_cap_ : 256;
        while (ncap - res->buf_len_ < n)
            ncap *= 2;
        char *nb = realloc(res->buf_, ncap);
        if (nb == NULL) {
            res->oom_ = true;
            return;
        }
        res->buf_ = nb;
        res->buf_cap_ = ncap;
    }
    memcpy(res->buf_ + res->buf_len_, s, n);
    res->buf_len_ += n;
}

static void puts_(struct gw_fsm_result *res, const char *s)
{
    put(res, s, strlen(s));
}

static void put_u64(struct gw_fsm_result *res, uint64_t v)
{
    char tmp[24];
    size_t n = sizeof(tmp);
    do {
        tmp[--n] = (char)('0' + v % 10);
        v /= 10;
    } while (v != 0);
    put(res, tmp + n, sizeof(tmp) - n);
}

static void put_i64(struct gw_fsm_result *res, int64_t v)
{
    if (v < 0) {
        put(res, "-", 1);
        put_u64(res, (uint64_t)0 - (uint64_t)v);
    } else {
        put_u64(res, (uint64_t)v);
    }
}

/* A JSON string; the bytes are printable ASCII (validated), so only " and \ need escaping. */
static void put_jstr(struct gw_fsm_result *res, const char *s, size_t n)
{
    put(res, "\"", 1);
    size_t start = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch == '"' || ch == '\\' || ch < 0x20) {
            put(res, s + start, i - start);
            if (ch < 0x20) {
                static const char hex[] = "0123456789abcdef";
                char esc[6] = {'\\', 'u', '0', '0', hex[ch >> 4], hex[ch & 15]};
                put(res, esc, sizeof(esc));
            } else {
                char esc[2] = {'\\', (char)ch};
                put(res, esc, 2);
            }
            start = i + 1;
        }
    }
    put(res, s + start, n - start);
    put(res, "\"", 1);
}

/* "key": */
static void put_key(struct gw_fsm_result *res, const char *key)
{
    put(res, "\"", 1);
    puts_(res, key);
    put(res, "\":", 2);
}

static void put_id(struct gw_fsm_result *res, uint64_t id)
{
    put(res, "\"", 1);
    put_u64(res, id);
    put(res, "\"", 1);
}

/* Ends a body started at start with a NUL (not counted) and returns its length. */
static size_t body_end(struct gw_fsm_result *res, size_t start)
{
    put(res, "", 1);
    return res->oom_ ? 0 : res->buf_len_ - 1 - start;
}

static void main_begin(struct gw_fsm_result *res, int status, int code)
{
    res->status = status;
    res->code = code_names[code];
    res->body_off_ = res->buf_len_;
}

static void main_end(struct gw_fsm_result *res)
{
    res->body_len = body_end(res, res->body_off_);
}

static void main_empty(struct gw_fsm_result *res, int status)
{
    res->status = status;
    res->code = NULL;
    res->body_off_ = SIZE_MAX;
    res->body_len = 0;
}

static void err_open(struct gw_fsm_result *res, int code, const char *message)
{
    puts_(res, "{\"error\":{\"code\":\"");
    puts_(res, code_names[code]);
    puts_(res, "\",\"message\":");
    put_jstr(res, message, strlen(message));
}

static void err_close(struct gw_fsm_result *res)
{
    put(res, "}}", 2);
}

static void fail(struct gw_fsm_result *res, int status, int code, const char *message)
{
    main_begin(res, status, code);
    err_open(res, code, message);
    err_close(res);
    main_end(res);
}

static void fail_field(struct gw_fsm_result *res, const char *field, const char *message)
{
    main_begin(res, 400, C_INVALID_FIELD);
    err_open(res, C_INVALID_FIELD, message);
    put(res, ",", 1);
    put_key(res, "field");
    put_jstr(res, field, strlen(field));
    err_close(res);
    main_end(res);
}

/* For quota.c. */
void fsm_out_begin(struct gw_fsm_result *res, int status)
{
    main_begin(res, status, C_NONE);
}

void fsm_out_put(struct gw_fsm_result *res, const void *s, size_t n)
{
    put(res, s, n);
}

void fsm_out_str(struct gw_fsm_result *res, const char *s)
{
    puts_(res, s);
}

void fsm_out_u64(struct gw_fsm_result *res, uint64_t v)
{
    put_u64(res, v);
}

void fsm_out_key(struct gw_fsm_result *res, const char *key)
{
    put_key(res, key);
}

void fsm_out_end(struct gw_fsm_result *res)
{
    main_end(res);
}

void fsm_out_fail(struct gw_fsm_result *res, int status, enum fsm_out_code code, const char *message)
{
    static const int map[] = {C_INVALID_NAME, C_TOO_MANY_QUOTAS, C_TOO_MANY_RECORDS};
    fail(res, status, map[code], message);
}

void fsm_out_fail_field(struct gw_fsm_result *res, const char *field, const char *message)
{
    fail_field(res, field, message);
}

/* Starts a wakeup's body; returns its slot or SIZE_MAX when out of memory. */
static size_t wake_begin(struct gw_fsm_result *res, uint64_t waiter_id, int status)
{
    if (res->n_wakeups == res->wk_cap_) {
        size_t ncap = res->wk_cap_ ? res->wk_cap_ * 2 : 8;
        struct gw_fsm_wakeup *nw = realloc(res->wk_, ncap * sizeof(*nw));
        if (nw == NULL) {
            res->oom_ = true;
            return SIZE_MAX;
        }
        res->wk_ = nw;
        size_t *no = realloc(res->wk_off_, ncap * sizeof(*no));
        if (no == NULL) {
            res->oom_ = true;
            return SIZE_MAX;
        }
        res->wk_off_ = no;
        res->wk_cap_ = ncap;
    }
    size_t i = res->n_wakeups++;
    res->wk_[i].waiter_id = waiter_id;
    res->wk_[i].status = status;
    res->wk_[i].body = NULL;
    res->wk_[i].body_len = 0;
    res->wk_off_[i] = res->buf_len_;
    return i;
}

static void wake_end(struct gw_fsm_result *res, size_t i)
{
    if (i == SIZE_MAX)
        return;
    res->wk_[i].body_len = body_end(res, res->wk_off_[i]);
}

/* Points the body pointers into the (now stable) buffer. */
static void res_finish(struct gw_fsm_result *res)
{
    if (res->oom_) {
        res->body = "";
        res->body_len = 0;
        res->n_wakeups = 0;
        return;
    }
    res->body = res->body_off_ == SIZE_MAX ? "" : res->buf_ + res->body_off_;
    for (size_t i = 0; i < res->n_wakeups; i++)
        res->wk_[i].body = res->buf_ + res->wk_off_[i];
    res->wakeups = res->n_wakeups ? res->wk_ : NULL;
}

/* ---- One apply -------------------------------------------------------------------------- */

struct app {
    struct gw_fsm *f;
    struct gw_fsm_result *res;
    uint64_t index;
    uint64_t t;
    struct fsm_waiter *queued; /* the waiter this command queued, if any */
    int err;
};

/* t + d, saturating: a stamp near the end of time must not wrap a deadline into the past. */
static uint64_t later(uint64_t t, uint64_t d)
{
    return t > UINT64_MAX - d ? UINT64_MAX : t + d;
}

static bool overdue(const struct app *a, const struct fsm_lease *l)
{
    return l->dying || a->t >= l->expires_at;
}

static void lease_doom(struct app *a, struct fsm_lease *l)
{
    if (l->dying)
        return;
    struct gw_fsm *f = a->f;
    if (f->n_kill == f->kill_cap) {
        /* Not reached: a lease is doomed once, and leases born in this apply are not doomed. */
        struct fsm_lease **k = realloc(f->kill, 2 * f->kill_cap * sizeof(*k));
        if (k == NULL) {
            a->err = GW_FSM_ERR_NOMEM;
            return;
        }
        f->kill = k;
        f->kill_cap *= 2;
    }
    l->dying = true;
    f->kill[f->n_kill++] = l;
}

static struct fsm_lease *lease_new(struct app *a, uint64_t id, uint64_t ttl_ms)
{
    struct fsm_lease *l = calloc(1, sizeof(*l));
    if (l == NULL || htab_insert(&a->f->leases, fsm_hash_id(id), l) < 0) {
        free(l);
        a->err = GW_FSM_ERR_NOMEM;
        return NULL;
    }
    l->id = id;
    l->ttl_ms = ttl_ms;
    l->expires_at = later(a->t, ttl_ms);
    return l;
}

static void held_link(struct fsm_lease *l, struct fsm_lock *lk)
{
    /* Appended at the tail: the list stays in token order since tokens only grow. */
    lk->lease = l;
    lk->lease_next = NULL;
    if (l->held == NULL) {
        l->held = lk;
        lk->lease_prev = lk; /* the head's prev points at the tail */
        return;
    }
    struct fsm_lock *tail = l->held->lease_prev;
    tail->lease_next = lk;
    lk->lease_prev = tail;
    l->held->lease_prev = lk;
}

static void held_unlink(struct fsm_lock *lk)
{
    struct fsm_lease *l = lk->lease;
    if (l == NULL)
        return;
    if (l->held == lk) {
        l->held = lk->lease_next;
        if (l->held != NULL)
            l->held->lease_prev = lk->lease_prev;
    } else {
        lk->lease_prev->lease_next = lk->lease_next;
        if (lk->lease_next != NULL)
            lk->lease_next->lease_prev = lk->lease_prev;
        else
            l->held->lease_prev = lk->lease_prev;
    }
    lk->lease = NULL;
    lk->lease_prev = lk->lease_next = NULL;
}

static void waiting_link(struct fsm_lease *l, struct fsm_waiter *w)
{
    w->lease_next = NULL;
    if (l->waiting == NULL) {
        l->waiting = w;
        w->lease_prev = w;
        return;
    }
    struct fsm_waiter *tail = l->waiting->lease_prev;
    tail->lease_next = w;
    w->lease_prev = tail;
    l->waiting->lease_prev = w;
}

static void waiting_unlink(struct gw_fsm *f, struct fsm_waiter *w)
{
    if (w->lease_id == 0 || w->lease_prev == NULL)
        return;
    struct fsm_lease *l = fsm_lease_find(f, w->lease_id);
    if (l == NULL)
        return;
    if (l->waiting == w) {
        l->waiting = w->lease_next;
        if (l->waiting != NULL)
            l->waiting->lease_prev = w->lease_prev;
    } else {
        w->lease_prev->lease_next = w->lease_next;
        if (w->lease_next != NULL)
            w->lease_next->lease_prev = w->lease_prev;
        else
            l->waiting->lease_prev = w->lease_prev;
    }
    w->lease_prev = w->lease_next = NULL;
}

/* Takes w out of its lock's queue and its lease's list. */
static void waiter_unqueue(struct gw_fsm *f, struct fsm_waiter *w)
{
    struct fsm_lock *lk = w->lock;
    if (w->q_prev != NULL)
        w->q_prev->q_next = w->q_next;
    else
        lk->q_head = w->q_next;
    if (w->q_next != NULL)
        w->q_next->q_prev = w->q_prev;
    else
        lk->q_tail = w->q_prev;
    w->q_prev = w->q_next = NULL;
    lk->n_waiters--;
    f->n_waiters--;
    waiting_unlink(f, w);
}

static void lock_free(struct gw_fsm *f, struct fsm_lock *lk)
{
    htab_remove(&f->locks, fsm_hash_name(f, lk->name, lk->name_len), lk);
    free(lk);
}

/* {"name","owner","token","lease_id", of a held lock: the start of both lock bodies. */
static void put_lock_head(struct gw_fsm_result *res, const struct fsm_lock *lk)
{
    put(res, "{", 1);
    put_key(res, "name");
    put_jstr(res, lk->name, lk->name_len);
    put(res, ",", 1);
    put_key(res, "owner");
    put_jstr(res, lk->owner, lk->owner_len);
    put(res, ",", 1);
    put_key(res, "token");
    put_u64(res, lk->token);
    put(res, ",", 1);
    put_key(res, "lease_id");
    put_id(res, lk->lease->id);
    put(res, ",", 1);
}

/* The body of a granted lock (200), into the current body. */
static void put_granted(struct gw_fsm_result *res, const struct fsm_lock *lk)
{
    put_lock_head(res, lk);
    put_key(res, "ttl_ms");
    put_u64(res, lk->lease->ttl_ms);
    put(res, "}", 1);
}

static void put_lock_held(struct gw_fsm_result *res, const struct fsm_lock *lk)
{
    err_open(res, C_LOCK_HELD, "the lock is held by another owner");
    put(res, ",", 1);
    put_key(res, "holder");
    put_jstr(res, lk->owner, lk->owner_len);
    put(res, ",", 1);
    put_key(res, "token");
    put_u64(res, lk->token);
    err_close(res);
}

static void put_lease_gone(struct gw_fsm_result *res, uint64_t lease_id)
{
    err_open(res, C_LEASE_NOT_FOUND, "the lease does not exist or has expired");
    put(res, ",", 1);
    put_key(res, "lease_id");
    put_id(res, lease_id);
    err_close(res);
}

/* Completes the idempotency record of a waiter with the outcome just written as wakeup i. */
static void idem_complete(struct app *a, struct fsm_waiter *w, size_t i, int code)
{
    struct fsm_idem *r = w->idem;
    if (r == NULL)
        return;
    r->waiter = NULL;
    w->idem = NULL;
    if (i == SIZE_MAX || a->res->oom_) {
        a->err = GW_FSM_ERR_NOMEM;
        return;
    }
    const struct gw_fsm_wakeup *wk = &a->res->wk_[i];
    char *body = malloc(wk->body_len + 1);
    if (body == NULL) {
        a->err = GW_FSM_ERR_NOMEM;
        return;
    }
    memcpy(body, a->res->buf_ + a->res->wk_off_[i], wk->body_len);
    body[wk->body_len] = '\0';
    free(r->body);
    r->body = body;
    r->body_len = (uint32_t)wk->body_len;
    r->status = (uint16_t)wk->status;
    r->code = (uint8_t)code;
    r->queued = false;
}

/* Answers a waiter that leaves the queue without the lock, and frees it. */
static void waiter_reject(struct app *a, struct fsm_waiter *w, int status, const struct fsm_lock *lk)
{
    size_t i = wake_begin(a->res, w->id, status);
    int code = status == 409 ? C_LOCK_HELD : status == 404 ? C_LEASE_NOT_FOUND : C_TOO_MANY_LEASES;
    if (i != SIZE_MAX) {
        if (status == 409)
            put_lock_held(a->res, lk);
        else if (status == 404)
            put_lease_gone(a->res, w->lease_id);
        else {
            err_open(a->res, C_TOO_MANY_LEASES, "no room for the waiter's lease");
            err_close(a->res);
        }
        wake_end(a->res, i);
    }
    idem_complete(a, w, i, code);
    free(w);
}

/* The lock has no holder: grant it to the first waiter whose lease is alive at t. */
static void grant_next(struct app *a, struct fsm_lock *lk)
{
    struct gw_fsm *f = a->f;
    struct fsm_waiter *w;
    while (lk->lease == NULL && (w = lk->q_head) != NULL && a->err == 0) {
        waiter_unqueue(f, w);
        struct fsm_lease *l;
        if (w->lease_id != 0) {
            l = fsm_lease_find(f, w->lease_id);
            if (l == NULL || overdue(a, l)) {
                if (l != NULL)
                    lease_doom(a, l);
                waiter_reject(a, w, 404, lk);
                continue;
            }
        } else {
            if (f->leases.n >= f->cfg.max_leases) {
                waiter_reject(a, w, 503, lk);
                continue;
            }
            l = lease_new(a, w->id, w->ttl_ms);
            if (l == NULL) {
                if (w->idem != NULL)
                    w->idem->waiter = NULL;
                free(w);
                return;
            }
        }
        lk->owner_len = w->owner_len;
        memcpy(lk->owner, w->owner, w->owner_len + 1u);
        lk->token = ++f->last_token;
        held_link(l, lk);
        size_t i = wake_begin(a->res, w->id, 200);
        if (i != SIZE_MAX) {
            put_granted(a->res, lk);
            wake_end(a->res, i);
        }
        idem_complete(a, w, i, C_NONE);
        free(w);
    }
}

/* Expires one lease: drops its waiters, releases its locks (in token order), frees it. */
static void lease_kill(struct app *a, struct fsm_lease *l)
{
    struct gw_fsm *f = a->f;
    while (l->waiting != NULL) {
        struct fsm_waiter *w = l->waiting;
        struct fsm_lock *lk = w->lock;
        waiter_unqueue(f, w);
        waiter_reject(a, w, 404, lk);
    }
    /* Out of the table before its locks pass on, so its slot is free for a waiter's lease. */
    htab_remove(&f->leases, fsm_hash_id(l->id), l);
    while (l->held != NULL) {
        struct fsm_lock *lk = l->held;
        held_unlink(lk);
        grant_next(a, lk);
        if (lk->lease == NULL)
            lock_free(f, lk);
    }
    free(l);
}

static void run_kills(struct app *a)
{
    struct gw_fsm *f = a->f;
    for (size_t i = 0; i < f->n_kill; i++)
        lease_kill(a, f->kill[i]); /* may append to the list; the loop picks those up */
    f->n_kill = 0;
}

/* The lease if it is alive at t; an overdue one is expired on the spot and NULL returned. */
static struct fsm_lease *live_lease(struct app *a, uint64_t id)
{
    struct fsm_lease *l = fsm_lease_find(a->f, id);
    if (l == NULL)
        return NULL;
    if (overdue(a, l)) {
        lease_doom(a, l);
        run_kills(a);
        return NULL;
    }
    return l;
}

/* The lock named, after expiring its holder's lease if that is overdue at t. */
static struct fsm_lock *live_lock(struct app *a, const char *name, size_t len)
{
    struct fsm_lock *lk = fsm_lock_find(a->f, name, len);
    if (lk != NULL && overdue(a, lk->lease)) {
        lease_doom(a, lk->lease);
        run_kills(a);
        lk = fsm_lock_find(a->f, name, len);
    }
    return lk;
}

/* ---- Commands ------------------------------------------------------------------------------ */

static bool ttl_valid(uint64_t ttl_ms)
{
    return ttl_ms >= GW_FSM_TTL_MIN_MS && ttl_ms <= GW_FSM_TTL_MAX_MS;
}

static const char ttl_message[] = "ttl_ms must be an integer from 1000 to 3600000";
static const char name_message[] = "names are 1 to 200 bytes of A-Z a-z 0-9 . _ : -";

static void put_lease_body(struct gw_fsm_result *res, const struct fsm_lease *l)
{
    put(res, "{", 1);
    put_key(res, "id");
    put_id(res, l->id);
    put(res, ",", 1);
    put_key(res, "ttl_ms");
    put_u64(res, l->ttl_ms);
    put(res, "}", 1);
}

static void do_lease_grant(struct app *a, const struct gw_fsm_cmd *c)
{
    if (!ttl_valid(c->ttl_ms)) {
        fail_field(a->res, "ttl_ms", ttl_message);
        return;
    }
    if (a->f->leases.n >= a->f->cfg.max_leases) {
        fail(a->res, 503, C_TOO_MANY_LEASES, "the lease table is full");
        return;
    }
    struct fsm_lease *l = lease_new(a, a->index, c->ttl_ms);
    if (l == NULL)
        return;
    main_begin(a->res, 201, C_NONE);
    put_lease_body(a->res, l);
    main_end(a->res);
}

static void do_lease_keepalive(struct app *a, const struct gw_fsm_cmd *c)
{
    struct fsm_lease *l = live_lease(a, c->lease_id);
    if (l == NULL) {
        main_begin(a->res, 404, C_LEASE_NOT_FOUND);
        put_lease_gone(a->res, c->lease_id);
        main_end(a->res);
        return;
    }
    l->expires_at = later(a->t, l->ttl_ms);
    main_begin(a->res, 200, C_NONE);
    put_lease_body(a->res, l);
    main_end(a->res);
}

static void do_lease_revoke(struct app *a, const struct gw_fsm_cmd *c)
{
    struct fsm_lease *l = live_lease(a, c->lease_id);
    if (l == NULL) {
        main_begin(a->res, 404, C_LEASE_NOT_FOUND);
        put_lease_gone(a->res, c->lease_id);
        main_end(a->res);
        return;
    }
    lease_doom(a, l);
    run_kills(a);
    main_empty(a->res, 204);
}

static void do_lease_expire(struct app *a, const struct gw_fsm_cmd *c)
{
    uint64_t n = 0;
    for (size_t i = 0; i < c->n_ids; i++) {
        struct fsm_lease *l = fsm_lease_find(a->f, gw_fsm_cmd_expire_id(c, i));
        if (l != NULL && !l->dying && a->t >= l->expires_at) {
            lease_doom(a, l);
            n++;
        }
    }
    run_kills(a);
    main_begin(a->res, 200, C_NONE);
    put(a->res, "{", 1);
    put_key(a->res, "expired");
    put_u64(a->res, n);
    put(a->res, "}", 1);
    main_end(a->res);
}

static void do_lock_acquire(struct app *a, const struct gw_fsm_cmd *c)
{
    struct gw_fsm *f = a->f;
    if (!gw_fsm_name_valid(c->name, c->name_len)) {
        fail(a->res, 400, C_INVALID_NAME, name_message);
        return;
    }
    if (!gw_fsm_owner_valid(c->owner, c->owner_len)) {
        fail_field(a->res, "owner", "owner must be 1 to 200 printable ASCII characters");
        return;
    }
    if (c->wait_ms > GW_FSM_WAIT_MAX_MS) {
        fail_field(a->res, "wait_ms", "wait_ms must be an integer from 0 to 60000");
        return;
    }
    if (c->lease_id == 0 && !ttl_valid(c->ttl_ms)) {
        fail_field(a->res, "ttl_ms", ttl_message);
        return;
    }
    struct fsm_lease *mine = NULL;
    if (c->lease_id != 0) {
        mine = live_lease(a, c->lease_id);
        if (mine == NULL) {
            main_begin(a->res, 404, C_LEASE_NOT_FOUND);
            put_lease_gone(a->res, c->lease_id);
            main_end(a->res);
            return;
        }
    }
    struct fsm_lock *lk = live_lock(a, c->name, c->name_len);
    if (a->err)
        return;
    if (lk == NULL) {
        if (f->locks.n >= f->cfg.max_locks) {
            fail(a->res, 503, C_TOO_MANY_LOCKS, "the lock table is full");
            return;
        }
        if (mine == NULL && f->leases.n >= f->cfg.max_leases) {
            fail(a->res, 503, C_TOO_MANY_LEASES, "the lease table is full");
            return;
        }
        lk = calloc(1, sizeof(*lk));
        if (lk == NULL) {
            a->err = GW_FSM_ERR_NOMEM;
            return;
        }
        lk->name_len = (uint8_t)c->name_len;
        memcpy(lk->name, c->name, c->name_len);
        if (htab_insert(&f->locks, fsm_hash_name(f, lk->name, lk->name_len), lk) < 0) {
            free(lk);
            a->err = GW_FSM_ERR_NOMEM;
            return;
        }
        if (mine == NULL) {
            mine = lease_new(a, a->index, c->ttl_ms);
            if (mine == NULL) {
                lock_free(f, lk);
                return;
            }
        }
        lk->owner_len = (uint8_t)c->owner_len;
        memcpy(lk->owner, c->owner, c->owner_len);
        lk->token = ++f->last_token;
        held_link(mine, lk);
        main_begin(a->res, 200, C_NONE);
        put_granted(a->res, lk);
        main_end(a->res);
        return;
    }
    if (mine != NULL && lk->lease == mine && lk->owner_len == c->owner_len &&
        memcmp(lk->owner, c->owner, c->owner_len) == 0) {
        main_begin(a->res, 200, C_NONE); /* re-entrant: same owner, same lease, same token */
        put_granted(a->res, lk);
        main_end(a->res);
        return;
    }
    if (c->wait_ms == 0) {
        main_begin(a->res, 409, C_LOCK_HELD);
        put_lock_held(a->res, lk);
        main_end(a->res);
        return;
    }
    if (lk->n_waiters >= f->cfg.max_waiters_per_lock || f->n_waiters >= f->cfg.max_waiters) {
        fail(a->res, 503, C_TOO_MANY_WAITERS, "too many requests are waiting for locks");
        return;
    }
    struct fsm_waiter *w = calloc(1, sizeof(*w));
    if (w == NULL) {
        a->err = GW_FSM_ERR_NOMEM;
        return;
    }
    w->id = a->index;
    w->lease_id = c->lease_id;
    w->ttl_ms = c->lease_id ? 0 : c->ttl_ms;
    w->deadline = later(a->t, c->wait_ms);
    w->lock = lk;
    w->owner_len = (uint8_t)c->owner_len;
    memcpy(w->owner, c->owner, c->owner_len);
    w->q_prev = lk->q_tail;
    if (lk->q_tail != NULL)
        lk->q_tail->q_next = w;
    else
        lk->q_head = w;
    lk->q_tail = w;
    lk->n_waiters++;
    f->n_waiters++;
    if (mine != NULL)
        waiting_link(mine, w);
    a->queued = w;
    a->res->status = 0;
    a->res->queued = true;
    a->res->waiter_id = w->id;
}

static void do_lock_release(struct app *a, const struct gw_fsm_cmd *c)
{
    if (!gw_fsm_name_valid(c->name, c->name_len)) {
        fail(a->res, 400, C_INVALID_NAME, name_message);
        return;
    }
    struct fsm_lock *lk = live_lock(a, c->name, c->name_len);
    if (lk == NULL) {
        fail(a->res, 404, C_LOCK_NOT_FOUND, "the lock is not held");
        return;
    }
    if (lk->token != c->token) {
        fail(a->res, 409, C_LOCK_NOT_HELD, "the token is not the current holder's");
        return;
    }
    main_empty(a->res, 204);
    held_unlink(lk);
    grant_next(a, lk);
    if (lk->lease == NULL)
        lock_free(a->f, lk);
    run_kills(a);
}

static void do_lock_cancel_wait(struct app *a, const struct gw_fsm_cmd *c)
{
    if (!gw_fsm_name_valid(c->name, c->name_len)) {
        fail(a->res, 400, C_INVALID_NAME, name_message);
        return;
    }
    struct fsm_lock *lk = live_lock(a, c->name, c->name_len);
    struct fsm_waiter *w = lk ? lk->q_head : NULL;
    while (w != NULL && w->id != c->waiter_id)
        w = w->q_next;
    if (w == NULL) {
        fail(a->res, 404, C_WAITER_NOT_FOUND, "no such waiter is queued for the lock");
        return;
    }
    waiter_unqueue(a->f, w);
    waiter_reject(a, w, 409, lk);
    main_empty(a->res, 204);
}

static void put_counter(struct gw_fsm_result *res, const char *name, size_t len, int64_t value)
{
    put(res, "{", 1);
    put_key(res, "name");
    put_jstr(res, name, len);
    put(res, ",", 1);
    put_key(res, "value");
    put_i64(res, value);
    put(res, "}", 1);
}

/* Stores value under name (creating the counter); false when the table is full. */
static bool counter_store(struct app *a, struct fsm_counter *ctr, const char *name, size_t len,
                          int64_t value)
{
    struct gw_fsm *f = a->f;
    if (ctr != NULL) {
        ctr->value = value;
        return true;
    }
    if (f->counters.n >= f->cfg.max_counters) {
        fail(a->res, 503, C_TOO_MANY_COUNTERS, "the counter table is full");
        return false;
    }
    ctr = malloc(sizeof(*ctr) + len + 1);
    if (ctr == NULL || htab_insert(&f->counters, fsm_hash_name(f, name, len), ctr) < 0) {
        free(ctr);
        a->err = GW_FSM_ERR_NOMEM;
        return false;
    }
    ctr->value = value;
    ctr->name_len = (uint8_t)len;
    memcpy(ctr->name, name, len);
    ctr->name[len] = '\0';
    return true;
}

static void do_counter_add(struct app *a, const struct gw_fsm_cmd *c)
{
    if (!gw_fsm_name_valid(c->name, c->name_len)) {
        fail(a->res, 400, C_INVALID_NAME, name_message);
        return;
    }
    struct fsm_counter *ctr = fsm_counter_find(a->f, c->name, c->name_len);
    int64_t v = ctr ? ctr->value : 0;
    if ((c->delta > 0 && v > INT64_MAX - c->delta) || (c->delta < 0 && v < INT64_MIN - c->delta)) {
        main_begin(a->res, 400, C_INVALID_FIELD);
        err_open(a->res, C_INVALID_FIELD, "add would overflow the counter's signed 64-bit value");
        put(a->res, ",", 1);
        put_key(a->res, "field");
        put_jstr(a->res, "add", 3);
        put(a->res, ",", 1);
        put_key(a->res, "value");
        put_i64(a->res, v);
        err_close(a->res);
        main_end(a->res);
        return;
    }
    if (!counter_store(a, ctr, c->name, c->name_len, v + c->delta))
        return;
    main_begin(a->res, 200, C_NONE);
    put_counter(a->res, c->name, c->name_len, v + c->delta);
    main_end(a->res);
}

static void do_counter_set(struct app *a, const struct gw_fsm_cmd *c)
{
    if (!gw_fsm_name_valid(c->name, c->name_len)) {
        fail(a->res, 400, C_INVALID_NAME, name_message);
        return;
    }
    struct fsm_counter *ctr = fsm_counter_find(a->f, c->name, c->name_len);
    int64_t v = ctr ? ctr->value : 0;
    if (c->has_expect && c->expect != v) {
        main_begin(a->res, 409, C_CAS_FAILED);
        err_open(a->res, C_CAS_FAILED, "the counter's value is not the expected one");
        put(a->res, ",", 1);
        put_key(a->res, "value");
        put_i64(a->res, v);
        err_close(a->res);
        main_end(a->res);
        return;
    }
    if (!counter_store(a, ctr, c->name, c->name_len, c->value))
        return;
    main_begin(a->res, 200, C_NONE);
    put_counter(a->res, c->name, c->name_len, c->value);
    main_end(a->res);
}

static void do_route_put(struct app *a, const struct gw_fsm_cmd *c)
{
    struct gw_fsm *f = a->f;
    if (!gw_fsm_name_valid(c->name, c->name_len)) {
        fail(a->res, 400, C_INVALID_NAME, name_message);
        return;
    }
    if (c->json_len == 0 || c->json_len > f->cfg.max_route_bytes) {
        fail_field(a->res, "route", "the route must be 1 byte up to the configured maximum");
        return;
    }
    struct fsm_route *r = fsm_route_find(f, c->name, c->name_len);
    if (r == NULL && f->routes.n >= f->cfg.max_routes) {
        fail(a->res, 503, C_TOO_MANY_ROUTES, "the route table is full");
        return;
    }
    char *json = malloc(c->json_len + 1);
    if (json == NULL) {
        a->err = GW_FSM_ERR_NOMEM;
        return;
    }
    memcpy(json, c->json, c->json_len);
    json[c->json_len] = '\0';
    if (r == NULL) {
        r = calloc(1, sizeof(*r) + c->name_len + 1);
        if (r == NULL || htab_insert(&f->routes, fsm_hash_name(f, c->name, c->name_len), r) < 0) {
            free(r);
            free(json);
            a->err = GW_FSM_ERR_NOMEM;
            return;
        }
        r->name_len = (uint8_t)c->name_len;
        memcpy(r->name, c->name, c->name_len);
    }
    free(r->json);
    r->json = json;
    r->json_len = (uint32_t)c->json_len;
    r->version = ++f->route_version;
    main_begin(a->res, 200, C_NONE);
    put(a->res, "{", 1);
    put_key(a->res, "name");
    put_jstr(a->res, r->name, r->name_len);
    put(a->res, ",", 1);
    put_key(a->res, "version");
    put_u64(a->res, r->version);
    put(a->res, "}", 1);
    main_end(a->res);
}

static void do_route_delete(struct app *a, const struct gw_fsm_cmd *c)
{
    struct gw_fsm *f = a->f;
    if (!gw_fsm_name_valid(c->name, c->name_len)) {
        fail(a->res, 400, C_INVALID_NAME, name_message);
        return;
    }
    struct fsm_route *r = fsm_route_find(f, c->name, c->name_len);
    if (r == NULL) {
        fail(a->res, 404, C_ROUTE_NOT_FOUND, "no route has this name");
        return;
    }
    htab_remove(&f->routes, fsm_hash_name(f, r->name, r->name_len), r);
    free(r->json);
    free(r);
    f->route_version++;
    main_empty(a->res, 204);
}

/* ---- Idempotency records ----------------------------------------------------------------- */

static void idem_evict(struct gw_fsm *f, struct fsm_idem *r)
{
    htab_remove(&f->idems, fsm_hash_idem(f, r->kind, r->key, r->key_len), r);
    if (r->prev != NULL)
        r->prev->next = r->next;
    else
        f->idem_head = r->next;
    if (r->next != NULL)
        r->next->prev = r->prev;
    else
        f->idem_tail = r->prev;
    if (r->waiter != NULL)
        r->waiter->idem = NULL;
    free(r->body);
    free(r);
}

/* Two SipHash-2-4 runs with fixed keys over kind and arguments: the same on every replica. */
static void fingerprint(uint8_t kind, const uint8_t *args, size_t len, uint64_t fp[2])
{
    static const struct gw_hash_key k[2] = {{0x6673d5a1c0e2b3f7ull, 0x1d2e3f4051627384ull},
                                            {0x9a8b7c6d5e4f3021ull, 0x0fedcba987654321ull}};
    for (int i = 0; i < 2; i++) {
        struct gw_siphash_state st;
        gw_siphash24_init(&st, &k[i]);
        gw_siphash24_update(&st, &kind, 1);
        gw_siphash24_update(&st, args, len);
        fp[i] = gw_siphash24_final(&st);
    }
}

static void idem_store(struct app *a, const struct gw_fsm_cmd *c, const uint64_t fp[2])
{
    struct gw_fsm *f = a->f;
    struct gw_fsm_result *res = a->res;
    /* Capacity answers (503) changed nothing: the client may retry with the same key. */
    if (res->status >= 500 || res->oom_)
        return;
    while (f->idems.n >= f->cfg.max_idem_records && f->idem_head != NULL) {
        idem_evict(f, f->idem_head);
        f->idem_evicted++;
    }
    struct fsm_idem *r = calloc(1, sizeof(*r) + c->idem_key_len + 1);
    char *body = malloc(res->body_len + 1);
    if (r == NULL || body == NULL) {
        free(r);
        free(body);
        a->err = GW_FSM_ERR_NOMEM;
        return;
    }
    r->kind = c->kind;
    r->key_len = (uint8_t)c->idem_key_len;
    memcpy(r->key, c->idem_key, c->idem_key_len);
    if (htab_insert(&f->idems, fsm_hash_idem(f, r->kind, r->key, r->key_len), r) < 0) {
        free(r);
        free(body);
        a->err = GW_FSM_ERR_NOMEM;
        return;
    }
    if (res->body_len > 0)
        memcpy(body, res->buf_ + res->body_off_, res->body_len);
    body[res->body_len] = '\0';
    r->body = body;
    r->body_len = (uint32_t)res->body_len;
    r->created_at = a->t;
    r->fp[0] = fp[0];
    r->fp[1] = fp[1];
    r->status = (uint16_t)res->status;
    for (uint8_t i = 0; i < C_COUNT; i++)
        if (res->code == code_names[i])
            r->code = i;
    r->queued = res->queued;
    r->waiter_id = res->waiter_id;
    if (res->queued && a->queued != NULL) {
        r->waiter = a->queued;
        a->queued->idem = r;
    }
    r->prev = f->idem_tail;
    if (f->idem_tail != NULL)
        f->idem_tail->next = r;
    else
        f->idem_head = r;
    f->idem_tail = r;
}

static void idem_replay(struct app *a, const struct fsm_idem *r)
{
    struct gw_fsm_result *res = a->res;
    res->replayed = true;
    if (r->queued) {
        res->status = 0;
        res->queued = true;
        res->waiter_id = r->waiter_id;
        return;
    }
    main_begin(res, r->status, r->code);
    if (r->status == 204) {
        main_empty(res, 204);
        return;
    }
    put(res, r->body, r->body_len);
    main_end(res);
}

/* ---- Apply -------------------------------------------------------------------------------- */

int gw_fsm_apply(struct gw_fsm *f, uint64_t index, const uint8_t *cmd, size_t len,
                 struct gw_fsm_result *res)
{
    res_reset(res);
    if (index <= f->last_index)
        return GW_FSM_ERR_INVALID;
    f->last_index = index;
    struct gw_fsm_cmd c;
    int rc = gw_fsm_cmd_decode(cmd, len, &c);
    if (rc < 0) {
        fail(res, 400, C_INVALID_COMMAND, "the command could not be decoded");
        res_finish(res);
        return rc;
    }
    struct app a = {.f = f, .res = res, .index = index, .t = f->time};
    if (c.now_ms > a.t)
        a.t = c.now_ms;
    f->time = a.t;
    /* Records expire in creation order, and time never goes back: drop from the head. */
    while (f->idem_head != NULL && a.t - f->idem_head->created_at >= f->cfg.idem_ttl_ms)
        idem_evict(f, f->idem_head);

    uint64_t fp[2] = {0, 0};
    if (c.idem_key_len > 0) {
        if (!gw_fsm_idem_key_valid(c.idem_key, c.idem_key_len)) {
            fail(res, 400, C_IDEM_INVALID, "the idempotency key must be 1 to 255 printable characters");
            res_finish(res);
            return 0;
        }
        fingerprint(c.kind, c.args, c.args_len, fp);
        const struct fsm_idem *r = fsm_idem_find(f, c.kind, c.idem_key, c.idem_key_len);
        if (r != NULL) {
            if (r->fp[0] != fp[0] || r->fp[1] != fp[1])
                fail(res, 422, C_IDEM_MISMATCH, "the idempotency key was used with another request");
            else
                idem_replay(&a, r);
            res_finish(res);
            return res->oom_ ? GW_FSM_ERR_NOMEM : 0;
        }
    }

    switch (c.kind) {
    case GW_FSM_LEASE_GRANT:
        do_lease_grant(&a, &c);
        break;
    case GW_FSM_LEASE_KEEPALIVE:
        do_lease_keepalive(&a, &c);
        break;
    case GW_FSM_LEASE_REVOKE:
        do_lease_revoke(&a, &c);
        break;
    case GW_FSM_LEASE_EXPIRE:
        do_lease_expire(&a, &c);
        break;
    case GW_FSM_LOCK_ACQUIRE:
        do_lock_acquire(&a, &c);
        break;
    case GW_FSM_LOCK_RELEASE:
        do_lock_release(&a, &c);
        break;
    case GW_FSM_LOCK_CANCEL_WAIT:
        do_lock_cancel_wait(&a, &c);
        break;
    case GW_FSM_COUNTER_ADD:
        do_counter_add(&a, &c);
        break;
    case GW_FSM_COUNTER_SET:
        do_counter_set(&a, &c);
        break;
    case GW_FSM_ROUTE_PUT:
        do_route_put(&a, &c);
        break;
    case GW_FSM_ROUTE_DELETE:
        do_route_delete(&a, &c);
        break;
    case GW_FSM_QUOTA_ACQUIRE:
    case GW_FSM_QUOTA_RELEASE:
        a.err = fsm_quota_apply(f, &c, index, a.t, res);
        break;
    case GW_FSM_IDEM_BEGIN:
    case GW_FSM_IDEM_FINISH:
        a.err = fsm_gwidem_apply(f, &c, index, a.t, res);
        break;
    }
    run_kills(&a);
    if (c.idem_key_len > 0 && a.err == 0)
        idem_store(&a, &c, fp);
    if (res->oom_ && a.err == 0)
        a.err = GW_FSM_ERR_NOMEM;
    res_finish(res);
    return a.err;
}

/* ---- Reads ------------------------------------------------------------------------------- */

static int read_done(struct gw_fsm_result *res)
{
    res_finish(res);
    return res->oom_ ? GW_FSM_ERR_NOMEM : 0;
}

static int cmp_lock_name(const void *a, const void *b)
{
    return fsm_cmp_lock(a, b);
}

int gw_fsm_get_lease(const struct gw_fsm *f, uint64_t id, uint64_t now_ms, struct gw_fsm_result *res)
{
    res_reset(res);
    uint64_t t = now_ms > f->time ? now_ms : f->time;
    const struct fsm_lease *l = fsm_lease_find(f, id);
    if (l == NULL || t >= l->expires_at) {
        main_begin(res, 404, C_LEASE_NOT_FOUND);
        put_lease_gone(res, id);
        main_end(res);
        return read_done(res);
    }
    size_t n = 0;
    for (const struct fsm_lock *lk = l->held; lk != NULL; lk = lk->lease_next)
        n++;
    const struct fsm_lock **names = NULL;
    if (n > 0) {
        names = malloc(n * sizeof(*names));
        if (names == NULL)
            return GW_FSM_ERR_NOMEM;
        n = 0;
        for (const struct fsm_lock *lk = l->held; lk != NULL; lk = lk->lease_next)
            names[n++] = lk;
        qsort(names, n, sizeof(*names), cmp_lock_name);
    }
    main_begin(res, 200, C_NONE);
    put(res, "{", 1);
    put_key(res, "id");
    put_id(res, l->id);
    put(res, ",", 1);
    put_key(res, "ttl_ms");
    put_u64(res, l->ttl_ms);
    put(res, ",", 1);
    put_key(res, "remaining_ms");
    put_u64(res, l->expires_at - t);
    put(res, ",", 1);
    put_key(res, "locks");
    put(res, "[", 1);
    for (size_t i = 0; i < n; i++) {
        if (i > 0)
            put(res, ",", 1);
        put_jstr(res, names[i]->name, names[i]->name_len);
    }
    put(res, "]}", 2);
    main_end(res);
    free(names);
    return read_done(res);
}

int gw_fsm_get_lock(const struct gw_fsm *f, const char *name, size_t len, struct gw_fsm_result *res)
{
    res_reset(res);
    if (!gw_fsm_name_valid(name, len)) {
        fail(res, 400, C_INVALID_NAME, name_message);
        return read_done(res);
    }
    /* A holder whose lease is overdue at fsm time has lost the lock (the next command would
     * expire it), so it is not reported. */
    const struct fsm_lock *lk = fsm_lock_find(f, name, len);
    if (lk == NULL || f->time >= lk->lease->expires_at) {
        fail(res, 404, C_LOCK_NOT_FOUND, "the lock is not held");
        return read_done(res);
    }
    main_begin(res, 200, C_NONE);
    put_lock_head(res, lk);
    put_key(res, "waiters");
    put_u64(res, lk->n_waiters);
    put(res, "}", 1);
    main_end(res);
    return read_done(res);
}

int gw_fsm_get_counter(const struct gw_fsm *f, const char *name, size_t len, struct gw_fsm_result *res)
{
    res_reset(res);
    if (!gw_fsm_name_valid(name, len)) {
        fail(res, 400, C_INVALID_NAME, name_message);
        return read_done(res);
    }
    const struct fsm_counter *ctr = fsm_counter_find(f, name, len);
    main_begin(res, 200, C_NONE);
    put_counter(res, name, len, ctr ? ctr->value : 0);
    main_end(res);
    return read_done(res);
}

int gw_fsm_get_route(const struct gw_fsm *f, const char *name, size_t len, struct gw_fsm_result *res)
{
    res_reset(res);
    if (!gw_fsm_name_valid(name, len)) {
        fail(res, 400, C_INVALID_NAME, name_message);
        return read_done(res);
    }
    const struct fsm_route *r = fsm_route_find(f, name, len);
    if (r == NULL) {
        fail(res, 404, C_ROUTE_NOT_FOUND, "no route has this name");
        return read_done(res);
    }
    main_begin(res, 200, C_NONE);
    put(res, r->json, r->json_len);
    main_end(res);
    return read_done(res);
}

int gw_fsm_routes_foreach(const struct gw_fsm *f, gw_fsm_route_fn fn, void *ctx)
{
    void **v;
    int rc = fsm_sorted(&f->routes, fsm_cmp_route, &v);
    if (rc < 0)
        return rc;
    for (uint32_t i = 0; i < f->routes.n && rc == 0; i++) {
        const struct fsm_route *r = v[i];
        rc = fn(ctx, r->name, r->name_len, r->json, r->json_len, r->version);
    }
    free(v);
    return rc;
}

uint64_t gw_fsm_routes_version(const struct gw_fsm *f)
{
    return f->route_version;
}

uint64_t gw_fsm_time(const struct gw_fsm *f)
{
    return f->time;
}

uint64_t gw_fsm_applied_index(const struct gw_fsm *f)
{
    return f->last_index;
}

static int cmp_u64p(const void *a, const void *b)
{
    return cmp_u64(*(const uint64_t *)a, *(const uint64_t *)b);
}

static int cmp_waiter_ref(const void *a, const void *b)
{
    return cmp_u64(((const struct gw_fsm_waiter_ref *)a)->waiter_id,
                   ((const struct gw_fsm_waiter_ref *)b)->waiter_id);
}

size_t gw_fsm_overdue_leases(const struct gw_fsm *f, uint64_t now_ms, uint64_t *ids, size_t max)
{
    uint64_t t = now_ms > f->time ? now_ms : f->time;
    size_t n = 0;
    HTAB_FOR(&f->leases, i)
    {
        const struct fsm_lease *l = f->leases.slots[i].p;
        if (n < max && t >= l->expires_at)
            ids[n++] = l->id;
    }
    if (n > 1)
        qsort(ids, n, sizeof(*ids), cmp_u64p);
    return n;
}

size_t gw_fsm_overdue_waiters(const struct gw_fsm *f, uint64_t now_ms, struct gw_fsm_waiter_ref *out,
                              size_t max)
{
    uint64_t t = now_ms > f->time ? now_ms : f->time;
    size_t n = 0;
    HTAB_FOR(&f->locks, i)
    {
        const struct fsm_lock *lk = f->locks.slots[i].p;
        for (const struct fsm_waiter *w = lk->q_head; w != NULL && n < max; w = w->q_next) {
            if (t < w->deadline)
                continue;
            out[n].waiter_id = w->id;
            out[n].name = lk->name;
            out[n].name_len = lk->name_len;
            n++;
        }
    }
    if (n > 1)
        qsort(out, n, sizeof(*out), cmp_waiter_ref);
    return n;
}

uint64_t gw_fsm_next_deadline(const struct gw_fsm *f)
{
    uint64_t next = UINT64_MAX;
    HTAB_FOR(&f->leases, i)
    {
        const struct fsm_lease *l = f->leases.slots[i].p;
        if (l->expires_at < next)
            next = l->expires_at;
    }
    HTAB_FOR(&f->locks, i)
    {
        const struct fsm_lock *lk = f->locks.slots[i].p;
        for (const struct fsm_waiter *w = lk->q_head; w != NULL; w = w->q_next)
            if (w->deadline < next)
                next = w->deadline;
    }
    return next;
}

void gw_fsm_stats(const struct gw_fsm *f, struct gw_fsm_stats *st)
{
    memset(st, 0, sizeof(*st));
    st->leases = f->leases.n;
    st->locks = f->locks.n;
    st->waiters = f->n_waiters;
    st->counters = f->counters.n;
    st->routes = f->routes.n;
    st->idem_records = f->idems.n;
    st->last_token = f->last_token;
    st->idem_evicted = f->idem_evicted;
    st->quotas = f->quotas.n;
    for (uint32_t i = 0; i < f->quotas.cap; i++)
        if (f->quotas.slots[i].p != NULL)
            st->quota_grants += ((const struct fsm_quota *)f->quotas.slots[i].p)->n_grants;
    st->gwidem_records = f->gwidems.n;
    st->gwidem_bytes = f->gw_bytes;
}
