#!/usr/bin/env python3
"""The work of one `peftref train` (or `peftref eval`) run in plain PyTorch.

bench/bench_train runs this once per workload and precision, each in its own
process, so the peak resident set it reads from wait4() is that run's alone:

  torch_train.py run --family gpt2 --L 12 --C 768 --H 12 --Hkv 12 --dh 64 --F 3072
                     --V 50257 --P 1024 [--bias 1] [--tied 1]
                     --mode lora|full|eval [--sites qkv] [--rank 8] [--alpha 16]
                     --B 4 --T 256 --warmup 1 --steps 3 [--dtype f32|bf16]
                     [--ids FILE] [--threads N] [AdamW settings]
  torch_train.py ceiling --shapes M,K,N[;M,K,N...] [--threads N] [--f32]
  torch_train.py info

`run` prints one JSON line: the timed step seconds, their median and minimum,
the trainable parameter count and the first and last loss, or {"na": REASON}.
`ceiling` prints the GFLOP/s of torch.matmul on each (M,K)x(K,N) shape in
bfloat16 (and float32 with --f32): one untimed product, then the median of at
least 2 and until 0.3 s.  `info` prints the torch version and its CPU backends.

A training step is what peftref's trainer times (core/train/train.c): take the
next batch of windows from the token stream, zero the gradients, forward with
the mean cross-entropy, backward, clip the global gradient norm, one AdamW
update with the step's learning rate.  The settings are peftref's defaults as
the pipeline gives them: lr 1e-3, cosine decay to min_lr_ratio 0.1 with no
warm-up, weight decay 0.01 on matrices only (peftref's decay_all: false),
betas (0.9, 0.999), eps 1e-8, clip 1.0.

bf16 runs the forward pass and the loss under torch.autocast("cpu",
dtype=torch.bfloat16) (parameters, gradients and optimizer state stay float32,
as with autocast on a GPU); the backward pass follows the autocast graph.

Models are written here in plain torch, GPT-2 (Radford et al. 2019) as
peftref's gpt2 family computes it (learned positions, pre-LayerNorm, tanh
GELU, fused qkv, tied head) and LoRA (Hu et al. 2021) as its lora plugin does:
y = x W + b + (alpha/r) (x A^T) B^T with A (r, d_in) kaiming-uniform and B
(d_out, r) zero.  The LLaMA family comes from tests/ref/llama_ref.py (--llama-ref
PATH), loaded by path when it exists; without it a llama run prints n/a.
"""
import argparse
import importlib.util
import json
import math
import os
import resource
import sys
import time


def median(v):
    s = sorted(v)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def lora_linear(torch, base, rank, alpha):
    """Wrap an nn.Linear: y = base(x) + (alpha/r) (x A^T) B^T."""
    nn = torch.nn

    class LoRALinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.base = base
            self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
            self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.scale = alpha / rank

        def forward(self, x):
            return self.base(x) + (x @ self.lora_A.t()) @ self.lora_B.t() * self.scale

    return LoRALinear()


def build_gpt2(torch, a):
    nn = torch.nn
    F = torch.nn.functional
    C, H, V, P = a.C, a.H, a.V, a.P

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1 = nn.LayerNorm(C, eps=1e-5)
            self.c_attn = nn.Linear(C, 3 * C, bias=bool(a.bias))
            self.c_proj = nn.Linear(C, C, bias=bool(a.bias))
            self.ln_2 = nn.LayerNorm(C, eps=1e-5)
            self.c_fc = nn.Linear(C, a.F, bias=bool(a.bias))
            self.mlp_proj = nn.Linear(a.F, C, bias=bool(a.bias))

        def forward(self, x, mask):
            Bq, Tq, _ = x.shape
            qkv = self.c_attn(self.ln_1(x))
            q, k, v = qkv.split(C, dim=-1)
            q = q.view(Bq, Tq, H, C // H).transpose(1, 2)
            k = k.view(Bq, Tq, H, C // H).transpose(1, 2)
            v = v.view(Bq, Tq, H, C // H).transpose(1, 2)
            s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(C // H))
            att = torch.softmax(s.masked_fill(mask, float("-inf")), dim=-1)
            y = (att @ v).transpose(1, 2).reshape(Bq, Tq, C)
            x = x + self.c_proj(y)
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT2(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(V, C)
            self.wpe = nn.Embedding(P, C)
            self.h = nn.ModuleList([Block() for _ in range(a.L)])
            self.ln_f = nn.LayerNorm(C, eps=1e-5)
            self.lm_head = None if a.tied else nn.Linear(C, V, bias=False)
            for p in self.parameters():
                if p.dim() == 2:
                    nn.init.normal_(p, std=0.02)

        def forward(self, tokens):
            Tq = tokens.shape[1]
            mask = torch.ones(Tq, Tq, dtype=torch.bool).triu(1)
            x = self.wte(tokens) + self.wpe(torch.arange(Tq))
            for blk in self.h:
                x = blk(x, mask)
            x = self.ln_f(x)
            return x @ self.wte.weight.t() if self.lm_head is None else self.lm_head(x)

    model = GPT2()
    return model, {"qkv": ["c_attn"], "o": ["c_proj"], "ffn.up": ["c_fc"], "ffn.down": ["mlp_proj"]}


LLAMA_SITES = {"q": ["q_proj", "wq"], "k": ["k_proj", "wk"], "v": ["v_proj", "wv"],
               "o": ["o_proj", "wo"], "ffn.gate": ["gate_proj", "w1"], "ffn.up": ["up_proj", "w3"],
               "ffn.down": ["down_proj", "w2"]}


def build_llama(torch, a):
    """The LLaMA decoder of tests/ref/llama_ref.py as an nn.Module, or (None,
    reason).  The reference keeps its base weights and LoRA tensors in dicts
    (Hugging Face names, PEFT keys) and applies LoRA inside its projections;
    here the base weights are made in f32 directly (normal(0, 0.02), norm
    gains 1, as transformers initialises the model), and with a LoRA the A
    and B tensors become the module's parameters (A kaiming-uniform, B zero,
    as PEFT and peftref initialise them), so AdamW and autocast see what they
    see in any PyTorch model."""
    if not a.llama_ref or not os.path.exists(a.llama_ref):
        return None, "tests/ref/llama_ref.py not in this tree"
    spec = importlib.util.spec_from_file_location("llama_ref", a.llama_ref)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = dict(model_type="llama", hidden_size=a.C, num_hidden_layers=a.L, num_attention_heads=a.H,
               num_key_value_heads=a.Hkv, head_dim=a.dh, intermediate_size=a.F, vocab_size=a.V,
               max_position_embeddings=a.P, rms_norm_eps=1e-5, rope_theta=a.rope_theta,
               rope_scaling=None, tie_word_embeddings=bool(a.tied), attention_bias=False, mlp_bias=False,
               hidden_act="silu")
    ref = mod.LlamaRef.__new__(mod.LlamaRef)   # the weights are made here, not copied
    ref.cfg, ref.dtype, ref.lora, ref.lora_scale = cfg, torch.float32, None, 0.0
    ref.windows = mod.layer_windows(cfg)
    ref.params = {}
    for name, shape in mod.param_shapes(cfg):
        if len(shape) == 1:
            ref.params[name] = torch.ones(shape, dtype=torch.float32)
        else:
            ref.params[name] = torch.empty(shape, dtype=torch.float32).normal_(0.0, 0.02)

    class RefLlama(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ref = ref
            self.lora_params = torch.nn.ParameterDict()

        def attach(self, sites, rank, alpha):
            proj = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "ffn.gate": "gate_proj",
                    "ffn.up": "up_proj", "ffn.down": "down_proj"}
            targets = tuple(proj.get(s, s) for s in sites)
            ref.lora, ref.lora_scale = {}, float(alpha) / float(rank)
            for key, shape in mod.lora_shapes(cfg, rank, targets):
                t = torch.zeros(shape, dtype=torch.float32)
                if key.endswith("lora_A.weight"):
                    torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5))
                p = torch.nn.Parameter(t)
                self.lora_params[key.replace(".", "_")] = p
                ref.lora[key] = p
            return sorted(set(targets))

        def forward(self, tokens):
            logits, _ = ref.forward(tokens)
            return logits

    return RefLlama(), None


def attach_lora(torch, model, site_names, sites, rank, alpha):
    """Replace every nn.Linear whose attribute name is one of the sites' names."""
    names = set()
    for s in sites:
        names.update(site_names.get(s, [s]))
    found = []
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in names and isinstance(child, torch.nn.Linear):
                setattr(parent, child_name, lora_linear(torch, child, rank, alpha))
                found.append(child_name)
    return found


def logits_of(out):
    if isinstance(out, (tuple, list)):
        out = out[0]
    return getattr(out, "logits", out)


def windows(torch, a):
    """Windows of T+1 tokens every T tokens, as peftref's data loader cuts a text."""
    if a.ids:
        with open(a.ids) as f:
            ids = [int(t) for t in f.read().split()]
        n = (len(ids) - 1) // a.T
        if n >= 1:
            t = torch.tensor(ids[: n * a.T + 1], dtype=torch.long)
            return torch.stack([t[i * a.T: i * a.T + a.T + 1] for i in range(n)])
    g = torch.Generator().manual_seed(a.seed)
    return torch.randint(0, a.V, (max(a.B, 1) * 4, a.T + 1), generator=g)


def cmd_run(a):
    import torch
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    if a.family == "gpt2":
        model, site_names = build_gpt2(torch, a)
    else:
        model, why = build_llama(torch, a)
        if model is None:
            print(json.dumps({"na": why}))
            return 0
    lora = a.mode in ("lora", "eval") and a.rank > 0
    if lora:
        sites = [s.strip() for s in a.sites.split(",") if s.strip()]
        if a.family == "llama":
            found = model.attach(sites, a.rank, a.alpha)
        else:
            found = attach_lora(torch, model, site_names, sites, a.rank, a.alpha)
        if not found:
            print(json.dumps({"na": "no nn.Linear named for sites %s in the model" % a.sites}))
            return 0
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
    elif a.mode == "eval":
        for p in model.parameters():
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params) if a.mode != "eval" else 0
    data = windows(torch, a)
    order = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(a.seed))
    cursor = [0]

    def next_batch():
        idx = []
        for _ in range(a.B):
            if cursor[0] == len(order):
                cursor[0] = 0
            idx.append(int(order[cursor[0]]))
            cursor[0] += 1
        w = data[idx]
        return w[:, :-1], w[:, 1:]

    def loss_of(tokens, targets):
        logits = logits_of(model(tokens))
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                 targets.reshape(-1))

    bf16 = a.dtype == "bf16"
    total = a.warmup + a.steps
    times, losses = [], []
    if a.mode == "eval":
        model.eval()
        with torch.no_grad():
            for s in range(total):
                t0 = time.perf_counter()
                tokens, targets = next_batch()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = loss_of(tokens, targets)
                dt = time.perf_counter() - t0
                losses.append(float(loss))
                if s >= a.warmup:
                    times.append(dt)
    else:
        decay = [p for p in params if p.dim() >= 2]
        other = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": a.weight_decay}]
        if other:
            groups.append({"params": other, "weight_decay": 0.0})
        opt = torch.optim.AdamW(groups, lr=a.lr, betas=(a.beta1, a.beta2), eps=a.eps)
        steps = max(total, 1)

        def lr_at(k):     # peftref's cosine schedule, no warm-up (core/train/schedule.c)
            return a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * k / steps))

        model.train()
        for s in range(total):
            t0 = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = a.lr * lr_at(s)
            tokens, targets = next_batch()
            opt.zero_grad(set_to_none=False)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = loss_of(tokens, targets)
            loss.backward()
            if a.clip > 0:
                torch.nn.utils.clip_grad_norm_(params, a.clip)
            opt.step()
            dt = time.perf_counter() - t0
            losses.append(float(loss))
            if s >= a.warmup:
                times.append(dt)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"times": times, "median": median(times), "min": min(times),
                      "trainable": trainable, "loss_first": losses[0], "loss_last": losses[-1],
                      "rss_kb": ru.ru_maxrss}))
    return 0


def cmd_ceiling(a):
    import torch
    torch.set_num_threads(a.threads)
    out = []
    for spec in a.shapes.split(";"):
        M, K, N = (int(x) for x in spec.split(","))
        row = {"shape": [M, K, N]}
        for dt, key in ((torch.bfloat16, "bf16"),) + (((torch.float32, "f32"),) if a.f32 else ()):
            g = torch.Generator().manual_seed(1)
            x = torch.randn(M, K, generator=g).to(dt)
            w = torch.randn(K, N, generator=g).to(dt)
            torch.matmul(x, w)                       # warm-up (oneDNN primitive creation)
            ts, spent = [], 0.0
            while len(ts) < 2 or (spent < a.min_seconds and len(ts) < 50):
                t0 = time.perf_counter()
                torch.matmul(x, w)
                dt_s = time.perf_counter() - t0
                ts.append(dt_s)
                spent += dt_s
            row[key] = 2.0 * M * K * N * 1e-9 / median(ts)
        out.append(row)
    print(json.dumps(out))
    return 0


def cmd_info(a):
    import torch
    caps = ""
    try:
        caps = torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        for line in torch.__config__.show().splitlines():
            if "CPU capability" in line:
                caps = line.split(":", 1)[1].strip()
    print(json.dumps({"version": torch.__version__, "mkldnn": torch.backends.mkldnn.is_available(),
                      "cpu_capability": caps, "threads": a.threads}))
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    for k, d in (("L", 2), ("C", 64), ("H", 4), ("Hkv", 0), ("dh", 0), ("F", 0), ("V", 256), ("P", 64),
                 ("bias", 1), ("tied", 1), ("rank", 8), ("B", 4), ("T", 64), ("warmup", 1), ("steps", 2),
                 ("seed", 1234), ("threads", 2)):
        r.add_argument("--" + k, type=int, default=d)
    r.add_argument("--family", choices=("gpt2", "llama"), default="gpt2")
    r.add_argument("--mode", choices=("lora", "full", "eval"), default="lora")
    r.add_argument("--sites", default="qkv")
    r.add_argument("--alpha", type=float, default=16.0)
    r.add_argument("--dtype", choices=("f32", "bf16"), default="f32")
    r.add_argument("--ids", help="token ids (whitespace-separated) to cut into windows")
    r.add_argument("--llama-ref", help="path of tests/ref/llama_ref.py")
    r.add_argument("--rope-theta", type=float, default=10000.0)
    for k, d in (("lr", 1e-3), ("weight-decay", 0.01), ("beta1", 0.9), ("beta2", 0.999), ("eps", 1e-8),
                 ("clip", 1.0), ("min-lr-ratio", 0.1)):
        r.add_argument("--" + k, type=float, default=d)
    c = sub.add_parser("ceiling")
    c.add_argument("--shapes", required=True)
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--min-seconds", type=float, default=0.3)
    c.add_argument("--f32", action="store_true", help="also time float32 torch.matmul")
    i = sub.add_parser("info")
    i.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.cmd == "run":
        a.Hkv = a.Hkv or a.H
        a.dh = a.dh or a.C // a.H
        a.F = a.F or 4 * a.C
        return cmd_run(a)
    return cmd_ceiling(a) if a.cmd == "ceiling" else cmd_info(a)


if __name__ == "__main__":
    sys.exit(main())
