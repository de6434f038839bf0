"""Character-level LSTM language model trained with a GradientMonitor attached.

Model shape: Embedding -> 2-layer nn.LSTM(batch_first=True, dropout=0.3) -> Linear, the way
char-RNN tutorials write it; trained with Adam and cross-entropy at every step on a few embedded
paragraphs of public-domain text (no downloads).

What to look at:

* `GradientMonitor(model, replay_every=50, loggers=tmpdir)` as a context manager, with
  `mon.step()` after `loss.backward()` and before `optimizer.step()`. Every step it records cheap
  statistics (per-timestep ‖∂L/∂x_t‖ at the LSTM's input, per-gate parameter gradient norms);
  every 50 steps an exact record with the true state gradients ∂L/∂h_t, ∂L/∂c_t of the training
  loss ('state_grad'), also in training mode with inter-layer dropout on.
* The training loss going down, and what the monitor wrote to its JSON Lines log.
* After training, `lag_profile` in eval mode: how far back each next-character prediction
  reaches (effective memory in characters).

Run: python examples/char_lstm_monitor.py
"""

from __future__ import annotations

import contextlib
import io
import pathlib
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

import rnnscope

STEPS = 200  # training steps

# The opening of "Pride and Prejudice" (Jane Austen, 1813; public domain) ...
AUSTEN = """It is a truth universally acknowledged, that a single man in possession of a good
fortune, must be in want of a wife.

However little known the feelings or views of such a man may be on his first entering a
neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is
considered the rightful property of some one or other of their daughters.

"My dear Mr. Bennet," said his lady to him one day, "have you heard that Netherfield Park is let
at last?"

Mr. Bennet replied that he had not.

"But it is," returned she; "for Mrs. Long has just been here, and she told me all about it."

Mr. Bennet made no answer.

"Do you not want to know who has taken it?" cried his wife impatiently.

"You want to tell me, and I have no objection to hearing it."

This was invitation enough.
"""


def zen_of_python() -> str:
    """The Zen of Python. `import this` prints it on first import only, so the print is captured
    and the text is decoded from the module's own rot13 string (works on any later call too)."""
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    return "".join(this.d.get(c, c) for c in this.s)


class CharLSTM(nn.Module):
    def __init__(self, vocab_size, embed_dim=32, hidden_size=64, num_layers=2, dropout=0.3):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden_size, num_layers, batch_first=True,
                            dropout=dropout)
        self.fc = nn.Linear(hidden_size, vocab_size)

    def forward(self, x, hidden=None):
        out, hidden = self.lstm(self.embed(x), hidden)  # (B, T, H)
        return self.fc(out), hidden  # (B, T, V) logits


def main() -> dict:
    steps = STEPS
    torch.set_num_threads(1)  # tiny models: one thread is fastest, also on a busy machine
    torch.manual_seed(0)
    t0 = time.perf_counter()
    text = AUSTEN + "\n" + zen_of_python()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text])
    V, T, B = len(chars), 50, 32
    print(f"text: {len(text)} characters, vocabulary {V}; batches (B, T) = ({B}, {T})")

    def get_batch(g):
        ix = torch.randint(0, len(data) - T - 1, (B,), generator=g)
        x = torch.stack([data[i:i + T] for i in ix])
        y = torch.stack([data[i + 1:i + T + 1] for i in ix])
        return x, y

    model = CharLSTM(V)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    with tempfile.TemporaryDirectory() as tmpdir:
        with rnnscope.GradientMonitor(model, replay_every=50, loggers=tmpdir) as mon:
            model.train()
            for step in range(steps):
                x, y = get_batch(g)
                logits, _ = model(x)
                loss = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
                opt.zero_grad()
                loss.backward()
                mon.step()
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                losses.append(loss.item())
                if step % 50 == 0 or step == steps - 1:
                    print(f"  step {step:3d}  loss {loss.item():.3f}")
        history = [r.to_dict() for r in mon.history]  # the records' JSON form
        logs = sorted(pathlib.Path(tmpdir).rglob("*"))
        log_lines = sum(1 for p in logs if p.is_file() for _ in p.open())
        log_names = [p.name for p in logs if p.is_file()]

    exact = [r for r in history if r.get("exact")]
    with_state = [r for r in exact
                  if any(lay.get("state_grad") for lay in r["layers"].values())]
    print(f"monitor: {len(history)} records ({len(exact)} exact, at steps "
          f"{[r['step'] for r in exact]}); {len(with_state)} exact records carry 'state_grad'; "
          f"log {log_names} with {log_lines} lines")
    if exact:
        last = exact[-1]
        for name, lay in last["layers"].items():
            sg = lay.get("state_grad") or {}
            gates = sorted(lay.get("gates") or {})
            print(f"  step {last['step']} layer {name!r}: state_grad for {sorted(sg)} "
                  f"(layer l, direction d), ‖∂L/∂c_t‖ of the top layer at t = 0 and T-1: "
                  f"{sg['l1d0']['c'][0]:.2e}, {sg['l1d0']['c'][-1]:.2e}; gate stats for {gates}"
                  if sg else f"  step {last['step']} layer {name!r}: no state_grad")
    skipped = {name: why for r in exact for name, why in r.get("skipped", {}).items()}
    for name, why in skipped.items():
        print(f"  monitor skipped the exact part for {name!r}: {why}")

    model.eval()
    gx = torch.Generator().manual_seed(1)
    x, y = get_batch(gx)
    x, y = x[:8], y[:8]
    # per-step next-character cross-entropy, (B, T) batch first
    lag = rnnscope.lag_profile(
        model, x, loss=lambda out: F.cross_entropy(out[0].transpose(1, 2), y, reduction="none"))
    print(f"after training, eval mode: lag_profile decay rate {lag.decay_rate():.3f}/char, "
          f"half-life {lag.half_life():.2f} chars, effective memory {lag.effective_memory()} "
          f"chars of {T}")
    seconds = time.perf_counter() - t0
    print(f"done in {seconds:.1f} s")
    first = sum(losses[:10]) / 10
    final = sum(losses[-10:]) / 10
    print(f"training loss {first:.3f} (first 10 steps) -> {final:.3f} (last 10)")
    return {"losses": losses, "first_loss": first, "final_loss": final,
            "records": len(history), "exact_records": len(exact),
            "exact_with_state_grad": len(with_state), "log_lines": log_lines,
            "history": history, "skipped": skipped, "lag_by_lag": lag.by_lag(),
            "lag_effective_memory": lag.effective_memory(), "lag_half_life": lag.half_life(),
            "T": T, "seconds": seconds}


if __name__ == "__main__":
    main()
