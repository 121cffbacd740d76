"""Ids that become path components and URL segments (site, scan and run ids), checked by one function.

Rule (:func:`validate_id`): 1 to 64 characters of ``A-Z a-z 0-9 . _ -``, starting with a letter or digit, with
no ``..`` and no trailing ``.``. So an id can never hold a path separator (``/``, ``\\``), a NUL or other control
character, a drive letter, a URL's ``:``/``?``/``#``/``%`` or whitespace, and never names ``.``/``..`` or a
hidden file. Upper case is allowed (existing stores use site ids ``A``, ``B``); ids that differ only in case
would share a folder on a case-insensitive file system, so sites should keep to one case.

Every id is checked before the first path or URL is formed from it: the pydantic types :data:`SiteId`,
:data:`ScanId`, :data:`RunId` for schema fields, :func:`validate_id` in code.

Scan ids a site chooses itself must in addition not look like identity (:func:`check_chosen_scan_id`);
ids fedscan assigns are made of consonants only (no digits, no words) and pass it by construction.
"""

from __future__ import annotations

import re
from enum import StrEnum
from functools import partial
from typing import Annotated

from pydantic import AfterValidator, Field

from schemas.identity import identity_kind

__all__ = [
    "ID_PATTERN",
    "MAX_ID_LENGTH",
    "IdKind",
    "RunId",
    "ScanId",
    "SiteId",
    "check_chosen_scan_id",
    "validate_id",
]

MAX_ID_LENGTH = 64
#: The pattern every id matches in full (plus: no ``..``, no trailing ``.``).
ID_PATTERN = rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_ID_LENGTH - 1}}}"
_ID = re.compile(ID_PATTERN)
_RULE = f"1-{MAX_ID_LENGTH} of A-Z a-z 0-9 . _ -, starting with a letter or digit, no '..', no trailing '.'"


class IdKind(StrEnum):
    """What an id names."""

    SITE = "site"
    SCAN = "scan"
    RUN = "run"


def _problem(value: object) -> str | None:
    if not isinstance(value, str):
        return f"is a {type(value).__name__}, not a string"
    if not value:
        return "is empty"
    if len(value) > MAX_ID_LENGTH:
        return f"is longer than {MAX_ID_LENGTH} characters"
    if "/" in value or "\\" in value:
        return "contains a path separator"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return "contains a control character"
    if value.startswith("."):
        return "starts with '.'"
    if ".." in value:
        return "contains '..'"
    if value.endswith("."):
        return "ends with '.'"
    if not _ID.fullmatch(value):
        return "contains a character other than A-Z a-z 0-9 . _ - or starts with one of . _ -"
    return None


def validate_id(kind: IdKind | str, value: object, *, error: type[Exception] = ValueError) -> str:
    """``value`` when it is safe as a path component and URL segment, else ``error`` (never echoing the value).

    Parameters
    ----------
    kind : IdKind or str
        What the id names, for the message.
    value : object
        The candidate id.
    error : type of Exception, keyword-only
        The class raised (callers in ``tasks``/``flows`` pass ``InvalidInputError``).

    Raises
    ------
    error
        Naming the kind of id and the rule it breaks, e.g. "site id contains a path separator".

    Examples
    --------
    >>> validate_id("site", "site-a")
    'site-a'
    >>> validate_id("site", "../../escaped")
    Traceback (most recent call last):
    ...
    ValueError: site id is not a safe id: it contains a path separator (need 1-64 of A-Z a-z 0-9 . _ -, ...)
    """
    kind = IdKind(kind)
    problem = _problem(value)
    if problem is not None:
        raise error(f"{kind.value} id is not a safe id: it {problem} (need {_RULE}; pattern {ID_PATTERN})")
    assert isinstance(value, str)
    return value


def check_chosen_scan_id(value: str, *, error: type[Exception] = ValueError) -> str:
    """A scan id chosen by a site (sidecar, ``--scan-id``): safe (:func:`validate_id`) and not identity-like.

    Refused: anything :func:`~schemas.identity.identity_kind` flags, as written or with ``-``, ``_``, ``.`` as spaces
    (``DOE_JANE``, ``Jane-Doe``, ``ct-19700101``, ``mrn-123456``, ``scan-12345``); so a chosen id holds at most
    four digits in a row and no date.
    """
    validate_id(IdKind.SCAN, value, error=error)
    kind = identity_kind(value) or identity_kind(re.sub(r"[-_.]", " ", value))
    if kind is not None:
        raise error(f"scan id looks like identity ({kind}); leave it out and fedscan assigns a keyed one")
    return value


SiteId = Annotated[str, AfterValidator(partial(validate_id, IdKind.SITE)), Field(description=f"Site id: {_RULE}.")]
ScanId = Annotated[str, AfterValidator(partial(validate_id, IdKind.SCAN)), Field(description=f"Scan id: {_RULE}.")]
RunId = Annotated[str, AfterValidator(partial(validate_id, IdKind.RUN)), Field(description=f"Run id: {_RULE}.")]
