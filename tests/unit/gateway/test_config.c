/* Config validation: every rule of API.md section 2 that the loader enforces, by behaviour. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "config.h"

static struct gw_config_errors errs;

static struct gw_config *parse(const char *text) { return gw_config_parse(text, strlen(text), &errs); }

/* The config must be rejected with a line naming path and containing what. */
static void assert_rejected(const char *text, const char *path, const char *what)
{
  struct gw_config *c = parse(text);
  if (c) {
    gw_config_unref(c);
    fail_msg("accepted: %s", text);
  }
  char want[512];
  snprintf(want, sizeof(want), "config error at %s: ", path);
  for (size_t i = 0; i < errs.count; i++)
    if (strncmp(errs.lines[i], want, strlen(want)) == 0 && strstr(errs.lines[i], what))
      return;
  for (size_t i = 0; i < errs.count; i++)
    print_message("  got: %s\n", errs.lines[i]);
  fail_msg("no error at %s containing '%s'", path, what);
}

#define ROUTE(extra) \
  "{\"routes\":[{\"name\":\"r\",\"match\":{\"path_prefix\":\"/a\"},\"upstream\":{\"targets\":[\"http://127.0.0.1:1\"]}" extra "}]}"

static void empty_object_gets_the_documented_defaults(void **state)
{
  struct gw_config *c = parse("{}");
  assert_non_null(c);
  assert_string_equal(c->listen.text, "127.0.0.1:8080");
  assert_string_equal(c->api_listen.text, "127.0.0.1:9090");
  assert_int_equal(c->shutdown_grace_ms, 10000);
  assert_int_equal(c->max_body_bytes, 1048576);
  assert_int_equal(c->max_connections, 20000);
  assert_int_equal(c->backend, GW_BACKEND_MEMORY);
  assert_int_equal(c->route_count, 0);
  gw_config_unref(c);
}

static void full_example_of_the_contract_loads(void **state)
{
  const char *text =
      "{\"node\":{\"id\":\"n1\",\"listen\":\"127.0.0.1:8080\",\"api_listen\":\"127.0.0.1:9090\","
      "\"data_dir\":\"var/n1\",\"shutdown_grace_ms\":10000,\"max_body_bytes\":1048576,"
      "\"max_connections\":20000},\"admin\":{\"token\":\"t\"},"
      "\"backend\":{\"type\":\"raft\",\"redis\":{\"url\":\"redis://127.0.0.1:6379/0\",\"timeout_ms\":200}},"
      "\"cluster\":{\"raft_listen\":\"127.0.0.1:7001\",\"peers\":[{\"id\":\"n1\",\"raft\":\"127.0.0.1:7001\","
      "\"api\":\"127.0.0.1:9091\"}],\"election_timeout_ms\":1000,\"heartbeat_ms\":100,\"snapshot_every\":10000},"
      "\"routes\":[{\"name\":\"orders\",\"match\":{\"path_prefix\":\"/api/orders\",\"methods\":[\"GET\",\"POST\"],"
      "\"host\":\"Example.com\"},\"upstream\":{\"targets\":[\"http://127.0.0.1:18080\"],\"strip_prefix\":false,"
      "\"balance\":\"least_outstanding\",\"timeout_ms\":5000,\"connect_timeout_ms\":1000},\"policies\":{"
      "\"token_bucket\":{\"capacity\":100,\"refill_per_sec\":50,\"key\":\"route\",\"scope\":\"local\"},"
      "\"sliding_window\":{\"limit\":1000,\"window_ms\":60000,\"key\":\"client_ip\",\"scope\":\"cluster\"},"
      "\"circuit_breaker\":{\"window\":\"count\",\"window_size\":20,\"min_calls\":10,\"failure_rate\":0.5,"
      "\"slow_call_ms\":2000,\"slow_call_rate\":1.0,\"open_ms\":30000,\"half_open_calls\":5,"
      "\"failure_statuses\":[500,502,503,504]},"
      "\"retry\":{\"max_attempts\":3,\"base_ms\":50,\"max_backoff_ms\":2000,\"jitter\":\"full\","
      "\"per_try_timeout_ms\":1000,\"on\":[\"connect_failure\",\"timeout\",\"status\"],"
      "\"statuses\":[502,503,504],\"budget_percent\":20,\"budget_min_per_sec\":10},"
      "\"degradation\":{\"fallback\":{\"status\":200,\"headers\":{\"Content-Type\":\"application/json\"},"
      "\"body\":{\"items\":[],\"degraded\":true}},\"on\":[\"circuit_open\",\"upstream_error\",\"shed\",\"slow\"],"
      "\"max_concurrent\":256,\"slow_ms\":2000,\"slow_window_ms\":10000,\"stale_if_error_ms\":60000},"
      "\"idempotency\":{\"header\":\"Idempotency-Key\",\"methods\":[\"POST\",\"PATCH\"],"
      "\"ttl_ms\":86400000,\"required\":false}}}]}";
  struct gw_config *c = parse(text);
  for (size_t i = 0; i < errs.count; i++)
    print_message("%s\n", errs.lines[i]);
  assert_non_null(c);
  assert_int_equal(c->route_count, 1);
  const struct gw_route *r = &c->routes[0];
  assert_string_equal(r->name, "orders");
  assert_string_equal(r->host, "example.com");
  assert_int_equal(r->balance, GW_BALANCE_LEAST_OUTSTANDING);
  assert_true(r->token_bucket.enabled);
  assert_int_equal(r->sliding_window.key.kind, GW_KEY_CLIENT_IP);
  assert_int_equal(r->sliding_window.scope, GW_SCOPE_CLUSTER);
  assert_true(gw_status_set_has(&r->breaker.c.failure_statuses, 503));
  assert_false(gw_status_set_has(&r->breaker.c.failure_statuses, 501));
  assert_int_equal(r->retry.c.max_attempts, 3);
  assert_int_equal(r->token_bucket.c.refill_per_sec, 50);
  assert_string_equal(r->degradation.fallback_body, "{\"items\":[],\"degraded\":true}");
  assert_int_equal(r->idempotency.method_count, 2);
  assert_string_equal(c->admin_token, "t");
  gw_config_unref(c);
}

static void invalid_json_is_reported_with_its_position(void **state)
{
  assert_rejected("{\"node\": {", "(top level)", "invalid JSON");
  assert_rejected("{} trailing", "(top level)", "unexpected text");
}

static void unknown_keys_are_named_by_path(void **state)
{
  assert_rejected("{\"nod\":{}}", "nod", "unknown key");
  assert_rejected("{\"node\":{\"listen_addr\":\"x\"}}", "node.listen_addr", "unknown key");
  assert_rejected(ROUTE(",\"policies\":{\"retry\":{\"tries\":3}}"), "routes[0].policies.retry.tries",
                  "unknown key");
}

static void duplicate_keys_are_errors(void **state)
{
  assert_rejected("{\"node\":{\"id\":\"a\",\"id\":\"b\"}}", "node.id", "duplicate key");
}

static void wrong_types_are_named_by_path(void **state)
{
  assert_rejected("{\"node\":{\"max_body_bytes\":\"big\"}}", "node.max_body_bytes", "integer");
  assert_rejected("{\"routes\":{}}", "routes", "array");
  assert_rejected(ROUTE(",\"policies\":{\"retry\":{\"max_attempts\":2.5}}"),
                  "routes[0].policies.retry.max_attempts", "integer from 1 to 10");
  assert_rejected("{\"routes\":[{\"name\":\"r\",\"match\":{\"path_prefix\":\"/a\"},\"upstream\":{"
                  "\"targets\":[\"http://127.0.0.1:1\"],\"strip_prefix\":\"yes\"}}]}",
                  "routes[0].upstream.strip_prefix", "true or false");
}

static void out_of_range_values_are_rejected(void **state)
{
  assert_rejected(ROUTE(",\"policies\":{\"retry\":{\"max_attempts\":11}}"),
                  "routes[0].policies.retry.max_attempts", "must be an integer from 1 to 10");
  assert_rejected(ROUTE(",\"policies\":{\"retry\":{\"budget_percent\":101}}"),
                  "routes[0].policies.retry.budget_percent", "from 0 to 100");
  assert_rejected(ROUTE(",\"policies\":{\"circuit_breaker\":{\"failure_rate\":1.5}}"),
                  "routes[0].policies.circuit_breaker.failure_rate", "at most 1");
  assert_rejected(ROUTE(",\"policies\":{\"circuit_breaker\":{\"failure_statuses\":[500,700]}}"),
                  "routes[0].policies.circuit_breaker.failure_statuses[1]", "status code");
  assert_rejected("{\"node\":{\"max_connections\":0}}", "node.max_connections", "from 1");
  assert_rejected(ROUTE(",\"policies\":{\"retry\":{\"base_ms\":100,\"max_backoff_ms\":10}}"),
                  "routes[0].policies.retry.max_backoff_ms", "at least base_ms");
}

static void enums_list_their_choices(void **state)
{
  assert_rejected(ROUTE(",\"policies\":{\"retry\":{\"jitter\":\"some\"}}"),
                  "routes[0].policies.retry.jitter", "none, full, equal, decorrelated");
  assert_rejected("{\"backend\":{\"type\":\"etcd\"}}", "backend.type", "memory, raft, redis");
  assert_rejected(ROUTE(",\"policies\":{\"token_bucket\":{\"capacity\":1,\"refill_per_sec\":1,"
                        "\"key\":\"cookie\"}}"),
                  "routes[0].policies.token_bucket.key", "header:NAME");
}

static void duplicate_route_names_are_rejected(void **state)
{
  assert_rejected("{\"routes\":[{\"name\":\"r\",\"match\":{\"path_prefix\":\"/a\"},\"upstream\":{\"targets\":"
                  "[\"http://127.0.0.1:1\"]}},{\"name\":\"r\",\"match\":{\"path_prefix\":\"/b\"},"
                  "\"upstream\":{\"targets\":[\"http://127.0.0.1:1\"]}}]}",
                  "routes[1].name", "duplicate route name");
}

static void unparsable_addresses_are_rejected(void **state)
{
  assert_rejected("{\"node\":{\"listen\":\"nowhere\"}}", "node.listen", "host:port");
  assert_rejected("{\"node\":{\"listen\":\"127.0.0.1:99999\"}}", "node.listen", "host:port");
  assert_rejected("{\"node\":{\"listen\":\"example.com:80\"}}", "node.listen", "numeric IP");
  assert_rejected("{\"routes\":[{\"name\":\"r\",\"match\":{\"path_prefix\":\"/a\"},\"upstream\":{"
                  "\"targets\":[\"ftp://127.0.0.1:1\"]}}]}",
                  "routes[0].upstream.targets[0]", "URL");
  assert_rejected("{\"routes\":[{\"name\":\"r\",\"match\":{\"path_prefix\":\"/a\"},\"upstream\":{"
                  "\"targets\":[\"http://:80\"]}}]}",
                  "routes[0].upstream.targets[0]", "URL");
  assert_rejected("{\"routes\":[{\"name\":\"r\",\"match\":{\"path_prefix\":\"/a\"},\"upstream\":{"
                  "\"targets\":[\"http://h:0\"]}}]}",
                  "routes[0].upstream.targets[0]", "URL");
  struct gw_config *c = parse("{\"node\":{\"listen\":\"[::1]:8081\"}}");
  assert_non_null(c);
  gw_config_unref(c);
}

static void cluster_scope_needs_a_shared_backend(void **state)
{
  assert_rejected(ROUTE(",\"policies\":{\"sliding_window\":{\"limit\":5,\"window_ms\":1000,"
                        "\"scope\":\"cluster\"}}"),
                  "routes[0].policies.sliding_window.scope", "backend.type");
}

static void every_problem_is_reported_not_only_the_first(void **state)
{
  struct gw_config *c =
      parse("{\"bogus\":1,\"node\":{\"max_body_bytes\":\"x\",\"workers\":0},\"routes\":[{}]}");
  assert_null(c);
  assert_true(errs.count >= 5); /* bogus, max_body_bytes, workers, name, match, upstream */
}

static void a_route_that_is_not_an_object_is_an_error_not_a_crash(void **state)
{
  assert_rejected("{\"routes\":[5]}", "routes[0]", "must be an object");
  assert_rejected("{\"routes\":[null,[1]]}", "routes[1]", "must be an object");
}

static void route_requires_name_match_and_upstream(void **state)
{
  assert_rejected("{\"routes\":[{}]}", "routes[0].name", "required");
  assert_rejected("{\"routes\":[{}]}", "routes[0].match", "required");
  assert_rejected("{\"routes\":[{}]}", "routes[0].upstream", "required");
  assert_rejected("{\"routes\":[{\"name\":\"r\",\"match\":{\"path_prefix\":\"a\"},\"upstream\":{"
                  "\"targets\":[\"http://127.0.0.1:1\"]}}]}",
                  "routes[0].match.path_prefix", "start with /");
}

static void peers_must_include_this_node(void **state)
{
  assert_rejected("{\"node\":{\"id\":\"n9\"},\"cluster\":{\"raft_listen\":\"127.0.0.1:7001\","
                  "\"peers\":[{\"id\":\"n1\",\"raft\":\"127.0.0.1:7001\",\"api\":\"127.0.0.1:9091\"}]}}",
                  "node.id", "cluster.peers");
}

static void a_missing_file_is_an_error_not_a_crash(void **state)
{
  assert_null(gw_config_load("/nonexistent/gateway.json", &errs));
  assert_int_equal(errs.count, 1);
  assert_non_null(strstr(errs.lines[0], "cannot open"));
}

int main(void)
{
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(empty_object_gets_the_documented_defaults),
      cmocka_unit_test(full_example_of_the_contract_loads),
      cmocka_unit_test(invalid_json_is_reported_with_its_position),
      cmocka_unit_test(unknown_keys_are_named_by_path),
      cmocka_unit_test(duplicate_keys_are_errors),
      cmocka_unit_test(wrong_types_are_named_by_path),
      cmocka_unit_test(out_of_range_values_are_rejected),
      cmocka_unit_test(enums_list_their_choices),
      cmocka_unit_test(duplicate_route_names_are_rejected),
      cmocka_unit_test(unparsable_addresses_are_rejected),
      cmocka_unit_test(cluster_scope_needs_a_shared_backend),
      cmocka_unit_test(every_problem_is_reported_not_only_the_first),
      cmocka_unit_test(route_requires_name_match_and_upstream),
      cmocka_unit_test(a_route_that_is_not_an_object_is_an_error_not_a_crash),
      cmocka_unit_test(peers_must_include_this_node),
      cmocka_unit_test(a_missing_file_is_an_error_not_a_crash),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
