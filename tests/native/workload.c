/* A native test workload built the way production C is: `gcc -O2 -g`, which omits frame
 * pointers, and linked against the system C library, which has none either.
 *
 *   workload cpu SECONDS [N]       N threads "cpu" (default 1): cpu -> alpha | beta | gamma_rec -> spin
 *   workload waits SECONDS DIR     one thread per way of waiting through a libc wrapper:
 *                                  nanosleep, a mutex, read of a pipe, fdatasync (file in DIR)
 *   workload deep SECONDS          one thread "deep": deep -> deep_rec x 49 -> spin, about
 *                                  50 KiB of stack between the leaf and the thread's entry
 *
 * With --wait it reads one line from stdin before starting. At the end it prints the
 * thread ids as JSON, so tests can compare per-thread figures with other tools. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile unsigned long sink;
static double seconds;
static time_t deadline;

static int running(void) { return time(NULL) < deadline; }

__attribute__((noinline)) static void spin(unsigned long n) {
  for (unsigned long i = 0; i < n; i++) sink += i * i;
}
/* The increments after each call keep them from becoming tail calls, which no unwinder
 * can see through. */
__attribute__((noinline)) static void alpha(void) { spin(3000000); sink++; }
__attribute__((noinline)) static void beta(void) { spin(1500000); sink++; }
__attribute__((noinline)) static void gamma_rec(int depth) {
  if (depth == 0) spin(1000000); else gamma_rec(depth - 1);
  sink++;
}

/* Each level keeps 1 KiB on the stack, as a compiler's recursive passes or a parser's
 * descent do with their locals. */
__attribute__((noinline)) static void deep_rec(int depth) {
  volatile char locals[1024];
  locals[0] = (char)depth;
  if (depth == 0) spin(1000000); else deep_rec(depth - 1);
  sink += locals[0];
}

static pid_t tids[8];
enum { CPU, SLEEPER, LOCKER, PIPER, SYNCER, HOLDER, WRITER, DEEP };
static const char *names[] = {"cpu", "sleeper", "locker", "piper", "syncer", "holder", "writer", "deep"};

static void named(int who) {
  tids[who] = gettid();
  pthread_setname_np(pthread_self(), names[who]);
}

__attribute__((noinline)) static void *cpu(void *arg) {
  named(CPU);
  while (running()) { alpha(); beta(); gamma_rec(5); }
  return arg;
}

__attribute__((noinline)) static void *deep(void *arg) {
  named(DEEP);
  while (running()) deep_rec(48);
  return arg;
}

__attribute__((noinline)) static void wait_nanosleep(void) {
  struct timespec ts = {0, 20 * 1000 * 1000};
  while (running()) { nanosleep(&ts, NULL); sink++; }
}
static void *sleeper(void *arg) { named(SLEEPER); wait_nanosleep(); return arg; }

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static void *holder(void *arg) {
  named(HOLDER);
  struct timespec held = {0, 30 * 1000 * 1000}, gap = {0, 2 * 1000 * 1000};
  while (running()) {
    pthread_mutex_lock(&lock);
    nanosleep(&held, NULL);
    pthread_mutex_unlock(&lock);
    nanosleep(&gap, NULL);
  }
  return arg;
}
__attribute__((noinline)) static void wait_mutex(void) {
  struct timespec gap = {0, 1 * 1000 * 1000};
  while (running()) {
    pthread_mutex_lock(&lock);
    sink++;
    pthread_mutex_unlock(&lock);
    /* Let the holder take it again, so the next lock blocks. */
    nanosleep(&gap, NULL);
  }
}
static void *locker(void *arg) { named(LOCKER); wait_mutex(); return arg; }

static int pipe_fds[2];
static void *writer(void *arg) {
  named(WRITER);
  struct timespec gap = {0, 20 * 1000 * 1000};
  while (running()) { nanosleep(&gap, NULL); if (write(pipe_fds[1], "x", 1) != 1) break; }
  close(pipe_fds[1]);
  return arg;
}
__attribute__((noinline)) static void wait_pipe(void) {
  char byte;
  while (read(pipe_fds[0], &byte, 1) == 1) sink++;
}
static void *piper(void *arg) { named(PIPER); wait_pipe(); return arg; }

static const char *dir;
__attribute__((noinline)) static void wait_fdatasync(int fd) {
  char block[4096];
  memset(block, 'p', sizeof block);
  /* The same block over and over: each fdatasync writes it to the device again, and the
   * file stays small. */
  while (running()) {
    if (pwrite(fd, block, sizeof block, 0) != sizeof block) break;
    fdatasync(fd);
    sink++;
  }
}
static void *syncer(void *arg) {
  named(SYNCER);
  char path[4096];
  snprintf(path, sizeof path, "%s/native-workload-%d", dir, getpid());
  int fd = open(path, O_CREAT | O_TRUNC | O_WRONLY, 0600);
  if (fd < 0) { perror(path); exit(1); }
  wait_fdatasync(fd);
  close(fd);
  unlink(path);
  return arg;
}

int main(int argc, char **argv) {
  int arg = 1;
  if (arg < argc && strcmp(argv[arg], "--wait") == 0) {
    char line[16];
    arg++;
    if (!fgets(line, sizeof line, stdin)) return 1;
  }
  if (argc - arg < 2) { fprintf(stderr, "usage: workload [--wait] cpu|deep|waits SECONDS [DIR]\n"); return 2; }
  const char *mode = argv[arg];
  seconds = atof(argv[arg + 1]);
  deadline = time(NULL) + (time_t)seconds;
  pthread_t threads[8];
  int count = 0;
  if (strcmp(mode, "cpu") == 0) {
    int n = argc - arg >= 3 ? atoi(argv[arg + 2]) : 1;
    while (count < n && count < 8) pthread_create(&threads[count++], NULL, cpu, NULL);
  } else if (strcmp(mode, "deep") == 0) {
    pthread_create(&threads[count++], NULL, deep, NULL);
  } else if (strcmp(mode, "waits") == 0 && argc - arg >= 3) {
    dir = argv[arg + 2];
    if (pipe(pipe_fds) != 0) return 1;
    void *(*bodies[])(void *) = {sleeper, holder, locker, writer, piper, syncer};
    for (unsigned i = 0; i < sizeof bodies / sizeof *bodies; i++) pthread_create(&threads[count++], NULL, bodies[i], NULL);
  } else {
    fprintf(stderr, "unknown mode %s\n", mode);
    return 2;
  }
  for (int i = 0; i < count; i++) pthread_join(threads[i], NULL);
  printf("{");
  for (int i = 0; i <= DEEP; i++) printf("%s\"%s_tid\": %d", i ? ", " : "", names[i], tids[i]);
  printf("}\n");
  return 0;
}
