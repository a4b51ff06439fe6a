"""The layout's promises (README "Layout"): the core never imports ext/ but at its two lazy seams, and it runs
alone, with ext/ absent; no function a reader must scroll."""
import ast
import glob
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = sorted(os.path.basename(p) for p in glob.glob(f"{ROOT}/*.py"))
SEAMS = {("model.py", "load_model"), ("evaluate.py", "extension")}


def ext_imports(path):
    """The function (None: module level) of every import of ext in a file: import statements, and importlib calls
    on a name that starts with "ext" (a string or an f-string)."""
    tree, found = ast.parse(open(path).read()), []

    def names(node):
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        if isinstance(node, ast.ImportFrom):
            return [node.module or ""]
        if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("import_module") and node.args:
            return [ast.unparse(node.args[0]).strip("f'\"")]
        return []

    def visit(node, where):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else where
            if any(n == "ext" or n.startswith("ext.") for n in names(child)):
                found.append(where)
            visit(child, inner)
    visit(tree, None)
    return found


def test_the_core_imports_ext_only_at_its_two_seams():
    assert {"model.py", "evaluate.py", "train.py", "plumbing.py", "diffusion.py"} <= set(CORE)
    seen = {(f, where) for f in CORE for where in ext_imports(f"{ROOT}/{f}")}
    assert seen == SEAMS, seen  # both seams are there, and nothing else


def test_no_function_is_longer_than_60_lines():
    long = []
    for path in [f"{ROOT}/{f}" for f in CORE] + sorted(glob.glob(f"{ROOT}/ext/*.py")):
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.name}")
    assert not long, long


@pytest.mark.slow
def test_the_core_runs_without_ext(tmp_path):
    """A fork that deletes ext/: a dataset, a run, samples and the help still work; a command of ext/ is one line."""
    for f in CORE:
        shutil.copy(f"{ROOT}/{f}", tmp_path / f)
    run = lambda *args: subprocess.run([sys.executable, *map(str, args)], cwd=tmp_path, capture_output=True,
                                       text=True, env=dict(os.environ, PYTHONPATH=""))
    code = ("import prepare_data, train, sample, sys\n"
            "prepare_data.prepare_shapes('data', 10, 10, res=16)\n"
            "train.main(['--data', 'data/shapes/train', '--preset', 'tiny', '--batch-size', '4', '--steps', '1', "
            "'--ckpt-every', '1', '--grid-steps', '1', '--out', 'run'])\n"
            "sample.main(['--ckpt', 'run', '--num', '2', '--steps', '1'])\n"
            "assert not [m for m in sys.modules if m == 'ext' or m.startswith('ext.')]\n")
    r = run("-c", code)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "run/samples.npz").exists()
    r = run("evaluate.py", "--help")
    assert r.returncode == 0 and all(c in r.stdout for c in ("diversity", "gmm", "control", "report")), r.stdout
    r = run("evaluate.py", "gmm")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "ext/" in r.stderr, r.stderr
    r = run("sample.py", "--ckpt", "no/such-model", "--out", "x.npz")  # not a run, and no converter: one line
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "not found" in r.stderr, r.stderr
