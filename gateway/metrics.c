/*
 * /metrics in the Prometheus text exposition format (version 0.0.4): one HELP and TYPE line per
 * family, then its samples. Everything is read from counters the request path already keeps
 * (atomics in each route's live state, the engine's, the Raft node's published status), so a
 * scrape costs the request path nothing but a few short lock holds for the breaker snapshots.
 */
#include "metrics.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "pipeline.h"
#include "raft_store.h"

static void outf(struct gw_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void outf(struct gw_buf *b, const char *fmt, ...)
{
  char line[1024];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(line, sizeof(line), fmt, ap);
  va_end(ap);
  if (n > 0)
    gw_buf_append(b, line, (size_t)n < sizeof(line) ? (size_t)n : sizeof(line) - 1);
}

static void family(struct gw_buf *b, const char *name, const char *type, const char *help)
{
  outf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static uint64_t ld(atomic_ullong *a) { return atomic_load_explicit(a, memory_order_relaxed); }

static uint64_t mono_ns(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* A histogram family from per-bucket (not cumulative) counts with bounds in microseconds. */
static void histogram(struct gw_buf *b, const char *name, const char *labels,
                      const uint64_t *bounds_us, const uint64_t *counts, size_t n, double sum_s)
{
  uint64_t cum = 0;
  for (size_t i = 0; i < n; i++) {
    cum += counts[i];
    if (bounds_us[i] == UINT64_MAX)
      outf(b, "%s_bucket{%s%sle=\"+Inf\"} %" PRIu64 "\n", name, labels, labels[0] ? "," : "",
           cum);
    else
      outf(b, "%s_bucket{%s%sle=\"%g\"} %" PRIu64 "\n", name, labels, labels[0] ? "," : "",
           (double)bounds_us[i] / 1e6, cum);
  }
  outf(b, "%s_sum%s%s%s %.6f\n", name, labels[0] ? "{" : "", labels, labels[0] ? "}" : "", sum_s);
  outf(b, "%s_count%s%s%s %" PRIu64 "\n", name, labels[0] ? "{" : "", labels, labels[0] ? "}" : "",
       cum);
}

static const char *const classes[6] = {"other", "1xx", "2xx", "3xx", "4xx", "5xx"};

void gw_metrics_render(struct gw_buf *b, struct gw_engine *eng, struct gw_node *node)
{
  struct gw_config *cfg = gw_engine_config(eng);
  uint64_t now = mono_ns();

  family(b, "gateway_requests_total", "counter",
         "Requests answered, by route and status class (route \"\" before a route matched).");
  for (size_t i = 0; i < cfg->route_count; i++) {
    struct gw_route_rt *rt = cfg->routes[i].rt;
    if (!rt)
      continue;
    for (int c = 0; c < 6; c++)
      outf(b, "gateway_requests_total{route=\"%s\",code=\"%s\"} %" PRIu64 "\n", rt->name,
           classes[c], ld(&rt->status_class[c]));
  }
  struct gw_engine_stats es;
  gw_engine_stats(eng, &es);
  for (int c = 0; c < 6; c++)
    outf(b, "gateway_requests_total{route=\"\",code=\"%s\"} %" PRIu64 "\n", classes[c],
         es.unrouted[c]);

  family(b, "gateway_request_duration_seconds", "histogram",
         "Time from a request's admission to its answer, by route.");
  for (size_t i = 0; i < cfg->route_count; i++) {
    struct gw_route_rt *rt = cfg->routes[i].rt;
    if (!rt)
      continue;
    uint64_t counts[GW_LATENCY_BUCKETS];
    for (int k = 0; k < GW_LATENCY_BUCKETS; k++)
      counts[k] = ld(&rt->latency_bucket[k]);
    char labels[256];
    snprintf(labels, sizeof(labels), "route=\"%s\"", rt->name);
    histogram(b, "gateway_request_duration_seconds", labels, gw_latency_bounds_us, counts,
              GW_LATENCY_BUCKETS, (double)ld(&rt->latency_sum_us) / 1e6);
  }

  family(b, "gateway_requests_in_flight", "gauge", "Requests being handled, by route.");
  for (size_t i = 0; i < cfg->route_count; i++) {
    struct gw_route_rt *rt = cfg->routes[i].rt;
    if (rt)
      outf(b, "gateway_requests_in_flight{route=\"%s\"} %d\n", rt->name,
           atomic_load_explicit(&rt->inflight, memory_order_relaxed));
  }

  struct {
    const char *name, *help;
    size_t off;
  } counters[] = {
      {"gateway_rate_limited_total", "Requests refused by a rate limit (429).",
       offsetof(struct gw_route_rt, rate_limited)},
      {"gateway_breaker_rejected_total", "Requests refused because the circuit was open.",
       offsetof(struct gw_route_rt, breaker_rejected)},
      {"gateway_retries_total", "Retries made to upstreams.", offsetof(struct gw_route_rt, retries)},
      {"gateway_idempotent_replays_total", "Answers replayed from an idempotency record.",
       offsetof(struct gw_route_rt, replays)},
      {"gateway_store_errors_total", "Times a shared store (backend redis or raft) could not answer.",
       offsetof(struct gw_route_rt, store_errors)},
  };
  for (size_t k = 0; k < sizeof(counters) / sizeof(counters[0]); k++) {
    family(b, counters[k].name, "counter", counters[k].help);
    for (size_t i = 0; i < cfg->route_count; i++) {
      struct gw_route_rt *rt = cfg->routes[i].rt;
      if (rt)
        outf(b, "%s{route=\"%s\"} %" PRIu64 "\n", counters[k].name, rt->name,
             ld((atomic_ullong *)(void *)((char *)rt + counters[k].off)));
    }
  }

  family(b, "gateway_degraded_total", "counter",
         "Answers degraded (fallback or stale), by route and Gateway-Degraded reason.");
  for (size_t i = 0; i < cfg->route_count; i++) {
    struct gw_route_rt *rt = cfg->routes[i].rt;
    if (!rt || !cfg->routes[i].degradation.enabled)
      continue;
    uint64_t by_reason[GW_DEGRADE_REASONS];
    pthread_mutex_lock(&rt->mu);
    memcpy(by_reason, rt->degrade.degraded, sizeof(by_reason));
    pthread_mutex_unlock(&rt->mu);
    for (int r = 0; r < GW_DEGRADE_REASONS; r++)
      outf(b, "gateway_degraded_total{route=\"%s\",reason=\"%s\"} %" PRIu64 "\n", rt->name,
           gw_degrade_reason_name((enum gw_degrade_reason)r), by_reason[r]);
  }

  /* One snapshot per breaker feeds both families; the second is built aside and appended. */
  struct gw_buf transitions = {NULL, 0, 0};
  family(b, "gateway_breaker_state", "gauge",
         "Circuit breaker state by route: 0 closed, 1 open, 2 half-open.");
  family(&transitions, "gateway_breaker_transitions_total", "counter",
         "Circuit breaker state changes by route and new state.");
  for (size_t i = 0; i < cfg->route_count; i++) {
    struct gw_route_rt *rt = cfg->routes[i].rt;
    if (!rt || !rt->breaker)
      continue;
    struct gw_breaker_snapshot s;
    pthread_mutex_lock(&rt->breaker->mu);
    gw_breaker_snapshot(rt->breaker->obj, now, &s);
    pthread_mutex_unlock(&rt->breaker->mu);
    outf(b, "gateway_breaker_state{route=\"%s\"} %d\n", rt->name, (int)s.state);
    const char *to[3] = {"open", "half_open", "closed"};
    uint64_t n[3] = {s.to_open, s.to_half_open, s.to_closed};
    for (int k = 0; k < 3; k++)
      outf(&transitions, "gateway_breaker_transitions_total{route=\"%s\",to=\"%s\"} %" PRIu64 "\n",
           rt->name, to[k], n[k]);
  }
  gw_buf_append(b, transitions.p ? transitions.p : "", transitions.len);
  gw_buf_free(&transitions);

  family(b, "gateway_connections", "gauge", "Client connections open on the data plane.");
  outf(b, "gateway_connections %d\n", es.connections);
  family(b, "gateway_connections_refused_total", "counter",
         "Connections closed at once because max_connections was reached.");
  outf(b, "gateway_connections_refused_total %" PRIu64 "\n", es.refused);

  if (node) {
    struct gw_node_status st;
    gw_node_status(node, &st);
    family(b, "gateway_raft_term", "gauge", "The Raft term this node is in.");
    outf(b, "gateway_raft_term %" PRIu64 "\n", st.term);
    family(b, "gateway_raft_commit_index", "gauge", "The highest log index known committed.");
    outf(b, "gateway_raft_commit_index %" PRIu64 "\n", st.commit_index);
    family(b, "gateway_raft_applied_index", "gauge", "The highest log index applied.");
    outf(b, "gateway_raft_applied_index %" PRIu64 "\n", st.applied_index);
    family(b, "gateway_raft_is_leader", "gauge", "1 when this node is the Raft leader.");
    outf(b, "gateway_raft_is_leader %d\n", strcmp(st.role, "leader") == 0);
    family(b, "gateway_raft_leader", "gauge", "1 for the member this node believes leads.");
    outf(b, "gateway_raft_leader{leader=\"%s\"} %d\n", st.leader, st.leader_id != 0);
    family(b, "gateway_raft_proposals_total", "counter", "Writes proposed by this node.");
    outf(b, "gateway_raft_proposals_total %" PRIu64 "\n", st.proposals);
    family(b, "gateway_raft_proposals_failed_total", "counter",
           "Proposals the core refused (queue bounds).");
    outf(b, "gateway_raft_proposals_failed_total %" PRIu64 "\n", st.proposals_failed);
    family(b, "gateway_raft_proposal_commit_seconds", "histogram",
           "Time from proposing a write on this node to applying it.");
    histogram(b, "gateway_raft_proposal_commit_seconds", "", gw_node_latency_bounds_us,
              st.commit_bucket, GW_NODE_LAT_BUCKETS, (double)st.commit_us_total / 1e6);
    family(b, "gateway_raft_fsync_seconds", "histogram", "Duration of each log fsync.");
    histogram(b, "gateway_raft_fsync_seconds", "", gw_node_latency_bounds_us, st.fsync_bucket,
              GW_NODE_LAT_BUCKETS, (double)st.fsync_ns_total / 1e9);
    family(b, "gateway_raft_snapshots_total", "counter", "Snapshots taken by this node.");
    outf(b, "gateway_raft_snapshots_total %" PRIu64 "\n", st.snapshots);
    family(b, "gateway_raft_disk_full", "gauge", "1 while the log cannot be written.");
    outf(b, "gateway_raft_disk_full %d\n", st.disk_full ? 1 : 0);
  }
  const struct gw_store_ops *sops;
  void *simpl;
  gw_pipeline_shared_store(&sops, &simpl);
  if (sops == &gw_store_raft && simpl) {
    /* Quota leasing of this node's cluster-scope limiters (backends/raft.c). */
    struct gw_store_raft_stats qs;
    gw_store_raft_stats(simpl, &qs);
    const struct {
      const char *name, *help;
      uint64_t v;
    } q[] = {
        {"gateway_quota_acquires_total", "Quota acquires the cluster answered (cluster-scope limits).",
         qs.refills},
        {"gateway_quota_acquire_failures_total",
         "Quota acquires that failed or could not be sent (the key refuses for 50 ms).",
         qs.refill_failures},
        {"gateway_quota_units_granted_total", "Units of cluster budget granted to this node.",
         qs.refill_units},
        {"gateway_quota_units_released_total", "Unspent units this node gave back.",
         qs.release_units},
    };
    for (size_t k = 0; k < sizeof(q) / sizeof(q[0]); k++) {
      family(b, q[k].name, "counter", q[k].help);
      outf(b, "%s %" PRIu64 "\n", q[k].name, q[k].v);
    }
  }
  gw_config_unref(cfg);
}
