"""Issue 14, item 10 (the shell, client and protocol ones): JSON logs carry tracebacks, errors
quote bad values clipped, sysfs numbers are plain ASCII decimal as kstrtoul reads them."""

from __future__ import annotations

import io
import json

import pytest
import structlog

from shared.clip import MAX_QUOTE_CHARS, clip, quote
from shared.knobs import KnobError, Knobs
from shared.logs import configure
from shared.protocol import messages as m
from shared.protocol.codec import ProtocolError, from_wire


@pytest.fixture
def restore_logging():
    yield
    configure()


def test_json_logs_carry_the_formatted_traceback(restore_logging):
    out = io.StringIO()
    configure("info", json=True, stream=out)
    log = structlog.get_logger("test")
    try:
        raise RuntimeError("boom in the model")
    except RuntimeError:
        log.exception("model_error", call="Collapser.deliver")
    (line,) = out.getvalue().splitlines()
    event = json.loads(line)
    assert event["event"] == "model_error" and "exc_info" not in event
    assert event["exception"].startswith("Traceback (most recent call last):")
    assert "RuntimeError: boom in the model" in event["exception"]


def test_console_logs_keep_their_traceback_too(restore_logging):
    out = io.StringIO()
    configure("info", json=False, stream=out)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        structlog.get_logger("test").exception("model_error")
    assert "RuntimeError: boom" in out.getvalue()


def test_clip_and_quote_bound_what_they_echo():
    huge = "x" * (1 << 20)
    assert clip("short") == "short" and quote("short") == "'short'"
    assert len(clip(huge)) == MAX_QUOTE_CHARS and clip(huge).endswith("...")
    assert len(quote(huge)) == MAX_QUOTE_CHARS and quote(huge).startswith("'xxx")
    assert quote(b"\x00" * 10_000).endswith("...")


@pytest.mark.parametrize(
    "text",
    ["1_0", "١٠", "１０", "0x10", "10.0", "1e3", "-1", "", "+", " 1 0", "²"],
)
def test_sysfs_numbers_are_plain_ascii_decimal(text):
    with pytest.raises(KnobError) as info:
        Knobs().validate("khugepaged/pages_to_scan", text)
    assert info.value.errno_name == "EINVAL"


@pytest.mark.parametrize(("text", "value"), [("10", 10), ("+10", 10), ("0010", 10), ("10\n", 10), (" 7 ", 7)])
def test_sysfs_numbers_kstrtoul_takes(text, value):
    assert Knobs().validate("khugepaged/pages_to_scan", text) == value


def test_a_huge_knob_value_or_name_is_not_echoed_whole():
    for text in ("9" * (1 << 20), "z" * (1 << 20)):
        with pytest.raises(KnobError) as info:
            Knobs().validate("khugepaged/pages_to_scan", text)
        assert info.value.errno_name == "EINVAL" and len(str(info.value)) < 200
    with pytest.raises(KnobError) as info:
        Knobs().validate("enabled", "y" * (1 << 20))
    assert len(str(info.value)) < 250
    with pytest.raises(KnobError) as info:
        Knobs().validate("n" * (1 << 20), "1")
    assert info.value.errno_name == "ENOENT" and len(str(info.value)) < 150


def test_codec_errors_quote_a_bad_value_clipped():
    with pytest.raises(ProtocolError) as info:
        from_wire(["client.file_create", {"id": 1, "name": "n", "size": 1, "nope" * 300_000: 1}])
    assert len(str(info.value)) < 150
    with pytest.raises(ProtocolError) as info:
        from_wire(["t" * (1 << 20), {}])
    assert len(str(info.value)) < 150
    with pytest.raises(ProtocolError) as info:
        from_wire(["client.madvise", {"id": 1, "pid": 1, "addr": 0, "length": 1, "advice": "a" * (1 << 20)}])
    assert len(str(info.value)) < 200 and str(info.value).startswith("client.madvise: field 'advice'")
    assert m.Madvise  # the request exists
