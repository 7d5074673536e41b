/*
 * Ring of (rounded-up time, count) runs; see sliding_window.h for why this is exact and what it
 * costs. Expiry pops whole runs from the head; admission appends to the tail or bumps its count.
 */
#include "sliding_window.h"

static uint64_t gran(const struct gw_sliding_window_config *cfg)
{
  return cfg->granularity_ns > 1 ? cfg->granularity_ns : 1;
}

static uint64_t window_ns(const struct gw_sliding_window_config *cfg)
{
  return cfg->window_ms * GW_NS_PER_MS;
}

static uint32_t runs_cap(const struct gw_sliding_window_config *cfg)
{
  /* Run times are distinct multiples of g within (t - W, ceil_g(t)]: at most W/g + 1 of them,
   * +1 for slack; and each run holds at least one of at most `limit` admissions. */
  uint64_t by_time = window_ns(cfg) / gran(cfg) + 2;
  uint64_t cap = cfg->limit < by_time ? cfg->limit : by_time;
  return (uint32_t)cap;
}

int gw_sliding_window_config_check(const struct gw_sliding_window_config *cfg)
{
  if (cfg->limit < 1 || cfg->limit > GW_SLIDING_WINDOW_LIMIT_MAX)
    return GW_POLICY_EINVALID_CONFIG;
  if (cfg->window_ms < 1 || cfg->window_ms > GW_SLIDING_WINDOW_MS_MAX)
    return GW_POLICY_EINVALID_CONFIG;
  if (cfg->granularity_ns > window_ns(cfg))
    return GW_POLICY_EINVALID_CONFIG;
  return 0;
}

size_t gw_sliding_window_state_bytes(const struct gw_sliding_window_config *cfg)
{
  size_t cap = runs_cap(cfg);
  size_t bytes = sizeof(struct gw_sliding_window) + cap * sizeof(uint64_t) + cap * sizeof(uint32_t);
  return (bytes + 7) & ~(size_t)7;
}

void gw_sliding_window_init(struct gw_sliding_window *w, const struct gw_sliding_window_config *cfg)
{
  w->total = 0;
  w->head = 0;
  w->len = 0;
  w->cap = runs_cap(cfg);
  w->reserved = 0;
}

static inline uint32_t *counts(struct gw_sliding_window *w)
{
  return (uint32_t *)(w->runs + w->cap);
}

static inline uint32_t slot(const struct gw_sliding_window *w, uint32_t i)
{
  uint32_t s = w->head + i;
  return s >= w->cap ? s - w->cap : s;
}

/* Drops runs that have left (now - W, now]: a run at time a is inside iff a > now - W. */
static void expire(struct gw_sliding_window *w, const struct gw_sliding_window_config *cfg,
                   uint64_t now_ns)
{
  uint64_t wn = window_ns(cfg);
  uint32_t *cnt = counts(w);
  while (w->len > 0) {
    uint32_t h = w->head;
    if (gw_sat_add(w->runs[h], wn) > now_ns)
      break;
    w->total -= cnt[h];
    w->head = h + 1 == w->cap ? 0 : h + 1;
    w->len--;
  }
  if (w->len == 0)
    w->head = 0;
}

static void fill_info(struct gw_sliding_window *w, const struct gw_sliding_window_config *cfg,
                      uint64_t now_ns, bool ok, struct gw_ratelimit_info *info)
{
  uint64_t wn = window_ns(cfg);
  info->limit = cfg->limit;
  info->window_s = gw_ns_to_s_ceil(wn);
  info->remaining = w->total < cfg->limit ? cfg->limit - w->total : 0;
  if (w->len == 0) {
    info->reset_s = 0;
    info->next_s = 0;
  } else {
    uint64_t newest = w->runs[slot(w, w->len - 1)];
    uint64_t oldest = w->runs[w->head];
    info->reset_s = gw_ns_to_s_ceil(gw_sat_add(newest, wn) - now_ns);
    info->next_s = info->remaining > 0 ? 0 : gw_ns_to_s_ceil(gw_sat_add(oldest, wn) - now_ns);
  }
  info->retry_after_s = ok ? 0 : (info->next_s > 0 ? info->next_s : 1);
}

bool gw_sliding_window_admit(struct gw_sliding_window *w,
                             const struct gw_sliding_window_config *cfg, uint64_t now_ns,
                             struct gw_ratelimit_info *info)
{
  expire(w, cfg, now_ns);
  bool ok = w->total < cfg->limit;
  uint64_t g = gran(cfg);
  uint64_t at = now_ns % g == 0 ? now_ns : gw_sat_add(now_ns - now_ns % g, g);
  uint32_t tail = w->len > 0 ? slot(w, w->len - 1) : 0;
  bool fresh_run = w->len == 0 || w->runs[tail] < at;
  if (ok && fresh_run && w->len == w->cap)
    ok = false; /* only if the state was sized for another config: refuse, never overrun */
  if (ok) {
    uint32_t *cnt = counts(w);
    if (!fresh_run) {
      cnt[tail]++; /* same granule, or a clock reading from the past: count it as the newest */
    } else {
      uint32_t s = slot(w, w->len);
      w->runs[s] = at;
      cnt[s] = 1;
      w->len++;
    }
    w->total++;
  }
  if (info)
    fill_info(w, cfg, now_ns, ok, info);
  return ok;
}

uint64_t gw_sliding_window_count(struct gw_sliding_window *w,
                                 const struct gw_sliding_window_config *cfg, uint64_t now_ns)
{
  expire(w, cfg, now_ns);
  return w->total;
}

uint64_t gw_sliding_window_wait_ns(struct gw_sliding_window *w,
                                   const struct gw_sliding_window_config *cfg, uint64_t now_ns)
{
  expire(w, cfg, now_ns);
  if (w->total < cfg->limit)
    return 0;
  return gw_sat_add(w->runs[w->head], window_ns(cfg)) - now_ns;
}
