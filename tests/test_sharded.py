"""Sharded (FSDP, DeepSpeed ZeRO-2) and multi-node training through accelerate, run on CPUs.

- The configs in configs/accelerate/ go through accelerate's own launch parsing into its plugins.
- FSDP2 and FSDP1: 2 gloo processes under accelerate's FSDP code path (tests/sharded_on_cpu.py explains why
  and how it is forced on a machine without GPUs). The saved folder must hold the gathered model:
  it loads with AutoModel, equals accelerate's own gathered checkpoint, gives the same embeddings,
  and equals a DDP run of the same steps (which also proves the gradient norm clipped is global).
  A resume from a mid-epoch checkpoint ends on the same weights.
- DeepSpeed ZeRO-2: the same, where deepspeed is installed (it is not a test dependency).
- Multi-node: two `accelerate launch` "machines" of one process each on 127.0.0.1.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from conftest import TINY, free_port

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "accelerate"
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
HARNESS = str(REPO / "tests" / "sharded_on_cpu.py")
OVERRIDES = ",".join(f"{k}={v}" for k, v in TINY.items())
STEPS = ["--max_steps", "3", "--checkpointing_steps", "2"]  # 3 batches per process and epoch: step 2 is mid-epoch
# Evaluation during training at step 2, in the DDP and FSDP runs below (their weights must still agree).
EVAL = ["--eval_steps", "2", "--eval_suites", "retrieval_twemoji,pointing_game", "--eval_suites_max_items", "12"]


def train_flags(data, out, *extra):
    return [str(REPO / "train.py"), "--train_data", str(data), "--output_dir", str(out), "--config_overrides", OVERRIDES,
            "--per_device_batch_size", "8", "--warmup_steps", "2", "--do_eval", "false", "--report_to", "none",
            "--logging_steps", "1", "--mixed_precision", "no", *extra]


def env(**extra):
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # keeps a deepspeed found there
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def launch(launcher: list[str], data, out, *extra, harness: bool = False, data_home: Path | None = None):
    command = [ACCELERATE, "launch", *launcher, "--mixed_precision", "no", "--dynamo_backend", "no",
               *([HARNESS] if harness else []), *train_flags(data, out, *extra)]
    extra_env = {"ONER_DATA_HOME": str(data_home)} if data_home else {}
    result = subprocess.run(command, env=env(**extra_env), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def cpu_fsdp_config(tmp_path: Path, name: str) -> Path:
    """configs/accelerate/<name>.yaml for CPU processes: sync_module_states needs a GPU in accelerate."""
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    config["fsdp_config"]["fsdp_sync_module_states"] = False
    path = tmp_path / f"{name}-cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def assert_same_weights(a: dict, b: dict, atol=1e-6):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].shape == b[name].shape, name
        assert torch.allclose(a[name], b[name], atol=atol, rtol=0), name


def log(folder: Path, kind: str = "loss") -> list[dict]:
    """The training log's lines of steps (`kind` "loss") or of evaluations ("eval_seconds")."""
    lines = [json.loads(line) for line in (folder / "training_log.jsonl").read_text().splitlines()]
    return [r for r in lines if kind in r]


@pytest.fixture(scope="module")
def embedded_home(tmp_path_factory):
    """A small embedded data set for the evaluations during training (ONER_DATA_HOME)."""
    from oner.data import build_embedded_dataset

    return build_embedded_dataset(tmp_path_factory.mktemp("embedded") / "data", limit=40, progress=False)


@pytest.fixture(scope="module")
def ddp_run(pairs_dir, tmp_path_factory, embedded_home):
    out = tmp_path_factory.mktemp("ddp") / "run"
    launch(["--multi_gpu", "--num_processes", "2", "--num_machines", "1"], pairs_dir, out, *STEPS, *EVAL,
           data_home=embedded_home)
    return out


# FSDP2 (fully_shard: DTensor shards) and FSDP1 (FullyShardedDataParallel: flat-parameter shards)
FSDP_CONFIGS = {"fsdp": 2, "fsdp1": 1}


@pytest.fixture(scope="module", params=sorted(FSDP_CONFIGS))
def fsdp_run(request, pairs_dir, tmp_path_factory, embedded_home):
    name = request.param
    root = tmp_path_factory.mktemp(name)
    out = root / "run"
    result = launch(["--config_file", str(cpu_fsdp_config(root, name)), "--num_processes", "2"], pairs_dir, out,
                    *STEPS, *EVAL, harness=True, data_home=embedded_home)
    return out, result, name


# --------------------------------------------------------------------------- configs


def _launch_env(name: str) -> tuple[SimpleNamespace, dict]:
    """What `accelerate launch --config_file configs/accelerate/<name>.yaml` hands the processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / f"{name}.yaml"), "train.py"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate's launch_command does before its deepspeed_launcher
        args.deepspeed_fields_from_accelerate_config = ",".join(list(defaults.deepspeed_config) +
                                                                (["mixed_precision"] if mp_from_config else []))
        return args, prepare_deepspeed_cmd_env(args)[1]
    return args, prepare_multi_gpu_env(args)


def test_ddp_configs_launch_multi_gpu():
    args, env_ = _launch_env("ddp")
    assert args.multi_gpu and args.num_machines == 1 and env_["ACCELERATE_MIXED_PRECISION"] == "bf16"
    args, env_ = _launch_env("ddp_multinode")
    assert args.multi_gpu and args.num_machines == 2 and args.num_processes == 16
    assert args.main_process_port == 29500 and args.rdzv_backend == "static"


@pytest.mark.parametrize("name", sorted(FSDP_CONFIGS))
def test_fsdp_configs_shard_each_encoder_layer_and_save_full_state_dicts(name, tiny_model):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import ShardingStrategy, StateDictType

    from oner.objectives import ObjectiveConfig
    from oner.training.pretrainer import OneRPretrainer

    args, env_ = _launch_env(name)
    assert args.use_fsdp and env_["ACCELERATE_USE_FSDP"] == "true"
    # accelerate's plugin refuses sync_module_states (fsdp1.yaml: every rank starts from rank 0's
    # weights) without a GPU device: off here.
    with mock.patch.dict(os.environ, {**env_, "FSDP_SYNC_MODULE_STATES": "false"}):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == FSDP_CONFIGS[name]
    if plugin.fsdp_version == 1:
        assert env_["FSDP_SYNC_MODULE_STATES"] == "true" and plugin.use_orig_params
        assert plugin.sharding_strategy == ShardingStrategy.FULL_SHARD
    else:
        assert plugin.reshard_after_forward is True  # full shard
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT
    assert plugin.transformer_cls_names_to_wrap == ["OneREncoderLayer"]
    plugin.set_auto_wrap_policy(OneRPretrainer(tiny_model, ObjectiveConfig()))  # raises if the class is not in the model
    assert plugin.auto_wrap_policy is not None


def test_deepspeed_config_is_zero2_and_takes_max_grad_norm():
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    from oner.training.sharding import check_supported, configure_deepspeed_clipping

    args, env_ = _launch_env("deepspeed_zero2")
    assert args.use_deepspeed and args.zero_stage == 2
    with mock.patch.dict(os.environ, env_):
        plugin = DeepSpeedPlugin()
    config = plugin.deepspeed_config
    assert config["zero_optimization"]["stage"] == 2 and config["gradient_accumulation_steps"] == 1
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "none"
    accelerator = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=plugin))
    assert configure_deepspeed_clipping(accelerator, 0.5) is None and config["gradient_clipping"] == 0.5
    assert "make them agree" in configure_deepspeed_clipping(accelerator, 1.0)
    assert "--accum_freq" in check_supported(accelerator, SimpleNamespace(accum_freq=2, momentum=0.0))
    assert check_supported(accelerator, SimpleNamespace(accum_freq=1, momentum=0.9)) is None


# --------------------------------------------------------------------------- helpers, in process


def test_scalar_parameters_are_promoted_and_saved_with_the_models_shapes(tiny_model, tiny_config):
    from modeling_oner import OneRModel
    from oner.objectives import ObjectiveConfig
    from oner.training.pretrainer import OneRPretrainer
    from oner.training.sharding import build_model_for_saving, promote_scalar_parameters

    tiny_config.logit_bias_init = -10.0  # ObjectiveConfig.model_settings of the sigmoid loss
    pretrainer = OneRPretrainer(OneRModel(tiny_config), ObjectiveConfig(weights={"xmc": 1.0}, pairwise="sigmoid",
                                                                        xmc_form="same-pair"))
    assert set(promote_scalar_parameters(pretrainer)) == {"model.logit_scale", "model.logit_bias"}
    assert pretrainer.model.logit_scale.shape == (1,) and pretrainer.model.logit_scale.requires_grad
    state = {k[len("model."):]: v for k, v in pretrainer.state_dict().items() if k.startswith("model.")}
    saved = build_model_for_saving(OneRModel, tiny_config, state)
    assert saved.logit_scale.shape == () and saved.logit_bias.shape == ()
    assert_same_weights({k: v.reshape(saved.state_dict()[k].shape) for k, v in state.items()}, saved.state_dict(), atol=0)

    # What a rank-0-only save of FSDP shards would hand over: refused, naming the tensor.
    partial = dict(state)
    partial["encoder.layers.0.mlp.fc1.weight"] = partial["encoder.layers.0.mlp.fc1.weight"].flatten()[:100]
    with pytest.raises(RuntimeError, match="wrong shapes.*fc1.weight"):
        build_model_for_saving(OneRModel, tiny_config, partial)
    del partial["encoder.layers.0.mlp.fc1.weight"]
    with pytest.raises(RuntimeError, match="missing.*fc1.weight"):
        build_model_for_saving(OneRModel, tiny_config, partial)


def nan_loss(objective):
    """`objective` with its loss multiplied by NaN: a step the guard must skip."""
    def call(*args, **kwargs):
        loss, parts = objective(*args, **kwargs)
        return loss * float("nan"), parts

    return call


def test_a_missing_gradient_norm_leaves_the_decision_to_the_loss(tiny_model, tiny_processor, monkeypatch):
    """DeepSpeed's clip_grad_norm_ may return None: the step is judged by its loss alone."""
    from accelerate import Accelerator

    from oner.objectives import Objective, ObjectiveConfig
    from oner.training.pretrainer import OneRPretrainer
    from oner.training.loop import optimisation_step

    accelerator = Accelerator(cpu=True)
    config = ObjectiveConfig(weights={"xmc": 1.0})
    pretrainer = OneRPretrainer(tiny_model, config).train()
    optimizer = torch.optim.SGD(pretrainer.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    monkeypatch.setattr(accelerator, "clip_grad_norm_", lambda params, max_norm: None)
    texts = ["a red apple", "green frog", "blue whale", "snowman"]
    images = [Image.new("RGB", (20, 20), c) for c in ("red", "green", "blue", "white")]
    batch = dict(tiny_processor(text=texts, images=images, return_tensors="pt"))
    args = SimpleNamespace(max_grad_norm=1.0)
    before = tiny_model.head.proj.weight.detach().clone()

    loss, _, grad_norm, finite = optimisation_step(pretrainer, Objective(config), [batch], accelerator, optimizer,
                                                   scheduler, None, args)
    assert grad_norm is None and finite and torch.isfinite(loss)
    assert not torch.equal(before, tiny_model.head.proj.weight)  # the update happened
    after = tiny_model.head.proj.weight.detach().clone()
    _, _, grad_norm, finite = optimisation_step(pretrainer, nan_loss(Objective(config)), [batch], accelerator,
                                                optimizer, scheduler, None, args)
    assert grad_norm is None and not finite
    assert torch.equal(after, tiny_model.head.proj.weight)  # skipped


# --------------------------------------------------------------------------- 2 processes


@pytest.mark.slow
def test_fsdp_run_saves_the_gathered_model(fsdp_run, tiny_processor):
    from transformers import AutoModel

    from modeling_oner import OneRModel

    out, result, name = fsdp_run
    version = FSDP_CONFIGS[name]
    assert f"sharded_on_cpu: FSDP{version} forced" in result.stderr
    assert "2 process(es), 16 pairs per step" in result.stdout and f"engine fsdp{version}" in result.stdout
    checkpoint = out / "checkpoints" / "checkpoint-3"
    assert (checkpoint / "pytorch_model_fsdp.bin").is_file()  # accelerate's FSDP save (FULL_STATE_DICT)
    # accelerate's own gathered checkpoint of the last step, without the pretrainer's prefix
    gathered = torch.load(checkpoint / "pytorch_model_fsdp.bin", map_location="cpu")
    expected = {k[len("model."):]: v for k, v in gathered.items() if k.startswith("model.")}
    saved = weights(out)
    assert_same_weights(saved, {k: v.reshape(saved[k].shape) for k, v in expected.items()}, atol=0)
    assert saved["logit_scale"].shape == ()  # the model's own shape, not FSDP's 1-element vector

    loaded = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    reference = OneRModel(loaded.config).eval()
    reference.load_state_dict({k: v.reshape(reference.state_dict()[k].shape) for k, v in expected.items()})
    texts = ["colour number 3 swatch", "colour number 40 swatch"]
    images = [Image.new("RGB", (24, 24), (15, 240, 111)), Image.new("RGB", (24, 24), (200, 55, 56))]
    inputs = tiny_processor(text=texts, images=images, return_tensors="pt")
    with torch.no_grad():
        for method, kwargs in (("get_image_features", {"pixel_values": inputs["pixel_values"]}),
                               ("get_text_features", {"input_ids": inputs["input_ids"],
                                                      "attention_mask": inputs["attention_mask"]})):
            a, b = getattr(loaded, method)(**kwargs), getattr(reference, method)(**kwargs)
            a, b = getattr(a, "pooler_output", a), getattr(b, "pooler_output", b)
            assert torch.allclose(a, b, atol=1e-6), method


@pytest.mark.slow
def test_fsdp_trains_exactly_like_ddp(fsdp_run, ddp_run):
    out, _, _ = fsdp_run
    assert_same_weights(weights(out), weights(ddp_run), atol=1e-6)  # up to the order of float sums
    # the same global gradient norms (before clipping at 1.0: each step was clipped) and temperatures
    for a, b in zip(log(out), log(ddp_run), strict=True):
        assert a["grad_norm"] > 1.0
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert a["temperature"] == pytest.approx(b["temperature"], rel=1e-6)


@pytest.mark.slow
def test_fsdp_resumes_mid_epoch_to_the_same_weights(fsdp_run, pairs_dir, tmp_path):
    out, _, name = fsdp_run
    resumed = tmp_path / "resumed"
    result = launch(["--config_file", str(cpu_fsdp_config(tmp_path, name)), "--num_processes", "2"], pairs_dir, resumed,
                    *STEPS, "--resume_from_checkpoint", str(out / "checkpoints" / "checkpoint-2"), harness=True)
    assert "resumed from" in result.stdout and "at step 2 (2 batches seen)" in result.stdout
    assert_same_weights(weights(out), weights(resumed))
    assert [r["loss"] for r in log(resumed)] == [r["loss"] for r in log(out)][2:]


def checkpoint_as_folder(checkpoint_weights: dict, like: Path, folder: Path) -> Path:
    """A model folder holding a checkpoint's weights (the pretrainer's `model.*`), with `like`'s processor."""
    from transformers import AutoConfig

    from modeling_oner import OneRModel
    from oner.model_folder import save_model_folder
    from oner.training.sharding import build_model_for_saving
    from processing_oner import OneRProcessor

    model_weights = {k[len("model."):]: v for k, v in checkpoint_weights.items() if k.startswith("model.")}
    config = AutoConfig.from_pretrained(like, trust_remote_code=True)
    model = build_model_for_saving(OneRModel, config, model_weights)
    return save_model_folder(model, OneRProcessor.from_pretrained(like), folder)


def benchmark_as_logged(model_dir: Path, out: Path, data_home: Path) -> dict:
    """`oner-eval` on a folder with the evaluation during training's suites and cap, as logged."""
    from oner.evaluation import is_metric, run_benchmark

    results = run_benchmark(model_dir, suites=EVAL[3].split(","), max_items=int(EVAL[5]), data_root=data_home,
                            output_dir=out, progress=False)
    return {f"eval/{suite}/{k}": v for suite, values in results.items() if suite != "_meta"
            for k, v in values.items() if is_metric(k)}


@pytest.mark.slow
def test_evaluation_during_training_logs_what_oner_eval_finds_on_that_checkpoint(ddp_run, fsdp_run, embedded_home,
                                                                                 tmp_path):
    """DDP and FSDP, 2 processes: the evaluation at step 2 (main process, gathered weights) logged the
    numbers `oner-eval` gives on checkpoint-2 afterwards; and the runs still train alike (above)."""
    for out, name in ((ddp_run, "ddp"), (fsdp_run[0], fsdp_run[2])):
        (logged,) = log(out, "eval_seconds")
        assert logged["step"] == 2 and logged["eval_seconds"] > 0
        checkpoint = out / "checkpoints" / "checkpoint-2"
        if name == "ddp":
            saved = load_file(checkpoint / "model.safetensors")
        else:  # accelerate's FSDP save: the gathered FULL_STATE_DICT
            saved = torch.load(checkpoint / "pytorch_model_fsdp.bin", map_location="cpu")
        folder = checkpoint_as_folder(saved, out, tmp_path / name)
        expected = benchmark_as_logged(folder, tmp_path / f"{name}-eval", embedded_home)
        assert {k: v for k, v in logged.items() if k.startswith("eval/")} == expected, name


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="deepspeed is not installed: it is no test dependency (a ~45 s source build, "
                           "`pip install --no-build-isolation deepspeed` to keep the CPU torch); "
                           "configs/accelerate/deepspeed_zero2.yaml is still checked by "
                           "test_deepspeed_config_is_zero2_and_takes_max_grad_norm")
def test_deepspeed_zero2_run_matches_ddp(ddp_run, pairs_dir, tmp_path):
    out = tmp_path / "ds"
    result = launch(["--config_file", str(CONFIGS / "deepspeed_zero2.yaml"), "--num_processes", "2"], pairs_dir, out,
                    *STEPS, harness=True)
    assert "engine deepspeed" in result.stdout
    checkpoint = out / "checkpoints" / "checkpoint-3" / "pytorch_model"
    assert {p.name for p in checkpoint.glob("zero_pp_rank_*_optim_states.pt")} == {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    assert_same_weights(weights(out), weights(ddp_run))
    assert [r["grad_norm"] for r in log(out)] == pytest.approx([r["grad_norm"] for r in log(ddp_run)], rel=1e-5)


# --------------------------------------------------------------------------- 2 machines


@pytest.mark.slow
def test_two_machines_on_localhost_train_one_model(pairs_dir, tmp_path):
    """docs/training.md's multi-node command, with 2 "machines" of 1 process each on 127.0.0.1."""
    from transformers import AutoModel

    out, port = tmp_path / "two-machines", free_port()
    machines = []
    for rank in (0, 1):
        command = [ACCELERATE, "launch", "--config_file", str(CONFIGS / "ddp_multinode.yaml"), "--num_processes", "2",
                   "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                   "--mixed_precision", "no", "--dynamo_backend", "no", *train_flags(pairs_dir, out, *STEPS)]
        machines.append(subprocess.Popen(command, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outputs = [m.communicate(timeout=240) for m in machines]
    finally:
        for m in machines:
            if m.poll() is None:
                m.kill()
    for m, (stdout, stderr) in zip(machines, outputs):
        assert m.returncode == 0, stdout[-2000:] + stderr[-4000:]
        # each machine's first process reports the whole run: 2 processes, twice the per-device batch
        assert "2 process(es), 16 pairs per step" in stdout
    assert "model folder" in outputs[0][0] and "model folder" not in outputs[1][0]  # one writer
    checkpoint = out / "checkpoints" / "checkpoint-3"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["global_batch_size"] == 16 and summary["steps"] == 3
    assert AutoModel.from_pretrained(out, trust_remote_code=True).config.hidden_size == TINY["hidden_size"]
