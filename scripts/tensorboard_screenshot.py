"""The picture of TensorBoard's scalars of a training run in the docs
(docs/images/tensorboard_scalars.png), made offline.

    python scripts/tensorboard_screenshot.py [--out docs/images/tensorboard_scalars.png]
        [--run DIR | --keep-run DIR] [--steps 300]

Without --run it first trains a short real run of `jaxgpt train`'s demo (DEMO_CONFIG on the
offline demo corpus, Python's help topics; about 4 minutes on two CPU cores) in a temporary
directory with `--log tensorboard`; --keep-run DIR trains into DIR and keeps it, and --run DIR
shoots an existing run directory instead, so the picture can be made again without training.
Then it starts TensorBoard on that run's `tensorboard/` folder, bound to 127.0.0.1 on a free
port, waits (at most --timeout, 60 s) until it serves the run's scalars, and shoots its Time
Series page narrowed to loss, lr and val_loss with headless Chromium (/usr/bin/chromium),
driven over its DevTools pipe so that it can close the settings pane before the page starts
and take the picture once the charts have drawn. Every host name but 127.0.0.1 is
unresolvable to that Chromium, so nothing leaves the machine; TensorBoard and Chromium are
always stopped afterwards. The PNG is reduced to 64 colours to keep the repository small.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.error import URLError

ROOT = Path(__file__).resolve().parent.parent
# The charts the picture is for: the training and validation loss and the learning rate.
TAGS = ("loss", "val_loss", "lr")
# The scalars page: TensorBoard's Time Series dashboard, its cards narrowed to TAGS (a regex);
# forceSVG draws the lines as SVG: its default canvas worker draws none in headless Chromium.
PAGE = "?forceSVG=true&tagFilter=%5E(" + "%7C".join(TAGS) + ")%24#timeseries"
# Time Series settings: the settings pane closed (the three cards fit in one row), the step
# selector and its table off, every point in the axes' range (a run's first val_loss is no
# outlier), and less smoothing than the default 0.6, which pulls a curve of a few val_loss
# points far off them.
SETTINGS = {"timeSeriesSettingsPaneOpened": False, "stepSelectorEnabled": False,
            "ignoreOutliers": False, "scalarSmoothing": 0.3}


def train(run: Path, steps: int) -> None:
    """Train `jaxgpt train`'s demo for `steps` steps into `run`, logging to TensorBoard."""
    cmd = [sys.executable, "-m", "jaxgpt", "train", "--steps", str(steps), "--batch-size", "8",
           "--seq-len", "64", "--warmup-steps", str(steps // 10), "--eval-every",
           str(max(steps // 6, 1)), "--out", str(run), "--log", "tensorboard"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    print("+", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, env=env, cwd=ROOT, check=True)


def free_port() -> int:
    """A TCP port of 127.0.0.1 free just now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_scalars(url: str, proc: subprocess.Popen, timeout: float) -> None:
    """Return once TensorBoard at `url` lists every tag of TAGS; SystemExit if it died or did
    not within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"tensorboard exited with {proc.returncode} before it answered")
        try:
            with urllib.request.urlopen(f"{url}/data/plugin/scalars/tags", timeout=5) as r:
                runs = json.load(r)
            if any(set(TAGS) <= set(tags) for tags in runs.values()):
                return
        except (URLError, OSError, ValueError):
            pass  # not listening yet, or still loading the event files
        time.sleep(0.5)
    raise SystemExit(f"tensorboard at {url} did not serve the scalars {', '.join(TAGS)} "
                     f"within {timeout:.0f} s")


class DevTools:
    """Headless Chromium driven over its DevTools pipe (file descriptors 3 and 4 of the
    browser; no websocket library needed): `call` sends one command and returns its result."""

    def __init__(self, profile: str, width: int, height: int, timeout: float) -> None:
        to_r, self._to = os.pipe()
        self._from, from_w = os.pipe()
        self._log = tempfile.TemporaryFile()
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
                 # Only TensorBoard may answer: anything the page asks of the internet fails.
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                 "--hide-scrollbars", f"--window-size={width},{height}",
                 "--remote-debugging-pipe", "about:blank"]
        # The shell puts the pipe's ends where Chromium reads and writes them.
        self.proc = subprocess.Popen(
            ["/bin/sh", "-c", f'exec "$0" "$@" 3<&{to_r} 4>&{from_w}', "/usr/bin/chromium",
             *flags], pass_fds=(to_r, from_w), stdout=self._log, stderr=self._log)
        os.close(to_r)
        os.close(from_w)
        self._buf = b""
        self._id = 0
        self._deadline = time.monotonic() + timeout

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """The result of the DevTools command `method`; SystemExit on its error, or when
        Chromium closed or the whole session ran past its time."""
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                left = self._deadline - time.monotonic()
                if left <= 0 or not select.select([self._from], [], [], left)[0]:
                    self._fail(f"{method}: no answer in time")
                chunk = os.read(self._from, 1 << 16)
                if not chunk:
                    self._fail(f"{method}: chromium closed")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:  # anything else is an event, not asked for
                if "error" in reply:
                    self._fail(f"{method}: {reply['error']}")
                return reply["result"]

    def _fail(self, why: str) -> None:
        self._log.seek(0)
        raise SystemExit(f"chromium: {why}; {self._log.read()[-500:].decode(errors='replace')}")

    def close(self) -> None:
        """Close the browser (killed if it does not go) and the pipe."""
        if self.proc.poll() is None:
            try:
                self.call("Browser.close")
                self.proc.wait(timeout=10)
            except (SystemExit, OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        os.close(self._to)
        os.close(self._from)
        self._log.close()


# Per series, the length of its SVG path's `d` (a point adds ~20 characters); once each card
# has a long one and nothing changed for a second, the charts have drawn.
_DRAWN = """Array.from(document.querySelectorAll('scalar-card')).map(card =>
    Math.max(0, ...Array.from(card.querySelectorAll('svg path'),
                              p => (p.getAttribute('d') || '').length)))"""


def screenshot(url: str, png: Path, width: int, height: int, timeout: float) -> None:
    """Render `url` (TensorBoard's Time Series page) with headless Chromium into `png`, once
    every chart of TAGS has drawn (SystemExit after `timeout` seconds)."""
    with tempfile.TemporaryDirectory() as profile:
        chrome = DevTools(profile, width, height, timeout)
        try:
            target = chrome.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            s = chrome.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
                "sessionId"]
            chrome.call("Page.enable", {}, s)
            # The settings a user would click before the shot, read by TensorBoard from its
            # local storage as it starts.
            chrome.call("Page.addScriptToEvaluateOnNewDocument", {
                "source": f"localStorage.setItem('_tb_global_settings', "
                          f"{json.dumps(json.dumps(SETTINGS))})"}, s)
            chrome.call("Emulation.setDeviceMetricsOverride", {
                "width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, s)
            chrome.call("Page.navigate", {"url": url}, s)
            before, deadline = None, time.monotonic() + timeout
            while True:
                drawn = chrome.call("Runtime.evaluate", {
                    "expression": _DRAWN, "returnByValue": True}, s)["result"].get("value")
                if drawn == before and len(drawn) == len(TAGS) and min(drawn) > 100:
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"the charts of {url} did not draw within {timeout:.0f} s "
                                     f"(path lengths per card: {drawn})")
                before = drawn
                time.sleep(1)
            shot = chrome.call("Page.captureScreenshot", {"format": "png"}, s)["data"]
            png.write_bytes(base64.b64decode(shot))
        finally:
            chrome.close()


def shoot(run: Path, png: Path, width: int, height: int, timeout: float) -> None:
    """Serve `run`/tensorboard with TensorBoard on 127.0.0.1 and render its scalars into
    `png`; TensorBoard is stopped whatever happens."""
    if not (run / "tensorboard").is_dir():
        raise SystemExit(f"{run} has no tensorboard/ folder: train it with --log tensorboard")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as logdir:
        # A folder of one run, so that TensorBoard names it after the run directory.
        (Path(logdir) / run.resolve().name).symlink_to((run / "tensorboard").resolve())
        # Its own session, so that killing the group also ends the data server it starts.
        tb = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", logdir, "--host",
             "127.0.0.1", "--port", str(port), "--reload_interval", "0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        try:
            try:
                wait_for_scalars(url, tb, timeout)
            except SystemExit:
                if tb.poll() is not None and tb.stderr is not None:
                    print(tb.stderr.read()[-2000:], file=sys.stderr)
                raise
            screenshot(f"{url}/{PAGE}", png, width, height, timeout)
        finally:
            if tb.poll() is None:
                os.killpg(tb.pid, signal.SIGTERM)
                try:
                    tb.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(tb.pid, signal.SIGKILL)
                    tb.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="docs/images/tensorboard_scalars.png")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--run", type=Path, help="an existing run directory (no training)")
    where.add_argument("--keep-run", type=Path, help="train into this directory and keep it")
    p.add_argument("--steps", type=int, default=300, help="steps of the demo run trained")
    p.add_argument("--width", type=int, default=1500)
    p.add_argument("--height", type=int, default=520)
    p.add_argument("--timeout", type=float, default=60,
                   help="seconds TensorBoard may take to serve the run, and the page to draw")
    args = p.parse_args()
    if args.run is not None and not args.run.is_dir():
        p.error(f"--run {args.run}: no such directory")
    if args.keep_run is not None and args.keep_run.exists():
        p.error(f"--keep-run {args.keep_run} exists: pass it as --run to reuse it")
    if args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")
    from PIL import Image

    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or args.keep_run or Path(tmp) / "demo-run"
        if args.run is None:
            train(run, args.steps)
        shot = Path(tmp) / "shot.png"
        shoot(run, shot, args.width, args.height, args.timeout)
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.open(shot).convert("RGB").quantize(64).save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size:,} bytes) from {run}/tensorboard")


if __name__ == "__main__":
    main()
