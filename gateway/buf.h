/* A growable byte buffer: one owner, NUL-terminated after every append. */
#ifndef GW_BUF_H
#define GW_BUF_H

#include <stdbool.h>
#include <stddef.h>

struct gw_buf {
  char *p; /* owned */
  size_t len, cap;
};

/* Room for need more bytes (plus a NUL). False when out of memory. */
bool gw_buf_reserve(struct gw_buf *b, size_t need);
bool gw_buf_append(struct gw_buf *b, const void *data, size_t n);
bool gw_buf_set(struct gw_buf *b, const void *data, size_t n);
/* Empty b; free its memory if it grew beyond keep bytes. */
void gw_buf_trim(struct gw_buf *b, size_t keep);
void gw_buf_free(struct gw_buf *b);

#endif
