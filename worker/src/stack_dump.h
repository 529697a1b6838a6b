#ifndef FDBROKER_WORKER_SRC_STACK_DUMP_H_
#define FDBROKER_WORKER_SRC_STACK_DUMP_H_

namespace fdbroker::worker {

// The broker's hung-worker watchdog (--worker_timeout) sends SIGABRT before
// it kills a worker. This installs a SIGABRT handler that writes the
// backtrace of the thread the signal lands on to stderr (fd 2), then
// restores the default action and re-raises it, so the process still ends
// and dumps core where core dumps are enabled (the core has every thread).
// Installed only while SIGABRT has its default action: an application's own
// handler is left alone. Idempotent; any thread.
void InstallStackDumpOnAbort();

}  // namespace fdbroker::worker

#endif  // FDBROKER_WORKER_SRC_STACK_DUMP_H_
