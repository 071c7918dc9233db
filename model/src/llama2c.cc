#include "cleave/model/llama2c.h"

#include <cstdint>
#include <cstring>
#include <fstream>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cleave/common/status.h"
#include "cleave/model/safetensors.h"
#include "nlohmann/json.hpp"

namespace cleave::model {
namespace {

using kernels::DType;

struct Header {
  int32_t dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
};

// Rows of a [heads * head_dim, cols] projection, reordered within each head from interleaved
// pairs (2i, 2i+1) to halves (i, i + head_dim/2): new row j*half + i = old row 2i + j.
std::vector<float> PermuteForHalves(const float* w, int heads, int head_dim, int cols) {
  std::vector<float> out(static_cast<size_t>(heads) * head_dim * cols);
  const int half = head_dim / 2;
  for (int h = 0; h < heads; ++h) {
    for (int i = 0; i < half; ++i) {
      for (int j = 0; j < 2; ++j) {
        const float* src = w + (static_cast<size_t>(h) * head_dim + 2 * i + j) * cols;
        float* dst = out.data() + (static_cast<size_t>(h) * head_dim + j * half + i) * cols;
        std::memcpy(dst, src, cols * sizeof(float));
      }
    }
  }
  return out;
}

std::vector<uint16_t> Narrow16(const std::vector<float>& v, DType dtype) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    out[i] = dtype == DType::kBF16 ? kernels::F32ToBf16(v[i]) : kernels::F32ToF16(v[i]);
  }
  return out;
}

}  // namespace

absl::Status ConvertLlama2c(const Llama2cConvertOptions& options) {
  CLEAVE_CHECK_ARG(options.dtype == DType::kF32 || options.dtype == DType::kBF16 ||
                       options.dtype == DType::kF16,
                   "output dtype must be f32, bf16 or f16");
  std::ifstream in(options.checkpoint, std::ios::binary | std::ios::ate);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open checkpoint ", options.checkpoint.string()));
  const int64_t file_size = in.tellg();
  in.seekg(0);
  Header h;
  if (file_size < static_cast<int64_t>(sizeof(h)) || !in.read(reinterpret_cast<char*>(&h), sizeof(h))) {
    return absl::InvalidArgumentError(absl::StrCat(options.checkpoint.string(), ": too short for a llama2.c header"));
  }
  const bool shared = h.vocab_size > 0;
  const int64_t vocab = shared ? h.vocab_size : -static_cast<int64_t>(h.vocab_size);
  if (h.dim <= 0 || h.hidden_dim <= 0 || h.n_layers <= 0 || h.n_heads <= 0 || h.n_kv_heads <= 0 ||
      vocab <= 0 || h.seq_len <= 0 || h.dim % h.n_heads != 0 || h.n_heads % h.n_kv_heads != 0 ||
      (h.dim / h.n_heads) % 2 != 0 || h.dim > (1 << 16) || h.n_layers > 1024 || vocab > (1 << 22)) {
    return absl::InvalidArgumentError(absl::StrCat(options.checkpoint.string(),
                                                   ": implausible llama2.c header (dim ", h.dim, ", layers ",
                                                   h.n_layers, ", heads ", h.n_heads, "/", h.n_kv_heads,
                                                   ", vocab ", h.vocab_size, ")"));
  }
  const int64_t d = h.dim, f = h.hidden_dim, L = h.n_layers, hd = d / h.n_heads, kv = hd * h.n_kv_heads;
  const int64_t body = vocab * d + L * d + L * d * d + 2 * L * kv * d + L * d * d + L * d + 3 * L * f * d +
                       d + static_cast<int64_t>(h.seq_len) * hd + (shared ? 0 : vocab * d);
  const int64_t expected = static_cast<int64_t>(sizeof(h)) + body * 4;
  if (file_size != expected) {
    return absl::InvalidArgumentError(absl::StrCat(options.checkpoint.string(), ": size ", file_size,
                                                   " bytes, header implies ", expected));
  }
  std::vector<float> all(body);
  if (!in.read(reinterpret_cast<char*>(all.data()), body * 4)) {
    return absl::DataLossError(absl::StrCat("short read from ", options.checkpoint.string()));
  }

  // Slice the flat array in the legacy order.
  const float* p = all.data();
  auto take = [&p](int64_t n) {
    const float* s = p;
    p += n;
    return s;
  };
  const float* embed = take(vocab * d);
  const float* rms_att = take(L * d);
  const float* wq = take(L * d * d);
  const float* wk = take(L * kv * d);
  const float* wv = take(L * kv * d);
  const float* wo = take(L * d * d);
  const float* rms_ffn = take(L * d);
  const float* w1 = take(L * f * d);
  const float* w2 = take(L * d * f);
  const float* w3 = take(L * f * d);
  const float* rms_final = take(d);
  take(static_cast<int64_t>(h.seq_len) * hd);  // freq_cis_real / imag: recomputed from theta
  const float* wcls = shared ? embed : take(vocab * d);

  // Keep every converted array alive until the file is written.
  std::vector<std::vector<float>> store;
  std::vector<TensorToWrite> tensors;
  auto add = [&](std::string name, const float* src, std::vector<int64_t> shape, bool is_matrix) {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    store.emplace_back(src, src + n);
    tensors.push_back({std::move(name), is_matrix ? options.dtype : DType::kF32, std::move(shape), nullptr});
  };
  auto add_owned = [&](std::string name, std::vector<float> v, std::vector<int64_t> shape) {
    store.push_back(std::move(v));
    tensors.push_back({std::move(name), options.dtype, std::move(shape), nullptr});
  };
  store.reserve(16 + 9 * L);
  add("model.embed_tokens.weight", embed, {vocab, d}, true);
  for (int64_t l = 0; l < L; ++l) {
    const std::string pre = absl::StrCat("model.layers.", l, ".");
    add(pre + "input_layernorm.weight", rms_att + l * d, {d}, false);
    add_owned(pre + "self_attn.q_proj.weight", PermuteForHalves(wq + l * d * d, h.n_heads, hd, d), {d, d});
    add_owned(pre + "self_attn.k_proj.weight", PermuteForHalves(wk + l * kv * d, h.n_kv_heads, hd, d), {kv, d});
    add(pre + "self_attn.v_proj.weight", wv + l * kv * d, {kv, d}, true);
    add(pre + "self_attn.o_proj.weight", wo + l * d * d, {d, d}, true);
    add(pre + "post_attention_layernorm.weight", rms_ffn + l * d, {d}, false);
    add(pre + "mlp.gate_proj.weight", w1 + l * f * d, {f, d}, true);
    add(pre + "mlp.down_proj.weight", w2 + l * d * f, {d, f}, true);
    add(pre + "mlp.up_proj.weight", w3 + l * f * d, {f, d}, true);
  }
  add("model.norm.weight", rms_final, {d}, false);
  if (!shared) add("lm_head.weight", wcls, {vocab, d}, true);

  std::vector<std::vector<uint16_t>> narrowed;
  narrowed.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (tensors[i].dtype == DType::kF32) {
      tensors[i].data = store[i].data();
    } else {
      narrowed.push_back(Narrow16(store[i], tensors[i].dtype));
      tensors[i].data = narrowed.back().data();
    }
  }

  std::error_code ec;
  std::filesystem::create_directories(options.out_dir, ec);
  if (ec) return absl::PermissionDeniedError(absl::StrCat("cannot create ", options.out_dir.string(), ": ", ec.message()));
  CLEAVE_RETURN_IF_ERROR(WriteSafetensors(options.out_dir / "model.safetensors", tensors, {{"format", "pt"}}));

  const char* dtype_name = options.dtype == DType::kF32 ? "float32" : options.dtype == DType::kBF16 ? "bfloat16" : "float16";
  nlohmann::json config = {
      {"architectures", {"LlamaForCausalLM"}}, {"model_type", "llama"},
      {"hidden_size", d}, {"intermediate_size", f}, {"num_hidden_layers", L},
      {"num_attention_heads", h.n_heads}, {"num_key_value_heads", h.n_kv_heads}, {"head_dim", hd},
      {"vocab_size", vocab}, {"max_position_embeddings", h.seq_len},
      {"rms_norm_eps", options.rms_norm_eps}, {"rope_theta", options.rope_theta},
      {"tie_word_embeddings", shared}, {"bos_token_id", 1}, {"eos_token_id", 2},
      {"hidden_act", "silu"}, {"torch_dtype", dtype_name}};
  std::ofstream cfg(options.out_dir / "config.json");
  cfg << config.dump(2) << "\n";
  if (!cfg) return absl::DataLossError("failed to write config.json");

  if (!options.tokenizer.empty()) {
    std::filesystem::copy_file(options.tokenizer, options.out_dir / "tokenizer.model",
                               std::filesystem::copy_options::overwrite_existing, ec);
    if (ec) return absl::NotFoundError(absl::StrCat("cannot copy tokenizer ", options.tokenizer.string(), ": ", ec.message()));
  }
  return absl::OkStatus();
}

}  // namespace cleave::model
