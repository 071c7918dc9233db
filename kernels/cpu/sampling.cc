// CPU sampler. The whole-vocab passes (NaN check, penalties' targets, argmax, candidate
// gathering) are linear; only the candidates that survive top-k / min-p are ever sorted, and
// top-p sorts them lazily, a growing prefix at a time, because real next-token distributions
// reach p = 0.9 within a few hundred tokens of a 100k+ vocab.
#include "cleave/kernels/sampling.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "cleave/common/status.h"

namespace cleave::kernels {
namespace {

// OpenAI caps temperature at 2, vLLM only asks for >= 0. Clients written against vLLM send
// values above 2, so 2 would be too strict; beyond ~100 every row is flat to within float
// resolution, so anything larger is almost certainly a client bug worth reporting.
constexpr float kMaxTemperature = 100.0f;
constexpr int kMaxTopLogprobs = 20;  // OpenAI's limit; vLLM's default max_logprobs is the same.
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();

absl::Status OutOfRange(const char* field, double value, const char* range) {
  return absl::InvalidArgumentError(
      absl::StrCat("sampling parameter ", field, " must be in ", range, ", got ", value));
}

uint64_t SplitMix64(uint64_t& x) {
  uint64_t z = (x += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

uint64_t Rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

bool PenaltiesActive(const SamplingParams& p) {
  return p.repetition_penalty != 1.0f || p.frequency_penalty != 0.0f ||
         p.presence_penalty != 0.0f;
}

// A NaN would make every comparison below false and sample garbage; +inf turns the softmax
// into inf - inf = NaN. Both mean the model (or a logits processor) is broken, so the request
// fails instead. -inf is how tokens are masked and is fine.
absl::Status CheckLogits(std::span<const float> logits) {
  for (size_t i = 0; i < logits.size(); ++i) {
    if (std::isnan(logits[i]) || logits[i] == kPosInf) {
      return absl::InvalidArgumentError(
          absl::StrCat("logits row holds ", std::isnan(logits[i]) ? "NaN" : "+inf",
                       " at token ", i, "; refusing to sample from it"));
    }
  }
  return absl::OkStatus();
}

// log(sum(exp(logits))), accumulated in double so logprobs match a double reference to ~1e-6
// even over a 256k vocab. -inf when every token is masked.
double LogSumExp(std::span<const float> logits) {
  float max = kNegInf;
  for (float v : logits) max = std::max(max, v);
  if (max == kNegInf) return -std::numeric_limits<double>::infinity();
  double sum = 0.0;
  for (float v : logits) sum += std::exp(static_cast<double>(v) - max);
  return max + std::log(sum);
}

// Strict total order used everywhere a tie must go to the lowest id: higher logit first.
bool Ahead(float a_logit, int32_t a_id, float b_logit, int32_t b_id) {
  return a_logit > b_logit || (a_logit == b_logit && a_id < b_id);
}

// The `n` highest raw logits as logprobs, highest first, by a bounded heap: O(vocab log n).
std::vector<TokenLogprob> TopLogprobs(std::span<const float> logits, int n, double log_z) {
  // Entries hold the raw logit until the end; the heap keeps the worst kept entry on top.
  std::vector<TokenLogprob> heap;
  if (n <= 0) return heap;
  heap.reserve(n);
  auto better = [](const TokenLogprob& a, const TokenLogprob& b) {
    return Ahead(a.logprob, a.token, b.logprob, b.token);
  };
  for (size_t i = 0; i < logits.size(); ++i) {
    const TokenLogprob entry{static_cast<int32_t>(i), logits[i]};
    if (heap.size() < static_cast<size_t>(n)) {
      heap.push_back(entry);
      std::push_heap(heap.begin(), heap.end(), better);
    } else if (better(entry, heap.front())) {
      std::pop_heap(heap.begin(), heap.end(), better);
      heap.back() = entry;
      std::push_heap(heap.begin(), heap.end(), better);
    }
  }
  std::sort_heap(heap.begin(), heap.end(), better);  // best first under `better`
  for (TokenLogprob& e : heap) e.logprob = static_cast<float>(e.logprob - log_z);
  return heap;
}

// Greedy: highest logit, ties to the lowest id. -1 when every token is masked.
int32_t Argmax(std::span<const float> logits) {
  int32_t best = -1;
  float best_logit = kNegInf;
  for (size_t i = 0; i < logits.size(); ++i) {
    if (logits[i] > best_logit) {
      best_logit = logits[i];
      best = static_cast<int32_t>(i);
    }
  }
  return best;
}

struct Candidate {
  float logit;    // after penalties, before temperature (the order is the same)
  int32_t id;
  double weight;  // exp((logit - max) / temperature), unnormalised; the max has weight 1
};

bool CandidateAhead(const Candidate& a, const Candidate& b) {
  return Ahead(a.logit, a.id, b.logit, b.id);
}

// Keeps the k best by nth_element (O(n)), then sorts those k so the draw order, and hence the
// token a given uniform maps to, does not depend on the standard library's nth_element.
void KeepTopK(std::vector<Candidate>& cands, int top_k) {
  if (top_k <= 0 || static_cast<size_t>(top_k) >= cands.size()) return;
  std::nth_element(cands.begin(), cands.begin() + top_k, cands.end(), CandidateAhead);
  cands.resize(top_k);
  std::sort(cands.begin(), cands.end(), CandidateAhead);
}

// Keeps the smallest best-first prefix whose weight reaches `target` (at least one token).
// Sorts only as far as needed: a prefix of 64, then 4x more of the rest each round.
void KeepTopP(std::vector<Candidate>& cands, double target) {
  const size_t n = cands.size();
  size_t sorted = 0;
  size_t chunk = 64;
  double cum = 0.0;
  while (sorted < n) {
    const size_t end = std::min(n, sorted + chunk);
    std::partial_sort(cands.begin() + sorted, cands.begin() + end, cands.end(), CandidateAhead);
    for (; sorted < end; ++sorted) {
      cum += cands[sorted].weight;
      if (cum >= target) {
        cands.resize(sorted + 1);
        return;
      }
    }
    chunk *= 4;
  }
  // Rounding left the total a hair under target: every candidate stays.
}

// Inverse CDF over the candidates in their current (deterministic) order.
int32_t Draw(const std::vector<Candidate>& cands, double uniform) {
  double total = 0.0;
  for (const Candidate& c : cands) total += c.weight;
  const double target = uniform * total;
  double cum = 0.0;
  for (const Candidate& c : cands) {
    cum += c.weight;
    if (cum > target) return c.id;
  }
  // uniform * total rounded up to total: the answer is the last token with any mass.
  for (auto it = cands.rbegin(); it != cands.rend(); ++it) {
    if (it->weight > 0.0) return it->id;
  }
  return cands.front().id;  // unreachable: the max always has weight 1
}

// Steps 3-5 on penalised logits. Returns -1 when every token is masked.
int32_t SampleFiltered(std::span<const float> logits, SamplerState& state) {
  const SamplingParams& p = state.params();
  // Reused across calls so a 100k+ vocab does not cost a fresh multi-MB allocation per token.
  thread_local std::vector<Candidate> cands;
  cands.clear();
  for (size_t i = 0; i < logits.size(); ++i) {
    // Masked tokens have zero probability under every filter below, so they are never
    // candidates; this also keeps -inf out of the weight arithmetic.
    if (logits[i] != kNegInf) cands.push_back({logits[i], static_cast<int32_t>(i), 0.0});
  }
  if (cands.empty()) return -1;
  KeepTopK(cands, p.top_k);

  float max_logit = kNegInf;
  for (const Candidate& c : cands) max_logit = std::max(max_logit, c.logit);
  // Subtracting the max before dividing keeps tiny temperatures from overflowing: the max maps
  // to exactly 0, everything else to <= 0 (at worst -inf, i.e. weight 0). Double because
  // logit - max can overflow float when penalties push logits to +-FLT_MAX.
  const double temperature = p.temperature;
  double total = 0.0;
  for (Candidate& c : cands) {
    c.weight = std::exp((static_cast<double>(c.logit) - max_logit) / temperature);
    total += c.weight;
  }

  // min-p before top-p is the same result, cheaper: prob < min_p * max_prob is weight < min_p
  // (the max has weight 1), a suffix of the best-first order that top-p walks, and top-p's
  // target below stays relative to the mass of the whole top-k set, as vLLM computes it.
  // erase_if is stable, so candidates keep their deterministic order.
  if (p.min_p > 0.0f) {
    const double min_weight = p.min_p;
    std::erase_if(cands, [&](const Candidate& c) { return c.weight < min_weight; });
  }
  if (p.top_p < 1.0f) KeepTopP(cands, static_cast<double>(p.top_p) * total);
  return Draw(cands, state.NextUniform());
}

}  // namespace

absl::Status ValidateSamplingParams(const SamplingParams& p) {
  // Each check is written as !(in range) so that NaN fails it.
  if (!(p.temperature >= 0.0f && p.temperature <= kMaxTemperature)) {
    return OutOfRange("temperature", p.temperature, "[0, 100]");
  }
  if (p.top_k < -1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sampling parameter top_k must be -1 or 0 (off) or positive, got ", p.top_k));
  }
  if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) return OutOfRange("top_p", p.top_p, "(0, 1]");
  if (!(p.min_p >= 0.0f && p.min_p <= 1.0f)) return OutOfRange("min_p", p.min_p, "[0, 1]");
  if (!(p.repetition_penalty > 0.0f && std::isfinite(p.repetition_penalty))) {
    return OutOfRange("repetition_penalty", p.repetition_penalty, "(0, inf)");
  }
  if (!(p.presence_penalty >= -2.0f && p.presence_penalty <= 2.0f)) {
    return OutOfRange("presence_penalty", p.presence_penalty, "[-2, 2]");
  }
  if (!(p.frequency_penalty >= -2.0f && p.frequency_penalty <= 2.0f)) {
    return OutOfRange("frequency_penalty", p.frequency_penalty, "[-2, 2]");
  }
  if (p.top_logprobs < 0 || p.top_logprobs > kMaxTopLogprobs) {
    return OutOfRange("top_logprobs", p.top_logprobs, "[0, 20]");
  }
  return absl::OkStatus();
}

SamplerState::SamplerState(const SamplingParams& params, int vocab_size, uint64_t fallback_seed)
    : params_(params),
      vocab_size_(std::max(vocab_size, 0)),
      output_counts_(vocab_size_, 0),
      prompt_seen_(vocab_size_, 0),
      any_seen_(vocab_size_, 0) {
  // splitmix64 spreads even seeds 0, 1, 2... over the whole state and can never produce the
  // all-zero state xoshiro must avoid; both are plain 64-bit integer arithmetic, so a seed
  // gives the same stream on every platform.
  uint64_t x = params.has_seed ? params.seed : fallback_seed;
  for (uint64_t& word : rng_) word = SplitMix64(x);
}

void SamplerState::ObservePrompt(std::span<const int32_t> prompt_ids) {
  for (int32_t id : prompt_ids) {
    // Out-of-vocab ids (a tokenizer / model mismatch) are validated elsewhere; here they have
    // no logit to penalise, so they are skipped rather than written out of bounds.
    if (!InVocab(id)) continue;
    prompt_seen_[id] = 1;
    if (!any_seen_[id]) {
      any_seen_[id] = 1;
      seen_tokens_.push_back(id);
    }
  }
}

void SamplerState::ObserveOutput(int32_t token) {
  if (!InVocab(token)) return;
  // Saturate rather than wrap: a wrapped count would flip the frequency penalty's sign.
  if (output_counts_[token] != std::numeric_limits<uint32_t>::max()) ++output_counts_[token];
  if (!any_seen_[token]) {
    any_seen_[token] = 1;
    seen_tokens_.push_back(token);
  }
}

double SamplerState::NextUniform() {
  // xoshiro256** (Blackman & Vigna 2018).
  const uint64_t result = Rotl(rng_[1] * 5, 7) * 9;
  const uint64_t t = rng_[1] << 17;
  rng_[2] ^= rng_[0];
  rng_[3] ^= rng_[1];
  rng_[1] ^= rng_[2];
  rng_[0] ^= rng_[3];
  rng_[2] ^= t;
  rng_[3] = Rotl(rng_[3], 45);
  // The top 53 bits, scaled exactly: uniform on the doubles k * 2^-53, never 1.
  return static_cast<double>(result >> 11) * 0x1.0p-53;
}

absl::Status ApplyPenalties(std::span<float> logits, const SamplerState& state) {
  if (logits.size() != static_cast<size_t>(state.vocab_size())) {
    return absl::InvalidArgumentError(absl::StrCat("logits row has ", logits.size(),
                                                   " entries, vocab_size is ", state.vocab_size()));
  }
  const SamplingParams& p = state.params();
  if (!PenaltiesActive(p)) return absl::OkStatus();
  const float rep = p.repetition_penalty;
  for (int32_t t : state.seen_tokens()) {
    float v = logits[t];
    // HF / CTRL: dividing a negative logit would raise it, so negatives are multiplied.
    if (rep != 1.0f) v = v > 0.0f ? v / rep : v * rep;
    const uint32_t count = state.output_count(t);
    v -= p.frequency_penalty * static_cast<float>(count);
    if (count > 0) v -= p.presence_penalty;
    // A tiny repetition_penalty can push a large logit past FLT_MAX; +inf would turn the
    // softmax into NaN, and the token is already the clear winner at FLT_MAX.
    if (v == kPosInf) v = std::numeric_limits<float>::max();
    logits[t] = v;
  }
  return absl::OkStatus();
}

absl::StatusOr<SampleResult> Sample(std::span<float> logits, SamplerState& state) {
  const SamplingParams& p = state.params();
  // Re-checked per token (a handful of compares) so a request built without validation fails
  // alone instead of indexing out of range.
  CLEAVE_RETURN_IF_ERROR(ValidateSamplingParams(p));
  const int vocab = state.vocab_size();
  if (vocab <= 0 || logits.size() != static_cast<size_t>(vocab)) {
    return absl::InvalidArgumentError(
        absl::StrCat("logits row has ", logits.size(), " entries, vocab_size is ", vocab));
  }
  CLEAVE_RETURN_IF_ERROR(CheckLogits(logits));

  SampleResult result;
  const bool want_logprobs = p.logprobs || p.top_logprobs > 0;
  double log_z = 0.0;
  // Raw logits of the tokens the penalties will overwrite: the chosen token's logprob is
  // reported on the raw row, and only these entries change before the draw.
  std::vector<std::pair<int32_t, float>> raw_seen;
  if (want_logprobs) {
    log_z = LogSumExp(logits);
    result.top = TopLogprobs(logits, std::min(p.top_logprobs, vocab), log_z);
    if (PenaltiesActive(p)) {
      raw_seen.reserve(state.seen_tokens().size());
      for (int32_t t : state.seen_tokens()) raw_seen.emplace_back(t, logits[t]);
    }
  }

  CLEAVE_RETURN_IF_ERROR(ApplyPenalties(logits, state));
  const int32_t token = p.temperature == 0.0f ? Argmax(logits) : SampleFiltered(logits, state);
  if (token < 0) {
    return absl::InvalidArgumentError("every logit in the row is -inf; no token can be sampled");
  }
  result.token = token;

  if (want_logprobs) {
    float raw = logits[token];
    for (const auto& [id, value] : raw_seen) {
      if (id == token) raw = value;
    }
    result.logprob = static_cast<float>(raw - log_z);
  }
  return result;
}

}  // namespace cleave::kernels
