# Tests, all run by ctest: C unit tests (cmocka), busted specs, luacheck.
#
# Conventions, so that adding a test never means editing this file:
#   spec/c/test_<part>.c      one cmocka executable, test name c_<part>
#   spec/lua/<part>_spec.lua  one busted file, test name lua_<part>
#   spec/node/<part>.test.mjs one node:test file, test name node_<part>
# A test file that contains the words "needs: clickhouse" runs with a real
# ClickHouse server, started once for the whole run by the fixture below;
# its address is in the file named by NETRA_TEST_CLICKHOUSE (host:port).

pkg_check_modules(CMOCKA REQUIRED IMPORTED_TARGET cmocka)
find_program(LUA_INTERPRETER NAMES lua5.4 REQUIRED)
find_program(BUSTED NAMES busted PATHS /usr/bin REQUIRED)
find_program(LUACHECK NAMES luacheck REQUIRED)

set(NETRA_TEST_DIR ${CMAKE_BINARY_DIR}/test-run)
set(NETRA_TEST_ENV
  "NETRA_HOME=${PROJECT_SOURCE_DIR}"
  "NETRA_BIN=$<TARGET_FILE:netra>"
  "NETRA_TEST_DIR=${NETRA_TEST_DIR}"
  "NETRA_TEST_CLICKHOUSE=${NETRA_TEST_DIR}/clickhouse/address"
  "NETRA_SHARED_DIR=${PROJECT_SOURCE_DIR}/../shared"
  "NETRA_BUILD_DIR=${CMAKE_BINARY_DIR}"
  "CC=${CMAKE_C_COMPILER}")
if(NETRA_SANITIZE)
  # spec/support/busted.sh preloads the sanitizer runtimes for lua5.4.
  list(APPEND NETRA_TEST_ENV "NETRA_SANITIZE=1"
       "UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1")
endif()

# A real ClickHouse server for the whole run, on a free loopback port.
add_test(NAME clickhouse_start
  COMMAND ${PROJECT_SOURCE_DIR}/spec/support/clickhouse.sh start
          ${NETRA_TEST_DIR}/clickhouse)
add_test(NAME clickhouse_stop
  COMMAND ${PROJECT_SOURCE_DIR}/spec/support/clickhouse.sh stop
          ${NETRA_TEST_DIR}/clickhouse)
set_tests_properties(clickhouse_start PROPERTIES FIXTURES_SETUP clickhouse
                     TIMEOUT 120)
set_tests_properties(clickhouse_stop PROPERTIES FIXTURES_CLEANUP clickhouse)

function(netra_test_needs name file)
  file(READ ${file} body)
  if(body MATCHES "needs: clickhouse")
    set_tests_properties(${name} PROPERTIES FIXTURES_REQUIRED clickhouse
                         RESOURCE_LOCK clickhouse)
  endif()
endfunction()

file(GLOB NETRA_C_TESTS CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/spec/c/test_*.c)
foreach(src ${NETRA_C_TESTS})
  get_filename_component(base ${src} NAME_WE)
  string(REPLACE "test_" "" part ${base})
  add_executable(${base} ${src})
  target_link_libraries(${base} PRIVATE netra_core PkgConfig::CMOCKA
                        PkgConfig::LUA)
  add_test(NAME c_${part} COMMAND ${base})
  set_tests_properties(c_${part} PROPERTIES ENVIRONMENT "${NETRA_TEST_ENV}"
                       TIMEOUT 300)
  netra_test_needs(c_${part} ${src})
endforeach()

file(GLOB NETRA_SPECS CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/spec/lua/*_spec.lua)
foreach(spec ${NETRA_SPECS})
  get_filename_component(base ${spec} NAME_WE)
  string(REPLACE "_spec" "" part ${base})
  add_test(NAME lua_${part}
    COMMAND ${PROJECT_SOURCE_DIR}/spec/support/busted.sh ${spec}
    WORKING_DIRECTORY ${PROJECT_SOURCE_DIR})
  set_tests_properties(lua_${part} PROPERTIES
    ENVIRONMENT "${NETRA_TEST_ENV}" TIMEOUT 600)
  netra_test_needs(lua_${part} ${spec})
endforeach()

# Node.js specs with real WebSocket and MCP clients (spec/node, npm ci).
find_program(NODE NAMES node)
file(GLOB NETRA_NODE_TESTS CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/spec/node/*.test.mjs)
if(NODE)
  foreach(t ${NETRA_NODE_TESTS})
    get_filename_component(base ${t} NAME)
    string(REPLACE ".test.mjs" "" part ${base})
    add_test(NAME node_${part} COMMAND ${NODE} --test ${t}
             WORKING_DIRECTORY ${PROJECT_SOURCE_DIR})
    set_tests_properties(node_${part} PROPERTIES
      ENVIRONMENT "${NETRA_TEST_ENV}" TIMEOUT 600)
    netra_test_needs(node_${part} ${t})
  endforeach()
endif()

add_test(NAME luacheck
  COMMAND ${LUACHECK} --no-color lua spec/lua spec/support
  WORKING_DIRECTORY ${PROJECT_SOURCE_DIR})

# Scenarios (lua/scenarios/*.lua), each run by `netra run`: scenario_<name>.
file(GLOB NETRA_SCENARIOS CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/lua/scenarios/*.lua)
foreach(sc ${NETRA_SCENARIOS})
  get_filename_component(base ${sc} NAME_WE)
  add_test(NAME scenario_${base} COMMAND netra run ${sc}
           WORKING_DIRECTORY ${PROJECT_SOURCE_DIR})
  set_tests_properties(scenario_${base} PROPERTIES
    ENVIRONMENT "${NETRA_TEST_ENV}" TIMEOUT 300)
  netra_test_needs(scenario_${base} ${sc})
endforeach()
