/* Idempotency store: key validation, decisions, TTL, store/no-store rules and bounds. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "idempotency.h"
#include "rng.h"

#define S GW_NS_PER_S
#define MS GW_NS_PER_MS
#define T0 (UINT64_C(10) * S)

static struct gw_idem_store *make(uint32_t max_records, uint64_t max_bytes, uint64_t ttl_ms)
{
  struct gw_idem_config c = {
      .max_records = max_records, .max_bytes = max_bytes, .ttl_ms = ttl_ms, .seed = {1, 2}};
  struct gw_idem_store *st = NULL;
  assert_int_equal(gw_idem_create(&c, &st), 0);
  return st;
}

static struct gw_idem_fingerprint fp_of(const char *method, const char *path, const char *body)
{
  struct gw_idem_fingerprint fp;
  gw_idem_fingerprint(method, strlen(method), path, strlen(path), body, strlen(body), &fp);
  return fp;
}

struct outcome {
  int rc;
  enum gw_idem_decision decision;
  struct gw_idem_claim claim;
  struct gw_idem_response replay;
};

static struct outcome begin(struct gw_idem_store *st, const char *route, const char *key,
                            struct gw_idem_fingerprint fp, uint64_t now)
{
  struct outcome o;
  memset(&o, 0, sizeof(o));
  o.rc = gw_idem_begin(st, route, strlen(route), key, strlen(key), &fp, now, &o.decision, &o.claim,
                       &o.replay);
  return o;
}

static const struct gw_idem_response created = {201, "Content-Type: application/json\r\n", 32,
                                                "{\"id\":7}", 8};

static void config_out_of_range_is_rejected(void **state)
{
  struct gw_idem_config c = {.max_records = 0, .max_bytes = 1 << 20, .ttl_ms = 1000};
  assert_int_equal(gw_idem_config_check(&c), GW_POLICY_EINVALID_CONFIG);
  c.max_records = 10;
  c.max_bytes = 100;
  assert_int_equal(gw_idem_config_check(&c), GW_POLICY_EINVALID_CONFIG);
  c.max_bytes = 1 << 20;
  c.ttl_ms = 0;
  struct gw_idem_store *st = NULL;
  assert_int_equal(gw_idem_create(&c, &st), GW_POLICY_EINVALID_CONFIG);
  assert_null(st);
}

static void key_validation_follows_length_and_printable_rules(void **state)
{
  char key[300];
  memset(key, 'a', sizeof(key));
  assert_int_equal(gw_idem_key_check(NULL, 0, false), GW_IDEM_KEY_ABSENT);
  assert_int_equal(gw_idem_key_check(NULL, 0, true), GW_IDEM_KEY_MISSING);
  assert_int_equal(gw_idem_key_check(key, 0, false), GW_IDEM_KEY_INVALID);
  assert_int_equal(gw_idem_key_check(key, 1, true), GW_IDEM_KEY_VALID);
  assert_int_equal(gw_idem_key_check(key, 255, false), GW_IDEM_KEY_VALID);
  assert_int_equal(gw_idem_key_check(key, 256, false), GW_IDEM_KEY_INVALID);
  assert_int_equal(gw_idem_key_check("a b~!", 5, false), GW_IDEM_KEY_VALID);
  assert_int_equal(gw_idem_key_check("a\tb", 3, false), GW_IDEM_KEY_INVALID);
  assert_int_equal(gw_idem_key_check("a\x7f", 2, false), GW_IDEM_KEY_INVALID);
  assert_int_equal(gw_idem_key_check("\x01", 1, false), GW_IDEM_KEY_INVALID);
  assert_int_equal(gw_idem_key_check("caf\xc3\xa9", 5, false), GW_IDEM_KEY_INVALID);
  assert_int_equal(gw_idem_key_check("a\0b", 3, false), GW_IDEM_KEY_INVALID);
}

static void fingerprint_covers_method_path_and_body(void **state)
{
  struct gw_idem_fingerprint a = fp_of("POST", "/orders", "{\"n\":1}");
  struct gw_idem_fingerprint b = fp_of("POST", "/orders", "{\"n\":1}");
  assert_memory_equal(&a, &b, sizeof(a));
  struct gw_idem_fingerprint c[] = {
      fp_of("PATCH", "/orders", "{\"n\":1}"), fp_of("POST", "/orders/", "{\"n\":1}"),
      fp_of("POST", "/orders", "{\"n\":2}"),  fp_of("POST", "/orders", ""),
      fp_of("POS", "T/orders", "{\"n\":1}"),  fp_of("POST", "/order", "s{\"n\":1}")};
  for (size_t i = 0; i < sizeof(c) / sizeof(c[0]); i++) {
    assert_true(c[i].hi != a.hi || c[i].lo != a.lo);
    assert_true(c[i].hi != a.hi && c[i].lo != a.lo); /* both halves change */
  }
}

static void first_request_executes_and_duplicate_in_flight_gets_409(void **state)
{
  struct gw_idem_store *st = make(100, 1 << 20, 60000);
  struct gw_idem_fingerprint fp = fp_of("POST", "/orders", "{}");
  struct outcome o = begin(st, "orders", "k1", fp, T0);
  assert_int_equal(o.rc, 0);
  assert_int_equal(o.decision, GW_IDEM_EXECUTE);
  struct outcome d = begin(st, "orders", "k1", fp, T0 + 1);
  assert_int_equal(d.rc, 0);
  assert_int_equal(d.decision, GW_IDEM_IN_FLIGHT);
  struct gw_idem_stats stats;
  gw_idem_stats(st, &stats);
  assert_int_equal(stats.records, 1);
  assert_int_equal(stats.in_flight, 1);
  gw_idem_destroy(st);
}

static void completed_request_is_replayed_byte_for_byte(void **state)
{
  struct gw_idem_store *st = make(100, 1 << 20, 60000);
  struct gw_idem_fingerprint fp = fp_of("POST", "/orders", "{}");
  struct outcome o = begin(st, "orders", "k1", fp, T0);
  assert_int_equal(gw_idem_finish(st, &o.claim, GW_IDEM_FROM_UPSTREAM, &created, T0 + MS), 0);
  struct outcome r = begin(st, "orders", "k1", fp, T0 + 2 * MS);
  assert_int_equal(r.decision, GW_IDEM_REPLAY);
  assert_int_equal(r.replay.status, 201);
  assert_int_equal(r.replay.headers_len, created.headers_len);
  assert_memory_equal(r.replay.headers, created.headers, created.headers_len);
  assert_int_equal(r.replay.body_len, 8);
  assert_memory_equal(r.replay.body, "{\"id\":7}", 8);
  struct gw_idem_stats stats;
  gw_idem_stats(st, &stats);
  assert_int_equal(stats.replays, 1);
  assert_int_equal(stats.in_flight, 0);
  gw_idem_destroy(st);
}

static void different_request_under_same_key_gets_422(void **state)
{
  struct gw_idem_store *st = make(100, 1 << 20, 60000);
  struct outcome o = begin(st, "orders", "k1", fp_of("POST", "/orders", "{\"n\":1}"), T0);
  assert_int_equal(begin(st, "orders", "k1", fp_of("POST", "/orders", "{\"n\":2}"), T0).decision,
                   GW_IDEM_MISMATCH);
  assert_int_equal(gw_idem_complete(st, &o.claim, &created, T0), 0);
  assert_int_equal(begin(st, "orders", "k1", fp_of("PUT", "/orders", "{\"n\":1}"), T0).decision,
                   GW_IDEM_MISMATCH);
  assert_int_equal(begin(st, "orders", "k1", fp_of("POST", "/orders/1", "{\"n\":1}"), T0).decision,
                   GW_IDEM_MISMATCH);
  assert_int_equal(begin(st, "orders", "k1", fp_of("POST", "/orders", "{\"n\":1}"), T0).decision,
                   GW_IDEM_REPLAY);
  gw_idem_destroy(st);
}

static void same_key_on_another_route_is_independent(void **state)
{
  struct gw_idem_store *st = make(100, 1 << 20, 60000);
  struct gw_idem_fingerprint fp = fp_of("POST", "/x", "");
  assert_int_equal(begin(st, "orders", "k", fp, T0).decision, GW_IDEM_EXECUTE);
  assert_int_equal(begin(st, "payments", "k", fp, T0).decision, GW_IDEM_EXECUTE);
  assert_int_equal(begin(st, "order", "sk", fp, T0).decision, GW_IDEM_EXECUTE);
  assert_int_equal(begin(st, "orders", "k", fp, T0).decision, GW_IDEM_IN_FLIGHT);
  gw_idem_destroy(st);
}

static void record_expires_exactly_ttl_after_completion(void **state)
{
  struct gw_idem_store *st = make(100, 1 << 20, 1000);
  struct gw_idem_fingerprint fp = fp_of("POST", "/orders", "{}");
  struct outcome o = begin(st, "orders", "k1", fp, T0);
  assert_int_equal(gw_idem_complete(st, &o.claim, &created, T0 + 500 * MS), 0);
  assert_int_equal(begin(st, "orders", "k1", fp, T0 + 1500 * MS - 1).decision, GW_IDEM_REPLAY);
  struct outcome again = begin(st, "orders", "k1", fp, T0 + 1500 * MS);
  assert_int_equal(again.decision, GW_IDEM_EXECUTE);
  struct gw_idem_stats stats;
  gw_idem_stats(st, &stats);
  assert_int_equal(stats.expired, 1);
  assert_int_equal(stats.records, 1);
  gw_idem_destroy(st);
}

static void in_flight_claim_outlives_ttl(void **state)
{
  /* A request slower than ttl_ms still holds its key: a duplicate must not execute again. */
  struct gw_idem_store *st = make(100, 1 << 20, 1000);
  struct gw_idem_fingerprint fp = fp_of("POST", "/orders", "{}");
  struct outcome first = begin(st, "orders", "k1", fp, T0);
  assert_int_equal(begin(st, "orders", "k1", fp, T0 + 2 * S).decision, GW_IDEM_IN_FLIGHT);
  gw_idem_expire(st, T0 + 100 * S, SIZE_MAX);
  assert_int_equal(begin(st, "orders", "k1", fp, T0 + 100 * S).decision, GW_IDEM_IN_FLIGHT);
  assert_int_equal(gw_idem_complete(st, &first.claim, &created, T0 + 100 * S), 0);
  assert_int_equal(begin(st, "orders", "k1", fp, T0 + 100 * S).decision, GW_IDEM_REPLAY);
  assert_int_equal(begin(st, "orders", "k1", fp, T0 + 101 * S).decision, GW_IDEM_EXECUTE);
  gw_idem_destroy(st);
}

static void store_rule_keeps_upstream_answers_and_timeouts_only(void **state)
{
  assert_true(gw_idem_should_store(GW_IDEM_FROM_UPSTREAM));
  assert_true(gw_idem_should_store(GW_IDEM_UPSTREAM_TIMEOUT));
  assert_false(gw_idem_should_store(GW_IDEM_NOT_SENT));
}

static void upstream_error_status_is_stored_and_replayed(void **state)
{
  struct gw_idem_store *st = make(100, 1 << 20, 60000);
  struct gw_idem_fingerprint fp = fp_of("POST", "/orders", "{}");
  struct outcome o = begin(st, "orders", "k500", fp, T0);
  struct gw_idem_response err = {500, "", 0, "oops", 4};
  assert_int_equal(gw_idem_finish(st, &o.claim, GW_IDEM_FROM_UPSTREAM, &err, T0), 0);
  struct outcome r = begin(st, "orders", "k500", fp, T0);
  assert_int_equal(r.decision, GW_IDEM_REPLAY);
  assert_int_equal(r.replay.status, 500);
  o = begin(st, "orders", "k504", fp, T0);
  struct gw_idem_response timeout = {504, "", 0, "{\"error\":{\"code\":\"upstream_timeout\"}}", 36};
  assert_int_equal(gw_idem_finish(st, &o.claim, GW_IDEM_UPSTREAM_TIMEOUT, &timeout, T0), 0);
  r = begin(st, "orders", "k504", fp, T0);
  assert_int_equal(r.decision, GW_IDEM_REPLAY);
  assert_int_equal(r.replay.status, 504);
  gw_idem_destroy(st);
}

static void rejection_before_upstream_releases_the_claim(void **state)
{
  /* 400, 413, 429, 503 circuit_open / overloaded and 502 on a failed connect: not stored. */
  int statuses[] = {400, 413, 429, 503, 502};
  struct gw_idem_store *st = make(100, 1 << 20, 60000);
  struct gw_idem_fingerprint fp = fp_of("POST", "/orders", "{}");
  for (size_t i = 0; i < sizeof(statuses) / sizeof(statuses[0]); i++) {
    struct outcome o = begin(st, "orders", "k", fp, T0);
    assert_int_equal(o.decision, GW_IDEM_EXECUTE); /* the client may retry each time */
    struct gw_idem_response rej = {statuses[i], "", 0, "", 0};
    assert_int_equal(gw_idem_finish(st, &o.claim, GW_IDEM_NOT_SENT, &rej, T0), 0);
    /* The released claim cannot be finished again. */
    assert_int_equal(gw_idem_finish(st, &o.claim, GW_IDEM_FROM_UPSTREAM, &created, T0),
                     GW_POLICY_ESTALE);
  }
  struct gw_idem_stats stats;
  gw_idem_stats(st, &stats);
  assert_int_equal(stats.records, 0);
  assert_int_equal(stats.bytes, 0);
  gw_idem_destroy(st);
}

static void release_twice_is_stale(void **state)
{
  struct gw_idem_store *st = make(100, 1 << 20, 60000);
  struct outcome o = begin(st, "r", "k", fp_of("POST", "/", ""), T0);
  assert_int_equal(gw_idem_release(st, &o.claim), 0);
  assert_int_equal(gw_idem_release(st, &o.claim), GW_POLICY_ESTALE);
  gw_idem_destroy(st);
}

static void completed_record_cannot_be_completed_again(void **state)
{
  struct gw_idem_store *st = make(100, 1 << 20, 60000);
  struct outcome o = begin(st, "r", "k", fp_of("POST", "/", ""), T0);
  assert_int_equal(gw_idem_complete(st, &o.claim, &created, T0), 0);
  assert_int_equal(gw_idem_complete(st, &o.claim, &created, T0), GW_POLICY_ESTALE);
  assert_int_equal(gw_idem_release(st, &o.claim), GW_POLICY_ESTALE);
  gw_idem_destroy(st);
}

static void record_limit_refuses_new_claims_until_records_expire(void **state)
{
  struct gw_idem_store *st = make(3, 1 << 20, 1000);
  struct gw_idem_fingerprint fp = fp_of("POST", "/", "");
  const char *keys[3] = {"a", "b", "c"};
  for (int i = 0; i < 3; i++) {
    struct outcome o = begin(st, "r", keys[i], fp, T0 + (uint64_t)i * 100 * MS);
    assert_int_equal(o.decision, GW_IDEM_EXECUTE);
    assert_int_equal(gw_idem_complete(st, &o.claim, &created, T0 + (uint64_t)i * 100 * MS), 0);
  }
  assert_int_equal(begin(st, "r", "d", fp, T0 + 300 * MS).rc, GW_POLICY_EFULL);
  /* Existing keys still get their answers while full. */
  assert_int_equal(begin(st, "r", "a", fp, T0 + 300 * MS).decision, GW_IDEM_REPLAY);
  assert_int_equal(begin(st, "r", "d", fp, T0 + 1000 * MS).decision, GW_IDEM_EXECUTE); /* a left */
  assert_int_equal(begin(st, "r", "e", fp, T0 + 1000 * MS).rc, GW_POLICY_EFULL);
  struct gw_idem_stats stats;
  gw_idem_stats(st, &stats);
  assert_int_equal(stats.full, 2);
  assert_int_equal(stats.records, 3);
  gw_idem_destroy(st);
}

static void byte_limit_refuses_responses_that_do_not_fit(void **state)
{
  struct gw_idem_store *st = make(100, 8192, 1000);
  struct gw_idem_fingerprint fp = fp_of("POST", "/", "");
  char *big = calloc(1, 10000);
  struct gw_idem_response huge = {200, "", 0, big, 10000};
  struct outcome o = begin(st, "r", "huge", fp, T0);
  assert_int_equal(gw_idem_complete(st, &o.claim, &huge, T0), GW_POLICY_ETOO_LARGE);
  assert_int_equal(begin(st, "r", "huge", fp, T0).decision, GW_IDEM_EXECUTE); /* released */
  struct gw_idem_response half = {200, "", 0, big, 5000};
  o = begin(st, "r", "one", fp, T0);
  assert_int_equal(gw_idem_complete(st, &o.claim, &half, T0), 0);
  o = begin(st, "r", "two", fp, T0 + 10 * MS);
  assert_int_equal(gw_idem_complete(st, &o.claim, &half, T0 + 10 * MS), GW_POLICY_EFULL);
  assert_int_equal(begin(st, "r", "two", fp, T0 + 10 * MS).decision, GW_IDEM_EXECUTE);
  /* Completed at T0 + 1 s, "three" fits once "huge" and "one" have expired. */
  o.claim = begin(st, "r", "three", fp, T0 + 20 * MS).claim;
  assert_int_equal(gw_idem_complete(st, &o.claim, &half, T0 + 1000 * MS), 0);
  struct gw_idem_stats stats;
  gw_idem_stats(st, &stats);
  assert_int_equal(stats.full, 2);
  assert_true(stats.bytes <= 8192);
  free(big);
  gw_idem_destroy(st);
}

static void expire_sweeps_in_completion_order_and_frees_bytes(void **state)
{
  struct gw_idem_store *st = make(100, 1 << 20, 1000);
  struct gw_idem_fingerprint fp = fp_of("POST", "/", "");
  for (int i = 0; i < 10; i++) {
    char key[8] = {'k', (char)('0' + i), 0};
    struct outcome o = begin(st, "r", key, fp, T0 + (uint64_t)i * 100 * MS);
    assert_int_equal(gw_idem_complete(st, &o.claim, &created, T0 + (uint64_t)i * 100 * MS), 0);
  }
  assert_int_equal(gw_idem_expire(st, T0 + 1450 * MS, 100), 5);
  struct outcome k4 = begin(st, "r", "k4", fp, T0 + 1450 * MS);
  assert_int_equal(k4.decision, GW_IDEM_EXECUTE);
  assert_int_equal(gw_idem_release(st, &k4.claim), 0);
  assert_int_equal(begin(st, "r", "k5", fp, T0 + 1450 * MS).decision, GW_IDEM_REPLAY);
  assert_int_equal(gw_idem_expire(st, T0 + 100 * S, 2), 2);
  gw_idem_expire(st, T0 + 100 * S, SIZE_MAX);
  struct gw_idem_stats stats;
  gw_idem_stats(st, &stats);
  assert_int_equal(stats.records, 0);
  assert_int_equal(stats.bytes, 0);
  gw_idem_destroy(st);
}

/* Random operations against a model of one record per key: decisions and claims must agree.
 * A double finish of one claim is also tried: it must be refused as stale. */
static void random_operations_match_a_record_model(void **state)
{
  enum { KEYS = 6, FPS = 2, OUT = 8 };
  struct model_rec {
    int state; /* 0 absent, 1 in flight, 2 completed */
    int fp;
    uint64_t expires;
    int status;
    uint64_t owner; /* claim id of the in-flight record */
  } m[KEYS] = {{0}};
  struct pending {
    int key;
    struct gw_idem_claim claim;
  } out[OUT];
  int nout = 0;
  struct gw_idem_fingerprint fps[FPS] = {fp_of("POST", "/a", "1"), fp_of("POST", "/a", "2")};
  struct gw_idem_store *st = make(100, 1 << 20, 1000);
  struct gw_rng rng;
  gw_rng_seed(&rng, 2718);
  uint64_t now = T0;
  for (int step = 0; step < 20000; step++) {
    now += gw_rng_below(&rng, 60 * MS);
    int k = (int)gw_rng_below(&rng, KEYS);
    char key[4] = {'k', (char)('0' + k), 0};
    for (int i = 0; i < KEYS; i++) /* completed records live ttl_ms; claims as long as needed */
      if (m[i].state == 2 && m[i].expires <= now)
        m[i].state = 0;
    if (gw_rng_below(&rng, 2) == 0 || nout == 0) {
      int f = (int)gw_rng_below(&rng, FPS);
      struct outcome o = begin(st, "r", key, fps[f], now);
      assert_int_equal(o.rc, 0);
      if (m[k].state == 0) {
        assert_int_equal(o.decision, GW_IDEM_EXECUTE);
        m[k] = (struct model_rec){1, f, UINT64_MAX, 0, o.claim.id};
        if (nout < OUT) {
          out[nout++] = (struct pending){k, o.claim};
        } else {
          assert_int_equal(gw_idem_release(st, &o.claim), 0);
          m[k].state = 0;
        }
      } else if (m[k].fp != f) {
        assert_int_equal(o.decision, GW_IDEM_MISMATCH);
      } else if (m[k].state == 1) {
        assert_int_equal(o.decision, GW_IDEM_IN_FLIGHT);
      } else {
        assert_int_equal(o.decision, GW_IDEM_REPLAY);
        assert_int_equal(o.replay.status, m[k].status);
      }
    } else {
      int i = (int)gw_rng_below(&rng, (uint64_t)nout);
      struct pending p = out[i];
      out[i] = out[--nout];
      enum gw_idem_origin origin = (enum gw_idem_origin)gw_rng_below(&rng, 3);
      int status = 200 + (int)gw_rng_below(&rng, 300);
      struct gw_idem_response resp = {status, "h", 1, "body", 4};
      /* A pending claim always owns its record: in-flight records do not expire. */
      bool owns = m[p.key].state == 1 && m[p.key].owner == p.claim.id;
      int rc = gw_idem_finish(st, &p.claim, origin, &resp, now);
      if (!owns) {
        assert_int_equal(rc, GW_POLICY_ESTALE);
      } else {
        assert_int_equal(rc, 0);
        if (gw_idem_should_store(origin)) {
          m[p.key].state = 2;
          m[p.key].status = status;
          m[p.key].expires = now + 1000 * MS;
        } else {
          m[p.key].state = 0;
        }
      }
      assert_true(owns);
      assert_int_equal(gw_idem_finish(st, &p.claim, origin, &resp, now), GW_POLICY_ESTALE);
    }
  }
  gw_idem_destroy(st);
}

int main(void)
{
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(config_out_of_range_is_rejected),
      cmocka_unit_test(key_validation_follows_length_and_printable_rules),
      cmocka_unit_test(fingerprint_covers_method_path_and_body),
      cmocka_unit_test(first_request_executes_and_duplicate_in_flight_gets_409),
      cmocka_unit_test(completed_request_is_replayed_byte_for_byte),
      cmocka_unit_test(different_request_under_same_key_gets_422),
      cmocka_unit_test(same_key_on_another_route_is_independent),
      cmocka_unit_test(record_expires_exactly_ttl_after_completion),
      cmocka_unit_test(in_flight_claim_outlives_ttl),
      cmocka_unit_test(store_rule_keeps_upstream_answers_and_timeouts_only),
      cmocka_unit_test(upstream_error_status_is_stored_and_replayed),
      cmocka_unit_test(rejection_before_upstream_releases_the_claim),
      cmocka_unit_test(release_twice_is_stale),
      cmocka_unit_test(completed_record_cannot_be_completed_again),
      cmocka_unit_test(record_limit_refuses_new_claims_until_records_expire),
      cmocka_unit_test(byte_limit_refuses_responses_that_do_not_fit),
      cmocka_unit_test(expire_sweeps_in_completion_order_and_frees_bytes),
      cmocka_unit_test(random_operations_match_a_record_model),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
