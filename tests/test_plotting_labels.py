"""Log-axis tick labels are plain Unicode (10⁻⁵, 2×10⁻¹), not mathtext: parsing mathtext was
half of the report's drawing time. They must read the same numbers as matplotlib's own."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from rnnscope import plotting  # noqa: E402

SUP = str.maketrans("⁻⁰¹²³⁴⁵⁶⁷⁸⁹", "-0123456789")


def _value(label: str) -> float:
    """A Unicode log label read back as a number: '10⁻⁵' -> 1e-5, '2×10⁻¹' -> 0.2."""
    sign = -1.0 if label.startswith("−") else 1.0
    label = label.lstrip("−")
    coeff, _, power = label.rpartition("×")
    exponent = int(power[2:].translate(SUP))
    return sign * (float(coeff) if coeff else 1.0) * 10.0 ** exponent


@pytest.mark.parametrize("ylim", [(1e-300, 1e13), (1e-7, 3e-2), (0.15, 4.0), (7.24e-3, 1.84e-2)])
def test_log_tick_labels_are_unicode_and_name_their_tick(ylim):
    """(7.24e-3, 1.84e-2): 0.4 decades around 10⁻², where matplotlib labels only 10⁻²."""
    fig, ax = plt.subplots()
    ax.plot([0, 1], list(ylim))
    plotting._log_y(ax)
    ax.set_ylim(*ylim)
    fig.canvas.draw()
    labelled = 0
    for ticks in (ax.yaxis.get_major_ticks(), ax.yaxis.get_minor_ticks()):
        for tick in ticks:
            text = tick.label1.get_text()
            lo, hi = ax.get_ylim()
            if not text or not lo <= tick.get_loc() <= hi:  # unlabelled, or not drawn
                continue
            assert "$" not in text
            value = tick.get_loc()
            assert _value(text) == pytest.approx(value, rel=1e-9), (text, value)
            labelled += 1
    plt.close(fig)
    assert labelled >= 2


def test_log_labels_of_decades_and_minor_ticks():
    fmt = plotting._log_labels()
    assert fmt(1e-5) == "10⁻⁵" and fmt(1.0) == "10⁰" and fmt(1e13) == "10¹³"
    assert fmt(3e-5) == ""  # major formatter: decades only
    assert fmt(0) == "0"
    minor = plotting._log_labels(minor=True)
    assert minor(2e-1) == "2×10⁻¹" and minor(5e3) == "5×10³"


def test_report_figures_draw_no_mathtext_tick_labels():
    """The highway figure (log y axis down to 1e-300) labels its ticks in Unicode."""
    fig, ax = plt.subplots()
    by = {"spectral": np.logspace(0, -300, 50)}
    import torch

    by = {k: torch.as_tensor(v) for k, v in by.items()}
    plotting.plot_jacobian_curves(by, "h", ax=ax, label="RNN")
    fig.canvas.draw()
    lo, hi = ax.get_ylim()
    labels = [t.get_text() for t in ax.get_yticklabels()
              if t.get_text() and lo <= t.get_position()[1] <= hi]
    plt.close(fig)
    assert labels and all("$" not in t and t.startswith("10") for t in labels)
