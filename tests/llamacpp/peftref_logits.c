/* The logits peftref computes for a token sequence, for the llama.cpp
 * comparison (tests/llamacpp/check.sh):
 *
 *   peftref_logits PIPELINE.yaml TOKENS OUT.bin   one full forward of the
 *       pipeline's model with its modules (TOKENS "1,2,3"); OUT.bin is
 *       n_tokens x vocab f32, row-major, little-endian
 *   peftref_logits --diff A.bin B.bin             max |a - b| / max |b|
 *
 * Plugins come from PEFTREF_PLUGIN_PATH. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "peftref/peftref.h"

static float *read_floats(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    float *p = len > 0 ? malloc((size_t)len) : NULL;
    *n = p && fread(p, 1, (size_t)len, f) == (size_t)len ? (size_t)len / sizeof *p : 0;
    fclose(f);
    return p;
}

static int diff(const char *a, const char *b)
{
    size_t na, nb;
    float *x = read_floats(a, &na), *y = read_floats(b, &nb);
    if (!x || !y || na != nb || na == 0) {
        fprintf(stderr, "peftref_logits: %s and %s do not hold the same number of logits\n", a, b);
        return 1;
    }
    double d = 0, s = 0;
    for (size_t i = 0; i < na; i++) {
        d = fmax(d, fabs((double)x[i] - y[i]));
        s = fmax(s, fabs((double)y[i]));
    }
    printf("%.3e\n", d / s);
    free(x);
    free(y);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 4 && strcmp(argv[1], "--diff") == 0)
        return diff(argv[2], argv[3]);
    if (argc != 4) {
        fprintf(stderr, "usage: peftref_logits PIPELINE.yaml TOKENS OUT.bin | --diff A.bin B.bin\n");
        return 2;
    }
    int tokens[4096], n = 0;
    for (char *s = argv[2], *end; *s && n < 4096; s = *end ? end + 1 : end) {
        tokens[n++] = (int)strtol(s, &end, 10);
        if (end == s)
            break;
    }
    pr_error err = {0};
    pr_registry *reg = NULL;
    pr_pipeline *pipe = NULL;
    pr_model *m = NULL;
    pr_tokenizer *tok = NULL;
    float loss;
    pr_batch batch = {tokens, NULL, 1, n, 0};
    if (pr_registry_open(NULL, &reg, &err) || pr_pipeline_load(argv[1], NULL, 0, reg, &pipe, &err) ||
        pr_pipeline_build(pipe, &m, &tok, &err) || pr_model_reserve(m, 1, n, &err) ||
        pr_model_forward(m, &batch, &loss, &err)) {
        fprintf(stderr, "peftref_logits: %s\n", err.msg);
        return 1;
    }
    size_t V = (size_t)pr_model_get_config(m)->vocab_size;
    FILE *f = fopen(argv[3], "wb");
    if (!f || fwrite(pr_model_logits(m), sizeof(float), (size_t)n * V, f) != (size_t)n * V || fclose(f)) {
        fprintf(stderr, "peftref_logits: cannot write %s\n", argv[3]);
        return 1;
    }
    printf("%d tokens x %zu logits, %d module%s\n", n, V, pr_model_n_modules(m), pr_model_n_modules(m) == 1 ? "" : "s");
    pr_tokenizer_free(tok);
    pr_model_free(m);
    pr_pipeline_free(pipe);
    pr_registry_free(reg);
    return 0;
}
