#include "cleave/frontend/scheduler_client.h"

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

#include "absl/container/flat_hash_map.h"
#include "cleave/common/logging.h"
#include "cleave/v1/control.grpc.pb.h"

namespace cleave::frontend {
namespace {

using Stream = grpc::ClientReaderWriter<v1::FrontendMessage, v1::FrontendEvents>;

EngineEvent ToEvent(const v1::RequestEvent& e) {
  EngineEvent ev;
  if (e.has_timings()) ev.timings = e.timings();
  ev.accepted = e.accepted();
  ev.finished = e.finished();
  ev.finished_by_length = e.finished_by_length();
  ev.retry_after_s = e.retry_after_s();
  if (e.error_code() != 0) {
    ev.error = absl::Status(static_cast<absl::StatusCode>(e.error_code()), e.error_message());
  }
  ev.tokens.reserve(e.tokens_size());
  for (const v1::TokenEvent& t : e.tokens()) {
    EngineToken tok{t.token_id(), t.logprob(), {}};
    for (int i = 0; i < t.top_token_ids_size() && i < t.top_logprobs_size(); ++i) {
      tok.top.emplace_back(t.top_token_ids(i), t.top_logprobs(i));
    }
    ev.tokens.push_back(std::move(tok));
  }
  return ev;
}

bool IsTerminal(const EngineEvent& e) { return e.finished || !e.error.ok(); }

}  // namespace

struct SchedulerClient::Impl {
  struct Pending {
    Callback callback;
    // When the writer handed the SubmitRequest to the stream: the end of the request's
    // frontend_in phase, copied into each of its events.
    std::chrono::steady_clock::time_point submitted_at{};
  };

  std::unique_ptr<v1::Scheduler::Stub> stub;
  std::mutex mu;  // guards everything below
  absl::flat_hash_map<uint64_t, Pending> pending;
  uint64_t next_id = 1;
  Stream* stream = nullptr;
  grpc::ClientContext* context = nullptr;
  bool stopping = false;
  std::condition_variable cv;
  std::mutex write_mu;  // one writer at a time on the stream
  // Submissions and cancellations are written by one writer thread, never by the caller: callers
  // include gRPC callback reactions (OnCancel), and a blocking gRPC write inside a reaction can
  // deadlock the callback executor. Guarded by mu.
  std::deque<v1::FrontendMessage> outgoing;
  std::thread writer;
  // Failures decided without the scheduler (not connected) are delivered from this thread, so a
  // callback never runs inside Submit.
  std::deque<std::pair<Callback, EngineEvent>> deferred;
  std::thread reader, deferrer;
  bool writer_stopping = false;
  std::condition_variable out_cv;
  // Ready() caches the scheduler's answer briefly: /ready may be polled hard.
  std::mutex ready_mu;
  std::chrono::steady_clock::time_point ready_checked{};
  bool ready_cached = false;

  void Defer(Callback cb, EngineEvent ev) {
    {
      std::lock_guard lock(mu);
      deferred.emplace_back(std::move(cb), std::move(ev));
    }
    cv.notify_all();
  }

  void RunDeferred() {
    std::unique_lock lock(mu);
    while (true) {
      cv.wait(lock, [&] { return stopping || !deferred.empty(); });
      if (deferred.empty() && stopping) return;
      auto [cb, ev] = std::move(deferred.front());
      deferred.pop_front();
      lock.unlock();
      cb(ev);
      lock.lock();
    }
  }

  void Enqueue(v1::FrontendMessage m) {
    {
      std::lock_guard lock(mu);
      outgoing.push_back(std::move(m));
    }
    out_cv.notify_one();
  }

  void RunWriter() {
    std::unique_lock lock(mu);
    while (true) {
      out_cv.wait(lock, [&] { return writer_stopping || !outgoing.empty(); });
      if (outgoing.empty() && writer_stopping) return;
      std::deque<v1::FrontendMessage> batch;
      batch.swap(outgoing);
      lock.unlock();
      for (const v1::FrontendMessage& m : batch) {
        if (m.has_submit()) {
          // Stamped as it is handed to the stream, before Write: its events may come back before a
          // blocking Write returns.
          const auto now = std::chrono::steady_clock::now();
          std::lock_guard l(mu);
          if (auto it = pending.find(m.submit().client_id()); it != pending.end()) it->second.submitted_at = now;
        }
        if (Write(m) || !m.has_submit()) continue;  // a lost cancel needs nothing: the stream is gone
        // Not sent: the request fails here.
        Callback cb;
        {
          std::lock_guard l(mu);
          auto it = pending.find(m.submit().client_id());
          if (it == pending.end()) continue;
          cb = std::move(it->second.callback);
          pending.erase(it);
        }
        EngineEvent ev;
        ev.error = absl::UnavailableError("the scheduler is not reachable");
        Defer(std::move(cb), std::move(ev));
      }
      lock.lock();
    }
  }

  bool Write(const v1::FrontendMessage& m) {
    std::lock_guard wl(write_mu);
    Stream* s;
    {
      std::lock_guard lock(mu);
      s = stream;
    }
    return s != nullptr && s->Write(m);
  }

  void FailAll(const std::string& why) {
    absl::flat_hash_map<uint64_t, Pending> failed;
    {
      std::lock_guard lock(mu);
      failed.swap(pending);
    }
    for (auto& [id, p] : failed) {
      EngineEvent ev;
      ev.error = absl::UnavailableError(why);
      ev.submitted_at = p.submitted_at;
      p.callback(ev);
    }
  }

  void RunReader() {
    while (true) {
      grpc::ClientContext ctx;
      std::unique_ptr<Stream> s = stub->FrontendStream(&ctx);
      {
        std::lock_guard lock(mu);
        if (stopping) return;
        context = &ctx;
        stream = s.get();
      }
      v1::FrontendEvents events;
      while (s->Read(&events)) {
        const auto received = std::chrono::steady_clock::now();
        for (const v1::RequestEvent& e : events.events()) Dispatch(e, received);
      }
      {
        std::lock_guard lock(mu);
        context = nullptr;
      }
      {
        std::lock_guard wl(write_mu);
        std::lock_guard lock(mu);
        stream = nullptr;
      }
      s->Finish();
      FailAll("lost the connection to the scheduler");
      std::unique_lock lock(mu);
      if (cv.wait_for(lock, std::chrono::milliseconds(300), [&] { return stopping; })) return;
    }
  }

  void Dispatch(const v1::RequestEvent& e, std::chrono::steady_clock::time_point received) {
    EngineEvent ev = ToEvent(e);
    ev.received_at = received;
    Callback cb;
    {
      std::lock_guard lock(mu);
      auto it = pending.find(e.client_id());
      if (it == pending.end()) return;  // cancelled meanwhile
      ev.submitted_at = it->second.submitted_at;
      cb = IsTerminal(ev) ? std::move(it->second.callback) : it->second.callback;
      if (IsTerminal(ev)) pending.erase(it);
    }
    cb(ev);
  }
};

SchedulerClient::SchedulerClient(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

std::unique_ptr<SchedulerClient> SchedulerClient::Create(const std::string& address,
                                                         const std::optional<tls::TlsPem>& tls) {
  auto impl = std::make_unique<Impl>();
  std::shared_ptr<grpc::ChannelCredentials> creds = grpc::InsecureChannelCredentials();
  if (tls.has_value()) {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = tls->ca;
    ssl.pem_private_key = tls->key;
    ssl.pem_cert_chain = tls->cert;
    creds = grpc::SslCredentials(ssl);
  }
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 200);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  impl->stub = v1::Scheduler::NewStub(
      grpc::CreateCustomChannel(address, creds, args));
  Impl* p = impl.get();
  auto client = std::unique_ptr<SchedulerClient>(new SchedulerClient(std::move(impl)));
  p->deferrer = std::thread([p] { p->RunDeferred(); });
  p->writer = std::thread([p] { p->RunWriter(); });
  p->reader = std::thread([p] { p->RunReader(); });
  return client;
}

SchedulerClient::~SchedulerClient() { Shutdown(); }

void SchedulerClient::Shutdown() {
  {
    std::lock_guard lock(impl_->mu);
    if (impl_->stopping) return;
    impl_->stopping = true;
    if (impl_->context) impl_->context->TryCancel();
  }
  impl_->cv.notify_all();
  impl_->reader.join();
  {
    std::lock_guard lock(impl_->mu);
    impl_->writer_stopping = true;
  }
  impl_->out_cv.notify_all();
  impl_->writer.join();
  impl_->FailAll("frontend shutting down");
  impl_->deferrer.join();
}

uint64_t SchedulerClient::Submit(v1::SubmitRequest request, Callback callback) {
  uint64_t id;
  {
    std::lock_guard lock(impl_->mu);
    id = impl_->next_id++;
    impl_->pending[id] = Impl::Pending{std::move(callback), {}};
  }
  request.set_client_id(id);
  v1::FrontendMessage m;
  *m.mutable_submit() = std::move(request);
  impl_->Enqueue(std::move(m));  // an unsendable submission fails from the writer thread
  return id;
}

void SchedulerClient::Cancel(uint64_t id, bool finished) {
  {
    std::lock_guard lock(impl_->mu);
    if (impl_->pending.erase(id) == 0) return;
  }
  v1::FrontendMessage m;
  m.mutable_cancel()->set_client_id(id);
  m.mutable_cancel()->set_finished(finished);
  impl_->Enqueue(std::move(m));
}

absl::StatusOr<v1::StatsResponse> SchedulerClient::Stats() {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
  v1::StatsResponse reply;
  grpc::Status st = impl_->stub->Stats(&ctx, v1::StatsRequest(), &reply);
  if (!st.ok()) return absl::UnavailableError("scheduler unreachable: " + st.error_message());
  return reply;
}

bool SchedulerClient::Ready() {
  std::lock_guard lock(impl_->ready_mu);
  const auto now = std::chrono::steady_clock::now();
  if (now - impl_->ready_checked < std::chrono::milliseconds(250)) return impl_->ready_cached;
  bool ready = false;
  {
    std::lock_guard l(impl_->mu);
    ready = impl_->stream != nullptr;
  }
  if (ready) {
    absl::StatusOr<v1::StatsResponse> stats = Stats();
    bool prefill = false, decode = false, colocated = false;
    if (stats.ok()) {
      for (const auto& w : stats->workers()) {
        prefill |= w.role() == v1::WORKER_ROLE_PREFILL;
        // An attention worker is a decode target while its AFD group is complete.
        decode |= w.role() == v1::WORKER_ROLE_DECODE ||
                  (w.role() == v1::WORKER_ROLE_ATTENTION && w.afd_complete() && !w.draining());
        colocated |= w.role() == v1::WORKER_ROLE_COLOCATED;
      }
    }
    ready = stats.ok() && ((prefill && decode) || colocated);
  }
  impl_->ready_checked = now;
  impl_->ready_cached = ready;
  return ready;
}

}  // namespace cleave::frontend
