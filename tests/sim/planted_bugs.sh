#!/usr/bin/env bash
# Plants known Raft bugs, one at a time, in scratch copies of the sources (in a temporary
# directory; the tree is never touched), builds each copy and runs it on the CI seed ranges.
# Prints, per bug and cluster size, how many seeds failed and the first one. This is how the
# table "Does it catch bugs?" in raft/README.md was produced. Needs gcc and python3.
#
# Usage: tests/sim/planted_bugs.sh [bug-name ...]      (default: all)
# Environment: SEEDS3, SEEDS5, SEEDS7 (defaults 6000 4000 1500: the CI ranges), STEPS (10000).
set -u
root="$(cd "$(dirname "$0")/../.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
seeds3="${SEEDS3:-6000}"; seeds5="${SEEDS5:-4000}"; seeds7="${SEEDS7:-1500}"; steps="${STEPS:-10000}"

# name|file|text to replace|replacement  (one replacement each; \n is a newline)
bugs=(
"prev_term_commit|core.c|if (n > r->commit && term_matches(r, n, r->term)) {|if (n > r->commit) {"
"vote_without_log_check|core.c|bool up_to_date = v->last_term > lt \|\| (v->last_term == lt && v->last_index >= last_index(r));|bool up_to_date = true; (void)lt;"
"second_vote_in_term|core.c|bool can_vote = r->vote == m->from \|\| (r->vote == 0 && r->leader == 0) \|\||bool can_vote = true \|\|"
"commit_to_own_last|core.c|uint64_t c = a->commit < new_last ? a->commit : new_last;|uint64_t c = a->commit < last_index(r) ? a->commit : last_index(r);"
"read_without_quorum|core.c|uint64_t q = quorum_value(r, UINT64_MAX, true);|uint64_t q = UINT64_MAX;"
"vote_forgotten_on_restart|core.c|r->vote = rs->hard_state.vote;|r->vote = 0;"
"conflicts_never_overwritten|core.c|            if (term_matches(r, e->index, e->term))\n                continue;|            continue;"
"snapshot_keeps_conflicting_log|core.c|    if (term_matches(r, s->index, s->term)) {\n        log_compact(r, s->index);|    if (true) {\n        log_compact(r, s->index);"
"two_config_changes|core.c|    if (r->conf_index > r->commit \|\| !term_matches(r, r->commit, r->term))|    if (!term_matches(r, r->commit, r->term))"
"send_before_persist|sim.c|SEND_BEFORE_PERSIST|"
"leader_counts_unpersisted|core.c|uint64_t n = quorum_value(r, r->stable, false);|uint64_t n = quorum_value(r, last_index(r), false);"
)

plant() { # dir file old new
  python3 - "$@" <<'PY'
import sys
d, f, old, new = sys.argv[1:]
p = d + "/" + f
s = open(p).read()
if old == "SEND_BEFORE_PERSIST":
    # the driver sends an update's messages when it takes the update, not after the disk write
    send = ("    for (size_t i = 0; i < p->n_msgs; i++) {\n"
            "        net_send(s, nd->id, p->msgs[i].to, p->msgs[i].buf, p->msgs[i].len);\n"
            "        p->msgs[i].buf = NULL;\n    }\n")
    assert s.count(send) == 1 and s.count("    p->n_reads = u.n_reads;") == 1
    s = s.replace(send, "").replace("    p->n_reads = u.n_reads;", send + "    p->n_reads = u.n_reads;")
else:
    old = old.replace("\\n", "\n").replace("\\|", "|"); new = new.replace("\\n", "\n").replace("\\|", "|")
    if s.count(old) != 1:
        sys.exit("pattern not found once in %s: %r" % (f, old))
    s = s.replace(old, new)
open(p, "w").write(s)
PY
}

want="${*:-}"
status=0
for spec in "${bugs[@]}"; do
  # split on unescaped |
  IFS=$'\x1f' read -r name file old new < <(printf '%s' "$spec" | python3 -c 'import sys,re; print("\x1f".join(re.split(r"(?<!\\)\|", sys.stdin.read(), maxsplit=3)))')
  if [ -n "$want" ] && ! [[ " $want " == *" $name "* ]]; then continue; fi
  d="$work/$name"; mkdir -p "$d"
  cp "$root"/raft/*.c "$root"/raft/*.h "$root"/tests/sim/*.c "$root"/tests/sim/*.h "$d"/
  if ! plant "$d" "$file" "$old" "$new"; then status=1; continue; fi
  gcc -std=c11 -D_GNU_SOURCE -O2 -w -I"$d" "$d"/core.c "$d"/codec.c "$d"/sim.c "$d"/main.c -o "$d/raft-sim" || { status=1; continue; }
  for n in 3 5 7; do
    case $n in 3) s=$seeds3 ;; 5) s=$seeds5 ;; 7) s=$seeds7 ;; esac
    out="$("$d/raft-sim" --quiet --nodes "$n" --seeds "$s" --start "${n}000000" --steps "$steps")"
    fails=$(printf '%s\n' "$out" | grep -c '^FAIL')
    first=$(printf '%s\n' "$out" | grep -m1 '^FAIL' | sed -E 's/^FAIL seed ([0-9]+).*step=[0-9]+: ([^|]{0,60}).*/seed \1: \2/')
    printf '%-32s %d nodes: %5d / %-5d failed  %s\n' "$name" "$n" "$fails" "$s" "${first:-}"
  done
done
exit $status
