# Every dependency comes from a Debian 12 package (scripts/install-deps.sh installs them).
find_package(PkgConfig REQUIRED)
find_package(Threads REQUIRED)
find_package(absl REQUIRED)
find_package(nlohmann_json 3.10 REQUIRED)
find_package(CLI11 REQUIRED)
find_package(GTest REQUIRED)
find_package(benchmark REQUIRED)
pkg_check_modules(OPENBLAS REQUIRED IMPORTED_TARGET openblas)
pkg_check_modules(PCRE2 REQUIRED IMPORTED_TARGET libpcre2-8)

# Protobuf: the model library reads SentencePiece .model files (serialized protos) with generated
# classes, so every build needs it, fuzz builds included.
find_package(Protobuf REQUIRED)

# Serving: gRPC (control plane and public gRPC API), Boost.Beast (async HTTP, header-only over
# Boost.Asio), yaml-cpp (configs). Not needed by fuzz builds, which skip the services.
if(NOT CLEAVE_FUZZ)
  find_package(gRPC CONFIG REQUIRED)
  find_package(Boost 1.74 REQUIRED COMPONENTS system)
  find_package(yaml-cpp REQUIRED)
  find_program(GRPC_CPP_PLUGIN grpc_cpp_plugin REQUIRED)
endif()
