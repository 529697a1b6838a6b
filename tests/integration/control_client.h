#ifndef FDBROKER_TESTS_INTEGRATION_CONTROL_CLIENT_H_
#define FDBROKER_TESTS_INTEGRATION_CONTROL_CLIENT_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "fdbroker/v1/broker.grpc.pb.h"
#include "tests/integration/broker_process.h"

namespace fdbroker::testing {

// Control-plane helpers shared by the integration tests that drive a real
// broker over gRPC.

// A client context with a deadline `timeout` from now.
std::unique_ptr<grpc::ClientContext> RpcContext(
    absl::Duration timeout = absl::Seconds(20));
// ListWorkers (empty, with a test failure, if the call fails).
std::vector<v1::Worker> ListWorkers(v1::BrokerService::Stub& stub);
// The workers in WORKER_STATE_READY, and their pids.
std::vector<v1::Worker> ReadyWorkers(v1::BrokerService::Stub& stub);
std::set<int> ReadyPids(v1::BrokerService::Stub& stub);

// Starts the real broker with `flags` (BrokerProcess::Start), its control
// stub and its metrics address ("host:port"), and waits (30 s) until
// `workers` workers are ready. Fatal test failures on error: call it under
// ASSERT_NO_FATAL_FAILURE.
void StartControlledBroker(std::vector<std::string> flags, size_t workers,
                           std::unique_ptr<BrokerProcess>& broker,
                           std::unique_ptr<v1::BrokerService::Stub>& stub,
                           std::string& metrics);

}  // namespace fdbroker::testing

#endif  // FDBROKER_TESTS_INTEGRATION_CONTROL_CLIENT_H_
