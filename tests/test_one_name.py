"""One public name per concept and one flag spelling (issue 21): the old names beside the new ones are gone,
and every CLI has --snake_case flags only (a kebab-case spelling is refused, naming the flag to use)."""
import importlib
import re

import pytest

REMOVED = {  # old name -> the one that replaces it
    "sgengine.diffusion.edm": {"heun_sample": "samplers.heun", "euler_sample": "samplers.euler"},
    "sgengine.diffusion.param": {"ddpm_param": "eps_param"},
    "sgengine.diffusion.samplers": {"ddim_sample": "sample(..., sampler='ddim')", "ddpm_sample": "sample(..., sampler='ddpm')"},
    "sgengine.diffusion.flow": {"euler_flow": "sample(flow_param(), ...)", "heun_flow": "sample(flow_param(), ...)",
                                "dopri5_flow": "sample(flow_param(), ...)"},
}
OLD = sorted({name for names in REMOVED.values() for name in names})
PARSERS = [("sgengine.sample", "build_parser"), ("sgengine.config", "build_parser"),
           ("sgengine.annotate.__main__", "build_parser"), ("sgengine.experiment", "build_parser"),
           ("sgengine.data.__main__", "build_parser"), ("sgengine.eval.__main__", "eval_parser"),
           ("sgengine.eval.__main__", "train_parser")]


@pytest.mark.parametrize("module", sorted(REMOVED) + ["sgengine", "sgengine.diffusion", "sgengine.guidance",
                                                      "sgengine.guidance.param"])
def test_old_names_are_gone(module):
    mod = importlib.import_module(module)
    assert [name for name in OLD if hasattr(mod, name) or name in getattr(mod, "__all__", ())] == []


@pytest.mark.parametrize("module,build", PARSERS)
def test_every_cli_has_one_snake_case_spelling(module, build):
    parser = getattr(importlib.import_module(module), build)()
    flags = [s for action in parser._actions for s in action.option_strings if s.startswith("--")]
    assert flags and [f for f in flags if "-" in f[2:]] == []
    assert re.findall(r"--\w[\w.]*-\w+", parser.format_help()) == []


def test_sag_scale_has_one_spelling(capsys):
    from sgengine.sample import build_parser

    assert build_parser().parse_args(["--ckpt", "x", "--sag_scale", "0.5"]).sag_scale == 0.5
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--ckpt", "x", "--sag-scale", "0.5"])
    assert exc.value.code == 2
    assert "unknown flag --sag-scale: flags are spelled --snake_case, use --sag_scale" in capsys.readouterr().err
