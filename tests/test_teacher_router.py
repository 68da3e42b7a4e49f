"""Teacher-guided routing: the teacher router's hooks, freezing and losses, the distillation loss's gradients, and
the trainer's integration (schedule, pre-training, config errors, exact resume, the teacher in a fresh process)."""

import copy
import subprocess
import sys

import pytest
import torch
from test_train import TINY_MODEL, colour_rule_dataset, read_csv, tiny_config, without_timing
from torch import nn

from visionmoe import ops, reference
from visionmoe.layers import TeacherRouter, aligned_blocks, student_router_logits
from visionmoe.losses import entropy_loss, importance_loss, routing_distillation_loss
from visionmoe.models import create_model
from visionmoe.train import Trainer, config_from_dict, load_model
from visionmoe.train.config import tgr_fraction

# The teacher of TINY_MODEL students: the same dense architecture.
TEACHER_MODEL = {key: value for key, value in TINY_MODEL.items() if key != "moe"}
ARCH = dict(embed_dim=32, num_heads=2, patch_size=8)


def dense_teacher(depth=4):
    return create_model("vit_tiny_32", depth=depth, **ARCH).eval()


def student(depth=4, moe_blocks=(1, 3), num_experts=4):
    return create_model(
        "vmoe_tiny_32", depth=depth, moe_blocks=list(moe_blocks), moe=dict(num_experts=num_experts, k=1), **ARCH
    )


def block_outputs(teacher, images):
    """Every block's output, computed by running the teacher's parts by hand."""
    patches = teacher.patch_embed(images)
    x = torch.cat([teacher.cls_token.expand(images.shape[0], -1, -1), patches], dim=1) + teacher.pos_embed
    outputs = []
    for block in teacher.blocks:
        x = block(x)
        outputs.append(x)
    return outputs


# --- the teacher router ------------------------------------------------------------------------------------------


def test_hooks_tap_the_aligned_blocks_and_stop_after_the_deepest():
    teacher, images = dense_teacher(depth=5), torch.randn(3, 3, 32, 32)
    router = TeacherRouter.from_student(teacher, student(depth=5, moe_blocks=(1, 3)))
    assert router.layers == [1, 3]
    head_calls = []
    teacher.head.register_forward_hook(lambda *args: head_calls.append(1))
    features = router.teacher_features(images)
    with torch.no_grad():
        expected = block_outputs(teacher, images)
    assert [f.shape for f in features] == [(3, 17, 32)] * 2
    torch.testing.assert_close(features[0], expected[1])
    torch.testing.assert_close(features[1], expected[3])
    assert not head_calls  # block 4 and the head were not run
    # The teacher itself is unchanged: called directly it still returns its logits.
    assert teacher(images).shape == (3, 10) and head_calls == [1]
    probs = router(images)
    assert [p.shape for p in probs] == [(3, 17, 4)] * 2
    torch.testing.assert_close(probs[0].sum(-1), torch.ones(3, 17))
    normalised = nn.functional.layer_norm(expected[3], (32,))
    torch.testing.assert_close(probs[1], router.routers[1](normalised).softmax(-1))


def test_a_timm_style_teacher_with_a_module_list_of_blocks():
    class TimmStyle(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_dim = 16
            self.embed = nn.Linear(12, 16)
            self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16)) for _ in range(3))

        def forward(self, x):  # x [B, N, 12]
            x = self.embed(x)
            for block in self.blocks:
                x = x + block(x)
            return x.mean(1)

    teacher = TimmStyle()
    router = TeacherRouter(teacher, layers=[0, 2], num_experts=[3, 5])
    probs = router(torch.randn(2, 7, 12))
    assert [p.shape for p in probs] == [(2, 7, 3), (2, 7, 5)]


def test_teacher_is_frozen_runs_without_gradients_and_gets_none():
    teacher, moe = dense_teacher(), student()
    router = TeacherRouter.from_student(teacher, moe)
    router.train()
    assert not teacher.training  # the teacher stays in eval mode
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in router.routers.parameters())
    images = torch.randn(2, 3, 32, 32)
    assert not any(f.requires_grad for f in router.teacher_features(images))
    moe(images)
    probs = router(images)
    (routing_distillation_loss(student_router_logits(moe), probs) + sum(router.losses(probs).values())).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in router.routers.parameters())


def test_router_losses_are_the_weighted_importance_and_entropy():
    router = TeacherRouter.from_student(dense_teacher(), student())
    probs = router(torch.randn(3, 3, 32, 32))
    losses = router.losses(probs)
    assert set(losses) == {"teacher_importance", "teacher_entropy"}
    flat = [p.reshape(-1, 4) for p in probs]  # the whole batch is one group, as the student routes it
    torch.testing.assert_close(
        losses["teacher_importance"], 0.005 * (importance_loss(flat[0]) + importance_loss(flat[1]))
    )
    torch.testing.assert_close(losses["teacher_entropy"], 0.005 * (entropy_loss(flat[0]) + entropy_loss(flat[1])))


def test_the_distillation_loss_trains_the_student_only_and_reaches_unselected_experts():
    teacher, moe = dense_teacher(), student(num_experts=8)
    router = TeacherRouter.from_student(teacher, moe)
    images = torch.randn(2, 3, 32, 32)
    moe.train()
    moe(images)
    logits = student_router_logits(moe)
    for tensor in logits:
        tensor.retain_grad()
    probs = router(images)
    loss = routing_distillation_loss(logits, probs)
    loss.backward()
    # The teacher router learns only from its own losses: the KL stops at the teacher's probabilities.
    assert all(p.grad is None for p in router.routers.parameters())
    # The last MoE layer's logits feed nothing later, so their gradient is the KL's alone:
    # d(mean KL)/d logits = (softmax(student) - p_teacher) / T / |S| for every expert, selected (top-1) or not.
    # (The first layer's logits also get the later layer's KL through the student's combine weights.)
    last_logits = logits[-1].detach()
    tokens = last_logits.shape[1]
    expected = (last_logits.softmax(-1) - probs[-1].reshape(1, tokens, 8)) / tokens / 2
    torch.testing.assert_close(logits[-1].grad, expected)
    for student_logits in logits:
        selected = student_logits.detach().argmax(-1, keepdim=True)
        unselected_grad = student_logits.grad.scatter(-1, selected, 0.0)
        assert (unselected_grad.abs() > 0).sum() == tokens * 7
    # Hence every expert's row of every router's weight gets a gradient.
    for layer in (moe.blocks[1].mlp, moe.blocks[3].mlp):
        assert (layer.router.proj.weight.grad.abs().sum(dim=1) > 0).all()


def test_distillation_loss_is_the_mean_over_layers_of_the_operator():
    student_logits = [torch.randn(1, 6, 4), torch.randn(2, 3, 4)]
    teacher_probs = [torch.randn(2, 3, 4).softmax(-1), torch.randn(3, 2, 4).softmax(-1)]
    expected = (
        sum(
            reference.teacher_routing_loss(s.reshape(6, 4), t.reshape(6, 4))
            for s, t in zip(student_logits, teacher_probs)
        )
        / 2
    )
    torch.testing.assert_close(routing_distillation_loss(student_logits, teacher_probs), expected)
    # The KL of the temporary alias is the textbook one: sum_e p_t (log p_t - log p_s).
    s, t = student_logits[0].reshape(6, 4), teacher_probs[0].reshape(6, 4)
    torch.testing.assert_close(
        ops.teacher_routing_loss(s, t, reduction="none"), (t * (t.log() - s.log_softmax(-1))).sum(-1)
    )


def test_teacher_router_errors():
    teacher = dense_teacher()
    with pytest.raises(TypeError, match="teacher must have a 'blocks'"):
        TeacherRouter(nn.Linear(3, 3), [0], 4)
    with pytest.raises(ValueError, match=r"layers must hold block indices in \[0, 4\), got 4"):
        TeacherRouter(teacher, [1, 4], 4)
    with pytest.raises(ValueError, match="layers must be increasing"):
        TeacherRouter(teacher, [3, 1], 4)
    with pytest.raises(ValueError, match="num_experts must be an integer >= 1 or one per layer"):
        TeacherRouter(teacher, [1, 3], [4])
    with pytest.raises(ValueError, match="dim could not be read"):
        TeacherRouter(_blocks_only(), [0], 4)
    with pytest.raises(TypeError, match="num_experts must be an integer >= 1, got float 4.0"):
        TeacherRouter(teacher, [1], 4.0)
    assert [r.out_features for r in TeacherRouter(teacher, [1, 3], range(3, 5)).routers] == [3, 4]
    with pytest.raises(ValueError, match="importance_weight must be a finite number >= 0, got nan"):
        TeacherRouter(teacher, [1], 4, importance_weight=float("nan"))
    with pytest.raises(TypeError, match="normalize_features must be True or False, got int 1"):
        TeacherRouter(teacher, [1], 4, normalize_features=1)
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"teacher block 1 must return \[B, N, D\] features with D = 12"):
        TeacherRouter(teacher, [1], 4, dim=12)(images)
    with pytest.raises(
        ValueError,
        match="teacher block 1's features must have the dtype of the layer's weights, torch.float32, got torch.float64",
    ):
        TeacherRouter(copy.deepcopy(teacher).double(), [1], 4)(images.double())
    with pytest.raises(ValueError, match="the student has no sparse MoE layers"):
        aligned_blocks(dense_teacher())
    with pytest.raises(ValueError, match="MoE layer 0: the student routes"):
        routing_distillation_loss([torch.randn(1, 10, 4)], [torch.rand(2, 4, 4)])
    with pytest.raises(ValueError, match="one tensor per MoE layer"):
        routing_distillation_loss([torch.randn(1, 8, 4)], [])


def _blocks_only():
    model = nn.Module()
    model.blocks = nn.Sequential(nn.Identity())
    return model


def test_pretrain_trains_the_routers_on_their_losses_then_freezes_them():
    router = TeacherRouter.from_student(dense_teacher(), student())
    before = [p.detach().clone() for p in router.routers.parameters()]
    history = router.pretrain([torch.randn(4, 3, 32, 32) for _ in range(3)], lr=1e-2)
    assert len(history) == 3 and not router.trainable
    assert all(not torch.equal(a, b) for a, b in zip(before, router.routers.parameters()))
    with pytest.raises(ValueError, match="frozen already"):
        router.pretrain([torch.randn(4, 3, 32, 32)])


# --- training ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def datasets():
    return colour_rule_dataset(96, seed=1), colour_rule_dataset(64, seed=2)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, datasets):
    directory = tmp_path_factory.mktemp("teacher")
    Trainer(tiny_config(directory, model="vit_tiny_32", model_options=TEACHER_MODEL, epochs=1), *datasets).fit()
    return directory


def test_schedule_fractions():
    assert tgr_fraction("full") == 1.0 and tgr_fraction("first_half") == 0.5
    assert tgr_fraction(0.25) == 0.25 and tgr_fraction("0.75") == 0.75 and tgr_fraction(1) == 1.0


@pytest.mark.parametrize(
    "values, message",
    [
        ({"tgr_schedule": "half"}, "'tgr_schedule' must be 'full', 'first_half' or a fraction in (0, 1], got 'half'"),
        ({"tgr_schedule": 0}, "'tgr_schedule' must be 'full', 'first_half' or a fraction in (0, 1], got 0"),
        ({"tgr_schedule": 1.5}, "'tgr_schedule' must be 'full', 'first_half' or a fraction in (0, 1], got 1.5"),
        ({"tgr_schedule": True}, "'tgr_schedule' must be str or float, got bool True"),
        ({"tgr_weight": -1.0}, "'tgr_weight' must be >= 0, got -1.0"),
        ({"tgr_weight": "high"}, "'tgr_weight' must be float, got str 'high'"),
        ({"teacher": ""}, "'teacher' must be a checkpoint directory or null"),
        ({"teacher": 3}, "'teacher' must be null or str, got int 3"),
        ({"tgr_pretrain_epochs": -1}, "'tgr_pretrain_epochs' must be >= 0, got -1"),
        ({"consistency_probe": -2}, "'consistency_probe' must be >= 0"),
    ],
)
def test_config_errors_name_the_key(values, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        config_from_dict(values)


def test_trainer_errors_with_a_teacher(tmp_path, datasets, teacher_dir):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(tiny_config(tmp_path, teacher=str(tmp_path / "nowhere")), *datasets)
    with pytest.raises(ValueError, match="'teacher' needs a student with sparse MoE layers"):
        Trainer(
            tiny_config(tmp_path, model="vit_tiny_32", model_options=TEACHER_MODEL, teacher=str(teacher_dir)), *datasets
        )
    mismatched = dict(TINY_MODEL, patch_size=4)  # 65 tokens per image where the teacher has 17
    with pytest.raises(ValueError, match="teacher and student must see the same tokens"):
        Trainer(tiny_config(tmp_path, model_options=mismatched, teacher=str(teacher_dir)), *datasets).fit()


@pytest.mark.parametrize("schedule, distilled_steps", [("full", 6), ("first_half", 3), (0.5, 3), ("0.34", 2)])
def test_schedule_switches_the_distillation_off(tmp_path, datasets, teacher_dir, schedule, distilled_steps):
    # 96 images in batches of 32: 3 steps per epoch, 6 in all.
    trainer = Trainer(tiny_config(tmp_path, teacher=str(teacher_dir), tgr_schedule=schedule), *datasets)
    trainer.fit()
    steps = read_csv(tmp_path / "steps.csv")
    distilled = [row["distillation_loss"] != "" for row in steps]
    assert distilled == [True] * distilled_steps + [False] * (6 - distilled_steps)
    assert [row["teacher_router_loss"] != "" for row in steps] == distilled
    epochs = read_csv(tmp_path / "metrics.csv")
    assert (epochs[1]["distillation_loss"] != "") == (distilled_steps > 3)
    assert float(epochs[0]["distillation_loss"]) > 0


def test_teacher_guided_training_changes_the_student_and_trains_the_router(tmp_path, datasets, teacher_dir):
    plain = Trainer(tiny_config(tmp_path / "plain"), *datasets)
    plain.fit()
    guided = Trainer(tiny_config(tmp_path / "guided", teacher=str(teacher_dir)), *datasets)
    initial_router = [p.detach().clone() for p in guided.teacher_router.routers.parameters()]
    guided.fit()
    # The same seed builds the same student; the distillation makes the runs differ.
    assert not torch.equal(plain.model.blocks[1].mlp.router.proj.weight, guided.model.blocks[1].mlp.router.proj.weight)
    assert all(not torch.equal(a, b) for a, b in zip(initial_router, guided.teacher_router.routers.parameters()))
    # Nothing of the teacher is needed at inference: the student's checkpoint holds the student alone.
    deployed = load_model(tmp_path / "guided")
    assert deployed.state_dict().keys() == plain.model.state_dict().keys()
    images = datasets[1].tensors[0][:4]
    with torch.no_grad():
        torch.testing.assert_close(deployed(images), guided.model.eval()(images))
    # The teacher's weights are those of its checkpoint: frozen.
    teacher = load_model(teacher_dir)
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, guided.teacher_router.teacher.state_dict()[name]), name


def test_pretrained_then_frozen_router(tmp_path, datasets, teacher_dir, capsys):
    trainer = Trainer(tiny_config(tmp_path, teacher=str(teacher_dir), tgr_pretrain_epochs=1), *datasets)
    initial_router = [p.detach().clone() for p in trainer.teacher_router.routers.parameters()]
    trainer.fit()
    assert "teacher router pre-trained for 1 epoch(s)" in capsys.readouterr().out
    assert not trainer.teacher_router.trainable
    pretrained = [p.detach().clone() for p in trainer.teacher_router.routers.parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(initial_router, pretrained))
    steps = read_csv(tmp_path / "steps.csv")
    assert all(row["distillation_loss"] != "" and row["teacher_router_loss"] == "" for row in steps)
    resumed = Trainer(
        tiny_config(tmp_path, teacher=str(teacher_dir), tgr_pretrain_epochs=1, epochs=3), *datasets, resume=tmp_path
    )
    assert not resumed.teacher_router.trainable
    assert all(torch.equal(a, b) for a, b in zip(pretrained, resumed.teacher_router.routers.parameters()))


@pytest.mark.parametrize("interrupt_at_step", [2, 4])
def test_resume_with_a_teacher_reproduces_the_uninterrupted_run(tmp_path, datasets, teacher_dir, interrupt_at_step):
    def config(name):
        return tiny_config(tmp_path / name, teacher=str(teacher_dir), tgr_schedule="first_half", consistency_probe=4)

    reference_run = Trainer(config("reference"), *datasets)
    reference_run.fit()

    def interrupt(trainer, step):
        if step == interrupt_at_step:
            raise KeyboardInterrupt

    assert Trainer(config("resumed"), *datasets, step_callback=interrupt).fit().interrupted
    resumed = Trainer(config("resumed"), *datasets, resume=tmp_path / "resumed")
    resumed.fit()
    assert without_timing(read_csv(tmp_path / "resumed" / "metrics.csv")) == without_timing(
        read_csv(tmp_path / "reference" / "metrics.csv")
    )
    assert read_csv(tmp_path / "resumed" / "steps.csv") == read_csv(tmp_path / "reference" / "steps.csv")
    for module in ("model", "teacher_router"):
        expected, actual = getattr(reference_run, module).state_dict(), getattr(resumed, module).state_dict()
        for name, value in expected.items():
            assert torch.equal(value, actual[name]), f"{module}.{name}"
    assert (tmp_path / "resumed" / "routing_consistency.json").read_text() == (
        tmp_path / "reference" / "routing_consistency.json"
    ).read_text()


def test_resume_needs_the_same_teacher_setting(tmp_path, datasets, teacher_dir):
    Trainer(tiny_config(tmp_path / "guided", teacher=str(teacher_dir), epochs=1), *datasets).fit()
    with pytest.raises(ValueError, match="trained with a teacher router; config key 'teacher' must be set"):
        Trainer(tiny_config(tmp_path / "guided", epochs=2), *datasets, resume=tmp_path / "guided")
    Trainer(tiny_config(tmp_path / "plain", epochs=1), *datasets).fit()
    with pytest.raises(ValueError, match="trained without a teacher router; config key 'teacher' must be null"):
        Trainer(
            tiny_config(tmp_path / "plain", epochs=2, teacher=str(teacher_dir)), *datasets, resume=tmp_path / "plain"
        )


def test_cli_trains_with_a_teacher_in_a_fresh_process(tmp_path):
    """visionmoe-train --teacher: the teacher checkpoint is loaded by the checkpoint loader in a new process."""
    options = [
        "--set",
        "model_options.depth=2",
        "--set",
        "model_options.embed_dim=32",
        "--set",
        "model_options.num_heads=2",
        "--set",
        "model_options.patch_size=8",
        "--set",
        "progress=false",
        "--set",
        "tensorboard=false",
        "--set",
        "dataset_options.image_size=32",
        "--dataset",
        "digits",
        "--epochs",
        "1",
        "--batch-size",
        "128",
        "--device",
        "cpu",
    ]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "visionmoe.train",
            "--model",
            "vit_tiny_32",
            "--output-dir",
            str(tmp_path / "teacher"),
            *options,
        ],
        check=True,
        capture_output=True,
    )
    student_run = subprocess.run(
        [
            sys.executable,
            "-m",
            "visionmoe.train",
            "--model",
            "vmoe_tiny_32",
            "--set",
            "model_options.moe_blocks=[1]",
            "--set",
            "model_options.moe.num_experts=4",
            "--set",
            "model_options.moe.k=1",
            "--teacher",
            str(tmp_path / "teacher"),
            "--tgr-weight",
            "2.5",
            "--tgr-schedule",
            "first_half",
            "--output-dir",
            str(tmp_path / "student"),
            *options,
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    assert "distillation" in student_run.stdout
    (row,) = read_csv(tmp_path / "student" / "metrics.csv")
    assert float(row["distillation_loss"]) > 0 and float(row["teacher_router_loss"]) > 0
    saved = (tmp_path / "student" / "checkpoint" / "config.yaml").read_text()
    assert "tgr_weight: 2.5" in saved and "tgr_schedule: first_half" in saved


def test_an_empty_batch_gives_empty_teacher_probabilities_and_zero_losses():
    router = TeacherRouter(dense_teacher(), [1, 3], 4)
    probs = router(torch.randn(0, 3, 32, 32))
    assert [p.shape for p in probs] == [(0, 17, 4)] * 2
    router_losses = router.losses(probs)
    assert {name: value.item() for name, value in router_losses.items()} == {
        "teacher_importance": 0.0,
        "teacher_entropy": 0.0,
    }
