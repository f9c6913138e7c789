/* peftref tests: finite-difference gradient checking shared by the tests.
 *
 * The loss is any scalar function of the probed array; gc_check perturbs
 * entries of the array in place by +-eps, compares the central difference
 * (L(x+eps) - L(x-eps)) / (2 eps) with the analytic gradient, and restores
 * every entry it touched. */
#ifndef PEFTREF_TESTS_GRADCHECK_H
#define PEFTREF_TESTS_GRADCHECK_H

#include <stddef.h>

/* Returns the loss evaluated with the current contents of the probed array. */
typedef double (*gc_loss_fn)(void *ctx);

/* Central-difference check of analytic gradient g (n floats) for array x (n floats, perturbed in
 * place and restored). Probes min(n, max_probe) indices spread deterministically over the array
 * (all of them if max_probe == 0). An entry passes when |g - fd| <= atol + rtol*max(|g|,|fd|).
 * Prints the worst entry with `what`. Returns the number of failing entries (0 = pass). */
int gc_check(const char *what, float *x, const float *g, size_t n, gc_loss_fn f, void *ctx,
             double eps, double rtol, double atol, size_t max_probe);

/* Fill a with deterministic pseudo-random values in [-scale, scale] from seed. */
void gc_fill(float *a, size_t n, unsigned seed, float scale);

#endif
