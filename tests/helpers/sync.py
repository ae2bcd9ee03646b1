"""Host-sync counting for the tests that promise none on the step path."""
import torch


class SyncCounter:
    """Counts calls that read a tensor back to the host."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")

    def __init__(self, monkeypatch):
        self.calls = []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def counted(t, *args, **kwargs):
            self.calls.append(name)
            return original(t, *args, **kwargs)

        return counted
