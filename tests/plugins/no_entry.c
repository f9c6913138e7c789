/* Test plugin: a shared object without peftref_plugin_entry. */
#include <peftref/plugin.h>

PR_PLUGIN_EXPORT int peftref_plugin_entry_misspelt(void);

int peftref_plugin_entry_misspelt(void)
{
    return PR_ABI_MAJOR;
}
