"""Data-parallel training: the sharded loader, and 2 gloo processes against 1 process.

The reference is a one-process run with the same global batch: the DDP gradient is the
mean of the ranks' mean gradients over equal shares, which is the one-process batch
mean, so losses, metrics and weights agree up to float rounding (no augmentation, fp32,
and a model without BatchNorm, or with SyncBatchNorm).
"""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

from cnnkit.data import TensorLoader
from cnnkit.run.checkpoint import load_weights
from cnnkit.training import NonFiniteLossError, TrainConfig, Trainer
from cnnkit.training import distributed as ddp
from cnnkit.training.sync_bn import SyncBatchNorm, convert_sync_batchnorm

WORLD = 2
GLOO = pytest.mark.skipif(not (torch.distributed.is_available()
                               and torch.distributed.is_gloo_available()),
                          reason="this PyTorch build has no gloo backend")
# lenet5 (no BatchNorm, no dropout) with AdamW reaches about 0.7 accuracy in 2 epochs.
PLAIN = dict(model="lenet5", data="digits", epochs=2, batch_size=64, optimizer="adamw",
             lr=3e-3, augment="none", amp="off")
# WRN-10-1: BatchNorm in every block, about 0.95 in 2 epochs; SyncBN makes 2 ranks exact.
WITH_BN = dict(model="wide_resnet", model_kwargs={"depth": 10, "widen_factor": 1},
               data="digits", epochs=2, batch_size=64, optimizer="sgd", lr=0.05, augment="none",
               amp="off")


def _loader(n: int, batch: int, rank: int = 0, world: int = 1, **kw) -> TensorLoader:
    images = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
    return TensorLoader(images, torch.arange(n), batch, seed=3, rank=rank, world_size=world,
                        **kw)


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_split_every_global_batch_of_the_one_process_order(world):
    whole = [y for _, y in _loader(70, 8, shuffle=True, drop_last=True)]
    shards = [[y for _, y in _loader(70, 8, r, world, shuffle=True, drop_last=True)]
              for r in range(world)]
    assert all(len(s) == len(whole) == 70 // 8 for s in shards)
    for step, batch in enumerate(whole):
        parts = [s[step] for s in shards]
        assert all(len(p) == 8 // world for p in parts)  # equal shares
        # rank r takes positions r, r + W, ... of the global batch: disjoint, and together it
        for r, p in enumerate(parts):
            assert torch.equal(p, batch[r::world])
        assert sorted(torch.cat(parts).tolist()) == sorted(batch.tolist())


def test_training_shards_are_topped_up_to_equal_counts():
    # 11 samples, no drop_last, 3 ranks: 12 slots, one sample is seen twice (as DistributedSampler)
    shards = [torch.cat([y for _, y in _loader(11, 6, r, 3, shuffle=True)]) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]
    everything = torch.cat(shards)
    assert set(everything.tolist()) == set(range(11)) and len(everything) == 12


def test_evaluation_shards_count_every_sample_once():
    shards = [[y for _, y in _loader(9, 4, r, 2)] for r in range(2)]
    assert [sum(len(y) for y in s) for s in shards] == [5, 4]  # 9 = 5 + 4, nothing repeated
    assert sorted(torch.cat([torch.cat(s) for s in shards]).tolist()) == list(range(9))
    assert torch.equal(torch.cat(shards[0]), torch.arange(0, 9, 2))  # round-robin, in order


def test_loader_rejects_a_batch_that_does_not_split():
    with pytest.raises(ValueError, match="multiple of 3"):
        _loader(10, 8, 0, 3)
    with pytest.raises(ValueError, match="rank"):
        _loader(10, 8, 2, 2)


def test_single_process_helpers_are_identities():
    assert not ddp.current().enabled and ddp.is_main()
    t = torch.arange(5)
    assert ddp.gather_shards(t) is t and ddp.all_reduce_sum(t) is t
    assert ddp.broadcast_text("runs/x") == "runs/x"
    bn = torch.nn.BatchNorm2d(3)
    assert ddp.wrap_ddp(bn, torch.device("cpu")) is bn


def test_sync_batchnorm_is_batchnorm_in_one_process_with_the_same_keys():
    ref = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3))
    conv = convert_sync_batchnorm(torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3),
                                                      torch.nn.BatchNorm2d(3)),
                                  torch.device("cpu"))
    conv.load_state_dict(ref.state_dict())
    assert isinstance(conv[1], SyncBatchNorm) and conv.state_dict().keys() == \
        ref.state_dict().keys()
    x = torch.randn(4, 1, 5, 5)
    torch.testing.assert_close(conv(x), ref(x))
    torch.testing.assert_close(conv[1].running_var, ref[1].running_var)


# -- two processes ----------------------------------------------------------------------------

def _count_writes() -> dict[str, int]:
    """Count every run-folder write (all go through cnnkit._files.atomic_write) in this
    process."""
    from cnnkit import _files

    original, calls = _files.atomic_write, {"n": 0}

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    for name, module in list(sys.modules.items()):
        if name.startswith("cnnkit") and getattr(module, "atomic_write", None) is original:
            module.atomic_write = counting
    return calls


def _stop_after(epoch):
    def cb(trainer, e, metrics):
        if e == epoch:
            raise KeyboardInterrupt
    return cb


def _worker(rank: int, tmp: str) -> None:
    import torch.distributed as dist

    import cnnkit.run.report  # noqa: F401 - imported before its atomic_write is counted

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank,
                            world_size=WORLD)
    writes = _count_writes()
    runs = f"{tmp}/runs"
    try:
        out = {"plain": Trainer(TrainConfig(**PLAIN, name="plain", runs_dir=runs),
                                progress=False).fit()}
        broken = Trainer(TrainConfig(**PLAIN, name="resumed", runs_dir=runs), progress=False,
                         callbacks=[_stop_after(1)])
        try:
            broken.fit()
        except KeyboardInterrupt:
            pass
        resumed = Trainer(resume=broken.paths.root, progress=False)
        out["resumed"] = resumed.fit()
        out["sync_bn"] = Trainer(TrainConfig(**WITH_BN, sync_bn=True, name="sync_bn",
                                             runs_dir=runs), progress=False).fit()
        out["writes"] = writes["n"]

        def poison(trainer, epoch, metrics):  # one rank goes bad: both must stop, none hang
            if epoch == 1 and rank == 1:
                with torch.no_grad():
                    trainer.model.get_classifier().weight.fill_(float("nan"))

        try:
            Trainer(TrainConfig(**PLAIN, name="nan", runs_dir=runs), progress=False,
                    callbacks=[poison]).fit()
            out["nan"] = "no error"
        except NonFiniteLossError as e:
            out["nan"] = str(e)
        out["history"] = resumed.history
        with open(f"{tmp}/rank{rank}.json", "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


def _spawn(tmp, timeout: float = 150) -> None:
    context = mp.start_processes(_worker, args=(str(tmp),), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"the {WORLD} training processes did not finish in {timeout} s")


@pytest.fixture(scope="session")
def two_processes(tmp_path_factory):
    """The 2-process runs, made once per test session even under pytest-xdist (the other
    workers wait for them under a file lock, as the xdist docs suggest): the 2 processes
    take both cores anyway."""
    from filelock import FileLock  # a dependency of torch

    base = tmp_path_factory.getbasetemp()
    # Under xdist each worker's basetemp sits in the session's folder; alone, basetemp is it
    # (its parent is shared by every pytest session: results must not cross sessions).
    tmp = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "ddp-two-processes"
    with FileLock(f"{tmp}.lock"):
        if not (tmp / f"rank{WORLD - 1}.json").is_file():
            tmp.mkdir(exist_ok=True)
            old = os.environ.get("OMP_NUM_THREADS")
            os.environ["OMP_NUM_THREADS"] = "1"
            try:
                _spawn(tmp)
            finally:
                if old is None:
                    os.environ.pop("OMP_NUM_THREADS")
                else:
                    os.environ["OMP_NUM_THREADS"] = old
    ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return tmp, ranks


def _one_process(tmp_path, **cfg):
    trainer = Trainer(TrainConfig(**cfg, runs_dir=str(tmp_path)), progress=False)
    return trainer, trainer.fit()


def _assert_same_run(ddp_summary, ddp_root, single, single_summary):
    rows = [json.loads(line) for line in (ddp_root / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len(single.history)
    for a, b in zip(rows, single.history, strict=True):
        for key in ("train_loss", "val_loss", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
        assert a["val_accuracy"] == b["val_accuracy"]
    assert ddp_summary["test_accuracy"] == single_summary["test_accuracy"]
    assert ddp_summary["test_loss"] == pytest.approx(single_summary["test_loss"], rel=1e-4)
    assert ddp_summary["processes"] == WORLD and single_summary["processes"] == 1
    ddp_w, meta = load_weights(ddp_root / "model_last.safetensors")
    one_w, one_meta = load_weights(single.paths.last)
    assert ddp_w.keys() == one_w.keys() and meta == one_meta
    for k in one_w:
        torch.testing.assert_close(ddp_w[k], one_w[k], rtol=1e-4, atol=1e-5, msg=k)


@GLOO
def test_two_processes_equal_one_with_the_same_global_batch(two_processes, tmp_path):
    tmp, ranks = two_processes
    single, summary = _one_process(tmp_path, **PLAIN, name="plain")
    assert summary["test_accuracy"] > 0.5  # it learns: equal metrics mean something
    _assert_same_run(ranks[0]["plain"], tmp / "runs" / "plain", single, summary)


def _untimed(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in ("train_time_s", "samples_per_s",
                                                    "epoch_time_s")}


@GLOO
def test_metrics_are_reduced_alike_on_every_rank(two_processes):
    _, ranks = two_processes
    for key in ("plain", "resumed", "sync_bn"):
        assert _untimed(ranks[1][key]) == _untimed(ranks[0][key]), key
    assert [_untimed(m) for m in ranks[1]["history"]] == \
        [_untimed(m) for m in ranks[0]["history"]]


@GLOO
def test_rank_zero_alone_writes_the_run_folders(two_processes):
    tmp, ranks = two_processes
    assert ranks[1]["writes"] == 0 and ranks[0]["writes"] > 0
    assert sorted(p.name for p in (tmp / "runs").iterdir()) == ["nan", "plain", "resumed",
                                                                 "sync_bn"]
    for run in ("plain", "resumed", "sync_bn"):
        assert (tmp / "runs" / run / "report.html").is_file()


@GLOO
def test_distributed_resume_equals_the_uninterrupted_run(two_processes):
    tmp, ranks = two_processes
    assert ranks[0]["resumed"]["test_accuracy"] == ranks[0]["plain"]["test_accuracy"]
    a, _ = load_weights(tmp / "runs" / "plain" / "model_last.safetensors")
    b, _ = load_weights(tmp / "runs" / "resumed" / "model_last.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k


@GLOO
def test_sync_batchnorm_over_two_processes_equals_batchnorm_over_one(two_processes, tmp_path):
    tmp, ranks = two_processes
    single, summary = _one_process(tmp_path, **WITH_BN, name="sync_bn")
    assert summary["test_accuracy"] > 0.8
    _assert_same_run(ranks[0]["sync_bn"], tmp / "runs" / "sync_bn", single, summary)


@GLOO
def test_a_distributed_run_loads_with_load_run(two_processes):
    from cnnkit.models import create_model
    from cnnkit.training import load_run
    from cnnkit.workflows.evaluate import evaluate_run

    tmp, ranks = two_processes
    run = load_run(tmp / "runs" / "sync_bn")  # keys as the plain model's: no module. prefix
    plain = create_model("wide_resnet", num_classes=10, in_chans=1, img_size=8, depth=10,
                         widen_factor=1)
    assert run.model.state_dict().keys() == plain.state_dict().keys()
    assert evaluate_run(run)["test_accuracy"] == pytest.approx(
        ranks[0]["sync_bn"]["test_accuracy"])


@GLOO
def test_a_nan_on_one_rank_stops_every_rank_with_the_same_error(two_processes):
    _, ranks = two_processes
    assert "epoch 2, step 1 " in ranks[1]["nan"] and ranks[0]["nan"] == ranks[1]["nan"]
    assert "last good checkpoint" in ranks[0]["nan"]
