#include "tests/integration/control_client.h"

#include <chrono>

#include "gtest/gtest.h"

namespace fdbroker::testing {

std::unique_ptr<grpc::ClientContext> RpcContext(absl::Duration timeout) {
  auto context = std::make_unique<grpc::ClientContext>();
  context->set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  return context;
}

std::vector<v1::Worker> ListWorkers(v1::BrokerService::Stub& stub) {
  v1::ListWorkersResponse response;
  grpc::Status status =
      stub.ListWorkers(RpcContext().get(), v1::ListWorkersRequest(), &response);
  EXPECT_TRUE(status.ok()) << status.error_message();
  return {response.workers().begin(), response.workers().end()};
}

std::set<int> ReadyPids(v1::BrokerService::Stub& stub) {
  std::set<int> pids;
  for (const v1::Worker& w : ListWorkers(stub)) {
    if (w.state() == v1::WORKER_STATE_READY) pids.insert(w.pid());
  }
  return pids;
}

}  // namespace fdbroker::testing
