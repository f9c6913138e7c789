/* peftref: the host API (umbrella header). */
#ifndef PEFTREF_PEFTREF_H
#define PEFTREF_PEFTREF_H

#include "peftref/status.h"
#include "peftref/config.h"
#include "peftref/site.h"
#include "peftref/model.h"
#include "peftref/tokenizer.h"
#include "peftref/eval.h"
#include "peftref/train.h"
#include "peftref/head.h"
#include "peftref/plugin.h"
#include "peftref/module.h"
#include "peftref/pipeline.h"

#define PEFTREF_VERSION_MAJOR 0
#define PEFTREF_VERSION_MINOR 1

#ifdef __cplusplus
extern "C" {
#endif
/* Library version string, e.g. "0.1.0". */
const char *pr_version(void);
#ifdef __cplusplus
}
#endif
#endif
