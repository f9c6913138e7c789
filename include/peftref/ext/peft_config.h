/* peftref technique extension "peft-config": what a technique is in a
 * Hugging Face PEFT adapter_config.json beyond its peft_type.
 *
 * pr_technique.peft_type names the PEFT type a technique reads and writes
 * ("LORA").  Several techniques can share one type: PEFT writes DoRA as a
 * LORA adapter with "use_dora": true, and LoRA-FA (an optimizer in PEFT)
 * as a plain LORA adapter.  A technique that is such a variant says so
 * through its own extension_data:
 *
 *     static const pr_ext_peft_config peft = {
 *         .struct_size = sizeof peft, .implies = "{\"use_dora\": true}" };
 *     static const void *ext(const char *uri)
 *     { return strcmp(uri, PR_EXT_PEFT_CONFIG_URI) ? NULL : &peft; }
 *
 * The host's PEFT writer sets the implied fields in the config it writes.
 * Its reader picks, among the techniques of an adapter's peft_type, the
 * one whose implied fields the config all holds (an absent field matches
 * an implied false or null), the one implying the most fields when several
 * qualify; a technique marked no_import is never picked (VeRA whose
 * projections peftref regenerates from its own seed), and one with
 * folds_to is read as the technique it folds to (P_TUNING's file holds the
 * folded prompt).  A technique without this extension implies nothing.
 *
 * This header adds nothing to ABI 1's frozen structs; it includes only
 * <peftref/plugin.h>.  License: MIT */
#ifndef PEFTREF_EXT_PEFT_CONFIG_H
#define PEFTREF_EXT_PEFT_CONFIG_H

#include <stdint.h>

#include <peftref/plugin.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PR_EXT_PEFT_CONFIG_URI "urn:peftref:ext:peft-config:1"

typedef struct pr_ext_peft_config {
    uint32_t struct_size; /* sizeof(pr_ext_peft_config) of the plugin that filled it */
    /* A JSON object of the adapter_config.json fields this technique stands
     * for, or NULL: "{\"use_dora\": true}". */
    const char *implies;
    /* non-zero: never the technique a PEFT adapter is read as (LoRA-FA,
     * whose adapters PEFT writes as plain LORA ones); the writer still
     * writes it as its peft_type */
    uint32_t no_import;
} pr_ext_peft_config;

#ifdef __cplusplus
}
#endif
#endif
