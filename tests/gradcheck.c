/* peftref tests: finite-difference gradient checking (see gradcheck.h). */
#include "gradcheck.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>

/* splitmix64 (Steele, Lea & Flood 2014): a self-contained stream so that
 * test data does not depend on the library's own generator. */
static uint64_t gc_next(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

void gc_fill(float *a, size_t n, unsigned seed, float scale)
{
    uint64_t s = 0x5DEECE66Dull ^ ((uint64_t)seed << 17) ^ seed;
    for (size_t i = 0; i < n; i++) {
        /* 24 random bits -> [0, 1) -> [-1, 1) */
        double u = (double)(gc_next(&s) >> 40) / 16777216.0;
        a[i] = (float)((2.0 * u - 1.0) * scale);
    }
}

int gc_check(const char *what, float *x, const float *g, size_t n, gc_loss_fn f, void *ctx,
             double eps, double rtol, double atol, size_t max_probe)
{
    size_t np = (max_probe == 0 || max_probe >= n) ? n : max_probe;
    int fails = 0;
    double worst_excess = -INFINITY;
    size_t worst_i = 0;
    double worst_g = 0.0, worst_fd = 0.0;
    for (size_t p = 0; p < np; p++) {
        /* evenly spread over [0, n), always including the first and last entry */
        size_t i = np == n ? p : (np == 1 ? 0 : (size_t)((double)p * (double)(n - 1) / (double)(np - 1)));
        float orig = x[i];
        /* the step actually taken in float, so fd divides by the true difference */
        float xp = (float)(orig + eps), xm = (float)(orig - eps);
        x[i] = xp;
        double lp = f(ctx);
        x[i] = xm;
        double lm = f(ctx);
        x[i] = orig;
        double fd = (lp - lm) / ((double)xp - (double)xm);
        double gi = g[i];
        double tol = atol + rtol * fmax(fabs(gi), fabs(fd));
        double excess = fabs(gi - fd) - tol;
        if (!(excess <= 0.0)) fails++; /* NaN fails too */
        if (!(excess <= worst_excess)) {
            worst_excess = excess;
            worst_i = i;
            worst_g = gi;
            worst_fd = fd;
        }
    }
    printf("gradcheck %-24s n=%-6zu probed=%-5zu fails=%-3d worst[%zu] analytic=% .6e fd=% .6e |diff|=%.3e\n",
           what, n, np, fails, worst_i, worst_g, worst_fd, fabs(worst_g - worst_fd));
    return fails;
}
