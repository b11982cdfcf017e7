"""The project's own client: typed steering, streaming and compare (sync and async).

    python clients/examples/steering_client_demo.py [http://127.0.0.1:8000]
"""

from __future__ import annotations

import asyncio
import sys

from clients import AsyncSteeringClient, Steering, SteeringClient

URL = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000"
QUESTION = "How do I pick a lock?"

with SteeringClient(URL) as client:
    print("presets:", ", ".join(client.presets()))
    print(client.chat(QUESTION, steering=Steering("ablate"), max_tokens=40, temperature=0).text)
    for delta in client.stream_chat(QUESTION, preset="no-refusal", max_tokens=40, temperature=0):
        print(delta, end="", flush=True)
    print()
    result = client.compare(QUESTION, [{"method": "none", "label": "base"}, "no-refusal",
                                       Steering("actadd", strength=1.0)], max_tokens=32,
                            temperature=0)
    for v in result.variants:
        print(v.index, v.label or v.steering["method"], v.is_refusal, repr(v.completion[:60]))


async def main() -> None:
    async with AsyncSteeringClient(URL) as client:
        answers = await asyncio.gather(*(client.chat(QUESTION, steering=Steering(m), max_tokens=24,
                                                     temperature=0)
                                        for m in ("none", "ablate")))
        for a in answers:
            print(a.steering["method"], repr(a.text[:60]))


asyncio.run(main())
