"""The loss curve, drawn by another Python process while this one trains.

That process imports matplotlib (about half a second) while this one compiles and trains, so
on two or more cores a run's figure costs its command almost nothing (docs/speed.md); it runs
`figures.serve_loss_plots` and needs no JAX.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np


class LossPlotter:
    """Draws the loss curve in another Python process (numpy and matplotlib, no JAX), which
    imports matplotlib while this one compiles and trains: on two or more cores the figure
    costs the command almost nothing (docs/speed.md). If that process cannot be used, the
    figure is drawn here."""

    def __init__(self):
        root = str(Path(__file__).resolve().parent.parent)  # the same jaxmlp in the child
        code = (f"import sys; sys.path.insert(0, {root!r}); "
                "from jaxmlp.figures import serve_loss_plots; serve_loss_plots()")
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        except OSError:
            self.proc = None

    def request(self, losses: np.ndarray, title: str, bucket: int = 1000) -> None:
        """Start drawing (returns at once); `png()` collects the figure."""
        self.args = (losses, title, bucket)
        try:
            buf = io.BytesIO()
            np.save(buf, np.asarray(losses))
            blob = buf.getvalue()
            self.proc.stdin.write(json.dumps({"title": title, "bucket": bucket,
                                              "n": len(blob)}).encode() + b"\n" + blob)
            self.proc.stdin.flush()
        except (AttributeError, OSError):
            self.close()

    def png(self) -> bytes:
        if self.proc is not None:
            try:
                n = int(self.proc.stdout.readline())
                png = self.proc.stdout.read(n)
                if len(png) == n:
                    return png
            except (OSError, ValueError):
                pass
            self.close()
        from jaxmlp.figures import loss_png

        return loss_png(*self.args)

    def close(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            self.proc.kill()
            self.proc.wait()
            self.proc = None
