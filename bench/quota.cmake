# Quota leasing benchmark (built, not run by ctest): ./gw-bench-quota [seconds] [sync 0|1]
add_executable(gw-bench-quota ${CMAKE_CURRENT_LIST_DIR}/quota_bench.c)
target_link_libraries(gw-bench-quota PRIVATE gw_backends_raft)
