"""The training layer shared by the pretraining (train/pretrain.py) and fine-tuning
(train/finetune.py) jobs: one loop, one set of flags, one checkpoint format.

- `loop`: `TrainLoop`, THE training loop (micro-batches, non-finite policy, logging,
  checkpoints, resume) and the step protocol every step module follows.
- `args`: the flags every job shares (declared and checked once); `common`: `Batches`,
  `seed_all`, `to_device`, grad norm, peak memory.
- `stages`: what each VLMo stage trains; FFN layouts that make frozen sets exact
  (`prepare_stage`, `export_state_dict`).
- `step`: `PretrainStep`, a whole step (losses + metrics) inside one `forward` (ZeRO-3 needs
  `engine(batch)`); `cached_itc_accumulation` (GradCache ITC over accumulated micro-batches).
- `optim`: AdamW groups on the one weight-decay rule (`vlmo_fast.optim.is_decayed`), layer-wise
  lr decay, warmup + decay schedules.
- `engine`: process group, DeepSpeed config checks, one engine per stage, fp32 weight export.
- `checkpoint`: atomic checkpoints with integrity manifests and run lineage, scan-based
  resume; `resume`: run arguments recorded and checked, overrides, schedule segments;
  `faults`: fault injection for tests.
- `logs`: per-step metrics synced every N steps, append-only JSONL + TensorBoard, PNG curves.
- `pretrain`, `finetune`, `ablations`: the jobs (`main`).
"""
from .loop import TrainLoop
from .stages import STAGES, export_state_dict, prepare_stage
from .step import PretrainStep, cached_itc_accumulation

__all__ = ["TrainLoop", "STAGES", "prepare_stage", "export_state_dict", "PretrainStep",
           "cached_itc_accumulation"]
