/*
 * Key table. Entries are addressed by 32-bit index into two parallel arrays:
 *   - meta[i]: LRU links, hash-chain link and 32 bits of the key's hash (16 bytes);
 *   - slots[i]: key length, key bytes, then the value blob.
 * Buckets hold the index of the first entry of their chain. Keeping the links and hash bits apart
 * from the keys and values means that walking a chain and relinking the LRU list touch only the
 * small, dense meta array (16 MB for a million keys, which largely stays in the last-level cache),
 * and a lookup reads one slot: the one whose key matches. Entries are handed out in order the
 * first time and reused from a free list after removals, so a table that never fills never
 * touches its tail pages.
 */
#include "key_table.h"

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define NIL UINT32_MAX

struct meta {
  uint32_t lru_prev; /* towards the most recently used end */
  uint32_t lru_next; /* towards the least recently used end */
  uint32_t chain_next;
  uint32_t h32; /* folded hash: its low bits pick the bucket, all of it filters the chain */
};

struct slot {
  uint16_t key_len;
  uint8_t digest; /* key bytes are a digest of a key longer than key_max_bytes */
  uint8_t used;
  uint32_t reserved;
};

struct gw_key_table {
  struct gw_key_table_config cfg;
  struct gw_hash_key digest_key[2];
  struct meta *meta;
  size_t meta_bytes;
  uint8_t *slots;
  size_t slots_bytes; /* mapped length of slots */
  size_t stride;
  size_t value_off;
  uint32_t *buckets;
  size_t buckets_bytes;
  uint32_t mask;
  uint32_t count;
  uint32_t mru; /* head of the LRU list */
  uint32_t lru; /* tail: the next victim */
  uint32_t free_head;
  uint32_t next_fresh; /* entries below this index have been used at least once */
  uint64_t inserts;
  uint64_t evictions;
};

static size_t round8(size_t n) { return (n + 7) & ~(size_t)7; }

/* At least two buckets per key: chains stay short (under 1.25 entries per successful lookup). */
static uint32_t bucket_count(uint32_t max_keys)
{
  uint32_t n = 2;
  while (n < 2 * (uint64_t)max_keys)
    n <<= 1;
  return n;
}

int gw_key_table_config_check(const struct gw_key_table_config *cfg)
{
  if (cfg->max_keys < 1 || cfg->max_keys > GW_KEY_TABLE_MAX_KEYS)
    return GW_POLICY_EINVALID_CONFIG;
  if (cfg->key_max_bytes < GW_KEY_TABLE_KEY_MIN || cfg->key_max_bytes > GW_KEY_TABLE_KEY_MAX)
    return GW_POLICY_EINVALID_CONFIG;
  if (cfg->value_bytes > GW_KEY_TABLE_VALUE_MAX)
    return GW_POLICY_EINVALID_CONFIG;
  return 0;
}

static size_t stride_of(const struct gw_key_table_config *cfg)
{
  return sizeof(struct slot) + round8(cfg->key_max_bytes) + round8(cfg->value_bytes);
}

size_t gw_key_table_memory_bytes(const struct gw_key_table_config *cfg)
{
  return (size_t)cfg->max_keys * (stride_of(cfg) + sizeof(struct meta)) +
         sizeof(uint32_t) * bucket_count(cfg->max_keys) + sizeof(struct gw_key_table);
}

/* An anonymous mapping: zero pages are handed out lazily, so unused slots cost address space
 * only. Big arrays ask for transparent huge pages: with random keys every lookup touches a
 * random bucket and slot, and with 4 KiB pages each such touch is also a TLB miss (a page walk,
 * which is much dearer under virtualisation). */
static void *map_zeroed(size_t bytes)
{
  void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED)
    return NULL;
#ifdef MADV_HUGEPAGE
  if (bytes >= (size_t)2 << 20)
    (void)madvise(p, bytes, MADV_HUGEPAGE); /* advice only; failure is fine */
#endif
  return p;
}

int gw_key_table_create(const struct gw_key_table_config *cfg, struct gw_key_table **out)
{
  int rc = gw_key_table_config_check(cfg);
  if (rc < 0)
    return rc;
  struct gw_key_table *t = calloc(1, sizeof(*t));
  if (!t)
    goto fail;
  t->cfg = *cfg;
  t->stride = stride_of(cfg);
  t->value_off = sizeof(struct slot) + round8(cfg->key_max_bytes);
  t->slots_bytes = (size_t)cfg->max_keys * t->stride;
  t->slots = map_zeroed(t->slots_bytes);
  if (!t->slots)
    goto free_table;
  t->meta_bytes = (size_t)cfg->max_keys * sizeof(struct meta);
  t->meta = map_zeroed(t->meta_bytes);
  if (!t->meta)
    goto free_slots;
  uint32_t nb = bucket_count(cfg->max_keys);
  t->buckets_bytes = sizeof(uint32_t) * nb;
  t->buckets = map_zeroed(t->buckets_bytes);
  if (!t->buckets)
    goto free_meta;
  memset(t->buckets, 0xff, t->buckets_bytes); /* all NIL */
  t->mask = nb - 1;
  t->mru = t->lru = t->free_head = NIL;
  t->digest_key[0] = (struct gw_hash_key){cfg->seed.k0 ^ UINT64_C(0x5bd1e9955bd1e995),
                                          cfg->seed.k1 ^ UINT64_C(0x9e3779b97f4a7c15)};
  t->digest_key[1] = (struct gw_hash_key){cfg->seed.k1 ^ UINT64_C(0xc2b2ae3d27d4eb4f),
                                          cfg->seed.k0 ^ UINT64_C(0x165667b19e3779f9)};
  *out = t;
  return 0;

free_meta:
  munmap(t->meta, t->meta_bytes);
free_slots:
  munmap(t->slots, t->slots_bytes);
free_table:
  free(t);
fail:
  return GW_POLICY_ENOMEM;
}

void gw_key_table_destroy(struct gw_key_table *t)
{
  if (!t)
    return;
  munmap(t->buckets, t->buckets_bytes);
  munmap(t->meta, t->meta_bytes);
  munmap(t->slots, t->slots_bytes);
  free(t);
}

static inline struct slot *slot_at(const struct gw_key_table *t, uint32_t i)
{
  return (struct slot *)(t->slots + (size_t)i * t->stride);
}

static inline uint8_t *key_of(struct slot *s) { return (uint8_t *)(s + 1); }

static inline void *value_of(const struct gw_key_table *t, uint32_t i)
{
  return t->slots + (size_t)i * t->stride + t->value_off;
}

/* The key as stored: itself, or a 16-byte digest when it is too long. */
struct ekey {
  const uint8_t *p;
  uint16_t len;
  uint8_t digest;
  uint8_t buf[16];
  uint32_t h32;
};

static void make_ekey(const struct gw_key_table *t, const void *key, size_t len, struct ekey *k)
{
  if (len <= t->cfg.key_max_bytes) {
    k->p = key;
    k->len = (uint16_t)len;
    k->digest = 0;
  } else {
    uint64_t a = gw_siphash(&t->digest_key[0], 2, 4, key, len);
    uint64_t b = gw_siphash(&t->digest_key[1], 2, 4, key, len);
    memcpy(k->buf, &a, 8);
    memcpy(k->buf + 8, &b, 8);
    k->p = k->buf;
    k->len = 16;
    k->digest = 1;
  }
  uint64_t h = gw_siphash(&t->cfg.seed, 1, 3, k->p, k->len) ^ k->digest;
  k->h32 = (uint32_t)(h ^ (h >> 32));
}

static uint32_t lookup(const struct gw_key_table *t, const struct ekey *k)
{
  for (uint32_t i = t->buckets[k->h32 & t->mask]; i != NIL; i = t->meta[i].chain_next) {
    if (t->meta[i].h32 != k->h32)
      continue;
    struct slot *s = slot_at(t, i);
    if (s->key_len == k->len && s->digest == k->digest && memcmp(key_of(s), k->p, k->len) == 0)
      return i;
  }
  return NIL;
}

static void lru_unlink(struct gw_key_table *t, uint32_t i)
{
  struct meta *m = &t->meta[i];
  if (m->lru_prev != NIL)
    t->meta[m->lru_prev].lru_next = m->lru_next;
  else
    t->mru = m->lru_next;
  if (m->lru_next != NIL)
    t->meta[m->lru_next].lru_prev = m->lru_prev;
  else
    t->lru = m->lru_prev;
}

static void lru_push_front(struct gw_key_table *t, uint32_t i)
{
  struct meta *m = &t->meta[i];
  m->lru_prev = NIL;
  m->lru_next = t->mru;
  if (t->mru != NIL)
    t->meta[t->mru].lru_prev = i;
  t->mru = i;
  if (t->lru == NIL)
    t->lru = i;
}

static void touch(struct gw_key_table *t, uint32_t i)
{
  if (t->mru == i)
    return;
  lru_unlink(t, i);
  lru_push_front(t, i);
}

static void chain_unlink(struct gw_key_table *t, uint32_t i)
{
  uint32_t *link = &t->buckets[t->meta[i].h32 & t->mask];
  while (*link != i)
    link = &t->meta[*link].chain_next;
  *link = t->meta[i].chain_next;
}

/* Unlinks entry i from everything and puts it on the free list. */
static void drop(struct gw_key_table *t, uint32_t i)
{
  chain_unlink(t, i);
  lru_unlink(t, i);
  slot_at(t, i)->used = 0;
  t->meta[i].chain_next = t->free_head;
  t->free_head = i;
  t->count--;
}

void *gw_key_table_find(struct gw_key_table *t, const void *key, size_t len)
{
  struct ekey k;
  make_ekey(t, key, len, &k);
  uint32_t i = lookup(t, &k);
  if (i == NIL)
    return NULL;
  touch(t, i);
  return value_of(t, i);
}

bool gw_key_table_contains(const struct gw_key_table *t, const void *key, size_t len)
{
  struct ekey k;
  make_ekey(t, key, len, &k);
  return lookup(t, &k) != NIL;
}

int gw_key_table_get_or_insert(struct gw_key_table *t, const void *key, size_t len, void **value,
                               unsigned *flags)
{
  struct ekey k;
  unsigned f = 0;
  make_ekey(t, key, len, &k);
  uint32_t i = lookup(t, &k);
  if (i != NIL) {
    touch(t, i);
    goto out;
  }
  if (t->count == t->cfg.max_keys) {
    drop(t, t->lru);
    t->evictions++;
    f |= GW_KEY_TABLE_EVICTED;
  }
  if (t->free_head != NIL) {
    i = t->free_head;
    t->free_head = t->meta[i].chain_next;
  } else {
    i = t->next_fresh++;
  }
  struct slot *s = slot_at(t, i);
  s->key_len = k.len;
  s->digest = k.digest;
  s->used = 1;
  memcpy(key_of(s), k.p, k.len);
  memset(value_of(t, i), 0, t->cfg.value_bytes);
  uint32_t *b = &t->buckets[k.h32 & t->mask];
  t->meta[i].h32 = k.h32;
  t->meta[i].chain_next = *b;
  *b = i;
  lru_push_front(t, i);
  t->count++;
  t->inserts++;
  f |= GW_KEY_TABLE_CREATED;
out:
  *value = value_of(t, i);
  if (flags)
    *flags = f;
  return 0;
}

int gw_key_table_remove(struct gw_key_table *t, const void *key, size_t len)
{
  struct ekey k;
  make_ekey(t, key, len, &k);
  uint32_t i = lookup(t, &k);
  if (i == NIL)
    return GW_POLICY_ENOT_FOUND;
  drop(t, i);
  return 0;
}

void gw_key_table_stats(const struct gw_key_table *t, struct gw_key_table_stats *out)
{
  out->count = t->count;
  out->max_keys = t->cfg.max_keys;
  out->inserts = t->inserts;
  out->evictions = t->evictions;
}
