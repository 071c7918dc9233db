// A request as the scheduler tracks it, from admission to its terminal event. Private to
// cleave_scheduler; owned by SchedulerCore::Impl (one per live request).
//
// State machine (RequestState). A request that ends (finished, cancelled, failed) is erased.
//
//   kWaiting --place (P/D)--> kPrefilling --first token from P, no KvReady yet--> kTransferring
//      ^  ^                    |  (KvReady from D first: kv_ready = true, still kPrefilling)  |
//      |  |                    +--first token and kv_ready: AddRequest to D--+   KvReady from D
//      |  |                                                                  v       v
//      |  |                                                               kDecoding <+
//      |  +--place (colocated)--> kRunning
//      +-- preempted, or re-run after a failure / a lost worker with nothing streamed
//          (attempt + 1; generated tokens become part of what the next attempt recomputes)
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "cleave/scheduler/scheduler_core.h"
#include "cleave/v1/control.pb.h"

namespace cleave::scheduler {

using RequestId = uint64_t;

enum class RequestState { kWaiting, kPrefilling, kTransferring, kDecoding, kRunning };

// The request's share of one worker in the current attempt.
struct Placement {
  WorkerId worker = 0;           // 0: none
  std::vector<int32_t> blocks;   // block table on that worker (empty once released)
  int hit_blocks = 0;            // leading blocks that came from the prefix cache
  int cached_blocks = 0;         // leading blocks entered in the worker's prefix cache
  int computed_tokens = 0;       // leading tokens whose KV is known to be in `blocks`
  int32_t state_slot = -1;       // Mamba models: the request's state slot there
  bool involved = false;         // the worker holds the request (it is in Worker::requests)
  bool ended_by_worker = false;  // the worker reported it finished: no RemoveRequest owed
};

// When a request reached each point of its life, on a steady clock in microseconds (-1: not yet),
// and the phase durations derived from them (PhaseTimings in control.proto defines the phases).
// Time to first token is measured once per request; the P/D hand-off phases once too, on the
// first attempt that reaches its first decode token.
struct RequestTimes {
  int64_t admitted = -1;
  int64_t placed = -1;        // the current attempt's placement
  int64_t first_token = -1;   // the current attempt's first token (prefill or colocated)
  int64_t kv_ready = -1;      // P/D: the current attempt's KvReady
  int64_t decode_added = -1;  // P/D: AddRequest sent to the decode worker
  // Microseconds per phase, -1 until measured: queue, prefill, kv_transfer, decode_queue,
  // first_decode_step.
  int64_t phase_us[5] = {-1, -1, -1, -1, -1};
};

struct Request {
  RequestId id = 0;
  std::string trace_id;  // the client-visible id (x-request-id), for logs and workers
  FrontendId frontend = 0;
  uint64_t client_id = 0;
  int priority = 0;
  uint64_t arrival = 0;  // admission order; kept across preemptions

  std::vector<int32_t> tokens;  // prompt, then every token generated (and streamed) so far
  int num_prompt_tokens = 0;    // the client's prompt
  int max_tokens = 0;           // new tokens over the whole life, clipped to max_model_len
  v1::SamplingState sampling;   // seed always set
  std::vector<int32_t> stop_token_ids;

  RequestState state = RequestState::kWaiting;
  uint32_t attempt = 0;
  int num_reruns = 0;         // re-runs after failures / lost workers (not preemptions)
  uint64_t queue_ticket = 0;  // matches the live entry in the waiting queue

  // Per attempt.
  int placed_tokens = 0;     // len(tokens) when placed: what this attempt prefills
  bool first_token = false;  // P/D: the prefill worker's token arrived
  bool kv_ready = false;     // P/D: the decode worker has the KV
  bool kv_sent = false;      // P/D: the prefill worker flushed the KV
  int prefill_queued = 0;    // tokens counted in the prefill worker's queued_prompt_tokens
  Placement prefill;         // P/D: the prefill worker
  Placement decode;          // P/D: the decode worker; colocated: the one worker

  // Chained hashes of full blocks of `tokens` (block_hash.h), grown on demand.
  std::vector<uint64_t> block_hashes;
  int hashes_block_size = 0;

  // Token events of one StepResults are batched: the event this request got in step event_stamp.
  uint64_t event_stamp = 0;
  size_t event_index = 0;

  RequestTimes times;

  int generated() const { return static_cast<int>(tokens.size()) - num_prompt_tokens; }
  int remaining() const { return max_tokens - generated(); }
  int final_length() const { return num_prompt_tokens + max_tokens; }
  bool placed() const { return state != RequestState::kWaiting; }
};

}  // namespace cleave::scheduler
