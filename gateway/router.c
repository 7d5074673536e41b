/*
 * Route matching. Routes are sorted once per config by precedence so that a lookup is a walk
 * that stops at the first route whose prefix, method and host all match. Route tables are small
 * (tens to hundreds); a linear walk over a sorted array beats a trie at that size.
 */
#include "router.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

static int precedence(const void *a, const void *b)
{
  const struct gw_route *x = *(const struct gw_route *const *)a;
  const struct gw_route *y = *(const struct gw_route *const *)b;
  if (x->prefix_len != y->prefix_len)
    return x->prefix_len > y->prefix_len ? -1 : 1;
  if ((x->methods != NULL) != (y->methods != NULL))
    return x->methods ? -1 : 1;
  if ((x->host != NULL) != (y->host != NULL))
    return x->host ? -1 : 1;
  return x < y ? -1 : (x > y); /* file order */
}

void gw_router_prepare(struct gw_config *cfg)
{
  cfg->match_order = calloc(cfg->route_count ? cfg->route_count : 1, sizeof(*cfg->match_order));
  if (!cfg->match_order)
    abort();
  for (size_t i = 0; i < cfg->route_count; i++)
    cfg->match_order[i] = &cfg->routes[i];
  qsort(cfg->match_order, cfg->route_count, sizeof(*cfg->match_order), precedence);
}

bool gw_router_prefix_matches(const char *prefix, size_t prefix_len, const char *path,
                              size_t path_len)
{
  if (path_len < prefix_len || memcmp(prefix, path, prefix_len) != 0)
    return false;
  if (path_len == prefix_len || prefix[prefix_len - 1] == '/')
    return true;
  return path[prefix_len] == '/';
}

static bool host_matches(const char *want, const char *host)
{
  if (!host)
    return false;
  size_t n = strcspn(host, ":");
  if (host[0] == '[') { /* [v6]:port */
    const char *end = strchr(host, ']');
    n = end ? (size_t)(end - host + 1) : strlen(host);
  }
  return strlen(want) == n && strncasecmp(want, host, n) == 0;
}

struct gw_route *gw_router_match(const struct gw_config *cfg, const char *method,
                                 const char *path, size_t path_len, const char *host)
{
  for (size_t i = 0; i < cfg->route_count; i++) {
    struct gw_route *r = cfg->match_order[i];
    if (!gw_router_prefix_matches(r->path_prefix, r->prefix_len, path, path_len))
      continue;
    if (r->methods) {
      bool ok = false;
      for (size_t m = 0; m < r->method_count && !ok; m++)
        ok = strcmp(r->methods[m], method) == 0;
      if (!ok)
        continue;
    }
    if (r->host && !host_matches(r->host, host))
      continue;
    return r;
  }
  return NULL;
}
