"""The training loop: defenses' regularizers, PFE stages, PGD adversarial training,
resumable checkpoints (bitwise-identical resume), metrics and the training curve.

Validation: each epoch on the held-out tail of the training set when ``val_fraction`` > 0,
otherwise on the test split (as the papers report); ``final_test_acc`` is always the test split,
measured on the deployed model (for pfe: saturation on, as in stage 3).
Determinism: the model is initialised from the seeded global torch RNG; each epoch's shuffle
uses its own ``torch.Generator`` seeded from (seed, epoch); PGD random starts use a generator
whose state is checkpointed. Interrupted runs resume from the last checkpoint (every
``checkpoint_every`` batches and at each epoch end).

Distributed (``dist`` given, see ``dcs.training.distributed``): ``batch_size`` is the global batch, each
rank trains ``batch_size / world_size`` examples of its shard of the epoch's permutation through
DistributedDataParallel (gradients averaged over ranks); PGD attacks the local batch through the
plain module. Epoch metrics are all-reduced; accuracy is counted on contiguous shards and summed.
Rank 0 alone logs, shows progress and writes files (the others wait at a barrier); checkpoints
hold the shared model/optimizer state plus every rank's RNG states and running sums, and a run
resumes only with the world size it was checkpointed with. World size 1 without ``dist`` is the
single-process path, unchanged.
"""
from __future__ import annotations

import csv
import io
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from dcs.data import Dataset
from dcs.training import certified, runs
from dcs.training.adversarial import pgd_linf
from dcs.training.config import ConfigError, TrainConfig
from dcs.training.defenses import linf_depthwise_penalty, pfe_b1, pfe_b2, pfe_lambda, tv_penalty
from dcs.training.distributed import DistContext, DistributedError, check_global_batch, shard
from dcs.training.models import DefendedNet, build_model, configure_pfe_stage
from dcs.training.seeding import rng_state, seed_everything, set_rng_state, set_threads

log = logging.getLogger(__name__)
METRIC_FIELDS = ("epoch", "stage", "lambda", "lr", "loss", "ce", "regularizer", "train_acc", "val_acc", "seconds")
# Config keys that may differ between an interrupted run and its resume.
RESUMABLE_OVERRIDES = ("threads", "device", "checkpoint_every")


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    metrics: list[dict]
    final_test_acc: float | None
    stopped_early: bool


class TrainingStopped(Exception):
    """Raised internally when ``stop_after_batches`` is reached (after a checkpoint)."""


def pfe_stage(cfg: TrainConfig, epoch: int) -> tuple[int, int, int]:
    """(stage, epoch within stage, stage length) for 0-based ``epoch``; stage 0 if not pfe."""
    if cfg.defense.kind != "pfe":
        return 0, epoch, cfg.epochs
    s1, s2, s3 = cfg.pfe_stages
    if epoch < s1:
        return 1, epoch, s1
    if epoch < s1 + s2:
        return 2, epoch - s1, s2
    return 3, epoch - s1 - s2, s3


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but torch.cuda.is_available() is False")
    return torch.device(name)


def split_validation(data: Dataset, val_fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_val, y_val): the last ``val_fraction`` of train, or the test split."""
    if val_fraction <= 0:
        return data.x_train, data.y_train, data.x_test, data.y_test
    n_val = max(1, round(len(data.x_train) * val_fraction))
    if n_val >= len(data.x_train):
        raise ConfigError(f"val_fraction {val_fraction} leaves no training examples")
    return data.x_train[:-n_val], data.y_train[:-n_val], data.x_train[-n_val:], data.y_train[-n_val:]


def regularizer(model: DefendedNet, cfg: TrainConfig, probe: dict[str, Tensor], stage: int, lam: float) -> Tensor:
    """The defense's penalty for one batch (0 when it has none)."""
    d = cfg.defense
    if d.kind == "learned_blur":
        return linf_depthwise_penalty(model.backbone.post_conv1.weight, d.alpha)
    if d.kind == "tv":
        return tv_penalty(probe["features"], d.tv_alpha)
    if d.kind == "pfe" and stage == 1:
        return lam * pfe_b1(probe["z"], d.pfe_sigma1)
    if d.kind == "pfe" and stage == 2:
        return lam * pfe_b2(probe["z"], d.pfe_c, d.pfe_sigma2)
    return probe["logits"].new_zeros(())


@torch.no_grad()
def count_correct(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, device: torch.device, batch: int = 1000) -> int:
    """Top-1 hits in eval mode (restores the previous mode)."""
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        xb = torch.from_numpy(x[i:i + batch]).to(device)
        correct += int((model(xb).argmax(1).cpu() == torch.from_numpy(y[i:i + batch])).sum())
    model.train(was)
    return correct


def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, device: torch.device, batch: int = 1000) -> float:
    """Top-1 accuracy in eval mode (restores the previous mode)."""
    if len(x) == 0:
        return float("nan")
    return count_correct(model, x, y, device, batch) / len(x)


def group_accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, device: torch.device,
                   dist: DistContext | None) -> float:
    """``accuracy``; under ``dist`` each rank counts a contiguous slice and the counts are summed."""
    if dist is None:
        return accuracy(model, x, y, device)
    lo, hi = len(x) * dist.rank // dist.world_size, len(x) * (dist.rank + 1) // dist.world_size
    correct, total = dist.all_reduce_sum([count_correct(model, x[lo:hi], y[lo:hi], device), hi - lo])
    return correct / total if total else float("nan")


class _ProbeForward(torch.nn.Module):
    """``net.probe`` as ``forward``, so DistributedDataParallel sees the training forward pass."""

    def __init__(self, net: DefendedNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.net.probe(x)


def wrap_ddp(model: DefendedNet, dist: DistContext) -> torch.nn.Module:
    """A DDP wrapper over the parameters that currently require grad (rebuilt when that set changes)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(_ProbeForward(model), device_ids=ids)


def run_config_dict(cfg: TrainConfig, data: Dataset, n_train: int, n_val: int) -> dict:
    out = cfg.to_dict()
    out["data"] = {"name": data.name, "class_names": list(data.class_names), "input_shape": list(data.input_shape),
                   "num_classes": data.num_classes, "n_train": n_train, "n_val": n_val, "n_test": len(data.x_test),
                   "val_source": "train tail" if cfg.val_fraction > 0 else "test"}
    return out


def _comparable(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in RESUMABLE_OVERRIDES}


def train(cfg: TrainConfig, data: Dataset, out_dir: str | Path, *, resume: bool = False,
          stop_after_batches: int | None = None, progress: bool = True,
          dist: DistContext | None = None) -> TrainResult:
    """Train ``cfg`` (resolved here) on ``data`` into ``out_dir``. ``stop_after_batches`` saves a
    checkpoint after that many optimizer steps (counted over the whole run) and returns early:
    the test hook that simulates a kill. ``dist``: this rank's place in an initialised process
    group (None: single process). Raises ConfigError / runs.RunError on bad input."""
    cfg = cfg.resolved()
    out = Path(out_dir)
    main = dist is None or dist.is_main
    world, rank = (dist.world_size, dist.rank) if dist is not None else (1, 0)
    try:
        check_global_batch(cfg.batch_size, world)
    except DistributedError as exc:
        raise ConfigError(str(exc)) from None
    device = resolve_device(cfg.device) if dist is None else dist.device
    x_tr, y_tr, x_val, y_val = split_validation(data, cfg.val_fraction)
    config = run_config_dict(cfg, data, len(x_tr), len(x_val) if cfg.val_fraction > 0 else 0)
    ckpt_path = out / runs.CHECKPOINT_FILE
    problem = None
    if resume:
        if not ckpt_path.is_file():
            problem = f"{ckpt_path}: no checkpoint to resume from"
    else:
        existing = [f for f in (runs.CONFIG_FILE, runs.CHECKPOINT_FILE, runs.FINAL_FILE) if (out / f).exists()]
        if existing:
            problem = f"{out} already holds a run ({', '.join(existing)}); use --resume or another --out"
    if dist is not None:  # every rank checks before rank 0 writes anything, and all fail together
        problem = next((p for p in dist.all_gather_object(problem) if p), None)
    if problem:
        raise runs.RunError(problem)
    if main:
        out.mkdir(parents=True, exist_ok=True)

    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    model = build_model(cfg.arch, cfg.defense, data.input_shape, data.num_classes).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(cfg.lr_milestones), cfg.lr_gamma)
    adv_gen = torch.Generator().manual_seed(cfg.seed + 1 + 1_000_003 * rank)  # PGD starts differ per rank
    state = {"epoch": 0, "batch": 0, "steps": 0, "sums": [0.0, 0.0, 0.0, 0, 0, 0.0], "metrics": []}
    if resume:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if _comparable(ckpt["config"]) != _comparable(config):
            raise runs.RunError(f"{ckpt_path}: checkpoint was made with a different configuration")
        if ckpt.get("world_size", 1) != world:
            raise runs.RunError(f"{ckpt_path}: checkpoint was made with world size {ckpt.get('world_size', 1)}, "
                                f"this run has {world}; resume with the same number of processes")
        configure_pfe_stage(model, pfe_stage(cfg, ckpt["epoch"])[0] if ckpt["epoch"] < cfg.epochs else 3)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        adv_gen.set_state(ckpt["adv_generator"])
        set_rng_state(ckpt["rng"])
        state = {k: ckpt[k] for k in state}
        if "ranks" in ckpt:  # this rank's own RNG streams and running sums
            mine = ckpt["ranks"][rank]
            adv_gen.set_state(mine["adv_generator"])
            set_rng_state(mine["rng"])
            state["sums"] = list(mine["sums"])
        if main:
            log.info("resuming %s at epoch %d batch %d", out, state["epoch"], state["batch"])
    elif main:
        runs.atomic_write_json(out / runs.CONFIG_FILE, config)

    def save_checkpoint() -> None:
        blob = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "adv_generator": adv_gen.get_state(),
                "rng": rng_state(), "config": config, **state}
        if dist is not None:
            blob["world_size"] = world
            blob["ranks"] = dist.all_gather_object({"rng": rng_state(), "adv_generator": adv_gen.get_state(),
                                                    "sums": list(state["sums"])})
        if main:
            runs.atomic_torch_save(blob, ckpt_path)
        if dist is not None:
            dist.barrier()

    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    n, bs = len(xt), cfg.batch_size // world
    n_batches = (n + cfg.batch_size - 1) // cfg.batch_size  # the same on every rank (see training.distributed)
    model.train()
    forward = model.probe
    trainable: tuple[bool, ...] | None = None
    cert = certified.CertifiedLoss(model, cfg.certified) if cfg.certified != "none" else None
    if cert is not None and cfg.cert_init == "ibp" and not resume:
        certified.ibp_init(model)  # before any step; a resumed run loads its weights below
    try:
        while state["epoch"] < cfg.epochs:
            epoch = state["epoch"]
            stage, in_stage, stage_len = pfe_stage(cfg, epoch)
            configure_pfe_stage(model, stage)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
            if dist is not None:
                perm = shard(perm, rank, world)
                now = tuple(p.requires_grad for p in model.parameters())
                if now != trainable:  # DDP reduces the params that required grad when it was built
                    forward, trainable = wrap_ddp(model, dist), now
            t0 = time.perf_counter()
            desc = f"epoch {epoch + 1}/{cfg.epochs}" + (f" stage {stage}" if stage else "")
            bar = tqdm(range(state["batch"], n_batches), desc=desc, total=n_batches, initial=state["batch"],
                       disable=not (progress and main), leave=False, unit="batch")
            for b in bar:
                lam = (pfe_lambda(in_stage + b / n_batches, stage_len, cfg.defense.pfe_lambda, cfg.defense.pfe_ramp)
                       if stage in (1, 2) else 0.0)
                idx = perm[b * bs:(b + 1) * bs]
                xb, yb = xt[idx].to(device), yt[idx].to(device)
                if cfg.adversarial:
                    eps, step = cfg.adv.eps_at(epoch + b / n_batches)
                    xb = pgd_linf(model, xb, yb, eps=eps, steps=cfg.adv.steps, step_size=step,
                                  random_start=cfg.adv.random_start, generator=adv_gen,
                                  surrogate=cfg.adv.surrogate)
                probe = forward(xb)
                ce = F.cross_entropy(probe["logits"], yb)
                reg = regularizer(model, cfg, probe, stage, lam)
                loss = ce + reg
                if cert is not None:  # certified training: κ·CE + (1−κ)·CE(−margin bounds)
                    robust, reg_extra = certified.batch_terms(cert, model, cfg, xb, yb, probe, epoch + b / n_batches)
                    loss, reg = robust(ce) + reg + reg_extra, reg + reg_extra
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cert is not None and cfg.cert_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.cert_clip)
                optimizer.step()
                s = state["sums"]
                k = len(yb)
                s[0] += loss.item() * k
                s[1] += ce.item() * k
                s[2] += reg.item() * k
                s[5] += lam
                s[3] += int((probe["logits"].argmax(1) == yb).sum())
                s[4] += k
                state["batch"] = b + 1
                state["steps"] += 1
                if progress and main:  # this rank's running numbers; the epoch row is all-reduced
                    bar.set_postfix(loss=f"{s[0] / s[4]:.4f}", acc=f"{s[3] / s[4]:.3f}", refresh=False)
                if stop_after_batches is not None and state["steps"] >= stop_after_batches:
                    save_checkpoint()
                    raise TrainingStopped
                if state["steps"] % cfg.checkpoint_every == 0:
                    save_checkpoint()
            bar.close()
            s = state["sums"]
            if dist is not None:
                totals = dist.all_reduce_sum(s[:5])
                s = [*totals[:3], int(totals[3]), int(totals[4]), s[5]]
            row = {"epoch": epoch + 1, "stage": stage, "lambda": s[5] / n_batches, "lr": optimizer.param_groups[0]["lr"],
                   "loss": s[0] / s[4], "ce": s[1] / s[4], "regularizer": s[2] / s[4], "train_acc": s[3] / s[4],
                   "val_acc": group_accuracy(model, x_val, y_val, device, dist), "seconds": time.perf_counter() - t0}
            state["metrics"].append(row)
            if main:
                log.info("epoch %d: %s", epoch + 1,
                         {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
            if progress and main:
                tqdm.write(f"{desc}: loss {row['loss']:.4f} reg {row['regularizer']:.4f} "
                           f"train {row['train_acc']:.4f} val {row['val_acc']:.4f} ({row['seconds']:.1f}s)")
            with warnings.catch_warnings():
                # A run resumed at the end of an epoch steps its restored scheduler before this
                # process has stepped the optimizer: the order is right, torch's check cannot tell.
                warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)`",
                                        UserWarning)
                scheduler.step()
            state.update(epoch=epoch + 1, batch=0, sums=[0.0, 0.0, 0.0, 0, 0, 0.0])
            if main:
                write_metrics(out, state["metrics"])
            save_checkpoint()
    except TrainingStopped:
        return TrainResult(out, list(state["metrics"]), None, True)
    configure_pfe_stage(model, 3)  # the deployed pfe model saturates, even if stage 3 had 0 epochs
    test_acc = group_accuracy(model, data.x_test, data.y_test, device, dist)
    if main:  # the plain module's state_dict: no DDP "module." prefix
        summary = {"final_test_acc": test_acc, "epochs": cfg.epochs, "dataset": cfg.dataset, "arch": cfg.arch,
                   "defense": cfg.defense.kind}
        if dist is not None:
            summary["world_size"] = world
        runs.atomic_torch_save({"state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                                "config": config, "test_acc": test_acc}, out / runs.FINAL_FILE)
        runs.atomic_write_json(out / "summary.json", summary)
        plot_curve(out, state["metrics"])
    if dist is not None:
        dist.barrier()
    return TrainResult(out, list(state["metrics"]), test_acc, False)


def write_metrics(out: Path, metrics: list[dict]) -> None:
    runs.atomic_write_json(out / runs.METRICS_JSON, metrics)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS)
    w.writeheader()
    w.writerows(metrics)
    runs.atomic_write_text(out / runs.METRICS_CSV, buf.getvalue())


def plot_curve(out: Path, metrics: list[dict]) -> None:
    """Loss and accuracies per epoch, PFE stages shaded, to ``curve.png`` (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics:
        return
    ep = [m["epoch"] for m in metrics]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(ep, [m["loss"] for m in metrics], label="loss")
    ax1.plot(ep, [m["ce"] for m in metrics], label="cross-entropy")
    ax1.plot(ep, [m["regularizer"] for m in metrics], label="regularizer")
    ax1.set_xlabel("epoch")
    ax1.legend()
    ax2.plot(ep, [m["train_acc"] for m in metrics], label="train acc")
    ax2.plot(ep, [m["val_acc"] for m in metrics], label="val acc")
    ax2.set_xlabel("epoch")
    ax2.legend()
    for stage, color in ((1, "tab:blue"), (2, "tab:orange"), (3, "tab:green")):
        xs = [m["epoch"] for m in metrics if m["stage"] == stage]
        for ax in (ax1, ax2):
            if xs:
                ax.axvspan(min(xs) - 0.5, max(xs) + 0.5, color=color, alpha=0.08)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    (out / runs.CURVE_FILE).write_bytes(buf.getvalue())
