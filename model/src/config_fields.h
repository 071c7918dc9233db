// Internal to the model library: typed, range-checked access to config.json fields, shared by
// the parsers of each model family (config.cc, config_families.cc).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "cleave/model/config.h"
#include "nlohmann/json.hpp"

namespace cleave::model::internal {

using json = nlohmann::json;

inline constexpr int kIntMax = std::numeric_limits<int>::max();

// Integers only: 4096.0 is a float in JSON and transformers would keep it a float, which
// breaks its own shape arithmetic, so it is an error here too.
inline absl::StatusOr<int> CheckIntValue(const json& v, const std::string& name, int min) {
  if (!v.is_number_integer()) {
    return absl::InvalidArgumentError(
        absl::StrCat("field '", name, "' must be an integer, got ", v.type_name()));
  }
  // Unsigned values above INT64_MAX would wrap in get<int64_t>(); anything past int is too big.
  if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(kIntMax)) {
    return absl::InvalidArgumentError(
        absl::StrCat("field '", name, "' is too large: ", v.get<uint64_t>()));
  }
  const int64_t x = v.get<int64_t>();
  if (x < min || x > kIntMax) {
    return absl::InvalidArgumentError(
        absl::StrCat("field '", name, "' must be in [", min, ", ", kIntMax, "], got ", x));
  }
  return static_cast<int>(x);
}

// Typed, range-checked access to one JSON object's fields. Errors name the field with its path
// (`rope_scaling.factor`) so a user can find it in the file. "Absent" and "null" are the same
// to the optional getters, as they are to transformers, except where noted at the call site.
class Fields {
 public:
  Fields(const json& obj, std::string prefix) : obj_(obj), prefix_(std::move(prefix)) {}

  bool Has(const char* key) const { return obj_.contains(key) && !obj_.at(key).is_null(); }
  bool Present(const char* key) const { return obj_.contains(key); }
  const json& at(const char* key) const { return obj_.at(key); }
  std::string Name(const char* key) const { return prefix_ + key; }

  absl::Status Missing(const char* key) const {
    return absl::InvalidArgumentError(absl::StrCat("field '", Name(key), "' is missing"));
  }
  absl::Status WrongType(const char* key, const char* want) const {
    return absl::InvalidArgumentError(absl::StrCat("field '", Name(key), "' must be ", want,
                                                   ", got ", obj_.at(key).type_name()));
  }

  absl::StatusOr<int> RequiredInt(const char* key, int min) const {
    if (!obj_.contains(key)) return Missing(key);
    return CheckInt(key, min);
  }
  absl::StatusOr<int> OptionalInt(const char* key, int fallback, int min) const {
    if (!Has(key)) return fallback;
    return CheckInt(key, min);
  }
  absl::StatusOr<double> RequiredNumber(const char* key) const {
    if (!Has(key)) return Missing(key);
    return CheckPositiveNumber(key);
  }
  absl::StatusOr<double> OptionalNumber(const char* key, double fallback) const {
    if (!Has(key)) return fallback;
    return CheckPositiveNumber(key);
  }
  absl::StatusOr<bool> OptionalBool(const char* key, bool fallback) const {
    if (!Has(key)) return fallback;
    if (!obj_.at(key).is_boolean()) return WrongType(key, "a boolean");
    return obj_.at(key).get<bool>();
  }
  absl::StatusOr<std::optional<std::string>> OptionalString(const char* key) const {
    if (!Has(key)) return std::optional<std::string>();
    if (!obj_.at(key).is_string()) return WrongType(key, "a string");
    return std::optional<std::string>(obj_.at(key).get<std::string>());
  }
  absl::StatusOr<std::optional<const json*>> OptionalObject(const char* key) const {
    if (!Has(key)) return std::optional<const json*>();
    if (!obj_.at(key).is_object()) return WrongType(key, "an object");
    return std::optional<const json*>(&obj_.at(key));
  }

  absl::StatusOr<int> CheckInt(const char* key, int min) const {
    return CheckIntValue(obj_.at(key), Name(key), min);
  }

 private:
  absl::StatusOr<double> CheckPositiveNumber(const char* key) const {
    const json& v = obj_.at(key);
    if (!v.is_number()) return WrongType(key, "a number");
    const double x = v.get<double>();
    if (!std::isfinite(x) || x <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("field '", Name(key), "' must be a positive number, got ", x));
    }
    return x;
  }

  const json& obj_;
  std::string prefix_;
};

// The per-family parts of ParseModelConfig, in config_families.cc. ParseLayerKinds runs after
// the attention shape is known and fills layer_mixer / layer_ffn and the MoE and Mamba sections;
// ParseMambaModel parses a whole MambaForCausalLM config except its token ids and dtype.
absl::Status ParseLayerKinds(const Fields& f, ModelConfig& c);
absl::Status ParseMambaModel(const Fields& f, ModelConfig& c);

}  // namespace cleave::model::internal
