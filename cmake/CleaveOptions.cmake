# Warning and sanitizer flags apply to the project's own targets only (through
# cleave_target_defaults), never to third-party headers pulled in as SYSTEM.
add_library(cleave_flags INTERFACE)
target_compile_options(cleave_flags INTERFACE
  $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Werror -Wno-unused-parameter>)
if(CMAKE_BUILD_TYPE STREQUAL "Release" OR CMAKE_BUILD_TYPE STREQUAL "RelWithDebInfo")
  # -march=x86-64-v3 gives AVX2/FMA, present on every x86 server of the last decade; the
  # kernels' inner loops are written to auto-vectorise with it.
  if(CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64")
    target_compile_options(cleave_flags INTERFACE $<$<COMPILE_LANGUAGE:CXX>:-march=x86-64-v3 -O3>)
  endif()
endif()

if(CLEAVE_SANITIZE)
  set(_san -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined)
  target_compile_options(cleave_flags INTERFACE $<$<COMPILE_LANGUAGE:CXX>:${_san}>)
  target_link_options(cleave_flags INTERFACE ${_san})
endif()

if(CLEAVE_FUZZ)
  target_compile_options(cleave_flags INTERFACE
    $<$<COMPILE_LANGUAGE:CXX>:-fsanitize=fuzzer-no-link,address,undefined>)
  target_link_options(cleave_flags INTERFACE -fsanitize=address,undefined)
endif()

function(cleave_target_defaults target)
  target_link_libraries(${target} PRIVATE cleave_flags)
endfunction()
