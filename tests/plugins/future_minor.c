/* Test plugin: built against a later ABI 1.x whose technique and option
 * structs grew at the end.  The host must read only the fields it knows,
 * walk the options with this plugin's element size, and load it. */
#include "test_plugin.h"

typedef struct future_option {
    pr_option_decl base;
    const char *future_unit;
    double future_step;
} future_option;

typedef struct future_technique {
    pr_technique base;
    const char *future_field;
    uint64_t future_flags[3];
} future_technique;

static const future_option opts[] = {
    {.base = {.struct_size = sizeof(future_option), .name = "width", .type = PR_OPT_INT, .def = 2, .min = 1,
              .max = 8, .help = "first option"},
     .future_unit = "units", .future_step = 1},
    {.base = {.struct_size = sizeof(future_option), .name = "gain", .type = PR_OPT_FLOAT, .def = 0.5, .min = 0,
              .max = 1, .help = "second option"},
     .future_unit = "ratio", .future_step = 0.1},
};

static future_technique tech;
static const pr_technique *const list[] = {&tech.base};
static pr_plugin plugin;

const pr_plugin *peftref_plugin_entry(const pr_entry_args *args)
{
    (void)args; /* a fixture: it needs none of the entry arguments */
    tp_fill(&tech.base, "test-future");
    tech.base.struct_size = sizeof tech;
    tech.base.options = &opts[0].base;
    tech.base.n_options = 2;
    tech.future_field = "ignored by an ABI 1.0 host";
    tp_plugin(&plugin, "test-future", list, 1);
    return &plugin;
}
