# Load generator for the coordination API against etcd and Redis (built, not run by ctest):
# ./gw-bench-coord; bench/cluster.sh runs it on a 3-node loopback cluster.
add_executable(gw-bench-coord ${CMAKE_CURRENT_LIST_DIR}/coord_bench.c)
target_link_libraries(gw-bench-coord PRIVATE Threads::Threads)
