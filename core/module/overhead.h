/* peftref core: what a pipeline's modules add to inference.
 *
 * Computed from the validated plan (technique descriptors, sites, layers,
 * options, the model's shape), without building the model.  Per
 * integration form (docs/pipeline.md, "Inference overhead"):
 *
 *   selection (BitFit, LayerNorm tuning, full)   nothing
 *   concatenation at embed (prompt tuning)       n_virtual more positions
 *   concatenation at attn.k/attn.v (prefix)      n_virtual more keys and values
 *                                                per layer (the prefix length)
 *   rescaling ((IA)^3)                           w_out multiplies per insertion
 *   direct, scaled, gated addition, custom       per insertion, 2 FLOPs per
 *                                                element of each 2-D parameter
 *                                                (one multiply-add each) and 1
 *                                                per element of each vector
 *   weight delta                                 2 * d_in * d_out per insertion
 *
 * all per token.  A mergeable module (one with a merge callback, other than
 * concatenation) costs nothing once merged.  The count is a lower bound
 * (flops_lower_bound) when the rule cannot see all the work: parameters of
 * 3 or more dimensions (Kronecker factors, whose product is formed per
 * forward pass), attention inside the module (its scores grow with the
 * sequence), or a custom integration. */
#ifndef PEFTREF_CORE_OVERHEAD_H
#define PEFTREF_CORE_OVERHEAD_H

#include <stdint.h>
#include "peftref/pipeline.h"

typedef struct overhead {
    int64_t flops;          /* extra FLOPs per token, modules unmerged */
    int64_t flops_merged;   /* the same after merging every mergeable module */
    int positions;          /* virtual positions prepended to every sequence */
    int prefix;             /* key/value rows prepended in every layer it uses */
    int flops_lower_bound;  /* some work is not counted (see above) */
} overhead;

int overhead_of_pipeline(const pr_pipeline *p, overhead *out, pr_error *err);

#endif
