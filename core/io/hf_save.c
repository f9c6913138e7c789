/* peftref: write a model as a Hugging Face directory (GPT-2 or LLaMA family). */
#include "config.h"

#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "peftref/model.h"
#include "peftref/tokenizer.h"
#include "fileio.h"
#include "hf_config.h"

/* config.json with the Hugging Face keys of the model's family, so
 * transformers and peftref both read the directory back. */
static int write_config(const pr_model *m, const char *dir, const char *tokenizer_kind, pr_error *err)
{
    json_t *o = hf_config_json(pr_model_get_config(m), err);
    if (!o)
        return err ? err->code : PR_ERR_NOMEM;
    if (tokenizer_kind && strcmp(tokenizer_kind, "byte") == 0)
        json_object_set_new(o, "peftref_tokenizer", json_string("byte"));
    char *text = json_dumps(o, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    json_decref(o);
    if (!text)
        return pr_errorf(err, PR_ERR_NOMEM, "out of memory writing config.json");
    char *path = fileio_join(dir, "config.json");
    size_t len = strlen(text);
    text[len] = '\0';
    int rc = path ? PR_OK : pr_errorf(err, PR_ERR_NOMEM, "out of memory");
    if (!rc) {
        char *withnl = malloc(len + 2);
        if (!withnl) {
            rc = pr_errorf(err, PR_ERR_NOMEM, "out of memory");
        } else {
            memcpy(withnl, text, len);
            withnl[len] = '\n';
            rc = fileio_write_atomic(path, withnl, len + 1, err);
            free(withnl);
        }
    }
    free(path);
    free(text);
    return rc;
}

static int copy_file(const char *from_dir, const char *to_dir, const char *name, pr_error *err)
{
    char *src = fileio_join(from_dir, name), *dst = fileio_join(to_dir, name);
    char *data = NULL;
    size_t len = 0;
    int rc;
    if (!src || !dst)
        rc = pr_errorf(err, PR_ERR_NOMEM, "out of memory");
    else
        rc = fileio_read_all(src, (size_t)1 << 30, &data, &len, err);
    if (!rc)
        rc = fileio_write_atomic(dst, data, len, err);
    free(data);
    free(src);
    free(dst);
    return rc;
}

int pr_model_save_hf(const pr_model *m, const char *dir, const char *tokenizer_dir, pr_error *err)
{
    return pr_model_save_hf_as(m, dir, tokenizer_dir, "f32", err);
}

int pr_model_save_hf_as(const pr_model *m, const char *dir, const char *tokenizer_dir, const char *dtype,
                        pr_error *err)
{
    if (mkdir(dir, 0777) != 0 && errno != EEXIST)
        return pr_errorf(err, PR_ERR_IO, "%s: cannot create directory: %s", dir, strerror(errno));
    const char *kind = "byte";
    if (tokenizer_dir) {
        pr_tokenizer *tok = NULL;
        int rc = pr_tokenizer_load(tokenizer_dir, &tok, err);
        if (rc)
            return rc;
        const char *k = pr_tokenizer_kind(tok);
        kind = strcmp(k, "byte") == 0 ? "byte" : strcmp(k, "hf-bpe") == 0 ? "hf-bpe" : "gpt2-bpe";
        pr_tokenizer_free(tok);
        if (strcmp(kind, "gpt2-bpe") == 0 &&
            ((rc = copy_file(tokenizer_dir, dir, "vocab.json", err)) ||
             (rc = copy_file(tokenizer_dir, dir, "merges.txt", err))))
            return rc;
        if (strcmp(kind, "hf-bpe") == 0) {
            /* tokenizer.json, and tokenizer_config.json (bos/eos) when there is one */
            if ((rc = copy_file(tokenizer_dir, dir, "tokenizer.json", err)))
                return rc;
            char *cfg = fileio_join(tokenizer_dir, "tokenizer_config.json");
            struct stat sb;
            int have = cfg && stat(cfg, &sb) == 0;
            free(cfg);
            if (have && (rc = copy_file(tokenizer_dir, dir, "tokenizer_config.json", err)))
                return rc;
        }
    }
    int rc = write_config(m, dir, kind, err);
    if (rc)
        return rc;
    char *path = fileio_join(dir, "model.safetensors");
    if (!path)
        return pr_errorf(err, PR_ERR_NOMEM, "out of memory");
    rc = pr_model_save_safetensors_as(m, path, dtype, err);
    free(path);
    return rc;
}
