"""Serving: the versioned export layout TF Serving reads, and loading an export in a fresh
process. The apps' own tests (tests/healthcare, tests/traffic) call
`fresh_process_predictions` on the run their module fixture already trained."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.cli import user_environment
from tff_apps.program.predict import read_model_card, resolve_export
from shared.errors import UserError

REPO = Path(__file__).resolve().parents[3]

# What a TF Serving client does, with TensorFlow alone: load the version folder, call the
# `serving_default` signature with the card's named raw inputs (its `serving_check` rows).
FRESH_PROCESS = """
import json, sys
import numpy as np
import tensorflow as tf

model_dir = sys.argv[1]
card = json.load(open(model_dir + "/model_card.json"))
check = card["serving_check"]
serving = tf.saved_model.load(model_dir).signatures["serving_default"]
specs = serving.structured_input_signature[1]
feed = {
    name: tf.constant([np.nan if v is None else v for v in values], specs[name].dtype)
    for name, values in check["inputs"].items()
}
out = serving(**feed)
print(json.dumps({
    "inputs": sorted(specs), "outputs": sorted(out),
    "predictions": out[card["output"]].numpy().astype(float).tolist(),
}))
"""


def fresh_process_predictions(model_dir: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(served predictions, in-run predictions, the served signature's names) for the
    `serving_check` rows of the model card, served by a new Python process."""
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(model_dir)],
        capture_output=True, text=True, timeout=300, env=user_environment(), cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    served = json.loads(result.stdout.strip().splitlines()[-1])
    card = json.loads((model_dir / "model_card.json").read_text())
    expected = np.array(card["serving_check"]["outputs"], dtype=np.float64)
    return np.array(served["predictions"], dtype=np.float64), expected, served


def check_served_like_in_run(model_dir: Path, atol: float) -> float:
    """Asserts the fresh process predicts what the in-run model did; returns the max difference."""
    served, expected, signature = fresh_process_predictions(model_dir)
    card = json.loads((model_dir / "model_card.json").read_text())
    assert signature["inputs"] == sorted(card["inputs"].values())  # named raw inputs
    assert signature["outputs"] == [card["output"]]
    assert served.shape == expected.shape and len(expected) >= 3
    difference = float(np.max(np.abs(served - expected)))
    print(f"{model_dir}: fresh-process max |served - in-run| = {difference:.3g}")
    assert difference <= atol, difference
    return difference


def _servable(folder: Path, card: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"")
    (folder / "model_card.json").write_text(json.dumps(card or {"app": "x"}))
    return folder


def test_resolve_export_takes_the_export_servable_or_version_folder(tmp_path: Path):
    export = tmp_path / "run" / "export"
    _servable(export / "healthcare" / "1", {"version": 1})
    two = _servable(export / "healthcare" / "2", {"version": 2})
    (export / "healthcare" / ".3.tmp").mkdir()  # a staging folder is not a version
    assert resolve_export(export) == two
    assert resolve_export(export / "healthcare") == two  # TF Serving's pick: the highest
    assert resolve_export(export / "healthcare" / "1") == export / "healthcare" / "1"
    assert read_model_card(export) == {"version": 2}


def test_resolve_export_keeps_a_root_with_several_servables(tmp_path: Path):
    export = tmp_path / "export"
    _servable(export / "finance_lender" / "1")
    _servable(export / "finance_partner" / "1")
    (export / "model_card.json").write_text(json.dumps({"app": "finance", "parties": ["lender", "partner"]}))
    assert resolve_export(export) == export
    assert read_model_card(export)["parties"] == ["lender", "partner"]


def test_a_folder_without_an_export_is_a_user_error(tmp_path: Path):
    with pytest.raises(UserError, match="not an exported model"):
        read_model_card(tmp_path)


def test_deploy_manifests_parse_and_run_the_cli():
    deploy = REPO / "deploy"
    cron = (deploy / "cron" / "tff-apps.cron").read_text()
    lines = [line for line in cron.splitlines() if line.strip() and not line.startswith("#")]
    assert len(lines) == 1 and len(lines[0].split()) > 5 and "run --config /jobs/job.toml" in lines[0]
    assert "date +\\%F" in lines[0]  # a bare % ends a crontab command
    yaml = pytest.importorskip("yaml")
    cronjob = next(d for d in yaml.safe_load_all((deploy / "k8s" / "cronjob.yaml").read_text()) if d["kind"] == "CronJob")
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert cronjob["kind"] == "CronJob" and pod["containers"][0]["command"][:2] == ["sh", "-c"]
    workers = list(yaml.safe_load_all((deploy / "k8s" / "workers.yaml").read_text()))
    kinds = {doc["kind"]: doc for doc in workers}
    assert set(kinds) == {"Deployment", "Service"} and kinds["Service"]["spec"]["clusterIP"] == "None"


def test_warm_start_sets_the_parent_weights_and_refuses_another_shape(tmp_path: Path):
    import tensorflow_federated as tff

    from tff_apps.program import round_loop
    from tff_apps.program.export import save_weights
    from tff_apps.program.job import InitFrom

    ModelWeights = tff.learning.models.ModelWeights
    parent = tmp_path / "r1" / "export" / "healthcare" / "1"
    parent.mkdir(parents=True)
    save_weights(parent / "weights.npz", ModelWeights(trainable=[np.full((3, 1), 0.5), np.ones(1)], non_trainable=[]))

    class Process:  # the two methods warm_start uses, on a state that is the weights
        def get_model_weights(self, state):
            return state

        def set_model_weights(self, state, weights):
            return weights

    init = InitFrom("r1", parent, "fingerprint-of-r1")
    state, lineage = round_loop.warm_start(
        Process(), ModelWeights(trainable=[np.zeros((3, 1)), np.zeros(1)], non_trainable=[]), init, tmp_path / "r2"
    )
    np.testing.assert_array_equal(state.trainable[0], np.full((3, 1), 0.5))
    assert lineage["init_from"] == "r1" and lineage["parent_data_fingerprint"] == "fingerprint-of-r1"
    with pytest.raises(UserError, match=r"'r1'.*run r2 needs \[\(4, 1\)"):
        round_loop.warm_start(
            Process(), ModelWeights(trainable=[np.zeros((4, 1)), np.zeros(1)], non_trainable=[]), init, tmp_path / "r2"
        )
