"""Shared fixtures: an isolated kprivacy_nb home, and an IPython shell with the extension."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def kp_home(tmp_path_factory, monkeypatch):
    """Every test gets its own KPRIVACY_NB_HOME so nothing touches the real config dir."""
    home = tmp_path_factory.mktemp("kphome")
    monkeypatch.setenv("KPRIVACY_NB_HOME", str(home))
    return home


@pytest.fixture(autouse=True)
def forget_secrets():
    """Secrets one test registers (they are masked in all later output, by design, for the
    session) must not mask another test's words: each test starts with an empty registry."""
    yield
    from kprivacy_nb.secrets import REGISTRY

    REGISTRY.forget_all()


@pytest.fixture
def ip():
    """The global test IPython shell with kprivacy_nb loaded (unloaded afterwards)."""
    from IPython.testing.globalipapp import get_ipython

    shell = get_ipython()
    shell.run_line_magic("load_ext", "kprivacy_nb")
    yield shell
    shell.run_line_magic("unload_ext", "kprivacy_nb")
