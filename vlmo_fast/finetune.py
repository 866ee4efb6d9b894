"""Moved to `vlmo_fast.training.finetune` (the fine-tuning job runs on the training loop);
this name stays importable for existing code."""
from .training.finetune import *  # noqa: F401,F403
from .training.finetune import (DEFAULT_HEAD_LR_MULT, TASKS, NLVR2Step, RetrievalStep,  # noqa: F401
                                VQAStep, build_parser, finetune_param_groups, layer_id, main, run,
                                validate_args)
