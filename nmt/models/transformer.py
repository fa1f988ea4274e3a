"""The encoder-decoder Transformer of "Attention Is All You Need", with a key/value cache.

Attention runs through `scaled_dot_product_attention`, so the fused kernels of
the installed torch are used, except where a sentence's beams query its source in
a decoding step (`beam_attention`: two batched products, 3x faster on the CPU).
Incremental decoding keeps the self-attention keys/values of every decoder layer
in one preallocated tensor (room for `GROW` more tokens at a time, written in
place: a step copies nothing it already has) and the cross-attention keys/values
of the source (one tensor for all layers, computed once in `init_state`, one row
per sentence that all its beams share). Every state tensor has the batch first, so
`reorder_state` (a beam's back-pointers) is one `index_select` per tensor of
hypotheses, the cache's into the buffer the cache before last held. At d_model
256 a decoding step is bound by the number of operators it dispatches, not by
arithmetic, so the step path (`Transformer.step`) is written for one token: no
head permutes, no dropout calls in eval mode, masks built once.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nmt.config import ModelConfig
from nmt.errors import NmtError
from nmt.kernels import project
from nmt.models.common import Embeddings, Seq2Seq, State, check_choice, log_probs, output_layer

GROW = 8  # positions added to the self-attention cache when it is full


def split_heads(x: Tensor, parts: int, heads: int) -> Tensor:
    """(B, T, parts*D) -> (B, parts, H, T, D/H): the layout attention kernels want."""
    batch, length, width = x.shape
    return x.view(batch, length, parts, heads, width // (parts * heads)).permute(0, 2, 3, 1, 4)


def merge_heads(x: Tensor) -> Tensor:
    """(B, H, T, Dh) -> (B, T, H*Dh)."""
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)


@functools.cache
def decoded_length(count: int) -> Tensor:
    """The state's "length": one shared, never modified 0-dim CPU tensor per count, so that a step
    dispatches no operator to make it (outside inference mode, so any caller may hold it)."""
    with torch.inference_mode(False):
        return torch.tensor(count)


def xavier_chunks(linear: nn.Linear, chunks: int) -> None:
    """Xavier-initialise a fused projection as `chunks` separate D x D matrices, as if unfused."""
    for part in linear.weight.data.chunk(chunks, dim=0):
        nn.init.xavier_uniform_(part)


class SelfAttention(nn.Module):
    """Multi-head self-attention with Q/K/V fused into one projection."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        """x (B, T, D); mask (B, 1, 1, T) True at keys to attend -> (B, T, D)."""
        qkv = split_heads(self.qkv(x), 3, self.heads)  # (B, 3, H, T, Dh)
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(
            qkv[:, 0], qkv[:, 1], qkv[:, 2], attn_mask=mask, dropout_p=dropout, is_causal=causal
        )  # (B, H, T, Dh)
        return self.out(merge_heads(out))

    def step(self, x: Tensor, slot: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        """One new token x (B, D): its keys/values are written into `slot` (B, 2, H, 1, Dh), a view of the
        cache, and it attends over `keys` and `values` (B, H, t+1, Dh), views of the cache up to and including it."""
        qkv = self.qkv(x).view(x.size(0), 3, self.heads, 1, -1)  # (B, 3, H, 1, Dh): one token needs no permute
        slot.copy_(qkv[:, 1:])
        out = F.scaled_dot_product_attention(qkv[:, 0], keys, values)  # (B, H, 1, Dh)
        return self.out(out.reshape(x.shape))


class CrossAttention(nn.Module):
    """Multi-head attention from the decoder to the encoder output, K/V fused into one projection."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def keys_values(self, memory: Tensor) -> Tensor:
        """memory (B, S, D) -> keys/values (B, 2, H, S, Dh), computed once per sentence."""
        return split_heads(self.kv(memory), 2, self.heads)

    def forward(self, x: Tensor, kv: Tensor, mask: Tensor) -> Tensor:
        """x (B, T, D), kv (B, 2, H, S, Dh), mask (B, 1, 1, S) -> (B, T, D)."""
        q = split_heads(self.q(x), 1, self.heads)[:, 0]  # (B, H, T, Dh)
        out, _ = self.attend(q, *kv.unbind(1), mask)
        return self.out(merge_heads(out))

    def step(self, x: Tensor, keys: Tensor, values: Tensor, mask: Tensor,
             need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """One new token per row, x (R, D), for N sentences of R / N rows each (a sentence's beams, side by
        side); keys and values (N, H, S, Dh), shared by a sentence's rows -> (R, D) and weights (R, H, 1, S)
        if asked. A sentence's beams attend as the query positions of one attention call, as CTranslate2
        does: its source keys/values are neither copied per beam nor read once per beam."""
        sentences, rows = keys.size(0), x.size(0)
        q = self.q(x).view(sentences, rows // sentences, self.heads, -1).transpose(1, 2)  # (N, H, R/N, Dh)
        if rows > sentences and not need_weights:
            out, weights = beam_attention(q, keys, values, mask), None
        else:
            out, weights = self.attend(q, keys, values, mask, need_weights)
        if weights is not None:
            weights = weights.transpose(1, 2).reshape(rows, self.heads, 1, -1)
        return self.out(out.transpose(1, 2).reshape(x.shape)), weights

    def attend(self, q: Tensor, keys: Tensor, values: Tensor, mask: Tensor,
               need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """q (B, H, T, Dh) -> (B, H, T, Dh) and, if asked, the weights (B, H, T, S), computed explicitly."""
        dropout = self.dropout if self.training else 0.0
        if not need_weights:
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=dropout), None
        scores = q @ keys.transpose(-1, -2) / math.sqrt(q.size(-1))  # (B, H, T, S)
        weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        return F.dropout(weights, dropout, self.training) @ values, weights


def beam_attention(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """q (N, H, W, Dh), a sentence's W beams as queries; keys, values (N, H, S, Dh); mask (N, 1, 1, S)
    -> (N, H, W, Dh). Two batched products: for a handful of queries per sentence, CPU SDPA's flash
    kernel cost 3x as much (beam 5, d_model 256), in its overhead per (sentence, head), not in arithmetic."""
    sentences, heads, width, head_dim = q.shape
    length = keys.size(2)
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    scores = torch.baddbmm(bias.expand(-1, heads, width, -1).reshape(-1, width, length),
                           q.reshape(-1, width, head_dim), keys.reshape(-1, length, head_dim).transpose(1, 2),
                           alpha=1 / math.sqrt(head_dim))  # (N*H, W, S)
    out = scores.softmax(-1).bmm(values.reshape(-1, length, head_dim))
    return out.view(sentences, heads, width, head_dim)


ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU}
POSITION_LAYOUTS = ("interleaved", "concatenated")


class FeedForward(nn.Sequential):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(
            nn.Linear(config.d_model, config.ffn_dim),
            ACTIVATIONS[config.activation](),
            nn.Dropout(config.activation_dropout),
            nn.Linear(config.ffn_dim, config.d_model),
        )

    def forward(self, x: Tensor) -> Tensor:
        """The layers in order; dropout only while training (in eval mode it is one more call that does nothing)."""
        x = self[1](self[0](x))
        return self[3](self[2](x) if self.training else x)


class Residual(nn.Module):
    """Residual connection, dropout and LayerNorm around a sub-layer: the norm goes before (pre) or after (post)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.pre = config.norm == "pre"
        self.norm = nn.LayerNorm(config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def inp(self, x: Tensor) -> Tensor:
        """What the sub-layer reads."""
        return self.norm(x) if self.pre else x

    def add(self, x: Tensor, out: Tensor) -> Tensor:
        """The residual stream after the sub-layer produced `out`."""
        x = x + (self.dropout(out) if self.training else out)
        return x if self.pre else self.norm(x)


class EncoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(config.d_model, config.heads, config.attention_dropout)
        self.ffn = FeedForward(config)
        self.res_attn, self.res_ffn = Residual(config), Residual(config)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x (B, S, D), mask (B, 1, 1, S) -> (B, S, D)."""
        x = self.res_attn.add(x, self.attn(self.res_attn.inp(x), mask=mask))
        return self.res_ffn.add(x, self.ffn(self.res_ffn.inp(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = SelfAttention(config.d_model, config.heads, config.attention_dropout)
        self.cross_attn = CrossAttention(config.d_model, config.heads, config.attention_dropout)
        self.ffn = FeedForward(config)
        self.res_self, self.res_cross, self.res_ffn = Residual(config), Residual(config), Residual(config)

    def forward(self, x: Tensor, cross_kv: Tensor, mask: Tensor) -> Tensor:
        """Teacher forcing: x (B, T, D), the whole target (causal), cross_kv (B, 2, H, S, Dh) -> (B, T, D)."""
        x = self.res_self.add(x, self.self_attn(self.res_self.inp(x), causal=True))
        x = self.res_cross.add(x, self.cross_attn(self.res_cross.inp(x), cross_kv, mask))
        return self.res_ffn.add(x, self.ffn(self.res_ffn.inp(x)))

    def step(self, x: Tensor, slot: Tensor, self_kv: Sequence[Tensor], cross_kv: Sequence[Tensor], mask: Tensor,
             need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """One new token x (R, D) (see `SelfAttention.step`); self_kv and cross_kv are (keys, values) of the
        layer, (R, H, t+1, Dh) per row and (N, H, S, Dh) per sentence -> (R, D) and the cross-attention
        weights if asked."""
        x = self.res_self.add(x, self.self_attn.step(self.res_self.inp(x), slot, *self_kv))
        out, weights = self.cross_attn.step(self.res_cross.inp(x), *cross_kv, mask, need_weights)
        x = self.res_cross.add(x, out)
        return self.res_ffn.add(x, self.ffn(self.res_ffn.inp(x))), weights


def sinusoids(length: int, dim: int, layout: str = "interleaved") -> Tensor:
    """The fixed position encodings of Vaswani et al., (length, dim): sin on even, cos on odd channels, or
    "concatenated" as Marian lays them out (all sines, then all cosines)."""
    if layout == "concatenated":
        return concatenated_sinusoids(length, dim)
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)  # (L, 1)
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))  # (D/2,)
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return table


def concatenated_sinusoids(length: int, dim: int) -> Tensor:
    """Marian's table as Hugging Face computes it: angles and sines in float64, rounded to float32 once.

    Computed in float32 the table would differ from theirs by up to 5e-5, which imported models would feel.
    """
    channel = np.arange(dim)
    angles = np.arange(length)[:, None] / np.power(10000, 2 * (channel // 2) / dim)[None, :]  # (L, D) float64
    half = (dim + 1) // 2
    table = np.empty((length, dim))
    table[:, :half] = np.sin(angles[:, 0::2])
    table[:, half:] = np.cos(angles[:, 1::2])
    return torch.from_numpy(table).float()


class Transformer(Seq2Seq):
    sentence_keys = frozenset({"mask", "cross_kv"})
    buffer_keys = frozenset({"spare_kv"})

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        check_choice("norm", config.norm, ("pre", "post"))
        check_choice("activation", config.activation, tuple(ACTIVATIONS))
        check_choice("positions", config.positions, ("sinusoidal", "learned"))
        check_choice("position_layout", config.position_layout, POSITION_LAYOUTS)
        if config.d_model % config.heads:
            raise NmtError(f"model.d_model {config.d_model} is not divisible by model.heads {config.heads}")
        if config.enc_layers < 1 or config.dec_layers < 1:
            raise NmtError("model.enc_layers and model.dec_layers must be at least 1")
        self.config = config
        self.max_positions = config.max_positions
        dim = config.d_model
        self.embed = Embeddings(config, dim)
        if config.positions == "learned":
            self.learned_positions = nn.Embedding(config.max_positions, dim)
        else:
            table = sinusoids(config.max_positions, dim, config.position_layout)
            self.register_buffer("sinusoids", table, persistent=False)
        self.dropout = nn.Dropout(config.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(config) for _ in range(config.enc_layers))
        self.decoder = nn.ModuleList(DecoderLayer(config) for _ in range(config.dec_layers))
        # Pre-norm leaves the residual stream un-normalised: one LayerNorm closes each stack.
        pre = config.norm == "pre"
        self.encoder_norm = nn.LayerNorm(dim) if pre else nn.Identity()
        self.decoder_norm = nn.LayerNorm(dim) if pre else nn.Identity()
        self.output = output_layer(config, dim, self.embed.tgt)
        self.output_kernel = "default"  # the product `step` projects with (a translator may choose; nmt.kernels)
        self._init_weights()

    def _init_weights(self) -> None:
        """Xavier for projections (a fused Q/K/V as separate D x D blocks), zero biases, and the
        shared embedding init (N(0, 1/D) read through a sqrt(D) scale)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, SelfAttention):
                xavier_chunks(module.qkv, 3)
            elif isinstance(module, CrossAttention):
                xavier_chunks(module.kv, 2)
        self.embed.reset_parameters()
        if self.config.positions == "learned":  # as fairseq: weaker than the scaled token embeddings
            nn.init.normal_(self.learned_positions.weight, std=self.config.d_model**-0.5)

    def _with_positions(self, embedded: Tensor, offset: int = 0) -> Tensor:
        """Scaled embeddings (B, T, D) at positions offset.. -> plus positions, after dropout."""
        end = offset + embedded.size(1)
        if end > self.max_positions:
            raise NmtError(f"sequence of {end} tokens is longer than model.max_positions={self.max_positions}")
        if self.config.positions == "learned":
            positions = self.learned_positions.weight[offset:end]  # (T, D)
        else:
            positions = self.sinusoids[offset:end]
        x = embedded + positions
        return self.dropout(x) if self.training else x

    def encode(self, src: Tensor, src_mask: Tensor) -> Tensor:
        """src (B, S), src_mask (B, S) -> memory (B, S, D)."""
        x = self._with_positions(self.embed.source(src))
        mask = src_mask[:, None, None, :]  # (B, 1, 1, S)
        for layer in self.encoder:
            x = layer(x, mask)
        return self.encoder_norm(x)

    def forward(self, src: Tensor, src_mask: Tensor, tgt_in: Tensor, features_only: bool = False) -> Tensor:
        """Teacher forcing: src (B, S), src_mask (B, S), tgt_in (B, T) -> logits (B, T, V),
        or with `features_only` the decoder output (B, T, D) that `output` would project (for the fused loss)."""
        memory = self.encode(src, src_mask)
        mask = src_mask[:, None, None, :]
        x = self._with_positions(self.embed.target(tgt_in))
        for layer in self.decoder:
            x = layer(x, layer.cross_attn.keys_values(memory), mask)
        x = self.decoder_norm(x)
        return x if features_only else self.output(x)

    def init_state(self, memory: Tensor, src_mask: Tensor, keep_attention: bool = False,
                   keep_heads: bool = False) -> State:
        """The decoder's state before its first token.

        "cross_kv": the cross-attention keys/values of every layer (B, L, 2, H, S, Dh), computed once;
        "mask": the source mask as attention takes it (B, 1, 1, S) (these two keep one row per sentence
        when the search gives a sentence several rows, see `reorder_state`); "self_kv": the self-attention
        cache (B, L, 2, H, C, Dh) with room for C tokens; "length": how many it holds (a 0-dim tensor on the CPU,
        so reading it never waits for a device). With `keep_attention`, each step stores its cross-attention
        weights (averaged over heads) under "attention", (B, L, S); with `keep_heads` too, each head's under
        "attention_heads", (B, L, H, S).
        """
        c = self.config
        cross = torch.stack([layer.cross_attn.keys_values(memory) for layer in self.decoder], dim=1)
        kind = memory.device.type  # the cache holds what the projections give: autocast's dtype where it is on
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else cross.dtype
        cache = memory.new_zeros(memory.size(0), len(self.decoder), 2, c.heads, GROW, c.d_model // c.heads,
                                 dtype=dtype)
        state = {"mask": src_mask[:, None, None, :], "cross_kv": cross, "self_kv": cache,
                 "length": decoded_length(0)}
        if keep_attention:
            state["attention"] = memory.new_zeros(memory.size(0), len(self.decoder), memory.size(1))
        if keep_attention and keep_heads:
            state["attention_heads"] = memory.new_zeros(memory.size(0), len(self.decoder), c.heads, memory.size(1))
        return state

    def reorder_state(self, state: State, rows: Tensor, sentences: Tensor | None = None) -> State:
        """As `Seq2Seq.reorder_state`, with the self-attention cache gathered into the buffer that the cache
        before last held ("spare_kv"), not a new one: a fresh tensor of a large cache costs several times the
        copy in page faults (a 126 MB cache, 640 rows x 32 positions: 79 ms fresh against 14 ms reused, Zen 3).
        So a state is used once: after this call, the state given may no longer be reordered or stepped."""
        cache, spare = state["self_kv"], state.get("spare_kv")
        rest = {key: value for key, value in state.items() if key != "self_kv" and key not in self.buffer_keys}
        new = super().reorder_state(rest, rows, sentences)
        fits = (spare is not None and spare.shape[1:] == cache.shape[1:] and spare.size(0) >= len(rows)
                and spare.dtype == cache.dtype)
        if not fits:
            spare = cache.new_empty(len(rows), *cache.shape[1:])
        new["self_kv"] = torch.index_select(cache, 0, rows, out=spare[:len(rows)])
        new["spare_kv"] = cache
        return new

    def step(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        """tokens (B,) -> float32 log-probs of the next token (B, V) and the state with this token cached."""
        position = int(state["length"])
        if position >= self.max_positions:
            raise NmtError(f"sequence of {position + 1} tokens is longer than model.max_positions={self.max_positions}")
        cache = state["self_kv"]
        if position == cache.size(4):  # full: room for GROW more (the cache is copied once per GROW steps)
            cache = torch.cat([cache, cache.new_zeros(*cache.shape[:4], GROW, cache.size(5))], dim=4)
        x = self.embed.target(tokens) + self._position(position)  # (B, D); dropout is off in eval mode
        keep = "attention" in state
        new: State = {**state, "self_kv": cache, "length": decoded_length(position + 1)}
        slots = cache[:, :, :, :, position:position + 1].unbind(1)
        # Keys and values of every layer in turn (one unbind each for the caches, none per layer).
        windows = cache[:, :, :, :, :position + 1].flatten(1, 2).unbind(1)
        cross = state["cross_kv"].flatten(1, 2).unbind(1)
        weights = []
        for i, (layer, slot) in enumerate(zip(self.decoder, slots, strict=True)):
            pair = slice(2 * i, 2 * i + 2)
            x, attn = layer.step(x, slot, windows[pair], cross[pair], state["mask"], need_weights=keep)
            weights.append(attn)
        if keep:
            new["attention"] = torch.stack([w.mean(dim=1)[:, 0] for w in weights], dim=1)  # (B, L, S)
        if "attention_heads" in state:
            new["attention_heads"] = torch.stack([w[:, :, 0] for w in weights], dim=1)  # (B, L, H, S)
        return log_probs(project(self.output, self.decoder_norm(x), self.output_kernel)), new

    def _position(self, position: int) -> Tensor:
        """The position encoding (D,) of one position."""
        if self.config.positions == "learned":
            return self.learned_positions.weight[position]
        return self.sinusoids[position]

    def flops_per_token(self, src_len: int, tgt_len: int) -> float:
        """Forward FLOPs per target token: 2 x multiply-adds of every matrix product.

        Per source token and encoder layer: 4D^2 (Q, K, V, out) + 2DF (FFN) + 2SD (scores, weighted sum).
        Per target token and decoder layer: 4D^2 + 2DF + 2D^2 (cross Q, out) + 2TD (self-attention over
        all T keys, as kernels compute the masked square) + 2SD (cross-attention); plus 2D^2 per source
        token and decoder layer for the cross K/V, and DV for the output layer. Norms, softmax and
        embeddings are ignored.
        """
        c = self.config
        d, f, s, t = c.d_model, c.ffn_dim, src_len, tgt_len
        encoder = c.enc_layers * s * (4 * d * d + 2 * d * f + 2 * s * d)
        decoder = c.dec_layers * (t * (6 * d * d + 2 * d * f + 2 * t * d + 2 * s * d) + s * 2 * d * d)
        return 2.0 * (encoder + decoder + t * d * c.tgt_vocab_size) / t
