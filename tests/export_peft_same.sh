#!/usr/bin/env bash
# tests/export_peft_same.sh OLD_BUILD NEW_BUILD
#
# `peftref export --format peft` of two builds on the same runs: every PEFT
# type the built-in techniques write (both model families where the type
# allows), a classification head, and the exporter's refusals.  A run is
# trained a few steps with OLD_BUILD's peftref, then exported by each build;
# adapter_config.json and adapter_model.safetensors must be the same bytes
# (cmp), and so must the exit status, stderr and stdout (its --out path
# aside).  Prints one line per case and exits 1 when any differs.
set -u
[ $# -eq 2 ] || { echo "usage: $0 OLD_BUILD NEW_BUILD" >&2; exit 2; }
old=$(cd "$1" && pwd) && new=$(cd "$2" && pwd) || exit 2
src=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/export-peft-same.XXXXXX")
trap '[ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
lm="{type: lm, train: $src/data/fortunes/adapt-train.txt}"
cls="{type: classification, train: $src/data/fortunes/classify-train.jsonl, format: jsonl}"
g2="{path: $src/models/fortunes-gpt2}"
ll="{preset: llama-tiny}"
n_same=0 n_diff=0

peftref() { # BUILD ARGS...
    local b=$1
    shift
    PEFTREF_PLUGIN_PATH=$b/plugins/.libs "$b/peftref" "$@"
}

# export NAME's pipeline or run with build B (tag T) into $work/NAME.T
export_with() { # NAME SRC B T [FORMAT]
    local out=$work/$1.$4
    peftref "$3" export "$2" --format "${5:-peft}" --out "$out" >"$out.stdout" 2>"$out.stderr"
    echo $? >"$out.rc"
    sed -i "s|$out|OUT|g" "$out.stdout" "$out.stderr"
}

compare() { # NAME WANT(ok|refused)
    local a=$work/$1.old b=$work/$1.new bad=""
    for f in rc stdout stderr; do
        cmp -s "$a.$f" "$b.$f" || bad="$bad $f"
    done
    if [ -f "$a" ] || [ -f "$b" ]; then   # a GGUF file
        cmp -s "$a" "$b" || bad="$bad gguf"
    fi
    for f in adapter_config.json adapter_model.safetensors; do
        if [ -e "$a/$f" ] || [ -e "$b/$f" ]; then
            cmp -s "$a/$f" "$b/$f" || bad="$bad $f"
        fi
    done
    local rc
    rc=$(cat "$a.rc")
    if [ "$2" = ok ] && [ "$rc" != 0 ]; then
        bad="$bad (old build refused: $(head -c 300 "$a.stderr"))"
    elif [ "$2" = refused ] && [ "$rc" = 0 ]; then
        bad="$bad (old build did not refuse)"
    fi
    if [ -n "$bad" ]; then
        n_diff=$((n_diff + 1))
        echo "DIFF  $1:$bad"
        for f in stdout stderr; do
            cmp -s "$a.$f" "$b.$f" || diff "$a.$f" "$b.$f" | head -8 | sed 's/^/      /'
        done
    else
        n_same=$((n_same + 1))
        if [ "$rc" = 0 ] && [ -f "$a" ]; then
            echo "same  $1 ($(wc -c <"$a") bytes)"
        elif [ "$rc" = 0 ]; then
            echo "same  $1 ($(wc -c <"$a/adapter_config.json") + $(wc -c <"$a/adapter_model.safetensors") bytes)"
        else
            echo "same  $1 (refused: $(head -c 160 "$a.stderr" | tr '\n' ' ')...)"
        fi
    fi
}

# case NAME MODEL TASK STEPS MODULE: train STEPS steps (0: export the
# pipeline as built) and export with both builds.
case_() {
    local name=$1 model=$2 task=$3 steps=$4 module=$5 want=${6:-ok}
    local yaml=$work/$name.yaml run=$work/$name.run srcp
    printf 'model: %s\ntask: %s\nmodules:\n  - %s\ntrain: {steps: %s, batch: 2, seq_len: 16, lr: 1e-2, seed: 3, eval_every: 0, log_every: 0, output: %s}\n' \
        "$model" "$task" "$module" "$steps" "$run" >"$yaml"
    srcp=$yaml
    if [ "$steps" -gt 0 ]; then
        if ! peftref "$old" train "$yaml" --quiet >"$work/$name.train" 2>&1; then
            n_diff=$((n_diff + 1))
            echo "FAIL  $name: training failed: $(head -c 400 "$work/$name.train")"
            return
        fi
        srcp=$run
    fi
    export_with "$name" "$srcp" "$old" old
    export_with "$name" "$srcp" "$new" new
    compare "$name" "$want"
}

# ---- the types, GPT-2 ----
case_ g2_lora "$g2" "$lm" 3 "{technique: lora, sites: [qkv, o, ffn.up, ffn.down], options: {r: 4, alpha: 8, dropout: 0.05}}"
case_ g2_lora_rslora "$g2" "$lm" 3 "{technique: lora, options: {r: 4, alpha: 6, use_rslora: true}}"
case_ g2_lora_sites "$g2" "$lm" 3 "{technique: lora, sites: [qkv, ffn.down], options: {r: 4, alpha: 8}, site_options: {ffn.down: {r: 2, alpha: 3}}}"
case_ g2_lora_layers "$g2" "$lm" 3 "{technique: lora, sites: [qkv, o], layers: [1, 3], options: {r: 2, alpha: 5.5}}"
case_ g2_lora_gaussian "$g2" "$lm" 3 "{technique: lora, options: {r: 2, init_lora_weights: gaussian}}"
case_ g2_lora_false "$g2" "$lm" 3 "{technique: lora, options: {r: 2, init_lora_weights: \"false\"}}"
case_ g2_pissa "$g2" "$lm" 4 "{technique: lora, sites: [qkv, ffn.down], options: {r: 4, alpha: 8, init_lora_weights: pissa}, site_options: {ffn.down: {r: 2, alpha: 3}}}"
case_ g2_olora "$g2" "$lm" 3 "{technique: lora, sites: [qkv, o], layers: [0, 2], options: {r: 2, alpha: 3, use_rslora: true, init_lora_weights: olora}}"
case_ g2_dora "$g2" "$lm" 3 "{technique: dora, sites: [qkv, ffn.up], options: {r: 2, alpha: 4}}"
case_ g2_lora_fa "$g2" "$lm" 3 "{technique: lora_fa, sites: [qkv, ffn.down], options: {r: 4, alpha: 8}}"
case_ g2_adalora "$g2" "$lm" 12 "{technique: adalora, sites: [qkv, ffn.down], options: {init_r: 6, target_r: 2, tinit: 2, tfinal: 3, delta_t: 1, total_step: 12}}"
case_ g2_adalora_fresh "$g2" "$lm" 0 "{technique: adalora, sites: [qkv], options: {total_step: 10}}"
case_ g2_ia3 "$g2" "$lm" 3 "{technique: ia3, sites: [attn.k, attn.v, ffn.act]}"
case_ g2_ia3_kv "$g2" "$lm" 0 "{technique: ia3, sites: [k, v]}" refused
case_ g2_prompt_embed "$g2" "$lm" 3 "{technique: prompt_tuning, options: {n_tokens: 4}}"
case_ g2_prompt_normal "$g2" "$lm" 3 "{technique: prompt_tuning, options: {n_tokens: 3, init: normal}}"
case_ g2_prompt_text "$g2" "$lm" 3 "{technique: prompt_tuning, options: {n_tokens: 5, init: text, init_text: \"fortune \\\"cookie\\\"\"}}"
case_ g2_ptuning "$g2" "$lm" 3 "{technique: p_tuning, options: {n_tokens: 3}}"
case_ g2_ptuning_h "$g2" "$lm" 3 "{technique: p_tuning, options: {n_tokens: 3, encoder_hidden_size: 24}}"
case_ g2_prefix "$g2" "$lm" 3 "{technique: prefix_tuning, options: {n_tokens: 3}}"
case_ g2_prefix_mlp "$g2" "$lm" 3 "{technique: prefix_tuning_mlp, options: {n_tokens: 3, encoder_hidden_size: 16}}"
case_ g2_vera "$g2" "$lm" 3 "{technique: vera, sites: [qkv, ffn.down], options: {r: 16, dropout: 0.1, d_initial: 0.2}}"
case_ g2_fourierft "$g2" "$lm" 3 "{technique: fourierft, sites: [qkv, ffn.up], options: {n_frequency: 40, scaling: 20, random_loc_seed: 5}, site_options: {ffn.up: {n_frequency: 24}}}"
case_ g2_fourierft_init "$g2" "$lm" 0 "{technique: fourierft, sites: [o], options: {n_frequency: 8, init_weights: true}}"
case_ g2_head "$g2" "$cls" 3 "{technique: lora, sites: [qkv], options: {r: 2}}"

# ---- the types, LLaMA family ----
case_ ll_lora "$ll" "$lm" 3 "{technique: lora, sites: [q, k, v, o, ffn.up, ffn.gate, ffn.down], options: {r: 4, alpha: 8}}"
case_ ll_lora_sites "$ll" "$lm" 3 "{technique: lora, sites: [q, v, ffn.down], layers: [1], options: {r: 4, alpha: 8}, site_options: {v: {r: 2}, ffn.down: {alpha: 2.5}}}"
case_ ll_pissa "$ll" "$lm" 3 "{technique: lora, sites: [q, v], options: {r: 2, alpha: 4, init_lora_weights: pissa}}"
case_ ll_olora "$ll" "$lm" 3 "{technique: lora, sites: [q, ffn.up], options: {r: 2, alpha: 4, init_lora_weights: olora}, site_options: {ffn.up: {r: 3, alpha: 5}}}"
case_ ll_dora "$ll" "$lm" 3 "{technique: dora, options: {r: 2, alpha: 4}}"
case_ ll_lora_fa "$ll" "$lm" 3 "{technique: lora_fa, options: {r: 2, alpha: 4}}"
case_ ll_adalora "$ll" "$lm" 12 "{technique: adalora, sites: [q, v, ffn.down], options: {init_r: 6, target_r: 2, tinit: 2, tfinal: 3, delta_t: 2, total_step: 12, beta1: 0.8, orth_reg_weight: 0.25}}"
case_ ll_ia3 "$ll" "$lm" 3 "{technique: ia3}"
case_ ll_ia3_sites "$ll" "$lm" 3 "{technique: ia3, sites: [v, ffn.act]}"
case_ ll_prompt "$ll" "$lm" 3 "{technique: prompt_tuning, options: {n_tokens: 4, init: normal}}"
case_ ll_prompt_text "$ll" "$lm" 3 "{technique: prompt_tuning, options: {n_tokens: 4, init: text, init_text: hello}}"
case_ ll_ptuning "$ll" "$lm" 3 "{technique: p_tuning, options: {n_tokens: 3, encoder_hidden_size: 12}}"
case_ ll_prefix "$ll" "$lm" 3 "{technique: prefix_tuning, options: {n_tokens: 3}}"
case_ ll_prefix_mlp "$ll" "$lm" 3 "{technique: prefix_tuning_mlp, options: {n_tokens: 2, encoder_hidden_size: 8}}"
case_ ll_loha "$ll" "$lm" 3 "{technique: loha, sites: [q, v, ffn.up], options: {r: 2, alpha: 3}, site_options: {ffn.up: {r: 4}}}"
case_ ll_lokr "$ll" "$lm" 3 "{technique: lokr, sites: [q, v, ffn.down], options: {r: 2, alpha: 3}, site_options: {ffn.down: {alpha: 1.5}}}"
case_ ll_vera "$ll" "$lm" 3 "{technique: vera, options: {r: 8}}"
case_ ll_oft "$ll" "$lm" 3 "{technique: oft, sites: [q, v], options: {oft_block_size: 8}}"
case_ ll_oft_r "$ll" "$lm" 3 "{technique: oft, sites: [q, o], options: {r: 4, oft_block_size: 0}}"
case_ ll_boft "$ll" "$lm" 3 "{technique: boft, sites: [q, v], options: {boft_block_size: 4, boft_n_butterfly_factor: 2}}"
case_ ll_boft_num "$ll" "$lm" 3 "{technique: boft, sites: [q], options: {boft_block_size: 0, boft_block_num: 8}}"
case_ ll_hra "$ll" "$lm" 3 "{technique: hra, sites: [q, v], options: {r: 4}}"
case_ ll_hra_rand "$ll" "$lm" 0 "{technique: hra, sites: [o], options: {r: 3, init_weights: false}}"
case_ ll_fourierft "$ll" "$lm" 3 "{technique: fourierft, sites: [q, v], options: {n_frequency: 30}, site_options: {v: {n_frequency: 12}}}"
case_ ll_tokens "$ll" "$lm" 3 "{technique: trainable_tokens, options: {token_indices: \"101, 32, 116\", n_token_indices: 3}}"
case_ ll_head "$ll" "$cls" 3 "{technique: lora, options: {r: 2}}"
case_ ll_head_loha "$ll" "$cls" 3 "{technique: loha, options: {r: 2}}"

# ---- llama.cpp adapters (--format gguf) of some of the runs above: the
# techniques whose tensors are LoRA pairs ----
gguf_() { # NAME (a case above) WANT
    local from=$work/$1.run
    [ -d "$from" ] || from=$work/$1.yaml
    export_with "$1.gguf" "$from" "$old" old gguf
    export_with "$1.gguf" "$from" "$new" new gguf
    compare "$1.gguf" "$2"
}
gguf_ g2_lora ok
gguf_ g2_pissa ok
gguf_ g2_lora_fa ok
gguf_ ll_lora_sites ok
gguf_ ll_olora ok
gguf_ g2_dora refused
gguf_ ll_loha refused

# ---- refusals ----
case_ no_type "$g2" "$lm" 0 "{technique: adapter_houlsby}" refused
case_ no_type_bitfit "$g2" "$lm" 0 "{technique: bitfit}" refused
case_ gated "$g2" "$lm" 0 "{technique: lora, sites: [qkv], gate: true}" refused
case_ no_name "$g2" "$lm" 0 "{technique: lora, sites: [q, v]}" refused
case_ vera_regen "$g2" "$lm" 0 "{technique: vera_regen, options: {r: 8}}" refused
case_ vera_per_site "$g2" "$lm" 0 "{technique: vera, sites: [qkv, o], options: {r: 8}, site_options: {o: {d_initial: 0.5}}}" refused
case_ fourierft_ortho "$g2" "$lm" 0 "{technique: fourierft, sites: [qkv], options: {ifft2_norm: ortho, n_frequency: 8}}" refused
case_ fourierft_forward "$ll" "$lm" 0 "{technique: fourierft, options: {ifft2_norm: forward, n_frequency: 8}}" refused
case_ lokr_big "$ll" "$lm" 0 "{technique: lokr, sites: [q], options: {r: 8}}" refused
case_ g2_loha "$g2" "$lm" 0 "{technique: loha}" refused
case_ g2_lokr "$g2" "$lm" 0 "{technique: lokr}" refused
case_ g2_oft "$g2" "$lm" 0 "{technique: oft}" refused
case_ g2_boft "$g2" "$lm" 0 "{technique: boft}" refused
case_ g2_hra "$g2" "$lm" 0 "{technique: hra}" refused
case_ oft_per_site "$ll" "$lm" 0 "{technique: oft, sites: [q, v], options: {oft_block_size: 8}, site_options: {v: {oft_block_size: 16}}}" refused
case_ hra_per_site "$ll" "$lm" 0 "{technique: hra, sites: [q, v], options: {r: 4}, site_options: {v: {r: 2}}}" refused
case_ boft_per_site "$ll" "$lm" 0 "{technique: boft, sites: [q, v], site_options: {v: {boft_n_butterfly_factor: 2}}}" refused
case_ ll_ia3_attn_k "$ll" "$lm" 0 "{technique: ia3, sites: [attn.k, ffn.act]}" refused
case_ g2_tokens "$g2" "$lm" 0 "{technique: trainable_tokens, options: {token_indices: \"5, 9\", n_token_indices: 2}}" refused
case_ g2_adalora_q "$g2" "$lm" 0 "{technique: adalora, sites: [q, v], options: {total_step: 10}}" refused

echo "$n_same same, $n_diff differing"
[ "$n_diff" -eq 0 ]
