# Micro-benchmark of the Raft core alone (built, not run by ctest): ./gw-bench-raft
add_executable(gw-bench-raft ${CMAKE_CURRENT_LIST_DIR}/raft_bench.c)
target_link_libraries(gw-bench-raft PRIVATE gw_raft)
