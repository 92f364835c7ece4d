"""Progress bars of long work (training epochs, the demo backbone's pretraining)."""

from __future__ import annotations

import sys

from tqdm import tqdm

# Written to a log file or a pipe, a bar redrawn ten times a second is megabytes of lines:
# there it redraws every half minute.
LOG_INTERVAL_S = 30.0


def progress_bar(total: int, desc: str, unit: str, show: bool) -> tqdm:
    """A transient bar on stderr; sparse updates when stderr is not a terminal."""
    interactive = sys.stderr.isatty()
    interval = 0.1 if interactive else LOG_INTERVAL_S
    # maxinterval too: tqdm's monitor thread would otherwise redraw every 10 s
    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not show,
                dynamic_ncols=True, mininterval=interval, maxinterval=max(interval, 10.0))
