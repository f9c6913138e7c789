/* peftref core: xoshiro256** (Blackman & Vigna, "Scrambled linear
 * pseudorandom number generators", 2021) seeded through splitmix64, so a
 * 64-bit seed fills the 256-bit state with well-mixed, never all-zero bits. */
#include <math.h>

#include "rng.h"

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

void rng_seed(pr_rng *r, uint64_t seed)
{
    uint64_t x = seed;
    for (int i = 0; i < 4; i++)
        r->s[i] = splitmix64(&x);
}

uint64_t rng_next(pr_rng *r)
{
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

float rng_uniform(pr_rng *r)
{
    /* top 24 bits: every value k / 2^24 is exact in a float */
    return (float)(rng_next(r) >> 40) * (1.0f / 16777216.0f);
}

float rng_box_muller(float a, float b)
{
    /* u1 in (0, 1] keeps log finite; the sine partner is discarded so each
     * normal costs exactly two draws */
    double u1 = 1.0 - (double)a;
    double u2 = (double)b;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

float rng_normal(pr_rng *r)
{
    float a = rng_uniform(r);
    float b = rng_uniform(r);
    return rng_box_muller(a, b);
}
