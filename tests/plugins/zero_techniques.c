/* Test plugin: a pr_plugin that lists no techniques. */
#include "test_plugin.h"

static pr_plugin plugin;

const pr_plugin *peftref_plugin_entry(const pr_entry_args *args)
{
    (void)args; /* a fixture: it needs none of the entry arguments */
    tp_plugin(&plugin, "test-empty", NULL, 0);
    return &plugin;
}
