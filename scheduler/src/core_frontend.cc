// Admission (Submit), cancellation, and a frontend's disconnection.
#include <algorithm>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core_impl.h"

namespace cleave::scheduler {
namespace {

// Why a request can never run here (INVALID_ARGUMENT), or empty; `too_long` says which kind.
std::string CheckRunnable(const v1::SubmitRequest& request, int64_t max_model_len, int vocab_size,
                          bool* too_long) {
  const int64_t len = request.token_ids_size();
  *too_long = len + 1 > max_model_len;
  if (*too_long) {
    return absl::StrCat("prompt of ", len, " tokens leaves no room to generate: max_model_len is ",
                        max_model_len);
  }
  for (int32_t t : request.token_ids()) {
    if (t < 0 || t >= vocab_size) {
      return absl::StrCat("token id ", t, " outside the vocabulary [0, ", vocab_size, ")");
    }
  }
  return "";
}

}  // namespace

void SchedulerCore::Impl::Dequeue(Request& r) {
  --num_waiting;
  waiting_tokens -= static_cast<int64_t>(r.tokens.size());
}

void SchedulerCore::Submit(FrontendId frontend, const v1::SubmitRequest& request, Clock now) {
  Impl& s = *impl_;
  using M = SchedulerMetrics;
  auto reject = [&](int32_t code, const std::string& message,
                    M::Rejection reason = M::kInvalid) {
    if (s.metrics != nullptr) s.metrics->rejected[reason]->Inc();
    v1::RequestEvent event;
    event.set_client_id(request.client_id());
    event.set_error_code(code);
    event.set_error_message(message);
    if (code == kCodeResourceExhausted) event.set_retry_after_s(s.config.retry_after_s);
    s.outbox.to_frontends.emplace_back(frontend, std::move(event));
    ++s.num_rejected;
  };
  if (s.by_client.contains({frontend, request.client_id()})) {
    return reject(kCodeInvalidArgument,
                  absl::StrCat("client_id ", request.client_id(), " is already in use"));
  }
  if (request.token_ids().empty()) return reject(kCodeInvalidArgument, "empty prompt");
  if (request.max_tokens() <= 0) {
    return reject(kCodeInvalidArgument,
                  absl::StrCat("max_tokens must be > 0, got ", request.max_tokens()));
  }
  if (!HasServingCapacity()) {
    return reject(kCodeUnavailable, s.NoCapacityReason(), M::kNoCapacity);
  }
  const int64_t max_model_len = s.MaxModelLen();
  bool too_long = false;
  if (std::string why = CheckRunnable(request, max_model_len, s.geometry->vocab_size(), &too_long);
      !why.empty()) {
    return reject(kCodeInvalidArgument, why, too_long ? M::kTooLong : M::kInvalid);
  }
  const int64_t len = request.token_ids_size();
  if (s.num_waiting >= s.config.max_waiting) {
    return reject(kCodeResourceExhausted,
                  absl::StrCat("too many requests waiting (", s.num_waiting, ")"), M::kQueueFull);
  }
  if (s.waiting_tokens + len > s.config.max_waiting_tokens) {
    return reject(kCodeResourceExhausted,
                  absl::StrCat("too many prompt tokens waiting (", s.waiting_tokens, " + ", len,
                               " > ", s.config.max_waiting_tokens, ")"),
                  M::kQueueFull);
  }

  auto owned = std::make_unique<Request>();
  Request& r = *owned;
  r.id = s.next_request_id++;
  r.frontend = frontend;
  r.client_id = request.client_id();
  // Opaque to the scheduler; bounded so a buggy frontend cannot bloat every worker message.
  r.trace_id = request.trace_id().substr(0, 128);
  s.MarkAdmitted(r);
  s.Count(&M::admitted);
  r.priority = request.priority();
  r.arrival = s.next_arrival++;
  r.tokens.assign(request.token_ids().begin(), request.token_ids().end());
  r.num_prompt_tokens = static_cast<int>(len);
  r.max_tokens = static_cast<int>(std::min<int64_t>(request.max_tokens(), max_model_len - len));
  r.sampling = request.sampling();
  // Every attempt, on every worker, samples with the same seed (rng_skip keeps the stream aligned).
  if (!request.has_seed()) r.sampling.set_seed(s.rng());
  r.stop_token_ids.assign(request.stop_token_ids().begin(), request.stop_token_ids().end());
  s.waiting.PushBack(r);
  ++s.num_waiting;
  s.waiting_tokens += len;
  s.by_client.emplace(std::make_pair(frontend, r.client_id), r.id);
  s.requests.emplace(r.id, std::move(owned));

  v1::RequestEvent accepted;
  accepted.set_client_id(request.client_id());
  accepted.set_accepted(true);
  s.outbox.to_frontends.emplace_back(frontend, std::move(accepted));
}

void SchedulerCore::Cancel(FrontendId frontend, const v1::CancelRequest& cancel) {
  Impl& s = *impl_;
  auto it = s.by_client.find({frontend, cancel.client_id()});
  if (it == s.by_client.end()) return;
  Request* r = s.FindRequest(it->second);
  if (r == nullptr) {  // cannot happen; keep the maps consistent anyway
    s.by_client.erase(it);
    return;
  }
  if (r->state == RequestState::kWaiting) {
    s.Dequeue(*r);
  } else {
    s.DetachAll(*r, cancel.finished() ? v1::REMOVE_REASON_FINISHED : v1::REMOVE_REASON_CANCELLED);
  }
  if (cancel.finished()) ++s.num_finished;
  s.CountEnd(cancel.finished() ? SchedulerMetrics::kFinished : SchedulerMetrics::kCancelled);
  s.Erase(*r);
}

void SchedulerCore::RemoveFrontend(FrontendId frontend) {
  std::vector<uint64_t> clients;
  for (const auto& [key, id] : impl_->by_client) {
    if (key.first == frontend) clients.push_back(key.second);
  }
  std::sort(clients.begin(), clients.end());
  for (uint64_t client : clients) {
    v1::CancelRequest cancel;
    cancel.set_client_id(client);
    Cancel(frontend, cancel);
  }
}

}  // namespace cleave::scheduler
