"""ServeConfig's checks of its options, and the serve command's precision names."""
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastner.serve.config import ServeConfig  # noqa: E402


# tiny models: see conftest.one_thread
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("options, message", [
    ({"max_batch_tokens": 0}, "max-batch-tokens"),
    ({"max_wait_ms": -1}, "max-wait-ms"),
    ({"max_wait_ms": float("nan")}, "max-wait-ms"),
    ({"max_wait_ms": 1e9}, "max-wait-ms"),
    ({"body_timeout_s": 0}, "body-timeout-s"),
    ({"body_timeout_s": float("inf")}, "body-timeout-s"),
    ({"header_timeout_s": 0}, "header-timeout-s"),
    ({"header_timeout_s": 601}, r"header-timeout-s must be in \(0, 600\]"),
    ({"max_queue": 0}, "max-queue"),
    ({"max_document_tokens": 5000}, "must not exceed"),
    ({"max_request_tokens": 0}, "max-request-tokens"),
    ({"max_document_tokens": 100, "max_request_tokens": 50}, "must not exceed max-request-tokens"),
    ({"precision": "int4"}, "precision"),
])
def test_config_checks(options, message):
    with pytest.raises(ValueError, match=message):
        ServeConfig(**options)


def test_serve_takes_the_precision_names_of_the_other_commands():
    # It was: serve took float32/float64/int8/bf16 while tag, evaluate and export take
    # fp32/int8/bf16, so `fastner serve MODEL --precision fp32` was refused.
    from fastner.cli import build_parser
    from fastner.tagger import PRECISIONS as TAGGER_PRECISIONS

    parser = build_parser()
    for name in TAGGER_PRECISIONS:
        assert parser.parse_args(["serve", "model", "--precision", name]).precision == name
        assert parser.parse_args(["tag", "model", "--precision", name]).precision == name
    assert parser.parse_args(["serve", "model"]).precision == "fp32" == ServeConfig().precision
    # the name this option had before, still read
    assert parser.parse_args(["serve", "model", "--precision", "float32"]).precision == "fp32"
    assert ServeConfig(precision="float32").precision == "fp32"
    assert parser.parse_args(["serve", "model", "--precision", "float64"]).precision == "float64"
