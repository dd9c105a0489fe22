"""Config: defaults, recipes, overrides, validation, presets, error messages."""
import dataclasses

import pytest

from strive_engine.algorithms import PRESETS
from strive_engine.cli import format_help
from strive_engine.config import SECTIONS, Config, ConfigError, build_config, load_config, load_recipe, recipe_path


def test_every_field_is_documented():
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{name}.{f.name} has no help text"
    text = format_help()
    assert "--rollout.num_generations" in text and "[algorithm]" in text


def test_embedded_default_recipe_loads():
    cfg = load_config([])
    assert cfg.run.name == "debug_cpu"
    assert cfg.variants.num_variants == 4 and cfg.algorithm.advantage_mode == "joint"
    assert recipe_path("debug_cpu").name == "debug_cpu.toml"


def test_every_shipped_recipe_is_valid():
    from strive_engine.config import RECIPE_DIR

    for p in RECIPE_DIR.glob("*.toml"):
        build_config(load_recipe(str(p)))


@pytest.mark.parametrize("argv", [["--rollout.num_generations=8"], ["--rollout.num_generations", "8"]])
def test_override_forms(argv):
    assert load_config(argv).rollout.num_generations == 8


def test_override_types():
    cfg = load_config(["--optim.lr=3e-4", "--data.shuffle=false", "--model.path=/x/y", "--algorithm.beta=none"])
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.data.shuffle is False and cfg.model.path == "/x/y"
    assert cfg.algorithm.beta == 0.0  # None -> preset value


def test_preset_fills_unset_fields_and_overrides_win():
    cfg = load_config(["--algorithm.preset=dapo"])
    p = PRESETS["dapo"]
    assert (cfg.algorithm.eps_high, cfg.algorithm.loss_agg, cfg.algorithm.dynamic_sampling) == \
        (p.eps_high, p.loss_agg, p.dynamic_sampling)
    cfg = load_config(["--algorithm.preset=dapo", "--algorithm.eps_high=0.3"])
    assert cfg.algorithm.eps_high == 0.3 and cfg.algorithm.loss_agg == "token_mean"
    assert load_config(["--algorithm.preset=tgrpo"]).algorithm.temporal_bonus == pytest.approx(0.3)


def test_unknown_keys_list_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown field rollout\.foo.*num_generations"):
        load_config(["--rollout.foo=1"])
    with pytest.raises(ConfigError, match=r"unknown section 'nope'.*rollout"):
        load_config(["--nope.x=1"])
    with pytest.raises(ConfigError, match="unknown option --steps"):
        load_config(["--steps=3"])


@pytest.mark.parametrize("arg, match", [
    ("--keyframes.num_frames=3", "keyframes.num_frames: must be an even number"),
    ("--keyframes.uniform_mix=1.5", r"keyframes.uniform_mix: must be in \[0, 1\]"),
    ("--variants.crop_area_min=0", "variants.crop_area_min/max"),
    ("--video.backend=opencv", "video.backend: 'opencv' is not one of"),
    ("--algorithm.preset=ppo", "algorithm.preset: 'ppo' is not one of"),
    ("--algorithm.loss_agg=sum", "algorithm.loss_agg"),
    ("--rollout.top_p=0", r"rollout.top_p: must be in \(0, 1\]"),
    ("--optim.lr=-1", "optim.lr: must be > 0"),
    ("--data.batch_size=abc", "data.batch_size .*expected an integer"),
    ("--data.shuffle=maybe", "data.shuffle .*expected a boolean"),
    ("--keyframes.num_frames=64", "exceeds the candidate pool video.pool_frames"),
    ("--keyframes.scorer=siglip", "keyframes.scorer_path"),
])
def test_validation_messages_name_the_field(arg, match):
    with pytest.raises(ConfigError, match=match):
        load_config([arg])


def test_recipe_errors(tmp_path):
    with pytest.raises(ConfigError, match="recipe 'missing' not found.*debug_cpu"):
        load_config(["--recipe", "missing"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[rollout]\nnum_generation = 4\n")
    with pytest.raises(ConfigError, match=r"unknown field rollout\.num_generation in .*bad\.toml"):
        load_config(["--recipe", str(bad)])
    bad.write_text("steps = 4\n")
    with pytest.raises(ConfigError, match="must be a \\[section\\] table"):
        load_config(["--recipe", str(bad)])
    bad.write_text("[run\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(["--recipe", str(bad)])


def test_recipe_then_override_precedence(tmp_path):
    r = tmp_path / "r.toml"
    r.write_text("[rollout]\nnum_generations = 6\nmax_new_tokens = 9\n")
    cfg = load_config(["--recipe", str(r), "--rollout.num_generations=2"])
    assert (cfg.rollout.num_generations, cfg.rollout.max_new_tokens) == (2, 9)
    assert Config().rollout.max_new_tokens != 9  # the recipe, not the default, gave 9


def test_gpu_3b_recipe_is_the_issue_shape():
    """gpu_3b: Qwen2.5-VL-3B random weights, Qwen's tokenizer, 4 questions x K=4 x G=8, 16 frames of 448x448,
    256 new tokens, activation checkpointing; debug_cpu keeps the tiny model and the offline tokenizer."""
    cfg = load_config(["--recipe", "gpu_3b"])
    assert (cfg.model.arch, cfg.model.tokenizer, cfg.model.init, cfg.model.path) == ("qwen2_5_vl_3b", "qwen",
                                                                                      "device", "")
    assert (cfg.data.batch_size, cfg.variants.num_variants, cfg.rollout.num_generations) == (4, 4, 8)
    assert cfg.keyframes.num_frames == 16 and cfg.variants.max_pixels == 448 * 448 == cfg.variants.min_pixels
    assert cfg.rollout.max_new_tokens == 256 and cfg.rollout.prompt == "video_r1" and cfg.sft.steps == 0
    assert cfg.parallel.activation_checkpointing == "auto" and cfg.parallel.micro_batch_size == 8
    base = load_config([])
    assert (base.model.arch, base.model.tokenizer, base.model.init) == ("tiny", "offline", "exact")


@pytest.mark.parametrize("arg, match", [
    ("--model.tokenizer=llama", "model.tokenizer: 'llama' is not one of 'offline', 'qwen'"),
    ("--model.init=fast", "model.init: 'fast' is not one of 'exact', 'device'"),
])
def test_model_choice_fields_are_validated(arg, match):
    with pytest.raises(ConfigError, match=match):
        load_config([arg])


def _help_lines(text: str) -> dict[str, str]:
    """--section.field=VALUE lines of the help text -> {section.field: the rest of the line}."""
    return {line.split("=", 1)[0].strip()[2:]: line.split("=", 1)[1] for line in text.splitlines()
            if line.startswith("  --")}


def test_help_shows_the_recipes_effective_values_and_where_they_come_from():
    """--help prints the values that will run: debug_cpu's, read from its TOML here, not the code's defaults."""
    import tomllib

    from strive_engine.config import RECIPE_DIR

    recipe = tomllib.loads((RECIPE_DIR / "debug_cpu.toml").read_text())
    assert (recipe["run"]["steps"], recipe["sft"]["steps"], recipe["keyframes"]["num_frames"],
            recipe["checkpoint"]["every"]) == (100, 600, 16, 20)
    lines = _help_lines(format_help())
    assert lines["run.steps"].startswith("100  [recipe debug_cpu; default 60]")
    assert lines["sft.steps"].startswith("600  [recipe debug_cpu; default 0]")
    assert lines["keyframes.num_frames"].startswith("16  [recipe debug_cpu; default 8]")
    assert lines["checkpoint.every"].startswith("20  [recipe debug_cpu; default 0]")
    assert lines["rollout.top_k"] == "0"  # not in the recipe: the default, unmarked
    assert lines["algorithm.advantage_mode"] == "'joint'  [from the preset]"
    # Every field of every section, each with the value load_config gives.
    cfg = load_config([])
    assert set(lines) == {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    for key, rest in lines.items():
        section, name = key.split(".")
        assert rest.split("  [")[0] == repr(getattr(getattr(cfg, section), name)), key


def test_help_under_another_recipe_marks_command_line_values():
    lines = _help_lines(format_help(["--recipe", "qwen25vl_7b", "--run.steps=7", "--help", "--sft.lr", "0.5"]))
    assert lines["run.steps"] == "7  [command line; recipe 1000, default 60]"
    assert lines["sft.lr"] == "0.5  [command line; default 0.001]"
    assert lines["rollout.prompt"] == "'video_r1'  [recipe qwen25vl_7b; default 'video_r1']"
    with pytest.raises(ConfigError, match="unknown field run.nope"):
        format_help(["--run.nope=1"])


def test_cli_help_runs_the_recipe_given(capsys):
    from strive_engine.cli import config_from_cli

    with pytest.raises(SystemExit) as e:
        config_from_cli(["--recipe", "gpu_small", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "with --recipe gpu_small" in out and "[recipe gpu_small;" in out
