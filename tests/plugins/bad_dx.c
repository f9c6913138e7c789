/* Conformance-checker fixture: LoRA whose input gradient d_in is scaled by
 * 1.3 while its parameter gradients are right; only the base tensors
 * upstream of the site can show it. */
#define LL_NAME "bad-dx"
#define LL_DX_SCALE 1.3f
#include "lora_like.h"
