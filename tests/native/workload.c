/* A native test workload built the way production C is: `gcc -O2 -g`, which omits frame
 * pointers, and linked against the system C library, which has none either.
 *
 *   workload cpu SECONDS [N]       N threads "cpu" (default 1): cpu -> alpha | beta | gamma_rec -> spin
 *   workload waits SECONDS DIR     one thread per way of waiting through a libc wrapper:
 *                                  nanosleep, a mutex, read of a pipe, fdatasync (file in DIR)
 *   workload deep SECONDS          one thread "deep": deep -> deep_rec x 49 -> spin, about
 *                                  50 KiB of stack between the leaf and the thread's entry
 *   workload queries SECONDS       four threads "query" serving requests: handle -> query_db, which
 *                                  sleeps 2 ms in 97 calls of 100 and 60 ms in 3 (same stack)
 *   workload waits SECONDS DIR pingpong
 *                                  the same, and two threads handing a byte back and forth
 *                                  through pipes: thousands of short waits a second
 *
 * With --wait it reads one line from stdin before starting. At the end it prints the
 * thread ids as JSON, so tests can compare per-thread figures with other tools. In `waits`
 * mode, the threads whose waits are all long (sleeper, holder, locker, piper) also report
 * their own wall, CPU and run-queue time over their waiting, a reference for off-CPU time
 * (wall - CPU) that does not come from tracing:
 *   "sleeper": {"tid": N, "wall_ns": N, "cpu_ns": N, "runq_ns": N}, ... */
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

/* A thread's own clocks at the start and the end of its waiting: CLOCK_MONOTONIC, and its
 * CPU and run-queue time from /proc/thread-self/schedstat (its first two fields, in ns:
 * the scheduler's own accounting). The file is opened before the start and read with a
 * buffer on the stack: the first malloc of a thread maps a new arena, which can wait for
 * the mmap lock, and such a wait must not fall between the readings outside the thread's
 * wait function, where the agent's figure would not count it. */
struct span { long long wall_ns, cpu_ns, runq_ns; int fd, measured; };
static struct span spans[8];

static long long monotonic_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}
static void schedstat(int fd, long long *cpu_ns, long long *runq_ns) {
  char text[128];
  ssize_t n = pread(fd, text, sizeof text - 1, 0);
  *cpu_ns = *runq_ns = -1;
  if (n <= 0) return;
  text[n] = 0;
  if (sscanf(text, "%lld %lld", cpu_ns, runq_ns) != 2) *cpu_ns = *runq_ns = -1;
}
static void span_start(int who) {
  struct span *span = &spans[who];
  span->fd = open("/proc/thread-self/schedstat", O_RDONLY);
  schedstat(span->fd, &span->cpu_ns, &span->runq_ns);
  span->wall_ns = monotonic_ns();
}
static void span_end(int who) {
  struct span *span = &spans[who];
  long long wall_ns = monotonic_ns(), cpu_ns, runq_ns;
  schedstat(span->fd, &cpu_ns, &runq_ns);
  close(span->fd);
  span->wall_ns = wall_ns - span->wall_ns;
  span->cpu_ns = cpu_ns - span->cpu_ns;
  span->runq_ns = runq_ns - span->runq_ns;
  span->measured = 1;
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
static void *sleeper(void *arg) {
  named(SLEEPER);
  span_start(SLEEPER);
  wait_nanosleep();
  span_end(SLEEPER);
  return arg;
}

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static void *holder(void *arg) {
  named(HOLDER);
  span_start(HOLDER);
  struct timespec held = {0, 30 * 1000 * 1000}, gap = {0, 2 * 1000 * 1000};
  while (running()) {
    pthread_mutex_lock(&lock);
    nanosleep(&held, NULL);
    pthread_mutex_unlock(&lock);
    nanosleep(&gap, NULL);
  }
  span_end(HOLDER);
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
static void *locker(void *arg) {
  named(LOCKER);
  span_start(LOCKER);
  wait_mutex();
  span_end(LOCKER);
  return arg;
}

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
static void *piper(void *arg) {
  named(PIPER);
  span_start(PIPER);
  wait_pipe();
  span_end(PIPER);
  return arg;
}

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

/* Two threads handing a byte back and forth through two pipes, with a 50 µs sleep per
 * round: thousands of context switches a second, each wait well under a millisecond,
 * what the switch-in path does not pay stacks for. The sleep bounds the rate, so that
 * recording every switch under emulation does not starve everything else. */
static int ping_fds[2], pong_fds[2];
static void *ping(void *arg) {
  char byte = 0;
  struct timespec gap = {0, 50 * 1000};
  while (running()) {
    if (write(ping_fds[1], &byte, 1) != 1 || read(pong_fds[0], &byte, 1) != 1) break;
    nanosleep(&gap, NULL);
  }
  close(ping_fds[1]);
  return arg;
}
static void *pong(void *arg) {
  char byte;
  while (read(ping_fds[0], &byte, 1) == 1) {
    if (write(pong_fds[1], &byte, 1) != 1) break;
  }
  close(pong_fds[1]);
  return arg;
}

/* A service's database calls: the same stack waits 2 ms or 60 ms, so its total says
 * nothing of its tail. */
__attribute__((noinline)) static void query_db(unsigned call) {
  struct timespec wait = {0, (call % 100 == 17 || call % 100 == 50 || call % 100 == 83) ? 60000000 : 2000000};
  nanosleep(&wait, NULL);
  sink++;
}
__attribute__((noinline)) static void handle(unsigned call) { query_db(call); sink++; }
static void *query(void *arg) {
  for (unsigned call = 0; running(); call++) handle(call);
  return arg;
}

int main(int argc, char **argv) {
  int arg = 1;
  if (arg < argc && strcmp(argv[arg], "--wait") == 0) {
    char line[16];
    arg++;
    if (!fgets(line, sizeof line, stdin)) return 1;
  }
  if (argc - arg < 2) { fprintf(stderr, "usage: workload [--wait] cpu|deep|queries|waits SECONDS [DIR [pingpong]]\n"); return 2; }
  const char *mode = argv[arg];
  seconds = atof(argv[arg + 1]);
  deadline = time(NULL) + (time_t)seconds;
  pthread_t threads[8];
  int count = 0;
  if (strcmp(mode, "cpu") == 0) {
    int n = argc - arg >= 3 ? atoi(argv[arg + 2]) : 1;
    while (count < n && count < 8) pthread_create(&threads[count++], NULL, cpu, NULL);
  } else if (strcmp(mode, "queries") == 0) {
    while (count < 4) pthread_create(&threads[count++], NULL, query, NULL);
  } else if (strcmp(mode, "deep") == 0) {
    pthread_create(&threads[count++], NULL, deep, NULL);
  } else if (strcmp(mode, "waits") == 0 && argc - arg >= 3) {
    dir = argv[arg + 2];
    if (pipe(pipe_fds) != 0) return 1;
    void *(*bodies[])(void *) = {sleeper, holder, locker, writer, piper, syncer};
    for (unsigned i = 0; i < sizeof bodies / sizeof *bodies; i++) pthread_create(&threads[count++], NULL, bodies[i], NULL);
    if (argc - arg >= 4 && strcmp(argv[arg + 3], "pingpong") == 0) {
      if (pipe(ping_fds) != 0 || pipe(pong_fds) != 0) return 1;
      pthread_create(&threads[count++], NULL, ping, NULL);
      pthread_create(&threads[count++], NULL, pong, NULL);
    }
  } else {
    fprintf(stderr, "unknown mode %s\n", mode);
    return 2;
  }
  for (int i = 0; i < count; i++) pthread_join(threads[i], NULL);
  printf("{");
  for (int i = 0; i <= DEEP; i++) printf("%s\"%s_tid\": %d", i ? ", " : "", names[i], tids[i]);
  for (int i = 0; i <= DEEP; i++) {
    if (!spans[i].measured) continue;
    printf(", \"%s\": {\"tid\": %d, \"wall_ns\": %lld, \"cpu_ns\": %lld, \"runq_ns\": %lld}", names[i], tids[i],
           spans[i].wall_ns, spans[i].cpu_ns, spans[i].runq_ns);
  }
  printf("}\n");
  return 0;
}
