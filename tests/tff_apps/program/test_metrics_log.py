"""metrics.jsonl and its TensorBoard mirror: a resumed run keeps the rounds up to its checkpoint
in both, so what a killed attempt evaluated after the checkpoint is released nowhere."""

from __future__ import annotations

import json
from pathlib import Path

import tensorflow as tf

from tff_apps.program.metrics_log import MetricsLog


def event_steps(events_dir: Path) -> dict[str, list[int]]:
    """tag -> the steps TensorBoard would show for it, over every event file in the folder."""
    steps: dict[str, list[int]] = {}
    for path in sorted(events_dir.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                steps.setdefault(value.tag, []).append(event.step)
    return {tag: sorted(found) for tag, found in steps.items()}


def test_resume_keeps_the_checkpointed_rounds_in_metrics_and_tensorboard(tmp_path):
    first = MetricsLog(tmp_path)
    for r in range(1, 6):  # a killed attempt got to round 5; its checkpoint is round 2
        first.write({"round": r, "train_loss": 1.0 / r, "test_auc": 0.5 + r / 20})
    first.close()
    assert event_steps(tmp_path / "tensorboard")["test_auc"] == [1, 2, 3, 4, 5]

    resumed = MetricsLog(tmp_path)
    kept = resumed.keep_rounds_up_to(2)
    resumed.write({"round": 3, "train_loss": 0.3, "test_auc": 0.9})
    resumed.close()
    assert [r["round"] for r in kept] == [1, 2]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2, 3]
    assert event_steps(tmp_path / "tensorboard") == {"train_loss": [1, 2, 3], "test_auc": [1, 2, 3]}
