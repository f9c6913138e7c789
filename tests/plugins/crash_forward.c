/* Conformance-checker fixture: LoRA whose forward dereferences a null
 * pointer; every check that runs forward must fail without stopping the
 * checker. */
#define LL_NAME "crash-forward"
#define LL_CRASH_FORWARD 1
#include "lora_like.h"
