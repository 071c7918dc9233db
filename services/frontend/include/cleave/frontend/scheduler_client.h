// EngineClient over the scheduler's FrontendStream: one bidirectional gRPC stream per frontend
// process carries every submission and cancellation out and every token event back, so a
// thousand concurrent requests cost a thousand map entries, not a thousand RPCs. The stream is
// re-established when the scheduler restarts; requests in flight at that moment fail with
// UNAVAILABLE.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "cleave/common/tls.h"
#include "cleave/frontend/engine_client.h"

namespace cleave::frontend {

class SchedulerClient : public EngineClient {
 public:
  // `tls`: mutual TLS to the scheduler (it must present a certificate signed by tls->ca naming
  // the host of `address`; this frontend presents tls->cert); nullopt = plaintext.
  static std::unique_ptr<SchedulerClient> Create(const std::string& address,
                                                 const std::optional<tls::TlsPem>& tls = std::nullopt);
  ~SchedulerClient() override;

  uint64_t Submit(v1::SubmitRequest request, Callback callback) override;
  void Cancel(uint64_t id, bool finished) override;
  bool Ready() override;
  absl::StatusOr<v1::StatsResponse> Stats() override;
  // Stops the stream; pending requests fail with UNAVAILABLE.
  void Shutdown();

 private:
  struct Impl;
  explicit SchedulerClient(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace cleave::frontend
