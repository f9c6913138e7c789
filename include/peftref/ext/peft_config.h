/* peftref technique extension "peft-config": what a technique is in a
 * Hugging Face PEFT adapter directory (adapter_config.json +
 * adapter_model.safetensors), and the technique's own translation of it.
 *
 * pr_technique.peft_type names the PEFT type a technique reads and writes
 * ("LORA"), and each parameter's peft_key / peft_layout where its tensors
 * sit in the state dict.  What a type's adapter_config.json fields mean is
 * the technique's knowledge, not the host's, so a technique that reads or
 * writes PEFT adapters says so through its extension_data:
 *
 *     static const pr_ext_peft_config peft = {
 *         .struct_size = sizeof peft, .read = my_read, .write = my_write };
 *     static const void *ext(const char *uri)
 *     { return strcmp(uri, PR_EXT_PEFT_CONFIG_URI) ? NULL : &peft; }
 *
 * The host does what every PEFT type shares: the directory and its files,
 * PeftConfig's common fields (peft_type, task_type, base_model_name_or_path,
 * modules_to_save, ...), PEFT's module matching (target_modules,
 * exclude_modules, layers_to_transform, the *_pattern fields), the tensors'
 * names against the base model, and writing to a temporary name and
 * renaming.  read() translates the type's own fields into the technique's
 * options and sites through the host's pr_peft_reader table; write() sets
 * the type's fields from the module's options through pr_peft_writer.
 *
 * Several techniques can share one type: PEFT writes DoRA as a LORA adapter
 * with "use_dora": true, and LoRA-FA (an optimizer in PEFT) as a plain LORA
 * adapter.  implies names the fields that mark a variant.  The host's
 * writer sets them after write(); its reader picks, among the techniques of
 * an adapter's peft_type, the one whose implied fields the config all
 * holds (an absent field matches an implied false or null), the one
 * implying the most fields when several qualify; a technique marked
 * no_import, or without read(), is never picked, and one with folds_to is
 * read by its own read() into a module of the technique it folds to
 * (P_TUNING's file holds the folded prompt).
 *
 * Errors: a function returning int returns PR_PEFT_OK or a code; the
 * host's fail() records the message, which names the file, field or
 * tensor, and returns the code given.  Every pointer the host returns
 * lives until read() or write() returns.
 *
 * This header adds nothing to ABI 1's frozen structs; it includes only
 * <peftref/plugin.h>.  Tables grow at their end, and struct_size says how
 * much a side knows.  License: MIT */
#ifndef PEFTREF_EXT_PEFT_CONFIG_H
#define PEFTREF_EXT_PEFT_CONFIG_H

#include <stddef.h>
#include <stdint.h>

#include <peftref/plugin.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PR_EXT_PEFT_CONFIG_URI "urn:peftref:ext:peft-config:1"

/* The codes of the functions below: pr_status's numbers
 * (peftref/status.h, which a plugin does not include). */
enum pr_peft_status {
    PR_PEFT_OK = 0,
    PR_PEFT_ERR_INVALID = 1,
    PR_PEFT_ERR_FORMAT = 3,
    PR_PEFT_ERR_NOMEM = 4,
    PR_PEFT_ERR_NOTFOUND = 5,
    PR_PEFT_ERR_UNSUPPORTED = 7
};

/* The base model as PEFT sees it. */
typedef struct pr_peft_model {
    uint32_t struct_size;
    const char *family;      /* "GPT-2" or "LLaMA-family", for messages */
    uint32_t conv1d;         /* the projections are transformers' Conv1D [in, out] (GPT-2): fan_in_fan_out */
    uint32_t fused_qkv;      /* one projection (GPT-2's c_attn) makes q, k and v */
    uint32_t tied_head;      /* the output head is the token embedding */
    int32_t n_layers, d_model, n_heads, n_kv_heads, d_head, vocab_size;
    const char *embed;       /* the token embedding's module ("transformer.wte", "model.embed_tokens") */
    const char *layers_name; /* layers_pattern of the blocks ("h", "layers") */
} pr_peft_model;

/* How read()'s check_fields treats a field of the type. */
enum pr_peft_check {
    PR_PEFT_INFO = 1,  /* informational, any value (names, versions, modes) */
    PR_PEFT_EMPTY,     /* only its default: absent, null, [] or {} */
    PR_PEFT_FALSE,     /* only false (or absent) */
    PR_PEFT_TRUE,      /* only true (or absent) */
    PR_PEFT_READ,      /* read by read() itself */
    PR_PEFT_ZERO       /* only 0 (or absent) */
};

typedef struct pr_peft_field {
    const char *name;
    uint32_t check;    /* pr_peft_check */
    const char *why;   /* EMPTY, FALSE, TRUE, ZERO: what peftref does instead; "{tech}" is the technique's name */
} pr_peft_field;

/* A *_pattern field (module pattern -> value) giving a per-site option. */
typedef struct pr_peft_pattern {
    const char *field;   /* "rank_pattern" */
    const char *option;  /* "r" */
    double def;          /* the module's value */
    uint32_t integer;    /* the value must be a positive integer */
} pr_peft_pattern;

/* A value of adapter_config.json. */
enum pr_peft_kind {
    PR_PEFT_ABSENT = 0,  /* absent or null */
    PR_PEFT_BOOL, PR_PEFT_INT, PR_PEFT_REAL, PR_PEFT_STRING, PR_PEFT_ARRAY, PR_PEFT_OBJECT
};

typedef struct pr_peft_value {
    uint32_t kind;       /* pr_peft_kind */
    int64_t i;           /* BOOL (0, 1) and INT */
    double num;          /* INT and REAL */
    const char *str;     /* STRING */
    size_t len;          /* ARRAY and OBJECT: the number of elements */
} pr_peft_value;

/* A tensor of the adapter file (reading) or of the adapter to be written. */
typedef struct pr_peft_tensor {
    const char *name;
    uint32_t ndim;
    int64_t shape[4];
    float *data;         /* f32; reading: filled by tensor_data(), writing: may be changed in place */
} pr_peft_tensor;

/* A parameter of the module being written (its declared name, where it is). */
typedef struct pr_peft_param {
    const char *name;    /* pr_param_decl.name: "lora_A" */
    int32_t site, layer; /* -1 for a global parameter */
    uint32_t ndim;
    int64_t shape[4];
    const float *data;
} pr_peft_param;

typedef struct pr_peft_in pr_peft_in;    /* an adapter being read (opaque) */
typedef struct pr_peft_out pr_peft_out;  /* an adapter being written (opaque) */
typedef struct pr_peft_reader pr_peft_reader;
typedef struct pr_peft_writer pr_peft_writer;

enum pr_peft_file { PR_PEFT_DIR = 0, PR_PEFT_CONFIG_FILE = 1, PR_PEFT_WEIGHTS_FILE = 2 };

/* What a matched module of the base model becomes: 1 with *sites set, 0 when
 * the technique cannot attach there, -1 after fail(). */
typedef int (*pr_peft_site_of_fn)(const pr_peft_reader *h, pr_peft_in *in, const char *module, int layer,
                                  const char *path, uint32_t *sites);

/* The host's services to read(). */
struct pr_peft_reader {
    uint32_t struct_size;
    const pr_peft_model *(*model)(pr_peft_in *in);
    const char *(*technique)(pr_peft_in *in);          /* the name of the technique the module will be */
    const char *(*type)(pr_peft_in *in);               /* the adapter's peft_type */
    const char *(*where)(pr_peft_in *in, int file);    /* pr_peft_file: the directory or a file's path */
    const char *(*module_name)(pr_peft_in *in);        /* the module's name */
    /* Hugging Face's module path below the layer of a site ("attn.c_attn"), NULL when it has none. */
    const char *(*site_path)(pr_peft_in *in, int site);
    const char *(*blocks_path)(pr_peft_in *in);        /* "transformer.h", "model.layers" */
    int (*fail)(pr_peft_in *in, int code, const char *fmt, ...);
    /* "<config>: field = <value> is not supported: why" */
    int (*bad_value)(pr_peft_in *in, const char *field, const char *why);

    /* Every field of the config must be a common one or in own (an unknown
     * one is an error unless the pipeline allows unknown fields). */
    int (*check_fields)(pr_peft_in *in, const pr_peft_field *own, uint32_t n_own);
    /* field (key NULL, index < 0), field[key] or field[index]; kind ABSENT
     * when there is none. */
    int (*value)(pr_peft_in *in, const char *field, const char *key, long index, pr_peft_value *out);
    /* PR_PEFT_OK, -1 absent (not required), or an error naming the field */
    int (*get_int)(pr_peft_in *in, const char *field, int required, long long min, long long *out);
    /* *out = def when absent; an error when not a number or below min */
    int (*get_num)(pr_peft_in *in, const char *field, double def, double min, double *out);
    /* *out = def when absent; an error when not true or false */
    int (*get_bool)(pr_peft_in *in, const char *field, int def, int *out);
    /* fan_in_fan_out: true only where the projections are Conv1D */
    int (*check_fan_in_fan_out)(pr_peft_in *in);
    /* PEFT's target_modules test for field on a module name: 1, 0, -1 */
    int (*names_match)(pr_peft_in *in, const char *field, const char *module);
    /* target_modules (less exclude_modules, within layers_to_transform):
     * sites and layers, which must form a product; site_of NULL takes the
     * projection of a module's own path.  The patterns become per-site
     * options where they differ from their def. */
    int (*match_targets)(pr_peft_in *in, pr_peft_site_of_fn site_of, const pr_peft_pattern *pats, uint32_t n_pats);
    int (*set_sites)(pr_peft_in *in, uint32_t sites);    /* every layer */
    uint32_t (*sites)(pr_peft_in *in);
    const int *(*layers)(pr_peft_in *in, int *n);        /* NULL: every layer */
    int (*set_option)(pr_peft_in *in, const char *name, const char *value, int site); /* site -1: the module's */
    int (*set_num)(pr_peft_in *in, const char *name, double value, int site);

    int (*n_tensors)(pr_peft_in *in);
    int (*tensor)(pr_peft_in *in, int i, pr_peft_tensor *out);   /* data NULL */
    int (*find_tensor)(pr_peft_in *in, const char *name);        /* index or -1 */
    int (*tensor_data)(pr_peft_in *in, int i, pr_peft_tensor *out); /* with data as f32 */
    /* The tensors' names against the base model (family, layer numbers). */
    int (*check_tensors)(pr_peft_in *in);
    /* Replace the file's tensors by these, named as peftref's module files
     * name them ("<module>/h.<layer>.<site>.<param>", "<module>/<param>"). */
    int (*replace_tensors)(pr_peft_in *in, const pr_peft_tensor *t, uint32_t n);
    /* 1 when the technique declares parameter name at scope (pr_param_scope). */
    int (*declares)(pr_peft_in *in, const char *name, int scope);
    /* peftref's name of a site ("qkv"), as module files use it */
    const char *(*site_name)(pr_peft_in *in, int site);
};

/* The host's services to write(). */
struct pr_peft_writer {
    uint32_t struct_size;
    const pr_peft_model *(*model)(pr_peft_out *out);
    const char *(*technique)(pr_peft_out *out);
    const char *(*module_name)(pr_peft_out *out);
    const char *(*site_path)(pr_peft_out *out, int site);
    const char *(*blocks_path)(pr_peft_out *out);
    int (*fail)(pr_peft_out *out, int code, const char *fmt, ...);

    /* the module's option (site -1: the module's value), def when it has none */
    double (*opt_num)(pr_peft_out *out, const char *name, int site, double def);
    const char *(*opt_str)(pr_peft_out *out, const char *name);
    /* An option PEFT's config has one value for: the module's, or an error
     * naming the site whose value differs. */
    int (*one_value)(pr_peft_out *out, const char *option, const char *field, double *v);
    uint32_t (*sites)(pr_peft_out *out);
    const int *(*layers)(pr_peft_out *out, int *n);      /* NULL: every layer */

    /* field = a JSON text ("null", "[]", "true", "0.0", "\"none\"") */
    int (*put_json)(pr_peft_out *out, const char *field, const char *json);
    int (*put_str)(pr_peft_out *out, const char *field, const char *s);
    int (*put_num)(pr_peft_out *out, const char *field, double v);   /* an integer when whole */
    int (*put_real)(pr_peft_out *out, const char *field, double v);
    /* Append a JSON text to the list field (made when absent; an equal
     * element already there is not repeated), or set field[key] of an object. */
    int (*put_item)(pr_peft_out *out, const char *field, const char *key, const char *json);
    int (*del)(pr_peft_out *out, const char *field);
    /* The name PEFT's config gives a site's module ("attn.c_attn" on GPT-2,
     * whose "c_proj" would be two modules; "q_proj" on the LLaMA family). */
    const char *(*config_name)(pr_peft_out *out, int site);
    /* target_modules-style list of the sites' modules into field. */
    int (*put_targets)(pr_peft_out *out, const char *field, uint32_t sites);
    /* layers_to_transform and layers_pattern */
    int (*put_layers)(pr_peft_out *out);
    /* field = the sites whose option differs from def, as a *_pattern object */
    int (*put_pattern)(pr_peft_out *out, const char *field, const char *option, double def);

    int (*n_params)(pr_peft_out *out);
    int (*param)(pr_peft_out *out, int i, pr_peft_param *p);
    int (*n_tensors)(pr_peft_out *out);
    int (*tensor)(pr_peft_out *out, int i, pr_peft_tensor *t);    /* the adapter's tensors so far */
    int (*find_tensor)(pr_peft_out *out, const char *name);       /* index or -1 */
    float *(*add_tensor)(pr_peft_out *out, const char *name, uint32_t ndim, const int64_t *shape);
    /* tensor i gets this shape and a copy of data */
    int (*set_tensor)(pr_peft_out *out, int i, uint32_t ndim, const int64_t *shape, const float *data);
    int (*drop_tensors)(pr_peft_out *out);
    /* words the host adds to its "wrote ..." line: "converted to ..." */
    int (*note)(pr_peft_out *out, const char *text);
    /* peftref's name of a site ("q", "ffn.down"), for messages; "?" for
     * one the host does not know */
    const char *(*site_name)(pr_peft_out *out, int site);
};

typedef struct pr_ext_peft_config {
    uint32_t struct_size; /* sizeof(pr_ext_peft_config) of the plugin that filled it */
    /* A JSON object of the adapter_config.json fields this technique stands
     * for, or NULL: "{\"use_dora\": true}". */
    const char *implies;
    /* non-zero: never the technique a PEFT adapter is read as (LoRA-FA,
     * whose adapters PEFT writes as plain LORA ones); the writer still
     * writes it as its peft_type */
    uint32_t no_import;
    /* The type's fields into options and sites (NULL: not readable). */
    int (*read)(const pr_peft_reader *h, pr_peft_in *in);
    /* The module's options into the type's fields, after the host has set
     * PeftConfig's common ones and copied the saved module's tensors
     * (NULL: not writable). */
    int (*write)(const pr_peft_writer *h, pr_peft_out *out);
    /* The llama.cpp GGUF adapter.type the module is written as, or NULL
     * (no GGUF adapter form).  llama.cpp's one type, "lora", carries low-rank
     * pairs lora_A, lora_B per projection (with the frozen initial copies
     * lora_A0, lora_B0 folded in), scaled by alpha / r (alpha / sqrt(r) with
     * use_rslora), written under adapter.<type>.alpha. */
    const char *gguf_adapter;
    /* non-zero: write() makes every tensor itself from the module's
     * parameters (pr_peft_writer.param); the host copies none */
    uint32_t own_tensors;
} pr_ext_peft_config;

#define PR_EXT_PEFT_CONFIG_V1_SIZE (offsetof(pr_ext_peft_config, no_import) + sizeof(uint32_t))

#ifdef __cplusplus
}
#endif
#endif
