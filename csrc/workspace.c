/* Per-thread scratch memory for the kernels, kept between calls so a training step does not
 * allocate. Each calling thread (Python thread) has its own buffer, freed when it exits. */
#include <pthread.h>
#include <stdlib.h>

#include "internal.h"

typedef struct {
    void *ptr, *aux;
    size_t bytes, aux_bytes;
} scratch_slot;

static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static int scratch_key_ok;

static void scratch_free(void *p) {
    scratch_slot *slot = p;
    free(slot->ptr);
    free(slot->aux);
    free(slot);
}

static void scratch_init(void) {
    scratch_key_ok = pthread_key_create(&scratch_key, scratch_free) == 0;
}

/* The calling thread's slot, created on first use; NULL when that fails. */
static scratch_slot *thread_slot(void) {
    pthread_once(&scratch_once, scratch_init);
    if (!scratch_key_ok) return NULL;
    scratch_slot *slot = pthread_getspecific(scratch_key);
    if (!slot) {
        slot = calloc(1, sizeof *slot);
        if (!slot) return NULL;
        if (pthread_setspecific(scratch_key, slot) != 0) {
            free(slot);
            return NULL;
        }
    }
    return slot;
}

/* *ptr grown to at least bytes (64-byte aligned; the old contents are dropped). */
static void *grow(void **ptr, size_t *have, size_t bytes) {
    if (*have < bytes) {
        size_t want = (bytes + FBP_ALIGN - 1) / FBP_ALIGN * FBP_ALIGN;
        void *p = NULL;
        if (posix_memalign(&p, FBP_ALIGN, want) != 0) return NULL;
        free(*ptr);
        *ptr = p;
        *have = want;
    }
    return *ptr;
}

void *fbp_scratch(size_t bytes) {
    scratch_slot *slot = thread_slot();
    return slot ? grow(&slot->ptr, &slot->bytes, bytes) : NULL;
}

void *fbp_scratch_aux(size_t bytes) {
    scratch_slot *slot = thread_slot();
    return slot ? grow(&slot->aux, &slot->aux_bytes, bytes) : NULL;
}
