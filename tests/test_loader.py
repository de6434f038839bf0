"""Loading weights, inputs, batches and losses: every accepted form, and every refusal.

Files are written into tmp_path; weights and inputs are only ever read with
torch.load(weights_only=True), and the tests prove a pickled object's code does not run.
"""

import builtins
import pickle
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from rnnscope.loader import (STATE_DICT_KEYS, ForwardInputs, LoadError, WeightsInfo, load_batch,
                             load_inputs, load_loss, load_model, load_weights, split_kwargs)

V, E, H, B, T = 11, 4, 5, 3, 6  # vocabulary, embedding, hidden, batch, time


class Tagger(nn.Module):
    """Token ids (B, T) -> per-step logits (B, T, V); an optional LSTM state (h0, c0)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, E)
        self.lstm = nn.LSTM(E, H, batch_first=True)
        self.head = nn.Linear(H, V)

    def forward(self, tokens, hx=None):
        return self.head(self.lstm(self.emb(tokens), hx)[0])


def make_tagger(seed):
    torch.manual_seed(seed)
    return Tagger()


def assert_same_parameters(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def assert_one_line(message):
    assert message and "\n" not in message, message


def error(fn, *args):
    with pytest.raises(LoadError) as info:
        fn(*args)
    message = str(info.value)
    assert_one_line(message)
    return message


class Evil:
    """Unpickling this would create `marker`: the code it carries must never run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').close()",))


def test_the_evil_payload_runs_when_unpickled_unsafely(tmp_path):
    # the control for the refusals below: plain pickle does run it
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps(Evil(marker)))
    assert marker.exists()


# --- weights ---------------------------------------------------------------------------------


def test_a_plain_state_dict_loads(tmp_path):
    source, target = make_tagger(0), make_tagger(1)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    info = load_weights(target, str(tmp_path / "w.pt"))
    assert info == WeightsInfo(key=None, prefix=None)
    assert_same_parameters(source, target)


@pytest.mark.parametrize("key", STATE_DICT_KEYS)
def test_a_checkpoint_holding_the_state_dict_under_a_usual_key_loads(tmp_path, key):
    source, target = make_tagger(0), make_tagger(1)
    opt = torch.optim.Adam(source.parameters())
    torch.save({"epoch": 3, key: source.state_dict(), "optimizer": opt.state_dict()},
               tmp_path / "ckpt.pt")
    assert load_weights(target, str(tmp_path / "ckpt.pt")) == WeightsInfo(key=key, prefix=None)
    assert_same_parameters(source, target)


def test_the_first_usual_key_holding_tensors_is_used(tmp_path):
    # "model" names an architecture here, not weights: "net" holds them
    source, target = make_tagger(0), make_tagger(1)
    torch.save({"model": "tagger-v2", "net": source.state_dict()}, tmp_path / "ckpt.pt")
    assert load_weights(target, str(tmp_path / "ckpt.pt")).key == "net"
    assert_same_parameters(source, target)


def test_a_lightning_checkpoint_loads_into_the_inner_module(tmp_path):
    # a LightningModule holding the user's network as self.model, built by hand
    source, target = make_tagger(0), make_tagger(1)
    ckpt = {"epoch": 2, "global_step": 40, "pytorch-lightning_version": "2.4.0",
            "state_dict": {f"model.{k}": v for k, v in source.state_dict().items()},
            "optimizer_states": [], "lr_schedulers": [], "hyper_parameters": {"lr": 0.01}}
    torch.save(ckpt, tmp_path / "last.ckpt")
    info = load_weights(target, str(tmp_path / "last.ckpt"))
    assert info == WeightsInfo(key="state_dict", prefix="model.")
    assert_same_parameters(source, target)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "net.", "_orig_mod.module.",
                                    "module._orig_mod."])
def test_wrapper_prefixes_are_removed(tmp_path, prefix):
    # DataParallel/DDP, torch.compile, any single attribute name, and the wrappers nested
    source, target = make_tagger(0), make_tagger(1)
    torch.save({f"{prefix}{k}": v for k, v in source.state_dict().items()}, tmp_path / "w.pt")
    assert load_weights(target, str(tmp_path / "w.pt")) == WeightsInfo(None, prefix)
    assert_same_parameters(source, target)


def test_a_prefix_the_model_itself_has_is_not_removed(tmp_path):
    # the model's own keys all start with "rnn.": they fit as saved
    torch.manual_seed(0)
    source, target = nn.Sequential(), nn.Sequential()
    source.add_module("rnn", nn.GRU(3, 4))
    target.add_module("rnn", nn.GRU(3, 4))
    torch.save(source.state_dict(), tmp_path / "w.pt")
    assert load_weights(target, str(tmp_path / "w.pt")) == WeightsInfo(None, None)
    assert_same_parameters(source, target)


def test_mismatched_keys_are_listed(tmp_path):
    target = make_tagger(1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    state = make_tagger(0).state_dict()
    del state["lstm.weight_hh_l0"]
    state["lstm.weight_hh_l1"] = torch.zeros(4 * H, H)
    torch.save({"state_dict": state}, tmp_path / "w.pt")
    message = error(load_weights, target, str(tmp_path / "w.pt"))
    assert "does not fit the model" in message
    assert "checkpoint key 'state_dict'" in message
    assert "1 missing key(s): lstm.weight_hh_l0" in message
    assert "1 unexpected key(s): lstm.weight_hh_l1" in message
    # nothing was loaded
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_a_mismatch_lists_at_most_five_keys_of_each_kind(tmp_path):
    torch.save({f"other.{i}": torch.zeros(1) for i in range(9)}, tmp_path / "w.pt")
    message = error(load_weights, make_tagger(0), str(tmp_path / "w.pt"))
    n_model = len(make_tagger(0).state_dict())
    assert f"{n_model} missing key(s)" in message and "9 unexpected key(s)" in message
    assert f"({n_model - 5} more)" in message and "(4 more)" in message
    assert "a plain state dict" in message
    assert "other.5" not in message


def test_a_mismatch_is_shown_for_the_closest_reading_of_the_keys(tmp_path):
    # a LightningModule that also holds a loss with a buffer: "model." keys plus
    # "criterion.weight"; loading stays strict, and the error points at the stray key
    state = {f"model.{k}": v for k, v in make_tagger(0).state_dict().items()}
    state["criterion.weight"] = torch.ones(V)
    torch.save({"state_dict": state}, tmp_path / "w.ckpt")
    message = error(load_weights, make_tagger(1), str(tmp_path / "w.ckpt"))
    assert "after removing prefix 'model.' where present" in message
    assert "1 unexpected key(s): criterion.weight" in message and "missing" not in message


def test_mismatched_shapes_are_listed(tmp_path):
    state = make_tagger(0).state_dict()
    state["head.weight"] = torch.zeros(V, H + 1)
    torch.save(state, tmp_path / "w.pt")
    message = error(load_weights, make_tagger(1), str(tmp_path / "w.pt"))
    assert f"head.weight: file ({V}, {H + 1}), model ({V}, {H})" in message


def test_a_checkpoint_without_a_usual_key_lists_its_keys(tmp_path):
    torch.save({"epoch": 1, "weights": {"a": torch.zeros(1)}, "model": [1, 2]},
               tmp_path / "ckpt.pt")
    message = error(load_weights, make_tagger(0), str(tmp_path / "ckpt.pt"))
    assert "top-level keys are ['epoch', 'weights', 'model']" in message
    assert str(list(STATE_DICT_KEYS)) in message
    assert "'model' holds a list of 2 item(s)" in message


def test_weights_that_are_not_a_dict_are_refused(tmp_path):
    torch.save(torch.zeros(3, 4), tmp_path / "w.pt")
    message = error(load_weights, make_tagger(0), str(tmp_path / "w.pt"))
    assert "must hold a state dict" in message and "a Tensor of shape (3, 4)" in message


def test_a_whole_pickled_model_is_refused_in_one_line(tmp_path):
    torch.save(make_tagger(0), tmp_path / "model.pt")
    message = error(load_weights, make_tagger(1), str(tmp_path / "model.pt"))
    assert message.startswith(f"{tmp_path / 'model.pt'} holds a whole pickled model")
    assert "Tagger" in message and "refuses to unpickle" in message
    assert "torch.save(model.state_dict(), 'weights.pt')" in message
    assert "weights_only" not in message  # torch's advice to turn the safety off is not quoted


@pytest.mark.parametrize("wrap", [lambda e: e, lambda e: {"w": e},
                                  lambda e: {"state_dict": {"w": torch.zeros(1), "x": e}}])
def test_pickled_code_in_weights_never_runs(tmp_path, wrap):
    marker = tmp_path / "pwned"
    torch.save(wrap(Evil(marker)), tmp_path / "evil.pt")
    message = error(load_weights, make_tagger(0), str(tmp_path / "evil.pt"))
    assert "refuses to unpickle" in message and "state_dict()" in message
    assert "(it refers to exec)" in message
    assert not marker.exists()


def test_pickled_code_in_inputs_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save((torch.zeros(2, 3), Evil(marker)), tmp_path / "x.pt")
    message = error(load_inputs, str(tmp_path / "x.pt"))
    assert "holds a pickled Python object" in message and "torch.save(x" in message
    assert not marker.exists()


def test_unreadable_files_give_one_line(tmp_path):
    torch.save(make_tagger(0).state_dict(), tmp_path / "w.pt")
    data = (tmp_path / "w.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pt").write_bytes(b"this is not a checkpoint at all")
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("truncated.pt", "garbage.pt"):
        message = error(load_weights, make_tagger(0), str(tmp_path / name))
        assert message == (f"weights file {tmp_path / name} is not a readable torch.save file "
                           "(truncated, corrupted or another format)")
    assert "is empty (0 bytes)" in error(load_weights, make_tagger(0), str(tmp_path / "empty.pt"))
    assert "does not exist" in error(load_weights, make_tagger(0), str(tmp_path / "nope.pt"))
    assert "is not a file" in error(load_inputs, str(tmp_path))


def test_a_plain_pickle_is_refused_with_a_short_reason(tmp_path):
    (tmp_path / "raw.pkl").write_bytes(pickle.dumps({"w": 1}, protocol=4))
    message = error(load_weights, make_tagger(0), str(tmp_path / "raw.pkl"))
    assert "cannot be read safely (Unsupported operand" in message
    assert len(message) < 300


def test_load_weights_works_for_torchscript_models(tmp_path):
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(3, 4, batch_first=True)

        def forward(self, x):
            return self.rnn(x)[0]

    torch.manual_seed(0)
    source, target = Wrapped(), torch.jit.script(Wrapped())
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "w.pt")
    assert load_weights(target, str(tmp_path / "w.pt")) == WeightsInfo(None, "module.")
    assert_same_parameters(source, target)


# --- inputs ----------------------------------------------------------------------------------


def tokens():
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))


def state():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, B, H, generator=g), torch.randn(1, B, H, generator=g)


def call(model, fi):
    return model(fi.inputs, *fi.args, **fi.kwargs)


def test_inputs_as_one_tensor(tmp_path):
    x = tokens()
    torch.save(x, tmp_path / "x.pt")
    fi = load_inputs(str(tmp_path / "x.pt"))
    assert torch.equal(fi.inputs, x) and fi.args == () and fi.kwargs == {}


@pytest.mark.parametrize("container", [tuple, list])
def test_inputs_as_positional_arguments_with_an_lstm_state(tmp_path, container):
    x, hx = tokens(), state()
    torch.save(container([x, hx]), tmp_path / "x.pt")
    fi = load_inputs(str(tmp_path / "x.pt"))
    assert torch.equal(fi.inputs, x) and isinstance(fi.args, tuple) and fi.kwargs == {}
    assert isinstance(fi.args[0], tuple) and all(map(torch.equal, fi.args[0], hx))
    model = make_tagger(0)
    assert torch.equal(call(model, fi), model(x, hx))


def test_positional_arguments_may_be_none_and_numbers(tmp_path):
    x = torch.zeros(2, 3)
    torch.save((x, None, 3, 2.5, [torch.ones(1)]), tmp_path / "x.pt")
    fi = load_inputs(str(tmp_path / "x.pt"))
    assert torch.equal(fi.inputs, x)
    assert fi.args[:3] == (None, 3, 2.5) and torch.equal(fi.args[3][0], torch.ones(1))


def test_inputs_as_keyword_arguments(tmp_path):
    x, hx = tokens(), state()
    torch.save({"hx": hx, "tokens": x}, tmp_path / "x.pt")
    model = make_tagger(0)
    fi = load_inputs(str(tmp_path / "x.pt"), model)
    assert torch.equal(fi.inputs, x) and fi.args == () and list(fi.kwargs) == ["hx"]
    assert torch.equal(call(model, fi), model(x, hx))


def test_keyword_arguments_without_the_first_parameter_name_it(tmp_path):
    torch.save({"x": tokens(), "hx": state()}, tmp_path / "x.pt")
    message = error(load_inputs, str(tmp_path / "x.pt"), make_tagger(0))
    assert message == (f"{tmp_path / 'x.pt'} holds a dict of keyword arguments, but the dict has "
                       "no entry for Tagger.forward's first argument 'tokens'; its keys are "
                       "['x', 'hx']")


def test_keyword_arguments_forward_does_not_take_are_refused(tmp_path):
    torch.save({"tokens": tokens(), "lengths": torch.tensor([6, 6, 6])}, tmp_path / "x.pt")
    message = error(load_inputs, str(tmp_path / "x.pt"), make_tagger(0))
    assert "does not accept: ['lengths']" in message and "['tokens', 'hx']" in message


def test_keyword_arguments_need_the_model(tmp_path):
    torch.save({"tokens": tokens()}, tmp_path / "x.pt")
    assert "pass the model" in error(load_inputs, str(tmp_path / "x.pt"))


def test_split_kwargs():
    x, hx = tokens(), state()
    first, rest = split_kwargs(make_tagger(0), {"tokens": x, "hx": hx})
    assert first is x and rest == {"hx": hx}

    class Open(nn.Module):  # **kwargs: any other name is accepted
        def forward(self, inputs, /, **extra):
            return inputs

    first, rest = split_kwargs(Open(), {"mask": None, "inputs": x})
    assert first is x and rest == {"mask": None}

    class Varargs(nn.Module):
        def forward(self, *args):
            return args

    assert "has no named first parameter" in error(split_kwargs, Varargs(), {"x": x})


def test_split_kwargs_reads_a_torchscript_schema():
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(3, 4, batch_first=True)

        def forward(self, seq, h: torch.Tensor | None = None):
            return self.rnn(seq, h)[0]

    x = torch.zeros(2, 5, 3)
    first, rest = split_kwargs(torch.jit.script(Wrapped()), {"seq": x, "h": None})
    assert first is x and rest == {"h": None}


def test_a_packed_sequence_is_accepted_as_the_input(tmp_path):
    lstm = nn.LSTM(E, H, batch_first=True)
    x = torch.randn(B, T, E)
    packed = pack_padded_sequence(x, torch.tensor([6, 4, 2]), batch_first=True)
    torch.save(packed, tmp_path / "p.pt")
    torch.save((packed, state()), tmp_path / "pt.pt")
    fi = load_inputs(str(tmp_path / "p.pt"))
    assert isinstance(fi.inputs, PackedSequence) and fi.args == ()
    assert torch.equal(fi.inputs.data, packed.data)
    assert torch.equal(fi.inputs.batch_sizes, packed.batch_sizes)
    fi = load_inputs(str(tmp_path / "pt.pt"))
    assert isinstance(fi.inputs, PackedSequence) and len(fi.args) == 1
    assert torch.equal(lstm(fi.inputs, *fi.args)[0].data, lstm(packed, state())[0].data)
    moved = fi.to("cpu", dtype=torch.float64)
    assert isinstance(moved.inputs, PackedSequence) and moved.inputs.data.dtype == torch.float64
    assert moved.inputs.batch_sizes.dtype == torch.long


@pytest.mark.parametrize("obj, expected", [
    ((), "holds an empty tuple"),
    ((None, torch.zeros(1)), "a tuple whose first element is None"),
    ("hello", "holds a str ('hello'); expected a tensor"),
    (3, "holds a int (3); expected a tensor"),
    ({1: torch.zeros(1)}, "keys are not all strings"),
])
def test_inputs_of_the_wrong_form_are_refused(tmp_path, obj, expected):
    torch.save(obj, tmp_path / "x.pt")
    assert expected in error(load_inputs, str(tmp_path / "x.pt"), make_tagger(0))


def test_forward_inputs_to_casts_only_floating_tensors():
    fi = ForwardInputs(torch.zeros(2, 3, dtype=torch.long), (state(), None, 3),
                       {"mask": torch.ones(2, dtype=torch.bool), "scale": torch.ones(1)})
    moved = fi.to("cpu", dtype=torch.float64)
    assert moved.inputs.dtype == torch.long and moved.kwargs["mask"].dtype == torch.bool
    assert moved.kwargs["scale"].dtype == torch.float64
    assert all(h.dtype == torch.float64 for h in moved.args[0]) and moved.args[1:] == (None, 3)
    assert fi.args[0][0].dtype == torch.float32  # a copy: the original is unchanged


# --- batch and loss functions ----------------------------------------------------------------

BATCHES = textwrap.dedent(f"""
    import torch

    def batch():
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, {V}, ({B}, {T}), generator=g)
        return x, (torch.zeros(1, {B}, {H}), torch.zeros(1, {B}, {H}))

    def as_dict():
        return {{"tokens": batch()[0], "hx": None}}

    def text():
        return "hello"

    def needs_args(n):
        return torch.zeros(n)

    NOT_A_FUNCTION = 3

    def per_step(logits):
        return logits.logsumexp(-1)  # (B, T)

    class Loss(torch.nn.Module):
        def forward(self, out):
            return out.sum(-1).mean(-1)  # (B,)

    loss_instance = Loss()
    two_args = torch.nn.MSELoss()
""")


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "data.py"
    path.write_text(BATCHES)
    return str(path)


def test_load_batch_from_a_file(user_file):
    fi = load_batch(f"{user_file}:batch", make_tagger(0))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(fi.inputs, torch.randint(0, V, (B, T), generator=g))
    assert len(fi.args) == 1 and fi.args[0][0].shape == (1, B, H)
    fi = load_batch(f"{user_file}:as_dict", make_tagger(0))
    assert fi.inputs.shape == (B, T) and fi.kwargs == {"hx": None}


def test_load_batch_from_a_module(tmp_path, monkeypatch):
    (tmp_path / "rnnscope_test_batches.py").write_text(BATCHES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "rnnscope_test_batches", raising=False)
    try:
        fi = load_batch("rnnscope_test_batches:batch")
    finally:
        sys.modules.pop("rnnscope_test_batches", None)
    assert fi.inputs.shape == (B, T)


def test_load_batch_errors(user_file, tmp_path):
    model = make_tagger(0)
    assert "returned a str ('hello'); expected a tensor" in error(
        load_batch, f"{user_file}:text", model)
    assert "must take no arguments (rnnscope calls it as fn()); its signature is (n)" in error(
        load_batch, f"{user_file}:needs_args", model)
    assert "it is a int (3)" in error(load_batch, f"{user_file}:NOT_A_FUNCTION", model)
    assert "has no attribute 'nope'" in error(load_batch, f"{user_file}:nope", model)
    assert f"batch file {tmp_path / 'missing.py'} does not exist" in error(
        load_batch, f"{tmp_path / 'missing.py'}:batch", model)
    assert "must be given as path/to/file.py:function" in error(load_batch, "data.py", model)
    assert "cannot import 'no_such_module_here'" in error(load_batch, "no_such_module_here:f")
    assert "pass the model" in error(load_batch, f"{user_file}:as_dict")


def test_load_loss(user_file):
    logits = torch.randn(B, T, V)
    loss = load_loss(f"{user_file}:per_step")
    assert loss(logits).shape == (B, T)
    assert load_loss(f"{user_file}:loss_instance")(logits).shape == (B,)


def test_load_loss_errors(user_file):
    assert "is a class" in error(load_loss, f"{user_file}:Loss")
    assert "must name a function" in error(load_loss, f"{user_file}:NOT_A_FUNCTION")
    message = error(load_loss, f"{user_file}:two_args")
    assert "only required argument; its signature is (input" in message


# --- models (the behaviours load_model already had) ------------------------------------------

MODELS = textwrap.dedent("""
    import torch

    def make():
        return torch.nn.GRU(3, 4, batch_first=True)

    instance = torch.nn.LSTM(3, 4)

    def not_a_model():
        return 42
""")


def test_load_model_keeps_working(tmp_path):
    path = tmp_path / "models.py"
    path.write_text(MODELS)
    assert isinstance(load_model(f"{path}:make"), nn.GRU)
    assert isinstance(load_model(f"{path}:instance"), nn.LSTM)
    torch.jit.script(nn.GRU(3, 4)).save(str(tmp_path / "gru.ts"))
    assert isinstance(load_model(str(tmp_path / "gru.ts")), torch.jit.ScriptModule)
    assert "must be (or return) a torch.nn.Module; got int" in error(
        load_model, f"{path}:not_a_model")
    assert "model file" in error(load_model, f"{tmp_path / 'missing.py'}:make")
    assert "MODEL must be package.module:factory" in error(load_model, "nocolon")
    torch.save(torch.zeros(3), tmp_path / "plain.pt")
    assert "not a TorchScript archive" in str(pytest.raises(
        LoadError, load_model, str(tmp_path / "plain.pt")).value)


# ---------------------------------------------------------------------------------------------
# Size budget: checked before anything is inflated


def _deflated_copy(src, dst, level=1):
    """The same torch.save archive with every member deflated (torch.load reads it)."""
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED,
                                                      compresslevel=level) as zout:
        for info in zin.infolist():
            with zin.open(info) as fin, zout.open(info.filename, "w") as fout:
                while chunk := fin.read(1 << 20):
                    fout.write(chunk)


def _zip_bomb(path, inflated_mib: int):
    """A zip of about inflated_mib KiB whose member inflates to inflated_mib MiB of zeros.

    Written by hand from one deflate block (1 MiB of zeros, ~1 KiB compressed) repeated: a
    full flush makes each block independent, so the stream is valid and costs nothing to build.
    The CRC is not computed (it would mean hashing gigabytes): it is checked only after
    inflating, which the budget must prevent.
    """
    import struct
    import zlib

    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(bytes(1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    end = zlib.compressobj(9, zlib.DEFLATED, -15).flush()  # an empty final block
    size, csize = inflated_mib << 20, len(block) * inflated_mib + len(end)
    name = b"archive/data/0"
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0, 0, csize, size, len(name), 0)
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0, 0, csize, size,
                          len(name), 0, 0, 0, 0, 0, 0)
    with open(path, "wb") as fh:
        fh.write(local + name)
        for _ in range(inflated_mib):
            fh.write(block)
        fh.write(end)
        offset = fh.tell()
        fh.write(central + name)
        fh.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central) + len(name),
                             offset, 0))


def _no_torch_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called: the file was inflated")

    monkeypatch.setattr(torch, "load", refuse)


def test_a_zip_bomb_is_refused_before_torch_inflates_it(tmp_path, monkeypatch):
    import time

    monkeypatch.delenv("RNNSCOPE_MAX_LOAD_BYTES", raising=False)
    bomb = tmp_path / "bomb.pt"
    _zip_bomb(bomb, 2900)  # ~2.9 MiB on disk, 2900 MiB inflated: over the 2 GiB default
    assert bomb.stat().st_size < 3.2e6
    _no_torch_load(monkeypatch)
    t0 = time.perf_counter()
    message = error(load_weights, make_tagger(0), str(bomb))
    assert time.perf_counter() - t0 < 2
    assert message.startswith(f"weights file {bomb} would inflate to 2.83 GiB (3040870400 bytes)")
    assert "1 zip member(s)" in message and "more than the load budget of 2.00 GiB" in message
    assert "refused before inflating anything" in message
    assert "RNNSCOPE_MAX_LOAD_BYTES=8G" in message
    assert "would inflate" in error(load_inputs, str(bomb))


def test_a_real_deflated_archive_over_the_budget_is_refused_and_loads_under_it(tmp_path,
                                                                              monkeypatch):
    x = torch.zeros(1 << 22)  # 16 MiB of float32 zeros
    torch.save(x, tmp_path / "plain.pt")
    _deflated_copy(tmp_path / "plain.pt", tmp_path / "small.pt")
    assert (tmp_path / "small.pt").stat().st_size < (1 << 20)  # < 1 MiB on disk
    monkeypatch.setenv("RNNSCOPE_MAX_LOAD_BYTES", "4M")
    message = error(load_inputs, str(tmp_path / "small.pt"))
    assert "would inflate to 16.00 MiB" in message and "budget of 4.00 MiB" in message
    # the plain archive is refused on its size on disk already
    message = error(load_inputs, str(tmp_path / "plain.pt"))
    assert "is 16.00 MiB (16778" in message and "on disk, more than the load budget" in message
    monkeypatch.setenv("RNNSCOPE_MAX_LOAD_BYTES", "32M")
    assert torch.equal(load_inputs(str(tmp_path / "small.pt")).inputs, x)


def test_weights_over_the_budget_are_refused_with_the_numbers(tmp_path, monkeypatch):
    model = make_tagger(0)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    size = (tmp_path / "w.pt").stat().st_size
    monkeypatch.setenv("RNNSCOPE_MAX_LOAD_BYTES", str(size - 1))
    message = error(load_weights, make_tagger(1), str(tmp_path / "w.pt"))
    assert f"({size} bytes) on disk, more than the load budget of" in message
    assert f"({size - 1} bytes)" in message
    monkeypatch.setenv("RNNSCOPE_MAX_LOAD_BYTES", str(size))
    fresh = make_tagger(1)
    load_weights(fresh, str(tmp_path / "w.pt"))
    assert_same_parameters(fresh, model)


def test_a_torchscript_model_file_is_held_to_the_budget(tmp_path, monkeypatch):
    torch.jit.save(torch.jit.script(nn.GRU(2, 3)), str(tmp_path / "m.pt"))
    monkeypatch.setenv("RNNSCOPE_MAX_LOAD_BYTES", "1K")
    assert "model file" in error(load_model, str(tmp_path / "m.pt"))


@pytest.mark.parametrize("value", ["0", "-5", "lots", "1e9", "12X"])
def test_a_bad_budget_setting_is_named(tmp_path, monkeypatch, value):
    torch.save(torch.zeros(2), tmp_path / "x.pt")
    monkeypatch.setenv("RNNSCOPE_MAX_LOAD_BYTES", value)
    message = error(load_inputs, str(tmp_path / "x.pt"))
    assert message.startswith("RNNSCOPE_MAX_LOAD_BYTES must be a positive size such as 8G")
    assert repr(value) in message


@pytest.mark.parametrize("value, expected", [("8G", 8 << 30), ("500M", 500 << 20),
                                             ("1.5g", 3 << 29), ("8GiB", 8 << 30),
                                             ("123", 123), ("2K", 2048)])
def test_budget_settings(monkeypatch, value, expected):
    from rnnscope.loader import max_load_bytes

    monkeypatch.setenv("RNNSCOPE_MAX_LOAD_BYTES", value)
    assert max_load_bytes() == expected
    monkeypatch.delenv("RNNSCOPE_MAX_LOAD_BYTES")
    assert max_load_bytes() == 2 << 30
