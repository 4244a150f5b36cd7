"""nbval's kernels talk over Unix sockets, as the runner's do (fedlib/runner.py, ``_kernel_manager``):
``make test`` starts kernels in two workers, and the tests start more through the runner; kernels on
TCP ports chosen free and bound later can collide, and a client then waits for ever on a reply."""

import tempfile
from pathlib import Path

import nbval.kernel
from jupyter_client.manager import KernelManager


class IPCKernelManager(KernelManager):
    def __init__(self, **kw):
        kw.setdefault("transport", "ipc")
        # an absolute socket path: the kernel runs in the notebook's folder, the client in pytest's
        kw.setdefault("ip", str(Path(tempfile.mkdtemp(prefix="nbval-kernel-")) / "ipc"))
        super().__init__(**kw)


nbval.kernel.KernelManager = IPCKernelManager
