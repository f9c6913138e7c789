/* PEFT interop fixture: a LoRA that declares Hugging Face PEFT's ADALORA
 * type but has no read() of it; an ADALORA adapter is not read as it, and
 * the refusal names it. */
#define LL_NAME "peft-ada"
#define LL_PEFT_TYPE "ADALORA"
#include "lora_like.h"
