"""An independent LLaMA-family decoder (LLaMA, Mistral, Qwen2, Qwen3) in plain
PyTorch, for reference values and comparisons; it never needs `transformers`.

Used by tests/ref/make_llama_fixtures.py (float64, to write the committed
parity fixtures) and usable by a benchmark script (float32):

    import llama_ref
    config, weights = llama_ref.load_model_dir("tests/ref/llama-parity/gqa/model")
    model = llama_ref.build_model(config, weights, dtype=torch.float32)
    logits, loss = model(tokens, targets)          # tokens, targets: (B,T) int64

The architecture follows the Hugging Face checkpoints of these model types
(config.json keys, tensor names, [out, in] weight layout):

  x = embed_tokens[tok]                            no position embedding
  per layer:
    h   = x + o_proj(attn(input_layernorm(x)))
    out = h + down_proj(silu(gate_proj(n)) * up_proj(n)),  n = post_attention_layernorm(h)
  logits = lm_head(norm(x))                        lm_head = embed_tokens when tied
  RMSNorm(x) = x / sqrt(mean(x^2) + eps) * w

  attention: q has H heads, k and v have Hkv heads of head_dim (config head_dim,
  else hidden/H); query head h reads kv head h // (H/Hkv); qwen3 applies a
  per-head RMSNorm (q_norm, k_norm; weight (head_dim)) to q and k before RoPE;
  RoPE rotates halves: out = x*cos + rotate_half(x)*sin with
  rotate_half([x1, x2]) = [-x2, x1], angle(pos, i) = pos * inv_freq[i] for the
  pair (i, i + head_dim/2), inv_freq[i] = theta^(-2i/head_dim), then adjusted
  by rope_scaling (linear: / factor; llama3: by wavelength band, see
  rope_inv_freq); scores = q.k / sqrt(head_dim), causal, and with a sliding
  window W key j is visible to query i iff i - W < j <= i.

  biases: llama q,k,v,o when attention_bias and gate,up,down when mlp_bias;
  qwen2 q,k,v always (never o, never the MLP); qwen3 q,k,v,o when
  attention_bias; mistral none.

  loss: mean over scored positions (target >= 0) of cross-entropy; targets are
  already aligned with positions (target[b,t] is the token predicted at t).

LoRA (Hu et al. 2021), as Hugging Face PEFT applies it to a linear layer:
  y = W x + b + (alpha/r) * B (A x),  A (r, in), B (out, r)
with PEFT's state-dict keys "base_model.model.<module>.lora_A.weight".
"""
import json
import math
import os
import struct

import numpy as np
import torch

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


# ---------------------------------------------------------------- config facts

def _check_type(cfg):
    mt = cfg.get("model_type")
    if mt not in MODEL_TYPES:
        raise ValueError("config.json: model_type %r is not one of %s" % (mt, ", ".join(MODEL_TYPES)))
    return mt


def head_dim(cfg):
    hd = cfg.get("head_dim")
    return int(hd) if hd else cfg["hidden_size"] // cfg["num_attention_heads"]


def kv_heads(cfg):
    n = cfg.get("num_key_value_heads")
    return int(n) if n else cfg["num_attention_heads"]


def tied(cfg):
    return bool(cfg.get("tie_word_embeddings", False))


def has_bias(cfg, proj):
    """Whether projection `proj` of every layer carries a bias."""
    mt = _check_type(cfg)
    if mt == "llama":
        if proj in ATTN_PROJECTIONS:
            return bool(cfg.get("attention_bias", False))
        return bool(cfg.get("mlp_bias", False))
    if mt == "qwen2":
        return proj in ("q_proj", "k_proj", "v_proj")
    if mt == "qwen3":
        return proj in ATTN_PROJECTIONS and bool(cfg.get("attention_bias", False))
    return False                                   # mistral


def has_qk_norm(cfg):
    return _check_type(cfg) == "qwen3"


def layer_windows(cfg):
    """Sliding-window size of each layer (None = full causal attention).
    mistral: sliding_window on every layer; qwen2/qwen3: only with
    use_sliding_window, on layers marked "sliding_attention" in layer_types,
    by default layers >= max_window_layers; llama: never."""
    mt = _check_type(cfg)
    L = cfg["num_hidden_layers"]
    w = cfg.get("sliding_window")
    if mt == "mistral":
        return [int(w) if w else None] * L
    if mt in ("qwen2", "qwen3"):
        if not cfg.get("use_sliding_window", False) or not w:
            return [None] * L
        types = cfg.get("layer_types")
        if types is None:
            mwl = cfg.get("max_window_layers", L)
            types = ["sliding_attention" if i >= mwl else "full_attention" for i in range(L)]
        return [int(w) if t == "sliding_attention" else None for t in types]
    return [None] * L


def proj_shape(cfg, proj):
    """[out, in] of a projection."""
    C, I = cfg["hidden_size"], cfg["intermediate_size"]
    H, Hkv, hd = cfg["num_attention_heads"], kv_heads(cfg), head_dim(cfg)
    return {"q_proj": (H * hd, C), "k_proj": (Hkv * hd, C), "v_proj": (Hkv * hd, C),
            "o_proj": (C, H * hd), "gate_proj": (I, C), "up_proj": (I, C),
            "down_proj": (C, I)}[proj]


def module_name(layer, proj):
    sub = "self_attn" if proj in ATTN_PROJECTIONS else "mlp"
    return "model.layers.%d.%s.%s" % (layer, sub, proj)


def param_shapes(cfg):
    """(Hugging Face tensor name, shape) of every base parameter, in module order."""
    _check_type(cfg)
    C, V, hd = cfg["hidden_size"], cfg["vocab_size"], head_dim(cfg)
    out = [("model.embed_tokens.weight", (V, C))]
    for l in range(cfg["num_hidden_layers"]):
        p = "model.layers.%d." % l
        out.append((p + "input_layernorm.weight", (C,)))
        for proj in PROJECTIONS:
            if proj == "gate_proj":
                out.append((p + "post_attention_layernorm.weight", (C,)))
            m = module_name(l, proj)
            out.append((m + ".weight", proj_shape(cfg, proj)))
            if has_bias(cfg, proj):
                out.append((m + ".bias", (proj_shape(cfg, proj)[0],)))
            if proj == "k_proj" and has_qk_norm(cfg):
                out.append((p + "self_attn.q_norm.weight", (hd,)))
                out.append((p + "self_attn.k_norm.weight", (hd,)))
    out.append(("model.norm.weight", (C,)))
    if not tied(cfg):
        out.append(("lm_head.weight", (V, C)))
    return out


def lora_shapes(cfg, r, targets=PROJECTIONS):
    """(PEFT key, shape) of every LoRA tensor: A (r, in) then B (out, r) for
    each targeted projection of every layer."""
    out = []
    for l in range(cfg["num_hidden_layers"]):
        for proj in PROJECTIONS:
            if proj not in targets:
                continue
            o, i = proj_shape(cfg, proj)
            key = "base_model.model." + module_name(l, proj)
            out.append((key + ".lora_A.weight", (r, i)))
            out.append((key + ".lora_B.weight", (o, r)))
    return out


def is_norm_gain(name):
    return name.endswith("norm.weight")


def rope_inv_freq(cfg):
    """Inverse frequencies (head_dim/2,) float64 and, for rope_type llama3,
    the band of each: "kept" (wavelength < original/high_freq_factor),
    "divided" (wavelength > original/low_freq_factor, inv_freq / factor) or
    "smoothed" (between: (1-s) inv_freq/factor + s inv_freq with
    s = (original/wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor))."""
    hd = head_dim(cfg)
    theta = float(cfg.get("rope_theta", 10000.0))
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    rs = cfg.get("rope_scaling")
    if rs is None:
        return inv, None
    rt = rs.get("rope_type", rs.get("type", "default"))
    if rt == "default":
        return inv, None
    if rt == "linear":
        return inv / float(rs["factor"]), None
    if rt == "llama3":
        factor = float(rs["factor"])
        lo, hi = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        orig = float(rs["original_max_position_embeddings"])
        wavelen = 2.0 * math.pi / inv
        out = torch.empty_like(inv)
        bands = []
        for i in range(inv.numel()):
            w = wavelen[i].item()
            if w < orig / hi:
                out[i], b = inv[i], "kept"
            elif w > orig / lo:
                out[i], b = inv[i] / factor, "divided"
            else:
                s = (orig / w - lo) / (hi - lo)
                out[i], b = (1.0 - s) * inv[i] / factor + s * inv[i], "smoothed"
            bands.append(b)
        return out, bands
    raise NotImplementedError("config.json: rope_scaling rope_type %r is not implemented" % rt)


def rope_cos_sin(cfg, T, dtype):
    inv, _ = rope_inv_freq(cfg)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]     # (T, hd/2)
    ang = torch.cat([ang, ang], dim=-1)                                    # (T, hd)
    return ang.cos().to(dtype), ang.sin().to(dtype)


# ---------------------------------------------------------------- the model

def rmsnorm(x, w, eps):
    return x * torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + eps) * w


def rotate_half(x):
    n = x.shape[-1] // 2
    return torch.cat([-x[..., n:], x[..., :n]], dim=-1)


def attention_mask(T, window):
    """(T, T) bool, True where key j is visible to query i."""
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    ok = j <= i
    if window is not None:
        ok = ok & (j > i - window)
    return ok


class LlamaRef:
    """The decoder over a dict of parameters.

    params   {HF name: tensor} of the base model, cast to `dtype`
    lora     {PEFT key: tensor} or None; scale = lora_alpha / r
    train    "base": base parameters are leaves with requires_grad (full
             finetuning); "lora": only the LoRA tensors; None: no gradients.
    """

    def __init__(self, config, weights, lora=None, lora_alpha=None, lora_r=None,
                 dtype=torch.float64, train=None):
        _check_type(config)
        self.cfg = config
        self.dtype = dtype
        missing = [n for n, _ in param_shapes(config) if n not in weights]
        if missing:
            raise KeyError("weights: no tensor %s" % missing[0])
        self.params = {}
        for name, shape in param_shapes(config):
            t = torch.as_tensor(weights[name]).detach().to(dtype).clone()
            if tuple(t.shape) != tuple(shape):
                raise ValueError("weights: %s has shape %s, expected %s" % (name, tuple(t.shape), shape))
            t.requires_grad_(train == "base")
            self.params[name] = t
        self.lora = None
        self.lora_scale = 0.0
        if lora is not None:
            if not lora_r or lora_alpha is None:
                raise ValueError("lora: lora_r and lora_alpha are required")
            self.lora_scale = float(lora_alpha) / float(lora_r)
            self.lora = {}
            for k, v in lora.items():
                t = torch.as_tensor(v).detach().to(dtype).clone()
                t.requires_grad_(train == "lora")
                self.lora[k] = t
        self.windows = layer_windows(config)

    def linear(self, x, layer, proj):
        m = module_name(layer, proj)
        y = x @ self.params[m + ".weight"].t()
        b = self.params.get(m + ".bias")
        if b is not None:
            y = y + b
        if self.lora is not None:
            key = "base_model.model." + m
            A = self.lora.get(key + ".lora_A.weight")
            if A is not None:
                Bm = self.lora[key + ".lora_B.weight"]
                y = y + self.lora_scale * ((x @ A.t()) @ Bm.t())
        return y

    def forward(self, tokens, targets=None):
        """tokens (B,T) int64 -> logits (B,T,V); loss (scalar) when targets given."""
        cfg, p = self.cfg, self.params
        eps = float(cfg["rms_norm_eps"])
        H, Hkv, hd = cfg["num_attention_heads"], kv_heads(cfg), head_dim(cfg)
        Bn, T = tokens.shape
        cos, sin = rope_cos_sin(cfg, T, self.dtype)
        x = p["model.embed_tokens.weight"][tokens]
        for l in range(cfg["num_hidden_layers"]):
            pre = "model.layers.%d." % l
            a = rmsnorm(x, p[pre + "input_layernorm.weight"], eps)
            q = self.linear(a, l, "q_proj").view(Bn, T, H, hd).transpose(1, 2)
            k = self.linear(a, l, "k_proj").view(Bn, T, Hkv, hd).transpose(1, 2)
            v = self.linear(a, l, "v_proj").view(Bn, T, Hkv, hd).transpose(1, 2)
            if has_qk_norm(cfg):
                q = rmsnorm(q, p[pre + "self_attn.q_norm.weight"], eps)
                k = rmsnorm(k, p[pre + "self_attn.k_norm.weight"], eps)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            # kv head g serves query heads g*(H/Hkv) .. (g+1)*(H/Hkv)-1
            k = k.repeat_interleave(H // Hkv, dim=1)
            v = v.repeat_interleave(H // Hkv, dim=1)
            s = (q @ k.transpose(-1, -2)) / math.sqrt(hd)                 # (B,H,T,T)
            s = s.masked_fill(~attention_mask(T, self.windows[l]), float("-inf"))
            y = torch.softmax(s, dim=-1) @ v                               # (B,H,T,hd)
            y = y.transpose(1, 2).reshape(Bn, T, H * hd)
            h = x + self.linear(y, l, "o_proj")
            n = rmsnorm(h, p[pre + "post_attention_layernorm.weight"], eps)
            u = torch.nn.functional.silu(self.linear(n, l, "gate_proj")) * self.linear(n, l, "up_proj")
            x = h + self.linear(u, l, "down_proj")
        x = rmsnorm(x, p["model.norm.weight"], eps)
        head = p["model.embed_tokens.weight"] if tied(cfg) else p["lm_head.weight"]
        logits = x @ head.t()
        if targets is None:
            return logits, None
        return logits, mean_cross_entropy(logits, targets)

    __call__ = forward

    def greedy(self, prompt, n):
        """n argmax continuation tokens of prompt (1,P), recomputing the whole
        sequence each step.  Returns (tokens (1,n) int64, the top-1 minus
        top-2 logit margin of each step)."""
        seq = prompt.clone()
        out, margins = [], []
        with torch.no_grad():
            for _ in range(n):
                logits, _ = self.forward(seq)
                last = logits[0, -1]
                top = torch.topk(last, 2)
                tok = int(top.indices[0])
                margins.append(float(top.values[0] - top.values[1]))
                out.append(tok)
                seq = torch.cat([seq, torch.tensor([[tok]], dtype=seq.dtype)], dim=1)
        return torch.tensor([out], dtype=torch.int64), margins


def mean_cross_entropy(logits, targets):
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    mask = targets >= 0
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * mask).sum() / mask.sum()


def build_model(config, weights, lora=None, lora_alpha=None, lora_r=None,
                dtype=torch.float64, train=None):
    """The model for a config dict (config.json) and weights {HF name: tensor};
    see LlamaRef.  Calling it on (tokens, targets) returns (logits, loss)."""
    return LlamaRef(config, weights, lora, lora_alpha, lora_r, dtype, train)


def random_weights(cfg, gen, gain=1.5, embed_std=0.5, bias_std=0.2, norm_std=0.1):
    """{HF name: float64 tensor}: norm gains 1 + N(0, norm_std), biases
    N(0, bias_std), embeddings N(0, embed_std), other matrices
    N(0, gain^2 / in), so each projection of a unit-RMS input has entries of
    standard deviation ~gain (attention far from uniform, SiLU far from linear)."""
    out = {}
    for name, shape in param_shapes(cfg):
        z = torch.randn(shape, generator=gen, dtype=torch.float64)
        if is_norm_gain(name):
            v = 1.0 + norm_std * z
        elif len(shape) == 1:
            v = bias_std * z
        elif name == "model.embed_tokens.weight":
            v = embed_std * z
        else:
            v = gain / math.sqrt(shape[1]) * z
        out[name] = v
    return out


# ---------------------------------------------------------------- safetensors

_NP = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8", "I64": "<i8", "I32": "<i4"}
_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def round_to(t, st_dtype):
    """t (float64) rounded to a safetensors dtype and back to float64: the
    value a reader of the file sees."""
    return t.detach().to(_TORCH[st_dtype]).to(torch.float64)


def _raw(t, st_dtype):
    t = torch.as_tensor(t).detach().contiguous()
    if st_dtype == "BF16":
        return t.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2").tobytes()
    return t.to(_TORCH[st_dtype]).numpy().astype(_NP[st_dtype]).tobytes()


def write_safetensors(path, tensors, st_dtype="F32", metadata=None):
    """tensors: list of (name, tensor); every tensor stored as st_dtype
    (F32, F16 or BF16), data in name order as the safetensors library lays a
    single-dtype file out; header padded with spaces to 8 bytes.
    Returns the data size in bytes."""
    header, blobs, offset = {}, [], 0
    for name, t in sorted(tensors, key=lambda kv: kv[0]):
        raw = _raw(t, st_dtype)
        header[name] = {"dtype": st_dtype, "shape": list(torch.as_tensor(t).shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    header = dict([("__metadata__", metadata or {"format": "pt"})] + list(header.items()))
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hjson += b" " * ((8 - len(hjson) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for b in blobs:
            f.write(b)
    return offset


def read_safetensors(path):
    """({name: float64 tensor}, metadata, {name: dtype string})."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n].decode("utf-8"))
    meta = header.pop("__metadata__", {})
    base = 8 + n
    out, dtypes = {}, {}
    for name, h in header.items():
        dt = h["dtype"]
        if dt not in _NP:
            raise ValueError("%s: tensor %s has dtype %s, not read here" % (path, name, dt))
        a, b = h["data_offsets"]
        arr = np.frombuffer(data[base + a:base + b], dtype=_NP[dt])
        if dt == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out[name] = torch.from_numpy(arr.astype(np.float64).reshape(h["shape"]))
        dtypes[name] = dt
    return out, meta, dtypes


def load_model_dir(path):
    """(config dict, {HF name: float64 tensor}) of a Hugging Face model
    directory: model.safetensors, or the shards of model.safetensors.index.json."""
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    index = os.path.join(path, "model.safetensors.index.json")
    weights = {}
    if os.path.exists(index):
        with open(index) as f:
            wm = json.load(f)["weight_map"]
        for shard in sorted(set(wm.values())):
            w, _, _ = read_safetensors(os.path.join(path, shard))
            weights.update(w)
        for name, shard in wm.items():
            if name not in weights:
                raise KeyError("%s: %s is mapped to %s but not in it" % (index, name, shard))
    else:
        weights, _, _ = read_safetensors(os.path.join(path, "model.safetensors"))
    return cfg, weights


def load_adapter_dir(path):
    """(adapter_config dict, {PEFT key: float64 tensor}) of a PEFT LoRA directory."""
    with open(os.path.join(path, "adapter_config.json")) as f:
        acfg = json.load(f)
    lora, _, _ = read_safetensors(os.path.join(path, "adapter_model.safetensors"))
    return acfg, lora
