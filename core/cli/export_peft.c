/* peftref export --format peft | peftref. */
#include "config.h"

#include <stdio.h>

#include "cli.h"
#include "export.h"

int export_peft(const export_request *r)
{
    (void)r;
    fprintf(stderr, "peftref export: --format peft is not available in this build\n");
    return 1;
}

int export_peftref(const export_request *r)
{
    (void)r;
    fprintf(stderr, "peftref export: --format peftref is not available in this build\n");
    return 1;
}
