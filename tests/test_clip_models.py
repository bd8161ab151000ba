"""CLIP builders, deep prompts, the student, the text-feature cache and prompt checkpoints, on tiny open_clip
configs with random weights (``abkd-tiny-vit*``, registered by ``abkd_vision.models.clip``)."""

from __future__ import annotations

import warnings

import open_clip
import pytest
import torch
import torch.nn.functional as F

from abkd_vision.models import CheckpointError
from abkd_vision.models.clip import (
    CLIPWeightsError,
    PromptedCLIP,
    PromptedImageStudent,
    TextFeatureCache,
    TextFeatureMismatchError,
    build_clip,
    convert_openai_archive,
    load_prompt_checkpoint,
    plain_clip_key,
    prompt_parameters,
    prompts_disabled,
)
from abkd_vision.models.clip.text_cache import load_text_features

TINY = "abkd-tiny-vit-quickgelu"          # student-sized: vision width 48, text width 32, embed 32
TINY_LARGE = "abkd-tiny-vit-large-quickgelu"  # teacher-sized: vision width 64, text width 48, embed 48
NAMES = ["golden_retriever", "tabby cat", "red fox", "barn owl", "koala"]


def _teacher(**kw) -> PromptedCLIP:
    torch.manual_seed(0)
    kw = {"pretrained": None, "text_depth": 3, "vision_depth": 3, **kw}
    return PromptedCLIP(TINY_LARGE, **kw)


def _save_torchscript(model: torch.nn.Module, path) -> None:
    """An OpenAI-style TorchScript archive of ``model`` (traced), as ``ViT-B-16.pt`` files are."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model.eval(), (torch.randn(1, 3, 32, 32), torch.zeros(1, 77, dtype=torch.long)),
                                 check_trace=False, strict=False)
    traced.save(str(path))


def _random_clip(arch: str = TINY, seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_clip(arch, None)


# ----------------------------------------------------------------------------------------------- builders
def test_build_clip_is_frozen_and_in_eval():
    model = _random_clip()
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training


def test_unknown_architecture_lists_choices():
    with pytest.raises(ValueError, match=r"unknown open_clip architecture 'ViT-X-99'.*list_models"):
        build_clip("ViT-X-99")


def test_missing_weights_file_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"neither an open_clip tag.*openai"):
        build_clip(TINY, str(tmp_path / "nope.pt"))


@pytest.mark.parametrize("fmt", ["torchscript", "state_dict", "wrapped_state_dict", "safetensors"])
def test_local_weight_files_load_exactly(tmp_path, fmt):
    src = _random_clip(seed=3)
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pt")
    if fmt == "torchscript":
        _save_torchscript(src, path)
    elif fmt == "state_dict":
        torch.save(src.state_dict(), path)
    elif fmt == "wrapped_state_dict":
        torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    model = build_clip(TINY, str(path))
    for key, value in src.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_openai_archive_in_a_gelu_architecture_is_an_error_naming_the_quickgelu_config(tmp_path):
    _save_torchscript(_random_clip(), tmp_path / "ViT-tiny.pt")
    with pytest.raises(CLIPWeightsError, match=r"QuickGELU.*'abkd-tiny-vit'.*Use the architecture "
                                               r"'abkd-tiny-vit-quickgelu'"):
        build_clip("abkd-tiny-vit", str(tmp_path / "ViT-tiny.pt"))


def test_openai_tag_in_a_gelu_architecture_is_an_error_before_any_download():
    with pytest.raises(CLIPWeightsError, match=r"Use the architecture 'ViT-B-16-quickgelu'"):
        build_clip("ViT-B-16", "openai")


def test_converted_archive_keeps_the_quickgelu_flag(tmp_path):
    src = _random_clip(seed=4)
    _save_torchscript(src, tmp_path / "a.pt")
    out = convert_openai_archive(tmp_path / "a.pt", tmp_path / "a.safetensors")
    assert torch.equal(build_clip(TINY, str(out)).visual.conv1.weight, src.visual.conv1.weight)
    with pytest.raises(CLIPWeightsError, match="Use the architecture 'abkd-tiny-vit-quickgelu'"):
        build_clip("abkd-tiny-vit", str(out))


def test_weights_of_another_architecture_list_the_keys_and_name_the_config(tmp_path):
    torch.save(_random_clip(TINY_LARGE).state_dict(), tmp_path / "large.pt")
    with pytest.raises(CLIPWeightsError) as err:
        build_clip(TINY, str(tmp_path / "large.pt"))
    msg = str(err.value)
    assert "shape mismatches" in msg and "visual.conv1.weight" in msg and "-quickgelu" in msg


def test_tag_download_failure_says_how_to_work_offline(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(open_clip, "create_model", offline)
    with pytest.raises(CLIPWeightsError, match=r"could not fetch the 'openai' weights.*pretrained=/path/to/weights"):
        build_clip("ViT-B-16-quickgelu", "openai")


def test_tokenizer_works_offline():
    model = _teacher()
    tokens = model.tokenize(["golden_retriever"])
    assert tokens.shape == (1, 77)
    ids = tokens[0].tolist()
    # SOT, "a photo of a" (4 tokens), "golden retriever" (underscore cleaned), ".", EOT
    assert model._content_ids("a photo of a") == ids[1:5]
    assert model._content_ids("golden retriever.") == ids[5:ids.index(max(ids))]


# ----------------------------------------------------------------------------------------------- prompts
def test_context_initialised_from_the_prefix_reproduces_zero_shot_text_features():
    model = _teacher(text_depth=1, vision_depth=0)  # the learnable context only, at its initial value
    prompted = model.encode_text(NAMES)
    zero_shot = model.zero_shot_text_features(NAMES)
    torch.testing.assert_close(prompted, zero_shot, atol=1e-6, rtol=0)


def test_disabled_prompts_give_the_unwrapped_open_clip_model():
    model = _teacher()
    plain = open_clip.create_model(TINY_LARGE)
    plain.load_state_dict({plain_clip_key(k): v for k, v in model.clip.state_dict().items()
                           if not k.endswith((".prompt", ".ctx"))})
    images = torch.randn(3, 3, 32, 32)
    with prompts_disabled(model):
        torch.testing.assert_close(model.encode_image(images), plain.encode_image(images, normalize=True))
        tokens = model.tokenize(NAMES)
        torch.testing.assert_close(model.clip.encode_text(tokens, normalize=True),
                                   plain.encode_text(tokens, normalize=True))
    # and switched back on afterwards
    assert not torch.allclose(model.encode_image(images), plain.encode_image(images, normalize=True))


def test_prompt_tokens_sit_where_each_block_expects_them():
    model = _teacher(vision_tokens=2)
    seen = {}

    def grab(name):
        def hook(module, args):
            seen[name] = args[0].detach().clone()
        return hook

    vblocks, tblocks = model.clip.visual.transformer.resblocks, model.clip.transformer.resblocks
    for i in range(3):
        vblocks[i].register_forward_pre_hook(grab(f"v{i}"))
        tblocks[i].register_forward_pre_hook(grab(f"t{i}"))
    model.encode_image(torch.randn(2, 3, 32, 32))
    model.encode_text(NAMES[:2])
    n_patches = (32 // 8) ** 2
    assert seen["v0"].shape[1] == 1 + n_patches + 2  # CLS, patches, appended prompts
    # blocks 1..depth-1 see their own prompt in the last tokens (the wrapper inserts it before the block)
    for i in (1, 2):
        inner = vblocks[i].block
        out = {}
        h = inner.register_forward_pre_hook(lambda m, a, out=out: out.setdefault("x", a[0].detach().clone()))
        model.encode_image(torch.randn(2, 3, 32, 32))
        h.remove()
        torch.testing.assert_close(out["x"][:, -2:], vblocks[i].prompt.expand(2, -1, -1))
        h = tblocks[i].block.register_forward_pre_hook(lambda m, a, out=out: out.__setitem__("t", a[0].detach()))
        model.encode_text(NAMES[:2])
        h.remove()
        torch.testing.assert_close(out["t"][:, 1:5], tblocks[i].prompt.expand(2, -1, -1))
    # the input context replaces positions 1..4 of the token embeddings (before the positional embedding)
    emb = model.clip.token_embedding(model.tokenize(NAMES[:2]))
    torch.testing.assert_close(emb[:, 1:5], model.clip.token_embedding.ctx.expand(2, -1, -1))


def test_only_prompts_are_trainable_and_all_get_gradients():
    model = _teacher()
    names = {n for n, _ in prompt_parameters(model)}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == names and len(names) == 1 + 2 + 1 + 2  # ctx + 2 text deep, VPT + 2 vision deep
    logits = model(torch.randn(2, 3, 32, 32), model.encode_text(NAMES))
    logits.logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in names)


def test_prompt_depth_beyond_the_blocks_is_an_error():
    with pytest.raises(ValueError, match=r"vision prompt depth must be in \[0, 3\].*got 9"):
        PromptedCLIP(TINY_LARGE, pretrained=None, text_depth=3, vision_depth=9)
    with pytest.raises(ValueError, match="text_depth=2 needs learn_ctx=True"):
        PromptedCLIP(TINY_LARGE, pretrained=None, learn_ctx=False, text_depth=2)


def test_teacher_logits_are_scaled_cosines():
    model = _teacher()
    images = torch.randn(4, 3, 32, 32)
    text = model.encode_text(NAMES)
    expected = model.clip.logit_scale.exp() * F.normalize(model.clip.encode_image(images), dim=-1) @ text.t()
    torch.testing.assert_close(model(images, text), expected)


# ----------------------------------------------------------------------------------------------- student
def test_student_classifies_with_the_teachers_text_features():
    torch.manual_seed(0)
    student = PromptedImageStudent(TINY, pretrained=None, teacher_dim=48, vision_depth=3)
    assert not hasattr(student, "transformer") and not hasattr(student, "token_embedding")  # no text tower
    text = F.normalize(torch.randn(5, 48), dim=-1)
    images = torch.randn(4, 3, 32, 32)
    student.eval()
    logits = student(images, text)
    feats = F.normalize(student.projector(student.visual(images)), dim=-1)
    torch.testing.assert_close(logits, student.logit_scale_log.exp() * feats @ text.t())
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in prompt_parameters(student)} | {
        n for n, _ in student.named_parameters() if n.startswith("projector.")}
    student.train()
    assert not student.visual.training and student.projector.training


def _enough_memory(gib: float) -> bool:
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) for line in f}
        return info["MemAvailable"] / 2**20 > gib
    except (OSError, KeyError, ValueError):
        return True


@pytest.mark.skipif(not _enough_memory(5.0), reason="building ViT-L/14 + ViT-B/16 needs about 3 GiB free")
def test_real_architectures_have_the_reference_trainable_parameter_counts():
    student = PromptedImageStudent("ViT-B-16-quickgelu", pretrained=None)
    assert sum(p.numel() for _, p in prompt_parameters(student)) == 9 * 4 * 768 == 27_648
    assert sum(p.numel() for p in student.projector.parameters()) == 986_112
    assert sum(p.numel() for p in student.parameters() if p.requires_grad) == 1_013_760
    assert sum(p.numel() for p in student.visual.parameters()) - 27_648 == pytest.approx(86.19e6, rel=2e-3)
    del student
    teacher = PromptedCLIP("ViT-L-14-quickgelu", pretrained=None)
    # text: 4x768 context + 8 deep blocks x 4 x 768; vision: 4x1024 input + 8 deep blocks x 4 x 1024
    assert sum(p.numel() for p in teacher.parameters() if p.requires_grad) == 9 * 4 * 768 + 9 * 4 * 1024
    assert teacher.embed_dim == 768


# ----------------------------------------------------------------------------------------------- text cache
def test_text_cache_hit_and_invalidation(tmp_path):
    model = _teacher()
    cache = TextFeatureCache(tmp_path)
    first = cache.get(model, NAMES)
    for _ in range(5):  # a training loop asking every step: the text tower runs once
        assert cache.get(model, NAMES) is not None
    assert cache.computed == 1
    torch.testing.assert_close(first, model.encode_text(NAMES))
    # other class names -> recomputed
    other = cache.get(model, NAMES[:3])
    assert cache.computed == 2 and other.shape == (3, 48)
    # another process / run with the same teacher and classes reads the file
    fresh = TextFeatureCache(tmp_path)
    torch.testing.assert_close(fresh.get(model, NAMES), first)
    assert fresh.computed == 0
    # a weight change (optimiser step, load_state_dict) -> recomputed, in memory and on disk
    with torch.no_grad():
        model.clip.token_embedding.ctx.add_(0.5)
    changed = cache.get(model, NAMES)
    assert cache.computed == 3 and not torch.allclose(changed, first)
    torch.testing.assert_close(changed, model.encode_text(NAMES))


def test_text_features_cached_before_loading_the_weights_are_not_reused(tmp_path):
    trained = _teacher()
    with torch.no_grad():
        for _, p in prompt_parameters(trained):
            p.normal_()
    torch.save({"state_dict": {f"model.{k}": p.detach() for k, p in prompt_parameters(trained)}},
               tmp_path / "prompts.ckpt")
    model = _teacher()
    cache = TextFeatureCache(tmp_path / "cache")
    stale = cache.get(model, NAMES)  # the reference code's mistake: features before the weights
    load_prompt_checkpoint(model, tmp_path / "prompts.ckpt")
    after = cache.get(model, NAMES)
    torch.testing.assert_close(after, trained.encode_text(NAMES))
    assert not torch.allclose(after, stale)


def test_stored_features_for_other_class_names_are_an_error(tmp_path):
    model = _teacher()
    cache = TextFeatureCache(tmp_path)
    cache.get(model, NAMES)
    (path,) = tmp_path.glob("text_features-*.pt")
    with pytest.raises(TextFeatureMismatchError, match=r"other class names.*'koala' vs 'wombat'"):
        load_text_features(path, NAMES[:4] + ["wombat"])


# ----------------------------------------------------------------------------------------------- checkpoints
def _promptkd_state(model: PromptedCLIP, n_base: int) -> dict:
    """A state dict with PromptKD's teacher key names and shapes (PromptSRC's CustomCLIP), from ``model``."""
    sd = model.state_dict()
    out = {"logit_scale": sd["clip.logit_scale"], "prompt_learner.ctx": sd["clip.token_embedding.ctx"].half(),
           "prompt_learner.token_prefix": torch.zeros(n_base, 1, 48).half(),
           "prompt_learner.token_suffix": torch.zeros(n_base, 72, 48).half(),
           "prompt_learner.ZS_image_encoder.conv1.weight": sd["clip.visual.conv1.weight"].half(),
           "image_encoder.VPT": sd["clip.visual.ln_pre.prompt"].half()}
    for key, value in sd.items():
        plain = plain_clip_key(key[len("clip."):])
        if key.endswith(".prompt") and ".resblocks." in key:
            tower = "image_encoder." if key.startswith("clip.visual.") else "text_encoder."
            out[tower + plain.replace("visual.", "", 1).replace(".prompt", ".VPT_shallow")] = value.half()
        elif key.endswith((".prompt", ".ctx")) or plain.startswith("token_embedding") or plain == "logit_scale":
            continue
        elif plain.startswith("visual."):
            out["image_encoder." + plain[len("visual."):]] = value
        else:
            out["text_encoder." + plain] = value
    return out


def test_promptkd_teacher_checkpoint_maps_onto_our_prompts(tmp_path):
    source = _teacher()
    with torch.no_grad():
        for _, p in prompt_parameters(source):
            p.normal_()
    state = _promptkd_state(source, n_base=3)
    assert "text_encoder.transformer.resblocks.1.VPT_shallow" in state
    assert "image_encoder.transformer.resblocks.2.VPT_shallow" in state
    torch.save({"state_dict": state, "epoch": 20, "optimizer": {"state": {}}, "val_result": 0.9},
               tmp_path / "model-best.pth.tar")
    model = _teacher()
    meta = load_prompt_checkpoint(model, tmp_path / "model-best.pth.tar")
    assert meta["format"] == "promptkd" and meta["num_prompt_classes"] == 3 and meta["epoch"] == 20
    for name, p in prompt_parameters(model):
        torch.testing.assert_close(p, dict(prompt_parameters(source))[name].half().float(), msg=name)
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(images, model.encode_text(NAMES)), source(images, source.encode_text(NAMES)),
                               atol=2e-2, rtol=2e-2)  # the prompts went through fp16


def test_promptkd_keys_that_do_not_map_are_listed(tmp_path):
    source = _teacher()
    state = _promptkd_state(source, n_base=3)
    state["prompt_learner.meta_net.linear1.weight"] = torch.zeros(2, 2)
    del state["image_encoder.VPT"]
    state["text_encoder.transformer.resblocks.1.VPT_shallow"] = torch.zeros(2, 48)
    torch.save({"state_dict": state}, tmp_path / "bad.pth.tar")
    with pytest.raises(CheckpointError) as err:
        load_prompt_checkpoint(_teacher(), tmp_path / "bad.pth.tar")
    msg = str(err.value)
    assert "missing keys (1): clip.visual.ln_pre.prompt" in msg
    assert "unexpected keys (1): prompt_learner.meta_net.linear1.weight" in msg
    assert "clip.transformer.resblocks.1.prompt: checkpoint [2, 48] vs model [4, 48]" in msg


class _PickledScheduler:  # stands for the scheduler object PromptKD's files pickle
    last_epoch = 20


def test_pickled_promptkd_files_need_trust(tmp_path):
    torch.save({"state_dict": {"prompt_learner.ctx": torch.zeros(4, 48)}, "scheduler": _PickledScheduler()},
               tmp_path / "pickled.pth.tar")
    with pytest.raises(CheckpointError, match="trusted=True"):
        load_prompt_checkpoint(_teacher(), tmp_path / "pickled.pth.tar")
