/* Test plugin: the entry symbol returns NULL, after writing its reason
 * into the host's error buffer as plugin.h asks of a plugin that refuses
 * to load. */
#include <stdio.h>

#include <peftref/plugin.h>

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args);

const pr_plugin *peftref_plugin_entry(const pr_entry_args *args)
{
    if (args && args->error && args->error_size > 0)
        snprintf(args->error, args->error_size, "null_entry: refusing to load (test fixture)");
    return NULL;
}
