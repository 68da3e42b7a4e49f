"""The training loop: AdamW with linear warm-up then cosine decay (per step), optional mixed precision, weighted
router auxiliary losses, tqdm progress, CSV and TensorBoard logs, checkpoints that resume exactly, and a clean
checkpoint-and-stop on Ctrl-C.

Exact resumption: the data order of epoch ``e`` is a permutation drawn from a generator seeded with (seed, e), so a
resumed run skips the batches already seen and draws the same ones after them; the RNG states, the optimiser,
scheduler and gradient scaler, and the running sums of the interrupted epoch are saved with the weights. On CPU a
resumed run therefore reproduces the uninterrupted run's weights and metrics bit for bit. This holds with
``num_workers=0`` (data augmentation then draws on the restored global RNG); with worker processes, an epoch
resumed mid-way restarts the workers' random streams, so its augmentations differ from the uninterrupted run's.

Teacher-guided routing (config key ``teacher``, PAPERS.md section 4): a frozen dense teacher feeds a
:class:`~visionmoe.layers.TeacherRouter`; while ``tgr_schedule`` has the distillation on, each step adds
``tgr_weight`` times the mean over MoE layers of KL(p_teacher || p_student) and the teacher router's own losses.
With ``consistency_probe``, the routing of a fixed probe set is recorded before training and after every epoch.

Several processes (``torchrun --nproc_per_node=N -m visionmoe.train ...``, or any initialised default process
group of W > 1 ranks): the trainer starts the (dp, ep) device mesh with ``expert_parallel`` (config key) and calls
:func:`visionmoe.distributed.parallelize` (experts sharded over "ep", DistributedDataParallel for the rest).
``batch_size`` is the global batch: each rank takes its B / W share of every global batch of the one seeded data
order (visionmoe.distributed.data), training drops a last partial batch (``drop_last``), and evaluation pads and
masks its last batch so that its metrics are exactly one process's. Step and epoch metrics are summed over the
ranks; only rank 0 logs (progress bar, CSV, TensorBoard) and writes checkpoints, which hold full expert tensors and
resume on any world size (see checkpoint.py).

The loop lives here; what it logs is in logs.py, its learning-rate schedule in schedule.py, teacher-guided routing
in teacher_guidance.py and the consistency tracker in routing_consistency.py.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..distributed.checkpoint import expert_layout, reshard_optimizer_state
from ..distributed.data import (
    IndexBatchSampler,
    all_reduce_sum,
    local_batch_size,
    rank_evaluation_batches,
    rank_training_indices,
    routing_group_sizes,
    steps_per_epoch,
    world,
)
from ..layers import aux_losses, student_moe_layers
from ..models import create_model
from ..routers import RouterMetrics
from .checkpoint import (
    CheckpointError,
    capture_rng_states,
    check_checkpoint_dir,
    load_matching_weights,
    load_model_weights,
    load_optimizer_shard,
    load_trainer_state,
    restore_rng_states,
    save_checkpoint,
)
from .config import TrainConfig, tgr_fraction
from .logs import EPOCH_COLUMNS, STEP_COLUMNS, CsvLog, log_epoch, log_step, tensorboard_writer
from .routing_consistency import RoutingConsistencyTracker
from .schedule import warmup_cosine
from .teacher_guidance import build_teacher_router, pretrain_teacher_router, teacher_guided_routing_losses

# What Trainer.save always writes into the trainer state, and resuming reads.
_STATE_KEYS = {
    "model",
    "optimizer",
    "scheduler",
    "scaler",
    "epoch",
    "global_step",
    "steps_per_epoch",
    "epoch_totals",
    "rng",
}

# A (trainer, global step) hook called after every optimiser step; raising KeyboardInterrupt there stops the run
# exactly as Ctrl-C does.
StepCallback = Callable[["Trainer", int], None]


def seed_everything(seed: int) -> None:
    """Seeds Python's, NumPy's and torch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_datasets(config: TrainConfig) -> tuple[Dataset, Dataset]:
    """The (training, validation) data sets named by ``config`` from :func:`visionmoe.data.create_dataset`."""
    try:
        from ..data import create_dataset
    except ImportError as error:
        raise RuntimeError(
            "visionmoe.data is not available in this installation, so data sets cannot be built "
            "by name; from Python, pass train_set and val_set to Trainer"
        ) from error
    options = dict(root=config.data_root, **config.dataset_options)
    return (
        create_dataset(config.dataset, config.train_split, **options),
        create_dataset(config.dataset, config.val_split, **options),
    )


def resolve_device(name: str, option: str = "config key 'device'") -> torch.device:
    """The device ``name`` means ("auto": CUDA when available, else the CPU), or a ValueError naming ``option``
    when torch does not know the name or the device is not on this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"{option} is {name!r}, which is not a device name (cpu, cuda, cuda:N)") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{option} is {name!r} but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{option} is {name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def expert_load_ratio(model: nn.Module) -> Optional[float]:
    """Mean over the MoE layers of (largest expert load / mean expert load) in the last forward: 1 is perfectly
    balanced, E means one expert took everything; None for a model without MoE layers."""
    ratios = []
    for module in model.modules():
        metrics = getattr(module, "last_metrics", None)
        if isinstance(metrics, RouterMetrics):
            load = metrics.load.detach().float()
            mean = load.mean()
            if mean > 0:
                ratios.append((load.max() / mean).item())
    return sum(ratios) / len(ratios) if ratios else None


@dataclasses.dataclass
class _EpochTotals:
    """Running sums of the current epoch, saved in checkpoints so that an epoch resumed mid-way reports the same
    means as an uninterrupted one."""

    batches: int = 0
    samples: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    aux_loss_sum: float = 0.0
    load_ratio_sum: float = 0.0
    load_ratio_count: int = 0
    distillation_loss_sum: float = 0.0
    teacher_router_loss_sum: float = 0.0
    distillation_samples: int = 0
    teacher_router_samples: int = 0
    seconds: float = 0.0


@dataclasses.dataclass
class FitResult:
    """What :meth:`Trainer.fit` returns: the per-epoch metric rows and whether Ctrl-C stopped the run."""

    history: List[Dict[str, Any]]
    interrupted: bool
    checkpoint_dir: Path


class Trainer:
    """Trains ``config.model`` on a classification data set of (image [C, H, W] float, label int) pairs.

    Args:
        config: the run's settings.
        train_set, val_set: the data sets; built with :func:`build_datasets` from the config when not given.
        resume: a checkpoint directory (or an output directory holding ``checkpoint/``) to continue from.
        step_callback: called as ``step_callback(trainer, global_step)`` after every optimiser step.
    """

    def __init__(
        self,
        config: TrainConfig,
        train_set: Optional[Dataset] = None,
        val_set: Optional[Dataset] = None,
        resume: Optional[str | Path] = None,
        step_callback: Optional[StepCallback] = None,
    ):
        if (train_set is None) != (val_set is None):
            raise ValueError("pass both train_set and val_set, or neither (to build them from the config)")
        self.device = resolve_device(config.device)  # before the data sets: a wrong device fails at once
        self.mesh = self._start_process_group(config)
        self.rank, self.world_size = world()
        self.is_main = self.rank == 0
        if train_set is None:
            train_set, val_set = build_datasets(config)
        if len(train_set) == 0:
            raise ValueError("train_set is empty")
        model_options = dict(config.model_options)
        if "num_classes" not in model_options and hasattr(train_set, "num_classes"):
            model_options["num_classes"] = int(train_set.num_classes)
        self.config = dataclasses.replace(config, model_options=model_options)
        self.train_set, self.val_set = train_set, val_set
        self.step_callback = step_callback
        self.output_dir = Path(config.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoint"

        resume_state = None
        if resume is not None:
            resume = check_checkpoint_dir(resume)
            resume_state = load_trainer_state(resume)  # refuses a partial, corrupt or mixed checkpoint
        seed_everything(config.seed)
        try:
            self.model = create_model(config.model, **model_options).to(self.device)
        except (TypeError, ValueError, OverflowError) as error:  # e.g. an unknown or mistyped model option
            raise ValueError(
                f"config keys 'model' ({config.model!r}) and 'model_options' do not make a model: {error}"
            ) from error
        if config.init_from is not None and resume is None:
            reinitialised = load_matching_weights(self.model, config.init_from)
            if reinitialised and self.is_main:
                print(f"init_from {config.init_from}: fresh weights for {', '.join(reinitialised)} (shape differs)")
        # Before fine-tuning, the routing of the pre-trained model; otherwise that of the initialisation.
        self.consistency_phases = ("pretrain", "finetune") if config.init_from is not None else ("init", "train")
        self.teacher_router = (
            build_teacher_router(config.teacher, self.model, config.model, self.device)
            if config.teacher is not None
            else None
        )
        self.local_batch_size = local_batch_size(config.batch_size, self.world_size, routing_group_sizes(self.model))
        self.routing_multiple = math.lcm(1, *routing_group_sizes(self.model))
        # The module the training steps call: DistributedDataParallel around the model on several ranks. The
        # model itself (self.model) has the keys checkpoints use; parallelize shards its experts in place.
        self.forward_model = self._parallelize() if self.mesh is not None else self.model
        self.trainable_parameters = list(self.model.parameters())
        if self.teacher_router is not None:
            self.trainable_parameters += list(self.teacher_router.routers.parameters())
        self.consistency = self._build_consistency_tracker() if config.consistency_probe else None
        self.drop_last = config.drop_last
        if self.drop_last is None:  # a resumed run keeps its choice, so its epochs have the same steps
            self.drop_last = resume_state.get("drop_last", False) if resume_state is not None else self.world_size > 1
        if self.world_size > 1 and not self.drop_last and len(train_set) % config.batch_size:
            raise ValueError(
                f"config key 'drop_last' is false (or the run resumed was started without it) but "
                f"{len(train_set)} training images do not make whole batches of {config.batch_size}, "
                f"so {self.world_size} ranks cannot share the last one; set drop_last=true"
            )
        self.steps_per_epoch = steps_per_epoch(len(train_set), config.batch_size, self.drop_last)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training set has {len(train_set)} images, fewer than one batch of "
                f"config key 'batch_size' = {config.batch_size}, and the last partial batch is dropped"
            )
        total_steps = self.steps_per_epoch * config.epochs
        self.tgr_steps = round(tgr_fraction(config.tgr_schedule) * total_steps)
        self.optimizer = torch.optim.AdamW(self.trainable_parameters, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            warmup_cosine(round(config.warmup_epochs * self.steps_per_epoch), total_steps, config.min_lr / config.lr),
        )
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

        self.epoch = 0  # zero-based epoch in progress
        self.global_step = 0
        self.totals = _EpochTotals()
        self._stop_requested = False
        self._checked_aux_names = False
        self._between_steps = True  # whether the state is consistent (no optimiser step half done)
        if resume is not None:
            self._load(resume, resume_state)

    def _start_process_group(self, config: TrainConfig):
        """The (dp, ep) device mesh when this process is one of several (torchrun's WORLD_SIZE > 1, or an
        initialised default group of several ranks), else None. On CUDA each rank takes the GPU of its
        LOCAL_RANK."""
        initialised = dist.is_available() and dist.is_initialized()
        self.owns_process_group = False  # whether this trainer started the default group (from torchrun's env)
        if not (int(os.environ.get("WORLD_SIZE", "1")) > 1 or (initialised and dist.get_world_size() > 1)):
            return None
        from ..distributed import init_mesh

        if self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        for key in ("teacher", "consistency_probe"):
            if getattr(config, key):
                raise ValueError(
                    f"config key {key!r} is not supported when training on several processes yet; "
                    f"train with it in one process"
                )
        self.owns_process_group = not initialised
        return init_mesh(config.expert_parallel, device_type=self.device.type)

    def _parallelize(self) -> nn.Module:
        """Shards the experts over the mesh's "ep" ranks and wraps the model for data parallelism (parallelize
        warns when MoE layers route each rank's whole local batch as one group, group_size null)."""
        from ..distributed import parallelize

        return parallelize(self.model, self.mesh)

    def _build_consistency_tracker(self) -> RoutingConsistencyTracker:
        count = self.config.consistency_probe
        if count > len(self.val_set):
            raise ValueError(
                f"config key 'consistency_probe' asks for {count} probe images but the validation set "
                f"has {len(self.val_set)}"
            )
        if not student_moe_layers(self.model):
            raise ValueError(
                f"config key 'consistency_probe' needs a model with sparse MoE layers; model "
                f"{self.config.model!r} has none"
            )
        probe = torch.stack([self.val_set[index][0] for index in range(count)])
        return RoutingConsistencyTracker(probe, batch_size=self.config.batch_size)

    def _amp_dtype(self) -> Optional[torch.dtype]:
        if not self.config.amp:
            return None
        if self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16

    def _load(self, directory: Path, state: Dict[str, Any]) -> None:
        missing = sorted(_STATE_KEYS - state.keys())
        if missing:
            raise CheckpointError(
                f"the trainer state in {str(directory)!r} lacks {missing}: it was not saved by "
                f"Trainer.save, so it cannot be resumed"
            )
        if state["model"] != self.config.model:
            raise ValueError(
                f"the checkpoint in {str(directory)!r} is of model {state['model']!r}, "
                f"not of config key 'model' = {self.config.model!r}"
            )
        if state["steps_per_epoch"] != self.steps_per_epoch:
            raise ValueError(
                f"the checkpoint had {state['steps_per_epoch']} steps per epoch, this run has "
                f"{self.steps_per_epoch}: batch_size or the training set changed, so it cannot resume"
            )
        load_model_weights(self.model, directory)
        if ("teacher_router" in state) != (self.teacher_router is not None):
            raise ValueError(
                f"the checkpoint in {str(directory)!r} was trained "
                f"{'with' if 'teacher_router' in state else 'without'} a teacher router; config key "
                f"'teacher' must be {'set' if 'teacher_router' in state else 'null'} to resume it"
            )
        if self.teacher_router is not None:
            self.teacher_router.routers.load_state_dict(state["teacher_router"])
            if state["teacher_router_frozen"]:
                self.teacher_router.freeze()
        if self.consistency is not None and "routing_consistency" in state:
            self.consistency.load_state_dict(state["routing_consistency"])
        # Expert parameters' state is resharded for this rank's experts (the checkpoint may be of another world size).
        self.optimizer.load_state_dict(
            reshard_optimizer_state(
                state["optimizer"],
                state.get("expert_optimizer"),
                self.model,
                self.optimizer,
                lambda index: load_optimizer_shard(directory, index),
            )
        )
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.totals = _EpochTotals(**state["epoch_totals"])
        # Each rank's own generators when the world size is the same; otherwise rank 0's (every rank seeds alike).
        per_rank = state.get("rng_ranks")
        restore_rng_states(
            per_rank[self.rank] if per_rank is not None and len(per_rank) == self.world_size else state["rng"]
        )

    def save(self, directory: Optional[str | Path] = None) -> Path:
        """Checkpoints the current state (by default into ``output_dir/checkpoint``). On several ranks every rank
        must call it (the expert tensors and optimiser shards are gathered to rank 0, which writes)."""
        state = {
            "model": self.config.model,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "steps_per_epoch": self.steps_per_epoch,
            "epoch_totals": dataclasses.asdict(self.totals),
            "rng": capture_rng_states(),
            "drop_last": self.drop_last,
            "world_size": self.world_size,
            "expert_optimizer": expert_layout(self.model, self.optimizer),
        }
        if self.world_size > 1:
            per_rank: List[Any] = [None] * self.world_size
            dist.all_gather_object(per_rank, state["rng"])
            state["rng_ranks"] = per_rank
        if self.teacher_router is not None:
            state["teacher_router"] = self.teacher_router.routers.state_dict()
            state["teacher_router_frozen"] = not self.teacher_router.trainable
        if self.consistency is not None:
            state["routing_consistency"] = self.consistency.state_dict()
        return save_checkpoint(directory or self.checkpoint_dir, self.model, self.config, state, self.optimizer)

    def _generator(self, purpose: int, epoch: int) -> torch.Generator:
        """A generator seeded by (seed, epoch, purpose): 0 for the data order, 1 for the DataLoader's worker seeds,
        so that each epoch's draws are the same in a resumed run and independent of torch's global RNG."""
        return torch.Generator().manual_seed((self.config.seed * 1_000_003 + epoch) * 2 + purpose)

    def _epoch_order(self, epoch: int) -> List[int]:
        return torch.randperm(len(self.train_set), generator=self._generator(0, epoch)).tolist()

    def _loader(
        self,
        dataset: Dataset,
        order: Optional[List[int]],
        epoch: int,
        batch_sampler: Optional[IndexBatchSampler] = None,
    ) -> DataLoader:
        generator = self._generator(1, epoch)
        if batch_sampler is not None:
            return DataLoader(
                dataset,
                batch_sampler=batch_sampler,
                num_workers=self.config.num_workers,
                generator=generator,
                pin_memory=self.device.type == "cuda",
            )
        return DataLoader(
            dataset,
            batch_size=self.local_batch_size,
            sampler=order,
            shuffle=False,
            num_workers=self.config.num_workers,
            generator=generator,
            pin_memory=self.device.type == "cuda",
        )

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def _train_step(self, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, Any]:
        self._between_steps = False
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        with self._autocast():
            logits = self.forward_model(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.config.label_smoothing)
            aux_loss = self._weighted_aux_loss()
            distillation_loss, teacher_router_loss = teacher_guided_routing_losses(
                self.teacher_router, self.model, images, active=self.global_step < self.tgr_steps
            )
        total = loss + aux_loss
        if distillation_loss is not None:
            total = total + self.config.tgr_weight * distillation_loss
        if teacher_router_loss is not None:
            total = total + teacher_router_loss
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.config.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            if self.mesh is not None:  # each expert shard counted once
                from ..distributed import clip_grad_norm_

                clip_grad_norm_(self.forward_model, self.config.grad_clip, self.mesh)
            else:
                nn.utils.clip_grad_norm_(self.trainable_parameters, self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        step = dict(
            lr=lr,
            loss=loss.item(),
            aux_loss=aux_loss.item(),
            correct=(logits.argmax(dim=-1) == labels).sum().item(),
            samples=labels.numel(),
            expert_load_ratio=expert_load_ratio(self.model),
            distillation_loss=None if distillation_loss is None else distillation_loss.item(),
            teacher_router_loss=None if teacher_router_loss is None else teacher_router_loss.item(),
        )
        return self._reduce_step(step) if self.world_size > 1 else step

    def _reduce_step(self, step: Dict[str, Any]) -> Dict[str, Any]:
        """A step's metrics over all ranks (each rank trained on an equal share of the global batch): the mean
        losses, the summed counts, the mean load ratio; and a Ctrl-C on any rank stops every rank after this
        step, so that they all checkpoint the same one. One all-reduce."""
        ratio = step["expert_load_ratio"]
        loss, aux_loss, correct, samples, ratio_sum, stop = all_reduce_sum(
            [
                step["loss"],
                step["aux_loss"],
                step["correct"],
                step["samples"],
                0.0 if ratio is None else ratio,
                float(self._stop_requested),
            ],
            self.device,
        )
        self._stop_requested = stop > 0
        return dict(
            step,
            loss=loss / self.world_size,
            aux_loss=aux_loss / self.world_size,
            correct=int(correct),
            samples=int(samples),
            expert_load_ratio=None if ratio is None else ratio_sum / self.world_size,
        )

    def _weighted_aux_loss(self) -> torch.Tensor:
        """The routers' auxiliary losses of the last forward, weighted by ``aux_loss_weights`` and summed."""
        router_losses = aux_losses(self.model)
        if not self._checked_aux_names:
            self._check_aux_loss_names(router_losses)
        return sum(
            (
                self.config.aux_loss_weights[name] * value.float()
                for name, value in router_losses.items()
                if name in self.config.aux_loss_weights
            ),
            torch.zeros((), device=self.device),
        )

    def _check_aux_loss_names(self, router_losses: Dict[str, torch.Tensor]) -> None:
        """Warns (once) about weighted auxiliary losses that the model's routers do not report, e.g. a typo or
        the default weights with a router that reports other losses."""
        self._checked_aux_names = True
        missing = sorted(set(self.config.aux_loss_weights) - set(router_losses))
        if router_losses and missing:
            warnings.warn(
                f"config key 'aux_loss_weights' names {missing}, which the model's routers do not report "
                f"(they report {sorted(router_losses)}); those weights have no effect",
                stacklevel=2,
            )

    @torch.no_grad()
    def evaluate(self, dataset: Optional[Dataset] = None) -> Dict[str, float]:
        """Mean cross-entropy loss and accuracy of the model on ``dataset`` (the validation set by default)."""
        dataset = self.val_set if dataset is None else dataset
        if self.world_size > 1:
            return self._evaluate_distributed(dataset)
        was_training = self.model.training
        self.model.eval()
        loss_sum, correct, samples = 0.0, 0, 0
        for images, labels in self._loader(dataset, None, epoch=-1):
            images, labels = images.to(self.device), labels.to(self.device)
            with self._autocast():
                logits = self.model(images).float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(dim=-1) == labels).sum().item()
            samples += labels.numel()
        self.model.train(was_training)
        return {"loss": loss_sum / max(samples, 1), "accuracy": correct / max(samples, 1)}

    def _evaluate_distributed(self, dataset: Dataset) -> Dict[str, float]:
        """:meth:`evaluate` on several ranks: each its share of every global batch, the last padded and masked
        (visionmoe.distributed.data.rank_evaluation_batches), the sums all-reduced: one process's metrics."""
        batches = rank_evaluation_batches(
            len(dataset), self.config.batch_size, self.rank, self.world_size, self.routing_multiple
        )
        sampler = IndexBatchSampler(
            [index for indices, _ in batches for index in indices], [len(indices) for indices, _ in batches]
        )
        was_training = self.model.training
        self.model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.float64, device=self.device)
        for (_, valid), (images, labels) in zip(batches, self._loader(dataset, None, -1, batch_sampler=sampler)):
            images, labels = images.to(self.device), labels.to(self.device)
            mask = torch.tensor(valid, device=self.device)
            with self._autocast():
                logits = self.model(images).float()
            losses = F.cross_entropy(logits, labels, reduction="none")
            loss_sum += losses[mask].double().sum()
            correct += (logits.argmax(dim=-1) == labels)[mask].sum()
        self.model.train(was_training)
        loss_sum, correct = all_reduce_sum([loss_sum.item(), correct.item()], self.device)
        samples = len(dataset)
        return {"loss": loss_sum / max(samples, 1), "accuracy": correct / max(samples, 1)}

    def _run_epoch(self, progress: tqdm, step_log: Optional[CsvLog], writer) -> Dict[str, Any]:
        self.model.train()
        if self.teacher_router is not None:
            self.teacher_router.train()
        totals = self.totals
        order = rank_training_indices(
            self._epoch_order(self.epoch),
            self.config.batch_size,
            self.rank,
            self.world_size,
            self.drop_last,
            skip_batches=totals.batches,
        )
        started = time.perf_counter()
        for images, labels in self._loader(self.train_set, order, self.epoch):
            step = self._train_step(images, labels)
            totals.batches += 1
            totals.samples += step["samples"]
            totals.loss_sum += step["loss"] * step["samples"]
            totals.correct += step["correct"]
            totals.aux_loss_sum += step["aux_loss"] * step["samples"]
            if step["expert_load_ratio"] is not None:
                totals.load_ratio_sum += step["expert_load_ratio"]
                totals.load_ratio_count += 1
            if step["distillation_loss"] is not None:
                totals.distillation_loss_sum += step["distillation_loss"] * step["samples"]
                totals.distillation_samples += step["samples"]
            if step["teacher_router_loss"] is not None:
                totals.teacher_router_loss_sum += step["teacher_router_loss"] * step["samples"]
                totals.teacher_router_samples += step["samples"]
            self.global_step += 1
            totals.seconds += time.perf_counter() - started
            started = time.perf_counter()
            row = dict(
                epoch=self.epoch + 1,
                step=self.global_step,
                lr=step["lr"],
                loss=step["loss"],
                accuracy=step["correct"] / step["samples"],
                aux_loss=step["aux_loss"],
                expert_load_ratio=step["expert_load_ratio"],
                distillation_loss=step["distillation_loss"],
                teacher_router_loss=step["teacher_router_loss"],
            )
            if self.is_main:
                log_step(row, progress, step_log, writer)
            # Only now, with the step's row logged, is the state one to checkpoint: a second Ctrl-C before this
            # point keeps the previous checkpoint, whose resumption logs this step again.
            self._between_steps = True
            if self.step_callback is not None:
                self.step_callback(self, self.global_step)
            self._stop_if_requested()
        validation = self.evaluate()
        return dict(
            epoch=self.epoch + 1,
            step=self.global_step,
            lr=self.scheduler.get_last_lr()[0],
            train_loss=totals.loss_sum / totals.samples,
            train_accuracy=totals.correct / totals.samples,
            aux_loss=totals.aux_loss_sum / totals.samples,
            expert_load_ratio=(totals.load_ratio_sum / totals.load_ratio_count if totals.load_ratio_count else None),
            distillation_loss=(
                totals.distillation_loss_sum / totals.distillation_samples if totals.distillation_samples else None
            ),
            teacher_router_loss=(
                totals.teacher_router_loss_sum / totals.teacher_router_samples
                if totals.teacher_router_samples
                else None
            ),
            val_loss=validation["loss"],
            val_accuracy=validation["accuracy"],
            epoch_seconds=round(totals.seconds, 3),
        )

    # Ctrl-C: the first one asks the loop to stop after the current step (so the checkpoint holds a consistent
    # state); a second one interrupts at once. When that is during the checkpoint's save, the save is abandoned and
    # the last complete checkpoint stays, since saves are atomic (see checkpoint.py).
    def _request_stop(self, signum, frame) -> None:
        self._stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def _stop_if_requested(self) -> None:
        if self._stop_requested:
            raise KeyboardInterrupt

    def _pretraining_images(self):
        """The training images of the teacher router's ``tgr_pretrain_epochs`` epochs, in the student's epoch
        orders, on the device."""
        for epoch in range(self.config.tgr_pretrain_epochs):
            for images, _ in self._loader(self.train_set, self._epoch_order(epoch), epoch):
                yield images.to(self.device, non_blocking=True)

    def fit(self) -> FitResult:
        """Trains until ``config.epochs`` epochs are done, checkpointing after each; on Ctrl-C (or a
        KeyboardInterrupt from the step callback) checkpoints the state after the last finished step and returns
        with ``interrupted=True``."""
        main = self.is_main  # only rank 0 logs and reports
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        epoch_log = CsvLog(self.output_dir / "metrics.csv", EPOCH_COLUMNS, "epoch", self.epoch) if main else None
        step_log = (
            CsvLog(self.output_dir / "steps.csv", STEP_COLUMNS, "step", self.global_step)
            if self.config.log_steps and main
            else None
        )
        writer = tensorboard_writer(self.output_dir / "tensorboard") if self.config.tensorboard and main else None
        self._stop_requested = False
        self._between_steps = True
        previous_handler = None
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            previous_handler = signal.signal(signal.SIGINT, self._request_stop)
        progress = tqdm(
            total=self.steps_per_epoch * self.config.epochs,
            initial=self.global_step,
            desc="train",
            unit="step",
            disable=not (self.config.progress and main),
            dynamic_ncols=True,
        )
        history: List[Dict[str, Any]] = []
        interrupted = False
        try:
            if (
                self.teacher_router is not None
                and self.config.tgr_pretrain_epochs
                and self.global_step == 0
                and self.teacher_router.trainable
            ):
                pretrain_teacher_router(
                    self.teacher_router,
                    self._pretraining_images(),
                    self.config.lr,
                    self.config.tgr_pretrain_epochs,
                    progress,
                )
            if self.consistency is not None and not self.consistency.snapshots:
                self.consistency.record(self.model, self.epoch, self.consistency_phases[0])
            while self.epoch < self.config.epochs:
                progress.set_description(f"epoch {self.epoch + 1}/{self.config.epochs}")
                row = self._run_epoch(progress, step_log, writer)
                if main:
                    log_epoch(row, progress, epoch_log, writer)
                history.append(row)
                self.epoch += 1
                self.totals = _EpochTotals()
                if self.consistency is not None:
                    self.consistency.record(self.model, self.epoch, self.consistency_phases[1])
                    self.consistency.write(self.output_dir)
                self.save()
        except KeyboardInterrupt:
            if not self._between_steps:
                if main:
                    progress.write("Interrupted inside an optimiser step: no checkpoint written for this step")
                raise
            interrupted = True
            try:
                self.save()
            except KeyboardInterrupt:
                if main:
                    progress.write(
                        f"Interrupted again while saving step {self.global_step}: --resume "
                        f"{self.checkpoint_dir} continues from the last checkpoint saved completely"
                    )
                raise
            if main:
                progress.write(
                    f"Interrupted at epoch {self.epoch + 1}, step {self.global_step}: checkpoint saved "
                    f"to {self.checkpoint_dir}; continue with --resume {self.checkpoint_dir}"
                )
        finally:
            progress.close()
            if writer is not None:
                writer.close()
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
        return FitResult(history=history, interrupted=interrupted, checkpoint_dir=self.checkpoint_dir)
