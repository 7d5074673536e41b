# Micro-benchmark of the Raft transport on loopback (built, not run by ctest): ./gw-bench-transport
add_executable(gw-bench-transport ${CMAKE_CURRENT_LIST_DIR}/transport_bench.c)
target_link_libraries(gw-bench-transport PRIVATE gw_raft_transport Threads::Threads)
