/* peftref: the host's functions over sites (names, aliases, kinds).
 *
 * The site identifiers themselves, and what each kind of site shows a
 * module, are in peftref/site_ids.h, which the plugin ABI includes; these
 * functions live in libpeftref, which a plugin never links against.
 */
#ifndef PEFTREF_SITE_H
#define PEFTREF_SITE_H

#ifdef __cplusplus
extern "C" {
#endif

#include "peftref/site_ids.h"

/* Canonical name, e.g. "attn.k" ("?" when out of range). */
const char *pr_site_name(int site);

/* Parse a canonical name or an alias (Hugging Face module names such as
 * "c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "q_proj", ...).
 * Returns the site, or -1 when the name is unknown. */
int pr_site_parse(const char *name);

/* 1 for projection sites (input and output differ), 0 for stream sites. */
int pr_site_is_projection(int site);

/* 1 when the site exists once per layer, 0 for model-level sites (embed). */
int pr_site_is_per_layer(int site);

#ifdef __cplusplus
}
#endif
#endif
