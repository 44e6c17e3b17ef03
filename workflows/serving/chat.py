"""`llm chat --model REF`: a quick look at what a model answers, in ChatML, with the
conversation so far as context. `thinking` ("think" / "no_think") ends each user turn with
Qwen3's soft switch; `thinking_budget` caps each reply's thinking; earlier replies stay in the
context without their think blocks, as Qwen3 keeps them."""

from __future__ import annotations

from llm_lifecycle.workflows.runner.stage import UserError


class ChatSession:
    def __init__(self, ref: str, system: str | None, temperature: float, top_p: float, max_new_tokens: int,
                 seed: int | None = None, thinking: str = "", thinking_budget: int = 0):
        from llm_lifecycle.models.checkpoint import read_config
        from llm_lifecycle.models.load import load_model
        from llm_lifecycle.workflows.data.chat_data import IM_END, IM_START
        from llm_lifecycle.workflows.engine.model_stage import check_thinking_budget
        from llm_lifecycle.workflows.refs import resolve_model_dir

        model_dir = resolve_model_dir(ref)
        check_thinking_budget(model_dir, thinking_budget, "llm chat --thinking-budget")
        self.model, self.tokenizer = load_model(model_dir)
        if self.tokenizer is None or None in (self.tokenizer.token_to_id(IM_START), self.tokenizer.token_to_id(IM_END)):
            raise UserError(f"{ref}: its tokenizer has no ChatML tokens ({IM_START}, {IM_END}); chat needs a model "
                            "from our sft or rl stages")
        if system is None:  # the prompt the model was fine-tuned with, where its folder records one
            system = read_config(model_dir).get("system_prompt")
        self.messages = [{"role": "system", "content": system}] if system else []
        self.temperature, self.top_p, self.max_new_tokens, self.seed = temperature, top_p, max_new_tokens, seed
        self.thinking, self.thinking_budget = thinking, thinking_budget

    def reply(self, text: str) -> str:
        from llm_lifecycle.models.generate import generate, thinking_budget
        from llm_lifecycle.models.chat_markup import with_thinking_flag, without_thinking
        from llm_lifecycle.workflows.data.chat_data import encode_prompt
        from llm_lifecycle.workflows.rl.verifiable import stop_ids

        self.messages.append({"role": "user", "content": text})
        prompt = encode_prompt(self.tokenizer, with_thinking_flag(self.messages, self.thinking))
        if len(prompt) >= self.model.cfg.max_seq_len:
            raise UserError(f"the conversation ({len(prompt)} tokens) no longer fits the model's "
                            f"{self.model.cfg.max_seq_len}-token context; start a new chat")
        room = min(self.max_new_tokens, self.model.cfg.max_seq_len - len(prompt))
        out = generate(self.model, [prompt], room, self.temperature, self.top_p, stop_ids=stop_ids(self.tokenizer),
                       seed=self.seed, steer=thinking_budget(self.tokenizer, self.thinking_budget))[0]
        answer = self.tokenizer.decode(out)
        self.messages.append({"role": "assistant", "content": without_thinking(answer)})
        return answer
