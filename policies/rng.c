/* xoshiro256** with splitmix64 seeding; see rng.h for the references. */
#include "rng.h"

#include <assert.h>

static uint64_t splitmix64(uint64_t *x)
{
  uint64_t z = (*x += UINT64_C(0x9e3779b97f4a7c15));
  z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
  z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
  return z ^ (z >> 31);
}

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

void gw_rng_seed(struct gw_rng *rng, uint64_t seed)
{
  for (int i = 0; i < 4; i++)
    rng->s[i] = splitmix64(&seed);
}

uint64_t gw_rng_next(struct gw_rng *rng)
{
  uint64_t *s = rng->s;
  uint64_t result = rotl(s[1] * 5, 7) * 9;
  uint64_t t = s[1] << 17;
  s[2] ^= s[0];
  s[3] ^= s[1];
  s[1] ^= s[2];
  s[0] ^= s[3];
  s[2] ^= t;
  s[3] = rotl(s[3], 45);
  return result;
}

uint64_t gw_rng_below(struct gw_rng *rng, uint64_t n)
{
  assert(n > 0);
  /* Rejection sampling: draws from the largest multiple of n below 2^64 are unbiased. */
  uint64_t threshold = (0 - n) % n; /* 2^64 mod n */
  for (;;) {
    uint64_t r = gw_rng_next(rng);
    if (r >= threshold)
      return r % n;
  }
}

uint64_t gw_rng_between(struct gw_rng *rng, uint64_t lo, uint64_t hi)
{
  assert(lo <= hi);
  if (hi - lo == UINT64_MAX)
    return gw_rng_next(rng);
  return lo + gw_rng_below(rng, hi - lo + 1);
}
