#!/usr/bin/env python3
"""Write Hugging Face PEFT adapters and their reference losses, for the C
test tests/test_peft_interop.c (peftref's import of PEFT adapters).

  /usr/bin/python3 tests/ref/make_peft_fixtures.py [OUTDIR]   # default tests/ref/peft-adapters

PEFT itself is not used (it cannot be installed here).  The adapters are
written from PEFT's documented state-dict keys, shapes and adapter_config.json
fields (PeftConfig, LoraConfig, IA3Config, PromptTuningConfig,
PrefixTuningConfig as PEFT 0.17 writes them), and each one is applied here
to a plain float64 model as PEFT applies it:

  target_modules   a list: a module whose name equals an entry or ends in
                   "." + entry; a string: re.fullmatch on the name
  layers_to_transform / layers_pattern   the block index of the name
  rank_pattern, alpha_pattern   first key k with re.match(rf"(.*\\.)?({k})$", name)
  LORA             y = base(x) + s * B(A x),  s = lora_alpha / r, or
                   lora_alpha / sqrt(r) with use_rslora
  LORA + use_dora  n = ||W + s B A||_row (W as [out, in]), g = m / n,
                   y = base(x) + (g - 1) * (base(x) - bias) + g * s * B(A x)
  IA3              y = base(x) * l (l of shape (out, 1), bias included);
                   in feedforward_modules y = base(x * l) (l (1, in))
  PROMPT_TUNING    the num_virtual_tokens embeddings before the tokens'
                   (GPT-2's learned positions 0.. for them, the tokens
                   after); only the real tokens are scored
  PREFIX_TUNING    prompt_embeddings (n, num_layers*2*token_dim), viewed as
                   (n, 2L, heads, head_dim) -> layer l's keys = block 2l,
                   values = block 2l+1 (keys used as they are, not rotated),
                   prepended to every layer's keys and values; token_dim is
                   num_key_value_heads * head_dim.  Hugging Face models place
                   the tokens after a cache of n entries at positions n..n+T-1
                   (`loss`); peftref's prefix_tuning keeps them at 0..T-1
                   (`loss_pos0`, the value the C test compares with).

  LOHA             dW = s (w1_a w1_b) * (w2_a w2_b), s = alpha / r (rank_pattern,
                   alpha_pattern as LoRA's), y = x (W + dW)^T + b
  LOKR             dW = s kron(w1, w2_a w2_b), (l, k) and (m, n) PEFT's
                   factorization(d_out, -1), factorization(d_in, -1)
  VERA             y = base(x) + lambda_b * ((lambda_d * (x A[:, :in]^T)) B[:out]^T),
                   A = base_model.vera_A, B = base_model.vera_B (save_projection)
  OFT              y = base(x R), R block-diagonal, R_k = (I - S_k)(I + S_k)^-1,
                   S_k = U - U^T with oft_R.weight[k] the strict upper triangle
                   (torch.triu_indices order); use_cayley_neumann false
  HRA              W' = W H_1 ... H_r, H_i = I - 2 u_i u_i^T / |u_i|^2, u_i = hra_u[:, i]
  FOURIERFT        dW = scaling * real(ifft2(F)), F (out, in) zero but for the
                   spectrum at torch.randperm(out*in, seed random_loc_seed)[:n]
                   (row idx // in, column idx % in)
  BOFT             y = (base(x M) - b) * boft_s + b, M = mat_{m-1} ... mat_0,
                   mat_i = P_i diag_k(Q_ik) P_i^T, Q = (I - S)(I + S)^-1 with
                   S = (A - A^T) / 2, A = boft_R[i, k]; P_i the matrix of
                   block_butterfly_perm(in, nb / 2^i, b / 2, m - 1) (P[k, p[k]] = 1)
  ADALORA          y = base(x) + (x (A * E)^T B^T) * lora_alpha / (init_r + 1e-5);
                   the file holds the triplets rank_pattern keeps (lora_A (k, in),
                   lora_B (out, k), lora_E (k, 1)), as PEFT's
                   resize_state_dict_by_rank_pattern saves them
  P_TUNING         as PROMPT_TUNING (the file holds the encoder's output)
  TRAINABLE_TOKENS the rows token_indices of the token embedding replaced by
                   trainable_tokens_delta (untied head: the logits unchanged)

Bases: tests/ref/gpt2-parity/model (GPT-2, Conv1D [in, out], fan_in_fan_out)
and tests/ref/llama-parity/gqa/model (LLaMA, GQA), with the tokens and
targets of their expected.safetensors.  Writes OUTDIR/<case>/adapter_config.json,
OUTDIR/<case>/adapter_model.safetensors (F32) and OUTDIR/expected.json
{case: {"base": ..., "loss": ..., "loss_pos0": ...}}.  Deterministic.
"""
import json
import math
import os
import re
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import llama_ref as LR  # noqa: E402  (RMSNorm, RoPE tables, safetensors I/O)

SEED = 20260112
GPT2_DIR = os.path.join(HERE, "gpt2-parity")
LLAMA_DIR = os.path.join(HERE, "llama-parity", "gqa")

# ------------------------------------------------------------------ PEFT's config files

COMMON = {"auto_mapping": None, "base_model_name_or_path": "", "inference_mode": True, "revision": None,
          "task_type": "CAUSAL_LM", "peft_version": "0.17.1"}

LORA_DEFAULTS = {
    "alpha_pattern": {}, "bias": "none", "corda_config": None, "eva_config": None, "exclude_modules": None,
    "fan_in_fan_out": False, "init_lora_weights": True, "layer_replication": None, "layers_pattern": None,
    "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 8, "lora_bias": False, "lora_dropout": 0.0,
    "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None, "peft_type": "LORA",
    "qalora_group_size": 16, "r": 8, "rank_pattern": {}, "target_modules": None, "target_parameters": None,
    "trainable_token_indices": None, "use_dora": False, "use_qalora": False, "use_rslora": False,
}
IA3_DEFAULTS = {"exclude_modules": None, "fan_in_fan_out": False, "feedforward_modules": None,
                "init_ia3_weights": True, "modules_to_save": None, "peft_type": "IA3", "target_modules": None}
PROMPT_DEFAULTS = {"num_attention_heads": None, "num_layers": None, "num_transformer_submodules": 1,
                   "num_virtual_tokens": None, "peft_type": "PROMPT_TUNING", "prompt_tuning_init": "RANDOM",
                   "prompt_tuning_init_text": None, "token_dim": None, "tokenizer_kwargs": None,
                   "tokenizer_name_or_path": None, "modules_to_save": None}
PREFIX_DEFAULTS = {"encoder_hidden_size": None, "num_attention_heads": None, "num_layers": None,
                   "num_transformer_submodules": 1, "num_virtual_tokens": None, "peft_type": "PREFIX_TUNING",
                   "prefix_projection": False, "token_dim": None, "modules_to_save": None}


LYCORIS = {"alpha": 8, "alpha_pattern": {}, "exclude_modules": None, "init_weights": True, "layers_pattern": None,
           "layers_to_transform": None, "module_dropout": 0.0, "modules_to_save": None, "r": 8, "rank_dropout": 0.0,
           "rank_pattern": {}, "target_modules": None, "use_effective_conv2d": False}
LOHA_DEFAULTS = dict(LYCORIS, peft_type="LOHA")
LOKR_DEFAULTS = dict(LYCORIS, peft_type="LOKR", decompose_both=False, decompose_factor=-1, rank_dropout_scale=False)
VERA_DEFAULTS = {"bias": "none", "d_initial": 0.1, "fan_in_fan_out": False, "init_weights": True,
                 "layers_pattern": None, "layers_to_transform": None, "modules_to_save": None, "peft_type": "VERA",
                 "projection_prng_key": 0, "r": 256, "save_projection": True, "target_modules": None,
                 "vera_dropout": 0.0}
OFT_DEFAULTS = {"bias": "none", "block_share": False, "coft": False, "eps": 6e-05, "exclude_modules": None,
                "fan_in_fan_out": False, "init_weights": True, "layers_pattern": None, "layers_to_transform": None,
                "module_dropout": 0.0, "modules_to_save": None, "num_cayley_neumann_terms": 5, "oft_block_size": 32,
                "peft_type": "OFT", "r": 0, "target_modules": None, "use_cayley_neumann": True}
HRA_DEFAULTS = {"apply_GS": False, "bias": "none", "exclude_modules": None, "init_weights": True,
                "layers_pattern": None, "layers_to_transform": None, "modules_to_save": None, "peft_type": "HRA",
                "r": 8, "target_modules": None}
FOURIERFT_DEFAULTS = {"bias": "none", "exclude_modules": None, "fan_in_fan_out": False, "init_weights": False,
                      "layers_pattern": None, "layers_to_transform": None, "modules_to_save": None,
                      "n_frequency": 1000, "n_frequency_pattern": {}, "peft_type": "FOURIERFT",
                      "random_loc_seed": 777, "scaling": 150.0, "target_modules": None}
PTUNING_DEFAULTS = {"encoder_dropout": 0.0, "encoder_hidden_size": None, "encoder_num_layers": 2,
                    "encoder_reparameterization_type": "MLP", "modules_to_save": None, "num_attention_heads": None,
                    "num_layers": None, "num_transformer_submodules": 1, "num_virtual_tokens": None,
                    "peft_type": "P_TUNING", "token_dim": None}
BOFT_DEFAULTS = {"bias": "none", "boft_block_num": 0, "boft_block_size": 4, "boft_dropout": 0.0,
                 "boft_n_butterfly_factor": 1, "exclude_modules": None, "fan_in_fan_out": False, "init_weights": True,
                 "layers_pattern": None, "layers_to_transform": None, "modules_to_save": None, "peft_type": "BOFT",
                 "target_modules": None}
ADALORA_DEFAULTS = dict(LORA_DEFAULTS, peft_type="ADALORA", target_r=8, init_r=12, tinit=0, tfinal=0, deltaT=1,
                        beta1=0.85, beta2=0.85, orth_reg_weight=0.5, total_step=None, rank_pattern=None)
TT_DEFAULTS = {"init_weights": True, "peft_type": "TRAINABLE_TOKENS", "target_modules": None, "token_indices": []}


def make_config(defaults, **kw):
    c = dict(COMMON)
    c.update(defaults)
    for k, v in kw.items():
        assert k in c, k
        c[k] = v
    return dict(sorted(c.items()))

# ------------------------------------------------------------------ PEFT's module matching


def target_matches(spec, name):
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def layer_index(cfg, name):
    pat = cfg.get("layers_pattern")
    if pat:
        m = re.match(r".*\.%s\.(\d+)\." % pat, name)
    else:
        m = re.match(r".*\.[^.]*\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def is_target(cfg, name):
    if not target_matches(cfg["target_modules"], name):
        return False
    if target_matches(cfg.get("exclude_modules"), name):
        return False
    ltt = cfg.get("layers_to_transform")
    if ltt is not None:
        li = layer_index(cfg, name)
        ltt = [ltt] if isinstance(ltt, int) else ltt
        return li is not None and li in ltt
    return True


def pattern_get(pattern, name, default):
    for k, v in pattern.items():
        if re.match(r"(.*\.)?(%s)$" % k, name):
            return v
    return default


class Adapter:
    """One PEFT adapter applied at the base model's linear modules."""

    def __init__(self, cfg, tensors):
        self.cfg, self.t = cfg, tensors

    def linear(self, name, x, W, b):
        """W [out, in] (nn.Linear layout), b (out) or None."""
        cfg, pt = self.cfg, self.cfg["peft_type"]
        key = "base_model.model." + name
        if pt == "IA3" and is_target(cfg, name):
            l = self.t[key + ".ia3_l"]
            if target_matches(cfg.get("feedforward_modules"), name):
                y = (x * l[0]) @ W.t()
                return y + b if b is not None else y
            y = x @ W.t() + (b if b is not None else 0.0)
            return y * l[:, 0]
        if pt in WEIGHT_TYPES and is_target(cfg, name):
            return weight_type(cfg, self.t, key, name, x, W, b)
        y = x @ W.t()
        base = y + b if b is not None else y
        if pt != "LORA" or not is_target(cfg, name):
            return base
        r = pattern_get(cfg["rank_pattern"], name, cfg["r"])
        alpha = pattern_get(cfg["alpha_pattern"], name, cfg["lora_alpha"])
        s = alpha / math.sqrt(r) if cfg["use_rslora"] else alpha / r
        A, B = self.t[key + ".lora_A.weight"], self.t[key + ".lora_B.weight"]
        assert A.shape[0] == r and B.shape[1] == r, name
        lora = (x @ A.t()) @ B.t()
        if not cfg["use_dora"]:
            return base + s * lora
        m = self.t[key + ".lora_magnitude_vector"]
        n = (W + s * (B @ A)).norm(p=2, dim=1)
        g = m / n
        return base + (g - 1) * y + g * s * lora


WEIGHT_TYPES = ("LOHA", "LOKR", "VERA", "OFT", "BOFT", "HRA", "FOURIERFT", "ADALORA")


def butterfly_perm(n, nblocks, r, n_factor):
    """PEFT's block_butterfly_perm(n, nblocks, r, n_factor): in each group of
    n / nblocks indices, the chunks of r taken even ones first, then odd."""
    if n_factor == 0:
        return list(range(n))
    group = n // nblocks
    chunks = group // r
    order = list(range(0, chunks, 2)) + list(range(1, chunks, 2))
    perm = []
    for g in range(0, n, group):
        for c in order:
            perm.extend(range(g + c * r, g + c * r + r))
    return perm


def boft_rotation(R):
    """boft_R (m, nb, b, b) -> M = mat_{m-1} ... mat_0, mat_i = P_i diag(Q_i,k) P_i^T,
    Q = (I - S)(I + S)^-1, S = (A - A^T) / 2, P[k, perm[k]] = 1."""
    m, nb, b, _ = R.shape
    n = nb * b
    I = torch.eye(b, dtype=torch.float64)
    M = torch.eye(n, dtype=torch.float64)
    for f in range(m):
        blocks = []
        for k in range(nb):
            S = 0.5 * (R[f, k] - R[f, k].t())
            blocks.append((I - S) @ torch.linalg.inv(I + S))
        P = torch.zeros(n, n, dtype=torch.float64)
        for k, j in enumerate(butterfly_perm(n, nb // 2 ** f, b // 2, m - 1)):
            P[k, j] = 1.0
        M = (P @ torch.block_diag(*blocks) @ P.t()) @ M
    return M


def factorization(dim, factor=-1):
    """LyCORIS' / PEFT's factorization: (m, n), m <= n, m n = dim."""
    if factor > 0 and dim % factor == 0:
        m, n = factor, dim // factor
        return (n, m) if m > n else (m, n)
    if factor == -1:
        factor = dim
    m, n = 1, dim
    length = m + n
    while m < n:
        nm = m + 1
        while dim % nm != 0:
            nm += 1
        nn = dim // nm
        if nm + nn > length or nm > factor:
            break
        m, n = nm, nn
    return (n, m) if m > n else (m, n)


def oft_rotation(Uvec, b):
    """oft_R.weight (nb, b(b-1)/2) -> block-diagonal R, R_k = (I - S)(I + S)^-1."""
    rows, cols = torch.triu_indices(b, b, 1)
    blocks = []
    I = torch.eye(b, dtype=torch.float64)
    for k in range(Uvec.shape[0]):
        S = torch.zeros(b, b, dtype=torch.float64)
        S[rows, cols] = Uvec[k]
        S = S - S.t()
        blocks.append((I - S) @ torch.linalg.inv(I + S))
    return torch.block_diag(*blocks)


def fourier_indices(o, i, n, seed):
    idx = torch.randperm(o * i, generator=torch.Generator().manual_seed(seed))[:n]
    return idx // i, idx % i


def weight_type(cfg, t, key, name, x, W, b):
    """x W'^T + b for the weight types (W [out, in])."""
    pt, o, i = cfg["peft_type"], W.shape[0], W.shape[1]
    bias = b if b is not None else 0.0
    if pt == "VERA":
        A, B = t["base_model.vera_A"][:, :i], t["base_model.vera_B"][:o, :]
        h = t[key + ".vera_lambda_b"] * ((t[key + ".vera_lambda_d"] * (x @ A.t())) @ B.t())
        return x @ W.t() + bias + h
    if pt == "OFT":
        U = t[key + ".oft_R.weight"]
        R = oft_rotation(U, i // U.shape[0])
        return (x @ R) @ W.t() + bias
    if pt == "BOFT":
        M = boft_rotation(t[key + ".boft_R"])
        return ((x @ M) @ W.t()) * t[key + ".boft_s"][:, 0] + bias
    if pt == "ADALORA":
        # SVDLinear: scaling / (ranknum + 1e-5), ranknum init_r (kept through the resize)
        A, B, E = t[key + ".lora_A"], t[key + ".lora_B"], t[key + ".lora_E"]
        s = cfg["lora_alpha"] / (cfg["init_r"] + 1e-5)
        return x @ W.t() + bias + ((x @ (A * E).t()) @ B.t()) * s
    if pt == "HRA":
        u = t[key + ".hra_u"]
        u = u / u.norm(dim=0)
        H = torch.eye(i, dtype=torch.float64)
        for k in range(u.shape[1]):
            H = H - 2 * H @ u[:, k:k + 1] @ u[:, k:k + 1].t()
        return x @ (W @ H).t() + bias
    if pt == "FOURIERFT":
        n = pattern_get(cfg["n_frequency_pattern"], name, cfg["n_frequency"])
        spec = t[key + ".fourierft_spectrum"]
        assert spec.shape == (n,), (name, spec.shape)
        F = torch.zeros(o, i, dtype=torch.complex128)
        r_, c_ = fourier_indices(o, i, n, cfg["random_loc_seed"])
        F[r_, c_] = spec.to(torch.complex128)
        dW = torch.fft.ifft2(F).real * cfg["scaling"]
        return x @ (W + dW).t() + bias
    r = pattern_get(cfg["rank_pattern"], name, cfg["r"])
    s = pattern_get(cfg["alpha_pattern"], name, cfg["alpha"]) / r
    if pt == "LOHA":
        dW = s * (t[key + ".hada_w1_a"] @ t[key + ".hada_w1_b"]) * (t[key + ".hada_w2_a"] @ t[key + ".hada_w2_b"])
    else:
        w2 = t[key + ".lokr_w2_a"] @ t[key + ".lokr_w2_b"]
        assert t[key + ".lokr_w2_a"].shape[1] == r
        dW = s * torch.kron(t[key + ".lokr_w1"], w2)
    assert dW.shape == W.shape, name
    return x @ (W + dW).t() + bias


def weight_tensors(gen, cfg, modules, shapes, scale=0.3):
    """Random tensors for the weight types at every targeted module."""
    pt, out = cfg["peft_type"], {}

    def rnd(*shape):
        return f32(torch.randn(*shape, generator=gen, dtype=torch.float64) * scale)

    names = [n for n in modules if is_target(cfg, n)]
    if pt == "VERA":
        mo = max(shapes[n][0] for n in names)
        mi = max(shapes[n][1] for n in names)
        out["base_model.vera_A"] = rnd(cfg["r"], mi)
        out["base_model.vera_B"] = rnd(mo, cfg["r"])
    for name in names:
        o, i = shapes[name]
        key = "base_model.model." + name
        if pt == "LOHA":
            r = pattern_get(cfg["rank_pattern"], name, cfg["r"])
            for w in ("1", "2"):
                out[key + ".hada_w%s_a" % w], out[key + ".hada_w%s_b" % w] = rnd(o, r), rnd(r, i)
        elif pt == "LOKR":
            r = pattern_get(cfg["rank_pattern"], name, cfg["r"])
            (l, k), (m, n) = factorization(o), factorization(i)
            assert r < max(k, n) / 2, name   # PEFT's factorised lokr_w2
            out[key + ".lokr_w1"], out[key + ".lokr_w2_a"], out[key + ".lokr_w2_b"] = rnd(l, m), rnd(k, r), rnd(r, n)
        elif pt == "VERA":
            out[key + ".vera_lambda_d"] = rnd(cfg["r"]) + 0.1
            out[key + ".vera_lambda_b"] = rnd(o)
        elif pt == "OFT":
            bs = i // cfg["r"] if cfg["r"] else cfg["oft_block_size"]
            out[key + ".oft_R.weight"] = rnd(i // bs, bs * (bs - 1) // 2)
        elif pt == "BOFT":
            bs = cfg["boft_block_size"] or i // cfg["boft_block_num"]
            out[key + ".boft_R"] = rnd(cfg["boft_n_butterfly_factor"], i // bs, bs, bs)
            out[key + ".boft_s"] = f32(1.0 + 0.3 * torch.randn(o, 1, generator=gen, dtype=torch.float64))
        elif pt == "ADALORA":
            # resized by rank_pattern as PEFT saves it: the kept triplets only
            keep = (cfg["rank_pattern"] or {}).get(name + ".lora_E", [True] * cfg["init_r"])
            k = sum(keep)
            out[key + ".lora_A"], out[key + ".lora_B"] = rnd(k, i), rnd(o, k)
            out[key + ".lora_E"] = f32(torch.randn(k, 1, generator=gen, dtype=torch.float64))
        elif pt == "HRA":
            out[key + ".hra_u"] = rnd(i, cfg["r"])
        elif pt == "FOURIERFT":
            n = pattern_get(cfg["n_frequency_pattern"], name, cfg["n_frequency"])
            out[key + ".fourierft_spectrum"] = f32(torch.randn(n, generator=gen, dtype=torch.float64))
    return out


def no_adapter():
    return Adapter({"peft_type": "NONE"}, {})

# ------------------------------------------------------------------ the bases


def ce(logits, targets):
    return float(LR.mean_cross_entropy(logits, targets))


def gpt2_loss(p, cfg, tokens, targets, ad, pos0=False):
    C, H = cfg["n_embd"], cfg["n_head"]
    L, eps, hd = cfg["n_layer"], cfg["layer_norm_epsilon"], cfg["n_embd"] // cfg["n_head"]
    Bn, T = tokens.shape
    pt = ad.cfg["peft_type"]
    nv = ad.cfg["num_virtual_tokens"] if pt in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING") else 0

    def ln(x, w, b):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps) * w + b

    def conv(name, x):   # Conv1D weight [in, out] as nn.Linear [out, in]
        return ad.linear(name, x, p[name + ".weight"].t(), p[name + ".bias"])

    x = p["transformer.wte.weight"][tokens]
    if pt in ("PROMPT_TUNING", "P_TUNING"):
        prompt = ad.t["prompt_embeddings"].unsqueeze(0).expand(Bn, nv, C)
        x = torch.cat([prompt, x], dim=1) + p["transformer.wpe.weight"][: nv + T]
    else:
        off = nv if pt == "PREFIX_TUNING" and not pos0 else 0
        x = x + p["transformer.wpe.weight"][off: off + T]
    Tt = x.shape[1]
    for l in range(L):
        h = "transformer.h.%d." % l
        a = ln(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"])
        qkv = conv(h + "attn.c_attn", a)
        q, k, v = [t.reshape(Bn, Tt, H, hd).transpose(1, 2) for t in qkv.split(C, dim=-1)]
        mask = torch.tril(torch.ones(Tt, Tt, dtype=torch.bool))
        if pt == "PREFIX_TUNING":
            pk, pv = prefix_kv(ad, l, H, hd)
            k = torch.cat([pk.expand(Bn, -1, -1, -1), k], dim=2)
            v = torch.cat([pv.expand(Bn, -1, -1, -1), v], dim=2)
            mask = torch.cat([torch.ones(Tt, nv, dtype=torch.bool), mask], dim=1)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        y = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v
        x = x + conv(h + "attn.c_proj", y.transpose(1, 2).reshape(Bn, Tt, C))
        a = ln(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"])
        u = conv(h + "mlp.c_fc", a)
        u = 0.5 * u * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (u + 0.044715 * u ** 3)))
        x = x + conv(h + "mlp.c_proj", u)
    x = ln(x, p["transformer.ln_f.weight"], p["transformer.ln_f.bias"])
    logits = x @ p["transformer.wte.weight"].t()
    if pt in ("PROMPT_TUNING", "P_TUNING"):
        logits = logits[:, nv:]
    return ce(logits, targets)


def prefix_kv(ad, layer, heads, hd):
    e = ad.t["prompt_embeddings"]                   # (n, L*2*heads*hd)
    n = e.shape[0]
    kv = e.reshape(n, -1, heads, hd).permute(1, 2, 0, 3)   # (2L, heads, n, hd)
    return kv[2 * layer].unsqueeze(0), kv[2 * layer + 1].unsqueeze(0)


def llama_loss(cfg, p, tokens, targets, ad, pos0=False):
    eps = float(cfg["rms_norm_eps"])
    H, Hkv, hd = cfg["num_attention_heads"], LR.kv_heads(cfg), LR.head_dim(cfg)
    Bn, T = tokens.shape
    pt = ad.cfg["peft_type"]
    nv = ad.cfg["num_virtual_tokens"] if pt in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING") else 0
    E = p["model.embed_tokens.weight"]
    if pt == "TRAINABLE_TOKENS":
        E = E.clone()
        E[ad.cfg["token_indices"]] = ad.t["base_model.model.model.embed_tokens.trainable_tokens_delta"]
    x = E[tokens]
    if pt in ("PROMPT_TUNING", "P_TUNING"):
        x = torch.cat([ad.t["prompt_embeddings"].unsqueeze(0).expand(Bn, nv, -1), x], dim=1)
    Tt = x.shape[1]
    off = nv if pt == "PREFIX_TUNING" and not pos0 else 0
    cos, sin = LR.rope_cos_sin(cfg, off + Tt, torch.float64)
    cos, sin = cos[off:], sin[off:]

    def lin(name, a):
        return ad.linear(name, a, p[name + ".weight"], p.get(name + ".bias"))

    for l in range(cfg["num_hidden_layers"]):
        pre = "model.layers.%d." % l
        a = LR.rmsnorm(x, p[pre + "input_layernorm.weight"], eps)
        q = lin(pre + "self_attn.q_proj", a).view(Bn, Tt, H, hd).transpose(1, 2)
        k = lin(pre + "self_attn.k_proj", a).view(Bn, Tt, Hkv, hd).transpose(1, 2)
        v = lin(pre + "self_attn.v_proj", a).view(Bn, Tt, Hkv, hd).transpose(1, 2)
        q = q * cos + LR.rotate_half(q) * sin
        k = k * cos + LR.rotate_half(k) * sin
        mask = LR.attention_mask(Tt, None)
        if pt == "PREFIX_TUNING":
            pk, pv = prefix_kv(ad, l, Hkv, hd)
            k = torch.cat([pk.expand(Bn, -1, -1, -1), k], dim=2)
            v = torch.cat([pv.expand(Bn, -1, -1, -1), v], dim=2)
            mask = torch.cat([torch.ones(Tt, nv, dtype=torch.bool), mask], dim=1)
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        y = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v
        h = x + lin(pre + "self_attn.o_proj", y.transpose(1, 2).reshape(Bn, Tt, H * hd))
        n = LR.rmsnorm(h, p[pre + "post_attention_layernorm.weight"], eps)
        u = torch.nn.functional.silu(lin(pre + "mlp.gate_proj", n)) * lin(pre + "mlp.up_proj", n)
        x = h + lin(pre + "mlp.down_proj", u)
    x = LR.rmsnorm(x, p["model.norm.weight"], eps)
    head = p["model.embed_tokens.weight"] if LR.tied(cfg) else p["lm_head.weight"]
    logits = x @ head.t()
    if pt in ("PROMPT_TUNING", "P_TUNING"):
        logits = logits[:, nv:]
    return ce(logits, targets)

# ------------------------------------------------------------------ the adapters


def f32(t):
    return t.to(torch.float32).to(torch.float64)


def lora_tensors(gen, cfg, modules, shapes, dora=False, W=None):
    """modules: base names; shapes: name -> (out, in); W: name -> [out, in]."""
    out = {}
    for name in modules:
        if not is_target(cfg, name):
            continue
        r = pattern_get(cfg["rank_pattern"], name, cfg["r"])
        o, i = shapes[name]
        key = "base_model.model." + name
        A = f32(torch.randn(r, i, generator=gen, dtype=torch.float64) * 0.3)
        B = f32(torch.randn(o, r, generator=gen, dtype=torch.float64) * 0.3)
        out[key + ".lora_A.weight"], out[key + ".lora_B.weight"] = A, B
        if dora:
            alpha = pattern_get(cfg["alpha_pattern"], name, cfg["lora_alpha"])
            s = alpha / math.sqrt(r) if cfg["use_rslora"] else alpha / r
            n = (W[name] + s * (B @ A)).norm(p=2, dim=1)
            out[key + ".lora_magnitude_vector"] = f32(n * (1.0 + 0.3 * torch.randn(o, generator=gen,
                                                                                   dtype=torch.float64)))
    return out


def write_case(outdir, case, cfg, tensors):
    d = os.path.join(outdir, case)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    LR.write_safetensors(os.path.join(d, "adapter_model.safetensors"), list(tensors.items()), "F32",
                         {"format": "pt"})


def main():
    outdir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "peft-adapters")
    os.makedirs(outdir, exist_ok=True)
    gen = torch.Generator().manual_seed(SEED)
    expected = {}

    # ---- GPT-2
    with open(os.path.join(GPT2_DIR, "model", "config.json")) as f:
        g2 = json.load(f)
    gw, _, _ = LR.read_safetensors(os.path.join(GPT2_DIR, "model", "model.safetensors"))
    gw = {(k if k.startswith("transformer.") else "transformer." + k): v for k, v in gw.items()}
    ex, _, _ = LR.read_safetensors(os.path.join(GPT2_DIR, "expected.safetensors"))
    gtok, gtgt = ex["tokens"].long(), ex["targets"].long()
    C, L = g2["n_embd"], g2["n_layer"]
    g2_lin = {}
    for l in range(L):
        h = "transformer.h.%d." % l
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            w = gw[h + m + ".weight"]          # [in, out]
            g2_lin[h + m] = (w.shape[1], w.shape[0])
    g2_W = {n: gw[n + ".weight"].t() for n in g2_lin}
    base = gpt2_loss(gw, g2, gtok, gtgt, no_adapter())
    # the stored loss is float32
    assert abs(base - float(ex["loss"][0])) < 1e-6 * abs(base), (base, float(ex["loss"][0]))

    def g2case(case, cfg, tensors):
        ad = Adapter(cfg, tensors)
        loss, loss0 = gpt2_loss(gw, g2, gtok, gtgt, ad), gpt2_loss(gw, g2, gtok, gtgt, ad, pos0=True)
        expected[case] = {"base": "gpt2", "loss": loss, "loss_pos0": loss0}
        write_case(outdir, case, cfg, tensors)

    # LoRA with rsLoRA and per-site ranks/alphas; "c_proj" is both attn.c_proj and mlp.c_proj
    cfg = make_config(LORA_DEFAULTS, r=4, lora_alpha=8, use_rslora=True, fan_in_fan_out=True,
                      target_modules=["c_attn", "c_proj"], rank_pattern={"attn.c_attn": 2},
                      alpha_pattern={"mlp.c_proj": 3})
    g2case("gpt2_lora", cfg, lora_tensors(gen, cfg, g2_lin, g2_lin))
    # LoRA on one layer only, a regular expression as target_modules
    cfg = make_config(LORA_DEFAULTS, r=3, lora_alpha=6, fan_in_fan_out=True,
                      target_modules=r"transformer\.h\.[0-9]+\.mlp\.c_fc", layers_to_transform=[1],
                      layers_pattern="h")
    g2case("gpt2_lora_layer", cfg, lora_tensors(gen, cfg, g2_lin, g2_lin))
    cfg = make_config(LORA_DEFAULTS, r=2, lora_alpha=4, use_dora=True, fan_in_fan_out=True,
                      target_modules=["c_attn", "c_fc"])
    g2case("gpt2_dora", cfg, lora_tensors(gen, cfg, g2_lin, g2_lin, dora=True, W=g2_W))
    # (IA)^3: keys and values of c_attn (queries at 1, which peftref's ia3 needs), mlp.c_proj's input
    cfg = make_config(IA3_DEFAULTS, target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                      fan_in_fan_out=True)
    t = {}
    for l in range(L):
        lk = torch.ones(3 * C, 1, dtype=torch.float64)
        lk[C:] = f32(1.0 + 0.4 * torch.randn(2 * C, 1, generator=gen, dtype=torch.float64))
        t["base_model.model.transformer.h.%d.attn.c_attn.ia3_l" % l] = lk
        t["base_model.model.transformer.h.%d.mlp.c_proj.ia3_l" % l] = f32(
            1.0 + 0.4 * torch.randn(1, 4 * C, generator=gen, dtype=torch.float64))
    g2case("gpt2_ia3", cfg, t)
    cfg = make_config(PROMPT_DEFAULTS, num_virtual_tokens=3, token_dim=C, num_attention_heads=g2["n_head"],
                      num_layers=L)
    g2case("gpt2_prompt", cfg, {"prompt_embeddings": f32(torch.randn(3, C, generator=gen, dtype=torch.float64))})
    cfg = make_config(PREFIX_DEFAULTS, num_virtual_tokens=3, token_dim=C, num_attention_heads=g2["n_head"],
                      num_layers=L, encoder_hidden_size=C)
    g2case("gpt2_prefix", cfg, {"prompt_embeddings": f32(torch.randn(3, L * 2 * C, generator=gen,
                                                                     dtype=torch.float64))})

    # ---- LLaMA (gqa: hidden 32, 4 heads, 2 key/value heads, head_dim 8, intermediate 64)
    lcfg, lw = LR.load_model_dir(os.path.join(LLAMA_DIR, "model"))
    lex, _, _ = LR.read_safetensors(os.path.join(LLAMA_DIR, "expected.safetensors"))
    ltok, ltgt = lex["tokens"].long(), lex["targets"].long()
    Ll, Hkv, hd = lcfg["num_hidden_layers"], LR.kv_heads(lcfg), LR.head_dim(lcfg)
    l_lin = {}
    for l in range(Ll):
        for proj in LR.PROJECTIONS:
            l_lin[LR.module_name(l, proj)] = LR.proj_shape(lcfg, proj)
    l_W = {n: lw[n + ".weight"] for n in l_lin}
    base = llama_loss(lcfg, lw, ltok, ltgt, no_adapter())
    assert abs(base - float(lex["loss"][0])) < 1e-6 * abs(base), (base, float(lex["loss"][0]))

    def lcase(case, cfg, tensors):
        ad = Adapter(cfg, tensors)
        loss, loss0 = llama_loss(lcfg, lw, ltok, ltgt, ad), llama_loss(lcfg, lw, ltok, ltgt, ad, pos0=True)
        expected[case] = {"base": "llama", "loss": loss, "loss_pos0": loss0}
        write_case(outdir, case, cfg, tensors)

    cfg = make_config(LORA_DEFAULTS, r=4, lora_alpha=8, use_rslora=True,
                      target_modules=r".*\.(q_proj|v_proj|down_proj)", rank_pattern={"v_proj": 2},
                      alpha_pattern={"down_proj": 5})
    lcase("llama_lora", cfg, lora_tensors(gen, cfg, l_lin, l_lin))
    cfg = make_config(LORA_DEFAULTS, r=2, lora_alpha=4, use_dora=True,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    lcase("llama_dora", cfg, lora_tensors(gen, cfg, l_lin, l_lin, dora=True, W=l_W))
    cfg = make_config(IA3_DEFAULTS, target_modules=["k_proj", "v_proj", "down_proj"],
                      feedforward_modules=["down_proj"])
    t = {}
    for l in range(Ll):
        pre = "base_model.model.model.layers.%d." % l
        for proj in ("k_proj", "v_proj"):
            t[pre + "self_attn.%s.ia3_l" % proj] = f32(1.0 + 0.4 * torch.randn(Hkv * hd, 1, generator=gen,
                                                                               dtype=torch.float64))
        t[pre + "mlp.down_proj.ia3_l"] = f32(1.0 + 0.4 * torch.randn(1, lcfg["intermediate_size"], generator=gen,
                                                                     dtype=torch.float64))
    lcase("llama_ia3", cfg, t)
    cfg = make_config(PROMPT_DEFAULTS, num_virtual_tokens=3, token_dim=lcfg["hidden_size"],
                      num_attention_heads=lcfg["num_attention_heads"], num_layers=Ll)
    lcase("llama_prompt", cfg, {"prompt_embeddings": f32(torch.randn(3, lcfg["hidden_size"], generator=gen,
                                                                     dtype=torch.float64))})
    cfg = make_config(PREFIX_DEFAULTS, num_virtual_tokens=3, token_dim=Hkv * hd, num_attention_heads=Hkv,
                      num_layers=Ll, encoder_hidden_size=lcfg["hidden_size"])
    lcase("llama_prefix", cfg, {"prompt_embeddings": f32(torch.randn(3, Ll * 2 * Hkv * hd, generator=gen,
                                                                     dtype=torch.float64))})

    # ---- the further types (their own generator, so the cases above stay as they were)
    gen = torch.Generator().manual_seed(SEED + 1)
    cfg = make_config(VERA_DEFAULTS, r=4, d_initial=0.1, fan_in_fan_out=True, target_modules=["c_attn", "mlp.c_proj"])
    g2case("gpt2_vera", cfg, weight_tensors(gen, cfg, g2_lin, g2_lin))
    cfg = make_config(FOURIERFT_DEFAULTS, n_frequency=24, scaling=40.0, random_loc_seed=777, fan_in_fan_out=True,
                      target_modules=["c_attn", "c_fc"], n_frequency_pattern={"mlp.c_fc": 40})
    g2case("gpt2_fourierft", cfg, weight_tensors(gen, cfg, g2_lin, g2_lin))
    cfg = make_config(PTUNING_DEFAULTS, num_virtual_tokens=3, token_dim=C, num_attention_heads=g2["n_head"],
                      num_layers=L, encoder_hidden_size=C)
    g2case("gpt2_ptuning", cfg, {"prompt_embeddings": f32(torch.randn(3, C, generator=gen, dtype=torch.float64))})

    cfg = make_config(LOHA_DEFAULTS, r=2, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
                      rank_pattern={"v_proj": 3}, alpha_pattern={"down_proj": 2})
    lcase("llama_loha", cfg, weight_tensors(gen, cfg, l_lin, l_lin))
    cfg = make_config(LOKR_DEFAULTS, r=2, alpha=3, target_modules=["q_proj", "v_proj", "down_proj"])
    lcase("llama_lokr", cfg, weight_tensors(gen, cfg, l_lin, l_lin))
    cfg = make_config(VERA_DEFAULTS, r=4, d_initial=0.1, target_modules=["q_proj", "v_proj", "up_proj"])
    lcase("llama_vera", cfg, weight_tensors(gen, cfg, l_lin, l_lin))
    cfg = make_config(OFT_DEFAULTS, r=0, oft_block_size=8, use_cayley_neumann=False,
                      target_modules=["q_proj", "v_proj", "down_proj"])
    lcase("llama_oft", cfg, weight_tensors(gen, cfg, l_lin, l_lin))
    cfg = make_config(HRA_DEFAULTS, r=2, target_modules=["k_proj", "o_proj", "gate_proj"])
    lcase("llama_hra", cfg, weight_tensors(gen, cfg, l_lin, l_lin, scale=1.0))
    cfg = make_config(FOURIERFT_DEFAULTS, n_frequency=20, scaling=40.0, random_loc_seed=1234,
                      target_modules=["q_proj", "down_proj"], n_frequency_pattern={"down_proj": 30})
    lcase("llama_fourierft", cfg, weight_tensors(gen, cfg, l_lin, l_lin))
    cfg = make_config(PTUNING_DEFAULTS, num_virtual_tokens=2, token_dim=lcfg["hidden_size"],
                      num_attention_heads=lcfg["num_attention_heads"], num_layers=Ll,
                      encoder_hidden_size=lcfg["hidden_size"])
    lcase("llama_ptuning", cfg, {"prompt_embeddings": f32(torch.randn(2, lcfg["hidden_size"], generator=gen,
                                                                      dtype=torch.float64))})
    assert not LR.tied(lcfg)   # PEFT would replace a tied head's rows too
    ids = sorted(set(int(v) for v in ltok.flatten().tolist()))[:3]
    cfg = make_config(TT_DEFAULTS, token_indices=ids, target_modules=["embed_tokens"])
    lcase("llama_trainable_tokens", cfg, {"base_model.model.model.embed_tokens.trainable_tokens_delta": f32(
        torch.randn(len(ids), lcfg["hidden_size"], generator=gen, dtype=torch.float64) * 0.5)})

    # ---- BOFT (nn.Linear only: LLaMA) and AdaLoRA (Conv1D too: GPT-2)
    gen = torch.Generator().manual_seed(SEED + 2)
    cfg = make_config(BOFT_DEFAULTS, boft_block_size=4, boft_n_butterfly_factor=2,
                      target_modules=["q_proj", "v_proj", "down_proj"])
    lcase("llama_boft", cfg, weight_tensors(gen, cfg, l_lin, l_lin))
    # init_r 4; the budget kept 3, 1, 4 (not resized) and 2 triplets
    pattern = {"transformer.h.0.attn.c_attn.lora_E": [True, False, True, True],
               "transformer.h.0.mlp.c_fc.lora_E": [False, False, True, False],
               "transformer.h.1.attn.c_attn.lora_E": [True, True, True, True],
               "transformer.h.1.mlp.c_fc.lora_E": [False, True, False, True]}
    cfg = make_config(ADALORA_DEFAULTS, init_r=4, target_r=2, lora_alpha=6, total_step=100, tinit=10, tfinal=20,
                      fan_in_fan_out=True, target_modules=["c_attn", "c_fc"], rank_pattern=pattern)
    g2case("gpt2_adalora", cfg, weight_tensors(gen, cfg, g2_lin, g2_lin))
    cfg = make_config(ADALORA_DEFAULTS, init_r=3, target_r=2, lora_alpha=4, total_step=50,
                      target_modules=["q_proj", "v_proj"])
    lcase("llama_adalora", cfg, weight_tensors(gen, cfg, l_lin, l_lin))

    with open(os.path.join(outdir, "expected.json"), "w") as f:
        json.dump(dict(sorted(expected.items())), f, indent=2)
        f.write("\n")
    for k, v in sorted(expected.items()):
        print("%-22s %-6s loss %.10f  loss_pos0 %.10f" % (k, v["base"], v["loss"], v["loss_pos0"]))


if __name__ == "__main__":
    main()
