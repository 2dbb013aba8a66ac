# Compile options shared by every Ensemble target: high warnings, optional sanitizers.
add_library(ensemble_options INTERFACE)
add_library(ensemble::options ALIAS ensemble_options)
target_compile_options(ensemble_options INTERFACE -Wall -Wextra -Wpedantic -Wshadow
                                                  -Wnon-virtual-dtor -Wcast-align)
if(ENSEMBLE_WERROR)
  target_compile_options(ensemble_options INTERFACE -Werror)
endif()
if(ENSEMBLE_SANITIZE)
  target_compile_options(ensemble_options INTERFACE -fsanitize=address,undefined
                                                    -fno-omit-frame-pointer)
  target_link_options(ensemble_options INTERFACE -fsanitize=address,undefined)
endif()

# ensemble_add_library(name ALIAS alias SOURCES ...) keeps every component library shaped alike.
function(ensemble_add_library name)
  cmake_parse_arguments(arg "" "ALIAS" "SOURCES" ${ARGN})
  add_library(${name} ${arg_SOURCES})
  add_library(${arg_ALIAS} ALIAS ${name})
  target_include_directories(${name} PUBLIC ${CMAKE_CURRENT_SOURCE_DIR}/include
                                     PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/src)
  target_link_libraries(${name} PRIVATE ensemble::options)
endfunction()
