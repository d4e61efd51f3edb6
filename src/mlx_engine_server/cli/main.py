"""The `mlx-server` command: parse flags, merge settings, serve.

Exit status: 0 after a clean shutdown, 1 when start-up fails, 2 on bad settings, 3 when a
distributed group (mlx.launch) fails: a process died or hung, and the whole group ends.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from ..errors import StartupError
from .config import load_settings
from .logs import configure_logging, effective_log_level
from .settings_errors import SettingsError

EXIT_BAD_SETTINGS = 2

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("model_path", required=False)
@click.option(
    "--adapter-path", metavar="DIR", help="LoRA adapter directory (mlx-lm adapter format)."
)
@click.option("--host", metavar="ADDRESS", help="Address to bind.  [default: 127.0.0.1]")
@click.option("--port", metavar="INT", help="Port to bind; 0 picks a free one.  [default: 8000]")
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path),
    envvar="MLX_SERVER_CONFIG",
    help="JSON settings file (keys as in config.example.json).",
)
@click.option(
    "--model-id", metavar="NAME", help="Model name to report.  [default: the path's last part]"
)
@click.option(
    "--log-level", metavar="LEVEL", help="critical, error, warning, info or debug.  [default: info]"
)
@click.option(
    "--strict-model-name/--no-strict-model-name",
    default=None,
    help="Answer 404 to requests that name another model.",
)
@click.option(
    "--trust-remote-code/--no-trust-remote-code",
    default=None,
    help="Allow model code shipped with the model.",
)
@click.option("--cache-dir", metavar="DIR", help="Where converted GGUF models are kept.")
@click.option(
    "--gguf-requantize",
    type=click.Choice(["auto", "4", "8", "none"]),
    help="GGUF tensors MLX cannot hold as they are (Q5_K, Q6_K, Q2_K, Q3_K, Q5_0, IQ...): "
    "re-quantize to MLX 4 or 8 bits, auto (4 below 5 bits a weight, else 8), or keep floats.  "
    "[default: auto]",
)
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    help="The dtype the model computes in (and its KV cache is stored in): auto is float32 on "
    "the CPU, the model's own dtype on a GPU.  [default: auto]",
)
@click.option(
    "--max-batch-size", metavar="INT", help="Sequences generated together.  [default: 32]"
)
@click.option(
    "--max-queue",
    metavar="INT",
    help="Requests waiting beyond the batch before 429.  [default: 64]",
)
@click.option(
    "--prefill-step-size", metavar="INT", help="Prompt tokens processed per step.  [default: 512]"
)
@click.option(
    "--request-timeout-s",
    metavar="SECONDS",
    help="Deadline of one request in seconds.  [default: 600]",
)
@click.option(
    "--shutdown-grace-s",
    metavar="SECONDS",
    help="On SIGTERM, time running requests get to finish.  [default: 10]",
)
@click.option(
    "--memory-budget-bytes",
    metavar="BYTES",
    help="Memory for the model, requests and prefix cache.  [default: MLX's memory limit]",
)
@click.option(
    "--prefix-cache-bytes",
    metavar="BYTES",
    help="KV cache kept for prompt reuse; 0 turns it off.  [default: 1073741824]",
)
@click.option(
    "--speculative",
    type=click.Choice(["none", "ngram", "draft"]),
    help="Speculative decoding: ngram drafts tokens by prompt lookup, draft with "
    "--draft-model; the batch's step verifies them.  [default: none]",
)
@click.option(
    "--draft-model",
    metavar="PATH",
    help="A smaller model with the same tokenizer that drafts tokens (directory, repo id or "
    ".gguf); turns on --speculative draft.",
)
@click.option(
    "--num-draft-tokens", metavar="INT", help="Most tokens a row drafts per step.  [default: 5]"
)
@click.option(
    "--ngram-size",
    metavar="INT",
    help="Longest run of tokens matched to find an ngram draft.  [default: 3]",
)
@click.option(
    "--ngram-min-size",
    metavar="INT",
    help="Shortest run of tokens matched when no longer one is found.  [default: 2]",
)
@click.option(
    "--kv-bits",
    type=click.Choice(["4", "8"]),
    help="Store the KV cache of running requests and cached prefixes quantized.  "
    "[default: 16-bit, the model's dtype]",
)
@click.option(
    "--kv-group-size",
    type=click.Choice(["32", "64", "128"]),
    help="Values sharing one scale in the quantized KV cache.  [default: 64]",
)
@click.option(
    "--max-tokens-default",
    metavar="INT",
    help="max_tokens when a request gives none.  [default: context left]",
)
@click.option(
    "--context-overflow",
    type=click.Choice(["error", "truncate", "summarize"]),
    help="A conversation too long for the context window: refuse it, drop its oldest turns, or "
    "summarize them with the model.  [default: error]",
)
@click.option(
    "--allow-request-overflow-policy/--no-allow-request-overflow-policy",
    default=None,
    help="Let a chat request choose its own policy (its context_overflow field).",
)
@click.option(
    "--summary-keep-messages",
    metavar="INT",
    help="Newest messages summarize keeps as they are.  [default: 6]",
)
@click.option(
    "--summary-max-tokens",
    metavar="INT",
    help="Longest summary (at most a quarter of the window).  [default: 512]",
)
@click.option(
    "--tool-call-parser",
    metavar="NAME",
    help="Tool-call format: auto, generic, none, hermes, llama3, mistral, gemma or an mlx-lm "
    "parser (auto: generic when the template renders no tools).  [default: auto]",
)
@click.option(
    "--reasoning-parser",
    metavar="MODE",
    help="auto: thinking goes to reasoning_content; none: left in content.  [default: auto]",
)
@click.option("--max-n", metavar="INT", help="Most choices (n) per request.  [default: 8]")
@click.option(
    "--max-prompts",
    metavar="INT",
    help="Most prompts per /v1/completions request.  [default: 16]",
)
@click.option(
    "--api-key",
    "api_keys",
    metavar="KEY",
    multiple=True,
    help="Require 'Authorization: Bearer KEY' (or 'x-api-key'); repeat for more keys.",
)
@click.option("--api-key-file", metavar="FILE", help="More API keys, one a line.")
@click.option(
    "--allowed-host",
    "allowed_hosts",
    metavar="NAME",
    multiple=True,
    help="Host header name accepted besides localhost; repeatable.",
)
@click.option(
    "--cors-origin",
    "cors_origins",
    metavar="ORIGIN",
    multiple=True,
    help="Origin a browser page may call from; repeatable.  [default: none]",
)
@click.option(
    "--max-body-bytes", metavar="BYTES", help="Largest request body.  [default: 33554432]"
)
@click.option(
    "--max-header-bytes", metavar="BYTES", help="Largest request header block.  [default: 32768]"
)
@click.option(
    "--header-timeout-s",
    metavar="SECONDS",
    help="Time a client has to send a request's headers.  [default: 30]",
)
@click.option(
    "--body-timeout-s",
    metavar="SECONDS",
    help="Longest wait for the next piece of a request body.  [default: 60]",
)
@click.option(
    "--max-connections", metavar="INT", help="Client connections open at once.  [default: 512]"
)
@click.option("--max-json-depth", metavar="INT", help="Deepest JSON nesting.  [default: 64]")
@click.option("--max-messages", metavar="INT", help="Messages in one request.  [default: 2048]")
@click.option("--max-stop-sequences", metavar="INT", help="Entries of 'stop'.  [default: 16]")
@click.option(
    "--max-stop-chars", metavar="INT", help="Characters of one stop sequence.  [default: 256]"
)
@click.option("--max-logit-bias", metavar="INT", help="Entries of 'logit_bias'.  [default: 1024]")
@click.option(
    "--state-dir", metavar="DIR", help="SQLite state directory.  [default: CACHE_DIR/state]"
)
@click.option("--state-url", metavar="URL", help="redis://host:port/db: state shared by instances.")
@click.option(
    "--state-retention-s",
    metavar="SECONDS",
    help="Lifetime of stored responses and conversations.  [default: 2592000]",
)
@click.option("--state-max-records", metavar="INT", help="Most stored records.  [default: 100000]")
@click.option(
    "--session-ttl-s",
    metavar="SECONDS",
    help="Session lifetime after its last turn.  [default: 86400]",
)
@click.option(
    "--rate-limit-rpm", metavar="INT", help="Requests per minute per key.  [default: none]"
)
@click.option("--rate-limit-tpm", metavar="INT", help="Tokens per minute per key.  [default: none]")
@click.option("--log-format", metavar="FORMAT", help="text or json (JSON lines).  [default: text]")
@click.option(
    "--log-prompts/--no-log-prompts", default=None, help="Log prompt text.  [default: off]"
)
@click.option("--root-path", metavar="PREFIX", help="Path prefix a proxy mounts the server under.")
@click.option(
    "--forwarded-allow-ips",
    metavar="ADDRESSES",
    help="Proxies (IPs, networks, or *) whose X-Forwarded-For names the client.  [default: none]",
)
@click.option("--ready-file", metavar="FILE", help="Write the ready line (JSON) here once serving.")
@click.option("--uds", metavar="PATH", help="Serve on this Unix socket instead of TCP.")
@click.option("--parent-pid", metavar="PID", help="Exit when the process PID has ended.")
@click.option(
    "--exit-on-stdin-close/--no-exit-on-stdin-close",
    default=None,
    help="Exit when standard input closes.",
)
@click.option(
    "--quiet/--no-quiet",
    default=None,
    help="Log warnings and errors only: no start-up lines or progress bars (for embedders).",
)
@click.option(
    "--allowed-media-dir",
    metavar="DIR",
    multiple=True,
    help="Directory image files may be read from (repeatable).  [default: none, files refused]",
)
@click.option(
    "--allow-remote-media/--no-allow-remote-media",
    default=None,
    help="Fetch http(s) image URLs (public addresses only, redirects not followed).",
)
@click.option(
    "--max-image-bytes", metavar="BYTES", help="Largest image accepted.  [default: 20971520]"
)
@click.option(
    "--max-image-pixels",
    metavar="INT",
    help="Most pixels of one image, checked before decoding.  [default: 25000000]",
)
@click.option(
    "--max-images-per-request", metavar="INT", help="Most images per request.  [default: 8]"
)
@click.option(
    "--image-formats",
    metavar="LIST",
    help="Accepted image formats, comma-separated.  [default: png,jpeg,webp,gif]",
)
@click.option(
    "--remote-media-timeout-s",
    metavar="SECONDS",
    help="Time limit of fetching one image URL.  [default: 10]",
)
@click.option(
    "--distributed-mode",
    type=click.Choice(["tensor", "pipeline"]),
    help="Under mlx.launch: split the model by heads or by layers.  [default: tensor]",
)
@click.option(
    "--distributed-timeout-s",
    metavar="SECONDS",
    help="Under mlx.launch: longest step before the group is declared failed.  [default: 120]",
)
@click.version_option(package_name="mlx-engine-server")
@click.pass_context
def cli(ctx: click.Context, /, config_file: Path | None, **values: Any) -> None:
    """Serve one MLX model over an OpenAI-compatible HTTP API.

    MODEL_PATH is a model directory (mlx-lm format), a Hugging Face repo id from the local
    cache, or a .gguf file. Without it, the bundled SmolLM2-135M-Instruct is served.
    """
    typed = {
        name: value
        for name, value in values.items()
        if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE
    }
    try:
        settings = load_settings(typed, config_file)
    except SettingsError as exc:
        click.echo(f"mlx-server: {exc}", err=True)
        sys.exit(EXIT_BAD_SETTINGS)
    configure_logging(effective_log_level(settings), settings.log_format)
    from .serve import serve  # noqa: PLC0415 - imports MLX: only once the settings are good

    try:
        code = serve(settings)
    except StartupError as exc:  # 1, or 5 when the address cannot be bound
        click.echo(f"mlx-server: {exc}", err=True)
        sys.exit(exc.exit_status)
    sys.exit(code)
