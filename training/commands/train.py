"""``dcs train``: train a (defended) classifier into a run directory.

Precedence: dataclass defaults (the papers' values) < ``--config`` file (YAML/JSON, flat keys
as below or nested ``defense:``/``adv:`` mappings) < flags. ``--resume`` continues the run in
``--out`` from its own config.json (only --threads/--device/--checkpoint-every may change).

Distributed: the same command under ``torchrun --nproc_per_node N -m dcs.training.cli train ...``
trains with DistributedDataParallel (gloo on CPU, nccl with --device cuda). ``--batch-size`` is
the global batch (each rank takes batch-size / N; it must divide evenly); rank 0 alone writes the
run directory, which must be shared by all ranks; ``--resume`` needs the same N.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dcs.training.cli import CLIError
from dcs.training.config import ARCHS, BLUR_TYPES, DEFENSES, DEVICES, ConfigError, TrainConfig

if TYPE_CHECKING:
    from dcs.training.distributed import DistContext

log = logging.getLogger(__name__)
SUPPRESS = argparse.SUPPRESS


def _int(s: str) -> int:
    return int(s)


def _float(s: str) -> float:
    return float(s)


def _int_list(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.split(",") if v.strip())


def _opt_float(s: str) -> float | None:
    return None if s.lower() in ("", "none", "auto") else float(s)


# flag, config key, converter, help
OPTIONS: tuple[tuple[str, str, Callable[[str], Any], str], ...] = (
    ("--dataset", "dataset", str, "fmnist | mnist5k | digits | npz:PATH | folder:PATH | lisa[N]:PATH"),
    ("--data-dir", "data_dir", str, "folder with the four Fashion-MNIST IDX .gz files"),
    ("--limit-train", "limit_train", _int, "keep the first N training examples"),
    ("--limit-test", "limit_test", _int, "keep the first N test examples"),
    ("--image-size", "image_size", _int, "resize images to S x S (folder/lisa default 32)"),
    ("--val-fraction", "val_fraction", _float, "hold out this tail fraction of train for validation (0: use test)"),
    ("--arch", "arch", str, f"{' | '.join(ARCHS)}"),
    ("--defense", "defense", str, f"{' | '.join(DEFENSES)}"),
    ("--blur-kernel", "blur_kernel", _int, "blur kernel size 3|5|7 (default 5)"),
    ("--blur-type", "blur_type", str, f"{' | '.join(BLUR_TYPES)} (fixed blurs)"),
    ("--blur-sigma", "blur_sigma", _opt_float, "gaussian sigma (default OpenCV rule)"),
    ("--alpha", "alpha", _float, "L-inf weight for learned_blur (default 0.1)"),
    ("--tv-alpha", "tv_alpha", _float, "TV weight (default 1e-4)"),
    ("--pfe-filters", "pfe_filters", _int, "front-end filters (25)"),
    ("--pfe-kernel", "pfe_kernel", _int, "front-end kernel (5)"),
    ("--pfe-c", "pfe_c", _opt_float, "saturation jump c (default 0.5 mnist5k, else 0.25)"),
    ("--sigma1", "pfe_sigma1", _float, "stage-1 sigma (0.35)"),
    ("--sigma2", "pfe_sigma2", _float, "stage-2 sigma (0.15)"),
    ("--pfe-lambda", "pfe_lambda", _float, "regularizer weight, ramped 0..lambda per stage (1.0)"),
    ("--pfe-ramp", "pfe_ramp", str, "lambda ramp per stage: batch (default) | epoch (authors) | none"),
    ("--pfe-stages", "pfe_stages", _int_list, "epochs of stages 1,2,3 (default 20,20,20 or epochs/3 each)"),
    ("--adv-eps", "adv_eps", _opt_float, "adversarial-training eps (0.3 mnist5k, else 0.1)"),
    ("--adv-steps", "adv_steps", _int, "PGD steps (40)"),
    ("--adv-step-size", "adv_step_size", _opt_float, "PGD step (2.5*eps/steps)"),
    ("--adv-eps-warmup", "adv_eps_warmup", _float, "epochs over which eps ramps up from 0 (0 = off)"),
    ("--adv-surrogate", "adv_surrogate", str,
     "pfe: saturation backward of the training attack, straight-through (default) | tanh:TAU"),
    ("--certified", "certified", str, "certified training: none (default) | ibp | crown-ibp"),
    ("--cert-eps", "cert_eps", _opt_float, "certified-training eps (0.4 mnist-like, else 0.15)"),
    ("--cert-warmup", "cert_warmup", _opt_float, "natural-training epochs before the eps ramp (10%% of the phase)"),
    ("--cert-ramp", "cert_ramp", _opt_float, "epochs of the linear eps/kappa ramp (50%% of the phase)"),
    ("--cert-kappa", "cert_kappa", _float, "final weight of the natural loss (0.5)"),
    ("--cert-pfe-margin", "cert_pfe_margin", _float, "pfe stage-2 weight of the unstable-activation hinge (0)"),
    ("--cert-init", "cert_init", str, "certified runs: ibp (Shi et al. 2021 init, default) | default (torch's)"),
    ("--cert-clip", "cert_clip", _float, "certified runs: gradient-norm clip (10; 0 = off)"),
    ("--epochs", "epochs", _int, "epochs (default 10; pfe: sum of stages, 60)"),
    ("--batch-size", "batch_size", _int, "batch size (64)"),
    ("--lr", "lr", _float, "Adam learning rate (1e-3)"),
    ("--weight-decay", "weight_decay", _float, "Adam weight decay (0)"),
    ("--lr-milestones", "lr_milestones", _int_list, "epochs where lr *= gamma (default 5/6 of epochs); '' for none"),
    ("--lr-gamma", "lr_gamma", _float, "lr decay factor (0.1)"),
    ("--seed", "seed", _int, "seed for every RNG (0)"),
    ("--threads", "threads", _int, "torch threads (default env DCS_THREADS, else torch's)"),
    ("--device", "device", str, " | ".join(DEVICES)),
    ("--checkpoint-every", "checkpoint_every", _int, "checkpoint every N batches (200) and each epoch"),
)
RESUME_FLAGS = {"threads", "device", "checkpoint_every"}


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage errors (bad/unknown flags) as one line on stderr, exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        ns, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns, extras


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("train", help="train a defended classifier", description=__doc__)
    for flag, key, _, help_ in OPTIONS:
        parser.add_argument(flag, dest=f"opt_{key}", default=SUPPRESS, metavar=key.upper(), help=help_)
    parser.add_argument("--adv-train", dest="opt_adv_train", action="store_const", const=True, default=SUPPRESS,
                        help="PGD (Madry) adversarial training with any arch/defense")
    parser.add_argument("--no-adv-random-start", dest="opt_adv_random_start", action="store_const", const=False,
                        default=SUPPRESS, help="PGD without random start")
    parser.add_argument("--config", help="YAML or JSON file of config keys (flags override it)")
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--stop-after-batches", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")

    parser.__class__ = OneLineErrorParser  # argparse offers no per-subparser class hook
    parser.set_defaults(run=run)
    return parser


def read_config_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"config file {path} not found")
    try:
        text = p.read_text()
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as exc:
        raise CLIError(f"config file {path}: cannot parse ({exc.__class__.__name__}: {str(exc).splitlines()[0]})") from exc
    if not isinstance(data, dict):
        raise CLIError(f"config file {path}: expected a mapping at top level")
    return flatten(data)


def flatten(data: dict[str, Any]) -> dict[str, Any]:
    """Nested ``defense:``/``adv:`` mappings → flat keys (``defense``=kind, ``adv_<key>``)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        key = key.replace("-", "_")
        if key == "defense" and isinstance(value, dict):
            for k, v in value.items():
                out["defense" if k == "kind" else k.replace("-", "_")] = v
        elif key == "adv" and isinstance(value, dict):
            for k, v in value.items():
                out["adv_train" if k == "enabled" else f"adv_{k.replace('-', '_')}"] = v
        elif key == "data":
            continue  # written by the trainer, derived from the dataset
        else:
            out[key] = value
    return out


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """Explicit flags, converted; a bad value is a CLIError naming the flag."""
    convert = {key: (flag, fn) for flag, key, fn, _ in OPTIONS}
    out = {}
    for name, raw in vars(args).items():
        if not name.startswith("opt_"):
            continue
        key = name[4:]
        if key in convert:
            flag, fn = convert[key]
            try:
                out[key] = fn(raw)
            except ValueError:
                raise CLIError(f"{flag}: invalid value {raw!r}") from None
        else:
            out[key] = raw
    return out


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    flags = flag_values(args)
    if args.stop_after_batches is not None and args.stop_after_batches < 1:
        raise CLIError("--stop-after-batches must be >= 1")
    if args.resume:
        extra = sorted(set(flags) - RESUME_FLAGS) + (["config"] if args.config else [])
        if extra:
            raise CLIError(f"--resume uses {out}/config.json; do not pass {', '.join(extra)}")
        if not (out / "config.json").is_file():
            raise CLIError(f"--resume: {out}/config.json not found")
        values = {**flatten(json.loads((out / "config.json").read_text())), **flags}
    else:
        values = {**(read_config_file(args.config) if args.config else {}), **flags}
    try:
        cfg = TrainConfig.from_dict(values).resolved()
    except ConfigError as exc:
        raise CLIError(str(exc)) from None
    from dcs.training.distributed import (
        DistributedError,
        check_global_batch,
        env_world_size,
        process_group,
    )
    from dcs.training.trainer import resolve_device

    try:
        check_global_batch(cfg.batch_size, env_world_size())
        device = resolve_device(cfg.device)
    except (DistributedError, ConfigError) as exc:
        raise CLIError(str(exc)) from None
    with process_group(device) as dist:
        return _run(args, cfg, out, dist)


def _run(args: argparse.Namespace, cfg: TrainConfig, out: Path, dist: DistContext | None) -> int:
    """The rest of ``run`` inside the (possibly trivial) process group; only rank 0 prints results."""
    from dcs.data import DataError, load_dataset

    if not args.resume and out.exists() and any((out / f).exists() for f in ("config.json", "checkpoint.pt", "final.pt")):
        raise CLIError(f"{out} already holds a run; use --resume or another --out")
    try:
        data = load_dataset(cfg.dataset, cfg.data_dir, limit_train=cfg.limit_train, limit_test=cfg.limit_test,
                            image_size=cfg.image_size)
    except DataError as exc:
        raise CLIError(str(exc)) from None

    from dcs.training.runs import RunError
    from dcs.training.seeding import resolve_threads
    from dcs.training.trainer import train

    try:
        from dataclasses import replace

        cfg = replace(cfg, threads=resolve_threads(cfg.threads))
        result = train(cfg, data, out, resume=args.resume, stop_after_batches=args.stop_after_batches,
                       progress=not args.no_progress, dist=dist)
    except (ConfigError, RunError, ValueError) as exc:
        raise CLIError(str(exc).splitlines()[0]) from None
    if dist is not None and not dist.is_main:
        return 0
    if result.stopped_early:
        print(f"dcs train: stopped after {args.stop_after_batches} batches; checkpoint in {out}", file=sys.stderr)
        return 0
    last = result.metrics[-1] if result.metrics else {}
    print(f"dcs train: {cfg.dataset} {cfg.arch}/{cfg.defense.kind}: test acc {result.final_test_acc:.4f} "
          f"(val {last.get('val_acc', float('nan')):.4f}) in {out}")
    return 0
