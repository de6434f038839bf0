"""The gradient-flow figure marks the gradients' dtype underflow on its log panel when a
profile goes below it, so an exactly-zero float32 gradient reads as underflow, not a gap."""

import pytest
import torch

from rnnscope.results import GradientProfile

pytest.importorskip("matplotlib")


def _profile(values, dtype):
    return GradientProfile(torch.tensor([values], dtype=torch.float64), config={"dtype": dtype})


@pytest.mark.parametrize("values, dtype, marked", [
    ([0.0, 1e-45, 1e-20, 1.0], "float32", True),   # reached float32's subnormals and zero
    ([1e-30, 1e-20, 1e-10, 1.0], "float32", False),  # small but normal float32 numbers
    ([1e-45, 1e-20, 1e-10, 1.0], "float64", False),  # a normal float64 number
    ([0.0, 1e-45, 1e-20, 1.0], None, False),  # dtype unknown: nothing is claimed
])
def test_underflow_line_only_where_the_dtype_underflowed(values, dtype, marked):
    import matplotlib.pyplot as plt

    from rnnscope import plotting

    fig = plotting.plot_comparison({"LSTM": _profile(values, dtype)})
    try:
        lin, log = fig.axes
        tiny = torch.finfo(torch.float32).tiny
        lines = [ln for ln in log.get_lines() if list(ln.get_ydata()) == [tiny, tiny]]
        texts = [t.get_text() for t in log.texts]
        assert bool(lines) == marked and any("underflow" in t for t in texts) == marked
        assert not [t for t in lin.texts if "underflow" in t.get_text()]  # log panel only
    finally:
        plt.close(fig)


@pytest.mark.parametrize("values, dtype, said", [
    # by time t = 0..3, so distance k = 3 − t: below tiny from k = 2, exactly 0 at k = 3
    ([0.0, 1e-45, 1e-20, 1.0], "float32", (2, 3)),
    ([1e-40, 1e-39, 1e-20, 1.0], "float32", (2, None)),  # subnormal, never 0
    ([1e-30, 1e-20, 1e-10, 1.0], "float32", None),
    ([1e-45, 1e-20, 1e-10, 1.0], "float64", None),
    ([0.0, 1e-45, 1e-20, 1.0], None, None),
])
def test_report_reading_names_where_the_profile_underflowed(values, dtype, said):
    """The report's reading says from which distance the gradient is below the dtype's
    smallest normal number and from which it is exactly 0, only where that happened."""
    from rnnscope.report.html import _underflow_note

    note = _underflow_note(_profile(values, dtype))
    if said is None:
        assert note == ""
        return
    first, zero = said
    assert f"From {first} steps before the output on" in note and dtype in note
    assert (f"read exactly 0 from {zero} steps on" in note) == (zero is not None)
