/*
 * test_raft_features.c - scenarios for snapshots and InstallSnapshot (paper §7), membership
 * changes with learners (thesis §4), leadership transfer (thesis §3.10), ReadIndex (thesis §6.4)
 * and restart from persisted state.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#include "harness.h"

/* ---------------------------------------------------------------- snapshots */

static void snapshot_requested_after_threshold(void **state)
{
    struct tknobs k = tk_default();
    k.snapshot_threshold = 5;
    struct tcluster t;
    t_init(&t, &k, 1);
    t_elect(&t, 1);
    for (uint64_t v = 0; v < 3; v++)
        t_propose(&t, 1, v);
    t_settle(&t);
    assert_int_equal(t.snapshot_wanted[1], 0);
    for (uint64_t v = 0; v < 3; v++)
        t_propose(&t, 1, v);
    t_settle(&t);
    assert_true(t.snapshot_wanted[1] > 0);
    t_free(&t);
}

static void log_compacted_after_snapshot_saved_keeping_a_tail(void **state)
{
    struct tknobs k = tk_default();
    k.snapshot_trailing = 2;
    struct tcluster t;
    t_init(&t, &k, 1);
    t_elect(&t, 1);
    for (uint64_t v = 0; v < 9; v++)
        t_propose(&t, 1, v);
    t_settle(&t);
    assert_int_equal(t.applied[1], 10);
    uint8_t img[4] = {1, 2, 3, 4};
    assert_int_equal(raft_snapshot_saved(t.r[1], 11, img, 4), RAFT_ERR_INVALID); /* not applied */
    assert_int_equal(raft_snapshot_saved(t.r[1], 10, img, 4), 0);
    struct raft_status st = t_st(&t, 1);
    assert_int_equal(st.snapshot_index, 10);
    assert_int_equal(st.first_index, 9);
    assert_null(raft_entry_at(t.r[1], 8));
    assert_int_equal(raft_snapshot_saved(t.r[1], 10, img, 4), RAFT_ERR_INVALID); /* not newer */
    t_free(&t);
}

static void lagging_follower_receives_snapshot_in_chunks(void **state)
{
    struct tknobs k = tk_default();
    k.snapshot_chunk_bytes = 4;
    struct tcluster t;
    t_init(&t, &k, 3);
    t_elect(&t, 1);
    t_isolate(&t, 3, true);
    for (uint64_t v = 0; v < 20; v++)
        t_propose(&t, 1, v);
    t_settle(&t);
    uint8_t img[10] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9};
    assert_int_equal(raft_snapshot_saved(t.r[1], t.applied[1], img, sizeof(img)), 0);
    uint64_t snap_index = t.applied[1];
    assert_true(t_st(&t, 1).first_index > 2);
    t_isolate(&t, 3, false);
    t_tick_all(&t, 10);
    struct raft_status st = t_st(&t, 3);
    assert_int_equal(st.snapshot_index, snap_index);
    assert_int_equal(t.applied[3], snap_index);
    const struct raft_snapshot *s = raft_last_snapshot(t.r[3]);
    assert_int_equal(s->len, sizeof(img));
    assert_memory_equal(s->data, img, sizeof(img));
    assert_int_equal(s->conf.n, 3);
    /* and replication goes on from the log afterwards */
    t_propose(&t, 1, 99);
    t_settle(&t);
    t_tick_all(&t, 2);
    assert_int_equal(t_st(&t, 3).commit, t_st(&t, 1).commit);
    t_free(&t);
}

static void snapshot_chunk_at_unexpected_offset_is_answered_with_expected_offset(void **state)
{
    struct tknobs k = tk_default();
    struct raft *r = t_node(&k, 1, 3);
    uint8_t data[4] = {1, 2, 3, 4};
    struct raft_message m = t_msg(RAFT_MSG_SNAPSHOT, 2, 1, 1);
    m.u.snapshot.index = 10;
    m.u.snapshot.term = 1;
    m.u.snapshot.total = 12;
    m.u.snapshot.data = data;
    m.u.snapshot.len = 4;
    raft_step(r, &m);
    struct raft_message out[4];
    assert_int_equal(t_take(r, RAFT_MSG_SNAPSHOT_RESP, out, 4, NULL), 1);
    assert_int_equal(out[0].u.snapshot_resp.next_offset, 4);
    assert_false(out[0].u.snapshot_resp.done);
    m.u.snapshot.offset = 8; /* the chunk at 4 was lost */
    raft_step(r, &m);
    assert_int_equal(t_take(r, RAFT_MSG_SNAPSHOT_RESP, out, 4, NULL), 1);
    assert_int_equal(out[0].u.snapshot_resp.next_offset, 4);
    struct raft_status st;
    raft_status(r, &st);
    assert_int_equal(st.snapshot_index, 0);
    raft_free(r);
}

static void installed_snapshot_is_handed_out_before_entries_that_follow(void **state)
{
    struct tknobs k = tk_default();
    struct raft *r = t_node(&k, 1, 3);
    uint8_t data[3] = {7, 8, 9};
    struct raft_message m = t_msg(RAFT_MSG_SNAPSHOT, 2, 1, 2);
    m.u.snapshot.index = 10;
    m.u.snapshot.term = 2;
    m.u.snapshot.total = 3;
    m.u.snapshot.data = data;
    m.u.snapshot.len = 3;
    m.u.snapshot.done = true;
    m.u.snapshot.conf.n = 3;
    for (int i = 0; i < 3; i++) {
        m.u.snapshot.conf.members[i].id = (uint64_t)i + 1;
        m.u.snapshot.conf.members[i].role = RAFT_VOTER;
    }
    raft_step(r, &m);
    struct raft_update u;
    raft_ready(r, &u);
    assert_non_null(u.snapshot);
    assert_int_equal(u.snapshot->index, 10);
    assert_int_equal(u.snapshot->len, 3);
    assert_int_equal(u.n_committed, 0);
    assert_int_equal(u.n_messages, 1);
    assert_true(u.messages[0].u.snapshot_resp.done);
    raft_advance(r, &u);
    struct raft_status st;
    raft_status(r, &st);
    assert_int_equal(st.commit, 10);
    assert_int_equal(st.last_index, 10);
    assert_int_equal(st.applied, 10);
    raft_free(r);
}

static void entries_after_a_snapshot_that_replaced_the_log_are_persisted(void **state)
{
    struct tknobs k = tk_default();
    struct raft *r = t_node(&k, 1, 3);
    /* five durable entries of term 1, none committed */
    struct raft_entry e[5];
    for (int i = 0; i < 5; i++)
        e[i] = (struct raft_entry){1, (uint64_t)i + 1, RAFT_ENTRY_NORMAL, 0, NULL};
    struct raft_message m = t_msg(RAFT_MSG_APPEND, 2, 1, 1);
    m.u.append.entries = e;
    m.u.append.n_entries = 5;
    raft_step(r, &m);
    struct raft_message out[4];
    t_take(r, 0, out, 4, NULL);
    /* a snapshot at 3 from a later term: the whole log goes */
    uint8_t img[1] = {1};
    m = t_msg(RAFT_MSG_SNAPSHOT, 3, 1, 2);
    m.u.snapshot.index = 3;
    m.u.snapshot.term = 2;
    m.u.snapshot.total = 1;
    m.u.snapshot.len = 1;
    m.u.snapshot.data = img;
    m.u.snapshot.done = true;
    m.u.snapshot.conf = *raft_membership(r);
    raft_step(r, &m);
    t_take(r, 0, out, 4, NULL);
    /* then entries 4 and 5 of term 2 arrive: they must be handed out to persist */
    struct raft_entry f[2] = {{2, 4, RAFT_ENTRY_NORMAL, 0, NULL}, {2, 5, RAFT_ENTRY_NORMAL, 0, NULL}};
    m = t_msg(RAFT_MSG_APPEND, 3, 1, 2);
    m.u.append.prev_index = 3;
    m.u.append.prev_term = 2;
    m.u.append.entries = f;
    m.u.append.n_entries = 2;
    raft_step(r, &m);
    struct raft_update u;
    raft_ready(r, &u);
    assert_int_equal(u.n_entries, 2);
    assert_int_equal(u.entries[0].index, 4);
    assert_int_equal(u.entries[0].term, 2);
    raft_advance(r, &u);
    struct raft_status st;
    raft_status(r, &st);
    assert_int_equal(st.stable_index, 5);
    raft_free(r);
}

static void restart_restores_snapshot_log_and_hard_state(void **state)
{
    struct tknobs k = tk_default();
    struct raft_membership boot = {3, {{1, RAFT_VOTER}, {2, RAFT_VOTER}, {3, RAFT_VOTER}}};
    uint8_t img[2] = {5, 6};
    struct raft_snapshot snap = {5, 2, boot, img, 2};
    struct raft_entry e[3] = {{2, 5, RAFT_ENTRY_NORMAL, 0, NULL},
                              {2, 6, RAFT_ENTRY_NORMAL, 0, NULL},
                              {3, 7, RAFT_ENTRY_NORMAL, 0, NULL}};
    struct raft_restore rs = {0};
    rs.hard_state.term = 3;
    rs.hard_state.vote = 2;
    rs.hard_state.commit = 7;
    rs.snapshot = &snap;
    rs.entries = e;
    rs.n_entries = 3;
    struct raft_config c;
    t_cfg(&k, 1, &c);
    struct raft *r;
    assert_int_equal(raft_new(&c, &rs, &r), 0);
    struct raft_status st;
    raft_status(r, &st);
    assert_int_equal(st.term, 3);
    assert_int_equal(st.vote, 2);
    assert_int_equal(st.first_index, 5);
    assert_int_equal(st.last_index, 7);
    assert_int_equal(st.snapshot_index, 5);
    struct raft_update u;
    raft_ready(r, &u);
    assert_int_equal(u.n_entries, 0); /* already durable */
    assert_int_equal(u.n_committed, 2);
    assert_int_equal(u.committed[0].index, 6);
    raft_advance(r, &u);
    raft_free(r);
    /* an inconsistent restore is refused */
    e[0].term = 1;
    assert_int_equal(raft_new(&c, &rs, &r), RAFT_ERR_INVALID);
}

/* ---------------------------------------------------------------- membership */

static void add_node(struct tcluster *t, const struct tknobs *k, int id, int founders)
{
    struct raft_config c;
    t_cfg(k, (uint64_t)id, &c);
    struct raft_membership empty = {0};
    struct raft_restore rs = {0};
    rs.bootstrap = &empty;
    assert_int_equal(raft_new(&c, &rs, &t->r[id]), 0);
    (void)founders;
}

static void learner_receives_log_but_neither_votes_nor_counts(void **state)
{
    struct tknobs k = tk_default();
    struct tcluster t;
    t_init(&t, &k, 2);
    add_node(&t, &k, 3, 2);
    t_elect(&t, 1);
    assert_int_equal(raft_change_membership(t.r[1], RAFT_ADD_LEARNER, 3, NULL), 0);
    t_settle(&t);
    t_tick_all(&t, 2);
    const struct raft_membership *c = raft_membership(t.r[3]);
    assert_int_equal(c->n, 3);
    assert_int_equal(raft_membership_find(c, 3)->role, RAFT_LEARNER);
    assert_int_equal(t_st(&t, 3).commit, t_st(&t, 1).commit);
    /* a learner never campaigns */
    t_isolate(&t, 3, true);
    t_tick(&t, 3, 100);
    assert_int_equal(t_st(&t, 3).role, RAFT_FOLLOWER);
    t_isolate(&t, 3, false);
    /* with voter 2 gone, the learner's copy does not make a quorum */
    t_isolate(&t, 2, true);
    uint64_t before = t_st(&t, 1).commit;
    t_propose(&t, 1, 5);
    t_settle(&t);
    assert_int_equal(t_st(&t, 3).last_index, t_st(&t, 1).last_index);
    assert_int_equal(t_st(&t, 1).commit, before);
    t_free(&t);
}

static void promotion_refused_until_learner_has_caught_up(void **state)
{
    struct tknobs k = tk_default();
    struct tcluster t;
    t_init(&t, &k, 3);
    add_node(&t, &k, 4, 3);
    t_elect(&t, 1);
    t_isolate(&t, 4, true);
    assert_int_equal(raft_change_membership(t.r[1], RAFT_ADD_LEARNER, 4, NULL), 0);
    t_settle(&t);
    assert_int_equal(raft_change_membership(t.r[1], RAFT_PROMOTE, 4, NULL), RAFT_ERR_NOT_CAUGHT_UP);
    t_isolate(&t, 4, false);
    t_tick_all(&t, 5);
    assert_int_equal(raft_change_membership(t.r[1], RAFT_PROMOTE, 4, NULL), 0);
    t_settle(&t);
    t_tick_all(&t, 2);
    const struct raft_membership *c = raft_membership(t.r[4]);
    assert_int_equal(raft_membership_find(c, 4)->role, RAFT_VOTER);
    t_free(&t);
}

static void only_one_membership_change_at_a_time(void **state)
{
    struct tknobs k = tk_default();
    struct tcluster t;
    t_init(&t, &k, 3);
    t_elect(&t, 1);
    assert_int_equal(raft_change_membership(t.r[1], RAFT_ADD_LEARNER, 4, NULL), 0);
    assert_int_equal(raft_change_membership(t.r[1], RAFT_ADD_LEARNER, 5, NULL), RAFT_ERR_CONFIG_PENDING);
    t_settle(&t);
    t_tick_all(&t, 1);
    assert_int_equal(raft_change_membership(t.r[1], RAFT_ADD_LEARNER, 5, NULL), 0);
    t_free(&t);
}

static void leader_cannot_remove_itself(void **state)
{
    struct tknobs k = tk_default();
    struct tcluster t;
    t_init(&t, &k, 3);
    t_elect(&t, 1);
    assert_int_equal(raft_change_membership(t.r[1], RAFT_REMOVE, 1, NULL), RAFT_ERR_INVALID);
    assert_int_equal(raft_change_membership(t.r[1], RAFT_REMOVE, 9, NULL), RAFT_ERR_INVALID);
    assert_int_equal(raft_change_membership(t.r[2], RAFT_REMOVE, 3, NULL), RAFT_ERR_NOT_LEADER);
    t_free(&t);
}

static void removed_voter_no_longer_counts_for_quorum(void **state)
{
    struct tknobs k = tk_default();
    struct tcluster t;
    t_init(&t, &k, 4);
    t_elect(&t, 1);
    assert_int_equal(raft_change_membership(t.r[1], RAFT_REMOVE, 4, NULL), 0);
    t_settle(&t);
    assert_int_equal(raft_membership(t.r[1])->n, 3);
    /* of 4 voters, {1,2} is no quorum; of the 3 left, it is */
    t_isolate(&t, 3, true);
    t_isolate(&t, 4, true);
    uint64_t before = t_st(&t, 1).commit;
    t_propose(&t, 1, 1);
    t_settle(&t);
    assert_int_equal(t_st(&t, 1).commit, before + 1);
    t_free(&t);
}

static void configuration_takes_effect_on_append_and_rolls_back_on_truncation(void **state)
{
    struct tknobs k = tk_default();
    struct raft *r = t_node(&k, 2, 3);
    /* a leader of term 1 appends a configuration adding learner 4 */
    struct raft_membership c = *raft_membership(r);
    c.members[c.n].id = 4;
    c.members[c.n].role = RAFT_LEARNER;
    c.n++;
    uint8_t buf[64];
    size_t len;
    assert_int_equal(raft_membership_encode(&c, buf, sizeof(buf), &len), 0);
    struct raft_entry e[2] = {{1, 1, RAFT_ENTRY_NOOP, 0, NULL}, {1, 2, RAFT_ENTRY_CONFIG, (uint32_t)len, buf}};
    struct raft_message m = t_msg(RAFT_MSG_APPEND, 1, 2, 1);
    m.u.append.entries = e;
    m.u.append.n_entries = 2;
    raft_step(r, &m);
    assert_int_equal(raft_membership(r)->n, 4); /* in effect before it is committed */
    /* a leader of term 2 never had it: the entry is truncated and the old configuration returns */
    struct raft_entry f[1] = {{2, 2, RAFT_ENTRY_NOOP, 0, NULL}};
    m = t_msg(RAFT_MSG_APPEND, 3, 2, 2);
    m.u.append.prev_index = 1;
    m.u.append.prev_term = 1;
    m.u.append.entries = f;
    m.u.append.n_entries = 1;
    raft_step(r, &m);
    assert_int_equal(raft_membership(r)->n, 3);
    assert_null(raft_membership_find(raft_membership(r), 4));
    raft_free(r);
}

static void removed_server_cannot_disrupt_the_cluster(void **state)
{
    /* Thesis §4.2.3: the leader stops replicating to a server as soon as it appends the
     * configuration without it, so the server may never learn it was removed; it times out and
     * campaigns. PreVote and leader stickiness keep it from deposing anyone. */
    struct tknobs k = tk_default();
    k.pre_vote = true;
    k.check_quorum = true;
    struct tcluster t;
    t_init(&t, &k, 3);
    t_elect(&t, 1);
    assert_int_equal(raft_change_membership(t.r[1], RAFT_REMOVE, 3, NULL), 0);
    t_settle(&t);
    assert_int_equal(raft_membership(t.r[1])->n, 2);
    for (int i = 0; i < 100; i++) {
        t_tick(&t, 1, 1);
        t_tick(&t, 2, 1);
        t_tick(&t, 3, 1);
        t_settle(&t);
    }
    assert_int_equal(t_st(&t, 1).role, RAFT_LEADER);
    assert_int_equal(t_st(&t, 1).term, 1);
    assert_int_equal(t_st(&t, 2).term, 1);
    assert_true(t_st(&t, 3).role != RAFT_LEADER);
    t_free(&t);
}

/* ---------------------------------------------------------------- leadership transfer */

static void transfer_hands_leadership_to_caught_up_voter(void **state)
{
    struct tknobs k = tk_default();
    k.pre_vote = true;
    k.check_quorum = true; /* TimeoutNow must get past leader stickiness */
    struct tcluster t;
    t_init(&t, &k, 3);
    t_elect(&t, 1);
    assert_int_equal(raft_transfer_leadership(t.r[1], 2), 0);
    t_settle(&t);
    assert_int_equal(t_st(&t, 2).role, RAFT_LEADER);
    assert_int_equal(t_st(&t, 2).term, 2);
    assert_int_equal(t_st(&t, 1).role, RAFT_FOLLOWER);
    assert_int_equal(t_st(&t, 1).leader, 2);
    t_free(&t);
}

static void transfer_waits_for_target_to_catch_up(void **state)
{
    struct tknobs k = tk_default();
    struct tcluster t;
    t_init(&t, &k, 3);
    t_elect(&t, 1);
    t.cut[1][2] = true;
    t_propose(&t, 1, 1);
    t_settle(&t);
    assert_int_equal(raft_transfer_leadership(t.r[1], 2), 0);
    assert_int_equal(t_propose(&t, 1, 2), RAFT_ERR_TRANSFERRING);
    t_settle(&t);
    assert_int_equal(t_st(&t, 2).role, RAFT_FOLLOWER);
    t.cut[1][2] = false;
    for (int i = 0; i < 5 && t_st(&t, 2).role != RAFT_LEADER; i++) {
        t_tick(&t, 1, 1); /* the lost append is resent once the follower looks stalled */
        t_settle(&t);
    }
    assert_int_equal(t_st(&t, 2).role, RAFT_LEADER);
    uint64_t term;
    assert_true(raft_term_at(t.r[2], 2, &term));
    assert_int_equal(term, 1); /* the proposal made before the transfer survived */
    t_free(&t);
}

static void transfer_aborted_after_election_timeout(void **state)
{
    struct tknobs k = tk_default();
    struct tcluster t;
    t_init(&t, &k, 3);
    t_elect(&t, 1);
    t_isolate(&t, 2, true);
    t_propose(&t, 1, 1);
    t_settle(&t);
    assert_int_equal(raft_transfer_leadership(t.r[1], 2), 0);
    assert_int_equal(raft_transfer_leadership(t.r[1], 1), RAFT_ERR_INVALID);
    for (int i = 0; i < 10; i++) {
        t_tick(&t, 1, 1);
        t_settle(&t);
    }
    assert_int_equal(t_st(&t, 1).role, RAFT_LEADER);
    assert_int_equal(t_st(&t, 1).transfer_target, 0);
    assert_int_equal(t_propose(&t, 1, 2), 0);
    t_free(&t);
}

/* ---------------------------------------------------------------- ReadIndex */

static void read_index_refused_until_leader_commits_in_its_term(void **state)
{
    struct tknobs k = tk_default();
    struct tcluster t;
    t_init(&t, &k, 3);
    raft_campaign(t.r[1]);
    t_pump(&t, 1);
    t_deliver_once(&t); /* vote requests */
    t.cut[1][2] = t.cut[1][3] = true;
    t_deliver_once(&t); /* votes: leader, but its no-op goes nowhere */
    assert_int_equal(t_st(&t, 1).role, RAFT_LEADER);
    assert_int_equal(raft_read_index(t.r[1], 1), RAFT_ERR_BUSY);
    assert_int_equal(raft_read_index(t.r[2], 1), RAFT_ERR_NOT_LEADER);
    t.cut[1][2] = t.cut[1][3] = false;
    t_tick_all(&t, 2);
    assert_int_equal(raft_read_index(t.r[1], 1), 0);
    t_free(&t);
}

static void read_index_released_after_quorum_confirms_leadership(void **state)
{
    struct tknobs k = tk_default();
    struct tcluster t;
    t_init(&t, &k, 3);
    t_elect(&t, 1);
    t_propose(&t, 1, 1);
    t_settle(&t);
    assert_int_equal(raft_read_index(t.r[1], 77), 0);
    t_pump(&t, 1);
    assert_int_equal(t.n_reads[1], 0); /* not before the heartbeat round */
    t_settle(&t);
    assert_int_equal(t.n_reads[1], 1);
    assert_int_equal(t.reads[1][0].ctx, 77);
    assert_int_equal(t.reads[1][0].index, 2);
    t_free(&t);
}

static void read_index_not_released_without_quorum(void **state)
{
    struct tknobs k = tk_default();
    struct tcluster t;
    t_init(&t, &k, 3);
    t_elect(&t, 1);
    t_isolate(&t, 1, true);
    assert_int_equal(raft_read_index(t.r[1], 5), 0);
    for (int i = 0; i < 5; i++) {
        t_tick(&t, 1, 1);
        t_settle(&t);
    }
    assert_int_equal(t.n_reads[1], 0);
    t_free(&t);
}

static void read_index_on_single_voter_is_immediate(void **state)
{
    struct tknobs k = tk_default();
    struct tcluster t;
    t_init(&t, &k, 1);
    t_elect(&t, 1);
    assert_int_equal(raft_read_index(t.r[1], 9), 0);
    t_pump(&t, 1);
    assert_int_equal(t.n_reads[1], 1);
    assert_int_equal(t.reads[1][0].index, 1);
    t_free(&t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(snapshot_requested_after_threshold),
        cmocka_unit_test(log_compacted_after_snapshot_saved_keeping_a_tail),
        cmocka_unit_test(lagging_follower_receives_snapshot_in_chunks),
        cmocka_unit_test(snapshot_chunk_at_unexpected_offset_is_answered_with_expected_offset),
        cmocka_unit_test(installed_snapshot_is_handed_out_before_entries_that_follow),
        cmocka_unit_test(entries_after_a_snapshot_that_replaced_the_log_are_persisted),
        cmocka_unit_test(restart_restores_snapshot_log_and_hard_state),
        cmocka_unit_test(learner_receives_log_but_neither_votes_nor_counts),
        cmocka_unit_test(promotion_refused_until_learner_has_caught_up),
        cmocka_unit_test(only_one_membership_change_at_a_time),
        cmocka_unit_test(leader_cannot_remove_itself),
        cmocka_unit_test(removed_voter_no_longer_counts_for_quorum),
        cmocka_unit_test(configuration_takes_effect_on_append_and_rolls_back_on_truncation),
        cmocka_unit_test(removed_server_cannot_disrupt_the_cluster),
        cmocka_unit_test(transfer_hands_leadership_to_caught_up_voter),
        cmocka_unit_test(transfer_waits_for_target_to_catch_up),
        cmocka_unit_test(transfer_aborted_after_election_timeout),
        cmocka_unit_test(read_index_refused_until_leader_commits_in_its_term),
        cmocka_unit_test(read_index_released_after_quorum_confirms_leadership),
        cmocka_unit_test(read_index_not_released_without_quorum),
        cmocka_unit_test(read_index_on_single_voter_is_immediate),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
