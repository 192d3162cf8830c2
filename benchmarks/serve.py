"""Serving under HTTP load: ettin-jax's OpenAI-compatible server against `transformers serve
--continuous-batching`, in one run, on the same random weights, with the same requests.

Each side is a command that starts a server and the base URL it answers on. The script builds a
random transformers checkpoint (the `--size` shape, seed 0, a bias on the EOS logit as in
`benchmarks/throughput.py`) with a word-level tokenizer beside it, then for each side in turn:
starts the server as a subprocess on a free port, polls `GET /health` until it answers 200,
warms it up at each `--concurrency` in turn (`--warmup-rounds` rounds, each one prompt at each
power-of-two length and some random ones: compilation and lazy start-up are not measured; our
server's `/metrics` counts the programs it compiled, and the output says how many it compiled
during each measured level), runs the load at each `--concurrency`, and stops it (SIGTERM to
its process group, SIGKILL after 30 s). The sides never run at the same time.

The load: at concurrency N, N clients (asyncio and aiohttp, one connection each) take requests
from one shared list; each sends the next as soon as its last one ended. Requests are the
bulk-sampling workload: random ids of log-uniform lengths in [`--min-prompt`, `--max-prompt`],
greedy (`temperature` 0), at most `--max-tokens` new tokens, each ending at its own EOS after a
data-dependent number of tokens. Every concurrency level and the warm-up get their own prompts
(no prefix is ever sent twice, so a prefix cache cannot help either side), the same for both
sides. Each request is a streaming `POST /v1/completions` ("stream": true,
"stream_options": {"include_usage": true}).

The prompts are sent as text: `transformers serve` accepts only a string `prompt` ("prompt must
be a string", HTTP 400, for a list of ids). The tokenizer maps id i to the word `t<i>` (the
special tokens keep ModernBERT's names and ids, [CLS] = BOS is prepended), so the text
"t5 t17 t230" is exactly the ids [BOS, 5, 17, 230] on both sides and outputs decode to words.

Measured per side and concurrency:
- tokens/s: generated tokens over the wall time from the first request sent to the last one
  ended. Tokens are the server's `usage.completion_tokens` from the last streamed chunk (EOS
  included) when it sends one, else the number of text chunks (EOS, a special token, sends no
  text): the table says which after the count;
- TTFT: from sending a request to its first chunk with text (or its final chunk, when the only
  token is EOS), p50 and p99;
- ITL, inter-token latency: the gaps between a request's successive chunks with text, p50 and
  p99 over all gaps, as vLLM's serving benchmark counts them: a server that sends several tokens
  in a chunk shows fewer, longer gaps (`tokens a chunk` says how many it sends); TPOT, time per
  output token: each request's (last chunk - first chunk) over the tokens after its first chunk
  (tokens counted as words: exact with this tokenizer, but for special tokens), p50;
- requests completed, and how many outputs equal the other side's (greedy, float32: all should,
  but for near-ties of the top two logits, which may go either way: one request of 128 in a run,
  whose top two logits were equal in float32 on transformers' side).
Ratios ours/transformers: tokens/s and p99 TTFT. The floor checked (PASS/FAIL lines, not an
assertion): at concurrency 64, our tokens/s at least 3x transformers' and our p99 TTFT lower.

How `transformers serve` runs here (5.24, offline):
    HF_HUB_OFFLINE=1 transformers serve DIR --continuous-batching --host 127.0.0.1 --port P
DIR, a local directory, is preloaded before the server listens (no network needed);
`/v1/completions` runs through continuous batching ("CB: True" in its log), streams one
`text_completion` chunk per decoded piece of text (one token a chunk here), sends `usage` in its
last chunk whether asked or not (it ignores `stream_options` with a warning) and ends the stream
without `data: [DONE]`. It takes no token ids as a prompt (HTTP 400), and its
`/v1/chat/completions` fails (500) on a model without a chat template, so the legacy completions
endpoint is the one both sides serve. It needs `accelerate` (part of `transformers[serving]`;
without it the model load fails: "Using a `device_map` ... requires `accelerate`"), and the
continuous-batching manager starts on the first request (about 10 s here), which the warm-up
absorbs.

Our side: `ettin-jax serve --model DIR --port P` (`--max-batch-size` and `--max-length` passed
through when given): `GET /health` answers 200 once it can serve, completions stream OpenAI
`text_completion` chunks, then a chunk with `usage` (asked for by `stream_options`), then
`data: [DONE]`. Requests name the model by DIR, the `--model` both servers were started with.

    python benchmarks/serve.py                                   # 17m, both sides, concurrency 1 16 64
    python benchmarks/serve.py --sides transformers --concurrency 16 --requests 64
    python benchmarks/serve.py --ours-args "--dtype bfloat16"   # more flags for one side's server
    python benchmarks/serve.py --record                          # and append the tables to RESULTS.md
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import itertools
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import numpy as np
from common import cpu_model, eos_biased_checkpoint, report

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SIDES = ("ours", "transformers")
SPECIAL_TOKENS = {50280: "[UNK]", 50281: "[CLS]", 50282: "[SEP]", 50283: "[PAD]", 50284: "[MASK]"}  # ModernBERT's


# ---- the checkpoint and the requests --------------------------------------------------------
def build(size: str, bias: float, directory: str) -> int:
    """A transformers checkpoint with random weights (seed 0) and `bias` on the EOS logit, and a
    word-level tokenizer (id i <-> the word `t<i>`, BOS prepended), saved to `directory`.
    Returns the EOS id."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    import ettin_jax as ej

    config = ej.ModernBertDecoderConfig.ettin(size)
    _, eos = eos_biased_checkpoint(size, bias, directory)

    if SPECIAL_TOKENS.get(config.bos_token_id) != "[CLS]" or SPECIAL_TOKENS.get(eos) != "[SEP]":
        raise SystemExit(f"unexpected BOS/EOS ids {config.bos_token_id}/{eos} for the tokenizer")
    vocab = {SPECIAL_TOKENS.get(i, f"t{i}"): i for i in range(config.vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS.values()))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A", special_tokens=[("[CLS]", config.bos_token_id)]
    )
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", bos_token="[CLS]", eos_token="[SEP]", pad_token="[PAD]",
        mask_token="[MASK]", cls_token="[CLS]", sep_token="[SEP]",
    ).save_pretrained(directory)  # fmt: skip
    return eos


def prompts(args, count: int, seed: int) -> list[str]:
    """`count` prompts of random ids (as `t<i>` words), lengths log-uniform in [min, max]."""
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.uniform(np.log(args.min_prompt), np.log(args.max_prompt + 1), count)).astype(int)
    lengths = np.clip(lengths, args.min_prompt, args.max_prompt)
    return [" ".join(f"t{i}" for i in rng.integers(0, 50000, n)) for n in lengths]


def warmup_prompts(args, concurrency: int, round_: int) -> list[str]:
    """Warm-up round `round_` before the level at `concurrency`: one prompt at each power of two
    from the shortest to the longest prompt length (a JAX server compiles a program per width
    it meets), and min(`--warmup`, max(8, 2 * concurrency)) random ones, new in each round."""
    rng = np.random.default_rng(args.seed + 1000 + concurrency + 100_000 * round_)
    widths = sorted({min(2**k, args.max_prompt) for k in range(int(np.log2(args.min_prompt)), 20)})
    fixed = [" ".join(f"t{i}" for i in rng.integers(0, 50000, w)) for w in widths if w >= args.min_prompt]
    count = min(args.warmup, max(8, 2 * concurrency))
    return fixed + prompts(args, count, args.seed + 2000 + concurrency + 100_000 * round_)


# ---- the servers ----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Side:
    """A server: the command that starts it and the base URL it answers on."""

    name: str
    command: list[str]
    base_url: str
    env: dict


def sides(args, directory: str) -> list[Side]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    out = []
    for name in args.sides:
        port = free_port()
        if name == "ours":
            program = shutil.which("ettin-jax")
            command = [program] if program else [sys.executable, "-m", "ettin_jax.cli"]
            command += ["serve", "--model", directory, "--port", str(port)]
            for flag in ("max_batch_size", "max_length"):
                if getattr(args, flag) is not None:
                    command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
            command += shlex.split(args.ours_args)
        else:
            program = shutil.which("transformers")
            if program is None:
                raise SystemExit("the `transformers` command is not on PATH")
            if importlib.util.find_spec("accelerate") is None:
                raise SystemExit(
                    "transformers serve needs accelerate (part of transformers[serving]): pip install accelerate"
                )
            command = [program, "serve", directory, "--continuous-batching", "--host", "127.0.0.1"]
            command += ["--port", str(port), "--log-level", "warning", *shlex.split(args.transformers_args)]
        out.append(Side(name, command, f"http://127.0.0.1:{port}", env))
    return out


class Server:
    """A side's server as a subprocess in its own process group, its output in `log`."""

    def __init__(self, side: Side, log: str):
        self.side, self.log = side, log
        with open(log, "w") as f:
            self.process = subprocess.Popen(
                side.command, stdout=f, stderr=subprocess.STDOUT, env=side.env, start_new_session=True
            )

    def tail(self, lines: int = 30) -> str:
        with open(self.log, errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def wait_healthy(self, timeout: float) -> float:
        """Polls GET /health until 200; returns the seconds it took."""
        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.side.name} server exited with {self.process.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.side.base_url + "/health", timeout=5) as response:
                    if response.status == 200:
                        return time.perf_counter() - start
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.side.name} server not healthy after {timeout:.0f} s:\n{self.tail()}")

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL if it has not exited after 30 s."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


# ---- the client -----------------------------------------------------------------------------
@dataclasses.dataclass
class Result:
    text: str = ""
    error: str | None = None
    sent: float = 0.0
    first: float | None = None  # first chunk with text, or the final chunk if none had text
    ended: float = 0.0
    chunk_times: list = dataclasses.field(default_factory=list)  # chunks with text
    chunk_words: list = dataclasses.field(default_factory=list)  # their tokens: one word each but special ones
    usage: int | None = None  # usage.completion_tokens, when the server sends it
    finish_reason: str | None = None
    done_marker: bool = False  # the stream ended with `data: [DONE]`

    @property
    def tokens(self) -> int:
        return self.usage if self.usage is not None else len(self.chunk_times)


async def complete(session, url: str, body: dict) -> Result:
    """One streaming completion, timed chunk by chunk."""
    import aiohttp

    result = Result(sent=time.perf_counter())
    pieces = []
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:300]}"
                return result
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    result.done_marker = True
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"stream error: {chunk['error']}"
                    break
                choices = chunk.get("choices") or []
                text = "".join(c.get("text") or "" for c in choices)
                finish = next((c["finish_reason"] for c in choices if c.get("finish_reason")), None)
                if text:
                    pieces.append(text)
                    result.chunk_times.append(now)
                    result.chunk_words.append(len(text.split()))
                    if result.first is None:
                        result.first = now
                if finish:
                    result.finish_reason = finish
                    if result.first is None:
                        result.first = now
                if chunk.get("usage"):
                    result.usage = chunk["usage"].get("completion_tokens")
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:  # ValueError: bad JSON, too long a line
        result.error = f"{type(e).__name__}: {e}"
    result.ended = time.perf_counter()
    result.text = "".join(pieces)
    if result.error is None and result.finish_reason is None:
        result.error = "stream ended without a finish_reason"
    return result


async def load(base_url: str, bodies: list[dict], concurrency: int, timeout: float) -> tuple[list[Result], float]:
    """`concurrency` clients working through `bodies`; returns the results (in input order) and
    the wall time from the first request sent to the last one ended."""
    import aiohttp

    results: list = [None] * len(bodies)
    queue = iter(range(len(bodies)))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=timeout, sock_read=timeout)
    ) as session:

        async def client():
            for i in queue:  # a shared iterator: each client takes the next request
                results[i] = await complete(session, base_url + "/v1/completions", bodies[i])

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return results, wall


def body(prompt: str, args, directory: str) -> dict:
    return {
        "model": directory,
        "prompt": prompt,
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def summarise(results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.error is None]
    ttft = [r.first - r.sent for r in ok if r.first is not None]
    gaps = [b - a for r in ok for a, b in itertools.pairwise(r.chunk_times)]
    # TPOT per token: the time from the first chunk to the last over the tokens that came after
    # the first chunk (counted as words, which is exact with this tokenizer but for special tokens).
    tpot = [
        (r.chunk_times[-1] - r.chunk_times[0]) / (sum(r.chunk_words) - r.chunk_words[0])
        for r in ok
        if len(r.chunk_times) > 1 and sum(r.chunk_words) > r.chunk_words[0]
    ]
    chunks = sum(len(r.chunk_times) for r in ok)

    def pct(values, q):
        return float(np.percentile(values, q)) if values else float("nan")

    tokens = sum(r.tokens for r in ok)
    # With this tokenizer every token but a special one decodes to one word, and EOS ends a "stop":
    # a check of the server's usage (a special token other than EOS would also show here).
    by_text = sum(r.usage != len(r.text.split()) + (r.finish_reason == "stop") for r in ok if r.usage is not None)
    with_usage = sum(r.usage is not None for r in ok)
    return {
        "ok": len(ok),
        "total": len(results),
        "tokens": tokens,
        "wall": wall,
        "rate": tokens / wall,
        "ttft50": pct(ttft, 50),
        "ttft99": pct(ttft, 99),
        "itl50": pct(gaps, 50),
        "itl99": pct(gaps, 99),
        "tpot50": pct(tpot, 50),
        "per_chunk": sum(sum(r.chunk_words) for r in ok) / max(chunks, 1),
        "counted": "usage" if ok and with_usage == len(ok) else ("chunks" if not with_usage else "mixed"),
        "usage_off": by_text,
        "lengths": np.percentile([r.tokens for r in ok] or [0], [0, 10, 50, 90, 100]).astype(int).tolist(),
        "done": sum(r.done_marker for r in ok),
        "errors": [r.error for r in results if r.error][:3],
    }


# ---- the run --------------------------------------------------------------------------------
def engine_counters(base_url: str) -> dict[str, float] | None:
    """Our server's `ettin_jax_engine_seconds_total` by part (prefill, decode, host) and its
    `ettin_jax_compiled_programs_total` ("compiled"), from /metrics; None from a server without
    them."""
    try:
        with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as response:
            text = response.read().decode()
    except (OSError, ValueError):
        return None
    found = re.findall(r'^ettin_jax_engine_seconds_total\{part="(\w+)"\} ([0-9.]+)$', text, flags=re.M)
    compiled = re.findall(r"^ettin_jax_compiled_programs_total ([0-9]+)$", text, flags=re.M)
    counters = {part: float(value) for part, value in found}
    if compiled:
        counters["compiled"] = float(compiled[0])
    return counters or None


def run_side(side: Side, args, directory: str, levels: dict, log_dir: str) -> dict:
    """Starts `side`'s server, warms it up, runs every level; returns {concurrency: (results, summary)}."""
    print(f"{side.name}: {shlex.join(side.command)}", flush=True)
    server = Server(side, os.path.join(log_dir, f"{side.name}.log"))
    out: dict = {}
    try:
        ready = server.wait_healthy(args.startup_timeout)
        # Each level gets its own warm-up at its concurrency (in the order given), so that the
        # programs a JAX server compiles for that many requests at once are compiled before it.
        warmups = {}
        for concurrency in levels:
            start, sent = time.perf_counter(), 0
            for round_ in range(args.warmup_rounds):
                warm = [body(p, args, directory) for p in warmup_prompts(args, concurrency, round_)]
                results, _ = asyncio.run(load(side.base_url, warm, concurrency, args.request_timeout))
                failed = [r.error for r in results if r.error]
                if failed:
                    raise RuntimeError(f"{side.name}: warm-up requests failed: {failed[:3]}\n{server.tail()}")
                sent += len(warm)
            warmups[concurrency] = f"{sent} in {time.perf_counter() - start:.1f} s"
        print(f"{side.name}: healthy after {ready:.1f} s; warm-up requests at each concurrency: {warmups}", flush=True)
        for concurrency, texts in levels.items():
            before = engine_counters(side.base_url)
            results, wall = asyncio.run(
                load(side.base_url, [body(p, args, directory) for p in texts], concurrency, args.request_timeout)
            )
            summary = summarise(results, wall)
            out[concurrency] = results, summary
            print(f"{side.name:>12} c={concurrency:<3} {summary['ok']}/{summary['total']} ok, {summary['tokens']} "
                  f"tokens ({summary['counted']}) in {wall:.1f} s = {summary['rate']:.1f} tok/s, TTFT p50/p99 "
                  f"{summary['ttft50'] * 1e3:.0f}/{summary['ttft99'] * 1e3:.0f} ms, ITL p50/p99 "
                  f"{summary['itl50'] * 1e3:.1f}/{summary['itl99'] * 1e3:.1f} ms, TPOT p50 "
                  f"{summary['tpot50'] * 1e3:.1f} ms, {summary['per_chunk']:.2f} tokens a chunk; output lengths "
                  f"min/p10/p50/p90/max {summary['lengths']}, [DONE] at the end of {summary['done']}",
                  flush=True)  # fmt: skip
            if before is not None:  # our server: where the engine's time went, and what it compiled
                after = engine_counters(side.base_url)
                split = ", ".join(f"{part} {after[part] - before[part]:.1f} s" for part in after if part != "compiled")
                compiled = after.get("compiled", 0) - before.get("compiled", 0)
                print(f"{'':>12} engine: {split}; programs compiled during the level: {compiled:.0f}", flush=True)
            if summary["usage_off"]:
                print(f"{'':>12} {summary['usage_off']} requests' usage differs from their words + EOS", flush=True)
            if summary["errors"]:
                print(f"{'':>12} errors: {summary['errors']}", flush=True)
    finally:
        server.stop()
    return out


def version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="17m")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument("--requests", type=int, default=128, help="requests per concurrency level")
    parser.add_argument("--requests-c1", type=int, default=32, help="requests at concurrency 1")
    parser.add_argument("--warmup", type=int, default=128, help="most random warm-up requests per level (see above)")
    parser.add_argument("--warmup-rounds", type=int, default=3, help="warm-up rounds per level, new prompts in each")
    parser.add_argument("--min-prompt", type=int, default=8)
    parser.add_argument("--max-prompt", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--eos-bias", type=float, default=0.65, help="added to the EOS logit (median output ~23)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-batch-size", type=int, help="passed to `ettin-jax serve` (default: its own)")
    parser.add_argument("--max-length", type=int, help="passed to `ettin-jax serve` (default: its own, the context)")
    parser.add_argument("--ours-args", default="", help="more flags for `ettin-jax serve`, one string")
    parser.add_argument("--transformers-args", default="", help="more flags for `transformers serve`, one string")
    parser.add_argument("--model-dir", help="build the checkpoint here and keep it (default: a temporary directory)")
    parser.add_argument("--startup-timeout", type=float, default=600, help="seconds to wait for GET /health")
    parser.add_argument("--request-timeout", type=float, default=600, help="seconds for one request")
    parser.add_argument("--dump", help="write every measured request (side, level, text, times) to this JSONL file")
    parser.add_argument("--record", action="store_true", help="append the results to benchmarks/RESULTS.md")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ettin-serve-") as scratch:
        directory = os.path.abspath(args.model_dir or os.path.join(scratch, f"ettin-{args.size}"))
        start = time.perf_counter()
        eos = build(args.size, args.eos_bias, directory)
        print(f"{args.size} checkpoint (EOS {eos}, bias {args.eos_bias}) in {directory}, "
              f"{time.perf_counter() - start:.1f} s", flush=True)  # fmt: skip
        levels = {
            c: prompts(args, args.requests_c1 if c == 1 else args.requests, args.seed + c) for c in args.concurrency
        }
        servers = sides(args, directory)
        results = {}
        for side in servers:
            try:
                results[side.name] = run_side(side, args, directory, levels, scratch)
            except RuntimeError as e:  # a server that does not start or fails its warm-up: the other side still runs
                print(f"{side.name}: {e}", file=sys.stderr, flush=True)
        commands = {
            s.name: shlex.join(s.command[1:]).replace(directory, "DIR").replace(s.base_url.rsplit(":", 1)[1], "P")
            for s in servers
        }

    if args.dump:
        with open(args.dump, "w") as f:
            for name, side in results.items():
                for concurrency, (level, _) in side.items():
                    for i, r in enumerate(level):
                        prompt_tokens = len(levels[concurrency][i].split()) + 1  # and BOS
                        row = {"side": name, "concurrency": concurrency, "index": i, "prompt_tokens": prompt_tokens}
                        f.write(json.dumps({**row, **dataclasses.asdict(r)}) + "\n")

    # ---- the tables ----
    ours, theirs = results.get("ours"), results.get("transformers")
    rows, ratios, floors = "", "", []
    for concurrency in args.concurrency:
        for name, side in results.items():
            s = side[concurrency][1]
            rows += (f"| {concurrency} | {name} | {s['ok']}/{s['total']} | {s['tokens']} ({s['counted']}) | "
                     f"{s['wall']:.1f} | {s['rate']:.1f} | {s['ttft50'] * 1e3:.0f} | {s['ttft99'] * 1e3:.0f} | "
                     f"{s['itl50'] * 1e3:.1f} | {s['itl99'] * 1e3:.1f} | {s['per_chunk']:.2f} | "
                     f"{s['tpot50'] * 1e3:.1f} |\n")  # fmt: skip
        if ours and theirs:
            (a, sa), (b, sb) = ours[concurrency], theirs[concurrency]
            same = sum(
                x.error is None and y.error is None and x.text.split() == y.text.split()
                for x, y in zip(a, b, strict=True)
            )
            rate, ttft = sa["rate"] / sb["rate"], sa["ttft99"] / sb["ttft99"]
            ratios += f"| {concurrency} | {rate:.2f}x | {ttft:.2f}x | {same}/{len(a)} |\n"
            if concurrency == 64:
                floors.append(f"{'PASS' if rate >= 3 else 'FAIL'}: at concurrency 64, our tokens/s {rate:.2f}x "
                              "transformers serve's (floor 3x)")  # fmt: skip
                floors.append(f"{'PASS' if sa['ttft99'] < sb['ttft99'] else 'FAIL'}: at concurrency 64, our p99 TTFT "
                              f"{sa['ttft99'] * 1e3:.0f} ms against {sb['ttft99'] * 1e3:.0f} ms")  # fmt: skip

    counts = sorted({len(p.split()) for texts in levels.values() for p in texts})
    machine = f"{cpu_model()}, {os.cpu_count()} cores, {platform.machine()}"
    header = (
        f"\n### serve, {datetime.date.today()}, {machine}\n\n"
        f"ettin-jax {version('ettin-jax')}, jax {version('jax')}, torch {version('torch')}, transformers "
        f"{version('transformers')}, aiohttp {version('aiohttp')}; `{shlex.join(['python', *sys.argv])}`: "
        f"{args.size} shape, float32, random weights, EOS bias {args.eos_bias}; streaming "
        f"POST /v1/completions, greedy, max_tokens {args.max_tokens}, prompts {counts[0]} to {counts[-1]} tokens "
        f"(log-uniform, sent as text, BOS prepended by the tokenizer), {args.requests} requests a level "
        f"({args.requests_c1} at concurrency 1), N clients each sending its next request when the last ends. "
        "Sides, one after the other, each warmed up at every level first ("
        f"{args.warmup_rounds} rounds of one prompt per power-of-two length and "
        f"min({args.warmup}, max(8, 2 x concurrency)) random ones): "
        + "; ".join(f"{name} `{command}`" for name, command in commands.items())
        + ". tokens/s: generated tokens (server usage or text chunks, as noted) over the level's wall time; "
        "TTFT, ITL (gaps between successive text chunks of a request) and TPOT ((last chunk - first chunk) / tokens "
        "after the first chunk, per request) in ms.\n\n"
        "| concurrency | side | requests ok | tokens | wall (s) | tokens/s | TTFT p50 | TTFT p99 | ITL p50 | "
        "ITL p99 | tokens a chunk | TPOT p50 |\n" + "| --- " * 12 + "|\n"
    )
    section = header + rows
    if ratios:
        section += (
            "\n| concurrency | tokens/s ours / transformers | p99 TTFT ours / transformers | same text |\n"
            "| --- | --- | --- | --- |\n" + ratios
        )
    if floors:
        section += "\n" + "".join(f"- {line}\n" for line in floors)
    report(section, args.record)


if __name__ == "__main__":
    sys.exit(main())
