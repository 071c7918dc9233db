// The HF-transformers goldens of tests/data/golden (tools/make_goldens.py): each model directory's
// golden.json holds prompts with their last-position logits and greedy continuations. Shared by
// the CPU golden test and the GPU one (tests/gpu/model_device_test.cc).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace cleave::model::golden {

namespace fs = std::filesystem;
inline const fs::path kGoldenDir = "tests/data/golden";

struct GoldenPrompt {
  std::vector<int32_t> prompt_ids;
  std::vector<float> last_logits;
  std::vector<int32_t> greedy_tokens;
};

inline std::vector<GoldenPrompt> ReadGolden(const fs::path& file) {
  std::ifstream in(file);
  nlohmann::json j = nlohmann::json::parse(in);
  std::vector<GoldenPrompt> out;
  for (const auto& p : j.at("prompts")) {
    out.push_back({p.at("prompt_ids").get<std::vector<int32_t>>(),
                   p.at("last_logits").get<std::vector<float>>(),
                   p.at("greedy_tokens").get<std::vector<int32_t>>()});
  }
  return out;
}

// Elementwise |got - want| <= rtol * |want| + atol; reports the worst element.
inline void ExpectLogitsClose(const std::vector<float>& got, const std::vector<float>& want, double rtol,
                       double atol, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double max_abs = 0, max_excess = 0;
  size_t worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    // A NaN or infinite logit is as far off as it gets.
    const double diff = std::isfinite(got[i]) ? std::fabs(static_cast<double>(got[i]) - want[i]) : INFINITY;
    max_abs = std::max(max_abs, diff);
    const double excess = diff - (rtol * std::fabs(want[i]) + atol);
    if (excess > max_excess) {
      max_excess = excess;
      worst = i;
    }
  }
  std::printf("%s: max abs err %.3g\n", what.c_str(), max_abs);
  EXPECT_LE(max_excess, 0.0) << what << ": logit " << worst << " got " << got[worst] << " want "
                             << want[worst];
}

inline std::vector<fs::path> GoldenModelDirs() {
  std::vector<fs::path> dirs;
  if (!fs::exists(kGoldenDir)) return dirs;
  for (const auto& e : fs::directory_iterator(kGoldenDir)) {
    if (e.is_directory() && fs::exists(e.path() / "golden.json")) dirs.push_back(e.path());
  }
  std::sort(dirs.begin(), dirs.end());
  return dirs;
}

}  // namespace cleave::model::golden
