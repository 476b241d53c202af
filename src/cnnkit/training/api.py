"""``cnnkit.train(...)``: one function call from options to a finished run."""

from __future__ import annotations

from typing import Any

from cnnkit.run.config import TrainConfig

from .trainer import Trainer

__all__ = ["train"]


def train(config: TrainConfig | None = None, **options: Any) -> dict[str, Any]:
    """Train a model and return its summary (``summary["test_accuracy"]`` ...).

    Args:
        config: a full configuration; or leave it None and pass options by name.
        **options: :class:`TrainConfig` fields, plus ``progress`` and ``resume`` (a run
            folder to continue; then only :data:`~cnnkit.run.config.RESUME_OPTIONS` may
            be given, to change them).

    Example:
        >>> import cnnkit
        >>> s = cnnkit.train(model="lenet5", data="digits", epochs=2,
        ...                  runs_dir="/tmp/cnnkit-doc", progress=False)  # doctest: +SKIP
    """
    progress = options.pop("progress", None)
    resume = options.pop("resume", None)
    if resume is not None:
        # A resumed run keeps its saved config, but for the options a resume may change.
        if config is not None:
            raise ValueError("resume continues a run with its saved config; give the options "
                             "to change by name (epochs=, lr= ...), not a TrainConfig")
        return Trainer(resume=resume, progress=progress, overrides=options).fit()
    if config is None:
        config = TrainConfig.from_dict(options)
    elif options:
        raise ValueError("pass either a TrainConfig or options by name, not both")
    return Trainer(config, progress=progress).fit()
