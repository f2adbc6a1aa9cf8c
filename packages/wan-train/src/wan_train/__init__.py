"""LoRA and full fine-tuning of the Wan 2.1 and 2.2 models with the seed's (DiffSynth's) ``train.py`` flags.

Wan 2.2: TI2V-5B text- and image-to-video, and the A14B models one expert at a time (``--expert``).

``python -m wan_train --help`` lists the flags; :func:`main` is the same command as a function.
Library use: :func:`parse_args` -> :func:`train` (or :func:`build_cache`).
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

from wan_models import CheckpointError
from wan_runtime.files import Terminated, interrupt_on_sigterm
from wan_runtime.model_config import ModelFilesMissing

from .args import TrainingError, build_parser, parse_args
from .cache import CachedDataset, build_cache
from .dataset import VideoDataset
from .module import TrainingInputs, WanTrainingModule, load_pipeline
from .trainer import TrainResult, train

__all__ = [
    "CachedDataset", "TrainResult", "TrainingError", "TrainingInputs", "VideoDataset", "WanTrainingModule",
    "build_cache", "build_parser", "load_pipeline", "main", "parse_args", "train",
]

logger = logging.getLogger(__name__)


def _setup_logging() -> None:
    """INFO logs to stderr on the first process (warnings only on the others), unless logging is set up."""
    if logging.getLogger().handlers:
        return
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m wan_train [flags]``: train (or ``--cache_latents``). A bad input or a failed write exits
    with status 2, Ctrl-C with 130 and SIGTERM with 143, each with one error line; other errors are bugs."""
    _setup_logging()
    interrupt_on_sigterm()
    try:
        args = parse_args(argv)
        if args.cache_latents:
            build_cache(args)
        else:
            train(args)
    except KeyboardInterrupt as e:
        reason = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        logger.error("%s: stopped; the files being written were removed, complete ones are kept (continue "
                     "training with --resume)", reason)
        raise SystemExit(143 if isinstance(e, Terminated) else 130) from None
    except (ValueError, CheckpointError, ModelFilesMissing) as e:  # TrainingError is a ValueError
        logger.error("%s", _one_line(e))
        raise SystemExit(2) from None
    except OSError as e:  # a file that cannot be read or written: permissions, a full disk
        logger.error("%s", f"{e.filename}: {e.strerror}" if e.filename and e.strerror else _one_line(e))
        raise SystemExit(2) from None
    return 0
