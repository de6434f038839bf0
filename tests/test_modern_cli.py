"""`rnnscope compare --models` and `rnnscope experiment --variants` with the modern
recurrences, through the real entry point in subprocesses, small sizes."""

import json
import os
import subprocess
import sys

import torch

import rnnscope
from rnnscope.models import DEFAULT_KINDS, DISPLAY, MODEL_KINDS, build_model

SMALL = ["--seq-len", "12", "--hidden-size", "8", "--input-size", "5", "--samples", "6",
         "--quiet"]
ALL = "LSTM,gru,rnn,MinGRU,minlstm,LRU,rglru,Mamba,slstm,transformer"  # any case


def run(*args, check_code=None):
    proc = subprocess.run([sys.executable, "-m", "rnnscope", *args], capture_output=True,
                          text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if check_code is not None:
        assert proc.returncode == check_code, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def test_compare_all_models_numbers_equal_the_api(tmp_path):
    out = tmp_path / "rep"
    run("compare", *SMALL, "--models", ALL, "--out", str(out), "--seed", "3", check_code=0)
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["models"] == [k.lower() for k in ALL.split(",")]
    assert set(res["comparison"]["profiles"]) == {DISPLAY[k] for k in MODEL_KINDS}
    rec = res["recurrent"]
    for kind in ("mingru", "minlstm", "lru", "rglru", "mamba", "slstm"):
        r = rec[DISPLAY[kind]]
        whole = kind != "slstm"
        assert r["linear_in_state"] is whole
        assert "gates" in r and "state_gradients" in r
    assert (out / "figures" / "highway.png").is_file() and (out / "report.html").is_file()
    html = (out / "report.html").read_text()
    assert "the highway is the whole Jacobian" in html
    # the saved numbers are the API's, on the same seeded models and inputs
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(3)
    models = {DISPLAY[k.lower()]: build_model(k.lower(), 5, 8, t_max=12, generator=gen).eval()
              for k in ALL.split(",")}
    x = rnnscope.profile.random_inputs(models["LRU"], seq_len=12, samples=6, seed=3)
    for name in ("LRU", "sLSTM", "Mamba (S6)"):
        cj = rnnscope.cell_jacobians(models[name], x[:4], keep="norms")
        assert cj.highway_is_whole is (name != "sLSTM") is rec[name]["linear_in_state"]
        saved = torch.tensor(rec[name]["layers"][0]["cell_jacobians"]["spectral"],
                             dtype=torch.float64)
        torch.testing.assert_close(saved, cj.spectral, rtol=1e-12, atol=0)


def test_compare_default_models_unchanged_and_unknown_names_refused():
    from rnnscope.cli import build_parser

    args = build_parser().parse_args(["compare"])
    assert tuple(args.models) == DEFAULT_KINDS == ("rnn", "lstm", "gru", "transformer")
    p = run("compare", *SMALL, "--models", "lstm,xlstm", "--no-report", check_code=2)
    assert "unknown value(s) xlstm" in p.stderr
    assert "mingru" in p.stderr and "mamba" in p.stderr  # the list of known names
    assert "Traceback" not in p.stderr


def test_experiment_trains_modern_variants(tmp_path):
    p = run("experiment", "copy", "--T", "5", "--steps", "30", "--batch-size", "8",
            "--hidden-size", "8", "--variants", "MinGRU,lru,slstm", "--out",
            str(tmp_path / "e"), "--quiet", check_code=0)
    assert "Traceback" not in p.stderr
    res = json.loads((tmp_path / "e" / "results.json").read_text())
    assert [r["model"] for r in res["table"]] == ["mingru", "lru", "slstm"]
    for v in res["variants"].values():
        assert len(v["train_loss"]) == 30
        assert v["gates_init"]["layers"][0]["gate"] == "decay"
    p = run("experiment", "copy", "--variants", "lstm,mamba2", check_code=2)
    assert "unknown value(s) mamba2" in p.stderr
