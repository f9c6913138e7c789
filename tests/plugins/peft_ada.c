/* PEFT interop fixture: a LoRA that declares Hugging Face PEFT's ADALORA
 * type without the global lora_E and rank_pattern the ADALORA reader
 * fills; reading an ADALORA adapter as it must be refused, naming lora_E. */
#define LL_NAME "peft-ada"
#define LL_PEFT_TYPE "ADALORA"
#include "lora_like.h"
