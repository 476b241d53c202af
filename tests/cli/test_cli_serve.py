"""``cnnkit serve``: the URL it prints answers, Ctrl-C stops it, bad input is one line; a
segmentation run trained by ``cnnkit train`` is served with its class map."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

pytest.importorskip("starlette")


def test_serve_help_lists_its_options(cli):
    code, out, _ = cli(["serve", "--help"])
    assert code == 0
    for flag in ("RUN", "--port", "--host", "--weights"):
        assert flag in out


@contextlib.contextmanager
def _serving(run):
    """``cnnkit serve RUN --port 0`` in a child process: its URL, then Ctrl-C (exit 130)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cnnkit", "serve", str(run), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("cnnkit serve: http://127.0.0.1:"), proc.stderr.read()
        yield line.split()[2].rstrip(";")
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
    assert code == 130 and "Traceback" not in proc.stderr.read()


def _json(url):
    with urllib.request.urlopen(url, timeout=60) as r:
        assert r.status == 200
        return json.loads(r.read())


def test_serve_prints_a_url_that_answers_and_stops_on_ctrl_c(shared_run):
    with _serving(shared_run.path) as url:
        with urllib.request.urlopen(url + "api/model", timeout=30) as r:
            assert r.status == 200 and b'"tinyvgg"' in r.read()
        rebinding = urllib.request.Request(url + "api/model", headers={"Host": "evil.example"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(rebinding, timeout=30)
        assert e.value.code == 400


def test_a_segmentation_run_is_served_with_its_class_map(cli, tmp_path):
    code, _, err = cli(["train", "--task", "segment", "--data", "shapes", "--model", "unet_small",
                        "--epochs", "1", "--data-opt", "n=40", "--data-opt", "size=32",
                        "--no-progress", "--runs-dir", str(tmp_path), "--name", "seg"])
    assert code == 0, err
    with _serving(tmp_path / "seg") as url:
        info = _json(url + "api/model")
        assert (info["output_kind"], info["layers"][-1]["kind"]) == ("mask", "mask")
        assert len(info["palette"]) == len(info["classes"]) == 5
        acts = _json(url + "api/activations?input=test:0")
        assert acts["head"]["data"]["shape"] == [1, 32, 32]
        assert acts["truth"]["mask"]["shape"] == [1, 32, 32]
        heat = _json(url + "api/explain?input=test:0&method=gradcam&target=1")
        assert heat["class"] == info["classes"][1] and 0 <= heat["region"] <= 1


def test_a_busy_port_is_one_line(cli, one_line_error, shared_run):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = cli(["serve", str(shared_run.path), "--port", str(port)])
    assert "--port" in one_line_error(code, err)


@pytest.mark.parametrize(("argv", "message"), [
    (["serve", "no/such/run", "--port", "0"], "not found"),
    (["serve", "RUN", "--port", "70000"], "0..65535"),
    (["serve", "RUN", "--weights", "int8", "--port", "0"], "no int8 model"),
])
def test_bad_serve_input_is_one_line(cli, one_line_error, shared_run, argv, message):
    argv = [str(shared_run.path) if a == "RUN" else a for a in argv]
    code, _, err = cli(argv)
    assert message in one_line_error(code, err)
