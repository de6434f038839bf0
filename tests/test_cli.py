"""The command line through its real entry point, in subprocesses."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import rnnscope
from rnnscope.models import DISPLAY, build_model

SMALL = ["--seq-len", "12", "--hidden-size", "8", "--input-size", "5", "--samples", "6",
         "--quiet"]


def run(*args, cwd=None, check_code=None):
    proc = subprocess.run([sys.executable, "-m", "rnnscope", *args], capture_output=True,
                          text=True, cwd=cwd, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if check_code is not None:
        assert proc.returncode == check_code, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def test_compare_writes_report_and_numbers_equal_the_api(tmp_path):
    out = tmp_path / "rep"
    p = run("compare", *SMALL, "--out", str(out), "--seed", "3", check_code=0)
    assert p.stderr == ""
    for f in ("report.html", "results.json", "figures/gradient_flow.png",
              "figures/gradient_flow.svg", "figures/highway.png", "figures/gates.png",
              "figures/step_paths.png", "figures/decay.png"):
        assert (out / f).is_file(), f
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["seed"] == 3 and res["versions"]["torch"] == torch.__version__
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(3)
    models = {DISPLAY[k]: build_model(k, 5, 8, t_max=12, generator=gen).eval()
              for k in ("rnn", "lstm", "gru", "transformer")}
    cmp = rnnscope.compare(models, seq_len=12, samples=6, seed=3)
    for name, prof in cmp.profiles.items():
        saved = torch.tensor(res["comparison"]["profiles"][name]["per_sample"],
                             dtype=torch.float64)
        # a recurrent model's profile comes from the replay its state gradients take (float32
        # rounding apart from the fused kernel's); the Transformer's is compare()'s own
        exact = name == "Transformer"
        torch.testing.assert_close(saved, prof.per_sample, rtol=1e-12 if exact else 2e-5,
                                   atol=0 if exact else 1e-12)
    x = rnnscope.profile.random_inputs(models["LSTM"], seq_len=12, samples=6, seed=3)
    cj = rnnscope.cell_jacobians(models["LSTM"], x[:4], keep="norms")
    saved = torch.tensor(res["recurrent"]["LSTM"]["layers"][0]["cell_jacobians"]["spectral"],
                         dtype=torch.float64)
    torch.testing.assert_close(saved, cj.spectral, rtol=1e-12, atol=0)
    # the table is printed without --quiet, and the resolved configuration first
    p = run("compare", *SMALL[:-1], "--no-report", "--models", "lstm,gru", check_code=0)
    lines = p.stdout.splitlines()
    assert lines[0].startswith("configuration: models=lstm,gru, seq_len=12")
    assert lines[0].endswith("out=none (--no-report)")  # nothing is written
    assert any(line.startswith("LSTM") for line in lines)
    assert not any(line.startswith("RNN") for line in lines)


def test_replot_gives_the_same_figures(tmp_path):
    run("compare", *SMALL, "--models", "rnn,lstm", "--out", str(tmp_path / "a"), check_code=0)
    run("replot", str(tmp_path / "a" / "results.json"), "--out", str(tmp_path / "b"),
        check_code=0)
    for png in (tmp_path / "a" / "figures").glob("*.png"):
        assert png.read_bytes() == (tmp_path / "b" / "figures" / png.name).read_bytes(), png.name


def test_json_output_and_decay(tmp_path):
    p = run("compare", *SMALL, "--json", "--out", str(tmp_path), check_code=0)
    data = json.loads(p.stdout)
    assert [r["model"] for r in data["table"]] == ["RNN", "LSTM", "GRU", "Transformer"]
    assert Path(data["files"]["html"]).is_file()
    p = run("decay", "--forget", "0.5,0.9", "--lengths", "2", "--json", check_code=0)
    rows = json.loads(p.stdout)["rows"]
    assert rows[0] == {"forget": 0.5, "length": 2, "factor": 0.25, "memory_time": 2.0}
    p = run("decay", check_code=0)
    assert "4.32e-05" in p.stdout and "1/(1-f)" in p.stdout


@pytest.mark.parametrize("args, needle", [
    (["compare", "--bogus"], "unrecognized arguments: --bogus"),
    (["compare", "--seq"], "unrecognized arguments: --seq"),  # no abbreviations
    (["compare", "--seq-len", "0"], "expected a positive integer, got '0'"),
    (["compare", "--jacobian-samples", "many"], "expected 'auto' or a positive integer, "
                                                "got 'many'"),
    (["inspect", "m.py:f", "--jacobian-samples", "0"], "expected 'auto' or a positive "
                                                       "integer, got '0'"),
    (["compare", "--models", "rnn,lsmt"], "unknown value(s) lsmt"),
    (["compare", "--models", "lstm,gru,LSTM"], "--models: lstm given more than once"),
    (["experiment", "--variants", "lstm,lstm"], "--variants: lstm given more than once"),
    (["compare", "--device", "tpu"], "invalid choice: 'tpu'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "required: COMMAND"),
])
def test_usage_errors_exit_2_with_one_line(args, needle):
    p = run(*args, check_code=2)
    assert needle in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


def test_missing_files_are_named_as_missing(tmp_path):
    p = run("inspect", "missing.pt", "--no-report", cwd=tmp_path, check_code=1)
    assert "missing.pt does not exist" in p.stderr and "Traceback" not in p.stderr
    p = run("replot", "nope.json", cwd=tmp_path, check_code=1)
    assert "nope.json does not exist (expected the results.json" in p.stderr
    p = run("replot", str(tmp_path), cwd=tmp_path, check_code=1)
    assert "is a folder; give the results.json inside it" in p.stderr


def test_help_on_every_command():
    for cmd in ([], ["compare"], ["inspect"], ["decay"], ["replot"]):
        p = run(*cmd, "--help", check_code=0)
        assert "usage: rnnscope" in p.stdout


def test_refuses_to_overwrite_a_report(tmp_path):
    (tmp_path / "report.html").write_text("mine")
    p = run("compare", *SMALL, "--out", str(tmp_path), check_code=1)
    assert "already exist" in p.stderr and "--overwrite" in p.stderr
    assert (tmp_path / "report.html").read_text() == "mine"
    run("compare", *SMALL, "--models", "lstm", "--out", str(tmp_path), "--overwrite",
        check_code=0)
    assert (tmp_path / "report.html").read_text() != "mine"


USER_MODEL = textwrap.dedent("""
    import torch
    from torch import nn

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.LSTM(6, 10, num_layers=2, bidirectional=True, batch_first=True)
            self.decoder = nn.GRU(20, 7, batch_first=True)
            self.head = nn.Linear(7, 3)

        def forward(self, x):
            y, _ = self.encoder(x)
            z, _ = self.decoder(y)
            return self.head(z)

    def make():
        return Tagger()
""")


def test_inspect_a_user_model_file_with_weights_and_inputs(tmp_path):
    (tmp_path / "mymodel.py").write_text(USER_MODEL)
    sys.path.insert(0, str(tmp_path))
    try:
        import mymodel
    finally:
        sys.path.remove(str(tmp_path))
    torch.manual_seed(7)
    model = mymodel.make()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    x = torch.randn(3, 9, 6)
    torch.save(x, tmp_path / "x.pt")
    p = run("inspect", "mymodel:make", "--weights", "w.pt", "--inputs", "x.pt",
            "--out", "rep", cwd=tmp_path, check_code=0)
    config = p.stdout.splitlines()[0]  # --seq-len and --samples shape random inputs only
    assert config.startswith("configuration: model=mymodel:make") and "inputs=x.pt" in config
    assert ", seq_len=" not in config and ", samples=" not in config
    res = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert set(res["recurrent"]) == {"encoder", "decoder"}
    enc = res["recurrent"]["encoder"]
    assert enc["num_layers"] == 2 and enc["num_directions"] == 2 and len(enc["layers"]) == 4
    assert len(enc["gates"]["layers"]) == 4
    model.eval()
    prof = rnnscope.gradient_profile(model, x)
    saved = torch.tensor(res["comparison"]["profiles"]["mymodel:make"]["per_sample"],
                         dtype=torch.float64)
    torch.testing.assert_close(saved, prof.per_sample, rtol=1e-12, atol=0)
    # the decoder is analysed on what it really receives: the encoder's output
    with torch.no_grad():
        y, _ = model.encoder(x)
    sg = rnnscope.state_gradients(model.decoder, y)
    saved_h = torch.tensor(res["recurrent"]["decoder"]["state_gradients"]["layers"][0][0]["h"])
    torch.testing.assert_close(saved_h.double(), sg.layers[0][0].h, rtol=1e-5, atol=0)  # float32
    # the same model as a file path works too, with seeded inputs
    run("inspect", str(tmp_path / "mymodel.py") + ":make", "--quiet", "--seq-len", "5",
        "--samples", "2", "--no-report", check_code=0)


def test_inspect_refuses_pickles_that_would_run_code(tmp_path):
    (tmp_path / "mymodel.py").write_text(USER_MODEL)
    marker = tmp_path / "pwned"
    evil = textwrap.dedent(f"""
        import os, torch
        class Evil:
            def __reduce__(self):
                return (os.system, ("touch {marker}",))
        torch.save({{"w": Evil()}}, "evil.pt")
    """)
    subprocess.run([sys.executable, "-c", evil], cwd=tmp_path, check=True)
    p = run("inspect", "mymodel:make", "--weights", "evil.pt", "--quiet", "--no-report",
            cwd=tmp_path, check_code=1)
    assert "refuses" in p.stderr and "Traceback" not in p.stderr
    assert not marker.exists()
    p = run("inspect", "mymodel:make", "--inputs", "evil.pt", "--quiet", "--no-report",
            cwd=tmp_path, check_code=1)
    assert not marker.exists()
    p = run("inspect", "evil.pt", "--quiet", "--no-report", cwd=tmp_path, check_code=1)
    assert "not a TorchScript archive" in p.stderr and not marker.exists()


def test_inspect_errors_are_clear(tmp_path):
    p = run("inspect", "nosuchpkg:make", "--quiet", cwd=tmp_path, check_code=1)
    assert "cannot import 'nosuchpkg'" in p.stderr
    (tmp_path / "mymodel.py").write_text(USER_MODEL)
    torch.save({"nope": torch.zeros(1)}, tmp_path / "bad.pt")
    p = run("inspect", "mymodel:make", "--weights", "bad.pt", "--quiet", cwd=tmp_path,
            check_code=1)
    assert "does not fit the model" in p.stderr
    p = run("compare", "--device", "cuda", *SMALL) if not torch.cuda.is_available() else None
    if p is not None:
        assert p.returncode == 1 and "CUDA is not available" in p.stderr


class Wrapped(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = torch.nn.GRU(4, 5, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0]


def test_inspect_torchscript(tmp_path):
    torch.manual_seed(0)
    m = torch.jit.script(Wrapped())
    m.save(str(tmp_path / "gru.ts"))
    p = run("inspect", "gru.ts", "--input-size", "4", "--seq-len", "6", "--samples", "3",
            "--quiet", "--out", "rep", cwd=tmp_path, check_code=0)
    res = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert len(res["comparison"]["profiles"]["gru.ts"]["norms"]) == 6
    assert "(none)" in res["recurrent"]
    torch.save(torch.zeros(3), tmp_path / "plain.pt")  # a tensor file is not a model
    p = run("inspect", "plain.pt", "--quiet", cwd=tmp_path, check_code=1)
    assert "not a TorchScript archive" in p.stderr and "Traceback" not in p.stderr


def test_experiment_command(tmp_path):
    p = run("experiment", "copy", "--T", "5", "--steps", "30", "--variants", "lstm,gru",
            "--hidden-size", "8", "--batch-size", "8", "--out", str(tmp_path), "--json",
            check_code=0)
    data = json.loads(p.stdout)
    assert data["baseline"] == pytest.approx(10 * __import__("math").log(8) / 25)
    assert [r["model"] for r in data["table"]] == ["lstm", "gru"]
    for f in ("learning_curves", "profiles", "heatmaps", "memory_times"):
        assert (tmp_path / "figures" / f"{f}.png").is_file(), f
    res = json.loads((tmp_path / "results.json").read_text())
    assert len(res["variants"]["lstm"]["train_loss"]) == 30
    p = run("experiment", "adding", "--variants", "transformer", check_code=2)
    assert "unknown value(s) transformer" in p.stderr


LM_FILE = '''
import torch
from torch import nn


class WordLM(nn.Module):
    """As PyTorch's word_language_model example writes it: (T, B) token ids, forward(input,
    hidden), flattened (T*B, V) log-probabilities."""

    def __init__(self, ntoken=30, ninp=8, nhid=12, nlayers=2):
        super().__init__()
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=0.2)
        self.decoder = nn.Linear(nhid, ntoken)
        self.nlayers, self.nhid, self.ntoken = nlayers, nhid, ntoken

    def forward(self, input, hidden):
        output, hidden = self.rnn(self.encoder(input), hidden)
        decoded = self.decoder(output).view(-1, self.ntoken)
        return torch.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz):
        w = next(self.parameters())
        return (w.new_zeros(self.nlayers, bsz, self.nhid), w.new_zeros(self.nlayers, bsz, self.nhid))


def make():
    torch.manual_seed(0)
    return WordLM()


T, B = 15, 3


def last_step(out):  # per-sample: log-probabilities summed at the last step
    return out[0].view(T, B, -1)[-1].sum(-1)


def every_step(out):  # per-step (B, T)
    return out[0].view(T, B, -1).sum(-1).t()


def batch():
    torch.manual_seed(1)
    m = make()
    return torch.randint(0, 30, (T, B)), m.init_hidden(B)


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(10, 16)
        self.lstm = nn.LSTM(16, 8, batch_first=True)

    def forward(self, x):
        return self.lstm(self.proj(x))[0]


def tagger():
    torch.manual_seed(0)
    return Tagger()
'''


def test_inspect_a_token_id_language_model(tmp_path):
    (tmp_path / "lm.py").write_text(LM_FILE)
    m = _load_file_model(tmp_path / "lm.py")
    ids, hidden = m.batch()
    torch.save((ids, hidden), tmp_path / "args.pt")
    torch.save({"epoch": 3, "model_state_dict": m.make().state_dict()}, tmp_path / "ckpt.pt")
    # flattened (T*B, V) output: "last" cannot be read, the error names --loss
    p = run("inspect", "lm.py:make", "--inputs", "args.pt", "--no-report", "--quiet",
            cwd=tmp_path, check_code=1)
    assert "flattened" in p.stderr and "loss" in p.stderr
    p = run("inspect", "lm.py:make", "--inputs", "args.pt", "--weights", "ckpt.pt", "--loss",
            "lm.py:every_step", "--out", "rep", cwd=tmp_path, check_code=0)
    assert "checkpoint key 'model_state_dict'" in p.stdout
    res = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert res["config"]["measured_at"] == "rnn"
    prof = res["comparison"]["profiles"]["lm.py:make"]
    assert len(prof["per_sample"]) == 3 and len(prof["per_sample"][0]) == 15  # (B, T)
    lag = res["lag"]["lm.py:make"]
    assert lag["site"] == "rnn" and len(lag["by_lag"]) >= 1
    assert (tmp_path / "rep" / "figures" / "lag.png").exists()
    assert res["recurrent"]["rnn"]["num_layers"] == 2
    # the same numbers as the API with a loss callable, independent of the CLI
    model = m.make().eval()
    api = rnnscope.gradient_profile(model, ids, forward_args=(hidden,), loss=m.every_step)
    torch.testing.assert_close(torch.tensor(prof["per_sample"], dtype=torch.float64),
                               api.per_sample, rtol=1e-6, atol=1e-9)
    # the report's advice names only options that exist for inspect
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "--forget-bias" not in html


def test_inspect_input_size_is_used_as_given(tmp_path):
    (tmp_path / "lm.py").write_text(LM_FILE)
    p = run("inspect", "lm.py:tagger", "--input-size", "10", "--seq-len", "7", "--samples", "3",
            "--no-report", "--json", "--quiet", cwd=tmp_path, check_code=0)
    out = json.loads(p.stdout)
    assert out["config"]["seq_len"] == 7 and out["config"]["samples"] == 3
    p = run("inspect", "lm.py:tagger", "--seq-len", "7", "--samples", "3", "--no-report",
            "--quiet", cwd=tmp_path, check_code=1)
    assert "input_size" in p.stderr or "--input-size" in p.stderr


def _load_file_model(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("lm_for_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("args, code, needle", [
    (["experiment", "adding", "--lr", "inf"], 2, "argument --lr: expected a finite number > 0"),
    (["experiment", "adding", "--clip", "nan"], 2, "argument --clip: expected a finite number"),
    (["compare", "--seed", "-1"], 2, "argument --seed: expected a seed in [0, 2**63)"),
    (["decay", "--forget", "nan"], 2, "expected finite numbers"),
    (["compare", "--layers", "1000000"], 1, "needs an estimated"),
    (["compare", "--seq-len", str(10 ** 9)], 1, "needs an estimated"),
    (["inspect", "builtins:exit"], 1, "raised SystemExit (exit code None) instead of returning"),
])
def test_user_errors_are_one_line_without_traceback(args, code, needle, tmp_path):
    """Through the real entry point: option ranges and memory estimates refuse before any
    work, code the user points at cannot choose rnnscope's exit code, never a traceback."""
    out = tmp_path / "rep"
    p = run(*args, "--out", str(out), check_code=code) if args[0] != "decay" else \
        run(*args, check_code=code)
    assert needle in p.stderr and "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0
    assert not out.exists()


SEQ_FIRST = '''
import torch
from torch import nn


class SeqFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 4)  # (T, B, I): time first

    def forward(self, x):  # x (B, T, I): batch first
        return self.rnn(x.transpose(0, 1))[0]


def make():
    torch.manual_seed(0)
    return SeqFirst()
'''


def test_inspect_errors_name_the_commands_options(tmp_path):
    """The API's advice ("pass time_dim=0") is given as inspect's option (--time-dim 0), and
    following it works."""
    (tmp_path / "seqfirst.py").write_text(SEQ_FIRST)
    torch.save(torch.randn(5, 5, 3), tmp_path / "x.pt")  # B = T = 5: time cannot be told
    p = run("inspect", "seqfirst.py:make", "--inputs", "x.pt", "--at", "input", "--no-report",
            cwd=tmp_path, check_code=1)
    assert "pass --time-dim 0 (time first) or --time-dim 1 (batch first)" in p.stderr
    assert "time_dim=" not in p.stderr
    run("inspect", "seqfirst.py:make", "--inputs", "x.pt", "--at", "input", "--time-dim", "1",
        "--no-report", "--quiet", cwd=tmp_path, check_code=0)
