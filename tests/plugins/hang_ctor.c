/* Test plugin: a constructor that never returns.  The registry's scanner
 * must kill the child process that loads it after its timeout
 * (PEFTREF_SCAN_TIMEOUT) and record the file as refused ("did not finish
 * loading within N s"). */
#include "test_plugin.h"

static volatile int forever = 1;

__attribute__((constructor)) static void hang_on_load(void)
{
    while (forever)
        ;
}

static pr_technique tech;
static const pr_technique *const list[] = {&tech};
static pr_plugin plugin;

const pr_plugin *peftref_plugin_entry(const pr_entry_args *args)
{
    (void)args;
    tp_fill(&tech, "test-hang-ctor");
    tp_plugin(&plugin, "test-hang-ctor", list, 1);
    return &plugin;
}
