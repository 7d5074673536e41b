/* The control plane listener; see control.h. */
#include "control.h"

#include <errno.h>
#include <microhttpd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "err.h"
#include "log.h"

struct gw_control {
  struct MHD_Daemon *mhd;
  struct gw_engine *eng;
};

static enum MHD_Result reply(struct MHD_Connection *conn, unsigned status, const char *body)
{
  struct MHD_Response *resp =
      MHD_create_response_from_buffer(strlen(body), (void *)body, MHD_RESPMEM_MUST_COPY);
  if (!resp)
    return MHD_NO;
  MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
  enum MHD_Result ok = MHD_queue_response(conn, status, resp);
  MHD_destroy_response(resp);
  return ok;
}

static enum MHD_Result reply_error(struct MHD_Connection *conn, int err)
{
  char body[256];
  snprintf(body, sizeof(body), "{\"error\":{\"code\":\"%s\",\"message\":\"%s\"}}",
           gw_err_name(err), gw_strerror(err));
  return reply(conn, (unsigned)gw_err_status(err), body);
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version,
                                  const char *upload_data, size_t *upload_data_size,
                                  void **con_cls)
{
  struct gw_control *c = cls;
  static int started;
  if (*con_cls == NULL) {
    *con_cls = &started;
    return MHD_YES;
  }
  if (*upload_data_size) {
    *upload_data_size = 0; /* no endpoint here takes a body yet */
    return MHD_YES;
  }
  bool get = strcmp(method, "GET") == 0 || strcmp(method, "HEAD") == 0;
  if (strcmp(url, "/healthz") == 0) {
    if (!get)
      return reply_error(conn, GW_EMETHOD_NOT_ALLOWED);
    return reply(conn, 200, "{\"status\":\"ok\"}");
  }
  if (strcmp(url, "/readyz") == 0) {
    if (!get)
      return reply_error(conn, GW_EMETHOD_NOT_ALLOWED);
    if (!gw_engine_accepting(c->eng))
      return reply_error(conn, GW_ESHUTTING_DOWN);
    return reply(conn, 200, "{\"status\":\"ready\"}");
  }
  (void)version;
  (void)upload_data;
  return reply_error(conn, GW_ENOT_FOUND);
}

int gw_control_start(struct gw_control **out, const struct gw_addr *addr, struct gw_engine *eng)
{
  struct gw_control *c = calloc(1, sizeof(*c));
  if (!c)
    return -1;
  c->eng = eng;
  int fd = socket(addr->ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  int one = 1;
  if (fd >= 0)
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (fd < 0 || bind(fd, (const struct sockaddr *)&addr->ss, addr->len) != 0 ||
      listen(fd, 1024) != 0) {
    gw_logf("error", "cannot listen on %s: %s", addr->text, strerror(errno));
    if (fd >= 0)
      close(fd);
    free(c);
    return -1;
  }
  c->mhd = MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL |
                                MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG,
                            0, NULL, NULL, on_request, c, MHD_OPTION_LISTEN_SOCKET, fd,
                            MHD_OPTION_CONNECTION_TIMEOUT, 60u, MHD_OPTION_CONNECTION_LIMIT,
                            1024u, MHD_OPTION_EXTERNAL_LOGGER, gw_log_vlibrary,
                            "libmicrohttpd", MHD_OPTION_END);
  if (!c->mhd) {
    gw_logf("error", "cannot start the control listener on %s", addr->text);
    close(fd);
    free(c);
    return -1;
  }
  *out = c;
  return 0;
}

void gw_control_stop(struct gw_control *c)
{
  if (!c)
    return;
  MHD_stop_daemon(c->mhd);
  free(c);
}
