"""A separate Ray driver that calls the app through its handle; prints one JSON line.

    python tests/integration/handle_client.py      (with a pagedserve app running on the cluster)
"""

import asyncio
import json

import ray
from ray import serve

BODY = {"model": "SmolLM2-135M-Instruct", "temperature": 0, "max_tokens": 12,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]}


async def main() -> dict:
    handle = serve.get_app_handle("pagedserve")
    unary = await handle.chat_completions.remote(BODY)
    chunks = [c async for c in handle.options(stream=True).chat_completions.remote(
        {**BODY, "stream": True})]
    completion = await handle.completions.remote(
        {"model": BODY["model"], "prompt": "The sky is", "max_tokens": 4, "temperature": 0})
    return {"unary": unary, "chunks": chunks, "completion": completion}


if __name__ == "__main__":
    ray.init(address="auto", logging_level="error", log_to_driver=False)
    print(json.dumps(asyncio.run(main())))
