/* Structured logging; see log.h. */
#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

void gw_jbuf_init(struct gw_jbuf *j, char *buf, size_t cap)
{
  j->p = buf;
  j->cap = cap;
  j->len = 0;
  j->overflow = false;
  if (cap > 2) {
    buf[0] = '{';
    j->len = 1;
  }
}

static void put(struct gw_jbuf *j, const char *s, size_t n)
{
  /* Keep room for the closing "}\n". */
  if (j->len + n + 2 > j->cap) {
    j->overflow = true;
    return;
  }
  memcpy(j->p + j->len, s, n);
  j->len += n;
}

/* Bytes that need an escape in a JSON string: '"', '\\' and controls. */
static bool needs_escape(unsigned char ch) { return ch == '"' || ch == '\\' || ch < 0x20 || ch == 0x7f; }

size_t gw_json_escape(char *out, size_t cap, const char *val, size_t n, size_t *consumed)
{
  static const char hex[] = "0123456789abcdef";
  size_t o = 0, i = 0;
  while (i < n) {
    /* Copy the run of plain bytes in one go. */
    size_t run = i;
    while (run < n && !needs_escape((unsigned char)val[run]))
      run++;
    size_t plain = run - i;
    if (plain) {
      if (o + plain > cap)
        plain = cap - o;
      memcpy(out + o, val + i, plain);
      o += plain;
      i += plain;
      if (i < run)
        break; /* out of room */
      continue;
    }
    unsigned char ch = (unsigned char)val[i];
    char esc[6];
    size_t el;
    if (ch == '"' || ch == '\\') {
      esc[0] = '\\';
      esc[1] = (char)ch;
      el = 2;
    } else {
      memcpy(esc, "\\u00", 4);
      esc[4] = hex[ch >> 4];
      esc[5] = hex[ch & 15];
      el = 6;
    }
    if (o + el > cap)
      break;
    memcpy(out + o, esc, el);
    o += el;
    i++;
  }
  if (consumed)
    *consumed = i;
  return o;
}

static void key(struct gw_jbuf *j, const char *k)
{
  if (j->len > 1)
    put(j, ",", 1);
  put(j, "\"", 1);
  put(j, k, strlen(k));
  put(j, "\":", 2);
}

void gw_jbuf_strn(struct gw_jbuf *j, const char *k, const char *val, size_t n)
{
  if (!val) {
    key(j, k);
    put(j, "null", 4);
    return;
  }
  key(j, k);
  put(j, "\"", 1);
  if (j->len + 3 < j->cap) {
    size_t room = j->cap - j->len - 3;
    size_t used;
    j->len += gw_json_escape(j->p + j->len, room, val, n, &used);
    if (used < n)
      j->overflow = true;
  } else {
    j->overflow = true;
  }
  put(j, "\"", 1);
}

void gw_jbuf_str(struct gw_jbuf *j, const char *k, const char *val)
{
  gw_jbuf_strn(j, k, val, val ? strlen(val) : 0);
}

void gw_jbuf_int(struct gw_jbuf *j, const char *k, long long val)
{
  char num[32];
  int n = snprintf(num, sizeof(num), "%lld", val);
  key(j, k);
  put(j, num, (size_t)n);
}

void gw_jbuf_num(struct gw_jbuf *j, const char *k, double val)
{
  char num[48];
  int n = snprintf(num, sizeof(num), "%.3f", val);
  key(j, k);
  put(j, num, (size_t)n);
}

size_t gw_jbuf_end(struct gw_jbuf *j)
{
  j->p[j->len++] = '}';
  j->p[j->len++] = '\n';
  return j->len;
}

void gw_log_begin(struct gw_jbuf *j, char *buf, size_t cap, const char *level, const char *msg)
{
  /* The date part changes once a second: format it once per second per thread. */
  static _Thread_local time_t cached_sec = -1;
  static _Thread_local char when[40];
  static _Thread_local size_t date_len;
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  if (ts.tv_sec != cached_sec) {
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    date_len = strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%S.", &tm);
    cached_sec = ts.tv_sec;
  }
  long ms = ts.tv_nsec / 1000000;
  when[date_len] = (char)('0' + ms / 100);
  when[date_len + 1] = (char)('0' + ms / 10 % 10);
  when[date_len + 2] = (char)('0' + ms % 10);
  when[date_len + 3] = 'Z';
  when[date_len + 4] = '\0';
  gw_jbuf_init(j, buf, cap);
  gw_jbuf_str(j, "ts", when);
  gw_jbuf_str(j, "level", level);
  if (msg)
    gw_jbuf_str(j, "msg", msg);
}

static void write_all(const char *p, size_t n)
{
  while (n > 0) {
    ssize_t w = write(STDERR_FILENO, p, n);
    if (w <= 0)
      return; /* nowhere to report a failing stderr */
    p += w;
    n -= (size_t)w;
  }
}

void gw_log_emit(struct gw_jbuf *j)
{
  size_t n = gw_jbuf_end(j);
  write_all(j->p, n);
}

void gw_logf(const char *level, const char *fmt, ...)
{
  char msg[1024], line[GW_LOG_LINE_MAX];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);
  struct gw_jbuf j;
  gw_log_begin(&j, line, sizeof(line), level, msg);
  gw_log_emit(&j);
}

char *gw_logbuf_reserve(struct gw_logbuf *b)
{
  if (b->len + GW_LOG_LINE_MAX > sizeof(b->buf))
    gw_logbuf_flush(b);
  return b->buf + b->len;
}

void gw_logbuf_commit(struct gw_logbuf *b, size_t n) { b->len += n; }

void gw_logbuf_flush(struct gw_logbuf *b)
{
  /* Write in pieces of whole lines no larger than PIPE_BUF so writes stay atomic. */
  size_t off = 0;
  while (off < b->len) {
    size_t end = off;
    while (end < b->len) {
      const char *nl = memchr(b->buf + end, '\n', b->len - end);
      size_t next = nl ? (size_t)(nl - b->buf) + 1 : b->len;
      if (next - off > GW_LOG_LINE_MAX && end > off)
        break;
      end = next;
      if (end - off >= GW_LOG_LINE_MAX)
        break;
    }
    write_all(b->buf + off, end - off);
    off = end;
  }
  b->len = 0;
}

void gw_log_vlibrary(void *source_name, const char *fmt, va_list ap)
{
  char msg[1024], line[GW_LOG_LINE_MAX];
  int n = vsnprintf(msg, sizeof(msg), fmt, ap);
  while (n > 0 && (size_t)n < sizeof(msg) && (msg[n - 1] == '\n' || msg[n - 1] == ' '))
    msg[--n] = '\0';
  struct gw_jbuf j;
  gw_log_begin(&j, line, sizeof(line), "warn", msg);
  gw_jbuf_str(&j, "source", source_name ? source_name : "library");
  gw_log_emit(&j);
}
