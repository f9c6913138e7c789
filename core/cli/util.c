/* peftref command-line helpers shared by the subcommands. */
#include "config.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli.h"

int cli_read_file(const char *path, char **data, size_t *len, pr_error *err)
{
    FILE *f = strcmp(path, "-") == 0 ? stdin : fopen(path, "rb");
    if (!f)
        return pr_errorf(err, PR_ERR_IO, "%s: %s", path, strerror(errno));
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap + 1);
    if (!buf) {
        if (f != stdin)
            fclose(f);
        return pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", path);
    }
    for (;;) {
        if (n == cap) {
            char *nb = realloc(buf, 2 * cap + 1);
            if (!nb) {
                free(buf);
                if (f != stdin)
                    fclose(f);
                return pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", path);
            }
            buf = nb;
            cap *= 2;
        }
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (got == 0)
            break;
    }
    int bad = ferror(f);
    if (f != stdin)
        fclose(f);
    if (bad) {
        free(buf);
        return pr_errorf(err, PR_ERR_IO, "%s: read error", path);
    }
    buf[n] = '\0';
    *data = buf;
    *len = n;
    return PR_OK;
}

int cli_parse_int(const char *cmd, const char *opt, const char *s, int min, int max, int *out)
{
    char *end = NULL;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < min || v > max) {
        fprintf(stderr, "peftref %s: %s expects an integer in [%d, %d], got '%s'\n", cmd, opt, min, max, s);
        return 2;
    }
    *out = (int)v;
    return 0;
}

int cli_load_model(const char *dir, const char *preset, long long seed, pr_model **m, pr_error *err)
{
    if (dir)
        return pr_model_load_hf(dir, m, err);
    pr_model_config cfg;
    if (pr_config_preset(preset, &cfg) != PR_OK)
        return pr_errorf(err, PR_ERR_NOTFOUND, "unknown preset '%s' (known: %s)", preset, pr_config_preset_names());
    if (seed >= 0)
        cfg.seed = (uint64_t)seed;
    return pr_model_create(&cfg, m, err);
}

int cli_load_tokenizer(const char *dir, const pr_model *m, pr_tokenizer **tok, pr_error *err)
{
    if (dir)
        return pr_tokenizer_load(dir, tok, err);
    if (pr_model_get_config(m)->vocab_size == 256)
        return pr_tokenizer_byte(tok, err);
    return pr_errorf(err, PR_ERR_INVALID,
                     "this preset's vocabulary (%d) needs a tokenizer: give --tokenizer DIR",
                     pr_model_get_config(m)->vocab_size);
}

const char *cli_pipeline_file(const char *arg, char *buf, size_t len)
{
    struct stat st;
    if (!arg)
        return NULL;
    if (stat(arg, &st) == 0 && S_ISDIR(st.st_mode)) {
        snprintf(buf, len, "%s/pipeline.yaml", arg);
        return buf;
    }
    if (cli_is_pipeline(arg)) {
        snprintf(buf, len, "%s", arg);
        return buf;
    }
    return NULL;
}

int cli_pipeline_build(const char *cmd, const char *arg, const char *const *sets, int n_sets, pr_registry **reg,
                       pr_pipeline **pipe, pr_model **m, pr_tokenizer **tok)
{
    char path[4096];
    *reg = NULL;
    *pipe = NULL;
    *m = NULL;
    *tok = NULL;
    if (!cli_pipeline_file(arg, path, sizeof path)) {
        fprintf(stderr, "peftref %s: '%s' is neither a pipeline (.yaml) nor a run directory\n", cmd, arg);
        return 2;
    }
    int rc = cli_pipeline_open(cmd, path, sets, n_sets, reg, pipe);
    if (rc == 0) {
        pr_error err = {0};
        if (pr_pipeline_build(*pipe, m, tok, &err)) {
            fprintf(stderr, "peftref %s: %s\n", cmd, err.msg);
            rc = 1;
        }
    }
    if (rc) {
        pr_pipeline_free(*pipe);
        pr_registry_free(*reg);
        *pipe = NULL;
        *reg = NULL;
    }
    return rc;
}

void cli_warn_shadowed(const char *cmd, const pr_registry *reg, const char *name)
{
    const char *winner, *loser;
    for (int i = 0; pr_registry_shadowed(reg, name, i, &winner, &loser); i++)
        fprintf(stderr, "peftref %s: warning: technique '%s' is provided by both %s and %s; using %s\n", cmd, name,
                winner, loser, winner);
}

void cli_warn_shadowed_pipeline(const char *cmd, const pr_registry *reg, const pr_pipeline *pipe)
{
    int n = pr_pipeline_n_modules(pipe);
    for (int i = 0; i < n; i++) {
        pr_module_spec spec;
        if (pr_pipeline_module_spec(pipe, i, &spec) != PR_OK || !spec.technique || !spec.technique->name)
            continue;
        int again = 0;   /* a technique several modules use is warned about once */
        for (int j = 0; j < i && !again; j++) {
            pr_module_spec prev;
            again = pr_pipeline_module_spec(pipe, j, &prev) == PR_OK && prev.technique &&
                    prev.technique->name && strcmp(prev.technique->name, spec.technique->name) == 0;
        }
        if (!again)
            cli_warn_shadowed(cmd, reg, spec.technique->name);
    }
}

void cli_sharing_text(const pr_technique *t, const char *const *words, int n_words, char *buf, size_t len)
{
    uint32_t set = t->sharing_set ? t->sharing_set : PR_SHARE_BIT(t->sharing);
    size_t k = 0;
    buf[0] = '\0';
    for (int v = 1; v <= n_words; v++)
        if (set & PR_SHARE_BIT(v) && k < len)
            k += (size_t)snprintf(buf + k, len - k, "%s%s", k ? ", " : "", words[v - 1]);
    if (!buf[0])
        snprintf(buf, len, "?");
}
