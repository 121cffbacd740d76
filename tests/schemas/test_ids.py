from __future__ import annotations

import pytest
from pydantic import ValidationError

from schemas.ids import IdKind, check_chosen_scan_id, validate_id
from schemas.refs import ScanRef


@pytest.mark.parametrize("value", ["site-a", "A", "ct-001", "a.b_c-1", "0", "x" * 64, "scan-bcdfghjklmnpqrst"])
def test_safe_ids_pass_unchanged(value):
    assert validate_id(IdKind.SITE, value) == value


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("../../escaped", "path separator"),
        ("a/b", "path separator"),
        ("a\\b", "path separator"),
        ("/etc", "path separator"),
        ("a\x00b", "control character"),
        ("abc\n", "control character"),  # '$' in a regex would let this through
        (".hidden", "starts with '.'"),
        ("..", "starts with '.'"),
        ("a..b", "contains '..'"),
        ("site.", "ends with '.'"),
        ("", "is empty"),
        ("x" * 65, "longer than 64"),
        ("a b", "character other than"),
        ("s3:x", "character other than"),
        ("a%2fb", "character other than"),
        ("é", "character other than"),
        ("-a", "character other than"),
        (7, "not a string"),
    ],
)
def test_unsafe_ids_are_refused_naming_the_rule_not_the_value(value, reason):
    with pytest.raises(ValueError, match=reason) as info:
        validate_id("site", value)
    message = str(info.value)
    assert message.startswith("site id is not a safe id")
    if isinstance(value, str) and len(value) > 2:
        assert value not in message


def test_the_error_class_is_the_callers():
    class Mine(ValueError):
        pass

    with pytest.raises(Mine, match="^run id"):
        validate_id(IdKind.RUN, "../r", error=Mine)


def test_schema_fields_use_the_same_check():
    with pytest.raises(ValidationError, match="site id is not a safe id"):
        ScanRef(store_uri="x", site_id="../../escaped", scan_id="s")
    with pytest.raises(ValidationError, match="scan id is not a safe id"):
        ScanRef(store_uri="x", site_id="a", scan_id="a/b")
    assert ScanRef(store_uri="x", site_id="A", scan_id="ct-1").site_id == "A"


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("DOE_JANE_19700101_MRN123456", "date"),
        ("DOE_JANE", "person name"),
        ("Jane-Doe", "person name"),
        ("doe-jane-dob", "person name"),
        ("ct-19700101", "date"),
        ("ct-1970-01-01", "date"),
        ("mrn-123456", "ID number"),
        ("scan-12345", "postcode"),
    ],
)
def test_chosen_scan_ids_that_look_like_identity_are_refused(value, kind):
    with pytest.raises(ValueError, match=f"looks like identity \\({kind}\\)") as info:
        check_chosen_scan_id(value)
    assert value not in str(info.value)


@pytest.mark.parametrize("value", ["ct-001", "fan-1", "A-scan001", "A-0001", "other-scan", "lung.2"])
def test_ordinary_chosen_scan_ids_pass(value):
    assert check_chosen_scan_id(value) == value
