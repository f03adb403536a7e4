# kvtier_add_test(NAME <name> SOURCES <src...> [LIBS <lib...>] [LABELS <label...>])
# One GoogleTest binary, its cases discovered by CTest when the tests run (PRE_TEST), so
# building never executes test binaries (none may touch CUDA at static-init time anyway).
function(kvtier_add_test)
  cmake_parse_arguments(T "" "NAME" "SOURCES;LIBS;LABELS" ${ARGN})
  if(NOT T_LABELS)
    set(T_LABELS cpu)
  endif()
  add_executable(${T_NAME} ${T_SOURCES})
  target_link_libraries(${T_NAME} PRIVATE ${T_LIBS} kvtier_test_util GTest::gtest GTest::gtest_main)
  if(TARGET kvtier_tsan_tbb)  # TSan builds: TBB algorithms on one thread (tests/common/tsan_tbb.cpp)
    target_link_libraries(${T_NAME} PRIVATE kvtier_tsan_tbb)
  endif()
  gtest_discover_tests(${T_NAME}
    DISCOVERY_MODE PRE_TEST
    DISCOVERY_TIMEOUT 60
    PROPERTIES LABELS "${T_LABELS}" TIMEOUT 600)
endfunction()
