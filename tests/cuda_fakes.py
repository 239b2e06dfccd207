"""Stand-ins for torch.cuda pieces, for tests of device placement on a machine without a GPU."""
import contextlib

import torch


class FakeCurrentDevice:
    """Replaces torch.cuda.device (monkeypatch ``torch.cuda.device`` with ``.device``): records
    which CUDA device index is current, restoring the caller's on exit."""

    def __init__(self):
        self.current = 0

    @contextlib.contextmanager
    def device(self, device):
        saved, self.current = self.current, torch.device(device).index
        try:
            yield
        finally:
            self.current = saved
