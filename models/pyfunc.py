"""The MLflow pyfunc flavour of our models: `predict(["prompt", ...])` returns generated text."""

from __future__ import annotations

import mlflow.pyfunc


def _prompts(model_input) -> list[str]:
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "iloc"):  # a pandas DataFrame or Series
        column = model_input.iloc[:, 0] if model_input.ndim == 2 else model_input
        return [str(x) for x in column.tolist()]
    return [str(x) for x in model_input]


class TextGenerationModel(mlflow.pyfunc.PythonModel):
    """Greedy (or sampled, via params) continuation of each prompt."""

    def load_context(self, context) -> None:
        from llm_lifecycle.models.load import load_model

        self.model, self.tokenizer = load_model(context.artifacts["model_dir"])

    def predict(self, context, model_input, params: dict | None = None) -> list[str]:
        import torch

        from llm_lifecycle.models.generate import generate

        params = params or {}
        prompts = [self.tokenizer.encode(p).ids for p in _prompts(model_input)]
        stop = [i for i in (self.tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|im_end|>")) if i is not None]
        with torch.no_grad():
            outputs = generate(
                self.model,
                prompts,
                max_new_tokens=int(params.get("max_new_tokens", 32)),
                temperature=float(params.get("temperature", 0.0)),
                top_p=float(params.get("top_p", 1.0)),
                stop_ids=stop,
            )
        return [self.tokenizer.decode(ids) for ids in outputs]
