/* Test plugin: offers "test-alpha" again, which good_a provides; the one
 * found first in the search path wins. */
#include "test_plugin.h"

static pr_technique tech;
static const pr_technique *const list[] = {&tech};
static pr_plugin plugin;

const pr_plugin *peftref_plugin_entry(const pr_entry_args *args)
{
    (void)args; /* a fixture: it needs none of the entry arguments */
    tp_fill(&tech, "test-alpha");
    tech.version = "9.9.9";
    tp_plugin(&plugin, "test-dup", list, 1);
    return &plugin;
}
