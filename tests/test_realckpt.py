"""Real checkpoints in and out (issue 19), with a real-format Qwen2.5-VL folder at tiny widths (tests/realckpt.py):
Qwen's tokenizer files, the Qwen2-VL chat template, the 151,936-row vocabulary, sharded bf16 safetensors with the
hub's key names, Qwen's generation and preprocessor configs; one folder with tied embeddings, one without.

- `--recipe qwen25vl_7b` trains on 48-frame videos with video.pool_frames=64 untouched, with valid samples, and
  resumes; every run ends with its skip summary;
- the hf/ export keeps the source's dtype, its generation_config.json and every tokenizer/processor/template file,
  writes no lm_head.weight when tied, reloads with AutoTokenizer, AutoImageProcessor and the model class, and gives
  the trained policy's greedy tokens through HF generate (compared with the engine's native decode);
- evaluate on the export without --recipe runs with the training settings (Video-R1's prompt) and says so in
  report.json, in the model's own folder; the default recipe on a Qwen checkpoint without saved settings is refused.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from realckpt import PREPROCESSOR_CONFIG, VOCAB, checkpoint_keys, write_checkpoint, write_video_records

ROOT = Path(__file__).resolve().parent.parent
# CPU-sized overrides of the qwen25vl_7b recipe; video.pool_frames (64) stays, the clips have 48 frames.
SMALL = ["--recipe", "qwen25vl_7b", "--keyframes.num_frames=4", "--variants.num_variants=2",
         "--variants.min_pixels=784", "--variants.max_pixels=784", "--rollout.num_generations=2",
         "--rollout.max_new_tokens=4", "--logging.progress=false", "--logging.plot=false",
         "--video.decode_threads=1", "--video.decode_workers=1", "--checkpoint.every=1",
         "--sft.steps=1", "--sft.batch_size=1"]  # one SFT step (lr 1e-3) moves the weights; RL's rewards are all 0
COPIED = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.json",
          "preprocessor_config.json", "generation_config.json")


def _run(module, args, ok=True, timeout=600):
    res = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if ok:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("realckpt")
    return {"tied": write_checkpoint(d / "tied", tied=True, seed=1),
            "untied": write_checkpoint(d / "untied", tied=False, seed=2),
            "records": write_video_records(d / "data", n=2, frames=48), "dir": d}


@pytest.fixture(scope="module")
def trained(world):
    """tied: 1 SFT + 1 RL step, then resumed for a 2nd RL step (export in the source's bf16); untied: 1 SFT + 2 RL
    steps, exported in fp32."""
    d = world["dir"]
    common = [*SMALL, f"--data.path={world['records']}"]
    runs = {"tied": d / "run_tied", "untied": d / "run_untied"}
    first = _run("strive_engine.train", [*common, f"--model.path={world['tied']}", "--run.steps=1",
                                         f"--run.output_dir={runs['tied']}"])
    second = _run("strive_engine.train", [*common, f"--model.path={world['tied']}", "--run.steps=2",
                                          "--checkpoint.resume=true", "--checkpoint.allow_changes=run.steps",
                                          f"--run.output_dir={runs['tied']}"])
    third = _run("strive_engine.train", [*common, f"--model.path={world['untied']}", "--run.steps=2",
                                         "--checkpoint.export_dtype=float32", f"--run.output_dir={runs['untied']}"])
    return {**runs, "logs": {"first": first.stderr, "resumed": second.stderr, "untied": third.stderr}}


def _rows(run_dir):
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_fixture_is_a_real_format_checkpoint(world):
    """What the tests train on reads like a hub download: hub key names in two shards, the real vocabulary."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    for name, tied in (("tied", True), ("untied", False)):
        folder = world[name]
        keys = checkpoint_keys(folder)
        assert len(list(folder.glob("model-0000*-of-00002.safetensors"))) == 2
        assert "model.embed_tokens.weight" in keys and any(k.startswith("visual.blocks.") for k in keys)
        assert not any("language_model" in k for k in keys) and ("lm_head.weight" in keys) != tied
        model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, local_files_only=True,
                                                                         output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        assert model.dtype == torch.bfloat16 and model.config.get_text_config().vocab_size == VOCAB
        assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    tok = AutoTokenizer.from_pretrained(world["tied"], local_files_only=True)
    assert len(tok) == 151_669 and tok.convert_tokens_to_ids("<|video_pad|>") == 151_656
    assert "<|vision_start|><|video_pad|><|vision_end|>" in tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "q"}]}], tokenize=False)
    assert AutoImageProcessor.from_pretrained(world["tied"], local_files_only=True).merge_size == 2


def test_recipe_trains_on_short_videos_and_resumes(trained):
    """48-frame clips under pool_frames=64: every step has valid samples; the resumed run continues at step 1."""
    rows = {r["step"]: r for r in _rows(trained["tied"]) if r.get("phase") == "rl"}
    assert sorted(rows) == [0, 1]
    assert all(r["data/valid_samples"] == 1 * 2 * 2 and r["data/skipped_videos"] == 0 for r in rows.values())
    assert "resuming from checkpoint" in trained["logs"]["resumed"]
    for log in trained["logs"].values():  # every run ends with what it skipped and why
        assert "skipped in this run:" in log and "videos skipped: none" in log
        assert "used every frame the video has" in log and "NotEnoughFrames" not in log
    untied = [r for r in _rows(trained["untied"]) if r.get("phase") == "rl"]
    assert [r["data/valid_samples"] for r in untied] == [4, 4]


def test_export_is_a_complete_checkpoint(world, trained):
    """Source dtype (bf16) kept unless asked; the source's generation config and processor files byte for byte;
    tied embeddings stay one tensor; Auto classes and the model class load it as they load the source."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    for name, dtype in (("tied", torch.bfloat16), ("untied", torch.float32)):
        src, hf = world[name], trained[name] / "hf"
        for f in COPIED:
            assert (hf / f).read_bytes() == (src / f).read_bytes(), f
        keys = checkpoint_keys(hf)
        assert ("lm_head.weight" in keys) == (name == "untied")
        assert keys - {"lm_head.weight"} == checkpoint_keys(src) - {"lm_head.weight"}  # the hub's key names
        model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf, local_files_only=True,
                                                                         output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and model.dtype == dtype
        assert json.loads((hf / "config.json").read_text())["dtype"] == str(dtype).replace("torch.", "")
        assert (model.lm_head.weight is model.get_input_embeddings().weight) == (name == "tied")
        gen = model.generation_config
        assert gen.eos_token_id == [151645, 151643] and gen.pad_token_id == 151643
        assert (gen.top_k, gen.top_p, gen.repetition_penalty) == (1, 0.001, 1.05)
        a, b = (AutoTokenizer.from_pretrained(p, local_files_only=True) for p in (src, hf))
        text = "<|im_start|>user\nWhat colour? <think> A. red</think><|im_end|>"
        assert a(text)["input_ids"] == b(text)["input_ids"] and a.chat_template == b.chat_template
        ip = AutoImageProcessor.from_pretrained(hf, local_files_only=True)
        assert type(ip) is type(AutoImageProcessor.from_pretrained(src, local_files_only=True))
        assert ip.to_dict()["merge_size"] == PREPROCESSOR_CONFIG["merge_size"]
    # The bf16 export is the trained weights rounded to nearest: nothing else changed.
    trained_sd = _trained_model(world["tied"], trained["tied"]).state_dict()
    exported = Qwen2_5_VLForConditionalGeneration.from_pretrained(trained["tied"] / "hf", local_files_only=True)
    for k, v in exported.state_dict().items():
        assert torch.equal(v, trained_sd[k].to(torch.bfloat16)), k
    assert any(not torch.equal(trained_sd[k].to(torch.bfloat16), v)
               for k, v in Qwen2_5_VLForConditionalGeneration.from_pretrained(
                   world["tied"], local_files_only=True).state_dict().items()), "training changed no weight"


def _trained_model(source, run_dir):
    """The trained policy: the source model (fp32) with the run's last DCP checkpoint loaded into it."""
    from strive_engine.checkpoint_io import dcp_load
    from strive_engine.config import ModelConfig
    from strive_engine.model import build_model

    hf, _ = build_model(ModelConfig(path=str(source), dtype="float32"), "cpu")
    last = sorted((Path(run_dir) / "checkpoints").glob("step_*"))[-1]
    state = {"model": {f"policy.hf.{k}": v for k, v in hf.state_dict().items()}}
    dcp_load(state, last)
    return hf


def _requests(records, cfg, source):
    from transformers import AutoConfig

    from strive_engine.data import load_records
    from strive_engine.evaluate import eval_requests
    from strive_engine.pipeline import decode_batch
    from strive_engine.video import PyAVSource
    from strive_engine.views import ViewBuilder

    recs, _ = load_records(records)
    decoded = decode_batch(recs, PyAVSource(threads=1), cfg.video.pool_frames)
    assert decoded.valid.all() and decoded.pools[0].frames.shape[0] == 48  # the whole 48-frame clip
    views = ViewBuilder.for_model(AutoConfig.from_pretrained(source, local_files_only=True), cfg.variants)
    return eval_requests(decoded, views, cfg, None, seed=0)


@pytest.mark.parametrize("name", ["untied", "tied"])
def test_export_gives_the_trained_policys_greedy_tokens(world, trained, name):
    """HF generate on the export (loaded by the model class) == the engine's native greedy decode on the trained
    policy. The fp32 export is the trained policy itself; the bf16 one is compared with the trained weights
    rounded to bf16 (what the export holds), both computed in fp32."""
    import dataclasses

    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from strive_engine.config import load_config
    from strive_engine.policy import Policy
    from strive_engine.rollout import generate_rollouts

    cfg = load_config([*SMALL, f"--model.path={world[name]}"])
    reqs = _requests(world["records"], cfg, world[name])
    policy_hf = _trained_model(world[name], trained[name])
    if name == "tied":
        with torch.no_grad():
            for p in policy_hf.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    greedy = dataclasses.replace(cfg.rollout, num_generations=1, do_sample=False, max_new_tokens=12)
    tok = AutoTokenizer.from_pretrained(trained[name] / "hf", local_files_only=True, padding_side="left")
    engine = generate_rollouts(Policy(policy_hf), tok, reqs, dataclasses.replace(greedy, backend="native"), 0)
    export = Qwen2_5_VLForConditionalGeneration.from_pretrained(trained[name] / "hf", local_files_only=True,
                                                                dtype=torch.float32).eval()
    hf = generate_rollouts(Policy(export), tok, reqs, dataclasses.replace(greedy, backend="hf"), 0)
    assert engine.completion_ids.shape[1] >= 4  # a real comparison: several tokens per row
    assert torch.equal(engine.completion_ids, hf.completion_ids), (engine.texts, hf.texts)


def test_evaluate_the_export_with_its_training_settings(world, trained):
    """No --recipe: debug_cpu's 'short' prompt and 16 frames at 784 px would apply; the export's settings win."""
    hf = trained["tied"] / "hf"
    _run("strive_engine.evaluate", [f"--model.path={hf}", f"--data.eval_path={world['records']}",
                                    "--logging.progress=false", "--video.decode_workers=1"])
    report = json.loads((hf / "eval" / "report.json").read_text())  # the model's own folder
    s = report["settings"]
    assert s["prompt"] == "video_r1" and s["from"]["rollout.prompt"] == "training"
    assert (s["num_frames"], s["pool_frames"], s["max_pixels"]) == (4, 64, 784)
    assert s["settings_file"] == str(hf / "strive_settings.json")
    assert report["model_identity"]["path"] == str(hf.resolve()) and report["num_scored"] == 2
    # A field set on the command line wins over the saved one.
    out = world["dir"] / "eval_short"
    _run("strive_engine.evaluate", [f"--model.path={hf}", f"--data.eval_path={world['records']}",
                                    "--rollout.prompt=short", f"--eval.output_dir={out}", "--logging.progress=false"])
    s = json.loads((out / "report.json").read_text())["settings"]
    assert s["prompt"] == "short" and s["from"]["rollout.prompt"] == "command line" and s["num_frames"] == 4


def test_default_recipe_on_a_qwen_checkpoint_is_refused(world, tmp_path, capsys):
    """Without saved settings and without --recipe, a Qwen-vocabulary checkpoint would get the tiny model's prompt:
    train and evaluate refuse, naming the recipe; an explicit --rollout.prompt accepts debug_cpu."""
    from strive_engine.config import load_config
    from strive_engine.evaluate import main as evaluate_main
    from strive_engine.train import main as train_main
    from strive_engine.trained_settings import refuse_tiny_recipe_for_checkpoint

    args = [f"--model.path={world['tied']}", f"--data.path={world['records']}", f"--run.output_dir={tmp_path}"]
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert "config error" in err and "--recipe qwen25vl_7b" in err and "151,936" in err
    assert evaluate_main([f"--model.path={world['tied']}", f"--data.eval_path={world['records']}"]) == 2
    assert "carries no saved training settings" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything was written
    ok = [f"--model.path={world['tied']}", "--rollout.prompt=video_r1"]
    refuse_tiny_recipe_for_checkpoint(load_config(ok), ok)  # explicit choice: accepted
    explicit = ["--recipe", "debug_cpu", f"--model.path={world['tied']}"]
    refuse_tiny_recipe_for_checkpoint(load_config(explicit), explicit)


def test_saved_settings_file_errors_name_the_file(tmp_path):
    from strive_engine.config import ConfigError, load_config
    from strive_engine.trained_settings import SETTINGS_FILE, adopt_training_settings

    (tmp_path / SETTINGS_FILE).write_text("{not json")
    argv = [f"--model.path={tmp_path}"]
    with pytest.raises(ConfigError, match=SETTINGS_FILE):
        adopt_training_settings(load_config(argv), argv)
    cfg = load_config(argv).to_dict()
    cfg["keyframes"]["num_frames"] = 64  # more than the pool of 32 this command line asks for
    (tmp_path / SETTINGS_FILE).write_text(json.dumps({"version": 1, "config": cfg}))
    argv = [f"--model.path={tmp_path}", "--video.pool_frames=32"]
    with pytest.raises(ConfigError, match="do not combine with this command line.*keyframes.num_frames"):
        adopt_training_settings(load_config(argv), argv)
