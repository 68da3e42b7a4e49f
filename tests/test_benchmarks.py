"""The benchmark scripts (benchmarks/bench_*.py): their command lines and one run of each at tiny sizes.

Every command recorded in the result files, in benchmarks/gpu_check.sh and in the scripts' own usage lines must
still parse (they are how the numbers in benchmarks/results/ and the README were made); each script's shared
options keep their defaults; and each script runs end to end on the CPU, writing its result files to a temporary
folder through the shared writer. Nothing here asserts on a time.
"""

import importlib
import json
import re
import shlex
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import common  # noqa: E402

SCRIPTS = sorted(path.stem for path in BENCHMARKS.glob("bench_*.py"))

# The shared options' defaults, as each script had them before they moved to common.benchmark_parser; None where
# the script has no such option (routing and wwt_model run in float32 / the model's own type; only the scripts
# that time with timeit_rounds have --rounds).
SHARED_DEFAULTS = {
    "bench_dispatch": dict(dtype="float32", warmup=2, repeat=10, rounds=None),
    "bench_expert_mlp": dict(dtype="float32", warmup=2, repeat=5, rounds=3),
    "bench_expert_parallel": dict(dtype=None, warmup=2, repeat=9, rounds=None),
    "bench_moe_layer": dict(dtype="float32", warmup=2, repeat=7, rounds=None),
    "bench_peers": dict(dtype="float32", warmup=1, repeat=1, rounds=7),
    "bench_routing": dict(dtype=None, warmup=2, repeat=7, rounds=None),
    "bench_sinkhorn": dict(dtype="float32", warmup=2, repeat=10, rounds=None),
    "bench_soft_moe": dict(dtype="float32", warmup=3, repeat=20, rounds=3),
    "bench_teacher_routing": dict(dtype="float32", warmup=3, repeat=20, rounds=3),
    "bench_whatwhere": dict(dtype="float32", warmup=2, repeat=5, rounds=5),
    "bench_wwt_model": dict(dtype=None, warmup=1, repeat=3, rounds=3),
}

# The smallest settings at which each script still runs every implementation it compares.
TINY = {
    "bench_dispatch": "--tokens 64 --dim 8 --experts 4",
    "bench_expert_mlp": "--rows 32 --dim 8 --hidden 16 --experts 4",
    "bench_expert_parallel": "--images 4 --tokens 4 --dim 8 --hidden 16 --experts 4 --group-size 1",
    "bench_moe_layer": "--tokens 64 --dim 8 --hidden 16 --experts 4",
    "bench_peers": "--tokens 64 --dim 8 --hidden 24 --experts 4 --topk 1 2",
    "bench_routing": "--routers topk soft --tokens 64 --dim 8 --experts 4 --topk 1 --soft-group-size 16",
    "bench_sinkhorn": "--tokens 32 --experts 4 --iterations 2",
    "bench_soft_moe": "--groups 2 --tokens 8 --dim 8 --experts 2 --slots-per-expert 1",
    "bench_teacher_routing": "--tokens 32 --experts 4",
    "bench_whatwhere": "--batch 1 --heads 1 --tokens 8 --slots 2 --head-dim 8 --memory-probes 1",
    "bench_wwt_model": "--model wwt_tiny_32 --batch 1 --num-classes 10",
}


def script(name):
    return importlib.import_module(name)


def recorded_commands():
    """(script, options) of every benchmark command written down in the repository."""
    commands = []
    for path in sorted((BENCHMARKS / "results").glob("*.json")):
        command = json.loads(path.read_text()).get("meta", {}).get("command")
        if command and Path(command[0]).stem.startswith("bench_"):
            commands.append((Path(command[0]).stem, command[1:]))
    lines = (BENCHMARKS / "gpu_check.sh").read_text().splitlines()
    lines += [line for name in SCRIPTS for line in (BENCHMARKS / f"{name}.py").read_text().splitlines()]
    for line in lines:
        match = re.search(r"benchmarks/(bench_\w+)\.py([^\"#`]*)", line)
        if match:
            commands.append((match.group(1), shlex.split(match.group(2))))
    return commands


def test_every_script_is_covered():
    assert set(SCRIPTS) == set(SHARED_DEFAULTS) == set(TINY)


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script(name).build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "--device" in capsys.readouterr().out


@pytest.mark.parametrize("name", SCRIPTS)
def test_shared_defaults(name):
    args = script(name).build_parser().parse_args([])
    assert args.device == "cpu" and args.threads is None and args.seed == 0 and args.tag is None
    assert args.output == common.RESULTS_DIR
    for option, default in SHARED_DEFAULTS[name].items():
        assert getattr(args, option, None) == default, option


@pytest.mark.parametrize(
    "name, options", recorded_commands(), ids=lambda value: " ".join(value) if isinstance(value, list) else value
)
def test_recorded_commands_parse(name, options):
    # build_parser alone: a --device cuda command parses on a machine without CUDA.
    script(name).build_parser().parse_args(options)


def test_recorded_commands_cover_every_script():
    assert {name for name, _ in recorded_commands()} == set(SCRIPTS)


@pytest.mark.parametrize(
    "options, message",
    [
        ("--repeat 0", "--repeat"),
        ("--warmup -1", "--warmup"),
        ("--threads 0", "--threads"),
        ("--rounds 0", "--rounds"),
        ("--dtype float64", "invalid choice"),
    ],
)
def test_shared_checks(options, message, capsys):
    parser = script("bench_expert_mlp").build_parser()
    with pytest.raises(SystemExit):
        common.parse_benchmark_args(parser, shlex.split(options))
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("name", ["bench_moe_layer", "bench_whatwhere"])
def test_memory_probe_command_parses(name):
    """A memory probe reruns the script with the run's options: the script's parser takes them back."""
    module = script(name)
    args = module.build_parser().parse_args(shlex.split(TINY[name]) + ["--threads", "1", "--output", "/tmp"])
    argv = common.memory_probe_argv(args, "visionmoe", ())
    assert not any(option.startswith("--output") for option in argv)
    probe = module.build_parser().parse_args(argv)
    assert probe.memory_probe == "visionmoe" and probe.threads == 1 and probe.tokens == args.tokens


def keep_this_process_heap(module, monkeypatch):
    """bench_whatwhere sets glibc's malloc to keep freed memory; not in the test process."""
    if hasattr(module, "keep_freed_memory_in_heap"):
        monkeypatch.setattr(module, "keep_freed_memory_in_heap", lambda: False)


@pytest.mark.parametrize("name", ["bench_moe_layer", "bench_whatwhere"])
def test_memory_probe_runs(name, capsys, monkeypatch):
    keep_this_process_heap(script(name), monkeypatch)
    script(name).main(shlex.split(TINY[name]) + ["--memory-probe", "visionmoe"])
    assert int(capsys.readouterr().out.split()[-1]) > 0


@pytest.mark.parametrize("name", SCRIPTS)
def test_runs_at_tiny_sizes(name, tmp_path, monkeypatch):
    module = script(name)
    keep_this_process_heap(module, monkeypatch)
    if hasattr(module, "peak_memory_in_fresh_process"):
        # A fresh process per implementation takes seconds; test_memory_probe_runs runs the probe itself.
        monkeypatch.setattr(
            module,
            "peak_memory_in_fresh_process",
            lambda script, args, implementation, skipped: 2**20 * (1 + len(implementation)),
        )
    threads = common.torch.get_num_threads()
    try:
        module.main(
            shlex.split(TINY[name])
            + ["--warmup", "0", "--repeat", "1", "--threads", "1", "--output", str(tmp_path), "--tag", "smoke"]
            + (["--rounds", "1"] if SHARED_DEFAULTS[name]["rounds"] else [])
        )
    finally:
        common.torch.set_num_threads(threads)
    written = sorted(path.name for path in tmp_path.iterdir())
    assert len(written) == 2 and all("_cpu_smoke." in file for file in written), written
    result = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert result["rows"] and result["meta"]["cpu_threads"] == 1
    assert "output" not in result["meta"] and "memory_probe" not in result["meta"]


def test_peers_absent_are_skipped_with_a_note(tmp_path, monkeypatch):
    """bench_peers with no peer importable: every peer's row says why it was skipped, the in-house rows run."""
    module = script("bench_peers")

    def absent(name):
        raise module.Skip(f"not installed (No module named {name!r})")

    monkeypatch.setattr(module, "import_peer", absent)
    monkeypatch.delattr(module.F, "grouped_mm", raising=False)
    threads = common.torch.get_num_threads()
    try:
        module.main(
            shlex.split(TINY["bench_peers"])
            + ["--warmup", "0", "--rounds", "1", "--threads", "1", "--output", str(tmp_path)]
        )
    finally:
        common.torch.set_num_threads(threads)
    result = json.loads(next(tmp_path.glob("peers_*.json")).read_text())
    rows = result["rows"]
    assert {row["K"] for row in rows} == {1, 2}
    timed = {(row["implementation"], row["semantics"]) for row in rows if row["median_ms"] is not None}
    assert timed == {
        ("dense", "dense"),
        ("visionmoe", "capacity"),
        ("visionmoe", "dropless"),
        ("expert_loop", "dropless"),
        ("einsum", "capacity"),
    }
    for row in rows:
        if row["median_ms"] is None:
            assert row["note"].startswith("skipped: "), row
        else:
            assert row["min_ms"] <= row["median_ms"] and row["allocated_peak_mb"] > 0
    assert rows[0]["implementation"] == "dense" and rows[0]["median_vs_dense"] == 1.0
    assert set(result["meta"]["peer_versions"]) >= {"torch", "transformers", "deepspeed", "tutel", "st-moe-pytorch"}
