/*
 * A small seeded pseudo-random generator for the decisions that need randomness (retry jitter).
 * xoshiro256** (Blackman and Vigna, "Scrambled linear pseudorandom number generators", 2018),
 * seeded through splitmix64 so any 64-bit seed gives a well-mixed state. Not cryptographic.
 * The caller owns one generator per thread (or per test, with a fixed seed, so a run replays
 * exactly); nothing here is shared.
 */
#ifndef GW_RNG_H
#define GW_RNG_H

#include <stdint.h>

struct gw_rng {
  uint64_t s[4];
};

/* Seeds rng from one 64-bit value; the same seed always gives the same sequence. */
void gw_rng_seed(struct gw_rng *rng, uint64_t seed);
/* The next 64 uniformly distributed bits. */
uint64_t gw_rng_next(struct gw_rng *rng);
/* A uniform integer in [0, n) without modulo bias; n must be > 0. */
uint64_t gw_rng_below(struct gw_rng *rng, uint64_t n);
/* A uniform integer in [lo, hi] (inclusive); lo <= hi. */
uint64_t gw_rng_between(struct gw_rng *rng, uint64_t lo, uint64_t hi);

#endif
