/* A C program that labels its work with the C library of the custom-labels crate
 * (libcustomlabels.so): linked (built with -DLINKED), or loaded with dlopen from the
 * path in argv[1]. It sets endpoint=checkout, prints its thread pointer, the address of
 * its thread's custom_labels_current_set and the library's TLS module id (0 when
 * linked), then waits for stdin to close, or with SPIN_SECONDS set spins that long in
 * checkout_work. The agent's tests check where it finds the labels against this. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <link.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include "customlabels.h"

typedef custom_labels_labelset_t *(*create_fn)(size_t);
typedef int (*set_fn)(custom_labels_labelset_t *, custom_labels_string_t, custom_labels_string_t, custom_labels_string_t *);
typedef custom_labels_labelset_t *(*replace_fn)(custom_labels_labelset_t *);

static volatile unsigned long sink;

__attribute__((noinline)) static void checkout_work(double seconds) {
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    do {
        for (int i = 0; i < 100000; i++)
            sink = sink * 31 + i;
        clock_gettime(CLOCK_MONOTONIC, &now);
    } while ((now.tv_sec - start.tv_sec) + (now.tv_nsec - start.tv_nsec) / 1e9 < seconds);
}

int main(int argc, char **argv) {
    size_t module = 0;
#ifdef LINKED
    (void)argc;
    (void)argv;
    create_fn create = custom_labels_new;
    set_fn set = custom_labels_set;
    replace_fn replace = custom_labels_replace;
    void *variable = &custom_labels_current_set;
#else
    if (argc < 2) {
        fprintf(stderr, "usage: %s LIBRARY\n", argv[0]);
        return 2;
    }
    void *library = dlopen(argv[1], RTLD_NOW);
    if (!library) {
        fprintf(stderr, "%s\n", dlerror());
        return 2;
    }
    create_fn create = (create_fn)dlsym(library, "custom_labels_new");
    set_fn set = (set_fn)dlsym(library, "custom_labels_set");
    replace_fn replace = (replace_fn)dlsym(library, "custom_labels_replace");
    /* For a thread-local symbol, dlsym gives the calling thread's instance. */
    void *variable = dlsym(library, "custom_labels_current_set");
    dlinfo(library, RTLD_DI_TLS_MODID, &module);
#endif
    custom_labels_labelset_t *labels = create(4);
    custom_labels_string_t key = {8, (const unsigned char *)"endpoint"};
    custom_labels_string_t value = {8, (const unsigned char *)"checkout"};
    set(labels, key, value, NULL);
    replace(labels);
    printf("%lu %lu %lu\n", (unsigned long)__builtin_thread_pointer(), (unsigned long)variable, (unsigned long)module);
    fflush(stdout);
    const char *spin = getenv("SPIN_SECONDS");
    if (spin) {
        checkout_work(atof(spin));
        return 0;
    }
    return getchar() == EOF ? 0 : 1;
}
