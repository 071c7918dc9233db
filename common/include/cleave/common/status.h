// Status helpers shared by every module. Everything that can fail returns absl::Status or
// absl::StatusOr<T>; these macros propagate them without boilerplate.
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define CLEAVE_CONCAT_INNER_(a, b) a##b
#define CLEAVE_CONCAT_(a, b) CLEAVE_CONCAT_INNER_(a, b)

// Returns from the enclosing function if `expr` (an absl::Status) is not OK.
#define CLEAVE_RETURN_IF_ERROR(expr)                   \
  do {                                                 \
    ::absl::Status cleave_status_ = (expr);            \
    if (!cleave_status_.ok()) return cleave_status_;   \
  } while (0)

// `CLEAVE_ASSIGN_OR_RETURN(auto x, MakeX());` — binds the value or returns the error.
#define CLEAVE_ASSIGN_OR_RETURN(lhs, expr) \
  CLEAVE_ASSIGN_OR_RETURN_IMPL_(CLEAVE_CONCAT_(cleave_statusor_, __LINE__), lhs, expr)
#define CLEAVE_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                  \
  if (!tmp.ok()) return tmp.status();                 \
  lhs = std::move(tmp).value()

// Argument checks in host wrappers: fail with InvalidArgument naming the condition.
#define CLEAVE_CHECK_ARG(cond, msg)                                              \
  do {                                                                           \
    if (!(cond)) return ::absl::InvalidArgumentError(std::string(msg) + " (" #cond ")"); \
  } while (0)
