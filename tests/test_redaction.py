"""Credentials in a tracking URI never reach a log line, an error, a param or config.yaml."""

from __future__ import annotations

import logging

import pytest
from omegaconf import OmegaConf

from rpg.tracking.tracker import MLflowTracker
from rpg.tracking.base import TrackingError, flatten_params, redact
from rpg.train.loop import loggable_config

URI = "http://alice:s3cret@127.0.0.1:9"


@pytest.mark.parametrize("text,expected", [
    (URI, "http://alice:***@127.0.0.1:9"),
    ("https://u:p%40ss@host/path?q=1", "https://u:***@host/path?q=1"),
    (f"API request to {URI}/api/2.0/x failed", "API request to http://alice:***@127.0.0.1:9/api/2.0/x failed"),
    ("http://alice@host:5000", "http://alice@host:5000"),  # no password: unchanged
    ("sqlite:////tmp/a@b/mlflow.db", "sqlite:////tmp/a@b/mlflow.db"),
    (None, None),
])
def test_redact(text, expected):
    assert redact(text) == expected


def test_unreachable_store_error_names_the_store_without_its_password(caplog):
    with caplog.at_level(logging.DEBUG), pytest.raises(TrackingError) as err:  # refused when opened
        MLflowTracker(URI, start_timeout_s=0.5).start("exp", "run", {}, {})
    assert "alice:***@127.0.0.1:9" in str(err.value) and "s3cret" not in str(err.value)
    # no chained error that would quote the URI
    assert err.value.__cause__ is None and (err.value.__suppress_context__ or err.value.__context__ is None)
    assert "s3cret" not in caplog.text


def test_params_and_config_yaml_carry_no_password(make_cfg):
    cfg = make_cfg(f"tracking.uri={URI}")
    resolved = loggable_config(cfg)
    assert resolved["tracking"]["uri"] == "http://alice:***@127.0.0.1:9"
    assert "s3cret" not in str(flatten_params(resolved)) and "s3cret" not in OmegaConf.to_yaml(resolved)
    assert cfg.tracking.uri == URI  # the run itself still connects with it


def test_tracker_log_lines_never_show_a_password(caplog):
    log = logging.getLogger("rpg.tracking.tracker")
    with caplog.at_level(logging.WARNING, logger="rpg.tracking.tracker"):
        log.warning("tracking store %s unreachable (%s)", URI, f"API request to {URI}/api failed")
    assert "alice:***@127.0.0.1:9" in caplog.text and "s3cret" not in caplog.text
