"""%dp_fit through a real IPython InteractiveShell, and the training monitor."""

from __future__ import annotations

import io
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from IPython.core.error import UsageError  # noqa: E402

from kprivacy_nb.dp.private import privacy_state  # noqa: E402
from kprivacy_nb.dp.trainer import DPFitResult  # noqa: E402
from kprivacy_nb.widgets.monitor import TrainingMonitor  # noqa: E402


def _ns(ip):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)).astype("float32")
    y = (x[:, 0] > 0).astype("int64")
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(2)])
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ip.user_ns.update(model=model, x_train=x, y_train=y, x_val=x[:50], y_val=y[:50])
    return model


def test_dp_fit_magic_stores_result(ip, capsys):
    model = _ns(ip)
    out = ip.run_line_magic(
        "dp_fit",
        "model x_train y_train --epochs 2 --batch-size 20 --target-epsilon 3 --delta 1e-3 "
        "--validation x_val y_val --seed 1 -o run",
    )
    run = ip.user_ns["run"]
    assert out is run and isinstance(run, DPFitResult)
    assert run.model is model and run.epsilon <= 3 and run.steps == 20
    assert "val_accuracy" in run.history
    printed = capsys.readouterr().out
    assert printed.count("epoch ") == 2  # one log line per epoch outside a notebook


def test_dp_fit_magic_options_and_errors(ip):
    _ns(ip)
    ip.user_ns["opt"] = keras.optimizers.Adam(0.01)
    run = ip.run_line_magic(
        "dp_fit",
        "model x_train y_train --epochs 1 --batch-size 50 --noise-multiplier 1.5 --delta 1e-3 "
        "--optimizer opt --sampling shuffle --accountant rdp --l2-norm-clip 0.5 --quiet "
        "--physical-batch-size 7",
    )
    assert run.sampling == "shuffle" and run.accountant == "rdp" and run.l2_norm_clip == 0.5
    assert privacy_state(run.model).engine.physical_batch_size == 7
    with pytest.raises(UsageError, match="physical_batch_size must be"):
        ip.run_line_magic("dp_fit", "model x_train y_train --epochs 1 --batch-size 5 "
                                    "--noise-multiplier 1 --physical-batch-size 0")  # fmt: skip
    with pytest.raises(UsageError, match="no variable named 'missing'"):
        ip.run_line_magic("dp_fit", "missing x_train y_train --epochs 1 --batch-size 5 "
                                    "--noise-multiplier 1")  # fmt: skip
    with pytest.raises(UsageError, match=r"'y_train\[:90\]' is an expression.*assign it first"):
        ip.run_line_magic("dp_fit", "model x_train y_train[:90] --epochs 1 --batch-size 5 "
                                    "--noise-multiplier 1")  # fmt: skip
    with pytest.raises(UsageError, match="larger than the dataset"):
        ip.run_line_magic("dp_fit", "model x_train y_train --epochs 1 --batch-size 500 "
                                    "--noise-multiplier 1 --quiet")  # fmt: skip
    ip.user_ns["bn"] = keras.Sequential(
        [keras.Input((6,)), keras.layers.BatchNormalization(), keras.layers.Dense(2)]
    )
    with pytest.raises(UsageError, match="GroupNormalization"):
        ip.run_line_magic("dp_fit", "bn x_train y_train --epochs 1 --batch-size 5 "
                                    "--noise-multiplier 1 --loss mse --quiet")  # fmt: skip


def test_dp_fit_magic_has_help(ip):
    doc = ip.find_line_magic("dp_fit").__doc__
    assert "--target-epsilon" in doc and "%dp_fit model x_train y_train" in doc


def test_monitor_updates_one_display_in_place(monkeypatch):
    """One figure updated per epoch, and above it one status line that appears before anything
    slow (σ calibration, the self-check) and follows the epoch step by step."""
    import IPython.display

    from kprivacy_nb.widgets import monitor as monitor_module

    class Handle:
        def __init__(self, first):
            self.seen = [first]

        def update(self, obj, raw=False):
            assert isinstance(obj, type(self.seen[0]))
            self.seen.append(obj)

    shown = []

    def fake_display(obj, display_id=False, raw=False):
        shown.append(Handle(obj))
        return shown[-1]

    monkeypatch.setattr(IPython.display, "display", fake_display)
    monkeypatch.setattr(monitor_module, "STEP_UPDATE_SECONDS", 0.0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int64")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    monitor = TrainingMonitor(notebook=True)
    from kprivacy_nb import dp_fit

    run = dp_fit(model, x, y, epochs=3, batch_size=20, target_epsilon=4.0, delta=1e-3,
                 verbose=0, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                 validation_data=(x, y), callbacks=[monitor])  # fmt: skip
    status, figure = shown  # two displays, then updates in place
    lines = [item["text/plain"] for item in status.seen]
    assert lines[0].startswith("calibrating σ for ε = 4 at δ = 0.001")  # first, before σ
    assert lines[1].startswith(f"σ = {run.noise_multiplier:.4g}; checking per-example clipping")
    spe = run.planned_curve.steps[0]
    assert f"training: epoch 3/3, step {spe}/{spe}" in " ".join(lines)
    assert lines[-1].startswith(f"done: {run.steps} steps in")
    assert all(isinstance(obj, IPython.display.Image) for obj in figure.seen)
    assert len(figure.seen) == 5  # the first frame, 3 epochs, the final frame
    fig = monitor.figure()
    eps_ax, loss_ax, acc_ax = fig.axes
    labels = [line.get_label() for line in eps_ax.get_lines()]
    assert {"planned", "target", "spent"} <= set(labels)
    spent = next(line for line in eps_ax.get_lines() if line.get_label() == "spent")
    assert list(spent.get_xdata()) == [1, 2, 3] and max(spent.get_ydata()) <= 4.0
    assert {line.get_label() for line in acc_ax.get_lines()} == {
        "train (not private)",
        "validation",
    }


def test_monitor_text_mode_prints_one_line_per_epoch():
    out = io.StringIO()
    monitor = TrainingMonitor(notebook=False, stream=out)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4)).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    from kprivacy_nb import dp_fit

    dp_fit(model, x, x[:, :1], epochs=2, batch_size=20, noise_multiplier=1.0, delta=1e-2,
           loss="mse", verbose=0, callbacks=[monitor])  # fmt: skip
    lines = out.getvalue().strip().splitlines()
    assert lines[0].startswith("σ = 1; checking per-example clipping")  # said before it runs
    assert len(lines) == 4 and lines[3].startswith("epoch 2/2")
