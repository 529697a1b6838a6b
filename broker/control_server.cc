#include "broker/control_server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/resource_quota.h>

#include <chrono>
#include <fstream>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "grpc/health/v1/health.pb.h"
#include "wire/socket_address.h"

namespace fdbroker {
namespace {

absl::StatusOr<std::string> ReadPem(const std::string& path,
                                    absl::string_view flag) {
  std::ifstream in(path);
  if (!in) {
    return absl::InvalidArgumentError(
        absl::StrCat(flag, ": cannot read ", path));
  }
  std::stringstream text;
  text << in.rdbuf();
  if (text.str().find("-----BEGIN ") == std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat(flag, ": ", path, " is not a PEM file"));
  }
  return text.str();
}

}  // namespace

bool IsLoopbackAddress(const std::string& host_port) {
  if (absl::StartsWith(host_port, "localhost:")) return true;
  absl::StatusOr<wire::SocketAddress> address =
      wire::SocketAddress::Parse(host_port);
  if (!address.ok()) return false;
  if (address->family() == AF_INET) {
    const auto* sin = reinterpret_cast<const sockaddr_in*>(&address->storage);
    return (ntohl(sin->sin_addr.s_addr) >> 24) == 127;
  }
  const auto* sin6 = reinterpret_cast<const sockaddr_in6*>(&address->storage);
  return IN6_IS_ADDR_LOOPBACK(&sin6->sin6_addr);
}

absl::StatusOr<std::unique_ptr<ControlServer>> ControlServer::Start(
    const Options& options, ControlService& service) {
  std::unique_ptr<ControlServer> server(new ControlServer());
  std::shared_ptr<grpc::ServerCredentials> credentials;
  if (!options.tls_cert_file.empty() || !options.tls_key_file.empty()) {
    if (options.tls_cert_file.empty() || options.tls_key_file.empty()) {
      return absl::InvalidArgumentError(
          "--tls_cert and --tls_key must be given together");
    }
    absl::StatusOr<std::string> cert =
        ReadPem(options.tls_cert_file, "--tls_cert");
    if (!cert.ok()) return cert.status();
    absl::StatusOr<std::string> key =
        ReadPem(options.tls_key_file, "--tls_key");
    if (!key.ok()) return key.status();
    grpc::SslServerCredentialsOptions ssl;
    ssl.pem_key_cert_pairs.push_back({*key, *cert});
    if (!options.tls_client_ca_file.empty()) {
      absl::StatusOr<std::string> ca =
          ReadPem(options.tls_client_ca_file, "--tls_client_ca");
      if (!ca.ok()) return ca.status();
      ssl.pem_root_certs = *ca;
      ssl.client_certificate_request =
          GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
    }
    credentials = grpc::SslServerCredentials(ssl);
    server->tls_ = true;
  } else {
    if (!options.tls_client_ca_file.empty()) {
      return absl::InvalidArgumentError(
          "--tls_client_ca needs --tls_cert and --tls_key");
    }
    if (!IsLoopbackAddress(options.address) && !options.allow_insecure) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--control=", options.address,
          " is not a loopback address: give --tls_cert/--tls_key, or "
          "--allow_insecure_control to serve it in plaintext anyway"));
    }
    credentials = grpc::InsecureServerCredentials();
  }

  // gRPC's health service registers no descriptors; touching ours links
  // them in, so reflection can describe grpc.health.v1.Health.
  (void)grpc::health::v1::HealthCheckRequest::descriptor();
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  // Bounded, so that no client can make the control plane hold unbounded
  // state: streams per connection (gRPC's default is unlimited) and the
  // memory of every call and buffer together. WatchEvents streams are
  // bounded broker-wide too (EventHub::kMaxSubscribers).
  builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS,
                             kMaxConcurrentStreams);
  grpc::ResourceQuota quota("fdbroker-control");
  quota.Resize(kMemoryQuotaBytes);
  builder.SetResourceQuota(quota);
  int port = 0;
  builder.AddListeningPort(options.address, credentials, &port);
  builder.RegisterService(&service);
  server->server_ = builder.BuildAndStart();
  if (server->server_ == nullptr || port == 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve the control plane on ", options.address,
                     " (address in use or invalid)"));
  }
  // The address as asked for, with the port the server got.
  absl::StatusOr<wire::HostPort> asked = wire::HostPort::Parse(options.address);
  server->port_ = static_cast<uint16_t>(port);
  server->address_ =
      wire::HostPort{asked.ok() ? asked->host : "", static_cast<uint16_t>(port)}
          .ToString();
  server->SetServing(false);
  return server;
}

ControlServer::~ControlServer() { Shutdown(); }

void ControlServer::SetServing(bool serving) {
  absl::MutexLock lock(&health_mu_);
  if (stopping_ || server_ == nullptr) return;
  grpc::HealthCheckServiceInterface* health = server_->GetHealthCheckService();
  if (health == nullptr) return;
  health->SetServingStatus(serving);
  health->SetServingStatus("fdbroker.v1.BrokerService", serving);
}

void ControlServer::Shutdown() {
  absl::MutexLock lock(&shutdown_mu_);
  if (shut_down_ || server_ == nullptr) return;  // Null: never started.
  shut_down_ = true;
  {
    absl::MutexLock health(&health_mu_);
    stopping_ = true;
  }
  server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  server_->Wait();
}

}  // namespace fdbroker
