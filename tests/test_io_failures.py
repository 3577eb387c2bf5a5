"""Checkpoints and caches when writing fails or a checkpoint is damaged (issue 31: row 5, row
17, ENOSPC in one line, and the research commands' fallback past a damaged newest checkpoint).

The tiny checkpoints and the subprocess environment are tests/test_reliability.py's (GPT-2's
vocabulary, so the command line can tokenize for them).
"""

import subprocess
import sys

import pytest
import test_reliability
from test_reliability import _env

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
