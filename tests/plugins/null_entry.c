/* Test plugin: the entry symbol returns NULL. */
#include <peftref/plugin.h>

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(void);

const pr_plugin *peftref_plugin_entry(void)
{
    return NULL;
}
