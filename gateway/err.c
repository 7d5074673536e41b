/* The lookups behind err.h's table. */
#include "err.h"

struct err_row {
  int status;
  const char *name;
  const char *msg;
};

static const struct err_row rows[] = {
#define GW_ERR_ROW(name, status, code, msg) {status, code, msg},
    GW_ERRNO_MAP(GW_ERR_ROW)
#undef GW_ERR_ROW
};

static const struct err_row *row(int err)
{
  int i = err - GW_E__FIRST - 1;
  if (err >= 0 || i < 0 || i >= (int)(sizeof(rows) / sizeof(rows[0])))
    return &rows[sizeof(rows) / sizeof(rows[0]) - 1];
  return &rows[i];
}

int gw_err_status(int err) { return row(err)->status; }
const char *gw_err_name(int err) { return row(err)->name; }
const char *gw_strerror(int err) { return row(err)->msg; }
