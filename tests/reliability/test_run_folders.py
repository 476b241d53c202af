"""The reliability catalogue, run folders: a run is never mixed with another, never lost, and
leaves nothing behind (issue 12, points 1 and 7).

* Two runs started at once with one name end in two folders, each self-consistent.
* A run killed before its first epoch is taken over by a re-run of the same name, and
  ``--resume`` simply starts it.
* Temporaries of a killed write are removed on start and on resume.
* A run that a live process writes can be neither taken over nor resumed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from cnnkit._files import LOCK_NAME, FolderLock, atomic_write, make_folder
from cnnkit.run import claim_run_folder

TRAIN = ["train", "--model", "lenet5", "--data", "digits", "--epochs", "1", "--batch-size", "64",
         "--no-progress"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_concurrent_claims_of_one_name_get_distinct_folders(tmp_path):
    """16 threads claim "dup" at the same moment: 16 folders, each locked by its claimer."""
    barrier, claimed, errors = threading.Barrier(16), [], []

    def claim():
        barrier.wait()
        try:
            claimed.append(claim_run_folder(tmp_path, "dup"))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=claim) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    paths = sorted(f.path.name for f in claimed)
    assert paths == sorted(["dup"] + [f"dup-{i}" for i in range(2, 17)])
    assert all(not FolderLock(f.path).acquire() for f in claimed)  # each one held
    for f in claimed:
        f.release()


def test_two_runs_with_one_name_started_together_end_in_two_self_consistent_folders(tmp_path):
    """The failure of issue 12: both processes reported success and the folder ended with one
    run's config, the other's metrics and mixed weights. Different seeds tell them apart."""
    procs = [subprocess.Popen([sys.executable, "-m", "cnnkit", *TRAIN, "--name", "dup", "--seed",
                               str(seed), "--runs-dir", str(tmp_path), "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env()) for seed in (1, 2)]
    results = [p.communicate(timeout=180) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dup", "dup-2"]
    for seed, (out, err) in zip((1, 2), results, strict=True):
        printed = json.loads(out)  # what this process says it did ...
        folder = Path(err.split("run ", 1)[1].split(":", 1)[0])  # "run PATH: lenet5 on ..."
        config = yaml.safe_load((folder / "config.yaml").read_text())
        assert config["seed"] == seed  # ... is what its folder holds, all of it
        assert json.loads((folder / "summary.json").read_text()) == printed
        history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert printed["best_val_accuracy"] == max(m["val_accuracy"] for m in history)


def test_a_run_killed_before_its_first_epoch_is_taken_over_by_a_rerun(cli, tmp_path):
    """What a SIGKILL during setup leaves: config.yaml and a temporary. A re-run of the same
    name reuses the folder (no "-2"), and nothing of the dead run is left in it."""
    dead = make_folder(tmp_path / "early")
    (dead / "config.yaml").write_text("epochs: 99\n")  # the dead run's (other) settings
    (dead / ".metrics.jsonl.abc123xy.tmp").write_text("half")
    (dead / LOCK_NAME).write_text("12345\n")  # its lock file; the lock died with it
    code, _, err = cli([*TRAIN, "--name", "early", "--runs-dir", str(tmp_path)])
    assert code == 0, err
    assert [p.name for p in tmp_path.iterdir()] == ["early"]
    assert yaml.safe_load((dead / "config.yaml").read_text())["epochs"] == 1
    assert not [p for p in dead.iterdir() if p.name.endswith(".tmp")]
    assert (dead / "summary.json").is_file()


def test_resuming_a_run_without_a_finished_epoch_starts_it(cli, tmp_path, shared_run):
    run = tmp_path / "fresh"
    run.mkdir()
    config = yaml.safe_load((shared_run.path / "config.yaml").read_text())
    config["epochs"] = 1
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    code, _, err = cli(["train", "--resume", str(run), "--no-progress"])
    assert code == 0, err
    assert json.loads((run / "summary.json").read_text())["epochs_run"] == 1


def test_a_finished_run_is_never_taken_over(cli, tmp_path, shared_run):
    import shutil

    shutil.copytree(shared_run.path, tmp_path / "shared")
    before = {p.name: p.read_bytes() for p in (tmp_path / "shared").iterdir()}
    code, _, err = cli([*TRAIN, "--name", "shared", "--runs-dir", str(tmp_path)])
    assert code == 0, err
    assert {p.name: p.read_bytes() for p in (tmp_path / "shared").iterdir()} == before
    assert (tmp_path / "shared-2" / "summary.json").is_file()


def test_resume_removes_the_temporaries_of_a_killed_write(cli, tmp_path, shared_run):
    import shutil

    run = shutil.copytree(shared_run.path, tmp_path / "run")
    leftovers = [run / ".model.safetensors.k2j4h5g6.tmp",
                 run / ".train_state.safetensors.a_b_c_.tmp"]
    for p in leftovers:
        p.write_bytes(b"partial")
    mine = run / "notes.tmp"  # not one of cnnkit's temporaries: kept
    mine.write_text("the user's")
    code, _, err = cli(["train", "--resume", str(run), "--no-progress"])
    assert code == 0, err
    assert not any(p.exists() for p in leftovers) and mine.read_text() == "the user's"


@pytest.fixture
def held_by_another_process(tmp_path):
    """A live process holding a folder's lock (as a training run does), stopped at the end."""
    def hold(folder: Path) -> subprocess.Popen:
        code = ("import sys, time; from cnnkit._files import FolderLock; "
                "lock = FolderLock(sys.argv[1]); assert lock.acquire(); print('held', flush=True); "
                "time.sleep(120)")
        proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline().strip() == "held"
        procs.append(proc)
        return proc

    procs: list[subprocess.Popen] = []
    yield hold
    for p in procs:
        p.kill()
        p.wait()


def test_a_run_that_another_process_writes_cannot_be_resumed(cli, one_line_error, tmp_path,
                                                            shared_run, held_by_another_process):
    import shutil

    run = shutil.copytree(shared_run.path, tmp_path / "busy")
    proc = held_by_another_process(run)
    line = one_line_error(*cli(["train", "--resume", str(run), "--no-progress"])[::2])
    assert "being written by another cnnkit process" in line and f"pid {proc.pid}" in line


def test_an_unstarted_run_that_a_live_process_holds_is_not_taken_over(cli, tmp_path,
                                                                     held_by_another_process):
    """Before its first epoch a live run looks like a dead one but for its lock."""
    live = make_folder(tmp_path / "live")
    atomic_write(live / "config.yaml", "epochs: 5\n")
    held_by_another_process(live)
    code, _, err = cli([*TRAIN, "--name", "live", "--runs-dir", str(tmp_path)])
    assert code == 0, err
    assert (live / "config.yaml").read_text() == "epochs: 5\n"  # untouched
    assert (tmp_path / "live-2" / "summary.json").is_file()


def test_a_run_that_fails_during_setup_leaves_no_folder(cli, one_line_error, tmp_path):
    line = one_line_error(*cli([*TRAIN, "--data", str(tmp_path / "missing.npz"),
                                "--runs-dir", str(tmp_path / "runs")])[::2])
    assert "does not exist" in line
    assert not (tmp_path / "runs").exists()
