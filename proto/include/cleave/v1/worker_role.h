// The name of a worker role as operators see it: the `role` label of every metric, the role in
// /debug/kv and /debug/stats, the `--role` value and `cleave serve`'s process names. One mapping
// for every process, so a dashboard's role="attention" means the same thing everywhere.
#pragma once

#include "cleave/v1/control.pb.h"

namespace cleave::v1 {

inline const char* WorkerRoleName(WorkerRole role) {
  switch (role) {
    case WORKER_ROLE_PREFILL: return "prefill";
    case WORKER_ROLE_DECODE: return "decode";
    case WORKER_ROLE_COLOCATED: return "colocated";
    case WORKER_ROLE_ATTENTION: return "attention";
    case WORKER_ROLE_FFN: return "ffn";
    default: return "unspecified";  // registration refuses it: never a live worker's
  }
}

}  // namespace cleave::v1
