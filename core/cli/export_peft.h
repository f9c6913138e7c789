/* peftref export --format peft: what export_peft.c (the run, the saved
 * module's tensors, PeftConfig's common fields and the writing) and
 * export_peft_host.c (the pr_peft_writer services a technique's write()
 * uses, include/peftref/ext/peft_config.h) share. */
#ifndef PEFTREF_CLI_EXPORT_PEFT_H
#define PEFTREF_CLI_EXPORT_PEFT_H

#include <jansson.h>
#include <stdint.h>

#include <peftref/ext/peft_config.h>

#include "peftref/module.h"
#include "peftref/pipeline.h"
#include "safetensors.h"

/* print "peftref export: ..." and a newline; evaluates to 1 (an exit status) */
#define ERR(...) (fprintf(stderr, "peftref export: " __VA_ARGS__), fputc('\n', stderr), 1)

/* the run and its module */
typedef struct job {
    pr_registry *reg;
    pr_pipeline *pipe;
    pr_model *m;
    pr_tokenizer *tok;
    pr_module *mod;
    const pr_technique *t;
    const pr_model_config *cfg;
} job;

typedef struct tensor_out {
    char name[256];
    int ndim;
    int64_t shape[4];
    float *data;
} tensor_out;

/* the adapter being written: its tensors in file order */
typedef struct adapter {
    tensor_out *t;
    int n;
    st_file *st;             /* the module as saved (PEFT names) */
} adapter;

/* A new tensor at the end of a's list (data uninitialised), NULL when out
 * of memory; earlier tensor_out pointers may move, their data does not. */
tensor_out *xp_add_tensor(adapter *a, const char *name, int ndim, const int64_t *shape);

/* The technique's write(): its type's fields into c and its tensors into
 * a, through the pr_peft_writer table.  0, or 1 after printing the error
 * ("peftref export: <message>").  note (note_len bytes) gets the words the
 * writer asked to add to the "wrote ..." line, "" when none. */
int xp_write_type(job *j, adapter *a, json_t *c, int (*write)(const pr_peft_writer *, pr_peft_out *), char *note,
                  size_t note_len);

#endif
