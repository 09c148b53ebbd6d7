# libFuzzer targets, built when NETRA_FUZZ=ON (needs clang):
#   cmake -B build-fuzz -S . -DNETRA_FUZZ=ON -DNETRA_TESTS=OFF \
#         -DCMAKE_C_COMPILER=clang
#   cmake --build build-fuzz -j2 --target fuzz_json
#   ./build-fuzz/fuzz_json -max_total_time=60 corpus_dir
#
# Every spec/fuzz/fuzz_<name>.c is one executable fuzz_<name> exporting
# LLVMFuzzerTestOneInput. The core library is instrumented for coverage
# and ASan too, so that the fuzzer sees inside it.

if(NOT CMAKE_C_COMPILER_ID MATCHES "Clang")
  message(FATAL_ERROR "NETRA_FUZZ=ON needs clang: configure a separate "
                      "build dir with -DCMAKE_C_COMPILER=clang")
endif()

target_compile_options(netra_core PRIVATE -fsanitize=fuzzer-no-link,address
                       -fno-omit-frame-pointer)
target_link_options(netra_core INTERFACE -fsanitize=address)

file(GLOB NETRA_FUZZ_SOURCES CONFIGURE_DEPENDS
     ${PROJECT_SOURCE_DIR}/spec/fuzz/fuzz_*.c)
foreach(src ${NETRA_FUZZ_SOURCES})
  get_filename_component(base ${src} NAME_WE)
  add_executable(${base} ${src})
  target_compile_options(${base} PRIVATE -fsanitize=fuzzer,address
                         -fno-omit-frame-pointer)
  target_link_options(${base} PRIVATE -fsanitize=fuzzer,address)
  target_link_libraries(${base} PRIVATE netra_core PkgConfig::LUA)
endforeach()
