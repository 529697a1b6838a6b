#include "tests/integration/control_client.h"

#include <chrono>
#include <utility>

#include "gtest/gtest.h"
#include "tests/util/test_util.h"

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

std::vector<v1::Worker> ReadyWorkers(v1::BrokerService::Stub& stub) {
  std::vector<v1::Worker> ready;
  for (v1::Worker& w : ListWorkers(stub)) {
    if (w.state() == v1::WORKER_STATE_READY) ready.push_back(std::move(w));
  }
  return ready;
}

std::set<int> ReadyPids(v1::BrokerService::Stub& stub) {
  std::set<int> pids;
  for (const v1::Worker& w : ReadyWorkers(stub)) pids.insert(w.pid());
  return pids;
}

void StartControlledBroker(std::vector<std::string> flags, size_t workers,
                           std::unique_ptr<BrokerProcess>& broker,
                           std::unique_ptr<v1::BrokerService::Stub>& stub,
                           std::string& metrics) {
  auto started = BrokerProcess::Start(std::move(flags));
  ASSERT_TRUE(started.ok()) << started.status();
  broker = *std::move(started);
  auto ready = ReadKeyValueFile(broker->dir() + "/ready");
  ASSERT_TRUE(ready.ok()) << ready.status();
  metrics = (*ready)["metrics"];
  stub = v1::BrokerService::NewStub(grpc::CreateChannel(
      broker->control_address(), grpc::InsecureChannelCredentials()));
  ASSERT_TRUE(WaitFor([&] { return ReadyWorkers(*stub).size() == workers; },
                      absl::Seconds(30)))
      << broker->process().Output();
}

}  // namespace fdbroker::testing
