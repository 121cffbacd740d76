"""A flow that only waits: the run that tests/integration/test_readme_recipe.py kills with its worker."""

from __future__ import annotations

import time

from prefect import flow


@flow(name="sleep-for")
def sleep_for(seconds: float = 600.0) -> None:
    """Sleep, so that the run is Running when its worker is killed."""
    time.sleep(seconds)
