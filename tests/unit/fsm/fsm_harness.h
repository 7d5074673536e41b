/*
 * fsm_harness.h - helpers for the state machine's tests: build a command, encode it, apply it at
 * the next log index with the test's clock, and look at the result. Each helper returns the
 * index it applied at, which is also the lease id or waiter id the command may have created.
 */
#ifndef FSM_HARNESS_H
#define FSM_HARNESS_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fsm.h"

struct h {
    struct gw_fsm *f;
    struct gw_fsm_result res;
    uint64_t index;
    uint64_t now;
    const char *idem; /* idempotency key for the next command, then cleared */
};

static inline void h_init_cfg(struct h *h, const struct gw_fsm_config *cfg)
{
    memset(h, 0, sizeof(*h));
    assert_int_equal(gw_fsm_new(cfg, &h->f), 0);
    gw_fsm_result_init(&h->res);
    h->now = 1000000;
}

static inline void h_init(struct h *h)
{
    struct gw_fsm_config cfg;
    gw_fsm_config_default(&cfg);
    cfg.hash_k0 = 0x1234;
    cfg.hash_k1 = 0x5678;
    h_init_cfg(h, &cfg);
}

static inline void h_free(struct h *h)
{
    gw_fsm_result_free(&h->res);
    gw_fsm_free(h->f);
}

static inline uint64_t h_apply(struct h *h, struct gw_fsm_cmd *c)
{
    uint8_t buf[70000];
    size_t len;
    c->now_ms = h->now;
    if (h->idem != NULL) {
        c->idem_key = h->idem;
        c->idem_key_len = strlen(h->idem);
        h->idem = NULL;
    }
    assert_int_equal(gw_fsm_cmd_encode(c, buf, sizeof(buf), &len), 0);
    uint64_t index = ++h->index;
    assert_int_equal(gw_fsm_apply(h->f, index, buf, len, &h->res), 0);
    return index;
}

static inline uint64_t h_grant(struct h *h, uint64_t ttl_ms)
{
    struct gw_fsm_cmd c = {.kind = GW_FSM_LEASE_GRANT, .ttl_ms = ttl_ms};
    return h_apply(h, &c);
}

static inline uint64_t h_keepalive(struct h *h, uint64_t id)
{
    struct gw_fsm_cmd c = {.kind = GW_FSM_LEASE_KEEPALIVE, .lease_id = id};
    return h_apply(h, &c);
}

static inline uint64_t h_revoke(struct h *h, uint64_t id)
{
    struct gw_fsm_cmd c = {.kind = GW_FSM_LEASE_REVOKE, .lease_id = id};
    return h_apply(h, &c);
}

static inline uint64_t h_expire(struct h *h, const uint64_t *ids, size_t n)
{
    struct gw_fsm_cmd c = {.kind = GW_FSM_LEASE_EXPIRE, .ids = ids, .n_ids = n};
    return h_apply(h, &c);
}

static inline uint64_t h_acquire(struct h *h, const char *name, const char *owner, uint64_t lease_id,
                                 uint64_t ttl_ms, uint64_t wait_ms)
{
    struct gw_fsm_cmd c = {.kind = GW_FSM_LOCK_ACQUIRE, .name = name, .name_len = strlen(name),
                           .owner = owner, .owner_len = strlen(owner), .lease_id = lease_id,
                           .ttl_ms = ttl_ms, .wait_ms = wait_ms};
    return h_apply(h, &c);
}

static inline uint64_t h_release(struct h *h, const char *name, uint64_t token)
{
    struct gw_fsm_cmd c = {.kind = GW_FSM_LOCK_RELEASE, .name = name, .name_len = strlen(name),
                           .token = token};
    return h_apply(h, &c);
}

static inline uint64_t h_cancel(struct h *h, const char *name, uint64_t waiter_id)
{
    struct gw_fsm_cmd c = {.kind = GW_FSM_LOCK_CANCEL_WAIT, .name = name, .name_len = strlen(name),
                           .waiter_id = waiter_id};
    return h_apply(h, &c);
}

static inline uint64_t h_add(struct h *h, const char *name, int64_t delta)
{
    struct gw_fsm_cmd c = {.kind = GW_FSM_COUNTER_ADD, .name = name, .name_len = strlen(name),
                           .delta = delta};
    return h_apply(h, &c);
}

static inline uint64_t h_set(struct h *h, const char *name, int64_t value, bool has_expect,
                             int64_t expect)
{
    struct gw_fsm_cmd c = {.kind = GW_FSM_COUNTER_SET, .name = name, .name_len = strlen(name),
                           .value = value, .has_expect = has_expect, .expect = expect};
    return h_apply(h, &c);
}

static inline uint64_t h_route_put(struct h *h, const char *name, const char *json)
{
    struct gw_fsm_cmd c = {.kind = GW_FSM_ROUTE_PUT, .name = name, .name_len = strlen(name),
                           .json = json, .json_len = strlen(json)};
    return h_apply(h, &c);
}

static inline uint64_t h_route_delete(struct h *h, const char *name)
{
    struct gw_fsm_cmd c = {.kind = GW_FSM_ROUTE_DELETE, .name = name, .name_len = strlen(name)};
    return h_apply(h, &c);
}

/* The last result: status and exact body. */
#define assert_res(h, st, body_)                                  \
    do {                                                          \
        assert_int_equal((h)->res.status, (st));                  \
        assert_string_equal((h)->res.body, (body_));              \
        assert_int_equal((h)->res.body_len, strlen((body_)));     \
    } while (0)

/* The last result is an error with this status and code. */
#define assert_err(h, st, code_)                                  \
    do {                                                          \
        assert_int_equal((h)->res.status, (st));                  \
        assert_non_null((h)->res.code);                           \
        assert_string_equal((h)->res.code, (code_));              \
    } while (0)

static inline void assert_contains(const char *hay, const char *needle)
{
    if (strstr(hay, needle) == NULL)
        fail_msg("\"%s\" does not contain \"%s\"", hay, needle);
}

/* The wakeup for waiter id in the last result, or NULL. */
static inline const struct gw_fsm_wakeup *h_wakeup(const struct h *h, uint64_t id)
{
    for (size_t i = 0; i < h->res.n_wakeups; i++)
        if (h->res.wakeups[i].waiter_id == id)
            return &h->res.wakeups[i];
    return NULL;
}

/* Token of a granted-lock body ("token":N). */
static inline uint64_t body_token(const char *body)
{
    const char *p = strstr(body, "\"token\":");
    assert_non_null(p);
    return strtoull(p + 8, NULL, 10);
}

#endif
