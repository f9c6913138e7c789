/* Test plugin: the library of a technique pack.  It is built twice, as
 * pack_good (technique "pack-good") and pack_bad ("pack-bad"); the tests
 * pair each with a manifest.json that agrees or disagrees with it. */
#include "test_plugin.h"

#ifndef PACK_TECHNIQUE
#error "PACK_TECHNIQUE must name the technique"
#endif

static pr_technique tech;
static const pr_technique *const list[] = {&tech};
static pr_plugin plugin;

const pr_plugin *peftref_plugin_entry(const pr_entry_args *args)
{
    (void)args; /* a fixture: it needs none of the entry arguments */
    tp_fill(&tech, PACK_TECHNIQUE);
    tp_plugin(&plugin, PACK_TECHNIQUE, list, 1);
    return &plugin;
}
