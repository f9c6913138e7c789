/* Test plugin: a parameter shape naming a dimension that does not exist. */
#include "test_plugin.h"

static const pr_param_decl params[] = {
    {.struct_size = sizeof(pr_param_decl), .name = "bias", .shape = "width, d_outt", .init = PR_INIT_ZEROS,
     .scope = PR_SCOPE_INSERTION},
};

static pr_technique tech;
static const pr_technique *const list[] = {&tech};
static pr_plugin plugin;

const pr_plugin *peftref_plugin_entry(const pr_entry_args *args)
{
    (void)args; /* a fixture: it needs none of the entry arguments */
    tp_fill(&tech, "test-bad-shape");
    tech.params = params;
    tp_plugin(&plugin, "test-bad-shape", list, 1);
    return &plugin;
}
