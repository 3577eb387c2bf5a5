"""The suite refuses to run without the parity references rather than skipping them."""

import importlib.util

import conftest
import pytest


@pytest.fixture
def no_torch(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real(name, *a))


def test_a_missing_reference_stops_the_run(no_torch, monkeypatch):
    monkeypatch.delenv(conftest.SKIP_REFERENCES_ENV, raising=False)
    assert conftest.missing_references() == ["torch"]
    with pytest.raises(pytest.UsageError, match=r"not installed: torch\. .*torch==2\.13\.0"):
        conftest.pytest_configure(None)


def test_the_opt_out_is_refused_under_ci(no_torch, monkeypatch):
    monkeypatch.setenv(conftest.SKIP_REFERENCES_ENV, "1")
    monkeypatch.setenv("CI", "false")
    conftest.pytest_configure(None)  # allowed outside CI
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.UsageError, match="not honoured under CI=true"):
        conftest.pytest_configure(None)

