"""What in a short piece of text looks like patient identity: the screen for label values and scan ids.

The screen is deliberately coarse. It refuses text that *looks like* one of these, and says which, never echoing
the text back (an error message travels further than the value did):

``person name``
    DICOM PN style ``DOE^JANE``; two capitalised or upper-case words in a row (``Jane Doe``, ``DOE JANE``,
    ``Doe, Jane``); words that introduce an identifier (``dob``, ``born``, ``mrn``, ``nhs``, ``ssn``, ``patient``,
    ``name``).
``date``
    ``1970-01-01``, ``1970/01/01``, ``01/02/1970``, ``1.2.70``, ``1 Jan 1970``, ``Jan 1, 1970``,
    ``19700101`` (also caught as a digit run).
``ID number``
    six or more digits, also when split by spaces, dots, dashes or slashes (MRNs, NHS numbers ``943 476 5919``,
    SSNs ``123-45-6789``, phone numbers ``+44 20 7946 0958``).
``e-mail address``, ``postcode``
    ``a@b.org``; UK postcodes (``SW1A 1AA``) and five-digit codes (US ZIP, German PLZ).

What it cannot catch: a lower-case single word that happens to be a name (``smith``), or a name in a language
whose names do not follow these shapes. That is why labels are also limited to an allow-list of keys, and scan
ids are never taken from file names.
"""

from __future__ import annotations

import re

__all__ = ["identity_kind"]

_MONTHS = r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*"
_WORDS = re.compile(
    r"(?<![a-z])(dob|d\.o\.b|born|birth|mrn|nhs|ssn|patient|pat|forename|surname|firstname|lastname|name)(?![a-z])",
    re.IGNORECASE,
)

# Order matters only for the word reported: more specific shapes first.
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("e-mail address", re.compile(r"[^\s@]+@[^\s@]+\.[A-Za-z]{2,}")),
    ("person name", re.compile(r"[A-Za-z]\s*\^\s*[A-Za-z]")),  # DICOM PN: FAMILY^GIVEN
    (
        "date",
        re.compile(
            r"(?<!\d)(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])(?!\d)"
            r"|(?<!\d)(?:\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.](?:\d{4}|\d{2}))(?!\d)"
            rf"|(?<!\d)\d{{1,2}}(?:st|nd|rd|th)?[\s-]+{_MONTHS}[\s,-]+\d{{2,4}}(?!\d)"
            rf"|(?<![a-z]){_MONTHS}[\s.-]+\d{{1,2}}(?:st|nd|rd|th)?,?[\s-]+\d{{2,4}}(?!\d)",
            re.IGNORECASE,
        ),
    ),
    ("ID number", re.compile(r"\d(?:[\s./()-]{0,2}\d){5,}")),
    ("postcode", re.compile(r"(?<![A-Za-z0-9])[A-Z]{1,2}\d[A-Z\d]?\s*\d[A-Z]{2}(?![A-Za-z0-9])", re.IGNORECASE)),
    ("postcode", re.compile(r"(?<![\d.])\d{5}(?![\d.])")),
    # Two capitalised (Jane Doe) or upper-case (DOE JANE) words, also "Doe, Jane": names by shape.
    ("person name", re.compile(r"(?<![A-Za-z])[A-Z][A-Za-z'-]*[a-zA-Z],?\s+[A-Z][A-Za-z'-]*[a-zA-Z](?![A-Za-z])")),
    ("person name", _WORDS),
)


def identity_kind(text: str) -> str | None:
    """The kind of identifier ``text`` looks like (``"date"``, ``"person name"``, …), or ``None``.

    Examples
    --------
    >>> identity_kind("DOE^JANE dob 1970-01-01")
    'person name'
    >>> identity_kind("scanned 01/02/1970")
    'date'
    >>> identity_kind("abdomen") is None
    True
    """
    for kind, pattern in _PATTERNS:
        if pattern.search(text):
            return kind
    return None
