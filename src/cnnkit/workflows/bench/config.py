"""What ``cnnkit bench`` measures: one typed dataclass, the source of truth for the CLI,
which is generated from its fields (:class:`~cnnkit.run.fields.Option`). PyTorch is
imported when a config is built, not with this module (``cnnkit bench --help``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from cnnkit.run.fields import option

__all__ = ["BenchConfig", "DEFAULT_MODELS", "MODES"]

DEFAULT_MODELS = ("resnet18", "tinyvgg", "mobilenet_v2")
# The three training configurations, in the order they alternate (ABCABC...).
MODES = ("trainer_eager", "trainer_fast", "plain")


@dataclass
class BenchConfig:
    """Everything that determines a ``cnnkit bench`` run.

    Attributes:
        models: registered classifiers to train and time (CIFAR-sized: 3x32x32, 10 classes).
        device: ``"auto"`` (cuda, then cpu), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        batch_size: training batch (64 by default, 2 with ``quick``).
        steps: training steps per timed round and configuration; None picks, per model,
            enough eager steps for a round of about 3 s (from one probe step).
        rounds: timed rounds (7; 2 with ``quick``); each round runs every configuration
            once, in turn, after one untimed warm-up round each (where ``torch.compile``
            compiles).
        compile: compile the fast mode's training step (and its inference model) with
            ``torch.compile``; None (default) does what ``TrainConfig(fast=True)`` does on
            the device (compile on CUDA, not on the CPU); False measures channels_last +
            bf16 autocast alone.
        quick: tiny sizes and few repeats, for tests (seconds with ``compile=False``).
        threads: torch intra-op threads on the CPU; None keeps PyTorch's default.
        memory: measure peak memory per configuration in fresh processes.
        latency_batches: batch sizes of the inference latency (1 and 32; 1 and 4 with
            ``quick``).
        augment: augmentation policy of every training configuration (``flip_crop``:
            random flips and padded crops, as CIFAR training uses).
        image_size: side of the square synthetic images (32, CIFAR's; 16 with ``quick``).
        num_classes: classes of the synthetic data (10, CIFAR's; 2 with ``quick``, so that
            a training split of one tiny batch still holds every class).
        seed: seeds the synthetic data and every model's initialisation.
    """

    models: tuple[str, ...] = option(DEFAULT_MODELS, "classifiers to train", metavar="M,M,..")
    device: str = option("auto", "cpu, cuda or cuda:N; auto: cuda if there is one, else cpu")
    batch_size: int | None = option(None, "training batch (default 64)", bounds="positive")
    steps: int | None = option(None, "training steps per timed round (default: about 3 s of "
                               "eager steps)", bounds="positive")
    rounds: int | None = option(None, "timed rounds (default 7)", bounds="positive")
    compile: bool | None = option(None, "fast mode with / without torch.compile (default: as "
                                  "--fast trains on the device: compiled on CUDA, not on the "
                                  "CPU)")
    quick: bool = option(False, "tiny sizes and few repeats: a smoke run (seconds with "
                         "--no-compile)")
    threads: int | None = option(None, "torch intra-op threads (default: PyTorch's, all cores)",
                                 bounds="positive")
    memory: bool = option(True, "skip the peak-memory measurement (one fresh process per "
                          "configuration)")
    latency_batches: tuple[int, ...] | None = option(None, cli=False)
    augment: str = option("flip_crop", cli=False)
    image_size: int | None = option(None, cli=False)
    num_classes: int | None = option(None, cli=False)
    seed: int = option(0, cli=False)

    def __post_init__(self) -> None:
        from cnnkit.models import list_models  # lazy: cli start-up

        if isinstance(self.models, str):
            self.models = tuple(m.strip() for m in self.models.split(",") if m.strip())
        self.models = tuple(self.models)
        known = list_models(task="classify")
        unknown = [m for m in self.models if m not in known]
        if not self.models or unknown:
            raise ValueError(f"unknown model(s) {', '.join(unknown) or '(none given)'}; give "
                             f"classifiers from `cnnkit models --task classify`, such as "
                             f"{','.join(DEFAULT_MODELS)}")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"models {','.join(self.models)} name one model twice; list each once")
        defaults = {"batch_size": (2, 64), "rounds": (2, 7), "image_size": (16, 32),
                    "num_classes": (2, 10), "latency_batches": ((1, 4), (1, 32)),
                    "steps": (1, None)}
        for key, (quick, full) in defaults.items():  # None: the default; 0 stays an error
            if getattr(self, key) is None:
                setattr(self, key, quick if self.quick else full)
        for key in ("batch_size", "rounds", "steps", "threads", "image_size", "num_classes"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}")
        self.latency_batches = tuple(self.latency_batches)
        if not all(isinstance(b, int) and b >= 1 for b in self.latency_batches) \
                or not self.latency_batches:
            raise ValueError(f"latency_batches must be positive batch sizes, got "
                             f"{self.latency_batches}")

        from cnnkit.data import Augment  # lazy: cli start-up

        Augment(self.augment)  # an unknown policy raises here, naming the valid ones

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}
