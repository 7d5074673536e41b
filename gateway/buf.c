/* Growable byte buffers; see buf.h. */
#include "buf.h"

#include <stdlib.h>
#include <string.h>

bool gw_buf_reserve(struct gw_buf *b, size_t need)
{
  if (b->len + need + 1 <= b->cap)
    return true;
  size_t cap = b->cap ? b->cap : 256;
  while (cap < b->len + need + 1)
    cap *= 2;
  char *p = realloc(b->p, cap);
  if (!p)
    return false;
  b->p = p;
  b->cap = cap;
  return true;
}

bool gw_buf_append(struct gw_buf *b, const void *data, size_t n)
{
  if (!gw_buf_reserve(b, n))
    return false;
  if (n)
    memcpy(b->p + b->len, data, n);
  b->len += n;
  b->p[b->len] = '\0';
  return true;
}

bool gw_buf_set(struct gw_buf *b, const void *data, size_t n)
{
  b->len = 0;
  return gw_buf_append(b, data, n);
}

void gw_buf_trim(struct gw_buf *b, size_t keep)
{
  b->len = 0;
  if (b->cap > keep)
    gw_buf_free(b);
  else if (b->p)
    b->p[0] = '\0';
}

void gw_buf_free(struct gw_buf *b)
{
  free(b->p);
  b->p = NULL;
  b->len = b->cap = 0;
}
