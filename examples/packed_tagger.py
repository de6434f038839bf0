"""Bidirectional LSTM sequence tagger on variable-length sentences (packed sequences).

Model shape: Embedding(padding_idx=0) -> pack_padded_sequence(emb, lengths, batch_first=True,
enforce_sorted=False) -> nn.LSTM(bidirectional=True, batch_first=True) -> pad_packed_sequence ->
Linear to tag logits; `forward(tokens, lengths)`, as NER / POS taggers are commonly written.
The sentences come from an embedded public-domain text; the "tags" are simple word classes
(function word, capitalised, punctuation, other), learnt in a few dozen steps.

What to look at:

* `gradient_profile(model, tokens, forward_args=(lengths,), loss="all")` measures at the LSTM's
  input (the embeddings inside the packed sequence). `prof.lengths` holds each sentence's length:
  the gradient is exactly zero past a sentence's end (padding never reaches the LSTM), and
  distances are counted from each sentence's own last word.
* `rnnscope.replay(model.lstm, packed)` replays the fused bidirectional LSTM step by step on the
  PackedSequence; its `.output` is a PackedSequence equal to the fused one.
* `lag_profile` with per-word tagging losses (B, T): a bidirectional tagger draws gradient from
  both sides, so its lag profile is the backward-in-time half of that picture.

Run: python examples/packed_tagger.py
"""

from __future__ import annotations

import re
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnscope

# From the opening of "Moby-Dick" (Herman Melville, 1851; public domain).
TEXT = """Call me Ishmael. Some years ago, never mind how long precisely, having little or no
money in my purse, and nothing particular to interest me on shore, I thought I would sail about
a little and see the watery part of the world. It is a way I have of driving off the spleen and
regulating the circulation. Whenever I find myself growing grim about the mouth; whenever it is
a damp, drizzly November in my soul; whenever I find myself involuntarily pausing before coffin
warehouses, and bringing up the rear of every funeral I meet; and especially whenever my hypos
get such an upper hand of me, that it requires a strong moral principle to prevent me from
deliberately stepping into the street, and methodically knocking people's hats off, then, I
account it high time to get to sea as soon as I can. This is my substitute for pistol and ball.
With a philosophical flourish Cato throws himself upon his sword; I quietly take to the ship.
There is nothing surprising in this. If they but knew it, almost all men in their degree, some
time or other, cherish very nearly the same feelings towards the ocean with me."""

FUNCTION_WORDS = {"a", "an", "the", "of", "in", "to", "and", "or", "i", "me", "my", "it", "is",
                  "as", "on", "for", "with", "this", "that", "no", "but", "if", "from", "up",
                  "off", "at", "so", "his", "their", "they", "such", "some", "all"}
TAGS = ["<pad>", "FUNC", "CAP", "PUNCT", "WORD"]


def tag_of(word: str) -> int:
    if not word[0].isalpha():
        return TAGS.index("PUNCT")
    if word.lower() in FUNCTION_WORDS:
        return TAGS.index("FUNC")
    if word[0].isupper():
        return TAGS.index("CAP")
    return TAGS.index("WORD")


def make_data():
    """Clauses (split at ; and .) as sentences: ids padded with 0, tags, lengths."""
    clauses = [c for c in re.split(r"(?<=[.;])\s+", " ".join(TEXT.split())) if c]
    words = [re.findall(r"[A-Za-z']+|[^\sA-Za-z']", c) for c in clauses]
    vocab = {w: i + 1 for i, w in enumerate(sorted({w.lower() for s in words for w in s}))}
    lengths = torch.tensor([len(s) for s in words])
    T = int(lengths.max())
    tokens = torch.zeros(len(words), T, dtype=torch.long)
    tags = torch.zeros(len(words), T, dtype=torch.long)
    for b, s in enumerate(words):
        tokens[b, :len(s)] = torch.tensor([vocab[w.lower()] for w in s])
        tags[b, :len(s)] = torch.tensor([tag_of(w) for w in s])
    return tokens, tags, lengths, len(vocab) + 1


class BiLSTMTagger(nn.Module):
    def __init__(self, vocab_size, num_tags, embed_dim=32, hidden_size=32):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.lstm = nn.LSTM(embed_dim, hidden_size, batch_first=True, bidirectional=True)
        self.hidden2tag = nn.Linear(2 * hidden_size, num_tags)

    def forward(self, tokens, lengths):
        emb = self.embedding(tokens)  # (B, T, E)
        packed = pack_padded_sequence(emb, lengths.cpu(), batch_first=True, enforce_sorted=False)
        packed_out, _ = self.lstm(packed)
        out, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=tokens.shape[1])
        return self.hidden2tag(out)  # (B, T, num_tags)


def main() -> dict:
    torch.set_num_threads(1)  # tiny models: one thread is fastest, also on a busy machine
    torch.manual_seed(0)
    t0 = time.perf_counter()
    tokens, tags, lengths, V = make_data()
    B, T = tokens.shape
    print(f"{B} sentences, lengths {lengths.min().item()}..{lengths.max().item()} words "
          f"(padded to T={T}), vocabulary {V}")

    model = BiLSTMTagger(V, len(TAGS))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(60):
        logits = model(tokens, lengths)
        loss = F.cross_entropy(logits.transpose(1, 2), tags, ignore_index=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in (0, 59):
            print(f"  training step {step:2d}: tagging loss {loss.item():.3f}")
    model.eval()

    # 1) Gradient of the summed tag logits of all real words, per word position.
    prof = rnnscope.gradient_profile(model, tokens, forward_args=(lengths,), loss="all")
    past_end = ~(torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1))  # (B, T) padding
    pad_max = float(prof.per_sample[past_end].abs().max()) if past_end.any() else 0.0
    lengths_ok = prof.lengths is not None and torch.equal(prof.lengths.cpu(), lengths.cpu())
    print(f"gradient_profile at {prof.site!r}: per_sample {tuple(prof.per_sample.shape)}, "
          f"prof.lengths matches the sentence lengths: {lengths_ok}")
    print(f"  largest gradient norm past a sentence's end: {pad_max:.1e} (padding is never "
          f"measured); inside: {float(prof.per_sample[~past_end].min()):.2e}.."
          f"{float(prof.per_sample[~past_end].max()):.2e}")
    print(f"  effective memory {prof.effective_memory()} steps (by distance from each "
          f"sentence's own end), decay rate {prof.decay_rate():.3f}")

    # 2) Replay the fused bidirectional LSTM on the PackedSequence it receives.
    with torch.no_grad():
        emb = model.embedding(tokens)
        packed = pack_padded_sequence(emb, lengths, batch_first=True, enforce_sorted=False)
        fused_out, (h_n, c_n) = model.lstm(packed)
        trace = rnnscope.replay(model.lstm, packed)
    out_diff = float((trace.output.data - fused_out.data).abs().max())
    h_diff = float((trace.h_n - h_n).abs().max())
    print(f"replay(model.lstm, packed): output is a {type(trace.output).__name__}; "
          f"max |replay - fused| output {out_diff:.1e}, h_n {h_diff:.1e}")
    fwd_gates = trace.layers[0][0].gates["f"]
    print(f"  forward-direction forget gates {tuple(fwd_gates.shape)}, mean "
          f"{float(fwd_gates.mean()):.3f}")

    # 3) Lag-resolved flow of each word's tagging loss (B, T), zero on padding.
    def per_word_nll(logits):
        nll = F.cross_entropy(logits.transpose(1, 2), tags, ignore_index=0, reduction="none")
        return nll  # (B, T); 0 where tags == 0 (padding)

    lag = rnnscope.lag_profile(model, tokens, forward_args=(lengths,), loss=per_word_nll)
    by_lag = lag.by_lag()
    print("lag_profile: mean ‖∂ℓ_t/∂x_(t-k)‖ at k = 0, 1, 2, 4: "
          + ", ".join(f"{float(by_lag[k]):.2e}" for k in (0, 1, 2, 4) if k < len(by_lag))
          + f"; half-life {lag.half_life():.2f}, effective memory {lag.effective_memory()}")
    seconds = time.perf_counter() - t0
    print(f"done in {seconds:.1f} s")
    return {"B": B, "T": T, "lengths": lengths, "site": prof.site,
            "per_sample": prof.per_sample, "prof_lengths": prof.lengths,
            "pad_max": pad_max, "effective_memory": prof.effective_memory(),
            "replay_output_diff": out_diff, "replay_h_diff": h_diff,
            "replay_output_type": type(trace.output).__name__,
            "by_lag": by_lag, "lag_effective_memory": lag.effective_memory(),
            "final_train_loss": loss.item(), "seconds": seconds}


if __name__ == "__main__":
    main()
