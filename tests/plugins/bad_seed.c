/* Conformance-checker fixture: LoRA whose init() draws lora_A from a static
 * RNG state instead of ctx->seed, so two attaches with one seed differ. */
#define LL_NAME "bad-seed"
#define LL_STATIC_SEED 1
#include "lora_like.h"
