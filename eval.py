"""Perplexity of a text file, in sliding windows, or lm-evaluation-harness tasks, for any checkpoint (float or quantized).

    python eval.py --checkpoint_path checkpoints/SmolLM2-135M-Instruct/model_int4.g32.pth --text_file /usr/share/common-licenses/GPL-3
    python eval.py --checkpoint_path checkpoints/SmolLM2-135M-Instruct/model_int8.pth --tasks hellaswag,arc_easy --limit 100

Each window holds up to --max_seq_length tokens and moves by --stride; a token is scored once, in the first
window that reaches it, with the window's earlier tokens as context (the method of HF's perplexity guide).
--tasks needs `pip install lm-eval` (imported only then) and the tasks' datasets (from the HF hub, or local
task configs in --include_path); --max_seq_length is then the longest context the model is given.
"""
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import cli
from cli import ArgumentParser, UsageError
from generate import DTYPES, KV_CACHE_DTYPES, budget_argument, generate, load_model, until_stop
from tokenizer import Tokenizer, load_tokenizer


def perplexity(model, tokens: torch.Tensor, max_seq_length: int = 1024, stride: int = 512) -> tuple:
    """(perplexity, tokens scored) of a 1-D token tensor."""
    total_nll, scored = negative_log_likelihood(model, tokens, max_seq_length, stride)
    return math.exp(total_nll / scored), scored


@torch.no_grad()
def negative_log_likelihood(model, tokens: torch.Tensor, max_seq_length: int, stride: int) -> tuple:
    """(summed negative log-likelihood, tokens scored) of every token after the first, in sliding windows."""
    model.setup_caches(1, max_seq_length)
    total_nll, scored, end_of_previous = 0.0, 0, 0
    starts = range(0, max(len(tokens) - 1, 1), stride)
    for start in tqdm(starts, desc="perplexity", unit="window", disable=len(starts) < 2):
        window = tokens[start:start + max_seq_length]
        if len(window) < 2:
            break
        logits = model(window[None], torch.arange(len(window), device=tokens.device))[0, :-1].float()
        targets = window[1:]
        # Only targets past what earlier windows scored count; the rest of the window is context.
        first_new = max(end_of_previous - start - 1, 0)
        nll = F.cross_entropy(logits[first_new:], targets[first_new:], reduction="sum")
        total_nll, scored = total_nll + nll.item(), scored + len(targets) - first_new
        end_of_previous = start + len(window)
        if end_of_previous >= len(tokens):
            break
    return total_nll, scored


# ---------------------------------------------------------------- lm-evaluation-harness


class StopGeneration(Exception):
    """Raised from generate()'s callback once a stop string appears: the rest of max_gen_toks is not needed."""


class HarnessModel:
    """Our model behind lm-evaluation-harness's LM interface: loglikelihood, loglikelihood_rolling and
    generate_until, each taking requests whose `.args` are lm-eval's tuples. Written against the interface,
    not lm_eval's classes: `harness_lm` mixes it into lm_eval's LM, and tests call it without lm_eval."""

    def __init__(self, model, tokenizer: Tokenizer, max_seq_length: int = 1024, batch_size: int = 1):
        super().__init__()  # lm_eval's LM.__init__ when mixed in
        self.model, self.tokenizer = model, tokenizer
        self.max_seq_length, self.batch_size = max_seq_length, batch_size
        self._device = model.tok_embeddings.weight.device  # lm_eval's LM reports it as .device
        # lm-eval's convention: the context of an empty-context request is BOS (EOS for models without one).
        self.prefix_id = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_ids[0]

    def loglikelihood(self, requests) -> list:
        """(log P(continuation | context), whether greedy decoding would produce it) per (context, continuation)."""
        return self.score([self.encode_pair(*request.args) for request in requests])

    def encode_pair(self, context: str, continuation: str) -> tuple:
        """Token ids as lm-eval's TemplateLM splits them: the context's trailing spaces move to the
        continuation, and the continuation is the whole text's ids after the context's, so that it is
        tokenized as in running text. Contexts get BOS where the model's tokenizer adds one."""
        if not context:
            ids = self.tokenizer.encode(continuation, add_special_tokens=False)
            return ([self.prefix_id], ids) if ids[0] != self.prefix_id else (ids[:1], ids[1:])
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        context_ids = self.tokenizer.encode(context)
        return context_ids, self.tokenizer.encode(context + continuation)[len(context_ids):]

    @torch.no_grad()
    def score(self, pairs: list) -> list:
        """loglikelihood on token ids, `batch_size` pairs per forward, longest first (little padding)."""
        self.model.setup_caches(self.batch_size, self.max_seq_length)
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        results = [None] * len(pairs)
        for start in tqdm(range(0, len(order), self.batch_size), desc="loglikelihood", unit="batch",
                          disable=len(order) <= self.batch_size):
            batch = order[start:start + self.batch_size]
            # Context and continuation, cut to the last max_seq_length tokens that predict the continuation.
            inputs = [(pairs[i][0] + pairs[i][1])[-(self.max_seq_length + 1):-1] for i in batch]
            length = max(len(ids) for ids in inputs)
            x = torch.zeros(len(batch), length, dtype=torch.long, device=self._device)
            for row, ids in enumerate(inputs):  # padded on the right, where causal attention never looks back
                x[row, :len(ids)] = torch.tensor(ids)
            log_probs = F.log_softmax(self.model(x, torch.arange(length, device=self._device)).float(), dim=-1)
            for row, (i, ids) in enumerate(zip(batch, inputs)):
                target = torch.tensor(pairs[i][1], device=self._device)
                predicted = log_probs[row, len(ids) - len(target):len(ids)]
                results[i] = (predicted.gather(-1, target[:, None]).sum().item(),
                              bool((predicted.argmax(-1) == target).all()))
        return results

    def loglikelihood_rolling(self, requests) -> list:
        """log P(text) per (text,), every token scored once after BOS, in windows as `perplexity` takes them."""
        results = []
        for (text,) in (request.args for request in requests):
            ids = [self.prefix_id] + self.tokenizer.encode(text, add_special_tokens=False)
            tokens = torch.tensor(ids, device=self._device)
            results.append(-negative_log_likelihood(self.model, tokens, self.max_seq_length, self.max_seq_length // 2)[0])
        return results

    def generate_until(self, requests) -> list:
        """Text generated from each (context, gen_kwargs), cut before the first of gen_kwargs["until"]; greedy
        unless do_sample (then gen_kwargs' temperature); at most max_gen_toks (lm-eval's default 256) tokens."""
        outputs = []
        for context, kwargs in tqdm([request.args for request in requests], desc="generate_until", unit="request",
                                    disable=len(requests) < 2):
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new_tokens = kwargs.get("max_gen_toks", 256)
            prompt = self.tokenizer.encode(context)[-max(self.max_seq_length - max_new_tokens, 1):]
            temperature = kwargs.get("temperature", 1.0) if kwargs.get("do_sample") else 0.0
            outputs.append(self.generate_text(prompt, max_new_tokens, until, temperature))
        return outputs

    def generate_text(self, prompt: list, max_new_tokens: int, until: list, temperature: float) -> str:
        new_tokens = []

        def collect(token):
            new_tokens.append(int(token[0, 0]))
            if until and any(stop in self.tokenizer.decode(new_tokens) for stop in until):
                raise StopGeneration

        try:
            generate(self.model, torch.tensor(prompt, device=self._device), max_new_tokens,
                     max_seq_length=self.max_seq_length, stop_ids=self.tokenizer.eos_ids, callback=collect,
                     temperature=temperature)
        except StopGeneration:
            pass
        text = self.tokenizer.decode(until_stop(new_tokens, self.tokenizer.eos_ids))
        for stop in until:
            text = text.split(stop)[0]
        return text


def lm_eval_base_class():
    """lm_eval's abstract LM; lm_eval is imported only here, so that eval.py runs without it."""
    try:
        from lm_eval.api.model import LM
    except ImportError:
        raise UsageError("lm-evaluation-harness is not installed; pip install lm-eval")
    return LM


def harness_lm(model, tokenizer: Tokenizer, max_seq_length: int, batch_size: int):
    class HarnessLM(HarnessModel, lm_eval_base_class()):
        """HarnessModel supplies the methods lm_eval's LM declares."""

    return HarnessLM(model, tokenizer, max_seq_length, batch_size)


def evaluate_tasks(lm, tasks: list, num_fewshot=None, limit=None, include_path=None) -> str:
    """lm-eval's results table for `tasks` (names checked first: lm-eval's own error on a typo is long)."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    task_manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [task for task in tasks if task not in task_manager.all_tasks]
    if unknown:
        raise UsageError(f"unknown lm-eval task {unknown[0]!r}; `lm-eval ls tasks` lists them")
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                          task_manager=task_manager)
    except ConnectionError as error:  # datasets cannot reach the hub for a task's data
        raise UsageError(f"a task's dataset could not be loaded ({error}); check the network, "
                              "or give task configs with local data files in --include_path")
    return make_table(results)


# ---------------------------------------------------------------- CLI


def text_file_perplexity(model, tokenizer: Tokenizer, name: str, text_file: Path, max_tokens, max_seq_length: int,
                         stride: int) -> str:
    start = time.perf_counter()
    ids = tokenizer.encode(text_file.read_text(errors="replace"))[:max_tokens]
    if len(ids) < 2:
        raise UsageError(f"{text_file} has fewer than 2 tokens; nothing to evaluate")
    value, scored = perplexity(model, torch.tensor(ids, device=model.tok_embeddings.weight.device), max_seq_length, stride)
    elapsed = time.perf_counter() - start
    return (f"{name}: {scored} tokens evaluated, perplexity {value:.4f} "
            f"({elapsed:.1f} s, {scored / elapsed:.0f} tokens/s, window {max_seq_length}, stride {stride})")


def run(argv=None):
    parser = ArgumentParser(description=__doc__)
    model, evaluation = parser.add_argument_group("model"), parser.add_argument_group("evaluation")
    model.add_argument("--checkpoint_path", type=Path, required=True)
    model.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="cpu or cuda (default: cuda if available, else cpu)")
    model.add_argument("--dtype", choices=list(DTYPES), default="float32")
    model.add_argument("--kv_cache_dtype", choices=list(KV_CACHE_DTYPES), default="auto",
                       help="int8: the KV cache quantized per token and head (auto: --dtype)")
    model.add_argument("--memory_budget", type=budget_argument, default=None,
                       help="hold at most this much (e.g. 2GB, the KV cache included) and stream the other layers "
                       "from disk each forward (streaming.py)")
    evaluation.add_argument("--text_file", type=Path, help="text to compute the perplexity of")
    evaluation.add_argument("--tasks", help="comma-separated lm-evaluation-harness tasks, e.g. hellaswag,arc_easy "
                            "(pip install lm-eval)")
    evaluation.add_argument("--limit", type=float, help="--tasks: examples per task (below 1: a fraction of them; default: all)")
    evaluation.add_argument("--num_fewshot", type=int, help="--tasks: few-shot examples in each prompt (default: the task's)")
    evaluation.add_argument("--batch_size", type=int, default=1, help="--tasks: loglikelihood requests per forward")
    evaluation.add_argument("--include_path", type=Path, help="--tasks: a folder of extra lm-eval task configs")
    evaluation.add_argument("--max_seq_length", type=int, default=1024,
                            help="window length (--tasks: longest context) in tokens")
    evaluation.add_argument("--stride", type=int, default=None, help="window step (default: half the window)")
    evaluation.add_argument("--max_tokens", type=int, default=None, help="evaluate only the first N tokens of the text (default: all)")
    args = parser.parse_args(argv)
    stride = args.stride or args.max_seq_length // 2
    if args.max_seq_length < 2 or not 0 < stride <= args.max_seq_length:
        parser.error("need --max_seq_length >= 2 and 0 < --stride <= --max_seq_length")
    if not args.text_file and not args.tasks:
        parser.error("give --text_file (perplexity) or --tasks (lm-evaluation-harness), or both")
    if args.batch_size < 1 or (args.limit is not None and args.limit <= 0) or (args.num_fewshot or 0) < 0:
        parser.error("need --batch_size >= 1, --limit > 0 and --num_fewshot >= 0")
    if args.text_file and not args.text_file.is_file():
        raise UsageError(f"text file {args.text_file} not found")
    if args.tasks:
        lm_eval_base_class()  # a missing lm_eval is reported before the model loads
    model = load_model(args.checkpoint_path, args.device, DTYPES[args.dtype],
                       kv_cache_dtype=KV_CACHE_DTYPES[args.kv_cache_dtype], memory_budget=args.memory_budget)
    tokenizer = load_tokenizer(args.checkpoint_path.parent)
    if args.text_file:
        print(text_file_perplexity(model, tokenizer, args.checkpoint_path.name, args.text_file, args.max_tokens,
                                   args.max_seq_length, stride))
    if args.tasks:
        lm = harness_lm(model, tokenizer, args.max_seq_length, args.batch_size)
        limit = int(args.limit) if args.limit and args.limit >= 1 else args.limit
        print(evaluate_tasks(lm, args.tasks.split(","), args.num_fewshot, limit, args.include_path))


def main(argv=None):
    cli.run(run, argv)


if __name__ == "__main__":
    main()
