/* peftref core: a run's output directory.
 *
 * The lock: OUT/.lock holds "PID HOSTNAME\n" of the process writing the
 * run.  It is created whole (written under a temporary name, then linked to
 * .lock, which fails when .lock exists: the O_EXCL rule; plain O_EXCL where
 * hard links are not supported) and removed when the run is done.  A lock
 * whose pid is dead on this host (or is this process's own pid without this
 * process holding it: a reused pid) is stale and taken over; a lock of
 * another host is never taken over.  The lock is re-entrant within a
 * process (counted), so a command can hold it across pr_train and the
 * outputs it writes after. */
#ifndef PEFTREF_CORE_RUN_DIR_H
#define PEFTREF_CORE_RUN_DIR_H

#include <stdint.h>
#include "peftref/status.h"

/* mkdir -p dir. */
int run_dir_make(const char *dir, pr_error *err);
/* Take (or count once more) dir's lock, creating dir; an error names the
 * holder's pid and host. */
int run_dir_lock(const char *dir, pr_error *err);
/* Release one count; the last removes the lock file. */
void run_dir_unlock(const char *dir);
/* Remove temporary files of atomic writes (NAME.tmp.<pid>.<16 hex>) whose
 * pid is dead or is this process's (which writes none while it starts), in
 * dir and dir/modules.  Returns how many were removed. */
int run_dir_clean_temps(const char *dir);
/* Cut metrics.jsonl at path back to step: keep whole lines up to the first
 * one whose "step" is beyond it (and a last line without its newline).
 * Rewrites the file atomically only when something is cut. */
int run_dir_truncate_metrics(const char *path, int64_t step, pr_error *err);

#endif
