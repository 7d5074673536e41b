# Write-ahead log benchmark (built, not run by ctest): ./gw-bench-storage [dir] [seconds]
add_executable(gw-bench-storage ${CMAKE_CURRENT_LIST_DIR}/storage_bench.c)
target_link_libraries(gw-bench-storage PRIVATE gw_raft_storage)
