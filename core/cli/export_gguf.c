/* peftref export --format gguf. */
#include "config.h"

#include <stdio.h>

#include "cli.h"
#include "export.h"

int export_gguf(const export_request *r)
{
    (void)r;
    fprintf(stderr, "peftref export: --format gguf is not available in this build\n");
    return 1;
}
