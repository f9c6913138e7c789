/* peftref built-in plugins: Hugging Face PEFT adapter codecs, the
 * read() and write() of the peft-config extension
 * (include/peftref/ext/peft_config.h) for each PEFT type the built-in
 * techniques declare.  read_<type>.c turns adapter_config.json into a
 * module's options and sites, write_<type>.c the reverse.  A plugin links
 * the files of its type.  License: MIT */
#ifndef PEFTREF_PLUGINS_PEFT_CODECS_H
#define PEFTREF_PLUGINS_PEFT_CODECS_H

#include <peftref/ext/peft_config.h>

#define PEFT_NELEM(a) ((uint32_t)(sizeof(a) / sizeof((a)[0])))

/* LORA (read_lora.c / write_lora.c); dora: the technique is PEFT's
 * use_dora variant.  peft_lora_fields is LoraConfig's field table, which
 * AdaLoraConfig extends. */
extern const pr_peft_field peft_lora_fields[];
extern const uint32_t peft_n_lora_fields;
int peft_read_lora(const pr_peft_reader *h, pr_peft_in *in);
int peft_read_dora(const pr_peft_reader *h, pr_peft_in *in);
int peft_write_lora(const pr_peft_writer *h, pr_peft_out *out);
/* LoraConfig's fields of the module (write_lora.c); doubled: a pissa /
 * olora module converted to a plain LoRA of twice the rank */
int peft_write_lora_config(const pr_peft_writer *h, pr_peft_out *out, int doubled);
/* ADALORA */
int peft_read_adalora(const pr_peft_reader *h, pr_peft_in *in);
int peft_write_adalora(const pr_peft_writer *h, pr_peft_out *out);
/* IA3 */
int peft_read_ia3(const pr_peft_reader *h, pr_peft_in *in);
int peft_write_ia3(const pr_peft_writer *h, pr_peft_out *out);
/* PROMPT_TUNING, P_TUNING, PREFIX_TUNING */
int peft_read_prompt_tuning(const pr_peft_reader *h, pr_peft_in *in);
int peft_read_p_tuning(const pr_peft_reader *h, pr_peft_in *in);
int peft_read_prefix_tuning(const pr_peft_reader *h, pr_peft_in *in);
int peft_write_prompt_tuning(const pr_peft_writer *h, pr_peft_out *out);
int peft_write_p_tuning(const pr_peft_writer *h, pr_peft_out *out);
int peft_write_prefix_tuning(const pr_peft_writer *h, pr_peft_out *out);
/* LOHA, LOKR */
int peft_read_loha(const pr_peft_reader *h, pr_peft_in *in);
int peft_read_lokr(const pr_peft_reader *h, pr_peft_in *in);
int peft_write_loha(const pr_peft_writer *h, pr_peft_out *out);
int peft_write_lokr(const pr_peft_writer *h, pr_peft_out *out);
/* VERA */
int peft_read_vera(const pr_peft_reader *h, pr_peft_in *in);
int peft_write_vera(const pr_peft_writer *h, pr_peft_out *out);
/* OFT, BOFT */
int peft_read_oft(const pr_peft_reader *h, pr_peft_in *in);
int peft_read_boft(const pr_peft_reader *h, pr_peft_in *in);
int peft_write_oft(const pr_peft_writer *h, pr_peft_out *out);
int peft_write_boft(const pr_peft_writer *h, pr_peft_out *out);
/* HRA, FOURIERFT, TRAINABLE_TOKENS */
int peft_read_hra(const pr_peft_reader *h, pr_peft_in *in);
int peft_write_hra(const pr_peft_writer *h, pr_peft_out *out);
int peft_read_fourierft(const pr_peft_reader *h, pr_peft_in *in);
int peft_write_fourierft(const pr_peft_writer *h, pr_peft_out *out);
int peft_read_trainable_tokens(const pr_peft_reader *h, pr_peft_in *in);
int peft_write_trainable_tokens(const pr_peft_writer *h, pr_peft_out *out);

#endif
