/* SipHash as specified in the 2012 paper (see hash.h), with the round counts as parameters. */
#include "hash.h"

#include <string.h>

static inline uint64_t rotl(uint64_t x, int b) { return (x << b) | (x >> (64 - b)); }

static inline uint64_t load_le64(const uint8_t *p)
{
  uint64_t v = 0;
  for (int i = 7; i >= 0; i--)
    v = (v << 8) | p[i];
  return v;
}

#define SIPROUND(v0, v1, v2, v3)                                                                   \
  do {                                                                                             \
    v0 += v1;                                                                                      \
    v1 = rotl(v1, 13);                                                                             \
    v1 ^= v0;                                                                                      \
    v0 = rotl(v0, 32);                                                                             \
    v2 += v3;                                                                                      \
    v3 = rotl(v3, 16);                                                                             \
    v3 ^= v2;                                                                                      \
    v0 += v3;                                                                                      \
    v3 = rotl(v3, 21);                                                                             \
    v3 ^= v0;                                                                                      \
    v2 += v1;                                                                                      \
    v1 = rotl(v1, 17);                                                                             \
    v1 ^= v2;                                                                                      \
    v2 = rotl(v2, 32);                                                                             \
  } while (0)

uint64_t gw_siphash(const struct gw_hash_key *key, int c_rounds, int d_rounds, const void *data,
                    size_t len)
{
  const uint8_t *p = data;
  uint64_t v0 = key->k0 ^ UINT64_C(0x736f6d6570736575);
  uint64_t v1 = key->k1 ^ UINT64_C(0x646f72616e646f6d);
  uint64_t v2 = key->k0 ^ UINT64_C(0x6c7967656e657261);
  uint64_t v3 = key->k1 ^ UINT64_C(0x7465646279746573);
  size_t full = len & ~(size_t)7;
  for (size_t i = 0; i < full; i += 8) {
    uint64_t m;
    memcpy(&m, p + i, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    m = load_le64(p + i);
#endif
    v3 ^= m;
    for (int r = 0; r < c_rounds; r++)
      SIPROUND(v0, v1, v2, v3);
    v0 ^= m;
  }
  uint64_t b = (uint64_t)len << 56;
  for (size_t i = 0; i < (len & 7); i++)
    b |= (uint64_t)p[full + i] << (8 * i);
  v3 ^= b;
  for (int r = 0; r < c_rounds; r++)
    SIPROUND(v0, v1, v2, v3);
  v0 ^= b;
  v2 ^= 0xff;
  for (int r = 0; r < d_rounds; r++)
    SIPROUND(v0, v1, v2, v3);
  return v0 ^ v1 ^ v2 ^ v3;
}

void gw_siphash24_init(struct gw_siphash_state *st, const struct gw_hash_key *key)
{
  st->v0 = key->k0 ^ UINT64_C(0x736f6d6570736575);
  st->v1 = key->k1 ^ UINT64_C(0x646f72616e646f6d);
  st->v2 = key->k0 ^ UINT64_C(0x6c7967656e657261);
  st->v3 = key->k1 ^ UINT64_C(0x7465646279746573);
  st->tail = 0;
  st->tail_len = 0;
  st->total = 0;
}

static void compress24(struct gw_siphash_state *st, uint64_t m)
{
  st->v3 ^= m;
  SIPROUND(st->v0, st->v1, st->v2, st->v3);
  SIPROUND(st->v0, st->v1, st->v2, st->v3);
  st->v0 ^= m;
}

void gw_siphash24_update(struct gw_siphash_state *st, const void *data, size_t len)
{
  const uint8_t *p = data;
  st->total += len;
  while (len > 0 && st->tail_len > 0) {
    st->tail |= (uint64_t)*p++ << (8 * st->tail_len);
    len--;
    if (++st->tail_len == 8) {
      compress24(st, st->tail);
      st->tail = 0;
      st->tail_len = 0;
    }
  }
  while (len >= 8) {
    compress24(st, load_le64(p));
    p += 8;
    len -= 8;
  }
  while (len > 0) {
    st->tail |= (uint64_t)*p++ << (8 * st->tail_len++);
    len--;
  }
}

uint64_t gw_siphash24_final(struct gw_siphash_state *st)
{
  uint64_t b = (st->total << 56) | st->tail;
  compress24(st, b);
  st->v2 ^= 0xff;
  for (int r = 0; r < 4; r++)
    SIPROUND(st->v0, st->v1, st->v2, st->v3);
  return st->v0 ^ st->v1 ^ st->v2 ^ st->v3;
}
