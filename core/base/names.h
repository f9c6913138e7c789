/* peftref core: small helpers for names in messages and suggestions. */
#ifndef PEFTREF_CORE_NAMES_H
#define PEFTREF_CORE_NAMES_H

#include <stddef.h>
#include <stdint.h>

/* Canonical names of the sites in a PR_SITE_BIT mask, comma-separated,
 * into buf; `none` when the mask is empty. */
void names_site_mask(uint32_t mask, const char *none, char *buf, size_t len);

/* Optimal-string-alignment distance (edits and adjacent transpositions),
 * case-insensitive, with '-' and '_' alike: "lroa" is one edit from
 * "lora".  Strings longer than 64 bytes are INT_MAX apart. */
int names_edit_distance(const char *a, const char *b);

#endif
