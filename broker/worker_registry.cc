#include "broker/worker_registry.h"

#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_split.h"

namespace fdbroker {

bool Worker::Serves(const std::string* listener) const {
  auto it = labels.find(kListenersLabel);
  if (it == labels.end()) return true;
  if (listener == nullptr) return false;
  for (absl::string_view name : absl::StrSplit(it->second, ',')) {
    if (absl::StripAsciiWhitespace(name) == *listener) return true;
  }
  return false;
}

Worker& WorkerRegistry::Add(pid_t pid, bool supervised, WorkerState state,
                            absl::Time now, int64_t now_mono_nanos) {
  auto worker = std::make_unique<Worker>();
  worker->id = next_id_++;
  worker->pid = pid;
  worker->supervised = supervised;
  worker->state = state;
  worker->started_at = now;
  worker->started_mono_nanos = now_mono_nanos;
  Worker& ref = *worker;
  workers_.emplace(ref.id, std::move(worker));
  return ref;
}

Worker* WorkerRegistry::Find(uint64_t id) {
  auto it = workers_.find(id);
  return it == workers_.end() ? nullptr : it->second.get();
}

Worker* WorkerRegistry::FindByPid(pid_t pid) {
  for (auto& [id, worker] : workers_) {
    if (worker->pid == pid && worker->state != WorkerState::kExited) {
      return worker.get();
    }
  }
  return nullptr;
}

void WorkerRegistry::Remove(uint64_t id) { workers_.erase(id); }

size_t WorkerRegistry::CountInState(WorkerState state) const {
  size_t n = 0;
  for (const auto& [id, worker] : workers_) n += worker->state == state;
  return n;
}

int64_t WorkerRegistry::TotalActive() const {
  int64_t n = 0;
  for (const auto& [id, worker] : workers_) n += worker->active();
  return n;
}

int64_t WorkerRegistry::TotalUnacked() const {
  int64_t n = 0;
  for (const auto& [id, worker] : workers_) n += worker->unacked;
  return n;
}

}  // namespace fdbroker
