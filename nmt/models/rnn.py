"""The recurrent baseline: a bidirectional encoder and an attentional decoder (Luong et al., 2015).

The cell is an LSTM, a GRU or an Elman RNN. The encoder runs over packed
sequences, so padding never reaches it and each direction uses hidden_size/2
units (its outputs are hidden_size wide, like the decoder, which lets "dot"
attention compare them directly). A tanh bridge maps the encoder's last-layer
final state to every decoder layer's initial state. The decoder computes the
attentional vector tanh(W_c [context; h_t]) of embed_dim units, feeds it to the
next step (input feeding) and projects it to logits, so the output layer can be
tied to the target embedding whatever the hidden size.

The recurrent state is a tuple of tensors (h, c) for an LSTM, (h,) otherwise; it
is stored batch-first as "hidden.0", "hidden.1" so `reorder_state` treats it like
everything else, and converted to torch's (layers, B, C) layout in one place.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from nmt.config import ModelConfig
from nmt.errors import NmtError
from nmt.models.common import Embeddings, Seq2Seq, State, check_choice, log_probs, output_layer

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
GATES = {"lstm": 4, "gru": 3, "rnn": 1}  # weight blocks per cell: its cost relative to an Elman RNN
ATTENTIONS = ("dot", "general", "bahdanau")

Hidden = Tensor | tuple[Tensor, ...]  # what torch's recurrent modules take and return


def state_parts(hidden: Hidden) -> tuple[Tensor, ...]:
    """torch's hidden state, whatever the cell, as a tuple: (h, c) for an LSTM, (h,) otherwise."""
    return hidden if isinstance(hidden, tuple) else (hidden,)


def torch_hidden(parts: tuple[Tensor, ...]) -> Hidden:
    """The inverse of `state_parts`."""
    return parts if len(parts) > 1 else parts[0]


def run_recurrent(
    module: nn.RNNBase, inputs: Tensor | PackedSequence, hidden: Hidden | None = None
) -> tuple[Tensor | PackedSequence, Hidden]:
    """Call a torch recurrent module; on CPU under autocast run it in float32, since torch 2.13's
    oneDNN LSTM has no bfloat16 autocast kernel (pytorch/pytorch#187334 fixes it; CUDA is unaffected)."""
    if inputs.data.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):  # .data: packed or not
        return module(inputs, hidden)
    with torch.autocast("cpu", enabled=False):
        if hidden is not None:
            hidden = torch_hidden(tuple(part.float() for part in state_parts(hidden)))
        return module(inputs.float(), hidden)


class Attention(nn.Module):
    """Global attention over encoder outputs with Luong "dot"/"general" or additive "bahdanau" scores."""

    def __init__(self, kind: str, dim: int) -> None:
        super().__init__()
        self.kind = kind
        additive = kind == "bahdanau"
        self.query = None if kind == "dot" else nn.Linear(dim, dim, bias=additive)
        self.key = nn.Linear(dim, dim, bias=False) if additive else None
        self.score = nn.Linear(dim, 1, bias=False) if additive else None

    def keys(self, memory: Tensor) -> Tensor:
        """What queries are compared with, (B, S, C): computed once per sentence."""
        return memory if self.key is None else self.key(memory)

    def forward(self, query: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """query (B, T, C), keys/values (B, S, C), mask (B, S) -> context (B, T, C), weights (B, T, S)."""
        q = query if self.query is None else self.query(query)
        if self.score is None:
            scores = q @ keys.transpose(1, 2)  # (B, T, S)
        else:
            scores = self.score(torch.tanh(q[:, :, None] + keys[:, None])).squeeze(-1)  # (B, T, S)
        weights = scores.masked_fill(~mask[:, None, :], float("-inf")).softmax(dim=-1)
        return weights @ values, weights


class RNNSeq2Seq(Seq2Seq):
    sentence_keys = frozenset({"memory", "src_mask", "keys"})

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        check_choice("cell", config.cell, tuple(CELLS))
        check_choice("attention", config.attention, ATTENTIONS)
        if config.hidden_size % 2:
            raise NmtError(f"model.hidden_size must be even (split over two encoder directions), "
                           f"got {config.hidden_size}")
        if config.enc_layers < 1 or config.dec_layers < 1:
            raise NmtError("model.enc_layers and model.dec_layers must be at least 1")
        self.config = config
        embed, hidden = config.embed_dim, config.hidden_size
        cell = CELLS[config.cell]
        self.parts = 2 if config.cell == "lstm" else 1  # tensors in the recurrent state
        self.embed = Embeddings(config, embed)
        self.dropout = nn.Dropout(config.dropout)
        self.encoder = cell(
            embed, hidden // 2, num_layers=config.enc_layers, batch_first=True, bidirectional=True,
            dropout=config.dropout if config.enc_layers > 1 else 0.0,
        )
        feed = embed if config.input_feeding else 0
        self.decoder = cell(
            embed + feed, hidden, num_layers=config.dec_layers, batch_first=True,
            dropout=config.dropout if config.dec_layers > 1 else 0.0,
        )
        self.bridge = (
            nn.ModuleList(nn.Linear(hidden, config.dec_layers * hidden) for _ in range(self.parts))
            if config.bridge else None
        )
        self.attention = Attention(config.attention, hidden)
        self.combine = nn.Linear(2 * hidden, embed, bias=False)  # W_c of the attentional vector
        self.output = output_layer(config, embed, self.embed.tgt)
        self._init_weights()

    def _init_weights(self) -> None:
        """Uniform(-0.1, 0.1) for the recurrent and linear layers, as Luong et al. (2015) and OpenNMT,
        then the shared embedding init: unit-variance inputs (with U(-0.1, 0.1) embeddings the signal
        is weak and small models sit on a loss plateau before attention aligns) and tied logits of
        unit scale, which GRU and Elman decoders need to train at the LSTM's learning rate."""
        for parameter in self.parameters():
            nn.init.uniform_(parameter, -0.1, 0.1)
        self.embed.reset_parameters()

    def encode(self, src: Tensor, src_mask: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """src (B, S), src_mask (B, S) -> outputs (B, S, C) and the last layer's final
        [forward; backward] state, one (B, C) tensor per state part."""
        lengths = src_mask.sum(dim=1).cpu()
        embedded = self.dropout(self.embed.source(src))  # (B, S, E)
        packed = pack_padded_sequence(embedded, lengths, batch_first=True, enforce_sorted=False)
        outputs, hidden = run_recurrent(self.encoder, packed)
        outputs = pad_packed_sequence(outputs, batch_first=True, total_length=src.size(1))[0]  # (B, S, C)
        final = tuple(torch.cat([part[-2], part[-1]], dim=-1) for part in state_parts(hidden))  # (B, C) each
        return self.dropout(outputs), final

    def init_state(
        self, memory: tuple[Tensor, tuple[Tensor, ...]], src_mask: Tensor, keep_attention: bool = False,
        keep_heads: bool = False,
    ) -> State:
        """Decoder state before the first token: bridged hidden state, zero input feed, attention keys.

        With `keep_attention`, each step stores its attention weights under "attention", (B, 1, S);
        there is a single attention, so `keep_heads` adds nothing.
        """
        outputs, final = memory
        batch, layers, size = outputs.size(0), self.config.dec_layers, self.config.hidden_size
        state = {"memory": outputs, "src_mask": src_mask}
        for i, part in enumerate(final):
            state[f"hidden.{i}"] = (
                torch.tanh(self.bridge[i](part)).view(batch, layers, size)  # (B, L, C)
                if self.bridge is not None else outputs.new_zeros(batch, layers, size)
            )
        keys = self.attention.keys(outputs)
        if keys is not outputs:
            state["keys"] = keys
        if self.config.input_feeding:
            state["feed"] = outputs.new_zeros(batch, self.config.embed_dim)
        if keep_attention:
            state["attention"] = outputs.new_zeros(batch, 1, outputs.size(1))
        return state

    def _torch_hidden(self, state: State) -> Hidden:
        """The batch-first state parts in torch's (layers, B, C) layout."""
        return torch_hidden(tuple(state[f"hidden.{i}"].transpose(0, 1).contiguous() for i in range(self.parts)))

    def _attend(self, outputs: Tensor, state: State) -> tuple[Tensor, Tensor]:
        """Decoder outputs (R, T, C) -> attentional vectors (R, T, E) and attention weights (R, T, S).

        The memory has one row per sentence (N); R / N rows of a sentence (its beams, side by side)
        attend as further query positions of that sentence, so the memory is never copied per beam."""
        keys, memory = state.get("keys", state["memory"]), state["memory"]
        rows, steps = outputs.shape[:2]
        grouped = outputs.reshape(memory.size(0), -1, outputs.size(2))  # (N, R/N * T, C)
        context, weights = self.attention(grouped, keys, memory, state["src_mask"])
        context, weights = context.view(rows, steps, -1), weights.view(rows, steps, -1)
        vectors = torch.tanh(self.combine(torch.cat([context, outputs], dim=-1)))
        return self.dropout(vectors), weights

    def _decode(self, embedded: Tensor, state: State) -> tuple[Tensor, State]:
        """Run the decoder over target embeddings (B, T, E) from `state`: attentional vectors (B, T, E)
        and the state after the last of them. Input feeding makes each step depend on the one before,
        so it loops over T; without it the whole sequence goes through the recurrent module at once."""
        hidden = self._torch_hidden(state)
        new = dict(state)
        if self.config.input_feeding:
            feed, all_vectors, all_weights = state["feed"], [], []
            for t in range(embedded.size(1)):
                inputs = torch.cat([embedded[:, t], feed], dim=-1)[:, None]  # (B, 1, 2E)
                outputs, hidden = run_recurrent(self.decoder, inputs, hidden)
                vector, weights = self._attend(outputs, state)  # (B, 1, E), (B, 1, S)
                all_vectors.append(vector)
                all_weights.append(weights)
                feed = vector[:, 0]  # (B, E)
            new["feed"] = feed
            vectors, weights = torch.cat(all_vectors, dim=1), torch.cat(all_weights, dim=1)
        else:
            outputs, hidden = run_recurrent(self.decoder, embedded, hidden)  # (B, T, C)
            vectors, weights = self._attend(outputs, state)
        for i, part in enumerate(state_parts(hidden)):
            new[f"hidden.{i}"] = part.transpose(0, 1)  # (B, L, C)
        if "attention" in state:
            new["attention"] = weights[:, -1:]  # (B, 1, S)
        return vectors, new

    def forward(self, src: Tensor, src_mask: Tensor, tgt_in: Tensor, features_only: bool = False) -> Tensor:
        """Teacher forcing: src (B, S), src_mask (B, S), tgt_in (B, T) -> logits (B, T, V),
        or with `features_only` the attentional vectors (B, T, E) that `output` would project (for the fused loss)."""
        state = self.init_state(self.encode(src, src_mask), src_mask)
        vectors, _ = self._decode(self.dropout(self.embed.target(tgt_in)), state)
        return vectors if features_only else self.output(vectors)

    def step(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        """tokens (B,) -> float32 log-probs of the next token (B, V) and the advanced state."""
        vectors, state = self._decode(self.dropout(self.embed.target(tokens))[:, None], state)
        return log_probs(self.output(vectors[:, 0])), state

    def flops_per_token(self, src_len: int, tgt_len: int) -> float:
        """Forward FLOPs per target token: 2 x multiply-adds of every matrix product.

        With G weight blocks per cell (LSTM 4, GRU 3, RNN 1), a layer of n units reading m inputs costs
        G(mn + n^2) per token: the encoder pays it per source token, layer and direction (n = C/2),
        the decoder per target token and layer (n = C, m = 2E with input feeding). Attention costs 2SC
        per target token (scores and context), plus C^2 for the "general"/"bahdanau" query, SC for the
        additive score and C^2 per source token for its keys. Add 2CE for the attentional vector,
        EV for the output layer and the bridge once per sentence; elementwise work is ignored.
        """
        c = self.config
        e, h, s, t, g = c.embed_dim, c.hidden_size, src_len, tgt_len, GATES[c.cell]

        def layers(count: int, first_input: int, later_input: int, units: int) -> int:
            return sum(g * ((first_input if i == 0 else later_input) * units + units * units) for i in range(count))

        encoder = s * 2 * layers(c.enc_layers, e, h, h // 2)
        decoder = t * layers(c.dec_layers, 2 * e if c.input_feeding else e, h, h)
        attention = t * 2 * s * h
        if c.attention != "dot":
            attention += t * h * h
        if c.attention == "bahdanau":
            attention += t * s * h + s * h * h
        bridge = self.parts * h * c.dec_layers * h if c.bridge else 0
        rest = t * (2 * h * e + e * c.tgt_vocab_size) + bridge
        return 2.0 * (encoder + decoder + attention + rest) / t
