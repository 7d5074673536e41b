/*
 * Token bucket arithmetic in nano-tokens; see token_bucket.h. The refill is computed from the
 * elapsed time since the last update with no division, so it is exact: refill_per_sec tokens per
 * second is refill_per_sec nano-tokens per nanosecond.
 */
#include "token_bucket.h"

#include <assert.h>

#define NANO UINT64_C(1000000000)

int gw_token_bucket_config_check(const struct gw_token_bucket_config *cfg)
{
  if (cfg->capacity < 1 || cfg->capacity > GW_TOKEN_BUCKET_CAPACITY_MAX)
    return GW_POLICY_EINVALID_CONFIG;
  if (cfg->refill_per_sec < 1 || cfg->refill_per_sec > GW_TOKEN_BUCKET_REFILL_MAX)
    return GW_POLICY_EINVALID_CONFIG;
  return 0;
}

void gw_token_bucket_init(struct gw_token_bucket *b, const struct gw_token_bucket_config *cfg,
                          uint64_t now_ns)
{
  b->nanotokens = cfg->capacity * NANO;
  b->updated_ns = now_ns;
}

static void refill(struct gw_token_bucket *b, const struct gw_token_bucket_config *cfg,
                   uint64_t now_ns)
{
  if (now_ns <= b->updated_ns)
    return; /* same instant, or a clock reading from the past: nothing accrues */
  uint64_t elapsed = now_ns - b->updated_ns;
  uint64_t full = cfg->capacity * NANO;
  b->updated_ns = now_ns;
  if (b->nanotokens >= full) {
    b->nanotokens = full; /* also clamps a bucket kept across a config change to less capacity */
    return;
  }
  uint64_t need = full - b->nanotokens;
  /* elapsed * rate may overflow; compare against the time to fill instead. */
  if (elapsed >= need / cfg->refill_per_sec + 1)
    b->nanotokens = full;
  else
    b->nanotokens += elapsed * cfg->refill_per_sec; /* <= need: no overflow */
}

bool gw_token_bucket_try_take(struct gw_token_bucket *b, const struct gw_token_bucket_config *cfg,
                              uint64_t n, uint64_t now_ns)
{
  refill(b, cfg, now_ns);
  if (n > cfg->capacity || b->nanotokens < n * NANO)
    return false;
  b->nanotokens -= n * NANO;
  return true;
}

void gw_token_bucket_give(struct gw_token_bucket *b, const struct gw_token_bucket_config *cfg,
                          uint64_t n, uint64_t now_ns)
{
  refill(b, cfg, now_ns);
  uint64_t full = cfg->capacity * NANO;
  if (n >= cfg->capacity || b->nanotokens + n * NANO > full)
    b->nanotokens = full;
  else
    b->nanotokens += n * NANO;
}

uint64_t gw_token_bucket_available(struct gw_token_bucket *b,
                                   const struct gw_token_bucket_config *cfg, uint64_t now_ns)
{
  refill(b, cfg, now_ns);
  return b->nanotokens / NANO;
}

/* Time until the bucket holds target nano-tokens, after a refill at now. */
static uint64_t wait_for(const struct gw_token_bucket *b, const struct gw_token_bucket_config *cfg,
                         uint64_t target)
{
  if (b->nanotokens >= target)
    return 0;
  uint64_t missing = target - b->nanotokens;
  return missing / cfg->refill_per_sec + (missing % cfg->refill_per_sec != 0);
}

uint64_t gw_token_bucket_wait_ns(struct gw_token_bucket *b,
                                 const struct gw_token_bucket_config *cfg, uint64_t n,
                                 uint64_t now_ns)
{
  refill(b, cfg, now_ns);
  if (n > cfg->capacity)
    return UINT64_MAX;
  return wait_for(b, cfg, n * NANO);
}

bool gw_token_bucket_admit(struct gw_token_bucket *b, const struct gw_token_bucket_config *cfg,
                           uint64_t now_ns, struct gw_ratelimit_info *info)
{
  refill(b, cfg, now_ns);
  bool ok = b->nanotokens >= NANO;
  if (ok)
    b->nanotokens -= NANO;
  if (info) {
    uint64_t next_ns = wait_for(b, cfg, NANO);
    info->limit = cfg->capacity;
    info->window_s =
        cfg->capacity / cfg->refill_per_sec + (cfg->capacity % cfg->refill_per_sec != 0);
    info->remaining = b->nanotokens / NANO;
    info->reset_s = gw_ns_to_s_ceil(wait_for(b, cfg, cfg->capacity * NANO));
    info->next_s = gw_ns_to_s_ceil(next_ns);
    info->retry_after_s = ok ? 0 : (info->next_s > 0 ? info->next_s : 1);
  }
  return ok;
}
