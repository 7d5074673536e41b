/*
 * Idempotency store: chained hash table of malloc'd records plus two lists. In-flight records
 * sit in their own list and never expire: a claim lasts as long as its request (however long
 * that is next to ttl_ms), or a duplicate would execute a second time. A completed record moves
 * to the other list, in completion order, which is also expiry order because a store has one
 * TTL, counted from completion. See idempotency.h for the rules.
 */
#include "idempotency.h"

#include <stdlib.h>
#include <string.h>

enum { IN_FLIGHT = 1, COMPLETED = 2 };

struct record {
  struct record *chain_next;
  struct record *older, *newer; /* creation order */
  uint64_t hash;
  uint64_t id;
  uint64_t expires_ns;
  struct gw_idem_fingerprint fp;
  uint8_t *resp; /* headers then body, owned */
  size_t headers_len, body_len;
  int status;
  uint8_t state;
  uint16_t route_len;
  uint16_t key_len;
  char name[]; /* route bytes then key bytes */
};

struct gw_idem_store {
  struct gw_idem_config cfg;
  struct record **buckets;
  uint64_t mask;
  struct record *oldest, *newest;       /* completed, in expiry order */
  struct record *fl_oldest, *fl_newest; /* in flight */
  uint64_t next_id;
  uint32_t records, in_flight;
  uint64_t bytes;
  uint64_t expired, full, replays;
};

/* Fixed keys for the fingerprint: its value must not depend on a process secret, so that a
 * cluster backend can compare fingerprints computed on different nodes. */
static const struct gw_hash_key fp_key_hi = {UINT64_C(0x6964656d706f7465),
                                             UINT64_C(0x6e742d6b65792d31)};
static const struct gw_hash_key fp_key_lo = {UINT64_C(0x726571756573742d),
                                             UINT64_C(0x66696e6765727032)};

int gw_idem_config_check(const struct gw_idem_config *cfg)
{
  if (cfg->max_records < 1 || cfg->max_records > (UINT32_C(1) << 24))
    return GW_POLICY_EINVALID_CONFIG;
  if (cfg->max_bytes < 4096)
    return GW_POLICY_EINVALID_CONFIG;
  if (cfg->ttl_ms < 1 || cfg->ttl_ms > UINT64_MAX / GW_NS_PER_MS)
    return GW_POLICY_EINVALID_CONFIG;
  return 0;
}

int gw_idem_create(const struct gw_idem_config *cfg, struct gw_idem_store **out)
{
  int rc = gw_idem_config_check(cfg);
  if (rc < 0)
    return rc;
  struct gw_idem_store *st = calloc(1, sizeof(*st));
  if (!st)
    return GW_POLICY_ENOMEM;
  uint64_t nb = 1;
  while (nb < cfg->max_records)
    nb <<= 1;
  st->buckets = calloc(nb, sizeof(*st->buckets));
  if (!st->buckets) {
    free(st);
    return GW_POLICY_ENOMEM;
  }
  st->cfg = *cfg;
  st->mask = nb - 1;
  st->next_id = 1;
  *out = st;
  return 0;
}

static void free_record(struct record *r)
{
  free(r->resp);
  free(r);
}

void gw_idem_destroy(struct gw_idem_store *st)
{
  if (!st)
    return;
  struct record *lists[2] = {st->oldest, st->fl_oldest};
  for (int i = 0; i < 2; i++)
    for (struct record *r = lists[i]; r;) {
      struct record *next = r->newer;
      free_record(r);
      r = next;
    }
  free(st->buckets);
  free(st);
}

enum gw_idem_key_status gw_idem_key_check(const char *key, size_t len, bool required)
{
  if (!key)
    return required ? GW_IDEM_KEY_MISSING : GW_IDEM_KEY_ABSENT;
  if (len == 0 || len > GW_IDEM_KEY_MAX)
    return GW_IDEM_KEY_INVALID;
  for (size_t i = 0; i < len; i++) {
    unsigned char c = (unsigned char)key[i];
    if (c < 0x20 || c > 0x7e)
      return GW_IDEM_KEY_INVALID;
  }
  return GW_IDEM_KEY_VALID;
}

static void absorb_field(struct gw_siphash_state *a, struct gw_siphash_state *b, const void *p,
                         size_t len)
{
  uint8_t n[8];
  for (int i = 0; i < 8; i++)
    n[i] = (uint8_t)((uint64_t)len >> (8 * i));
  gw_siphash24_update(a, n, 8);
  gw_siphash24_update(b, n, 8);
  gw_siphash24_update(a, p, len);
  gw_siphash24_update(b, p, len);
}

void gw_idem_fingerprint(const char *method, size_t method_len, const char *path, size_t path_len,
                         const void *body, size_t body_len, struct gw_idem_fingerprint *out)
{
  struct gw_siphash_state a, b;
  gw_siphash24_init(&a, &fp_key_hi);
  gw_siphash24_init(&b, &fp_key_lo);
  absorb_field(&a, &b, method, method_len);
  absorb_field(&a, &b, path, path_len);
  absorb_field(&a, &b, body, body_len);
  out->hi = gw_siphash24_final(&a);
  out->lo = gw_siphash24_final(&b);
}

static uint64_t name_hash(const struct gw_idem_store *st, const char *route, size_t route_len,
                          const char *key, size_t key_len)
{
  /* Length-prefix the route so that ("ab", "c") and ("a", "bc") differ. */
  struct gw_siphash_state h;
  uint8_t n[2] = {(uint8_t)route_len, (uint8_t)(route_len >> 8)};
  gw_siphash24_init(&h, &st->cfg.seed);
  gw_siphash24_update(&h, n, 2);
  gw_siphash24_update(&h, route, route_len);
  gw_siphash24_update(&h, key, key_len);
  return gw_siphash24_final(&h);
}

static size_t record_bytes(const struct record *r)
{
  return sizeof(*r) + r->route_len + r->key_len + r->headers_len + r->body_len;
}

/* Take r off its list (in flight or completed). */
static void list_unlink(struct gw_idem_store *st, struct record *r)
{
  struct record **oldest = r->state == IN_FLIGHT ? &st->fl_oldest : &st->oldest;
  struct record **newest = r->state == IN_FLIGHT ? &st->fl_newest : &st->newest;
  if (r->older)
    r->older->newer = r->newer;
  else
    *oldest = r->newer;
  if (r->newer)
    r->newer->older = r->older;
  else
    *newest = r->older;
  r->older = r->newer = NULL;
}

/* Append r to the newest end of its list. */
static void list_append(struct gw_idem_store *st, struct record *r)
{
  struct record **oldest = r->state == IN_FLIGHT ? &st->fl_oldest : &st->oldest;
  struct record **newest = r->state == IN_FLIGHT ? &st->fl_newest : &st->newest;
  r->older = *newest;
  r->newer = NULL;
  if (*newest)
    (*newest)->newer = r;
  else
    *oldest = r;
  *newest = r;
}

static void unlink_record(struct gw_idem_store *st, struct record *r)
{
  struct record **link = &st->buckets[r->hash & st->mask];
  while (*link != r)
    link = &(*link)->chain_next;
  *link = r->chain_next;
  list_unlink(st, r);
  st->records--;
  st->in_flight -= r->state == IN_FLIGHT;
  st->bytes -= record_bytes(r);
  free_record(r);
}

size_t gw_idem_expire(struct gw_idem_store *st, uint64_t now_ns, size_t max)
{
  size_t n = 0;
  while (n < max && st->oldest && st->oldest->expires_ns <= now_ns) {
    unlink_record(st, st->oldest);
    st->expired++;
    n++;
  }
  return n;
}

static struct record *find(struct gw_idem_store *st, uint64_t hash, const char *route,
                           size_t route_len, const char *key, size_t key_len)
{
  for (struct record *r = st->buckets[hash & st->mask]; r; r = r->chain_next)
    if (r->hash == hash && r->route_len == route_len && r->key_len == key_len &&
        memcmp(r->name, route, route_len) == 0 && memcmp(r->name + route_len, key, key_len) == 0)
      return r;
  return NULL;
}

int gw_idem_begin(struct gw_idem_store *st, const char *route, size_t route_len, const char *key,
                  size_t key_len, const struct gw_idem_fingerprint *fp, uint64_t now_ns,
                  enum gw_idem_decision *decision, struct gw_idem_claim *claim,
                  struct gw_idem_response *replay)
{
  if (route_len > UINT16_MAX || key_len > GW_IDEM_KEY_MAX)
    return GW_POLICY_ETOO_LARGE;
  gw_idem_expire(st, now_ns, 4); /* amortised reclaiming */
  uint64_t hash = name_hash(st, route, route_len, key, key_len);
  struct record *r = find(st, hash, route, route_len, key, key_len);
  if (r && r->expires_ns <= now_ns) {
    /* Only reachable if expiry lags; the creation-order list makes this the oldest records. */
    gw_idem_expire(st, now_ns, SIZE_MAX);
    r = NULL;
  }
  if (r) {
    if (r->fp.hi != fp->hi || r->fp.lo != fp->lo) {
      *decision = GW_IDEM_MISMATCH;
    } else if (r->state == IN_FLIGHT) {
      *decision = GW_IDEM_IN_FLIGHT;
    } else {
      *decision = GW_IDEM_REPLAY;
      replay->status = r->status;
      replay->headers = r->resp;
      replay->headers_len = r->headers_len;
      replay->body = r->resp ? r->resp + r->headers_len : NULL;
      replay->body_len = r->body_len;
      st->replays++;
    }
    return 0;
  }
  size_t need = sizeof(struct record) + route_len + key_len;
  if (st->records >= st->cfg.max_records || st->bytes + need > st->cfg.max_bytes)
    gw_idem_expire(st, now_ns, SIZE_MAX);
  if (st->records >= st->cfg.max_records || st->bytes + need > st->cfg.max_bytes) {
    st->full++;
    return GW_POLICY_EFULL;
  }
  r = calloc(1, need);
  if (!r)
    return GW_POLICY_ENOMEM;
  r->hash = hash;
  r->id = st->next_id++;
  r->expires_ns = UINT64_MAX; /* set when the request completes */
  r->fp = *fp;
  r->state = IN_FLIGHT;
  r->route_len = (uint16_t)route_len;
  r->key_len = (uint16_t)key_len;
  memcpy(r->name, route, route_len);
  memcpy(r->name + route_len, key, key_len);
  struct record **b = &st->buckets[hash & st->mask];
  r->chain_next = *b;
  *b = r;
  list_append(st, r);
  st->records++;
  st->in_flight++;
  st->bytes += need;
  claim->id = r->id;
  claim->hash = hash;
  *decision = GW_IDEM_EXECUTE;
  return 0;
}

static struct record *claimed(struct gw_idem_store *st, const struct gw_idem_claim *claim)
{
  for (struct record *r = st->buckets[claim->hash & st->mask]; r; r = r->chain_next)
    if (r->id == claim->id)
      return r->state == IN_FLIGHT ? r : NULL;
  return NULL;
}

bool gw_idem_should_store(enum gw_idem_origin origin)
{
  return origin == GW_IDEM_FROM_UPSTREAM || origin == GW_IDEM_UPSTREAM_TIMEOUT;
}

int gw_idem_release(struct gw_idem_store *st, const struct gw_idem_claim *claim)
{
  struct record *r = claimed(st, claim);
  if (!r)
    return GW_POLICY_ESTALE;
  unlink_record(st, r);
  return 0;
}

int gw_idem_complete(struct gw_idem_store *st, const struct gw_idem_claim *claim,
                     const struct gw_idem_response *resp, uint64_t now_ns)
{
  struct record *r = claimed(st, claim);
  if (!r)
    return GW_POLICY_ESTALE;
  size_t len = resp->headers_len + resp->body_len;
  if (len < resp->headers_len || len > st->cfg.max_bytes) {
    st->full++;
    unlink_record(st, r);
    return GW_POLICY_ETOO_LARGE;
  }
  if (st->bytes + len > st->cfg.max_bytes) {
    /* Reclaim expired records (the one being completed is in flight: not among them). */
    gw_idem_expire(st, now_ns, SIZE_MAX);
    if (st->bytes + len > st->cfg.max_bytes) {
      st->full++;
      unlink_record(st, r);
      return GW_POLICY_EFULL;
    }
  }
  uint8_t *buf = NULL;
  if (len > 0) {
    buf = malloc(len);
    if (!buf) {
      unlink_record(st, r);
      return GW_POLICY_ENOMEM;
    }
    if (resp->headers_len)
      memcpy(buf, resp->headers, resp->headers_len);
    if (resp->body_len)
      memcpy(buf + resp->headers_len, resp->body, resp->body_len);
  }
  r->resp = buf;
  r->headers_len = resp->headers_len;
  r->body_len = resp->body_len;
  r->status = resp->status;
  list_unlink(st, r);
  r->state = COMPLETED;
  r->expires_ns = gw_sat_add(now_ns, st->cfg.ttl_ms * GW_NS_PER_MS);
  list_append(st, r);
  st->in_flight--;
  st->bytes += len;
  return 0;
}

int gw_idem_finish(struct gw_idem_store *st, const struct gw_idem_claim *claim,
                   enum gw_idem_origin origin, const struct gw_idem_response *resp, uint64_t now_ns)
{
  if (gw_idem_should_store(origin))
    return gw_idem_complete(st, claim, resp, now_ns);
  return gw_idem_release(st, claim);
}

void gw_idem_stats(const struct gw_idem_store *st, struct gw_idem_stats *out)
{
  out->records = st->records;
  out->in_flight = st->in_flight;
  out->bytes = st->bytes;
  out->expired = st->expired;
  out->full = st->full;
  out->replays = st->replays;
}
