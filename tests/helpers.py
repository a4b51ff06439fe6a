"""Checks shared by several test files (imported as `from helpers import ...`; pytest puts tests/ on sys.path)."""
import json
import os
import signal
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # python -m ext.adapters runs from here


def assert_moments_close(a, b, rel=1e-3):
    """Adam's moments are linear in the gradients (the weights are not: Adam normalises away a wrong scale)."""
    sa, sb = a["opt"]["state"], b["opt"]["state"]
    for k in ("exp_avg", "exp_avg_sq"):
        scale = max(s[k].abs().max().item() for s in sa.values())
        worst = max((sa[i][k] - sb[i][k]).abs().max().item() for i in sa)
        assert worst <= rel * scale, (k, worst, scale)


def interrupted_sampling(args, monkeypatch):
    """sample.main(args) stopped (Ctrl-C) after its first shard."""
    import sample
    generate, calls = sample.generate, []

    def killed_in_second_shard(*a, **k):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return generate(*a, **k)
    monkeypatch.setattr(sample, "generate", killed_in_second_shard)
    with pytest.raises(KeyboardInterrupt):
        sample.main(args)
    monkeypatch.setattr(sample, "generate", generate)


def logged_step(out):
    try:
        return json.loads(open(os.path.join(out, "log.jsonl")).read().strip().splitlines()[-1])["step"]
    except (OSError, IndexError, ValueError):  # no log yet, or a line being written
        return 0


def finish(cmd_fresh, cmd_resume, out, kill_at=None):
    """Run cmd (fresh, or --resume once a checkpoint exists) until it exits, or SIGKILL its whole process group once
    its log reaches step kill_at. Returns True if it ran to the end."""
    cmd = cmd_resume if os.path.exists(os.path.join(out, "ckpt.pt")) else cmd_fresh
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, cwd=ROOT)
    while p.poll() is None:
        if kill_at is not None and logged_step(out) >= kill_at:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            return False
        time.sleep(0.01)
    assert p.returncode == 0, p.stderr.read().decode()[-2000:]
    return True


def run_cli(script, *args):
    """A stage script's command line run in this process, as plumbing.cli runs it: -> (returncode, stderr) like a
    subprocess's, without the seconds a fresh `import torch` costs (the subprocess tests in test_faults.py keep
    every script's own entry point covered)."""
    import contextlib
    import importlib
    import io
    import sys
    import types

    import plumbing
    errors = (ValueError, OSError, FloatingPointError) if script in ("train.py", "ext.adapters") else \
        (ValueError, OSError)
    main, err, code = importlib.import_module(script.removesuffix(".py")).main, io.StringIO(), 0
    with contextlib.redirect_stderr(err):
        try:
            plumbing.cli(lambda: main([str(a) for a in args]), script, errors)
        except SystemExit as e:  # sys.exit(message): the interpreter would print it and exit with 1
            code = 1 if isinstance(e.code, str) else e.code or 0
            print(e.code, file=sys.stderr) if isinstance(e.code, str) else None
    return types.SimpleNamespace(returncode=code, stderr=err.getvalue())
