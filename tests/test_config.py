import importlib.util
import json
import subprocess
import sys

import pytest

from sd_ds.config import build_parser, config_from_dict, parse_config
from tests.helpers import REPO_ROOT, subprocess_env
from sd_ds.engine import build_deepspeed_config

SEED_COMMAND = (
    "--do_train --output_dir ./laion400m_pretrain_output_trainer "
    "--per_device_train_batch_size 64 --gradient_accumulation_steps 1 --learning_rate 1e-4 --weight_decay 0.01 "
    "--max_steps 200000 --lr_scheduler_type constant --warmup_steps 0 --image_logging_steps 1000 --logging_steps 10 "
    "--resolution 256 --save_steps 10000 --save_total_limit 20 --seed 23 --dataloader_num_workers 8 "
    "--pretrained_model_name_or_path ./CompVis-stable-diffusion-v1-4-paddle-init --file_list ./data/filelist/train.filelist.list "
    "--model_max_length 77 --max_grad_norm -1 --disable_tqdm True --bf16 True"
).split()


def test_seed_command_parses_unchanged():
    cfg = parse_config(SEED_COMMAND)
    assert cfg.micro_batch_size == 64
    assert cfg.global_batch_size(world_size=8) == 512
    assert cfg.optim.learning_rate == 1e-4 and cfg.optim.weight_decay == 0.01
    assert cfg.max_steps == 200000 and cfg.seed == 23
    assert cfg.logging.disable_tqdm is True and cfg.precision == "bf16"
    assert cfg.optim.max_grad_norm == -1
    assert cfg.checkpoint.save_total_limit == 20 and cfg.checkpoint.save_steps == 10000
    assert cfg.data.file_list == "./data/filelist/train.filelist.list"
    assert cfg.data.dataloader_num_workers == 8 and cfg.data.resolution == 256


@pytest.mark.parametrize("flag,expected", [(["--use_ema"], True), (["--use_ema", "True"], True),
                                           (["--use_ema", "False"], False), (["--use_ema=true"], True), ([], False)])
def test_hf_style_booleans(flag, expected, monkeypatch):
    monkeypatch.delenv("FLAG_USE_EMA", raising=False)
    assert parse_config(flag).ema.use_ema is expected


def test_unknown_flag_is_an_error(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--per_device_batch_size", "4"])
    assert "unrecognized arguments" in capsys.readouterr().err


def test_env_flags_turn_features_on(monkeypatch):
    monkeypatch.setenv("FLAG_USE_EMA", "1")
    monkeypatch.setenv("FLAG_RECOMPUTE", "True")
    monkeypatch.setenv("FLAG_XFORMERS", "1")
    monkeypatch.setattr("sd_ds.config.xformers_installed", lambda: True)  # parse-time check: see the test below
    cfg = parse_config([])
    assert cfg.ema.use_ema and cfg.model.recompute and cfg.model.enable_xformers_memory_efficient_attention


def test_precision_resolution_and_fp16_levels(capsys):
    assert parse_config([]).precision == "bf16"
    assert parse_config(["--fp16", "True"]).precision == "fp16"
    assert parse_config(["--bf16", "False"]).precision == "fp32"
    with pytest.raises(SystemExit):
        parse_config(["--fp16", "True", "--fp16_opt_level", "O1"])
    assert "O1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(["--fp16", "True", "--bf16", "True"])


def test_image_logging_steps_must_be_multiple_of_logging_steps():
    with pytest.raises(SystemExit):
        parse_config(["--logging_steps", "10", "--image_logging_steps", "15"])


def test_shuffle_block_takes_the_seeds_spelling_too():
    assert parse_config(["--shuffle_block", "64"]).data.shuffle_block == 64
    assert parse_config(["--shuffle_buffer", "32"]).data.shuffle_block == 32  # the seed's spelling
    assert "--shuffle_block SHUFFLE_BLOCK, --shuffle_buffer SHUFFLE_BLOCK" in build_parser().format_help()
    saved = parse_config([]).to_dict()
    saved["data"]["shuffle_buffer"] = saved["data"].pop("shuffle_block") // 2  # a config saved before the rename
    assert config_from_dict(saved).data.shuffle_block == 500


def test_help_documents_every_flag():
    text = build_parser().format_help()
    for flag in ("--per_device_train_batch_size", "--snr_gamma", "--use_ema", "--recompute",
                 "--only_save_updated_model", "--train_shards", "--resume_from_checkpoint", "--ema_decay"):
        assert flag in text


def test_deepspeed_config_is_derived_from_flags():
    cfg = parse_config(["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "3",
                        "--max_grad_norm", "-1", "--learning_rate", "3e-4", "--weight_decay", "0.05"])
    ds = build_deepspeed_config(cfg, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 24
    assert ds["gradient_clipping"] == 0.0
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["bf16"]["check_grad_overflow"] is True
    assert ds["data_types"]["grad_accum_dtype"] == "fp32"
    assert ds["optimizer"]["type"] == "AdamW"
    assert ds["optimizer"]["params"]["lr"] == 3e-4 and ds["optimizer"]["params"]["weight_decay"] == 0.05
    assert ds["zero_optimization"]["stage"] == 2
    # torch's fused AdamW on every device: DeepSpeed's FusedAdam would JIT-build a CUDA op with nvcc at start-up.
    for device_type in ("cuda", "cpu"):
        params = build_deepspeed_config(cfg, world_size=2, device_type=device_type)["optimizer"]["params"]
        assert params["torch_adam"] is True and params["fused"] is True
    assert ds["zero_optimization"]["overlap_comm"] is True


def test_lean_engine_settings_for_one_micro_batch_and_one_rank():
    cfg = parse_config(["--gradient_accumulation_steps", "1"])
    one_rank = build_deepspeed_config(cfg, world_size=1)
    # Nothing to accumulate: no fp32 gradient-accumulation buffer (4 bytes per parameter).
    assert "grad_accum_dtype" not in one_rank.get("data_types", {})
    # Nothing to overlap on one rank; buckets sized for an 860 M-parameter UNet, not DeepSpeed's 5e8 default.
    assert one_rank["zero_optimization"]["overlap_comm"] is False
    assert one_rank["zero_optimization"]["reduce_bucket_size"] == 200_000_000
    assert build_deepspeed_config(cfg, world_size=2)["zero_optimization"]["overlap_comm"] is True


def test_offload_keeps_deepspeed_cpu_adam(tmp_path):
    user = tmp_path / "offload.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}))
    params = build_deepspeed_config(parse_config(["--deepspeed", str(user)]), world_size=1)["optimizer"]["params"]
    assert "torch_adam" not in params


def test_fp16_uses_the_dynamic_loss_scale_config():
    ds = build_deepspeed_config(parse_config(["--fp16", "True"]), world_size=1)
    assert ds["fp16"]["enabled"] is True and ds["fp16"]["loss_scale"] == 0
    assert ds["bf16"]["enabled"] is False


def test_conflicting_user_json_is_an_error(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 16}))
    cfg = parse_config(["--per_device_train_batch_size", "8", "--deepspeed", str(user)])
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu"):
        build_deepspeed_config(cfg, world_size=1)
    # Agreeing values are fine.
    user.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 8}))
    assert build_deepspeed_config(cfg, world_size=1)["train_micro_batch_size_per_gpu"] == 8
    user.write_text(json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}}))
    with pytest.raises(ValueError, match="optimizer"):
        build_deepspeed_config(cfg, world_size=1)


def test_ds_config_env_variable(tmp_path, monkeypatch):
    user = tmp_path / "offload.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}))
    monkeypatch.setenv("DS_CONFIG", str(user))
    ds = build_deepspeed_config(parse_config([]), world_size=1)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


@pytest.mark.parametrize("argv,rule", [
    (["--save_steps", "0"], "--save_steps must be >= 1"),
    (["--resolution", "0"], "--resolution must be a positive multiple of 8"),
    (["--resolution", "36"], "--resolution must be a positive multiple of 8"),
    (["--logging_steps", "0"], "--logging_steps must be >= 1"),
    (["--image_logging_steps", "-1"], "--image_logging_steps must be >= 0"),
    (["--ema_decay", "1.5"], "--ema_decay must be in [0, 1]"),
    (["--ema_decay", "-0.1"], "--ema_decay must be in [0, 1]"),
    (["--learning_rate", "0"], "--learning_rate must be > 0"),
    (["--unet_learning_rate=-1e-4"], "--unet_learning_rate must be > 0"),
    (["--warmup_steps", "-1"], "--warmup_steps must be >= 0"),
    (["--adam_beta2", "1.0"], "--adam_beta1 and --adam_beta2 must be in [0, 1)"),
    (["--adam_epsilon", "0"], "--adam_epsilon must be > 0"),
    (["--max_consecutive_skipped_steps", "-1"], "--max_consecutive_skipped_steps must be >= 0"),
    (["--dataloader_num_workers", "-2"], "--dataloader_num_workers must be >= 0"),
    (["--snr_gamma", "0"], "--snr_gamma must be > 0"),
])
def test_out_of_range_flags_exit_2_with_the_rule(argv, rule, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(argv)
    assert exc.value.code == 2
    assert rule in capsys.readouterr().err


def test_range_boundaries_are_accepted():
    cfg = parse_config(["--resolution", "8", "--save_steps", "1", "--ema_decay", "1", "--image_logging_steps", "0",
                        "--warmup_steps", "0", "--max_consecutive_skipped_steps", "0", "--dataloader_num_workers",
                        "0", "--adam_beta1", "0"])
    assert cfg.data.resolution == 8 and cfg.checkpoint.save_steps == 1 and cfg.ema.ema_decay == 1.0
    assert cfg.optim.max_consecutive_skipped_steps == 0
    assert parse_config(["--ema_decay", "0"]).ema.ema_decay == 0.0
    assert parse_config([]).optim.max_consecutive_skipped_steps == 100


# --- the seed's defaults and behaviour (issue 10) ---

def test_seed_defaults(monkeypatch):
    monkeypatch.delenv("FLAG_USE_EMA", raising=False)
    cfg = parse_config([])
    # Each checkpoint holds unet/ (and unet_ema/, text_encoder/) in diffusers format, as the seed's.
    assert cfg.checkpoint.only_save_updated_model is True
    assert parse_config(["--only_save_updated_model", "False"]).checkpoint.only_save_updated_model is False
    # The seed's EMA (LitEma) warms its decay up; the seed's dataset drops 10 % of captions.
    assert cfg.ema.ema_warmup is True and cfg.data.caption_dropout_prob == 0.1
    text = " ".join(build_parser().format_help().split())
    assert "min(--ema_decay, (1+n)/(10+n))" in text
    assert "0.1 is the seed's rate" in text and "text_image_pair_dataset.py" in text


def test_xformers_flag_without_xformers_stops_at_parsing(monkeypatch, capsys):
    monkeypatch.setattr("sd_ds.config.xformers_installed", lambda: False)
    for argv, env in ((["--enable_xformers_memory_efficient_attention"], None), ([], "1")):
        if env:
            monkeypatch.setenv("FLAG_XFORMERS", env)
        with pytest.raises(SystemExit) as exc:
            parse_config(argv)
        assert exc.value.code == 2
        assert "pip install xformers" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed here")
def test_xformers_missing_exits_before_any_model_is_loaded(tmp_path):
    """The real trainer entry point, FLAG_XFORMERS from the environment, a model path that does not exist: exit 2
    with the install command (loading the model would have failed differently, and later)."""
    proc = subprocess.run(
        [sys.executable, "-m", "sd_ds.train", "--pretrained_model_name_or_path", str(tmp_path / "no_model"),
         "--train_shards", str(tmp_path / "no_shards"), "--output_dir", str(tmp_path / "out")],
        cwd=REPO_ROOT, env=subprocess_env({"FLAG_XFORMERS": "1"}), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "pip install xformers" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_file_list_with_train_shards_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(["--file_list", "train.filelist.list", "--train_shards", "shards/"])
    assert exc.value.code == 2
    assert "--file_list and --train_shards were both given" in capsys.readouterr().err
    assert parse_config(["--train_shards", "shards/"]).data.train_shards == ["shards/"]


def test_image_logging_steps_zero_turns_image_logging_off():
    # 0 is off (no multiple-of-logging_steps rule to meet); the trainer run in test_seed_snippet.py shows no images.
    assert parse_config(["--logging_steps", "10", "--image_logging_steps", "0"]).logging.image_logging_steps == 0


def test_help_group_headings_are_titles():
    text = build_parser().format_help()
    for section in ("run", "model", "data", "diffusion", "optim", "ema", "logging", "checkpoint"):
        assert f"\n{section}:\n" in text, section
    assert "Config(" not in text, "a dataclass signature leaked into --help"


# --- non-finite numbers (issue 30) ---

def _float_flags() -> list[str]:
    """Every flag whose value is a float (whatever its section), from the config's own dataclasses."""
    import dataclasses
    import typing

    from sd_ds.config import TrainConfig, _section_classes

    names = []
    for cls in (TrainConfig, *_section_classes().values()):
        for name, hint in typing.get_type_hints(cls).items():
            if hint is float or (typing.get_origin(hint) is typing.Union and float in typing.get_args(hint)):
                names.append(name)
    assert {"learning_rate", "max_grad_norm", "ema_decay", "snr_gamma", "eval_guidance_scale"} <= set(names)
    return names


@pytest.mark.parametrize("flag", _float_flags())
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e999"])
def test_every_float_flag_refuses_non_finite_values_in_one_line(flag, value, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config([f"--{flag}={value}"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.strip().splitlines() == [f"sd_ds.train: error: --{flag} must be a finite number (got {float(value)})"]


def test_a_saved_config_with_a_non_finite_float_is_refused_too():
    from sd_ds.config import config_from_dict

    with pytest.raises(ValueError, match="--learning_rate must be a finite number"):
        config_from_dict({"optim": {"learning_rate": float("inf")}})


def test_infinite_learning_rate_stops_the_trainer_at_parsing(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sd_ds.train", "--learning_rate", "inf", "--train_shards", str(tmp_path / "shards"),
         "--output_dir", str(tmp_path / "out")],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == ["sd_ds.train: error: --learning_rate must be a finite number (got inf)"]
    assert not (tmp_path / "out").exists()


# --- DeepSpeed configs checked by DeepSpeed's own parser (issue 30; the trainer's one-line errors are in
# test_train_hostile_inputs.py) ---

@pytest.mark.parametrize("name", ["zero2_bf16.json", "zero2_bf16_offload.json", "zero2_fp16.json", "zero2_fp32.json"])
def test_shipped_deepspeed_configs_pass_the_check_without_warnings(name):
    from sd_ds.engine import check_deepspeed_config
    from tests.helpers import REPO_ROOT

    flags = {"zero2_fp16.json": ["--fp16", "True"], "zero2_fp32.json": ["--bf16", "False"]}.get(name, [])
    config = REPO_ROOT / "ds_configs" / name  # the user-facing examples (the package's defaults are copies)
    assert check_deepspeed_config(parse_config([*flags, "--deepspeed", str(config)]), world_size=2) == []


def test_deepspeed_config_keys_deepspeed_reads_are_known_and_others_warn_or_refuse(tmp_path):
    from sd_ds.deepspeed_config import DeepSpeedConfigError
    from sd_ds.engine import check_deepspeed_config

    user = tmp_path / "ds.json"

    def check(config: dict) -> list[str]:
        user.write_text(json.dumps(config))
        return check_deepspeed_config(parse_config(["--deepspeed", str(user)]), world_size=1)

    # Real DeepSpeed sections, some read by its config parser, some only by the engine: no warning.
    assert check({"zero_optimization": {"stage": 2}, "tensorboard": {"enabled": False}, "comms_logger":
                  {"enabled": False}, "flops_profiler": {"enabled": False}, "activation_checkpointing": {},
                  "communication_data_type": "fp32", "prescale_gradients": False, "checkpoint": {"tag_validation":
                  "Warn"}, "compile": {}, "dataloader_drop_last": False}) == []
    # A key DeepSpeed never reads and that is no misspelling: a warning naming it, the run goes on.
    (warning,) = check({"zero_optimization": {"stage": 2}, "my_note": "tried on 8 GPUs"})
    assert warning == f"DeepSpeed config {user}: DeepSpeed does not read the key 'my_note'; it has no effect"
    # Values of the wrong type, removed features, duplicated keys: refused with the key path.
    with pytest.raises(DeepSpeedConfigError, match=r"'zero_optimization.reduce_bucket_size': Input should be a valid "
                                                   r"integer.*\(got \"big\"\)"):
        check({"zero_optimization": {"stage": 2, "reduce_bucket_size": "big"}})
    with pytest.raises(DeepSpeedConfigError, match="'zero_optimization.offload_optimizer.devce' is not a DeepSpeed "
                                                   "setting .*did you mean 'device'"):
        check({"zero_optimization": {"stage": 2, "offload_optimizer": {"devce": "cpu"}}})
    with pytest.raises(DeepSpeedConfigError, match="Apex AMP integration has been removed"):
        check({"zero_optimization": {"stage": 2}, "amp": {"enabled": True}})
    with pytest.raises(DeepSpeedConfigError, match="'zero_optimization' must be an object"):
        check({"zero_optimization": True})
    user.write_text('{"zero_optimization": {"stage": 2}, "zero_optimization": {"stage": 1}}')
    with pytest.raises(DeepSpeedConfigError, match="the key 'zero_optimization' appears twice"):
        check_deepspeed_config(parse_config(["--deepspeed", str(user)]), world_size=1)
