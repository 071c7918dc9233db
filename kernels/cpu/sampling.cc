// CPU sampler. Every pass over the vocab is linear: NaN check, argmax, weights, and the
// filters, which find the cut of each best-first prefix by selection (nth_element) rather than
// sorting the vocab. Only the few dozen candidates around a top-p cut are ever sorted.
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
// values above 2, so 2 would be too strict. At 100 a typical logit spread of ~30 shrinks to
// ~0.3, i.e. near-uniform random tokens; anything larger is almost certainly a client bug
// (a percentage, a wrong field) worth reporting rather than honouring.
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
  return p.repetition_penalty != 1.0f || p.frequency_penalty != 0.0f || p.presence_penalty != 0.0f;
}

// A NaN would make every comparison below false and sample garbage; +inf turns the softmax
// into inf - inf = NaN. Both mean the model (or a logits processor) is broken, so the request
// fails instead. -inf is how tokens are masked and is fine.
absl::Status CheckLogits(std::span<const float> logits) {
  for (size_t i = 0; i < logits.size(); ++i) {
    if (std::isnan(logits[i]) || logits[i] == kPosInf) {
      return absl::InvalidArgumentError(
          absl::StrCat("logits row holds ", std::isnan(logits[i]) ? "NaN" : "+inf", " at token ", i,
                       "; refusing to sample from it"));
    }
  }
  return absl::OkStatus();
}

// log(sum(exp(logits))). Each term is an f32 exp (within an ulp), the sum is a double so the
// error does not grow with a 256k vocab: ~1e-7 against a double reference. -inf when every
// token is masked.
double LogSumExp(std::span<const float> logits) {
  float max = kNegInf;
  for (float v : logits) max = std::max(max, v);
  if (max == kNegInf) return -std::numeric_limits<double>::infinity();
  double sum = 0.0;
  for (float v : logits) sum += std::exp(v - max);
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
  float logit;  // after penalties, before temperature (the order is the same)
  int32_t id;
  float weight;  // exp((logit - max) / temperature), unnormalised; the max has weight 1
};

bool CandidateAhead(const Candidate& a, const Candidate& b) {
  return Ahead(a.logit, a.id, b.logit, b.id);
}

// Every filter keeps a best-first prefix of the candidates. Finding the prefix's last member
// by selection on a scratch copy and then dropping whatever ranks after it keeps the
// candidates in id order: the order the draw walks, and hence which token a given uniform
// maps to, never depends on how the standard library's nth_element permutes.
void KeepUpTo(std::vector<Candidate>& cands, const Candidate& last) {
  std::erase_if(cands, [&](const Candidate& c) { return CandidateAhead(last, c); });
}

// top-k in O(n).
void KeepTopK(std::vector<Candidate>& cands, std::vector<Candidate>& scratch, int top_k) {
  if (top_k <= 0 || static_cast<size_t>(top_k) >= cands.size()) return;
  scratch.assign(cands.begin(), cands.end());
  std::nth_element(scratch.begin(), scratch.begin() + (top_k - 1), scratch.end(), CandidateAhead);
  KeepUpTo(cands, scratch[top_k - 1]);
}

// top-p: the smallest best-first prefix whose weight reaches `target` (at least one token), in
// expected O(n) by halving selection instead of the full sort vLLM does: each round settles
// whether the cut lies in the better or the worse half of what is left.
void KeepTopP(std::vector<Candidate>& cands, std::vector<Candidate>& scratch, double target) {
  scratch.assign(cands.begin(), cands.end());
  size_t lo = 0, hi = scratch.size();  // [0, lo) is kept for sure, [hi, n) dropped
  while (hi - lo > 32) {
    const size_t mid = lo + (hi - lo) / 2;
    std::nth_element(scratch.begin() + lo, scratch.begin() + mid, scratch.begin() + hi,
                     CandidateAhead);
    double mass = 0.0;
    for (size_t i = lo; i < mid; ++i) mass += scratch[i].weight;
    if (mass >= target) {
      hi = mid;
    } else {
      target -= mass;
      lo = mid;
    }
  }
  std::sort(scratch.begin() + lo, scratch.begin() + hi, CandidateAhead);
  size_t last = hi - 1;  // rounding left the sum a hair under target: keep all of [lo, hi)
  double cum = 0.0;
  for (size_t i = lo; i < hi; ++i) {
    cum += scratch[i].weight;
    if (cum >= target) {
      last = i;
      break;
    }
  }
  KeepUpTo(cands, scratch[last]);
}

// Inverse CDF over the candidates in id order.
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
    if (it->weight > 0.0f) return it->id;
  }
  return cands.front().id;  // unreachable: the max always has weight 1
}

// Steps 3-5 on penalised logits. Returns -1 when every token is masked.
int32_t SampleFiltered(std::span<const float> logits, SamplerState& state) {
  const SamplingParams& p = state.params();
  // Reused across calls so a 100k+ vocab does not cost fresh multi-MB allocations per token.
  thread_local std::vector<Candidate> cands;
  thread_local std::vector<Candidate> scratch;
  cands.clear();
  for (size_t i = 0; i < logits.size(); ++i) {
    // Masked tokens have zero probability under every filter below, so they are never
    // candidates; this also keeps -inf out of the weight arithmetic.
    if (logits[i] != kNegInf) cands.push_back({logits[i], static_cast<int32_t>(i), 0.0f});
  }
  if (cands.empty()) return -1;
  KeepTopK(cands, scratch, p.top_k);

  float max_logit = kNegInf;
  for (const Candidate& c : cands) max_logit = std::max(max_logit, c.logit);
  // Subtracting the max before dividing keeps tiny temperatures from overflowing: the max maps
  // to exactly 0, everything else to <= 0 (at worst -inf, i.e. weight 0, which is also what a
  // difference past -FLT_MAX rounds to). Single-precision exp, double sums: logits are f32.
  const float temperature = p.temperature;
  double total = 0.0;
  for (Candidate& c : cands) {
    c.weight = std::exp((c.logit - max_logit) / temperature);
    total += c.weight;
  }

  // min-p and top-p both keep a best-first prefix, so min-p can go first: prob < min_p *
  // max_prob is weight < min_p (the max has weight 1), and top-p's target stays relative to
  // the whole top-k set's mass, as vLLM computes it. The same pass drops tokens too light to
  // matter to top-p: if n tokens each weigh under (1 - top_p) * total / n, the rest already
  // reach top_p * total, so the cut falls before all of them (halved for rounding). On a
  // peaked row that leaves a few hundred tokens of a 100k+ vocab for the selection.
  double min_weight = p.min_p;
  if (p.top_p < 1.0f) {
    const double light = 0.5 * (1.0 - p.top_p) * total / static_cast<double>(cands.size());
    min_weight = std::max(min_weight, light);
  }
  if (min_weight > 0.0) {
    std::erase_if(cands, [&](const Candidate& c) { return c.weight < min_weight; });
  }
  if (p.top_p < 1.0f) KeepTopP(cands, scratch, static_cast<double>(p.top_p) * total);
  return Draw(cands, state.NextUniform());
}

}  // namespace

absl::Status ValidateSamplingParams(const SamplingParams& p) {
  // Each check is written as !(in range) so that NaN fails it.
  if (!(p.temperature >= 0.0f && p.temperature <= kMaxTemperature)) {
    return OutOfRange("temperature", p.temperature, "[0, 100]");
  }
  if (p.top_k < -1) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampling parameter top_k must be -1 or 0 (off) or positive, got ", p.top_k));
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
