#include "broker/process_metrics.h"

#include <dirent.h>
#include <sys/resource.h>
#include <unistd.h>

#include <fstream>
#include <sstream>
#include <string>

namespace fdbroker {
namespace {

prometheus::MetricFamily Single(const char* name, const char* help,
                                prometheus::MetricType type, double value) {
  prometheus::MetricFamily family;
  family.name = name;
  family.help = help;
  family.type = type;
  prometheus::ClientMetric metric;
  if (type == prometheus::MetricType::Counter) {
    metric.counter.value = value;
  } else {
    metric.gauge.value = value;
  }
  family.metric.push_back(metric);
  return family;
}

double OpenFds() {
  DIR* dir = ::opendir("/proc/self/fd");
  if (dir == nullptr) return 0;
  double n = 0;
  while (dirent* entry = ::readdir(dir)) {
    if (entry->d_name[0] != '.') ++n;
  }
  ::closedir(dir);
  return n - 1;  // The directory stream's own fd.
}

double BootTimeSeconds() {
  std::ifstream stat("/proc/stat");
  std::string key;
  double value = 0;
  while (stat >> key) {
    if (key == "btime") {
      stat >> value;
      return value;
    }
  }
  return 0;
}

}  // namespace

std::vector<prometheus::MetricFamily> ProcessMetrics::Collect() const {
  using prometheus::MetricType;
  std::vector<prometheus::MetricFamily> families;
  families.push_back(Single("process_open_fds",
                            "Number of open file "
                            "descriptors.",
                            MetricType::Gauge, OpenFds()));
  rlimit limit{};
  ::getrlimit(RLIMIT_NOFILE, &limit);
  families.push_back(
      Single("process_max_fds", "Maximum number of open file descriptors.",
             MetricType::Gauge, static_cast<double>(limit.rlim_cur)));

  // /proc/self/stat: fields after "(comm)"; see proc(5).
  std::ifstream stat_file("/proc/self/stat");
  std::string line;
  std::getline(stat_file, line);
  const size_t close = line.rfind(')');
  if (close != std::string::npos) {
    std::istringstream fields(line.substr(close + 2));
    std::string field;
    double utime = 0, stime = 0, start = 0, vsize = 0, rss_pages = 0;
    // Field 3 (state) is the first after ")": index 0 here.
    for (int i = 0; fields >> field; ++i) {
      if (i == 11) utime = std::stod(field);
      if (i == 12) stime = std::stod(field);
      if (i == 19) start = std::stod(field);
      if (i == 20) vsize = std::stod(field);
      if (i == 21) {
        rss_pages = std::stod(field);
        break;
      }
    }
    const double ticks = static_cast<double>(::sysconf(_SC_CLK_TCK));
    const double page = static_cast<double>(::sysconf(_SC_PAGESIZE));
    families.push_back(Single("process_cpu_seconds_total",
                              "Total user and system CPU time spent in "
                              "seconds.",
                              MetricType::Counter, (utime + stime) / ticks));
    families.push_back(Single("process_start_time_seconds",
                              "Start time of the process since unix epoch "
                              "in seconds.",
                              MetricType::Gauge,
                              BootTimeSeconds() + start / ticks));
    families.push_back(Single("process_virtual_memory_bytes",
                              "Virtual memory size in bytes.",
                              MetricType::Gauge, vsize));
    families.push_back(Single("process_resident_memory_bytes",
                              "Resident memory size in bytes.",
                              MetricType::Gauge, rss_pages * page));
  }
  return families;
}

}  // namespace fdbroker
