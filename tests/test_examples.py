"""The example scripts run and measure what their docstrings say they measure.

Each example's `main()` runs once per session (in-process, imported by path) and the tests check
its returned numbers. Together they take well under 3 minutes on 2 cores; each example is meant
to finish in under 30 s on an idle machine (the bound below is looser for busy CI machines).
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
import time

import pytest
import torch

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
NAMES = ["word_language_model", "char_lstm_monitor", "packed_tagger", "seq2seq_decoder",
         "lstmcell_forecaster", "lstm_subclass"]
SECONDS_BOUND = 90  # per example, generous: shared 2-core machines


def _load(name):
    spec = importlib.util.spec_from_file_location(f"rnnscope_example_{name}",
                                                  EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_RESULTS: dict = {}


def run_example(name: str) -> dict:
    """main() of one example, run once; the global thread count and RNG are restored."""
    if name not in _RESULTS:
        threads, rng = torch.get_num_threads(), torch.get_rng_state()
        t0 = time.perf_counter()
        try:
            out = _load(name).main()
        finally:
            torch.set_num_threads(threads)
            torch.set_rng_state(rng)
        out["_wall"] = time.perf_counter() - t0
        _RESULTS[name] = out
    return _RESULTS[name]


def test_every_example_has_docstring_main_and_guard():
    for name in NAMES:
        text = (EXAMPLES / f"{name}.py").read_text()
        module = _load(name)
        assert module.__doc__ and len(module.__doc__) > 200, name
        assert "def main() -> dict:" in text, name
        assert text.rstrip().endswith('if __name__ == "__main__":\n    main()'), name


@pytest.mark.parametrize("name", NAMES)
def test_runs_within_budget(name):
    out = run_example(name)
    assert isinstance(out, dict)
    assert out["_wall"] < SECONDS_BOUND, f"{name} took {out['_wall']:.1f} s"


def _in_range(v, lo, hi):
    return v is not None and lo <= v <= hi


def test_word_language_model():
    r = run_example("word_language_model")
    T = r["T"]
    assert r["refused_last"] is not None and "flattened" in r["refused_last"]
    assert r["site"] == "rnn" and r["per_sample_shape"] == (r["B"], T)
    assert _in_range(r["effective_memory"], 1, T)
    assert r["half_life"] > 0 and math.isfinite(r["half_life"])
    bl = r["by_lag"]
    assert bl.dim() == 1 and 1 <= len(bl) <= T and torch.isfinite(bl).all()
    assert bl[0] > bl[10] > 0  # each word's loss depends most on recent words
    assert _in_range(r["lag_effective_memory"], 1, T)


def test_char_lstm_monitor():
    r = run_example("char_lstm_monitor")
    assert r["final_loss"] < r["first_loss"] - 1.0  # it learns
    assert r["records"] == len(r["losses"])
    assert r["exact_records"] >= 3
    # inter-layer dropout is on in training mode: the exact part must still run
    assert r["skipped"] == {}
    assert r["exact_with_state_grad"] == r["exact_records"]
    for rec in r["history"]:
        if rec["exact"]:
            sg = rec["layers"]["lstm"]["state_grad"]
            assert set(sg) == {"l0d0", "l1d0"}
            assert len(sg["l1d0"]["h"]) == r["T"] and len(sg["l1d0"]["c"]) == r["T"]
    assert r["log_lines"] >= r["records"]
    assert _in_range(r["lag_effective_memory"], 1, r["T"])


def test_packed_tagger():
    r = run_example("packed_tagger")
    lengths, ps = r["lengths"], r["per_sample"]
    assert r["site"] == "lstm" and ps.shape == (r["B"], r["T"])
    assert r["prof_lengths"] is not None and torch.equal(r["prof_lengths"].cpu(), lengths)
    for b, n in enumerate(lengths.tolist()):  # exactly zero past each sentence's end
        assert (ps[b, n:] == 0).all() and (ps[b, :n] > 0).all()
    assert r["pad_max"] == 0
    assert r["replay_output_type"] == "PackedSequence"
    assert r["replay_output_diff"] < 1e-5 and r["replay_h_diff"] < 1e-5
    bl = r["by_lag"]
    assert torch.isfinite(bl).all() and bl[0] > bl[4]
    assert _in_range(r["lag_effective_memory"], 1, r["T"])
    assert r["final_train_loss"] < 0.5


def test_seq2seq_decoder():
    r = run_example("seq2seq_decoder")
    T = r["T"]
    assert r["dec_site"] == "decoder.gru" and r["enc_site"] == "encoder.gru"
    assert r["dec_shape"][1] == T and r["enc_shape"][1] == T  # decoder calls = one time axis
    assert r["final_loss"] < 0.6 * r["first_loss"]
    # the last output token is the first source token reversed: gradient reaches source step 0
    assert r["enc_by_distance"][T - 1] > 0
    assert _in_range(r["enc_effective_memory"], 1, T) and _in_range(r["dec_effective_memory"], 1, T)
    # the monitor measures the decoder GRU across its per-token calls, exactly too
    assert r["monitor_decoder_steps"] == T and r["monitor_encoder_steps"] == T
    assert r["exact_records"] >= 1 and r["exact_decoder_state_grad"] == r["exact_records"]
    assert r["skipped"] == {}


def test_lstmcell_forecaster():
    r = run_example("lstmcell_forecaster")
    T = r["T"]
    assert r["site"] == "lstm1" and r["shape"][1] == T
    assert r["final_loss"] < r["first_loss"] / 10
    assert r["test_mse"] < 0.05
    assert _in_range(r["effective_memory"], 1, T) and _in_range(r["before_effective_memory"], 1, T)
    bd = r["by_distance"]
    assert bd[0] > bd[10] > 0
    assert r["bare_site"] == "input" and r["bare_shape"][1] == T
    assert _in_range(r["bare_effective_memory"], 1, T)


def test_lstm_subclass():
    r = run_example("lstm_subclass")
    T = r["T"]
    assert r["final_loss"] < r["first_loss"] / 5
    assert r["exact_records"] >= 1 and r["exact_with_state_grad"] == r["exact_records"]
    assert r["skipped"] == {}
    assert r["site"] == "input" and _in_range(r["effective_memory"], 1, T)
    assert torch.isfinite(r["state_grad_c"]).all()
    assert r["default_refused"] is not None and "callable" in r["default_refused"]
    assert r["lengths_pad_max"] == 0
    assert r["refused"] is not None and "computes something else" in r["refused"]
    assert r["replay_refused"] is not None and "computes something else" in r["replay_refused"]


def test_copy_long_memory_quick():
    """The long copy-task example at its smoke size: every variant, every measurement."""
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    try:
        r = _load("copy_long_memory").main(["--quick", "--seeds", "0"])
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
    assert torch.get_num_threads() == threads
    assert [x["variant"] for x in r["runs"]] == ["lstm", "lstm-chrono", "lru", "mingru"]
    assert r["chance_accuracy"] == 1 / 8 and r["recall_baseline"] == pytest.approx(math.log(8))
    for x in r["runs"]:
        assert 0 <= x["final"]["recall_accuracy"] <= 1 and x["final"]["step"] == 8
        for when in ("init", "end"):
            flow = x[f"flow_{when}"]
            assert flow["marker"] > 0 and 0 <= flow["symbols"] and math.isfinite(flow["ratio"])
            assert 1 <= x[f"tau_{when}"]["median"] <= x[f"tau_{when}"]["max"]
    by = {x["variant"]: x for x in r["runs"]}
    # chrono init opens the forget gate: at T = 30 its gradient reaches the symbols far better
    # than the default LSTM's (forget gate ≈ σ(0) ≈ 0.5, memory time ≈ 2)
    assert by["lstm-chrono"]["flow_init"]["ratio"] > 100 * by["lstm"]["flow_init"]["ratio"]
    assert by["lstm-chrono"]["tau_init"]["median"] > 3 * by["lstm"]["tau_init"]["median"]
