"""CaloDiT backbone: shapes, adaLN-Zero init, checkpoint I/O (strict, float32), phi periodicity, CFG dropout."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel

from calofm.models import (
    LORA_TARGETS,
    PRESETS,
    CaloDiTConfig,
    CaloDiTModel,
    CheckpointMismatchError,
    create_model,
    preset_config,
)
from calofm.models.calodit import ZeroLinear, pad_mesh

B = 3


def inputs(seed=0, batch=B):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(batch, 9, 16, 45, generator=g),
        c_noise=torch.randn(batch, generator=g),
        energy=torch.rand(batch, generator=g) * 100 + 1,
        phi=(torch.rand(batch, generator=g) * 2 - 1) * math.pi,
        theta=torch.rand(batch, generator=g) + 1,
        geometry=torch.randint(0, 8, (batch,), generator=g),
    )


def randomised(model, seed=1, scale=0.05):
    """The model with every weight perturbed, so zero-initialised layers do something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return create_model("tiny").eval()


def test_output_shape_and_token_count(tiny):
    assert tiny.pos_embed.shape == (1, 3 * 8 * 15, 48)
    out = randomised(tiny)(**inputs())
    assert out.shape == (B, 9, 16, 45) and out.dtype == torch.float32
    assert out.abs().sum() > 0


def test_output_exactly_zero_at_init(tiny):
    zero_layers = [m for m in tiny.modules() if isinstance(m, ZeroLinear)]
    assert len(zero_layers) == 2 * 1 + 1 + 1  # adaLN in 2 blocks, final adaLN, final linear
    assert all((m.weight == 0).all() and (m.bias == 0).all() for m in zero_layers)
    assert torch.equal(tiny(**inputs()), torch.zeros(B, 9, 16, 45))
    # the other layers were initialised, not left zero
    assert tiny.blocks[0].attn.qkv.weight.std() > 0.01 and tiny.geometry_embed.weight.std() > 0.01


def test_zero_init_survives_from_pretrained_and_loaded_weights_win(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "fresh")
    loaded = CaloDiTModel.from_pretrained(tmp_path / "fresh")
    assert torch.equal(loaded(**inputs()), torch.zeros(B, 9, 16, 45))
    randomised(tiny).save_pretrained(tmp_path / "trained")
    loaded = CaloDiTModel.from_pretrained(tmp_path / "trained")
    assert torch.equal(loaded.blocks[0].adaLN_modulation.weight, tiny.blocks[0].adaLN_modulation.weight)


def test_save_load_round_trip_identical_and_auto_classes(tiny, tmp_path):
    model = randomised(tiny)
    model.config.preprocessing = {"version": 1, "mode": "absolute", "eps": 1e-3, "mean": -3.2, "std": 2.5, "count": 9}
    model.config.geometry_slots = {"par04_siw": 0, "odd": 2}
    model.config.geometry_thresholds = {"par04_siw": 5e-4, "odd": 5e-4}
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors"}
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "calodit"
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, CaloDiTConfig) and config.patch_size == (3, 2, 3) and config.mesh_shape == (9, 16, 45)
    assert config.geometry_slots == {"par04_siw": 0, "odd": 2} and config.preprocessing["mean"] == -3.2
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, CaloDiTModel)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs()), model(**inputs()))
    assert torch.equal(loaded.pos_embed, model.pos_embed)  # rebuilt (not stored), identical


@pytest.mark.parametrize("tamper", ["missing", "unexpected"])
def test_strict_load_rejects_tampered_checkpoint(tiny, tmp_path, tamper):
    tiny.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    if tamper == "missing":
        del state["blocks.1.mlp.fc2.weight"]
    else:
        state["blocks.1.extra.weight"] = torch.zeros(2)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match="blocks.1"):
        CaloDiTModel.from_pretrained(tmp_path)
    with pytest.raises(CheckpointMismatchError):
        AutoModel.from_pretrained(tmp_path)
    _, info = CaloDiTModel.from_pretrained(tmp_path, strict=False, output_loading_info=True)
    assert info["missing_keys" if tamper == "missing" else "unexpected_keys"]


def test_a_pickled_bin_is_never_loaded_unless_asked(tiny, tmp_path):
    model = randomised(tiny)
    model.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    for loader in (CaloDiTModel.from_pretrained, AutoModel.from_pretrained):
        with pytest.raises(OSError, match="model.safetensors"):
            loader(tmp_path)
    # the .bin is a valid checkpoint: only the default keeps it from being unpickled
    loaded = CaloDiTModel.from_pretrained(tmp_path, use_safetensors=False)
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


def test_bf16_checkpoint_loads_as_float32_unless_asked(tiny, tmp_path):
    model = randomised(tiny)
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    loaded = CaloDiTModel.from_pretrained(tmp_path)
    assert loaded.dtype == torch.float32 and loaded.pos_embed.dtype == torch.float32
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight.float())
    assert AutoModel.from_pretrained(tmp_path).dtype == torch.float32
    assert CaloDiTModel.from_pretrained(tmp_path, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_deterministic_under_seed():
    torch.manual_seed(123)
    a = randomised(create_model("tiny"))
    torch.manual_seed(123)
    b = randomised(create_model("tiny"))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert torch.equal(a(**inputs()), b(**inputs()))


def test_phi_position_embedding_is_periodic_without_seam(tiny):
    """Moving one token along phi rotates each (sin, cos) pair of the phi chunk by 2 pi k/8, across the seam too."""
    d = tiny.config.hidden_size // 3
    pos = tiny.pos_embed[0].double().reshape(3, 8, 15, 3 * tiny.config.hidden_size // 3)
    phi = pos[..., d : 2 * d]  # (r, phi, z, d): [sin(k a_j) ..., cos(k a_j) ...]
    sin, cos = phi[..., : d // 2], phi[..., d // 2 :]
    k = 1 + torch.arange(d // 2) % 4
    step_sin, step_cos = torch.sin(2 * math.pi * k / 8), torch.cos(2 * math.pi * k / 8)
    nxt = torch.roll(torch.arange(8), -1)  # j -> j + 1 mod 8, includes 7 -> 0
    torch.testing.assert_close(sin[:, nxt], sin * step_cos + cos * step_sin, atol=1e-6, rtol=0)
    torch.testing.assert_close(cos[:, nxt], cos * step_cos - sin * step_sin, atol=1e-6, rtol=0)
    gram = phi[0, :, 0] @ phi[0, :, 0].T  # circulant: similarity depends only on phi distance mod 8
    for shift in range(8):
        torch.testing.assert_close(torch.roll(gram, (shift, shift), (0, 1)), gram, atol=1e-5, rtol=0)
    # the r and z chunks do not depend on phi
    assert torch.equal(pos[:, :1, :, :d].expand(-1, 8, -1, -1), pos[..., :d])


def test_phi_condition_is_2pi_periodic(tiny):
    model, inp = randomised(tiny), inputs()
    with torch.no_grad():
        out = model(**inp)
        torch.testing.assert_close(model(**{**inp, "phi": inp["phi"] + 2 * math.pi}), out, atol=1e-5, rtol=1e-4)


def test_phi_circular_padding_when_patch_does_not_divide():
    x = torch.arange(2 * 9 * 16 * 45, dtype=torch.float32).reshape(2, 9, 16, 45)
    padded = pad_mesh(x, (0, 2, 3))
    assert padded.shape == (2, 9, 18, 48)
    assert torch.equal(padded[:, :, 16:, :45], x[:, :, :2])  # phi wraps: bins 0, 1 follow bin 15
    assert (padded[..., 45:] == 0).all()  # z (and r) have no neighbours beyond the detector
    model = create_model("tiny", patch_size=(3, 3, 3))
    assert model.config.grid_size == (3, 6, 15) and model.pos_embed.shape[1] == 270
    assert randomised(model)(**inputs()).shape == (B, 9, 16, 45)


def test_condition_dropout_only_in_training(tiny):
    model, inp = randomised(create_model("tiny", cond_dropout=0.999)), inputs()
    changed = {**inp, "energy": inp["energy"] * 3, "geometry": (inp["geometry"] + 1) % 8, "theta": inp["theta"] / 2}
    with torch.no_grad():
        assert not torch.allclose(model(**inp), model(**changed))  # eval: conditions are used
        model.train()
        torch.manual_seed(0)
        a = model(**inp)
        torch.manual_seed(0)
        torch.testing.assert_close(model(**changed), a)  # train: conditions dropped (p ~ 1)
        model.eval()
        drop = torch.tensor([True, False, False])
        a, b = model(**inp, drop_cond=drop), model(**changed, drop_cond=drop)
        torch.testing.assert_close(a[0], b[0])  # forced unconditional rows ignore the conditions
        assert not torch.allclose(a[1:], b[1:])


def test_gradient_checkpointing_same_gradients(tiny):
    model, inp = randomised(tiny).train(), inputs()
    model(**inp).square().sum().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing_enable()
    model(**inp).square().sum().backward()
    for r, p in zip(ref, model.parameters()):
        torch.testing.assert_close(p.grad, r)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft 0.21 calls it
def test_lora_targets_are_valid_peft_names(tiny):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny, LoraConfig(r=2, target_modules=list(LORA_TARGETS)))
    wrapped = {n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(LORA_TARGETS)
    torch.testing.assert_close(peft_model(**inputs()), torch.zeros(B, 9, 16, 45))  # LoRA B = 0: no-op at init


def test_presets_and_parameter_counts():
    counts = {name: sum(p.numel() for p in create_model(name).parameters()) for name in PRESETS}
    assert counts["tiny"] < 100_000
    assert counts["tiny"] < counts["small"] < counts["base"]
    assert 17_000_000 < counts["base"] < 18_000_000  # CaloDiT-2 size
    with pytest.raises(ValueError, match="unknown CaloDiT preset"):
        preset_config("huge")


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(hidden_size=50, num_attention_heads=5), "divisible by 6"),
        (dict(hidden_size=48, num_attention_heads=5), "not divisible by 5 heads"),
        (dict(patch_size=(3, 2, 50)), "larger than mesh"),
        (dict(patch_size=(3, 0, 3)), "patch_size"),
        (dict(n_geometry_slots=5), "n_geometry_slots"),
        (dict(cond_dropout=1.0), "cond_dropout"),
        (dict(sigma_min=100.0), "EDM constants"),
        (dict(geometry_slots={"a": 0, "b": 0}), "distinct"),
        (dict(geometry_slots={"a": 0}, geometry_thresholds={"b": 0.1}), "not in geometry_slots"),
        (dict(geometry_slots={"a": 0}, geometry_cell_max={"b": 0.1}), "not in geometry_slots"),
        (dict(geometry_slots={"a": 0}, geometry_cell_max={"a": 0.0}), "finite and > 0"),
        (dict(geometry_slots={"a": 0}, geometry_cell_max={"a": float("nan")}), "finite and > 0"),
        (dict(hiden_size=96), "unknown key"),
    ],
)
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        preset_config("tiny", **bad)


def test_geometry_claims_change_only_through_checked_methods(tmp_path):
    config = preset_config("tiny", geometry_slots={"par04_siw": 0, "ild": 2}, geometry_thresholds={"ild": 0.1})
    config.add_geometry("allegro", 5, 0.2, cell_max=0.01, card_sha256="a" * 64)
    assert config.geometry_slots == {"par04_siw": 0, "ild": 2, "allegro": 5}
    assert config.geometry_cards == {"allegro": "a" * 64} and config.geometry_cell_max == {"allegro": 0.01}
    with pytest.raises(ValueError, match="slot 0 for geometry 'mydet' is already used by 'par04_siw'"):
        config.add_geometry("mydet", 0, 0.1)
    with pytest.raises(ValueError, match="geometry 'ild' has slot 2 in the model, not 3"):
        config.add_geometry("ild", 3, 0.1)
    with pytest.raises(ValueError, match="need distinct ints"):
        config.add_geometry("far", 8, 0.1)  # outside the 8 slots
    with pytest.raises(ValueError, match="finite and > 0"):
        config.add_geometry("odd", 1, 0.1, cell_max=float("nan"))
    assert config.geometry_slots == {"par04_siw": 0, "ild": 2, "allegro": 5}  # a refused claim changes nothing
    assert "odd" not in config.geometry_thresholds
    config.keep_geometries(["allegro"])
    assert (config.geometry_slots, config.geometry_thresholds) == ({"allegro": 5}, {"allegro": 0.2})
    # a duplicate slot set by hand is refused when saving, so no model is written that cannot be loaded
    model = CaloDiTModel(preset_config("tiny", geometry_slots={"a": 0}))
    model.config.geometry_slots = {"a": 0, "b": 0}
    with pytest.raises(ValueError, match="need distinct ints"):
        model.save_pretrained(tmp_path / "dup")
    assert not (tmp_path / "dup" / "config.json").exists()
