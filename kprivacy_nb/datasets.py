"""Real data that ships inside the package (no downloads): the NSL-KDD intrusion records.

>>> from kprivacy_nb.datasets import load_nsl_kdd
>>> data = load_nsl_kdd()
>>> data.x_train.shape[1] == len(data.feature_names)
True

Provenance: ``kprivacy_nb/data/NSL-KDD-README.md`` (Canadian Institute for Cybersecurity, UNB).
"""

from __future__ import annotations

import csv
import gzip
from dataclasses import dataclass
from importlib import resources

import numpy as np

COLUMNS = (
    "duration protocol_type service flag src_bytes dst_bytes land wrong_fragment urgent hot "
    "num_failed_logins logged_in num_compromised root_shell su_attempted num_root "
    "num_file_creations num_shells num_access_files num_outbound_cmds is_host_login "
    "is_guest_login count srv_count serror_rate srv_serror_rate rerror_rate srv_rerror_rate "
    "same_srv_rate diff_srv_rate srv_diff_host_rate dst_host_count dst_host_srv_count "
    "dst_host_same_srv_rate dst_host_diff_srv_rate dst_host_same_src_port_rate "
    "dst_host_srv_diff_host_rate dst_host_serror_rate dst_host_srv_serror_rate "
    "dst_host_rerror_rate dst_host_srv_rerror_rate"
).split()
CATEGORICAL = ("protocol_type", "service", "flag")
# Counts and byte sizes span many orders of magnitude: log1p before standardising.
HEAVY_TAILED = (
    "duration",
    "src_bytes",
    "dst_bytes",
    "count",
    "srv_count",
    "hot",
    "num_compromised",
    "num_root",
    "num_file_creations",
    "num_access_files",
    "dst_host_count",
    "dst_host_srv_count",
)
FILES = {"train": "KDDTrain+_20Percent.txt.gz", "test": "KDDTest+.txt.gz"}


@dataclass
class NSLKDD:
    """Preprocessed NSL-KDD: float32 features, labels 1 = attack, 0 = normal."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    feature_names: list[str]
    attack_train: list[str]
    attack_test: list[str]


def read_raw(split: str = "train") -> list[list[str]]:
    """The rows of one split as strings (41 features, class, difficulty)."""
    if split not in FILES:
        raise ValueError(f"split must be one of {sorted(FILES)}, not {split!r}")
    ref = resources.files("kprivacy_nb") / "data" / FILES[split]
    with ref.open("rb") as raw, gzip.open(raw, "rt", newline="") as text:
        return [row for row in csv.reader(text) if row]


def load_nsl_kdd(limit: int | None = None) -> NSLKDD:
    """Load both splits, one-hot encode the categorical columns and standardise the rest.

    The vocabulary and the scaling come from the training split only (test values it never saw
    encode as all-zero). ``limit`` keeps the first rows of each split (for quick runs).
    """
    train, test = read_raw("train"), read_raw("test")
    if limit is not None:
        train, test = train[:limit], test[:limit]
    cat_idx = [COLUMNS.index(c) for c in CATEGORICAL]
    num_idx = [i for i, c in enumerate(COLUMNS) if c not in CATEGORICAL]
    vocab = {i: sorted({row[i] for row in train}) for i in cat_idx}
    names = [COLUMNS[i] for i in num_idx]
    for i in cat_idx:
        names += [f"{COLUMNS[i]}={v}" for v in vocab[i]]
    heavy = np.array([COLUMNS[i] in HEAVY_TAILED for i in num_idx])

    def encode(rows: list[list[str]]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        nums = np.array([[float(row[i]) for i in num_idx] for row in rows], dtype=np.float64)
        nums[:, heavy] = np.log1p(np.maximum(nums[:, heavy], 0.0))
        parts = [nums]
        for i in cat_idx:
            index = {v: k for k, v in enumerate(vocab[i])}
            onehot = np.zeros((len(rows), len(vocab[i])))
            for r, row in enumerate(rows):
                k = index.get(row[i])
                if k is not None:
                    onehot[r, k] = 1.0
            parts.append(onehot)
        labels = np.array([row[41] != "normal" for row in rows], dtype=np.int32)
        return np.concatenate(parts, axis=1), labels, [row[41] for row in rows]

    x_train, y_train, a_train = encode(train)
    x_test, y_test, a_test = encode(test)
    n_num = len(num_idx)
    mean = x_train[:, :n_num].mean(axis=0)
    std = x_train[:, :n_num].std(axis=0)
    std[std == 0] = 1.0
    x_train[:, :n_num] = (x_train[:, :n_num] - mean) / std
    x_test[:, :n_num] = np.clip((x_test[:, :n_num] - mean) / std, -10, 10)
    return NSLKDD(
        x_train.astype(np.float32),
        y_train,
        x_test.astype(np.float32),
        y_test,
        names,
        a_train,
        a_test,
    )
