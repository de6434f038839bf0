import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import rnnscope


def test_import_is_light():
    code = ("import sys, rnnscope; bad = [m for m in ('matplotlib', 'tensorboard', 'lightning', "
            "'rich', 'pytorch_lightning') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_surface_is_explicit():
    for name in rnnscope.__all__:
        assert hasattr(rnnscope, name), name


def test_plots_return_figures_with_labelled_axes():
    pytest.importorskip("matplotlib")
    torch.manual_seed(0)
    cmp = rnnscope.compare({"RNN": nn.RNN(3, 4, batch_first=True),
                            "LSTM": nn.LSTM(3, 4, batch_first=True)}, seq_len=12, samples=3)
    fig = cmp.plot()
    lin, log = fig.axes
    assert "distance from the output" in lin.get_xlabel()
    assert log.get_yscale() == "log" and lin.get_yscale() == "linear"
    assert [t.get_text() for t in lin.get_legend().get_texts()] == ["RNN", "LSTM"]
    # x axis really is distance: the LSTM line at x=0 is the last timestep's norm
    line = lin.get_lines()[1]
    assert line.get_xdata()[0] == 0
    assert line.get_ydata()[0] == pytest.approx(cmp.profiles["LSTM"].norms[-1].item())
    fig2 = cmp.profiles["RNN"].plot(log=True)
    assert fig2.axes[0].get_yscale() == "log"
    st = rnnscope.gate_stats(nn.LSTM(3, 4), torch.randn(6, 2, 3))
    fig3 = st.plot()
    assert len(fig3.axes) == 2
    import matplotlib.pyplot as plt
    plt.close("all")


def test_gate_stats_round_trip():
    st = rnnscope.gate_stats(nn.GRU(3, 4, bidirectional=True), torch.randn(6, 2, 3))
    d = json.loads(json.dumps(st.to_dict(), allow_nan=False))
    back = rnnscope.GateStats.from_dict(d)
    assert back.kind == "gru" and len(back.layers) == 2
    torch.testing.assert_close(back.layers[1].memory_time, st.layers[1].memory_time)
