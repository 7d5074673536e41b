/* The error table of policy.h, the status set and the RateLimit field formatting. */
#include "policy.h"

#include <stdio.h>

struct err_row {
  const char *name;
  const char *msg;
};

static const struct err_row rows[] = {
#define GW_POLICY_ERR_ROW(name, code, msg) {code, msg},
    GW_POLICY_ERRNO_MAP(GW_POLICY_ERR_ROW)
#undef GW_POLICY_ERR_ROW
};

static const struct err_row unknown = {"unknown_error", "unknown error"};

static const struct err_row *row(int err)
{
  int i = err - GW_POLICY_E__FIRST - 1;
  if (err >= 0 || i < 0 || i >= (int)(sizeof(rows) / sizeof(rows[0])))
    return &unknown;
  return &rows[i];
}

const char *gw_policy_err_name(int err) { return row(err)->name; }
const char *gw_policy_strerror(int err) { return row(err)->msg; }

int gw_status_set_add(struct gw_status_set *set, int status)
{
  if (status < 100 || status > 599)
    return GW_POLICY_EINVALID_CONFIG;
  set->bits[status / 64 - 1] |= UINT64_C(1) << (status % 64);
  return 0;
}

bool gw_status_set_has(const struct gw_status_set *set, int status)
{
  if (status < 100 || status > 599)
    return false;
  return (set->bits[status / 64 - 1] >> (status % 64)) & 1;
}

/* Appends the route as an sf-string (RFC 8941 §3.3.3): quoted, '"' and '\' escaped. */
static int put_route(char *buf, size_t cap, size_t *len, const char *route)
{
  if (*len + 1 >= cap)
    return GW_POLICY_ETOO_LARGE;
  buf[(*len)++] = '"';
  for (const char *p = route; *p; p++) {
    if (*p == '"' || *p == '\\') {
      if (*len + 1 >= cap)
        return GW_POLICY_ETOO_LARGE;
      buf[(*len)++] = '\\';
    }
    if (*len + 1 >= cap)
      return GW_POLICY_ETOO_LARGE;
    buf[(*len)++] = *p;
  }
  if (*len + 1 >= cap)
    return GW_POLICY_ETOO_LARGE;
  buf[(*len)++] = '"';
  buf[*len] = '\0';
  return 0;
}

static int put_params(char *buf, size_t cap, size_t len, const char *k1, uint64_t v1,
                      const char *k2, uint64_t v2)
{
  int n = snprintf(buf + len, cap - len, ";%s=%llu;%s=%llu", k1, (unsigned long long)v1, k2,
                   (unsigned long long)v2);
  if (n < 0 || (size_t)n >= cap - len)
    return GW_POLICY_ETOO_LARGE;
  return (int)(len + (size_t)n);
}

int gw_ratelimit_format_policy(char *buf, size_t cap, const char *route,
                               const struct gw_ratelimit_info *info)
{
  size_t len = 0;
  int rc = put_route(buf, cap, &len, route);
  if (rc < 0)
    return rc;
  return put_params(buf, cap, len, "q", info->limit, "w", info->window_s);
}

int gw_ratelimit_format_state(char *buf, size_t cap, const char *route,
                              const struct gw_ratelimit_info *info)
{
  size_t len = 0;
  int rc = put_route(buf, cap, &len, route);
  if (rc < 0)
    return rc;
  return put_params(buf, cap, len, "r", info->remaining, "t", info->reset_s);
}
