"""Files PromptKD users already have: released students (``VLPromptLearner/model-best.pth.tar``) loaded strictly
with the conv -> linear projector mapping, ``run.py test`` of such a student, teachers with ``token_prefix2``; and
custom open_clip architectures (registered configs, the QuickGELU hint). Tiny open_clip models, random weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from test_base_to_new_lit import CONFIGS, TINY_DISTILL, _data_args
from test_clip_models import _promptkd_state, _teacher

from abkd_vision.cli import main as cli_main
from abkd_vision.data.synthetic import write_fake_coop_dataset
from abkd_vision.models import CheckpointError
from abkd_vision.models.clip import (
    CLIPWeightsError,
    PromptedImageStudent,
    build_clip,
    load_prompt_checkpoint,
    load_student_checkpoint,
    plain_clip_key,
    prompt_parameters,
    register_clip_config,
)

TINY = "abkd-tiny-vit-quickgelu"  # vision width 48, embed 32; the tiny teacher's text features are 48 wide


class _PickledScheduler:  # stands for the scheduler object Dassl's files pickle
    last_epoch = 20


def _student(seed: int, teacher_dim: int = 48) -> PromptedImageStudent:
    torch.manual_seed(seed)
    return PromptedImageStudent(TINY, None, teacher_dim, vision_tokens=4, vision_depth=3).eval()


def _trained(seed: int = 1, teacher_dim: int = 48) -> PromptedImageStudent:
    """A student whose prompts, projector, BatchNorm statistics and logit scale are all non-trivial."""
    student = _student(seed, teacher_dim)
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
        bn = student.projector[1]
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.num_batches_tracked.fill_(123)
        student.logit_scale_log.fill_(3.9)
    return student


def _promptkd_student_state(student: PromptedImageStudent) -> dict:
    """``student`` under PromptKD's student key names and shapes (its CustomCLIP: image_encoder, VPT_image_trans
    of 1x1 convolutions + BatchNorm2d, logit_scale), half precision where PromptKD's convert_weights puts it."""
    out = {}
    for key, value in student.state_dict().items():
        if key == "logit_scale_log":
            out["logit_scale"] = value
        elif key.startswith("projector."):
            _, index, leaf = key.split(".")
            if index in ("0", "3"):  # the convolutions are fp16 in PromptKD, BatchNorm stays fp32
                value = (value[..., None, None] if leaf == "weight" else value).half()
            out[f"VPT_image_trans.conv1.{index}.{leaf}"] = value
        elif key == "visual.ln_pre.prompt":
            out["image_encoder.VPT"] = value.half()
        elif key.endswith(".prompt"):
            out["image_encoder." + key[len("visual."):].replace(".prompt", ".VPT_shallow")] = value.half()
        else:
            out["image_encoder." + plain_clip_key(key)[len("visual."):]] = value.half()
    return out


def _save_promptkd(state: dict, path) -> None:
    torch.save({"state_dict": state, "epoch": 20, "optimizer": {"state": {}}, "scheduler": _PickledScheduler(),
                "val_result": 0.9}, path)


def _native(state: dict) -> dict:
    """The same weights (after PromptKD's fp16 rounding) in this suite's own student layout."""
    out = {}
    for key, value in state.items():
        if key == "logit_scale":
            out["logit_scale_log"] = value
        elif key.startswith("VPT_image_trans."):
            _, _, index, leaf = key.split(".")
            out[f"projector.{index}.{leaf}"] = value.reshape(value.shape[:2]).float() if value.ndim == 4 else (
                value.float() if value.is_floating_point() else value)
    return out


def test_promptkd_student_loads_strictly_and_reproduces_the_native_logits(tmp_path):
    source = _trained()
    state = _promptkd_student_state(source)
    assert state["VPT_image_trans.conv1.0.weight"].shape == (48, 32, 1, 1)
    assert "image_encoder.transformer.resblocks.2.VPT_shallow" in state
    _save_promptkd(state, tmp_path / "model-best.pth.tar")
    with pytest.raises(CheckpointError, match="student_ckpt_trusted: true"):
        load_student_checkpoint(_student(2), tmp_path / "model-best.pth.tar")
    loaded = _student(2)  # other random weights everywhere, the image tower included
    meta = load_student_checkpoint(loaded, tmp_path / "model-best.pth.tar", trusted=True)
    assert meta["format"] == "promptkd" and meta["epoch"] == 20

    # the same (fp16-rounded) weights given natively: the student's own state dict layout, frozen tower included
    native = _student(3)
    rounded = {k: (v.half().float() if v.is_floating_point() else v) for k, v in source.state_dict().items()}
    rounded.update(_native(state))
    torch.save(rounded, tmp_path / "native.pt")
    assert load_student_checkpoint(native, tmp_path / "native.pt")["format"] == "abkd"
    images, text = torch.randn(4, 3, 32, 32), F.normalize(torch.randn(6, 48), dim=-1)
    with torch.no_grad():
        assert torch.equal(loaded(images, text), native(images, text))
        torch.testing.assert_close(loaded(images, text), source(images, text), atol=0.05, rtol=0.01)  # fp16 file
    assert torch.equal(loaded.projector[1].running_var, source.projector[1].running_var)
    assert int(loaded.projector[1].num_batches_tracked) == 123


def test_wrong_shapes_missing_and_unexpected_keys_are_listed(tmp_path):
    state = _promptkd_student_state(_trained())
    state["image_encoder.VPT"] = torch.zeros(2, 48)  # 2 prompt tokens instead of 4
    del state["image_encoder.transformer.resblocks.2.VPT_shallow"]
    state["VPT_image_trans.conv1.4.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "bad.pth.tar")
    with pytest.raises(CheckpointError) as err:
        load_student_checkpoint(_student(2), tmp_path / "bad.pth.tar")
    msg = str(err.value)
    assert "missing keys (1): visual.transformer.resblocks.2.prompt" in msg
    assert "unexpected keys (1): VPT_image_trans.conv1.4.weight" in msg
    assert "visual.ln_pre.prompt: checkpoint [2, 48] vs model [4, 48]" in msg


def test_projector_widths_that_do_not_fit_the_teacher_name_both_widths(tmp_path):
    torch.save({"state_dict": _promptkd_student_state(_trained(teacher_dim=64))}, tmp_path / "wide.pth.tar")
    with pytest.raises(CheckpointError, match=r"maps 32 -> 64 features, but this student needs 32 -> 48.*"
                                              r"teacher's text features are 48 wide.*teacher of width 64"):
        load_student_checkpoint(_student(2), tmp_path / "wide.pth.tar")


def test_teacher_and_student_files_given_the_wrong_way_round_say_so(tmp_path):
    torch.save({"state_dict": _promptkd_student_state(_trained())}, tmp_path / "student.pth.tar")
    with pytest.raises(CheckpointError, match="is a PromptKD student checkpoint.*student_ckpt"):
        load_prompt_checkpoint(_teacher(), tmp_path / "student.pth.tar")
    torch.save({"state_dict": _promptkd_state(_teacher(), n_base=3)}, tmp_path / "teacher.pth.tar")
    with pytest.raises(CheckpointError, match="is a PromptKD teacher checkpoint.*teacher_ckpt"):
        load_student_checkpoint(_student(2), tmp_path / "teacher.pth.tar")


def test_suite_distillation_checkpoints_initialise_a_student(tmp_path):
    source = _trained()
    trained = {f"student.{k}": v for k, v in source.state_dict().items()
               if k.startswith("projector.") or k.endswith(".prompt")}
    torch.save({"state_dict": {**trained, "head.log_temperature": torch.zeros(())}, "class_names": ["a", "b"]},
               tmp_path / "last.ckpt")
    student = _student(2)
    assert load_student_checkpoint(student, tmp_path / "last.ckpt")["class_names"] == ["a", "b"]
    for key in trained:
        assert torch.equal(student.state_dict()[key[len("student."):]], source.state_dict()[key[len("student."):]])


def test_run_py_test_of_a_released_promptkd_student_and_teacher(tmp_path):
    """base/new/HM of PromptKD's student without retraining: both released files (the teacher's with
    token_prefix2/token_suffix2 buffers, as PromptKD's CustomCLIP_teacher writes them) through run.py test."""
    write_fake_coop_dataset(tmp_path / "coop", "EuroSAT", num_classes=10, train_per_class=1, test_per_class=2,
                            val_per_class=1, image_size=32, seed=0)
    teacher_state = _promptkd_state(_teacher(), n_base=5)
    teacher_state["prompt_learner.token_prefix2"] = torch.zeros(5, 1, 48).half()
    teacher_state["prompt_learner.token_suffix2"] = torch.zeros(5, 72, 48).half()
    _save_promptkd(teacher_state, tmp_path / "teacher.pth.tar")
    source = _trained()
    _save_promptkd(_promptkd_student_state(source), tmp_path / "student.pth.tar")
    cli = cli_main(["test", "--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "kd" / "EuroSAT.yaml"),
                    *TINY_DISTILL, "--model.init_args.teacher_ckpt", str(tmp_path / "teacher.pth.tar"),
                    "--model.init_args.teacher_ckpt_trusted", "true",
                    "--model.init_args.student_ckpt", str(tmp_path / "student.pth.tar"),
                    "--model.init_args.student_ckpt_trusted", "true", *_data_args(tmp_path / "coop", tmp_path, "pk")])
    module = cli.model
    assert module.student_metadata["format"] == "promptkd" and module.teacher_metadata["num_prompt_classes"] == 5
    test = json.loads((tmp_path / "pk" / "version_0" / "results.json").read_text())["test"]
    assert set(test) == {"base_acc", "new_acc", "hm"} and 0 <= test["hm"] <= 1
    images = torch.randn(3, 3, 32, 32)
    module.eval()  # the trainer hands the module back in training mode
    with torch.no_grad():
        text = module.teacher.text_features(module.class_names)[5:]
        torch.testing.assert_close(module.eval_logits(images, "new"), source(images, text), atol=0.05, rtol=0.01)
    for name, p in prompt_parameters(module.student):
        torch.testing.assert_close(p, dict(prompt_parameters(source))[name].half().float())


# ----------------------------------------------------------------------------------------------- custom archs
def _tiny_config(quick_gelu: bool) -> dict:
    cfg = open_clip.get_model_config("abkd-tiny-vit")
    return {**cfg, "quick_gelu": quick_gelu}


def test_custom_architectures_register_from_a_dict_or_a_json_path(tmp_path):
    name = register_clip_config(_tiny_config(False), name="abkd-test-dict-vit")
    assert name == "abkd-test-dict-vit" and open_clip.get_model_config(name)["quick_gelu"] is False
    assert build_clip(name, None).visual.output_dim == 32
    (tmp_path / "abkd-test-json-vit.json").write_text(json.dumps(_tiny_config(True)))
    student = PromptedImageStudent(str(tmp_path / "abkd-test-json-vit.json"), None, 48, vision_depth=2).eval()
    assert open_clip.get_model_config("abkd-test-json-vit")["quick_gelu"] is True
    assert student(torch.randn(1, 3, 32, 32), F.normalize(torch.randn(2, 48), dim=-1)).shape == (1, 2)
    with pytest.raises(ValueError, match="needs name="):
        register_clip_config(_tiny_config(False))
    with pytest.raises(ValueError, match="lacks vision_cfg, text_cfg"):
        register_clip_config({"embed_dim": 8}, name="abkd-test-broken")


def test_the_folder_of_dict_configs_is_removed_when_the_process_exits():
    code = ("import open_clip\nfrom abkd_vision.models.clip import builder\n"
            "cfg = open_clip.get_model_config('abkd-tiny-vit')\n"
            "builder.register_clip_config(cfg, name='abkd-exit-vit')\n"
            "assert (builder._DICT_CONFIG_DIR / 'abkd-exit-vit.json').is_file()\nprint(builder._DICT_CONFIG_DIR)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    folder = Path(done.stdout.strip().splitlines()[-1])
    assert folder.name.startswith("abkd-clip-configs-") and not folder.exists()


def test_quickgelu_hint_names_a_real_variant_or_says_to_set_the_flag(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "openai.safetensors"), metadata={"quick_gelu": "true"})
    name = register_clip_config(_tiny_config(False), name="abkd-test-gelu-only")  # no -quickgelu twin exists
    with pytest.raises(CLIPWeightsError) as err:
        build_clip(name, str(tmp_path / "openai.safetensors"))
    msg = str(err.value)
    assert "open_clip has no QuickGELU variant of 'abkd-test-gelu-only'" in msg
    assert 'set "quick_gelu": true in its model config' in msg and "abkd-test-gelu-only-quickgelu" not in msg
    with pytest.raises(CLIPWeightsError, match="Use the architecture 'abkd-tiny-vit-quickgelu' instead"):
        build_clip("abkd-tiny-vit", str(tmp_path / "openai.safetensors"))
