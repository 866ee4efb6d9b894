"""Training machinery shared by the pretraining (train/pretrain.py) and fine-tuning jobs.

- `stages`: what each VLMo stage trains; FFN layouts that make frozen sets exact
  (`prepare_stage`, `export_state_dict`).
- `step`: `PretrainStep`, a whole step (losses + metrics) inside one `forward` (ZeRO-3 needs
  `engine(batch)`); `cached_itc_accumulation` (GradCache ITC over accumulated micro-batches).
- `optim`: AdamW parameter groups (no decay on biases, norms, scales, tables) and warmup + decay.
- `engine`: process group, DeepSpeed config checks, one engine per stage, fp32 weight export.
- `checkpoint`: atomic training checkpoints (`latest` moved last, keep-last-K) and exact resume.
- `logs`: per-step metrics synced every N steps, JSONL + TensorBoard, PNG curves.
- `pretrain`: the job (`main`), used by train/pretrain.py and `python -m vlmo_fast.demo`.
"""
from .stages import STAGES, export_state_dict, prepare_stage
from .step import PretrainStep, cached_itc_accumulation

__all__ = ["STAGES", "prepare_stage", "export_state_dict", "PretrainStep", "cached_itc_accumulation"]
