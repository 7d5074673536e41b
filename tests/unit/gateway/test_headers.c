/* Header rules: hop-by-hop removal (RFC 9110 section 7.6.1), X-Forwarded-For, request ids. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "headers.h"
#include "log.h"

static void fixed_hop_by_hop_headers_are_dropped_in_any_case(void **state)
{
  const char *names[] = {"Connection", "keep-alive", "TE", "Trailer", "TRANSFER-ENCODING",
                         "Upgrade", "Proxy-Authorization", "Proxy-Authenticate"};
  for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
    assert_true(gw_header_is_hop_by_hop(names[i], NULL));
  assert_false(gw_header_is_hop_by_hop("Content-Type", NULL));
  assert_false(gw_header_is_hop_by_hop("Authorization", NULL));
}

static void headers_named_by_connection_are_dropped(void **state)
{
  struct gw_conn_tokens t = {0};
  gw_conn_tokens_add(&t, "keep-alive, X-Secret ,  X-Other");
  gw_conn_tokens_add(&t, "close");
  assert_int_equal(t.count, 4);
  assert_true(gw_header_is_hop_by_hop("x-secret", &t));
  assert_true(gw_header_is_hop_by_hop("X-Other", &t));
  assert_false(gw_header_is_hop_by_hop("X-Kept", &t));
}

static void connection_tokens_are_bounded(void **state)
{
  struct gw_conn_tokens t = {0};
  for (int i = 0; i < 100; i++)
    gw_conn_tokens_add(&t, "a, b, c");
  assert_int_equal(t.count, GW_CONN_TOKENS_MAX);
}

static void xff_is_created_or_appended(void **state)
{
  char out[64];
  assert_int_equal(gw_xff_append(out, sizeof(out), NULL, "10.0.0.1"), 8);
  assert_string_equal(out, "10.0.0.1");
  gw_xff_append(out, sizeof(out), "1.1.1.1, 2.2.2.2", "10.0.0.1");
  assert_string_equal(out, "1.1.1.1, 2.2.2.2, 10.0.0.1");
  assert_int_equal(gw_xff_append(out, 8, "1.1.1.1", "10.0.0.1"), -1);
}

static void request_ids_are_kept_only_when_printable_and_short(void **state)
{
  assert_true(gw_request_id_is_valid("abc-123"));
  assert_false(gw_request_id_is_valid(""));
  assert_false(gw_request_id_is_valid("has space"));
  assert_false(gw_request_id_is_valid("bad\x01"));
  char long_id[202];
  memset(long_id, 'a', 201);
  long_id[201] = '\0';
  assert_false(gw_request_id_is_valid(long_id));
  char id[33];
  gw_request_id_format(id, 0x0123456789abcdefull, 1);
  assert_string_equal(id, "0123456789abcdef0000000000000001");
}

static void log_strings_are_json_escaped(void **state)
{
  char buf[256];
  struct gw_jbuf j;
  gw_jbuf_init(&j, buf, sizeof(buf));
  gw_jbuf_str(&j, "path", "/a\"b\\c\n\x01");
  gw_jbuf_int(&j, "status", 200);
  size_t n = gw_jbuf_end(&j);
  buf[n] = '\0';
  assert_string_equal(buf, "{\"path\":\"/a\\\"b\\\\c\\u000a\\u0001\",\"status\":200}\n");
}

static void log_lines_never_overflow_their_buffer(void **state)
{
  char buf[32];
  char big[200];
  memset(big, 'x', sizeof(big) - 1);
  big[sizeof(big) - 1] = '\0';
  struct gw_jbuf j;
  gw_jbuf_init(&j, buf, sizeof(buf));
  gw_jbuf_str(&j, "k", big);
  size_t n = gw_jbuf_end(&j);
  assert_true(n <= sizeof(buf));
  assert_true(j.overflow);
}

int main(void)
{
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(fixed_hop_by_hop_headers_are_dropped_in_any_case),
      cmocka_unit_test(headers_named_by_connection_are_dropped),
      cmocka_unit_test(connection_tokens_are_bounded),
      cmocka_unit_test(xff_is_created_or_appended),
      cmocka_unit_test(request_ids_are_kept_only_when_printable_and_short),
      cmocka_unit_test(log_strings_are_json_escaped),
      cmocka_unit_test(log_lines_never_overflow_their_buffer),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
