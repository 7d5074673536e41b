/*
 * test_raft_replication.c - scenarios for the AppendEntries rules of the paper's Figure 2
 * (§5.3), commitment (§5.4.2), the persist-before-send contract, fast conflict back-off, and the
 * leader's flow control (batching, pipelining, bounds).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#include "harness.h"

static struct raft_entry g_ents[32];

/* An AppendEntries from leader 2 in term `term` carrying entries prev+1.. with the given terms. */
static struct raft_message append(uint64_t term, uint64_t prev, uint64_t prev_term,
                                  const uint64_t *terms, int n, uint64_t commit)
{
    struct raft_message m = t_msg(RAFT_MSG_APPEND, 2, 1, term);
    for (int i = 0; i < n; i++) {
        g_ents[i].index = prev + 1 + (uint64_t)i;
        g_ents[i].term = terms[i];
        g_ents[i].type = RAFT_ENTRY_NORMAL;
        g_ents[i].len = 0;
        g_ents[i].data = NULL;
    }
    m.u.append.prev_index = prev;
    m.u.append.prev_term = prev_term;
    m.u.append.commit = commit;
    m.u.append.entries = n ? g_ents : NULL;
    m.u.append.n_entries = (uint32_t)n;
    return m;
}

static struct raft_message step_and_reply(struct raft *r, struct raft_message m)
{
    raft_step(r, &m);
    struct raft_message out[4];
    int n = t_take(r, RAFT_MSG_APPEND_RESP, out, 4, NULL);
    assert_int_equal(n, 1);
    return out[0];
}

/* A follower (id 1) whose log holds the given terms at indexes 1..n. */
static struct raft *follower_with_log(const uint64_t *terms, int n)
{
    struct tknobs k = tk_default();
    struct raft *r = t_node(&k, 1, 3);
    uint64_t top = terms[n - 1];
    step_and_reply(r, append(top, 0, 0, terms, n, 0));
    return r;
}

/* A leader (id 1 of `voters`) elected with a restored log; its own writes already durable. */
static struct raft *leader_with_log(const struct tknobs *k, int voters, const uint64_t *terms, int n)
{
    struct raft_membership boot = {0};
    for (int i = 1; i <= voters; i++) {
        boot.members[boot.n].id = (uint64_t)i;
        boot.members[boot.n].role = RAFT_VOTER;
        boot.n++;
    }
    struct raft_entry e[32];
    for (int i = 0; i < n; i++) {
        e[i].index = (uint64_t)i + 1;
        e[i].term = terms[i];
        e[i].type = RAFT_ENTRY_NORMAL;
        e[i].len = 0;
        e[i].data = NULL;
    }
    struct raft_restore rs = {0};
    rs.bootstrap = &boot;
    rs.entries = e;
    rs.n_entries = (size_t)n;
    rs.hard_state.term = n ? terms[n - 1] : 0;
    struct raft_config c;
    t_cfg(k, 1, &c);
    struct raft *r;
    assert_int_equal(raft_new(&c, &rs, &r), 0);
    raft_campaign(r);
    struct raft_message out[8];
    t_take(r, 0, out, 8, NULL);
    struct raft_status st;
    raft_status(r, &st);
    for (int i = 2; i <= voters / 2 + 1; i++) {
        struct raft_message m = t_msg(RAFT_MSG_VOTE_RESP, (uint64_t)i, 1, st.term);
        m.u.vote_resp.granted = true;
        raft_step(r, &m);
    }
    raft_status(r, &st);
    assert_int_equal(st.role, RAFT_LEADER);
    return r;
}

static int appends_to(struct raft *r, uint64_t to, struct raft_message *out, int max)
{
    struct raft_message all[64];
    int n = t_take(r, RAFT_MSG_APPEND, all, 64, NULL);
    int k = 0;
    for (int i = 0; i < n; i++)
        if (all[i].to == to && k < max)
            out[k++] = all[i];
    return k;
}

static void append_rejected_if_prev_entry_missing(void **state)
{
    uint64_t terms[] = {1, 1};
    struct raft *r = follower_with_log(terms, 2);
    struct raft_message resp = step_and_reply(r, append(1, 5, 1, terms, 1, 0));
    assert_true(resp.u.append_resp.reject);
    assert_int_equal(resp.u.append_resp.index, 5);
    assert_int_equal(resp.u.append_resp.hint_index, 3); /* our last + 1 */
    assert_int_equal(resp.u.append_resp.hint_term, 0);
    raft_free(r);
}

static void append_rejected_on_term_mismatch_reports_first_index_of_that_term(void **state)
{
    uint64_t terms[] = {1, 1, 2, 2, 2};
    struct raft *r = follower_with_log(terms, 5);
    uint64_t t3[] = {3};
    struct raft_message m = append(3, 5, 3, t3, 1, 0);
    struct raft_message resp = step_and_reply(r, m);
    assert_true(resp.u.append_resp.reject);
    assert_int_equal(resp.u.append_resp.hint_term, 2);
    assert_int_equal(resp.u.append_resp.hint_index, 3);
    raft_free(r);
}

static void conflicting_entries_are_truncated_and_replaced(void **state)
{
    uint64_t terms[] = {1, 1, 2, 2, 2};
    struct raft *r = follower_with_log(terms, 5);
    uint64_t t3[] = {3};
    struct raft_message resp = step_and_reply(r, append(3, 2, 1, t3, 1, 0));
    assert_false(resp.u.append_resp.reject);
    assert_int_equal(resp.u.append_resp.index, 3);
    struct raft_status st;
    raft_status(r, &st);
    assert_int_equal(st.last_index, 3);
    uint64_t t;
    assert_true(raft_term_at(r, 3, &t));
    assert_int_equal(t, 3);
    raft_free(r);
}

static void stale_append_does_not_truncate_matching_entries(void **state)
{
    uint64_t terms[] = {1, 1, 2, 2, 2};
    struct raft *r = follower_with_log(terms, 5);
    uint64_t t1[] = {1};
    struct raft_message resp = step_and_reply(r, append(2, 1, 1, t1, 1, 0));
    assert_false(resp.u.append_resp.reject);
    assert_int_equal(resp.u.append_resp.index, 2);
    struct raft_status st;
    raft_status(r, &st);
    assert_int_equal(st.last_index, 5);
    raft_free(r);
}

static void follower_commit_is_min_of_leader_commit_and_last_new_entry(void **state)
{
    uint64_t terms[] = {1, 1, 1, 1, 1};
    struct raft *r = follower_with_log(terms, 5);
    /* The leader says 10 is committed but only vouches for our log up to 2. */
    step_and_reply(r, append(1, 2, 1, terms, 0, 10));
    struct raft_status st;
    raft_status(r, &st);
    assert_int_equal(st.commit, 2);
    step_and_reply(r, append(1, 5, 1, terms, 0, 4));
    raft_status(r, &st);
    assert_int_equal(st.commit, 4);
    raft_free(r);
}

static void follower_acknowledges_in_the_update_that_persists_the_entries(void **state)
{
    struct tknobs k = tk_default();
    struct raft *r = t_node(&k, 1, 3);
    uint64_t terms[] = {1, 1};
    struct raft_message m = append(1, 0, 0, terms, 2, 0);
    raft_step(r, &m);
    struct raft_update u;
    raft_ready(r, &u);
    assert_int_equal(u.n_entries, 2);
    assert_int_equal(u.n_messages, 1);
    assert_int_equal(u.messages[0].type, RAFT_MSG_APPEND_RESP);
    assert_int_equal(u.messages[0].u.append_resp.index, 2);
    raft_advance(r, &u);
    assert_false(raft_has_ready(r));
    raft_free(r);
}

static void leader_backs_off_a_term_at_a_time(void **state)
{
    struct tknobs k = tk_default();
    uint64_t terms[] = {1, 1, 2, 2, 2};
    struct raft *r = leader_with_log(&k, 3, terms, 5); /* term 3, no-op at 6 */
    struct raft_message out[4];
    assert_int_equal(appends_to(r, 3, out, 4), 1);
    assert_int_equal(out[0].u.append.prev_index, 5);
    /* Follower 3 holds term 1 up to index 5: it answers with its term at 5. */
    struct raft_message m = t_msg(RAFT_MSG_APPEND_RESP, 3, 1, 3);
    m.u.append_resp.reject = true;
    m.u.append_resp.index = 5;
    m.u.append_resp.hint_term = 1;
    m.u.append_resp.hint_index = 1;
    raft_step(r, &m);
    assert_int_equal(appends_to(r, 3, out, 4), 1);
    /* All of term 2 skipped at once: resume after our last entry of term 1. */
    assert_int_equal(out[0].u.append.prev_index, 2);
    assert_int_equal(out[0].u.append.prev_term, 1);
    raft_free(r);
}

static void leader_backs_off_to_a_short_followers_end(void **state)
{
    struct tknobs k = tk_default();
    uint64_t terms[] = {1, 1, 2, 2, 2};
    struct raft *r = leader_with_log(&k, 3, terms, 5);
    struct raft_message out[4];
    appends_to(r, 2, out, 4);
    struct raft_message m = t_msg(RAFT_MSG_APPEND_RESP, 2, 1, 3);
    m.u.append_resp.reject = true;
    m.u.append_resp.index = 5;
    m.u.append_resp.hint_index = 2; /* its log ends at 1 */
    raft_step(r, &m);
    assert_int_equal(appends_to(r, 2, out, 4), 1);
    assert_int_equal(out[0].u.append.prev_index, 1);
    raft_free(r);
}

static void leader_commits_previous_term_entry_only_through_current_term_entry(void **state)
{
    struct tknobs k = tk_default();
    uint64_t terms[] = {1, 2};
    struct raft *r = leader_with_log(&k, 3, terms, 2); /* term 3, no-op at 3 */
    struct raft_update u;
    raft_ready(r, &u);
    raft_advance(r, &u); /* the leader's no-op is durable */
    /* Figure 8: a majority holds index 2 (term 2), yet counting must not commit it. */
    struct raft_message m = t_msg(RAFT_MSG_APPEND_RESP, 2, 1, 3);
    m.u.append_resp.index = 2;
    raft_step(r, &m);
    struct raft_status st;
    raft_status(r, &st);
    assert_int_equal(st.commit, 0);
    m.u.append_resp.index = 3;
    raft_step(r, &m);
    raft_status(r, &st);
    assert_int_equal(st.commit, 3);
    raft_free(r);
}

static void leader_does_not_count_itself_before_persisting(void **state)
{
    struct tknobs k = tk_default();
    struct tcluster t;
    t_init(&t, &k, 3);
    t_elect(&t, 1);
    assert_int_equal(t_st(&t, 1).commit, 1);
    assert_int_equal(t_propose(&t, 1, 7), 0);
    struct raft_update u;
    raft_ready(t.r[1], &u); /* handed out for persistence, not yet durable */
    struct raft_message m = t_msg(RAFT_MSG_APPEND_RESP, 2, 1, 1);
    m.u.append_resp.index = 2;
    raft_step(t.r[1], &m);
    assert_int_equal(t_st(&t, 1).commit, 1); /* 2 of 3 would do, but the leader's copy is not durable */
    raft_advance(t.r[1], &u);
    assert_int_equal(t_st(&t, 1).commit, 2);
    t_free(&t);
}

static void entries_replicate_and_commit_on_every_node(void **state)
{
    struct tknobs k = tk_default();
    struct tcluster t;
    t_init(&t, &k, 5);
    t_elect(&t, 1);
    for (uint64_t v = 0; v < 10; v++)
        assert_int_equal(t_propose(&t, 1, v), 0);
    t_settle(&t);
    t_tick_all(&t, 2); /* followers learn the commit index from heartbeats */
    for (int i = 1; i <= 5; i++) {
        assert_int_equal(t_st(&t, i).commit, 11);
        assert_int_equal(t.n_applied_normal[i], 10);
    }
    t_free(&t);
}

static void pipelining_is_bounded_by_max_inflight(void **state)
{
    struct tknobs k = tk_default();
    k.max_inflight_msgs = 2;
    k.max_msg_bytes = 21; /* one 8-byte entry per message */
    struct tcluster t;
    t_init(&t, &k, 3);
    t_elect(&t, 1);
    for (uint64_t v = 0; v < 6; v++)
        assert_int_equal(t_propose(&t, 1, v), 0);
    struct raft_message out[16];
    int n = appends_to(t.r[1], 2, out, 16);
    assert_int_equal(n, 2);
    assert_int_equal(out[0].u.append.n_entries, 1);
    assert_int_equal(out[1].u.append.prev_index, 2);
    /* An acknowledgement frees one slot. */
    struct raft_message m = t_msg(RAFT_MSG_APPEND_RESP, 2, 1, 1);
    m.u.append_resp.index = 2;
    raft_step(t.r[1], &m);
    n = appends_to(t.r[1], 2, out, 16);
    int with_entries = 0;
    for (int i = 0; i < n; i++) {
        if (out[i].u.append.n_entries == 0)
            continue; /* a heartbeat carrying the new commit index */
        with_entries++;
        assert_int_equal(out[i].u.append.prev_index, 3);
    }
    assert_int_equal(with_entries, 1);
    t_drop_queue(&t);
    t_free(&t);
}

static void batching_respects_max_message_size(void **state)
{
    struct tknobs k = tk_default();
    k.max_msg_bytes = 2 * (13 + 8);
    struct tcluster t;
    t_init(&t, &k, 3);
    t_elect(&t, 1);
    for (uint64_t v = 0; v < 5; v++)
        assert_int_equal(t_propose(&t, 1, v), 0);
    struct raft_message out[16];
    int n = appends_to(t.r[1], 2, out, 16);
    assert_int_equal(n, 3);
    assert_int_equal(out[0].u.append.n_entries, 2);
    assert_int_equal(out[1].u.append.n_entries, 2);
    assert_int_equal(out[2].u.append.n_entries, 1);
    t_free(&t);
}

static void proposals_refused_beyond_uncommitted_bound(void **state)
{
    struct tknobs k = tk_default();
    k.max_uncommitted = 3;
    struct tcluster t;
    t_init(&t, &k, 3);
    t_elect(&t, 1);
    t_isolate(&t, 1, true);
    assert_int_equal(t_propose(&t, 1, 1), 0);
    assert_int_equal(t_propose(&t, 1, 2), 0);
    assert_int_equal(t_propose(&t, 1, 3), 0);
    assert_int_equal(t_propose(&t, 1, 4), RAFT_ERR_BUSY);
    assert_int_equal(t_propose(&t, 2, 4), RAFT_ERR_NOT_LEADER);
    t_free(&t);
}

static void lost_appends_are_resent_after_stall(void **state)
{
    struct tknobs k = tk_default();
    struct tcluster t;
    t_init(&t, &k, 3);
    t_elect(&t, 1);
    t.cut[1][2] = true;
    assert_int_equal(t_propose(&t, 1, 1), 0);
    t_settle(&t);
    t.cut[1][2] = false;
    t_tick_all(&t, 8);
    assert_int_equal(t_st(&t, 2).last_index, 2);
    assert_int_equal(t_st(&t, 2).commit, 2);
    t_free(&t);
}

static void follower_catches_up_after_long_divergence(void **state)
{
    struct tknobs k = tk_default();
    struct tcluster t;
    t_init(&t, &k, 3);
    t_elect(&t, 1);
    t_isolate(&t, 1, true);
    for (uint64_t v = 0; v < 5; v++)
        t_propose(&t, 1, v); /* never committed */
    t_settle(&t);
    t_elect(&t, 2);
    assert_int_equal(t_st(&t, 2).role, RAFT_LEADER);
    for (uint64_t v = 0; v < 3; v++)
        t_propose(&t, 2, 100 + v);
    t_settle(&t);
    t_isolate(&t, 1, false);
    t_tick_all(&t, 10);
    struct raft_status a = t_st(&t, 1), b = t_st(&t, 2);
    assert_int_equal(a.last_index, b.last_index);
    assert_int_equal(a.commit, b.commit);
    for (uint64_t i = 1; i <= a.last_index; i++) {
        uint64_t x, y;
        assert_true(raft_term_at(t.r[1], i, &x));
        assert_true(raft_term_at(t.r[2], i, &y));
        assert_int_equal(x, y);
    }
    t_free(&t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(append_rejected_if_prev_entry_missing),
        cmocka_unit_test(append_rejected_on_term_mismatch_reports_first_index_of_that_term),
        cmocka_unit_test(conflicting_entries_are_truncated_and_replaced),
        cmocka_unit_test(stale_append_does_not_truncate_matching_entries),
        cmocka_unit_test(follower_commit_is_min_of_leader_commit_and_last_new_entry),
        cmocka_unit_test(follower_acknowledges_in_the_update_that_persists_the_entries),
        cmocka_unit_test(leader_backs_off_a_term_at_a_time),
        cmocka_unit_test(leader_backs_off_to_a_short_followers_end),
        cmocka_unit_test(leader_commits_previous_term_entry_only_through_current_term_entry),
        cmocka_unit_test(leader_does_not_count_itself_before_persisting),
        cmocka_unit_test(entries_replicate_and_commit_on_every_node),
        cmocka_unit_test(pipelining_is_bounded_by_max_inflight),
        cmocka_unit_test(batching_respects_max_message_size),
        cmocka_unit_test(proposals_refused_beyond_uncommitted_bound),
        cmocka_unit_test(lost_appends_are_resent_after_stall),
        cmocka_unit_test(follower_catches_up_after_long_divergence),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
