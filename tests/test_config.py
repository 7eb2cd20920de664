import json

import pytest

from sd_ds.config import build_parser, parse_config
from sd_ds.distributed import build_deepspeed_config

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
    assert "torch_adam" not in ds["optimizer"]["params"], "GPUs get DeepSpeed's FusedAdam"
    cpu = build_deepspeed_config(cfg, world_size=2, device_type="cpu")["optimizer"]["params"]
    assert cpu["torch_adam"] is True and cpu["fused"] is True


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
