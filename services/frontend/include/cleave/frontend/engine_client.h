// What the frontend needs from the serving engine behind it: submit a tokenized request, get its
// tokens back as events, cancel it. The real implementation is SchedulerClient (one gRPC
// bidirectional stream to the scheduler, multiplexing every request of this frontend).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cleave/v1/control.pb.h"

namespace cleave::frontend {

struct EngineToken {
  int32_t id = 0;
  float logprob = 0;
  std::vector<std::pair<int32_t, float>> top;  // top logprobs, highest first
};

struct EngineEvent {
  bool accepted = false;        // first event of an admitted request
  std::vector<EngineToken> tokens;
  bool finished = false;        // last event: stop (EOS / stop id) or length
  bool finished_by_length = false;
  absl::Status error;           // last event when not ok (RESOURCE_EXHAUSTED: retry_after_s)
  int retry_after_s = 0;
  // For the request's timeline (request_done log line): when the SubmitRequest went onto the
  // scheduler stream (on every event once known; default-constructed before), when this event
  // was read from it, and the scheduler's phase timings where the event carries them.
  std::chrono::steady_clock::time_point submitted_at{};
  std::chrono::steady_clock::time_point received_at{};
  std::optional<v1::PhaseTimings> timings;
};

class EngineClient {
 public:
  // Called in order, never concurrently for one request, from a client thread: must not block.
  // The last call has finished == true or !error.ok(); none follow it.
  using Callback = std::function<void(const EngineEvent&)>;

  virtual ~EngineClient() = default;
  // Returns the id used by Cancel. `request.client_id` is assigned by the client.
  virtual uint64_t Submit(v1::SubmitRequest request, Callback callback) = 0;
  // Client went away (finished = false) or a stop string matched (finished = true). After Cancel
  // the callback is not called again.
  virtual void Cancel(uint64_t id, bool finished) = 0;
  // Scheduler reachable and able to serve (a prefill + decode pair, or a colocated worker).
  virtual bool Ready() = 0;
  virtual absl::StatusOr<v1::StatsResponse> Stats() = 0;
};

}  // namespace cleave::frontend
