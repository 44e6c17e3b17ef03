"""The MLflow pyfunc flavour of our models: `predict(["prompt", ...])` returns generated text.

params (all optional; PARAMS holds the defaults, which the logged signature declares):
max_new_tokens, temperature, top_p, and thinking_budget (at most this many tokens inside a
generated <think> block, then </think> is forced; 0: no limit)."""

from __future__ import annotations

import mlflow.pyfunc
import pandas as pd

PARAMS = {"max_new_tokens": 32, "temperature": 0.0, "top_p": 1.0, "thinking_budget": 0}


def _prompts(model_input) -> list[str]:
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "iloc"):  # a pandas DataFrame or Series
        column = model_input.iloc[:, 0] if model_input.ndim == 2 else model_input
        return [str(x) for x in column.tolist()]
    return [str(x) for x in model_input]


class TextGenerationModel(mlflow.pyfunc.PythonModel):
    """Greedy (or sampled, via params) continuation of each prompt.

    `predict`'s input is typed as what MLflow hands it under the logged signature (strings in,
    strings out, with PARAMS): a one-column DataFrame. MLflow checks the type hint when the
    class is defined; without one it warns, and a `list[str]` hint would make MLflow build the
    signature from the hint, dropping the declared params."""

    def load_context(self, context) -> None:
        from llm_lifecycle.models.load import load_model

        self.model, self.tokenizer = load_model(context.artifacts["model_dir"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        import torch

        from llm_lifecycle.models.generate import generate, thinking_budget

        params = {**PARAMS, **(params or {})}
        prompts = [self.tokenizer.encode(p).ids for p in _prompts(model_input)]
        stop = [i for i in (self.tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|im_end|>")) if i is not None]
        with torch.no_grad():
            outputs = generate(
                self.model,
                prompts,
                max_new_tokens=int(params["max_new_tokens"]),
                temperature=float(params["temperature"]),
                top_p=float(params["top_p"]),
                stop_ids=stop,
                steer=thinking_budget(self.tokenizer, int(params["thinking_budget"])),
            )
        return [self.tokenizer.decode(ids) for ids in outputs]
