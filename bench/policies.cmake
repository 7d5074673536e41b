# Micro-benchmark of the policies/ decisions (built, not run by ctest): ./gw-bench-policies
add_executable(gw-bench-policies ${CMAKE_CURRENT_LIST_DIR}/policies_bench.c)
target_link_libraries(gw-bench-policies PRIVATE gw_policies Threads::Threads)
