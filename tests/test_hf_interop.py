"""Export to / import from Hugging Face checkpoints, checked against transformers itself."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from llm_lifecycle.models.checkpoint import SPECIAL_TOKENS, save_model_dir  # noqa: E402
from llm_lifecycle.models.config import ModelConfig  # noqa: E402
from llm_lifecycle.models.decoder import Decoder  # noqa: E402
from llm_lifecycle.models.hf import export_hf, import_hf, load_hf  # noqa: E402
from llm_lifecycle.models.presets import list_presets, load_preset  # noqa: E402

BASE = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
LLAMA = dict(BASE, family="llama")
QWEN3_MOE = dict(BASE, family="qwen3_moe", qk_norm=True, tie_embeddings=False, n_experts=4, n_experts_per_token=2,
                 moe_ffn_dim=24, norm_eps=1e-6)
# Plain Llama and Qwen3-MoE are in tests/test_hf_parity.py; these are the RoPE variants and knobs on top.
CASES = {
    "llama-untied-bias-yarn": (
        dict(LLAMA, tie_embeddings=False, qkv_bias=True, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_seq_len": 16}),
        "LlamaForCausalLM",
    ),
    "llama-ntk": (dict(LLAMA, rope_scaling={"type": "ntk", "factor": 3.0}), "LlamaForCausalLM"),
    # Baichuan 2 (7B) is Llama plus NormHead: export folds the row normalisation into the head
    "llama-normhead": (dict(LLAMA, tie_embeddings=False, norm_head=True), "LlamaForCausalLM"),
    # Llama 3.1's rule; a short original context so all three frequency bands occur at head_dim 8
    "llama-llama3": (
        dict(LLAMA, rope_theta=500.0, rope_scaling={"type": "llama3", "factor": 8.0, "original_max_seq_len": 32}),
        "LlamaForCausalLM",
    ),
    "qwen3_moe-linear-unnormed-headdim": (
        dict(QWEN3_MOE, norm_topk_prob=False, head_dim=12, rope_scaling={"type": "linear", "factor": 2.0}),
        "Qwen3MoeForCausalLM",
    ),
}


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + [f"w{i}" for i in range(94)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def random_model(fields: dict) -> Decoder:
    """A random model whose attention depends strongly on position and whose biases are non-zero,
    so a wrong RoPE layout or a dropped bias shows in the logits."""
    torch.manual_seed(0)
    model = Decoder(ModelConfig(**fields)).eval()
    with torch.no_grad():
        for layer in model.layers:
            for name, param in layer.attn.named_parameters():
                if name in ("wq.weight", "wk.weight", "wq_b.weight", "wkv_a.weight"):  # the projections RoPE rotates
                    param.mul_(20)
            for name, param in layer.named_parameters():
                if name.endswith("bias") or name.endswith("norm.weight"):
                    param.add_(0.5 * torch.randn_like(param))
            for name, buffer in layer.named_buffers():
                if name.endswith("score_bias"):
                    buffer.normal_(0.0, 0.1)
    return model


def batch(seq: int = 40) -> torch.Tensor:
    return torch.randint(0, 97, (3, seq), generator=torch.Generator().manual_seed(1))


@pytest.fixture(params=list(CASES), scope="module")
def exported(request, tmp_path_factory):
    fields, architecture = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model = random_model(fields)
    save_model_dir(root / "ours", model, tiny_tokenizer())
    export_hf(root / "ours", root / "hf")
    return model, root / "hf", architecture


def load_transformers(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def test_transformers_loads_the_export_with_matching_logits(exported):
    ours, hf_dir, architecture = exported
    theirs = load_transformers(hf_dir)
    assert type(theirs).__name__ == architecture
    x = batch()
    with torch.no_grad():
        diff = (theirs(x).logits - ours(x).logits).abs().max().item()
    assert diff < 1e-4


def test_import_round_trip_gives_identical_logits(exported):
    ours, hf_dir, _ = exported
    cfg, state = import_hf(hf_dir)
    assert cfg.family == ours.cfg.family
    imported = Decoder(cfg).eval()
    imported.load_state_dict(state)
    x = batch()
    with torch.no_grad():
        assert torch.equal(imported(x).logits, ours(x).logits)


def test_import_of_a_transformers_saved_checkpoint(exported, tmp_path):
    """What transformers itself writes (possibly its fused expert layout) imports too."""
    ours, hf_dir, _ = exported
    load_transformers(hf_dir).save_pretrained(str(tmp_path / "resaved"))
    model, _ = load_hf(tmp_path / "resaved")
    x = batch()
    with torch.no_grad():
        assert (model(x).logits - ours(x).logits).abs().max() < 1e-5


def test_exported_tokenizer_and_chat_template(exported):
    ours, hf_dir, _ = exported
    tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok("w3 w5")["input_ids"] == tiny_tokenizer().encode("w3 w5").ids
    text = tok.apply_chat_template([{"role": "user", "content": "w1"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nw1<|im_end|>\n<|im_start|>assistant\n"
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, 0] and generation["pad_token_id"] == 0


def test_exported_chat_template_renders_tool_turns_and_thinking_as_training_does(exported):
    """transformers' apply_chat_template on the exported template gives the text our SFT trains
    on (chat_data.encode_chat), for Qwen2.5 tool turns and Qwen3 thinking replies alike."""
    from llm_lifecycle.workflows.data.bpe import train_bpe
    from llm_lifecycle.workflows.data.chat_data import encode_chat, encode_prompt

    _, hf_dir, _ = exported
    tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    ours = train_bpe(["weather in Oslo, 3 C"] * 20, vocab_size=300)
    chat = [
        {"role": "system", "content": "You can call get_weather(city)."},
        {"role": "user", "content": "Oslo and Bergen? /no_think"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Bergen"}}}]},
        {"role": "tool", "content": "3 C"},
        {"role": "tool", "content": "5 C"},
        {"role": "user", "content": "Thanks. /think"},
        {"role": "assistant", "content": "<think>\nboth cold\n</think>\n\nBoth are cold."},
    ]
    ids, _ = encode_chat(ours, chat, max_len=100_000)
    assert tok.apply_chat_template(chat, tokenize=False) == ours.decode(ids, skip_special_tokens=False)
    prompt = ours.decode(encode_prompt(ours, chat[:2]), skip_special_tokens=False)
    assert tok.apply_chat_template(chat[:2], add_generation_prompt=True, tokenize=False) == prompt
    no_think = tok.apply_chat_template(chat[:2], add_generation_prompt=True, enable_thinking=False, tokenize=False)
    assert no_think == prompt + "<think>\n\n</think>\n\n"  # Qwen3's hard switch


def test_the_exported_chat_template_opens_with_the_fine_tuning_system_prompt(tmp_path):
    """A model fine-tuned under a system prompt (config.json `system_prompt`, written by sft and
    later stages) exports a template that adds it where a chat brings no system turn, as SFT did:
    quotes, a newline and non-ASCII text stay text."""
    from llm_lifecycle.workflows.data.bpe import train_bpe
    from llm_lifecycle.workflows.data.chat_data import encode_prompt

    system = 'Answer "briefly".\nNo code — 简短.'
    ours = train_bpe(["Answer briefly, hello"] * 20, vocab_size=300)
    save_model_dir(tmp_path / "ours", random_model(LLAMA), ours, extra={"system_prompt": system})
    tok = transformers.AutoTokenizer.from_pretrained(str(export_hf(tmp_path / "ours", tmp_path / "hf")))
    user = [{"role": "user", "content": "hello"}]
    trained = ours.decode(encode_prompt(ours, user, default_system=system), skip_special_tokens=False)
    assert tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False) == trained
    assert trained.startswith(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nhello")
    own = [{"role": "system", "content": "Be terse."}, *user]  # a chat's own system turn replaces it
    assert tok.apply_chat_template(own, add_generation_prompt=True, tokenize=False) == (
        ours.decode(encode_prompt(ours, own), skip_special_tokens=False))


def test_export_rejects_what_the_family_cannot_hold(tmp_path):
    model = random_model(dict(LLAMA, qk_norm=True))
    save_model_dir(tmp_path / "ours", model, tiny_tokenizer())
    with pytest.raises(ValueError, match="exports as LlamaForCausalLM, which cannot hold qk_norm=True"):
        export_hf(tmp_path / "ours", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_import_rejects_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported.*llama, qwen2, qwen3"):
        import_hf(tmp_path)


def test_import_reads_the_fused_expert_layout():
    """transformers 5 holds experts as gate_up_proj [E, 2F, D] and down_proj [E, D, F]."""
    from llm_lifecycle.models.hf import from_hf_state_dict, to_hf_state_dict

    model = random_model(QWEN3_MOE)
    per_expert = to_hf_state_dict(model.cfg, model.state_dict())
    fused = {k: v for k, v in per_expert.items() if ".mlp.experts." not in k}
    for layer in range(model.cfg.n_layers):
        prefix = f"model.layers.{layer}.mlp.experts"
        experts = range(model.cfg.n_experts)
        gate_up = [torch.cat([per_expert[f"{prefix}.{e}.gate_proj.weight"], per_expert[f"{prefix}.{e}.up_proj.weight"]]) for e in experts]
        fused[f"{prefix}.gate_up_proj"] = torch.stack(gate_up)
        fused[f"{prefix}.down_proj"] = torch.stack([per_expert[f"{prefix}.{e}.down_proj.weight"] for e in experts])
    state = from_hf_state_dict(model.cfg, fused)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_import_reads_a_sharded_checkpoint(tmp_path):
    """Large checkpoints come as several safetensors files named by model.safetensors.index.json."""
    ours = random_model(dict(LLAMA, tie_embeddings=False))
    save_model_dir(tmp_path / "ours", ours, tiny_tokenizer())
    export_hf(tmp_path / "ours", tmp_path / "hf")
    load_transformers(tmp_path / "hf").save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    model, _ = load_hf(tmp_path / "sharded")
    x = batch()
    with torch.no_grad():
        assert torch.equal(model(x).logits, ours(x).logits)


# Small presets whose family transformers has no class for, or whose knobs its layout cannot hold.
NO_HF_LAYOUT = {
    "qwen-small": "cannot hold sliding_window=128",  # Qwen 1 is Llama only without LogN and windows
    "chatglm-small": "cannot hold rope_2d=True",  # ChatGLM2/3 (no 2D positions) is transformers' Glm
    "baichuan2-alibi-small": "cannot hold position='alibi'",
    "baichuan-alibi-small": "cannot hold position='alibi'",
    "phi3-small-small": "family 'phi3small' has no transformers layout",  # Phi3SmallForCausalLM is remote code only
}


@pytest.mark.parametrize("name", [p for p in list_presets() if p.endswith("-small")])
def test_every_small_preset_exports_to_transformers_or_says_why(name, tmp_path):
    """Each family row of docs/models.md: the preset's knobs (at 2 layers, vocab 97) either
    export with transformers' logits equal to ours, or are refused with the reason."""
    fields = {**load_preset(name), "vocab_size": 97, "n_layers": 2, "max_seq_len": 64}
    fields["n_dense_layers"] = min(fields.get("n_dense_layers", 0), 1)
    if isinstance(fields.get("sliding_window"), list):  # one window per layer kept: local, then global (Gemma 2)
        fields["sliding_window"] = [16, None]
    model = random_model(fields)
    save_model_dir(tmp_path / "ours", model, tiny_tokenizer())
    if name in NO_HF_LAYOUT:
        with pytest.raises(ValueError, match=NO_HF_LAYOUT[name]):
            export_hf(tmp_path / "ours", tmp_path / "hf")
        return
    export_hf(tmp_path / "ours", tmp_path / "hf")
    x = batch(24)
    with torch.no_grad():
        assert (load_transformers(tmp_path / "hf")(x).logits - model(x).logits).abs().max() < 1e-4


def test_a_rope_scaling_the_family_cannot_hold_is_refused_not_dropped():
    """Phi-3's config reads a yarn entry as LongRoPE (and then wants its factor lists); no
    config but Phi-3's holds LongRoPE's lists: both are refused, so export falls back to ours."""
    from llm_lifecycle.models.hf import check_exportable

    yarn = {"type": "yarn", "factor": 2.0, "original_max_seq_len": 64}
    longrope = {"type": "longrope", "factor": 2.0, "original_max_seq_len": 64, "short_factor": [1.0] * 8,
                "long_factor": [2.0] * 8}
    phi3 = ModelConfig.from_dict({**load_preset("phi3-mini-small"), "rope_scaling": yarn})
    with pytest.raises(ValueError, match="Phi3ForCausalLM, which cannot hold rope_scaling type 'yarn'"):
        check_exportable(phi3)
    llama = ModelConfig.from_dict({**load_preset("llama1-small"), "head_dim": 16, "rope_scaling": longrope})
    llama.validate()
    with pytest.raises(ValueError, match="cannot hold rope_scaling type 'longrope'"):
        check_exportable(llama)
    assert check_exportable(ModelConfig.from_dict({**load_preset("llama1-small"), "rope_scaling": yarn}))


@pytest.mark.parametrize("kind", ["su", "longrope", "yarn"])
def test_phi3_longrope_configs_of_each_spelling_import_as_longrope(kind):
    """Phi-3-mini-128k's first config says "su", Phi-3.5's "longrope", and Phi-3 reads "yarn"
    as LongRoPE too; none gives a factor: it is max_position_embeddings / original."""
    from llm_lifecycle.models.hf import config_from_hf

    short, long = [1.0, 1.1, 1.2, 1.3], [1.0, 2.0, 4.0, 8.0]
    hf = {"model_type": "phi3", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
          "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 4096,
          "original_max_position_embeddings": 512, "rms_norm_eps": 1e-5, "hidden_act": "silu",
          "rope_scaling": {"type": kind, "short_factor": short, "long_factor": long}}
    scaling = config_from_hf(hf).rope_scaling
    assert scaling == {"type": "longrope", "factor": 8.0, "original_max_seq_len": 512, "short_factor": short,
                       "long_factor": long}
    with pytest.raises(ValueError, match="given attention_factor"):
        config_from_hf({**hf, "rope_scaling": {**hf["rope_scaling"], "attention_factor": 1.5}})
