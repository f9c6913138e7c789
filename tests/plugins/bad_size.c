/* Test plugin: a technique whose struct_size is too small to hold the
 * fields of ABI 1.0. */
#include "test_plugin.h"

static pr_technique tech;
static const pr_technique *const list[] = {&tech};
static pr_plugin plugin;

const pr_plugin *peftref_plugin_entry(const pr_entry_args *args)
{
    (void)args; /* a fixture: it needs none of the entry arguments */
    tp_fill(&tech, "test-bad-size");
    tech.struct_size = 16;
    tp_plugin(&plugin, "test-bad-size", list, 1);
    return &plugin;
}
