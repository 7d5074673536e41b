/* Degradation decisions, the concurrency limit and the slow detector; see degradation.h. */
#include "degradation.h"

#include <string.h>

int gw_degrade_config_check(const struct gw_degrade_config *cfg)
{
  if (cfg->on & ~((1u << GW_DEGRADE_REASONS) - 1))
    return GW_POLICY_EINVALID_CONFIG;
  if (cfg->slow_ms > 0 && (cfg->slow_window_ms < 1 || cfg->slow_window_ms > UINT64_C(86400000)))
    return GW_POLICY_EINVALID_CONFIG;
  if (cfg->stale_if_error_ms > UINT64_MAX / GW_NS_PER_MS)
    return GW_POLICY_EINVALID_CONFIG;
  return 0;
}

void gw_degrade_init(struct gw_degrade *d) { memset(d, 0, sizeof(*d)); }

void gw_degrade_set_mode(struct gw_degrade *d, enum gw_degrade_mode mode) { d->mode = mode; }

static uint64_t slot_ns(const struct gw_degrade_config *cfg)
{
  uint64_t ns = cfg->slow_window_ms * GW_NS_PER_MS / GW_DEGRADE_SLOW_SLOTS;
  return ns > 0 ? ns : 1;
}

/* Moves the detector to now's slot, dropping the slots that left the window. */
static void roll(struct gw_degrade *d, const struct gw_degrade_config *cfg, uint64_t now_ns)
{
  uint64_t slot = now_ns / slot_ns(cfg);
  if (slot <= d->slot)
    return;
  if (slot - d->slot >= GW_DEGRADE_SLOW_SLOTS) {
    memset(d->slot_sum_ms, 0, sizeof(d->slot_sum_ms));
    memset(d->slot_count, 0, sizeof(d->slot_count));
    d->sum_ms = d->count = 0;
  } else {
    for (uint64_t s = d->slot + 1; s <= slot; s++) {
      uint32_t i = (uint32_t)(s % GW_DEGRADE_SLOW_SLOTS);
      d->sum_ms -= d->slot_sum_ms[i];
      d->count -= d->slot_count[i];
      d->slot_sum_ms[i] = 0;
      d->slot_count[i] = 0;
    }
  }
  d->slot = slot;
}

void gw_degrade_record_latency(struct gw_degrade *d, const struct gw_degrade_config *cfg,
                               uint64_t latency_ms, uint64_t now_ns)
{
  if (cfg->slow_ms == 0)
    return;
  roll(d, cfg, now_ns);
  uint32_t i = (uint32_t)(d->slot % GW_DEGRADE_SLOW_SLOTS);
  d->slot_sum_ms[i] = gw_sat_add(d->slot_sum_ms[i], latency_ms);
  d->slot_count[i]++;
  d->sum_ms = gw_sat_add(d->sum_ms, latency_ms);
  d->count++;
}

uint64_t gw_degrade_mean_latency_ms(struct gw_degrade *d, const struct gw_degrade_config *cfg,
                                    uint64_t now_ns)
{
  if (cfg->slow_ms == 0)
    return 0;
  roll(d, cfg, now_ns);
  return d->count ? d->sum_ms / d->count : 0;
}

bool gw_degrade_is_slow(struct gw_degrade *d, const struct gw_degrade_config *cfg, uint64_t now_ns)
{
  if (cfg->slow_ms == 0)
    return false;
  roll(d, cfg, now_ns);
  /* mean > slow_ms without the rounding of a division */
  return d->count > 0 && d->sum_ms > gw_sat_mul(cfg->slow_ms, d->count);
}

bool gw_degrade_admit(struct gw_degrade *d, const struct gw_degrade_config *cfg, uint64_t now_ns,
                      enum gw_degrade_reason *reason)
{
  if (d->mode == GW_DEGRADE_FORCED_MODE) {
    *reason = GW_DEGRADE_FORCED;
    return false;
  }
  if ((cfg->on & GW_DEGRADE_ON(GW_DEGRADE_SLOW)) && gw_degrade_is_slow(d, cfg, now_ns)) {
    *reason = GW_DEGRADE_SLOW;
    return false;
  }
  if (cfg->max_concurrent > 0 && d->in_flight >= cfg->max_concurrent) {
    d->shed++;
    *reason = GW_DEGRADE_SHED;
    return false;
  }
  d->in_flight++;
  return true;
}

void gw_degrade_leave(struct gw_degrade *d)
{
  if (d->in_flight > 0)
    d->in_flight--;
}

bool gw_degrade_may_serve_stale(const struct gw_degrade_config *cfg, const char *method,
                                size_t method_len, uint64_t stored_ns, uint64_t now_ns)
{
  if (cfg->stale_if_error_ms == 0 || method_len != 3 || memcmp(method, "GET", 3) != 0)
    return false;
  if (now_ns < stored_ns)
    return true; /* stored "in the future" by a clock reading from the past: age 0 */
  return now_ns - stored_ns < cfg->stale_if_error_ms * GW_NS_PER_MS;
}

void gw_degrade_decide(struct gw_degrade *d, const struct gw_degrade_config *cfg,
                       enum gw_degrade_reason reason, const char *method, size_t method_len,
                       bool have_stale, uint64_t stale_stored_ns, uint64_t now_ns,
                       struct gw_degrade_decision *out)
{
  out->action = GW_DEGRADE_PROCEED;
  out->header = reason;
  if (reason != GW_DEGRADE_FORCED && !(cfg->on & GW_DEGRADE_ON(reason)))
    return;
  if (have_stale && gw_degrade_may_serve_stale(cfg, method, method_len, stale_stored_ns, now_ns)) {
    out->action = GW_DEGRADE_SERVE_STALE;
    out->header = GW_DEGRADE_STALE;
  } else if (cfg->has_fallback) {
    out->action = GW_DEGRADE_SERVE_FALLBACK;
  } else {
    return;
  }
  d->degraded[out->header]++;
}

const char *gw_degrade_reason_name(enum gw_degrade_reason reason)
{
  static const char *const names[GW_DEGRADE_REASONS] = {"circuit_open", "upstream_error", "shed",
                                                        "slow",         "forced",         "stale"};
  if ((unsigned)reason >= GW_DEGRADE_REASONS)
    return "unknown";
  return names[reason];
}
