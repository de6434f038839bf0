"""Word-level language model, written as PyTorch's `word_language_model` example writes it.

Model shape: Embedding -> 2-layer nn.LSTM (seq-first, the default layout; dropout=0.2 between the
layers) -> Linear decoder. `forward(input, hidden)` takes (T, B) token ids and the hidden state
from `init_hidden(bsz)`, and returns `(F.log_softmax(decoded.view(-1, ntoken)), hidden)`: the
output is flattened to (T·B, V) rows.

What to look at:

* The token ids are not differentiable, so rnnscope measures at the LSTM's input (the
  embedding's output); the summary prints that site.
* Because the output is flattened, rnnscope cannot tell which rows belong to which step and
  refuses `loss="last"` with a ValueError. The script prints its message and then passes a loss
  callable that un-flattens the output: the NLL of each sequence's last target.
* `lag_profile` with per-step NLL losses (B, T) gives ‖∂ℓ_t/∂x_{t-k}‖ by lag k: how far back
  each next-word prediction draws gradient. Its effective memory / half-life are the numbers
  to compare between models (an untrained LSTM forgets within a few words).

Run: python examples/word_language_model.py   (no downloads; the text is embedded below)
"""

from __future__ import annotations

import re
import time

import torch
import torch.nn.functional as F
from torch import nn

import rnnscope

# Opening of "A Tale of Two Cities" (Charles Dickens, 1859; public domain).
TEXT = """
It was the best of times, it was the worst of times, it was the age of wisdom, it was the age
of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season
of Light, it was the season of Darkness, it was the spring of hope, it was the winter of
despair, we had everything before us, we had nothing before us, we were all going direct to
Heaven, we were all going direct the other way - in short, the period was so far like the
present period, that some of its noisiest authorities insisted on its being received, for good
or for evil, in the superlative degree of comparison only.

There were a king with a large jaw and a queen with a plain face, on the throne of England;
there were a king with a large jaw and a queen with a fair face, on the throne of France. In
both countries it was clearer than crystal to the lords of the State preserves of loaves and
fishes, that things in general were settled for ever.

It was the year of Our Lord one thousand seven hundred and seventy-five. Spiritual revelations
were conceded to England at that favoured period, as at this. Mrs. Southcott had recently
attained her five-and-twentieth blessed birthday, of whom a prophetic private in the Life
Guards had heralded the sublime appearance by announcing that arrangements were made for the
swallowing up of London and Westminster.
"""


class RNNModel(nn.Module):
    """Container module with an encoder, a recurrent module, and a decoder (as in PyTorch's
    examples/word_language_model/model.py, LSTM branch)."""

    def __init__(self, ntoken, ninp, nhid, nlayers, dropout=0.2):
        super().__init__()
        self.ntoken = ntoken
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        self.nhid = nhid
        self.nlayers = nlayers
        self.init_weights()

    def init_weights(self):
        initrange = 0.1
        nn.init.uniform_(self.encoder.weight, -initrange, initrange)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -initrange, initrange)

    def forward(self, input, hidden):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        output = self.drop(output)
        decoded = self.decoder(output)
        decoded = decoded.view(-1, self.ntoken)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz):
        weight = next(self.parameters())
        return (weight.new_zeros(self.nlayers, bsz, self.nhid),
                weight.new_zeros(self.nlayers, bsz, self.nhid))


def tokenize(text: str) -> tuple[torch.Tensor, dict]:
    words = re.findall(r"[A-Za-z]+|[^\sA-Za-z]", text.lower())
    vocab = {w: i for i, w in enumerate(sorted(set(words)))}
    return torch.tensor([vocab[w] for w in words]), vocab


def batchify(data: torch.Tensor, bsz: int) -> torch.Tensor:
    """(N,) ids -> (N // bsz, bsz) columns, as the example's `batchify` does."""
    nbatch = data.size(0) // bsz
    return data[: nbatch * bsz].view(bsz, -1).t().contiguous()


def main() -> dict:
    torch.set_num_threads(1)  # tiny models: one thread is fastest, also on a busy machine
    torch.manual_seed(0)
    t0 = time.perf_counter()
    ids, vocab = tokenize(TEXT)
    ntoken = len(vocab)
    T, B = 35, 6  # bptt, eval batch size
    data = batchify(ids, B)  # (N, B), seq-first
    assert data.shape[0] > T, "the embedded text is too short for this bptt"
    tokens, targets = data[:T], data[1:T + 1]  # (T, B) each
    print(f"corpus: {ids.numel()} words, vocabulary {ntoken}; batch (T, B) = {tuple(tokens.shape)}")

    model = RNNModel(ntoken, ninp=32, nhid=64, nlayers=2, dropout=0.2)
    model.eval()  # measure without dropout
    hidden = model.init_hidden(B)

    # 1) loss="last" is refused: the output is (T*B, V) rows in an order rnnscope cannot tell.
    refused = None
    try:
        rnnscope.gradient_profile(model, tokens, forward_args=(hidden,), loss="last")
    except ValueError as e:
        refused = str(e)
        print(f"loss='last' refused, as expected:\n  ValueError: {e}")

    # 2) Say what "last" means here: NLL of each sequence's last target (per sample, (B,)).
    def last_step_nll(out):
        logp = out[0].view(T, B, -1)  # (T, B, V) time-major, as the model computed it
        return -logp[-1].gather(1, targets[-1].unsqueeze(1)).squeeze(1)  # (B,)

    prof = rnnscope.gradient_profile(model, tokens, forward_args=(hidden,), loss=last_step_nll)
    bd = prof.by_distance()
    print(f"gradient_profile measured at {prof.site!r} (the LSTM's input), per_sample "
          f"{tuple(prof.per_sample.shape)}")
    print("  ‖∂NLL_last/∂x‖ at distance 0, 1, 5, 20: "
          + ", ".join(f"{float(bd[k]):.2e}" for k in (0, 1, 5, 20)))
    print(f"  decay rate {prof.decay_rate():.3f}/step, half-life {prof.half_life():.2f} steps, "
          f"effective memory {prof.effective_memory()} of {T} steps")

    # 3) Lag-resolved flow of every step's next-word NLL: (B, T) per-step losses, batch first.
    def per_step_nll(out):
        logp = out[0].view(T, B, -1)  # (T, B, V)
        nll = -logp.gather(2, targets.unsqueeze(2)).squeeze(2)  # (T, B)
        return nll.t()  # (B, T)

    lag = rnnscope.lag_profile(model, tokens, forward_args=(hidden,), loss=per_step_nll)
    by_lag = lag.by_lag()
    print(f"lag_profile: {len(by_lag)} lags; mean ‖∂ℓ_t/∂x_(t-k)‖ at k = 0, 1, 2, 5, 10: "
          + ", ".join(f"{float(by_lag[k]):.2e}" for k in (0, 1, 2, 5, 10) if k < len(by_lag)))
    print(f"  decay rate {lag.decay_rate():.3f}/lag, half-life {lag.half_life():.2f} steps, "
          f"effective memory {lag.effective_memory()} steps")
    seconds = time.perf_counter() - t0
    print(f"done in {seconds:.1f} s")
    return {"T": T, "B": B, "vocab": ntoken, "refused_last": refused, "site": prof.site,
            "per_sample_shape": tuple(prof.per_sample.shape),
            "decay_rate": prof.decay_rate(), "half_life": prof.half_life(),
            "effective_memory": prof.effective_memory(),
            "by_lag": by_lag, "lag_decay_rate": lag.decay_rate(),
            "lag_half_life": lag.half_life(), "lag_effective_memory": lag.effective_memory(),
            "seconds": seconds}


if __name__ == "__main__":
    main()
