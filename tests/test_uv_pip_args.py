"""scripts/uv_pip_args.py: uv is pointed at the indexes pip is configured for."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "uv_pip_args.py"
spec = importlib.util.spec_from_file_location("uv_pip_args", SCRIPT)
uv_pip_args = importlib.util.module_from_spec(spec)
spec.loader.exec_module(uv_pip_args)

LISTING = """\
:env:.cert='/etc/ssl/certs/ca-certificates.crt'
:env:.find-links='/opt/wheels'
global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'
global.find-links='/opt/wheels'
global.timeout='60'
"""


def test_pip_configuration_becomes_uv_options():
    cfg = uv_pip_args.parse_pip_config(LISTING, {})
    assert cfg == {"find-links": ["/opt/wheels"], "extra-index-url": ["file:///opt/pypi/simple", "file:///opt/pypi-more/simple"]}
    args = uv_pip_args.uv_args(cfg)
    assert args[:6] == [
        "--extra-index-url",
        "file:///opt/pypi/simple",
        "--extra-index-url",
        "file:///opt/pypi-more/simple",
        "--find-links",
        "/opt/wheels",
    ]
    assert args[-3:] == ["--index-strategy", "unsafe-best-match", "--native-tls"]


def test_environment_wins_and_index_url_is_kept():
    env = {"PIP_INDEX_URL": "https://mirror.example/simple", "PIP_FIND_LINKS": "/a /b"}
    cfg = uv_pip_args.parse_pip_config(LISTING, env)
    assert cfg["find-links"] == ["/a", "/b"] and cfg["index-url"] == ["https://mirror.example/simple"]
    assert uv_pip_args.uv_args(cfg)[:2] == ["--index-url", "https://mirror.example/simple"]


def test_no_configuration_means_uv_defaults():
    assert uv_pip_args.uv_args(uv_pip_args.parse_pip_config("", {})) == ["--index-strategy", "unsafe-best-match", "--native-tls"]
