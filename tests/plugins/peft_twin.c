/* PEFT interop fixture: a LoRA that declares Hugging Face PEFT's LORA type,
 * reads it (its own read(), as an outside plugin writes one) and implies
 * nothing, as the built-in lora does, so a plain LORA adapter could be read
 * as either: the reader must refuse and name both.  Without lora.so it is
 * the reader of plain LORA adapters. */
#define LL_NAME "peft-twin"
#define LL_PEFT_TYPE "LORA"
#define LL_PEFT_READ
#include "lora_like.h"
