#ifndef FDBROKER_BROKER_CONTROL_SERVICE_H_
#define FDBROKER_BROKER_CONTROL_SERVICE_H_

#include <grpcpp/grpcpp.h>

#include <functional>
#include <set>
#include <string>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "broker/broker_operations.h"
#include "broker/event_hub.h"
#include "broker/event_loop.h"
#include "fdbroker/v1/broker.grpc.pb.h"

namespace fdbroker {

// gRPC's Status for an absl::Status (the RPC edge is the only place where
// the two meet).
grpc::Status ToGrpcStatus(const absl::Status& status);

// The BrokerService, on gRPC's callback API: no handler blocks a gRPC
// thread. A handler posts its work to the event loop and returns; the loop
// runs it against BrokerOperations and finishes the RPC from there. Nothing
// here touches data-plane state directly.
class ControlService final : public v1::BrokerService::CallbackService {
 public:
  // Called for every finished RPC (method, status code); used for metrics.
  using RequestObserver =
      std::function<void(absl::string_view method, grpc::StatusCode code)>;

  // Who may call the mutating RPCs (ScaleWorkers, DrainWorker, Drain,
  // Resume, Rebalance, RestartWorkers). With mTLS every caller has a verified
  // certificate; then only subjects listed here ("CN=ops,O=example" as gRPC
  // reports the subject) may mutate. Without it, `check_plaintext_caller` (if
  // set) decides from the peer address gRPC reports; its error is the RPC's
  // answer.
  struct Authorization {
    bool require_admin_subject = false;
    std::set<std::string> admin_subjects;
    std::function<absl::Status(absl::string_view peer)> check_plaintext_caller;
  };

  ControlService(EventLoop& loop, BrokerOperations& operations, EventHub& hub,
                 RequestObserver observer, Authorization authorization);

  grpc::ServerUnaryReactor* ListWorkers(
      grpc::CallbackServerContext* context,
      const v1::ListWorkersRequest* request,
      v1::ListWorkersResponse* response) override;
  grpc::ServerUnaryReactor* GetLoad(grpc::CallbackServerContext* context,
                                    const v1::GetLoadRequest* request,
                                    v1::GetLoadResponse* response) override;
  grpc::ServerUnaryReactor* ScaleWorkers(
      grpc::CallbackServerContext* context,
      const v1::ScaleWorkersRequest* request,
      v1::ScaleWorkersResponse* response) override;
  grpc::ServerUnaryReactor* DrainWorker(
      grpc::CallbackServerContext* context,
      const v1::DrainWorkerRequest* request,
      v1::DrainWorkerResponse* response) override;
  grpc::ServerUnaryReactor* Drain(grpc::CallbackServerContext* context,
                                  const v1::DrainRequest* request,
                                  v1::DrainResponse* response) override;
  grpc::ServerUnaryReactor* Resume(grpc::CallbackServerContext* context,
                                   const v1::ResumeRequest* request,
                                   v1::ResumeResponse* response) override;
  grpc::ServerUnaryReactor* Rebalance(grpc::CallbackServerContext* context,
                                      const v1::RebalanceRequest* request,
                                      v1::RebalanceResponse* response) override;
  grpc::ServerUnaryReactor* RestartWorkers(
      grpc::CallbackServerContext* context,
      const v1::RestartWorkersRequest* request,
      v1::RestartWorkersResponse* response) override;
  grpc::ServerWriteReactor<v1::WatchEventsResponse>* WatchEvents(
      grpc::CallbackServerContext* context,
      const v1::WatchEventsRequest* request) override;

 private:
  enum class Mutating { kNo, kYes };
  // May this caller run the mutating RPC `method`? PermissionDenied if not.
  absl::Status Authorize(grpc::CallbackServerContext* context,
                         absl::string_view method) const;
  // Runs `work` on the loop; it calls the completion it is given exactly
  // once (possibly later) with the RPC's status. Mutating RPCs are audited.
  using Completion = absl::AnyInvocable<void(absl::Status)>;
  grpc::ServerUnaryReactor* Run(grpc::CallbackServerContext* context,
                                absl::string_view method, Mutating mutating,
                                std::string request_text,
                                absl::AnyInvocable<void(Completion)> work);
  // A mutating RPC answered by one synchronous BrokerOperations call.
  template <typename Request, typename Response>
  grpc::ServerUnaryReactor* RunMutation(
      grpc::CallbackServerContext* context, absl::string_view method,
      const Request* request, Response* response,
      absl::StatusOr<Response> (BrokerOperations::*operation)(const Request&));

  EventLoop& loop_;
  BrokerOperations& operations_;
  EventHub& hub_;
  RequestObserver observer_;
  const Authorization authorization_;
};

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_CONTROL_SERVICE_H_
