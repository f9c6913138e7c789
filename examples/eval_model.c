/* Example: load a model through the public C API and evaluate it.
 *
 *   eval_model MODEL_DIR TEXT_FILE [SEQ_LEN]
 *
 * Build against an installed peftref with
 *   cc eval_model.c $(pkg-config --cflags --libs peftref) -o eval_model */
#include <stdio.h>
#include <stdlib.h>

#include <peftref/peftref.h>

static char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = n >= 0 ? malloc((size_t)n + 1) : NULL;
    if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    if (buf) {
        buf[n] = '\0';
        *len = (size_t)n;
    }
    return buf;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL_DIR TEXT_FILE [SEQ_LEN]\n", argv[0]);
        return 2;
    }
    int T = argc > 3 ? atoi(argv[3]) : 64;
    pr_error err = {0};
    pr_model *model = NULL;
    pr_tokenizer *tok = NULL;
    int *ids = NULL;
    size_t len = 0, n = 0;
    int rc = 1;

    char *text = slurp(argv[2], &len);
    if (!text) {
        fprintf(stderr, "cannot read %s\n", argv[2]);
        return 1;
    }
    if (pr_model_load_hf(argv[1], &model, &err) || pr_tokenizer_load(argv[1], &tok, &err) ||
        pr_tokenizer_encode(tok, text, len, &ids, &n, &err)) {
        fprintf(stderr, "error: %s\n", err.msg);
        goto out;
    }
    pr_eval_result res;
    if (pr_eval_tokens(model, ids, n, T, 4, &res, &err)) {
        fprintf(stderr, "error: %s\n", err.msg);
        goto out;
    }
    printf("%s: %lld tokens, loss %.4f nats, perplexity %.3f\n", argv[2], (long long)res.tokens,
           res.loss, res.perplexity);
    rc = 0;
out:
    free(ids);
    free(text);
    pr_tokenizer_free(tok);
    pr_model_free(model);
    return rc;
}
