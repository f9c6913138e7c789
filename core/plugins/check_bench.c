/* peftref core, plugin conformance checker: what every check stands on.
 *
 * The two test model shapes, the bench (a model with its fixed batch),
 * attaching a technique and collecting the tensors the attach made
 * trainable, moving and copying them, and the report a check child writes
 * its notes, problems and outcome line to. */
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check_internal.h"
#include "rng.h"

/* ---- test models --------------------------------------------------------------------------- */

static int shape_family = PR_FAMILY_GPT2;

void chk_set_family(int family)
{
    shape_family = family == PR_FAMILY_LLAMA ? PR_FAMILY_LLAMA : PR_FAMILY_GPT2;
}

int chk_family(void)
{
    return shape_family;
}

/* A: 2 layers, C 32, H 4, F 64, V 64 (init_std 0.1 so that the loss
 * depends visibly on every tensor, as in the model tests).  LLaMA family:
 * llama-tiny at these sizes, grouped-query (Hkv 2), with Llama's
 * attention_bias and mlp_bias on so that every projection has a bias for
 * the techniques that train or fold one. */
pr_model_config chk_shape_a(void)
{
    pr_model_config c;
    memset(&c, 0, sizeof c);
    pr_config_preset(shape_family == PR_FAMILY_LLAMA ? "llama-tiny" : "gpt2-tiny", &c);
    c.n_layers = 2;
    c.d_model = 32;
    c.n_heads = 4;
    c.n_kv_heads = shape_family == PR_FAMILY_LLAMA ? 2 : 4;
    c.d_head = 8;
    c.d_ff = 64;
    c.vocab_size = 64;
    c.max_seq = 64;
    c.init_std = 0.1f;
    c.seed = 11;
    if (shape_family == PR_FAMILY_LLAMA)
        c.qkv_bias = c.o_bias = c.mlp_bias = 1;
    return c;
}

/* B: 3 layers, grouped-query attention (Hkv < H) and d_head != C/H, so
 * widths that a technique derives wrongly from d_model show up.  LLaMA
 * family: a Qwen2 (q/k/v biases only), tied head, d_head 6 (RoPE needs
 * an even one). */
pr_model_config chk_shape_b(void)
{
    pr_model_config c = chk_shape_a();
    c.n_layers = 3;
    c.d_model = 24;
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.d_head = 5;
    c.d_ff = 40;
    c.vocab_size = 50;
    if (shape_family == PR_FAMILY_LLAMA) {
        c.variant = PR_VARIANT_QWEN2;
        c.d_head = 6;
        c.o_bias = c.mlp_bias = 0;
        c.tied_head = 1;
    }
    return c;
}

int chk_bench_open(bench *b, const pr_model_config *cfg, pr_error *err)
{
    memset(b, 0, sizeof *b);
    int rc = pr_model_create(cfg, &b->m, err);
    if (rc == PR_OK)
        rc = pr_model_reserve(b->m, CK_B, CK_T, err);
    if (rc)
        return rc;
    pr_rng r;
    rng_seed(&r, 1234);
    for (int i = 0; i < CK_B * CK_T; i++) {
        b->tokens[i] = (int)(rng_next(&r) % (uint64_t)cfg->vocab_size);
        b->targets[i] = (int)(rng_next(&r) % (uint64_t)cfg->vocab_size);
    }
    b->batch.tokens = b->tokens;
    b->batch.targets = b->targets;
    b->batch.B = CK_B;
    b->batch.T = CK_T;
    return PR_OK;
}

void chk_bench_close(bench *b)
{
    if (b->m) {
        pr_model_detach_modules(b->m);
        pr_model_free(b->m);
    }
    b->m = NULL;
}

size_t chk_bench_logits_n(const bench *b)
{
    return (size_t)CK_B * CK_T * (size_t)pr_model_get_config(b->m)->vocab_size;
}

/* Mean cross-entropy of the last forward, recomputed in double from the
 * logits so that finite differences are not limited by a float sum. */
static double bench_ce(const bench *b)
{
    const float *logits = pr_model_logits(b->m);
    int V = pr_model_get_config(b->m)->vocab_size;
    double sum = 0;
    for (int i = 0; i < CK_B * CK_T; i++) {
        const float *row = logits + (size_t)i * V;
        double mx = row[0], z = 0;
        for (int v = 1; v < V; v++)
            mx = fmax(mx, row[v]);
        for (int v = 0; v < V; v++)
            z += exp(row[v] - mx);
        sum += mx + log(z) - row[b->targets[i]];
    }
    return sum / (CK_B * CK_T);
}

int chk_bench_loss(bench *b, double *loss, pr_error *err)
{
    int rc = pr_model_forward(b->m, &b->batch, NULL, err);
    if (rc)
        return rc;
    *loss = bench_ce(b);
    return PR_OK;
}

/* Forward with targets and backward, accumulating (no zeroing). */
int chk_bench_fwd_bwd(bench *b, float *loss, pr_error *err)
{
    float l = 0;
    int rc = pr_model_forward(b->m, &b->batch, &l, err);
    if (rc == PR_OK)
        rc = pr_model_backward(b->m, err);
    if (loss)
        *loss = l;
    return rc;
}

int chk_bench_step(bench *b, float *loss, pr_error *err)
{
    pr_model_zero_grad(b->m);
    return chk_bench_fwd_bwd(b, loss, err);
}

/* ---- a module and its tensors ------------------------------------------------------------------ */

int chk_site_exists(const pr_model *m, int site)
{
    return pr_model_site_dims(m, site, NULL, NULL) == 0;
}

int chk_is_select(const pr_technique *t)
{
    return t->integration == PR_INTEGRATE_SELECT || t->adaptation == PR_ADAPT_SELECTION;
}

void chk_site_label(int site, char *buf, size_t len)
{
    if (site < 0)
        snprintf(buf, len, "default sites");
    else if (pr_site_is_per_layer(site))
        snprintf(buf, len, "h.%d.%s", CK_LAYER, pr_site_name(site));
    else
        snprintf(buf, len, "%s", pr_site_name(site));
}

void chk_tset_free(tset *s)
{
    free(s->v);
    free(s->selected);
    memset(s, 0, sizeof *s);
}

int chk_tset_push(tset *s, const pr_tensor_info *t, int selected)
{
    const pr_tensor_info **v = realloc(s->v, (size_t)(s->n + 1) * sizeof *v);
    if (!v)
        return -1;
    s->v = v;
    int *sel = realloc(s->selected, (size_t)(s->n + 1) * sizeof *sel);
    if (!sel)
        return -1;
    s->selected = sel;
    s->v[s->n] = t;
    s->selected[s->n++] = selected;
    return 0;
}

static int has_prefix(const char *s, const char *prefix)
{
    return strncmp(s, prefix, strlen(prefix)) == 0;
}

/* trainable flags of the table before an attach */
static unsigned char *trainable_flags(const pr_model *m, int *n)
{
    *n = pr_model_n_tensors(m);
    unsigned char *f = calloc((size_t)*n + 1, 1);
    for (int i = 0; f && i < *n; i++)
        f[i] = (unsigned char)(pr_model_tensor(m, i)->trainable != 0);
    return f;
}

int chk_attach(bench *b, const pr_technique *t, uint32_t sites, int layer, uint64_t seed, int trainable,
               const pr_option_setting *opts, int n_opts, attached *a, pr_error *err)
{
    memset(a, 0, sizeof *a);
    int n_before = 0;
    unsigned char *before = trainable_flags(b->m, &n_before);
    if (!before)
        return pr_errorf(err, PR_ERR_NOMEM, "out of memory");
    pr_module_spec s;
    memset(&s, 0, sizeof s);
    s.technique = t;
    s.sites = sites;
    s.layers = layer >= 0 ? &layer : NULL;
    s.n_layers = layer >= 0 ? 1 : 0;
    s.options = opts;
    s.n_options = n_opts;
    s.trainable = trainable;
    s.seed = seed;
    int rc = pr_module_attach(b->m, &s, &a->mod, err);
    if (rc) {
        free(before);
        return rc;
    }
    snprintf(a->prefix, sizeof a->prefix, "%s/", pr_module_name(a->mod));
    for (int i = 0; i < pr_model_n_tensors(b->m) && rc == PR_OK; i++) {
        const pr_tensor_info *ti = pr_model_tensor(b->m, i);
        int mine = has_prefix(ti->name, a->prefix);
        int sel = !mine && i < n_before && ti->trainable && !before[i];
        if ((mine || sel) && chk_tset_push(&a->set, ti, sel))
            rc = pr_errorf(err, PR_ERR_NOMEM, "out of memory");
    }
    free(before);
    return rc;
}

/* Move the module's own tensors (not selected base tensors unless asked)
 * off their initial values: x += uniform(-scale, scale). */
void chk_perturb(const tset *s, uint64_t seed, float scale, int with_selected)
{
    pr_rng r;
    rng_seed(&r, seed);
    for (int k = 0; k < s->n; k++) {
        if (s->selected[k] && !with_selected)
            continue;
        float *x = s->v[k]->data;
        for (int64_t i = 0; i < s->v[k]->numel; i++)
            x[i] += scale * (2.0f * rng_uniform(&r) - 1.0f);
    }
}

float *chk_copy_floats(const float *x, int64_t n)
{
    float *c = malloc((size_t)(n > 0 ? n : 1) * sizeof *c);
    if (c && n > 0)
        memcpy(c, x, (size_t)n * sizeof *c);
    return c;
}

/* "[i, j]" of flat index i in a tensor of that shape */
void chk_format_index(const pr_tensor_info *t, int64_t flat, char *buf, size_t len)
{
    int64_t idx[4] = { 0 };
    for (int d = t->ndim - 1; d >= 0; d--) {
        int64_t n = t->shape[d] > 0 ? t->shape[d] : 1;
        idx[d] = flat % n;
        flat /= n;
    }
    size_t o = 0;
    o += (size_t)snprintf(buf, len, "[");
    for (int d = 0; d < t->ndim && o < len; d++)
        o += (size_t)snprintf(buf + o, len - o, "%s%lld", d ? ", " : "", (long long)idx[d]);
    if (o < len)
        snprintf(buf + o, len - o, "]");
}

/* ---- what a child reports ----------------------------------------------------------------------- */

void chk_note(report *r, const char *fmt, ...)
{
    if (!r->verbose)
        return;
    va_list ap;
    va_start(ap, fmt);
    fputs("    ", r->f);
    vfprintf(r->f, fmt, ap);
    fputc('\n', r->f);
    va_end(ap);
    fflush(r->f);
}

/* A problem: the first one becomes the check's detail line. */
void chk_problem(report *r, const char *fmt, ...)
{
    char buf[DETAIL_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (r->n_fail++ == 0)
        snprintf(r->first, sizeof r->first, "%s", buf);
    chk_note(r, "problem: %s", buf);
}

/* The outcome line: FAIL with the first problem, or PASS with detail. */
void chk_finish(report *r, const char *pass_detail)
{
    if (r->n_fail == 0)
        fprintf(r->f, "PASS %s\n", pass_detail);
    else if (r->n_fail == 1)
        fprintf(r->f, "FAIL %s\n", r->first);
    else
        fprintf(r->f, "FAIL %s (and %d more problem%s)\n", r->first, r->n_fail - 1, r->n_fail > 2 ? "s" : "");
    fputs("END\n", r->f);
    fflush(r->f);
}
