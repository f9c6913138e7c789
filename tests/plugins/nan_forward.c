/* Conformance-checker fixture: LoRA whose forward writes NaN into every
 * element of its output.  Every other check passes (a NaN loss compares as
 * no worse than any tolerance, and NaN bits repeat exactly); the finite
 * check must fail, naming the site and the first non-finite element. */
#define LL_NAME "nan-forward"
#define LL_NAN_FORWARD 1
#include "lora_like.h"
