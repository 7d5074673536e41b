# Micro-benchmark of the Redis store's limiter decisions (built, not run by ctest):
# ./gw-bench-redis-store [redis://host:port/db] [seconds]; starts its own redis-server without a URL.
add_executable(gw-bench-redis-store ${CMAKE_CURRENT_LIST_DIR}/redis_store_bench.c)
target_link_libraries(gw-bench-redis-store PRIVATE gw_backends Threads::Threads)
