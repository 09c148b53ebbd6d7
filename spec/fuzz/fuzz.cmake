# libFuzzer targets: one executable per spec/fuzz/fuzz_<name>.c, built
# with clang when NETRA_FUZZ=ON.
file(GLOB NETRA_FUZZ_SOURCES CONFIGURE_DEPENDS
     ${PROJECT_SOURCE_DIR}/spec/fuzz/fuzz_*.c)
foreach(src ${NETRA_FUZZ_SOURCES})
  get_filename_component(base ${src} NAME_WE)
  add_executable(${base} ${src})
  target_compile_options(${base} PRIVATE -fsanitize=fuzzer,address)
  target_link_options(${base} PRIVATE -fsanitize=fuzzer,address)
  target_link_libraries(${base} PRIVATE netra_core PkgConfig::LUA)
endforeach()
