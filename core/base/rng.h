/* peftref core: deterministic random numbers (same seed, same stream on
 * every platform): xoshiro256** seeded through splitmix64. */
#ifndef PEFTREF_CORE_RNG_H
#define PEFTREF_CORE_RNG_H

#include <stdint.h>

typedef struct pr_rng { uint64_t s[4]; } pr_rng;

void rng_seed(pr_rng *r, uint64_t seed);
uint64_t rng_next(pr_rng *r);
/* uniform in [0, 1) with 24 random bits */
float rng_uniform(pr_rng *r);
/* standard normal (Box-Muller, no cached second value, so the stream
 * position depends only on the number of calls) */
float rng_normal(pr_rng *r);
/* The normal rng_normal makes of its two uniforms a, b (drawn in that order). */
float rng_box_muller(float a, float b);

#endif
