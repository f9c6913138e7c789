/* Test plugin: a technique descriptor without a name. */
#include "test_plugin.h"

static pr_technique tech;
static const pr_technique *const list[] = {&tech};
static pr_plugin plugin;

const pr_plugin *peftref_plugin_entry(const pr_entry_args *args)
{
    (void)args; /* a fixture: it needs none of the entry arguments */
    tp_fill(&tech, NULL);
    tp_plugin(&plugin, "test-no-name", list, 1);
    return &plugin;
}
