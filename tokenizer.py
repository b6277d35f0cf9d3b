"""Tokenizers and chat templates, read from the files that sit beside a checkpoint.

- `tokenizer.json` (HF fast tokenizers: Llama 3, SmolLM2, Qwen, Mistral) or `tokenizer.model` (sentencepiece: Llama 2, Vicuna).
- The chat template from `chat_template.jinja` or `tokenizer_config.json`, rendered with jinja2 as HF does.
- EOS ids from `generation_config.json` (a model may have several, e.g. `<|im_end|>` and `<|endoftext|>`)
  together with the tokenizer's own eos token.
"""
import json
from datetime import datetime
from pathlib import Path

from cli import UsageError


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_text(value):
    # tokenizer_config.json stores special tokens as a string or as an AddedToken dict.
    return value.get("content") if isinstance(value, dict) else value


def load_tokenizer(directory) -> "Tokenizer":
    """The tokenizer beside a checkpoint; a missing or corrupt one is a one-line UsageError."""
    try:
        return Tokenizer(directory)
    except FileNotFoundError as error:
        raise UsageError(str(error)) from None
    except Exception as error:  # tokenizers/sentencepiece raise bare exceptions on a corrupt file
        raise UsageError(f"cannot read the tokenizer in {directory} ({error}); convert the checkpoint again") from None


class Tokenizer:
    def __init__(self, directory):
        directory = Path(directory)
        self.directory = directory
        config = _read_json(directory / "tokenizer_config.json")
        if (directory / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as FastTokenizer

            self._fast = FastTokenizer.from_file(str(directory / "tokenizer.json"))
            self._sp = None
        elif (directory / "tokenizer.model").is_file():
            import sentencepiece

            self._fast = None
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
        else:
            raise FileNotFoundError(
                f"no tokenizer.json or tokenizer.model in {directory}; convert the checkpoint with convert_hf_checkpoint.py"
            )
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.add_bos_token = config.get("add_bos_token", self._sp is not None)
        template_file = directory / "chat_template.jinja"
        self.chat_template = template_file.read_text() if template_file.is_file() else config.get("chat_template")
        if isinstance(self.chat_template, list):  # several named templates: take the default one
            named = {t["name"]: t["template"] for t in self.chat_template}
            self.chat_template = named.get("default", next(iter(named.values())))

        eos_ids = _read_json(directory / "generation_config.json").get("eos_token_id")
        if eos_ids is None:
            eos_ids = _read_json(directory / "config.json").get("eos_token_id")
        eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])
        if self.eos_token is not None and self.token_to_id(self.eos_token) is not None:
            eos_ids.append(self.token_to_id(self.eos_token))
        if self._sp is not None and self._sp.eos_id() >= 0:
            eos_ids.append(self._sp.eos_id())
        self.eos_ids = sorted(set(eos_ids))
        self.bos_id = self.token_to_id(self.bos_token) if self.bos_token else None
        if self.bos_id is None and self._sp is not None and self._sp.bos_id() >= 0:
            self.bos_id = self._sp.bos_id()

    @property
    def vocab_size(self) -> int:
        return self._fast.get_vocab_size() if self._fast else self._sp.get_piece_size()

    def token_to_id(self, token: str):
        if self._fast:
            return self._fast.token_to_id(token)
        token_id = self._sp.piece_to_id(token)
        return None if token_id == self._sp.unk_id() and token != self._sp.id_to_piece(token_id) else token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list:
        if self._fast:
            ids = self._fast.encode(text, add_special_tokens=add_special_tokens).ids
        else:
            ids = self._sp.encode(text)
            if add_special_tokens and self.add_bos_token and self.bos_id is not None:
                ids = [self.bos_id] + ids
        return ids

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self._fast:
            return self._fast.decode(ids, skip_special_tokens=True)
        return self._sp.decode(ids)

    def apply_chat_template(self, messages: list, add_generation_prompt: bool = True) -> list:
        """Token ids of `messages` rendered through the model's chat template (as HF's apply_chat_template)."""
        if not self.chat_template:
            raise ValueError(f"the tokenizer in {self.directory} has no chat template; drop --chat")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda value, indent=None, **_: json.dumps(value, indent=indent, ensure_ascii=False)
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
        text = env.from_string(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )
        # The template already wrote any BOS it wants, so no special tokens are added again.
        return self.encode(text, add_special_tokens=False)


class StreamingDecoder:
    """Turns token ids into text as they arrive, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            return ""
        new, self.printed = text[len(self.printed):], text
        return new
