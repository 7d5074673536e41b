/* Route matching: longest prefix, then methods, then host, at segment boundaries. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "config.h"
#include "router.h"

static struct gw_config *load(const char *routes)
{
  char text[4096];
  snprintf(text, sizeof(text), "{\"routes\":[%s]}", routes);
  static struct gw_config_errors errs;
  struct gw_config *c = gw_config_parse(text, strlen(text), &errs);
  for (size_t i = 0; i < errs.count; i++)
    print_message("%s\n", errs.lines[i]);
  assert_non_null(c);
  return c;
}

#define R(name, match) \
  "{\"name\":\"" name "\",\"match\":" match ",\"upstream\":{\"targets\":[\"http://127.0.0.1:1\"]}}"

static const char *match(struct gw_config *c, const char *method, const char *path, const char *host)
{
  struct gw_route *r = gw_router_match(c, method, path, strcspn(path, "?"), host);
  return r ? r->name : NULL;
}

static void longest_prefix_wins_whatever_the_file_order(void **state)
{
  struct gw_config *c = load(R("root", "{\"path_prefix\":\"/\"}") "," R("api", "{\"path_prefix\":\"/api\"}")
                                 "," R("orders", "{\"path_prefix\":\"/api/orders\"}"));
  assert_string_equal(match(c, "GET", "/api/orders/1", NULL), "orders");
  assert_string_equal(match(c, "GET", "/api/users", NULL), "api");
  assert_string_equal(match(c, "GET", "/other", NULL), "root");
  gw_config_unref(c);
}

static void prefix_matches_only_at_a_segment_boundary(void **state)
{
  struct gw_config *c = load(R("orders", "{\"path_prefix\":\"/api/orders\"}") "," R("slash", "{\"path_prefix\":\"/v1/\"}"));
  assert_string_equal(match(c, "GET", "/api/orders", NULL), "orders");
  assert_string_equal(match(c, "GET", "/api/orders/7", NULL), "orders");
  assert_string_equal(match(c, "GET", "/api/orders?x=1", NULL), "orders");
  assert_null(match(c, "GET", "/api/ordersX", NULL));
  assert_null(match(c, "GET", "/api/order", NULL));
  assert_string_equal(match(c, "GET", "/v1/x", NULL), "slash");
  assert_null(match(c, "GET", "/v1", NULL));
  gw_config_unref(c);
}

static void methods_filter_and_a_route_naming_the_method_is_preferred(void **state)
{
  struct gw_config *c = load(R("any", "{\"path_prefix\":\"/a\"}") "," R("post", "{\"path_prefix\":\"/a\",\"methods\":[\"POST\"]}"));
  assert_string_equal(match(c, "POST", "/a", NULL), "post");
  assert_string_equal(match(c, "GET", "/a", NULL), "any");
  gw_config_unref(c);
}

static void method_mismatch_on_the_only_route_is_no_match(void **state)
{
  struct gw_config *c = load(R("get", "{\"path_prefix\":\"/a\",\"methods\":[\"GET\",\"HEAD\"]}"));
  assert_null(match(c, "DELETE", "/a", NULL));
  assert_string_equal(match(c, "HEAD", "/a", NULL), "get");
  gw_config_unref(c);
}

static void longest_prefix_beats_method_and_host(void **state)
{
  struct gw_config *c = load(R("short", "{\"path_prefix\":\"/a\",\"methods\":[\"GET\"],\"host\":\"h\"}") "," R("long", "{\"path_prefix\":\"/a/b\"}"));
  assert_string_equal(match(c, "GET", "/a/b", "h"), "long");
  gw_config_unref(c);
}

static void host_matches_case_insensitively_without_port(void **state)
{
  struct gw_config *c = load(R("any", "{\"path_prefix\":\"/\"}") "," R("ex", "{\"path_prefix\":\"/\",\"host\":\"api.example.com\"}"));
  assert_string_equal(match(c, "GET", "/x", "API.Example.com:8080"), "ex");
  assert_string_equal(match(c, "GET", "/x", "api.example.com"), "ex");
  assert_string_equal(match(c, "GET", "/x", "other.example.com"), "any");
  assert_string_equal(match(c, "GET", "/x", NULL), "any");
  assert_string_equal(match(c, "GET", "/x", "api.example.com.evil"), "any");
  gw_config_unref(c);
}

static void equal_routes_keep_file_order(void **state)
{
  struct gw_config *c = load(R("first", "{\"path_prefix\":\"/a\"}") "," R("second", "{\"path_prefix\":\"/a\"}"));
  assert_string_equal(match(c, "GET", "/a", NULL), "first");
  gw_config_unref(c);
}

static void no_routes_match_nothing(void **state)
{
  struct gw_config *c = load("");
  assert_null(match(c, "GET", "/", NULL));
  gw_config_unref(c);
}

int main(void)
{
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(longest_prefix_wins_whatever_the_file_order),
      cmocka_unit_test(prefix_matches_only_at_a_segment_boundary),
      cmocka_unit_test(methods_filter_and_a_route_naming_the_method_is_preferred),
      cmocka_unit_test(method_mismatch_on_the_only_route_is_no_match),
      cmocka_unit_test(longest_prefix_beats_method_and_host),
      cmocka_unit_test(host_matches_case_insensitively_without_port),
      cmocka_unit_test(equal_routes_keep_file_order),
      cmocka_unit_test(no_routes_match_nothing),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
