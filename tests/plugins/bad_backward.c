/* Conformance-checker fixture: LoRA whose backward scales lora_B's
 * gradient by 1.1, a 10% error the finite-difference check must name. */
#define LL_NAME "bad-backward"
#define LL_DB_SCALE 1.1f
#include "lora_like.h"
