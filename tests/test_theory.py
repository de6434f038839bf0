import math

import pytest

import rnnscope


def test_decay_table_is_f_to_the_L():
    t = rnnscope.decay_table()
    assert len(t.rows) == 12
    for r in t.rows:
        assert r["factor"] == r["forget"] ** r["length"]
        assert r["memory_time"] == pytest.approx(1 / (1 - r["forget"]))
    row = next(r for r in t.rows if r["forget"] == 0.99 and r["length"] == 1000)
    assert row["factor"] == pytest.approx(4.3171e-05, rel=1e-4)  # the seed's "(0.99)^1000 ≈ 0"
    text = str(t)
    assert "f^L" in text and "4.32e-05" in text


def test_decay_table_validation_and_memory_time():
    with pytest.raises(ValueError, match=r"numbers in \[0, 1\]; got 1.5"):
        rnnscope.decay_table((1.5,))
    with pytest.raises(ValueError, match="non-negative ints"):
        rnnscope.decay_table(lengths=(2.5,))
    assert rnnscope.memory_time(1.0) == math.inf
    assert rnnscope.memory_time(0.9) == pytest.approx(10)
