import json

import pytest
import torch

from rnnscope.experiments import ExperimentConfig, run_experiment, summarise


def test_miniature_training_run_learns_and_the_monitor_saw_every_step():
    cfg = ExperimentConfig(task="adding", T=10, steps=150, batch_size=32, hidden_size=16,
                           lr=1e-2, variants=("lstm", "rnn"), eval_every=50)
    res = run_experiment(cfg)
    json.dumps(res, allow_nan=False)
    for name, v in res["variants"].items():
        losses = [float(x) for x in v["train_loss"]]
        assert len(losses) == 150
        first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
        assert last < first, (name, first, last)
        assert v["monitor_steps"] == list(range(150))  # every step recorded
        assert all(h is not None and len(h) == 10 for h in v["heatmap"])
        assert [s for s, _ in v["eval_loss"]] == [50, 100, 150]
    lstm = res["variants"]["lstm"]
    assert lstm["gates_init"] is not None and res["variants"]["rnn"]["gates_init"] is None
    rows = {r["model"]: r for r in res["table"]}
    assert set(rows) == {"lstm", "rnn"}
    assert rows["lstm"]["final_over_baseline"] == pytest.approx(
        float(lstm["eval_loss"][-1][1]) / (1 / 6))


def test_summary_definitions():
    from rnnscope import GradientProfile

    def prof(rows):  # a saved profile, as train_variant stores it (every field: strict reader)
        return GradientProfile(torch.tensor(rows, dtype=torch.float64), "custom").to_dict()

    v = {"variant": "x", "eval_loss": [[10, 0.2], [20, 0.07], [30, 0.05]],
         "profile_init": prof([[0.001, 1.0]]), "profile_end": prof([[0.5, 1.0]])}
    s = summarise(v, 1 / 6)
    assert s["final_over_baseline"] == pytest.approx(0.3)
    assert s["beats_half_baseline_at"] == 20  # 0.07 < 0.0833
    assert s["effective_memory_init"] == 1 and s["effective_memory_end"] == 2
    v["eval_loss"] = [[10, 0.2]]
    assert summarise(v, 1 / 6)["beats_half_baseline_at"] == "never"


def test_config_validation():
    with pytest.raises(ValueError, match="variants must be a non-empty subset"):
        ExperimentConfig(variants=("lstm", "mamba2")).check()  # mamba is a variant now
    with pytest.raises(ValueError, match="steps must be a positive int"):
        ExperimentConfig(steps=0).check()
