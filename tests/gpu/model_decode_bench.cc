// Decode step of a 1B-parameter Llama (random weights, bf16 on the GPU), batch 1, against the
// weight-bandwidth roofline measured in the same run: a decode step must read every weight once,
// so it cannot beat (bytes of weights) / (device-to-device copy bandwidth). Reports the ratio
// roofline / measured step (the target: >= 0.70). The step is the serving one: the whole
// Forward (embedding, 16 layers, final norm, LM head) plus the logits' copy back to the host.
// Also a batch-64 row (tokens/s) for scale.
//
// Usage: model_decode_bench [--layers N] [--context N] [--steps N]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cleave/kernels/backend.h"
#include "cleave/kernels/dtype.h"
#include "cleave/model/config.h"
#include "cleave/model/decoder.h"
#include "cleave/model/kv_cache.h"
#include "cleave/model/safetensors.h"
#include "cleave/model/weight_store.h"
#include "gpu_bench_util.h"
#include "nlohmann/json.hpp"

namespace cleave::model {
namespace {

using kernels::gpubench::CopyBandwidth;
using kernels::gpubench::Must;

struct Shape {
  int hidden = 2048, layers = 16, heads = 32, kv_heads = 8, ffn = 8192, vocab = 32000;
};

std::string ConfigJson(const Shape& s) {
  nlohmann::json j = {{"architectures", {"LlamaForCausalLM"}},
                      {"model_type", "llama"},
                      {"hidden_size", s.hidden},
                      {"num_hidden_layers", s.layers},
                      {"num_attention_heads", s.heads},
                      {"num_key_value_heads", s.kv_heads},
                      {"intermediate_size", s.ffn},
                      {"vocab_size", s.vocab},
                      {"max_position_embeddings", 8192},
                      {"rms_norm_eps", 1e-5},
                      {"rope_theta", 500000.0},
                      {"tie_word_embeddings", false},
                      {"torch_dtype", "bfloat16"}};
  return j.dump();
}

// A safetensors image of random bf16 weights (uniform in +-0.02, norms 1.0) for `s`.
std::string RandomCheckpoint(const Shape& s) {
  const int64_t d = s.hidden, hd = s.hidden / s.heads, q = s.heads * hd, kv = s.kv_heads * hd, f = s.ffn;
  std::vector<std::pair<std::string, std::vector<int64_t>>> tensors = {{"model.embed_tokens.weight", {s.vocab, d}},
                                                                       {"model.norm.weight", {d}},
                                                                       {"lm_head.weight", {s.vocab, d}}};
  for (int l = 0; l < s.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    tensors.push_back({p + "input_layernorm.weight", {d}});
    tensors.push_back({p + "post_attention_layernorm.weight", {d}});
    tensors.push_back({p + "self_attn.q_proj.weight", {q, d}});
    tensors.push_back({p + "self_attn.k_proj.weight", {kv, d}});
    tensors.push_back({p + "self_attn.v_proj.weight", {kv, d}});
    tensors.push_back({p + "self_attn.o_proj.weight", {d, q}});
    tensors.push_back({p + "mlp.gate_proj.weight", {f, d}});
    tensors.push_back({p + "mlp.up_proj.weight", {f, d}});
    tensors.push_back({p + "mlp.down_proj.weight", {d, f}});
  }
  nlohmann::json header = nlohmann::json::object();
  size_t offset = 0;
  for (const auto& [name, shape] : tensors) {
    size_t n = 1;
    for (int64_t x : shape) n *= static_cast<size_t>(x);
    header[name] = {{"dtype", "BF16"}, {"shape", shape}, {"data_offsets", {offset, offset + 2 * n}}};
    offset += 2 * n;
  }
  std::string head = header.dump();
  head.resize((head.size() + 7) / 8 * 8, ' ');
  std::string out(8 + head.size() + offset, '\0');
  const uint64_t head_len = head.size();
  std::memcpy(out.data(), &head_len, 8);
  std::memcpy(out.data() + 8, head.data(), head.size());
  uint16_t* data = reinterpret_cast<uint16_t*>(out.data() + 8 + head.size());
  uint64_t x = 0x9e3779b97f4a7c15ull;
  size_t at = 0;
  for (const auto& [name, shape] : tensors) {
    size_t n = 1;
    for (int64_t v : shape) n *= static_cast<size_t>(v);
    const bool norm = shape.size() == 1;
    for (size_t i = 0; i < n; ++i) {
      x ^= x << 13, x ^= x >> 7, x ^= x << 17;  // xorshift64: fast enough for 1B values
      const float u = static_cast<float>(x >> 40) / static_cast<float>(1 << 24);
      data[at + i] = kernels::F32ToBf16(norm ? 1.0f : (u - 0.5f) * 0.04f);
    }
    at += n;
  }
  return out;
}

// Mean seconds of one decode step of `batch` sequences, each with `context` tokens cached.
double DecodeStep(const DecoderModel& m, int batch, int context, int steps) {
  const ModelConfig& c = m.config();
  const int block = 16, per_seq = (context + steps + block) / block + 1;
  auto backend = kernels::GetBackend(m.device());
  Must(backend.status(), "backend");
  auto cache = KvCache::Create(c, batch * per_seq, block, **backend);
  Must(cache.status(), "cache");
  Workspace ws;
  std::vector<float> logits;
  std::vector<std::vector<int32_t>> tables(batch);
  for (int b = 0; b < batch; ++b) {
    for (int i = 0; i < per_seq; ++i) tables[b].push_back(b * per_seq + i);
  }
  // Prefill every sequence's context (the KV it attends to), one pass for all.
  ForwardBatch pre;
  std::vector<int32_t> prompt(context, 7);
  for (int b = 0; b < batch; ++b) pre.AddSequence(prompt, 0, tables[b], block, true);
  Must(pre.Finalize(), "prefill plan");
  Must(m.Forward(pre, **cache, ws, logits), "prefill");
  auto step = [&](int pos) {
    ForwardBatch fb;
    const std::vector<int32_t> tok = {11};
    for (int b = 0; b < batch; ++b) fb.AddSequence(tok, pos, tables[b], block, true);
    Must(fb.Finalize(), "decode plan");
    Must(m.Forward(fb, **cache, ws, logits), "decode");
  };
  for (int i = 0; i < 3; ++i) step(context + i);  // warm-up: workspace growth, cuBLAS heuristics
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < steps; ++i) step(context + 3 + i);
  const auto t1 = std::chrono::steady_clock::now();
  return std::chrono::duration<double>(t1 - t0).count() / steps;
}

int Main(int argc, char** argv) {
  Shape s;
  int context = 128, steps = 50;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    const int v = std::atoi(argv[i + 1]);
    if (flag == "--layers") s.layers = v;
    if (flag == "--context") context = v;
    if (flag == "--steps") steps = v;
  }
  auto config = ParseModelConfig(ConfigJson(s));
  Must(config.status(), "config");
  auto file = SafetensorsFile::FromBuffer(RandomCheckpoint(s), "random-1b");
  Must(file.status(), "checkpoint");
  auto store = WeightStore::FromFile(std::move(*file));
  Must(store.status(), "store");
  LoadOptions load;
  load.device = kernels::Device::Cuda(0);
  load.device_weights = LoadOptions::DeviceWeights::kBF16;
  auto model = DecoderModel::FromWeights(*config, std::move(*store), load);
  Must(model.status(), "model");
  const double bytes = static_cast<double>((*model)->device_weight_bytes());
  const double copy_bw = CopyBandwidth(size_t{1} << 30);
  const double roofline_s = bytes / copy_bw;
  const double step1 = DecodeStep(**model, 1, context, steps);
  const double step64 = DecodeStep(**model, 64, context, steps / 5 + 1);
  std::printf("| model | shape | us/step | detail | ratio | baseline |\n|---|---|---|---|---|---|\n");
  std::printf("| D2D copy | 1 GiB | - | %.0f GB/s | 1.00 | itself |\n", copy_bw / 1e9);
  std::printf("| Llama decode step, batch 1 | %d layers, %.2f GB bf16 weights, context %d | %.1f | roofline %.1f us "
              "| %.2f | weight bytes / copy bandwidth (target >= 0.70) |\n",
              s.layers, bytes / 1e9, context, step1 * 1e6, roofline_s * 1e6, roofline_s / step1);
  std::printf("| Llama decode step, batch 64 | same | %.1f | %.0f tokens/s | %.2f | weight roofline |\n", step64 * 1e6,
              64 / step64, roofline_s / step64);
  return 0;
}

}  // namespace
}  // namespace cleave::model

int main(int argc, char** argv) { return cleave::model::Main(argc, argv); }
