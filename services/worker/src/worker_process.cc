#include "cleave/worker/worker_process.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <thread>

#include "absl/strings/str_cat.h"
#include "cleave/common/logging.h"
#include "cleave/common/status.h"
#include "cleave/kernels/gemm.h"
#include "cleave/v1/control.grpc.pb.h"
#include "cleave/worker/engine.h"

namespace cleave::worker {
namespace {

using Stream = grpc::ClientReaderWriter<v1::WorkerMessage, v1::SchedulerMessage>;

// The current scheduler stream; writes from the engine thread and transport threads serialise
// here. Messages written while no stream is up are dropped: the scheduler that would have wanted
// them forgot this worker's requests when the stream broke.
class Link {
 public:
  void Attach(Stream* stream) {
    std::lock_guard lock(mu_);
    stream_ = stream;
  }
  void Detach() { Attach(nullptr); }
  void Write(const v1::WorkerMessage& message) {
    std::lock_guard lock(mu_);
    if (stream_ != nullptr && !stream_->Write(message)) stream_ = nullptr;
  }

 private:
  std::mutex mu_;
  Stream* stream_ = nullptr;
};

// Models with Mamba layers hold one state slot per request the worker may run.
int StateSlots(const WorkerProcessOptions& o, const model::ModelConfig& config) {
  return config.has_ssm_state() ? std::max(1, o.max_running) : 0;
}

// The KV pool gets the memory budget left after the state slots. A model without attention
// layers has no KV bytes: its blocks only count tokens, enough for every slot at full length.
absl::StatusOr<int> ModelBlocks(const WorkerProcessOptions& o, const model::ModelConfig& config) {
  if (o.kv_blocks > 0) return o.kv_blocks;
  const size_t budget = static_cast<size_t>(o.kv_cache_mb) << 20;
  const size_t state = static_cast<size_t>(StateSlots(o, config)) * model::StateBytesPerSlot(config);
  if (state >= budget) {
    return absl::InvalidArgumentError(absl::StrCat(
        "kv_cache_mb ", o.kv_cache_mb, " cannot hold the Mamba state of max_running ", o.max_running,
        " requests (", state >> 20, " MiB); raise kv_cache_mb or lower max_running"));
  }
  const size_t per_block = model::KvBytesPerBlock(config, o.block_size);
  if (per_block == 0) {
    const int per_seq = (config.max_position_embeddings + o.block_size - 1) / o.block_size;
    return std::max(1, StateSlots(o, config)) * per_seq;
  }
  return std::max<int>(1, static_cast<int>((budget - state) / per_block));
}

}  // namespace

absl::StatusOr<v1::WorkerRole> ParseWorkerRole(const std::string& role) {
  if (role == "prefill") return v1::WORKER_ROLE_PREFILL;
  if (role == "decode") return v1::WORKER_ROLE_DECODE;
  if (role == "colocated") return v1::WORKER_ROLE_COLOCATED;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown worker role '", role, "' (prefill, decode or colocated)"));
}

absl::Status RunWorker(const WorkerProcessOptions& o, ShutdownLatch& shutdown) {
  if (o.threads > 0) kernels::SetCpuThreads(o.threads);
  CLEAVE_ASSIGN_OR_RETURN(std::unique_ptr<model::DecoderModel> model, model::DecoderModel::Load(o.model_dir));
  model::ModelConfig config = model->config();
  CLEAVE_CHECK_ARG(o.block_size > 0, "block_size must be positive");
  CLEAVE_ASSIGN_OR_RETURN(const int num_blocks, ModelBlocks(o, config));
  const int num_slots = StateSlots(o, config);
  CLEAVE_ASSIGN_OR_RETURN(std::unique_ptr<model::KvCache> cache,
                          model::KvCache::Create(config, num_blocks, o.block_size, kernels::CpuBackend(),
                                                 num_slots));
  KvCacheStore store(*cache, config);
  Link link;

  transport::TransportOptions topts;
  topts.listen_host = o.kv_listen_host;
  topts.listen_port = o.kv_port;
  topts.geometry = store.geometry();
  // Block ids and state slots are the decode worker's: its receiver checks them.
  topts.geometry.num_blocks = 0;
  topts.geometry.num_state_slots = 0;
  std::unique_ptr<transport::KvSender> sender;
  if (o.role == v1::WORKER_ROLE_PREFILL) sender = transport::CreateKvSender(topts);
  std::unique_ptr<transport::KvReceiver> receiver;
  if (o.role == v1::WORKER_ROLE_DECODE) {
    transport::ReceiverCallbacks callbacks;
    callbacks.on_ready = [&link](uint64_t id, uint32_t attempt) {
      v1::WorkerMessage m;
      m.mutable_kv_ready()->set_request_id(id);
      m.mutable_kv_ready()->set_attempt(attempt);
      link.Write(m);
    };
    callbacks.on_failed = [&link](uint64_t id, uint32_t attempt, const std::string& why) {
      v1::WorkerMessage m;
      m.mutable_kv_failed()->set_request_id(id);
      m.mutable_kv_failed()->set_attempt(attempt);
      m.mutable_kv_failed()->set_message(why);
      link.Write(m);
    };
    CLEAVE_ASSIGN_OR_RETURN(receiver, transport::CreateKvReceiver("tcp", topts, store, callbacks));
  }

  EngineOptions eopts;
  eopts.role = o.role;
  eopts.max_batch_tokens = o.max_batch_tokens;
  eopts.max_running = o.max_running;
  Engine engine(*model, *cache, eopts, sender.get(), [&link](v1::WorkerMessage m) { link.Write(m); });
  std::thread engine_thread([&] { engine.Run(); });

  auto channel = grpc::CreateChannel(o.scheduler, grpc::InsecureChannelCredentials());
  auto stub = v1::Scheduler::NewStub(channel);
  const std::string name = o.name.empty() ? absl::StrCat(v1::WorkerRole_Name(o.role), "@", o.scheduler) : o.name;
  CLEAVE_LOG(Info) << "worker " << name << ": " << num_blocks << " KV blocks of " << o.block_size
                   << " tokens"
                   << (num_slots > 0 ? absl::StrCat(", ", num_slots, " Mamba state slots") : "")
                   << (receiver ? absl::StrCat(", KV receiver on ", receiver->address()) : "");

  bool registered_once = false;
  while (!shutdown.requested()) {
    v1::RegisterWorkerRequest reg;
    reg.set_role(o.role);
    reg.set_model_id(o.model_dir.filename().string());
    reg.set_num_kv_blocks(num_blocks);
    reg.set_block_size(o.block_size);
    reg.set_max_batch_tokens(o.max_batch_tokens);
    reg.set_max_running(o.max_running);
    if (receiver) reg.set_kv_address(receiver->address());
    reg.set_num_layers(config.num_hidden_layers);
    reg.set_vocab_size(config.vocab_size);
    reg.set_max_model_len(config.max_position_embeddings);
    reg.set_name(name);
    reg.set_num_state_slots(num_slots);
    v1::RegisterWorkerResponse reg_reply;
    grpc::ClientContext reg_ctx;
    reg_ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
    grpc::Status st = stub->RegisterWorker(&reg_ctx, reg, &reg_reply);
    if (!st.ok()) {
      if (st.error_code() == grpc::StatusCode::INVALID_ARGUMENT) {
        engine.Stop();
        engine_thread.join();
        return absl::InvalidArgumentError(absl::StrCat("scheduler refused this worker: ", st.error_message()));
      }
      if (registered_once) {
        CLEAVE_LOG(Warning) << "scheduler unreachable (" << st.error_message() << "), retrying";
      }
      shutdown.WaitFor(std::chrono::milliseconds(500));
      continue;
    }
    registered_once = true;
    const uint64_t worker_id = reg_reply.worker_id();
    CLEAVE_LOG(Info) << "registered with " << o.scheduler << " as worker " << worker_id;

    grpc::ClientContext ctx;
    std::unique_ptr<Stream> stream = stub->WorkerStream(&ctx);
    v1::WorkerMessage hello;
    hello.set_hello_worker_id(worker_id);
    stream->Write(hello);
    link.Attach(stream.get());

    // Heartbeats keep the lease; a lapsed lease (or shutdown) ends this stream so we re-register.
    std::mutex hb_mu;
    std::condition_variable hb_cv;
    bool hb_stop = false;
    std::thread heartbeat([&] {
      const auto period = std::chrono::milliseconds(std::max(50, reg_reply.heartbeat_ms()));
      while (true) {
        {
          std::unique_lock lock(hb_mu);
          if (hb_cv.wait_for(lock, period, [&] { return hb_stop; })) return;
        }
        if (shutdown.requested()) {
          ctx.TryCancel();
          return;
        }
        v1::HeartbeatRequest hb;
        hb.set_worker_id(worker_id);
        v1::HeartbeatResponse hb_reply;
        grpc::ClientContext hb_ctx;
        hb_ctx.set_deadline(std::chrono::system_clock::now() + period * 2);
        grpc::Status hs = stub->Heartbeat(&hb_ctx, hb, &hb_reply);
        if (hs.ok() && !hb_reply.known()) {
          CLEAVE_LOG(Warning) << "scheduler no longer knows worker " << worker_id << "; re-registering";
          ctx.TryCancel();
          return;
        }
      }
    });

    v1::SchedulerMessage msg;
    while (stream->Read(&msg)) {
      if (msg.has_expect_kv() && receiver) {
        // The blocks and slot may have belonged to a request removed just before: let the engine
        // drop it (finish its current step) before anything may write them for the new one.
        engine.WaitForDeltas();
        const auto& e = msg.expect_kv();
        receiver->Expect(e.request_id(), e.attempt(), {e.blocks().begin(), e.blocks().end()},
                         e.state_slot());
        continue;
      }
      if (msg.has_remove() && receiver) receiver->Forget(msg.remove().request_id(), msg.remove().attempt());
      engine.Post(std::move(msg));
      msg.Clear();
    }
    link.Detach();
    engine.Reset();
    {
      std::lock_guard lock(hb_mu);
      hb_stop = true;
    }
    hb_cv.notify_all();
    heartbeat.join();
    grpc::Status fs = stream->Finish();
    if (!shutdown.requested()) {
      CLEAVE_LOG(Warning) << "scheduler stream ended (" << fs.error_message() << "); reconnecting";
      shutdown.WaitFor(std::chrono::milliseconds(300));
    }
  }
  engine.Stop();
  engine_thread.join();
  CLEAVE_LOG(Info) << "worker " << name << " stopped";
  return absl::OkStatus();
}

}  // namespace cleave::worker
