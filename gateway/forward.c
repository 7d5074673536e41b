/* The leader forwarder; see forward.h. */
#include "forward.h"

#include <curl/curl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

struct gw_forwarder {
  pthread_t thread;
  CURLM *multi;
  pthread_mutex_t mu;
  struct gw_forward_job *queue;
  bool stop;
};

static size_t on_body(char *data, size_t size, size_t n, void *userp)
{
  struct gw_forward_job *j = userp;
  size_t len = size * n;
  if (j->resp_body.len + len > (4u << 20) || !gw_buf_append(&j->resp_body, data, len))
    return 0;
  return len;
}

static void copy_value(char *dst, size_t cap, const char *line, size_t len, size_t name_len)
{
  const char *v = line + name_len + 1;
  const char *end = line + len;
  while (v < end && (*v == ' ' || *v == '\t'))
    v++;
  while (end > v && (end[-1] == '\r' || end[-1] == '\n' || end[-1] == ' '))
    end--;
  size_t n = (size_t)(end - v) < cap - 1 ? (size_t)(end - v) : cap - 1;
  memcpy(dst, v, n);
  dst[n] = '\0';
}

static size_t on_header(char *data, size_t size, size_t n, void *userp)
{
  struct gw_forward_job *j = userp;
  size_t len = size * n;
  if (len > 11 && strncasecmp(data, "Raft-Index:", 11) == 0)
    copy_value(j->raft_index, sizeof(j->raft_index), data, len, 10);
  else if (len > 12 && strncasecmp(data, "Retry-After:", 12) == 0)
    copy_value(j->retry_after, sizeof(j->retry_after), data, len, 11);
  return len;
}

static void start_job(struct gw_forwarder *f, struct gw_forward_job *j)
{
  CURL *e = curl_easy_init();
  struct curl_slist *h = NULL;
  char line[512];
  if (j->idem_key) {
    snprintf(line, sizeof(line), "Idempotency-Key: %s", j->idem_key);
    h = curl_slist_append(h, line);
  }
  if (j->authorization) {
    snprintf(line, sizeof(line), "Authorization: %s", j->authorization);
    h = curl_slist_append(h, line);
  }
  snprintf(line, sizeof(line), "Gateway-Forwarded-By: %s", j->forwarded_by ? j->forwarded_by : "");
  h = curl_slist_append(h, line);
  snprintf(line, sizeof(line), "Content-Type: %s",
           j->content_type ? j->content_type : "application/json");
  h = curl_slist_append(h, line);
  h = curl_slist_append(h, "Expect:");
  if (!e || !h) {
    curl_slist_free_all(h);
    if (e)
      curl_easy_cleanup(e);
    j->failed = 1;
    j->done(j);
    return;
  }
  j->easy_ = e;
  j->headers_ = h;
  curl_easy_setopt(e, CURLOPT_URL, j->url);
  curl_easy_setopt(e, CURLOPT_PRIVATE, j);
  curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(e, CURLOPT_PROXY, "");
  curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, j->method);
  curl_easy_setopt(e, CURLOPT_HTTPHEADER, h);
  curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, j->timeout_ms > 0 ? j->timeout_ms : 15000L);
  curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, 1000L);
  curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
  curl_easy_setopt(e, CURLOPT_WRITEDATA, j);
  curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
  curl_easy_setopt(e, CURLOPT_HEADERDATA, j);
  if (strcmp(j->method, "GET") == 0 || strcmp(j->method, "HEAD") == 0) {
    curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
    curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, NULL);
    if (strcmp(j->method, "HEAD") == 0)
      curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
  } else {
    curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE, (long)j->body_len);
    curl_easy_setopt(e, CURLOPT_COPYPOSTFIELDS, j->body ? j->body : "");
  }
  curl_multi_add_handle(f->multi, e);
}

static void finish_job(struct gw_forwarder *f, struct gw_forward_job *j, CURLcode rc)
{
  CURL *e = j->easy_;
  long status = 0;
  curl_off_t ready = 0;
  curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &status);
  curl_easy_getinfo(e, CURLINFO_PRETRANSFER_TIME_T, &ready);
  curl_multi_remove_handle(f->multi, e);
  curl_easy_cleanup(e);
  curl_slist_free_all(j->headers_);
  j->easy_ = j->headers_ = NULL;
  j->status = (int)status;
  j->failed = rc != CURLE_OK || status == 0;
  j->not_sent = j->failed && (rc == CURLE_COULDNT_CONNECT || ready == 0);
  j->done(j);
}

static void *forward_main(void *arg)
{
  struct gw_forwarder *f = arg;
  for (;;) {
    pthread_mutex_lock(&f->mu);
    struct gw_forward_job *q = f->queue;
    f->queue = NULL;
    bool stop = f->stop;
    pthread_mutex_unlock(&f->mu);
    while (q) {
      struct gw_forward_job *j = q;
      q = j->next_;
      j->next_ = NULL;
      if (stop) {
        j->failed = 1;
        j->done(j);
      } else {
        start_job(f, j);
      }
    }
    int running = 0;
    curl_multi_perform(f->multi, &running);
    CURLMsg *m;
    int left;
    while ((m = curl_multi_info_read(f->multi, &left)))
      if (m->msg == CURLMSG_DONE) {
        struct gw_forward_job *j = NULL;
        curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&j);
        if (j)
          finish_job(f, j, m->data.result);
      }
    if (stop && running == 0)
      break;
    curl_multi_poll(f->multi, NULL, 0, 1000, NULL);
  }
  return NULL;
}

int gw_forwarder_start(struct gw_forwarder **out)
{
  struct gw_forwarder *f = calloc(1, sizeof(*f));
  if (!f)
    return -1;
  curl_global_init(CURL_GLOBAL_DEFAULT);
  f->multi = curl_multi_init();
  pthread_mutex_init(&f->mu, NULL);
  if (!f->multi || pthread_create(&f->thread, NULL, forward_main, f) != 0) {
    if (f->multi)
      curl_multi_cleanup(f->multi);
    free(f);
    return -1;
  }
  *out = f;
  return 0;
}

int gw_forwarder_submit(struct gw_forwarder *f, struct gw_forward_job *job)
{
  job->failed = 0;
  job->not_sent = 0;
  job->status = 0;
  job->raft_index[0] = job->retry_after[0] = '\0';
  pthread_mutex_lock(&f->mu);
  if (f->stop) {
    pthread_mutex_unlock(&f->mu);
    return -1;
  }
  job->next_ = f->queue;
  f->queue = job;
  pthread_mutex_unlock(&f->mu);
  curl_multi_wakeup(f->multi);
  return 0;
}

void gw_forwarder_stop(struct gw_forwarder *f)
{
  if (!f)
    return;
  pthread_mutex_lock(&f->mu);
  f->stop = true;
  pthread_mutex_unlock(&f->mu);
  curl_multi_wakeup(f->multi);
  pthread_join(f->thread, NULL);
  curl_multi_cleanup(f->multi);
  pthread_mutex_destroy(&f->mu);
  free(f);
}
