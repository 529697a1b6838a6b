/* What one sleep and wake-up costs on this machine: two processes pass one
 * byte back and forth over a SOCK_SEQPACKET socketpair (the broker's channel
 * type), each blocking in epoll_wait between turns, as the broker and a
 * worker do. Prints the CPU time each side spends per round trip and the wall
 * time of one round trip.
 *
 *   wake_cost ROUND_TRIPS same|cross|free
 *     same   both processes on the first CPU they may use (a wake-up is a
 *            context switch)
 *     cross  the first and the second CPU (a wake-up is an inter-processor
 *            interrupt and often a wake from idle)
 *     free   wherever the scheduler puts them
 * Output: one line, "parent_cpu_us=X child_cpu_us=Y wall_us=Z". */
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double cpu_seconds(void) {
  struct rusage r;
  getrusage(RUSAGE_SELF, &r);
  return (double)(r.ru_utime.tv_sec + r.ru_stime.tv_sec) +
         (double)(r.ru_utime.tv_usec + r.ru_stime.tv_usec) * 1e-6;
}

static double now_seconds(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* The index-th CPU (0 or 1) this process may run on, or -1. */
static int allowed_cpu(int index) {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return -1;
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (CPU_ISSET(cpu, &set) && index-- == 0) return cpu;
  }
  return -1;
}

static void pin(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  if (sched_setaffinity(0, sizeof(set), &set) != 0) {
    perror("sched_setaffinity");
    exit(1);
  }
}

/* Waits for the peer's byte. */
static void await(int epoll_fd, int fd) {
  struct epoll_event event;
  char byte;
  while (epoll_wait(epoll_fd, &event, 1, -1) != 1) {
  }
  if (read(fd, &byte, 1) != 1) {
    perror("read");
    exit(1);
  }
}

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: wake_cost ROUND_TRIPS same|cross|free\n");
    return 2;
  }
  const long n = atol(argv[1]);
  const char* mode = argv[2];
  if (n <= 0 ||
      (strcmp(mode, "same") && strcmp(mode, "cross") && strcmp(mode, "free"))) {
    fprintf(stderr, "wake_cost: bad arguments\n");
    return 2;
  }
  const int first = allowed_cpu(0), second = allowed_cpu(1);
  if ((strcmp(mode, "same") == 0 && first < 0) ||
      (strcmp(mode, "cross") == 0 && second < 0)) {
    fprintf(stderr, "wake_cost: too few CPUs in the affinity mask\n");
    return 1;
  }
  int pair[2], results[2];
  if (socketpair(AF_UNIX, SOCK_SEQPACKET, 0, pair) != 0 || pipe(results) != 0) {
    perror("socketpair");
    return 1;
  }
  const pid_t child = fork();
  if (child < 0) {
    perror("fork");
    return 1;
  }
  const int is_child = child == 0;
  if (strcmp(mode, "same") == 0) pin(first);
  if (strcmp(mode, "cross") == 0) pin(is_child ? second : first);
  const int fd = pair[is_child];
  const int epoll_fd = epoll_create1(0);
  struct epoll_event event = {.events = EPOLLIN};
  epoll_ctl(epoll_fd, EPOLL_CTL_ADD, fd, &event);
  const char byte = 1;
  const double cpu0 = cpu_seconds(), wall0 = now_seconds();
  for (long i = 0; i < n; ++i) {
    if (!is_child && write(fd, &byte, 1) != 1) return 1;
    await(epoll_fd, fd);
    if (is_child && write(fd, &byte, 1) != 1) return 1;
  }
  const double cpu_us = (cpu_seconds() - cpu0) / (double)n * 1e6;
  const double wall_us = (now_seconds() - wall0) / (double)n * 1e6;
  if (is_child) {
    if (write(results[1], &cpu_us, sizeof(cpu_us)) != sizeof(cpu_us)) return 1;
    return 0;
  }
  double child_cpu_us = 0;
  if (read(results[0], &child_cpu_us, sizeof(child_cpu_us)) !=
      sizeof(child_cpu_us)) {
    fprintf(stderr, "wake_cost: no result from the child\n");
    return 1;
  }
  waitpid(child, NULL, 0);
  printf("parent_cpu_us=%.2f child_cpu_us=%.2f wall_us=%.2f\n", cpu_us,
         child_cpu_us, wall_us);
  return 0;
}
