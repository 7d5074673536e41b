# Micro-benchmark of the replicated state machine alone (built, not run by ctest): ./gw-bench-fsm
add_executable(gw-bench-fsm ${CMAKE_CURRENT_LIST_DIR}/fsm_bench.c)
target_link_libraries(gw-bench-fsm PRIVATE gw_raft_fsm)
