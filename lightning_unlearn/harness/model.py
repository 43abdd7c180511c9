"""The combined (offset, composed, LoRA or direct) model as an lm-evaluation-harness ``LM``.

lm-evaluation-harness asks a model three things (``lm_eval.api.model.LM``): the log-likelihood of a continuation
given a context, the rolling log-likelihood of a whole text (perplexity), and greedy generations that stop at
``until`` strings. :class:`UnlearnedLM` answers them from the combined logits of the unlearned model,
``z = z_L + sum_i alpha_i (z_S_i - z_S0)`` (delta-unlearning, Huang et al., TMLR 2025; ``z_S`` alone for a direct
model): each request's log-probabilities are ``log_softmax(z)`` of that one logit tensor, never a mix of the
models' separate probabilities, and every model runs once per batch.

Tokenization, truncation, batching and the order of work follow lm-eval's own Hugging Face model
(``lm_eval.models.huggingface.HFLM``), so that on a direct model the two give the same numbers: contexts and
continuations are encoded together and split (``TemplateLM._encode_pair``), requests are sorted longest first
by lm-eval's ``Collator`` and right-padded into batches, and multiple-choice requests whose continuations are
one token share one forward pass.

Where ``hf`` gives a wrong or no number, this wrapper does not follow it: rolling log-likelihoods (perplexity) of a
tokenizer that adds BOS condition the text on one BOS instead of scoring ``log p(BOS | BOS)`` too
(lm-evaluation-harness issue #3333), a continuation longer than ``max_length`` is refused naming both lengths
(``hf`` fails an ``assert``), and a log-likelihood that is not finite is counted (``non_finite_requests``) so that
the evaluation reports its metrics as NaN instead of letting lm-eval's ``argmax`` count a NaN choice as chosen.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..models.files import looks_local
from ..offset.generation import StopFn
from ..offset.sources import ServedLargeModel, check_served_context
from ..deploy.manifest import compose
from ..numbers import finite
from ..deploy.unlearned import UnlearnedModel

__all__ = ["CombinedLM", "UnlearnedLM", "max_context_length", "model_description"]

LLRequest = tuple[tuple[str, str] | None, list[int], list[int]]

DEFAULT_MAX_LENGTH = 2048

log = logging.getLogger(__name__)


class CombinedLM(Protocol):
    """What :class:`UnlearnedLM` needs of a model: :class:`~lightning_unlearn.deploy.unlearned.UnlearnedModel`
    has it, and so has the training module through :class:`~lightning_unlearn.harness.hooks.ModuleLM`."""

    tokenizer: PreTrainedTokenizerBase
    stop_ids: list[int]

    @property
    def device(self) -> torch.device: ...

    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Combined next-token logits ``[B, T, V]``, float32, over the tokenizer's vocabulary."""
        ...

    def generate_ids(self, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int,
                     stop: StopFn | None = None) -> Tensor:
        """Greedy new tokens ``[B, n]`` of a left-padded batch, ending at a stop id (kept) or when ``stop`` says."""
        ...

    def modules(self) -> Any: ...


def max_context_length(model: CombinedLM) -> int:
    """The shortest context any component accepts (``max_position_embeddings`` or ``n_positions``; a served large
    model's ``max_model_len`` less the one token each request asks), else 2048."""
    lengths = []
    for module in model.modules():
        if isinstance(module, ServedLargeModel):  # its server refuses longer requests, mid-evaluation
            served = module.max_model_len()
            lengths += [served - 1] if served else []
        elif isinstance(module, PreTrainedModel):
            config = module.config
            length = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
            if length:
                lengths.append(int(length))
    return min(lengths, default=DEFAULT_MAX_LENGTH)


@register_model("unlearned")
class UnlearnedLM(TemplateLM):
    """lm-eval's ``LM`` over an unlearned model; ``lm_eval --model unlearned --model_args pretrained=EXPORT``.

    Args:
        pretrained: an export directory (offset, LoRA or direct), a ``composition.json``, any Hugging Face causal
            LM directory or id, or a list of offset exports to compose; ignored when ``model`` is given.
        model: an already built model (an ``UnlearnedModel`` or the training module's adapter).
        alpha: offset strength replacing the manifests' (one for every offset, or one per offset).
        batch_size: requests per forward pass (lm-eval's ``--batch_size``; an int, ``"auto"`` is not supported).
        max_length: longest context + continuation in tokens, longer ones are cut from the left as lm-eval's
            ``hf`` model does; ``None`` reads it from the models' configs.
        max_gen_toks: generated tokens per request unless the task sets ``max_gen_toks``.
        add_bos_token: as lm-eval's ``hf`` model: ``None`` lets the tokenizer decide.
        device: where the models run.
        large_model: where an offset export's large model is now, if it moved since training.
        reference_model: likewise for the frozen small reference.
        large_dtype: dtype of the large model (``None``: the one the export records, training's).
        small_dtype: dtype of the small models (``None``: the one the export records, training's).
        lm_eval_options: options lm-eval passes every model (``max_batch_size``, ...), not used here.

    Raises:
        ValueError: neither ``pretrained`` nor ``model``, or ``batch_size`` is not a positive int.
        FileNotFoundError: an export, or the large or reference model it names, is missing.
    """

    def __init__(
        self,
        pretrained: str | Sequence[str] | None = None,
        model: CombinedLM | None = None,
        alpha: float | Sequence[float] | None = None,
        batch_size: int | str = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool | None = None,
        device: str = "cpu",
        large_model: str | None = None,
        reference_model: str | None = None,
        large_dtype: str | None = None,
        small_dtype: str | None = None,
        **lm_eval_options: Any,
    ) -> None:
        super().__init__()
        if model is None:
            if pretrained is None:
                raise ValueError("UnlearnedLM needs pretrained=EXPORT_DIR (or a built model=...).")
            model = load_unlearned(pretrained, alpha, large_model=large_model, reference_model=reference_model,
                                   large_dtype=large_dtype, small_dtype=small_dtype, device=device)
        try:
            self.batch_size_per_gpu = int(batch_size)
        except (TypeError, ValueError):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r} ('auto' is not supported).") from None
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
        self.model = model
        self.tokenizer = model.tokenizer
        self.add_bos_token = add_bos_token
        self._max_length = int(max_length) if max_length else max_context_length(model)
        for module in model.modules():  # a given max_length longer than a server takes fails here, not mid-run
            if isinstance(module, ServedLargeModel):
                check_served_context(module, self._max_length, "max_length (lm-eval's model_args)")
        self._max_gen_toks = int(max_gen_toks)
        self.model_args: dict[str, Any] = {
            **model_description(model, pretrained),
            "batch_size": self.batch_size_per_gpu, "max_length": self._max_length, "device": device}
        """What was evaluated, for lm-eval's results file (``config.model_args``): the export(s) as absolute paths,
        the alpha of each offset as used (the manifests' or the ``alpha`` given), the large and reference models,
        dtypes; without it lm-eval writes ``model_args: null`` for a model passed as an object."""
        self.non_finite_requests = 0
        """Log-likelihood requests answered with a NaN or infinite value so far (:func:`~.run.evaluate` reports
        every metric NaN when there is one: lm-eval would rank a NaN as a number)."""

    def get_model_info(self) -> dict[str, Any]:
        """lm-eval adds this to its results' ``config`` (``lm_eval --model unlearned`` included, where
        ``model_args`` holds only what the user typed): the export(s) and the alphas actually used."""
        return {"unlearned": dict(self.model_args)}

    # --- lm-eval's model properties ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The context of an empty-context request: BOS, else EOS (as lm-eval's ``hf`` model)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "unlearned").replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """lm-eval's ``--apply_chat_template``: the tokenizer's own template rendered as text."""
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids of ``string``; special tokens as the tokenizer adds them unless told (or the text starts with
        BOS already)."""
        options: dict[str, bool] = {}
        if add_special_tokens is not None:
            options["add_special_tokens"] = add_special_tokens
        elif self.add_bos_token is not None:
            options["add_special_tokens"] = self.add_bos_token
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            options["add_special_tokens"] = False
        return self.tokenizer.encode(string, **options)

    # --- log-likelihoods -------------------------------------------------------------------------------------

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests: list[LLRequest], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """``(sum of log p(continuation token), whether greedy decoding yields the continuation)`` per request.

        Each request is ``(strings or None, context ids, continuation ids)``; the input is context + continuation
        less its last token, cut from the left to :attr:`max_length`, and its last ``len(continuation)`` positions
        are scored. Requests sharing context + continuation[:-1] (multiple choice with one-token answers) are
        computed once, as lm-eval's ``hf`` model does.

        Raises:
            ValueError: a continuation is longer than :attr:`max_length` (no context fits before its first token;
                checked for every request before any is scored), or a log-likelihood is not finite (NaN or
                infinite logits: lm-eval's ``argmax`` would count a NaN choice as chosen).
        """
        self._check_lengths(requests)
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
                         group_by="contexts", group_fn=lambda r: r[1] + r[2][:-1])
        results: list[tuple[float, bool]] = []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for chunk in order.get_batched(n=self.batch_size_per_gpu):
            inputs = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
            width = max(len(ids) for ids in inputs)
            ids = torch.full((len(inputs), width), pad, dtype=torch.long)
            for row, tokens in enumerate(inputs):
                ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            # No padding mask: in a causal model no real position attends to the right padding after it, so
            # the scored positions are exact without one, and an all-ones mask lets attention take its causal
            # fast path (lm-eval's hf model passes none either).
            log_probs = F.log_softmax(self.model.logits(ids, torch.ones_like(ids)).float(), dim=-1)
            for (strings, ctx, cont), row_log_probs, tokens in zip(chunk, log_probs, inputs):
                scored = row_log_probs[len(tokens) - len(cont): len(tokens)].unsqueeze(0)  # [1, |cont|, V]
                greedy = scored.argmax(dim=-1)
                for strings_, cont_, scored_ in order.get_cache(req_str=strings, cxt_toks=ctx, cont_toks=cont,
                                                               logits=scored):
                    target = torch.tensor(cont_, dtype=torch.long, device=scored_.device).unsqueeze(0)
                    is_greedy = bool((greedy[:, -target.shape[1]:] == target).all())
                    answer = (float(scored_.gather(2, target.unsqueeze(-1)).sum()), is_greedy)
                    self.non_finite_requests += not math.isfinite(answer[0])
                    results.append(answer)
                    if strings_ is not None:
                        self.cache_hook.add_partial("loglikelihood", strings_, answer)
        return order.get_original(results)

    def _check_lengths(self, requests: list[LLRequest]) -> None:
        """Refuse continuations longer than :attr:`max_length`; log how many contexts are cut from the left."""
        for strings, ctx, cont in requests:
            if len(cont) > self.max_length:
                where = f" (context ending {strings[0][-60:]!r})" if strings else ""
                raise ValueError(
                    f"An lm-eval continuation is {len(cont)} tokens long{where}, longer than max_length="
                    f"{self.max_length}: no context fits before its first token, so it cannot be scored (lm-eval "
                    "cuts contexts from the left, never the continuation). Raise max_length (model_args "
                    "max_length=N, at most the model's context length) or use shorter continuations.")
        cut = sum(len(ctx) + len(cont) > self.max_length + 1 for _, ctx, cont in requests)
        if cut:
            log.warning("%d of %d lm-eval requests are longer than max_length=%d: their contexts are cut from the "
                        "left.", cut, len(requests), self.max_length)

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood (nats, one float per request) of each whole text, in disjoint windows of
        :attr:`max_length` tokens (each window but the first conditioned on the tokens before it), the first token
        conditioned on :attr:`prefix_token_id`.

        A tokenizer that adds BOS (Llama-3, Gemma, ...) encodes the text as ``BOS t_1 ... t_n``; that BOS is
        dropped here, since :attr:`prefix_token_id` (the same BOS) already conditions ``t_1``. lm-eval 0.4's
        ``hf`` model keeps it, scoring ``BOS t_1 ... t_n`` after a second BOS: ``log p(BOS | BOS)`` too, and every
        token after two BOS (lm-evaluation-harness issue #3333), several nats per document. On the Llama-3-style
        tiny model of ``tests/unit/harness/test_lm_eval.py`` one sentence gives -251.06 here, -256.87 there. Without a
        BOS-adding tokenizer the two agree.
        """
        windows: list[LLRequest] = []
        owners: list[int] = []
        bos = self.tokenizer.bos_token_id
        for index, (text,) in enumerate(request.args for request in requests):
            tokens = self.tok_encode(text)
            if bos is not None and tokens[:1] == [bos]:
                tokens = tokens[1:]  # the prefix token below is this BOS: score the text once, from t_1
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (log_prob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += log_prob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # --- generation ------------------------------------------------------------------------------------------

    def _stop_at(self, until: list[str]) -> StopFn | None:
        """Ends a row once its decoded text holds one of ``until`` (lm-eval's stop strings)."""
        strings = [s for s in until if s]
        if not strings:
            return None

        def stop(new_tokens: Tensor) -> Tensor:
            texts = self.tokenizer.batch_decode(new_tokens.tolist(), skip_special_tokens=True)
            return torch.tensor([any(s in text for s in strings) for text in texts], dtype=torch.bool)

        return stop

    def _encode_prompts(self, contexts: Sequence[str], max_context: int) -> tuple[Tensor, Tensor]:
        """Left-padded ids and mask, each context cut from the left to ``max_context`` tokens."""
        rows = [self.tok_encode(c)[-max_context:] for c in contexts]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
        return ids, mask

    @torch.no_grad()
    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context, ending at the model's end tokens (EOS, ``generation_config``'s,
        the chat template's end of turn) or at the task's ``until`` strings (cut off the text), at most
        ``max_gen_toks`` tokens.

        Raises:
            ValueError: a request asks for sampling (``do_sample: true``): only greedy decoding is implemented.
        """
        order = Collator([r.args for r in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                         group_by="gen_kwargs", group_fn=lambda r: r[1])
        eos_text = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        results: list[str] = []
        for chunk in order.get_batched(n=self.batch_size_per_gpu):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(dict(all_kwargs[0]), self.max_gen_toks)
            if kwargs.get("do_sample"):
                raise ValueError("UnlearnedLM decodes greedily; the task asks for sampling (do_sample: true). Set "
                                 "--gen_kwargs do_sample=false or use a greedy task.")
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = int(kwargs.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks={max_new} leaves no room for a context within max_length="
                                 f"{self.max_length}.")
            ids, mask = self._encode_prompts(contexts, self.max_length - max_new)
            new = self.model.generate_ids(ids, mask, max_new, stop=self._stop_at(until))
            stops = set(self.model.stop_ids)
            for context, row in zip(contexts, new.tolist()):
                end = next((k for k, token in enumerate(row) if token in stops), len(row))
                text = postprocess_generated_text(self.tokenizer.decode(row[:end], skip_special_tokens=True),
                                                  until, None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
        return order.get_original(results)


def _local(path: str | None) -> str | None:
    """An existing local path made absolute (a results file must name it wherever it is read); hub ids as they are."""
    return os.path.abspath(path) if path is not None and os.path.exists(path) else path


def model_description(model: Any, pretrained: str | Sequence[str] | None = None) -> dict[str, Any]:
    """What a model is, as lm-eval's ``model_args`` of a results file: for an export (or composition) the export
    paths (``pretrained``: one string, or a list when composed), each offset's ``alpha`` as used, ``method``, the
    ``large_model`` and ``reference_model`` (``None`` for a direct model) and the dtypes; for anything else its
    class name."""
    composition = getattr(model, "composition", None)
    if composition is None:
        return {"pretrained": pretrained if isinstance(pretrained, str) or pretrained is None else list(pretrained),
                "model": type(model).__name__}
    paths = [_local(o.path) for o in composition.offsets]
    alphas = composition.alphas
    described: dict[str, Any] = {"pretrained": paths[0] if len(paths) == 1 else paths}
    if not composition.is_direct:
        described["alpha"] = alphas[0] if len(alphas) == 1 else alphas
    described |= {"method": [o.method for o in composition.offsets] if len(paths) > 1 else composition.offsets[0].method,
                  "large_model": _local(composition.large_model),
                  "reference_model": _local(composition.reference_model),
                  "large_dtype": composition.large_dtype, "small_dtype": composition.small_dtype}
    if composition.relative_top:
        described["relative_top"] = composition.relative_top
    return described


def load_unlearned(
    exports: str | Sequence[str], alpha: float | Sequence[float] | None = None, **options: Any
) -> UnlearnedModel:
    """:meth:`UnlearnedModel.from_export` with one ``alpha`` for every offset allowed, and the errors a user of the
    command line can act on.

    Raises:
        FileNotFoundError: an export is missing, or the large or reference model an offset export names.
    """
    exports = [exports] if isinstance(exports, str) else list(exports)
    if len(exports) == 1 and not os.path.exists(exports[0]) and not looks_local(exports[0]) and alpha is None:
        return _hub_model(exports[0], options.get("small_dtype") or "float32", options.get("device", "cpu"))
    alphas: list[float] | None = None
    if alpha is not None:
        values = [finite(a, "alpha", "the alpha model argument") for a in
                  ([alpha] if isinstance(alpha, (int, float, str)) else alpha)]
        composition = compose(exports)
        if composition.is_direct:
            raise ValueError(f"--alpha applies to offset exports; {exports[0]!r} is a direct model.")
        count = len(composition.offsets)
        if len(values) not in (1, count):
            raise ValueError(f"Give one alpha, or one per offset ({count}); got {len(values)}.")
        alphas = values * count if len(values) == 1 else values
    composition = compose(exports, alphas)
    try:
        return UnlearnedModel.from_export(exports, alphas, **options)
    except OSError as err:
        for field, flag in (("large_model", "--large_model"), ("reference_model", "--reference_model")):
            name = options.get(field) or getattr(composition, field)
            if name is not None and not os.path.isdir(name):
                raise FileNotFoundError(
                    f"The offset export {exports[0]!r} needs its {field.replace('_', ' ')} {name!r}, which cannot be "
                    f"loaded here (not a local directory, and no hub access): pass its location with {flag} PATH."
                ) from err
        raise


def _hub_model(name: str, dtype: str, device: str) -> UnlearnedModel:
    """A Hugging Face hub id as a direct model (offline only when it is in the hub cache)."""
    from ..models.loading import freeze, load_causal_lm
    from ..data.tokenizer import load_tokenizer
    from ..deploy.manifest import Composition, Offset

    tokenizer = load_tokenizer(name)
    model = freeze(load_causal_lm(name, dtype))
    return UnlearnedModel(Composition((Offset(name, 1.0),)), tokenizer, [model]).to(device)
