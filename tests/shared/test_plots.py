"""The report's plots: real PNGs with content, none for missing data, same bytes every time."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from shared import plots

RECORDS = [
    {"round": r, "train_loss": 1.0 / r, **({"test_auc": 0.7 + 0.05 * r, "epsilon": 0.4 * r} if r % 2 == 0 else {})}
    for r in range(1, 9)
]


def assert_png_with_content(path: Path, width: int = 800) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[1] == width and pixels.shape[0] > 200
    rgb = pixels[..., :3].reshape(-1, 3)
    assert len(np.unique(rgb, axis=0)) > 20  # lines, text and colours, not a blank canvas


def roc_data(seed: int = 0, n: int = 300):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    good = np.clip(0.5 + 0.35 * (y - 0.5) + rng.normal(0, 0.2, n), 0, 1)
    weak = np.clip(0.5 + 0.1 * (y - 0.5) + rng.normal(0, 0.2, n), 0, 1)
    return {"federated": (y, good), "lender_alone": (y, weak)}


def draw_all(folder: Path) -> dict[str, Path | None]:
    times = np.datetime64("2024-01-01T00:00", "ns") + np.arange(288) * np.timedelta64(5, "m")
    actual = 60 + 10 * np.sin(np.arange(len(times)) / 20)
    actual[50:60] = np.nan  # missing readings: a gap
    return {
        "metric": plots.metric_per_round(
            RECORDS, "test_auc", {"centralized": 0.95, "local_only": 0.8, "undefined": math.nan},
            folder / "metric.png", "test AUC",
        ),
        "epsilon": plots.epsilon_per_round(RECORDS, folder / "epsilon.png", target=4.0),
        "roc": plots.roc_curves(roc_data(), folder / "roc.png"),
        "bars": plots.per_client_bars(
            {"site_a": {"federated": 0.9, "local_only": math.nan}, "site_b": {"federated": 0.8, "local_only": 0.7}},
            "AUC", folder / "bars.png", client_label="site",
        ),
        "forecast": plots.forecast_vs_actual(
            {"sensor 1": (times, actual, actual + 2), "sensor 2": (np.arange(10), np.ones(10), np.zeros(10))},
            folder / "forecast.png", ylabel="mph",
        ),
    }


@pytest.fixture(scope="module")
def drawn(tmp_path_factory) -> dict[str, Path | None]:
    return draw_all(tmp_path_factory.mktemp("plots"))


def test_every_plot_is_a_png_with_content(drawn):
    for name, path in drawn.items():
        assert path is not None, name
        assert_png_with_content(path)


def test_same_data_gives_the_same_bytes_and_no_timestamp(drawn, tmp_path: Path):
    first, second = drawn, draw_all(tmp_path)
    for name in first:
        data = first[name].read_bytes()
        assert data == second[name].read_bytes(), name
        assert b"tIME" not in data and b"Software" not in data and b"matplotlib version" not in data


def test_plots_without_data_are_skipped(tmp_path: Path):
    no_dp = [{"round": 1, "train_loss": 0.5}, {"round": 2, "train_loss": 0.4}]
    one_class = {"federated": (np.ones(5), np.linspace(0.1, 0.9, 5))}
    assert plots.epsilon_per_round(no_dp, tmp_path / "e.png") is None
    assert plots.metric_per_round(no_dp, "test_auc", {"centralized": 0.9}, tmp_path / "m.png", "AUC") is None
    assert plots.roc_curves(one_class, tmp_path / "r.png") is None
    assert plots.per_client_bars({"a": {"federated": math.nan}}, "AUC", tmp_path / "b.png") is None
    assert plots.forecast_vs_actual({"s": ([1, 2], [math.nan] * 2, [math.nan] * 2)}, tmp_path / "f.png") is None
    assert list(tmp_path.iterdir()) == []


def test_roc_legend_names_each_method_with_its_auc(tmp_path: Path, monkeypatch):
    labels = []
    original = plots.Figure.savefig

    def spy(figure, *args, **kwargs):
        labels.extend(t.get_text() for t in figure.axes[0].get_legend().get_texts())
        return original(figure, *args, **kwargs)

    monkeypatch.setattr(plots.Figure, "savefig", spy)
    from sklearn.metrics import roc_auc_score

    data = roc_data()
    plots.roc_curves(data, tmp_path / "roc.png")
    for method, (y, p) in data.items():
        assert any(label.startswith(f"{method} (AUC {roc_auc_score(y, p):.4f}") for label in labels), labels


def test_method_colours_are_stable_across_plots():
    assert plots.color_of("federated") == plots.color_of("federated", ["centralized", "federated"])
    assert plots.color_of("centralized") != plots.color_of("federated")
    assert plots.color_of("federated (final model)") == plots.color_of("federated")
    assert plots.color_of("mystery", ["other", "mystery"]) != plots.color_of("other", ["other", "mystery"])
