/* Test plugin: the entry symbol dereferences a null pointer.  The library
 * loads; calling peftref_plugin_entry kills the process with SIGSEGV, so
 * the registry's scanner must call it in a child process and record the
 * file as refused ("crashed while loading: signal 11 ..."). */
#include "test_plugin.h"

static const pr_plugin *volatile nothing;

const pr_plugin *peftref_plugin_entry(const pr_entry_args *args)
{
    (void)args;
    /* reads struct_size through a null pointer */
    if (nothing->struct_size == 0)
        return NULL;
    return nothing;
}
