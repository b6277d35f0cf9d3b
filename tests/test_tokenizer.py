"""Our tokenizer wrapper against HF's tokenizer on the same files."""
import json

import pytest

from tokenizer import StreamingDecoder, Tokenizer

TEXTS = ["Hello, world!", "  leading spaces and ünïcödé — emoji 🚀", "def f(x):\n    return x * 2\n"]
MESSAGES = [[{"role": "user", "content": "What is the capital of France?"}],
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]]


@pytest.mark.slow
def test_smollm2_tokenizer_and_chat_template_match_hf(smollm2_checkpoint):
    from transformers import AutoTokenizer

    folder = smollm2_checkpoint.parent
    ours, theirs = Tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text)
        assert ours.decode(ours.encode(text)) == text
    for messages in MESSAGES:
        expected = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
        assert ours.apply_chat_template(messages) == list(expected)
    assert ours.eos_ids == [theirs.convert_tokens_to_ids("<|im_end|>")]


def test_eos_ids_from_generation_config_and_tokenizer(tmp_path):
    """Several EOS ids (e.g. <|im_end|> and <|endoftext|>) are all stop tokens."""
    from tokenizers import Tokenizer as FastTokenizer
    from tokenizers import models

    vocab = {"<unk>": 0, "<|endoftext|>": 1, "<|im_end|>": 2, "a": 3}
    FastTokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|endoftext|>"},
                                                                "chat_template": "{{ messages[0]['content'] }}"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2]}))
    tokenizer = Tokenizer(tmp_path)
    assert tokenizer.eos_ids == [1, 2]
    assert tokenizer.apply_chat_template([{"role": "user", "content": "a"}]) == [3]


def test_sentencepiece_tokenizer(tmp_path):
    """Llama 2 / Vicuna ship tokenizer.model: BOS is prepended, text round-trips."""
    import sentencepiece

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["the quick brown fox jumps over the lazy dog"] * 50 + ["hello world"] * 50))
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"),
                                             vocab_size=30, bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    tokenizer = Tokenizer(tmp_path)
    ids = tokenizer.encode("hello world")
    assert ids[0] == 1 and tokenizer.decode(ids[1:]) == "hello world"
    assert tokenizer.eos_ids == [2]


def test_missing_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer(tmp_path)


def test_streaming_decoder_holds_back_split_characters(smollm2_checkpoint):
    tokenizer = Tokenizer(smollm2_checkpoint.parent)
    text = "naïve café 🚀 done"
    stream = StreamingDecoder(tokenizer)
    pieces = [stream.push(i) for i in tokenizer.encode(text)]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
