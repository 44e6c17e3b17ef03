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
