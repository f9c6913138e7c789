#!/usr/bin/env python3
"""The bench/bench_step training step in plain PyTorch, for comparison.

  python3 bench/torch_step.py [--warmup N] [--steps N] [--B N] [--T N] [--rank R]
                              [--threads N] [--header]

GPT-2 small (L=12, C=768, H=12, V=50257, 1024 positions), random init,
float32 on the CPU with torch.set_num_threads(2).  A step is zero_grad +
forward with mean cross-entropy + backward + plain SGD, in two modes:

  lora-qkv  base frozen (requires_grad False); a rank-R low-rank branch on
            the fused c_attn projection of every layer, y += (x.A).B * alpha/R
  full      every parameter trainable

Each mode runs in its own child process so that its peak resident set is
its own.  Rows are printed in bench_step's table format; the FLOP counts
use the same formula (see bench/bench_step.c).
"""
import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

MODES = ("lora-qkv r8", "full")


def build_model(torch, L=12, C=768, H=12, V=50257, P=1024, rank=8, lora=False):
    nn = torch.nn
    F = torch.nn.functional

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1 = nn.LayerNorm(C, eps=1e-5)
            self.c_attn = nn.Linear(C, 3 * C)
            self.c_proj = nn.Linear(C, C)
            self.ln_2 = nn.LayerNorm(C, eps=1e-5)
            self.c_fc = nn.Linear(C, 4 * C)
            self.mlp_proj = nn.Linear(4 * C, C)
            if lora:
                self.lora_A = nn.Parameter(torch.randn(C, rank) / math.sqrt(C))
                self.lora_B = nn.Parameter(0.01 * torch.randn(rank, 3 * C))
                self.lora_scale = 16.0 / rank

        def forward(self, x):
            Bq, Tq, _ = x.shape
            a = self.ln_1(x)
            qkv = self.c_attn(a)
            if lora:
                qkv = qkv + (a @ self.lora_A) @ self.lora_B * self.lora_scale
            q, k, v = qkv.split(C, dim=-1)
            q = q.view(Bq, Tq, H, C // H).transpose(1, 2)
            k = k.view(Bq, Tq, H, C // H).transpose(1, 2)
            v = v.view(Bq, Tq, H, C // H).transpose(1, 2)
            s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(C // H))
            mask = torch.ones(Tq, Tq, dtype=torch.bool).triu(1)
            att = torch.softmax(s.masked_fill(mask, float("-inf")), dim=-1)
            y = (att @ v).transpose(1, 2).reshape(Bq, Tq, C)
            x = x + self.c_proj(y)
            x = x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))
            return x

    class GPT2(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(V, C)
            self.wpe = nn.Embedding(P, C)
            self.h = nn.ModuleList([Block() for _ in range(L)])
            self.ln_f = nn.LayerNorm(C, eps=1e-5)
            for name, p in self.named_parameters():
                if name.endswith("weight") and p.dim() == 2 and "lora" not in name:
                    nn.init.normal_(p, std=0.02)

        def forward(self, tokens, targets):
            Tq = tokens.shape[1]
            x = self.wte(tokens) + self.wpe(torch.arange(Tq))
            for blk in self.h:
                x = blk(x)
            logits = self.ln_f(x) @ self.wte.weight.t()          # tied head
            return F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-1)

    return GPT2()


def gflop(mode, L, C, V, B, T, r):
    N = B * T
    nm = L * 12.0 * C * C + V * C
    attn = 4.0 * L * T * T * C * B
    fwd = 2.0 * nm * N + attn
    if mode == "full":
        return 3.0 * fwd * 1e-9
    return (fwd + 2.0 * nm * N + 2.0 * attn + 24.0 * L * N * r * C) * 1e-9


def child(args):
    import torch
    torch.set_num_threads(args.threads)
    torch.manual_seed(1234)
    lora = args.mode != "full"
    model = build_model(torch, rank=args.rank, lora=lora)
    if lora:
        for name, p in model.named_parameters():
            p.requires_grad_("lora" in name)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.SGD(params, lr=1e-4)
    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, 50257, (args.B, args.T), generator=g)
    targets = torch.randint(0, 50257, (args.B, args.T), generator=g)
    times, losses = [], []
    for s in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        loss = model(tokens, targets)
        loss.backward()
        opt.step()
        dt = time.perf_counter() - t0
        losses.append(loss.item())
        if s >= args.warmup:
            times.append(dt)
    times.sort()
    n = len(times)
    med = times[n // 2] if n % 2 else 0.5 * (times[n // 2 - 1] + times[n // 2])
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(dict(median=med, min=times[0], trainable=trainable, rss_kb=rss_kb,
                          loss_first=losses[0], loss_last=losses[-1])))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--T", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--header", action="store_true", help="print the table header too")
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        child(args)
        return 0

    import torch
    if args.header:
        print("%-8s %-12s %12s %10s %10s %10s %10s %10s" % (
            "impl", "mode", "trainable", "step ms", "min ms", "tok/s", "GFLOP/s", "peak MiB"))
    notes = []
    status = 0
    for mode in MODES:
        cmd = [sys.executable, os.path.abspath(__file__), "--mode", mode,
               "--warmup", str(args.warmup), "--steps", str(args.steps), "--B", str(args.B),
               "--T", str(args.T), "--rank", str(args.rank), "--threads", str(args.threads)]
        p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if p.returncode != 0 or not p.stdout.strip():
            print("%-8s %-12s child failed (status %d)" % ("torch", mode, p.returncode))
            status = 1
            continue
        r = json.loads(p.stdout.strip().splitlines()[-1])
        gf = gflop(mode, 12, 768, 50257, args.B, args.T, args.rank)
        print("%-8s %-12s %12d %10.1f %10.1f %10.0f %10.1f %10.0f" % (
            "torch", mode, r["trainable"], 1e3 * r["median"], 1e3 * r["min"],
            args.B * args.T / r["median"], gf / r["median"], r["rss_kb"] / 1024.0))
        sys.stdout.flush()
        notes.append("  torch %s: %.1f GFLOP per step; loss %.4f -> %.4f" % (
            mode, gf, r["loss_first"], r["loss_last"]))
    print("torch %s, %d threads (torch.set_num_threads)" % (torch.__version__, args.threads))
    for n in notes:
        print(n)
    return status


if __name__ == "__main__":
    sys.exit(main())
