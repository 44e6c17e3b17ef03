"""Remote-code checkpoints (Qwen 1, Baichuan 2, ChatGLM3, InternLM2) import through our own
mapping, never their code.

Each test builds a checkpoint in the family's published layout (the hub repos' key names,
fused tensors, shapes and config.json keys) from a random transformers model that computes
the same function: Qwen2 with multi-head attention is Qwen 1 below its training length, Llama
is Baichuan 2 7B (with the head's rows normalised: NormHead) and InternLM2, transformers' Glm
is ChatGLM3. The imported model's logits must match that model's.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import save_file
from test_hf_parity import max_diff, prompts, random_hf_model, tiny_tokenizer

from llm_lifecycle.models.hf import load_hf

HEADS, KV_HEADS, HEAD_DIM, DIM, LAYERS = 4, 2, 16, 64, 2


def hf_tensors(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def write_checkpoint(folder, config: dict, tensors: dict[str, torch.Tensor]):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    tiny_tokenizer().save(str(folder / "tokenizer.json"))
    return folder


def per_layer(theirs: dict[str, torch.Tensor], i: int, prefix: str = "model.layers") -> dict[str, torch.Tensor]:
    return {k.removeprefix(f"{prefix}.{i}."): v for k, v in theirs.items() if k.startswith(f"{prefix}.{i}.")}


def qwen1_checkpoint(folder):
    """QWenLMHeadModel: transformer.h.{i}.attn.c_attn = [q; k; v] with bias, mlp.w1 (up), w2 (gate)."""
    ref = random_hf_model("qwen2", num_key_value_heads=HEADS, rope_theta=50000.0)
    t = hf_tensors(ref)
    out = {"transformer.wte.weight": t["model.embed_tokens.weight"], "transformer.ln_f.weight": t["model.norm.weight"],
           "lm_head.weight": t["lm_head.weight"]}
    for i in range(LAYERS):
        layer, p = per_layer(t, i), f"transformer.h.{i}."
        out |= {
            p + "ln_1.weight": layer["input_layernorm.weight"], p + "ln_2.weight": layer["post_attention_layernorm.weight"],
            p + "attn.c_attn.weight": torch.cat([layer[f"self_attn.{x}_proj.weight"] for x in "qkv"]),
            p + "attn.c_attn.bias": torch.cat([layer[f"self_attn.{x}_proj.bias"] for x in "qkv"]),
            p + "attn.c_proj.weight": layer["self_attn.o_proj.weight"],
            p + "mlp.w1.weight": layer["mlp.up_proj.weight"], p + "mlp.w2.weight": layer["mlp.gate_proj.weight"],
            p + "mlp.c_proj.weight": layer["mlp.down_proj.weight"],
        }
    config = {
        "architectures": ["QWenLMHeadModel"], "model_type": "qwen", "auto_map": {"AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        "vocab_size": 128, "hidden_size": DIM, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "kv_channels": HEAD_DIM, "intermediate_size": 2 * 96, "layer_norm_epsilon": ref.config.rms_norm_eps,
        "rotary_emb_base": 50000, "rotary_pct": 1.0, "seq_length": 64, "max_position_embeddings": 128,
        "use_logn_attn": True, "use_dynamic_ntk": True, "no_bias": True, "tie_word_embeddings": False,
    }
    return ref, write_checkpoint(folder, config, out)


def baichuan2_checkpoint(folder):
    """Baichuan2-7B: model.layers.{i}.self_attn.W_pack = [q; k; v]; NormHead normalises lm_head's rows."""
    ref = random_hf_model("llama", num_key_value_heads=HEADS, attention_bias=False, tie_word_embeddings=False)
    t = hf_tensors(ref)
    out = {k: v for k, v in t.items() if not any(f"self_attn.{x}_proj" in k for x in "qkv")}
    for i in range(LAYERS):
        out[f"model.layers.{i}.self_attn.W_pack.weight"] = torch.cat(
            [t[f"model.layers.{i}.self_attn.{x}_proj.weight"] for x in "qkv"])
    out["lm_head.weight"] = 3.0 * t["lm_head.weight"]  # stored unnormalised
    with torch.no_grad():
        ref.lm_head.weight.copy_(torch.nn.functional.normalize(t["lm_head.weight"], dim=-1))
    config = {
        "architectures": ["BaichuanForCausalLM"], "model_type": "baichuan", "hidden_act": "silu",
        "vocab_size": 128, "hidden_size": DIM, "intermediate_size": 96, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "max_position_embeddings": 128, "model_max_length": 128,
        "rms_norm_eps": ref.config.rms_norm_eps, "tie_word_embeddings": False, "z_loss_weight": 0,
    }
    return ref, write_checkpoint(folder, config, out)


def chatglm3_checkpoint(folder):
    """ChatGLMForConditionalGeneration: transformer.encoder.layers.{i}.self_attention.query_key_value
    = [q; k; v] (grouped keys/values, bias), mlp.dense_h_to_4h = [gate; up], RoPE buffer saved."""
    ref = random_hf_model("glm", rope_theta=20000.0)
    t = hf_tensors(ref)
    out = {
        "transformer.embedding.word_embeddings.weight": t["model.embed_tokens.weight"],
        "transformer.rotary_pos_emb.inv_freq": torch.rand(HEAD_DIM // 4),
        "transformer.encoder.final_layernorm.weight": t["model.norm.weight"],
        "transformer.output_layer.weight": t["lm_head.weight"],
    }
    for i in range(LAYERS):
        layer, p = per_layer(t, i), f"transformer.encoder.layers.{i}."
        out |= {
            p + "input_layernorm.weight": layer["input_layernorm.weight"],
            p + "post_attention_layernorm.weight": layer["post_attention_layernorm.weight"],
            p + "self_attention.query_key_value.weight": torch.cat([layer[f"self_attn.{x}_proj.weight"] for x in "qkv"]),
            p + "self_attention.query_key_value.bias": torch.cat([layer[f"self_attn.{x}_proj.bias"] for x in "qkv"]),
            p + "self_attention.dense.weight": layer["self_attn.o_proj.weight"],
            p + "mlp.dense_h_to_4h.weight": layer["mlp.gate_up_proj.weight"],
            p + "mlp.dense_4h_to_h.weight": layer["mlp.down_proj.weight"],
        }
    config = {
        "architectures": ["ChatGLMModel"], "model_type": "chatglm", "padded_vocab_size": 128, "hidden_size": DIM,
        "num_layers": LAYERS, "num_attention_heads": HEADS, "kv_channels": HEAD_DIM, "ffn_hidden_size": 96,
        "seq_length": 128, "layernorm_epsilon": ref.config.rms_norm_eps, "multi_query_attention": True,
        "multi_query_group_num": KV_HEADS, "add_qkv_bias": True, "add_bias_linear": False, "rmsnorm": True,
        "apply_residual_connection_post_layernorm": False, "post_layer_norm": True, "original_rope": True,
        "rope_ratio": 2, "tie_word_embeddings": False,
    }
    return ref, write_checkpoint(folder, config, out)


def internlm2_checkpoint(folder):
    """InternLM2ForCausalLM: attention.wqkv grouped per key/value head, feed_forward.w1/w3/w2, output."""
    ref = random_hf_model("llama", attention_bias=False, tie_word_embeddings=False)
    t = hf_tensors(ref)
    group = HEADS // KV_HEADS
    out = {"model.tok_embeddings.weight": t["model.embed_tokens.weight"], "model.norm.weight": t["model.norm.weight"],
           "output.weight": t["lm_head.weight"]}
    for i in range(LAYERS):
        layer, p = per_layer(t, i), f"model.layers.{i}."
        q = layer["self_attn.q_proj.weight"].view(KV_HEADS, group, HEAD_DIM, DIM)
        k, v = (layer[f"self_attn.{x}_proj.weight"].view(KV_HEADS, 1, HEAD_DIM, DIM) for x in "kv")
        out |= {
            p + "attention_norm.weight": layer["input_layernorm.weight"], p + "ffn_norm.weight": layer["post_attention_layernorm.weight"],
            p + "attention.wqkv.weight": torch.cat([q, k, v], dim=1).reshape(-1, DIM),
            p + "attention.wo.weight": layer["self_attn.o_proj.weight"],
            p + "feed_forward.w1.weight": layer["mlp.gate_proj.weight"], p + "feed_forward.w3.weight": layer["mlp.up_proj.weight"],
            p + "feed_forward.w2.weight": layer["mlp.down_proj.weight"],
        }
    config = {
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "vocab_size": 128, "hidden_size": DIM,
        "intermediate_size": 96, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "hidden_act": "silu", "rms_norm_eps": ref.config.rms_norm_eps,
        "rope_theta": 10000, "max_position_embeddings": 128,
        "bias": False, "tie_word_embeddings": False,
    }
    return ref, write_checkpoint(folder, config, out)


CHECKPOINTS = {"qwen": qwen1_checkpoint, "baichuan": baichuan2_checkpoint, "chatglm": chatglm3_checkpoint,
               "internlm2": internlm2_checkpoint}


# ---- Phi-3-small: no transformers class computes it, so the test writes its forward out --------

PHI3SMALL_CONFIG = {
    "architectures": ["Phi3SmallForCausalLM"], "model_type": "phi3small",
    "auto_map": {"AutoModelForCausalLM": "modeling_phi3_small.Phi3SmallForCausalLM"},
    "vocab_size": 128, "hidden_size": DIM, "num_hidden_layers": 4, "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS, "ff_intermediate_size": 96, "hidden_act": "gegelu", "gegelu_limit": 1.0,
    "gegelu_pad_to_256": True, "layer_norm_epsilon": 1e-5, "max_position_embeddings": 128,
    "rope_embedding_base": 1000000, "rope_position_scale": 1.0, "blocksparse_block_size": 4,
    "blocksparse_homo_head_pattern": False, "blocksparse_num_local_blocks": 2, "blocksparse_vert_stride": 3,
    "blocksparse_triton_kernel_block_size": 64, "dense_attention_every_n_layers": 2, "mup_use_scaling": True,
    "mup_attn_multiplier": 2.0, "mup_embedding_multiplier": 10.0, "mup_width_multiplier": 8.0,
    "attention_bias": False,  # read by nothing: the modeling file's projections all have biases
}


def phi3small_tensors(config: dict) -> dict[str, torch.Tensor]:
    """Random tensors in Phi3SmallForCausalLM's layout: query_key_value grouped per key/value
    head [q heads of the group; k; v] with bias, up_proj with the GeGeLU halves interleaved
    (even rows gate, odd rows linear) and bias, dense/down_proj with bias, LayerNorms with
    bias, no lm_head (tied to embed_tokens), a saved RoPE buffer."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, std=0.2):
        return torch.randn(*shape, generator=gen) * std

    dim, ffn = config["hidden_size"], config["ff_intermediate_size"]
    qkv = (config["num_attention_heads"] + 2 * config["num_key_value_heads"]) * HEAD_DIM
    out = {"model.embed_tokens.weight": rand(config["vocab_size"], dim, std=1.0),
           "model.final_layernorm.weight": 1 + rand(dim), "model.final_layernorm.bias": rand(dim)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out |= {
            p + "input_layernorm.weight": 1 + rand(dim), p + "input_layernorm.bias": rand(dim),
            p + "post_attention_layernorm.weight": 1 + rand(dim), p + "post_attention_layernorm.bias": rand(dim),
            p + "self_attn.query_key_value.weight": rand(qkv, dim), p + "self_attn.query_key_value.bias": rand(qkv),
            p + "self_attn.dense.weight": rand(dim, dim), p + "self_attn.dense.bias": rand(dim),
            p + "self_attn.rotary_emb.inv_freq": torch.rand(HEAD_DIM // 2),
            p + "mlp.up_proj.weight": rand(2 * ffn, dim), p + "mlp.up_proj.bias": rand(2 * ffn),
            p + "mlp.down_proj.weight": rand(dim, ffn), p + "mlp.down_proj.bias": rand(dim),
        }
    return out


def phi3small_visible(config: dict, layer: int, seq: int) -> torch.Tensor:
    """Bool [heads, T, T]: which keys each head's queries see in this layer, pair by pair."""
    heads, size = config["num_attention_heads"], config["blocksparse_block_size"]
    local, stride = config["blocksparse_num_local_blocks"], config["blocksparse_vert_stride"]
    dense = (layer + 1) % config["dense_attention_every_n_layers"] == 0
    visible = torch.zeros(heads, seq, seq, dtype=torch.bool)
    for h in range(heads):
        for q in range(seq):
            for k in range(q + 1):
                near = q // size - k // size < local
                stripe = (k // size + h * max(1, stride // heads) + 1) % stride == 0
                visible[h, q, k] = dense or near or stripe
    return visible


def phi3small_logits(config: dict, t: dict[str, torch.Tensor], ids: torch.Tensor, sparse: bool = True) -> torch.Tensor:
    """Phi3SmallForCausalLM's forward written out from its published formulas."""
    heads, kv_heads, dim = config["num_attention_heads"], config["num_key_value_heads"], config["hidden_size"]
    group, limit, eps = heads // kv_heads, config["gegelu_limit"], config["layer_norm_epsilon"]
    batch, seq = ids.shape
    inv_freq = 1.0 / config["rope_embedding_base"] ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    mscale, scaling = 1.0, config.get("rope_scaling")
    if scaling:  # 128k LongRoPE: per-frequency factors and a cos/sin scale, the long ones past the original length
        kind = "long" if seq > scaling["original_max_position_embeddings"] else "short"
        inv_freq, mscale = inv_freq / torch.tensor(scaling[f"{kind}_factor"]), scaling[f"{kind}_mscale"]
    angles = torch.arange(seq).float()[:, None] * inv_freq
    cos, sin = torch.cat((angles, angles), -1).cos() * mscale, torch.cat((angles, angles), -1).sin() * mscale

    def rope(x):  # rotate-half over the whole head
        return x * cos + torch.cat((-x[..., HEAD_DIM // 2 :], x[..., : HEAD_DIM // 2]), -1) * sin

    def norm(x, name):
        return torch.nn.functional.layer_norm(x, (dim,), t[name + ".weight"], t[name + ".bias"], eps)

    def linear(x, name):
        return x @ t[name + ".weight"].T + t[name + ".bias"]

    x = t["model.embed_tokens.weight"][ids] * config["mup_embedding_multiplier"]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        groups = linear(norm(x, p + "input_layernorm"), p + "self_attn.query_key_value").view(
            batch, seq, kv_heads, group + 2, HEAD_DIM)
        q = rope(groups[:, :, :, :group].reshape(batch, seq, heads, HEAD_DIM).transpose(1, 2))
        k = rope(groups[:, :, :, group].transpose(1, 2)).repeat_interleave(group, 1)
        v = groups[:, :, :, group + 1].transpose(1, 2).repeat_interleave(group, 1)
        scores = q @ k.transpose(-1, -2) * (config["mup_attn_multiplier"] / HEAD_DIM)
        visible = phi3small_visible(config if sparse else {**config, "dense_attention_every_n_layers": 1}, i, seq)
        attn = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) @ v
        x = x + linear(attn.transpose(1, 2).reshape(batch, seq, dim), p + "self_attn.dense")
        up = linear(norm(x, p + "post_attention_layernorm"), p + "mlp.up_proj")
        gate, lin = up[..., 0::2].clamp(max=limit), up[..., 1::2].clamp(-limit, limit)
        x = x + linear(gate * torch.sigmoid(1.702 * gate) * (lin + 1), p + "mlp.down_proj")
    x = norm(x, "model.final_layernorm")
    return x @ t["model.embed_tokens.weight"].T / config["mup_width_multiplier"]


def test_phi3_small_checkpoint_imports_with_its_published_forward(tmp_path):
    from llm_lifecycle.models.generate import generate

    tensors = phi3small_tensors(PHI3SMALL_CONFIG)
    folder = write_checkpoint(tmp_path / "phi3small", PHI3SMALL_CONFIG, tensors)
    ours, _ = load_hf(folder)
    cfg = ours.cfg
    assert (cfg.family, cfg.mlp, cfg.norm, cfg.ffn_dim, cfg.tie_embeddings) == ("phi3small", "gegelu", "layernorm", 96, True)
    assert (cfg.blocksparse_block_size, cfg.blocksparse_local_blocks, cfg.blocksparse_vert_stride) == (4, 2, 3)
    assert ours.mask_keys == ["block_sparse", None, "block_sparse", None]
    assert (cfg.query_pre_attn_scalar, cfg.embedding_multiplier, cfg.logit_divisor) == ((HEAD_DIM / 2) ** 2, 10.0, 8.0)
    x = prompts()  # 40 tokens: 10 blocks of 4
    with torch.no_grad():
        expected = phi3small_logits(PHI3SMALL_CONFIG, tensors, x)
        assert expected.std() > 0.5
        assert max_diff(expected, phi3small_logits(PHI3SMALL_CONFIG, tensors, x, sparse=False)) > 0.1  # sparsity shows
        assert max_diff(ours(x).logits, expected) < 1e-4
        # greedy decoding through the KV cache follows the written-out forward
        prompt, ids = x[0, :30].tolist(), x[0, :30].tolist()
        for _ in range(8):
            ids.append(int(phi3small_logits(PHI3SMALL_CONFIG, tensors, torch.tensor([ids]))[0, -1].argmax()))
        assert generate(ours, [prompt], 8) == [ids[30:]]


def test_phi3_small_128k_longrope_imports_with_its_short_and_long_scales(tmp_path):
    """Phi-3-small-128k: LongRoPE ({type: su}) with its own cos/sin scale for the short and the
    long factors; within the original length (16 here) the short ones, past it the long ones."""
    config = {**PHI3SMALL_CONFIG, "max_position_embeddings": 128, "rope_embedding_base": 10000, "rope_scaling": {
        "type": "su", "original_max_position_embeddings": 16, "short_mscale": 1.1, "long_mscale": 1.3,
        "short_factor": [1.0, 1.0, 1.1, 1.2, 1.3, 1.5, 1.8, 2.0], "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 8.0]}}
    tensors = phi3small_tensors(config)
    ours, _ = load_hf(write_checkpoint(tmp_path / "phi3small128k", config, tensors))
    assert ours.cfg.rope_scaling == {"type": "longrope", "factor": 8.0, "original_max_seq_len": 16, "short_mscale": 1.1,
                                     "long_mscale": 1.3, "short_factor": config["rope_scaling"]["short_factor"],
                                     "long_factor": config["rope_scaling"]["long_factor"]}
    with torch.no_grad():
        for x in (prompts()[:, :12], prompts()):  # 12 tokens: short factors; 40: long
            expected = phi3small_logits(config, tensors, x)
            assert max_diff(ours(x).logits, expected) < 1e-4
            assert max_diff(expected, phi3small_logits(PHI3SMALL_CONFIG | {"rope_embedding_base": 10000}, tensors, x)) > 0.1


def test_phi3_small_has_no_transformers_or_llama_cpp_layout(tmp_path):
    """Phi3SmallForCausalLM exists only as remote code and llama.cpp has no phi3small
    architecture: export refuses in one line each; the auto export keeps our format."""
    from llm_lifecycle.models.checkpoint import save_model_dir
    from llm_lifecycle.models.gguf import gguf_arch
    from llm_lifecycle.models.hf import export_hf

    tensors = phi3small_tensors(PHI3SMALL_CONFIG)
    ours, tokenizer = load_hf(write_checkpoint(tmp_path / "p", PHI3SMALL_CONFIG, tensors))
    save_model_dir(tmp_path / "ours", ours, tokenizer)
    with pytest.raises(ValueError, match="family 'phi3small' has no transformers layout"):
        export_hf(tmp_path / "ours", tmp_path / "exported")
    with pytest.raises(ValueError, match="family 'phi3small' has no llama.cpp architecture"):
        gguf_arch(ours.cfg)
    folder = write_checkpoint(tmp_path / "yarn", {**PHI3SMALL_CONFIG, "rope_scaling": {"type": "yarn"}}, tensors)
    with pytest.raises(ValueError, match="Phi-3-small RoPE scaling 'yarn' is not supported"):
        load_hf(folder)
    # LongRoPE with its own short/long cos/sin scales has no layout in transformers' Phi3 either
    from llm_lifecycle.models.config import ModelConfig
    from llm_lifecycle.models.hf import check_exportable
    from llm_lifecycle.models.presets import load_preset

    longrope = {"type": "longrope", "factor": 2.0, "original_max_seq_len": 64, "short_factor": [1.0] * 16,
                "long_factor": [2.0] * 16, "short_mscale": 1.0, "long_mscale": 1.2}
    phi3 = ModelConfig.from_dict({**load_preset("phi3-mini-small"), "rope_scaling": longrope})
    with pytest.raises(ValueError, match="whose LongRoPE cannot hold rope_scaling long_mscale and short_mscale"):
        check_exportable(phi3)


@pytest.mark.parametrize("family", list(CHECKPOINTS))
def test_remote_code_checkpoint_imports_with_the_reference_logits(tmp_path, family):
    ref, folder = CHECKPOINTS[family](tmp_path / family)
    ours, tokenizer = load_hf(folder)
    assert ours.cfg.family == family
    assert tokenizer.encode("w3 w5").ids == tiny_tokenizer().encode("w3 w5").ids
    x = prompts()  # 40 tokens: inside Qwen's training length, where LogN has not started
    with torch.no_grad():
        expected = ref(x).logits
        assert expected.std() > 0.5
        assert max_diff(ours(x).logits, expected) < 1e-4


def test_remote_code_configs_carry_their_family_knobs(tmp_path):
    qwen = load_hf(qwen1_checkpoint(tmp_path / "qwen")[1])[0].cfg
    assert (qwen.logn_train_len, qwen.ffn_dim, qwen.qkv_bias, qwen.o_bias, qwen.rope_theta) == (64, 96, True, False, 50000.0)
    baichuan = load_hf(baichuan2_checkpoint(tmp_path / "baichuan")[1])[0].cfg
    assert (baichuan.position, baichuan.norm_head) == ("rope", True)
    chatglm = load_hf(chatglm3_checkpoint(tmp_path / "chatglm")[1])[0].cfg
    assert (chatglm.n_kv_heads, chatglm.rotary_pct, chatglm.rope_theta, chatglm.rope_2d) == (KV_HEADS, 0.5, 20000.0, False)
    folder = internlm2_checkpoint(tmp_path / "internlm2")[1]
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "rope_scaling": {"type": "dynamic", "factor": 2.0}}))
    internlm2 = load_hf(folder)[0].cfg  # internlm2_5-7b-chat-1m's scaling: ours, past the original length
    assert internlm2.rope_scaling == {"type": "dynamic", "factor": 2.0, "original_max_seq_len": 128}


def test_baichuan_13b_layouts_import_as_alibi(tmp_path):
    """Baichuan2-13B's config has no max_position_embeddings (its modeling file uses ALiBi);
    Baichuan-13B (version 1) has no z_loss_weight either, and no NormHead."""
    _, folder = baichuan2_checkpoint(tmp_path / "b")
    config = json.loads((folder / "config.json").read_text())
    del config["max_position_embeddings"]
    (folder / "config.json").write_text(json.dumps(config))
    model, _ = load_hf(folder)
    assert (model.cfg.position, model.cfg.rotary_dim, model.cfg.max_seq_len, model.cfg.norm_head) == ("alibi", 0, 128, True)
    del config["z_loss_weight"]
    (folder / "config.json").write_text(json.dumps(config))
    assert not load_hf(folder)[0].cfg.norm_head


def test_unsupported_remote_layouts_are_refused_in_one_line(tmp_path):
    _, folder = chatglm3_checkpoint(tmp_path / "glm")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "add_bias_linear": True}))
    with pytest.raises(ValueError, match="add_bias_linear=True"):
        load_hf(folder)
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}))
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="tokenizer is remote code"):
        load_hf(folder)


@pytest.mark.parametrize("family", ["baichuan", "chatglm", "internlm2"])
def test_imported_remote_code_model_exports_to_the_transformers_class_that_computes_it(tmp_path, family):
    """Baichuan 2 7B and InternLM2 export as Llama, ChatGLM3 as Glm: transformers loads them
    without remote code and computes our logits."""
    from llm_lifecycle.models.checkpoint import save_model_dir
    from llm_lifecycle.models.hf import export_hf

    ref, folder = CHECKPOINTS[family](tmp_path / family)
    ours, tokenizer = load_hf(folder)
    save_model_dir(tmp_path / "ours", ours, tokenizer)
    export_hf(tmp_path / "ours", tmp_path / "exported")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "exported"), dtype=torch.float32).eval()
    assert type(theirs).__name__ == {"chatglm": "GlmForCausalLM"}.get(family, "LlamaForCausalLM")
    with torch.no_grad():
        assert max_diff(theirs(prompts()).logits, ref(prompts()).logits) < 1e-4


def test_qwen1_with_logn_is_refused_by_transformers_export_with_the_reason(tmp_path):
    from llm_lifecycle.models.checkpoint import save_model_dir
    from llm_lifecycle.models.hf import export_hf

    ours, tokenizer = load_hf(qwen1_checkpoint(tmp_path / "qwen")[1])
    save_model_dir(tmp_path / "ours", ours, tokenizer)
    with pytest.raises(ValueError, match="cannot hold logn_train_len=64"):
        export_hf(tmp_path / "ours", tmp_path / "exported")
