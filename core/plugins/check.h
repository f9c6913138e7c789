/* peftref core: the plugin conformance checker (`peftref plugins check`).
 *
 * check_plugin_file loads one plugin file on its own and puts every
 * technique in it through these checks, each in a forked child process so
 * that a crash, an abort or a hang (alarm) fails that check only:
 *
 *   gradient/SITE  at every site the technique supports that the test model
 *                  has (one site at a time, except that a technique
 *                  concatenating to both attn.k and attn.v gets the pair,
 *                  as the model needs; layer 1 for per-layer sites):
 *                  central finite differences of the loss against the
 *                  analytic gradient of every trainable tensor the module
 *                  registered, and of upstream base tensors (the embeddings
 *                  and the layer's norm gains) made trainable, which are only
 *                  right when the module's input gradient d_in is.  Module
 *                  parameters are moved off their initial values first, so
 *                  zero-initialised factors exercise every path.  Selection
 *                  techniques: the selected base tensors.
 *   params         declared (pr_module_plan_for), counted
 *                  (pr_module_param_count, pr_module_trainable_count) and
 *                  registered (numels in the tensor table) parameter counts
 *                  agree, on two model shapes.
 *   determinism    two attaches with one seed give bit-identical parameters,
 *                  losses, logits and gradients; so do two passes on one
 *                  model; and training-mode passes across the two models.
 *   accumulation   two backward passes without zeroing give twice the
 *                  gradient of one (callbacks must add into grads).
 *   save-load      the module's tensors written with st_write and read into
 *                  a module attached with another seed reproduce the logits
 *                  bit for bit.
 *   options        for INT/FLOAT options with bounds, values just outside
 *                  them are rejected by pr_module_attach; an unknown ENUM
 *                  choice and a non-boolean BOOL are rejected; every default,
 *                  given explicitly as text, is accepted.
 *   finite         at every site the technique supports that the test model
 *                  has, with its parameters moved off their initial values,
 *                  forward (and integrate_forward for custom integration)
 *                  writes only finite values when its inputs are finite, in
 *                  eval and training mode, and the loss is finite; a failure
 *                  names the callback, the site and the first non-finite
 *                  output element.  (NaN slips through the other checks: it
 *                  is within every tolerance and its bits repeat.)
 *
 * Test model: GPT-2 family, 2 layers, d_model 32, 4 heads, d_ff 64,
 * vocabulary 64, batch 2 x 6 tokens (the second shape of the params check:
 * 3 layers, d_model 24, grouped-query attention, d_head 5).  Finite
 * differences: eps 3e-3, an entry passes when
 * |fd - g| <= 1e-4 + 5e-2 * max(|fd|, |g|), the loss recomputed in double
 * from the logits; an entry that fails is looked at again with eps/3 and
 * with one-sided differences from each side, so that a kink (ReLU) within
 * eps of the point does not fail a correct gradient. */
#ifndef PEFTREF_CORE_CHECK_H
#define PEFTREF_CORE_CHECK_H

#include <stdio.h>
#include "peftref/status.h"

#define CHECK_DEFAULT_PROBES 6
#define CHECK_DEFAULT_TIMEOUT 60

typedef struct check_options {
    int verbose;            /* also print per-tensor and per-option details */
    int probes;             /* entries probed per tensor; 0: CHECK_DEFAULT_PROBES */
    int timeout;            /* seconds per check; 0: CHECK_DEFAULT_TIMEOUT */
    const char *technique;  /* check only this technique; NULL: all in the file */
    int family;             /* pr_family of the test models; 0: GPT-2 */
} check_options;

/* Check the plugin file path (a directory: every plugin it holds) and
 * write one line per check to out:
 *     PASS|FAIL technique/check[/site]: detail
 * (SKIP lines name sites the test model lacks; they are not checks), then
 * a summary line.  A file the loader refuses is one failed check, "load".
 * *n_checks and *n_failed (either may be NULL) count the checks run and
 * failed.  Returns PR_OK when the checks ran, whatever their outcome, and
 * an error only when they could not (path missing, out of memory). */
int check_plugin_file(const char *path, const check_options *opts, FILE *out, int *n_checks, int *n_failed,
                      pr_error *err);

#endif
