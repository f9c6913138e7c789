/* Test plugin: a constructor that writes through a null pointer, so that
 * merely loading the library (dlopen) kills the process with SIGSEGV.
 * The registry's scanner must load it in a child process and record it as
 * refused ("crashed while loading: signal 11 ..."); the entry below would
 * offer a valid technique, so nothing else could refuse it. */
#include "test_plugin.h"

/* volatile: the compiler cannot know the pointer is null, so the store is
 * emitted as written (no trap instruction in its place) */
static int *volatile nowhere;

__attribute__((constructor)) static void crash_on_load(void)
{
    *nowhere = 1;
}

static pr_technique tech;
static const pr_technique *const list[] = {&tech};
static pr_plugin plugin;

const pr_plugin *peftref_plugin_entry(const pr_entry_args *args)
{
    (void)args;
    tp_fill(&tech, "test-crash-ctor");
    tp_plugin(&plugin, "test-crash-ctor", list, 1);
    return &plugin;
}
