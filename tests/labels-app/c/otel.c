/* A C service that publishes OpenTelemetry's thread context as OTEP 4947 asks, with its
 * process context as OTEP 4719 asks (no SDK implements them in a release yet; this
 * follows the two documents field by field):
 *
 * - process context: a memfd named OTEL_CTX, mapped, MADV_DONTFORK, holding the
 *   header (signature "OTEL_CTX" written last, version 2, payload size, publication
 *   time, payload address) and, after it, the payload: an OTLP Resource with
 *   service.name, threadlocal.schema_version "tls_v1" and threadlocal.attribute_key_map
 *   ["http_route"];
 * - thread context: the exported thread-local otel_thread_ctx_v1 points to the
 *   thread's record (trace id, span id, valid, trace flags, attributes' size, then
 *   attributes as key index, length, value).
 *
 * Usage: otel THREADS SECONDS. Each thread serves requests of about 10 ms in turn,
 * /checkout burning CPU in checkout_work and /search in search_work, each request
 * with its own trace and span ids; it prints the requests served and the CPU time it
 * used. Build with
 * -Wl,--export-dynamic-symbol=otel_thread_ctx_v1 (the OTEP asks the symbol in .dynsym). */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#ifndef PR_SET_VMA
#define PR_SET_VMA 0x53564d41
#define PR_SET_VMA_ANON_NAME 0
#endif

__thread void *otel_thread_ctx_v1;

struct record {
    uint8_t trace_id[16];
    uint8_t span_id[8];
    uint8_t valid;
    uint8_t trace_flags;
    uint16_t attrs_size;
    uint8_t attrs[64];
} __attribute__((packed, aligned(8)));

/* Protobuf, as much as a Resource of string attributes needs. */
static size_t field(uint8_t *out, int number, const void *bytes, size_t len) {
    size_t n = 0;
    out[n++] = (uint8_t)(number << 3 | 2);
    size_t v = len;
    do {
        out[n++] = (uint8_t)((v & 0x7f) | (v > 0x7f ? 0x80 : 0));
        v >>= 7;
    } while (v);
    memcpy(out + n, bytes, len);
    return n + len;
}
/* KeyValue { key = 1; value = 2 (AnyValue) } */
static size_t key_value(uint8_t *out, const char *key, const uint8_t *any, size_t any_len) {
    uint8_t kv[512];
    size_t n = field(kv, 1, key, strlen(key));
    n += field(kv + n, 2, any, any_len);
    /* Resource.attributes = 1 */
    return field(out, 1, kv, n);
}
/* AnyValue { string_value = 1 } */
static size_t string_value(uint8_t *out, const char *s) { return field(out, 1, s, strlen(s)); }

static void publish_process_context(void) {
    uint8_t payload[1024], any[256], array[256], item[64];
    size_t n = 0, a;
    a = string_value(any, "otel-app");
    n += key_value(payload + n, "service.name", any, a);
    a = string_value(any, "tls_v1");
    n += key_value(payload + n, "threadlocal.schema_version", any, a);
    /* AnyValue { array_value = 5 (ArrayValue { values = 1 (AnyValue) }) } */
    size_t i = string_value(item, "http_route");
    size_t arr = field(array, 1, item, i);
    a = field(any, 5, array, arr);
    n += key_value(payload + n, "threadlocal.attribute_key_map", any, a);

    int fd = memfd_create("OTEL_CTX", MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, 4096) != 0) { perror("memfd"); exit(1); }
    uint8_t *map = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) { perror("mmap"); exit(1); }
    close(fd);
    madvise(map, 4096, MADV_DONTFORK);
    memcpy(map + 32, payload, n);
    uint32_t version = 2, size = (uint32_t)n;
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    uint64_t published = (uint64_t)now.tv_sec * 1000000000ull + (uint64_t)now.tv_nsec;
    uint64_t at = (uint64_t)(uintptr_t)(map + 32);
    memcpy(map + 8, &version, 4);
    memcpy(map + 12, &size, 4);
    memcpy(map + 16, &published, 8);
    memcpy(map + 24, &at, 8);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    memcpy(map, "OTEL_CTX", 8);
    prctl(PR_SET_VMA, PR_SET_VMA_ANON_NAME, map, 4096, "OTEL_CTX");
}

static volatile uint64_t sink;

__attribute__((noinline)) static void checkout_work(double ms) {
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    do {
        for (int i = 0; i < 20000; i++) sink = sink * 31 + i;
        clock_gettime(CLOCK_MONOTONIC, &now);
    } while ((now.tv_sec - start.tv_sec) * 1e3 + (now.tv_nsec - start.tv_nsec) / 1e6 < ms);
}

__attribute__((noinline)) static void search_work(double ms) {
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    do {
        for (int i = 0; i < 20000; i++) sink = sink * 17 + i;
        clock_gettime(CLOCK_MONOTONIC, &now);
    } while ((now.tv_sec - start.tv_sec) * 1e3 + (now.tv_nsec - start.tv_nsec) / 1e6 < ms);
}

static double seconds;
static uint64_t served[64];

static void *serve(void *arg) {
    long me = (long)arg;
    struct record record;
    uint64_t state = 0x9e3779b97f4a7c15ull * (uint64_t)(me + 1);
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (uint64_t n = 0;; n++) {
        clock_gettime(CLOCK_MONOTONIC, &now);
        if ((now.tv_sec - start.tv_sec) + (now.tv_nsec - start.tv_nsec) / 1e9 >= seconds) break;
        int checkout = n % 2 == 0;
        const char *route = checkout ? "/checkout" : "/search";
        /* A record fixed per thread, marked invalid while it is rewritten. */
        otel_thread_ctx_v1 = &record;
        record.valid = 0;
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        for (int i = 0; i < 16; i++) { state = state * 6364136223846793005ull + 1442695040888963407ull; record.trace_id[i] = (uint8_t)(state >> 56); }
        for (int i = 0; i < 8; i++) { state = state * 6364136223846793005ull + 1442695040888963407ull; record.span_id[i] = (uint8_t)(state >> 56); }
        record.trace_flags = 1;
        record.attrs[0] = 0;
        record.attrs[1] = (uint8_t)strlen(route);
        memcpy(record.attrs + 2, route, strlen(route));
        record.attrs_size = (uint16_t)(2 + strlen(route));
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        record.valid = 1;
        if (checkout) checkout_work(10); else search_work(10);
        /* Detached between requests. */
        otel_thread_ctx_v1 = NULL;
        served[me]++;
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: %s THREADS SECONDS\n", argv[0]); return 2; }
    long threads = atol(argv[1]);
    seconds = atof(argv[2]);
    if (threads < 1 || threads > 64) return 2;
    publish_process_context();
    pthread_t ids[64];
    for (long i = 0; i < threads; i++) pthread_create(&ids[i], NULL, serve, (void *)i);
    uint64_t total = 0;
    for (long i = 0; i < threads; i++) { pthread_join(ids[i], NULL); total += served[i]; }
    struct timespec cpu;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &cpu);
    printf("{\"served\": %llu, \"cpu_ns\": %llu}\n", (unsigned long long)total,
           (unsigned long long)cpu.tv_sec * 1000000000ull + (unsigned long long)cpu.tv_nsec);
    return 0;
}
