/* example-pack: the techniques this pack's one shared object carries.
 * Each lives in its own file; pack.c lists them in the entry point.  The
 * descriptors are hidden (-fvisibility=hidden): only the entry is exported. */
#ifndef EXAMPLE_PACK_H
#define EXAMPLE_PACK_H

#include <peftref/plugin.h>

extern const pr_technique example_gain;
extern const pr_technique example_adapter;

#endif
