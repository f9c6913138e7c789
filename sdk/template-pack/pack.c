/* example-pack: one shared object, two techniques.  The host calls
 * peftref_plugin_entry once after dlopen and reads the list. */
#include "pack.h"

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args);

static const pr_technique *const techniques[] = { &example_gain, &example_adapter };

static const pr_plugin pack = {
    .struct_size = sizeof(pr_plugin),
    .abi_major = PR_ABI_MAJOR,
    .name = "example-pack",
    .version = PACKAGE_VERSION,
    .n_techniques = sizeof techniques / sizeof techniques[0],
    .techniques = techniques,
};

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args)
{
    (void)args; /* host, bundle_path, error: unused by a plugin that always loads */
    return &pack;
}
