from __future__ import annotations

import pytest
from pydantic import ValidationError

from schemas.identity import identity_kind
from schemas.ingest import IngestSidecar
from schemas.manifest import DEFAULT_LABEL_KEYS, check_labels

# Realistic identifiers as they turn up in scanner exports and spreadsheets.
IDENTIFIERS = [
    ("DOE^JANE", "person name"),
    ("DOE^JANE dob 1970-01-01", "person name"),
    ("Jane Doe", "person name"),
    ("DOE JANE", "person name"),
    ("Doe, Jane", "person name"),
    ("born 1970", "person name"),
    ("19700101", "date"),
    ("1970-01-01", "date"),
    ("1970/01/01", "date"),
    ("01/02/1970", "date"),
    ("1.2.70", "date"),
    ("1 Jan 1970", "date"),
    ("January 1, 1970", "date"),
    ("123456", "ID number"),
    ("MRN123456", "ID number"),
    ("943 476 5919", "ID number"),  # NHS number
    ("123-45-6789", "ID number"),  # SSN
    ("+44 20 7946 0958", "ID number"),  # phone
    ("(555) 010-4477", "ID number"),
    ("jane.doe@example.org", "e-mail address"),
    ("SW1A 1AA", "postcode"),
    ("EH8 9YL", "postcode"),
    ("90210", "postcode"),
]
NORMAL_VALUES = [
    "abdomen",
    "chest",
    "low-dose chest",
    "Chest routine",
    "head ct",
    "nodule",
    "train",
    "val",
    "portal-venous",
    "B30f",
    "0.5",
    "120",
    "2 lesions",
    "Siemens",
    "FBP",
]


@pytest.mark.parametrize(("text", "kind"), IDENTIFIERS)
def test_identifiers_are_recognised(text, kind):
    assert identity_kind(text) == kind


@pytest.mark.parametrize("text", NORMAL_VALUES)
def test_normal_label_values_are_not(text):
    assert identity_kind(text) is None


@pytest.mark.parametrize(
    "key", ["pat_id", "PID", "subject_id", "nhs_number", "email", "SocialSecurityNumber", "postcode", "PatientName"]
)
def test_identifying_label_keys_are_refused_even_when_allowed(key):
    with pytest.raises(ValueError, match="must not identify a patient"):
        check_labels({key: "x"}, allowed_keys=frozenset({key}))


@pytest.mark.parametrize(("text", "kind"), IDENTIFIERS)
def test_identifying_values_are_refused_without_echoing_them(text, kind):
    with pytest.raises(ValueError, match=f"label value of key 'protocol' looks like identity \\({kind}\\)") as info:
        check_labels({"protocol": text})
    for part in ("DOE", "JANE", "Jane", "1970", "123456", "5919", "example", "SW1A"):
        if part in text:
            assert part not in str(info.value)


def test_long_digit_integers_and_free_text_are_refused():
    with pytest.raises(ValueError, match="six or more digits"):
        check_labels({"lesion": 1234567})
    with pytest.raises(ValueError, match="longer than 64"):
        check_labels({"protocol": "a" * 65})
    check_labels({"kvp": 120, "exposure_mas": 250.5, "contrast": True, "n_lesions": 99_999})


def test_allow_list_refuses_unknown_keys_and_passes_normal_labels():
    normal = {"protocol": "abdomen", "body_part": "chest", "kvp": 120, "contrast": False, "lesion": "nodule"}
    normal |= {"split": "train"}
    check_labels(normal, allowed_keys=DEFAULT_LABEL_KEYS)
    with pytest.raises(ValueError, match=r"label keys \['ward'\] are not in the site's allow-list"):
        check_labels({**normal, "ward": "b"}, allowed_keys=DEFAULT_LABEL_KEYS)


def test_sidecar_labels_are_screened_at_parse_time():
    with pytest.raises(ValidationError, match="looks like identity") as info:
        IngestSidecar(labels={"protocol": "DOE^JANE dob 1970-01-01"})
    assert IngestSidecar(labels={"protocol": "abdomen"}).labels == {"protocol": "abdomen"}
    errors = info.value.errors(include_input=False)
    assert all("DOE" not in str(e["msg"]) for e in errors)
