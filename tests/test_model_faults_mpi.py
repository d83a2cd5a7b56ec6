"""A user's model that fails, under `mpirun -n 2`: refused once, before any file is written.

The models are tests/fixtures/models/faulty.py, imported as a user's would be (the job runs in
that directory). Whatever is wrong, the job says it once across both ranks (not per rank),
exits 2 and leaves no run directory: a check of the harness in one line naming the block, its
input and the microbatch, the user's own exception with its traceback into the user's file,
ranks that built different weights naming the first block that differs.
"""
from helpers import REPO, run_harness

MODELS = REPO / "tests" / "fixtures" / "models"
ARGS = ["data.batch_size=64", "pipeline.microbatches=4", "schedule=1f1b", "threads=1",
        "quiet=true", "train.steps=2"]


def refused(tmp_path, factory: str) -> str:
    """Run faulty:`factory` on 2 ranks; assert it was refused (exit 2, no run directory);
    -> its stderr."""
    d = tmp_path / "r"
    proc = run_harness(2, f"model.factory=faulty:{factory}", *ARGS, f"run.dir={d}", cwd=MODELS)
    assert proc.returncode == 2, proc.stderr
    assert not d.exists()
    return proc.stderr


def _line(text: str) -> int:
    """The line of faulty.py that holds `text`."""
    lines = (MODELS / "faulty.py").read_text().splitlines()
    return next(i for i, l in enumerate(lines, 1) if text in l)


def test_a_factory_that_returns_the_wrong_type_is_one_line(tmp_path):
    assert refused(tmp_path, "sequential").splitlines() == [
        "harness.run: error: model.factory='faulty:sequential': returned Sequential, expected "
        "harness.models.BlockModel"]


def test_a_block_that_cannot_run_on_a_microbatch_is_named_in_one_line(tmp_path):
    """Block 1 hard-codes the full batch (view(64, -1)); 4 microbatches give it 16 rows."""
    [line] = refused(tmp_path, "hardcoded").splitlines()
    head = ("harness.run: error: model.factory='faulty:hardcoded': block 1 'fixed' fails on a "
            "microbatch of 16 rows, its input [16, 32] float32: RuntimeError: ")
    tail = (f" at faulty.py:{_line('the hard-coded batch')} (16 rows = data.batch_size=64 / "
            f"pipeline.microbatches=4)")
    assert line.startswith(head) and line.endswith(tail), line
    assert "mat1 and mat2 shapes cannot be multiplied" in line


def test_the_users_exception_is_shown_once_with_its_traceback(tmp_path):
    err = refused(tmp_path, "raises")
    assert err.count("Traceback (most recent call last):") == 1, err
    assert err.count("RuntimeError: the factory is broken") == 1, err
    lines = err.splitlines()
    assert lines[0] == "harness.run: error: model.factory='faulty:raises' raised an exception:"
    assert lines[-1] == "RuntimeError: the factory is broken"
    # into the user's file, without the harness's own frames
    assert f'faulty.py", line {_line("the factory is broken")}, in raises' in err
    assert "harness/" not in err


def test_ranks_that_build_different_models_are_refused(tmp_path):
    """faulty:per_process seeds the global generator from the pid (a different one per rank)."""
    assert refused(tmp_path, "per_process").splitlines() == [
        "harness.run: error: ranks built different models: block 1 'fixed' has other initial "
        "weights on rank 1 than on rank 0; build every block from the seed alone, e.g. with "
        "harness.models.block_generator(seed, i), not from the global generator "
        "(docs/models.md)"]


def test_an_exception_while_importing_the_users_module_is_shown_once(tmp_path):
    (tmp_path / "broken_import.py").write_text("x = 1\nraise ValueError('bad module')\n")
    d = tmp_path / "r"
    proc = run_harness(2, "model.factory=broken_import:build", *ARGS, f"run.dir={d}",
                       cwd=tmp_path)
    assert proc.returncode == 2 and not d.exists()
    err = proc.stderr
    assert err.count("Traceback (most recent call last):") == 1
    assert err.count("ValueError: bad module") == 1
    assert err.splitlines()[0] == ("harness.run: error: model.factory='broken_import:build': "
                                   "importing 'broken_import' raised an exception:")
    assert 'broken_import.py", line 2, in <module>' in err and "harness/" not in err
