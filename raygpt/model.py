"""GPT-2 in one readable file: embeddings, pre-LayerNorm blocks, SDPA attention, tied head, KV cache.

Names follow GPT-2 (wte, wpe, h, ln_f, lm_head, c_attn, c_proj). No Ray here: distribution wraps this
module from outside (DDP in raygpt.distributed), the model code never changes for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from raygpt.config import ModelConfig


@dataclass
class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated to block_size.

    ``pos`` is how many positions are filled; a forward pass with the cache writes the new positions and
    advances it. Learned absolute positions mean the cache cannot be shifted: when it is full the caller
    (raygpt.generate) re-fills it from a cropped window.
    """

    k: list[torch.Tensor]  # per layer (B, n_head, block_size, head_dim)
    v: list[torch.Tensor]
    pos: int = 0

    @classmethod
    def empty(cls, config: ModelConfig, batch_size: int, device, dtype) -> "KVCache":
        shape = (batch_size, config.n_head, config.block_size, config.n_embd // config.n_head)
        return cls(k=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)],
                   v=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)])

    @property
    def capacity(self) -> int:
        return self.k[0].size(2)

    def reset(self) -> None:
        self.pos = 0

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop the other batch rows (finished sequences) from every layer."""
        self.k = [t[rows] for t in self.k]
        self.v = [t[rows] for t in self.v]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v together
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask`` (B, 1, T, keys), True where a query may attend: given, it replaces the causal rule
        (left-padded batches; see GPT.forward)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        is_causal = mask is None
        if cache is not None:
            start = cache.pos
            cache.k[layer][:, :, start:start + T] = k
            cache.v[layer][:, :, start:start + T] = v
            # .to(): under autocast q is bf16/fp16 while the cache may hold another dtype; no-op otherwise.
            k = cache.k[layer][:, :, :start + T].to(q.dtype)
            v = cache.v[layer][:, :, :start + T].to(q.dtype)
            if start > 0 and is_causal:
                # New queries sit at positions start..start+T-1 and see every key up to their own position.
                # For one new token that is all keys (no mask); SDPA's is_causal would align the mask
                # top-left, which is wrong once start > 0.
                is_causal = False
                if T > 1:
                    mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
        # Flash / memory-efficient kernels where the device and dtype allow them.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2: ``GPT(config)(idx, targets)`` returns ``(logits, loss)``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("model.vocab_size is not set; it comes from the tokenizer (raygpt sets it for you)")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.transformer.wte.weight  # one matrix for input and output
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer) (two per block add to the stream).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                pad: torch.Tensor | None = None):
        """idx (B, T) token ids. With targets: logits (B, T, V) and the mean cross-entropy.
        Without: logits of the last position only (B, 1, V), which is all generation needs.
        With a cache: T new tokens are appended at cache.pos.

        ``pad`` (B,): prompts of different lengths in one batch, left-padded: row b's first pad[b] slots are
        filler. Its tokens take positions from 0 at slot pad[b], and no query attends to a filler slot (a
        filler query attends to itself only, so no row of the softmax is empty)."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size={self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,) slots
        mask = None
        if pad is not None:
            keys = torch.arange(start + T, device=idx.device)  # every slot a query can see
            q, k, p = pos[None, :, None], keys[None, None, :], pad[:, None, None]
            mask = ((k <= q) & ((k >= p) | (k == q)))[:, None]  # (B, 1, T, start + T)
            pos = (pos[None, :] - pad[:, None]).clamp(min=0)  # (B, T)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i, mask)
        x = self.transformer.ln_f(x)
        if cache is not None:
            cache.pos += T
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)  # (B, T, V)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; tied weights counted once. non_embedding drops the position table (as GPT-2's
        papers count), the token table stays because it is also the output head when tied."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6N over the N weights of matmuls (every Linear,
        the output head included; not the embedding lookups, biases or LayerNorms) plus attention's
        12 * n_layer * n_embd * T (PaLM appendix B). The same whether the head is tied to wte or not."""
        c = self.config
        T = seq_len or c.block_size
        matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * matmul + 12 * c.n_layer * c.n_embd * T
