"""The benchmark model as plain PyTorch (eager): a GPT-2-style decoder.

Written the way nanoGPT / HF GPT-2 write it, with nothing tuned for speed:
pre-norm blocks of LayerNorm -> fused qkv Linear (with bias, or without when
`bias=False`, the shape of llm_jax's `use_bias=False`) -> causal
`F.scaled_dot_product_attention` -> output Linear, then LayerNorm -> Linear ->
GELU (tanh form) -> Linear; learned positions, tied input/output embeddings,
float32 everywhere. The optimizer is `torch.optim.AdamW` (its default foreach
implementation) with the same hyper-parameters, weight-decay mask (matrices
and embeddings only), global-norm clipping and warmup + cosine schedule as
`llm_jax.train.make_optimizer`.

`load_from_jax` copies an `llm_jax.model` params tree (nested dicts of numpy
arrays) into the module, so the benchmark can check that both frameworks compute
the same loss. It is timed in a process of its own that never imports jax
(benchmarks/core.py).

torch is an optional dependency of the benchmark only; llm_jax never imports it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d_model: int, num_heads: int, d_ff: int, eps: float, manual_attention: bool,
                 bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.manual_attention = manual_attention
        self.ln_1 = nn.LayerNorm(d_model, eps=eps)  # LayerNorm keeps its bias, as llm_jax's does
        self.c_attn = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.c_proj = nn.Linear(d_model, d_model, bias=bias)
        self.ln_2 = nn.LayerNorm(d_model, eps=eps)
        self.c_fc = nn.Linear(d_model, d_ff, bias=bias)
        self.mlp_proj = nn.Linear(d_ff, d_model, bias=bias)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.c_attn(x).split(D, dim=2)
        q, k, v = (t.view(B, T, self.num_heads, D // self.num_heads).transpose(1, 2) for t in (q, k, v))
        if self.manual_attention:  # the textbook form: materialized [B, N, T, T] scores
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1])
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            att = att.masked_fill(~causal, float("-inf")).softmax(-1)
            y = att @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln_1(x))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, num_layers: int, num_heads: int, d_ff: int,
                 max_len: int, eps: float = 1e-5, manual_attention: bool = False, bias: bool = True):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, num_heads, d_ff, eps, manual_attention, bias)
                                    for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(d_model, eps=eps)
        std, out_std = 0.02, 0.02 / math.sqrt(2 * num_layers)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=out_std if name.endswith(("c_proj.weight", "mlp_proj.weight")) else std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        T = tokens.shape[1]
        x = self.wte(tokens) + self.wpe(torch.arange(T, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.T  # tied LM head: [B, T, V]


def make_optimizer(model: GPT, *, lr=3e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1):
    """AdamW with weight decay on matrices/embeddings only (as llm_jax.train.decay_mask)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(b1, b2), eps=eps)


def lr_at(step: int, total_steps: int, *, lr=3e-4, warmup=100, end_ratio=0.1) -> float:
    """optax.warmup_cosine_decay_schedule with llm_jax.train.lr_schedule's arguments."""
    warmup = min(warmup, total_steps - 1)
    if step < warmup:
        return lr * step / warmup
    frac = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
    end = lr * end_ratio
    return end + (lr - end) * 0.5 * (1 + math.cos(math.pi * frac))


def loss_fn(model: GPT, batch: dict) -> torch.Tensor:
    logits = model(batch["inputs"])
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["targets"].reshape(-1),
                          reduction="none")
    w = batch["weights"].reshape(-1)
    return (nll * w).sum() / w.sum()


def make_train_step(model: GPT, optimizer: torch.optim.Optimizer, total_steps: int = 1000,
                    clip_norm: float = 1.0):
    state = {"step": 0}

    def step(batch: dict) -> float:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(state["step"], total_steps)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        optimizer.step()
        state["step"] += 1
        return loss.detach()

    return step


def to_torch_batch(batch: dict) -> dict:
    return {"inputs": torch.from_numpy(np.asarray(batch["inputs"], np.int64)),
            "targets": torch.from_numpy(np.asarray(batch["targets"], np.int64)),
            "weights": torch.from_numpy(np.asarray(batch["weights"], np.float32))}


@torch.no_grad()
def load_from_jax(model: GPT, params) -> None:
    """Copies an llm_jax params tree (GPT-2 config: learned positions, layernorm,
    gelu, tied embeddings; projection biases when `model` has them) into `model`."""
    t = lambda x: torch.from_numpy(np.array(x, np.float32))  # noqa: E731
    model.wte.weight.copy_(t(params["embed"]))
    model.wpe.weight.copy_(t(params["pos_embed"]))
    model.ln_f.weight.copy_(t(params["final_norm"]["scale"]))
    model.ln_f.bias.copy_(t(params["final_norm"]["bias"]))
    lay = params["layers"]
    a, m = lay["attn"], lay["mlp"]
    for i, blk in enumerate(model.blocks):
        D = a["q"].shape[1]
        qkv_w = [np.asarray(a[n][i]).reshape(D, -1) for n in ("q", "k", "v")]  # [D, N*H] each
        blk.c_attn.weight.copy_(t(np.concatenate(qkv_w, axis=1).T))
        blk.c_proj.weight.copy_(t(np.asarray(a["o"][i]).reshape(-1, D).T))
        blk.c_fc.weight.copy_(t(np.asarray(m["up"][i]).T))
        blk.mlp_proj.weight.copy_(t(np.asarray(m["down"][i]).T))
        if blk.c_attn.bias is not None:
            blk.c_attn.bias.copy_(t(np.concatenate([np.asarray(a[n + "_bias"][i]).reshape(-1)
                                                    for n in ("q", "k", "v")])))
            blk.c_proj.bias.copy_(t(a["o_bias"][i]))
            blk.c_fc.bias.copy_(t(m["up_bias"][i]))
            blk.mlp_proj.bias.copy_(t(m["down_bias"][i]))
        blk.ln_1.weight.copy_(t(lay["attn_norm"]["scale"][i]))
        blk.ln_1.bias.copy_(t(lay["attn_norm"]["bias"][i]))
        blk.ln_2.weight.copy_(t(lay["mlp_norm"]["scale"][i]))
        blk.ln_2.bias.copy_(t(lay["mlp_norm"]["bias"][i]))
