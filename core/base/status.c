/* peftref: status codes and error reports. */
#include <stdarg.h>
#include <stdio.h>

#include "config.h"
#include "peftref/peftref.h"

pr_status pr_errorf(pr_error *err, pr_status code, const char *fmt, ...)
{
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
        err->code = code;
    }
    return code;
}

const char *pr_status_name(pr_status s)
{
    switch (s) {
    case PR_OK: return "ok";
    case PR_ERR_INVALID: return "invalid";
    case PR_ERR_IO: return "io";
    case PR_ERR_FORMAT: return "format";
    case PR_ERR_NOMEM: return "nomem";
    case PR_ERR_NOTFOUND: return "notfound";
    case PR_ERR_NUMERIC: return "numeric";
    case PR_ERR_UNSUPPORTED: return "unsupported";
    case PR_ERR_INTERRUPTED: return "interrupted";
    }
    return "unknown";
}

const char *pr_version(void)
{
    return PACKAGE_VERSION;
}
