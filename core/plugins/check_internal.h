/* peftref core: private declarations shared by the files of the plugin
 * conformance checker (check.c runs the checks, check_bench.c holds what
 * they stand on, check_gradient.c, check_decls.c, check_roundtrip.c and
 * check_finite.c the checks themselves).  Not installed; check.h is the checker's interface. */
#ifndef PEFTREF_CORE_CHECK_INTERNAL_H
#define PEFTREF_CORE_CHECK_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "peftref/module.h"
#include "check.h"

enum { CK_B = 2, CK_T = 6, CK_LAYER = 1 };

#define FD_EPS 3e-3
#define FD_RTOL 5e-2
#define FD_ATOL 1e-4
#define PERTURB 0.25f        /* module parameters move by uniform(-PERTURB, PERTURB) */
#define SAME_RTOL 1e-4       /* module gradients with and without an input gradient */
#define ACC_RTOL 1e-5        /* two accumulated backward passes vs twice one */
#define LABEL_MAX 160
#define DETAIL_MAX 1024

/* A test model and its fixed batch of B x T tokens. */
typedef struct bench {
    pr_model *m;
    pr_batch batch;
    int tokens[CK_B * CK_T], targets[CK_B * CK_T];
} bench;

/* The module's tensors: those registered under "<module>/" and the base
 * tensors its attach made trainable (selection). */
typedef struct tset {
    const pr_tensor_info **v;
    int *selected;           /* 1 for a selected base tensor */
    int n;
} tset;

/* One attached module and its tensors. */
typedef struct attached {
    pr_module *mod;
    char prefix[256];
    tset set;
} attached;

/* Where a check child writes: verbose notes, then one outcome line. */
typedef struct report {
    FILE *f;
    int verbose;
    int n_fail;
    char first[DETAIL_MAX];
} report;

/* ---- check_bench.c ---- */

/* The test model shapes (check.h): A for every check, B for params. */
pr_model_config chk_shape_a(void);
pr_model_config chk_shape_b(void);

int chk_bench_open(bench *b, const pr_model_config *cfg, pr_error *err);
void chk_bench_close(bench *b);
size_t chk_bench_logits_n(const bench *b);
/* The loss of a forward without targets, recomputed in double. */
int chk_bench_loss(bench *b, double *loss, pr_error *err);
/* Forward with targets and backward, accumulating (no zeroing). */
int chk_bench_fwd_bwd(bench *b, float *loss, pr_error *err);
/* chk_bench_fwd_bwd after zeroing the gradients. */
int chk_bench_step(bench *b, float *loss, pr_error *err);

int chk_site_exists(const pr_model *m, int site);
int chk_is_select(const pr_technique *t);
void chk_site_label(int site, char *buf, size_t len);
void chk_tset_free(tset *s);
int chk_tset_push(tset *s, const pr_tensor_info *t, int selected);
/* Attach t and collect the module's tensors and the base tensors the
 * attach made trainable into a->set. */
int chk_attach(bench *b, const pr_technique *t, uint32_t sites, int layer, uint64_t seed, int trainable,
               const pr_option_setting *opts, int n_opts, attached *a, pr_error *err);
void chk_perturb(const tset *s, uint64_t seed, float scale, int with_selected);
float *chk_copy_floats(const float *x, int64_t n);
void chk_format_index(const pr_tensor_info *t, int64_t flat, char *buf, size_t len);

void chk_note(report *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void chk_problem(report *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void chk_finish(report *r, const char *pass_detail);

/* ---- the checks, each run in a child (check.h says what they verify) ---- */

/* The family the test models of chk_shape_a/b have (PR_FAMILY_GPT2 unless
 * set); check_plugin_file sets it before any check runs. */
void chk_set_family(int family);
int chk_family(void);
void chk_gradient(const pr_technique *t, int site, const check_options *o, report *r);   /* check_gradient.c */
void chk_params(const pr_technique *t, const check_options *o, report *r);               /* check_decls.c */
void chk_options(const pr_technique *t, const check_options *o, report *r);              /* check_decls.c */
void chk_determinism(const pr_technique *t, const check_options *o, report *r);          /* check_roundtrip.c */
void chk_accumulation(const pr_technique *t, const check_options *o, report *r);         /* check_roundtrip.c */
void chk_save_load(const pr_technique *t, const check_options *o, report *r);            /* check_roundtrip.c */
void chk_finite(const pr_technique *t, const check_options *o, report *r);               /* check_finite.c */

#endif
