/* PEFT interop fixture: a LoRA that declares Hugging Face PEFT's LORA type
 * and implies nothing, as the built-in lora does, so a plain LORA adapter
 * could be read as either: the reader must refuse and name both. */
#define LL_NAME "peft-twin"
#define LL_PEFT_TYPE "LORA"
#include "lora_like.h"
