# Load generator of bench/limits.sh (cluster-scope rate limits: over-admission, utilization,
# decision latency); built, not run by ctest.
add_executable(gw-bench-limits ${CMAKE_CURRENT_LIST_DIR}/limits_load.c)
target_link_libraries(gw-bench-limits PRIVATE m)
