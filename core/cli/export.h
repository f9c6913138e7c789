/* peftref export: the request cmd_export.c parses, and one writer per
 * format (export_peft.c, export_gguf.c).  Each writer prints its own
 * errors as "peftref export: ..." and returns the exit status (0 written,
 * 1 error); nothing is left at `out` when it fails. */
#ifndef PEFTREF_CLI_EXPORT_H
#define PEFTREF_CLI_EXPORT_H

typedef struct export_request {
    const char *src;      /* a run directory, PIPELINE.yaml, or (gguf --base) a Hugging Face model directory */
    const char *out;      /* DIR (peft, peftref) or FILE.gguf (gguf) */
    int base;             /* gguf: write the base model (with the run's modules merged), not an adapter */
    const char *dtype;    /* gguf --base: "f32" (default) or "f16" */
    int force;            /* replace an existing output */
    const char *module;   /* --module NAME: that module of the run; NULL: the run's only module */
    const char *const *sets;  /* --set KEY=VALUE overrides of the pipeline */
    int n_sets;
} export_request;

/* --format peft (Hugging Face PEFT's adapter directory) and --format
 * peftref (peftref's own module file), export_peft.c. */
int export_peft(const export_request *r);
int export_peftref(const export_request *r);
/* --format gguf: a llama.cpp LoRA adapter, or with base the model, export_gguf.c. */
int export_gguf(const export_request *r);

#endif
