// The public gRPC API (cleave.v1.Generation: Generate, Tokenize, Detokenize, ListModels) plus the
// standard grpc.health.v1.Health service and server reflection. Requests go through the same
// validator and generation pipeline as the HTTP API (generation_params.h, generation.h); the
// callback API keeps a streaming request to a reactor, not a thread.
// Generate takes the client's x-request-id metadata (request_log.h) and sends the id back in the
// initial metadata and as GenerateResponse.request_id; while the frontend drains it answers
// UNAVAILABLE. With API keys (ctx.api_keys), every cleave.v1.Generation call needs the metadata
// `authorization: Bearer <key>`, else UNAUTHENTICATED; health and reflection stay open.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "cleave/common/tls.h"
#include "cleave/frontend/frontend_context.h"

namespace cleave::frontend {

class GrpcApiServer {
 public:
  // `address` HOST:PORT (port 0 = any). ctx must outlive the server. With `tls`, the server
  // presents tls->cert (clients verify it against the CA) and asks clients for no certificate:
  // they authenticate with API keys.
  static absl::StatusOr<std::unique_ptr<GrpcApiServer>> Start(const std::string& address,
                                                              FrontendContext& ctx,
                                                              const std::optional<tls::TlsPem>& tls = std::nullopt);
  ~GrpcApiServer();
  int port() const;
  // grpc.health.v1.Health of every service ("" and cleave.v1.Generation): SERVING from Start,
  // NOT_SERVING once a drain begins. Thread-safe.
  void SetServing(bool serving);
  // Stops taking calls; calls still running get 2 s, then are cancelled. Idempotent.
  void Stop();

  struct Impl;

 private:
  explicit GrpcApiServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace cleave::frontend
