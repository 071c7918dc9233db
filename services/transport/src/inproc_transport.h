// The "inproc://NAME" backend: receivers register in a process-wide registry and senders
// memcpy straight into their store, through the same checks as TCP (layer_checks.h, then
// TransferTracker::BeginLayer / BeginState). For tests and single-process modes.
//
// Unlike TCP, where a refused frame can only be reported to the receiver, SendLayer / SendState
// here also return the refusal (InvalidArgument) to the caller: they run on the caller's thread
// anyway.
// Finish completes synchronously: on_ready / on_failed run, then `done`, on the calling thread.
#pragma once

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cleave/transport/kv_transport.h"
#include "transfer_tracker.h"

namespace cleave::transport {

inline constexpr char kInprocScheme[] = "inproc://";

// `name` is the part after "inproc://"; AlreadyExists if another live receiver holds it.
absl::StatusOr<std::unique_ptr<KvReceiver>> CreateInprocReceiver(const std::string& name,
                                                                 KvBlockStore& store,
                                                                 ReceiverCallbacks callbacks);

// Thread-safe. Unavailable when no receiver is registered under `name`.
absl::Status InprocSendLayer(const std::string& name, const KvGeometry& sender_geometry,
                             const KvLayerSend& layer);
absl::Status InprocSendState(const std::string& name, const KvGeometry& sender_geometry,
                             const KvStateSend& state);
void InprocFinish(const std::string& name, const KvGeometry& sender_geometry, TransferKey key,
                  DoneCallback done);

}  // namespace cleave::transport
