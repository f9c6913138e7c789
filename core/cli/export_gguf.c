/* peftref export --format gguf: a run's LoRA module as a llama.cpp
 * adapter, or (--base) the model with the run's modules merged into it, or
 * a Hugging Face model directory as it is (core/io/gguf_export.c). */
#include "config.h"

#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "cli.h"
#include "export.h"
#include "core/io/gguf.h"
#include "core/io/gguf_export.h"

static int out_exists(const export_request *r)
{
    struct stat st;
    if (!r->force && lstat(r->out, &st) == 0) {
        fprintf(stderr, "peftref export: %s exists (--force replaces it)\n", r->out);
        return 1;
    }
    return 0;
}

/* The module to export: --module NAME, else the run's only module. */
static pr_module *pick_module(const export_request *r, pr_model *m)
{
    int n = pr_model_n_modules(m);
    if (r->module) {
        for (int i = 0; i < n; i++)
            if (strcmp(pr_module_name(pr_model_module(m, i)), r->module) == 0)
                return pr_model_module(m, i);
        fprintf(stderr, "peftref export: the run has no module '%s'\n", r->module);
        return NULL;
    }
    if (n == 1)
        return pr_model_module(m, 0);
    if (n == 0)
        fprintf(stderr, "peftref export: the run has no module to export (--base writes its model)\n");
    else
        fprintf(stderr, "peftref export: the run has %d modules; name one with --module\n", n);
    return NULL;
}

/* Fold every module of m into its weights (as peftref merge does). */
static int merge_all(pr_model *m)
{
    pr_error err = {0};
    for (int i = 0; i < pr_model_n_modules(m); i++) {
        pr_module *mod = pr_model_module(m, i);
        const pr_technique *t = pr_module_technique(mod);
        if (t->integration == PR_INTEGRATE_SELECT)
            continue;   /* its values are the base tensors themselves */
        if (pr_module_merge(mod, &err) != PR_OK) {
            fprintf(stderr, "peftref export: module '%s' (technique %s) cannot be merged into the model: %s\n",
                    pr_module_name(mod), t->name, err.msg);
            return 1;
        }
    }
    return 0;
}

int export_gguf(const export_request *r)
{
    if (out_exists(r))
        return 1;
    int type = r->dtype && strcmp(r->dtype, "f16") == 0 ? GGUF_TENSOR_F16 : GGUF_TENSOR_F32;
    pr_error err = {0};
    char buf[4096];
    if (r->base && !cli_pipeline_file(r->src, buf, sizeof buf)) {
        fprintf(stderr, "peftref export: '%s' is not a run directory or pipeline\n", r->src);
        return 2;
    }
    struct stat st;
    if (r->base && stat(buf, &st) != 0) {
        /* a directory without pipeline.yaml: a Hugging Face model directory */
        pr_model *m = NULL;
        pr_tokenizer *tok = NULL;
        int rc = 0;
        if (pr_model_load_hf(r->src, &m, &err) || pr_tokenizer_load(r->src, &tok, &err) ||
            gguf_export_model(m, tok, r->src, r->out, type, &err)) {
            fprintf(stderr, "peftref export: %s\n", err.msg);
            rc = 1;
        } else
            printf("wrote %s: the model of %s for llama.cpp (%s, %s)\n", r->out, r->src,
                   gguf_arch_for(pr_model_get_config(m), 0, &err), type == GGUF_TENSOR_F16 ? "f16" : "f32");
        pr_tokenizer_free(tok);
        pr_model_free(m);
        return rc;
    }
    pr_registry *reg = NULL;
    pr_pipeline *pipe = NULL;
    pr_model *m = NULL;
    pr_tokenizer *tok = NULL;
    int rc = cli_pipeline_build("export", r->src, r->sets, r->n_sets, &reg, &pipe, &m, &tok);
    if (rc)
        return rc;
    if (r->base) {
        int n = pr_model_n_modules(m);
        rc = merge_all(m);
        if (rc == 0 && gguf_export_model(m, tok, pr_pipeline_tokenizer_dir(pipe), r->out, type, &err)) {
            fprintf(stderr, "peftref export: %s\n", err.msg);
            rc = 1;
        }
        if (rc == 0)
            printf("wrote %s: the model for llama.cpp (%s, %s), %d module%s merged\n", r->out,
                   gguf_arch_for(pr_model_get_config(m), 0, &err), type == GGUF_TENSOR_F16 ? "f16" : "f32", n,
                   n == 1 ? "" : "s");
    } else {
        pr_module *mod = pick_module(r, m);
        gguf_lora_summary s;
        if (!mod)
            rc = 1;
        else if (gguf_export_lora(mod, r->out, &s, &err)) {
            fprintf(stderr, "peftref export: %s\n", err.msg);
            rc = 1;
        } else {
            printf("wrote %s: adapter '%s' for llama.cpp (%s), %d tensor pair%s, %s %g\n",
                   r->out, pr_module_name(mod), gguf_arch_for(pr_model_get_config(m), 1, &err), s.tensors,
                   s.tensors == 1 ? "" : "s", s.alpha_key, (double)s.alpha);
            if (s.folded_into_b)
                printf("  %d pair%s carry their scale in lora_b (ranks or scales differ from the first pair's)\n",
                       s.folded_into_b, s.folded_into_b == 1 ? "" : "s");
            if (s.stacked)
                printf("  %d pair%s stack several updates (fused qkv, or a frozen copy of the initial factors)\n", s.stacked,
                       s.stacked == 1 ? "" : "s");
            if (s.permuted)
                printf("  %d pair%s have lora_b rows in llama.cpp's RoPE order (q, k)\n", s.permuted,
                       s.permuted == 1 ? "" : "s");
        }
    }
    pr_tokenizer_free(tok);
    pr_model_free(m);
    pr_pipeline_free(pipe);
    pr_registry_free(reg);
    return rc;
}
