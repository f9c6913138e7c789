/* Test plugin: built for ABI major 2; the host must refuse it. */
#include "test_plugin.h"

static pr_technique tech;
static const pr_technique *const list[] = {&tech};
static pr_plugin plugin;

const pr_plugin *peftref_plugin_entry(const pr_entry_args *args)
{
    (void)args; /* a fixture: it needs none of the entry arguments */
    tp_fill(&tech, "test-bad-abi");
    tech.abi_major = 2;
    tp_plugin(&plugin, "test-bad-abi", list, 1);
    plugin.abi_major = 2;
    return &plugin;
}
