#include "broker/control_service.h"

#include <deque>
#include <memory>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "spdlog/spdlog.h"

namespace fdbroker {
namespace {

// Who called, for the audit log: the client certificate's subject with
// mTLS, else the peer address.
std::string Caller(grpc::CallbackServerContext* context) {
  std::shared_ptr<const grpc::AuthContext> auth = context->auth_context();
  if (auth != nullptr) {
    for (const grpc::string_ref& subject :
         auth->FindPropertyValues(GRPC_X509_SUBJECT_PROPERTY_NAME)) {
      return std::string(subject.data(), subject.size());
    }
  }
  return context->peer();
}

// One WatchEvents stream. Events are queued (bounded) and written one at a
// time; a client too slow to keep up loses the stream, not the broker.
class EventStream final
    : public grpc::ServerWriteReactor<v1::WatchEventsResponse> {
 public:
  static constexpr size_t kMaxQueued = 4096;

  explicit EventStream(EventHub& hub) : hub_(hub) {
    absl::StatusOr<uint64_t> id = hub_.Subscribe(
        [this](const v1::WatchEventsResponse& event) { Push(event); },
        [this] { End(grpc::Status::OK); });
    if (!id.ok()) {
      Finish(ToGrpcStatus(id.status()));
      return;
    }
    absl::MutexLock lock(&mu_);
    subscription_ = *id;
    // Initial metadata tells the client that it is subscribed: every event
    // from now on reaches it (clients may WaitForInitialMetadata()).
    StartSendInitialMetadata();
  }

  void OnWriteDone(bool ok) override {
    absl::MutexLock lock(&mu_);
    writing_ = false;
    if (!ok) return;  // Cancelled: OnDone follows.
    if (!queue_.empty()) queue_.pop_front();
    WriteNextLocked();
  }

  void OnCancel() override { End(grpc::Status::CANCELLED); }

  void OnDone() override {
    uint64_t id;
    {
      absl::MutexLock lock(&mu_);
      id = subscription_;
    }
    if (id != 0) hub_.Unsubscribe(id);
    delete this;
  }

 private:
  void Push(const v1::WatchEventsResponse& event) {
    absl::MutexLock lock(&mu_);
    if (finished_) return;
    if (queue_.size() >= kMaxQueued) {
      FinishLocked(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                                "event stream fell too far behind"));
      return;
    }
    queue_.push_back(event);
    WriteNextLocked();
  }

  void End(const grpc::Status& status) {
    absl::MutexLock lock(&mu_);
    FinishLocked(status);
  }

  void WriteNextLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (writing_ || finished_ || queue_.empty()) return;
    writing_ = true;
    StartWrite(&queue_.front());
  }

  void FinishLocked(const grpc::Status& status)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (finished_) return;
    finished_ = true;
    Finish(status);
  }

  EventHub& hub_;
  absl::Mutex mu_;
  uint64_t subscription_ ABSL_GUARDED_BY(mu_) = 0;
  std::deque<v1::WatchEventsResponse> queue_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()),
                      std::string(status.message()));
}

ControlService::ControlService(EventLoop& loop, BrokerOperations& operations,
                               EventHub& hub, RequestObserver observer,
                               Authorization authorization)
    : loop_(loop),
      operations_(operations),
      hub_(hub),
      observer_(std::move(observer)),
      authorization_(std::move(authorization)) {}

absl::Status ControlService::Authorize(grpc::CallbackServerContext* context,
                                       absl::string_view method) const {
  if (authorization_.require_admin_subject) {
    if (authorization_.admin_subjects.count(Caller(context)) != 0) {
      return absl::OkStatus();
    }
    return absl::PermissionDeniedError(
        absl::StrCat("\"", Caller(context), "\" may not call ", method,
                     ": its certificate subject is not in --admin_subjects"));
  }
  if (!authorization_.check_plaintext_caller) return absl::OkStatus();
  absl::Status allowed = authorization_.check_plaintext_caller(context->peer());
  if (allowed.ok()) return allowed;
  return absl::PermissionDeniedError(
      absl::StrCat(method, ": ", allowed.message()));
}

grpc::ServerUnaryReactor* ControlService::Run(
    grpc::CallbackServerContext* context, absl::string_view method,
    Mutating mutating, std::string request_text,
    absl::AnyInvocable<void(Completion)> work) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  std::string caller = mutating == Mutating::kYes ? Caller(context) : "";
  Completion finish = [this, reactor, method = std::string(method), mutating,
                       caller = std::move(caller),
                       request_text =
                           std::move(request_text)](absl::Status status) {
    if (mutating == Mutating::kYes) {
      spdlog::info("audit: caller=\"{}\" method={} request={{{}}} result={}",
                   caller, method, request_text,
                   status.ok() ? "OK" : status.ToString());
    }
    if (observer_) {
      observer_(method, static_cast<grpc::StatusCode>(status.code()));
    }
    reactor->Finish(ToGrpcStatus(status));
  };
  if (mutating == Mutating::kYes) {
    absl::Status allowed = Authorize(context, method);
    if (!allowed.ok()) {
      finish(std::move(allowed));
      return reactor;
    }
  }
  auto shared_finish = std::make_shared<Completion>(std::move(finish));
  if (!loop_.Post([work = std::move(work), shared_finish]() mutable {
        work(std::move(*shared_finish));
      })) {
    (*shared_finish)(absl::UnavailableError("the broker is shutting down"));
  }
  return reactor;
}

template <typename Request, typename Response>
grpc::ServerUnaryReactor* ControlService::RunMutation(
    grpc::CallbackServerContext* context, absl::string_view method,
    const Request* request, Response* response,
    absl::StatusOr<Response> (BrokerOperations::*operation)(const Request&)) {
  return Run(context, method, Mutating::kYes, request->ShortDebugString(),
             [this, request, response, operation](Completion done) {
               absl::StatusOr<Response> result =
                   (operations_.*operation)(*request);
               if (result.ok()) *response = *std::move(result);
               done(result.status());
             });
}

grpc::ServerUnaryReactor* ControlService::ListWorkers(
    grpc::CallbackServerContext* context, const v1::ListWorkersRequest*,
    v1::ListWorkersResponse* response) {
  return Run(context, "ListWorkers", Mutating::kNo, "",
             [this, response](Completion done) {
               *response = operations_.ListWorkers();
               done(absl::OkStatus());
             });
}

grpc::ServerUnaryReactor* ControlService::GetLoad(
    grpc::CallbackServerContext* context, const v1::GetLoadRequest*,
    v1::GetLoadResponse* response) {
  return Run(context, "GetLoad", Mutating::kNo, "",
             [this, response](Completion done) {
               *response = operations_.GetLoad();
               done(absl::OkStatus());
             });
}

grpc::ServerUnaryReactor* ControlService::ScaleWorkers(
    grpc::CallbackServerContext* context,
    const v1::ScaleWorkersRequest* request,
    v1::ScaleWorkersResponse* response) {
  return RunMutation(context, "ScaleWorkers", request, response,
                     &BrokerOperations::ScaleWorkers);
}

grpc::ServerUnaryReactor* ControlService::DrainWorker(
    grpc::CallbackServerContext* context, const v1::DrainWorkerRequest* request,
    v1::DrainWorkerResponse* response) {
  return Run(
      context, "DrainWorker", Mutating::kYes, request->ShortDebugString(),
      [this, request, response](Completion done) {
        operations_.DrainWorker(
            *request, [response, done = std::move(done)](
                          absl::StatusOr<v1::DrainWorkerResponse> r) mutable {
              if (r.ok()) *response = *std::move(r);
              done(r.status());
            });
      });
}

grpc::ServerUnaryReactor* ControlService::Drain(
    grpc::CallbackServerContext* context, const v1::DrainRequest* request,
    v1::DrainResponse* response) {
  return RunMutation(context, "Drain", request, response,
                     &BrokerOperations::Drain);
}

grpc::ServerUnaryReactor* ControlService::Resume(
    grpc::CallbackServerContext* context, const v1::ResumeRequest* request,
    v1::ResumeResponse* response) {
  return RunMutation(context, "Resume", request, response,
                     &BrokerOperations::Resume);
}

grpc::ServerUnaryReactor* ControlService::Rebalance(
    grpc::CallbackServerContext* context, const v1::RebalanceRequest* request,
    v1::RebalanceResponse* response) {
  return RunMutation(context, "Rebalance", request, response,
                     &BrokerOperations::Rebalance);
}

grpc::ServerUnaryReactor* ControlService::RestartWorkers(
    grpc::CallbackServerContext* context,
    const v1::RestartWorkersRequest* request,
    v1::RestartWorkersResponse* response) {
  return RunMutation(context, "RestartWorkers", request, response,
                     &BrokerOperations::RestartWorkers);
}

grpc::ServerWriteReactor<v1::WatchEventsResponse>* ControlService::WatchEvents(
    grpc::CallbackServerContext* context, const v1::WatchEventsRequest*) {
  if (observer_) observer_("WatchEvents", grpc::StatusCode::OK);
  return new EventStream(hub_);
}

}  // namespace fdbroker
