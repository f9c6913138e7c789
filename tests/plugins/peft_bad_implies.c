/* PEFT interop fixture: a peft-config extension whose implies is a JSON
 * array, not an object; the plugin validator must refuse the technique. */
#define LL_NAME "peft-bad-implies"
#define LL_PEFT_TYPE "LORA"
#define LL_PEFT_IMPLIES "[\"use_dora\"]"
#include "lora_like.h"
