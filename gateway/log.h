/*
 * Structured logs: one JSON object per line on stderr. Lines are built with a small JSON writer
 * (struct gw_jbuf) and written whole with one write(2) of at most PIPE_BUF bytes, so lines from
 * different threads never interleave. Access lines are batched per worker (struct gw_logbuf)
 * and flushed once per event-loop turn.
 */
#ifndef GW_LOG_H
#define GW_LOG_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define GW_LOG_LINE_MAX 4096

/* A JSON object being written into a caller's buffer; overflow truncates fields, never memory. */
struct gw_jbuf {
  char *p;
  size_t len, cap;
  bool overflow;
};

void gw_jbuf_init(struct gw_jbuf *j, char *buf, size_t cap);
void gw_jbuf_str(struct gw_jbuf *j, const char *key, const char *val);
void gw_jbuf_strn(struct gw_jbuf *j, const char *key, const char *val, size_t n);
void gw_jbuf_int(struct gw_jbuf *j, const char *key, long long val);
void gw_jbuf_num(struct gw_jbuf *j, const char *key, double val);
/* Close the object and add '\n'; returns the line length. */
size_t gw_jbuf_end(struct gw_jbuf *j);
/*
 * Write val (n bytes) as a JSON string body (no quotes) into out, at most cap bytes. Returns the
 * bytes written; *consumed (may be NULL) gets how many input bytes fit.
 */
size_t gw_json_escape(char *out, size_t cap, const char *val, size_t n, size_t *consumed);

/* Start a log line with "ts", "level" and "msg". */
void gw_log_begin(struct gw_jbuf *j, char *buf, size_t cap, const char *level, const char *msg);
/* Finish the line and write it to stderr. */
void gw_log_emit(struct gw_jbuf *j);
/* A one-field-free line: gw_logf("info", "listening on %s", addr). */
void gw_logf(const char *level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* A printf-style logger for libraries that log through a callback (libmicrohttpd). */
void gw_log_vlibrary(void *source_name, const char *fmt, va_list ap);

/* A per-thread batch of whole lines. */
struct gw_logbuf {
  char buf[64 * 1024];
  size_t len;
};
/* Space for one more line, flushing first if needed. Returns a buffer of GW_LOG_LINE_MAX. */
char *gw_logbuf_reserve(struct gw_logbuf *b);
void gw_logbuf_commit(struct gw_logbuf *b, size_t n);
void gw_logbuf_flush(struct gw_logbuf *b);

#endif
