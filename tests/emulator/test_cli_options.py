"""The emulator's command-line options for faults, region outages and refreshAfter
placement: their grammar, their errors, their help, and the state they build."""

from __future__ import annotations

from typing import Any

import pytest

from broker.emulator import Fault, Outage, seed
from broker.emulator.__main__ import build_state, main, parser
from broker.emulator.fault_specs import parse_fault, parse_outage

pytestmark = pytest.mark.timeout(15)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mms.token=503", {"status": 503, "kind": "status"}),
        ("mms.token=429:retry-after=5", {"status": 429, "retry_after": 5.0}),
        ("mms.token=503@fraud-aks", {"status": 503, "service": "fraud-aks"}),
        ("mms.token=reset", {"kind": "reset", "status": None}),
        ("mms.token=hang", {"kind": "hang"}),
        ("mms.token=malformed", {"kind": "malformed"}),
        ("mms.token=partial@fraud-aks", {"kind": "partial", "service": "fraud-aks"}),
        ("mms.token=missing_fields", {"kind": "missing_fields"}),
        ("discovery=slow:2.5", {"kind": "slow", "delay_s": 2.5}),
    ],
)
def test_fault_specs_parse(text: str, expected: dict[str, Any]) -> None:
    """Each documented SPEC form becomes the fault it names, lasting until cleared."""
    fault = parse_fault(text)
    assert fault.route == text.partition("=")[0]
    assert fault.times is None
    assert {name: fault.to_json()[name] for name in expected} == expected


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("mms.token", "expected ROUTE=STATUS"),
        ("mms.token=", "expected ROUTE=STATUS"),
        ("mms.token=503@", "expected ROUTE=STATUS"),
        ("nope=503", "unknown route 'nope' (known: entra.openid"),
        ("mms.token=5o3", "unknown SPEC '5o3'"),
        ("mms.token=999", "status must be an HTTP status code"),
        ("mms.token=slow", "unknown SPEC 'slow'"),
        ("mms.token=429:retry-after=soon", "unknown SPEC"),
    ],
)
def test_bad_fault_is_a_one_line_usage_error(
    capsys: pytest.CaptureFixture[str], text: str, complaint: str
) -> None:
    """A bad --fault exits 2 with one error line naming the option and what is accepted."""
    with pytest.raises(SystemExit) as exited:
        parser("emu").parse_args(["--fault", text])
    assert exited.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("emu: error: argument --fault: ")
    assert complaint in error
    assert error.endswith("optionally @SERVICE at the end (e.g. mms.token=503@fraud-aks)")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("eastus", Outage("eastus")),
        ("eastus=hang", Outage("eastus", kind="hang")),
        ("eastus=malformed", Outage("eastus", kind="malformed")),
        ("eastus=502", Outage("eastus", kind="status", status=502)),
    ],
)
def test_region_down_specs_parse(text: str, expected: Outage) -> None:
    """--region-down takes a region and, optionally, how it fails."""
    assert parse_outage(text) == expected


@pytest.mark.parametrize("text", ["", "eastus=", "eastus=partial", "eastus=42", "=hang"])
def test_bad_region_down_is_a_usage_error(capsys: pytest.CaptureFixture[str], text: str) -> None:
    """A bad --region-down exits 2 naming the option and the accepted forms."""
    with pytest.raises(SystemExit):
        parser("emu").parse_args(["--region-down", text])
    error = capsys.readouterr().err.splitlines()[-1]
    assert "argument --region-down" in error
    assert "is not a region outage" in error
    assert "REGION=HOW with HOW one of reset, hang, malformed or a status" in error


def test_options_build_the_state() -> None:
    """Faults, outages and the placement given on the command line are in the served state."""
    args = parser("emu").parse_args(
        [
            "--fault",
            "mms.token=503@fraud-aks",
            "--fault",
            "discovery=reset",
            "--region-down",
            "westus=hang",
            "--refresh-after-placement",
            "absent",
        ]
    )
    state = build_state(args)
    assert [fault.route for fault in state.faults.active()] == ["mms.token", "discovery"]
    assert state.faults.outages() == [Outage("westus", kind="hang")]
    ws = (seed.SUBSCRIPTION_ID, seed.RESOURCE_GROUP, seed.WORKSPACE)
    service = state.web_service(*ws, seed.TOKEN_SERVICE)
    assert service is not None and service.refresh_placement == "absent"


def test_defaults_arm_nothing() -> None:
    """Without the new options the demo cloud has no faults and normal placement."""
    args = parser("emu").parse_args([])
    assert (args.fault, args.region_down, args.refresh_after_placement) == ([], [], "normal")
    assert build_state(args).faults.active() == []


def test_help_documents_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    """--help names the new options and every SPEC form."""
    with pytest.raises(SystemExit) as exited:
        main(["--help"], prog="token-broker emulator")
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for needle in (
        "usage: token-broker emulator",
        "--fault ROUTE=SPEC[@SERVICE]",
        "--region-down REGION[=HOW]",
        "--refresh-after-placement {normal,past,after_expiry,absent}",
        "STATUS:retry-after=SECS",
        "missing_fields",
        "slow:SECS",
        "mms.regenerate",
    ):
        assert needle in out


def test_bad_placement_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """--refresh-after-placement accepts the four placements only."""
    with pytest.raises(SystemExit):
        parser("emu").parse_args(["--refresh-after-placement", "later"])
    assert "invalid choice: 'later'" in capsys.readouterr().err


def test_parsed_faults_are_ordinary_faults() -> None:
    """A parsed fault equals the one EmulatorState.fail would arm."""
    assert parse_fault("mms.token=429:retry-after=5@fraud-aks") == Fault(
        "mms.token", status=429, service="fraud-aks", retry_after=5.0
    )
