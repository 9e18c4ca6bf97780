"""The control file the simulator hands a peer (`--control PATH`): a small JSON object it rewrites atomically.

    {"hold": true}              the start barrier: the peer has joined (it serves and fetches) but does not
                                train until the simulator sets hold to false (every initial peer has joined)
    {"cut_off_until": 1.7e9}    a partition: no fetching or serving until that unix time

The barrier used to stop the peer's process with a signal; a process stopped while it held one of hivemind's
cross-process locks froze its DHT process too, and newcomers could not join through it.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def read_control(path: Path) -> dict[str, Any]:
    """The control file's object; {} when it is missing or unreadable (logged)."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        log.warning("ignoring unreadable control file %s: %s", path, err)
        return {}
    if not isinstance(value, dict):
        log.warning("ignoring control file %s: not a JSON object", path)
        return {}
    return value


def write_control(path: Path, **fields: Any) -> None:
    """Update the control file with `fields` (atomically: a peer never reads half of it)."""
    value = {**read_control(path), **fields}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)


def wait_while_held(path: Path | None, stop: threading.Event, poll_s: float = 0.05) -> bool:
    """Block while the control file says hold; False if `stop` was set meanwhile."""
    if path is None:
        return not stop.is_set()
    held = False
    while read_control(path).get("hold") is True:
        if not held:
            log.info("holding at the start barrier until every peer has joined")
            held = True
        if stop.wait(poll_s):
            return False
    return not stop.is_set()
