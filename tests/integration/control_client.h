#ifndef FDBROKER_TESTS_INTEGRATION_CONTROL_CLIENT_H_
#define FDBROKER_TESTS_INTEGRATION_CONTROL_CLIENT_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <set>
#include <vector>

#include "absl/time/time.h"
#include "fdbroker/v1/broker.grpc.pb.h"

namespace fdbroker::testing {

// Control-plane helpers shared by the integration tests that drive a real
// broker over gRPC.

// A client context with a deadline `timeout` from now.
std::unique_ptr<grpc::ClientContext> RpcContext(
    absl::Duration timeout = absl::Seconds(20));
// ListWorkers (empty, with a test failure, if the call fails).
std::vector<v1::Worker> ListWorkers(v1::BrokerService::Stub& stub);
// Pids of the workers in WORKER_STATE_READY.
std::set<int> ReadyPids(v1::BrokerService::Stub& stub);

}  // namespace fdbroker::testing

#endif  // FDBROKER_TESTS_INTEGRATION_CONTROL_CLIENT_H_
