"""Typed configuration: flags and --config files converted by the dataclass hints, every value
checked before any work, one-line errors that name the flag and the allowed values (exit 2)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sgengine.common.flags import ConfigError, join_negative_values
from sgengine.config import PRESETS, TrainConfig, apply_overrides, from_dict, parse_args, preset, to_dict

BAD_FLAGS = [  # (argv, text the one error line must contain)
    (["--steps", "abc"], "--steps expects an integer, got 'abc'"),
    (["--batch_size", "0"], "--batch_size must be >= 1, got 0"),
    (["--preset", "nonexistent"], "--preset must be one of digits, tiny"),
    (["--grad_accum", "0"], "--grad_accum must be >= 1, got 0"),
    (["--lr", "-1e-3"], "--lr must be > 0, got -0.001"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--ckpt_every", "-1"], "--ckpt_every must be >= 0, got -1"),
    (["--warmup", "-10"], "--warmup must be >= 0, got -10"),
    (["--ema_max", "1.5"], "--ema_max must be in [0, 1), got 1.5"),
    (["--ema_max", "1"], "--ema_max must be in [0, 1)"),
    (["--p_uncond", "-0.1"], "--p_uncond must be in [0, 1)"),
    (["--sampler", "ddim2"], "--sampler must be one of '', ddim, ddpm, dopri5, euler, heun, got 'ddim2'"),
    (["--objective", "vp"], "--objective must be one of ddpm, edm, flow, got 'vp'"),
    (["--condition", "clusters"], "--condition must be one of self-labels, labels, annotations, none"),
    (["--zero_stage", "4"], "--zero_stage must be one of 0, 1, 2, 3, got 4"),
    (["--compile_mode", "cudagraphs"], "--compile_mode must be one of default, reduce-overhead"),
    (["--hflip", "maybe"], "--hflip expects true or false, got 'maybe'"),
    (["--stpes", "3"], "unknown flag --stpes (did you mean --steps?)"),
    (["--model.channels", "x"], "--model.channels expects an integer, got 'x'"),
    (["--model.channel_mult", "1,a"], "--model.channel_mult expects an integer, got 'a'"),
    (["--model.img_size", "15"], "--model.img_size is refused: img_size 15 must be divisible"),
    (["--uvit.feature_block", "6"], "--uvit settings apply to arch 'uvit' only, not 'unet'"),
    (["--preset", "uvit-tiny-online", "--uvit.feature_block", "6"], "--uvit.feature_block is refused"),
    (["--edm.rho", "3"], "--edm settings apply to objective 'edm' only"),
    (["--online.t_low", "0.95"], "--online.t_low must be below t_high (0.9), got 0.95"),
    (["--online.feature", "tokens"], "--online.feature must be one of cls, patches"),
    (["--eval_n", "1"], "--eval_n must be >= 2"),
    (["--lr", "nan"], "--lr must be > 0, got nan"),
    (["--model.channel_mult", ""], "--model.channel_mult is refused: channel_mult needs at least one level"),
    (["--config", "/nonexistent/x.json"], "--config cannot read /nonexistent/x.json"),
]


@pytest.mark.parametrize("argv,message", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flag_is_one_line_error_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err


def test_cli_exits_2_without_traceback_or_work(tmp_path):
    """The real entry point: no traceback, nothing written, well before data loading."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "sgengine.train", "--lr", "-1", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr == "error: --lr must be > 0, got -1.0\n", proc.stderr
    assert not out.exists()


def test_good_flags_convert_by_type_hint():
    cfg = parse_args(["--preset", "tiny", "--steps", "7", "--lr", "1e-3", "--hflip", "yes", "--model.channel_mult",
                      "1,2,4", "--deepspeed", "true", "--zero_stage", "2", "--sampler", "heun", "--ema_max", "0"])
    assert (cfg.steps, cfg.lr, cfg.hflip, cfg.model.channel_mult, cfg.zero_stage, cfg.sampler) == \
        (7, 1e-3, True, (1, 2, 4), 2, "heun")
    assert type(cfg.lr) is float and type(cfg.zero_stage) is int


def test_optional_fields_take_values_and_none():
    base = ["--preset", "uvit-tiny-online"]
    assert parse_args(base + ["--uvit.feature_block", "3"]).uvit.feature_block == 3
    assert parse_args(base + ["--uvit.feature_block", "none"]).uvit.feature_block is None
    assert parse_args(base + ["--uvit.cond_dim", "16"]).uvit.cond_dim == 16


def test_one_flag_spelling_kebab_case_is_refused_naming_the_flag(capsys):
    """Issue 21: one spelling per flag (--snake_case); a kebab-case one fails before any work, naming the fix."""
    assert join_negative_values(["--lr", "-3e-1", "-h", "--x=-1", "--n", "3"]) == ["--lr=-3e-1", "-h", "--x=-1", "--n", "3"]
    assert parse_args(["--batch_size", "3", "--grad_accum", "2"]).batch_size == 3
    with pytest.raises(SystemExit) as exc:
        parse_args(["--batch-size", "3"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    assert "unknown flag --batch-size: flags are spelled --snake_case, use --batch_size" in err


def test_help_shows_real_types(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = capsys.readouterr().out
    assert "NONETYPE" not in out
    for shown in ("--uvit.feature_block INT|none", "--steps INT", "--lr FLOAT", "--hflip BOOL",
                  "--objective {ddpm,edm,flow}", "--model.channel_mult INT,..."):
        assert shown in out


def test_config_file_is_converted_like_flags(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"steps": "12", "lr": 1, "model": {"channel_mult": [1, 2]},
                                "online.t_high": 0.95, "hflip": "true"}))
    cfg = parse_args(["--preset", "tiny", "--config", str(path), "--steps", "5"])  # flags win over the file
    assert (cfg.steps, cfg.lr, cfg.model.channel_mult, cfg.online.t_high, cfg.hflip) == (5, 1.0, (1, 2), 0.95, True)
    assert type(cfg.lr) is float


@pytest.mark.parametrize("content,message", [
    ({"lr": -1}, "--lr must be > 0, got -1.0"),
    ({"steps": "x"}, "--steps expects an integer"),
    ({"model": {"chanels": 3}}, "--model.chanels is not a setting of UNetConfig (did you mean model.channels?)"),
    ({"steps": True}, "--steps expects int, got bool"),
    ([1, 2], "must hold a JSON object"),
])
def test_bad_config_file_is_one_line_error(tmp_path, capsys, content, message):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(content))
    with pytest.raises(SystemExit) as exc:
        parse_args(["--config", str(path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and message in err, err


def test_api_errors_name_the_field_not_a_flag():
    with pytest.raises(ConfigError, match=r"^lr must be > 0, got -1.0$"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ConfigError, match=r"^steps expects int, got str '3'$"):
        TrainConfig(steps="3")
    with pytest.raises(ConfigError, match=r"^model.channels expects an integer"):
        apply_overrides(preset("tiny"), {"model.channels": "many"})
    with pytest.raises(ConfigError, match="preset must be one of"):
        preset("nope")


def test_tuples_check_their_length_and_items():
    from sgengine.common.flags import check

    assert check([9, 1], tuple[int, float], "sag_blur") == (9, 1.0)
    with pytest.raises(ConfigError, match="sag_blur expects 2 values"):
        check((9,), tuple[int, float], "sag_blur")
    with pytest.raises(ConfigError, match="channel_mult expects int"):
        check((1, 2.5), tuple[int, ...], "channel_mult")


def test_switching_arch_or_objective_swaps_the_sub_config():
    cfg = apply_overrides(preset("tiny"), {"arch": "uvit", "uvit.depth": 3})
    assert cfg.model is None and cfg.uvit.depth == 3 and cfg.network is cfg.uvit
    cfg = apply_overrides(preset("tiny"), {"objective": "edm", "edm.sigma_max": 40})
    assert cfg.edm.sigma_max == 40.0 and cfg.edm.rho == 7.0
    assert apply_overrides(cfg, {"objective": "flow"}).edm is None


def test_presets_carry_only_the_sub_configs_they_use():
    for name, cfg in PRESETS.items():
        assert (cfg.model is None) == (cfg.arch == "uvit"), name
        assert (cfg.uvit is None) == (cfg.arch == "unet"), name
        assert cfg.edm is None or cfg.objective == "edm", name
    assert PRESETS["cedm32"].edm is not None and PRESETS["cedm32"].edm.steps == 18


def test_to_dict_round_trip_and_old_checkpoints():
    for cfg in PRESETS.values():
        assert from_dict(json.loads(json.dumps(to_dict(cfg)))) == cfg
    old = to_dict(PRESETS["uvit-tiny-online"])
    old["model"] = to_dict(PRESETS["tiny"])["model"]  # written before the unused UNet config was dropped
    del old["edm"], old["flow_sigma_min"]
    assert from_dict(old) == PRESETS["uvit-tiny-online"]


def test_edm_and_flow_settings_reach_the_objective():
    from sgengine.diffusion.objectives import make_objective

    edm = make_objective(parse_args(["--preset", "tiny", "--objective", "edm", "--edm.sigma_max", "40",
                                     "--edm.P_mean", "-1.0"]))
    assert float(edm.param.grid_fn(5)[0]) == pytest.approx(40.0) and edm.loss.P_mean == -1.0
    assert float(make_objective(PRESETS["cedm32"]).param.grid_fn(5)[0]) == pytest.approx(80.0)
    flow = make_objective(parse_args(["--preset", "tiny", "--objective", "flow", "--flow_sigma_min", "1e-3"]))
    assert flow.loss.sigma_min == 1e-3
