"""Checkpoints and caches when writing fails or a checkpoint is damaged (issue 31: row 5, row
17, ENOSPC in one line, and the research commands' fallback past a damaged newest checkpoint).

The tiny checkpoints and the subprocess environment are tests/test_reliability.py's (GPT-2's
vocabulary, so the command line can tokenize for them).
"""

import gc
import subprocess
import sys
import warnings

import pytest
import test_reliability
from test_reliability import SMALL, _env

from jaxgpt.cli import main
from jaxgpt.io import checkpoint
from jaxgpt.nn import init_params

small_ckpt = test_reliability.small_ckpt


def _generate_under(tmp_path, ckpt, cache, limit_kib=None):
    """`jaxgpt generate` with the compile cache `cache`, under `ulimit -f limit_kib` if given
    (Python ignores SIGXFSZ, so a write past the limit fails with EFBIG)."""
    argv = [sys.executable, "-m", "jaxgpt", "generate", "--checkpoint", str(ckpt),
            "--max-new-tokens", "2", "--compile-cache", str(cache)]
    if limit_kib is not None:
        argv = ["bash", "-c", f'ulimit -f {limit_kib} && exec "$@"', "bash", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=_env(tmp_path))


# Row 5: a file-size limit leaves no cut-off compile-cache entry for a later run to trip on.

@pytest.mark.slow
def test_a_compile_cache_write_cut_off_by_a_file_size_limit_leaves_nothing_to_warn_about(
        tmp_path, small_ckpt):
    cache = tmp_path / "xla"
    # 10 KiB: the small model's decoding programs are bigger, the little ones fit.
    first = _generate_under(tmp_path, small_ckpt, cache, limit_kib=10)
    assert first.returncode == 0, first.stderr
    said = [line for line in first.stderr.splitlines() if "compile cache" in line
            and "warning" in line]
    assert said == [f"jaxgpt: warning: cannot write to the compile cache {cache} (File too "
                    f"large); the programs not written there compile again next time"], said
    assert "Error writing" not in first.stderr and ".py:" not in first.stderr, first.stderr
    assert any(cache.glob("*-cache")), "the programs that fit are cached"
    assert not list(cache.glob(".*")), "no temporary left behind"
    second = _generate_under(tmp_path, small_ckpt, cache)
    assert second.returncode == 0, second.stderr
    assert "Error reading" not in second.stderr and "Warning" not in second.stderr, second.stderr
    assert second.stdout == first.stdout


# A full disk during an orbax save: one short line naming the checkpoint, and nothing that the
# failed writes leave pending printed or warned about later (row 17).

# tensorstore's messages for ENOSPC, as a save into a full tmpfs raised them (the temporary
# directory's name shortened): about a file of orbax's, about an array.
_ENOSPC_FILE = (
    'RESOURCE_EXHAUSTED: Error writing local file "{tmp}/params.orbax-checkpoint-tmp/_sharding":'
    ' Failed writing: "{tmp}/params.orbax-checkpoint-tmp/_sharding.__lock": Failed to write 2029'
    " bytes to file 8: No space left on device [os_error_code='28']")
_ENOSPC_ARRAY = (
    'RESOURCE_EXHAUSTED: Error writing "out_head.kernel/0.0" in OCDBT database at local file '
    '"{tmp}/params.orbax-checkpoint-tmp/ocdbt.process_0/": Failed writing: "{tmp}/params.orbax-'
    'checkpoint-tmp/ocdbt.process_0/d/d380d4b2b431303f4c3be2279ad45a4e": Failed to write 450 '
    "bytes to file 14: No space left on device [tensorstore_spec='{{\"driver\":\"zarr\"}}'] "
    "[os_error_code='28']")


def _failing_write(message):
    """A coroutine failing as orbax's writes do on a full disk, in the iteration of its event
    loop that also schedules more writes: the loop stops with them never started (orbax's
    `_run_sync_via_new_loop` then closes it)."""
    import asyncio

    async def write_fragment():
        await asyncio.sleep(0)

    async def save():
        loop = asyncio.get_running_loop()
        # Runs in the next iteration, beside run_until_complete's stop: these never start.
        loop.call_soon(lambda: [loop.create_task(write_fragment()) for _ in range(3)])
        raise ValueError(message)

    return save()


def _orbax_fails(monkeypatch, message):
    """Make orbax's save fail at the tensorstore boundary, through orbax's own event loop."""
    import orbax.checkpoint as ocp
    from orbax.checkpoint._src import asyncio_utils

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", lambda self, directory, item: (
        asyncio_utils.run_sync(_failing_write(message.format(tmp=directory.parent)))))


@pytest.mark.parametrize("message", [_ENOSPC_FILE, _ENOSPC_ARRAY], ids=["file", "array"])
def test_a_full_disk_during_an_orbax_save_is_one_short_line_naming_the_checkpoint(
        tmp_path, monkeypatch, message):
    assert len(message.format(tmp=tmp_path / ".ckpt.tmp-1234-abcdef12")) > 300
    _orbax_fails(monkeypatch, message)
    path = tmp_path / "ckpt"
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.save(path, init_params(SMALL, 0), SMALL)
    line = str(e.value)
    assert line.startswith(f"cannot write the checkpoint {path}: ") and "\n" not in line
    assert line.endswith(": No space left on device (errno 28)") and len(line) < 200, line
    assert not path.exists() and not list(tmp_path.iterdir())


def test_a_failed_orbax_save_leaves_no_never_awaited_coroutine_behind(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    _orbax_fails(monkeypatch, _ENOSPC_ARRAY)
    params = init_params(SMALL, 0)
    # Control: the same failure through orbax alone warns, whenever the garbage collector
    # reaches the writes left unstarted.
    with pytest.warns(RuntimeWarning, match="write_fragment' was never awaited"):
        with pytest.raises(ValueError, match="No space left on device"):
            ocp.StandardCheckpointer().save(tmp_path / "control", params)
        gc.collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(checkpoint.CheckpointError, match="No space left on device"):
            checkpoint.save(tmp_path / "ckpt", params, SMALL)
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], caught


@pytest.mark.slow
def test_a_save_into_a_full_filesystem_is_one_line(tmp_path, small_ckpt):
    full = tmp_path / "full"
    full.mkdir()
    # A 1 MiB tmpfs in a private mount namespace: a real ENOSPC, without root's mount table.
    mount = f"mount -t tmpfs -o size=1m none {full}"
    if subprocess.run(["unshare", "-rm", "sh", "-c", mount], capture_output=True).returncode:
        pytest.skip("user namespaces (unshare -rm) cannot mount a tmpfs here")
    out = full / "ckpt"
    res = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f'{mount} && exec "$@"', "sh", sys.executable, "-m",
         "jaxgpt", "convert", str(small_ckpt), str(out), "--to", "orbax"],
        capture_output=True, text=True, timeout=300, env=_env(tmp_path))
    assert res.returncode == 1, res.stderr
    assert res.stderr.startswith(f"jaxgpt convert: cannot write the checkpoint {out}: ")
    assert res.stderr.endswith(": No space left on device (errno 28)\n"), res.stderr
    assert len(res.stderr.splitlines()) == 1 and len(res.stderr) < 200, res.stderr


# `generate`, `lens`, `patch` and `attention` given a training run's directory: the newest
# checkpoint that restores, as `train --resume` takes it.

_COMMANDS = {
    "generate": ["generate", "--max-new-tokens", "3", "--no-compile-cache"],
    "lens": ["lens", "--prompt", "When Mary and John went"],
    "patch": ["patch", "--clean", "When Mary and John went", "--corrupt",
              "When John and Mary went", "--answer", " Mary", "--wrong", " John"],
    "attention": ["attention", "--prompt", "When Mary and John went"],
}


def _run_dir(tmp_path):
    run = tmp_path / "run"
    for step in (2, 4, 6):
        checkpoint.save(run / "checkpoints" / f"step_{step:08d}", init_params(SMALL, step),
                        SMALL)
    return run, run / "checkpoints"


def _command(name, weights, out):
    """`name`'s command line with the weights `weights`, its picture (if any) at `out`."""
    return [*_COMMANDS[name], "--checkpoint", str(weights),
            *([] if name == "generate" else ["--out", str(out)])]


@pytest.mark.parametrize("name", list(_COMMANDS))
def test_a_run_directory_with_damaged_newest_checkpoints_uses_the_newest_that_restores(
        tmp_path, capsys, name):
    run, ckpts = _run_dir(tmp_path)
    for step in (6, 4):
        test_reliability._damage(ckpts / f"step_{step:08d}")
    assert main(_command(name, ckpts / "step_00000002", tmp_path / "direct.png")) == 0
    direct = capsys.readouterr().out
    assert main(_command(name, run, tmp_path / "from-run.png")) == 0
    out, err = capsys.readouterr()
    warned = [line for line in err.splitlines() if "passed over" in line]
    assert len(warned) == 1, err
    assert warned[0].startswith(f"jaxgpt: warning: {run} is a training run; passed over its "
                                f"newest checkpoints step_00000006, step_00000004 (cannot read "
                                f"the checkpoint {ckpts / 'step_00000006'}: ")
    assert warned[0].endswith(f"); using {ckpts / 'step_00000002'}")
    if name == "generate":  # the text of step 2's weights
        assert out == direct
    else:  # the picture of step 2's weights
        assert (tmp_path / "from-run.png").read_bytes() == (tmp_path / "direct.png").read_bytes()


@pytest.mark.parametrize("name", list(_COMMANDS))
def test_a_run_directory_whose_checkpoints_all_fail_is_one_error_line(tmp_path, name):
    run, ckpts = _run_dir(tmp_path)
    for step in (6, 4, 2):
        test_reliability._damage(ckpts / f"step_{step:08d}")
    with pytest.raises(SystemExit) as stop:
        main(_command(name, run, tmp_path / "p.png"))
    message = str(stop.value)
    assert message.startswith(f"jaxgpt: no checkpoint in {ckpts} restores (3 tried); the "
                              f"newest: cannot read the checkpoint {ckpts / 'step_00000006'}: ")
    assert "\n" not in message and not (tmp_path / "p.png").exists()


def test_a_run_directory_with_a_lost_config_passes_over_that_checkpoint(tmp_path, capsys):
    run, ckpts = _run_dir(tmp_path)
    (ckpts / "step_00000006" / "config.json").unlink()
    assert main(_command("generate", run, None)) == 0
    err = capsys.readouterr().err
    assert (f"passed over its newest checkpoint step_00000006 ({ckpts / 'step_00000006'}/"
            f"config.json is missing: the checkpoint is incomplete); using "
            f"{ckpts / 'step_00000004'}") in err, err
