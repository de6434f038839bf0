"""GRU encoder-decoder with a decoder that loops over target tokens (teacher forcing).

Model shape: as in PyTorch's "NLP From Scratch: Translation with a Sequence to Sequence Network
and Attention" tutorial (without attention): `EncoderRNN` (Embedding -> GRU, batch_first=True)
and `DecoderRNN` whose forward loops over the target steps, calling `self.forward_step(input,
hidden)` -> `self.gru(output, hidden)` once per output token and feeding the target token
(teacher forcing). The decoder returns log-probabilities (B, T_dec, V). A `Seq2Seq` module wraps
both with `forward(src, tgt)`. The toy task: output the source sequence reversed.

What to look at:

* `gradient_profile(model, src, forward_args=(tgt,), at="decoder.gru", loss=...)`: the decoder's
  GRU is called once per output token; rnnscope joins those calls into one time axis (the calls
  are chained through the hidden state) and measures ‖∂L/∂x_t‖ at each call's input.
* `gradient_profile(..., at="encoder.gru")`: the same loss, measured at the encoder's input —
  how much of the last output token's gradient reaches each source position.
* ~200 training steps with `GradientMonitor` attached: the monitor sees the decoder GRU called
  T_dec times per step and records one per-token input-gradient profile per step.

Run: python examples/seq2seq_decoder.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

import rnnscope

STEPS = 200  # training steps

SOS_token = 0
VOCAB = 12  # 0 = SOS, tokens 1..11


class EncoderRNN(nn.Module):
    def __init__(self, input_size, hidden_size, dropout_p=0.1):
        super().__init__()
        self.hidden_size = hidden_size
        self.embedding = nn.Embedding(input_size, hidden_size)
        self.gru = nn.GRU(hidden_size, hidden_size, batch_first=True)
        self.dropout = nn.Dropout(dropout_p)

    def forward(self, input):
        embedded = self.dropout(self.embedding(input))
        output, hidden = self.gru(embedded)
        return output, hidden


class DecoderRNN(nn.Module):
    def __init__(self, hidden_size, output_size):
        super().__init__()
        self.embedding = nn.Embedding(output_size, hidden_size)
        self.gru = nn.GRU(hidden_size, hidden_size, batch_first=True)
        self.out = nn.Linear(hidden_size, output_size)

    def forward(self, encoder_outputs, encoder_hidden, target_tensor):
        batch_size = encoder_outputs.size(0)
        decoder_input = torch.empty(batch_size, 1, dtype=torch.long).fill_(SOS_token)
        decoder_hidden = encoder_hidden
        decoder_outputs = []
        for i in range(target_tensor.size(1)):
            decoder_output, decoder_hidden = self.forward_step(decoder_input, decoder_hidden)
            decoder_outputs.append(decoder_output)
            decoder_input = target_tensor[:, i].unsqueeze(1)  # teacher forcing
        decoder_outputs = torch.cat(decoder_outputs, dim=1)
        decoder_outputs = F.log_softmax(decoder_outputs, dim=-1)
        return decoder_outputs, decoder_hidden, None

    def forward_step(self, input, hidden):
        output = self.embedding(input)
        output = F.relu(output)
        output, hidden = self.gru(output, hidden)
        output = self.out(output)
        return output, hidden


class Seq2Seq(nn.Module):
    def __init__(self, vocab, hidden_size):
        super().__init__()
        self.encoder = EncoderRNN(vocab, hidden_size)
        self.decoder = DecoderRNN(hidden_size, vocab)

    def forward(self, src, tgt):
        encoder_outputs, encoder_hidden = self.encoder(src)
        decoder_outputs, _, _ = self.decoder(encoder_outputs, encoder_hidden, tgt)
        return decoder_outputs  # (B, T_dec, V) log-probabilities


def reverse_batch(B, T, g):
    src = torch.randint(1, VOCAB, (B, T), generator=g)
    return src, src.flip(1)


def main() -> dict:
    steps = STEPS
    torch.set_num_threads(1)  # tiny models: one thread is fastest, also on a busy machine
    torch.manual_seed(0)
    t0 = time.perf_counter()
    T, B, H = 8, 32, 64
    model = Seq2Seq(VOCAB, H)
    g = torch.Generator().manual_seed(0)

    def last_token_nll(tgt):
        return lambda out: -out[:, -1].gather(1, tgt[:, -1:]).squeeze(1)  # (B,)

    src, tgt = reverse_batch(16, T, torch.Generator().manual_seed(123))
    model.eval()
    dec0 = rnnscope.gradient_profile(model, src, forward_args=(tgt,), at="decoder.gru",
                                     loss=last_token_nll(tgt))
    enc0 = rnnscope.gradient_profile(model, src, forward_args=(tgt,), at="encoder.gru",
                                     loss=last_token_nll(tgt))
    print(f"untrained: decoder profile at {dec0.site!r} per_sample {tuple(dec0.per_sample.shape)}"
          f" (T_dec={T} GRU calls as one time axis), effective memory "
          f"{dec0.effective_memory()}; encoder at {enc0.site!r} {tuple(enc0.per_sample.shape)}")

    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    with rnnscope.GradientMonitor(model, replay_every=50) as mon:
        model.train()
        for step in range(steps):
            src_b, tgt_b = reverse_batch(B, T, g)
            out = model(src_b, tgt_b)
            loss = F.nll_loss(out.reshape(-1, VOCAB), tgt_b.reshape(-1))
            opt.zero_grad()
            loss.backward()
            mon.step()
            opt.step()
            losses.append(loss.item())
            if step % 50 == 0 or step == steps - 1:
                print(f"  step {step:3d}  loss {loss.item():.3f}")
    history = [r.to_dict() for r in mon.history]  # the records' JSON form
    last = history[-1]["layers"]
    dec_input = last.get("decoder.gru", {}).get("input_grad")
    enc_input = last.get("encoder.gru", {}).get("input_grad")
    exact = [r for r in history if r.get("exact")]
    dec_state = [r for r in exact if r["layers"].get("decoder.gru", {}).get("state_grad")]
    print(f"monitor: {len(history)} records, {len(exact)} exact; last record's decoder.gru input "
          f"gradient has {len(dec_input) if dec_input else 0} steps (one per decoder call), "
          f"encoder.gru {len(enc_input) if enc_input else 0}; exact records with decoder "
          f"state_grad: {len(dec_state)}")
    skipped = {n: w for r in history for n, w in r.get("skipped", {}).items()}
    for name, why in skipped.items():
        print(f"  monitor skipped {name!r}: {why}")

    model.eval()
    dec = rnnscope.gradient_profile(model, src, forward_args=(tgt,), at="decoder.gru",
                                    loss=last_token_nll(tgt))
    enc = rnnscope.gradient_profile(model, src, forward_args=(tgt,), at="encoder.gru",
                                    loss=last_token_nll(tgt))
    with torch.no_grad():
        acc = float((model(src, tgt).argmax(-1) == tgt).float().mean())
    print(f"trained: reversal accuracy (teacher forcing) {acc:.2f}")
    for name, p in (("decoder.gru", dec), ("encoder.gru", enc)):
        bd = p.by_distance()
        print(f"  {name}: ‖∂NLL_last/∂x‖ by distance "
              + " ".join(f"{float(v):.1e}" for v in bd)
              + f"; half-life {p.half_life():.2f}, effective memory {p.effective_memory()}/{T}")
    # reversal: the last target token is the FIRST source token, so the encoder's gradient
    # should reach back to source position 0 (distance T-1).
    seconds = time.perf_counter() - t0
    print(f"done in {seconds:.1f} s")
    return {"T": T, "losses": losses, "first_loss": sum(losses[:10]) / 10,
            "final_loss": sum(losses[-10:]) / 10, "accuracy": acc,
            "dec_site": dec.site, "enc_site": enc.site,
            "dec_shape": tuple(dec.per_sample.shape), "enc_shape": tuple(enc.per_sample.shape),
            "dec_effective_memory": dec.effective_memory(),
            "enc_effective_memory": enc.effective_memory(),
            "enc_by_distance": enc.by_distance(), "dec_by_distance": dec.by_distance(),
            "records": len(history), "exact_records": len(exact),
            "monitor_decoder_steps": len(dec_input) if dec_input else 0,
            "monitor_encoder_steps": len(enc_input) if enc_input else 0,
            "exact_decoder_state_grad": len(dec_state), "skipped": skipped,
            "seconds": seconds}


if __name__ == "__main__":
    main()
