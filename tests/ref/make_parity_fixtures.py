#!/usr/bin/env python3
"""Generate the GPT-2 parity fixtures in tests/ref/gpt2-parity/.

An independent GPT-2 (Radford et al. 2019) written in plain PyTorch, used
only to produce reference values for tests/test_parity.c.  Run it by hand
when the fixture must change; the test suite itself never needs torch.

  python3 tests/ref/make_parity_fixtures.py [OUTDIR]

Writes
  OUTDIR/model/config.json        Hugging Face GPT-2 config keys
  OUTDIR/model/model.safetensors  F32 weights, Hugging Face names
                                  ("transformer.h.0.attn.c_attn.weight", ...)
                                  including the causal-mask buffers
                                  "transformer.h.N.attn.bias"; the tied LM
                                  head is omitted, as Hugging Face does.
  OUTDIR/expected.safetensors     tokens (B,T) and targets (B,T) as F32
                                  (small integers are exact; -1 = unscored),
                                  logits (B,T,V), loss (1), and
                                  "grad.<name>" = d(mean loss)/d(param) for
                                  every parameter, names without
                                  "transformer.", checkpoint shapes.

The weights are drawn once (seeded), rounded to float32, and the reference
is then computed in float64 from those float32 values, so the only
difference a float32 implementation should show is its own rounding.

Model, as in Hugging Face's GPT2LMHeadModel with activation "gelu_new":
  x = wte[tok] + wpe[pos]
  per block:  x += c_proj(attn(ln_1(x)));  x += mlp_c_proj(gelu(c_fc(ln_2(x))))
  logits = ln_f(x) . wte^T   (tied head)
  loss = mean over scored positions of cross-entropy(logits, target)
Conv1D weights are stored [in, out]: y = x . W + b.
"""
import json
import math
import os
import struct
import sys

import numpy as np
import torch

CFG = dict(n_layer=2, n_embd=48, n_head=4, vocab_size=320, n_positions=32,
           layer_norm_epsilon=1e-5)
B, T = 2, 16
SEED = 20230424
WEIGHT_STD = 0.15     # large enough that attention and GELU are far from linear
BIAS_STD = 0.05
GAIN_STD = 0.1        # LayerNorm gains are 1 + N(0, GAIN_STD)


def param_shapes(cfg):
    """(name without "transformer.", shape) in Hugging Face order/layout."""
    C, V, P = cfg["n_embd"], cfg["vocab_size"], cfg["n_positions"]
    out = [("wte.weight", (V, C)), ("wpe.weight", (P, C))]
    for l in range(cfg["n_layer"]):
        h = "h.%d." % l
        out += [
            (h + "ln_1.weight", (C,)), (h + "ln_1.bias", (C,)),
            (h + "attn.c_attn.weight", (C, 3 * C)), (h + "attn.c_attn.bias", (3 * C,)),
            (h + "attn.c_proj.weight", (C, C)), (h + "attn.c_proj.bias", (C,)),
            (h + "ln_2.weight", (C,)), (h + "ln_2.bias", (C,)),
            (h + "mlp.c_fc.weight", (C, 4 * C)), (h + "mlp.c_fc.bias", (4 * C,)),
            (h + "mlp.c_proj.weight", (4 * C, C)), (h + "mlp.c_proj.bias", (C,)),
        ]
    out += [("ln_f.weight", (C,)), ("ln_f.bias", (C,))]
    return out


def init_params(cfg, gen):
    params = {}
    for name, shape in param_shapes(cfg):
        z = torch.randn(shape, generator=gen, dtype=torch.float64)
        if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight":
            v = 1.0 + GAIN_STD * z
        elif len(shape) == 1:
            v = BIAS_STD * z
        else:
            v = WEIGHT_STD * z
        # round to f32 once: the reference is exact for the stored weights
        params[name] = v.to(torch.float32).to(torch.float64).requires_grad_(True)
    return params


def layernorm(x, w, b, eps):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)   # biased, as in LayerNorm
    return (x - mean) / torch.sqrt(var + eps) * w + b


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def attention(qkv, n_head):
    Bq, Tq, C3 = qkv.shape
    C = C3 // 3
    hd = C // n_head
    q, k, v = qkv.split(C, dim=-1)
    # (B,T,C) -> (B,H,T,hd)
    q = q.view(Bq, Tq, n_head, hd).transpose(1, 2)
    k = k.view(Bq, Tq, n_head, hd).transpose(1, 2)
    v = v.view(Bq, Tq, n_head, hd).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    causal = torch.tril(torch.ones(Tq, Tq, dtype=torch.bool))
    scores = scores.masked_fill(~causal, float("-inf"))
    att = torch.softmax(scores, dim=-1)
    y = att @ v                                    # (B,H,T,hd)
    return y.transpose(1, 2).reshape(Bq, Tq, C)


def forward(p, cfg, tokens, targets):
    eps = cfg["layer_norm_epsilon"]
    Tq = tokens.shape[1]
    x = p["wte.weight"][tokens] + p["wpe.weight"][torch.arange(Tq)]
    for l in range(cfg["n_layer"]):
        h = "h.%d." % l
        a = layernorm(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"], eps)
        qkv = a @ p[h + "attn.c_attn.weight"] + p[h + "attn.c_attn.bias"]
        y = attention(qkv, cfg["n_head"])
        x = x + (y @ p[h + "attn.c_proj.weight"] + p[h + "attn.c_proj.bias"])
        a = layernorm(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"], eps)
        u = gelu_tanh(a @ p[h + "mlp.c_fc.weight"] + p[h + "mlp.c_fc.bias"])
        x = x + (u @ p[h + "mlp.c_proj.weight"] + p[h + "mlp.c_proj.bias"])
    x = layernorm(x, p["ln_f.weight"], p["ln_f.bias"], eps)
    logits = x @ p["wte.weight"].t()
    # mean cross-entropy over scored positions, written out (no library loss)
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    mask = targets >= 0
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    loss = -(picked * mask).sum() / mask.sum()
    return logits, loss


def cross_check(p, cfg, tokens, targets, logits, loss):
    """The same forward with torch's own layers (nn.functional), to catch a
    slip in the hand-written one above."""
    F = torch.nn.functional
    eps = cfg["layer_norm_epsilon"]
    C, H = cfg["n_embd"], cfg["n_head"]
    Tq = tokens.shape[1]
    with torch.no_grad():
        x = F.embedding(tokens, p["wte.weight"]) + p["wpe.weight"][:Tq]
        mha = torch.nn.MultiheadAttention(C, H, bias=True, batch_first=True).double()
        causal = torch.triu(torch.ones(Tq, Tq, dtype=torch.bool), diagonal=1)
        for l in range(cfg["n_layer"]):
            h = "h.%d." % l
            a = F.layer_norm(x, (C,), p[h + "ln_1.weight"], p[h + "ln_1.bias"], eps)
            mha.in_proj_weight.copy_(p[h + "attn.c_attn.weight"].t())
            mha.in_proj_bias.copy_(p[h + "attn.c_attn.bias"])
            mha.out_proj.weight.copy_(p[h + "attn.c_proj.weight"].t())
            mha.out_proj.bias.copy_(p[h + "attn.c_proj.bias"])
            y, _ = mha(a, a, a, attn_mask=causal, need_weights=False)
            x = x + y
            a = F.layer_norm(x, (C,), p[h + "ln_2.weight"], p[h + "ln_2.bias"], eps)
            u = F.gelu(F.linear(a, p[h + "mlp.c_fc.weight"].t(), p[h + "mlp.c_fc.bias"]),
                       approximate="tanh")
            x = x + F.linear(u, p[h + "mlp.c_proj.weight"].t(), p[h + "mlp.c_proj.bias"])
        x = F.layer_norm(x, (C,), p["ln_f.weight"], p["ln_f.bias"], eps)
        lg = F.linear(x, p["wte.weight"])
        ls = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), targets.reshape(-1), ignore_index=-1)
    dl = (lg - logits.detach()).abs().max().item()
    dL = abs(ls.item() - loss.item())
    if dl > 1e-10 or dL > 1e-10:
        raise SystemExit("cross-check failed: max |dlogits| %g, |dloss| %g" % (dl, dL))


def write_safetensors(path, tensors, metadata=None):
    """tensors: list of (name, float32 numpy array).  safetensors layout:
    u64 LE header size, JSON header, then the raw little-endian data."""
    header = {}
    offset = 0
    blobs = []
    for name, arr in tensors:
        arr = np.ascontiguousarray(arr, dtype="<f4")
        nbytes = arr.nbytes
        header[name] = {"dtype": "F32", "shape": list(arr.shape),
                        "data_offsets": [offset, offset + nbytes]}
        blobs.append(arr.tobytes())
        offset += nbytes
    header["__metadata__"] = metadata or {"format": "pt"}
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hjson += b" " * ((8 - len(hjson) % 8) % 8)   # keep the data 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for b in blobs:
            f.write(b)


def main():
    outdir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "gpt2-parity")
    os.makedirs(os.path.join(outdir, "model"), exist_ok=True)
    cfg = CFG
    gen = torch.Generator().manual_seed(SEED)
    params = init_params(cfg, gen)

    tokens = torch.randint(0, cfg["vocab_size"], (B, T), generator=gen)
    targets = torch.cat([tokens[:, 1:],
                         torch.randint(0, cfg["vocab_size"], (B, 1), generator=gen)], dim=1)
    # unscored positions: a "prompt" at the start of row 0, padding at the end of row 1
    targets[0, 0:3] = -1
    targets[1, T - 2:] = -1
    targets[1, 7] = -1

    logits, loss = forward(params, cfg, tokens, targets)
    cross_check(params, cfg, tokens, targets, logits, loss)
    loss.backward()

    config = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "n_layer": cfg["n_layer"],
        "n_embd": cfg["n_embd"],
        "n_head": cfg["n_head"],
        "vocab_size": cfg["vocab_size"],
        "n_positions": cfg["n_positions"],
        "n_ctx": cfg["n_positions"],
        "n_inner": None,
        "layer_norm_epsilon": cfg["layer_norm_epsilon"],
        "activation_function": "gelu_new",
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "bos_token_id": cfg["vocab_size"] - 1,
        "eos_token_id": cfg["vocab_size"] - 1,
        "torch_dtype": "float32",
    }
    with open(os.path.join(outdir, "model", "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")

    P = cfg["n_positions"]
    mask = np.tril(np.ones((P, P), dtype=np.float32)).reshape(1, 1, P, P)
    model_tensors = []
    for name, _ in param_shapes(cfg):
        model_tensors.append(("transformer." + name, params[name].detach().numpy()))
        if name.endswith("ln_1.bias"):
            layer = name.split(".")[1]
            model_tensors.append(("transformer.h.%s.attn.bias" % layer, mask))
    write_safetensors(os.path.join(outdir, "model", "model.safetensors"), model_tensors)

    expected = [
        ("tokens", tokens.numpy().astype(np.float32)),
        ("targets", targets.numpy().astype(np.float32)),
        ("logits", logits.detach().numpy()),
        ("loss", np.array([loss.item()])),
    ]
    for name, _ in param_shapes(cfg):
        expected.append(("grad." + name, params[name].grad.numpy()))
    write_safetensors(os.path.join(outdir, "expected.safetensors"), expected,
                      {"format": "pt", "generator": "tests/ref/make_parity_fixtures.py",
                       "B": str(B), "T": str(T), "seed": str(SEED)})

    nparam = sum(int(np.prod(s)) for _, s in param_shapes(cfg))
    print("params %d  loss %.6f  scored %d  |logits|max %.3f" % (
        nparam, loss.item(), int((targets >= 0).sum()), logits.abs().max().item()))
    for name, _ in param_shapes(cfg):
        g = params[name].grad
        print("  grad %-26s max|g| %.3e" % (name, g.abs().max().item()))


if __name__ == "__main__":
    main()
