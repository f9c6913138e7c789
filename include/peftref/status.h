/* peftref: status codes and error reports.
 *
 * Every fallible function returns a pr_status and, when given a non-NULL
 * pr_error, fills it with one line that names the file, tensor, field or
 * option involved.  Library code never exits. */
#ifndef PEFTREF_STATUS_H
#define PEFTREF_STATUS_H

#ifdef __cplusplus
extern "C" {
#endif

typedef enum pr_status {
    PR_OK = 0,
    PR_ERR_INVALID = 1,   /* bad argument or configuration */
    PR_ERR_IO = 2,        /* open/read/write/fsync/rename failed */
    PR_ERR_FORMAT = 3,    /* malformed or truncated file */
    PR_ERR_NOMEM = 4,     /* allocation failed */
    PR_ERR_NOTFOUND = 5,  /* missing file, tensor, key or name */
    PR_ERR_NUMERIC = 6,   /* NaN or infinite value */
    PR_ERR_UNSUPPORTED = 7,
    PR_ERR_INTERRUPTED = 8
} pr_status;

#define PR_ERROR_MSG_MAX 1024

typedef struct pr_error {
    pr_status code;
    char msg[PR_ERROR_MSG_MAX];
} pr_error;

/* Fill err (if non-NULL) with a printf-style message; returns code. */
pr_status pr_errorf(pr_error *err, pr_status code, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* Short stable name of a status, e.g. "format". */
const char *pr_status_name(pr_status s);

#ifdef __cplusplus
}
#endif
#endif
