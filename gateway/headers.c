/* Header rules; see headers.h. */
#include "headers.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>

static const char *const hop_by_hop[] = {
    "Connection", "Keep-Alive",          "TE",                 "Trailer",          "Transfer-Encoding",
    "Upgrade",    "Proxy-Authorization", "Proxy-Authenticate", "Proxy-Connection", NULL,
};

void gw_conn_tokens_add(struct gw_conn_tokens *t, const char *value)
{
  const char *p = value;
  while (*p) {
    while (*p == ' ' || *p == '\t' || *p == ',')
      p++;
    size_t n = strcspn(p, ",");
    size_t len = n;
    while (len > 0 && (p[len - 1] == ' ' || p[len - 1] == '\t'))
      len--;
    if (len > 0 && len < sizeof(t->names[0]) && t->count < GW_CONN_TOKENS_MAX) {
      memcpy(t->names[t->count], p, len);
      t->names[t->count][len] = '\0';
      t->count++;
    }
    p += n;
  }
}

bool gw_header_is_hop_by_hop(const char *name, const struct gw_conn_tokens *t)
{
  for (const char *const *h = hop_by_hop; *h; h++)
    if (strcasecmp(*h, name) == 0)
      return true;
  if (t)
    for (size_t i = 0; i < t->count; i++)
      if (strcasecmp(t->names[i], name) == 0)
        return true;
  return false;
}

int gw_xff_append(char *out, size_t cap, const char *incoming, const char *client_ip)
{
  int n;
  if (incoming && *incoming)
    n = snprintf(out, cap, "%s, %s", incoming, client_ip);
  else
    n = snprintf(out, cap, "%s", client_ip);
  return n < 0 || (size_t)n >= cap ? -1 : n;
}

bool gw_request_id_is_valid(const char *id)
{
  size_t n = 0;
  for (; id[n]; n++)
    if ((unsigned char)id[n] <= 0x20 || (unsigned char)id[n] >= 0x7f)
      return false;
  return n >= 1 && n <= 200;
}

void gw_request_id_format(char out[33], uint64_t hi, uint64_t lo)
{
  snprintf(out, 33, "%016llx%016llx", (unsigned long long)hi, (unsigned long long)lo);
}
