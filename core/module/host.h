/* peftref core: the services table the host hands every plugin call.
 *
 * host_services() returns one static pr_host (peftref/plugin.h): memory,
 * error reporting, logging, a deterministic RNG on a caller-kept 64-bit
 * state, BLAS GEMM, fused activations, row softmax and a parallel-for.
 *
 * Errors: a plugin reports a failure with host->error(ctx, fmt, ...),
 * which formats into the buffer of the call in progress on this thread
 * (host_call_begin/host_call_end bracket every callback the host makes);
 * the caller then turns that text into a pr_error that names the module,
 * technique, site and layer. */
#ifndef PEFTREF_CORE_HOST_H
#define PEFTREF_CORE_HOST_H

#include <stdint.h>
#include "peftref/plugin.h"

const pr_host *host_services(void);

#define HOST_MSG_MAX 512

/* The message a plugin left during one callback. */
typedef struct host_call {
    char msg[HOST_MSG_MAX];
    int has_msg;
    double aux_loss;          /* what the call added through host->add_aux_loss */
    /* the callback's context and the model of its module (mod_call sets
     * them; NULL otherwise): what the extensions by URI serve from */
    const pr_ctx *ctx;
    const struct pr_model *model;
    struct host_call *prev;   /* calls nest when a callback runs inside another */
} host_call;

/* Make c the current call of this thread (clears its message). */
void host_call_begin(host_call *c);
/* Restore the call that was current before c. */
void host_call_end(host_call *c);

/* splitmix64 finaliser: a well-mixed 64-bit function of x. */
uint64_t host_mix64(uint64_t x);
/* Mix a string into a 64-bit hash (FNV-1a, then host_mix64). */
uint64_t host_hash_str(uint64_t h, const char *s);

#endif
