"""The paper's ablations (VLMo, arXiv 2111.02358, Tables 4-7), rerunnable: `train/ablations.py`.

    python train/ablations.py --arms stagewise,ffn,tasks,hardneg,attention --seeds 3 \
        --budget small --output-dir runs/ablations

Arms (each compares variants with the arm's baseline, paired by seed):

| arm | paper | baseline | variants |
|---|---|---|---|
| stagewise | Table 4 | vision -> text -> vl | vl from random init; vision -> vl |
| ffn | Table 5 | MoME | one shared FFN (standard Transformer); MoME without the VL expert |
| tasks | Table 5 | ITC + ITM + MLM | ITC only; ITC + ITM (hard negatives) |
| hardneg | Table 6 | global hard negatives | local hard negatives (both on 2 processes) |
| attention | Table 7 | shared self-attention | separate self-attention per modality |

The baseline of stagewise, ffn, tasks and attention is the same run (VLMo's recipe), run once
per seed. Every variant is an ordinary `train/pretrain.py` run (`--stage all` plus the
variant's flags; the hardneg arm through the DeepSpeed launcher with 2 processes, so that the
global batch holds two ranks' rows and global and local negatives differ; its per-process
batch is half the budget's, so the global batch is the same) with the same data, steps and
seed as its baseline, followed by the same evaluations of its vl/final weights (the code of
`vlmo_fast.eval` and `vlmo_fast.training.finetune`, called in this process): zero-shot
retrieval (ITC, and the ITC+ITM re-rank) and zero-shot classification on each evaluation
split (embedded data: `test`, i.i.d., and `test_comp`, compositional), and a short NLVR2
fine-tune evaluated on the same splits.

Output folder:
    tokenizer/                    the one vocabulary every run uses (built once)
    runs/<variant>/seed<k>/       pretrain/ (the job's stages), eval/ (one JSON per
                                  evaluation), nlvr2/ (the fine-tune), *.log (the jobs' output)
    results/<variant>-seed<k>.json  one JSON per run: settings, metrics, timings
    summary.json, summary.md, ablations.png   mean +- 95 % CI per variant, the paired
                                  difference to the arm's baseline with its CI, a verdict

A rerun with the same settings skips every run whose result JSON exists; an interrupted run
resumes (the pretraining and fine-tuning jobs resume from their checkpoints and skip stages
whose final/DONE exists; evaluations whose JSON exists are not redone). Results written
with other settings are refused, not mixed.

Statistics: over seeds, mean +- t_{0.975, n-1} * sd / sqrt(n) (Student t, sd with n - 1).
Differences are paired by seed (variant - baseline on the same seed, hence the same data
and world); verdict per variant on the key metrics: "reproduces" when the CI of the
difference lies below zero (the variant is worse, as in the paper, whose choice is always
the baseline), "does not reproduce" when it lies above zero, "inconclusive" when it spans
zero or there are fewer than 2 seeds.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..io import atomic_write, atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[2]
PRETRAIN_SCRIPT = ROOT / "train" / "pretrain.py"


# --------------------------------------------------------------------------- arms

@dataclass(frozen=True)
class Variant:
    label: str                       # what the run is, in tables
    args: Tuple[str, ...] = ()       # train/pretrain.py flags on top of the budget's
    processes: int = 1               # > 1: the DeepSpeed launcher with this many processes


@dataclass(frozen=True)
class Arm:
    title: str                       # the paper's question, with its table
    baseline: str                    # variant name of the paper's choice
    variants: Tuple[str, ...]        # the alternatives compared with it


VARIANTS: Dict[str, Variant] = {
    "vlmo": Variant("VLMo: vision -> text -> vl, MoME, ITC+ITM+MLM, shared attention"),
    "vl_only": Variant("vl stage only, from random init", ("--stage", "vl", "--from-scratch")),
    "vision_vl": Variant("vision -> vl (no text stage)", ("--skip-text-stage",)),
    "shared_ffn": Variant("standard Transformer (one FFN for all modalities)", ("--ffn", "shared")),
    "no_vl_expert": Variant("MoME without the VL expert", ("--no-vl-expert",)),
    # weights the variant leaves out keep train/pretrain.py's defaults (the baseline's)
    "itc": Variant("ITC only", ("--loss-weights", "itm=0,mlm=0")),
    "itc_itm": Variant("ITC + ITM with hard negatives", ("--loss-weights", "mlm=0")),
    "hardneg_global": Variant("global hard negatives, 2 processes", ("--hard-negatives", "global"),
                              processes=2),
    "hardneg_local": Variant("local hard negatives, 2 processes", ("--hard-negatives", "local"),
                             processes=2),
    "per_modality_attention": Variant("separate self-attention per modality",
                                      ("--attention", "per_modality")),
}

ARMS: Dict[str, Arm] = {
    "stagewise": Arm("Table 4: stagewise pretraining", "vlmo", ("vl_only", "vision_vl")),
    "ffn": Arm("Table 5: MoME vs a standard Transformer, and the VL expert", "vlmo",
               ("shared_ffn", "no_vl_expert")),
    "tasks": Arm("Table 5: pretraining tasks", "vlmo", ("itc", "itc_itm")),
    "hardneg": Arm("Table 6: global vs local hard negatives", "hardneg_global", ("hardneg_local",)),
    "attention": Arm("Table 7: shared vs separate self-attention", "vlmo", ("per_modality_attention",)),
}


# --------------------------------------------------------------------------- budgets

def demo_pretrain_args() -> Tuple[str, ...]:
    """The demo's pretraining flags (vlmo_fast/demo.py) without the ones a runner sets itself
    (--stage, --output-dir, --resume): the `small` budget IS the demo's job, so whatever makes
    ITM learn there (steps, lr, loss weights) holds in every arm's baseline."""
    from ..demo import DEMO_ARGS
    own = {"--stage", "--output-dir", "--resume"}
    out, i = [], 0
    while i < len(DEMO_ARGS):
        flag = DEMO_ARGS[i]
        takes_value = i + 1 < len(DEMO_ARGS) and not DEMO_ARGS[i + 1].startswith("--")
        item = DEMO_ARGS[i:i + 2] if takes_value else DEMO_ARGS[i:i + 1]
        if flag not in own:
            out += item
        i += len(item)
    return tuple(out)


def flag_value(argv: Sequence[str], flag: str) -> Optional[str]:
    """The value of the last `flag` in argv (argparse's rule), or None."""
    value = None
    for i, item in enumerate(argv[:-1]):
        if item == flag:
            value = argv[i + 1]
    return value


@dataclass(frozen=True)
class Budget:
    """Everything a budget fixes: the model and pretraining schedule (train/pretrain.py flags,
    --batch-size being the global batch of a run) and the evaluations."""
    arms: Tuple[str, ...]            # arms run when --arms is not given
    seeds: int                       # seeds when --seeds is not given
    pretrain: Tuple[str, ...]
    eval_images: Optional[int] = None    # retrieval: first N images of each split (None: all)
    zeroshot_images: int = 200
    rerank_k: int = 16
    nlvr2_steps: int = 200
    nlvr2_batch_size: int = 32
    nlvr2_lr: float = 1e-3
    nlvr2_eval_items: Optional[int] = None
    runnable: bool = True
    note: str = ""

    @property
    def batch_size(self) -> int:
        value = flag_value(self.pretrain, "--batch-size")
        return 32 if value is None else int(value)   # 32: train/pretrain.py's default


BUDGETS: Dict[str, Budget] = {
    # CI smoke test: checks the plumbing, measures nothing (2 arms, 1 seed, a few steps).
    "tiny": Budget(arms=("ffn", "attention"), seeds=1,
                   pretrain=("--preset", "tiny", "--vision-steps", "2", "--text-steps", "2", "--vl-steps", "4",
                             "--batch-size", "8", "--lr", "2e-3", "--log-every", "1", "--save-every", "100"),
                   eval_images=16, zeroshot_images=16, rerank_k=4, nlvr2_steps=4, nlvr2_batch_size=8,
                   nlvr2_eval_items=16, note="plumbing only: a few steps on 32-pixel images"),
    # The committed run (2 CPU cores, a few hours): the demo's job (vlmo_fast/demo.py: tiny
    # preset at 64 pixels, batch 32, lr 2e-3, 100 + 100 + 800 steps when this was written),
    # evaluated on the whole test splits; a 200-step NLVR2 fine-tune.
    "small": Budget(arms=tuple(ARMS), seeds=3, pretrain=demo_pretrain_args(),
                    note="the demo's job: 0.5M parameters, 64-pixel images, the demo's vl steps"),
    # The paper's scale, documented only (GPUs, real data): base preset at 224 pixels, vision
    # stage from a BEiT checkpoint, vl stage 200k steps at batch 1024, lr 2e-4, warmup 2500,
    # AdamW (0.9, 0.98), weight decay 0.01 (train/pretrain.py's defaults); text stage as the
    # paper's (lr 2e-4, batch 1024, texts up to 196 tokens).
    "base": Budget(arms=tuple(ARMS), seeds=3,
                   pretrain=("--preset", "base", "--init-beit", "BEIT_CHECKPOINT", "--vl-steps", "200000",
                             "--batch-size", "1024", "--lr", "2e-4", "--warmup-steps", "2500"),
                   runnable=False,
                   note="the paper's settings (base preset, 224 px, BEiT vision stage, 200k vl steps at "
                        "batch 1024, lr 2e-4): documented only, for GPUs"),
}

# the metrics every verdict is given on (the paper's tables report retrieval and NLVR2)
KEY_METRICS = ("retrieval_{split}_mean", "nlvr2_{split}_acc")
REPRODUCES, NOT_REPRODUCED, INCONCLUSIVE = "reproduces", "does not reproduce", "inconclusive"


# --------------------------------------------------------------------------- statistics

def _continued_fraction_beta(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz method)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    return h


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and x in [0, 1]."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    # the fraction converges fast on this side of the mode; the symmetry covers the other
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _continued_fraction_beta(a, b, x) / a
    return 1.0 - math.exp(log_front) * _continued_fraction_beta(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def student_t_quantile(p: float, df: int) -> float:
    """The t with P(T <= t) = p (bisection on the CDF, to ~1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be an int >= 1, got {df!r}")
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while student_t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if student_t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Interval:
    """A mean over n values with the half-width of its confidence interval (None: n < 2)."""
    mean: float
    half_width: Optional[float]
    n: int

    @property
    def low(self) -> Optional[float]:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> Optional[float]:
        return None if self.half_width is None else self.mean + self.half_width

    def to_dict(self) -> Dict:
        return {"mean": self.mean, "half_width": self.half_width, "low": self.low, "high": self.high,
                "n": self.n}


def mean_ci(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean and the Student-t confidence interval of the mean (sd with n - 1)."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_ci needs at least one value")
    if not all(math.isfinite(v) for v in xs):
        raise ValueError(f"mean_ci: non-finite values {xs}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return Interval(mean, None, n)
    sd = math.sqrt(sum((v - mean) ** 2 for v in xs) / (n - 1))
    return Interval(mean, student_t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n), n)


def paired_differences(variant: Dict[int, float], baseline: Dict[int, float]) -> Dict[int, float]:
    """variant - baseline for every seed both have (the pairing: same seed, same data)."""
    return {s: variant[s] - baseline[s] for s in sorted(set(variant) & set(baseline))}


def verdict(difference: Interval) -> str:
    """The paper's choice is the baseline, so the paper predicts variant - baseline < 0."""
    if difference.half_width is None:
        return INCONCLUSIVE
    if difference.high < 0:
        return REPRODUCES
    if difference.low > 0:
        return NOT_REPRODUCED
    return INCONCLUSIVE


# --------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class Run:
    variant: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.variant}-seed{self.seed}"

    def folder(self, out_dir: Path) -> Path:
        """Where the run's jobs write (pretrain/, eval/, nlvr2/, logs)."""
        return out_dir / "runs" / self.variant / f"seed{self.seed}"

    def result_path(self, out_dir: Path) -> Path:
        return out_dir / "results" / f"{self.name}.json"


def parse_arms(text: Optional[str], budget: Budget) -> Tuple[str, ...]:
    if text is None:
        return budget.arms
    arms = tuple(a.strip() for a in text.split(",") if a.strip())
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise ValueError(f"--arms: unknown arm(s) {unknown or [text]}; expected a comma-separated "
                         f"subset of {','.join(ARMS)}")
    if len(set(arms)) != len(arms):
        raise ValueError(f"--arms names an arm twice: {text}")
    return arms


def plan_runs(arms: Sequence[str], seeds: int) -> List[Run]:
    """Every (variant, seed) the arms need, each once, seed by seed (so that an interrupted
    plan has whole seeds done first)."""
    runs: List[Run] = []
    for seed in range(seeds):
        for arm in arms:
            for variant in (ARMS[arm].baseline, *ARMS[arm].variants):
                if Run(variant, seed) not in runs:
                    runs.append(Run(variant, seed))
    return runs


@dataclass
class Settings:
    """What the results of a run depend on (a result written with other settings is refused)."""
    budget: str
    data: str
    tokenizer: str
    eval_data: str
    eval_splits: Tuple[str, ...]
    zeroshot_data: Optional[str]
    nlvr2_data: Optional[str]
    nlvr2_eval_data: Optional[str]
    image_root: Optional[str]
    budget_values: Dict

    def to_dict(self) -> Dict:
        d = asdict(self)
        d["eval_splits"] = list(self.eval_splits)
        return d


# --------------------------------------------------------------------------- arguments

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train/ablations.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--arms", default=None, help=f"comma-separated subset of {','.join(ARMS)} (default: the budget's)")
    a("--seeds", type=int, default=None, help="seeds 0..N-1 per variant (default: the budget's)")
    a("--budget", default="small", choices=list(BUDGETS),
      help="tiny: CI smoke test; small: the committed run (hours on 2 CPU cores); base: the "
           "paper's settings, documented only")
    a("--output-dir", required=True, help="tokenizer/, runs/, results/, summary.{json,md}, ablations.png")
    a("--data", default="embedded", help="'embedded' or a path vlmo_fast.data reads (manifest, "
      "Karpathy JSON, image folder, tar shards)")
    a("--tokenizer", default=None, help="'embedded', a vocabulary file or saved tokenizer folder, or "
      "train:CORPUS (built once, shared by every run; default: embedded for embedded data)")
    a("--vocab-size", type=int, default=1000, help="size of a trained vocabulary (embedded or train:)")
    a("--eval-data", default=None, help="retrieval evaluation source for --data PATH (default: --data "
      "itself, i.e. the training data, which the results then say)")
    a("--eval-splits", default=None, help="comma-separated evaluation splits (default: test,test_comp "
      "for embedded data, test for files; a manifest has no splits)")
    a("--zeroshot-data", default=None, help="for --data PATH: a folder with one subfolder per class for "
      "zero-shot classification (skipped without it)")
    a("--nlvr2-data", default=None, help="for --data PATH: an NLVR2 JSONL to fine-tune on (with "
      "--nlvr2-eval-data; skipped without them)")
    a("--nlvr2-eval-data", default=None, help="the NLVR2 JSONL the fine-tuned model is evaluated on")
    a("--image-root", default=None, help="folder the NLVR2 / evaluation files' image paths are relative to")
    a("--jobs", type=int, default=1, help="runs at a time, each in its own process (one core each: "
      "on a 2-core machine --jobs 2 nearly halves the wall time; the results do not depend on it)")
    a("--dry-run", action="store_true", help="print the runs and their commands, run nothing")
    # internal: the one run a --jobs child process executes (no summary)
    a("--only-run", default=None, help=argparse.SUPPRESS)
    return p


def validate_args(args) -> Tuple[Budget, Tuple[str, ...]]:
    budget = BUDGETS[args.budget]
    arms = parse_arms(args.arms, budget)
    if args.seeds is not None and args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    if args.vocab_size < 8:
        raise ValueError(f"--vocab-size must be >= 8, got {args.vocab_size}")
    embedded = args.data == "embedded"
    if not embedded:
        from ..data.sources import check_data_source
        try:
            check_data_source(args.data)   # a path, a shard pattern, pipe: or a URL; reads no shard
        except (FileNotFoundError, ImportError, ValueError) as e:
            raise ValueError(f"--data: {e}") from None
        if not Path(args.data).exists() and args.eval_data is None:
            raise ValueError(f"--data {args.data} is a shard stream: give --eval-data (a retrieval file: a "
                             "manifest or Karpathy JSON) to evaluate the runs on")
    if not embedded and args.tokenizer is None:
        raise ValueError("--tokenizer is required with --data PATH (a vocabulary file or folder, or "
                         "train:CORPUS)")
    if args.tokenizer is not None:
        from ..data.tokenizer import resolve_tokenizer_source
        try:
            resolve_tokenizer_source(args.tokenizer)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"--tokenizer: {e}") from None
    for flag in ("eval_data", "zeroshot_data", "nlvr2_data", "nlvr2_eval_data", "image_root"):
        value = getattr(args, flag)
        if value is None:
            continue
        if embedded:
            raise ValueError(f"--{flag.replace('_', '-')} is for --data PATH (the embedded world brings "
                             "its own evaluation sets)")
        if not Path(value).exists():
            raise ValueError(f"--{flag.replace('_', '-')} {value}: no such file or folder")
    if (args.nlvr2_data is None) != (args.nlvr2_eval_data is None):
        raise ValueError("--nlvr2-data and --nlvr2-eval-data go together (fine-tune on one, evaluate on "
                         "the other)")
    if args.zeroshot_data is not None and not Path(args.zeroshot_data).is_dir():
        raise ValueError(f"--zeroshot-data {args.zeroshot_data}: not a folder (expected one subfolder per class)")
    if args.eval_splits is not None and not [s for s in args.eval_splits.split(",") if s.strip()]:
        raise ValueError("--eval-splits names no split")
    if embedded and args.eval_splits is not None:
        from ..data import SPLITS
        bad = [s for s in _splits(args) if s not in SPLITS]
        if bad:
            raise ValueError(f"--eval-splits: {bad} are not embedded-world splits {SPLITS}")
    if not budget.runnable and not args.dry_run:
        raise ValueError(f"--budget {args.budget} is {budget.note}: this runner does not run it "
                         "(see benchmarks/results/ablations/README.md; --dry-run prints its plan)")
    return budget, arms


def _splits(args) -> Tuple[str, ...]:
    if args.eval_splits is not None:
        return tuple(s.strip() for s in args.eval_splits.split(",") if s.strip())
    return ("test", "test_comp") if args.data == "embedded" else ("test",)


def _settings(args, budget: Budget) -> Settings:
    def absolute(v):   # local paths made absolute; shard patterns and URLs as given
        return None if v is None else (str(Path(v).resolve()) if Path(v).exists() else str(v))
    embedded = args.data == "embedded"
    return Settings(budget=args.budget, data="embedded" if embedded else absolute(args.data),
                    tokenizer=args.tokenizer or "embedded",
                    eval_data="embedded" if embedded else absolute(args.eval_data or args.data),
                    eval_splits=_splits(args), zeroshot_data=absolute(args.zeroshot_data),
                    nlvr2_data=absolute(args.nlvr2_data), nlvr2_eval_data=absolute(args.nlvr2_eval_data),
                    image_root=absolute(args.image_root),
                    budget_values={k: list(v) if isinstance(v, tuple) else v for k, v in asdict(budget).items()
                                   if k not in ("arms", "seeds", "note")})


# --------------------------------------------------------------------------- one run

def pretrain_argv(run: Run, budget: Budget, settings: Settings, tokenizer_dir: Path, out: Path) -> List[str]:
    """The train/pretrain.py arguments of a run: the budget's flags, the run's own, then the
    variant's (a later flag wins: `--stage vl` replaces `--stage all`). A run of several
    processes gets the budget's batch split over them (the same global batch)."""
    variant = VARIANTS[run.variant]
    schedule = list(budget.pretrain)
    if "--batch-size" in schedule:   # the global batch, split over the processes
        schedule[schedule.index("--batch-size") + 1] = str(budget.batch_size // variant.processes)
    else:
        schedule += ["--batch-size", str(budget.batch_size // variant.processes)]
    argv = ["--stage", "all", *schedule, "--output-dir", str(out), "--seed", str(run.seed), "--data", settings.data,
            "--tokenizer", str(tokenizer_dir), "--resume", "auto", "--no-eval", "--no-progress"]
    return argv + list(variant.args)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def _output_to(log: Path):
    """The jobs' own lines go to the run's log file: the console shows one line per run."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield


def _launch_pretraining(argv: List[str], processes: int, log: Path) -> None:
    """The DeepSpeed launcher with `processes` processes (gloo on CPU); output to `log`."""
    if not PRETRAIN_SCRIPT.is_file():
        raise FileNotFoundError(f"{PRETRAIN_SCRIPT} is missing: a {processes}-process run needs the "
                                "repository's train/pretrain.py")
    launcher = Path(sys.executable).with_name("deepspeed")
    if not launcher.is_file():
        raise FileNotFoundError(f"the DeepSpeed launcher is not beside {sys.executable} ({launcher}): "
                                "pip install deepspeed")
    # the child processes take their rank and world from the launcher, not from this
    # process's world of one
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [str(launcher), "--num_gpus", str(processes), "--master_port", str(_free_port()),
           str(PRETRAIN_SCRIPT), *argv]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        kind = ValueError if rc == 2 else RuntimeError   # 2: the job's user-error exit
        raise kind(f"the {processes}-process pretraining exited with status {rc}; the end of {log}:\n"
                   f"{_tail(log)}")


def _evaluate(task: str, checkpoint: Path, out: Path, split: str, seed: int, data: str, *,
              num_items: Optional[int], batch_size: int = 64, rerank_k: int = 16,
              image_root: Optional[str] = None) -> Dict:
    """One `vlmo_fast.eval` evaluation, written to `out` (kept: a rerun reads it back)."""
    if out.is_file():
        return json.loads(out.read_text())
    from ..eval.runner import build_parser as eval_parser
    from ..eval.runner import run as run_eval
    argv = ["--task", task, "--checkpoint", str(checkpoint), "--data", data, "--split", split,
            "--seed", str(seed), "--batch-size", str(batch_size), "--rerank-k", str(rerank_k),
            "--out", str(out), "--no-progress"]
    if num_items is not None:
        argv += ["--num-items", str(num_items)]
    if image_root is not None:
        argv += ["--image-root", image_root]
    return run_eval(eval_parser().parse_args(argv))


def _finetune_nlvr2(init: Path, out: Path, seed: int, budget: Budget, data: str,
                    image_root: Optional[str]) -> Path:
    log_every = min(50, budget.nlvr2_steps)
    """The short NLVR2 fine-tune (`vlmo_fast.training.finetune`); resumes, skips when done."""
    from .finetune import build_parser as finetune_parser
    from .finetune import run as run_finetune
    argv = ["--task", "nlvr2", "--init", str(init), "--output-dir", str(out), "--data", data,
            "--steps", str(budget.nlvr2_steps), "--batch-size", str(budget.nlvr2_batch_size),
            "--lr", repr(budget.nlvr2_lr), "--seed", str(seed), "--log-every", str(log_every),
            "--save-every", str(budget.nlvr2_steps), "--resume", "auto",
            "--no-eval", "--no-progress"]
    if image_root is not None:
        argv += ["--image-root", image_root]
    run_finetune(finetune_parser().parse_args(argv))
    return out / "final"


def _retrieval_metrics(result: Dict, split: str) -> Dict[str, float]:
    itc = result["metrics"]["itc"]
    out = {f"retrieval_{split}_r1": 0.5 * (itc["i2t_r1"] + itc["t2i_r1"]),
           f"retrieval_{split}_r10": 0.5 * (itc["i2t_r10"] + itc["t2i_r10"]),
           f"retrieval_{split}_mean": itc["mean"]}
    rerank = result["metrics"].get("itc_itm_rerank")
    if rerank:
        out[f"rerank_{split}_mean"] = rerank["mean"]
    return out


def execute_run(run: Run, budget: Budget, settings: Settings, out_dir: Path, tokenizer_dir: Path) -> Dict:
    """Pretrain (resuming), evaluate, fine-tune NLVR2 and evaluate it: the run's result dict."""
    from .pretrain import build_parser as pretrain_parser
    from .pretrain import run as run_pretrain
    variant = VARIANTS[run.variant]
    run_dir = run.folder(out_dir)
    pretrain_dir = run_dir / "pretrain"
    argv = pretrain_argv(run, budget, settings, tokenizer_dir, pretrain_dir)
    final = pretrain_dir / "vl" / "final"
    timings = {}
    t0 = time.perf_counter()
    if not (final / "DONE").is_file():
        if variant.processes > 1:
            _launch_pretraining(argv, variant.processes, run_dir / "pretrain.log")
        else:
            with _output_to(run_dir / "pretrain.log"):
                run_pretrain(pretrain_parser().parse_args(argv))
        if not (final / "DONE").is_file():
            raise RuntimeError(f"{run.name}: pretraining ended without {final / 'DONE'}; see "
                               f"{run_dir / 'pretrain.log'}")
    timings["pretrain_s"] = time.perf_counter() - t0

    metrics: Dict[str, float] = {}
    chance: Dict[str, float] = {}
    evaluations: Dict[str, str] = {}
    skipped: List[str] = []
    eval_dir = run_dir / "eval"
    t0 = time.perf_counter()
    with _output_to(run_dir / "eval.log"):
        for split in settings.eval_splits:
            path = eval_dir / f"retrieval-{split}.json"
            res = _evaluate("retrieval", final, path, split, run.seed, settings.eval_data,
                            num_items=budget.eval_images, rerank_k=budget.rerank_k,
                            image_root=settings.image_root)
            metrics.update(_retrieval_metrics(res, split))
            chance[f"retrieval_{split}_r1"] = 0.5 * (res["chance"]["i2t_r1"] + res["chance"]["t2i_r1"])
            evaluations[f"retrieval_{split}"] = str(path)
            zeroshot_data = "embedded" if settings.data == "embedded" else settings.zeroshot_data
            if zeroshot_data is None:
                skipped.append(f"zeroshot_{split}")
            else:
                path = eval_dir / f"zeroshot-{split}.json"
                res = _evaluate("zeroshot", final, path, split, run.seed, zeroshot_data,
                                num_items=budget.zeroshot_images)
                metrics[f"zeroshot_{split}_top1"] = res["metrics"]["top1"]
                chance[f"zeroshot_{split}_top1"] = res["chance"]["top1"]
                evaluations[f"zeroshot_{split}"] = str(path)
    timings["zero_shot_eval_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    nlvr2_train = "embedded" if settings.data == "embedded" else settings.nlvr2_data
    if nlvr2_train is None:
        skipped += [f"nlvr2_{split}" for split in settings.eval_splits]
    else:
        with _output_to(run_dir / "nlvr2.log"):
            tuned = _finetune_nlvr2(final, run_dir / "nlvr2", run.seed, budget, nlvr2_train, settings.image_root)
            nlvr2_eval = "embedded" if settings.data == "embedded" else settings.nlvr2_eval_data
            for split in settings.eval_splits:
                path = eval_dir / f"nlvr2-{split}.json"
                res = _evaluate("nlvr2", tuned, path, split, run.seed, nlvr2_eval,
                                num_items=budget.nlvr2_eval_items, image_root=settings.image_root)
                metrics[f"nlvr2_{split}_acc"] = res["metrics"]["accuracy"]
                chance[f"nlvr2_{split}_acc"] = res["chance"]["accuracy"]
                evaluations[f"nlvr2_{split}"] = str(path)
    timings["nlvr2_s"] = time.perf_counter() - t0

    vl_log = pretrain_dir / "vl" / "metrics.jsonl"
    last = _last_metrics(vl_log)
    metrics.update(vl_training_tail(vl_log))
    if "itm_train_acc" in metrics:
        chance["itm_train_acc"] = ITM_PRIOR_ACCURACY
    return {"run": run.name, "variant": run.variant, "label": variant.label, "seed": run.seed,
            "processes": variant.processes, "settings": settings.to_dict(),
            "pretrain_argv": argv, "weights": str(final), "metrics": metrics, "chance": chance,
            "skipped": skipped, "evaluations": evaluations, "last_vl_step": last,
            "timings": timings, "eval_on_training_data": settings.data != "embedded"
            and settings.eval_data == settings.data}


# ITM rows per image-text pair: 1 positive, 2 negatives; predicting "no match" always is right
# on 2 of 3, the accuracy a model that learned nothing reaches
ITM_PRIOR_ACCURACY = 2.0 / 3.0
TAIL_FRACTION = 0.1


def vl_training_tail(path: Path) -> Dict[str, float]:
    """ITM accuracy and loss averaged over the last 10 % of the vl stage's logged steps
    (one batch is too few rows to say whether ITM learned): {"itm_train_acc", "itm_train_loss"},
    or {} without a vl log (a run without ITM rows logs none)."""
    from .logs import read_metrics
    rows = [r for r in read_metrics(path) if "itm_acc" in r and "itm" in r]
    if not rows:
        return {}
    tail = rows[-max(1, int(round(TAIL_FRACTION * len(rows)))):]
    return {"itm_train_acc": sum(float(r["itm_acc"]) for r in tail) / len(tail),
            "itm_train_loss": sum(float(r["itm"]) for r in tail) / len(tail)}


def _complete_result(result: Dict, path: Path, run_dir: Path) -> Dict:
    """A result written before the runner recorded the vl stage's ITM tail gets it from the
    run's own metrics log (when the run folder is there), and is written back."""
    metrics = result.get("metrics")
    if not isinstance(metrics, dict) or "itm_train_acc" in metrics:
        return result
    tail = vl_training_tail(run_dir / "pretrain" / "vl" / "metrics.jsonl")
    if tail:
        metrics.update(tail)
        result.setdefault("chance", {})["itm_train_acc"] = ITM_PRIOR_ACCURACY
        atomic_write_json(path, result)
    return result


def _last_metrics(path: Path) -> Dict:
    """The vl stage's last logged training metrics (ITM accuracy, losses), for the record."""
    if not path.is_file():
        return {}
    from .logs import read_metrics
    rows = read_metrics(path)
    if not rows:
        return {}
    keep = ("step", "loss", "itc", "itc_vl", "itm", "itm_acc", "mlm", "mlm_acc")
    return {k: rows[-1][k] for k in keep if k in rows[-1]}


# --------------------------------------------------------------------------- summary

def headline_metric(splits: Sequence[str]) -> str:
    return KEY_METRICS[0].format(split=splits[0])


def summarize(results: Sequence[Dict], arms: Sequence[str], splits: Sequence[str]) -> Dict:
    """Per variant: mean +- CI of every metric over seeds; per arm and variant: the paired
    difference to the baseline and, on the key metrics, a verdict."""
    by_variant: Dict[str, Dict[str, Dict[int, float]]] = {}
    for r in results:
        for metric, value in r["metrics"].items():
            by_variant.setdefault(r["variant"], {}).setdefault(metric, {})[int(r["seed"])] = float(value)
    variants = {}
    for name, metrics in by_variant.items():
        variants[name] = {"label": VARIANTS[name].label,
                          "seeds": sorted({s for values in metrics.values() for s in values}),
                          "metrics": {m: {**mean_ci(list(v.values())).to_dict(), "values": v}
                                      for m, v in sorted(metrics.items())}}
    key_metrics = [k.format(split=s) for k in KEY_METRICS for s in splits[:1]]
    arm_rows = {}
    for arm in arms:
        spec = ARMS[arm]
        base = by_variant.get(spec.baseline, {})
        comparisons = {}
        for name in spec.variants:
            comp = {}
            for metric, values in sorted(by_variant.get(name, {}).items()):
                diffs = paired_differences(values, base.get(metric, {}))
                if not diffs:
                    continue
                interval = mean_ci(list(diffs.values()))
                entry = {**interval.to_dict(), "differences": diffs}
                if metric in key_metrics:
                    entry["verdict"] = verdict(interval)
                comp[metric] = entry
            comparisons[name] = comp
        arm_rows[arm] = {"title": spec.title, "baseline": spec.baseline, "comparisons": comparisons}
    return {"variants": variants, "arms": arm_rows, "key_metrics": key_metrics,
            "headline": headline_metric(splits), "splits": list(splits),
            "rules": {"interval": "mean +- t(0.975, n-1) * sd / sqrt(n), sd with n-1 (Student t)",
                      "difference": "variant - baseline, paired by seed",
                      "verdict": f"'{REPRODUCES}': CI of the difference below 0 (the paper's choice, "
                                 f"the baseline, is better); '{NOT_REPRODUCED}': above 0; "
                                 f"'{INCONCLUSIVE}': spans 0 or fewer than 2 seeds"}}


def _pct(interval: Dict, signed: bool = False) -> str:
    sign = "+" if signed else ""
    text = f"{100 * interval['mean']:{sign}.1f}"
    if interval.get("half_width") is not None:
        text += f" ± {100 * interval['half_width']:.1f}"
    return text


def _table_metrics(summary: Dict) -> List[str]:
    present = {m for v in summary["variants"].values() for m in v["metrics"]}
    order = []
    for split in summary["splits"]:
        order += [f"retrieval_{split}_mean", f"retrieval_{split}_r1", f"retrieval_{split}_r10",
                  f"rerank_{split}_mean", f"zeroshot_{split}_top1", f"nlvr2_{split}_acc"]
    order.append("itm_train_acc")
    return [m for m in order if m in present]


METRIC_NAMES = {"retrieval_{}_mean": "retrieval mean R ({})", "retrieval_{}_r1": "R@1 ({})",
                "retrieval_{}_r10": "R@10 ({})", "zeroshot_{}_top1": "zero-shot top-1 ({})",
                "nlvr2_{}_acc": "NLVR2 acc ({})", "rerank_{}_mean": "ITC+ITM re-rank mean R ({})"}
SPLITLESS_METRIC_NAMES = {"itm_train_acc": "ITM acc (train, last 10 % of vl)",
                          "itm_train_loss": "ITM loss (train, last 10 % of vl)"}


def metric_name(metric: str, splits: Sequence[str]) -> str:
    if metric in SPLITLESS_METRIC_NAMES:
        return SPLITLESS_METRIC_NAMES[metric]
    for split in sorted(splits, key=len, reverse=True):   # test_comp before test
        for pattern, name in METRIC_NAMES.items():
            if metric == pattern.format(split):
                return name.format(split)
    return metric


def markdown(summary: Dict) -> str:
    """The summary table (percent, mean ± 95 % CI half-width over seeds) and one verdict line
    per arm and variant."""
    splits = summary["splits"]
    metrics = _table_metrics(summary)
    keys = summary["key_metrics"]
    head = ["arm", "variant", "seeds"] + [metric_name(m, splits) for m in metrics]
    head += [f"Δ {metric_name(k, splits)} vs baseline" for k in keys] + ["verdicts"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, row in summary["arms"].items():
        for name in (row["baseline"], *row["comparisons"]):
            v = summary["variants"].get(name)
            if v is None:
                continue
            cells = [arm, v["label"] + (" (baseline)" if name == row["baseline"] else ""), str(len(v["seeds"]))]
            cells += [_pct(v["metrics"][m]) if m in v["metrics"] else "-" for m in metrics]
            comp = row["comparisons"].get(name, {})
            cells += [_pct(comp[k], signed=True) if k in comp else "-" for k in keys]
            cells.append(", ".join(comp[k]["verdict"] for k in keys if k in comp) or "-")
            lines.append("| " + " | ".join(cells) + " |")
    out = ["\n".join(lines), ""]
    for arm, row in summary["arms"].items():
        for name, comp in row["comparisons"].items():
            parts = [f"{metric_name(k, splits)} {_pct(comp[k], signed=True)} points: {comp[k]['verdict']}"
                     for k in keys if k in comp]
            if parts:
                out.append(f"- {row['title']}: {VARIANTS[name].label} vs {VARIANTS[row['baseline']].label}: "
                           + "; ".join(parts) + ".")
    return "\n".join(out) + "\n"


def plot(summary: Dict, path: Path) -> Optional[Path]:
    """Bar chart per key metric: each arm's baseline and variants, 95 % CI error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [k for k in summary["key_metrics"]
            if any(k in v["metrics"] for v in summary["variants"].values())]
    if not keys:
        return None
    bars = [(arm, name) for arm, row in summary["arms"].items()
            for name in (row["baseline"], *row["comparisons"]) if name in summary["variants"]]
    fig, axes = plt.subplots(len(keys), 1, figsize=(max(6, 0.8 * len(bars) + 2), 3.2 * len(keys)), squeeze=False)
    colours = {arm: plt.cm.tab10(i % 10) for i, arm in enumerate(summary["arms"])}
    for ax, key in zip(axes[:, 0], keys):
        means, errors, labels, colour = [], [], [], []
        for arm, name in bars:
            m = summary["variants"][name]["metrics"].get(key)
            means.append(100 * m["mean"] if m else float("nan"))
            errors.append(100 * m["half_width"] if m and m["half_width"] is not None else 0.0)
            labels.append(f"{arm}\n{name}" + ("*" if name == summary["arms"][arm]["baseline"] else ""))
            colour.append(colours[arm])
        ax.bar(range(len(bars)), means, yerr=errors, capsize=3, color=colour)
        ax.set_xticks(range(len(bars)))
        ax.set_xticklabels(labels, fontsize=7, rotation=45, ha="right")
        ax.set_ylabel("%")
        ax.set_title(f"{metric_name(key, summary['splits'])}: mean ± 95 % CI over seeds (* = arm baseline)",
                     fontsize=9)
    fig.tight_layout()
    buf = __import__("io").BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return atomic_write(path, lambda p: Path(p).write_bytes(buf.getvalue()))


def write_summary(out_dir: Path, results: Sequence[Dict], arms: Sequence[str], splits: Sequence[str]) -> Dict:
    summary = summarize(results, arms, splits)
    atomic_write_json(out_dir / "summary.json", summary)
    atomic_write_text(out_dir / "summary.md", markdown(summary))
    plot(summary, out_dir / "ablations.png")
    return summary


# --------------------------------------------------------------------------- the job

def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _tokenizer_folder(args, out_dir: Path) -> Path:
    """Build the run's vocabulary once (every run loads this folder: identical ids)."""
    from ..data import build_tokenizer
    folder = out_dir / "tokenizer"
    source = args.tokenizer or "embedded"
    record = folder / "source.json"
    wanted = {"source": source, "vocab_size": args.vocab_size}
    if (folder / "vocab.txt").is_file() and record.is_file():
        found = json.loads(record.read_text())
        if found != wanted:
            raise ValueError(f"{out_dir} was built with tokenizer {found}, not {wanted}: use another "
                             "--output-dir")
        return folder
    tok = build_tokenizer(source=source, vocab_size=args.vocab_size)
    tok.save(folder)
    atomic_write_json(record, wanted)
    return folder


def _load_result(path: Path, settings: Settings) -> Optional[Dict]:
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); delete it to redo that run") from None
    found = result.get("settings") if isinstance(result, dict) else None
    differ = _differences(found if isinstance(found, dict) else {}, settings.to_dict())
    if differ:
        raise ValueError(f"{path} holds a run made with other settings (they differ in {', '.join(differ)}); "
                         "use another --output-dir or delete it")
    variant, seed = result.get("variant"), result.get("seed")
    if isinstance(variant, str) and isinstance(seed, int):
        result = _complete_result(result, path, Run(variant, seed).folder(path.parent.parent))
    return result


def _differences(found: Dict, wanted: Dict, prefix: str = "") -> List[str]:
    """The (dotted) keys whose values differ between two settings dicts."""
    out = []
    for key in sorted(set(found) | set(wanted)):
        a, b = found.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(prefix + key)
    return out


def run(args) -> Dict:
    budget, arms = validate_args(args)
    seeds = args.seeds if args.seeds is not None else budget.seeds
    out_dir = Path(args.output_dir)
    settings = _settings(args, budget)
    runs = plan_runs(arms, seeds)
    if args.only_run is not None:
        runs = [r for r in runs if r.name == args.only_run]
        if not runs:
            raise ValueError(f"--only-run {args.only_run}: not a run of this plan")
    print(f"ablations: budget {args.budget} ({budget.note}); arms {','.join(arms)}; {seeds} seed(s); "
          f"{len(runs)} runs -> {out_dir}", flush=True)
    if args.dry_run:
        if not budget.runnable:
            print("documented only; its settings: " + json.dumps(
                {k: v for k, v in asdict(budget).items() if k not in ("runnable", "note")}), flush=True)
            return {"runs": [r.name for r in runs]}
        for r in runs:
            argv = pretrain_argv(r, budget, settings, out_dir / "tokenizer",
                                 r.folder(out_dir) / "pretrain")
            launcher = (f"deepspeed --num_gpus {VARIANTS[r.variant].processes} "
                        if VARIANTS[r.variant].processes > 1 else "python ")
            print(f"{r.name}: {launcher}train/pretrain.py " + shlex.join(argv))
        return {"runs": [r.name for r in runs]}
    if args.data != "embedded" and args.eval_data is None:
        print(f"note: retrieval is evaluated on --data {args.data} itself (the training data): give "
              "--eval-data for a held-out set", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = _tokenizer_folder(args, out_dir)
    import torch
    threads = torch.get_num_threads()
    if "OMP_NUM_THREADS" not in os.environ:
        # as the demo: one intra-op thread on the shared 2-core machine (two were slower)
        torch.set_num_threads(1)
    try:
        if args.only_run is not None:
            return _execute_and_record(runs[0], budget, settings, out_dir, tokenizer_dir)
        if args.jobs > 1:
            return _run_plan_in_processes(runs, args, settings, out_dir, arms)
        return _run_plan(runs, budget, settings, out_dir, tokenizer_dir, arms)
    finally:
        torch.set_num_threads(threads)


def _run_plan(runs: Sequence[Run], budget: Budget, settings: Settings, out_dir: Path, tokenizer_dir: Path,
              arms: Sequence[str]) -> Dict:
    headline = headline_metric(settings.eval_splits)
    results, spent = [], []
    for i, r in enumerate(runs, 1):
        result = _load_result(r.result_path(out_dir), settings)
        if result is not None:
            results.append(result)
            print(f"[{i}/{len(runs)}] {r.name}: finished earlier ({_headline_text(result, headline)})", flush=True)
            continue
        try:
            result = _execute_and_record(r, budget, settings, out_dir, tokenizer_dir)
        except BaseException:
            print(f"[{i}/{len(runs)}] {r.name}: failed; its logs are in {r.folder(out_dir)} (a rerun resumes it)",
                  file=sys.stderr, flush=True)
            raise
        results.append(result)
        spent.append(result["timings"]["total_s"])
        _print_finished(i, len(runs), r.name, result, headline, spent, len(runs) - i)
    return _summarize_and_print(out_dir, results, arms, settings.eval_splits)


def _print_finished(done: int, total: int, name: str, result: Dict, headline: str, spent: Sequence[float],
                    rounds_left: int) -> None:
    """The one progress line per finished run; the time left is rounds_left x the mean run time."""
    eta = _duration(rounds_left * sum(spent) / len(spent)) if rounds_left else "0s"
    print(f"[{done}/{total}] {name}: {_headline_text(result, headline)} in {_duration(spent[-1])}; "
          f"~{eta} left", flush=True)


def _summarize_and_print(out_dir: Path, results: Sequence[Dict], arms: Sequence[str],
                         splits: Sequence[str]) -> Dict:
    summary = write_summary(out_dir, results, arms, splits)
    print(markdown(summary), end="", flush=True)
    print(f"saved {out_dir / 'summary.md'}, {out_dir / 'summary.json'}, {out_dir / 'ablations.png'}", flush=True)
    return summary


def _execute_and_record(run: Run, budget: Budget, settings: Settings, out_dir: Path,
                        tokenizer_dir: Path) -> Dict:
    """execute_run, timed, its result written atomically to results/<run>.json."""
    t0 = time.perf_counter()
    result = execute_run(run, budget, settings, out_dir, tokenizer_dir)
    result["timings"]["total_s"] = time.perf_counter() - t0
    atomic_write_json(run.result_path(out_dir), result)
    return result


def _run_plan_in_processes(runs: Sequence[Run], args, settings: Settings, out_dir: Path,
                           arms: Sequence[str]) -> Dict:
    """--jobs N: up to N runs at a time, each a child process of this runner with --only-run
    (its own seeds, process group and threads: a run's results are those of a sequential
    plan). Progress and the summary as in `_run_plan`; the first failure stops launching new
    runs, lets the running ones finish (their results are kept) and raises."""
    headline = headline_metric(settings.eval_splits)
    results: Dict[str, Dict] = {}
    pending = []
    for r in runs:
        found = _load_result(r.result_path(out_dir), settings)
        if found is None:
            pending.append(r)
        else:
            results[r.name] = found
            print(f"[{len(results)}/{len(runs)}] {r.name}: finished earlier "
                  f"({_headline_text(found, headline)})", flush=True)
    base = [sys.executable, "-m", "vlmo_fast.training.ablations", *_child_args(args)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    running: Dict[str, Tuple[subprocess.Popen, float, Run]] = {}
    failed: List[str] = []
    spent: List[float] = []
    try:
        while pending or running:
            while pending and len(running) < args.jobs and not failed:
                r = pending.pop(0)
                log = r.folder(out_dir) / "runner.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                with open(log, "a", encoding="utf-8") as f:
                    proc = subprocess.Popen(base + ["--only-run", r.name], cwd=ROOT, env=env,
                                            stdout=f, stderr=subprocess.STDOUT)
                running[r.name] = (proc, time.perf_counter(), r)
            if failed and not running:
                break
            time.sleep(2.0)
            for name, (proc, t0, r) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del running[name]
                log = r.folder(out_dir) / "runner.log"
                if rc != 0:
                    failed.append(name)
                    print(f"{name}: failed (exit {rc}); its logs are in {log.parent} (a rerun resumes it)",
                          file=sys.stderr, flush=True)
                    continue
                result = _load_result(r.result_path(out_dir), settings)
                if result is None:
                    failed.append(name)
                    print(f"{name}: exited without its result JSON; see {log}", file=sys.stderr, flush=True)
                    continue
                results[name] = result
                spent.append(time.perf_counter() - t0)
                _print_finished(len(results), len(runs), name, result, headline, spent,
                                math.ceil((len(pending) + len(running)) / args.jobs))
    finally:
        # interrupted (Ctrl-C, an error here): stop the runs in flight; a rerun resumes them
        for proc, _, _ in running.values():
            proc.terminate()
        for proc, _, _ in running.values():
            proc.wait()
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed: {', '.join(failed)}; a rerun resumes them "
                           "and skips the finished ones")
    return _summarize_and_print(out_dir, [results[r.name] for r in runs], arms, settings.eval_splits)


def _child_args(args) -> List[str]:
    """This runner's own arguments for a --jobs child (everything but --jobs and --dry-run)."""
    out = []
    for action in build_parser()._actions:
        dest = action.dest
        if dest in ("help", "jobs", "dry_run", "only_run") or not action.option_strings:
            continue
        value = getattr(args, dest, None)
        if value is None:
            continue
        out += [action.option_strings[0], str(value)]
    return out


def _headline_text(result: Dict, headline: str) -> str:
    m = result["metrics"]
    splits = result["settings"]["eval_splits"]
    parts = [f"{metric_name(headline, splits)} {100 * m[headline]:.1f}" if headline in m else "no retrieval"]
    nlvr2 = f"nlvr2_{splits[0]}_acc"
    if nlvr2 in m:
        parts.append(f"{metric_name(nlvr2, splits)} {100 * m[nlvr2]:.1f}")
    return ", ".join(parts)


def main(argv=None) -> Dict:
    from ..errors import run_or_exit
    return run_or_exit(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
