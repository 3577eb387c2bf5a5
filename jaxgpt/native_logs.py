"""Native libraries' start-up noise kept off stderr: what jaxgpt can do about it.

With JAX's CUDA plugin installed (the test extra installs it, and libtpu, to compile for GPUs
and TPUs without them) on a machine without a GPU, importing jax logs `Could not find cuda
drivers` from C++ (absl's INFO lines, which no environment variable silences), and starting
the backends tries to open every plugin's device: a CUDA traceback and libtpu's errors.
`quiet_native_logs` drops absl's INFO lines written while its body runs (anything else written
to stderr then is passed on); `use_cpu_without_accelerators` makes the command line start the
CPU backend alone on a machine with no GPU or TPU device, unless the user chose platforms
(the plugins stay registered, so compile-only targets keep working).

The `jaxgpt` command uses them (`jaxgpt.cli`); a library never does it for you, since `import
jaxgpt` leaves the process's file descriptors alone. A program of your own can do as the
command does (docs/accelerators.md): import jax under `quiet_native_logs`, then
`start_backends`. This module imports nothing at load time, so that it can run before jax is
imported.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import sys
import tempfile
from collections.abc import Iterator

# absl's INFO lines (`I0000 00:00:1795.904213   26241 cudart_stub.cc:31] ...`) and the line
# absl writes before its first message.
_NOISE = re.compile(rb"^(I\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [\w.-]+:\d+\] |"
                    rb"WARNING: All log messages before absl::InitializeLog\(\) is called)")
# Device files of GPUs (NVIDIA, NVIDIA under WSL, AMD) and TPUs (v4 and older; v5e and newer
# are VFIO groups: /dev/vfio/N).
_ACCELERATOR_FILES = ("/dev/nvidia[0-9]*", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd",
                      "/dev/accel*", "/dev/vfio/[0-9]*")


def drop_noise(text: bytes) -> bytes:
    """`text` without absl's INFO lines and preamble."""
    lines = text.splitlines(keepends=True)
    return b"".join(line for line in lines if not _NOISE.match(line))


@contextlib.contextmanager
def quiet_native_logs() -> Iterator[None]:
    """Run the body with the process's stderr (file descriptor 2) going to a temporary file,
    then pass on what was written there less absl's INFO lines (`drop_noise`)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no stderr to redirect
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = drop_noise(tmp.read())
            if kept:
                os.write(2, kept)


def accelerator_files() -> list[str]:
    """The GPU and TPU device files of this machine (empty on a machine with neither)."""
    return sorted(path for pattern in _ACCELERATOR_FILES for path in glob.glob(pattern))


def use_cpu_without_accelerators() -> bool:
    """On Linux with no GPU or TPU device file, and no platform chosen (`JAX_PLATFORMS`, or
    `jax_platforms` set), limit JAX to its CPU backend before it starts; whether it did."""
    import jax
    from jax._src import xla_bridge

    if os.environ.get("JAX_PLATFORMS") or jax.config.values.get("jax_platforms"):
        return False
    if not sys.platform.startswith("linux") or accelerator_files():
        return False
    if xla_bridge.backends_are_initialized():
        return False
    jax.config.update("jax_platforms", "cpu")
    return True


def start_backends() -> None:
    """Start JAX's backends now, with their plugins' INFO lines kept off stderr."""
    import jax

    with quiet_native_logs():
        jax.devices()
