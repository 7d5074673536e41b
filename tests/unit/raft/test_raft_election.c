/*
 * test_raft_election.c - scenarios for the RequestVote rules of the paper's Figure 2 and §5.2,
 * the "rules for all servers", PreVote (thesis §9.6) and CheckQuorum (thesis §6.2).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#include "harness.h"

static struct raft_message vote_req(uint64_t from, uint64_t to, uint64_t term, uint64_t li, uint64_t lt)
{
    struct raft_message m = t_msg(RAFT_MSG_VOTE, from, to, term);
    m.u.vote.last_index = li;
    m.u.vote.last_term = lt;
    return m;
}

/* Gives a follower entries (index i has term terms[i-1]) through an AppendEntries. */
static void give_log(struct raft *r, uint64_t leader, uint64_t term, const uint64_t *terms, int n)
{
    struct raft_entry e[16];
    for (int i = 0; i < n; i++) {
        e[i].index = (uint64_t)i + 1;
        e[i].term = terms[i];
        e[i].type = RAFT_ENTRY_NORMAL;
        e[i].len = 0;
        e[i].data = NULL;
    }
    struct raft_status st;
    raft_status(r, &st);
    struct raft_message m = t_msg(RAFT_MSG_APPEND, leader, st.id, term);
    m.u.append.entries = e;
    m.u.append.n_entries = (uint32_t)n;
    raft_step(r, &m);
    struct raft_message out[4];
    t_take(r, 0, out, 4, NULL);
}

static void follower_becomes_candidate_after_election_timeout(void **state)
{
    struct tknobs k = tk_default();
    struct raft *r = t_node(&k, 1, 3);
    for (int i = 0; i < 20; i++)
        raft_tick(r);
    struct raft_status st;
    raft_status(r, &st);
    assert_int_equal(st.role, RAFT_CANDIDATE);
    assert_int_equal(st.term, 1);
    assert_int_equal(st.vote, 1);
    struct raft_message out[8];
    struct raft_update u;
    assert_int_equal(t_take(r, RAFT_MSG_VOTE, out, 8, &u), 2);
    assert_true(u.hard_state_changed);
    assert_int_equal(u.hard_state.vote, 1);
    raft_free(r);
}

static void election_timeout_is_randomized_between_t_and_2t(void **state)
{
    struct tknobs k = tk_default();
    struct raft_membership boot = {3, {{1, RAFT_VOTER}, {2, RAFT_VOTER}, {3, RAFT_VOTER}}};
    bool seen[40] = {false};
    int distinct = 0;
    for (uint64_t seed = 1; seed <= 30; seed++) {
        struct raft_config c;
        t_cfg(&k, 1, &c);
        c.random_seed = seed;
        struct raft_restore rs = {0};
        rs.bootstrap = &boot;
        struct raft *r;
        assert_int_equal(raft_new(&c, &rs, &r), 0);
        int ticks = 0;
        struct raft_status st;
        do {
            raft_tick(r);
            ticks++;
            raft_status(r, &st);
        } while (st.role == RAFT_FOLLOWER && ticks < 100);
        assert_true(ticks >= 10 && ticks < 20);
        if (!seen[ticks]) {
            seen[ticks] = true;
            distinct++;
        }
        raft_free(r);
    }
    assert_true(distinct >= 4);
}

static void vote_granted_to_first_candidate_with_up_to_date_log(void **state)
{
    struct tknobs k = tk_default();
    struct raft *r = t_node(&k, 1, 3);
    struct raft_message m = vote_req(2, 1, 1, 0, 0);
    raft_step(r, &m);
    struct raft_message out[4];
    struct raft_update u;
    assert_int_equal(t_take(r, RAFT_MSG_VOTE_RESP, out, 4, &u), 1);
    assert_true(out[0].u.vote_resp.granted);
    assert_int_equal(out[0].term, 1);
    /* The vote leaves in the same update that persists it (persist before send). */
    assert_true(u.hard_state_changed);
    assert_int_equal(u.hard_state.term, 1);
    assert_int_equal(u.hard_state.vote, 2);
    raft_free(r);
}

static void vote_rejected_if_already_voted(void **state)
{
    struct tknobs k = tk_default();
    struct raft *r = t_node(&k, 1, 3);
    struct raft_message m = vote_req(2, 1, 1, 0, 0);
    raft_step(r, &m);
    struct raft_message out[4];
    t_take(r, 0, out, 4, NULL);
    m = vote_req(3, 1, 1, 0, 0);
    raft_step(r, &m);
    assert_int_equal(t_take(r, RAFT_MSG_VOTE_RESP, out, 4, NULL), 1);
    assert_false(out[0].u.vote_resp.granted);
    /* The same candidate asking again gets the same answer. */
    m = vote_req(2, 1, 1, 0, 0);
    raft_step(r, &m);
    assert_int_equal(t_take(r, RAFT_MSG_VOTE_RESP, out, 4, NULL), 1);
    assert_true(out[0].u.vote_resp.granted);
    raft_free(r);
}

static void vote_rejected_if_candidate_last_term_is_lower(void **state)
{
    struct tknobs k = tk_default();
    struct raft *r = t_node(&k, 1, 3);
    uint64_t terms[] = {1, 2};
    give_log(r, 2, 2, terms, 2);
    struct raft_message m = vote_req(3, 1, 3, 10, 1); /* longer log, older last term */
    raft_step(r, &m);
    struct raft_message out[4];
    assert_int_equal(t_take(r, RAFT_MSG_VOTE_RESP, out, 4, NULL), 1);
    assert_false(out[0].u.vote_resp.granted);
    raft_free(r);
}

static void vote_rejected_if_candidate_log_is_shorter_in_same_term(void **state)
{
    struct tknobs k = tk_default();
    struct raft *r = t_node(&k, 1, 3);
    uint64_t terms[] = {1, 2, 2};
    give_log(r, 2, 2, terms, 3);
    struct raft_message m = vote_req(3, 1, 3, 2, 2);
    raft_step(r, &m);
    struct raft_message out[4];
    assert_int_equal(t_take(r, RAFT_MSG_VOTE_RESP, out, 4, NULL), 1);
    assert_false(out[0].u.vote_resp.granted);
    m = vote_req(3, 1, 3, 3, 2); /* as long: granted */
    raft_step(r, &m);
    assert_int_equal(t_take(r, RAFT_MSG_VOTE_RESP, out, 4, NULL), 1);
    assert_true(out[0].u.vote_resp.granted);
    raft_free(r);
}

static void candidate_becomes_leader_with_majority_and_appends_noop(void **state)
{
    struct tknobs k = tk_default();
    struct raft *r = t_node(&k, 1, 5);
    raft_campaign(r);
    struct raft_message out[8];
    assert_int_equal(t_take(r, RAFT_MSG_VOTE, out, 8, NULL), 4);
    struct raft_message m = t_msg(RAFT_MSG_VOTE_RESP, 2, 1, 1);
    m.u.vote_resp.granted = true;
    raft_step(r, &m);
    struct raft_status st;
    raft_status(r, &st);
    assert_int_equal(st.role, RAFT_CANDIDATE); /* 2 of 5 */
    m.from = 3;
    raft_step(r, &m);
    raft_status(r, &st);
    assert_int_equal(st.role, RAFT_LEADER);
    assert_int_equal(st.last_index, 1);
    const struct raft_entry *e = raft_entry_at(r, 1);
    assert_int_equal(e->type, RAFT_ENTRY_NOOP);
    assert_int_equal(e->term, 1);
    raft_free(r);
}

static void candidate_steps_down_when_a_majority_rejects(void **state)
{
    struct tknobs k = tk_default();
    struct raft *r = t_node(&k, 1, 3);
    raft_campaign(r);
    struct raft_message out[8];
    t_take(r, 0, out, 8, NULL);
    struct raft_message m = t_msg(RAFT_MSG_VOTE_RESP, 2, 1, 1);
    raft_step(r, &m);
    m.from = 3;
    raft_step(r, &m);
    struct raft_status st;
    raft_status(r, &st);
    assert_int_equal(st.role, RAFT_FOLLOWER);
    assert_int_equal(st.term, 1);
    raft_free(r);
}

static void candidate_steps_down_on_append_from_leader_of_same_term(void **state)
{
    struct tknobs k = tk_default();
    struct raft *r = t_node(&k, 1, 3);
    raft_campaign(r);
    struct raft_message out[8];
    t_take(r, 0, out, 8, NULL);
    struct raft_message m = t_msg(RAFT_MSG_APPEND, 2, 1, 1);
    raft_step(r, &m);
    struct raft_status st;
    raft_status(r, &st);
    assert_int_equal(st.role, RAFT_FOLLOWER);
    assert_int_equal(st.leader, 2);
    assert_int_equal(st.term, 1);
    raft_free(r);
}

static void higher_term_in_a_response_turns_leader_into_follower(void **state)
{
    struct tknobs k = tk_default();
    struct tcluster t;
    t_init(&t, &k, 3);
    t_elect(&t, 1);
    assert_int_equal(t_st(&t, 1).role, RAFT_LEADER);
    struct raft_message m = t_msg(RAFT_MSG_APPEND_RESP, 2, 1, 7);
    raft_step(t.r[1], &m);
    assert_int_equal(t_st(&t, 1).role, RAFT_FOLLOWER);
    assert_int_equal(t_st(&t, 1).term, 7);
    assert_int_equal(t_st(&t, 1).vote, 0);
    t_free(&t);
}

static void stale_term_append_is_ignored(void **state)
{
    struct tknobs k = tk_default();
    struct raft *r = t_node(&k, 1, 3);
    struct raft_message m = vote_req(2, 1, 3, 0, 0);
    raft_step(r, &m);
    struct raft_message out[4];
    t_take(r, 0, out, 4, NULL);
    struct raft_entry e = {1, 1, RAFT_ENTRY_NORMAL, 0, NULL};
    m = t_msg(RAFT_MSG_APPEND, 3, 1, 2);
    m.u.append.entries = &e;
    m.u.append.n_entries = 1;
    raft_step(r, &m);
    struct raft_status st;
    raft_status(r, &st);
    assert_int_equal(st.last_index, 0);
    assert_int_equal(st.term, 3);
    assert_int_equal(st.leader, 0);
    assert_int_equal(t_take(r, RAFT_MSG_APPEND_RESP, out, 4, NULL), 0);
    raft_free(r);
}

static void stale_leader_is_told_the_newer_term_with_check_quorum(void **state)
{
    struct tknobs k = tk_default();
    k.check_quorum = true;
    struct raft *r = t_node(&k, 1, 3);
    struct raft_message m = vote_req(2, 1, 3, 0, 0);
    raft_step(r, &m);
    struct raft_message out[4];
    t_take(r, 0, out, 4, NULL);
    m = t_msg(RAFT_MSG_APPEND, 3, 1, 2);
    raft_step(r, &m);
    assert_int_equal(t_take(r, RAFT_MSG_APPEND_RESP, out, 4, NULL), 1);
    assert_true(out[0].u.append_resp.reject);
    assert_int_equal(out[0].term, 3);
    raft_free(r);
}

static void single_voter_elects_itself_and_commits_after_persisting(void **state)
{
    struct tknobs k = tk_default();
    struct raft *r = t_node(&k, 1, 1);
    for (int i = 0; i < 20; i++)
        raft_tick(r);
    struct raft_status st;
    raft_status(r, &st);
    assert_int_equal(st.role, RAFT_LEADER);
    assert_int_equal(st.commit, 0); /* the no-op is not durable yet */
    struct raft_update u;
    raft_ready(r, &u);
    assert_int_equal(u.n_entries, 1);
    assert_int_equal(u.n_committed, 0);
    raft_advance(r, &u);
    raft_status(r, &st);
    assert_int_equal(st.commit, 1);
    raft_free(r);
}

static void leader_sends_heartbeats_when_idle(void **state)
{
    struct tknobs k = tk_default();
    k.heartbeat_ticks = 3;
    struct tcluster t;
    t_init(&t, &k, 3);
    t_elect(&t, 1);
    struct raft_message out[8];
    t_tick(&t, 1, 2);
    t_drop_queue(&t);
    raft_tick(t.r[1]);
    assert_int_equal(t_take(t.r[1], RAFT_MSG_APPEND, out, 8, NULL), 2);
    assert_int_equal(out[0].u.append.n_entries, 0);
    assert_int_equal(out[0].u.append.commit, 1);
    t_free(&t);
}

static void follower_hearing_from_leader_does_not_campaign(void **state)
{
    struct tknobs k = tk_default();
    struct tcluster t;
    t_init(&t, &k, 3);
    t_elect(&t, 1);
    t_tick_all(&t, 100);
    assert_int_equal(t_st(&t, 1).role, RAFT_LEADER);
    assert_int_equal(t_st(&t, 1).term, 1);
    assert_int_equal(t_st(&t, 2).role, RAFT_FOLLOWER);
    assert_int_equal(t_st(&t, 3).term, 1);
    t_free(&t);
}

static void new_leader_elected_after_leader_fails(void **state)
{
    struct tknobs k = tk_default();
    k.pre_vote = true;
    k.check_quorum = true;
    struct tcluster t;
    t_init(&t, &k, 5);
    t_elect(&t, 1);
    t_propose(&t, 1, 1);
    t_settle(&t);
    t_isolate(&t, 1, true);
    for (int i = 0; i < 60; i++) {
        for (int id = 2; id <= 5; id++)
            t_tick(&t, id, 1);
        t_settle(&t);
    }
    int leaders = 0;
    for (int id = 2; id <= 5; id++)
        leaders += t_st(&t, id).role == RAFT_LEADER;
    assert_int_equal(leaders, 1);
    t_free(&t);
}

/* ---------------------------------------------------------------- PreVote */

static void prevote_does_not_change_term(void **state)
{
    struct tknobs k = tk_default();
    k.pre_vote = true;
    struct raft *r = t_node(&k, 1, 3);
    for (int i = 0; i < 20; i++)
        raft_tick(r);
    struct raft_status st;
    raft_status(r, &st);
    assert_int_equal(st.role, RAFT_PRE_CANDIDATE);
    assert_int_equal(st.term, 0);
    struct raft_message out[4];
    struct raft_update u;
    assert_int_equal(t_take(r, RAFT_MSG_PREVOTE, out, 4, &u), 2);
    assert_int_equal(out[0].term, 1);
    assert_false(u.hard_state_changed);
    raft_free(r);
}

static void prevote_majority_starts_real_election(void **state)
{
    struct tknobs k = tk_default();
    k.pre_vote = true;
    struct tcluster t;
    t_init(&t, &k, 3);
    t_elect(&t, 1);
    assert_int_equal(t_st(&t, 1).role, RAFT_LEADER);
    assert_int_equal(t_st(&t, 1).term, 1);
    assert_int_equal(t_st(&t, 2).leader, 1);
    t_free(&t);
}

static void prevote_voter_keeps_its_term(void **state)
{
    struct tknobs k = tk_default();
    k.pre_vote = true;
    struct raft *r = t_node(&k, 1, 3);
    struct raft_message m = t_msg(RAFT_MSG_PREVOTE, 2, 1, 5);
    raft_step(r, &m);
    struct raft_message out[4];
    struct raft_update u;
    assert_int_equal(t_take(r, RAFT_MSG_PREVOTE_RESP, out, 4, &u), 1);
    assert_true(out[0].u.vote_resp.granted);
    assert_int_equal(out[0].term, 5);
    struct raft_status st;
    raft_status(r, &st);
    assert_int_equal(st.term, 0);
    assert_int_equal(st.vote, 0);
    raft_free(r);
}

static void partitioned_node_does_not_disrupt_leader_when_it_returns(void **state)
{
    struct tknobs k = tk_default();
    k.pre_vote = true;
    k.check_quorum = true;
    struct tcluster t;
    t_init(&t, &k, 3);
    t_elect(&t, 1);
    t_isolate(&t, 3, true);
    t_tick_all(&t, 60);
    assert_int_equal(t_st(&t, 3).term, 1); /* its pre-votes found no quorum */
    t_isolate(&t, 3, false);
    t_tick_all(&t, 30);
    assert_int_equal(t_st(&t, 1).role, RAFT_LEADER);
    assert_int_equal(t_st(&t, 1).term, 1);
    assert_int_equal(t_st(&t, 3).leader, 1);
    t_free(&t);
}

static void vote_ignored_while_hearing_from_leader(void **state)
{
    struct tknobs k = tk_default();
    k.check_quorum = true;
    struct tcluster t;
    t_init(&t, &k, 3);
    t_elect(&t, 1);
    struct raft_message m = vote_req(3, 2, 9, 100, 9);
    raft_step(t.r[2], &m);
    assert_int_equal(t_st(&t, 2).term, 1);
    struct raft_message out[4];
    assert_int_equal(t_take(t.r[2], RAFT_MSG_VOTE_RESP, out, 4, NULL), 0);
    t_free(&t);
}

/* ---------------------------------------------------------------- CheckQuorum */

static void leader_steps_down_without_quorum(void **state)
{
    struct tknobs k = tk_default();
    k.check_quorum = true;
    struct tcluster t;
    t_init(&t, &k, 3);
    t_elect(&t, 1);
    t_isolate(&t, 1, true);
    for (int i = 0; i < 2 * 10 && t_st(&t, 1).role == RAFT_LEADER; i++) {
        t_tick(&t, 1, 1);
        t_settle(&t);
    }
    assert_int_equal(t_st(&t, 1).role, RAFT_FOLLOWER);
    assert_int_equal(t_st(&t, 1).leader, 0);
    t_free(&t);
}

static void leader_keeps_leadership_with_quorum(void **state)
{
    struct tknobs k = tk_default();
    k.check_quorum = true;
    struct tcluster t;
    t_init(&t, &k, 3);
    t_elect(&t, 1);
    t_isolate(&t, 3, true); /* one of three gone: still a quorum */
    for (int i = 0; i < 50; i++) {
        t_tick(&t, 1, 1);
        t_tick(&t, 2, 1);
        t_settle(&t);
    }
    assert_int_equal(t_st(&t, 1).role, RAFT_LEADER);
    assert_int_equal(t_st(&t, 1).term, 1);
    t_free(&t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(follower_becomes_candidate_after_election_timeout),
        cmocka_unit_test(election_timeout_is_randomized_between_t_and_2t),
        cmocka_unit_test(vote_granted_to_first_candidate_with_up_to_date_log),
        cmocka_unit_test(vote_rejected_if_already_voted),
        cmocka_unit_test(vote_rejected_if_candidate_last_term_is_lower),
        cmocka_unit_test(vote_rejected_if_candidate_log_is_shorter_in_same_term),
        cmocka_unit_test(candidate_becomes_leader_with_majority_and_appends_noop),
        cmocka_unit_test(candidate_steps_down_when_a_majority_rejects),
        cmocka_unit_test(candidate_steps_down_on_append_from_leader_of_same_term),
        cmocka_unit_test(higher_term_in_a_response_turns_leader_into_follower),
        cmocka_unit_test(stale_term_append_is_ignored),
        cmocka_unit_test(stale_leader_is_told_the_newer_term_with_check_quorum),
        cmocka_unit_test(single_voter_elects_itself_and_commits_after_persisting),
        cmocka_unit_test(leader_sends_heartbeats_when_idle),
        cmocka_unit_test(follower_hearing_from_leader_does_not_campaign),
        cmocka_unit_test(new_leader_elected_after_leader_fails),
        cmocka_unit_test(prevote_does_not_change_term),
        cmocka_unit_test(prevote_majority_starts_real_election),
        cmocka_unit_test(prevote_voter_keeps_its_term),
        cmocka_unit_test(partitioned_node_does_not_disrupt_leader_when_it_returns),
        cmocka_unit_test(vote_ignored_while_hearing_from_leader),
        cmocka_unit_test(leader_steps_down_without_quorum),
        cmocka_unit_test(leader_keeps_leadership_with_quorum),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
