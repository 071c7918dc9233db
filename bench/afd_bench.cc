// Attention-FFN disaggregation (AFD) on loopback: per-layer exchange latency, how much of it the
// ping-pong hides for m = 1, 2, 3 micro-batches, and decode throughput against the colocated
// model, measured in one run on the same cores. Its own main(), not a Google Benchmark: one
// configuration is a whole prefilled decode loop, and the report is a markdown document.
//
//   afd_bench [--batches 8,32,64] [--steps 20] [--warmup 3] [--reps 3] [--context 64]
//             [--hidden 512] [--layers 4] [--experts 8] [--top-k 2] [--intermediate 1024]
//             [--vocab 2048] [--dtype bf16|f32] [--model DIR] [--ffn procs|threads]
//             [--layer-table-batch 32]
//
// Set-up: a random Mixtral-like checkpoint (or --model DIR), 2 FFN services each holding its
// PlaceExperts(config, 2) shard, an attention-only model driving AfdForward, and the full model for
// the colocated baseline. Kernel threads = 1, so the attention side computes on the main thread
// and each FFN service in a forked child process, as deployed (--ffn threads: on a connection
// thread of this process, where kernel calls serialise on the kernel pool).
// All modes decode the same tokens at the same positions over one KV cache: each mode restarts at
// position --context and rewrites the same slots with the same values (the paths are
// bit-identical), so no mode sees a longer context than another. --ffn threads shows what
// serialising every kernel call of one process on the kernel pool costs (see the report).
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "cleave/common/metrics.h"
#include "cleave/common/status.h"
#include "cleave/kernels/backend.h"
#include "cleave/kernels/dtype.h"
#include "cleave/kernels/gemm.h"
#include "cleave/model/decoder.h"
#include "cleave/model/expert_placement.h"
#include "cleave/model/kv_cache.h"
#include "cleave/model/safetensors.h"
#include "cleave/worker/afd.h"
#include "cleave/worker/ffn_service.h"

namespace cleave {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
constexpr int kBlock = 16;

struct Flags {
  std::vector<int> batches{8, 32, 64};
  int steps = 20, warmup = 3, reps = 3, context = 64;
  int hidden = 512, layers = 4, experts = 8, top_k = 2, intermediate = 1024, vocab = 2048;
  std::string dtype = "bf16", model, ffn = "procs";
  int layer_table_batch = 32;
};

[[noreturn]] void Die(const std::string& why) {
  std::fprintf(stderr, "afd_bench: %s\n", why.c_str());
  std::exit(1);
}

// --name value or --name=value.
Flags ParseFlags(int argc, char** argv) {
  Flags f;
  const std::pair<const char*, int*> ints[] = {
      {"--steps", &f.steps},     {"--warmup", &f.warmup},   {"--reps", &f.reps},   {"--context", &f.context},
      {"--hidden", &f.hidden},   {"--layers", &f.layers},   {"--top-k", &f.top_k}, {"--experts", &f.experts},
      {"--vocab", &f.vocab},     {"--intermediate", &f.intermediate}, {"--layer-table-batch", &f.layer_table_batch}};
  const std::pair<const char*, std::string*> strings[] = {{"--dtype", &f.dtype}, {"--model", &f.model},
                                                          {"--ffn", &f.ffn},     {"--batches", nullptr}};
  for (int i = 1; i < argc; ++i) {
    std::string name = argv[i], value;
    if (const size_t eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name.resize(eq);
    } else if (i + 1 < argc) {
      value = argv[++i];
    }
    bool known = false;
    for (auto& [flag, out] : ints) {
      if (name != flag) continue;
      known = true;
      if (!absl::SimpleAtoi(value, out) || *out < 0) Die("bad value for " + name + ": " + value);
    }
    for (auto& [flag, out] : strings) {
      if (name != flag) continue;
      known = true;
      if (out != nullptr) *out = value;
    }
    if (name == "--batches") {
      f.batches.clear();
      for (absl::string_view s : absl::StrSplit(value, ',')) {
        if (int b = 0; absl::SimpleAtoi(s, &b) && b >= 1) f.batches.push_back(b);
        else Die("bad batch size " + std::string(s));
      }
    }
    if (!known) Die("unknown flag " + name);
  }
  if (f.dtype != "bf16" && f.dtype != "f32") Die("--dtype is bf16 or f32");
  if (f.ffn != "threads" && f.ffn != "procs") Die("--ffn is threads or procs");
  if (f.steps < 1 || f.reps < 1 || f.context < 1 || f.batches.empty()) Die("steps, reps, context >= 1");
  return f;
}

// Cheap deterministic hash: std::mt19937 + normal_distribution over the default 50M weights
// would add seconds to every run.
uint32_t Hash(uint64_t x) {
  x = (x ^ (x >> 33)) * 0xff51afd7ed558ccdULL;
  x = (x ^ (x >> 33)) * 0xc4ceb9fe1a85ec53ULL;
  return static_cast<uint32_t>(x ^ (x >> 33));
}

// A random Mixtral checkpoint: matrices uniform with standard deviation 0.02 (small, so the
// residual stream stays finite through every layer), norms 1.
absl::Status WriteMixtral(const fs::path& dir, const Flags& f) {
  fs::create_directories(dir);
  constexpr int kHeads = 8, kKvHeads = 2, kHeadDim = 64;
  const bool bf16 = f.dtype == "bf16";
  {
    std::ofstream cfg(dir / "config.json");
    cfg << "{\"architectures\": [\"MixtralForCausalLM\"], \"model_type\": \"mixtral\", \"hidden_size\": "
        << f.hidden << ", \"intermediate_size\": " << f.intermediate << ", \"num_hidden_layers\": " << f.layers
        << ", \"num_attention_heads\": " << kHeads << ", \"num_key_value_heads\": " << kKvHeads
        << ", \"head_dim\": " << kHeadDim << ", \"num_local_experts\": " << f.experts
        << ", \"num_experts_per_tok\": " << f.top_k << ", \"vocab_size\": " << f.vocab
        << ", \"max_position_embeddings\": 512, \"rms_norm_eps\": 1e-5, \"rope_theta\": 1000000.0,"
        << " \"hidden_act\": \"silu\", \"tie_word_embeddings\": false, \"sliding_window\": null,"
        << " \"bos_token_id\": 1, \"eos_token_id\": 2, \"torch_dtype\": \"" << (bf16 ? "bfloat16" : "float32")
        << "\"}\n";
  }
  std::vector<std::vector<float>> f32;
  std::vector<std::vector<uint16_t>> b16;
  std::vector<model::TensorToWrite> tensors;
  f32.reserve(4096);
  b16.reserve(4096);
  uint64_t salt = 0;
  const float a = 0.02f * std::sqrt(3.0f);  // uniform [-a, a] has standard deviation 0.02
  auto matrix = [&](const std::string& name, int64_t rows, int64_t cols) {
    std::vector<float> v(static_cast<size_t>(rows * cols));
    ++salt;
    for (size_t i = 0; i < v.size(); ++i) {
      v[i] = (static_cast<float>(Hash((salt << 40) + i) >> 8) / 16777216.0f * 2.0f - 1.0f) * a;
    }
    if (bf16) {
      std::vector<uint16_t> bits(v.size());
      for (size_t i = 0; i < v.size(); ++i) bits[i] = kernels::F32ToBf16(v[i]);
      b16.push_back(std::move(bits));
      tensors.push_back({name, kernels::DType::kBF16, {rows, cols}, b16.back().data()});
    } else {
      f32.push_back(std::move(v));
      tensors.push_back({name, kernels::DType::kF32, {rows, cols}, f32.back().data()});
    }
  };
  auto norm = [&](const std::string& name) {
    f32.emplace_back(static_cast<size_t>(f.hidden), 1.0f);
    tensors.push_back({name, kernels::DType::kF32, {f.hidden}, f32.back().data()});
  };
  matrix("model.embed_tokens.weight", f.vocab, f.hidden);
  matrix("lm_head.weight", f.vocab, f.hidden);
  norm("model.norm.weight");
  for (int l = 0; l < f.layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    norm(p + "input_layernorm.weight");
    norm(p + "post_attention_layernorm.weight");
    matrix(p + "self_attn.q_proj.weight", kHeads * kHeadDim, f.hidden);
    matrix(p + "self_attn.k_proj.weight", kKvHeads * kHeadDim, f.hidden);
    matrix(p + "self_attn.v_proj.weight", kKvHeads * kHeadDim, f.hidden);
    matrix(p + "self_attn.o_proj.weight", f.hidden, kHeads * kHeadDim);
    matrix(p + "block_sparse_moe.gate.weight", f.experts, f.hidden);
    for (int e = 0; e < f.experts; ++e) {
      const std::string ep = absl::StrCat(p, "block_sparse_moe.experts.", e, ".");
      matrix(ep + "w1.weight", f.intermediate, f.hidden);
      matrix(ep + "w3.weight", f.intermediate, f.hidden);
      matrix(ep + "w2.weight", f.hidden, f.intermediate);
    }
  }
  return model::WriteSafetensors(dir / "model.safetensors", tensors, {});
}

// One FFN worker in this process: its model (only its experts bound) and its service.
struct FfnWorker {
  metrics::Registry registry;
  std::unique_ptr<model::DecoderModel> model;
  std::unique_ptr<worker::FfnService> service;
};

absl::StatusOr<std::unique_ptr<FfnWorker>> StartFfn(const fs::path& dir, const model::FfnShardPlan& plan) {
  auto w = std::make_unique<FfnWorker>();
  model::LoadOptions load;
  load.part = model::LoadOptions::Part::kFfn;
  load.experts = plan.experts;
  load.shared_expert = plan.shared_expert;
  CLEAVE_ASSIGN_OR_RETURN(w->model, model::DecoderModel::Load(dir, load));
  worker::WorkerProcessOptions o;
  o.ffn_port = 0;
  CLEAVE_ASSIGN_OR_RETURN(w->service, worker::FfnService::Start(*w->model, plan, o, w->registry));
  return w;
}

// --ffn procs: the FFN worker in a forked child, as a real FFN worker process would be (its own
// kernel pool). Forked before this process starts any thread. The child reports its address on
// a pipe and serves until the parent closes the other pipe (or dies).
struct ChildFfn {
  pid_t pid = -1;
  int ctl_write = -1;
  std::string address;
};

ChildFfn ForkFfn(const fs::path& dir, const model::FfnShardPlan& plan) {
  int addr_pipe[2], ctl_pipe[2];
  if (pipe(addr_pipe) != 0 || pipe(ctl_pipe) != 0) Die("pipe failed");
  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid < 0) Die("fork failed");
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(1);
    close(addr_pipe[0]);
    close(ctl_pipe[1]);
    kernels::SetCpuThreads(1);
    auto w = StartFfn(dir, plan);
    const std::string line = w.ok() ? (*w)->service->address() + "\n" : "ERROR " + w.status().ToString() + "\n";
    if (write(addr_pipe[1], line.data(), line.size()) < 0) _exit(1);
    close(addr_pipe[1]);
    char c;
    while (read(ctl_pipe[0], &c, 1) > 0) {}
    if (w.ok()) (*w)->service->Stop();
    _exit(0);
  }
  close(addr_pipe[1]);
  close(ctl_pipe[0]);
  std::string line;
  char c;
  while (read(addr_pipe[0], &c, 1) == 1 && c != '\n') line.push_back(c);
  close(addr_pipe[0]);
  if (line.empty() || line.rfind("ERROR", 0) == 0) Die("FFN child: " + line);
  return ChildFfn{pid, ctl_pipe[1], line};
}

v1::FfnShard ShardOf(const model::ModelConfig& c, const model::FfnShardPlan& plan, const std::string& address) {
  v1::FfnShard s;  // what FfnService::shard() says, built here for the child processes too
  s.set_address(address);
  s.set_dense(true);
  s.mutable_experts()->Add(plan.experts.begin(), plan.experts.end());
  s.set_shared_expert(plan.shared_expert);
  s.set_num_experts(c.moe.num_experts);
  s.set_model_has_shared_expert(c.moe.shared_expert_intermediate_size > 0);
  return s;
}

// Sequence s's token at position p: the same in every mode (teacher forcing, logits unused).
int32_t TokenAt(int s, int p, int vocab) {
  return static_cast<int32_t>(Hash((uint64_t{static_cast<uint32_t>(s)} << 32) | static_cast<uint32_t>(p)) % vocab);
}

struct Layout {
  int blocks_per_seq = 0;
  bool slots = false;  // models with Mamba layers: state slot s for sequence s
  int vocab = 0;
  std::vector<int32_t> Blocks(int s) const {
    std::vector<int32_t> b(blocks_per_seq);
    for (int i = 0; i < blocks_per_seq; ++i) b[i] = s * blocks_per_seq + i;
    return b;
  }
  // Sequences [first, last), each `len` tokens ending at position `pos` (prefill: from 0).
  model::ForwardBatch Batch(int first, int last, int pos, int len) const {
    model::ForwardBatch b;
    for (int s = first; s < last; ++s) {
      std::vector<int32_t> t(len);
      for (int i = 0; i < len; ++i) t[i] = TokenAt(s, pos - len + 1 + i, vocab);
      b.AddSequence(t, pos - len + 1, Blocks(s), kBlock, true, slots ? s : -1);
    }
    if (absl::Status st = b.Finalize(); !st.ok()) Die(st.ToString());
    return b;
  }
};

void Accumulate(worker::AfdStats& into, const worker::AfdStats& s) {
  using S = worker::AfdStats;
  for (auto m : {&S::calls, &S::steps, &S::exchanges}) into.*m += s.*m;
  for (auto m : {&S::round_trip_us, &S::compute_us, &S::exchange_us, &S::wait_us, &S::bytes_sent, &S::bytes_received}) {
    into.*m += s.*m;
  }
  for (auto m : {&S::layer_round_trip_us, &S::layer_wait_us, &S::layer_calls}) {
    (into.*m).resize((s.*m).size(), 0);
    for (size_t l = 0; l < (s.*m).size(); ++l) (into.*m)[l] += (s.*m)[l];
  }
}

std::string LoadAvg() {
  std::ifstream in("/proc/loadavg");
  std::string a, b, c;
  in >> a >> b >> c;
  return absl::StrCat(a, " ", b, " ", c);
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Modes: 0 colocated on 1 kernel thread, 1 colocated on 2, 2.. AFD with m = mode - 1.
constexpr int kModes = 5;
std::string ModeName(int mode) {
  return mode == 0 ? "colocated, 1 thread" : mode == 1 ? "colocated, 2 threads" : absl::StrCat("AFD m=", mode - 1);
}

struct Result {
  std::vector<double> step_ms;  // mean step time of each repetition
  worker::AfdStats stats;       // every timed AFD step of every repetition
};

}  // namespace
}  // namespace cleave

int main(int argc, char** argv) {
  using namespace cleave;
  const Flags f = ParseFlags(argc, argv);
  std::vector<std::string> args(argv, argv + argc);
  const std::string load_start = LoadAvg();  // the 2 cores are shared: say how busy they were

  fs::path dir = f.model;
  const fs::path tmp = fs::temp_directory_path() / absl::StrCat("cleave_afd_bench_", getpid());
  if (dir.empty()) {
    dir = tmp;
    if (absl::Status st = WriteMixtral(dir, f); !st.ok()) Die(st.ToString());
  }
  absl::StatusOr<model::ModelConfig> config = model::LoadModelConfig(dir);
  if (!config.ok()) Die(config.status().ToString());
  const model::ModelConfig& c = *config;
  absl::StatusOr<std::vector<model::FfnShardPlan>> plans = model::PlaceExperts(c, 2);
  if (!plans.ok()) Die(plans.status().ToString());

  // FFN workers first: forking must happen before this process starts any thread.
  std::vector<std::unique_ptr<FfnWorker>> in_process;
  std::vector<ChildFfn> children;
  v1::AfdPeers peers;
  for (size_t i = 0; i < plans->size(); ++i) {
    std::string address;
    if (f.ffn == "procs") {
      children.push_back(ForkFfn(dir, (*plans)[i]));
      address = children.back().address;
    } else {
      auto w = StartFfn(dir, (*plans)[i]);
      if (!w.ok()) Die(w.status().ToString());
      address = (*w)->service->address();
      in_process.push_back(std::move(*w));
    }
    v1::AfdPeer* p = peers.add_peers();
    p->set_worker_id(i + 1);
    p->set_name(absl::StrCat("ffn-", i));
    *p->mutable_shard() = ShardOf(c, (*plans)[i], address);
  }
  peers.set_complete(true);

  auto full = model::DecoderModel::Load(dir);
  model::LoadOptions attn_load;
  attn_load.part = model::LoadOptions::Part::kAttention;
  auto attn = model::DecoderModel::Load(dir, attn_load);
  if (!full.ok() || !attn.ok()) Die(absl::StrCat(full.status().ToString(), " / ", attn.status().ToString()));
  int ffn_layers = 0;
  for (int l = 0; l < c.num_hidden_layers; ++l) ffn_layers += (*full)->ffn_kind(l) != model::FfnKind::kNone;

  const int max_b = *std::max_element(f.batches.begin(), f.batches.end());
  const int last_pos = f.context + f.warmup + f.steps;
  if (last_pos > c.max_position_embeddings) {
    Die(absl::StrCat("context + warmup + steps = ", last_pos, " > max_position_embeddings ",
                     c.max_position_embeddings));
  }
  Layout layout{(last_pos + kBlock - 1) / kBlock, c.has_ssm_state(), c.vocab_size};
  auto cache = model::KvCache::Create(c, max_b * layout.blocks_per_seq, kBlock, kernels::CpuBackend(),
                                      layout.slots ? max_b : 0);
  if (!cache.ok()) Die(cache.status().ToString());

  // Prefill every sequence once (positions [0, context)), on both cores; batch sizes below the
  // largest decode its first sequences.
  kernels::SetCpuThreads(2);
  model::Workspace ws;
  std::vector<float> logits;
  for (int s = 0; s < max_b; s += 16) {
    model::ForwardBatch b = layout.Batch(s, std::min(max_b, s + 16), f.context - 1, f.context);
    if (absl::Status st = (*full)->Forward(b, **cache, ws, logits); !st.ok()) Die(st.ToString());
  }
  kernels::SetCpuThreads(1);

  transport::ActivationOptions act;
  act.hidden_size = c.hidden_size;
  act.num_layers = c.num_hidden_layers;
  auto group = std::make_unique<worker::FfnGroup>(act);
  group->SetPeers(peers);
  std::vector<std::unique_ptr<worker::AfdForward>> afd;
  for (int m = 1; m <= 3; ++m) {
    afd.push_back(std::make_unique<worker::AfdForward>(**attn, **cache, *group, worker::AfdOptions{m, 5000}));
  }

  // One decode step of `mode` over sequences [0, b) at position pos; returns its time in ms.
  auto step = [&](int mode, int b, int pos, std::vector<float>& out) -> double {
    if (mode < 2) {
      model::ForwardBatch batch = layout.Batch(0, b, pos, 1);
      const auto t0 = Clock::now();
      if (absl::Status st = (*full)->Forward(batch, **cache, ws, out); !st.ok()) Die(st.ToString());
      return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    }
    const int m = mode - 1;
    const std::vector<int> ones(b, 1);
    const std::vector<int> starts = worker::SplitMicroBatches(ones, m);
    std::vector<model::ForwardBatch> mbs;
    for (size_t i = 0; i + 1 < starts.size(); ++i) mbs.push_back(layout.Batch(starts[i], starts[i + 1], pos, 1));
    const auto t0 = Clock::now();
    if (absl::Status st = afd[m - 1]->Run(mbs, out); !st.ok()) Die(st.ToString());
    return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  };

  std::vector<std::vector<Result>> results(f.batches.size(), std::vector<Result>(kModes));
  std::vector<std::string> identical(f.batches.size());
  for (int rep = 0; rep < f.reps; ++rep) {
    for (size_t bi = 0; bi < f.batches.size(); ++bi) {
      const int b = f.batches[bi];
      if (rep == 0) {
        // Correctness once: the first decode step of each m against colocated, bit for bit
        // (meaningless for Mamba layers, whose state the first call has already advanced).
        std::vector<float> want, got;
        step(0, b, f.context, want);
        for (int m = 1; m <= 3; ++m) {
          step(m + 1, b, f.context, got);
          const bool same = got.size() == want.size() && std::memcmp(got.data(), want.data(), want.size() * 4) == 0;
          absl::StrAppend(&identical[bi], m > 1 ? ", " : "", "m=", m, ": ",
                          layout.slots ? "n/a (Mamba state)" : same ? "yes" : "NO");
        }
      }
      // Modes interleaved, in an order that rotates with the repetition.
      for (int k = 0; k < kModes; ++k) {
        const int mode = (k + rep) % kModes;
        kernels::SetCpuThreads(mode == 1 ? 2 : 1);  // FFN services are idle between steps
        int pos = f.context;
        std::vector<float> out;
        for (int w = 0; w < f.warmup; ++w) step(mode, b, pos++, out);
        if (mode >= 2) afd[mode - 2]->TakeStats();  // drop the warm-up's
        double total = 0;
        for (int s = 0; s < f.steps; ++s) total += step(mode, b, pos++, out);
        Result& r = results[bi][mode];
        r.step_ms.push_back(total / f.steps);
        if (mode >= 2) Accumulate(r.stats, afd[mode - 2]->TakeStats());
      }
    }
  }
  kernels::SetCpuThreads(1);

  // ---------------------------------------------------------------------------------------------
  // Report.
  std::printf("# afd_bench\n\ncommand: `%s`\n\n", absl::StrJoin(args, " ").c_str());
  std::printf("model: %s (%s), hidden %d, %d layers (%d with an FFN), %d heads / %d KV heads, head_dim %d, "
              "%d experts top-%d, expert intermediate %d, vocab %d\n\n",
              f.model.empty() ? "random Mixtral-like checkpoint, weights U(+-0.02*sqrt3) (sd 0.02)" : f.model.c_str(),
              f.model.empty() ? f.dtype.c_str() : "checkpoint dtype", c.hidden_size, c.num_hidden_layers, ffn_layers,
              c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.moe.num_experts, c.moe.top_k,
              c.intermediate_size, c.vocab_size);
  for (size_t i = 0; i < plans->size(); ++i) {
    std::printf("ffn-%zu: experts %s%s, %.1f MB of expert weights\n", i,
                absl::StrJoin((*plans)[i].experts, ",").c_str(),
                (*plans)[i].shared_expert ? " + shared" : "", (*plans)[i].expert_bytes / 1e6);
  }
  std::printf("\nFFN workers: 2 on loopback TCP, %s; kernel threads 1 (attention on the main thread, each FFN "
              "service on its connection thread); colocated baseline on 1 and on 2 kernel threads. "
              "Context %d tokens per sequence, %d timed decode steps after %d warm-up, %d repetitions "
              "(modes interleaved, order rotated per repetition); step times are the median over repetitions "
              "of the mean step; exchange statistics sum every timed step of every repetition.\n\n",
              f.ffn == "procs" ? "each in a forked child process" : "each in this process", f.context, f.steps,
              f.warmup, f.reps);
  if (f.ffn == "threads") {
    std::printf("Note: kernel calls from different threads of one process serialise on the kernel pool's run "
                "lock (kernels/cpu/parallel.cc, Pool::Run takes run_mu_ even on 1 thread), so here the attention "
                "thread and the FFN threads never compute at the same time; only the transport overlaps compute. "
                "--ffn procs gives each FFN worker its own process and pool.\n\n");
  }
  std::printf("load average (1/5/15 min) at start: %s; at end: %s\n\n", load_start.c_str(), LoadAvg().c_str());
  std::printf(
      "Definitions (per call = one FFN worker's answer; per exchange = one micro-batch's FFN of one layer, i.e. "
      "one Send to each FFN worker it needs, which run in parallel):\n"
      "- RT = mean round trip per call (Send start -> answer read, attention side); C = mean FFN handler "
      "time per call; RT-C = transfer + queueing per call, the attention->FFN and FFN->attention latency "
      "together (the two directions are not separable from AfdStats).\n"
      "- W = mean time per exchange the attention side was blocked in Wait for it.\n"
      "- E = mean exchange time (its first Send to its last answer in, AfdStats::exchange_us).\n"
      "- hidden = 1 - W / E: the share of the exchange (FFN compute and transfer) the attention side spent "
      "on its own work (other micro-batches) instead of blocked.\n"
      "- transfer hidden = 1 - clamp(W - C, 0, RT - C) / (RT - C): blocked time beyond the FFN's compute counted "
      "as exposed transfer. Optimistic: it assumes none of the compute was done when the wait began. At m >= 2 "
      "RT - C also holds queueing behind the other micro-batch's call on the same FFN worker (calls on one "
      "connection are answered in order), which is FFN work, not wire time; RT - C at m = 1 is the unqueued "
      "loopback latency.\n"
      "- attn busy/mb = (step time - W per step) / (m x FFN layers): the attention side's own work per "
      "micro-batch and layer (mixer, routing, packing and sends; embed and logits spread over it). Ping-pong can "
      "hide a whole exchange only when the other micro-batches' work, (m - 1) x busy, covers RT.\n\n");
  std::printf("## Decode throughput\n\n");
  std::printf("| B | mode | step ms (median) | min..max over reps | tokens/s | vs colocated 1T | vs colocated 2T |\n");
  std::printf("|---|---|---|---|---|---|---|\n");
  for (size_t bi = 0; bi < f.batches.size(); ++bi) {
    const int b = f.batches[bi];
    const double colo1 = Median(results[bi][0].step_ms), colo2 = Median(results[bi][1].step_ms);
    for (int mode = 0; mode < kModes; ++mode) {
      const auto& v = results[bi][mode].step_ms;
      const double ms = Median(v);
      std::printf("| %d | %s | %.2f | %.2f..%.2f | %.0f | %.2fx | %.2fx |\n", b, ModeName(mode).c_str(), ms,
                  *std::min_element(v.begin(), v.end()), *std::max_element(v.begin(), v.end()), b * 1000.0 / ms,
                  colo1 / ms, colo2 / ms);
    }
  }
  std::printf("\nlogits identical to colocated (first decode step, bit for bit):\n");
  for (size_t bi = 0; bi < f.batches.size(); ++bi) std::printf("- B=%d: %s\n", f.batches[bi], identical[bi].c_str());

  std::printf("\n## Exchange latency and overlap\n\n");
  std::printf("| B | m | calls/exch | KB out/in per call | RT us | C us | RT-C us | W us | attn busy/mb us | "
              "C > RT-C | (m-1) busy >= RT | hidden | transfer hidden |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (size_t bi = 0; bi < f.batches.size(); ++bi) {
    const int b = f.batches[bi];
    for (int m = 1; m <= 3; ++m) {
      const Result& r = results[bi][m + 1];
      const worker::AfdStats& s = r.stats;
      const int m_eff = std::min(m, b);
      const double exch = static_cast<double>(s.exchanges);
      if (s.calls == 0 || exch == 0) {
        std::printf("| %d | %d | no FFN calls | | | | | | | | | | |\n", b, m);
        continue;
      }
      const double calls = static_cast<double>(s.calls);
      const double rt = s.round_trip_us / calls, cmp = s.compute_us / calls, w = s.wait_us / exch;
      const double mean_step_us = 1000.0 * std::accumulate(r.step_ms.begin(), r.step_ms.end(), 0.0) / r.step_ms.size();
      const double busy = (mean_step_us - s.wait_us / static_cast<double>(s.steps)) / (m_eff * ffn_layers);
      const double xfer = rt - cmp;
      const double hidden = s.exchange_us > 0 ? 1.0 - static_cast<double>(s.wait_us) / s.exchange_us : 0.0;
      const double xfer_hidden = xfer > 0 ? 1.0 - std::clamp(w - cmp, 0.0, xfer) / xfer : 1.0;
      std::printf("| %d | %d | %.2f | %.1f / %.1f | %.0f | %.0f | %.0f | %.0f | %.0f | %s | %s | %.0f%% | %.0f%% |\n",
                  b, m, calls / exch, s.bytes_sent / calls / 1e3, s.bytes_received / calls / 1e3, rt, cmp, xfer, w,
                  busy, cmp > xfer ? "yes" : "no", (m_eff - 1) * busy >= rt ? "yes" : "no", 100 * hidden,
                  100 * xfer_hidden);
    }
  }

  // Per layer, for one configuration.
  size_t lbi = 0;
  for (size_t bi = 0; bi < f.batches.size(); ++bi) {
    if (std::abs(f.batches[bi] - f.layer_table_batch) < std::abs(f.batches[lbi] - f.layer_table_batch)) lbi = bi;
  }
  const worker::AfdStats& ls = results[lbi][3].stats;
  const int lm = std::min(2, f.batches[lbi]);
  std::printf("\n## Per layer, B=%d m=2\n\n| layer | calls | RT us per call | W us per exchange | hidden, lower bound: 1 - W / max(W, RT) |\n"
              "|---|---|---|---|---|\n", f.batches[lbi]);
  for (size_t l = 0; l < ls.layer_calls.size(); ++l) {
    if (ls.layer_calls[l] == 0) continue;
    const double rt = ls.layer_round_trip_us[l] / static_cast<double>(ls.layer_calls[l]);
    const double w = ls.layer_wait_us[l] / (static_cast<double>(ls.steps) * lm);
    std::printf("| %zu | %lld | %.0f | %.0f | %.0f%% |\n", l, static_cast<long long>(ls.layer_calls[l]), rt, w,
                100 * (1 - w / std::max(w, rt)));
  }

  // Tear down: AFD, then our side of the connections (so the FFN side's closing them is not
  // reported as a lost connection), services, children, the temporary checkpoint.
  std::fflush(stdout);
  afd.clear();
  group.reset();
  in_process.clear();
  // Close every control pipe before waiting: a later child inherited the earlier ones' write ends.
  for (ChildFfn& ch : children) close(ch.ctl_write);
  for (ChildFfn& ch : children) {
    int status = 0;
    waitpid(ch.pid, &status, 0);
  }
  if (f.model.empty()) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
  }
  return 0;
}
