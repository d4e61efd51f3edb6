"""Talk to a running mlx-server with the official openai SDK, without and with streaming.

.venv/bin/python examples/client.py [--base-url http://127.0.0.1:8000/v1]
"""

from __future__ import annotations

import argparse

from openai import OpenAI

QUESTION = "What is the capital of France?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="unused")
    parser.add_argument("--max-tokens", type=int, default=30)
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)

    reply = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=args.max_tokens,
        temperature=0,
    )
    print("non-streaming:", reply.choices[0].message.content)

    stream = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=args.max_tokens,
        temperature=0,
        stream=True,
    )
    print("streaming:    ", end="", flush=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
