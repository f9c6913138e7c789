#!/usr/bin/env python3
"""Generate the LLaMA-family parity fixtures in tests/ref/llama-parity/.

Reference values for the LLaMA, Mistral, Qwen2 and Qwen3 families, computed
by tests/ref/llama_ref.py (plain PyTorch, float64) and checked here against a
second, separately written forward pass, finite differences and read-back of
every file written.  Run it by hand when the fixtures must change; the test
suite itself never needs torch:

  /usr/bin/python3 tests/ref/make_llama_fixtures.py [OUTDIR]

For each case (see CASES and tests/ref/llama-parity/README.md) it writes
  OUTDIR/<case>/model/config.json          Hugging Face config of the model_type
  OUTDIR/<case>/model/*.safetensors        base weights, HF names, in the case's
                                           dtype (F32, F16 or BF16); qwen2 as two
                                           shards plus model.safetensors.index.json
  OUTDIR/<case>/lora/adapter_config.json   PEFT LoRA config (r 2, alpha 4, all
  OUTDIR/<case>/lora/adapter_model.safetensors  seven projections), F32, PEFT keys
  OUTDIR/<case>/expected.safetensors       F32: tokens, targets, logits, loss,
                                           grad.<HF name>, logits_lora, loss_lora,
                                           grad_lora.<PEFT key> (and gen_* for gqa)

The weights are drawn once (seeded), rounded to the file's dtype, and the
reference is computed in float64 from those rounded values, so the only
difference a float32 implementation should show is its own rounding.
"""
import json
import math
import os
import shutil
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import llama_ref as R  # noqa: E402

B, T = 2, 12
SEED = 20240917
LORA_R, LORA_ALPHA = 2, 4
LORA_A_STD, LORA_B_STD = 0.2, 0.1
GEN_PROMPT, GEN_NEW = 5, 8
GEN_MIN_MARGIN = 1e-3
FD_STEP = 1e-5
SENSITIVE = 1e-2      # a case's feature must move logits by this much of max|logits| (100x the C tolerance)

COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              vocab_size=128, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
              rope_scaling=None, tie_word_embeddings=False)

# name: (model_type, file dtype, config overrides, what it covers)
CASES = [
    ("gqa", "llama", "F32", dict(num_key_value_heads=2),
     "GQA (H=4, Hkv=2), untied lm_head, no biases, plain RoPE, greedy generation"),
    ("mqa", "llama", "F32", dict(num_key_value_heads=1, tie_word_embeddings=True, rms_norm_eps=1e-6,
                                 rope_scaling={"factor": 2.0, "rope_type": "linear"}),
     "MQA (Hkv=1), tied head, rope_scaling linear (factor 2)"),
    ("mha", "llama", "BF16", dict(num_key_value_heads=4, head_dim=12, rope_theta=1000.0,
                                  max_position_embeddings=2048,
                                  rope_scaling={"factor": 8.0, "high_freq_factor": 8.0,
                                                "low_freq_factor": 1.0,
                                                "original_max_position_embeddings": 256,
                                                "rope_type": "llama3"}),
     "MHA (Hkv=H), head_dim 12 != hidden/H = 8, rope_scaling llama3 (all three bands), BF16 file"),
    ("bias", "llama", "F16", dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True),
     "attention_bias (q,k,v,o) and mlp_bias (gate,up,down), F16 file"),
    ("qwen2", "qwen2", "F32", dict(num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-6,
                                   rope_theta=1000000.0),
     "Qwen2: q,k,v biases (no o bias), tied head, two shards + model.safetensors.index.json"),
    ("qwen3", "qwen3", "F32", dict(num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                                   rope_theta=1000000.0),
     "Qwen3: per-head q_norm/k_norm before RoPE, head_dim 16 != hidden/H, untied, no biases"),
    ("mistral", "mistral", "F32", dict(num_key_value_heads=2, sliding_window=16),
     "Mistral: sliding_window 16 > T = 12 (no key is cut off), GQA, untied"),
]

TORCH_DTYPE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


# ---------------------------------------------------------------- config.json

def hf_config(model_type, st_dtype, over):
    """config.json as transformers (4.4x-4.5x) saves it for the model_type:
    every key of that config class, sorted, indent 2."""
    c = dict(COMMON)
    c.update(over)
    V = c["vocab_size"]
    hd = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    base = {
        "attention_dropout": 0.0, "hidden_act": "silu", "initializer_range": 0.02, "use_cache": True,
        "hidden_size": c["hidden_size"], "intermediate_size": c["intermediate_size"],
        "num_hidden_layers": c["num_hidden_layers"], "num_attention_heads": c["num_attention_heads"],
        "num_key_value_heads": c["num_key_value_heads"], "vocab_size": V,
        "max_position_embeddings": c["max_position_embeddings"], "rms_norm_eps": c["rms_norm_eps"],
        "rope_theta": c["rope_theta"], "tie_word_embeddings": c["tie_word_embeddings"],
        "torch_dtype": TORCH_DTYPE[st_dtype], "model_type": model_type,
    }
    if model_type == "llama":
        base.update(architectures=["LlamaForCausalLM"], attention_bias=c.get("attention_bias", False),
                    mlp_bias=c.get("mlp_bias", False), head_dim=hd, pretraining_tp=1,
                    rope_scaling=c["rope_scaling"], bos_token_id=1, eos_token_id=2)
    elif model_type == "mistral":
        base.update(architectures=["MistralForCausalLM"], head_dim=hd, sliding_window=c["sliding_window"],
                    bos_token_id=1, eos_token_id=2)
    elif model_type == "qwen2":
        base.update(architectures=["Qwen2ForCausalLM"], max_window_layers=c["num_hidden_layers"],
                    rope_scaling=c["rope_scaling"], sliding_window=None, use_sliding_window=False,
                    bos_token_id=V - 2, eos_token_id=V - 1)
    elif model_type == "qwen3":
        base.update(architectures=["Qwen3ForCausalLM"], attention_bias=False, head_dim=hd,
                    max_window_layers=c["num_hidden_layers"], rope_scaling=c["rope_scaling"],
                    sliding_window=None, use_sliding_window=False, bos_token_id=V - 2,
                    eos_token_id=V - 1)
    return base


def adapter_config():
    """adapter_config.json as PEFT (0.13-0.14) saves a LoraConfig."""
    return {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": "", "bias": "none",
        "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "layer_replication": None, "layers_pattern": None,
        "layers_to_transform": None, "loftq_config": {}, "lora_alpha": LORA_ALPHA, "lora_bias": False,
        "lora_dropout": 0.0, "megatron_config": None, "megatron_core": "megatron.core",
        "modules_to_save": None, "peft_type": "LORA", "r": LORA_R, "rank_pattern": {}, "revision": None,
        "target_modules": sorted(R.PROJECTIONS), "task_type": "CAUSAL_LM", "use_dora": False,
        "use_rslora": False,
    }


def write_json(path, obj):
    with open(path, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------- a second forward

def independent_forward(cfg, W, tokens, targets=None, lora=None, scale=0.0, kv_of_head=None):
    """The same model written differently, to catch a slip in llama_ref:
    LoRA merged into the weights (W + s B A), RoPE as a complex rotation of
    the pairs (x_i, x_{i+hd/2}), llama3 bands with torch.where, attention
    one (batch, head) at a time with a mask built by loops, torch's own
    silu, linear and cross_entropy.  kv_of_head(h) overrides the GQA map
    (for the sensitivity check)."""
    F = torch.nn.functional
    C, V = cfg["hidden_size"], cfg["vocab_size"]
    H = cfg["num_attention_heads"]
    Hkv = cfg.get("num_key_value_heads") or H
    hd = cfg.get("head_dim") or C // H
    eps = cfg["rms_norm_eps"]
    mt = cfg["model_type"]
    Bn, Tq = tokens.shape
    if kv_of_head is None:
        def kv_of_head(h):
            return h // (H // Hkv)

    def weight(m):
        w = W[m + ".weight"]
        if lora is not None and "base_model.model." + m + ".lora_A.weight" in lora:
            k = "base_model.model." + m
            w = w + scale * lora[k + ".lora_B.weight"] @ lora[k + ".lora_A.weight"]
        return w

    def lin(x, m):
        return F.linear(x, weight(m), W.get(m + ".bias"))

    def norm(x, w):
        n = x.shape[-1]
        return x * torch.sqrt(n / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) ** 2 + n * eps)) * w

    # inverse frequencies, written independently of llama_ref.rope_inv_freq
    theta = cfg["rope_theta"]
    inv = torch.tensor([theta ** (-(2.0 * i) / hd) for i in range(hd // 2)], dtype=torch.float64)
    rs = cfg.get("rope_scaling")
    if rs is not None and rs["rope_type"] == "linear":
        inv = inv / rs["factor"]
    elif rs is not None and rs["rope_type"] == "llama3":
        f, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        orig = rs["original_max_position_embeddings"]
        wl = 2 * math.pi / inv
        s = (orig / wl - lo) / (hi - lo)
        mid = (1 - s) * inv / f + s * inv
        inv = torch.where(wl < orig / hi, inv, torch.where(wl > orig / lo, inv / f, mid))
    rot = torch.polar(torch.ones(Tq, hd // 2, dtype=torch.float64),
                      torch.arange(Tq, dtype=torch.float64)[:, None] * inv[None, :])   # (T, hd/2)

    def rope(x):                                   # x (T, hd)
        z = torch.complex(x[:, :hd // 2], x[:, hd // 2:]) * rot
        return torch.cat([z.real, z.imag], dim=-1)

    window = cfg.get("sliding_window") if mt == "mistral" else None
    mask = torch.zeros(Tq, Tq, dtype=torch.float64)
    for i in range(Tq):
        for j in range(Tq):
            if j > i or (window is not None and j <= i - window):
                mask[i, j] = float("-inf")

    x = F.embedding(tokens, W["model.embed_tokens.weight"])
    for l in range(cfg["num_hidden_layers"]):
        pre = "model.layers.%d." % l
        a = norm(x, W[pre + "input_layernorm.weight"])
        q = lin(a, pre + "self_attn.q_proj")
        k = lin(a, pre + "self_attn.k_proj")
        v = lin(a, pre + "self_attn.v_proj")
        out = torch.zeros(Bn, Tq, H * hd, dtype=torch.float64)
        for b in range(Bn):
            for h in range(H):
                g = kv_of_head(h)
                qh = q[b, :, h * hd:(h + 1) * hd]
                kh = k[b, :, g * hd:(g + 1) * hd]
                vh = v[b, :, g * hd:(g + 1) * hd]
                if mt == "qwen3":
                    qh = norm(qh, W[pre + "self_attn.q_norm.weight"])
                    kh = norm(kh, W[pre + "self_attn.k_norm.weight"])
                qh, kh = rope(qh), rope(kh)
                att = F.softmax(qh @ kh.t() * hd ** -0.5 + mask, dim=-1)
                out[b, :, h * hd:(h + 1) * hd] = att @ vh
        x = x + lin(out, pre + "self_attn.o_proj")
        n = norm(x, W[pre + "post_attention_layernorm.weight"])
        x = x + lin(F.silu(lin(n, pre + "mlp.gate_proj")) * lin(n, pre + "mlp.up_proj"), pre + "mlp.down_proj")
    x = norm(x, W["model.norm.weight"])
    head = W["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else W["lm_head.weight"]
    logits = F.linear(x, head)
    loss = None
    if targets is not None:
        loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-1)
    return logits, loss


# ---------------------------------------------------------------- checks

def fail(case, msg):
    raise SystemExit("%s: %s" % (case, msg))


def rel_max(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def finite_difference(case, cfg, weights, lora, tokens, targets, grads, which, gen):
    """Central differences of the mean loss on the largest-|grad| entry and one
    random entry of every tensor in `which` ("base" or "lora"); returns the
    worst |fd - autograd| / (1e-7 + 1e-5 |autograd|) ratio (must stay <= 1)."""
    m = R.build_model(cfg, weights, lora, LORA_ALPHA, LORA_R)
    store = m.params if which == "base" else m.lora
    worst = 0.0
    with torch.no_grad():
        for name in sorted(grads):
            g = grads[name]
            flat = g.reshape(-1)
            picks = {int(flat.abs().argmax())}
            picks.add(int(torch.randint(0, flat.numel(), (1,), generator=gen)))
            for i in sorted(picks):
                t = store[name].view(-1)
                old = t[i].item()
                t[i] = old + FD_STEP
                lp = m(tokens, targets)[1].item()
                t[i] = old - FD_STEP
                lm = m(tokens, targets)[1].item()
                t[i] = old
                fd = (lp - lm) / (2 * FD_STEP)
                ad = flat[i].item()
                r = abs(fd - ad) / (1e-7 + 1e-5 * abs(ad))
                if r > 1.0:
                    fail(case, "finite difference of %s[%d]: %.10g vs autograd %.10g" % (name, i, fd, ad))
                worst = max(worst, r)
    return worst


def sensitivity(case, cfg, weights, tokens, logits):
    """Each variant drops one feature the case exists for; its logits must
    differ from the case's by more than SENSITIVE of max|logits|, so an
    implementation that ignores the feature fails the C test."""
    variants = []
    if case == "gqa":
        variants.append(("with kv head h % Hkv, not h // (H/Hkv)", cfg, weights,
                         lambda h: h % cfg["num_key_value_heads"]))
    if cfg.get("rope_scaling"):
        variants.append(("without rope_scaling", dict(cfg, rope_scaling=None), weights, None))
    if (cfg.get("rope_scaling") or {}).get("rope_type") == "llama3":
        lin = {"factor": cfg["rope_scaling"]["factor"], "rope_type": "linear"}
        variants.append(("with linear rope_scaling of the same factor", dict(cfg, rope_scaling=lin), weights, None))
    for group, projs in (("attention", ("q_proj", "k_proj", "v_proj")), ("o_proj", ("o_proj",)),
                         ("mlp", ("gate_proj", "up_proj", "down_proj"))):
        names = [n for n in weights if n.endswith(".bias") and any("." + p + "." in n for p in projs)]
        if names:
            w2 = dict(weights)
            for n in names:
                w2[n] = torch.zeros_like(weights[n])
            variants.append(("without the %s biases" % group, cfg, w2, None))
    if cfg["model_type"] == "qwen3":
        variants.append(("without q_norm/k_norm", dict(cfg, model_type="llama"), weights, None))
    out = []
    for what, c2, w2, kvmap in variants:
        lg, _ = independent_forward(c2, w2, tokens, kv_of_head=kvmap)
        d = rel_max(lg, logits)
        if d < SENSITIVE:
            fail(case, "'%s' moves logits only %.2e of max|logits|" % (what, d))
        out.append((what, d))
    return out


def window_check(case, cfg, weights, tokens, logits):
    """The sliding-window mask (key j visible to query i iff i - W < j <= i)
    on windows the committed case does not use: W = T changes nothing,
    W = T - 1 hides key 0 from the last query only, W = 4 changes most rows;
    both forwards must agree on each."""
    out = []
    with torch.no_grad():
        for w in (T, T - 1, 4):
            c2 = dict(cfg, sliding_window=w)
            a, _ = R.build_model(c2, weights)(tokens)
            b, _ = independent_forward(c2, weights, tokens)
            if (a - b).abs().max().item() > 1e-10:
                fail(case, "sliding_window %d: the two forwards differ" % w)
            moved = rel_max(a, logits)
            if w == T and moved != 0.0:
                fail(case, "sliding_window = T differs from full attention")
            if w < T:
                rows = (a - logits).abs().amax(dim=(0, 2)) > 0          # which positions moved
                first = int(rows.nonzero()[0])
                if first != w:
                    fail(case, "sliding_window %d first changes position %d, expected %d" % (w, first, w))
                out.append(("with sliding_window %d (first moved position %d)" % (w, first), moved))
    return out


# ---------------------------------------------------------------- one case

def make_case(outdir, idx, name, model_type, st_dtype, over, covers, summary):
    cdir = os.path.join(outdir, name)
    if os.path.isdir(cdir):
        shutil.rmtree(cdir)
    os.makedirs(os.path.join(cdir, "model"))
    os.makedirs(os.path.join(cdir, "lora"))
    cfg = hf_config(model_type, st_dtype, over)
    seed = SEED + 1000 * idx
    gen = torch.Generator().manual_seed(seed)

    weights = {n: R.round_to(v, st_dtype) for n, v in R.random_weights(cfg, gen).items()}
    lora = {}
    for key, shape in R.lora_shapes(cfg, LORA_R):
        std = LORA_A_STD if ".lora_A." in key else LORA_B_STD
        lora[key] = R.round_to(std * torch.randn(shape, generator=gen, dtype=torch.float64), "F32")

    V = cfg["vocab_size"]
    tokens = torch.randint(0, V, (B, T), generator=gen)
    targets = torch.cat([tokens[:, 1:], torch.randint(0, V, (B, 1), generator=gen)], dim=1)
    targets[0, 0:2] = -1          # a "prompt" at the start of row 0
    targets[1, T - 1] = -1        # padding at the end of row 1
    targets[1, 5] = -1

    # rope bands of the llama3 case: every band must occur
    inv, bands = R.rope_inv_freq(cfg)
    if (cfg.get("rope_scaling") or {}).get("rope_type") == "llama3":
        for b in ("kept", "smoothed", "divided"):
            if b not in bands:
                fail(name, "llama3 rope: no frequency in the %s band (%s)" % (b, bands))
    if model_type == "mistral" and not cfg["sliding_window"] > T:
        fail(name, "sliding_window must exceed T for the committed case")
    if model_type in ("qwen2", "qwen3") and any(w is not None for w in R.layer_windows(cfg)):
        fail(name, "qwen case must use full attention")

    # base model: full finetuning gradients
    m = R.build_model(cfg, weights, train="base")
    logits, loss = m(tokens, targets)
    loss.backward()
    grads = {n: t.grad.detach().clone() for n, t in m.params.items()}
    logits = logits.detach()

    # base frozen, LoRA trainable
    ml = R.build_model(cfg, weights, lora, LORA_ALPHA, LORA_R, train="lora")
    logits_l, loss_l = ml(tokens, targets)
    loss_l.backward()
    grads_l = {k: t.grad.detach().clone() for k, t in ml.lora.items()}
    logits_l = logits_l.detach()
    for n, g in list(grads.items()) + list(grads_l.items()):
        if not g.abs().max().item() > 1e-8:
            fail(name, "gradient of %s is zero" % n)

    # a second forward, written differently
    scale = LORA_ALPHA / LORA_R
    with torch.no_grad():
        lg2, ls2 = independent_forward(cfg, weights, tokens, targets)
        lg3, ls3 = independent_forward(cfg, weights, tokens, targets, lora, scale)
    for what, a, b in (("logits", lg2, logits), ("loss", ls2, loss.detach()),
                       ("logits_lora", lg3, logits_l), ("loss_lora", ls3, loss_l.detach())):
        d = (a - b).abs().max().item()
        if d > 1e-10:
            fail(name, "cross-check of %s: max |difference| %.3g" % (what, d))
    lora_effect = rel_max(logits_l, logits)
    if lora_effect < SENSITIVE:
        fail(name, "LoRA moves logits only %.2e of max|logits|" % lora_effect)

    # LoRA with B = 0 is the base model exactly
    zero_b = {k: (torch.zeros_like(v) if ".lora_B." in k else v) for k, v in lora.items()}
    with torch.no_grad():
        lz, lsz = R.build_model(cfg, weights, zero_b, LORA_ALPHA, LORA_R)(tokens, targets)
    if not torch.equal(lz, logits) or lsz.item() != loss.item():
        fail(name, "LoRA with B = 0 differs from the base model")

    fd_gen = torch.Generator().manual_seed(seed + 1)
    fd_base = finite_difference(name, cfg, weights, None, tokens, targets, grads, "base", fd_gen)
    fd_lora = finite_difference(name, cfg, weights, lora, tokens, targets, grads_l, "lora", fd_gen)
    sens = sensitivity(name, cfg, weights, tokens, logits)
    if model_type == "mistral":
        sens += window_check(name, cfg, weights, tokens, logits)

    # float32 run of the same weights: what the C tolerances must absorb
    m32 = R.build_model(cfg, weights, dtype=torch.float32, train="base")
    lg32, ls32 = m32(tokens, targets)
    ls32.backward()
    f32_logit = ((lg32.double() - logits).abs() / logits.abs().clamp(min=0.1)).max().item()
    f32_logit_max = ((lg32.double() - logits).abs().max() / logits.abs().max()).item()
    f32_loss = abs(ls32.item() - loss.item()) / abs(loss.item())
    f32_grad = max(((m32.params[n].grad.double() - g).abs().max() / g.abs().max()).item()
                   for n, g in grads.items())
    m32l = R.build_model(cfg, weights, lora, LORA_ALPHA, LORA_R, dtype=torch.float32, train="lora")
    lg32l, ls32l = m32l(tokens, targets)
    ls32l.backward()
    f32_grad_l = max(((m32l.lora[k].grad.double() - g).abs().max() / g.abs().max()).item()
                     for k, g in grads_l.items())

    expected = [("tokens", tokens.double()), ("targets", targets.double()),
                ("logits", logits), ("loss", loss.detach().reshape(1))]
    expected += [("grad." + n, g) for n, g in grads.items()]
    expected += [("logits_lora", logits_l), ("loss_lora", loss_l.detach().reshape(1))]
    expected += [("grad_lora." + k, g) for k, g in grads_l.items()]
    meta = {"format": "pt", "generator": "tests/ref/make_llama_fixtures.py", "case": name,
            "B": str(B), "T": str(T), "seed": str(seed), "lora_r": str(LORA_R),
            "lora_alpha": str(LORA_ALPHA)}

    gen_info = None
    if name == "gqa":
        for attempt in range(1, 51):
            prompt = torch.randint(0, V, (1, GEN_PROMPT), generator=gen)
            g0, mg0 = m.greedy(prompt, GEN_NEW)
            g1, mg1 = ml.greedy(prompt, GEN_NEW)
            if min(mg0 + mg1) > GEN_MIN_MARGIN:
                break
        else:
            fail(name, "no prompt with every greedy margin > %g" % GEN_MIN_MARGIN)
        if torch.equal(g0, g1):
            fail(name, "LoRA does not change the greedy continuation")
        expected += [("gen_prompt", prompt.double()), ("gen_greedy", g0.double()),
                     ("gen_greedy_lora", g1.double())]
        meta["gen_prompt_attempts"] = str(attempt)
        gen_info = (prompt, g0, g1, min(mg0), min(mg1), attempt)

    # ---- write
    mdir = os.path.join(cdir, "model")
    write_json(os.path.join(mdir, "config.json"), cfg)
    names = [n for n, _ in R.param_shapes(cfg)]
    if name == "qwen2":
        split = [n for n in names if n.startswith("model.embed_tokens.") or n.startswith("model.layers.0.")]
        shards = [split, [n for n in names if n not in split]]
        wmap, total = {}, 0
        for i, part in enumerate(shards):
            fn = "model-%05d-of-%05d.safetensors" % (i + 1, len(shards))
            total += R.write_safetensors(os.path.join(mdir, fn), [(n, weights[n]) for n in part], st_dtype)
            for n in part:
                wmap[n] = fn
        write_json(os.path.join(mdir, "model.safetensors.index.json"),
                   {"metadata": {"total_size": total}, "weight_map": wmap})
    else:
        R.write_safetensors(os.path.join(mdir, "model.safetensors"), [(n, weights[n]) for n in names], st_dtype)
    ldir = os.path.join(cdir, "lora")
    write_json(os.path.join(ldir, "adapter_config.json"), adapter_config())
    R.write_safetensors(os.path.join(ldir, "adapter_model.safetensors"), list(lora.items()), "F32")
    R.write_safetensors(os.path.join(cdir, "expected.safetensors"), expected, "F32", meta)

    # ---- read back: the files hold exactly the values the reference used
    cfg_r, w_r = R.load_model_dir(mdir)
    acfg_r, lora_r = R.load_adapter_dir(ldir)
    if cfg_r != cfg or set(w_r) != set(weights) or set(lora_r) != set(lora):
        fail(name, "read-back: config or tensor names differ")
    for n in weights:
        if not torch.equal(w_r[n], weights[n]):
            fail(name, "read-back: %s differs" % n)
    for k in lora:
        if not torch.equal(lora_r[k], lora[k]):
            fail(name, "read-back: %s differs" % k)
    with torch.no_grad():
        lr, _ = R.build_model(cfg_r, w_r, lora_r, acfg_r["lora_alpha"], acfg_r["r"])(tokens, targets)
    if not torch.equal(lr, logits_l):
        fail(name, "read-back: logits_lora from the files differ")
    exp_r, meta_r, dt_r = R.read_safetensors(os.path.join(cdir, "expected.safetensors"))
    for n, t in expected:
        if set(dt_r.values()) != {"F32"} or tuple(exp_r[n].shape) != tuple(t.shape):
            fail(name, "read-back: expected %s" % n)
    if not torch.equal(exp_r["tokens"].long(), tokens) or not torch.equal(exp_r["targets"].long(), targets):
        fail(name, "read-back: tokens/targets")

    size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(cdir) for f in fs)
    summary.append(dict(name=name, covers=covers, loss=loss.item(), loss_lora=loss_l.item(),
                        maxlogit=logits.abs().max().item(), lora_effect=lora_effect,
                        fd_base=fd_base, fd_lora=fd_lora, sens=sens, f32_logit=f32_logit,
                        f32_logit_max=f32_logit_max,
                        f32_loss=f32_loss, f32_grad=f32_grad, f32_grad_l=f32_grad_l, size=size,
                        bands=bands, inv=inv, gen=gen_info, nparam=sum(t.numel() for t in weights.values()),
                        nlora=sum(t.numel() for t in lora.values())))


def main():
    outdir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "llama-parity")
    os.makedirs(outdir, exist_ok=True)
    summary = []
    for idx, (name, mt, dt, over, covers) in enumerate(CASES):
        make_case(outdir, idx, name, mt, dt, over, covers, summary)
    total = 0
    for s in summary:
        total += s["size"]
        print("%-8s params %5d lora %4d  loss %.6f  loss_lora %.6f  max|logit| %.2f  lora moves %.2f  "
              "%6.1f KB" % (s["name"], s["nparam"], s["nlora"], s["loss"], s["loss_lora"], s["maxlogit"],
                           s["lora_effect"], s["size"] / 1024))
        print("         fd worst ratio base %.3f lora %.3f (<= 1 passes)" % (s["fd_base"], s["fd_lora"]))
        print("         float32 vs float64: logits %.2e of max|logits|, %.2e elementwise (floor 0.1)  "
              "loss %.2e  grad %.2e  grad_lora %.2e (of max|g|)"
              % (s["f32_logit_max"], s["f32_logit"], s["f32_loss"], s["f32_grad"], s["f32_grad_l"]))
        for what, d in s["sens"]:
            print("         %-50s logits move %.3f of max" % (what, d))
        if s["bands"]:
            print("         llama3 bands %s  inv_freq %s" % (s["bands"], ["%.4g" % v for v in s["inv"]]))
        if s["gen"]:
            p, g0, g1, m0, m1, att = s["gen"]
            print("         gen prompt %s  greedy %s (min margin %.3f)  lora %s (min margin %.3f)  attempt %d"
                  % (p.tolist()[0], g0.tolist()[0], m0, g1.tolist()[0], m1, att))
    print("total %.1f KB" % (total / 1024))


if __name__ == "__main__":
    main()
