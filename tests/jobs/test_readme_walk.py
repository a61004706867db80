"""The README's commands, walked as a new user runs them after `make demo`, with tiny step counts.

Every command line in README.md's ``bash`` blocks is either run here (in README order, in-process through
the CLI's entry point on one Ray instance for the module) or named below with the test that covers it,
so a command added to the README without a walk fails this module. Tiny configs get ``SMALL`` (a 1-layer
model, 16 clips, 2 steps per stage) and every ``outputs/`` path moves under a temporary folder; a step
budget the README raises (``teacher.steps=3500``: "500 more steps") becomes 2 more steps than ``SMALL``.
Commands that need what this machine lacks (a GPU, real Wan weights, a video folder) must stop with one
line naming it. The walk's folders then serve the checks of what the core jobs write (the causal ones included) and of runs
as records (a resume with a larger budget and ``run.new_run=true`` are README commands).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml

from anyflow_ray.cli import main
from anyflow_ray.data.shards import read_shards
from anyflow_ray.run.logger import read_metrics
from anyflow_ray.training.export import open_pipeline

README = Path(__file__).resolve().parents[2] / "README.md"
# what `make demo` runs (the Makefile's CONFIG) and the folder under outputs/ it writes
DEMO_CONFIG = re.search(r"^CONFIG \?= (\S+)$", (README.parent / "Makefile").read_text(), re.M).group(1)
DEMO = Path(yaml.safe_load(Path(README.parent / DEMO_CONFIG).read_text())["run"]["output_dir"]).name
BUDGETS = {"teacher.steps": 2, "pretrain.steps": 2, "distill.steps": 2}
SMALL = ["model.tiny.num_layers=1", "model.tiny.ffn_dim=32", "run.threads=1", "data.num_train=16",
         "data.num_heldout=8", "data.shard_size=8", "learner.num_ranks=1", "learner.cpus_per_rank=0.5",
         "learner.timeouts.step=240", "learner.timeouts.setup=240", "teacher.batch_size=4", "teacher.warmup=1", "teacher.log_every=1",
         "teacher.save_every=2", "pretrain.global_batch=4", "pretrain.warmup=1", "pretrain.log_every=1",
         "pretrain.save_every=2", "distill.real_batch=4", "distill.save_every=2", "distill.log_every=1",
         "distill.budgets=[2]", "rollout.batch_size=2", "rollout.cpus_per_actor=0.25", "eval.num_prompts=4",
         "eval.steps=[1,2]", "eval.reference_steps=2", "eval.swd_projections=8", "eval.batch_size=4",
         "sample.steps=[1,2]", 'sample.prompts=["a red circle moving left"]',
         *(f"{key}={steps}" for key, steps in BUDGETS.items())]
# README lines not run here, and where they are covered
COVERED_ELSEWHERE = {
    "make test": "this suite",
    "export RAY_AUTH_TOKEN": "tests/jobs/test_job_submission.py (a token head)",
    "cluster/submit.sh": "tests/jobs/test_job_submission.py (the shipped runtime env against a token head)",
    "anyflow-ray <command>": "the command-line template",
}
# README commands that need what this machine lacks: each stops with one line naming it
NEEDS_WHAT_IS_MISSING = {"bench-scale": "--allow-cpu", "/models/Wan2.1-T2V-1.3B-Diffusers": "model.base",
                         "/mnt/anyflow/videos": "/mnt/anyflow/videos"}


def readme_commands(text: str) -> list[list[str]]:
    """The command lines of the README's bash blocks, continuation lines joined, comments dropped,
    ``NAME=value`` lines applied to later ``$NAME`` and ``a && b`` split, as argument lists (a pipe,
    ``a | grep P``, stays in the list: the walk runs ``a`` and checks ``P`` against what it printed)."""
    commands, variables = [], {}
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for name, value in variables.items():
                line = line.replace(f"${name}", value)
            tokens = shlex.split(line, comments=True)
            if len(tokens) == 1 and re.fullmatch(r"[A-Z_]+=\S+", tokens[0]):
                name, value = tokens[0].split("=", 1)
                variables[name] = value
                continue
            while tokens:
                head = tokens.index("&&") if "&&" in tokens else len(tokens)
                commands.append(tokens[:head])
                tokens = tokens[head + 1:]
    return commands


def as_walked(tokens: list[str], root: Path) -> list[str]:
    """The CLI arguments of a README command as this walk runs it (see the module docstring)."""
    args = [token.replace("outputs/", f"{root}/") for token in tokens[1:]]
    if args[:1] == ["make-tiny"] and args[1:] == ["OUT"]:
        return ["make-tiny", str(root / "make-tiny-out")]
    config = args[args.index("--config") + 1] if "--config" in args else ""
    if not Path(config).name.startswith("tiny"):
        return args
    args = [f"{token.split('=')[0]}={BUDGETS[token.split('=')[0]] + 2}" if token.split("=")[0] in BUDGETS else token
            for token in args]
    output = Path(__import__("yaml").safe_load(Path(config).read_text())["run"]["output_dir"]).name
    return [*args[:args.index("--config") + 2], *SMALL, f"run.output_dir={root / output}",
            *args[args.index("--config") + 2:]]


def cli_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("anyflow-ray ")]


@pytest.fixture(scope="module")
def walk(ray_module, tmp_path_factory):
    """Every README command, in order; ``{command line: (exit code, the CLI's stderr lines)}`` and the root."""
    root = tmp_path_factory.mktemp("readme")
    capture = pytest.MonkeyPatch()
    results, skipped = {}, []
    import io
    import sys

    for tokens in readme_commands(README.read_text()):
        line = " ".join(tokens)
        tokens, pipe = (tokens[:tokens.index("|")], tokens[tokens.index("|") + 1:]) if "|" in tokens else (tokens, [])
        if line == "make demo":
            tokens = ["anyflow-ray", "demo", "--config", DEMO_CONFIG]
            capture.setenv("WANDB_MODE", "offline")  # as on a fresh machine (the suite turns wandb off)
        elif any(line.startswith(prefix) for prefix in COVERED_ELSEWHERE):
            skipped.append(line)
            continue
        assert tokens[0] == "anyflow-ray", f"README command not walked and not covered elsewhere: {line}"
        err, out = io.StringIO(), io.StringIO()
        capture.setattr(sys, "stderr", err)
        if pipe:
            capture.setattr(sys, "stdout", out)
        started = time.perf_counter()
        try:
            code = main(as_walked(tokens, root))
        finally:
            capture.undo()
        results[line] = (code, cli_lines(err.getvalue()))
        if pipe:
            assert pipe[0] == "grep" and len(pipe) == 2, f"README pipe the walk cannot check: {line}"
            results[f"{line}: lines the pipe keeps"] = [l for l in out.getvalue().splitlines() if re.search(pipe[1], l)]
        if line == "make demo":  # what the README's run.new_run=true commands must leave as it is
            results["stage1 after make demo"] = snapshot(root / DEMO / "stage1")
        print(f"{time.perf_counter() - started:6.1f}s  {line}")  # pytest -s: where the walk's time goes
    return root, results, skipped


def test_every_readme_command_runs_as_written_or_names_what_is_missing(walk):
    root, results, skipped = walk
    assert len(results) >= 15 and "make demo" in results
    commands = {k: v for k, v in results.items() if k != "stage1 after make demo" and "the pipe keeps" not in k}
    for line, (code, errors) in commands.items():
        missing = [needle for needle in NEEDS_WHAT_IS_MISSING if needle in line]
        if missing:
            assert code != 0 and len(errors) == 1, (line, errors)
            assert NEEDS_WHAT_IS_MISSING[missing[0]] in errors[0], (line, errors)
        else:
            assert code == 0, (line, errors)
    assert sorted({line.split()[0] for line in skipped}) == ["anyflow-ray", "cluster/submit.sh", "export", "make"]
    piped = {k: v for k, v in results.items() if "the pipe keeps" in k}
    assert piped and all(piped.values()), piped  # the config command's '^\*' lines: the keys a config changes


def test_the_walk_did_what_each_command_says(walk):
    root, _, _ = walk
    tiny = root / DEMO
    # "make demo": every stage, the consistency baseline, samples of the three models, the evaluation
    assert yaml_of(tiny / "consistency" / "config.yaml")["distill"]["rollout"] == "consistency"
    for stage in ("teacher", "stage1", "stage2"):
        assert (tiny / stage / "model_index.json").is_file()
        assert (tiny / "samples" / stage / "contact_sheet.png").is_file()
    assert (tiny / "eval" / "results.json").is_file()
    # "teacher.steps=3500: 500 more teacher steps": the teacher resumed and trained on
    assert [r["step"] for r in read_metrics(tiny / "teacher" / "metrics.jsonl")] == [1, 2, 3, 4]
    assert (tiny / "teacher" / "checkpoints" / "latest").read_text().strip() == "step-000004"
    assert yaml_of(tiny / "teacher" / "config.yaml")["teacher"]["steps"] == 4  # the resume records its budget
    # the two `run.new_run=true` Stage-1 runs and the 2-actor Stage 2 went to fresh folders, the earlier
    # Stage 1 left byte-identical
    assert (tiny / "stage1-2" / "model_index.json").is_file() and (tiny / "stage1-3" / "model_index.json").is_file()
    assert snapshot(tiny / "stage1") == walk[1]["stage1 after make demo"]
    assert yaml_of(tiny / "stage1-3" / "config.yaml")["pretrain"]["target"] == "data"
    summary = json.loads((tiny / "stage2-2" / "pipeline_summary.json").read_text())
    assert len(summary["loaded_versions"]) == 2 and summary["trained"] == summary["taken"]
    # every evaluated model side by side on the same prompts and noise
    assert (tiny / "eval" / "comparison.png").stat().st_size > 1000
    assert (root / "make-tiny-out" / "transformer" / "config.json").is_file()
    # the real-video path on the tiny latent model: mp4 clips -> prepared shards -> three stages
    latent = root / "tiny-latent"
    assert list((latent / "data" / "videos" / "train").glob("*.mp4"))
    assert read_shards(latent / "data" / "train").videos.shape[1] == 4  # Wan-VAE-style latents, not pixels
    assert (latent / "data" / "heldout" / "manifest.json").is_file()
    assert json.loads((latent / "stage2" / "model_index.json").read_text())["_class_name"] == "AnyFlowPipeline"
    # the README's python block as written: diffusers' own AnyFlowPipeline samples the latent Stage 2
    snippet = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    scope = {}
    exec(snippet.replace('"outputs/', f'"{root}/'), scope)
    assert type(scope["pipe"]).__module__.startswith("diffusers") and scope["frames"].shape == (1, 9, 32, 32, 3)
    stage1 = read_metrics(latent / "stage1" / "metrics.jsonl")  # Stage 1 trained on the prepared latents
    assert [r["step"] for r in stage1] == [1, 2] and all(0 < r["pretrain/loss"] < float("inf") for r in stage1)


def yaml_of(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# -- what the core jobs write, checked on the walk's folders ------------------------------------------
def test_data_shards_and_resolved_config(walk):
    data = walk[0] / DEMO / "data"
    train, heldout = read_shards(data / "train"), read_shards(data / "heldout")
    assert len(train.prompts) == 16 and len(heldout.prompts) == 8
    assert train.videos.shape[1:] == (3, 8, 16, 16)
    assert not set(train.seeds.tolist()) & set(heldout.seeds.tolist())
    assert (data / "config.yaml").is_file()


def test_teacher_writes_pipeline_metrics_and_wandb(walk):
    from anyflow_ray.pipeline import AnyFlowRayPipeline

    teacher = walk[0] / DEMO / "teacher"
    assert type(AnyFlowRayPipeline.from_pretrained(teacher).transformer).__name__ == "WanTransformer3DModel"
    assert all(r["teacher/loss"] > 0 for r in read_metrics(teacher / "metrics.jsonl"))
    assert list((teacher / "wandb").glob("offline-run-*"))
    assert (teacher / "config.yaml").is_file()


def test_sample_defaults_to_the_student_and_writes_one_folder_per_model(walk, tmp_path, capsys):
    from PIL import Image

    from anyflow_ray.run.config import load_config
    from anyflow_ray.jobs.sample import models_to_sample

    tiny = walk[0] / DEMO
    cfg = load_config(DEMO_CONFIG, [f"run.output_dir={tiny}"])
    assert models_to_sample(cfg) == [str(tiny / "stage2")]  # the final student, not the teacher
    assert models_to_sample(load_config(DEMO_CONFIG, [f"run.output_dir={tiny}", "sample.model=/m/x"])) == ["/m/x"]
    args = ["--config", DEMO_CONFIG, *SMALL, f"run.output_dir={tiny}", f"sample.output={tmp_path}/s"]
    assert main(["sample", *args, f"distill.output={tmp_path}/none"]) != 0  # no student: refused by key and folder
    err = capsys.readouterr().err
    assert "sample.models" in err and f"{tmp_path}/none" in err
    assert main(["sample", *args]) == 0
    assert sorted(p.name for p in (tmp_path / "s").iterdir() if p.is_dir()) == ["stage2"]
    for steps in (1, 2):
        assert (tmp_path / "s" / "stage2" / f"a_red_circle_moving_left_{steps}steps.gif").is_file()
    sheet = Image.open(tmp_path / "s" / "stage2" / "contact_sheet.png")
    frames, steps = 8, 2  # data.frames, sample.steps=[1,2]: every 16x16 frame drawn at least 64 px a side
    assert sheet.width >= steps * frames * 64 and sheet.height >= 64


def test_evaluate_writes_table_json_and_plot(walk):
    results = json.loads((walk[0] / DEMO / "eval" / "results.json").read_text())
    runs = {(r["model"], r["sampler"]) for r in results["rows"]}
    assert runs == {("teacher", "flowmap"), ("stage1", "flowmap"), ("stage2", "flowmap"),
                    ("consistency", "flowmap"), ("consistency", "consistency")}  # the baseline with both samplers
    assert sorted({r["steps"] for r in results["rows"]}) == [1, 2]
    assert all(r["ode_rmse"] >= 0 and 0 <= r["all"] <= 1 for r in results["rows"])
    assert all(r["fd"] > 0 and 0 <= r["classifier_all"] <= 1 for r in results["rows"])  # the feature classifier's
    assert 0 <= results["meta"]["reference_fd_floor"] < float("inf")  # 4 clips a side here: no ranking to check
    assert (walk[0] / DEMO / "data" / "feature_classifier" / "classifier.json").is_file()  # cached with the data
    assert (walk[0] / DEMO / "eval" / "quality_vs_steps.png").stat().st_size > 1000
    table = (walk[0] / DEMO / "eval" / "results.md").read_text()
    assert table.count("| teacher |") == 2 and table.count("| consistency [consistency sampler] |") == 2
    assert "FD ↓" in table


def test_corrupt_shard_is_refused_by_name(walk, tmp_path, capsys):
    bad = tmp_path / "data"
    shutil.copytree(walk[0] / DEMO / "data", bad)
    (bad / "train" / "shard-00000.parquet").write_bytes(b"not parquet")
    code = main(["teacher", "--config", DEMO_CONFIG, *SMALL, f"run.output_dir={walk[0] / DEMO}",
                 f"data.root={bad}", f"teacher.output={tmp_path}/t"])
    assert code != 0 and "shard-00000.parquet" in capsys.readouterr().err


def test_stage1_writes_a_loadable_flow_map_checkpoints_and_metrics(walk):
    from anyflow_ray.pipeline import AnyFlowRayPipeline

    out = walk[0] / DEMO / "stage1"
    assert type(AnyFlowRayPipeline.from_pretrained(out).transformer).__name__ == "WanFlowMapTransformer3DModel"
    index = json.loads((out / "model_index.json").read_text())  # pixel space: the project's pipeline, the
    assert index["_class_name"] == "AnyFlowRayPipeline"          # transformer saved as diffusers' class
    assert index["transformer"][1] == "AnyFlowTransformer3DModel"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000002"
    # a checkpoint holds the trainable state only; the model it rebuilds is the exported one
    assert sorted(p.name for p in (out / "checkpoints" / "step-000002").iterdir()) == ["training_state"]
    exported = AnyFlowRayPipeline.from_pretrained(out).transformer.state_dict()
    rebuilt = open_pipeline(out / "checkpoints" / "step-000002").transformer.state_dict()
    assert all(torch.equal(exported[n], rebuilt[n]) for n in exported)
    assert json.loads((out / "export.json").read_text())["step"] == 2
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2] and all(r["pretrain/frac_diagonal"] == 0.5 for r in records)
    assert list((out / "wandb").glob("offline-run-*"))


# -- runs are records, on the walk's teacher (4 steps after the README's resume) ---------------------
def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def teacher(walk, *extra) -> int:
    return main(["teacher", "--config", DEMO_CONFIG, *SMALL, f"run.output_dir={walk[0] / DEMO}",
                 "teacher.steps=4", *extra])


def test_resume_with_a_changed_config_is_refused_and_rewrites_nothing(walk, capsys):
    before = snapshot(walk[0] / DEMO / "teacher")
    assert teacher(walk, "teacher.lr=0.01", "teacher.steps=6") == 2
    err = cli_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("anyflow-ray teacher: ")
    assert "teacher.lr: 0.002 -> 0.01" in err[0] and "run.new_run=true" in err[0] and "teacher.steps" not in err[0]
    assert teacher(walk, "learner.num_ranks=2", "teacher.steps=6") == 2  # a checkpoint of another world size
    err = cli_lines(capsys.readouterr().err)
    assert len(err) == 1 and "learner.num_ranks: 1 -> 2" in err[0]
    assert snapshot(walk[0] / DEMO / "teacher") == before  # config.yaml, metrics, model, checkpoints


def test_nothing_left_to_train_says_so_and_leaves_the_folder_byte_identical(walk, capsys):
    before = snapshot(walk[0] / DEMO / "teacher")
    assert teacher(walk, "teacher.log_every=2") == 0  # a logging knob may differ
    out = capsys.readouterr().out.strip().splitlines()
    assert any("nothing to train" in line and "step 4 of teacher.steps=4" in line for line in out)
    assert snapshot(walk[0] / DEMO / "teacher") == before


def test_a_run_killed_between_its_last_checkpoint_and_its_export_reruns_into_the_same_model(walk, capsys):
    """What a kill during the final export leaves (no marker, a torn transformer file, model_index.json
    gone): the re-run exports the last checkpoint instead of reporting nothing to train."""
    folder = walk[0] / DEMO / "teacher"
    before = snapshot(folder)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    for torn in (folder / "export.json", folder / "model_index.json"):
        torn.unlink()
    weights.write_bytes(weights.read_bytes()[:100])
    assert teacher(walk) == 0
    out = capsys.readouterr().out
    assert "its export is missing or incomplete: exporting it from checkpoints/step-000004" in out
    after = snapshot(folder)
    marker = json.loads(after.pop("export.json"))
    assert marker["step"] == 4 and marker["source"].endswith("step-000004")
    before.pop("export.json")
    assert after == before  # the same files, byte for byte (config, metrics, checkpoints and the model)
    assert teacher(walk) == 0 and "nothing to train" in capsys.readouterr().out


def test_a_cluster_too_small_for_the_config_stops_at_once_in_one_line(walk, capsys):
    start = time.monotonic()
    assert teacher(walk, f"teacher.output={walk[0] / 'big'}", "learner.cpus_per_rank=8") == 2
    err = cli_lines(capsys.readouterr().err)
    assert len(err) == 1 and "the cluster cannot hold" in err[0] and "learner.cpus_per_rank" in err[0]
    assert time.monotonic() - start < 60


# -- the causal variant, on the walk's `demo --config configs/tiny-causal.yaml` ---------------------------
def test_causal_stage1_exports_a_causal_pipeline(walk):
    from anyflow_ray.pipeline import AnyFlowRayPipeline

    out = walk[0] / "tiny-causal" / "stage1"
    transformer = AnyFlowRayPipeline.from_pretrained(out).transformer
    assert type(transformer).__name__ == "WanCausalFlowMapTransformer3DModel"
    assert list(transformer.config.causal_chunks) == [2, 2, 2, 2]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000002"
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["pretrain/noised_chunks"] == 4 and r["pretrain/frac_diagonal"] == 0.5 and r["pretrain/loss"] > 0
               for r in records)


def test_causal_evaluation_reports_each_chunk_and_a_stream(walk):
    out = walk[0] / "tiny-causal" / "eval"
    result = json.loads((out / "results.json").read_text())
    fixed = [r for r in result["chunk_rows"] if not r["streaming"]]
    stream = [r for r in result["chunk_rows"] if r["streaming"]]
    # every model per chunk at the training length; the causal ones stream 2x as long from the rolling cache
    assert [(r["model"], r["steps"], r["chunk"], r["start"], r["end"]) for r in fixed] == [
        (model, n, j, 2 * j, 2 * j + 2) for model in ("teacher", "stage1", "stage2") for n in (1, 2) for j in range(4)]
    assert [(r["model"], r["steps"], r["chunk"], r["end"]) for r in stream] == [
        (model, n, j, 2 * j + 2) for model in ("stage1", "stage2") for n in (1, 2) for j in range(8)]
    # the teacher's 2-step samples are the reference (eval.reference_steps=2): 0 in every chunk, the students' not
    assert all((r["ode_rmse"] == 0) == (r["model"] == "teacher" and r["steps"] == 2) and r["swd"] > 0 for r in fixed)
    assert all(r["ode_rmse"] is None and r["swd"] > 0 for r in stream)
    assert result["meta"]["chunks"] == [2, 2, 2, 2] and result["meta"]["stream_frames"] == 16
    assert len(result["meta"]["chunk_swd_floor"]) == 4 and all(r["fd"] > 0 for r in result["rows"])
    assert (out / "quality_per_chunk.png").is_file()
    assert "SWD ↓ per chunk, streaming 16 latent frames" in (out / "results.md").read_text()
    # `sample --config configs/tiny-causal.yaml`: the final causal student, 16 frames (twice the training length)
    from anyflow_ray.jobs.sample import read_video

    assert read_video(str(walk[0] / "tiny-causal" / "samples" / "stage2" / "a_red_circle_moving_left_4steps.mp4")
                      ).shape[0] == 16
