"""Progress bars: live on a terminal, sparse in a log file (no megabytes of redraws)."""

import io

from ei.train import progress


def test_bars_redraw_rarely_when_stderr_is_not_a_terminal(monkeypatch):
    monkeypatch.setattr(progress.sys, "stderr", io.StringIO())
    bar = progress.progress_bar(10, "work", "step", show=True)
    assert bar.mininterval == progress.LOG_INTERVAL_S
    bar.close()
    assert progress.progress_bar(10, "work", "step", show=False).disable
